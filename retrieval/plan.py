"""The WindowPlan: what one engine step attends to, and what it computes.

A step's attention window is laid out in window positions 0, 1, 2, ...:

    [ injected segments (N tokens) | anchor (0 or 1 token) | new tokens (C) ]

* **Injected segments** are token ranges of a session's KV log. Their K/V is copied from the log into
  the engine's cache; keys are re-rotated from the position they were computed at to their window
  position. The engine computes nothing for them.
* **The anchor** is one token read from a log (normally the stream token just before the new
  tokens). The engine *recomputes* it at window position N, so that the first new token gets a real
  surprise value −log p(new[0] | window). Its K/V is not appended to the log again.
* **New tokens** are computed at window positions N+anchor .. N+anchor+C−1. Their K/V is appended to
  the plan's ``capture_log`` (when set) together with their window positions.

All layers see the same window length; ``layer_segments`` optionally gives each layer its own list
of injected segments (equal total length per layer), so retrieval can be per layer.

This module is pure data: both engines (vLLM and the HF reference) take the same plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from emserve.retrieval.errors import PlanError


@dataclass(frozen=True, slots=True)
class Segment:
    """Tokens ``[start, end)`` of the KV log in directory ``log``."""

    log: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end):
            raise PlanError(f"segment range must satisfy 0 <= start < end, got [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Anchor:
    """Token ``index`` of the KV log in directory ``log``, recomputed just before the new tokens."""

    log: str
    index: int

    def __post_init__(self) -> None:
        if self.index < 0:
            raise PlanError(f"anchor index must be >= 0, got {self.index}")


@dataclass(frozen=True)
class WindowPlan:
    """One engine step. See the module docstring for the layout and semantics."""

    new_token_ids: tuple[int, ...]
    segments: tuple[Segment, ...] = ()
    layer_segments: tuple[tuple[Segment, ...], ...] | None = None
    anchor: Anchor | None = None
    capture_log: str | None = None
    request_id: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.new_token_ids) == 0:
            raise PlanError("a step needs at least one new token")
        if self.layer_segments is not None:
            lens = {sum(len(s) for s in segs) for segs in self.layer_segments}
            if len(lens) > 1:
                raise PlanError(f"per-layer segment lists must have equal total length, got {sorted(lens)}")
            if self.segments:
                raise PlanError("give either segments or layer_segments, not both")

    @classmethod
    def build(
        cls,
        new_token_ids: Sequence[int],
        segments: Sequence[Segment] = (),
        *,
        layer_segments: Sequence[Sequence[Segment]] | None = None,
        anchor: Anchor | None = None,
        capture_log: str | None = None,
        request_id: str | None = None,
    ) -> WindowPlan:
        return cls(
            new_token_ids=tuple(int(t) for t in new_token_ids),
            segments=tuple(segments),
            layer_segments=None if layer_segments is None else tuple(tuple(s) for s in layer_segments),
            anchor=anchor,
            capture_log=capture_log,
            request_id=request_id,
        )

    @property
    def num_injected(self) -> int:
        """N: injected tokens (equal for every layer)."""
        if self.layer_segments is not None:
            return sum(len(s) for s in self.layer_segments[0]) if self.layer_segments else 0
        return sum(len(s) for s in self.segments)

    @property
    def num_anchor(self) -> int:
        return 0 if self.anchor is None else 1

    @property
    def num_new(self) -> int:
        return len(self.new_token_ids)

    @property
    def window_len(self) -> int:
        """Tokens in the window once the new tokens are computed."""
        return self.num_injected + self.num_anchor + self.num_new

    @property
    def first_new_position(self) -> int:
        return self.num_injected + self.num_anchor

    def segments_for_layer(self, layer: int) -> tuple[Segment, ...]:
        if self.layer_segments is not None:
            return self.layer_segments[layer]
        return self.segments

    def check_layers(self, num_layers: int) -> None:
        if self.layer_segments is not None and len(self.layer_segments) != num_layers:
            raise PlanError(f"layer_segments has {len(self.layer_segments)} lists, model has {num_layers} layers")

    def log_ranges(self, log: str) -> tuple[tuple[int, int], ...]:
        """The tokens of ``log`` in the window of every layer (injected segments and the anchor), as sorted,
        disjoint, non-adjacent ``[start, end)`` ranges: what all layers of the step attend to."""
        common: list[tuple[int, int]] | None = None
        for segs in self.layer_segments or (self.segments,):
            ranges = [(s.start, s.end) for s in segs if s.log == log]
            if self.anchor is not None and self.anchor.log == log:
                ranges.append((self.anchor.index, self.anchor.index + 1))
            merged = _union(ranges)
            common = merged if common is None else _intersect(common, merged)
        return tuple(common or ())

    def logs(self) -> set[str]:
        """Every log directory the plan reads."""
        out: set[str] = set()
        for segs in self.layer_segments or (self.segments,):
            out.update(s.log for s in segs)
        if self.anchor is not None:
            out.add(self.anchor.log)
        return out

    def to_wire(self) -> dict[str, object]:
        """Plain-JSON form (travels to the vLLM engine core inside ``kv_transfer_params``)."""

        def segs(ss: Sequence[Segment]) -> list[list[object]]:
            return [[s.log, s.start, s.end] for s in ss]

        return {
            "segments": segs(self.segments),
            "layer_segments": None if self.layer_segments is None else [segs(x) for x in self.layer_segments],
            "anchor": None if self.anchor is None else [self.anchor.log, self.anchor.index],
            "num_new": self.num_new,
            "capture_log": self.capture_log,
        }

    @staticmethod
    def segments_from_wire(raw: Sequence[Sequence[object]]) -> tuple[Segment, ...]:
        return tuple(Segment(str(x[0]), int(x[1]), int(x[2])) for x in raw)  # type: ignore[call-overload]


def _union(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _intersect(x: Sequence[tuple[int, int]], y: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Intersection of two sorted, disjoint range lists."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if lo < hi:
            out.append((lo, hi))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out

"""Configuration of the online event segmenter.

Names follow EM-LLM where they mean the same thing (``n_init``, ``n_local``, ``min_block_size``,
``max_block_size``, ``surprisal_threshold_gamma``, ``similarity_metric``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from emserve.segmenter.errors import SegmenterError

Splitter = Literal["surprise", "uniform", "random"]
Metric = Literal["none", "modularity", "conductance"]

#: Largest surprise window τ. Window sums of quantised squared surprises must stay exact in int64
#: (see ``surprise.py``): (τ + feed piece) · 2**40 < 2**63.
MAX_SURPRISE_WINDOW = 1 << 22


@dataclass(frozen=True)
class SegmenterConfig:
    """Settings of :class:`~emserve.segmenter.segmenter.OnlineSegmenter`. Validated on construction."""

    n_init: int = 128
    """Sink tokens: stream offsets ``[0, n_init)`` are never part of an event. The first event
    starts at ``n_init``. Their surprise still counts in the threshold window."""

    n_local: int = 1024
    """Local window: by default an event is closed (returned) only once all its tokens are older than
    the ``n_local`` most recent ones (see ``close_lag``). Also the default surprise window τ. The
    product's (EM-LLM: 4096); the same as the retrieval library's, which a test checks."""

    close_lag: int | None = None
    """An event is closed (returned) once its end is at least ``close_lag`` tokens behind the stream.
    ``None``: ``n_local`` (EM-LLM: an event enters memory when it leaves the local window);
    ``min_block_size`` (the least allowed, so that a short tail can still join the last event at
    ``flush``): about as soon as its boundaries are final. The events are the same either way; only
    when they are returned differs."""

    surprise_window: int | None = None
    """τ: the threshold of token t is computed over the surprises of the τ tokens strictly before t
    (fewer at the start of the stream). ``None`` means ``n_local``."""

    surprisal_threshold_gamma: float = 1.0
    """γ: token t opens an event when ``s_t > mean(W) + γ·std(W)`` (unbiased std)."""

    surprise_warmup: int = 32
    """No surprise boundary while the window W holds fewer than ``min(τ, surprise_warmup)``
    tokens (the mean and std of a handful of tokens are noise). Must be >= 2."""

    min_block_size: int = 8
    """Smallest event. A raw boundary closer than this to the previous accepted boundary is
    dropped, so the short residue is merged into the *next* event (as EM-LLM does); see
    ``segmenter.py`` for why. A short tail at end of stream joins the previous event."""

    max_block_size: int = 128
    """Largest event. Longer events are cut into ``ceil(n / max_block_size)`` near-equal pieces.
    Must be >= 2·min_block_size so that every piece is >= min_block_size. Also the block size of
    the ``uniform`` splitter (InfLLM's ``block_size``)."""

    max_event_span: int = 512
    """Longest stretch between two accepted boundaries (before the max_block_size split). When no
    boundary comes within this many tokens, one is forced at ``previous + max_event_span`` (and
    refined like any other). It bounds the pending state, the refinement graph (at most
    ``2·max_event_span`` tokens) and how long a quiet stretch waits to be closed. Must be
    >= max_block_size. EM-LLM's refinement is implicitly bounded by its 512-token chunk."""

    splitter: Splitter = "surprise"
    """Where raw boundaries come from: ``surprise`` (EM-LLM), ``uniform`` (a boundary every
    ``max_block_size`` tokens from ``n_init``, InfLLM-style) or ``random`` (each token independently
    with probability ``random_rate``, seeded, chunking invariant)."""

    similarity_metric: Metric = "modularity"
    """Boundary refinement over the key-similarity graph: ``none`` keeps raw boundaries,
    ``modularity`` moves each to the split of maximal modularity, ``conductance`` to the split of
    minimal conductance (see ``refine.py``). Anything but ``none`` needs a key callback."""

    refine_layers: tuple[int, int] | None = None
    """Half-open layer range ``[first, stop)`` whose keys form the similarity graph. ``None`` means
    the upper third, ``[2·L // 3, L)`` (see :meth:`layer_range`). The key callback returns these."""

    random_seed: int = 0
    """Seed of the ``random`` splitter (0 <= seed < 2**64)."""

    random_rate: float = 1.0 / 64.0
    """Probability that a token is a raw boundary under the ``random`` splitter, in (0, 1]."""

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SegmenterError(f"SegmenterConfig: {msg}")

        for name in (
            "n_init",
            "n_local",
            "surprise_warmup",
            "min_block_size",
            "max_block_size",
            "max_event_span",
            "random_seed",
        ):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool), f"{name} must be an int, got {v!r}")
        need(self.n_init >= 0, f"n_init must be >= 0, got {self.n_init}")
        need(self.min_block_size >= 1, f"min_block_size must be >= 1, got {self.min_block_size}")
        need(
            self.max_block_size >= 2 * self.min_block_size,
            f"max_block_size ({self.max_block_size}) must be >= 2 * min_block_size ({self.min_block_size})",
        )
        need(
            self.max_event_span >= self.max_block_size,
            f"max_event_span ({self.max_event_span}) must be >= max_block_size ({self.max_block_size})",
        )
        need(
            self.n_local >= self.min_block_size,
            f"n_local ({self.n_local}) must be >= min_block_size ({self.min_block_size})",
        )
        if self.close_lag is not None:
            cl = self.close_lag
            need(isinstance(cl, int) and not isinstance(cl, bool) and cl >= self.min_block_size,
                 f"close_lag must be an int >= min_block_size ({self.min_block_size}) or None, got {cl!r}")
        if self.surprise_window is not None:
            sw = self.surprise_window
            need(isinstance(sw, int) and not isinstance(sw, bool), f"surprise_window must be an int, got {sw!r}")
        need(
            2 <= self.tau <= MAX_SURPRISE_WINDOW,
            f"surprise window must be in [2, {MAX_SURPRISE_WINDOW}], got {self.tau}",
        )
        need(self.surprise_warmup >= 2, f"surprise_warmup must be >= 2, got {self.surprise_warmup}")
        g = self.surprisal_threshold_gamma
        need(isinstance(g, int | float) and math.isfinite(g), f"surprisal_threshold_gamma must be finite, got {g!r}")
        need(
            self.splitter in get_args(Splitter), f"splitter must be one of {get_args(Splitter)}, got {self.splitter!r}"
        )
        need(
            self.similarity_metric in get_args(Metric),
            f"similarity_metric must be one of {get_args(Metric)}, got {self.similarity_metric!r}",
        )
        if self.refine_layers is not None:
            rl = self.refine_layers
            need(
                isinstance(rl, tuple) and len(rl) == 2 and all(isinstance(x, int) for x in rl) and 0 <= rl[0] < rl[1],
                f"refine_layers must be (first, stop) with 0 <= first < stop, got {rl!r}",
            )
        need(0 <= self.random_seed < 1 << 64, f"random_seed must be in [0, 2**64), got {self.random_seed}")
        r = self.random_rate
        need(isinstance(r, int | float) and 0.0 < r <= 1.0, f"random_rate must be in (0, 1], got {r!r}")

    @property
    def lag(self) -> int:
        """The effective close lag (``close_lag``, or ``n_local``)."""
        return self.n_local if self.close_lag is None else self.close_lag

    @property
    def tau(self) -> int:
        """The effective surprise window τ."""
        return self.n_local if self.surprise_window is None else self.surprise_window

    @property
    def warmup(self) -> int:
        """Minimum number of window tokens before a surprise boundary can fire."""
        return min(self.tau, self.surprise_warmup)

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """The half-open layer range whose keys the refinement callback must return."""
        if num_layers < 1:
            raise SegmenterError(f"num_layers must be >= 1, got {num_layers}")
        if self.refine_layers is None:
            return (2 * num_layers) // 3, num_layers
        first, stop = self.refine_layers
        if stop > num_layers:
            raise SegmenterError(f"refine_layers {self.refine_layers} exceed the model's {num_layers} layers")
        return first, stop

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        d = asdict(self)
        if d["refine_layers"] is not None:
            d["refine_layers"] = list(d["refine_layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmenterConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        if d.get("refine_layers") is not None:
            d["refine_layers"] = tuple(d["refine_layers"])
        return cls(**d)

"""OnlineSegmenter: a token stream's surprise (and keys) in, closed episodic events out.

Contract
--------
* Called by the server process, once per engine step, with the step's new tokens in stream order:
  ``feed(surprise, keys)``; ``flush(keys)`` once at end of stream. It does no I/O: keys of a token
  range are pulled through the ``keys(start, end)`` callback, which must return the keys of
  absolute offsets ``[start, end)`` of the layers ``config.layer_range(num_layers)`` as a
  ``[L, end − start, H, D]`` tensor. It is only called with ``n_init <= start < end <= tokens fed
  so far`` (the current feed included), and only when ``similarity_metric != "none"``. If it
  raises, the exception propagates with the tokens already counted as fed; the pending boundary is
  simply retried on the next ``feed`` / ``flush`` (nothing is lost or duplicated).
* Output: every call returns the events that became *closed* during it, in stream order. Over the
  whole stream (feeds + flush) the events tile ``[n_init, N)`` without gaps or overlaps. Before
  ``flush`` an event is returned only once ``end <= tokens_seen − lag`` (``close_lag``; by default
  ``n_local``: it has left the local window); ``flush`` closes the rest.
* Determinism: the events are a function of the stream (surprises, keys) and the config only —
  identical for any chunking of the feeds and across ``state_dict`` / ``from_state_dict``.

The pipeline (all decisions are functions of token offsets, never of when a feed arrived)
------------------------------------------------------------------------------------------
1. **Raw boundaries** from the splitter (``surprise.py`` / ``splitters.py``), all ``> n_init``.
2. **Acceptance**, in order, from α = the last accepted boundary (``n_init`` at first):

   * a raw boundary β with ``β − α < min_block_size`` is **dropped**: the short residue ``[α, β)``
     is merged into the *next* event, which keeps starting at α. Why this way: a topic change
     usually makes a burst of surprising tokens, and keeping the first one puts the cut at the
     onset; the decision needs only α and β, so it is made the moment β is seen and never reopens
     an earlier event (merging backwards would move an accepted boundary); it matches EM-LLM.
   * if no raw boundary lies in ``(α, α + max_event_span]`` (known once the stream passes
     ``α + max_event_span``), one is **forced** at ``α + max_event_span``.
   * the boundary is then **refined** (``refine.py``) to ``t ∈ [α + min_block_size, β]`` on the
     graph of window ``[max(α, n_init), β + h)``, ``h = (β − α) // 2`` — so refinement waits
     until ``β + h`` tokens have been seen (at most ``max_event_span / 2`` after β) — and accepted.
     Every accepted event is therefore in ``[min_block_size, max_event_span]``.
3. **Sizing and closing**: an accepted event ``[a, b)`` closes when ``b <= tokens_seen − lag``
   and is returned cut by :func:`split_even` into near-equal pieces of at most ``max_block_size``.
4. **Flush**: pending boundaries are refined with windows clipped to the stream end; a tail shorter
   than ``min_block_size`` joins the previous event (there is no next one); everything closes.
   The only event that can be shorter than ``min_block_size`` is a stream whose whole non-sink part
   ``[n_init, N)`` is shorter — it is returned as one event.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from emserve.segmenter.config import SegmenterConfig
from emserve.segmenter.errors import SegmenterError
from emserve.segmenter.events import Event, split_even
from emserve.segmenter.refine import adjacency, refine_boundary, window
from emserve.segmenter.splitters import random_boundaries, uniform_boundaries
from emserve.segmenter.surprise import SurpriseState, surprise_boundaries

KeyFn = Callable[[int, int], torch.Tensor]
"""``keys(start, end) -> Tensor[L, end − start, H, D]``: keys of absolute token offsets [start, end)."""

STATE_VERSION = 1


class OnlineSegmenter:
    """Streaming event segmentation. See the module docstring for the contract."""

    def __init__(self, config: SegmenterConfig) -> None:
        self.config = config
        self._threshold = SurpriseState()
        self._raw: deque[int] = deque()  # raw boundaries not yet accepted or dropped
        self._starts: deque[int] = deque([config.n_init])  # starts of unclosed events; last = α
        self._surprise = np.zeros(0, dtype=np.float64)  # surprises of [starts[0], seen)
        self._finished = False

    @property
    def tokens_seen(self) -> int:
        """Number of stream tokens fed so far."""
        return self._threshold.seen

    @property
    def closed_until(self) -> int:
        """Every token before this offset (from ``n_init``) belongs to a returned event."""
        return self._starts[0]

    def feed(self, surprise: npt.ArrayLike, keys: KeyFn | None = None) -> list[Event]:
        """Add the next ``len(surprise)`` tokens (surprise of each token itself, in nats; see
        ``surprise.py`` for the alignment) and return the events closed by them."""
        s = self._check_input(surprise, keys)
        cfg = self.config
        start = self.tokens_seen
        end = start + s.size
        if cfg.splitter == "surprise":
            raw = surprise_boundaries(
                self._threshold,
                s,
                window=cfg.tau,
                gamma=cfg.surprisal_threshold_gamma,
                warmup=cfg.warmup,
                n_init=cfg.n_init,
            )
        else:
            self._advance_threshold(s)
            if cfg.splitter == "uniform":
                raw = uniform_boundaries(start, end, n_init=cfg.n_init, block_size=cfg.max_block_size)
            else:
                raw = random_boundaries(start, end, n_init=cfg.n_init, rate=cfg.random_rate, seed=cfg.random_seed)
        keep_from = max(cfg.n_init - start, 0)
        if keep_from < s.size:
            self._surprise = np.concatenate([self._surprise, s[keep_from:]])
        self._raw.extend(int(b) for b in raw)
        self._accept(keys, final=False)
        return self._close(self.tokens_seen - cfg.lag)

    def flush(self, keys: KeyFn | None = None) -> list[Event]:
        """End of stream: settle every pending boundary and close all remaining events. The
        segmenter accepts no further input afterwards."""
        self._check_usable(keys)
        self._accept(keys, final=True)
        end = self.tokens_seen
        if end > self._starts[-1]:
            if end - self._starts[-1] < self.config.min_block_size and len(self._starts) >= 2:
                self._starts.pop()  # the short tail joins the previous event
            self._starts.append(end)
        events = self._close(end)
        self._finished = True
        return events

    # -- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: plain JSON-able values and numpy arrays."""
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "seen": self._threshold.seen,
            "history": self._threshold.history.copy(),
            "raw": list(self._raw),
            "starts": list(self._starts),
            "surprise": self._surprise.copy(),
            "finished": self._finished,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], config: SegmenterConfig | None = None) -> OnlineSegmenter:
        """Rebuild a segmenter from :meth:`state_dict`. If ``config`` is given it must equal the
        saved one (a different config would not reproduce the same events)."""
        if state.get("version") != STATE_VERSION:
            raise SegmenterError(f"unsupported segmenter state version {state.get('version')!r}")
        saved = SegmenterConfig.from_dict(state["config"])
        if config is not None and config != saved:
            raise SegmenterError("segmenter state was saved with a different config")
        seg = cls(saved)
        seg._threshold = SurpriseState(
            seen=int(state["seen"]), history=np.asarray(state["history"], dtype=np.int64).copy()
        )
        seg._raw = deque(int(b) for b in state["raw"])
        seg._starts = deque(int(b) for b in state["starts"])
        seg._surprise = np.asarray(state["surprise"], dtype=np.float64).copy()
        seg._finished = bool(state["finished"])
        if not seg._starts or seg._surprise.size != max(seg.tokens_seen - seg._starts[0], 0):
            raise SegmenterError("inconsistent segmenter state")
        return seg

    # -- internals ---------------------------------------------------------------------------

    def _check_usable(self, keys: KeyFn | None) -> None:
        if self._finished:
            raise SegmenterError("the segmenter was flushed; start a new one for a new stream")
        if self.config.similarity_metric != "none" and keys is None:
            raise SegmenterError(f"similarity_metric={self.config.similarity_metric!r} needs a keys callback")

    def _check_input(self, surprise: npt.ArrayLike, keys: KeyFn | None) -> npt.NDArray[np.float64]:
        self._check_usable(keys)
        s = np.asarray(surprise, dtype=np.float64)
        if s.ndim != 1:
            raise SegmenterError(f"surprise must be 1-D, got shape {s.shape}")
        if not np.isfinite(s).all():
            raise SegmenterError("surprise must be finite")
        return s

    def _advance_threshold(self, s: npt.NDArray[np.float64]) -> None:
        # The ablation splitters need no surprise history; the stream length still lives here.
        self._threshold.seen += int(s.size)

    def _accept(self, keys: KeyFn | None, *, final: bool) -> None:
        cfg = self.config
        seen = self.tokens_seen
        while True:
            alpha = self._starts[-1]
            if self._raw and self._raw[0] - alpha < cfg.min_block_size:
                self._raw.popleft()
                continue
            if self._raw and self._raw[0] - alpha <= cfg.max_event_span:
                beta, forced = self._raw[0], False
            elif seen > alpha + cfg.max_event_span:
                beta, forced = alpha + cfg.max_event_span, True
            else:
                return
            if cfg.similarity_metric != "none":
                lo, hi = window(alpha, beta, floor=cfg.n_init, end=seen)
                if hi < beta + (beta - alpha) // 2 and not final:
                    return  # lookahead keys not seen yet
                assert keys is not None
                adj = adjacency(keys(lo, hi)).cpu().numpy()
                if adj.shape != (hi - lo, hi - lo):
                    raise SegmenterError(f"keys({lo}, {hi}) returned {adj.shape[0]} tokens, expected {hi - lo}")
                beta_new = refine_boundary(
                    adj, lo, alpha, beta, min_size=cfg.min_block_size, metric=cfg.similarity_metric
                )
            else:
                beta_new = beta
            if not forced:
                self._raw.popleft()
            self._starts.append(beta_new)

    def _close(self, limit: int) -> list[Event]:
        out: list[Event] = []
        base = self._starts[0]
        while len(self._starts) >= 2 and self._starts[1] <= limit:
            a, b = self._starts.popleft(), self._starts[0]
            for lo, hi in split_even(a, b, self.config.max_block_size):
                s = self._surprise[lo - base : hi - base]
                out.append(Event(start=lo, end=hi, start_surprise=float(s[0]), max_surprise=float(s.max())))
        if self._starts[0] > base:
            self._surprise = self._surprise[self._starts[0] - base :].copy()
        return out

"""Online surprise threshold: which tokens open a new event.

Contract
--------
* Alignment: ``surprise[i]`` is the surprise of stream token ``t = state.seen + i`` itself,
  ``s_t = −log p(x_t | x_<t)`` (vLLM's prompt logprob of token t). A boundary at t means *token t
  is the first token of a new event*: the boundary sits at the surprising token, as in the EM-LLM
  paper. (EM-LLM's code flags position i from the label of token i+1, one token early.) Token 0 has
  no context; callers pass 0 for it.
* Rule: t is a boundary iff ``t > n_init``, the window ``W = s[max(0, t−τ) : t]`` (the τ surprises
  strictly before t, sink tokens included) holds at least ``warmup`` values, and
  ``s_t > mean(W) + γ·std(W)`` with the unbiased std (``torch.std``, ddof=1). ``n_init`` itself is
  never reported: it always starts the first event.
* Warm-up: during the first ``warmup`` tokens of the stream W is too short to estimate a spread,
  so nothing fires there; afterwards W grows until it holds τ tokens. There is no special
  first-chunk rule (EM-LLM uses the first chunk's first ``n_init`` tokens, a consequence of its
  chunked bookkeeping), so the result does not depend on chunking.
* Exact reproducibility: surprises are quantised to multiples of 2**-12 nats after clipping to
  [0, 256] and kept as int64, so the window sums are exact integers whatever the chunk seams; the
  mean/std/compare that follow are elementwise IEEE operations of those integers, hence identical
  for any chunking and on resume from a saved state. (2**-12 nats is far below any meaningful
  difference of a statistical threshold; probabilities below e**-256 are clipped.)
* Vectorised: sliding-window sums via cumulative sums, no per-token Python loop. Very long feeds
  are processed in pieces of ``PIECE`` tokens to keep the int64 sums in range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from emserve.segmenter.errors import SegmenterError

QUANT_BITS = 12
QUANT_SCALE = float(1 << QUANT_BITS)
SURPRISE_CLIP = 256.0
PIECE = 1 << 16

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def quantize_surprise(surprise: npt.ArrayLike) -> IntArray:
    """Surprise in nats → int64 multiples of 2**-12 nats, clipped to [0, 256] nats."""
    s = np.asarray(surprise, dtype=np.float64)
    if np.isnan(s).any():
        raise SegmenterError("surprise contains NaN")
    return np.rint(np.clip(s, 0.0, SURPRISE_CLIP) * QUANT_SCALE).astype(np.int64)


@dataclass
class SurpriseState:
    """What the threshold carries across chunk seams: the stream length so far and the quantised
    surprises of its last ``min(seen, τ)`` tokens."""

    seen: int = 0
    history: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def surprise_boundaries(
    state: SurpriseState,
    surprise: npt.ArrayLike,
    *,
    window: int,
    gamma: float,
    warmup: int,
    n_init: int,
) -> IntArray:
    """Absolute offsets (ascending) of the boundaries among the next ``len(surprise)`` tokens.

    Updates ``state`` in place (``seen`` and ``history``). See the module docstring for the rule.
    """
    if window < 2 or warmup < 2 or warmup > window:
        raise SegmenterError(f"need 2 <= warmup <= window, got warmup={warmup}, window={window}")
    q_all = quantize_surprise(surprise).reshape(-1)
    out: list[IntArray] = []
    for lo in range(0, q_all.size, PIECE):
        out.append(_piece(state, q_all[lo : lo + PIECE], window, gamma, warmup, n_init))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _piece(state: SurpriseState, q: IntArray, window: int, gamma: float, warmup: int, n_init: int) -> IntArray:
    hist = state.history
    x = np.concatenate([hist, q])
    c1 = np.zeros(x.size + 1, dtype=np.int64)
    c2 = np.zeros(x.size + 1, dtype=np.int64)
    np.cumsum(x, out=c1[1:])
    np.cumsum(x * x, out=c2[1:])
    idx = np.arange(hist.size, x.size)  # index in x of each new token
    lo = np.maximum(idx - window, 0)
    n = idx - lo  # = min(t, τ): depends on t only, since history holds min(seen, τ) tokens
    s1 = (c1[idx] - c1[lo]).astype(np.float64)  # exact: |s1| < 2**53
    s2 = (c2[idx] - c2[lo]).astype(np.float64)
    nf = n.astype(np.float64)
    ok = n >= warmup
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s1 / nf
        var = np.maximum((s2 - s1 * mean) / (nf - 1.0), 0.0)
    thr = mean + gamma * np.sqrt(var)
    t = state.seen + np.arange(q.size, dtype=np.int64)
    hit = ok & (t > n_init) & (q.astype(np.float64) > thr)
    state.seen += int(q.size)
    state.history = x[-window:].copy()
    return t[hit]

"""Ablation splitters: raw boundaries that ignore surprise.

Both are pure functions of the absolute token offset (no state), so they are chunking invariant
and resume without state. Like the surprise splitter they only report offsets ``t > n_init``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def uniform_boundaries(start: int, end: int, *, n_init: int, block_size: int) -> IntArray:
    """InfLLM-style fixed blocks: the offsets ``n_init + k·block_size`` (k >= 1) in ``[start, end)``."""
    first = max(start, n_init + 1)
    if first >= end:
        return np.zeros(0, dtype=np.int64)
    k0 = -(-(first - n_init) // block_size)  # ceil
    return np.arange(n_init + k0 * block_size, end, block_size, dtype=np.int64)


def _splitmix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def random_boundaries(start: int, end: int, *, n_init: int, rate: float, seed: int) -> IntArray:
    """Each offset ``t > n_init`` in ``[start, end)`` is a boundary with probability ``rate``,
    decided by a counter-based hash of ``(seed, t)`` (SplitMix64), so the draw for t never depends
    on how the stream was chunked."""
    first = max(start, n_init + 1)
    if first >= end:
        return np.zeros(0, dtype=np.int64)
    t = np.arange(first, end, dtype=np.int64)
    key = _splitmix64(np.array([seed], dtype=np.uint64))
    u = (_splitmix64(t.astype(np.uint64) ^ key) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return t[u < rate]

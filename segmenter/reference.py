"""Direct O(s³) reference implementation of boundary refinement (a test oracle, not for production).

Every candidate split's community sums are computed from scratch by summing the sub-blocks of the
adjacency (O(s²) per candidate, O(s³) per boundary, as EM-LLM does); the score is then the same
formula as in ``refine.py`` (:func:`modularity_score`, :func:`conductance_score`), so on graphs
whose sums are exact in float64 (small integer weights) the chosen boundaries must be *identical*,
ties included. :func:`textbook_modularity` is Newman's definition written out, to check the formula.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from emserve.segmenter.config import Metric
from emserve.segmenter.errors import SegmenterError
from emserve.segmenter.refine import conductance_score, modularity_score, window


def direct_objective(adj: npt.ArrayLike, t: int, metric: Metric) -> float:
    """Score (larger is better; NaN if undefined) of the split ``[0, t) | [t, T)`` of ``adj``,
    from sums over explicit sub-blocks."""
    a = np.asarray(adj, dtype=np.float64)
    deg = a.sum(axis=1)
    total = float(a.sum())
    in_s = np.array([a[:t, :t].sum()])
    in_r = np.array([a[t:, t:].sum()])
    vol_s = np.array([deg[:t].sum()])
    vol_r = np.array([deg[t:].sum()])
    if metric == "modularity":
        return float(modularity_score(in_s, in_r, vol_s, vol_r, total)[0])
    if metric == "conductance":
        return -float(conductance_score(in_s, vol_s, vol_r)[0])
    raise SegmenterError(f"no objective for similarity_metric {metric!r}")


def textbook_modularity(adj: npt.ArrayLike, t: int) -> float:
    """``Q = (1/2m) Σ_c Σ_{i,j∈c} (A_ij − k_i k_j / 2m)`` for communities ``[0, t)`` and ``[t, T)``."""
    a = np.asarray(adj, dtype=np.float64)
    k = a.sum(axis=1)
    two_m = a.sum()
    b = a - np.outer(k, k) / two_m
    return float((b[:t, :t].sum() + b[t:, t:].sum()) / two_m)


def reference_refine_boundary(
    adj: npt.ArrayLike, lo: int, alpha: int, beta: int, *, min_size: int, metric: Metric
) -> int:
    """Same contract as :func:`emserve.segmenter.refine.refine_boundary`, by direct sums."""
    if metric == "none" or beta - alpha < min_size:
        return beta
    best_t, best_v = beta, float("nan")
    for t in range(alpha + min_size, beta + 1):
        v = direct_objective(adj, t - lo, metric)
        if np.isfinite(v) and not (v < best_v):  # ">=" keeps the largest t among ties
            best_t, best_v = t, v
    return best_t


def reference_refine_boundaries(
    adj: npt.ArrayLike, boundaries: Sequence[int], *, start: int, min_size: int, metric: Metric
) -> list[int]:
    """Same contract as :func:`emserve.segmenter.refine.refine_boundaries`, by direct sums."""
    a = np.asarray(adj, dtype=np.float64)
    out: list[int] = []
    alpha = start
    for b in boundaries:
        lo, hi = window(alpha, int(b), floor=start, end=a.shape[0])
        alpha = reference_refine_boundary(a[lo:hi, lo:hi], lo, alpha, int(b), min_size=min_size, metric=metric)
        out.append(alpha)
    return out

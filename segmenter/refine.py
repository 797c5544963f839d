"""Boundary refinement over a key-similarity graph, with O(1) scores after O(T²) prefix sums.

The graph
---------
Nodes are tokens; ``A = Σ_l Σ_h K_lh K_lhᵀ`` over the keys of the refinement layers and all KV
heads (:func:`adjacency`, a Gram matrix computed in fp32, as EM-LLM does; fp16 overflows). Scores
are then computed in float64 from that matrix. A is used as is: dot products may be negative.

Objective of one refinement (EM-LLM's, with our range; see ``emllm-reference.md`` §2)
---------------------------------------------------------------------------------------
Boundaries are refined in order. Let α be the previous boundary *after* its refinement (the stream
start ``n_init`` for the first) and β the boundary to move, with ``β − α >= min_size``. Let
``h = (β − α) // 2`` and take the window ``W = [max(α, floor), min(β + h, end))``, where
``floor`` is the first non-sink token and ``end`` the stream length. (EM-LLM's window starts at
``α − h``: then the previous event's tail forms the left community and the best split collapses to α,
clamped to ``α + min_size``; a window that starts at α splits only the event being decided from what
follows it: ``docs/decisions.md``, "Refinement window".) Inside W, with
``k_i = Σ_{j∈W} A_ij``, ``2m = Σ_{i,j∈W} A_ij``, a candidate t splits W into ``S = [lo, t)`` and
``S̄ = [t, hi)``; with ``in(X) = Σ_{i,j∈X} A_ij``, ``vol(X) = Σ_{i∈X} k_i``:

* modularity (maximised): ``Q(t) = [in(S) − vol(S)²/2m + in(S̄) − vol(S̄)²/2m] / 2m``
  (Newman's Q; EM-LLM divides by 4m instead, the same argmax). Undefined where ``2m <= 0``.
* conductance (minimised): ``φ(t) = (vol(S) − in(S)) / min(vol(S), vol(S̄))``, the numerator
  being the cut. Undefined where ``min(vol(S), vol(S̄)) <= 0``.

Search range: ``t ∈ [α + min_size, β]``. So a boundary only moves earlier (EM-LLM), never makes
the event before it shorter than ``min_size``, and never crosses α; unlike EM-LLM's code (which
excludes β) β itself is a candidate — the paper's ``(α, β]`` — so a boundary that already sits at
the best split stays. Ties: the largest t wins (the least movement). If no candidate has a defined
score (e.g. an all-zero graph) β stays. The number of boundaries never changes.

Cost: the 2-D prefix sum ``P`` of the window's A gives ``in(S) = P[t,t]``, ``vol(S) = P[t,T]``,
``2m = P[T,T]`` and ``in(S̄)`` by inclusion–exclusion, so every candidate costs O(1) after O(T²)
setup, instead of EM-LLM's O(s²) per candidate (O(Σs³) in all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from emserve.segmenter.config import Metric
from emserve.segmenter.errors import SegmenterError

FloatArray = npt.NDArray[np.float64]


def adjacency(keys: torch.Tensor) -> torch.Tensor:
    """``A[i, j] = Σ_l Σ_h <keys[l, i, h], keys[l, j, h]>`` for keys ``[L, T, H, D]``; fp32 ``[T, T]``."""
    if keys.dim() != 4:
        raise SegmenterError(f"keys must be [layers, tokens, heads, head_dim], got shape {tuple(keys.shape)}")
    t = keys.shape[1]
    x = keys.detach().to(torch.float32).permute(1, 0, 2, 3).reshape(t, -1)
    a = x @ x.T
    # a blocked GEMM need not give A[i, j] and A[j, i] the same rounding (it does not on AMD EPYC's kernels):
    # the graph is undirected, so make it exactly symmetric
    return (a + a.T) * 0.5


def window(alpha: int, beta: int, *, floor: int, end: int) -> tuple[int, int]:
    """The token window ``[lo, hi)`` whose graph decides where β goes (see module docstring)."""
    h = (beta - alpha) // 2
    return max(alpha, floor), min(beta + h, end)


@dataclass(frozen=True)
class SplitSums:
    """For each split ``t = 0..T`` of a window: ``in_s = in(S)``, ``in_r = in(S̄)``,
    ``vol_s = vol(S)``, ``vol_r = vol(S̄)``; and ``total = 2m``."""

    in_s: FloatArray
    in_r: FloatArray
    vol_s: FloatArray
    vol_r: FloatArray
    total: float


def split_sums(adj: npt.ArrayLike) -> SplitSums:
    """All split sums of a window's adjacency in O(T²) via a 2-D prefix sum."""
    a = np.asarray(adj, dtype=np.float64)
    n = a.shape[0]
    p = np.zeros((n + 1, n + 1), dtype=np.float64)
    np.cumsum(np.cumsum(a, axis=0), axis=1, out=p[1:, 1:])
    d = np.arange(n + 1)
    in_s = p[d, d]
    rows = p[:, n]  # Σ_{i<t} Σ_j A_ij = vol(S)
    cols = p[n, :]  # Σ_i Σ_{j<t} A_ij
    total = float(p[n, n])
    return SplitSums(in_s=in_s, in_r=total - rows - cols + in_s, vol_s=rows, vol_r=total - rows, total=total)


def modularity_score(
    in_s: FloatArray, in_r: FloatArray, vol_s: FloatArray, vol_r: FloatArray, total: float
) -> FloatArray:
    """Q of the two-community split from its sums; NaN where ``2m <= 0``."""
    if total <= 0.0:
        return np.full(np.shape(in_s), np.nan)
    return np.asarray((in_s - vol_s * vol_s / total + in_r - vol_r * vol_r / total) / total, dtype=np.float64)


def conductance_score(in_s: FloatArray, vol_s: FloatArray, vol_r: FloatArray) -> FloatArray:
    """φ of the two-community split from its sums; NaN where ``min(vol) <= 0``."""
    den = np.minimum(vol_s, vol_r)
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = (vol_s - in_s) / den
    return np.asarray(np.where(den > 0.0, phi, np.nan), dtype=np.float64)


def split_objective(adj: npt.ArrayLike, metric: Metric) -> FloatArray:
    """Score of every split ``t = 0..T`` of a window, oriented so that larger is better
    (conductance is negated). NaN where undefined."""
    s = split_sums(adj)
    if metric == "modularity":
        return modularity_score(s.in_s, s.in_r, s.vol_s, s.vol_r, s.total)
    if metric == "conductance":
        return -conductance_score(s.in_s, s.vol_s, s.vol_r)
    raise SegmenterError(f"no objective for similarity_metric {metric!r}")


def best_candidate(objective: FloatArray, first: int, last: int) -> int | None:
    """Index in ``[first, last]`` of the largest defined objective (ties: the largest index);
    None if none is defined."""
    vals = objective[first : last + 1]
    ok = np.isfinite(vals)
    if not ok.any():
        return None
    best = np.max(vals[ok])
    return first + int(np.flatnonzero(ok & (vals == best))[-1])


def refine_boundary(adj: npt.ArrayLike, lo: int, alpha: int, beta: int, *, min_size: int, metric: Metric) -> int:
    """Move β within ``[α + min_size, β]`` to the best split of the window graph ``adj``, which
    covers tokens ``[lo, lo + T)`` (normally :func:`window`'s range). Returns β if the range is
    empty or no candidate is defined, or if ``metric == "none"``."""
    if metric == "none" or beta - alpha < min_size:
        return beta
    a = np.asarray(adj, dtype=np.float64)
    n = a.shape[0]
    if not (lo <= alpha + min_size and beta <= lo + n):
        raise SegmenterError(f"window [{lo}, {lo + n}) does not cover candidates [{alpha + min_size}, {beta}]")
    best = best_candidate(split_objective(a, metric), alpha + min_size - lo, beta - lo)
    return beta if best is None else lo + best


def refine_boundaries(
    adj: npt.ArrayLike, boundaries: Sequence[int], *, start: int, min_size: int, metric: Metric
) -> list[int]:
    """Offline refinement of sorted ``boundaries`` (all > ``start``) over a whole-stream adjacency
    ``adj`` of tokens ``[0, N)``: the same sequence of :func:`refine_boundary` calls as
    :class:`OnlineSegmenter` makes, with windows clipped to ``[start, N)``. A boundary closer than
    ``min_size`` to its refined predecessor is left where it is (the online segmenter drops such
    boundaries before refining). Always returns as many boundaries as it was given."""
    a = np.asarray(adj, dtype=np.float64)
    n = a.shape[0]
    out: list[int] = []
    alpha = start
    for b in boundaries:
        beta = int(b)
        if not (alpha < beta < n):
            raise SegmenterError(f"boundaries must be increasing, > start and < {n}; got {beta} after {alpha}")
        lo, hi = window(alpha, beta, floor=start, end=n)
        alpha = refine_boundary(a[lo:hi, lo:hi], lo, alpha, beta, min_size=min_size, metric=metric)
        out.append(alpha)
    return out

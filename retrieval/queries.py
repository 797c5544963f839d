"""Retrieval queries: how a step's queries score events.

An event ``e`` stores per layer ``V`` vectors ``rep_e,j`` (``representatives``: by default its 4
largest-norm pre-RoPE keys). A step brings ``n`` query vectors per layer: a question's last
``question_query_tokens`` tokens one by one (``StepResult.query_tokens``), or the step's mean query
summary (ingestion chunks, ``n = 1``). The score of ``e`` in layer ``l`` is::

    s_l(e) = mean_i  max_j ((q_il - q̄_l) . rep_e,j) / sigma_il

1. **Centering** on the stream's mean query ``q̄`` (running mean of every ingestion step's query
   summary, weighted by tokens: :class:`QueryMean`). ``(q - q̄) . k = q . k - q̄ . k``: the second
   term is how much an *average* query of this stream attends to the key, so the score becomes "how
   much more this query attends to it than queries usually do". Without it the ranking is dominated
   by keys every query attends to, whatever it asks: blank lines, chapter headings, punctuation, and
   the first ~1-2k tokens of the stream (computed at small window positions). Centering *keys* would
   change nothing (a constant per query); centering queries does.
2. **MaxSim** over the event's vectors (late interaction): a question's tokens match single needle
   tokens, which an average over the event would dilute (``representatives``).
3. **Standardization** by ``sigma_il``, the spread over events of that query vector's scores,
   estimated on an evenly spaced sample of the memory's representatives: every query token and every
   layer votes with the same weight (no effect on one query's ranking within one layer).
4. **Shared selection** (``per_layer=False``) ranks by ``sum_l s_l(e)`` over the *scoring layers*
   (default: the first 2/3 of the layers). With the ``"tokens"`` representatives (the same tokens in every
   layer) the max moves outside the sum: ``mean_i max_j sum_l (q_il - q̄_l) . rep_e,l,j / sigma_il``, the
   best single token of the event across the layers (token-level MaxSim); ``sigma_il`` is the same.

Queries are pre-RoPE (de-rotated to distance 0) and stay so: scoring at a RoPE distance (EM-LLM
rotates the query by ``n_local``; averaging over a distance range) helped the uncentered mean-key
score but hurt every centered variant.

Why each part is there, with the measurements that chose it: ``docs/decisions.md``, "Queries".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emserve.retrieval.errors import PlanError
from emserve.retrieval.index import max_scores

QUERY_MEAN_FILE = "query_mean.npz"


class QueryMean:
    """Running, token-weighted mean of a stream's step query summaries, per layer (persisted).

    Lives next to the event table (``query_mean.npz``: float64 sum ``[L, dim]``, the token count, the
    stream ``offset`` the last observed step ended at, and the same three before that step), rewritten
    atomically by :meth:`observe`. A session observes a step before it marks the step done, so after a
    crash the file is at most one step ahead of the session, and :meth:`restore` takes that step back:
    a resumed session centers its queries exactly as an uninterrupted one.
    """

    def __init__(self, path: str | os.PathLike[str] | None, num_layers: int, dim: int) -> None:
        self.path = None if path is None else Path(path) / QUERY_MEAN_FILE
        self.num_layers = num_layers
        self.dim = dim
        self._sum = np.zeros((num_layers, dim), np.float64)
        self.count = 0.0
        self.offset = -1  # stream offset after the last observed step (-1: not recorded, older files)
        self._prev: tuple[np.ndarray, float, int] = (self._sum.copy(), 0.0, -1)
        if self.path is not None and self.path.exists():
            with np.load(self.path) as f:
                s = np.asarray(f["sum"], np.float64)
                if s.shape == self._sum.shape:
                    self._sum, self.count = s, float(f["count"])
                    if "offset" in f:
                        self.offset = int(f["offset"])
                        self._prev = (np.asarray(f["prev_sum"], np.float64), float(f["prev_count"]),
                                      int(f["prev_offset"]))

    @property
    def mean(self) -> np.ndarray | None:
        """float32 ``[L, dim]``, or None before the first observation."""
        if self.count <= 0:
            return None
        return (self._sum / self.count).astype(np.float32)

    def observe(self, summary: np.ndarray, num_tokens: int, offset: int = -1) -> None:
        """Add a step's query summary (mean over its ``num_tokens`` new tokens; the step ends at stream
        ``offset``)."""
        if num_tokens <= 0:
            return
        q = np.asarray(summary, np.float64).reshape(self.num_layers, -1)
        if q.shape[1] != self.dim:
            raise PlanError(f"query summary has {q.shape[1]} values per layer, expected {self.dim}")
        self._prev = (self._sum.copy(), self.count, self.offset)
        self._sum = self._sum + q * num_tokens
        self.count += num_tokens
        self.offset = offset
        self._write()

    def restore(self, offset: int) -> None:
        """Match a session resumed at stream ``offset``: a last step observed beyond it is taken back."""
        prev_sum, prev_count, prev_offset = self._prev
        if self.offset > offset and 0 <= prev_offset <= offset:
            self._sum, self.count, self.offset = prev_sum.copy(), prev_count, prev_offset
            self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        prev_sum, prev_count, prev_offset = self._prev
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, sum=self._sum, count=np.float64(self.count), offset=np.int64(self.offset),
                     prev_sum=prev_sum, prev_count=np.float64(prev_count), prev_offset=np.int64(prev_offset))
        os.replace(tmp, self.path)


def as_query_tokens(queries: np.ndarray, num_layers: int, dim: int) -> np.ndarray:
    """One summary ``[L, dim]`` or ``[L, H, D]``, or query tokens ``[n, L, H, D]`` -> float32 ``[n, L, dim]``."""
    q = np.asarray(queries, dtype=np.float32)
    if q.size == 0:
        raise PlanError(f"no queries: {np.shape(queries)}")
    if q.ndim in (2, 3):
        q = q.reshape(1, q.shape[0], -1)
    elif q.ndim == 4:
        q = q.reshape(q.shape[0], q.shape[1], -1)
    if q.ndim != 3 or q.shape[1:] != (num_layers, dim) or q.shape[0] == 0:
        raise PlanError(f"queries must be [{num_layers}, {dim}], [{num_layers}, heads, head_dim] or "
                        f"[n, {num_layers}, heads, head_dim]; got {np.shape(queries)}")
    return q


def fold_heads(q: np.ndarray, group: int, head_dim: int) -> np.ndarray:
    """Sum query heads over GQA groups: ``[..., H * D] -> [..., (H / group) * D]`` (``group`` consecutive
    query heads share a kv head), so that ``fold(q) . k_kv == q . expand(k_kv)``."""
    if group == 1:
        return q
    *lead, hd = q.shape
    if hd % (group * head_dim):
        raise PlanError(f"query of {hd} values is not a multiple of {group} heads x {head_dim}")
    return q.reshape(*lead, hd // (group * head_dim), group, head_dim).sum(-2).reshape(*lead, -1)


@dataclass(frozen=True)
class EncodedQuery:
    """A step's queries, ready to score: ``tokens [n, L, d]`` (centered, GQA-folded to the table's
    vector layout) and ``scale [n, L]`` (``1 / sigma``, ones without standardization)."""

    tokens: np.ndarray
    scale: np.ndarray

    def layer_scores(self, layer: int, reps: np.ndarray, vectors: int) -> np.ndarray:
        """``s_l`` of events with representatives ``reps [m, vectors * d]`` of ``layer``: float32 ``[m]``."""
        return self.token_layer_scores(layer, reps, vectors).mean(axis=0).astype(np.float32)

    def token_layer_scores(self, layer: int, reps: np.ndarray, vectors: int) -> np.ndarray:
        """Each query token's scaled ``max_j q_i . rep_j`` of ``layer``: float32 ``[n, m]``."""
        s = max_scores(reps, self.tokens[:, layer], vectors)  # [n, m]
        return (s * self.scale[:, layer, None]).astype(np.float32, copy=False)

    def token_level_scores(self, layers: Sequence[int], reps: Sequence[np.ndarray], vectors: int) -> np.ndarray:
        """Each query token's scaled token-level MaxSim ``max_j sum_l scale_il q_il . rep_l,j`` over ``layers``
        (``reps[k] [m, vectors * d]``: ``layers[k]``'s rows, vector ``j`` the same token in every layer, as
        the ``"tokens"`` representatives are): float32 ``[n, m]``."""
        if len(reps) != len(layers) or not reps:
            raise PlanError(f"{len(reps)} layers of representatives for layers {list(layers)}")
        m, d = reps[0].shape[0], self.tokens.shape[-1]
        acc = np.zeros((m * vectors, self.tokens.shape[0]), np.float32)
        for lay, r in zip(layers, reps, strict=True):
            q = self.tokens[:, lay] * self.scale[:, lay, None]  # [n, d]
            acc += np.asarray(r, np.float32).reshape(m * vectors, d) @ q.T
        return np.ascontiguousarray(acc.reshape(m, vectors, -1).max(axis=1).T)


def encode_queries(
    queries: np.ndarray,
    *,
    num_layers: int,
    query_dim: int,
    group: int = 1,
    head_dim: int = 0,
    mean: np.ndarray | None = None,
    rep_sample: np.ndarray | None = None,
    vectors: int = 1,
    layers: Sequence[int] | None = None,
) -> EncodedQuery:
    """Center, fold and standardize a step's queries (module docstring).

    ``queries``: see :func:`as_query_tokens` (``query_dim = num_heads * head_dim``). ``group``: query
    heads per kv head when the table's vectors are in kv-head layout (else 1; ``head_dim`` is needed
    when ``group > 1``). ``mean``: the stream's
    mean query ``[L, query_dim]`` (None: no centering). ``rep_sample``: sampled representatives
    ``[L, S, vectors * d]`` (None or ``S < 2``: no standardization); ``layers``: the layers to
    standardize (default all; the others keep scale 1).
    """
    q = as_query_tokens(queries, num_layers, query_dim).copy()
    if mean is not None:
        q -= np.asarray(mean, np.float32).reshape(num_layers, query_dim)[None]
    q = fold_heads(q, group, head_dim)
    scale = np.ones(q.shape[:2], np.float32)
    if rep_sample is not None and rep_sample.shape[1] >= 2:
        for lay in range(num_layers) if layers is None else layers:
            s = max_scores(rep_sample[lay], q[:, lay], vectors)  # [n, S]
            sigma = s.std(axis=1)
            ok = sigma > 1e-12 * (np.abs(s).max(axis=1) + 1e-30)
            scale[:, lay] = np.where(ok, 1.0 / np.where(ok, sigma, 1.0), 1.0)
    return EncodedQuery(np.ascontiguousarray(q, dtype=np.float32), scale)

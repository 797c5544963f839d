"""Retrieval queries: how a step's queries become the vector that events are scored against.

An event ``e`` is scored per layer with ``q . rep_e`` (``rep_e``: the event's mean pre-RoPE key per
head, see ``representatives``). What ``q`` is decides whether retrieval finds anything; it is built
from the engine's pre-RoPE queries in three steps (:func:`encode_queries`):

1. **Centering** on the stream's mean query ``q̄`` (running mean of every ingestion step's query
   summary, weighted by tokens: :class:`QueryMean`). ``(q - q̄) . rep_e = q . rep_e - q̄ . rep_e``:
   the second term is how much an *average* query of this stream attends to the event, so the score
   becomes "how much more this query attends to the event than queries usually do". Without it the
   ranking is dominated by events every query attends to whatever it asks (blank lines, chapter
   headings, punctuation-heavy and short events, and the first ~1-2k tokens of the stream, whose
   keys were computed at small window positions and sit closer to the common query direction).
   Centering *keys* would change nothing (a constant per query); centering queries does.
2. **Standardization** per query vector and layer by ``sigma = std_e((q - q̄) . rep_e)``, estimated on
   an evenly spaced sample of the memory's representatives. Per layer it rescales all scores by one
   constant (no effect on a single query's per-layer ranking), but it lets several query vectors
   (tokens of a question) vote with equal weight, and it puts every layer on the same scale when the
   selection is shared (``per_layer=False`` sums the per-layer scores).
3. **Averaging** the standardized vectors of the step's query tokens: a question's last
   ``question_query_tokens`` tokens one by one (``StepResult.query_tokens``), or the step's mean
   query summary (ingestion chunks). The result is one ``[num_layers, dim]`` vector, so indexes and
   exact search are unchanged (sum of z-scores == inner product with the summed scaled queries).

Measured on SmolLM2-135M (passkey in ``big`` text, 8k tokens, depths 0.1/0.5, 6 trials; ``bench/needle.py``
measures the full stack): with the plain mean question query, the needle's event was in the
similarity budget in 65/180 (trial, layer) pairs and the shared ranking put it at rank 25-311 of
~580 events; centering alone: 138/180, rank 2-38; centering + standardization of the question's
per-token queries: 146/180, rank 2-7; the same over the last 8 question tokens: 166/180, rank 1-5
(the tail of a completion-style prompt, "... The pass key is", is what the answer continues).

Rejected after measurement (same trials): scoring at a RoPE distance instead of distance 0 (EM-LLM
rotates the query by ``n_local``; averaging the rotation over a distance range helps the
*uncentered* score, 65 -> 133/180, but hurts the centered one, 168 -> 105-135/180); max over an
event's tokens instead of the mean key (worse with and without centering); max over heads, or
z-scoring each head, instead of the sum over heads; max over question tokens instead of the mean.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from emserve.retrieval.errors import PlanError

QUERY_MEAN_FILE = "query_mean.npz"


class QueryMean:
    """Running, token-weighted mean of a stream's step query summaries, per layer (persisted).

    Lives next to the event table (``query_mean.npz``: float64 sum ``[L, dim]`` and the token
    count), rewritten atomically by :meth:`observe`. It is a statistic, not state that must match
    the log: after a crash it may lag by a step, which changes nothing measurable.
    """

    def __init__(self, path: str | os.PathLike[str] | None, num_layers: int, dim: int) -> None:
        self.path = None if path is None else Path(path) / QUERY_MEAN_FILE
        self.num_layers = num_layers
        self.dim = dim
        self._sum = np.zeros((num_layers, dim), np.float64)
        self.count = 0.0
        if self.path is not None and self.path.exists():
            with np.load(self.path) as f:
                s = np.asarray(f["sum"], np.float64)
                if s.shape == self._sum.shape:
                    self._sum, self.count = s, float(f["count"])

    @property
    def mean(self) -> np.ndarray | None:
        """float32 ``[L, dim]``, or None before the first observation."""
        if self.count <= 0:
            return None
        return (self._sum / self.count).astype(np.float32)

    def observe(self, summary: np.ndarray, num_tokens: int) -> None:
        """Add a step's query summary (mean over its ``num_tokens`` new tokens)."""
        if num_tokens <= 0:
            return
        q = np.asarray(summary, np.float64).reshape(self.num_layers, -1)
        if q.shape[1] != self.dim:
            raise PlanError(f"query summary has {q.shape[1]} values per layer, expected {self.dim}")
        self._sum += q * num_tokens
        self.count += num_tokens
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as f:
                np.savez(f, sum=self._sum, count=np.float64(self.count))
            os.replace(tmp, self.path)


def as_query_tokens(queries: np.ndarray, num_layers: int, dim: int) -> np.ndarray:
    """One summary ``[L, dim]`` or ``[L, H, D]``, or query tokens ``[n, L, H, D]`` -> float32 ``[n, L, dim]``."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim in (2, 3):
        q = q.reshape(1, q.shape[0], -1)
    elif q.ndim == 4:
        q = q.reshape(q.shape[0], q.shape[1], -1)
    if q.ndim != 3 or q.shape[1:] != (num_layers, dim) or q.shape[0] == 0:
        raise PlanError(f"queries must be [{num_layers}, {dim}], [{num_layers}, heads, head_dim] or "
                        f"[n, {num_layers}, heads, head_dim]; got {np.shape(queries)}")
    return q


def encode_queries(
    queries: np.ndarray,
    *,
    mean: np.ndarray | None = None,
    rep_sample: np.ndarray | None = None,
) -> np.ndarray:
    """The retrieval vector ``[L, dim]`` of query tokens ``[n, L, dim]`` (module docstring).

    ``mean``: the stream's mean query ``[L, dim]`` (None: no centering). ``rep_sample``: sampled
    representatives ``[L, S, dim]`` (None or ``S < 2``: no standardization).
    """
    q = queries.astype(np.float32, copy=True)
    if mean is not None:
        q -= mean[None]
    if rep_sample is not None and rep_sample.shape[1] >= 2:
        proj = np.einsum("lsd,nld->nls", rep_sample, q)  # [n, L, S]
        sigma = proj.std(axis=-1)
        ok = sigma > 1e-12 * (np.abs(proj).max(axis=-1) + 1e-30)
        q /= np.where(ok, sigma, 1.0)[..., None]
    return q.mean(axis=0).astype(np.float32)

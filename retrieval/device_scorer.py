"""Exact scoring of a shared selection on a torch device (a GPU): no HNSW, every event scored.

Why: on a CPU, exact scoring of every event grows with the memory and the HNSW path that replaces it
keeps graphs in RAM; a GPU scores a 1M-token session's representatives in one batched product per step
(``docs/decisions.md``, "Retrieval on a GPU"). Where the engine runs on a GPU, retrieval scores there.

Contract
--------
* The scoring layers' representatives are mirrored in device memory (``dtype``, default float16),
  ``[layers, capacity, vectors, d]``, grown by doubling. :meth:`sync` copies rows the
  :class:`~emserve.retrieval.events.EventTable` has on disk; :meth:`append` takes those of events
  whose rows the table does not store (``EpisodicMemory`` on a GPU stores none: they are derived from
  the KV log, recomputed from it when a session opens). Every event of the table must be mirrored
  before a retrieval.
* Scores are those of :class:`~emserve.retrieval.retriever.Retriever` for a shared selection:
  ``s_i(e) = sum_l scale_il * max_j q_il . rep_lj`` per query token ``i``, their mean for the
  ``"mean"`` ranking; with ``token_level`` (the ``"tokens"`` representatives), ``s_i(e) = max_j sum_l
  scale_il * q_il . rep_lj``. Each layer's query is scaled before the product (``scale > 0``, so the max is
  unchanged); products run in ``dtype`` and are summed over the layers in float32. With float32 they
  match the CPU path to float rounding (tests); float16 is measured against it
  (``bench/eval/retrieval_device.py``: selection recall).
* Rankings come back as a prefix, not a full sort: the best events (or interleaving rounds) whose
  tokens cover what the selection walk can need (``need``, see ``Retriever._ranked``), doubling until
  they do. Ties at the prefix's edge may fall either way (the CPU path breaks them by id).
* One scorer per session, used by the thread that retrieves; :meth:`sync` and scoring take a lock.
* Out of device memory, every public method raises :class:`~emserve.retrieval.errors.DeviceMemoryError`
  and leaves the mirror as it was (a failed growth keeps the old buffer).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from emserve.retrieval.errors import DeviceMemoryError, PlanError
from emserve.retrieval.events import EventTable
from emserve.retrieval.queries import EncodedQuery

_CHUNK_ELEMENTS = 1 << 27
"""Largest ``layers x events x vectors x tokens`` product computed at once (256 MiB in float16)."""

_F = TypeVar("_F", bound=Callable[..., Any])


def _device_memory(fn: _F) -> _F:
    """Raise :class:`DeviceMemoryError` (the server answers RESOURCE_EXHAUSTED) for torch's out-of-memory
    error: a mirror that cannot grow, or a step's scoring that cannot allocate."""

    @functools.wraps(fn)
    def wrapper(self: DeviceScorer, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except torch.OutOfMemoryError as e:
            raise DeviceMemoryError(
                f"out of memory on {self.device} in retrieval ({fn.__name__}; this session mirrors "
                f"{self.count} events in {self.nbytes / 2**30:.2f} GiB): {str(e).splitlines()[0]}") from e

    return wrapper  # type: ignore[return-value]


def resolve_device(device: str | None) -> str | None:
    """``"auto"``: ``"cuda"`` where torch sees a GPU, else None (the CPU path); ``"cpu"`` / None / ``""``:
    None; ``"torch-cpu"``: the device path on torch's CPU device (tests); anything else (``"cuda"``,
    ``"cuda:1"``): itself, checked."""
    if device in (None, "", "cpu"):
        return None
    if device == "torch-cpu":  # the device path on the CPU (tests, machines without a GPU)
        return "cpu"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PlanError(f"unknown retrieval device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PlanError(f"retrieval device {device!r} asked for, but torch sees no CUDA device")
    return str(dev)


class DeviceScorer:
    """Device-resident representatives of ``layers`` of ``table``, scored exactly per step."""

    def __init__(self, table: EventTable, layers: Sequence[int], *, device: str | torch.device,
                 dtype: torch.dtype = torch.float16, form: str = "rq", token_level: bool = False) -> None:
        """``form``: the product's operand order, ``"rq"`` (representatives x queries) or ``"qr"``
        (queries x representatives); same scores, different kernels (``bench/eval/retrieval_device.py``).
        ``token_level``: score by the token-level MaxSim (``Retriever.token_level``)."""
        if form not in ("rq", "qr"):
            raise PlanError(f"form must be 'rq' or 'qr', got {form!r}")
        self.form = form
        self.token_level = token_level
        self.table = table
        self.layers = tuple(int(x) for x in layers)
        if not self.layers or not all(0 <= x < table.num_layers for x in self.layers):
            raise PlanError(f"scoring layers {self.layers} outside 0 .. {table.num_layers - 1}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.vectors = table.vectors
        self.dim = table.dim // table.vectors
        self._reps = torch.empty((len(self.layers), 0, self.vectors, self.dim), dtype=dtype, device=self.device)
        self.count = 0
        self._lock = threading.Lock()
        self._sample: torch.Tensor | None = None
        self._sample_src: np.ndarray | None = None

    # ------------------------------------------------------------------ mirror
    @property
    def nbytes(self) -> int:
        """Device memory held by the mirror (its capacity)."""
        return self._reps.numel() * self._reps.element_size()

    def release(self) -> None:
        """Drop the mirror (a closed session); the scorer is empty afterwards."""
        with self._lock:
            self._reps = torch.empty((len(self.layers), 0, self.vectors, self.dim), dtype=self.dtype,
                                     device=self.device)
            self._sample = self._sample_src = None
            self.count = 0

    def _grow(self, n: int) -> None:
        cap = self._reps.shape[1]
        if n > cap:
            grown = torch.empty((len(self.layers), max(n, 2 * cap, 1024), self.vectors, self.dim),
                                dtype=self.dtype, device=self.device)
            grown[:, :self.count] = self._reps[:, :self.count]
            self._reps = grown

    @_device_memory
    def sync(self, *, rows_per_copy: int = 65536) -> int:
        """Copy the rows the table has on disk (``EventTable.reps_count``) beyond the mirror to the device.
        Returns how many events were added."""
        with self._lock:
            n = self.table.reps_count
            if n <= self.count:
                return 0
            self._grow(n)
            for a in range(self.count, n, rows_per_copy):
                b = min(n, a + rows_per_copy)
                for i, lay in enumerate(self.layers):
                    rows = torch.from_numpy(np.array(self.table.stored_rows(lay, a, b), dtype=np.float32))
                    self._reps[i, a:b] = rows.reshape(b - a, self.vectors, self.dim).to(self.device, self.dtype)
            added = n - self.count
            self.count = n
            return added

    @_device_memory
    def append(self, first: int, reps: np.ndarray) -> None:
        """Mirror events ``first ..`` (``first == count``) from their representatives of the scoring layers,
        ``reps [E, len(layers), vectors * d]`` (events whose rows are not on disk)."""
        r = np.asarray(reps, dtype=np.float32)
        e = r.shape[0]
        if r.shape != (e, len(self.layers), self.vectors * self.dim):
            raise PlanError(f"reps must be [{e}, {len(self.layers)}, {self.vectors * self.dim}], got {r.shape}")
        r = self.table.quantized(r)  # the values the table will hold once they are written (an int8 table)
        with self._lock:
            if first != self.count:
                raise PlanError(f"mirror holds {self.count} events, cannot append from {first}")
            self._grow(first + e)
            rows = torch.from_numpy(np.ascontiguousarray(r.transpose(1, 0, 2)))
            self._reps[:, first:first + e] = rows.reshape(len(self.layers), e, self.vectors, self.dim).to(
                self.device, self.dtype)
            self.count = first + e

    # ------------------------------------------------------------------ scoring
    @_device_memory
    def scales(self, sample_ids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """``encode_queries``' standardization of the scoring layers, on the device: ``1 / sigma`` of each
        token's ``max_j q . rep_j`` over the sampled events ``sample_ids`` (``tokens [n, L, d]``);
        float32 ``[n, L]``, 1 for the other layers (and where sigma is 0)."""
        with self._lock:
            if self._sample_src is not sample_ids:  # Retriever.sample_ids: a new array when resampled
                if sample_ids.size and int(sample_ids.max()) >= self.count:
                    raise PlanError(f"sampled event {int(sample_ids.max())} is not mirrored ({self.count} are)")
                idx = torch.from_numpy(np.asarray(sample_ids, np.int64)).to(self.device)
                self._sample = self._reps.index_select(1, idx).float().reshape(len(self.layers), -1, self.dim)
                self._sample_src = sample_ids
            assert self._sample is not None
            n = tokens.shape[0]
            ns = self._sample.shape[1] // self.vectors
            q = torch.from_numpy(np.ascontiguousarray(tokens[:, self.layers].transpose(1, 2, 0))).to(self.device)
            s = torch.bmm(self._sample, q).reshape(len(self.layers), ns, self.vectors, n).amax(dim=2)  # [Ls, S, n]
            sigma = s.std(dim=1, correction=0)
            ok = sigma > 1e-12 * (s.abs().amax(dim=1) + 1e-30)
            inv = torch.where(ok, 1.0 / torch.where(ok, sigma, torch.ones_like(sigma)), torch.ones_like(sigma))
            scale = np.ones(tokens.shape[:2], np.float32)
            scale[:, list(self.layers)] = inv.T.cpu().numpy()
            return scale

    def _queries(self, q: EncodedQuery) -> torch.Tensor:
        """``[layers, d, tokens]``: each token's query of each scoring layer times its scale."""
        qs = q.tokens[:, self.layers] * q.scale[:, self.layers, None]  # [t, Ls, d]
        if qs.shape[-1] != self.dim:
            raise PlanError(f"queries have {qs.shape[-1]} values per vector, the table {self.dim}")
        return torch.from_numpy(np.ascontiguousarray(qs.transpose(1, 2, 0))).to(self.device, self.dtype)

    def _token_scores(self, qd: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
        """float32 ``[tokens, events]`` for ``reps [layers, events, vectors, d]``."""
        ls, m, v, d = reps.shape
        t = qd.shape[-1]
        out = torch.empty((t, m), dtype=torch.float32, device=self.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, ls * v * t))
        for a in range(0, m, step):
            b = min(m, a + step)
            r = reps[:, a:b].reshape(ls, (b - a) * v, d)
            if self.form == "rq":
                s = torch.bmm(r, qd).reshape(ls, b - a, v, t)  # [Ls, chunk, V, t]
                if self.token_level:
                    out[:, a:b] = s.float().sum(dim=0).amax(dim=1).T
                else:
                    out[:, a:b] = s.amax(dim=2).float().sum(dim=0).T
            else:
                s = torch.bmm(qd.transpose(1, 2), r.transpose(1, 2)).reshape(ls, t, b - a, v)  # [Ls, t, chunk, V]
                if self.token_level:
                    out[:, a:b] = s.float().sum(dim=0).amax(dim=2)
                else:
                    out[:, a:b] = s.amax(dim=3).float().sum(dim=0)
        return out

    @_device_memory
    def token_scores(self, q: EncodedQuery, m: int | None = None) -> torch.Tensor:
        """Every query token's score of events ``0 .. m-1`` (default all synced): float32 ``[t, m]`` on the device."""
        m = self.count if m is None else m
        if m > self.count:
            raise PlanError(f"scoring {m} events, {self.count} on the device (sync first)")
        return self._token_scores(self._queries(q), self._reps[:, :m])

    @_device_memory
    def scores(self, q: EncodedQuery, ids: np.ndarray | None = None) -> np.ndarray:
        """Mean-over-tokens scores of events ``ids`` (None: all synced): float32 numpy."""
        with self._lock:
            if ids is None:
                reps = self._reps[:, :self.count]
            else:
                idx = torch.from_numpy(np.asarray(ids, np.int64)).to(self.device)
                reps = self._reps.index_select(1, idx)
            if reps.shape[1] == 0:
                return np.zeros(0, np.float32)
            return self._token_scores(self._queries(q), reps).mean(dim=0).cpu().numpy()

    @_device_memory
    def ranked_mean(self, q: EncodedQuery, m: int, sizes: np.ndarray, need: int) -> np.ndarray:
        """Events ``< m`` by mean score, best first (ties: lower id), as many as cover ``need`` tokens."""
        with self._lock:
            s = self.token_scores(q, m).mean(dim=0)
            k = min(m, _first_guess(sizes[:m], need, 1))
            while True:
                vals, idx = torch.topk(s, k)
                ids, sc = idx.cpu().numpy(), vals.cpu().numpy()
                ranked = ids[np.lexsort((ids, -sc))]
                if k >= m or int(sizes[ranked].sum()) >= need:
                    return ranked.astype(np.int64)
                k = min(m, 2 * k)

    @_device_memory
    def ranked_interleave(self, q: EncodedQuery, m: int, sizes: np.ndarray, need: int,
                          stats_ids: np.ndarray | None = None) -> np.ndarray:
        """Events ``< m`` in :func:`~emserve.retrieval.retriever.interleave` order of the per-token
        scores, as many rounds as cover ``need`` tokens; each token's statistics over events
        ``stats_ids`` (None: all ``m``)."""
        with self._lock:
            ts = self.token_scores(q, m)  # [t, m]
            t = ts.shape[0]
            ref = ts if stats_ids is None else ts[:, torch.as_tensor(stats_ids, device=ts.device)]
            sd = ref.std(dim=1, correction=0)
            peak = (ts.amax(dim=1) - ref.mean(dim=1)) / torch.where(sd > 0, sd, torch.ones_like(sd))
            rows = np.argsort(-peak.cpu().numpy(), kind="stable")
            k = min(m, _first_guess(sizes[:m], need, t))
            while True:
                vals, idx = torch.topk(ts, k, dim=1)  # [t, k]
                ids, sc = idx.cpu().numpy()[rows], vals.cpu().numpy()[rows]
                order = np.empty_like(ids)
                for r in range(t):  # each token's list: best first, ties to the lower id
                    order[r] = ids[r][np.lexsort((ids[r], -sc[r]))]
                consensus = np.array([int(torch.argmax(ts.mean(dim=0)))])  # the best mean score first
                flat = np.concatenate([consensus, order.T.ravel()])
                _, first = np.unique(flat, return_index=True)
                ranked = flat[np.sort(first)].astype(np.int64)
                if k >= m or int(sizes[ranked].sum()) >= need:
                    return ranked
                k = min(m, 2 * k)


def _first_guess(sizes: np.ndarray, need: int, share: int) -> int:
    """Events per list likely to cover ``need`` tokens when ``share`` lists take turns."""
    mean = float(sizes.mean()) if sizes.size else 1.0
    return max(1, 16 + math.ceil(1.5 * need / max(mean, 1e-9) / share))

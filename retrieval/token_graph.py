"""One HNSW graph over an event table's token vectors: the candidate stage of the token-level MaxSim.

Contract
--------
* Serves a shared selection scored by the token-level MaxSim (``RetrievalConfig.token_level``: the
  ``"tokens"`` representatives, vector ``j`` of an event the same token in every layer). Query token
  ``i`` scores event ``e`` by ``max_j sum_l scale_il q_il . rep_l,e,j = max_j x_i . y_e,j``, where
  ``y_e,j`` concatenates ``rep_l,e,j`` over the graph's layers (the scoring layers) and ``x_i``
  concatenates ``scale_il q_il``: one inner product per token vector, so one graph serves every layer
  (instead of one graph per layer, each adding ``V`` vectors per event).
* **Projection.** Vectors are projected on ``P`` (``dim`` rows): the top right singular vectors of a
  sample of the token vectors, uncentered (the subspace their inner products live in), fitted once when
  the graph starts and stored with it. ``x . y`` is then estimated by ``P x . P y``.
* **Lift** (MIPS to nearest neighbour, Bachrach et al. 2014): the graph (hnswlib, space ``"l2"``) holds
  ``[P y, sqrt(R^2 - |P y|^2)]`` and is searched with ``[P x, 0]``: the squared distance is
  ``R^2 + |P x|^2 - 2 P x . P y``, so the nearest vectors have the largest projected inner products. A
  graph over the inner product itself navigates badly (it is not a metric: ``bench/results/retrieval_index.md``).
  ``R`` is fixed at the fit (:data:`RADIUS_MARGIN` times the sample's largest projected norm); a later
  vector beyond it gets a zero last coordinate (its distance then grows by ``|P y|^2 - R^2``).
* Search returns candidate **event ids** only; the retriever scores them exactly. Labels: vector ``j``
  of event ``e`` is ``e * V + j``.
* Lazy, as ``EventIndex``: nothing (no fit, no graph, no RAM) until the table reaches
  ``params.build_at`` events; from then on each writer's :meth:`TokenGraph.sync` adds at most
  ``limit`` events, oldest first; opening catches up fully.
* Persistence, next to the table: ``tokens.hnsw`` (hnswlib, written to a temporary file and renamed),
  ``tokens.npz`` (``P``, ``R``, the layers; written once, when the graph starts) and ``tokens.json``
  (format, counts). A graph whose files are missing, unreadable, of other layers or ahead of the table
  is rebuilt from the table (a new fit). Auto-save: as ``EventIndex`` (geometric).
* Threads: one writer (adds, saves); readers search from other threads under a lock.
* Resident memory: the graph, about ``4 (dim + 1) + 8 M + 16`` bytes per vector (``V`` per event: ~2.6 KB
  at ``dim`` 128, ``M`` 16, ``V`` 4), whatever the number of layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import hnswlib
import numpy as np

from emserve.retrieval.errors import ConfigError, IndexStoreError
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import IndexParams, graph_fits

GRAPH_FILE = "tokens.hnsw"
PROJECTION_FILE = "tokens.npz"
META_FILE = "tokens.json"
FORMAT_VERSION = 1
FIT_EVENTS = 1024
"""Events (evenly spaced among the first ``build_at``) whose token vectors fit the projection."""
RADIUS_MARGIN = 1.25
"""``R`` = this x the fit sample's largest projected norm (room for later, larger vectors)."""
_ADD_CHUNK = 2048
_FIT_SEED = 0


def fit_projection(sample: np.ndarray, dim: int, *, seed: int = _FIT_SEED, power: int = 2) -> np.ndarray:
    """The top ``dim`` right singular vectors of ``sample [n, D]`` (uncentered), as ``[dim, D]`` float32
    rows: a randomized SVD (``power`` subspace iterations, a fixed seed: the same sample gives the same
    projection). ``dim >= D`` gives the identity's rows (no projection)."""
    x = np.asarray(sample, np.float32)
    n, d = x.shape
    if dim >= d:
        return np.eye(d, dtype=np.float32)
    k = min(d, n, dim + 16)
    omega = np.random.default_rng(seed).standard_normal((d, k)).astype(np.float32)
    y = x @ omega  # [n, k]
    for _ in range(power):
        y, _ = np.linalg.qr(y)
        y = x @ (x.T @ y)
    q, _ = np.linalg.qr(y)
    _, _, vt = np.linalg.svd(q.T @ x, full_matrices=False)  # [k, D]
    out = np.zeros((dim, d), np.float32)
    out[: min(dim, vt.shape[0])] = vt[:dim]
    return out


class TokenGraph:
    """One HNSW graph over the token vectors of ``layers`` of ``table`` (module docstring)."""

    def __init__(self, path: str | os.PathLike[str], table: EventTable, layers: Sequence[int],
                 params: IndexParams, *, dim: int = 128, writable: bool = True) -> None:
        """``layers``: the scoring layers (all stored by the table); ``dim``: the projection's size."""
        self.path = Path(path)
        self.table = table
        self.layers = tuple(int(x) for x in layers)
        if not self.layers or not set(self.layers) <= set(table.layers):
            raise ConfigError(f"a token graph's layers must be among the table's stored layers "
                              f"{list(table.layers)}, got {self.layers}")
        if dim < 1:
            raise ConfigError(f"need dim >= 1, got {dim}")
        self.params = params
        self.writable = writable
        self.vectors = table.vectors
        self.vector_dim = table.vector_dim
        self.token_dim = len(self.layers) * self.vector_dim
        self.dim = min(dim, self.token_dim)
        self._lock = threading.Lock()
        self.rebuilt = False
        self._proj: np.ndarray | None = None  # [dim, token_dim]
        self._radius = 0.0
        self._graph: hnswlib.Index | None = None
        self._load()
        self._saved = self.count
        if writable:
            self.sync()

    # ------------------------------------------------------------------ load
    def _load(self) -> None:
        n = len(self.table)
        try:
            meta = json.loads((self.path / META_FILE).read_text())
            with np.load(self.path / PROJECTION_FILE) as f:
                proj, radius, layers = np.asarray(f["projection"], np.float32), float(f["radius"]), f["layers"]
            ok = (meta.get("version") == FORMAT_VERSION and tuple(int(x) for x in layers) == self.layers
                  and proj.shape == (self.dim, self.token_dim) and meta.get("vectors") == self.vectors)
        except (FileNotFoundError, OSError, ValueError, KeyError, json.JSONDecodeError):
            ok = False
        if ok:
            ix = hnswlib.Index(space="l2", dim=self.dim + 1)
            try:
                ix.load_index(str(self.path / GRAPH_FILE), max_elements=max(self.params.initial_capacity, 2 * n)
                              * self.vectors)
                if graph_fits(ix, n, self.vectors):
                    ix.set_ef(self.params.ef)
                    self._graph, self._proj, self._radius = ix, proj, radius
                    return
            except RuntimeError:
                pass
        if not self.writable and n >= self.params.build_at:
            raise IndexStoreError(f"token graph at {self.path} is missing or ahead of its table")
        self.rebuilt = n >= self.params.build_at or (self.path / GRAPH_FILE).exists()

    # ------------------------------------------------------------------ vectors
    def token_vectors(self, lo: int, hi: int) -> np.ndarray:
        """Events ``lo .. hi-1``'s token vectors, ``[(hi - lo) V, token_dim]`` float32 (row ``(e - lo) V + j``)."""
        n, v, d = hi - lo, self.vectors, self.vector_dim
        parts = [np.asarray(self.table.rows(lay, lo, hi), np.float32).reshape(n, v, 1, d) for lay in self.layers]
        return np.concatenate(parts, axis=2).reshape(n * v, self.token_dim)

    def _lifted(self, vecs: np.ndarray) -> np.ndarray:
        assert self._proj is not None
        y = vecs @ self._proj.T
        extra = np.sqrt(np.maximum(self._radius ** 2 - np.einsum("ij,ij->i", y, y), 0.0))
        return np.ascontiguousarray(np.concatenate([y, extra[:, None]], axis=1), dtype=np.float32)

    def _start(self, capacity: int) -> None:
        """Fit the projection on events spread over the first ``build_at`` and start an empty graph."""
        m = min(len(self.table), max(self.params.build_at, 2))
        ids = np.unique(np.linspace(0, m - 1, min(m, FIT_EVENTS)).round().astype(np.int64))
        sample = np.concatenate([self.token_vectors(int(e), int(e) + 1) for e in ids])
        self._proj = fit_projection(sample, self.dim)
        norms = np.linalg.norm(sample @ self._proj.T, axis=1)
        self._radius = float(RADIUS_MARGIN * norms.max()) if norms.size else 1.0
        ix = hnswlib.Index(space="l2", dim=self.dim + 1)
        ix.init_index(max_elements=max(capacity, 1), ef_construction=self.params.ef_construction,
                      M=self.params.m, random_seed=self.params.seed)
        ix.set_ef(self.params.ef)
        self._graph = ix
        tmp = self.path / (PROJECTION_FILE + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, projection=self._proj, radius=np.float64(self._radius), layers=np.asarray(self.layers))
        os.replace(tmp, self.path / PROJECTION_FILE)

    # ------------------------------------------------------------------ add (writer)
    @property
    def count(self) -> int:
        """Events in the graph (0 before it starts)."""
        return 0 if self._graph is None else self._graph.get_current_count() // self.vectors

    def sync(self, *, autosave: bool = True, limit: int | None = None) -> int:
        """Add the table's events the graph lacks, once the table has ``build_at`` events: all of them,
        or at most ``limit``. Returns how many were added."""
        if not self.writable:
            raise IndexStoreError(f"token graph at {self.path} is open read-only")
        n_table = len(self.table)
        if n_table < self.params.build_at:
            return 0
        v = self.vectors
        with self._lock:
            if self._graph is None:
                self._start(max(self.params.initial_capacity, 2 * n_table) * v)
            ix = self._graph
            assert ix is not None
            have = ix.get_current_count() // v
            n = n_table if limit is None else min(n_table, have + limit)
            if have >= n:
                return 0
            if ix.get_max_elements() < n * v:
                ix.resize_index(max(2 * ix.get_max_elements(), n_table * v))
            for lo in range(have, n, _ADD_CHUNK):
                hi = min(n, lo + _ADD_CHUNK)
                ix.add_items(self._lifted(self.token_vectors(lo, hi)), np.arange(lo * v, hi * v),
                             num_threads=self.params.add_threads)
        if autosave and self.count - self._saved >= max(self.params.save_min_events,
                                                        self.params.save_fraction * self._saved):
            self.save()
        return n - have

    def save(self) -> None:
        """Write the graph (atomic), then ``tokens.json``. Nothing before the graph starts."""
        if not self.writable:
            raise IndexStoreError(f"token graph at {self.path} is open read-only")
        with self._lock:
            if self._graph is None:
                return
            f = self.path / GRAPH_FILE
            tmp = f.with_name(f.name + ".tmp")
            self._graph.save_index(str(tmp))
            os.replace(tmp, f)
            meta = {"version": FORMAT_VERSION, "vectors": self.vectors, "layers": list(self.layers),
                    "dim": self.dim, "count": self.count, "radius": self._radius}
            tmp = self.path / (META_FILE + ".tmp")
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, self.path / META_FILE)
            self._saved = self.count

    def close(self, *, save: bool = True) -> None:
        if save and self.writable and self.count != self._saved:
            self.save()

    # ------------------------------------------------------------------ search (readers)
    def set_ef(self, ef: int) -> None:
        """Search breadth from now on (the params' ``ef`` until then); at least the ``k`` asked."""
        if ef < 1:
            raise ConfigError(f"need ef >= 1, got {ef}")
        with self._lock:
            if self._graph is not None:
                self._graph.set_ef(int(ef))
            self.params = dataclasses.replace(self.params, ef=int(ef))

    def lags(self, n: int) -> bool:
        """Whether the graph lacks some of the first ``n`` events (a search must then be exact)."""
        return self.count < n

    def query_vectors(self, tokens: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Query tokens ``[t, L, d]`` with their scales ``[t, L]`` (an ``EncodedQuery``) as token queries
        ``[t, token_dim]``: ``scale_il q_il`` concatenated over the graph's layers."""
        lay = list(self.layers)
        return np.ascontiguousarray((tokens[:, lay] * scale[:, lay, None]).reshape(tokens.shape[0], -1),
                                    dtype=np.float32)

    def search(self, queries: np.ndarray, k_vectors: int) -> np.ndarray:
        """Event ids ``[t, k]`` of each token query's ``k_vectors`` nearest vectors (``queries [t, token_dim]``,
        :meth:`query_vectors`), best first per row (an event may repeat within a row). ``ef`` in effect:
        ``max(ef, k_vectors)``. Raises RuntimeError when hnswlib cannot return that many."""
        q = np.asarray(queries, np.float32).reshape(-1, self.token_dim)
        with self._lock:
            if self._graph is None or self._proj is None:
                return np.zeros((q.shape[0], 0), np.int64)
            kv = min(k_vectors, self._graph.get_current_count())
            if kv <= 0:
                return np.zeros((q.shape[0], 0), np.int64)
            z = np.concatenate([q @ self._proj.T, np.zeros((q.shape[0], 1), np.float32)], axis=1)
            labels, _ = self._graph.knn_query(np.ascontiguousarray(z), k=kv)
        return labels.astype(np.int64) // self.vectors

    def disk_bytes(self) -> int:
        names = (GRAPH_FILE, PROJECTION_FILE, META_FILE)
        return sum((self.path / n).stat().st_size for n in names if (self.path / n).exists())

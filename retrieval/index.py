"""Similarity search over event representatives: one HNSW index per layer, exact search when small.

Contract
--------
* The :class:`~emserve.retrieval.events.EventTable` is the truth; the index is derived from it.
  An event is ``V = table.vectors`` vectors of ``table.vector_dim`` values (``representatives``);
  its score for a query ``q`` is ``max_j q . rep_j`` (V = 1: the plain inner product). Every layer's
  HNSW index (hnswlib, space ``"ip"``, dim ``vector_dim``) holds the vectors of events
  ``0 .. count-1``, vector ``j`` of event ``e`` under label ``e * V + j``; :meth:`EventIndex.sync` adds the events
  the table has and the index lacks (after appends, and on open: a saved index that is behind its
  table is caught up; one that is ahead of it, or unreadable, is rebuilt from the table).
* **Centered graph.** Each layer's HNSW index stores its vectors minus a fixed center ``mu`` (the
  mean vector of the first <= 64 events it received): ``q . (rep - mu) = q . rep - q . mu`` ranks
  events exactly as ``q . rep`` does (the shift is the same for every vector), but keys share a large
  common component that makes inner-product graphs navigate badly for the centered queries retrieval
  uses (measured: ``docs/decisions.md``, "Centered HNSW graphs"). Searches add ``q . mu`` back, so
  reported scores are ``q . rep``. ``mu`` is not stored: on load it is recovered as
  ``rep_0 - stored_0`` (event 0's first vector in the table and in the graph), so it always matches
  the graph (an index saved before centering recovers ``mu = 0``).
* HNSW indexes are built **lazily**: nothing is added (no graph, no RAM) until the table reaches
  ``build_threshold`` events (default: half the exact-search threshold). From then on each
  :meth:`EventIndex.sync` of a writer adds at most ``catchup_events`` events, oldest first, so the
  backlog is added over the next steps instead of stalling one of them, and once caught up every sync
  adds just the new events (capacity doubles with ``resize_index``). Why: exact search beats this HNSW path up to
  thousands of events, and adds made early would cost ingest time for indexes no search uses
  (``docs/decisions.md``, "Lazy HNSW"). Opening an index catches up fully (a lost or stale index is rebuilt at once).
* Search: below ``exact_threshold`` events, or while the HNSW indexes lag the table, exact
  (``max_j reps_j @ q`` over the memory-mapped table, then ``argpartition``); otherwise HNSW with
  ``ef`` (``max(ef, k V)`` in effect; ``k V`` vectors are asked for, so at least ``k`` distinct events
  come back). Results are event ids sorted best first (ties: lower id first, exact path only).
* Persistence, next to the log: ``index_LLL.hnsw`` (hnswlib ``save_index``, written to a temporary
  file and renamed) and ``index.json``. hnswlib does not persist ``ef``: it is set after every load.
  Saves happen on :meth:`EventIndex.save` (checkpoint / close) and automatically once the unsaved
  events reach ``max(save_min_events, save_fraction * saved)`` (geometric: O(1) amortised bytes
  written per event; at most that many events are re-added after a crash).
* Indexed layers: the table's stored layers by default; ``layers`` names a subset of them (a shared
  selection searches its scoring layers only, so sessions index just those: ``indexed_layers``). A search of
  a layer without an HNSW index is exact. ``index.json`` records the indexed layers; files of other
  layers (an older configuration) are ignored.
* Threads: one writer per session (adds, saves). Readers may search from other threads: a lock
  serialises add / resize / save against queries (hnswlib's ``add_items`` is not safe against a
  concurrent ``knn_query``, and ``resize_index`` is safe against nothing).
* Resident memory: the hnswlib graphs and their vector copies (about ``4*dim + 8*M + 16`` bytes
  per event per layer); the exact path reads the table's memory-mapped representatives.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import hnswlib
import numpy as np

from emserve.retrieval.errors import ConfigError, IndexStoreError
from emserve.retrieval.events import EventTable

META_FILE = "index.json"
FORMAT_VERSION = 1  # "vectors" in index.json is optional (1 when absent)
_ADD_CHUNK = 4096
_CENTER_EVENTS = 64  # a new graph is centered on the mean vector of (at most) its first 64 events


def _index_file(layer: int) -> str:
    return f"index_{layer:03d}.hnsw"


@dataclass(frozen=True)
class IndexParams:
    """Parameters of the per-layer similarity indexes."""

    m: int = 16
    """HNSW graph degree (hnswlib ``M``). Applies to new indexes; a loaded index keeps its own."""
    ef_construction: int = 200
    """HNSW build-time beam width. Applies to new indexes."""
    ef: int = 64
    """HNSW query-time beam width (set after every load: hnswlib does not persist it)."""
    exact_threshold: int = 16384
    """Below this many events, search is exact (numpy matmul + argpartition)."""
    build_threshold: int | None = None
    """HNSW indexes start growing once the table has this many events (None: ``exact_threshold // 2``)."""
    catchup_events: int = 256
    """Most events a writer's :meth:`EventIndex.sync` adds per call (per layer) while catching up."""
    save_min_events: int = 256
    """Auto-save once at least this many events are unsaved ..."""
    save_fraction: float = 0.25
    """... and the unsaved events are at least this fraction of the saved ones."""
    num_threads: int = 0
    """hnswlib threads for adds (0: one per CPU core, at most 4). Adds run between the session's
    engine steps, when its own step leaves the cores idle (``docs/decisions.md``, "Lazy HNSW"). Queries
    are single-thread."""
    initial_capacity: int = 1024
    """Initial hnswlib capacity (events); doubles as needed."""
    seed: int = 100
    """hnswlib random seed (level assignment)."""

    @property
    def add_threads(self) -> int:
        """``num_threads``, with 0 resolved to the CPU cores this process may use (at most 4)."""
        if self.num_threads:
            return self.num_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(4, cores))

    @property
    def build_at(self) -> int:
        """Events from which the HNSW indexes are grown (``build_threshold``)."""
        return self.exact_threshold // 2 if self.build_threshold is None else self.build_threshold

    def __post_init__(self) -> None:
        if self.m < 2 or self.ef_construction < 1 or self.ef < 1:
            raise ConfigError(f"need m >= 2, ef_construction >= 1, ef >= 1; got {self}")
        if self.exact_threshold < 0 or self.save_min_events < 1 or self.save_fraction < 0:
            raise ConfigError(
                f"need exact_threshold >= 0, save_min_events >= 1, save_fraction >= 0; got {self}"
            )
        if (self.build_threshold is not None and self.build_threshold < 0) or self.catchup_events < 1:
            raise ConfigError(f"need build_threshold >= 0 (or None), catchup_events >= 1; got {self}")
        if self.num_threads < 0 or self.initial_capacity < 1:
            raise ConfigError(f"need num_threads >= 0, initial_capacity >= 1; got {self}")


def max_scores(reps: np.ndarray, queries: np.ndarray, vectors: int = 1) -> np.ndarray:
    """``[m, n]``: for rows ``reps [n, vectors * d]`` and ``queries [m, d]``, ``max_j q . rep_j``."""
    n = reps.shape[0]
    d = queries.shape[-1]
    s = np.asarray(reps, dtype=np.float32).reshape(n * vectors, d) @ queries.T  # [n V, m]
    if vectors > 1:
        s = s.reshape(n, vectors, -1).max(axis=1)
    return np.ascontiguousarray(s.T, dtype=np.float32)


def exact_topk(reps: np.ndarray, query: np.ndarray, k: int, *, vectors: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``reps [n, vectors * d]`` by ``max_j rep_j . query``: (ids int64, scores), best first."""
    n = reps.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    scores = max_scores(reps, np.asarray(query, np.float32).reshape(1, -1), vectors)[0]
    part = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
    order = part[np.lexsort((part, -scores[part]))]
    return order.astype(np.int64), scores[order].astype(np.float32)


def graph_fits(ix: hnswlib.Index, events: int, vectors: int) -> bool:
    """Whether a loaded graph holds whole events ``0 .. count-1`` (labels ``e * vectors + j``, every one of
    them) and at most ``events`` of them; else it is ahead of its table or damaged, and is rebuilt."""
    count = ix.get_current_count()
    labels = np.asarray(ix.get_ids_list(), dtype=np.int64)
    return (count <= events * vectors and count % vectors == 0 and labels.size == count
            and (count == 0 or int(labels.max()) == count - 1))


class EventIndex:
    """Per-layer similarity search over one session's event table."""

    def __init__(self, path: str | os.PathLike[str], table: EventTable, params: IndexParams, *,
                 writable: bool = True, layers: Sequence[int] | None = None) -> None:
        self.path = Path(path)
        self.table = table
        self.params = params
        self.writable = writable
        self.num_layers = table.num_layers
        self.vectors = table.vectors
        self.dim = table.vector_dim
        self._lock = threading.Lock()
        self._saved = 0
        self.rebuilt_layers: list[int] = []
        self.layers = table.layers if layers is None else tuple(sorted({int(x) for x in layers}))
        if not set(self.layers) <= set(table.layers):
            raise ConfigError(f"indexed layers must be among the table's stored layers {list(table.layers)}, "
                              f"got {self.layers}")
        self._center: dict[int, np.ndarray | None] = {}
        self._hnsw: dict[int, hnswlib.Index] = {layer: self._load_layer(layer) for layer in self.layers}
        for layer, ix in self._hnsw.items():
            self._center[layer] = self._recover_center(layer, ix) if ix.get_current_count() > 0 else None
        self._saved = self.count
        if writable:
            self.sync()

    @classmethod
    def open(cls, path: str | os.PathLike[str], table: EventTable, params: IndexParams | None = None, *,
             writable: bool = True, layers: Sequence[int] | None = None) -> EventIndex:
        """Load the saved indexes next to ``table`` (or start new ones) and catch up with the table.

        ``layers``: the layers to index (None: all)."""
        return cls(path, table, params or IndexParams(), writable=writable, layers=layers)

    # ------------------------------------------------------------------ load / build
    def _new_layer(self, capacity: int) -> hnswlib.Index:
        ix = hnswlib.Index(space="ip", dim=self.dim)
        ix.init_index(max_elements=max(capacity, 1), ef_construction=self.params.ef_construction,
                      M=self.params.m, random_seed=self.params.seed)
        ix.set_ef(self.params.ef)
        return ix

    def _load_layer(self, layer: int) -> hnswlib.Index:
        f = self.path / _index_file(layer)
        n = len(self.table)
        v = self.vectors
        capacity = max(self.params.initial_capacity, 2 * n) * v if n >= self.params.build_at else 1
        meta = self._read_meta()
        if (f.exists() and meta is not None and meta.get("dim") == self.dim
                and int(meta.get("vectors", 1)) == v):  # type: ignore[call-overload]
            ix = hnswlib.Index(space="ip", dim=self.dim)
            try:
                ix.load_index(str(f), max_elements=capacity)
            except RuntimeError:
                ix = None
            if ix is not None and graph_fits(ix, n, v):
                ix.set_ef(self.params.ef)
                return ix
        if not self.writable and n >= self.params.build_at:
            raise IndexStoreError(f"index of layer {layer} at {self.path} is missing or ahead of its table")
        if n > 0 and (f.exists() or n >= self.params.build_at):
            self.rebuilt_layers.append(layer)
        return self._new_layer(capacity)

    def _recover_center(self, layer: int, ix: hnswlib.Index) -> np.ndarray:
        """The center a graph was built with: event 0's first vector in the table minus in the graph."""
        stored = np.asarray(ix.get_items([0]), dtype=np.float32)[0]
        return (self.table.reps(layer)[0, : self.dim].astype(np.float32) - stored).astype(np.float32)

    def _read_meta(self) -> dict[str, object] | None:
        try:
            meta: dict[str, object] = json.loads((self.path / META_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return meta if meta.get("version") == FORMAT_VERSION else None

    # ------------------------------------------------------------------ add (writer)
    @property
    def count(self) -> int:
        """Events present in every indexed layer's HNSW index (the table's length when none is indexed)."""
        if not self._hnsw:
            return len(self.table)
        return min(ix.get_current_count() for ix in self._hnsw.values()) // self.vectors

    def sync(self, *, autosave: bool = True, limit: int | None = None) -> int:
        """Add the events of the table that an index lacks, once the table has reached the build
        threshold: all of them, or at most ``limit`` per layer. Returns how many events were added."""
        if not self.writable:
            raise IndexStoreError(f"index at {self.path} is open read-only")
        n_table = len(self.table)
        if n_table < self.params.build_at:
            return 0
        v = self.vectors
        added = 0
        with self._lock:
            for layer, ix in self._hnsw.items():
                have = ix.get_current_count() // v
                n = n_table if limit is None else min(n_table, have + limit)
                if have >= n:
                    continue
                if ix.get_max_elements() < n * v:
                    ix.resize_index(max(2 * ix.get_max_elements(), n_table * v))
                reps = self.table.reps(layer)
                if self._center[layer] is None:
                    first = np.asarray(reps[: min(n, _CENTER_EVENTS)], np.float64).reshape(-1, self.dim)
                    self._center[layer] = first.mean(axis=0).astype(np.float32)
                center = self._center[layer]
                for lo in range(have, n, _ADD_CHUNK):
                    hi = min(n, lo + _ADD_CHUNK)
                    ix.add_items(np.ascontiguousarray(reps[lo:hi]).reshape(-1, self.dim) - center,
                                 np.arange(lo * v, hi * v), num_threads=self.params.add_threads)
                if have == 0:  # as a load would recover it (bit-identical scores before and after a reopen)
                    self._center[layer] = self._recover_center(layer, ix)
                added = max(added, n - have)
        if autosave and added:
            pending = self.count - self._saved
            if pending >= max(self.params.save_min_events, self.params.save_fraction * self._saved):
                self.save()
        return added

    def save(self) -> None:
        """Write every layer's index (atomic per file), then ``index.json``."""
        if not self.writable:
            raise IndexStoreError(f"index at {self.path} is open read-only")
        with self._lock:
            for layer, ix in self._hnsw.items():
                f = self.path / _index_file(layer)
                tmp = f.with_name(f.name + ".tmp")
                ix.save_index(str(tmp))
                os.replace(tmp, f)
            counts = [ix.get_current_count() // self.vectors for ix in self._hnsw.values()]
            meta = {"version": FORMAT_VERSION, "dim": self.dim, "vectors": self.vectors,
                    "num_layers": self.num_layers, "layers": list(self.layers), "counts": counts,
                    "params": asdict(self.params)}
            tmp = self.path / (META_FILE + ".tmp")
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, self.path / META_FILE)
            self._saved = min(counts) if counts else len(self.table)

    def close(self, *, save: bool = True) -> None:
        if save and self.writable and self.count != self._saved:
            self.save()

    # ------------------------------------------------------------------ search (readers)
    def uses_exact(self, n: int | None = None) -> bool:
        """Whether a search of the first ``n`` events (None: all) is exact: below the threshold, or
        while the HNSW indexes lag them."""
        n = len(self.table) if n is None else n
        return n < self.params.exact_threshold or self.count < n

    def search(self, layer: int, query: np.ndarray, k: int, *, exact: bool | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` events of ``layer`` for ``query [dim]``: (ids int64, scores float32), best first.

        ``exact``: force the exact (True) or HNSW (False) path; None picks by ``exact_threshold``.
        A layer without an HNSW index is searched exactly.
        """
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(self.dim)
        n = len(self.table)
        v = self.vectors
        use_exact = (self.uses_exact(n) if exact is None else exact) or layer not in self._hnsw
        if use_exact:
            return exact_topk(self.table.reps(layer), q, k, vectors=v)
        with self._lock:
            ix = self._hnsw[layer]
            kv = min(k * v, ix.get_current_count())
            if kv <= 0:
                return np.zeros(0, np.int64), np.zeros(0, np.float32)
            labels, dist = ix.knn_query(q[None, :], k=kv)
        events = labels[0].astype(np.int64) // v
        _, first = np.unique(events, return_index=True)  # best vector of each event (sorted by distance)
        first = np.sort(first)[:k]
        return events[first], (1.0 - dist[0][first] + self._shift(layer, q[None, :])[0]).astype(np.float32)

    def _shift(self, layer: int, q: np.ndarray) -> np.ndarray:
        """``q . mu`` of the layer's graph center for queries ``[m, dim]``: ``[m]``."""
        center = self._center.get(layer)
        return np.zeros(q.shape[0], np.float32) if center is None else (q @ center).astype(np.float32)

    def scores(self, layer: int, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact ``max_j q . rep_j`` of the given events of ``layer`` (float32)."""
        q = np.asarray(query, dtype=np.float32).reshape(1, self.dim)
        return self.scores_many(layer, q, ids)[0]

    def scores_many(self, layer: int, queries: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Exact ``max_j q_i . rep_j`` for queries ``[m, dim]`` and events ``ids`` (None: all): ``[m, len]``."""
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        reps = self.table.reps(layer) if ids is None else self.table.reps_of(layer, ids)
        if reps.shape[0] == 0:
            return np.zeros((q.shape[0], 0), np.float32)
        return max_scores(reps, q, self.vectors)

    def search_batch(self, layer: int, queries: np.ndarray, k_vectors: int) -> tuple[np.ndarray, np.ndarray]:
        """HNSW top-``k_vectors`` *vectors* of ``layer`` for each query ``[m, dim]`` in one call:
        (event ids ``[m, k]`` int64, scores ``[m, k]`` float32), best first per row. ``ef`` in effect:
        ``max(ef, k_vectors)``. Raises RuntimeError when hnswlib cannot return that many."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        with self._lock:
            ix = self._hnsw[layer]
            kv = min(k_vectors, ix.get_current_count())
            if kv <= 0:
                return np.zeros((q.shape[0], 0), np.int64), np.zeros((q.shape[0], 0), np.float32)
            labels, dist = ix.knn_query(q, k=kv)  # hnswlib searches with max(ef, k)
        scores = 1.0 - dist + self._shift(layer, q)[:, None]
        return labels.astype(np.int64) // self.vectors, scores.astype(np.float32)

    @property
    def ef(self) -> list[int]:
        """The ``ef`` in effect in each indexed layer's HNSW index."""
        return [int(ix.ef) for ix in self._hnsw.values()]

    def set_ef(self, ef: int) -> None:
        """Set every indexed layer's query-time ``ef`` (searches still use ``max(ef, k_vectors)``; not
        persisted, and a reopened index takes ``params.ef`` again)."""
        if ef < 1:
            raise ConfigError(f"ef must be >= 1, got {ef}")
        with self._lock:
            for ix in self._hnsw.values():
                ix.set_ef(ef)

    def disk_bytes(self) -> int:
        names = [META_FILE] + [_index_file(i) for i in self.layers]
        return sum((self.path / n).stat().st_size for n in names if (self.path / n).exists())

"""A session's episodic memory (server side): event table + indexes over its KV log, and the planner.

Contract
--------
* Owned by the server process, one object per open session, one writer thread (the session's
  step loop). It reads the KV log (written by the engine) and writes, in the same directory, the
  event table and the index files; it never writes the log.
* :meth:`EpisodicMemory.close_events` is called for closed events, in temporal order: their
  representatives are computed from the log's keys, appended to the table (the commit point), then
  the indexes are synced (``EventIndex.sync``: lazily, once the table is large enough, a bounded
  number of events per call).
* The table stores the representatives of the layers retrieval reads (``indexed_layers``: every layer
  for a selection per layer, the scoring layers for a shared one), computed from those layers' keys
  only; a table made with more layers (format 1: all) is used as it is.
* Opening checks that the log, the table and the indexes agree: events that end beyond the log (a
  log tail lost in a crash) are dropped, indexes behind the table are caught up, indexes ahead of it
  are rebuilt.
* The stream's mean query (``query_mean.npz``, see ``queries``) is fed by :meth:`observe_queries`
  after every ingestion step; retrieval centers its queries on it.
* Resident memory: the table's bounds, the HNSW graphs (of the scoring layers only when one selection
  serves all layers; one graph over token vectors for the token-level MaxSim, ``token_graph``), the
  contiguity buffers, and for one call of
  :meth:`close_events` the de-rotated keys of the events being closed. KV stays in the log's files.
* **On a GPU** (``score_device``, shared selection): no HNSW graph; the scoring layers'
  representatives live in device memory only (``DeviceScorer``, ~2.8 KB per token in float16) and the
  table stores the records alone (16 B per event: the session's disk is its KV log). Opening such a
  session recomputes them from the log (``RECOMPUTE_BATCH`` events at a time, progress logged;
  ``bench/lab/reps_recompute.py``). A CPU writer that opens it first stores the missing rows (the table's layers),
  then goes on as usual; a GPU writer that opens a session last written on the CPU copies its rows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from emserve.retrieval.config import RetrievalConfig
from emserve.retrieval.device_scorer import DeviceScorer, resolve_device
from emserve.retrieval.errors import DeviceMemoryError, EventTableError
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import EventIndex
from emserve.retrieval.kvlog import KVLog
from emserve.retrieval.planner import WindowPlanner
from emserve.retrieval.postings import WordPostings
from emserve.retrieval.queries import QueryMean
from emserve.retrieval.representatives import (
    RotateFn,
    event_representatives,
    heads_per_vector,
    vectors_per_event,
)
from emserve.retrieval.retriever import Retriever
from emserve.retrieval.token_graph import TokenGraph

logger = logging.getLogger(__name__)


GRAPH_CANDIDATE_FACTOR = 16.0
"""A token graph's lists cover this many times the budget (``Retriever``'s ``candidate_factor``; the
measurements that chose it: ``docs/decisions.md``, "Representatives")."""


def build_retriever(index: EventIndex, config: RetrievalConfig, query_mean: QueryMean | None, *, num_heads: int,
                    head_dim: int, candidate_factor: float | None = None, scorer: DeviceScorer | None = None,
                    graph: TokenGraph | None = None) -> Retriever:
    """The retriever of a session with ``config`` over ``index`` (what :class:`EpisodicMemory` uses;
    benches build the same one over a kept session). Queries are folded over the GQA groups of the
    table's vectors (``index.dim // head_dim`` heads per vector). ``candidate_factor`` None: 1.5 for the
    per-layer HNSW indexes, :data:`GRAPH_CANDIDATE_FACTOR` with a token ``graph``."""
    if candidate_factor is None:
        candidate_factor = 1.5 if graph is None else GRAPH_CANDIDATE_FACTOR
    return Retriever(index, config, query_mean=query_mean, query_group=num_heads // (index.dim // head_dim),
                     head_dim=head_dim, candidate_factor=candidate_factor, scorer=scorer, graph=graph)


RECOMPUTE_BATCH = 2048
"""Events per batch when representatives are recomputed from the log."""

NO_GRAPH = 1 << 62
"""Exact-search threshold that never builds an HNSW graph (device scoring)."""


class EpisodicMemory:
    """Event table, indexes, retriever and planner of one session whose KV log is ``log``."""

    def __init__(self, log: KVLog, config: RetrievalConfig, *, num_heads: int, rotate: RotateFn,
                 path: str | os.PathLike[str] | None = None, fsync: bool = False,
                 score_device: str | None = None) -> None:
        """``score_device``: where a shared selection is scored (``device_scorer.resolve_device``:
        ``"auto"`` takes a GPU when torch sees one; None / ``"cpu"``: the CPU exact / HNSW paths). On a
        device every step scores every event exactly and no HNSW graph is built or loaded (no RAM, no
        index files); a per-layer selection always stays on the CPU."""
        self.log = log
        self.config = config
        self.word_postings: dict[str, WordPostings] = {}
        """The question path's word postings over this table's events, by vocabulary (``question.py``)."""
        self.num_heads = num_heads
        self.rotate = rotate
        self.path = Path(path) if path is not None else log.path
        layout = log.layout
        vectors = vectors_per_event(config.repr_proxy, config.repr_topk)
        heads = heads_per_vector(config.repr_proxy, num_heads, layout.num_kv_heads)
        dim = vectors * heads * layout.head_dim
        # representatives of the layers retrieval reads only (a shared selection: its scoring layers)
        self.table = EventTable.open_or_create(self.path, layout.num_layers, dim, fsync=fsync, vectors=vectors,
                                               layers=config.indexed_layers(layout.num_layers),
                                               dtype=config.table_storage, groups=vectors * heads)
        log.refresh()
        if self.table.end_offset > len(log):
            self.table.truncate(self.table.count_ending_by(len(log)))
        device = None if config.per_layer else resolve_device(score_device)
        if device is None and self.table.reps_count < len(self.table):
            self._store_missing_reps()  # last written by a GPU writer: the CPU paths read rows from disk
        params = config.index_params()
        if device is not None:  # never searched: no graph (every search is exact), none built
            params = dataclasses.replace(params, exact_threshold=NO_GRAPH)
        # a token-level selection on the CPU searches one graph over token vectors, not a graph per layer
        use_graph = device is None and config.token_level
        self.index = EventIndex.open(self.path, self.table, params, layers=() if device is not None or use_graph
                                     else config.indexed_layers(layout.num_layers))
        self.graph = None
        if use_graph:
            self.graph = TokenGraph(self.path, self.table, config.score_layers(layout.num_layers), params)
        self.scorer = None
        if device is not None:
            self.scorer = DeviceScorer(self.table, config.score_layers(layout.num_layers), device=device,
                                       token_level=config.token_level)
            try:
                self.scorer.sync()  # rows on disk (a session last written on the CPU)
                self._mirror_missing_reps()
            except BaseException:  # e.g. out of device memory: nothing stays open
                self.close()
                raise
        self.query_mean = QueryMean(self.path, layout.num_layers, num_heads * layout.head_dim)
        self.retriever = build_retriever(self.index, config, self.query_mean, num_heads=num_heads,
                                         head_dim=layout.head_dim, scorer=self.scorer, graph=self.graph)
        self.planner = WindowPlanner(self.retriever, str(log.path))

    def close_events(
        self,
        ranges: Sequence[tuple[int, int]],
        token_scores: Sequence[torch.Tensor | None] | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[int]:
        """Close events ``[start, end)`` (temporal order, after the last closed one). Returns their ids.

        ``timings`` (optional) gets the seconds spent added: ``close`` (representatives and the
        table's append), ``index`` (the indexes' sync, or the device scorer's append)."""
        if not ranges:
            return []
        if token_scores is not None and self.table.vectors != 1:
            raise EventTableError("attention-based representatives need repr_proxy 'mean' or 'central' "
                                  f"(this table stores {self.table.vectors} vectors per event)")
        t0 = time.perf_counter()
        if self.scorer is not None:  # the table keeps the records only; the device, their representatives
            reps = self._representatives(ranges, token_scores, self.scorer.layers)
            first = self.table.append(np.asarray(ranges, dtype=np.int64), None)
            t1 = time.perf_counter()
            self.scorer.append(first, reps)
        else:
            reps = self._representatives(ranges, token_scores, self.table.layers)
            first = self.table.append(np.asarray(ranges, dtype=np.int64), reps)
            t1 = time.perf_counter()
            self.index.sync(limit=self.index.params.catchup_events)
            if self.graph is not None:
                self.graph.sync(limit=self.index.params.catchup_events)
        if timings is not None:
            timings["close"] = timings.get("close", 0.0) + t1 - t0
            timings["index"] = timings.get("index", 0.0) + time.perf_counter() - t1
        return list(range(first, first + len(ranges)))

    def _representatives(self, ranges: Sequence[tuple[int, int]], token_scores: Sequence[torch.Tensor | None] | None,
                         layers: Sequence[int] | None, device: torch.device | None = None) -> np.ndarray:
        return event_representatives(
            self.log, ranges, num_heads=self.num_heads, rotate=self.rotate, repr_topk=self.config.repr_topk,
            token_scores=token_scores, proxy=self.config.repr_proxy, layers=layers, device=device,
        )

    def _recompute(self, first: int, layers: Sequence[int] | None, sink: Callable[[int, np.ndarray], None],
                   device: torch.device | None = None) -> None:
        """Representatives of events ``first ..`` recomputed from the log (the proxy's: attention-based
        ones cannot be), in batches handed to ``sink(first_id, reps)``, progress logged; computed on
        ``device`` (the scorer's GPU) when given."""
        n = len(self.table)
        bounds = np.stack([self.table.starts, self.table.ends], 1)
        t0 = time.perf_counter()
        for a in range(first, n, RECOMPUTE_BATCH):
            b = min(n, a + RECOMPUTE_BATCH)
            sink(a, self._representatives([tuple(r) for r in bounds[a:b].tolist()], None, layers, device))
            logger.info("representatives of events %d .. %d of %d recomputed from the KV log (%.1f s)",
                        a, b - 1, n, time.perf_counter() - t0)

    def _store_missing_reps(self) -> None:
        """Write the rows a GPU writer did not store (CPU scoring and HNSW read them from disk)."""
        self._recompute(self.table.reps_count, self.table.layers, self.table.write_reps)

    def _mirror_missing_reps(self) -> None:
        """Put the events without rows on disk into the device mirror."""
        assert self.scorer is not None
        try:
            self._recompute(self.scorer.count, self.scorer.layers, self.scorer.append, self.scorer.device)
        except torch.OutOfMemoryError as e:
            raise DeviceMemoryError(f"out of memory on {self.scorer.device} recomputing representatives from "
                                    f"the KV log: {str(e).splitlines()[0]}") from e

    def observe_queries(self, summary: np.ndarray, num_tokens: int, offset: int = -1) -> None:
        """Feed an ingestion step's query summary (mean over ``num_tokens`` new tokens, the step ending
        at stream ``offset``) into the stream's mean query, which retrieval centers queries on."""
        self.query_mean.observe(summary, num_tokens, offset)

    def checkpoint(self) -> None:
        """Persist the indexes now (the table is always persisted)."""
        self.index.save()
        if self.graph is not None:
            self.graph.save()

    def disk_bytes(self) -> int:
        graph = 0 if self.graph is None else self.graph.disk_bytes()
        return self.table.disk_bytes() + self.index.disk_bytes() + graph

    def close(self, *, save: bool = True) -> None:
        """Close the files and give the device mirror back. ``save``: persist indexes that changed since
        the last :meth:`checkpoint` first (False writes nothing: a session about to be deleted, a full disk)."""
        self.index.close(save=save)
        if self.graph is not None:
            self.graph.close(save=save)
        self.table.close()
        if self.scorer is not None:  # give the device memory back now, not when the object is collected
            self.scorer.release()

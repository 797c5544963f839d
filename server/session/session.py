"""Session: one stream's memory loop — engine steps, segmentation, events, retrieval.

Contract
--------
* Owned by the server process. One task steps a session at a time (``append`` and ``ask`` hold the
  session's lock); different sessions step concurrently and share the engine (vLLM batches them).
* The host work of a step (retrieval and planning, the segmenter, closing events into the table and
  the indexes) runs in a worker thread, not on the server's event loop: at a million tokens it takes
  ~1-4 s per step, which would otherwise stall every other session, health checks included. It
  still holds the session's lock. A cancelled ``append`` (a client gone) first finishes the step it
  started, engine step and host work, then lets go of the lock.
  Readers on the loop (inspection: events, surprise, tokens) read the table and the log while the
  worker appends: both publish their length atomically (``EventTable``, ``KVLog``). The memory
  (event table + indexes) is opened by :meth:`open` (the caller's thread; 20-30 s at 1M tokens), or
  on the first step of a new session, under a lock.
* A session is a directory::

      session.json      config (segmenter + retrieval) and the segmenter state after the last step
      log/              KV log (written by the engine), event table and indexes (written here)
      surprise.f32      float32 surprise of every logged token (written here after each step)
      exchanges.json    the last remembered exchanges by request id (``record_exchange``)

* Ingestion (``append``): tokens are computed in chunks of ``exc_block_size``; chunk k's window is
  planned with the previous step's query summary (lagged queries: the chunk's own queries do not
  exist before it runs), its surprise feeds the segmenter, and events that left the local window
  are closed into the event table and indexes. The committed offset returned is durable in the log.
* Questions (``ask``): a probe step (question over sink + local; skipped when there is nothing to
  select: no retrievable event, or no memory budget) yields the queries of the
  question's last ``question_query_tokens`` tokens; the real step retrieves with them (centered on
  the stream's mean query, fed by every ingestion step) and generates. The memory is unchanged by a
  question.

Size: a session's step loop, its crash-consistent files and the streaming of an answer share the
session's lock and state; what stands alone is out (a question's window and first tokens: ``question``;
retrieval, segmenter, contrast, generation, ingest).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emserve.retrieval.events import EventTable
from emserve.retrieval.kvlog import KVLog
from emserve.retrieval.memory import EpisodicMemory
from emserve.retrieval.queries import QUERY_MEAN_FILE
from emserve.retrieval.retriever import RetrievalResult
from emserve.segmenter import OnlineSegmenter
from emserve.server.engine.base import Engine, SamplingSpec, StepOptions, StepResult, TokenDelta
from emserve.server.engine.rope import RopeSpec
from emserve.server.errors import SessionReopening
from emserve.server.report import Kind, PhaseClock, StepReport, question_timings

if TYPE_CHECKING:
    from emserve.retrieval.plan import WindowPlan
from emserve.server.session.answer import answer_stream, first_tokens
from emserve.server.session.config import MemoryConfig
from emserve.server.session.keys import RefinementKeys
from emserve.server.session.question import plan_question
from emserve.server.session.state import (
    EXCHANGES_FILE,
    LEGACY_QUERIES_FILE,
    LOG_DIR,
    QUERIES_FILE,
    SESSION_FILE,
    SURPRISE_FILE,
    SessionError,
    SessionStats,
    read_state,
    session_stats,
    state_dict,
    write_json,
)

MAX_EXCHANGES = 64
"""Remembered exchanges kept by request id (the oldest are forgotten)."""


OnPlan = Callable[[RetrievalResult | None, dict[str, float], tuple[tuple[int, int], ...]], None]
"""``ask_stream``'s ``on_plan``: called with the retrieval, the timings so far and the window."""


@dataclass
class AskResult:
    token_ids: list[int]
    finish_reason: str | None
    retrieval: RetrievalResult | None
    step: StepResult
    timings: dict[str, float] = field(default_factory=dict)
    """``wait_s`` (for the session's lock), ``retrieval_s`` (probe step + retrieval + planning), ``probe_s``
    (the probe step alone)."""
    window: tuple[tuple[int, int], ...] = ()
    """The stream's tokens the answer step attended to in every layer, as ``[start, end)`` ranges (the
    question and the answer excluded)."""
    report: StepReport | None = None
    """The question's step report (:mod:`emserve.server.report`)."""


@dataclass(frozen=True)
class AppendResult:
    """What an ``append`` / ``flush`` committed: the session's committed offset after it, and one
    report per ingestion step it ran (none when the tokens wait for a full chunk)."""

    committed: int
    steps: tuple[StepReport, ...] = ()


class Session:
    """A live session. Create with :meth:`create` or reopen with :meth:`open`."""

    def __init__(self, path: Path, engine: Engine, config: MemoryConfig, segmenter: OnlineSegmenter, *,
                 score_device: str | None = "auto") -> None:
        self.path = path
        self.score_device = score_device
        """Where retrieval scores (``EpisodicMemory``): ``"auto"`` a GPU when torch sees one, else the CPU."""
        self.engine = engine
        self.config = config.bound(engine.info.max_model_len)
        """The session's settings, bound to its engine's context (``retrieval.max_window``)."""
        self.segmenter = segmenter
        self.lock = asyncio.Lock()
        self.log_path = str(path / LOG_DIR)
        self._rope = RopeSpec.from_hf_config(_hf_config(engine))
        self._refinement_keys: RefinementKeys | None = None
        self._memory: EpisodicMemory | None = None
        self._memory_lock = threading.Lock()
        self._log: KVLog | None = None
        self._last_queries: np.ndarray | None = None
        self._saved_queries: tuple[int, np.ndarray | None] = (-1, None)  # (offset, summary) in QUERIES_FILE
        self._pending: list[int] = []
        self._contiguity: dict[str, Any] | None = None
        """The contiguity buffers as planned for the step at ``offset``: ``before`` and ``after`` its
        planning (saved with the state; :meth:`open` restores the one that matches the log)."""
        self._surprise_fd = os.open(path / SURPRISE_FILE, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self.events_closed = 0
        self.failed: BaseException | None = None
        """Set when a step failed after the engine had logged it (e.g. out of device memory while its events
        closed): the state in memory may be behind the files, so the session takes no more calls
        (:class:`~emserve.server.errors.SessionReopening`); close it and :meth:`open` it again, which replays
        the files as after a crash."""

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, path: str | os.PathLike[str], engine: Engine, config: MemoryConfig | None = None, *,
               score_device: str | None = "auto") -> Session:
        p = Path(path)
        if (p / SESSION_FILE).exists():
            raise SessionError(f"session already exists at {p}")
        p.mkdir(parents=True, exist_ok=True)
        cfg = config or MemoryConfig()
        if cfg.retrieval.table_dtype == "auto":  # saved resolved: the session keeps the table it made
            cfg = cfg.with_settings(table_dtype=cfg.retrieval.table_storage)
        s = cls(p, engine, cfg, OnlineSegmenter(cfg.segmenter), score_device=score_device)  # binds: validates
        s._save_state()
        return s

    @classmethod
    def open(cls, path: str | os.PathLike[str], engine: Engine, *, score_device: str | None = "auto") -> Session:
        p = Path(path)
        state = read_state(p)
        cfg = state.config
        seg = OnlineSegmenter.from_state_dict(state.segmenter, cfg.segmenter)
        s = cls(p, engine, cfg, seg, score_device=score_device)
        try:
            saved = s._load_queries()
            s._recover()
            s._restore_queries(*saved)
            if s.num_tokens:
                s.memory  # noqa: B018 - open the table and the indexes here, not on the event loop at the first step
                s.memory.query_mean.restore(s.num_tokens)
                s._restore_contiguity(state.contiguity)
            elif (Path(s.log_path) / QUERY_MEAN_FILE).exists():  # a first step observed, never done
                (Path(s.log_path) / QUERY_MEAN_FILE).unlink()
        except BaseException:  # e.g. out of device memory recomputing the mirror: no file stays open
            s.close()
            raise
        return s

    def _load_queries(self) -> tuple[tuple[int, np.ndarray | None], tuple[int, np.ndarray | None]]:
        """The last two saved query summaries, as (offset, summary) (offset -1: not recorded)."""
        path = self.path / QUERIES_FILE
        if path.exists():
            with np.load(path) as f:
                prev = f["prev_queries"] if int(f["prev_offset"]) >= 0 else None
                return (int(f["offset"]), f["queries"]), (int(f["prev_offset"]), prev)
        legacy = self.path / LEGACY_QUERIES_FILE
        return ((-1, np.load(legacy)) if legacy.exists() else (-1, None)), (-1, None)

    def _restore_queries(self, last: tuple[int, np.ndarray | None], prev: tuple[int, np.ndarray | None]) -> None:
        """The lagged queries of the session's last done step: the last saved, or the one before it when
        the last step's were saved but the step was not done (a crash in between; it runs again)."""
        chosen = prev if last[0] > self.num_tokens and 0 <= prev[0] <= self.num_tokens else last
        self._saved_queries = chosen
        self._last_queries = chosen[1]

    def _save_queries(self, queries: np.ndarray, offset: int) -> None:
        """Keep a step's query summary (the step ends at ``offset``) with the one before it, atomically."""
        prev_offset, prev = self._saved_queries
        tmp = self.path / (QUERIES_FILE + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, queries=queries, offset=np.int64(offset), prev_offset=np.int64(prev_offset),
                     prev_queries=np.zeros(0, np.float32) if prev is None else prev)
        os.replace(tmp, self.path / QUERIES_FILE)
        self._saved_queries = (offset, queries)

    def _restore_contiguity(self, saved: dict[str, Any] | None) -> None:
        """The contiguity buffers of the last planned step: as after its planning if the log holds it,
        else as before (the step is planned again). Sessions saved before this start empty, as in EM-LLM."""
        if saved is None:
            return
        self._contiguity = saved
        ids = saved["after"] if self.num_tokens > int(saved["offset"]) else saved["before"]
        self.memory.planner.retriever.restore_buffers(ids)

    def _recover(self) -> None:
        """Replay what the log holds beyond the saved segmenter state (a crash between the two)."""
        n_sur = os.fstat(self._surprise_fd).st_size // 4
        n_log = self._logged_tokens()
        if n_log < n_sur:
            os.ftruncate(self._surprise_fd, n_log * 4)
            n_sur = n_log
        if n_log > n_sur:
            # the engine committed tokens whose surprise never reached us: drop them from the log
            with KVLog.open(self.log_path, writable=True) as w:
                w.truncate(n_sur)
            self.log.refresh()
        seen = self.segmenter.tokens_seen
        if seen < n_sur:
            sur = np.fromfile(self.path / SURPRISE_FILE, dtype=np.float32)[seen:n_sur]
            self._close(self.segmenter.feed(_segmenter_surprise(sur, seen), self._keys))
            self._save_state()

    def close(self, *, checkpoint: bool = True) -> None:
        """Close the files; ``checkpoint`` first persists the indexes (not worth it, nor possible on a full
        disk, for a session about to be deleted)."""
        try:
            if self._memory is not None:
                try:
                    if checkpoint:
                        self._memory.checkpoint()
                finally:  # persisted above, or not to be: a failed checkpoint is not tried again (the indexes
                    self._memory.close(save=False)  # catch up when the session reopens)
        finally:  # the files are closed even when the checkpoint fails (e.g. disk full)
            if self._log is not None:
                self._log.close()
            os.close(self._surprise_fd)

    # ------------------------------------------------------------------ state
    @property
    def log(self) -> KVLog:
        if self._log is None:
            self._log = KVLog.open(self.log_path)
        self._log.refresh()
        return self._log

    @property
    def memory(self) -> EpisodicMemory:
        if self._memory is None:
            with self._memory_lock:  # the first step's worker thread and a reader on the loop: one opens it
                if self._memory is None:
                    self._memory = EpisodicMemory(
                        self.log,
                        self.config.retrieval,
                        num_heads=self.engine.info.num_heads,
                        rotate=self._rope.rotate,
                        score_device=self.score_device,
                    )
        return self._memory

    @property
    def device_bytes(self) -> int:
        """Device memory held by this session's retrieval mirror (0 on the CPU paths, or before it opens)."""
        memory = self._memory
        return 0 if memory is None or memory.scorer is None else memory.scorer.nbytes

    @property
    def num_tokens(self) -> int:
        return os.fstat(self._surprise_fd).st_size // 4

    def _save_state(self) -> None:
        write_json(self.path / SESSION_FILE, state_dict(self.config, self.segmenter.state_dict(), self._contiguity))

    @property
    def _keys(self) -> RefinementKeys:
        if self._refinement_keys is None:
            layers = self.config.segmenter.layer_range(self.engine.info.num_layers)
            self._refinement_keys = RefinementKeys(lambda: self.log, self._rope, layers)
        return self._refinement_keys

    def _close(self, events: Sequence[Any], timings: dict[str, float] | None = None) -> list[tuple[int, int]]:
        """Close the segmenter's final events into the memory; returns the ``(start, end)`` closed."""
        done = self.memory.table.end_offset if events else 0
        ranges = [(e.start, e.end) for e in events if e.start >= done]  # replay after a crash: already in
        if ranges:
            self.memory.close_events(ranges, timings=timings)
            self.events_closed += len(ranges)
        return ranges

    # ------------------------------------------------------------------ inspection
    @property
    def event_table(self) -> EventTable | None:
        """The closed events (None before the first step: no log, no table yet)."""
        if self.num_tokens == 0:
            return None
        return self.memory.table

    def events(self, first: int = 0, count: int | None = None) -> np.ndarray:
        """int64 ``[n, 2]`` (start, end) of closed events ``first .. first+count-1``, temporal order."""
        table = self.event_table
        if table is None:
            return np.zeros((0, 2), np.int64)
        n = len(table)
        stop = n if count is None else min(n, first + count)
        first = min(max(first, 0), n)
        return np.stack([table.starts[first:stop], table.ends[first:stop]], axis=1).astype(np.int64)

    def surprise(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """float32 surprise (nats) of committed tokens ``[start, end)``."""
        n = self.num_tokens
        end = n if end is None else min(end, n)
        start = min(max(start, 0), end)
        if end == start:
            return np.zeros(0, np.float32)
        return np.fromfile(self.path / SURPRISE_FILE, dtype=np.float32, count=end - start, offset=4 * start)

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Token ids of committed tokens ``[start, end)``."""
        return np.array(self.token_view(start, end))

    def token_view(self, start: int, end: int) -> np.ndarray:
        """:meth:`tokens` as a read-only view of the log's mapped file (no copy: what is not read costs
        nothing); valid while the session is open."""
        end = min(end, self.num_tokens)
        if end <= start:
            return np.zeros(0, np.int32)
        return self.log.token_view(start, end)

    def stats(self) -> SessionStats:
        return session_stats(self.path)

    # ------------------------------------------------------------------ ingestion
    async def append(self, token_ids: Sequence[int], *, flush: bool = False) -> AppendResult:
        """Ingest tokens; returns the committed offset (tokens that are in the log and the memory) and
        the reports of the steps run.

        Tokens are computed in chunks of ``exc_block_size`` counted from the last step, so the same
        stream gives the same steps however it is split into calls; a tail shorter than a chunk
        waits (uncommitted, in memory) for more tokens or for ``flush`` (``ask`` flushes too).
        """
        t0 = time.perf_counter()
        async with self.lock:
            self._check_usable()
            self._pending.extend(int(t) for t in token_ids)
            steps = await self._drain(flush, wait_s=time.perf_counter() - t0)
            return AppendResult(self.num_tokens, tuple(steps))

    async def flush(self) -> AppendResult:
        """Compute any pending tail now. Returns the committed offset and the steps run."""
        return await self.append((), flush=True)

    @property
    def pending_tokens(self) -> int:
        return len(self._pending)

    def next_chunk(self, pending: int, *, flush: bool) -> int:
        """The chunk rule, for this session and any caller that buffers tokens for it (the ingest stream):
        of ``pending`` tokens waiting after the last step, how many the next step takes. A full chunk
        (``exc_block_size``) whenever there is one; with ``flush``, the shorter rest; else 0 (wait)."""
        step = self.config.retrieval.exc_block_size
        return step if pending >= step else (pending if flush else 0)

    async def _drain(self, flush: bool, wait_s: float = 0.0) -> list[StepReport]:
        reports: list[StepReport] = []
        while take := self.next_chunk(len(self._pending), flush=flush):
            # a started step finishes (engine, surprise, events, pending trimmed) before a cancellation goes
            # on: half a step would leave the log ahead of the session, or a committed chunk still pending
            clock = PhaseClock()
            if not reports:
                clock.add("wait", wait_s)  # the lock is taken once for all of this call's steps
            reports.append(await _to_the_end(self._ingest_chunk(self._pending[:take], clock)))
        return reports

    @staticmethod
    async def host(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in a worker thread, to its end (the session's lock is held until then)."""
        return await _to_the_end(asyncio.to_thread(fn, *args, **kwargs))

    @contextlib.asynccontextmanager
    async def _admitted(self, clock: PhaseClock) -> AsyncIterator[None]:
        """An ingestion step's engine call, once the engine's admission lets it in (the ``admit`` phase)."""
        t0 = time.perf_counter()
        async with self.engine.admission.ingest():
            clock.add("admit", time.perf_counter() - t0)
            yield

    async def _ingest_chunk(self, chunk: list[int], clock: PhaseClock | None = None) -> StepReport:
        clock = clock or PhaseClock()
        offset = self.num_tokens
        retrieval = None
        if offset == 0:
            from emserve.retrieval.plan import WindowPlan

            plan = WindowPlan.build(chunk, capture_log=self.log_path)
        else:
            planner = self.memory.planner
            queries = self._last_queries
            if queries is None:  # no previous step to lag from (e.g. a log restored without state): probe
                async with self._admitted(clock):
                    with clock("probe"):
                        probe = await self.engine.step(planner.probe_plan(offset, chunk),
                                                       options=StepOptions(surprise=False))
                queries = probe.queries
            with clock("retrieve"):
                before = planner.retriever.buffer_state()
                plan = await self.host(planner.plan_step, offset, chunk, queries)
            retrieval = planner.last_retrieval
            if self.config.retrieval.use_contiguity_buffer:  # saved before the step runs: a crash in it keeps them
                self._contiguity = {"offset": offset, "before": before, "after": planner.retriever.buffer_state()}
                with clock("save"):
                    await self.host(self._save_state)
        try:
            async with self._admitted(clock):
                res = await self.engine.step(plan, options=StepOptions(surprise=True, queries=True))
            clock.engine(res.timings)
            if res.log_offset != offset:
                raise SessionError(f"engine appended at {res.log_offset}, session expected {offset}")
            closed = await self.host(self._after_step, res, len(chunk), clock)
        except Exception as e:
            if self._moved_past(offset):  # the log or the surprise holds the step: memory may be behind
                self.failed = e
            raise
        del self._pending[: len(chunk)]
        return self._report("ingest", offset, plan, retrieval, clock, closed=closed, written=len(chunk))

    def _report(self, kind: Kind, offset: int, plan: WindowPlan, retrieval: RetrievalResult | None,
                clock: PhaseClock, *, closed: Sequence[tuple[int, int]] = (), written: int = 0,
                **question: Any) -> StepReport:
        per_token = self.engine.info.kv_layout(self.engine.log_dtype).bytes_per_token
        return StepReport(
            kind=kind,
            offset=offset,
            new_tokens=plan.num_new,
            window_tokens=plan.window_len,
            injected_tokens=plan.num_injected,
            retrieved_events=len(retrieval.layers[0].events) if retrieval is not None and retrieval.layers else 0,
            retrieved_tokens=retrieval.tokens if retrieval is not None else 0,
            bytes_read=plan.num_injected * per_token,
            bytes_written=written * per_token,
            events_closed=len(closed),
            event_tokens=tuple(end - start for start, end in closed),
            phases=dict(clock.phases),
            seconds=clock.elapsed(),
            **question,
        )

    def _logged_tokens(self) -> int:
        """Tokens in the KV log (0 before the engine created it)."""
        return len(self.log) if (Path(self.log_path) / "layout.json").exists() else 0

    def _moved_past(self, offset: int) -> bool:
        """Whether the files hold anything beyond ``offset`` (a step started there got logged)."""
        try:
            return self.num_tokens != offset or self._logged_tokens() != offset
        except Exception:  # noqa: BLE001 - cannot tell: assume it did, reopening repairs either way
            return True

    def _check_usable(self) -> None:
        if self.failed is not None:
            raise SessionReopening(self.path.parent.name, self.failed)

    def _after_step(self, res: StepResult, n: int, clock: PhaseClock) -> list[tuple[int, int]]:
        """A step's host work once the engine logged it: surprise, query statistics, segmenter, events.
        Returns the events closed."""
        offset = res.log_offset
        with clock("save"):
            # the step's query statistics first, tagged with where it ends, then its surprise, which marks
            # the step done: a crash between the two leaves them one step ahead, and open() takes it back
            if res.queries is not None:
                self.memory.observe_queries(res.queries, n, offset + n)
                self._save_queries(res.queries, offset + n)
            os.write(self._surprise_fd, res.surprise.astype(np.float32).tobytes())
            self._last_queries = res.queries
        with clock("segment"):
            final = self.segmenter.feed(_segmenter_surprise(res.surprise, offset), self._keys)
        closed = self._close(final, clock.phases)
        with clock("save"):
            self._save_state()
        return closed

    # ------------------------------------------------------------------ remembered exchanges
    def record_exchange(self, request_id: str, record: dict[str, Any]) -> None:
        """Keep ``record`` (JSON; ``start``: the offset where its ``prompt`` + ``token_ids`` go) under
        ``request_id`` before they are appended: :meth:`exchange` reports how many of them the session
        holds, so a crash anywhere in between is resumed, not stored twice. The last ``MAX_EXCHANGES`` stay."""
        records = self._exchanges()
        records.pop(request_id, None)
        records[request_id] = record
        while len(records) > MAX_EXCHANGES:
            records.pop(next(iter(records)))
        write_json(self.path / EXCHANGES_FILE, records)

    def exchange(self, request_id: str) -> tuple[dict[str, Any], int] | None:
        """The record kept under ``request_id`` and how many of its tokens (``prompt`` + ``token_ids``)
        the session holds at its ``start``: all of them, or a prefix that ends the session (a crash came
        between the record and the end of its append, which runs in steps: the rest is still to be
        appended). None when there is no record, or the session's tokens there are others."""
        rec = self._exchanges().get(request_id)
        if rec is None:
            return None
        start, stored = int(rec["start"]), [int(t) for t in (*rec["prompt"], *rec["token_ids"])]
        end = min(self.num_tokens, start + len(stored))
        if start > self.num_tokens or self.tokens(start, end).tolist() != stored[: end - start]:
            return None
        return rec, end - start

    def _exchanges(self) -> dict[str, dict[str, Any]]:
        try:
            out: dict[str, dict[str, Any]] = json.loads((self.path / EXCHANGES_FILE).read_text())
            return out
        except FileNotFoundError:
            return {}

    # ------------------------------------------------------------------ questions
    async def ask_stream(
        self,
        question_ids: Sequence[int],
        sampling: SamplingSpec,
        *,
        on_plan: OnPlan | None = None,
        on_report: Callable[[StepReport], None] | None = None,
    ) -> AsyncIterator[TokenDelta | AskResult]:
        """Answer against the memory without changing it: yields TokenDeltas, then an AskResult.

        ``on_plan`` is called with the retrieval, the timings so far and the window (the stream's
        tokens in every layer's window, ``WindowPlan.log_ranges``) once the step is planned, before the
        first token (a caller that stops early still learns what was retrieved). ``on_report`` is
        called once with the question's :class:`StepReport` when its step ends, also when the caller
        stops early (then ``output_tokens`` counts what was streamed). Holding the session, it holds
        all ingestion back from the engine until its first token (:mod:`.engine.admission`)."""
        q, clock = [int(t) for t in question_ids], PhaseClock()
        async with self.lock, self.engine.admission.question() as hold:
            self._check_usable()
            clock.add("wait", clock.elapsed())
            offset = self.num_tokens
            plan, retrieval = await plan_question(self, offset, q, sampling, clock)
            timings = question_timings(clock.phases)
            window = plan.log_ranges(self.log_path)
            if on_plan is not None:
                on_plan(retrieval, timings, window)
            ttft: float | None = None
            streamed, done, t_engine, chosen = 0, False, clock.elapsed(), dict[str, str]()

            def report(output_tokens: int) -> StepReport:
                decode_s = 0.0 if ttft is None else clock.elapsed() - ttft
                return self._report("question", offset, plan, retrieval, clock, ttft_s=ttft,
                                    output_tokens=output_tokens, decode_s=decode_s, answer_start=chosen.get("by"))

            def finish(output_tokens: int) -> StepReport:  # the step ended: reported once
                nonlocal done
                done = True
                rep = report(output_tokens)
                if on_report is not None:
                    on_report(rep)
                return rep

            options = StepOptions(surprise=False, queries=False)
            try:
                first = await first_tokens(self, plan, q, window, sampling, options, chosen)
                if first is not None:  # the answer goes on after its first tokens (question_copy, _contrast)
                    tokens, step = first
                    ttft = clock.elapsed()
                    await hold.release()
                    streamed = len(tokens)
                    yield TokenDelta(tuple(tokens))
                    if step.finish_reason is not None:  # they ended the answer
                        clock.add("compute", clock.elapsed() - t_engine)
                        yield AskResult(list(tokens), step.finish_reason, retrieval, step, timings, window,
                                        finish(len(tokens)))
                        return
                    run_plan = dataclasses.replace(plan, new_token_ids=(*plan.new_token_ids, *tokens))  # the rest
                    run_sampling = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - len(tokens))
                else:
                    run_plan, run_sampling = plan, sampling
                async for item in answer_stream(self, run_plan, q, window, run_sampling, options, chosen,
                                                guard=not first):
                    if isinstance(item, StepResult):
                        clock.engine(item.timings)
                        if first is not None:
                            item = dataclasses.replace(
                                item, output_token_ids=[*first[0], *item.output_token_ids],
                                output_logprobs=first[1].output_logprobs + item.output_logprobs)
                        yield AskResult(item.output_token_ids, item.finish_reason, retrieval, item, timings,
                                        window, finish(len(item.output_token_ids)))
                    else:
                        if ttft is None and item.token_ids:
                            ttft = clock.elapsed()
                            await hold.release()
                        streamed += len(item.token_ids)
                        yield item
            finally:
                if not done and on_report is not None:  # stopped early (or failed): what ran is reported
                    clock.add("compute", clock.elapsed() - t_engine)
                    on_report(report(streamed))

    async def ask(self, question_ids: Sequence[int], sampling: SamplingSpec) -> AskResult:
        result = None
        async for item in self.ask_stream(question_ids, sampling):
            if isinstance(item, AskResult):
                result = item
        assert result is not None
        return result


async def _to_the_end(aw: Any) -> Any:
    """Await ``aw``; if the caller is cancelled meanwhile, ``aw`` still runs to its end before the
    cancellation goes on."""
    task = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def _segmenter_surprise(surprise: np.ndarray, offset: int) -> np.ndarray:
    """The segmenter takes 0 for the stream's first token (the engine reports ln V: no context)."""
    if offset == 0 and surprise.size:
        surprise = surprise.copy()
        surprise[0] = 0.0
    return surprise


def _hf_config(engine: Engine) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(engine.info.path)

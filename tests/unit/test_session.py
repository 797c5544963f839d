"""Session memory loop on the HF reference engine and a tiny model: ingest, events, ask, resume."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from emserve.retrieval.kvlog import KVLog
from emserve.server.engine.base import Engine, SamplingSpec, StepOptions
from emserve.server.engine.reference import ReferenceEngine
from emserve.server.session import MemoryConfig, Session, SessionError
from emserve.server.session.config import FLAT_SEGMENTER

CFG = MemoryConfig.of(
    n_init=16,
    n_local=64,
    n_mem=64,
    exc_block_size=32,
    min_block_size=4,
    max_block_size=24,
    surprisal_threshold_gamma=1.0,
)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> ReferenceEngine:
    return ReferenceEngine(str(tiny_model_dir), dtype="float32", log_dtype="float32", max_model_len=1024)


def _as_then(cfg: MemoryConfig) -> MemoryConfig:
    """``cfg`` as a session saved in layout 1 or 2 ran it (:data:`FLAT_SEGMENTER`): what a test that rewrites
    a new session's file in an old layout must create it with."""
    return dataclasses.replace(cfg, segmenter=dataclasses.replace(cfg.segmenter, **FLAT_SEGMENTER))


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_ingest_builds_events_and_a_bounded_window(engine: ReferenceEngine, tmp_path: Path) -> None:
    s = Session.create(tmp_path / "s", engine, CFG)
    ids = _ids(600, 0)
    assert asyncio.run(s.append(ids[:250])).committed == 224  # 7 chunks of 32; 26 tokens wait for more
    assert s.pending_tokens == 26
    # the chunk rule the ingest stream asks too: full chunks, the rest only when flushed
    assert [s.next_chunk(n, flush=f) for n, f in ((26, False), (26, True), (40, False), (0, True))] == [0, 26, 32, 0]
    assert asyncio.run(s.append(ids[250:])).committed == 576
    assert asyncio.run(s.flush()).committed == 600
    log = KVLog.open(tmp_path / "s" / "log")
    assert len(log) == 600 and log.tokens().tolist() == ids
    # window positions stay bounded (sink + memory + remainder + local + chunk), not growing with the stream
    pos = log.positions()
    assert int(pos.max()) < 300 and int(pos[300:].max()) <= int(pos[:300].max()) + CFG.segmenter.max_block_size
    table = s.memory.table
    assert len(table) > 0
    starts, ends = table.starts, table.ends
    assert starts[0] == 16 and np.all(starts[1:] == ends[:-1])  # events tile the stream after the sink
    # events close as soon as their boundaries are final (close_lag), not when they leave the local window
    assert 600 - CFG.retrieval.n_local < ends[-1] <= 600 - CFG.segmenter.min_block_size
    ans = asyncio.run(s.ask(_ids(5, 1), SamplingSpec(max_tokens=4, ignore_eos=True)))
    assert len(ans.token_ids) == 4
    assert ans.retrieval is not None
    assert sum(e.end - e.start for e in ans.retrieval.layers[0].events) <= CFG.retrieval.n_mem
    assert len(KVLog.open(tmp_path / "s" / "log")) == 600  # a question leaves the memory unchanged
    s.close()


def test_reopen_resumes_identically(engine: ReferenceEngine, tmp_path: Path) -> None:
    ids = _ids(500, 2)
    a = Session.create(tmp_path / "a", engine, CFG)
    asyncio.run(a.append(ids, flush=True))
    b = Session.create(tmp_path / "b", engine, CFG)
    for i in range(0, 300, 50):  # another split of the same stream, interrupted by a restart
        asyncio.run(b.append(ids[i : i + 50]))
    b.close()  # the uncommitted tail (300 - 288 tokens) is the client's to re-send
    b = Session.open(tmp_path / "b", engine)
    assert b.num_tokens == 288
    asyncio.run(b.append(ids[288:], flush=True))
    assert len(b.memory.table) == len(a.memory.table)
    assert np.array_equal(b.memory.table.starts, a.memory.table.starts)
    for layer in (0, 1):
        torch.testing.assert_close(
            KVLog.open(tmp_path / "b" / "log").keys(layer, 0, 500),
            KVLog.open(tmp_path / "a" / "log").keys(layer, 0, 500),
            atol=1e-5,
            rtol=0,
        )
    a.close()
    b.close()


@pytest.mark.parametrize("restart", ["close", "crash before the log", "crash after the log"])
def test_a_restart_changes_nothing_the_session_computes_afterwards(engine: ReferenceEngine, tmp_path: Path,
                                                                   restart: str) -> None:
    """Ingestion's contiguity buffers (the neighbours of past steps' hits) are saved with the session, as
    planned for the step at hand: resumed after a close or a crash before or after a step's log, a session
    computes the same surprise and events as one that ran uninterrupted. Before, the buffers started empty
    after a reopen and the first windows after it differed (the real model: up to 2 nats, one event more
    over 14k tokens)."""
    cfg = CFG.with_settings(n_mem=96, contiguity_buffer_size=0.8, min_block_size=2, max_block_size=8)
    ids = _ids(800, 5)
    a = Session.create(tmp_path / "a", engine, cfg)
    for i in range(0, 800, 32):
        asyncio.run(a.append(ids[i : i + 32]))
    asyncio.run(a.flush())
    b = Session.create(tmp_path / "b", engine, cfg)
    for i in range(0, 448, 32):
        asyncio.run(b.append(ids[i : i + 32]))
    at = b.num_tokens
    assert any(x.ids for x in b.memory.planner.retriever.buffers)  # something to lose
    if restart == "crash before the log":  # the next step planned (buffers moved on), its engine step never ran
        _fail_once(b.engine, "step", RuntimeError("injected: the process dies in the engine step"))
        with pytest.raises(RuntimeError, match="injected"):
            asyncio.run(b.append(ids[at : at + 32]))
        assert b.num_tokens == at
    elif restart == "crash after the log":  # the next step logged, its state never saved
        _fail_once(b.memory, "close_events", RuntimeError("injected: the process dies after the log"))
        with pytest.raises(RuntimeError, match="injected"):
            asyncio.run(b.append(ids[at : at + 32]))
        assert b.num_tokens > at
    b.close()
    b = Session.open(tmp_path / "b", engine)
    asyncio.run(b.append(ids[b.num_tokens :], flush=True))
    np.testing.assert_allclose(b.surprise(), a.surprise(), atol=1e-4, rtol=0)
    assert np.array_equal(b.memory.table.starts, a.memory.table.starts)
    a.close()
    b.close()


@pytest.mark.parametrize("dies_in", ["observe_queries", "_save_queries"])
def test_a_kill_between_a_steps_query_statistics_and_its_surprise_changes_nothing(
        engine: ReferenceEngine, tmp_path: Path, dies_in: str) -> None:
    """A step's query statistics (the stream's mean query, the lagged queries for the next chunk) are saved
    tagged with where the step ends, before its surprise marks it done; a process killed in between (no
    close) leaves them one step ahead, and reopening takes that step back. Before, they were saved after
    the surprise, and a kill in between left them a step behind: the next windows differed (up to 2.2 nats
    on this model, found by bench/eval/crash.py)."""
    cfg = CFG.with_settings(n_mem=96, min_block_size=2, max_block_size=8)
    ids = _ids(640, 6)
    a = Session.create(tmp_path / "a", engine, cfg)
    asyncio.run(a.append(ids, flush=True))
    b = Session.create(tmp_path / "b", engine, cfg)
    asyncio.run(b.append(ids[:320]))
    owner = b.memory if dies_in == "observe_queries" else b
    _fail_once(owner, dies_in, RuntimeError("injected: the process dies here"))
    with pytest.raises(RuntimeError, match="injected"):
        asyncio.run(b.append(ids[320:352]))
    b = Session.open(tmp_path / "b", engine)  # the killed process closed nothing
    asyncio.run(b.append(ids[b.num_tokens:], flush=True))
    assert np.array_equal(b.surprise(), a.surprise())
    assert np.array_equal(b.memory.table.starts, a.memory.table.starts)
    a.close()
    b.close()


def test_sessions_saved_before_question_rank_keep_the_mean_ranking(engine: ReferenceEngine, tmp_path: Path) -> None:
    import json

    s = Session.create(tmp_path / "s", engine, _as_then(CFG))
    asyncio.run(s.append(_ids(100, 4), flush=True))
    s.close()
    state_file = tmp_path / "s" / "session.json"
    state = json.loads(state_file.read_text())
    assert state["config"]["retrieval"]["question_rank"] == "interleave"  # the default now, saved with the session
    reopened = Session.open(tmp_path / "s", engine)
    assert reopened.config.retrieval.question_rank == "interleave"
    reopened.close()
    flat = CFG.settings()
    del flat["question_rank"]
    flat["question_query_tokens"] = 4
    state_file.write_text(json.dumps({**state, "version": 2, "config": flat}))  # as a session saved before the field
    old = Session.open(tmp_path / "s", engine)
    assert old.config.retrieval.question_rank == "mean" and old.config.question.query_tokens == 4
    assert old.memory.planner.config.question_rank == "mean"
    old.close()


def test_a_session_keeps_its_table_dtype_and_older_ones_open_as_float32(engine: ReferenceEngine,
                                                                         tmp_path: Path) -> None:
    """An int8 table (``table_dtype``) is the session's: saved with it and reopened as int8, selecting as
    before the reopen; a session saved before the setting existed opens with the float32 table it has."""
    import json

    ids = _ids(400, 5)
    s = Session.create(tmp_path / "q", engine, CFG.with_settings(repr_proxy="tokens", table_dtype="int8"))
    asyncio.run(s.append(ids, flush=True))
    assert s.memory.table.dtype == "int8" and len(s.memory.table) > 10
    assert list((tmp_path / "q").rglob("reps.q8")) and not list((tmp_path / "q").rglob("reps_*"))  # format 4
    rows = s.memory.table.reps(0).copy()
    s.close()
    state = json.loads((tmp_path / "q" / "session.json").read_text())
    assert state["config"]["retrieval"]["table_dtype"] == "int8"
    again = Session.open(tmp_path / "q", engine)
    assert again.memory.table.dtype == "int8"
    np.testing.assert_array_equal(again.memory.table.reps(0), rows)
    again.close()

    s = Session.create(tmp_path / "f", engine, CFG.with_settings(table_dtype="float32"))  # as sessions were then
    asyncio.run(s.append(ids[:200], flush=True))
    s.close()
    state_file = tmp_path / "f" / "session.json"
    state = json.loads(state_file.read_text())
    del state["config"]["retrieval"]["table_dtype"]  # as a session saved before the setting
    state_file.write_text(json.dumps(state))
    old = Session.open(tmp_path / "f", engine)
    assert old.config.retrieval.table_dtype == "float32" and old.memory.table.dtype == "float32"
    asyncio.run(old.append(ids[200:], flush=True))
    old.close()


def test_the_default_table_is_int8_for_tokens_and_float32_for_per_layer_scores(engine: ReferenceEngine,
                                                                               tmp_path: Path) -> None:
    """``table_dtype="auto"`` (the default) is resolved when a session is created and saved resolved: int8
    for the token-level selection, float32 for ``topk`` (which refuses int8), so reopening never depends
    on the rule."""
    import json

    assert CFG.retrieval.table_dtype == "auto"
    ids = _ids(300, 3)
    for name, settings, want in (("t", dict(repr_proxy="tokens"), "int8"), ("k", dict(repr_proxy="topk"), "float32")):
        s = Session.create(tmp_path / name, engine, CFG.with_settings(**settings))
        asyncio.run(s.append(ids, flush=True))
        assert s.memory.table.dtype == want and s.config.retrieval.table_dtype == want
        s.close()
        state = json.loads((tmp_path / name / "session.json").read_text())
        assert state["config"]["retrieval"]["table_dtype"] == want
        again = Session.open(tmp_path / name, engine)
        assert again.memory.table.dtype == want
        again.close()


def test_session_json_is_versioned_and_read_by_one_function(engine: ReferenceEngine, tmp_path: Path) -> None:
    """A session saved today holds its config tree under ``STATE_VERSION``; those written as flat settings
    (layout 2, and 1: no ``"version"``) open with the same config; a newer layout, an unknown or a
    missing setting is refused with the reason, by opening and by the crash check alike (not misread with
    today's defaults)."""
    import json

    from emserve.server.session import STATE_VERSION, needs_recovery, read_state

    d = tmp_path / "s"
    cfg = _as_then(CFG.with_settings(table_dtype="int8"))  # as saved: "auto" resolved
    s = Session.create(d, engine, cfg)
    asyncio.run(s.append(_ids(100, 4), flush=True))
    s.close()
    state_file = d / "session.json"
    state = json.loads(state_file.read_text())
    assert state["version"] == STATE_VERSION == 3
    assert set(state["config"]) == {"segmenter", "retrieval", "question"}
    bound = cfg.bound(engine.info.max_model_len)
    saved = read_state(d)
    assert saved.version == 3 and saved.config == bound and saved.segmenter["seen"] == 100

    def write(st: dict[str, Any]) -> None:
        state_file.write_text(json.dumps(st))

    flat = {**state, "version": 2, "config": cfg.settings()}
    v1 = {k: v for k, v in flat.items() if k != "version"}
    for old, version in ((flat, 2), (v1, 1)):
        write(old)
        assert read_state(d).version == version and read_state(d).config == cfg
        reopened = Session.open(d, engine)
        assert reopened.config == bound
        reopened.close()

    tree = state["config"]
    for bad, reason in (({**state, "version": STATE_VERSION + 1}, "newer emserve"),
                        ({**flat, "config": {**flat["config"], "n_lokal": 64}}, "unknown memory setting.*n_lokal"),
                        ({**flat, "config": {k: v for k, v in flat["config"].items() if k != "n_local"}},
                         "n_local missing"),
                        ({**state, "config": {**tree, "question": {**tree["question"], "kopy": 1}}},
                         "unknown question setting.*kopy"),
                        ({**state, "config": {**tree, "retrieval": {k: v for k, v in tree["retrieval"].items()
                                                                    if k != "hnsw_m"}}}, "hnsw_m missing"),
                        ({**state, "config": {**tree, "segmenter": {**tree["segmenter"], "n_local": 32}}},
                         "must be one value"),
                        ({k: v for k, v in state.items() if k != "segmenter"}, "no 'segmenter'")):
        write(bad)
        with pytest.raises(SessionError, match=reason):
            read_state(d)
        with pytest.raises(SessionError, match=reason):
            Session.open(d, engine)
        assert not needs_recovery(d)
    state_file.write_text("{not json")
    with pytest.raises(SessionError, match="not JSON"):
        read_state(d)
    write(state)
    Session.open(d, engine).close()


def test_session_info_reports_what_a_saved_session_uses(engine: ReferenceEngine, tmp_path: Path) -> None:
    """GetSession / ListSessions read a closed session's config through the same migration as opening
    it: a session saved before question_rank (and the later question fields) reports the values it
    runs with. (Before: the info reported today's defaults, "interleave", for a "mean" session.)"""
    import json

    from emserve.server.session import SAVED_BEFORE
    from emserve.server.session.manager import SessionManager

    async def run() -> None:
        mgr = SessionManager(tmp_path / "root", engine, _as_then(CFG.with_settings(table_dtype="float32")))
        await mgr.create("old")
        async with mgr.lease("old") as entry:
            await entry.session.append(_ids(100, 4), flush=True)
        await mgr.close_all()
        data = tmp_path / "root" / "old" / info_data(tmp_path / "root" / "old")
        state = json.loads((data / "session.json").read_text())
        del state["version"]  # as written before versions (flat settings), and before the ones SAVED_BEFORE names
        state["config"] = {k: v for k, v in CFG.settings().items() if k not in SAVED_BEFORE}
        (data / "session.json").write_text(json.dumps(state))
        got = mgr.info("old").memory
        for name, value in SAVED_BEFORE.items():
            assert got.setting(name) == value, name
        async with mgr.lease("old") as entry:
            assert entry.session.config == got
        await mgr.close_all()

    def info_data(folder: Path) -> str:
        return json.loads((folder / "meta.json").read_text())["data"]

    asyncio.run(run())


def test_crash_between_log_and_surprise_is_repaired(engine: ReferenceEngine, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "s"
    s = Session.create(d, engine, CFG)
    assert asyncio.run(s.append(_ids(160, 3))).committed == 160
    for name in ("session.json", "queries.npz"):
        shutil.copy(d / name, tmp_path / name)
    assert asyncio.run(s.append(_ids(32, 4))).committed == 192
    s.close()
    # crash after the engine committed the last step to the log, before the server recorded it
    for name in ("session.json", "queries.npz"):
        shutil.copy(tmp_path / name, d / name)
    os.truncate(d / "surprise.f32", 160 * 4)
    s = Session.open(d, engine)
    assert s.num_tokens == 160 and len(s.log) == 160
    assert asyncio.run(s.append(_ids(32, 4))).committed == 192  # the client re-sends from its last ack
    ends = s.memory.table.ends
    assert np.all(np.diff(ends) > 0) and ends[-1] <= 192 - CFG.segmenter.min_block_size  # no duplicated events
    # the same events as a session that never crashed
    clean = Session.create(tmp_path / "clean", engine, CFG)
    asyncio.run(clean.append(_ids(160, 3) + _ids(32, 4)))
    assert s.events().tolist() == clean.events().tolist()
    clean.close()
    s.close()


def test_errors(engine: ReferenceEngine, tmp_path: Path) -> None:
    with pytest.raises(SessionError, match="no session"):
        Session.open(tmp_path / "missing", engine)
    Session.create(tmp_path / "s", engine, CFG).close()
    with pytest.raises(SessionError, match="already exists"):
        Session.create(tmp_path / "s", engine, CFG)
    with pytest.raises(ValueError, match="max_window"):
        Session.create(tmp_path / "t", engine, MemoryConfig.of(n_local=4096, n_mem=4096))


def test_refinement_key_cache_matches_direct_reads(engine: ReferenceEngine, tmp_path: Path) -> None:
    from emserve.server.engine.rope import RopeSpec
    from emserve.server.session.keys import RefinementKeys, refinement_keys

    s = Session.create(tmp_path / "s", engine, CFG)
    asyncio.run(s.append(_ids(300, 3)))
    log = KVLog.open(tmp_path / "s" / "log")
    rope = s._rope
    assert isinstance(rope, RopeSpec)
    layers = (1, 2)
    visible = [200]  # the log as a feed sees it: the cache reads ahead only up to len(log)

    class Prefix:
        def __len__(self) -> int:
            return visible[0]

        def positions(self, a: int, b: int) -> np.ndarray:
            assert b <= visible[0], "read past the visible log"
            return log.positions(a, b)

        def keys(self, layer: int, a: int, b: int) -> torch.Tensor:
            return log.keys(layer, a, b)

    cache = RefinementKeys(lambda: Prefix(), rope, layers)  # type: ignore[arg-type, return-value]
    # forward windows with overlap, a jump back before the cached range, an empty range, growth of the log
    calls = [(16, 40), (30, 70), (30, 50), (60, 200), (20, 30), (100, 100), (150, 180)]
    for a, b in calls:
        got = cache(a, b)
        want = refinement_keys(log, rope, layers, a, b)
        assert got.shape == want.shape and torch.equal(got, want), (a, b)
    visible[0] = len(log)  # 288: 9 chunks of 32
    for a, b in [(190, 260), (250, 288)]:
        assert torch.equal(cache(a, b), refinement_keys(log, rope, layers, a, b)), (a, b)
    with pytest.raises(SessionError):
        cache(50, 40)
    s.close()


def test_a_question_with_nothing_to_select_skips_the_probe_step(engine: ReferenceEngine, tmp_path: Path) -> None:
    ids = _ids(300, 5)
    q = _ids(5, 6)
    sampling = SamplingSpec(max_tokens=3, ignore_eos=True)
    steps: list[object] = []
    real_step = engine.step

    async def counting_step(plan, *args, **kwargs):  # type: ignore[no-untyped-def]
        options = args[1] if len(args) > 1 else kwargs.get("options")
        if (args[0] if args else kwargs.get("sampling")) is None and not (options and options.surprise):
            steps.append(plan)  # a probe generates nothing and reads no surprise (a prompt-only read does)
        return await real_step(plan, *args, **kwargs)

    for cfg, probes in ((CFG, 1), (CFG.with_settings(n_mem=0), 0)):
        s = Session.create(tmp_path / f"m{cfg.retrieval.n_mem}", engine, cfg)
        asyncio.run(s.append(ids, flush=True))
        assert len(s.memory.table) > 0
        steps.clear()
        engine.step = counting_step  # type: ignore[method-assign]
        try:
            ans = asyncio.run(s.ask(q, sampling))
        finally:
            del engine.step  # back to the class's method
        assert len(steps) == probes, f"n_mem={cfg.retrieval.n_mem}: {len(steps)} probe steps"
        assert len(ans.token_ids) == 3 and (ans.retrieval is None) == (probes == 0)
        s.close()


def test_host_work_runs_off_the_event_loop(engine: ReferenceEngine, tmp_path: Path) -> None:
    """Planning and closing events (seconds per step at 1M tokens) run in a worker thread: the event
    loop, which serves every other session and the health checks, keeps running meanwhile."""
    s = Session.create(tmp_path / "s", engine, CFG)
    asyncio.run(s.append(_ids(200, 3)))  # a memory to plan against
    mem = s.memory
    tick = threading.Event()  # set only by a coroutine on the loop
    seen: dict[str, list[bool]] = {"plan": [], "close": [], "ask": []}

    def waiting(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            tick.clear()
            seen["ask" if kwargs.get("question") else name].append(tick.wait(timeout=2))  # False: loop blocked
            return fn(*args, **kwargs)

        return run

    plan_step, close_events = mem.planner.plan_step, mem.close_events
    mem.planner.plan_step = waiting("plan", plan_step)  # type: ignore[method-assign]
    mem.close_events = waiting("close", close_events)  # type: ignore[method-assign]

    async def main() -> None:
        task = asyncio.ensure_future(s.append(_ids(200, 4), flush=True))
        ask = asyncio.ensure_future(s.ask(_ids(5, 1), SamplingSpec(max_tokens=2, ignore_eos=True)))
        while not (task.done() and ask.done()):
            tick.set()
            await asyncio.sleep(0.005)
        await task
        await ask

    asyncio.run(main())
    for name, waits in seen.items():
        assert waits and all(waits), f"{name}: {waits}"
    s.close()


def test_a_cancelled_append_finishes_the_step_it_started(engine: ReferenceEngine, tmp_path: Path) -> None:
    """A client gone mid-step: the step runs to its end (log, surprise and events agree), the lock is held
    until then, and the session goes on from there without losing or repeating a token."""
    ids = _ids(256, 5)
    s = Session.create(tmp_path / "s", engine, CFG)
    asyncio.run(s.append(ids[:64]))
    mem = s.memory
    entered, release = threading.Event(), threading.Event()
    close_events = mem.close_events

    def held(events: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(timeout=10)
        return close_events(events, **kwargs)

    mem.close_events = held  # type: ignore[method-assign]

    async def main() -> None:
        task = asyncio.ensure_future(s.append(ids[64:], flush=True))
        assert await asyncio.to_thread(entered.wait, 30)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done() and s.lock.locked()  # its host work still runs, under the lock
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not s.lock.locked()

    asyncio.run(main())
    mem.close_events = close_events  # type: ignore[method-assign]
    n = s.num_tokens
    assert n > 64 and n % CFG.retrieval.exc_block_size == 0
    assert len(KVLog.open(tmp_path / "s" / "log")) == n  # the log is not ahead of the session
    assert s.pending_tokens == 256 - n  # the committed chunk left the pending tokens
    assert asyncio.run(s.flush()).committed == 256
    assert KVLog.open(tmp_path / "s" / "log").tokens().tolist() == ids
    s.close()


def _fail_once(obj: Any, name: str, exc: BaseException) -> None:
    """Make ``obj.name`` raise ``exc`` on its next call, then behave as before (fault injection)."""
    original = getattr(obj, name)

    def failing(*args: Any, **kwargs: Any) -> Any:
        setattr(obj, name, original)
        raise exc

    setattr(obj, name, failing)


def _assert_as_never_failed(s: Session, ids: list[int], engine: ReferenceEngine, tmp_path: Path) -> None:
    """``s`` holds ``ids`` once each, and the events of a session that ingested them without a failure."""
    assert KVLog.open(s.path / "log").tokens().tolist() == ids
    clean = Session.create(tmp_path / "clean", engine, CFG)
    asyncio.run(clean.append(ids, flush=True))
    assert s.events().tolist() == clean.events().tolist()
    clean.close()


def test_a_step_failing_after_the_engine_logged_it_reopens_without_duplicating(engine: ReferenceEngine,
                                                                                tmp_path: Path) -> None:
    """Host work failing after the engine logged the step (closing events ran out of device memory, the disk
    filled): the session refuses further calls until reopened, and reopening replays its files as after a
    crash. Before, the failed chunk stayed pending and was ingested a second time."""
    from emserve.server.errors import SessionReopening

    ids = _ids(400, 6)
    s = Session.create(tmp_path / "s", engine, CFG)
    assert asyncio.run(s.append(ids[:200])).committed == 192
    _fail_once(s.memory, "close_events", RuntimeError("injected: out of memory while closing events"))
    with pytest.raises(RuntimeError, match="injected"):
        asyncio.run(s.append(ids[200:300]))
    assert s.failed is not None
    with pytest.raises(SessionReopening, match="retry"):
        asyncio.run(s.append(ids[300:]))
    with pytest.raises(SessionReopening):
        asyncio.run(s.ask(_ids(5, 1), SamplingSpec(max_tokens=2, ignore_eos=True)))
    s.close()
    s = Session.open(tmp_path / "s", engine)
    committed = s.num_tokens
    assert committed == 224  # the failed step is in the files: committed
    asyncio.run(s.append(ids[committed:], flush=True))  # the client re-sends from the committed offset
    _assert_as_never_failed(s, ids, engine, tmp_path)
    s.close()


def test_the_manager_repairs_what_a_crash_left_before_it_serves(engine: ReferenceEngine, tmp_path: Path) -> None:
    """A crash between a step's files and its saved state, and a deletion interrupted after its rename:
    the next server's :meth:`SessionManager.recover` (run before readiness) repairs the session, so its
    statistics are right before anyone uses it, and removes the leftover folder. Before, GetSession
    reported the events of the saved state until the session's next use, and ``.deleted-*`` folders
    stayed forever."""
    from emserve.server.session import needs_recovery
    from emserve.server.session.manager import SessionManager

    root = tmp_path / "root"
    ids = _ids(400, 6)

    async def crash() -> Path:
        m = SessionManager(root, engine, CFG)
        await m.create("s")
        session = m._open["s"].session
        await session.append(ids[:200])
        _fail_once(session.memory, "close_events", RuntimeError("injected: the process dies here"))
        with pytest.raises(RuntimeError, match="injected"):
            await session.append(ids[200:300])
        session.close()  # the files as a SIGKILL leaves them: the step logged, its events never closed
        return session.path

    data = asyncio.run(crash())
    leftover = root / ".deleted-gone-1234abcd"
    (leftover / "log").mkdir(parents=True)
    (leftover / "log" / "k_000.bin").write_bytes(b"\0" * 4096)
    assert needs_recovery(data)

    async def restart() -> tuple[int, int, tuple[int, int], int]:
        m = SessionManager(root, engine, CFG)
        stale = m.info("s").stats.num_events
        repaired = await m.recover()
        told = m.info("s").stats.num_events
        async with m.lease("s") as entry:  # used: the count the session itself holds
            used = len(entry.session.memory.table)
        await m.close_all()
        return stale, told, repaired, used

    stale, told, repaired, used = asyncio.run(restart())
    assert repaired == (1, 1) and not leftover.exists() and not needs_recovery(data)
    assert stale < told == used


def test_a_step_failing_before_the_engine_ran_is_retried_in_place(engine: ReferenceEngine, tmp_path: Path) -> None:
    """Planning failed (nothing logged): the session stays usable and the same call again gives the same
    memory as a session that never failed."""
    ids = _ids(300, 7)
    s = Session.create(tmp_path / "s", engine, CFG)
    asyncio.run(s.append(ids[:100]))
    _fail_once(s.memory.planner, "plan_step", RuntimeError("injected planning failure"))
    with pytest.raises(RuntimeError, match="injected"):
        asyncio.run(s.append(ids[100:], flush=True))
    assert s.failed is None and s.num_tokens == 96
    assert asyncio.run(s.flush()).committed == 300  # its pending tokens are still there
    _assert_as_never_failed(s, ids, engine, tmp_path)
    s.close()


def test_opening_out_of_device_memory_fails_cleanly(engine: ReferenceEngine, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Reopening a session whose retrieval mirror is recomputed on a device that is out of memory: a clear
    DeviceMemoryError, no file left open, and the session opens once memory is there."""
    from emserve.retrieval.device_scorer import DeviceScorer
    from emserve.retrieval.errors import DeviceMemoryError

    ids = _ids(300, 8)
    s = Session.create(tmp_path / "s", engine, CFG, score_device="torch-cpu")
    asyncio.run(s.append(ids, flush=True))
    events = s.events().tolist()
    s.close()

    def no_memory(self: DeviceScorer, n: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")

    fds = len(os.listdir("/proc/self/fd"))
    with monkeypatch.context() as m:
        m.setattr(DeviceScorer, "_grow", no_memory)
        with pytest.raises(DeviceMemoryError, match="out of memory"):
            Session.open(tmp_path / "s", engine, score_device="torch-cpu")
    assert len(os.listdir("/proc/self/fd")) == fds
    s = Session.open(tmp_path / "s", engine, score_device="torch-cpu")
    assert s.events().tolist() == events and s.device_bytes > 0
    s.close()


def test_content_rows_keep_the_tokens_that_name_something(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from emserve.server.session.words import content_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode("\n\nWhat is 42? The", add_special_tokens=False)
    texts = [tok.decode([t]) for t in ids]
    rows = content_rows(str(tiny_model_dir), ids).tolist()
    assert rows == [i for i, t in enumerate(texts) if any(ch.isalnum() for ch in t)]
    assert 0 < len(rows) < len(ids)  # the newlines and the question mark are left out
    only_marks = tok.encode("\n\n?", add_special_tokens=False)
    assert content_rows(str(tiny_model_dir), only_marks).tolist() == list(range(len(only_marks)))  # none: all
    assert content_rows(str(tmp_path), ids).tolist() == list(range(len(ids)))  # no tokenizer there: all


def test_question_lexical_puts_the_events_holding_its_rare_words_in_its_window(
        engine: ReferenceEngine, tmp_path: Path) -> None:
    """Four words the rest of the stream never uses (ids above _ids' range, whose text no other token
    shares) are named by the question: with question_lexical the event holding them is a lexical pick
    and in the answer step's window."""
    from emserve.server.session.words import model_vocabulary

    vocab = model_vocabulary(engine.info.path)
    assert vocab is not None  # the tiny model has a tokenizer: the test means something
    common = set(vocab.canonical[:500].tolist())
    rare = [t for t in range(500, engine.info.vocab_size) if vocab.content[t] and vocab.canonical[t] not in common][:4]
    assert len(rare) == 4
    ids = _ids(1200, 7)
    ids[300:304] = rare
    cfg = CFG.with_settings(question_lexical=1, question_n_mem=32, question_n_local=16)
    s = Session.create(tmp_path / "s", engine, cfg)
    asyncio.run(s.append(ids, flush=True))
    res = asyncio.run(s.ask([5, *rare, 6], SamplingSpec(max_tokens=2, ignore_eos=True)))
    assert res.retrieval is not None
    lexical = [e for e in res.retrieval.layers[0].events if e.source == "lexical"]
    # one pick, holding some of the words (where a boundary falls among them depends on the engine's
    # numerics: on a GPU one fell at 302), and all four in the window
    assert len(lexical) == 1 and any(lexical[0].start <= t < lexical[0].end for t in range(300, 304))
    assert all(any(a <= t < b for a, b in res.window) for t in range(300, 304))
    s.config = cfg.with_settings(question_lexical=0)
    res0 = asyncio.run(s.ask([5, *rare, 6], SamplingSpec(max_tokens=2, ignore_eos=True)))
    assert res0.retrieval is not None and all(e.source != "lexical" for e in res0.retrieval.layers[0].events)
    s.close()


def test_word_postings_follow_the_stream_between_questions(engine: ReferenceEngine, tmp_path: Path) -> None:
    """A session's first question indexes its words; the events closed since are added at the next
    question (their tokens only): rare words appended after the first question are found by the second,
    and the leads are those a pass over the whole stream gives."""
    from emserve.retrieval.lexical import lexical_hits
    from emserve.server.session.question import lexical_leads
    from emserve.server.session.words import model_vocabulary

    vocab = model_vocabulary(engine.info.path)
    assert vocab is not None
    common = set(vocab.canonical[:500].tolist())
    rare = [t for t in range(500, engine.info.vocab_size) if vocab.content[t] and vocab.canonical[t] not in common][:4]
    later = _ids(1200, 10)
    later[300:304] = rare
    cfg = CFG.with_settings(question_lexical=1, question_n_mem=32, question_n_local=16)
    s = Session.create(tmp_path / "s", engine, cfg)
    asyncio.run(s.append(_ids(1200, 9), flush=True))
    asyncio.run(s.ask([5, *rare, 6], SamplingSpec(max_tokens=2, ignore_eos=True)))
    stems = s.memory.word_postings["stems"]
    first = stems.num_events
    assert first == len(s.memory.table) > 0
    asyncio.run(s.append(later, flush=True))
    res = asyncio.run(s.ask([5, *rare, 6], SamplingSpec(max_tokens=2, ignore_eos=True)))
    assert s.memory.word_postings["stems"] is stems and stems.num_events == len(s.memory.table) > first
    assert res.retrieval is not None
    lexical = [e for e in res.retrieval.layers[0].events if e.source == "lexical"]
    assert len(lexical) == 1 and any(lexical[0].start <= t < lexical[0].end for t in range(1500, 1504))
    table = s.memory.table
    starts = np.asarray(table.starts[: len(table)], np.int64)
    ends = starts + np.asarray(table.sizes[: len(table)], np.int64)
    q = [5, *rare, 6]
    want = lexical_hits(q, s.tokens(int(starts[0]), int(ends[-1])), starts, ends, vocab, 1,
                        spacing=cfg.retrieval.question_neighbours)
    assert lexical_leads(s, q, len(table)) == (tuple(want.tolist()), 1)
    view = s.token_view(int(starts[0]), int(ends[-1]))  # what the rules read: the log's mapped file, not a copy
    assert np.array_equal(view, s.tokens(int(starts[0]), int(ends[-1]))) and not view.flags.owndata
    s.close()


def test_question_bridge_brings_the_fact_stated_about_a_rare_word_of_the_first_hit(
        engine: ReferenceEngine, tmp_path: Path) -> None:
    """question_bridge: the question names A1 A2 (held at 300 with B) and asks C, which the stream holds
    only at 900, next to B: the second hop brings 900 into the window; without it only 300 is there. Each
    of A1 A2 B C is a word of its own (no token continues it: the bridge words are whole words)."""
    from emserve.server.session.words import model_vocabulary

    vocab = model_vocabulary(engine.info.path)
    assert vocab is not None
    common = set(vocab.canonical[:500].tolist())
    rare: list[int] = []
    for t in range(500, engine.info.vocab_size):
        taken = common | {vocab.canonical[r] for r in rare}
        if vocab.content[t] and not vocab.joins[t] and vocab.canonical[t] not in taken:
            rare.append(t)
        if len(rare) == 4:
            break
    a1, a2, b, c = rare
    ids = _ids(1200, 8)
    space = next(t for t in range(3, 500) if not vocab.joins[t])  # no token after B or C continues it
    ids[300:304] = [a1, a2, b, space]
    ids[900:903] = [b, c, space]
    cfg = CFG.with_settings(question_lexical=1, question_n_mem=64, question_n_local=16,
                              question_neighbours=1, question_reach=0, question_copy=0)
    s = Session.create(tmp_path / "s", engine, cfg)
    asyncio.run(s.append(ids, flush=True))

    def ask(bridge: bool) -> tuple[list[tuple[int, int]], list[int]]:
        s.config = cfg.with_settings(question_bridge=bridge)
        res = asyncio.run(s.ask([a1, a2, c], SamplingSpec(max_tokens=2, ignore_eos=True)))
        assert res.retrieval is not None
        lexical = [e.start for e in res.retrieval.layers[0].events if e.source == "lexical"]
        return list(res.window), lexical

    window, lexical = ask(False)
    assert len(lexical) == 1 and all(any(a <= t < b_ for a, b_ in window) for t in range(300, 303))
    assert not any(a <= 901 < b_ for a, b_ in window)
    window, lexical = ask(True)
    assert len(lexical) == 2 and all(any(a <= t < b_ for a, b_ in window) for t in (300, 301, 302, 900, 901))
    s.close()


def test_every_step_reports_its_sizes_and_phases(engine: ReferenceEngine, tmp_path: Path) -> None:
    from emserve.server.report import PHASES

    s = Session.create(tmp_path / "s", engine, CFG)
    ids = _ids(300, 5)
    res = asyncio.run(s.append(ids[:250]))
    tail = asyncio.run(s.append(ids[250:], flush=True))
    steps = res.steps + tail.steps
    assert [r.kind for r in steps] == ["ingest"] * 10  # 7 chunks of 32, then 26 + 50 pending: 2 more + a tail
    assert [r.offset for r in steps] == list(range(0, 300, 32))
    assert [r.new_tokens for r in steps] == [32] * 9 + [12]
    per_token = engine.info.kv_layout(engine.log_dtype).bytes_per_token
    for r in steps:
        assert set(r.phases) <= set(PHASES) and all(v >= 0 for v in r.phases.values())
        assert {"compute", "segment", "save"} <= set(r.phases)
        assert sum(r.phases.values()) <= r.seconds + 1e-6
        assert r.bytes_written == r.new_tokens * per_token and r.bytes_read == r.injected_tokens * per_token
        assert r.window_tokens == r.injected_tokens + r.new_tokens + (r.offset > 0)  # the anchor token
        assert r.retrieved_tokens <= CFG.retrieval.n_mem and r.events_closed == len(r.event_tokens)
    assert "retrieve" not in steps[0].phases and "retrieve" in steps[-1].phases  # the first step has no memory
    # the events the reports closed are the table's events
    assert sum(r.events_closed for r in steps) == len(s.memory.table)
    assert [n for r in steps for n in r.event_tokens] == (s.memory.table.ends - s.memory.table.starts).tolist()
    assert any(r.retrieved_events > 0 and r.retrieved_tokens > 0 for r in steps)

    seen: list[Any] = []
    ans = asyncio.run(s.ask(_ids(5, 1), SamplingSpec(max_tokens=4, ignore_eos=True)))
    q = ans.report
    assert q is not None and q.kind == "question" and q.offset == 300 and q.new_tokens == 5
    assert q.output_tokens == 4 and q.ttft_s is not None and 0 < q.ttft_s <= q.seconds and q.decode_s >= 0
    assert {"probe", "retrieve", "compute"} <= set(q.phases) and q.events_closed == 0 and q.bytes_written == 0
    assert q.retrieved_tokens == ans.retrieval.tokens  # type: ignore[union-attr]

    async def stop_early() -> None:  # a caller that stops after the first token still gets a report
        stream = s.ask_stream(_ids(5, 1), SamplingSpec(max_tokens=8, ignore_eos=True), on_report=seen.append)
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(stop_early())
    assert len(seen) == 1 and seen[0].kind == "question" and 1 <= seen[0].output_tokens < 8


def test_the_first_answer_token_is_chosen_by_contrast_with_the_prior(engine: ReferenceEngine, tmp_path: Path) -> None:
    """question_contrast (rule 7): the answer's first token is contrast_choice of the window's and the
    question-alone distributions (computed here independently), the rest greedy after it; 0 is plain greedy."""
    from emserve.retrieval.plan import WindowPlan
    from emserve.server.contrast import TOP_K, contrast_choice

    ids = _ids(300, 7)
    plans: list[Any] = []
    real_stream = engine.stream

    def spying(plan, *args, **kwargs):  # type: ignore[no-untyped-def]
        plans.append(plan)
        return real_stream(plan, *args, **kwargs)

    # a window (2 neighbours, reach 24, whole events) on which the rule changes some first tokens of this random stream
    cfg = CFG.with_settings(question_contrast=0.0, question_neighbours=2, question_reach=24,
                              question_parts=0, question_lookahead=0)
    s = Session.create(tmp_path / "s", engine, cfg)
    asyncio.run(s.append(ids, flush=True))
    greedy = SamplingSpec(max_tokens=6, ignore_eos=True)
    engine.stream = spying  # type: ignore[method-assign]
    try:
        differ = 0
        for seed in range(8):
            q = _ids(6, 100 + seed)
            s.config = s.config.with_settings(question_contrast=0.0)
            plain = asyncio.run(s.ask(q, greedy))
            window_plan = plans[-1]
            s.config = s.config.with_settings(question_contrast=1.0)
            plans.clear()
            got = asyncio.run(s.ask(q, greedy))
            one = dataclasses.replace(greedy, max_tokens=1, top_logprobs=TOP_K)
            opts = StepOptions(surprise=False, queries=False)
            w = asyncio.run(engine.step(window_plan, one, opts)).top_logprobs[0]
            p = asyncio.run(engine.step(WindowPlan.build(q), one, opts)).top_logprobs[0]
            first = contrast_choice(w, p, 1.0)
            assert len(w) == len(p) == TOP_K and max(w, key=w.get) == plain.token_ids[0]
            assert got.token_ids[0] == first and len(got.token_ids) == 6
            rest = asyncio.run(engine.step(dataclasses.replace(window_plan, new_token_ids=(*q, first)),
                                           dataclasses.replace(greedy, max_tokens=5), opts))
            assert got.token_ids[1:] == rest.output_token_ids
            differ += first != plain.token_ids[0]
            assert got.report is not None and got.report.new_tokens == 6 and got.report.output_tokens == 6
        one_token = asyncio.run(s.ask(_ids(6, 100), dataclasses.replace(greedy, max_tokens=1)))
        assert len(one_token.token_ids) == 1 and one_token.finish_reason == "length"
    finally:
        del engine.stream
    s.close()
    assert differ > 0  # the rule changed some first tokens on this random stream (else the test shows nothing)


def test_the_answer_starts_with_the_word_that_followed_the_question_end(engine: ReferenceEngine, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """question_copy: a greedy answer starts with the word that followed the question's last words where
    the window holds them verbatim, token by token while the model finds each plausible; the rest is
    greedy after it (the same tokens as a greedy answer to the question followed by the copied ones)."""
    import emserve.server.session.answer as answer_mod
    from emserve.retrieval.plan import WindowPlan
    from emserve.server.session.words import model_vocabulary

    lead = [41, 42, 43, 44]
    ids = _ids(300, 9)
    ids[250:250] = lead  # in the local tail of a question: in its window
    s = Session.create(tmp_path / "s", engine, CFG.with_settings(question_copy=0))
    asyncio.run(s.append(ids, flush=True))
    vocab = model_vocabulary(engine.info.path)
    assert vocab is not None
    after = ids[254:270]
    word = after[: vocab.first_word(after)]
    question = [*_ids(5, 10), *lead]
    greedy = SamplingSpec(max_tokens=6, ignore_eos=True)
    plans: list[WindowPlan] = []
    real_stream = engine.stream

    def spying(plan, *args, **kwargs):  # type: ignore[no-untyped-def]
        plans.append(plan)
        return real_stream(plan, *args, **kwargs)

    monkeypatch.setattr(engine, "stream", spying)
    plain = asyncio.run(s.ask(question, greedy))
    assert plain.token_ids[: len(word)] != word  # (else the rule shows nothing here)
    monkeypatch.setattr(answer_mod, "COPY_PLAUSIBLE", 1e-30)  # every token plausible: the copy decides
    s.config = s.config.with_settings(question_copy=3)
    copied = asyncio.run(s.ask(question, greedy))
    assert copied.token_ids[: len(word)] == word and len(copied.token_ids) == 6
    assert copied.report is not None and copied.report.answer_start == "copy"
    rest = asyncio.run(engine.step(plans[-1], dataclasses.replace(greedy, max_tokens=6 - len(word)),
                                   StepOptions(surprise=False, queries=False)))
    assert plans[-1].new_token_ids[-len(word):] == tuple(word) and copied.token_ids[len(word):] == rest.output_token_ids
    s.config = s.config.with_settings(question_copy=5)  # the run is 4 tokens: nothing to copy
    assert asyncio.run(s.ask(question, greedy)).token_ids == plain.token_ids
    monkeypatch.setattr(answer_mod, "COPY_PLAUSIBLE", 1.0)  # no token is that likely: nothing copied
    s.config = s.config.with_settings(question_copy=3)
    assert asyncio.run(s.ask(question, greedy)).token_ids == plain.token_ids
    monkeypatch.setattr(answer_mod, "COPY_PLAUSIBLE", 1e-30)  # retrieved events last: the copy is checked alike
    s.config = s.config.with_settings(question_memory_last=True)  # (it needs the anchor: was a PlanError)
    s.memory.planner.config = s.config.retrieval
    last = asyncio.run(s.ask(question, greedy))
    assert plans[-1].segments[-1].end != plans[-1].anchor.index and last.token_ids[: len(word)] == word
    s.close()


def test_an_answer_that_restates_the_question_is_decided_again(engine: ReferenceEngine, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """question_echo: a greedy answer whose first content tokens are all question words is held back and,
    when it restates the question, started instead with the first of the model's next choices that the
    window says in part, the rest greedy after it; none such: the answer is the plain one. The decision's
    tests (``restates``, ``grounded``) have their own unit tests; here they are replaced by ones this tiny
    random model can meet."""
    import emserve.server.session.answer as answer_mod
    from emserve.server.engine.base import TokenDelta

    off = dict(question_copy=0, question_echo=0, question_lookahead=0)
    s = Session.create(tmp_path / "s", engine, CFG.with_settings(**off))
    asyncio.run(s.append(_ids(300, 11), flush=True))
    question = _ids(6, 12)
    greedy = SamplingSpec(max_tokens=12, ignore_eos=True)  # longer than the lookahead: the engine goes on after it
    plain = asyncio.run(s.ask(question, greedy))
    echo_first = plain.token_ids[0]
    # the plain answer "restates" the question (its first token decides); the window "says" the answers
    # whose first token is in ``said``
    monkeypatch.setattr(answer_mod, "restates",
                        lambda answer, q, vocab, n: (answer[0] == echo_first) if answer else None)
    said: set[int] = set()
    monkeypatch.setattr(answer_mod, "grounded", lambda answer, *a: answer[0] in said)
    choices: list[tuple[Any, list[int]]] = []  # (the answer's plan, the model's first choices, best first)
    plans: list[Any] = []
    real_step, real_stream = engine.step, engine.stream

    async def spy_step(plan, sampling=None, options=StepOptions()):  # type: ignore[no-untyped-def]
        res = await real_step(plan, sampling, options)
        if sampling is not None and sampling.top_logprobs:
            choices.append((plan, [t for t, _ in sorted(res.top_logprobs[0].items(), key=lambda kv: -kv[1])]))
        return res

    def spy_stream(plan, *args, **kwargs):  # type: ignore[no-untyped-def]
        plans.append(plan)
        return real_stream(plan, *args, **kwargs)

    monkeypatch.setattr(engine, "step", spy_step)
    monkeypatch.setattr(engine, "stream", spy_stream)

    def ask() -> tuple[list[int], Any]:
        async def run() -> tuple[list[int], Any]:
            got: list[int] = []
            result = None
            async for item in s.ask_stream(question, greedy):
                if isinstance(item, TokenDelta):
                    got.extend(item.token_ids)
                else:
                    result = item
            return got, result
        return asyncio.run(run())

    s.config = s.config.with_settings(question_echo=4)
    got, res = ask()  # no other choice is said by the window: the answer stays the plain one
    assert res.token_ids == plain.token_ids == got and res.finish_reason == "length"
    assert res.report is not None and res.report.answer_start is None
    assert choices and choices[-1][1][0] == echo_first  # the model's first choices were asked for
    others = [t for t in choices[-1][1] if t != echo_first]
    said.add(others[1])  # the model's third choice: the second is passed over, as the window does not say it
    n = len(plans)
    got, res = ask()
    assert got == res.token_ids and len(res.token_ids) == 12 and res.finish_reason == "length"
    assert len(res.step.output_logprobs) == 12 and all(lp <= 0 for lp in res.step.output_logprobs)
    asked = choices[-1][0]  # the answer's window and question
    start = dataclasses.replace(asked, new_token_ids=(*asked.new_token_ids, others[1]), request_id=None)
    after = asyncio.run(real_step(start, dataclasses.replace(greedy, max_tokens=11))).output_token_ids
    assert res.token_ids == [others[1], *after]  # the chosen start, then greedy after it
    assert res.report is not None and res.report.answer_start == "echo"
    ahead = 1 + answer_mod.ECHO_LOOKAHEAD  # the engine went on after the start and its lookahead
    assert any(p.new_token_ids[-ahead:] == tuple(res.token_ids[:ahead]) for p in plans[n:])
    s.config = s.config.with_settings(question_echo=0)
    assert asyncio.run(s.ask(question, greedy)).token_ids == plain.token_ids
    s.close()


def test_an_answer_starts_with_the_choice_the_model_reads_on_best(engine: ReferenceEngine, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """question_lookahead: a greedy answer starts with the one of the model's most likely first tokens whose
    first ``question_lookahead`` tokens (the token, then greedy) have the highest mean log-probability,
    and goes on greedily after them; another first token is followed only where its log-probability over
    the lookahead's length beats the greedy start's mean (the others cannot win); with one choice, or the
    setting off, it is the plain answer."""
    import emserve.server.session.answer as answer_mod

    off = dict(question_copy=0, question_echo=0, question_lookahead=0)
    s = Session.create(tmp_path / "s", engine, CFG.with_settings(**off))
    asyncio.run(s.append(_ids(300, 11), flush=True))
    question = _ids(6, 12)
    greedy = SamplingSpec(max_tokens=12, ignore_eos=True)
    plain = asyncio.run(s.ask(question, greedy))
    firsts: list[tuple[Any, dict[int, float]]] = []  # (the answer's plan, the model's first choices)
    followed: list[int] = []  # the first tokens followed besides the greedy one
    real_step = engine.step

    async def spy_step(plan, sampling=None, options=StepOptions()):  # type: ignore[no-untyped-def]
        res = await real_step(plan, sampling, options)
        if sampling is not None and sampling.top_logprobs:
            firsts.append((plan, res.top_logprobs[0]))
        elif sampling is not None and firsts and len(plan.new_token_ids) == len(firsts[-1][0].new_token_ids) + 1:
            followed.append(plan.new_token_ids[-1])
        return res

    monkeypatch.setattr(engine, "step", spy_step)
    n = 4
    s.config = s.config.with_settings(question_lookahead=n)
    res = asyncio.run(s.ask(question, greedy))
    assert len(firsts) == 1 and len(firsts[0][1]) == answer_mod.LOOKAHEAD_CHOICES
    asked, choices = firsts[0]
    asked = dataclasses.replace(asked, request_id=None)

    def follow(start: list[int], k: int) -> Any:
        return asyncio.run(real_step(dataclasses.replace(asked, new_token_ids=(*asked.new_token_ids, *start)),
                                     dataclasses.replace(greedy, max_tokens=k)))

    scored = []
    for t, lp in sorted(choices.items(), key=lambda kv: -kv[1]):
        ahead = follow([t], n - 1)
        scored.append((float(np.mean([lp, *ahead.output_logprobs])), [t, *ahead.output_token_ids], lp))
    best = max(scored, key=lambda x: x[0])[1]
    assert sorted(followed) == sorted(t for _, (t, *_), lp in scored[1:] if lp / n > scored[0][0])
    assert res.token_ids[:n] == best and len(res.token_ids) == 12 and res.finish_reason == "length"
    top = max(choices, key=lambda t: choices[t])
    assert top == plain.token_ids[0] != best[0]  # (else the rule shows nothing here)
    assert res.report is not None and res.report.answer_start == "lookahead"
    assert res.token_ids[n:] == follow(best, 12 - n).output_token_ids  # greedy after the start
    assert len(res.step.output_logprobs) == 12 and all(lp <= 0 for lp in res.step.output_logprobs)
    monkeypatch.setattr(answer_mod, "LOOKAHEAD_CHOICES", 1)
    assert asyncio.run(s.ask(question, greedy)).token_ids == plain.token_ids
    monkeypatch.setattr(answer_mod, "LOOKAHEAD_CHOICES", 5)
    s.config = s.config.with_settings(question_lookahead=0)
    calls = len(firsts)
    assert asyncio.run(s.ask(question, greedy)).token_ids == plain.token_ids and len(firsts) == calls
    s.close()


def test_the_lookahead_follows_only_the_first_tokens_that_can_win() -> None:
    """lookahead_start follows the greedy start, then only the other first tokens whose log-probability over
    the lookahead's length beats the greedy start's mean (a start's mean is at most its first token's
    log-probability over its length), and takes the best; stop tokens are never a start."""
    from types import SimpleNamespace

    from emserve.retrieval.plan import WindowPlan
    from emserve.server.engine.base import StepResult
    from emserve.server.session.answer import lookahead_start

    calls: list[tuple[tuple[int, ...], int]] = []

    async def step(plan, sampling, options):  # type: ignore[no-untyped-def]
        calls.append((plan.new_token_ids, sampling.max_tokens))
        if len(plan.new_token_ids) == 2:  # the question alone: the greedy start, its first choices
            firsts = {10: -0.1, 30: -0.3, 20: -2.5, 40: -5.0, 50: -6.0}
            return StepResult("g", None, np.zeros(0, np.float32), None, [10, 11, 12, 13], [-0.1] * 4,
                              [firsts, {}, {}, {}], "length")
        t = plan.new_token_ids[-1]
        return StepResult(str(t), None, np.zeros(0, np.float32), None, [t + 1, t + 2, t + 3], [-0.01] * 3, [],
                          "length")

    session = SimpleNamespace(config=CFG.with_settings(question_lookahead=4), engine=SimpleNamespace(step=step))
    plan, sampling = WindowPlan.build([1, 2]), SamplingSpec(max_tokens=12)
    chosen: dict[str, str] = {}
    got = asyncio.run(lookahead_start(session, plan, sampling, StepOptions(), set(), chosen))  # type: ignore[arg-type]
    assert got is not None
    tokens, res = got
    assert calls == [((1, 2), 4), ((1, 2, 30), 3)]  # 20, 40, 50: log p / 4 <= -0.1, the greedy start's mean
    assert tokens == [30, 31, 32, 33] and res.output_logprobs == [-0.3, -0.01, -0.01, -0.01]  # mean -0.0825
    assert chosen == {"by": "lookahead"} and res.finish_reason is None and res.top_logprobs == []
    calls.clear()
    chosen.clear()
    got = asyncio.run(lookahead_start(session, plan, sampling, StepOptions(), {30}, chosen))  # type: ignore[arg-type]
    assert got is not None and got[0] == [10, 11, 12, 13] and calls == [((1, 2), 4)] and chosen == {}
    assert asyncio.run(lookahead_start(session, plan, sampling, StepOptions(), {10}, chosen)) is None  # type: ignore[arg-type]


def test_a_window_without_memory_keeps_the_sink_and_the_recent_tail() -> None:
    """recent_window: the question's plan without its retrieved events, by the planner's ``recent`` bounds
    (sink end, remainder start), a segment merged across a bound cut at it, per layer alike; None where the
    plan does not say its bounds or nothing lies between them."""
    from emserve.retrieval.plan import Segment, WindowPlan
    from emserve.server.session.answer import recent_window

    segs = [Segment("L", 0, 4), Segment("L", 100, 120), Segment("L", 280, 364)]  # an event merged into the tail
    plan = WindowPlan.build([7, 8], segs)
    assert recent_window(plan) is None
    plan.extra["recent"] = (4, 300)
    got = recent_window(plan)
    assert got is not None and got.segments == (Segment("L", 0, 4), Segment("L", 300, 364))
    assert got.new_token_ids == (7, 8) and plan.segments == tuple(segs)
    layered = WindowPlan.build([7], layer_segments=[segs, [Segment("L", 0, 4), Segment("L", 50, 70),
                                                          Segment("L", 280, 364)]])
    layered.extra["recent"] = (4, 300)
    got = recent_window(layered)
    assert got is not None and got.layer_segments == ((Segment("L", 0, 4), Segment("L", 300, 364)),) * 2
    small = WindowPlan.build([7], [Segment("L", 0, 40)])
    small.extra["recent"] = (4, 4)
    assert recent_window(small) is None


def test_the_lookahead_weighs_only_the_starts_the_memory_supports() -> None:
    """question_lookahead_support: a start whose mean log-probability in the window exceeds its mean in the
    window without memory by no more than the setting is not weighed (the local tail's continuation, the
    question said again); the greedy start unsupported, every other first token is followed (no bound);
    none supported: all are weighed, as without the setting."""
    from types import SimpleNamespace

    from emserve.retrieval.plan import Segment, WindowPlan
    from emserve.server.engine.base import StepResult
    from emserve.server.session.answer import lookahead_start

    recent_lp = {10: -0.2, 20: -4.0, 30: -0.3, 40: -6.0}  # the recent text predicts 10 and 30 as the memory does
    calls: list[tuple[int, tuple[int, ...]]] = []

    async def step(plan, sampling, options):  # type: ignore[no-untyped-def]
        ids = plan.new_token_ids
        calls.append((len(plan.segments), ids))
        if sampling is None:  # a prompt-only request: the start's surprise after the window without memory
            return StepResult("p", None, np.asarray([0.0, 0.0] + [-recent_lp[ids[2]]] * (len(ids) - 2), np.float32),
                              None, [], [], [], "length")
        if len(ids) == 2:
            firsts = {10: -0.1, 30: -0.3, 20: -2.5, 40: -5.0}
            return StepResult("g", None, np.zeros(0, np.float32), None, [10, 11, 12, 13], [-0.1] * 4,
                              [firsts, {}, {}, {}], "length")
        t = ids[-1]
        return StepResult(str(t), None, np.zeros(0, np.float32), None, [t + 1, t + 2, t + 3], [-0.2] * 3, [],
                          "length")

    session = SimpleNamespace(config=CFG.with_settings(question_lookahead=4, question_lookahead_support=1.0),
                              engine=SimpleNamespace(step=step))
    plan = WindowPlan.build([1, 2], [Segment("L", 0, 4), Segment("L", 100, 120), Segment("L", 300, 364)])
    plan.extra["recent"] = (4, 300)
    sampling = SamplingSpec(max_tokens=12)
    chosen: dict[str, str] = {}
    got = asyncio.run(lookahead_start(session, plan, sampling, StepOptions(), set(), chosen))  # type: ignore[arg-type]
    assert got is not None and got[0] == [20, 21, 22, 23] and chosen == {"by": "lookahead"}  # mean -0.775 < -0.1
    followed = sorted(ids[-1] for n_seg, ids in calls if n_seg == 3 and len(ids) == 3)
    assert followed == [20, 30, 40]  # no bound: the greedy start is not supported
    assert all(n_seg == 2 for n_seg, ids in calls if len(ids) > 3)  # the support is read without the memory
    recent_lp.update({20: -0.6, 40: -1.0})  # none supported: the plain lookahead (30: -0.225 < -0.1, greedy)
    calls.clear()
    chosen.clear()
    got = asyncio.run(lookahead_start(session, plan, sampling, StepOptions(), set(), chosen))  # type: ignore[arg-type]
    assert got is not None and got[0] == [10, 11, 12, 13] and chosen == {}


class _Recording(Engine):
    """Delegates to an engine (with an admission of its own, the base class's) and records when each kind
    of step starts and streams its first token."""

    def __init__(self, inner: ReferenceEngine) -> None:
        self.inner, self.info, self.log_dtype = inner, inner.info, inner.log_dtype
        self.events: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def close(self) -> None:  # the inner engine is the module's fixture: it stays open
        pass

    async def stream(self, plan: Any, sampling: SamplingSpec | None = None,
                     options: StepOptions = StepOptions()) -> Any:
        gen = sampling is not None and sampling.max_tokens > 0
        # a prompt-only read of an answer's start (its surprise, nothing captured) is the question's too
        kind = "answer" if gen else ("ingest" if plan.capture_log else "read") if options.surprise else "probe"
        self.events.append(("start", kind))
        async for item in self.inner.stream(plan, sampling, options):
            if getattr(item, "token_ids", None):
                self.events.append(("token", kind))
            yield item


def test_a_question_holds_other_sessions_ingestion_back_until_its_first_token(engine: ReferenceEngine,
                                                                               tmp_path: Path) -> None:
    rec = _Recording(engine)
    a = Session.create(tmp_path / "a", rec, CFG)
    b = Session.create(tmp_path / "b", rec, CFG)
    asyncio.run(a.append(_ids(200, 5), flush=True))
    asyncio.run(b.append(_ids(40, 6)))

    async def both() -> None:
        question = asyncio.create_task(a.ask(_ids(5, 7), SamplingSpec(max_tokens=3, ignore_eos=True)))
        await asyncio.sleep(0)  # the question holds its session, and with it the admission
        await asyncio.gather(question, b.append(_ids(96, 8)))

    rec.events.clear()
    asyncio.run(both())
    first_token = rec.events.index(("token", "answer"))
    ingest_starts = [i for i, e in enumerate(rec.events) if e == ("start", "ingest")]
    assert rec.events[0] == ("start", "probe") and len(ingest_starts) == 3, rec.events
    assert min(ingest_starts) > first_token, rec.events  # B's chunks waited for the answer's first token
    a.close()
    b.close()

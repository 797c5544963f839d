"""Window planner: config validation, stream start, layout, positions inside max_window, memory glue."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from emserve.retrieval.config import RetrievalConfig
from emserve.retrieval.errors import ConfigError, PlanError
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import EventIndex, IndexParams
from emserve.retrieval.kvlog import TOKENS_FILE, KVLayout, KVLog
from emserve.retrieval.memory import EpisodicMemory
from emserve.retrieval.planner import WindowPlanner
from emserve.retrieval.retriever import Retriever
from emserve.server.engine.rope import RopeSpec

L, D, LOG = 2, 8, "/sessions/s1"
FIRST = 64  # events tile [FIRST, ...)


# EM-LLM's window: per-layer retrieval, and a question planned like an ingestion step (these tests are
# about the planner's mechanics; the product's question window is set field by field where tested)
EMLLM = dict(per_layer=True, question_n_local=None, question_n_mem=None, question_rank="mean", question_neighbours=0,
             question_reach=0, question_parts=0, question_contiguity=True, question_n_init=None)


def small(**kw) -> RetrievalConfig:
    # 64 positions of slack for the remainder (events here are up to 64 tokens)
    base = dict(n_init=16, n_local=64, n_mem=48, exc_block_size=16, max_window=16 + 48 + 64 + 16 + 1 + 64, **EMLLM)
    base.update(kw)
    return RetrievalConfig(**base)


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    """400 events of 1..64 tokens tiling [FIRST, ~13k), random representatives, exact search."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 65, 400)
    starts = FIRST + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    table = EventTable.create(tmp_path_factory.mktemp("ev"), L, D)
    table.append(np.stack([starts, starts + sizes], 1), rng.standard_normal((400, L, D)).astype(np.float32))
    return EventIndex.open(table.path, table, IndexParams(exact_threshold=10**6))


def planner(index: EventIndex, cfg: RetrievalConfig) -> WindowPlanner:
    return WindowPlanner(Retriever(index, cfg), LOG)


def test_config_defaults_and_validation():
    cfg = RetrievalConfig()
    assert (cfg.n_init, cfg.n_local, cfg.n_mem) == (128, 1024, 1024)  # the product's (EM-LLM: 4096, 2048)
    assert (cfg.exc_block_size, cfg.repr_topk) == (512, 4)
    assert cfg.contiguity_buffer_size == 0.3 and cfg.use_contiguity_buffer and not cfg.per_layer
    assert cfg.repr_proxy == "tokens" and cfg.token_level and cfg.table_dtype == "auto"
    assert cfg.table_storage == "int8"  # "auto": int8 for the token-level selection, float32 for per-layer scores
    for per_layer_scores in (dict(repr_proxy="topk"), dict(per_layer=True), dict(repr_topk=1)):
        assert dataclasses.replace(cfg, **per_layer_scores).table_storage == "float32"
    assert dataclasses.replace(cfg, table_dtype="float32").table_storage == "float32"
    assert cfg.index_params().m == 16 and cfg.index_params().ef == 64
    with pytest.raises(ConfigError):
        RetrievalConfig(max_window=2048)  # 128 + 1024 + 1024 + 512 + 1 > 2048
    for bad in (dict(n_local=0), dict(repr_topk=0), dict(repr_proxy="max"), dict(contiguity_buffer_size=-1),
                dict(hnsw_m=1), dict(hnsw_ef=0), dict(exc_block_size=0), dict(table_dtype="float16")):
        with pytest.raises(ConfigError):
            dataclasses.replace(cfg, **bad)
    dataclasses.replace(cfg, repr_proxy="tokens", table_dtype="int8")  # the token-level selection: in blocks
    for per_layer_scores in (dict(repr_proxy="topk"), dict(per_layer=True), dict(repr_topk=1)):
        with pytest.raises(ConfigError, match="token-level"):
            dataclasses.replace(cfg, **{"repr_proxy": "tokens", "table_dtype": "int8", **per_layer_scores})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_mem = 1  # type: ignore[misc]


def test_stream_start(events):
    p = planner(events, small())
    plan = p.plan_step(0, [5, 6, 7], None)
    assert plan.segments == () and plan.anchor is None and plan.capture_log == LOG and plan.window_len == 3
    probe = p.probe_plan(0, [5, 6, 7])
    assert probe.capture_log is None and probe.segments == () and probe.anchor is None
    plan = p.plan_step(1, [9], None)
    assert plan.segments == () and plan.anchor is not None and plan.anchor.index == 0
    # offset <= n_init + n_local: the whole history is sink + local, no memory yet
    for offset in (2, 50, 16 + 64):
        plan = p.plan_step(offset, [1, 2], None)
        assert [(s.start, s.end) for s in plan.segments] == [(0, offset - 1)]
        assert plan.anchor is not None and plan.anchor.index == offset - 1 and p.last_retrieval is None
        assert p.probe_plan(offset, [1, 2]).segments == plan.segments


def test_steady_state_layout(events):
    cfg = small(use_contiguity_buffer=False)
    p = planner(events, cfg)
    table = events.table
    offset = 3000
    local_start = offset - cfg.n_local
    m = table.count_ending_by(local_start)
    rem_start = int(table.ends[m - 1])
    q = np.random.default_rng(1).standard_normal((L, D)).astype(np.float32)
    plan = p.plan_step(offset, list(range(10)), q, request_id="r")
    res = p.last_retrieval
    assert res is not None and res.num_events == m and res.tokens == cfg.n_mem
    assert plan.layer_segments is not None and plan.request_id == "r"
    for layer, segs in enumerate(plan.layer_segments):
        assert (segs[0].start, segs[0].end) == (0, 16) or segs[0].start == 0  # sink (maybe merged)
        assert segs[-1].end == offset - 1 and segs[-1].start <= rem_start  # remainder + local, merged
        covered = sum(len(s) for s in segs)
        assert covered == 16 + cfg.n_mem + (offset - 1 - rem_start)
        retrieved = set()
        for e in res.layers[layer].events:
            retrieved.update(range(e.start, e.end))
        in_segs = set().union(*[set(range(s.start, s.end)) for s in segs])
        assert retrieved <= in_segs
    assert plan.window_len == 16 + cfg.n_mem + (offset - 1 - rem_start) + 1 + 10
    probe = p.probe_plan(offset, list(range(10)))
    assert [(s.start, s.end) for s in probe.segments] == [(0, 16), (local_start, offset - 1)]
    assert probe.anchor == plan.anchor and probe.capture_log is None


def test_shared_selection_uses_one_segment_list(events):
    p = planner(events, small(per_layer=False))
    q = np.random.default_rng(2).standard_normal((L, D)).astype(np.float32)
    plan = p.plan_step(3000, [1], q)
    assert plan.layer_segments is None and plan.num_injected > 16 + 48


def test_long_remainder_shrinks_the_budget_and_then_refuses(events):
    cfg = small()
    p = planner(events, cfg)
    end = events.table.end_offset
    q = np.zeros((L, D), np.float32)
    # last event ends at `end`; the remainder is [end, offset - n_local): 64 + 10 tokens here, 10 more
    # than the slack of the configuration
    plan = p.plan_step(end + cfg.n_local + 74, [1] * 16, q)
    assert p.last_retrieval is not None and p.last_retrieval.budget == cfg.n_mem - 10
    assert plan.window_len + 1 == cfg.max_window
    with pytest.raises(PlanError):
        p.plan_step(end + cfg.n_local + 64 + cfg.n_mem + 1, [1] * 16, q)
    with pytest.raises(PlanError):
        p.plan_step(10, [1] * 16, q, reserve=cfg.max_window)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_init=st.integers(0, FIRST),
    n_local=st.integers(1, 600),
    n_mem=st.integers(0, 600),
    exc=st.integers(1, 128),
    slack=st.integers(0, 200),
    offset=st.integers(0, 16000),
    extra_new=st.integers(-127, 40),
    reserve=st.integers(0, 64),
    per_layer=st.booleans(),
    contiguity=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_plan_positions_always_inside_max_window(
    events, n_init, n_local, n_mem, exc, slack, offset, extra_new, reserve, per_layer, contiguity, seed
):
    max_window = n_init + n_mem + n_local + exc + 1 + slack
    cfg = RetrievalConfig(n_init=n_init, n_local=n_local, n_mem=n_mem, exc_block_size=exc,
                          max_window=max_window, per_layer=per_layer, use_contiguity_buffer=contiguity)
    p = planner(events, cfg)
    c = max(1, exc + extra_new)
    q = np.random.default_rng(seed).standard_normal((L, D)).astype(np.float32)
    table = events.table
    local_start = max(0, offset - n_local)
    if offset == 0:
        fixed = 0
    elif local_start <= n_init:
        fixed = offset
    else:
        m = table.count_ending_by(local_start)
        rem_start = max(n_init, int(table.ends[m - 1])) if m else n_init
        fixed = n_init + (offset - rem_start)
    if fixed + c + reserve + 1 > max_window:
        event("refused: does not fit")
        with pytest.raises(PlanError):
            p.plan_step(offset, [1] * c, q, reserve=reserve)
        return
    plan = p.plan_step(offset, [1] * c, q, reserve=reserve)
    assert plan.window_len + reserve + 1 <= max_window
    res = p.last_retrieval
    mem = 0 if res is None else res.tokens
    event("no memory" if res is None else ("budget filled" if mem == n_mem else "budget partly filled"))
    assert plan.window_len == fixed + mem + c
    if res is not None:
        memory = int(table.sizes[: res.num_events].sum())
        assert mem == min(memory, n_mem, max_window - 1 - reserve - fixed - c)
    for segs in plan.layer_segments or (plan.segments,):
        assert sum(len(s) for s in segs) == plan.num_injected
        bounds = [(s.start, s.end) for s in segs]
        assert all(a[1] < b[0] for a, b in zip(bounds, bounds[1:], strict=False))  # increasing, merged
        assert not bounds or (bounds[0][0] >= 0 and bounds[-1][1] <= max(offset - 1, 0))
        assert not bounds or n_init == 0 or bounds[0][0] == 0  # the sink comes first
    if offset:
        assert plan.anchor is not None and plan.anchor.index == offset - 1
    probe = p.probe_plan(offset, [1] * c)
    assert probe.window_len + 1 <= max_window and probe.capture_log is None


def _rope() -> RopeSpec:
    inv = 1.0 / (10000.0 ** (torch.arange(0, 4, 2, dtype=torch.float64) / 4))
    return RopeSpec(inv_freq=inv, rot_dim=4, head_dim=4)


def test_episodic_memory_end_to_end_and_reopen(tmp_path):
    layout = KVLayout(2, 1, 4, "float32")
    log = KVLog.create(tmp_path, layout)
    g = torch.Generator().manual_seed(0)
    n = 1200
    keys = [torch.randn(n, 1, 4, generator=g) for _ in range(2)]
    log.append(np.arange(n) % 50, np.arange(n), keys, keys)
    cfg = small(index_save_min_events=10**6, exact_search_threshold=0)  # HNSW from the first event
    mem = EpisodicMemory(log, cfg, num_heads=2, rotate=_rope().rotate)
    bounds = [(s, min(s + 37, 1100)) for s in range(16, 1100, 37)]
    assert mem.close_events(bounds[:10]) == list(range(10))
    assert mem.close_events(bounds[10:]) == list(range(10, len(bounds)))
    assert mem.table.vectors == cfg.repr_topk  # "topk": separate kv-layout keys (1 kv head x 4)
    assert mem.table.reps(0).shape == (len(bounds), cfg.repr_topk * 4)
    q = torch.randn(2, 2, 4, generator=g).numpy()
    plan = mem.planner.plan_step(n, [1, 2, 3], q)
    assert plan.layer_segments is not None and plan.window_len + 1 <= cfg.max_window
    mem.close()  # saves the indexes

    mem2 = EpisodicMemory(KVLog.open(tmp_path, writable=True), cfg, num_heads=2, rotate=_rope().rotate)
    assert len(mem2.table) == len(bounds) and mem2.index.rebuilt_layers == []
    assert mem2.planner.plan_step(n, [1, 2, 3], q).layer_segments == plan.layer_segments
    assert mem2.disk_bytes() > 0
    mem2.close()

    # the log lost its tail in a crash: events beyond it are dropped, indexes rebuilt from the table
    with open(tmp_path / TOKENS_FILE, "r+b") as f:
        f.truncate(500 * 4)
    mem3 = EpisodicMemory(KVLog.open(tmp_path, writable=True), cfg, num_heads=2, rotate=_rope().rotate)
    assert mem3.table.end_offset <= 500 and len(mem3.table) == mem3.table.count_ending_by(500)
    assert mem3.index.count == len(mem3.table) and mem3.index.rebuilt_layers == [0, 1]


def test_question_window_keeps_the_last_question_n_local_tokens_and_its_own_budget(events):
    cfg = small(per_layer=False, question_n_local=8, question_n_mem=20)
    p = planner(events, cfg)
    q = np.random.default_rng(3).standard_normal((L, D)).astype(np.float32)
    offset = 3000
    ingest = p.layout(offset, 5)
    lay = p.layout(offset, 5, question=True)
    # every event that ends before the question's local window is retrievable: more than a step's
    mq = p.table.count_ending_by(offset - 8)
    assert lay.num_events == mq > ingest.num_events > 0
    assert lay.sink == (0, 16) and lay.local == (offset - 8, offset - 1)
    assert lay.remainder == (int(p.table.ends[mq - 1]), offset - 8)
    assert lay.budget == 20 and ingest.budget == cfg.n_mem
    plan = p.plan_step(offset, [1] * 5, q, question=True)
    res = p.last_retrieval
    assert res is not None and res.budget == 20 and res.layers[0].tokens == 20
    segs = [(s.start, s.end) for s in plan.segments]
    assert segs[0] == (0, 16) and segs[-1][1] == offset - 1 and segs[-1][1] - segs[-1][0] >= 7
    assert plan.window_len == 16 + 20 + (lay.remainder[1] - lay.remainder[0]) + 7 + 1 + 5
    assert plan.extra["recent"] == (16, lay.remainder[0])  # what is not memory: the sink, remainder and local
    # no retrievable events yet: a question sees everything, as a step would
    early = p.layout(40, 5, question=True)
    assert early == p.layout(40, 5)
    # None: the ingestion window (EM-LLM)
    assert planner(events, small(per_layer=False)).layout(offset, 5, question=True) == ingest
    assert planner(events, small(question_n_mem=10**6)).layout(offset, 5, question=True).budget == cfg.n_mem
    with pytest.raises(ConfigError):
        small(question_n_local=0)
    with pytest.raises(ConfigError):
        small(question_n_mem=-1)


def test_question_memory_last_puts_retrieved_events_right_before_the_question(events):
    """Same retrieval, other order: [sink | remainder + local | retrieved | last token] + question, the
    same anchor (a copied first word's surprise needs it) and window length; ingestion steps keep their
    order."""
    q = np.random.default_rng(3).standard_normal((L, D)).astype(np.float32)
    offset = 3000
    base = small(per_layer=False, question_n_local=8, question_n_mem=20, use_contiguity_buffer=False)
    a = planner(events, base).plan_step(offset, [1] * 5, q, question=True)
    p = planner(events, dataclasses.replace(base, question_memory_last=True))
    b = p.plan_step(offset, [1] * 5, q, question=True)
    retrieved = [(e.start, e.end) for e in p.last_retrieval.layers[0].events]
    assert b.anchor == a.anchor and b.anchor is not None and b.anchor.index == offset - 1
    assert b.window_len == a.window_len
    segs = [(s.start, s.end) for s in b.segments]
    assert segs[0] == (0, 16)
    lay = p.layout(offset, 5, question=True)
    assert segs[1] == (lay.remainder[0], offset - 1)  # remainder and local window, merged
    tail = segs[2:]
    flat = [t for s, e in tail for t in range(s, e)]
    assert flat == [t for s, e in retrieved for t in range(s, e)] and len(flat) == 20
    ingest = p.plan_step(offset, [1] * 5, q[None].mean(0))
    assert ingest.anchor is not None and ingest.segments[-1].end == offset - 1


def test_the_planner_and_its_retriever_share_one_config(events: EventIndex) -> None:
    """A variant set on the planner (a kept session asked with other settings) is what its retriever
    retrieves with; the selection's shape (per_layer) cannot change under a retriever."""
    p = planner(events, small())
    variant = dataclasses.replace(p.config, use_contiguity_buffer=False, shared_score_layers=1.0)
    p.config = variant
    assert p.retriever.config is variant and p.retriever.score_layers == tuple(range(L))
    with pytest.raises(PlanError, match="per_layer"):
        p.config = dataclasses.replace(variant, per_layer=not variant.per_layer)

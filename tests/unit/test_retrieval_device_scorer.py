"""Device scoring (``retrieval.device_scorer``): the same selections as the CPU exact path.

On CPU (CI) the scorer runs on torch's CPU device in float32 and must select exactly what the numpy
exact path selects, for both rankings and across contiguity-buffer state; where a GPU is present the
same tests run there too (float32, then float16 against a recall bar).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from retrieval_configs import raw

from emserve.retrieval.device_scorer import DeviceScorer, resolve_device
from emserve.retrieval.errors import DeviceMemoryError, PlanError
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import EventIndex, IndexParams
from emserve.retrieval.memory import NO_GRAPH
from emserve.retrieval.queries import EncodedQuery
from emserve.retrieval.retriever import Retriever

L, V, D, N = 4, 3, 16, 600
SCORE = (0, 1, 2)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_table(path, n=N, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 30, n)
    starts = 128 + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    table = EventTable.create(path, L, V * D, vectors=V)
    table.append(np.stack([starts, starts + sizes], 1), rng.standard_normal((n, L, V * D)).astype(np.float32))
    return table


def pair(table, device, dtype=torch.float32, form="rq", proxy="topk", stats="scored"):
    """A CPU-exact retriever and a device retriever over the same table, centred + standardized."""
    index = EventIndex.open(table.path, table, IndexParams(exact_threshold=NO_GRAPH), layers=())
    cfg = raw(per_layer=False, shared_score_layers=len(SCORE) / L, standardize_queries=True, query_sample=64,
              repr_proxy=proxy, interleave_stats=stats)
    cpu = Retriever(index, cfg)
    dev = Retriever(index, cfg, scorer=DeviceScorer(table, SCORE, device=device, dtype=dtype, form=form,
                                                     token_level=cfg.token_level))
    return cpu, dev


def queries(rng, tokens):
    return rng.standard_normal((tokens, L, 1, V * D // V)).astype(np.float32) if tokens > 1 else \
        rng.standard_normal((L, D)).astype(np.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["rq", "qr"])
@pytest.mark.parametrize("rank,tokens,stats", [("mean", 1, "scored"), ("mean", 5, "scored"),
                                               ("interleave", 8, "scored"), ("interleave", 8, "sample")])
@pytest.mark.parametrize("proxy", ["topk", "tokens"])
def test_device_selects_what_exact_selects(tmp_path, device, form, rank, tokens, stats, proxy):
    table = make_table(tmp_path)
    cpu, dev = pair(table, device, form=form, proxy=proxy, stats=stats)
    assert dev.token_level == (proxy == "tokens")
    rng = np.random.default_rng(1)
    for _ in range(6):  # consecutive steps: the contiguity buffers evolve the same way
        q = queries(rng, tokens)
        a = cpu.retrieve(q, 400, rank=rank)
        b = dev.retrieve(q, 400, rank=rank)
        assert b.exact and b.tokens == 400
        assert a.layers[0].ids == b.layers[0].ids
        assert [e.source for e in a.layers[0].events] == [e.source for e in b.layers[0].events]
        np.testing.assert_allclose([e.score for e in a.layers[0].events],
                                   [e.score for e in b.layers[0].events], rtol=1e-4, atol=1e-4)
    assert cpu.buffers[0].ids == dev.buffers[0].ids


@pytest.mark.parametrize("device", DEVICES)
def test_token_scores_and_num_events_prefix(tmp_path, device):
    table = make_table(tmp_path)
    cpu, dev = pair(table, device)
    q = cpu.encode(queries(np.random.default_rng(2), 6))
    np.testing.assert_allclose(dev.token_scores(q, None), cpu.token_scores(q, None), rtol=1e-4, atol=1e-4)
    # only events before num_events are retrievable (a question's window holds the recent ones)
    qs = queries(np.random.default_rng(3), 1)
    a = cpu.retrieve(qs, 300, num_events=250)
    b = dev.retrieve(qs, 300, num_events=250)
    assert a.layers[0].ids == b.layers[0].ids and max(b.layers[0].ids) < 250


def test_sync_follows_appends_and_grows(tmp_path):
    table = make_table(tmp_path, n=10)
    scorer = DeviceScorer(table, SCORE, device="cpu", dtype=torch.float32)
    assert scorer.sync() == 10 and scorer.sync() == 0
    rng = np.random.default_rng(4)
    end = int(table.ends[-1])
    for _ in range(3):  # past the initial capacity (1024 rows): the mirror doubles and keeps old rows
        sizes = rng.integers(1, 5, 700)
        starts = end + np.concatenate([[0], np.cumsum(sizes)[:-1]])
        end = int(starts[-1] + sizes[-1])
        table.append(np.stack([starts, starts + sizes], 1), rng.standard_normal((700, L, V * D)).astype(np.float32))
    assert scorer.sync() == 2100 and scorer.count == len(table) == 2110
    got = scorer._reps[:, :scorer.count].cpu().numpy().reshape(len(SCORE), -1, V * D)
    for i, lay in enumerate(SCORE):
        np.testing.assert_array_equal(got[i], table.reps(lay))


def test_out_of_device_memory_is_a_clear_error_and_keeps_the_mirror(tmp_path, monkeypatch):
    """torch's out-of-memory (a mirror that cannot grow, a scoring product that cannot allocate) becomes
    DeviceMemoryError (the server answers RESOURCE_EXHAUSTED); the mirror stays as it was and works on."""
    table = make_table(tmp_path, n=10)
    scorer = DeviceScorer(table, SCORE, device="cpu", dtype=torch.float32)
    scorer.sync()
    before = scorer.nbytes
    real_empty, real_bmm = torch.empty, torch.bmm

    def empty(*shape, **kw):
        if len(shape) == 1 and isinstance(shape[0], tuple) and len(shape[0]) == 4 and shape[0][1] > 1024:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_empty(*shape, **kw)

    rng = np.random.default_rng(5)
    reps = rng.standard_normal((1100, len(SCORE), V * D)).astype(np.float32)
    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(DeviceMemoryError, match=r"out of memory on cpu in retrieval \(append; this session mirrors "
                                                r"10 events"):
        scorer.append(10, reps)
    assert scorer.count == 10 and scorer.nbytes == before
    monkeypatch.setattr(torch, "empty", real_empty)
    scorer.append(10, reps)  # memory freed elsewhere: the same append goes through
    assert scorer.count == 1110
    np.testing.assert_array_equal(scorer._reps[:, 10:1110].cpu().numpy().reshape(len(SCORE), 1100, V * D),
                                  reps.transpose(1, 0, 2))

    def bmm(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    q = EncodedQuery(rng.standard_normal((4, L, D)).astype(np.float32), np.ones((4, L), np.float32))
    monkeypatch.setattr(torch, "bmm", bmm)
    with pytest.raises(DeviceMemoryError, match="token_scores"):
        scorer.ranked_mean(q, 10, np.ones(1110, np.int64), 5)
    monkeypatch.setattr(torch, "bmm", real_bmm)
    assert len(scorer.ranked_mean(q, 10, np.ones(1110, np.int64), 5)) >= 5


def test_float16_keeps_the_selection(tmp_path):
    """float16 storage (the GPU default) against the float32 exact selection: most events agree."""
    table = make_table(tmp_path)
    cpu, dev = pair(table, "cuda" if torch.cuda.is_available() else "cpu", dtype=torch.float16)
    rng = np.random.default_rng(5)
    for r in (cpu, dev):
        r.config = dataclasses.replace(r.config, use_contiguity_buffer=False)
    agree = []
    for _ in range(10):
        q = queries(rng, 1)
        a = set(cpu.retrieve(q, 400).layers[0].ids)
        b = set(dev.retrieve(q, 400).layers[0].ids)
        agree.append(len(a & b) / len(a))
    assert np.mean(agree) >= 0.95


def test_config_errors(tmp_path):
    table = make_table(tmp_path, n=5)
    index = EventIndex.open(table.path, table, IndexParams(), layers=())
    scorer = DeviceScorer(table, SCORE, device="cpu")
    with pytest.raises(PlanError, match="shared selection"):
        Retriever(index, raw(per_layer=True, shared_score_layers=len(SCORE) / L), scorer=scorer)
    with pytest.raises(PlanError, match="shared selection"):
        Retriever(index, raw(per_layer=False, shared_score_layers=2 / L), scorer=scorer)
    with pytest.raises(PlanError):
        DeviceScorer(table, (7,), device="cpu")
    assert resolve_device("cpu") is None and resolve_device(None) is None
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else None)
    if not torch.cuda.is_available():
        with pytest.raises(PlanError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(PlanError, match="unknown retrieval device"):
        resolve_device("tpu:x")


# ---------------------------------------------------------------------- tables without representatives

def test_table_without_reps_counts_recovers_and_fills(tmp_path):
    """``append(bounds, None)`` keeps records only; ``reps.count`` marks the stored prefix, survives a
    reopen (and a torn tail), and ``write_reps`` fills the rest and removes it."""
    from emserve.retrieval.errors import EventTableError
    from emserve.retrieval.events import REPS_COUNT_FILE

    rng = np.random.default_rng(6)
    table = EventTable.create(tmp_path, L, V * D, vectors=V)
    reps = rng.standard_normal((30, L, V * D)).astype(np.float32)
    bounds = np.stack([np.arange(30) * 10 + 5, np.arange(30) * 10 + 12], 1)
    table.append(bounds[:10], reps[:10])
    assert table.reps_count == 10 and not (tmp_path / REPS_COUNT_FILE).exists()  # the old invariant: no file
    table.append(bounds[10:20], None)
    table.append(bounds[20:25], None)
    assert len(table) == 25 and table.reps_count == 10
    np.testing.assert_array_equal(table.stored_reps(1), reps[:10, 1])
    with pytest.raises(EventTableError, match="no representatives on disk"):
        table.reps(0)
    with pytest.raises(EventTableError, match="write_reps"):
        table.append(bounds[25:26], reps[25:26])  # a gap of rows
    reader = EventTable.open(tmp_path)
    assert len(reader) == 25 and reader.reps_count == 10
    table.close()

    # torn tail record: recovery keeps 24 events and the stored prefix
    with open(tmp_path / "events.i64", "ab") as f:
        f.write(b"\x01\x02\x03")
    table = EventTable.open(tmp_path, writable=True)
    assert len(table) == 25 and table.reps_count == 10
    table.truncate(8)  # below the stored prefix: reps.count follows
    assert table.reps_count == 8
    table.append(bounds[8:25], None)
    with pytest.raises(EventTableError, match="need rows from 8"):
        table.write_reps(9, reps[9:12])
    table.write_reps(8, reps[8:20])
    assert table.reps_count == 20 and (tmp_path / REPS_COUNT_FILE).exists()
    table.write_reps(20, reps[20:25])
    assert table.reps_count == 25 and not (tmp_path / REPS_COUNT_FILE).exists()
    np.testing.assert_array_equal(table.reps(2), reps[:25, 2])
    table.append(bounds[25:], reps[25:])  # back to rows with every record
    np.testing.assert_array_equal(EventTable.open(tmp_path).reps(3), reps[:, 3])
    table.close()


def test_a_count_written_before_a_crash_does_not_hide_later_rows(tmp_path):
    """A GPU writer wrote reps.count and crashed before its first record; a CPU writer then appends rows:
    every row stays readable (the count goes once all rows are on disk)."""
    from emserve.retrieval.events import REPS_COUNT_FILE

    rng = np.random.default_rng(8)
    reps = rng.standard_normal((6, L, V * D)).astype(np.float32)
    bounds = np.stack([np.arange(6) * 10, np.arange(6) * 10 + 5], 1)
    table = EventTable.create(tmp_path, L, V * D, vectors=V)
    table.append(bounds[:3], reps[:3])
    table._write_reps_count(3)  # what append(bounds, None) writes before its record; then the crash
    table.close()
    table = EventTable.open(tmp_path, writable=True)  # recovery: every record has its rows, the file goes
    assert table.reps_count == 3 and not (tmp_path / REPS_COUNT_FILE).exists()
    table._write_reps_count(3)  # the same, within one writer: the next append with rows clears it
    table.append(bounds[3:], reps[3:])
    assert table.reps_count == 6 and not (tmp_path / REPS_COUNT_FILE).exists()
    np.testing.assert_array_equal(table.reps(1), reps[:, 1])


def _memory_pair(tmp_path, device, **settings):
    """A KV log of random keys and the same memory config (with ``settings``); ``device`` None: the CPU
    writer."""
    from emserve.retrieval.config import RetrievalConfig
    from emserve.retrieval.kvlog import KVLayout, KVLog
    from emserve.retrieval.memory import EpisodicMemory
    from emserve.server.engine.rope import RopeSpec

    rope = RopeSpec(inv_freq=1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)), rot_dim=8, head_dim=8)
    path = tmp_path / "log"
    if not path.exists():
        log = KVLog.create(path, KVLayout(3, 2, 8, "float32"))
        g = torch.Generator().manual_seed(0)
        keys = [torch.randn(3000, 2, 8, generator=g) for _ in range(3)]
        log.append(np.arange(3000) % 50, np.arange(3000), keys, keys)
    else:
        log = KVLog.open(path, writable=True)
    cfg = RetrievalConfig(n_init=16, n_local=64, n_mem=96, exc_block_size=16, per_layer=False,
                          shared_score_layers=2 / 3, max_window=16 + 96 + 64 + 16 + 1 + 64, **settings)
    return lambda: EpisodicMemory(log, cfg, num_heads=4, rotate=rope.rotate, path=tmp_path / "mem", score_device=device)


@pytest.mark.parametrize("table_dtype", ["float32", "int8"])
@pytest.mark.parametrize("device", ["torch-cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_memory_on_a_device_stores_no_reps_and_switches_writers(tmp_path, device, table_dtype):
    """A device writer stores records only (disk: 16 B per event), recomputes its mirror from the log on
    reopen; a CPU writer reopening the session stores the missing rows (the same a CPU writer writes);
    each selects what the other would. With an int8 table the mirror holds the rounded values the table
    gives back, so the writers still agree."""
    bounds = [(s, s + 23) for s in range(16, 2900, 23)]
    q = np.random.default_rng(7).standard_normal((3, 4, 8)).astype(np.float32)
    settings = dict(repr_proxy="tokens", table_dtype=table_dtype)
    ref = _memory_pair(tmp_path / "cpu", None, **settings)()  # reference: the CPU writer all along
    ref.close_events(bounds)

    open_dev = _memory_pair(tmp_path / "dev", device, **settings)
    mem = open_dev()
    assert mem.scorer is not None and mem.index.layers == ()
    mem.close_events(bounds[:50])
    mem.close_events(bounds[50:80])
    assert mem.table.reps_count == 0 and mem.scorer.count == 80
    assert sum(f.stat().st_blocks for f in (tmp_path / "dev" / "mem").glob("reps_*")) == 0  # no rows
    assert not list((tmp_path / "dev" / "mem").glob("index_*.hnsw"))  # no graphs
    sel = lambda m: m.retriever.retrieve(q, 96, num_events=80).layers[0].ids  # noqa: E731
    expected = ref.retriever.retrieve(q, 96, num_events=80).layers[0].ids
    ref.retriever.reset_buffers()
    assert sel(mem) == expected
    mirror = mem.scorer._reps[:, :80].clone()
    scorer = mem.scorer
    mem.close()
    assert scorer.count == 0 and scorer.nbytes == 0  # the device memory goes with the session

    mem = open_dev()  # reopened on the device: the mirror is recomputed from the log, identically
    assert mem.scorer.count == 80
    torch.testing.assert_close(mem.scorer._reps[:, :80], mirror)
    mem.close_events(bounds[80:100])
    mem.close()

    cpu = _memory_pair(tmp_path / "dev", None, **settings)()  # fills rows 0 .. 99 from the log
    assert cpu.table.reps_count == 100 == len(cpu.table) and cpu.table.dtype == table_dtype
    assert cpu.table.layers == ref.table.layers == (0, 1)  # the scoring layers only (2/3 of 3)
    for lay in cpu.table.layers:
        np.testing.assert_allclose(cpu.table.reps(lay), ref.table.reps(lay)[:100], rtol=1e-6, atol=1e-6)
    cpu.close_events(bounds[100:])
    assert cpu.table.reps_count == len(bounds)
    cpu.close()

    mem = open_dev()  # back on the device: rows come from disk, none recomputed
    assert mem.scorer.count == len(bounds) and mem.table.reps_count == len(bounds)
    ref.retriever.reset_buffers()
    assert mem.retriever.retrieve(q, 96).layers[0].ids == ref.retriever.retrieve(q, 96).layers[0].ids


def test_memory_stores_the_scoring_layers_only_and_selects_as_with_every_layer(tmp_path):
    """A shared selection reads only its scoring layers: a session's table stores just those (2 of 3
    here) and selects what a table of every layer (an older session's: ``topk``, whose keys are chosen
    per layer) selects, at 2/3 of the rows."""
    bounds = [(s, s + 23) for s in range(16, 2900, 23)]
    q = np.random.default_rng(3).standard_normal((4, 3, 4, 8)).astype(np.float32)  # 4 query tokens
    new = _memory_pair(tmp_path / "new", None, repr_proxy="topk")()
    EventTable.create(tmp_path / "old" / "mem", 3, 4 * 2 * 8, vectors=4).close()  # format 1: every layer
    old = _memory_pair(tmp_path / "old", None, repr_proxy="topk")()
    assert new.table.layers == (0, 1) and old.table.layers == (0, 1, 2)
    for mem in (new, old):
        mem.close_events(bounds)
    for rank in ("mean", "interleave"):
        a = new.retriever.retrieve(q, 96, rank=rank).layers[0]
        b = old.retriever.retrieve(q, 96, rank=rank).layers[0]
        assert a.ids == b.ids and [e.score for e in a.events] == [e.score for e in b.events]
    assert new.table.disk_bytes() < 0.7 * old.table.disk_bytes()

"""The token graph (``retrieval.token_graph``): one HNSW graph over token vectors (real hnswlib) as the
candidate stage of the token-level MaxSim, its lazy start, persistence, and its use by the retriever and
a session's memory."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from retrieval_configs import raw

from emserve.retrieval.errors import ConfigError, PlanError
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import EventIndex, IndexParams
from emserve.retrieval.retriever import Retriever
from emserve.retrieval.token_graph import GRAPH_FILE, PROJECTION_FILE, TokenGraph, fit_projection

L, V, D, N, RANK = 3, 4, 16, 1500, 12
LAYERS = (0, 1, 2)
PARAMS = IndexParams(exact_threshold=100, build_threshold=64, ef=64)


def make_table(path, n=N, seed=0):
    """Events whose token vectors (concatenated over the 3 layers: 48 values) lie in a 12-dim subspace,
    plus a little noise: a projection on 12 directions keeps nearly all of their inner products."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((RANK, L * D)).astype(np.float32)
    tok = rng.standard_normal((n, V, RANK)).astype(np.float32) @ basis
    tok += 0.01 * rng.standard_normal(tok.shape).astype(np.float32)
    reps = tok.reshape(n, V, L, D).transpose(0, 2, 1, 3).reshape(n, L, V * D)  # [n, L, V*D]: vector j per layer
    sizes = rng.integers(1, 30, n)
    starts = 128 + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    table = EventTable.create(path, L, V * D, vectors=V)
    table.append(np.stack([starts, starts + sizes], 1), reps)
    return table, basis


def exact_token_scores(table, queries):
    """``max_j x_i . y_e,j`` by brute force: ``[t, n]``."""
    tok = np.stack([table.reps(lay).reshape(-1, V, D) for lay in LAYERS], axis=2).reshape(len(table), V, -1)
    return np.einsum("evk,tk->tev", tok, queries).max(axis=2)


def test_fit_projection_spans_a_low_rank_sample():
    rng = np.random.default_rng(1)
    basis = rng.standard_normal((6, 40))
    sample = (rng.standard_normal((500, 6)) @ basis).astype(np.float32)
    p = fit_projection(sample, 6)
    np.testing.assert_allclose(p @ p.T, np.eye(6), atol=1e-4)  # orthonormal rows
    x, q = sample[:50], (rng.standard_normal((3, 6)) @ basis).astype(np.float32)
    np.testing.assert_allclose((q @ p.T) @ (x @ p.T).T, q @ x.T, rtol=1e-3, atol=1e-2)  # inner products kept
    np.testing.assert_array_equal(fit_projection(sample, 6), p)  # a fixed seed: the same projection
    np.testing.assert_array_equal(fit_projection(sample, 40), np.eye(40, dtype=np.float32))


def test_graph_starts_lazily_and_finds_the_exact_best_events(tmp_path):
    table, basis = make_table(tmp_path)
    small = TokenGraph(tmp_path, table, LAYERS, dataclasses.replace(PARAMS, build_threshold=N + 1), dim=RANK)
    assert small.count == 0 and not (tmp_path / PROJECTION_FILE).exists()  # below build_at: nothing
    assert small.lags(N) and small.search(np.zeros((1, L * D)), 8).shape == (1, 0)

    graph = TokenGraph(tmp_path, table, LAYERS, PARAMS, dim=RANK)
    assert graph.count == N and not graph.lags(N) and graph.dim == RANK and graph.token_dim == L * D
    rng = np.random.default_rng(2)
    queries = (rng.standard_normal((20, RANK)) @ basis).astype(np.float32)
    exact = exact_token_scores(table, queries)
    found = graph.search(queries, 40)  # 40 vectors: at least 10 distinct events per query
    hits = [len(set(np.argsort(-exact[i])[:5].tolist()) & set(found[i].tolist())) for i in range(20)]
    assert sum(hits) >= 0.95 * 100, hits  # each query's exact top 5 events among its nearest vectors
    assert found[0].tolist() != found[1].tolist()

    lone = np.zeros((1, L * D), np.float32)
    assert graph.search(lone, 4).shape == (1, 4)  # a zero query: any 4, no error

    graph.set_ef(1)  # the narrowest search (ef = k): finds fewer of the exact best than ef 64 did
    narrow = graph.search(queries, 4)
    graph.set_ef(400)
    wide = graph.search(queries, 4)
    best = [set(np.argsort(-exact[i])[:1].tolist()) for i in range(20)]
    assert graph.params.ef == 400 and sum(b <= set(w.tolist()) for b, w in zip(best, wide, strict=True)) == 20
    assert sum(b <= set(x.tolist()) for b, x in zip(best, narrow, strict=True)) < 18
    with pytest.raises(ConfigError):
        graph.set_ef(0)


def test_graph_persists_and_is_rebuilt_when_it_cannot_be_trusted(tmp_path):
    table, basis = make_table(tmp_path, n=400)
    graph = TokenGraph(tmp_path, table, LAYERS, PARAMS, dim=RANK)
    q = (np.random.default_rng(3).standard_normal((4, RANK)) @ basis).astype(np.float32)
    before = graph.search(q, 16)
    graph.close()
    again = TokenGraph(tmp_path, table, LAYERS, PARAMS, dim=RANK, writable=False)
    assert again.count == 400 and not again.rebuilt
    np.testing.assert_array_equal(again.search(q, 16), before)  # the same graph, the same projection

    rng = np.random.default_rng(4)
    table.append(np.array([[20000, 20010], [20010, 20020]]), rng.standard_normal((2, L, V * D)).astype(np.float32))
    grown = TokenGraph(tmp_path, table, LAYERS, PARAMS, dim=RANK)  # behind its table: caught up
    assert grown.count == 402 and not grown.rebuilt
    grown.close()

    table.truncate(300)  # the graph is now ahead of its table (a crash lost events): rebuilt from the table
    rebuilt = TokenGraph(tmp_path, table, LAYERS, PARAMS, dim=RANK)
    assert rebuilt.rebuilt and rebuilt.count == 300
    rebuilt.close()
    other = TokenGraph(tmp_path, table, (0, 1), PARAMS, dim=RANK)  # other layers: another graph
    assert other.rebuilt and other.count == 300 and other.token_dim == 2 * D
    (tmp_path / GRAPH_FILE).write_bytes(b"garbage")
    assert TokenGraph(tmp_path, table, (0, 1), PARAMS, dim=RANK).rebuilt
    with pytest.raises(ConfigError):
        TokenGraph(tmp_path, table, (0, 5), PARAMS)


def test_retriever_with_a_token_graph_selects_what_exact_selects(tmp_path):
    """Given every event as a candidate the graph path ranks exactly as the exact path; with the usual
    candidate lists it still finds the exact selection on low-rank data; the graph needs a token-level
    shared selection of the same table and layers."""
    table, basis = make_table(tmp_path)
    index = EventIndex.open(tmp_path, table, PARAMS, layers=())
    graph = TokenGraph(tmp_path, table, LAYERS, PARAMS, dim=RANK)
    cfg = raw(per_layer=False, use_contiguity_buffer=False, repr_proxy="tokens")
    exact = Retriever(EventIndex.open(tmp_path / "x", table, IndexParams(exact_threshold=10**6), layers=()), cfg)
    rng = np.random.default_rng(5)
    for tokens, rank in ((1, "mean"), (6, "interleave")):
        q = (rng.standard_normal((tokens, RANK)) @ basis).reshape(tokens, L, 1, D).astype(np.float32)
        want = exact.retrieve(q, 200, rank=rank)
        every = Retriever(index, cfg, graph=graph, candidate_factor=1e6).retrieve(q, 200, rank=rank)
        assert not every.exact and every.layers[0].ids == want.layers[0].ids
        usual = Retriever(index, cfg, graph=graph, candidate_factor=8.0).retrieve(q, 200, rank=rank)
        assert len(set(usual.layers[0].ids) & set(want.layers[0].ids)) >= 0.9 * len(want.layers[0].ids)
    with pytest.raises(PlanError):
        not_token_level = raw(per_layer=False, use_contiguity_buffer=False, repr_proxy="topk")
        Retriever(index, not_token_level, graph=graph)
    with pytest.raises(PlanError):
        Retriever(index, dataclasses.replace(cfg, shared_score_layers=2 / 3), graph=graph)  # other layers


def test_a_token_level_memory_keeps_one_graph_and_no_layer_graphs(tmp_path):
    """A session's memory with the ``"tokens"`` representatives on the CPU grows one token graph (no
    per-layer graphs), saves it on checkpoint, and reopens it."""
    from emserve.retrieval.config import RetrievalConfig
    from emserve.retrieval.kvlog import KVLayout, KVLog
    from emserve.retrieval.memory import GRAPH_CANDIDATE_FACTOR, EpisodicMemory
    from emserve.server.engine.rope import RopeSpec

    rope = RopeSpec(inv_freq=1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)), rot_dim=8, head_dim=8)
    log = KVLog.create(tmp_path / "log", KVLayout(3, 2, 8, "float32"))
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(3000, 2, 8, generator=g) for _ in range(3)]
    log.append(np.arange(3000) % 50, np.arange(3000), keys, keys)
    cfg = RetrievalConfig(n_init=16, n_local=64, n_mem=96, exc_block_size=16, per_layer=False, repr_proxy="tokens",
                          shared_score_layers=2 / 3, max_window=16 + 96 + 64 + 16 + 1 + 64,
                          exact_search_threshold=40)
    bounds = [(s, s + 23) for s in range(16, 2900, 23)]
    mem = EpisodicMemory(log, cfg, num_heads=4, rotate=rope.rotate, path=tmp_path / "mem")
    assert mem.graph is not None and mem.index.layers == () and mem.retriever.candidate_factor == GRAPH_CANDIDATE_FACTOR
    mem.close_events(bounds[:100])
    assert mem.graph.count == 100 and mem.graph.layers == (0, 1)
    q = np.random.default_rng(7).standard_normal((3, 4, 8)).astype(np.float32)
    res = mem.retriever.retrieve(q, 96, num_events=100)
    assert not res.exact and res.tokens == 96
    mem.checkpoint()
    assert (tmp_path / "mem" / GRAPH_FILE).exists() and not list((tmp_path / "mem").glob("index_*.hnsw"))
    assert mem.disk_bytes() > (tmp_path / "mem" / GRAPH_FILE).stat().st_size
    mem.close()
    again = EpisodicMemory(log, cfg, num_heads=4, rotate=rope.rotate, path=tmp_path / "mem")
    assert again.graph is not None and again.graph.count == 100 and not again.graph.rebuilt
    assert again.retriever.retrieve(q, 96, num_events=100).layers[0].ids == res.layers[0].ids
    again.close()

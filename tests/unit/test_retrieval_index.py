"""Per-layer event indexes: persistence, recall of HNSW vs exact, the exact/HNSW switch, catch-up."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from emserve.retrieval.errors import ConfigError
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import META_FILE, EventIndex, IndexParams, exact_topk

L, D = 2, 32


def clustered(n: int, dim: int, seed: int, *, clusters: int = 40, noise: float = 0.25) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x.astype(np.float32)


def make_table(path, n: int, *, layers: int = L, dim: int = D, seed: int = 0) -> EventTable:
    t = EventTable.create(path, layers, dim)
    reps = np.stack([clustered(n, dim, seed + layer) for layer in range(layers)], axis=1)
    bounds = np.stack([np.arange(n) * 10, np.arange(n) * 10 + 10], axis=1)
    t.append(bounds, reps)
    return t


def test_persistence_round_trip_identical_results_and_ef(tmp_path):
    params = IndexParams(ef=37, exact_threshold=0, save_min_events=10**6)
    table = make_table(tmp_path, 700)
    ix = EventIndex.open(tmp_path, table, params)
    assert ix.count == 700 and ix.ef == [37, 37]
    qs = clustered(20, D, 99)
    before = [[ix.search(layer, q, 25) for q in qs] for layer in range(L)]
    ix.save()
    table.close()

    table2 = EventTable.open(tmp_path, writable=True)
    ix2 = EventIndex.open(tmp_path, table2, params)
    assert ix2.rebuilt_layers == [] and ix2.ef == [37, 37]  # ef is not in the file: restored by us
    after = [[ix2.search(layer, q, 25) for q in qs] for layer in range(L)]
    for layer in range(L):
        for (i1, s1), (i2, s2) in zip(before[layer], after[layer], strict=True):
            np.testing.assert_array_equal(i1, i2)
            np.testing.assert_array_equal(s1, s2)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["counts"] == [700, 700] and meta["dim"] == D
    # a read-only reader of the same directory gets the same answers
    ro = EventIndex.open(tmp_path, EventTable.open(tmp_path), params, writable=False)
    np.testing.assert_array_equal(ro.search(1, qs[3], 25)[0], after[1][3][0])


def test_set_ef_changes_every_layer_and_is_not_persisted(tmp_path):
    params = IndexParams(ef=16, exact_threshold=0, save_min_events=10**6)
    table = make_table(tmp_path, 400)
    ix = EventIndex.open(tmp_path, table, params)
    ix.set_ef(300)
    assert ix.ef == [300, 300]
    ix.save()
    assert EventIndex.open(tmp_path, table, params).ef == [16, 16]
    with pytest.raises(ConfigError):
        ix.set_ef(0)


def test_index_behind_table_is_caught_up_on_open(tmp_path):
    params = IndexParams(exact_threshold=0, save_min_events=10**6)
    table = make_table(tmp_path, 300)
    EventIndex.open(tmp_path, table, params).save()
    extra = clustered(40, D, 7)
    table.append(np.stack([np.arange(300, 340) * 10, np.arange(300, 340) * 10 + 10], 1),
                 np.stack([extra, extra], axis=1))  # crash before the index saw them
    table.close()
    ix = EventIndex.open(tmp_path, EventTable.open(tmp_path, writable=True), params)
    assert ix.count == 340 and ix.rebuilt_layers == []
    ids, _ = ix.search(0, extra[5], 1)
    assert ids[0] == 305


def test_index_ahead_of_table_is_rebuilt(tmp_path):
    params = IndexParams(exact_threshold=0, save_min_events=10**6)
    table = make_table(tmp_path, 300)
    EventIndex.open(tmp_path, table, params).save()
    table.truncate(250)  # the table is the truth
    ix = EventIndex.open(tmp_path, table, params)
    assert ix.rebuilt_layers == [0, 1] and ix.count == 250
    q = clustered(1, D, 5)[0]
    assert ix.search(0, q, 300)[0].max() < 250


def test_corrupt_index_file_is_rebuilt(tmp_path):
    params = IndexParams(exact_threshold=0, save_min_events=10**6)
    table = make_table(tmp_path, 120)
    EventIndex.open(tmp_path, table, params).save()
    (tmp_path / "index_001.hnsw").write_bytes(b"garbage")
    ix = EventIndex.open(tmp_path, table, params)
    assert ix.rebuilt_layers == [1] and ix.count == 120


def test_hnsw_recall_vs_exact_on_clustered_representatives(tmp_path):
    n, dim, k = 4000, 96, 10
    table = make_table(tmp_path, n, layers=1, dim=dim, seed=3)
    ix = EventIndex.open(tmp_path, table, IndexParams(exact_threshold=0, num_threads=2))
    queries = clustered(100, dim, 3, noise=0.6)  # same centres (same seed), other draws
    hits = 0
    for q in queries:
        approx, _ = ix.search(0, q, k)
        exact, _ = ix.search(0, q, k, exact=True)
        hits += len(set(approx.tolist()) & set(exact.tolist()))
    assert hits / (k * len(queries)) >= 0.95


def test_exact_and_hnsw_switch_at_threshold_agree_on_easy_data(tmp_path):
    params = IndexParams(exact_threshold=500)
    table = EventTable.create(tmp_path, 1, D)
    rng = np.random.default_rng(1)
    reps = rng.standard_normal((500, D)).astype(np.float32)  # iid in 32-d: distinct, easy for top-5
    table.append(np.stack([np.arange(499) * 4, np.arange(499) * 4 + 4], 1), reps[:499, None])
    ix = EventIndex.open(tmp_path, table, params)
    qs = reps[rng.integers(0, 499, 30)] + 0.05 * rng.standard_normal((30, D)).astype(np.float32)
    assert ix.uses_exact()  # 499 events < threshold
    below = [ix.search(0, q, 5) for q in qs]
    reps[499] = 0.0  # scores 0 for every query: never in a top-5 of positive scores
    table.append([(499 * 4, 499 * 4 + 4)], reps[499:500, None])
    ix.sync()
    assert not ix.uses_exact()  # 500 events: HNSW from here on
    for q, (ids_exact, sc_exact) in zip(qs, below, strict=True):
        ids_hnsw, sc_hnsw = ix.search(0, q, 5)
        assert (sc_exact > 0).all()
        np.testing.assert_array_equal(ids_hnsw, ids_exact)
        np.testing.assert_allclose(sc_hnsw, sc_exact, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ix.scores(0, q, ids_hnsw), sc_exact, rtol=1e-5, atol=1e-5)


def test_lazy_build_starts_at_the_build_threshold_and_catches_up_in_bounded_steps(tmp_path):
    params = IndexParams(exact_threshold=400, build_threshold=200, catchup_events=50, save_min_events=10**6)
    n0 = 150
    table = make_table(tmp_path, n0)
    ix = EventIndex.open(tmp_path, table, params)
    assert ix.count == 0 and ix.rebuilt_layers == [] and ix.uses_exact()  # nothing built below 200
    more = np.stack([clustered(300, D, 40 + layer) for layer in range(L)], axis=1)
    counts = []
    for i in range(0, 300, 20):  # 20 new events per step, at most 50 added per sync
        table.append(np.stack([np.arange(n0 + i, n0 + i + 20) * 10, np.arange(n0 + i, n0 + i + 20) * 10 + 10], 1),
                     more[i:i + 20])
        added = ix.sync(limit=params.catchup_events)
        assert added <= 50
        counts.append(ix.count)
    assert counts[:3] == [0, 0, 50]  # 170, 190 events: not yet; 210: the first 50
    assert counts[-1] == len(table) == 450 and ix.count == len(table)  # caught up
    assert all(b - a <= 50 for a, b in zip(counts, counts[1:], strict=False))
    assert not ix.uses_exact() and ix.uses_exact(399)
    q = clustered(1, D, 5)[0]
    ids, scores = ix.search(0, q, 10)
    ids_x, scores_x = exact_topk(table.reps(0), q, 10)
    assert len(set(ids.tolist()) & set(ids_x.tolist())) >= 9
    # a reopened index that lags its table is caught up at once
    table.append(np.array([[4500, 4510]]), more[:1])
    ix.save()
    table.append(np.array([[4510, 4520]]), more[1:2])
    again = EventIndex.open(tmp_path, table, params)
    assert again.count == len(table) == 452 and again.rebuilt_layers == []


def test_index_lagging_its_table_is_searched_exactly(tmp_path):
    params = IndexParams(exact_threshold=100, build_threshold=0, catchup_events=10)
    table = make_table(tmp_path, 50)
    ix = EventIndex.open(tmp_path, table, params)
    assert ix.count == 50
    table.append(np.stack([np.arange(50, 150) * 10, np.arange(50, 150) * 10 + 10], 1),
                 np.stack([clustered(100, D, 9 + layer) for layer in range(L)], axis=1))
    ix.sync(limit=10)
    assert ix.count == 60 and ix.uses_exact()  # 150 events >= 100, but the graph lags: exact
    q = clustered(1, D, 3)[0]
    np.testing.assert_array_equal(ix.search(0, q, 7)[0], exact_topk(table.reps(0), q, 7)[0])


def test_indexed_layer_subset(tmp_path):
    params = IndexParams(exact_threshold=0, save_min_events=10**6)
    table = make_table(tmp_path, 300)
    ix = EventIndex.open(tmp_path, table, params, layers=[1])
    assert ix.layers == (1,) and ix.count == 300 and ix.ef == [params.ef]
    ix.save()
    assert not (tmp_path / "index_000.hnsw").exists() and (tmp_path / "index_001.hnsw").exists()
    assert json.loads((tmp_path / META_FILE).read_text())["layers"] == [1]
    q = clustered(1, D, 5)[0]
    np.testing.assert_array_equal(ix.search(0, q, 10)[0], ix.search(0, q, 10, exact=True)[0])  # no index: exact
    from retrieval_configs import raw

    from emserve.retrieval.retriever import Retriever

    qs = clustered(2 * L, D, 6).reshape(2, L, 1, D)  # 2 query tokens [n, L, heads, head_dim]
    for per_layer in (True, False):  # a layer without an index is searched exactly: same as all-exact
        got = Retriever(ix, raw(per_layer=per_layer, use_contiguity_buffer=False)).retrieve(qs, 500)
        ix.params = IndexParams(exact_threshold=10**6)
        want = Retriever(ix, raw(per_layer=per_layer, use_contiguity_buffer=False)).retrieve(qs, 500)
        ix.params = params
        assert [s.ids for s in got.layers] == [s.ids for s in want.layers]
    # reopened with every layer indexed: layer 0's index is built from the table, layer 1's is loaded
    ix2 = EventIndex.open(tmp_path, EventTable.open(tmp_path, writable=True), params)
    assert ix2.rebuilt_layers == [0] and ix2.count == 300


def test_search_batch_matches_single_searches(tmp_path):
    table = EventTable.create(tmp_path, 1, 2 * D, vectors=2)
    rng = np.random.default_rng(2)
    reps = rng.standard_normal((400, 1, 2 * D)).astype(np.float32)
    table.append(np.stack([np.arange(400) * 4, np.arange(400) * 4 + 4], 1), reps)
    ix = EventIndex.open(tmp_path, table, IndexParams(exact_threshold=0))
    qs = rng.standard_normal((3, D)).astype(np.float32)
    ids, scores = ix.search_batch(0, qs, 20)
    assert ids.shape == scores.shape == (3, 20)
    for i, q in enumerate(qs):
        assert (np.diff(scores[i]) <= 1e-6).all()  # best first
        single, _ = ix.search(0, q, 5)
        _, first = np.unique(ids[i], return_index=True)
        np.testing.assert_array_equal(ids[i][np.sort(first)][:5], single)
        np.testing.assert_allclose(scores[i][np.sort(first)][:5], ix.scores(0, q, single), rtol=1e-4, atol=1e-4)


def test_centered_graph_recall_on_keys_with_a_common_component(tmp_path):
    """Keys = a large shared vector + clustered detail (as real keys); queries see only the detail.
    The graph is built on centered vectors, and reported scores are still ``q . rep``."""
    n, dim, k = 3000, 64, 10
    rng = np.random.default_rng(4)
    common = 30.0 * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim) * 8
    table = EventTable.create(tmp_path, 1, dim)
    reps = common + clustered(n, dim, 4)
    table.append(np.stack([np.arange(n) * 4, np.arange(n) * 4 + 4], 1), reps[:, None])
    ix = EventIndex.open(tmp_path, table, IndexParams(exact_threshold=0))
    queries = clustered(50, dim, 4, noise=0.6)
    queries -= np.outer(queries @ common, common) / (common @ common)  # orthogonal to the shared part
    hits = 0
    for q in queries:
        ids, scores = ix.search(0, q, k)
        hits += len(set(ids.tolist()) & set(ix.search(0, q, k, exact=True)[0].tolist()))
        np.testing.assert_allclose(scores, reps[ids] @ q, rtol=1e-4, atol=1e-3)
    assert hits / (k * len(queries)) >= 0.95


def test_exact_topk_order_and_ties():
    reps = np.array([[1.0], [3.0], [3.0], [2.0], [0.0]], np.float32)
    ids, scores = exact_topk(reps, np.ones(1, np.float32), 3)
    assert ids.tolist() == [1, 2, 3] and scores.tolist() == [3.0, 3.0, 2.0]
    assert exact_topk(reps, np.ones(1, np.float32), 99)[0].tolist() == [1, 2, 3, 0, 4]
    assert exact_topk(reps[:0], np.ones(1, np.float32), 3)[0].size == 0


def test_autosave_is_geometric(tmp_path):
    params = IndexParams(exact_threshold=0, save_min_events=20, save_fraction=0.5)
    table = EventTable.create(tmp_path, 1, 8)
    ix = EventIndex.open(tmp_path, table, params)
    reps = clustered(100, 8, 0)
    saves = []
    for i in range(100):
        table.append([(i, i + 1)], reps[i : i + 1, None])
        ix.sync()
        if (tmp_path / META_FILE).exists():
            c = json.loads((tmp_path / META_FILE).read_text())["counts"][0]
            if not saves or saves[-1] != c:
                saves.append(c)
    assert saves == [20, 40, 60, 90]  # pending >= max(20, 0.5 * saved)
    ix.close()
    assert json.loads((tmp_path / META_FILE).read_text())["counts"] == [100]


def test_queries_while_adding_from_another_thread(tmp_path):
    params = IndexParams(exact_threshold=0, initial_capacity=8)  # forces several resizes
    table = EventTable.create(tmp_path, 1, D)
    reps = clustered(400, D, 4)
    table.append([(0, 1)], reps[:1, None])
    ix = EventIndex.open(tmp_path, table, params)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                ix.search(0, reps[0], 5)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    th = threading.Thread(target=reader)
    th.start()
    for i in range(1, 400):
        table.append([(i, i + 1)], reps[i : i + 1, None])
        ix.sync(autosave=False)
    stop.set()
    th.join()
    assert not errors and ix.count == 400

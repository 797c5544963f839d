"""Retrieval: exact budget per layer, temporal order, rank-order greedy fill with truncation, buffers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from retrieval_configs import raw

from emserve.retrieval.buffers import contiguity_tokens
from emserve.retrieval.errors import ConfigError, PlanError
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import EventIndex, IndexParams
from emserve.retrieval.retriever import Retriever

L, D, N = 3, 16, 300


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    """The same 300 events (1..40 tokens, gaps allowed) behind an exact and an HNSW index."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 41, N)
    starts = 128 + np.concatenate([[0], np.cumsum(sizes + rng.integers(0, 2, N))[:-1]])
    bounds = np.stack([starts, starts + sizes], 1)
    reps = rng.standard_normal((N, L, D)).astype(np.float32)
    out = {}
    for name, threshold in (("exact", 10**6), ("hnsw", 0)):
        path = tmp_path_factory.mktemp(name)
        table = EventTable.create(path, L, D)
        table.append(bounds, reps)
        out[name] = EventIndex.open(path, table, IndexParams(exact_threshold=threshold))
    return out


def one_layer_index(tmp_path, sizes, scores_order):
    """One layer, events of ``sizes``; query ``ones`` ranks events in ``scores_order`` (best first)."""
    n = len(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) + 100
    table = EventTable.create(tmp_path, 1, 1)
    reps = np.zeros((n, 1, 1), np.float32)
    for rank, event in enumerate(scores_order):
        reps[event, 0, 0] = n - rank
    table.append(np.stack([starts, starts + np.asarray(sizes)], 1), reps)
    return EventIndex.open(tmp_path, table, IndexParams())


def test_greedy_rank_order_truncates_last_event(tmp_path):
    ix = one_layer_index(tmp_path, [10] * 5, [2, 0, 4, 1, 3])
    r = Retriever(ix, raw(use_contiguity_buffer=False))
    res = r.retrieve(np.ones((1, 1), np.float32), 25)
    sel = res.layers[0]
    assert sel.ids == [0, 2, 4]  # temporal order
    assert sel.ranges == [(100, 110), (120, 130), (140, 145)]  # event 4 truncated to a 5-token prefix
    assert [e.truncated for e in sel.events] == [False, False, True]
    assert [e.score for e in sel.events] == [4.0, 5.0, 3.0]
    assert res.tokens == 25 and res.memory_tokens == 50


def test_contiguity_share_and_topup(tmp_path):
    ix = one_layer_index(tmp_path, [10] * 6, [2, 0, 4, 1, 3, 5])
    r = Retriever(ix, raw(use_contiguity_buffer=True, contiguity_buffer_size=0.3))
    q = np.ones((1, 1), np.float32)
    # budget 30: k_c = int(0.3*30+1) = 10, k_s = 20 -> hits 2, 0; neighbour 3 fills k_c
    sel = r.retrieve(q, 30).layers[0]
    assert [(e.id, e.source) for e in sel.events] == [(0, "similarity"), (2, "similarity"), (3, "contiguity")]
    assert r.buffers[0].ids == (3,)
    # budget 35: k_c = 11, k_s = 24 -> hits 2, 0 (4 does not fit k_s); neighbour 3 fits k_c, 1 does not
    # (no overshoot) -> the rest of the budget goes to the top-up in rank order: 4, truncated to 5
    sel = r.retrieve(q, 35).layers[0]
    assert [(e.id, e.source, len(e)) for e in sel.events] == [
        (0, "similarity", 10), (2, "similarity", 10), (3, "contiguity", 10), (4, "similarity", 5)
    ]


def test_everything_fits_takes_all_and_leaves_buffers(tmp_path):
    ix = one_layer_index(tmp_path, [10, 20, 5], [1, 0, 2])
    r = Retriever(ix, raw())
    res = r.retrieve(None, 35)
    assert res.layers[0].ids == [0, 1, 2] and res.tokens == 35
    assert np.isnan(res.layers[0].events[0].score)
    assert r.buffers[0].ids == ()
    assert r.retrieve(None, 100, num_events=2).layers[0].ids == [0, 1]
    with pytest.raises(PlanError):
        r.retrieve(None, 34)  # must choose: needs queries
    with pytest.raises(PlanError):
        r.retrieve(np.ones((2, 1), np.float32), 34)  # wrong shape


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["exact", "hnsw", "hnsw-bounded"]),
    per_layer=st.booleans(),
    use_buffer=st.booleans(),
    size=st.sampled_from([0.0, 0.1, 0.3, 0.9, 64.0]),
    budget=st.integers(0, 4000),
    m=st.integers(0, N),
    seeds=st.lists(st.integers(0, 2**16), min_size=1, max_size=4),
)
def test_budget_exact_equal_per_layer_and_temporal_order(
    indexes, kind, per_layer, use_buffer, size, budget, m, seeds
):
    ix = indexes[kind.split("-")[0]]
    table = ix.table
    bounded = {"shared_rescore_factor": 1.5, "shared_search_vectors": 8} if kind == "hnsw-bounded" else {}
    r = Retriever(ix, raw(per_layer=per_layer, use_contiguity_buffer=use_buffer, contiguity_buffer_size=size,
                          **bounded))
    memory = int(table.sizes[:m].sum())
    kc = contiguity_tokens(budget, size) if use_buffer else 0
    for seed in seeds:
        q = np.random.default_rng(seed).standard_normal((L, D)).astype(np.float32)
        res = r.retrieve(q, budget, num_events=m)
        assert len(res.layers) == L and res.shared == (not per_layer)
        for sel in res.layers:
            assert sel.tokens == min(budget, memory)  # never exceeded, equal for every layer
            ids = sel.ids
            assert ids == sorted(set(ids)) and all(0 <= i < m for i in ids)  # temporal order, no repeats
            if memory <= budget:
                assert ids == list(range(m))
            truncated = 0
            for e in sel.events:
                s, t = table.bounds(e.id)
                assert e.start == s and s < e.end <= t and e.truncated == (e.end < t)
                truncated += e.truncated
                assert np.isfinite(e.score)
            assert truncated <= 1
            assert sum(len(e) for e in sel.events if e.source == "contiguity") <= kc
        if not per_layer:
            assert all(sel is res.layers[0] for sel in res.layers)


def test_per_layer_selections_differ_and_shared_sums_layers(indexes):
    ix = indexes["exact"]
    q = np.random.default_rng(5).standard_normal((L, D)).astype(np.float32)
    res = Retriever(ix, raw(use_contiguity_buffer=False)).retrieve(q, 300)
    assert len({tuple(sel.ids) for sel in res.layers}) > 1
    # per layer, the similarity picks are the top of that layer's exact ranking
    for layer, sel in enumerate(res.layers):
        scores = ix.table.reps(layer) @ q[layer]
        best = int(np.argmax(scores))
        assert best in sel.ids
    shared = Retriever(ix, raw(per_layer=False, use_contiguity_buffer=False)).retrieve(q, 300)
    total = sum(ix.table.reps(layer) @ q[layer] for layer in range(L))
    assert int(np.argmax(total)) in shared.layers[0].ids
    e = shared.layers[0].events[0]
    assert e.score == pytest.approx(float(total[e.id]), rel=1e-5)
    # queries as StepResult.queries: [layers, heads, head_dim]
    same = Retriever(ix, raw(use_contiguity_buffer=False)).retrieve(q.reshape(L, 4, 4), 300)
    assert [s.ids for s in same.layers] == [s.ids for s in res.layers]


def test_hnsw_and_exact_agree_on_clear_winners(indexes):
    q = np.random.default_rng(2).standard_normal((L, D)).astype(np.float32)
    q[0] = 5 * indexes["exact"].table.reps(0)[123]  # event 123 is by far the best of layer 0
    a = Retriever(indexes["exact"], raw(use_contiguity_buffer=False)).retrieve(q, 200)
    b = Retriever(indexes["hnsw"], raw(use_contiguity_buffer=False)).retrieve(q, 200)
    assert 123 in a.layers[0].ids and 123 in b.layers[0].ids
    assert a.exact and not b.exact


def test_buffer_state_persists_across_steps(tmp_path):
    ix = one_layer_index(tmp_path, [10] * 40, list(range(40)))
    r = Retriever(ix, raw(contiguity_buffer_size=0.5))
    reps = np.zeros((1, 1), np.float32)
    reps[0, 0] = 1.0
    # budget 40: k_c = 21, k_s = 19 -> one hit (event 0, score 40), neighbour 1 -> buffer (1,)
    r.retrieve(reps, 40)
    assert r.buffers[0].ids == (1,)
    r.reset_buffers()
    assert r.buffers[0].ids == ()


def test_bounded_rescoring_matches_exact_when_lists_hold_everything(indexes):
    """With lists as long as the index, the upper bound is exact: the bounded path selects as exact."""
    qs = np.random.default_rng(7).standard_normal((4, 2, L, 1, D)).astype(np.float32)  # 2 query tokens
    exact = Retriever(indexes["exact"], raw(per_layer=False, use_contiguity_buffer=False))
    full = Retriever(indexes["hnsw"], raw(per_layer=False, use_contiguity_buffer=False, shared_rescore_factor=1.0,
                                          shared_search_vectors=N))
    short = Retriever(indexes["hnsw"], raw(per_layer=False, use_contiguity_buffer=False, shared_rescore_factor=3.0,
                                           shared_search_vectors=16))
    for q in qs:
        want = exact.retrieve(q, 500)
        assert full.retrieve(q, 500).layers[0].ids == want.layers[0].ids
        got = short.retrieve(q, 500).layers[0]
        assert got.tokens == 500
        top = max(want.layers[0].events, key=lambda e: e.score)
        assert top.id in got.ids  # the best event survives short lists
    with pytest.raises(ConfigError):
        raw(shared_rescore_factor=-1.0)


def test_candidate_factor_sets_the_hnsw_list_length(indexes, monkeypatch):
    """The union path asks each HNSW list for events covering ``candidate_factor`` x the budget; lists
    as long as the memory make it exact."""
    hnsw = indexes["hnsw"]
    asked: list[int] = []
    search = hnsw.search_batch

    def spy(layer, queries, k_vectors):
        asked.append(k_vectors)
        return search(layer, queries, k_vectors)

    monkeypatch.setattr(hnsw, "search_batch", spy)
    q = np.random.default_rng(11).standard_normal((2, L, 1, D)).astype(np.float32)
    lengths = {}
    shared = raw(per_layer=False, use_contiguity_buffer=False)
    for factor in (1.5, 3.0):
        asked.clear()
        Retriever(hnsw, shared, candidate_factor=factor).retrieve(q, 300)
        lengths[factor] = asked[0]
    mean_size = indexes["exact"].table.sizes.mean()
    assert lengths[1.5] == hnsw.vectors * (16 + np.ceil(1.5 * 300 / mean_size))
    assert lengths[3.0] == hnsw.vectors * (16 + np.ceil(3.0 * 300 / mean_size))
    exact = Retriever(indexes["exact"], shared).retrieve(q, 300)
    everything = Retriever(hnsw, shared, candidate_factor=1e6).retrieve(q, 300)
    assert everything.layers[0].ids == exact.layers[0].ids and not everything.exact
    exact_i = Retriever(indexes["exact"], shared).retrieve(
        q, 300, rank="interleave")
    every_i = Retriever(hnsw, shared, candidate_factor=1e6).retrieve(
        q, 300, rank="interleave")
    assert every_i.layers[0].ids == exact_i.layers[0].ids != exact.layers[0].ids
    with pytest.raises(PlanError):
        Retriever(hnsw, raw(), candidate_factor=0.0)


def test_interleave_takes_each_tokens_best_in_turn():
    from emserve.retrieval.retriever import interleave

    per_token = np.array([[9.0, 8.0, 1.0, 0.0, 7.0],   # token 0: 0, 1, 4, 2, 3; best 1.07 std above its mean
                          [0.0, 1.0, 2.0, 9.0, 3.0]])  # token 1: 3, 4, 2, 1, 0; best 1.90 std above: first
    # column 4 has the best mean (5.0) and goes first; then the rounds: 3 (token 1's best), 0 (token 0's)
    assert interleave(per_token).tolist() == [4, 3, 0, 1, 2]
    assert interleave(per_token[[0, 0]]).tolist() == [0, 1, 4, 2, 3]
    assert interleave(np.array([[1.0, 1.0, 2.0]])).tolist() == [2, 0, 1]  # ties: the lower column first


def test_interleave_sample_stats_are_the_same_on_every_path(indexes, monkeypatch):
    """``interleave_stats="sample"``: the token statistics are each token's mean and spread over the query
    sample's events, whether every event is scored (exact) or only the HNSW candidates; ``"scored"``
    leaves them to the scored events (``stats=None``)."""
    from emserve.retrieval import retriever as mod

    seen: list[tuple[np.ndarray, np.ndarray] | None] = []
    real = mod.interleave

    def spy(per_token, stats=None):
        seen.append(stats)
        return real(per_token, stats)

    monkeypatch.setattr(mod, "interleave", spy)
    q = np.random.default_rng(5).standard_normal((6, L, 1, D)).astype(np.float32)
    cfg = raw(per_layer=False, use_contiguity_buffer=False, interleave_stats="sample", query_sample=64)
    for name in ("exact", "hnsw"):
        r = Retriever(indexes[name], cfg)
        r.retrieve(q, 300, rank="interleave")
        ids = r.sample_ids()
        assert ids is not None and ids.shape[0] == 64
        ts = r.token_scores(r.encode(q), None, ids)
        mean, std = seen.pop()
        np.testing.assert_allclose(mean, ts.mean(axis=1), rtol=1e-6)
        np.testing.assert_allclose(std, ts.std(axis=1), rtol=1e-6)
        assert std.min() > 0
        # the sample's rows come from its cache: the same scores for a prefix (a view) and any subset
        for some in (ids[:40], ids[::3]):
            np.testing.assert_array_equal(r.token_scores(r.encode(q), None, some, sampled=True),
                                          r.token_scores(r.encode(q), None, some))
    Retriever(indexes["hnsw"], dataclasses.replace(cfg, interleave_stats="scored")).retrieve(q, 300, rank="interleave")
    assert seen == [None]
    with pytest.raises(ConfigError):
        raw(interleave_stats="candidates")


def test_interleave_rank_finds_what_one_token_asks_for(tmp_path):
    """Three generic tokens prefer the early events, a fourth (the 'key word') only event 5: the mean
    ranks event 5 fourth (outside a 3-event budget), interleaving second; a step with one token ranks
    the same either way."""
    n = 40
    table = EventTable.create(tmp_path, 1, 2)
    reps = np.zeros((n, 1, 2), np.float32)
    reps[:, 0, 0] = np.linspace(10.0, 0.0, n)  # generic direction: event 0 best, then 1, 2, ...
    reps[5, 0, 1] = 1.0  # only the key word's direction
    table.append(np.stack([np.arange(n) * 10, np.arange(n) * 10 + 10], 1), reps)
    ix = EventIndex.open(tmp_path, table, IndexParams())
    q = np.array([[[1.0, 0.0]], [[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]], np.float32)[:, :, None, :]  # [4, L, 1, D]
    r = Retriever(ix, raw(per_layer=False, use_contiguity_buffer=False))
    assert 5 not in r.retrieve(q, 30, rank="mean").layers[0].ids
    assert r.retrieve(q, 30, rank="interleave").layers[0].ids == [0, 1, 5]
    one = q[:1]
    assert r.retrieve(one, 30, rank="interleave").layers[0].ids == r.retrieve(one, 30).layers[0].ids
    with pytest.raises(PlanError):
        r.retrieve(q, 30, rank="max")


def test_with_neighbours_follows_each_hit_with_its_neighbours():
    from emserve.retrieval.retriever import with_neighbours

    order, via = with_neighbours(np.array([5, 0, 6, 9]), 10, 1)
    # 5 then 6 (after), 4 (before); 0 then 1 (-1 is not an event); 6 is there already (as 5's neighbour)
    # but brings its own, 7; 9 then 8 (10 is not an event)
    assert order.tolist() == [5, 6, 4, 0, 1, 7, 9, 8]
    assert via.tolist() == [False, True, True, False, True, True, False, True]
    order, via = with_neighbours(np.array([5]), 10, 2)
    assert order.tolist() == [5, 6, 4, 7, 3] and via.tolist() == [False, True, True, True, True]
    order, via = with_neighbours(np.array([3, 1]), 10, 0)
    assert order.tolist() == [3, 1] and not via.any()


def test_reach_brings_the_neighbours_within_that_many_tokens():
    from emserve.retrieval.retriever import with_neighbours

    sizes = np.array([10, 4, 4, 4, 10, 3, 3, 3, 3, 20])
    starts = 100 + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    ends = starts + sizes
    # hit 4 [122, 132): following events starting before 132 + 8 = 140: 5 [132), 6 [135), 7 [138);
    # preceding events ending after 122 - 8 = 114: 3 [118, 122), 2 [114, 118) ends at 118 > 114, 1 ends at 114: not
    order, via = with_neighbours(np.array([4]), 10, 1, starts, ends, reach=8)
    assert order.tolist() == [4, 5, 3, 6, 2, 7] and via.tolist() == [False] + [True] * 5
    # radius is a floor: reach 0 is the radius alone; reach without bounds is ignored
    assert with_neighbours(np.array([4]), 10, 1, starts, ends, reach=0)[0].tolist() == [4, 5, 3]
    assert with_neighbours(np.array([4]), 10, 1, reach=8)[0].tolist() == [4, 5, 3]
    assert with_neighbours(np.array([4]), 10, 0, starts, ends, reach=1)[0].tolist() == [4, 5, 3]


def test_with_reach_the_neighbours_come_nearest_text_first():
    """A long event on one side comes after the short ones of the other side; without bounds they alternate."""
    from emserve.retrieval.retriever import with_neighbours

    sizes = np.array([4, 4, 40, 4, 4, 4, 4])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    ends = starts + sizes
    # hit 3 [48, 52): 4 (gap 0), 2 (gap 0), 5 (gap 4), 6 (gap 8), 1 (gap 40), 0 (gap 44)
    assert with_neighbours(np.array([3]), 7, 3, starts, ends, reach=1)[0].tolist() == [3, 4, 2, 5, 6, 1, 0]
    assert with_neighbours(np.array([3]), 7, 3)[0].tolist() == [3, 4, 2, 5, 1, 6, 0]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=14), st.data())
def test_with_neighbours_matches_brute_force(sizes, data):
    from emserve.retrieval.retriever import MAX_NEIGHBOURS, with_neighbours

    n = len(sizes)
    radius = data.draw(st.integers(0, 3))
    reach = data.draw(st.integers(0, 30))
    ranked = data.draw(st.lists(st.integers(0, n - 1), max_size=6, unique=True))
    joint = data.draw(st.integers(1, 3))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    ends = starts + np.asarray(sizes)
    entries: list[tuple[int, int, int, int]] = []  # (gap, row, position in the row, event)
    for r, c in enumerate(ranked):
        fwd = max([radius] + [j - c for j in range(c + 1, n) if starts[j] < ends[c] + reach]) if reach else radius
        back = max([radius] + [c - j for j in range(c) if ends[j] > starts[c] - reach]) if reach else radius
        fwd, back = min(fwd, MAX_NEIGHBOURS), min(back, MAX_NEIGHBOURS)
        side = [c + s * d for d in range(1, max(fwd, back) + 1) for s in (1, -1)
                if (s > 0 and d <= fwd) or (s < 0 and d <= back)]
        side = [j for j in side if 0 <= j < n]

        def gap(j: int, c: int = c) -> int:
            return starts[j] - ends[c] if j > c else starts[c] - ends[j]

        if reach:  # nearest text first (tokens between the hit and the neighbour), ties as listed
            side.sort(key=gap)
        entries += [(-1 if j == c else gap(j), r, k, j) for k, j in enumerate([c] + side)]
    if reach:  # the first `joint` hits read together: their entries by gap, then hit, then position
        head = [e for e in entries if e[1] < joint]
        entries = sorted(head) + entries[len(head):]
    want: list[int] = []
    near: list[bool] = []
    for _, r, _, j in entries:
        if j not in want:
            want.append(j)
            near.append(j != ranked[r])  # first seen as a neighbour
    order, via = with_neighbours(np.array(ranked, np.int64), n, radius, starts, ends, reach, joint=joint)
    assert order.tolist() == want
    assert via.tolist() == near


@settings(max_examples=120, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=14), st.data())
def test_near_parts_read_the_tokens_nearest_the_hit_first(sizes, data):
    """With one-token parts, a hit's window is the hit, then its neighbours' tokens within the reach
    by distance from the hit (ties: the event earlier in the neighbour walk), cut at the budget."""
    from emserve.retrieval.retriever import near_parts, neighbour_walk, select_ranked

    n = len(sizes)
    c = data.draw(st.integers(0, n - 1))
    radius = data.draw(st.integers(0, 3))
    reach = data.draw(st.integers(1, 30))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    ends = starts + np.asarray(sizes)
    budget = data.draw(st.integers(int(sizes[c]), int(sum(sizes))))
    ranked = np.array([c], np.int64)
    order, via, row = neighbour_walk(ranked, n, radius, starts, ends, reach)
    rank = {int(e): i for i, e in enumerate(order)}
    near = []  # (distance, the event's place in the walk, token)
    for e in order[1:].tolist():
        for t in range(int(starts[e]), int(ends[e])):
            d = t - int(ends[c]) if e > c else int(starts[c]) - 1 - t
            if d < reach:
                near.append((d, rank[e], t))
    want = set(range(int(starts[c]), int(ends[c]))) | {t for _, _, t in sorted(near)[:budget - int(sizes[c])]}
    ev, lo, hi, tail, via2 = near_parts(order, via, row, ranked, starts, ends, reach, part=1)
    picks = select_ranked(ev, np.asarray(sizes), n, budget, 0, None, via2, (lo, hi, tail))
    got = [t for e, a, b, _ in picks for t in range(int(starts[e]) + a, int(starts[e]) + b)]
    assert len(got) == len(set(got)) and set(got) == want


def test_a_long_neighbour_is_read_from_its_near_end_as_far_as_the_reach():
    """Hit 2 (66 tokens) with a 95-token event after it and short ones before it (the pass-key filler's
    shape): a 100-token budget takes the text nearest the hit on both sides in parts of 16 tokens;
    taken whole, the long event took all of it."""
    from emserve.retrieval.retriever import near_parts, neighbour_walk, select_ranked, with_neighbours

    sizes = np.array([8, 8, 66, 95, 11])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    ends = starts + sizes
    ranked = np.array([2])
    order, via = with_neighbours(ranked, 5, 6, starts, ends, reach=96)
    whole = select_ranked(order, sizes, 5, 100, 0, None, via)
    assert [(c, b - a) for c, a, b, _ in whole] == [(2, 66), (3, 34)]  # 0 and 1 left out
    order, via, row = neighbour_walk(ranked, 5, 6, starts, ends, reach=96)
    parts = near_parts(order, via, row, ranked, starts, ends, reach=96)
    picks = select_ranked(parts[0], sizes, 5, 100, 0, None, parts[4], parts[1:4])
    assert picks[0] == (2, 0, 66, "similarity")
    taken: dict[int, list[tuple[int, int]]] = {}
    for c, a, b, _ in picks:
        taken.setdefault(c, []).append((a, b))
    # 3's first 16 tokens and 1 (distance 0), 0 (distance 8), then 3's next part up to the budget's end
    assert taken == {2: [(0, 66)], 3: [(0, 16), (16, 18)], 1: [(0, 8)], 0: [(0, 8)]}
    last = select_ranked(parts[0], sizes, 5, 86, 0, None, parts[4], parts[1:4])
    assert last[-1][:3] == (1, 4, 8)  # a preceding event cut by the budget keeps its end, the hit's side
    # a 10-token reach: 3 read as far as 10 tokens after the hit, 0 as far as 10 before it (its last 2)
    order, via, row = neighbour_walk(ranked, 5, 0, starts, ends, reach=10)
    parts = near_parts(order, via, row, ranked, starts, ends, reach=10)
    got = sorted(zip(parts[0].tolist(), parts[1].tolist(), parts[2].tolist(), strict=True))
    assert got == [(0, 6, 8), (1, 0, 8), (2, 0, 66), (3, 0, 10)]


def test_hits_read_together_get_their_near_text_before_either_gets_its_far_text():
    """A two-hop question's link (hit 2) and fact (hit 8): read together, the fact's sentence (8, 9) comes
    before the link's far neighbours; read one after the other, a tight budget ends inside the link's."""
    from emserve.retrieval.retriever import with_neighbours

    sizes = np.full(12, 5)
    starts = np.arange(12) * 5
    ends = starts + 5
    apart = with_neighbours(np.array([2, 8]), 12, 2, starts, ends, reach=10)[0].tolist()
    together = with_neighbours(np.array([2, 8]), 12, 2, starts, ends, reach=10, joint=2)[0].tolist()
    assert apart == [2, 3, 1, 4, 0, 8, 9, 7, 10, 6]
    assert together == [2, 8, 3, 1, 9, 7, 4, 0, 10, 6]
    assert with_neighbours(np.array([2, 8]), 12, 2, starts, ends, reach=0, joint=2)[0].tolist() == [2, 3, 1, 4, 0,
                                                                                                 8, 9, 7, 10, 6]
    budget = 30  # six events
    assert 9 not in apart[:budget // 5] and {8, 9} <= set(together[:budget // 5])
    assert sizes.sum() > budget


def test_a_long_event_does_not_push_the_near_text_of_the_other_side_out_of_the_budget():
    """Hit 2 between a long event before it (1) and short ones after it (3, 4, 5): the text right after the
    hit comes before what lies beyond the long event (0), so the budget ends on the far side, not the near."""
    from emserve.retrieval.retriever import select_ranked, with_neighbours

    sizes = np.array([40, 40, 4, 4, 4, 4])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    order, via = with_neighbours(np.array([2]), 6, 3, starts, starts + sizes, reach=1)
    assert order.tolist() == [2, 3, 1, 4, 5, 0]  # alternating would take 0 (gap 40) before 5 (gap 8)
    picks = select_ranked(order, sizes, 6, 56, 0, None, via)
    assert [(c, b - a) for c, a, b, _ in picks] == [(2, 4), (3, 4), (1, 40), (4, 4), (5, 4)]


def test_neighbours_bring_a_split_fact_whole(tmp_path):
    """A fact cut in two: event 3 names the key (ranked first), event 4 holds its value (ranked last).
    Without neighbours a 30-token budget takes the three best events; with them, the hit's following
    neighbour comes right after it, then the one before, and only then the next-ranked event; an
    event between two hits is in."""
    ix = one_layer_index(tmp_path, [10] * 10, [3, 7, 0, 9, 1, 5, 6, 2, 8, 4])
    r = Retriever(ix, raw(use_contiguity_buffer=False))
    q = np.ones((1, 1), np.float32)
    assert r.retrieve(q, 30).layers[0].ids == [0, 3, 7]
    sel = r.retrieve(q, 30, neighbours=1).layers[0]
    assert sel.ids == [2, 3, 4]
    assert [e.source for e in sel.events] == ["contiguity", "similarity", "contiguity"]
    # 50 tokens: 3, 4, 2, then 7 with 8 (its following neighbour); 6 would be 60 tokens
    assert r.retrieve(q, 50, neighbours=1).layers[0].ids == [2, 3, 4, 7, 8]
    # a gap between hits: ranks 3 and 5 first; 4 is the neighbour of both
    ix2 = one_layer_index(tmp_path / "b", [10] * 10, [3, 5, 0, 9, 1, 7, 6, 2, 8, 4])
    r2 = Retriever(ix2, raw(use_contiguity_buffer=False))
    assert 4 in r2.retrieve(q, 40, neighbours=1).layers[0].ids


def test_reach_brings_short_neighbours_in_the_rank_walk(tmp_path):
    """``reach``: a hit also brings the neighbours within that many tokens; with short events after it
    (a value three events on), one neighbour each side is not enough and a 9-token reach is."""
    ix = one_layer_index(tmp_path, [10, 10, 10, 3, 3, 3, 10, 10, 10, 10], [2, 8, 0, 9, 1, 7, 6, 3, 4, 5])
    r = Retriever(ix, raw(use_contiguity_buffer=False))
    q = np.ones((1, 1), np.float32)
    assert r.retrieve(q, 29, neighbours=1).layers[0].ids == [1, 2, 3, 8]  # 2 with 3 and 1, then 8 (cut)
    sel = r.retrieve(q, 29, neighbours=1, reach=9).layers[0]
    # 2 [120, 130): following events starting before 139: 3, 4, 5 (130, 133, 136); preceding: 1
    assert sel.ids == [1, 2, 3, 4, 5]
    assert [e.source for e in sel.events] == ["contiguity", "similarity", "contiguity", "contiguity", "contiguity"]
    # in parts: 1 is read as far as the reach (its last 9 tokens); the budget's last token goes to the next hit
    sel = r.retrieve(q, 29, neighbours=1, reach=9, part=4).layers[0]
    assert sel.ids == [1, 2, 3, 4, 5, 8]
    assert sel.ranges == [(111, 120), (120, 130), (130, 133), (133, 136), (136, 139), (159, 160)]
    assert [e.truncated for e in sel.events] == [True, False, False, False, False, True]


def test_question_without_contiguity_buffer_leaves_it_untouched(tmp_path):
    ix = one_layer_index(tmp_path, [10] * 6, [2, 0, 4, 1, 3, 5])
    r = Retriever(ix, raw(use_contiguity_buffer=True, contiguity_buffer_size=0.3))
    q = np.ones((1, 1), np.float32)
    r.retrieve(q, 30)
    assert r.buffers[0].ids == (3,)
    sel = r.retrieve(q, 30, contiguity=False).layers[0]
    assert sel.ids == [0, 2, 4] and all(e.source == "similarity" for e in sel.events)
    assert r.buffers[0].ids == (3,)  # neither read nor updated


def test_lead_events_rank_first_with_their_neighbours(tmp_path):
    """Events given as ``first`` (a question's lexical matches) go before the similarity ranking, in
    their order, each with its neighbours, and are reported as lexical; ids past num_events are skipped."""
    ix = one_layer_index(tmp_path, [10] * 10, [3, 7, 0, 9, 1, 5, 6, 2, 8, 4])
    r = Retriever(ix, raw(use_contiguity_buffer=False))
    q = np.ones((1, 1), np.float32)
    sel = r.retrieve(q, 30, first=[8]).layers[0]
    assert sel.ids == [3, 7, 8] and [e.source for e in sel.events] == ["similarity", "similarity", "lexical"]
    sel = r.retrieve(q, 50, neighbours=1, first=[5, 8]).layers[0]
    assert sel.ids == [4, 5, 6, 8, 9]  # 5 with 6 and 4, then 8 with 9; 7 (8's other neighbour) would be 60
    sources = {e.id: e.source for e in sel.events}
    assert sources[5] == sources[8] == "lexical" and sources[4] == sources[6] == sources[9] == "contiguity"
    assert r.retrieve(q, 30, first=[12]).layers[0].ids == [0, 3, 7]  # 12 is not an event: ignored


def test_lead_events_that_fill_the_budget_skip_the_search(indexes, monkeypatch):
    """When the ``first`` events with their neighbours (and parts) fill the budget, the selection is theirs
    whatever the ranking: ``retrieve`` returns it without searching, the same selection (ids, token ranges,
    sources, scores) as the full walk, on every path; when they do not fill it the search runs."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((6, L, 1, D)).astype(np.float32)
    cases = 0
    for name in ("exact", "hnsw"):
        for per_layer in (False, True):
            r = Retriever(indexes[name], raw(per_layer=per_layer, use_contiguity_buffer=False))
            for _ in range(12):
                first = rng.choice(N, int(rng.integers(1, 4)), replace=False).tolist()
                kw = dict(first=first, neighbours=int(rng.integers(0, 3)), reach=int(rng.choice([0, 40])),
                          part=int(rng.choice([0, 8])), joint=int(rng.integers(1, 3)), contiguity=False,
                          rank=str(rng.choice(["mean", "interleave"])))
                budget = int(rng.integers(10, 200))
                searched: list[int] = []
                real_select = Retriever._select

                def spy(self, *a, _real=real_select, _log=searched, **k):
                    _log.append(1)
                    return _real(self, *a, **k)

                monkeypatch.setattr(Retriever, "_select", spy)
                got = r.retrieve(q, budget, **kw)
                skipped = not searched
                monkeypatch.setattr(Retriever, "_leads_fill", staticmethod(lambda walk, budget: None))
                full = r.retrieve(q, budget, **kw)
                monkeypatch.undo()
                for a, b in zip(got.layers, full.layers, strict=True):
                    assert [(e.id, e.start, e.end, e.source) for e in a.events] == \
                        [(e.id, e.start, e.end, e.source) for e in b.events]
                    np.testing.assert_allclose([e.score for e in a.events], [e.score for e in b.events], rtol=1e-6)
                cases += skipped
    assert 0 < cases < 48  # both kinds of case occurred


def test_the_query_sample_span_is_a_function_of_the_table_length_alone() -> None:
    """The events that standardize a step's queries are drawn from sample_span(n) events: all below the
    sample size, then spans growing by 25%. A function of n alone, so a session reopened at n samples
    what an uninterrupted one does (the span was once the table's length at the last resample, which
    depended on how the steps had come, and a reopen resampled at once)."""
    from emserve.retrieval.retriever import sample_span

    assert [sample_span(n, 256) for n in (0, 5, 255)] == [0, 5, 255]
    assert [sample_span(n, 256) for n in (256, 319, 320, 399, 400, 499, 500)] == [256, 256, 320, 320, 400, 400, 500]
    spans = [sample_span(n, 256) for n in range(256, 100_000)]
    assert all(a <= b for a, b in zip(spans, spans[1:], strict=False))  # never shrinks
    assert all(n / 1.25 < m <= n for n, m in zip(range(256, 100_000), spans, strict=True))  # the last 25% at most
    assert len(set(spans)) < 40  # resampled at each 25% of growth, not at every event


def test_token_level_maxsim_scores_the_best_token_across_the_scoring_layers(tmp_path):
    """With ``repr_proxy="tokens"`` a shared selection scores ``mean_i max_j sum_l q_il . rep_l,j``
    (brute force here, exact and through the HNSW candidates), not ``sum_l max_j``: an event whose
    best keys are different tokens in each layer loses to one whose single token matches in all."""
    rng = np.random.default_rng(7)
    n, v = 400, 4
    sizes = rng.integers(4, 20, n)
    starts = 128 + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    reps = rng.standard_normal((n, L, v, D)).astype(np.float32)
    q = rng.standard_normal((5, L, D)).astype(np.float32)
    reps[10, :, 2] = 2.0 * q.mean(0)  # one token matching in every layer
    for lay in range(L):  # a different token per layer, each matching in its own layer only (stronger)
        reps[20, lay, lay] = 2.5 * q.mean(0)[lay]
    brute = (np.einsum("elvd,tld->tev", reps, q)).max(axis=2).mean(axis=0)  # [n]
    per_layer = np.einsum("elvd,tld->telv", reps, q).max(axis=3).sum(axis=2).mean(axis=0)
    assert brute[10] > brute[20] and per_layer[20] > per_layer[10]
    for name, threshold in (("exact", 10**6), ("hnsw", 0)):
        table = EventTable.create(tmp_path / name, L, v * D, vectors=v)
        table.append(np.stack([starts, starts + sizes], 1), reps.reshape(n, L, v * D))
        ix = EventIndex.open(tmp_path / name, table, IndexParams(exact_threshold=threshold))
        r = Retriever(ix, raw(per_layer=False, use_contiguity_buffer=False, repr_proxy="tokens"))
        assert r.token_level
        np.testing.assert_allclose(r.scores(r.encode(q[:, :, None]), None), brute, rtol=1e-4, atol=1e-4)
        ids = np.array([3, 20, 10, 399])
        np.testing.assert_allclose(r.scores(r.encode(q[:, :, None]), None, ids), brute[ids], rtol=1e-4, atol=1e-4)
        res = r.retrieve(q[:, :, None], int(sizes[np.argsort(-brute)[:5]].sum()))
        assert res.layers[0].events and 10 in res.layers[0].ids and res.exact == (name == "exact")
        top = [e.id for e in sorted(res.layers[0].events, key=lambda e: -e.score)][:3]
        assert top == list(np.argsort(-brute)[:3])
        old = Retriever(ix, raw(per_layer=False, use_contiguity_buffer=False, repr_proxy="topk"))
        assert not old.token_level
        np.testing.assert_allclose(old.scores(old.encode(q[:, :, None]), None), per_layer, rtol=1e-4, atol=1e-4)
        with pytest.raises(PlanError, match="representatives"):
            r.config = raw(per_layer=False, use_contiguity_buffer=False, repr_proxy="topk")

"""Unit and property tests of the online segmenter: threshold, splitters, sizing, streaming."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from emserve.segmenter import (
    Event,
    OnlineSegmenter,
    SegmenterConfig,
    SegmenterError,
    SurpriseState,
    quantize_surprise,
    random_boundaries,
    split_even,
    surprise_boundaries,
    uniform_boundaries,
)
from emserve.segmenter.surprise import QUANT_SCALE

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers ---------------------------------------------------------------------------------


def chunked(n: int, cuts: list[int]) -> list[tuple[int, int]]:
    """Split [0, n) at the given cut points (any order, duplicates allowed → empty chunks)."""
    pts = [0, *sorted(c % (n + 1) for c in cuts), n]
    return list(zip(pts[:-1], pts[1:], strict=True))


def run(cfg: SegmenterConfig, s: np.ndarray, chunks: list[tuple[int, int]], keys=None,
        check_closing: bool = True) -> list[Event]:
    seg = OnlineSegmenter(cfg)
    out: list[Event] = []
    for a, b in chunks:
        new = seg.feed(s[a:b], keys)
        if check_closing:
            for e in new:
                assert e.end <= seg.tokens_seen - cfg.lag, "closed before its end is close_lag behind"
            # pending state stays bounded
            assert seg.tokens_seen - seg.closed_until <= cfg.lag + 2 * cfg.max_event_span
        out += new
    out += seg.flush(keys)
    return out


def spans(events: list[Event]) -> list[tuple[int, int]]:
    return [(e.start, e.end) for e in events]


def surprise_stream(seed: int, n: int) -> np.ndarray:
    """Exponential noise with a few planted spikes and a few quiet stretches."""
    rng = np.random.default_rng(seed)
    s = rng.exponential(1.0, size=n)
    for t in rng.integers(0, max(n, 1), size=n // 40 + 1):
        s[t:t + 1] += rng.uniform(3, 12)
    if n > 50:
        a = int(rng.integers(0, n - 50))
        s[a:a + int(rng.integers(10, 50))] = 0.5  # constant stretch: no boundary, forced cuts
    return s


class ClusterKeys:
    """Deterministic keys of a whole stream with planted topic clusters; records its calls."""

    def __init__(self, n: int, seed: int, layers: int = 2, heads: int = 2, dim: int = 4) -> None:
        g = torch.Generator().manual_seed(seed)
        topics = torch.randn(8, layers, heads, dim, generator=g)
        change = torch.rand(n, generator=g) < 1 / 20
        topic = torch.cumsum(change.long(), 0) % 8
        noise = 0.5 * torch.randn(layers, n, heads, dim, generator=g)
        self.k = topics[topic].permute(1, 0, 2, 3) + noise
        self.calls: list[tuple[int, int]] = []

    def __call__(self, start: int, end: int) -> torch.Tensor:
        self.calls.append((start, end))
        return self.k[:, start:end]


configs = st.builds(
    lambda n_init, n_local, lag, tau, gamma, warm, mn, mx_mul, span_mul, metric: SegmenterConfig(
        n_init=n_init, n_local=n_local, close_lag=None if lag is None else mn + lag, surprise_window=tau,
        surprisal_threshold_gamma=gamma,
        surprise_warmup=warm, min_block_size=mn, max_block_size=2 * mn * mx_mul,
        max_event_span=2 * mn * mx_mul * span_mul, similarity_metric=metric),
    n_init=st.sampled_from([0, 1, 5, 16]),
    n_local=st.sampled_from([8, 24, 64]),
    lag=st.sampled_from([None, 0, 5]),
    tau=st.sampled_from([None, 2, 7, 32]),
    gamma=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    warm=st.sampled_from([2, 5, 32]),
    mn=st.sampled_from([1, 2, 4]),
    mx_mul=st.sampled_from([1, 2]),
    span_mul=st.sampled_from([1, 2, 3]),
    metric=st.just("none"),
)


# -- config ----------------------------------------------------------------------------------


def test_config_defaults_follow_emllm_but_the_local_window() -> None:
    c = SegmenterConfig()  # EM-LLM's but the product's local window (EM-LLM: 4096)
    assert (c.n_init, c.n_local, c.tau, c.min_block_size, c.max_block_size) == (128, 1024, 1024, 8, 128)
    assert c.surprisal_threshold_gamma == 1.0 and c.warmup == 32
    assert c.layer_range(32) == (21, 32) and c.layer_range(30) == (20, 30)
    assert SegmenterConfig(refine_layers=(20, 32)).layer_range(32) == (20, 32)
    with pytest.raises(SegmenterError):
        SegmenterConfig(refine_layers=(20, 40)).layer_range(32)


@pytest.mark.parametrize("kw", [
    {"n_init": -1}, {"min_block_size": 0}, {"min_block_size": 8, "max_block_size": 15},
    {"max_event_span": 64}, {"surprise_window": 1}, {"surprise_warmup": 1},
    {"surprisal_threshold_gamma": math.nan}, {"splitter": "sentence"}, {"similarity_metric": "cosine"},
    {"refine_layers": (3, 3)}, {"random_rate": 0.0}, {"random_seed": -1}, {"n_local": 4}, {"close_lag": 7},
    {"n_init": 1.5},
])
def test_config_rejects(kw: dict) -> None:
    with pytest.raises(SegmenterError):
        SegmenterConfig(**kw)


def test_config_dict_roundtrip() -> None:
    c = SegmenterConfig(refine_layers=(2, 5), splitter="random", random_seed=7)
    d = json.loads(json.dumps(c.to_dict()))
    assert SegmenterConfig.from_dict(d) == c


# -- surprise threshold ----------------------------------------------------------------------


def naive_threshold(s: np.ndarray, *, window: int, gamma: float, warmup: int, n_init: int):
    """Per-token loop over the quantised values: boundaries, and the set of near-ties."""
    q = quantize_surprise(s).astype(np.float64) / QUANT_SCALE
    hits, ties = [], set()
    for t in range(len(q)):
        w = q[max(0, t - window):t]
        if t <= n_init or len(w) < warmup:
            continue
        thr = w.mean() + gamma * w.std(ddof=1)
        if abs(q[t] - thr) <= 1e-9 * max(1.0, abs(thr)):
            ties.add(t)
        elif q[t] > thr:
            hits.append(t)
    return hits, ties


def test_threshold_hand_computed() -> None:
    # τ = 4, warm-up 2, n_init 0. t=2: W=[1,2], μ=1.5, σ=0.707 → 3 > 2.207: boundary.
    # t=3: W=[1,2,3], μ=2, σ=1 → 3 ≯ 3. t=4: W=[1,2,3,3], μ=2.25, σ=0.957 → 9 > 3.21: boundary.
    # t=5: W=[2,3,3,9], μ=4.25, σ=3.20 → 1 no. t=1: W has 1 value < warm-up.
    st_ = SurpriseState()
    b = surprise_boundaries(st_, [1.0, 2.0, 3.0, 3.0, 9.0, 1.0], window=4, gamma=1.0, warmup=2, n_init=0)
    assert b.tolist() == [2, 4]
    assert st_.seen == 6 and st_.history.tolist() == (np.array([3, 3, 9, 1]) * QUANT_SCALE).tolist()


def test_planted_spike_is_a_boundary_exactly_at_the_spike() -> None:
    s = np.ones(600)
    s[300] = 10.0
    b = surprise_boundaries(SurpriseState(), s, window=128, gamma=1.0, warmup=32, n_init=128)
    assert b.tolist() == [300]
    cfg = SegmenterConfig(n_init=128, n_local=64, surprise_window=128, similarity_metric="none")
    ev = run(cfg, s, [(0, 600)])
    assert 300 in [e.start for e in ev]
    spike = next(e for e in ev if e.start == 300)
    assert spike.start_surprise == 10.0 and spike.max_surprise == 10.0


def test_nothing_fires_in_sink_or_warmup() -> None:
    s = np.zeros(100)
    s[[3, 10, 40]] = 50.0
    kw = dict(window=64, gamma=1.0, warmup=5)
    assert surprise_boundaries(SurpriseState(), s, n_init=20, **kw).tolist() == [40]
    assert surprise_boundaries(SurpriseState(), s, n_init=0, **kw).tolist() == [10, 40]


@FAST
@given(s=hnp.arrays(np.float64, st.integers(0, 300),
                    elements=st.floats(0, 30, allow_nan=False).map(lambda x: round(x, 1))),
       window=st.integers(2, 40), gamma=st.sampled_from([0.0, 0.5, 1.0, 1.7]),
       warmup=st.integers(2, 40), n_init=st.integers(0, 20), cuts=st.lists(st.integers(0, 300), max_size=8))
def test_threshold_matches_naive_loop_and_is_chunking_invariant(s, window, gamma, warmup, n_init,
                                                                cuts) -> None:
    warmup = min(warmup, window)
    kw = dict(window=window, gamma=gamma, warmup=warmup, n_init=n_init)
    whole = surprise_boundaries(SurpriseState(), s, **kw).tolist()
    state = SurpriseState()
    parts = [surprise_boundaries(state, s[a:b], **kw).tolist() for a, b in chunked(len(s), cuts)]
    assert sum(parts, []) == whole
    hits, ties = naive_threshold(s, **kw)
    assert [t for t in whole if t not in ties] == hits


def test_threshold_rejects_nan_and_long_feeds_are_pieced() -> None:
    with pytest.raises(SegmenterError):
        surprise_boundaries(SurpriseState(), [1.0, math.nan], window=4, gamma=1.0, warmup=2, n_init=0)
    s = surprise_stream(3, 70000)
    kw = dict(window=4096, gamma=1.0, warmup=32, n_init=128)
    whole = surprise_boundaries(SurpriseState(), s, **kw)
    st2 = SurpriseState()
    parts = [surprise_boundaries(st2, s[i:i + 512], **kw) for i in range(0, len(s), 512)]
    assert np.array_equal(whole, np.concatenate(parts))


# -- ablation splitters ------------------------------------------------------------------------


def test_uniform_boundaries() -> None:
    assert uniform_boundaries(0, 50, n_init=4, block_size=16).tolist() == [20, 36]
    assert uniform_boundaries(21, 37, n_init=4, block_size=16).tolist() == [36]
    assert uniform_boundaries(0, 5, n_init=4, block_size=16).tolist() == []
    cfg = SegmenterConfig(n_init=4, n_local=16, min_block_size=4, max_block_size=16, max_event_span=16,
                          splitter="uniform", similarity_metric="none")
    ev = run(cfg, np.zeros(100), chunked(100, [7, 33, 34, 90]))
    assert spans(ev) == [(4 + 16 * k, 4 + 16 * (k + 1)) for k in range(6)]


@FAST
@given(seed=st.integers(0, 2**64 - 1), cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_random_boundaries_are_counter_based(seed: int, cuts: list[int]) -> None:
    n = 2000
    whole = random_boundaries(0, n, n_init=10, rate=1 / 16, seed=seed)
    parts = [random_boundaries(a, b, n_init=10, rate=1 / 16, seed=seed) for a, b in chunked(n, cuts)]
    assert np.array_equal(whole, np.concatenate(parts))
    assert whole.size == 0 or whole.min() > 10
    assert 60 < whole.size < 200  # mean 124.4, sd ~10.8


def test_random_seed_matters_and_segmenter_uses_it() -> None:
    a = random_boundaries(0, 5000, n_init=0, rate=0.05, seed=1)
    b = random_boundaries(0, 5000, n_init=0, rate=0.05, seed=2)
    assert not np.array_equal(a, b)
    cfg = SegmenterConfig(n_init=0, n_local=32, min_block_size=2, max_block_size=32, splitter="random",
                          random_rate=0.05, random_seed=1, similarity_metric="none")
    starts = {e.start for e in run(cfg, np.zeros(5000), [(0, 5000)])}
    kept = [t for t in a.tolist() if t in starts]
    assert len(kept) > 0.8 * a.size  # all but those within min_block_size of the previous


# -- sizing ----------------------------------------------------------------------------------


def test_split_even() -> None:
    assert split_even(0, 300, 128) == [(0, 100), (100, 200), (200, 300)]
    assert split_even(10, 139, 128) == [(10, 75), (75, 139)]
    assert split_even(0, 128, 128) == [(0, 128)]
    assert split_even(5, 7, 128) == [(5, 7)]
    with pytest.raises(SegmenterError):
        split_even(3, 3, 8)


@FAST
@given(n=st.integers(1, 5000), mn=st.integers(1, 16), extra=st.integers(0, 100))
def test_split_even_bounds(n: int, mn: int, extra: int) -> None:
    mx = 2 * mn + extra
    pieces = split_even(100, 100 + n, mx)
    assert pieces[0][0] == 100 and pieces[-1][1] == 100 + n
    assert all(b == c for (_, b), (c, _) in zip(pieces, pieces[1:], strict=False))
    sizes = [b - a for a, b in pieces]
    assert max(sizes) <= mx and max(sizes) - min(sizes) <= 1
    if n >= mn:
        assert min(sizes) >= mn


# -- the online segmenter ----------------------------------------------------------------------


def check_tiling(cfg: SegmenterConfig, ev: list[Event], n: int) -> None:
    if n <= cfg.n_init:
        assert ev == []
        return
    assert ev[0].start == cfg.n_init and ev[-1].end == n
    for a, b in zip(ev, ev[1:], strict=False):
        assert a.end == b.start
    sizes = [len(e) for e in ev]
    if n - cfg.n_init < cfg.min_block_size:
        assert sizes == [n - cfg.n_init]  # the one documented exception
    else:
        assert all(cfg.min_block_size <= x <= cfg.max_block_size for x in sizes), sizes


@FAST
@given(cfg=configs, seed=st.integers(0, 10**6), n=st.integers(0, 500),
       cuts=st.lists(st.integers(0, 500), max_size=10),
       splitter=st.sampled_from(["surprise", "uniform", "random"]))
def test_streaming_tiles_sizes_and_chunking_invariance(cfg, seed, n, cuts, splitter) -> None:
    cfg = SegmenterConfig(**{**cfg.to_dict(), "splitter": splitter, "random_rate": 0.1,
                             "refine_layers": None})
    s = surprise_stream(seed, n)
    whole = run(cfg, s, [(0, n)])
    check_tiling(cfg, whole, n)
    assert all(e.start >= cfg.n_init for e in whole)
    assert run(cfg, s, chunked(n, cuts)) == whole
    assert run(cfg, s, [(i, i + 1) for i in range(n)]) == whole


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, seed=st.integers(0, 10**6), n=st.integers(0, 400),
       cuts=st.lists(st.integers(0, 400), max_size=10), metric=st.sampled_from(["modularity", "conductance"]))
def test_refined_streaming_is_chunking_invariant(cfg, seed, n, cuts, metric) -> None:
    cfg = SegmenterConfig(**{**cfg.to_dict(), "similarity_metric": metric, "refine_layers": None})
    s = surprise_stream(seed, n)
    keys = ClusterKeys(max(n, 1), seed)
    whole = run(cfg, s, [(0, n)], keys)
    check_tiling(cfg, whole, n)
    keys_chunked = ClusterKeys(max(n, 1), seed)
    seg = OnlineSegmenter(cfg)
    out: list[Event] = []
    for a, b in chunked(n, cuts):
        calls_before = len(keys_chunked.calls)
        out += seg.feed(s[a:b], keys_chunked)
        for lo, hi in keys_chunked.calls[calls_before:]:
            assert cfg.n_init <= lo < hi <= seg.tokens_seen  # only tokens already fed, never the sink
    out += seg.flush(keys_chunked)
    assert out == whole
    # every window is refined exactly once, whatever the chunking
    assert sorted(keys_chunked.calls) == sorted(keys.calls)


def test_default_config_long_stream_512_chunks_vs_random_chunks() -> None:
    n = 20000
    s = surprise_stream(11, n)
    keys = ClusterKeys(n, 11)
    cfg = SegmenterConfig()  # the defaults: modularity refinement
    rng = np.random.default_rng(0)
    whole = run(cfg, s, [(i, i + 512) for i in range(0, n, 512)], keys)
    check_tiling(cfg, whole, n)
    assert run(cfg, s, chunked(n, rng.integers(0, n, size=60).tolist()), keys) == whole


def test_close_lag_changes_when_events_return_not_which() -> None:
    n = 6000
    s = surprise_stream(5, n)
    keys = ClusterKeys(n, 5)
    lagged, eager = SegmenterConfig(n_local=1024), SegmenterConfig(n_local=1024, close_lag=8)
    chunks = [(i, i + 512) for i in range(0, n, 512)]
    assert run(eager, s, chunks, keys) == run(lagged, s, chunks, keys)
    # eager closing leaves only the events whose boundaries are not final yet: well under n_local
    seg_l, seg_e = OnlineSegmenter(lagged), OnlineSegmenter(eager)
    for a, b in chunks:
        seg_l.feed(s[a:b], keys)
        seg_e.feed(s[a:b], keys)
    assert seg_l.tokens_seen - seg_l.closed_until >= 1024
    assert seg_e.tokens_seen - seg_e.closed_until < 1024 // 2


def test_refinement_moves_boundary_to_topic_change() -> None:
    # keys switch topic at 150; surprise fires 5 tokens late, at 155
    n = 400
    k = torch.zeros(1, n, 1, 4)
    k[0, :150, 0, 0] = 1.0
    k[0, 150:, 0, 1] = 1.0
    s = np.ones(n)
    s[155] = 20.0
    for metric in ("modularity", "conductance"):
        cfg = SegmenterConfig(n_init=10, n_local=32, surprise_window=64, min_block_size=4, max_block_size=256,
                              max_event_span=256, similarity_metric=metric)
        starts = [e.start for e in run(cfg, s, chunked(n, [100, 160, 170]), lambda a, b: k[:, a:b])]
        assert starts == [10, 150], (metric, starts)
    cfg = SegmenterConfig(n_init=10, n_local=32, surprise_window=64, min_block_size=4, max_block_size=256,
                          max_event_span=256, similarity_metric="none")
    assert [e.start for e in run(cfg, s, [(0, n)])] == [10, 155]


def test_close_boundaries_merge_into_next_event() -> None:
    s = np.ones(300)
    s[[100, 103, 200]] = [10.0, 40.0, 30.0]  # 103 is a boundary too, but only 3 tokens after 100
    cfg = SegmenterConfig(n_init=0, n_local=16, surprise_window=64, min_block_size=8, max_block_size=128,
                          max_event_span=256, similarity_metric="none")
    raw = surprise_boundaries(SurpriseState(), s, window=64, gamma=1.0, warmup=32, n_init=0)
    assert set(raw.tolist()) >= {100, 103}
    starts = [e.start for e in run(cfg, s, [(0, 300)])]
    assert 100 in starts and 103 not in starts and 200 in starts


def test_quiet_stream_is_cut_by_forced_boundaries() -> None:
    cfg = SegmenterConfig(n_init=4, n_local=16, min_block_size=4, max_block_size=16, max_event_span=48,
                          similarity_metric="none")
    ev = run(cfg, np.zeros(200), chunked(200, [50, 51, 120]))
    # forced at 4 + 48k; each 48-token stretch split into 3 × 16; tail [196, 200) is 4 >= min
    assert spans(ev)[:3] == [(4, 20), (20, 36), (36, 52)]
    check_tiling(cfg, ev, 200)


def test_short_tail_joins_previous_event_and_tiny_stream() -> None:
    cfg = SegmenterConfig(n_init=4, n_local=16, min_block_size=8, max_block_size=16, max_event_span=48,
                          similarity_metric="none")
    ev = run(cfg, np.zeros(4 + 48 + 3), [(0, 55)])  # forced at 52; the 3-token tail rejoins [4, 52)
    assert spans(ev) == [(4, 17), (17, 30), (30, 43), (43, 55)]
    check_tiling(cfg, ev, 55)
    assert spans(run(cfg, np.zeros(9), [(0, 9)])) == [(4, 9)]
    assert run(cfg, np.zeros(4), [(0, 4)]) == []


@FAST
@given(seed=st.integers(0, 10**6), n=st.integers(0, 400), cut=st.integers(0, 400),
       metric=st.sampled_from(["none", "modularity"]))
def test_state_dict_resume_is_identical(seed: int, n: int, cut: int, metric: str) -> None:
    cfg = SegmenterConfig(n_init=5, n_local=24, surprise_window=16, min_block_size=2, max_block_size=8,
                          max_event_span=16, similarity_metric=metric)
    s = surprise_stream(seed, n)
    keys = ClusterKeys(max(n, 1), seed)
    whole = run(cfg, s, [(0, n)], keys)
    cut = cut % (n + 1)
    seg = OnlineSegmenter(cfg)
    out = seg.feed(s[:cut], keys)
    blob = json.dumps(seg.state_dict(), default=lambda a: a.tolist())
    seg2 = OnlineSegmenter.from_state_dict(json.loads(blob), cfg)
    out += seg2.feed(s[cut:], keys) + seg2.flush(keys)
    assert out == whole


def test_errors() -> None:
    seg = OnlineSegmenter(SegmenterConfig())
    with pytest.raises(SegmenterError, match="keys callback"):
        seg.feed(np.zeros(3))
    seg = OnlineSegmenter(SegmenterConfig(similarity_metric="none"))
    with pytest.raises(SegmenterError):
        seg.feed(np.zeros((2, 2)))
    with pytest.raises(SegmenterError):
        seg.feed(np.array([1.0, math.inf]))
    seg.flush()
    with pytest.raises(SegmenterError, match="flushed"):
        seg.feed(np.zeros(3))
    state = OnlineSegmenter(SegmenterConfig(similarity_metric="none")).state_dict()
    with pytest.raises(SegmenterError, match="different config"):
        OnlineSegmenter.from_state_dict(state, SegmenterConfig())
    with pytest.raises(SegmenterError, match="version"):
        OnlineSegmenter.from_state_dict({**state, "version": 99})

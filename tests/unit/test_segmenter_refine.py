"""Boundary refinement: prefix-sum formulation vs the direct O(s³) reference, and its invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emserve.segmenter import (
    SegmenterError,
    adjacency,
    refine_boundaries,
    refine_boundary,
    split_objective,
    split_sums,
    window,
)
from emserve.segmenter.reference import (
    direct_objective,
    reference_refine_boundaries,
    reference_refine_boundary,
    textbook_modularity,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
METRICS = st.sampled_from(["modularity", "conductance"])


def sym_graph(seed: int, n: int, *, integer: bool, signed: bool = False, zeros: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, size=(n, n)).astype(np.float64) if integer else rng.random((n, n))
    a[rng.random((n, n)) < zeros] = 0.0
    if signed:
        a -= 2.0 if integer else 0.3
    return np.triu(a) + np.triu(a, 1).T


@st.composite
def graph_and_boundaries(draw, integer: bool = True):
    n = draw(st.integers(2, 48))
    start = draw(st.integers(0, min(6, n - 2)))
    pts = draw(st.lists(st.integers(start + 1, n - 1), max_size=8, unique=True))
    seed = draw(st.integers(0, 2**32 - 1))
    signed = draw(st.booleans())
    return sym_graph(seed, n, integer=integer, signed=signed), start, sorted(pts)


@FAST
@given(gb=graph_and_boundaries(), min_size=st.integers(1, 6), metric=METRICS)
def test_prefix_sum_equals_direct_reference_exactly_on_integer_graphs(gb, min_size, metric) -> None:
    # Integer weights: every community sum is exact in float64 in both implementations, so the
    # scores are bitwise equal and ties must break the same way (largest t).
    a, start, bounds = gb
    fast = refine_boundaries(a, bounds, start=start, min_size=min_size, metric=metric)
    ref = reference_refine_boundaries(a, bounds, start=start, min_size=min_size, metric=metric)
    assert fast == ref


@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 60), metric=METRICS, signed=st.booleans(), data=st.data())
def test_prefix_sum_objective_matches_direct_sums_on_float_graphs(seed, n, metric, signed, data) -> None:
    a = sym_graph(seed, n, integer=False, signed=signed)
    obj = split_objective(a, metric)
    direct = np.array([direct_objective(a, t, metric) for t in range(n + 1)])
    assert np.array_equal(np.isnan(obj), np.isnan(direct))
    ok = ~np.isnan(obj)
    np.testing.assert_allclose(obj[ok], direct[ok], rtol=1e-9, atol=1e-9)
    # one boundary: the choice may differ only between candidates of equal (to rounding) score
    alpha = data.draw(st.integers(0, n - 2))
    beta = data.draw(st.integers(alpha + 1, n - 1))
    min_size = data.draw(st.integers(1, beta - alpha))
    t_fast = refine_boundary(a, 0, alpha, beta, min_size=min_size, metric=metric)
    t_ref = reference_refine_boundary(a, 0, alpha, beta, min_size=min_size, metric=metric)
    if t_fast != t_ref:
        assert direct_objective(a, t_fast, metric) == pytest.approx(
            direct_objective(a, t_ref, metric), rel=1e-9, abs=1e-12
        )


@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 40), data=st.data())
def test_modularity_formula_is_newmans(seed: int, n: int, data) -> None:
    a = sym_graph(seed, n, integer=False, zeros=0.0) + 0.01
    t = data.draw(st.integers(1, n - 1))
    want = textbook_modularity(a, t)
    assert split_objective(a, "modularity")[t] == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_split_sums_small_example() -> None:
    a = np.array([[1.0, 2.0, 0.0], [2.0, 0.0, 3.0], [0.0, 3.0, 4.0]])
    s = split_sums(a)
    # t = 1: S = {0}, S̄ = {1, 2}
    assert (s.in_s[1], s.in_r[1], s.vol_s[1], s.vol_r[1], s.total) == (1.0, 10.0, 3.0, 12.0, 15.0)
    assert s.in_s[0] == 0.0 and s.in_r[3] == 0.0 and s.vol_s[3] == 15.0


@FAST
@given(
    gb=graph_and_boundaries(integer=False),
    min_size=st.integers(1, 6),
    metric=st.sampled_from(["none", "modularity", "conductance"]),
)
def test_refinement_keeps_count_and_stays_in_search_range(gb, min_size, metric) -> None:
    a, start, bounds = gb
    out = refine_boundaries(a, bounds, start=start, min_size=min_size, metric=metric)
    assert len(out) == len(bounds)
    prev = start
    for b, r in zip(bounds, out, strict=True):
        if b - prev >= min_size:
            assert prev + min_size <= r <= b  # moves earlier only, never below prev + min_size
        else:
            assert r == b
        prev = r
    if metric == "none":
        assert out == bounds


def test_block_graph_boundary_moves_to_the_block_edge() -> None:
    n, edge = 60, 22
    a = np.zeros((n, n))
    a[:edge, :edge] = 1.0
    a[edge:, edge:] = 1.0
    for metric in ("modularity", "conductance"):
        assert refine_boundaries(a, [27], start=0, min_size=4, metric=metric) == [edge]
        # the edge itself is a candidate: a boundary already at the best split stays
        assert refine_boundaries(a, [edge], start=0, min_size=4, metric=metric) == [edge]
        # min_size forbids reaching the edge from α = 20: the best allowed is as early as possible
        assert refine_boundary(a, 0, 20, 27, min_size=4, metric=metric) == 24


def test_ties_and_undefined_scores() -> None:
    assert refine_boundary(np.zeros((10, 10)), 0, 0, 7, min_size=2, metric="modularity") == 7
    assert refine_boundary(np.zeros((10, 10)), 0, 0, 7, min_size=2, metric="conductance") == 7
    # all-ones: Q(t) = 0 exactly for every split; ties break to the largest t (least movement)
    ones = np.ones((8, 8))
    assert np.all(split_objective(ones, "modularity")[1:8] == 0.0)
    assert refine_boundary(ones, 0, 0, 4, min_size=1, metric="modularity") == 4
    assert refine_boundary(ones, 0, 0, 6, min_size=2, metric="modularity") == 6


def test_window() -> None:
    assert window(100, 140, floor=0, end=1000) == (100, 160)  # starts at α (see refine.py: not EM-LLM's α − h)
    assert window(100, 141, floor=110, end=150) == (110, 150)
    with pytest.raises(SegmenterError):
        refine_boundary(np.ones((5, 5)), 10, 0, 12, min_size=2, metric="modularity")


def test_adjacency_sums_layers_and_heads_in_fp32() -> None:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 11, 2, 5, generator=g, dtype=torch.float64).to(torch.bfloat16)
    a = adjacency(k)
    assert a.dtype == torch.float32 and a.shape == (11, 11)
    kf = k.float()
    want = torch.einsum("lthd,lThd->tT", kf, kf)
    torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(a, a.T)
    with pytest.raises(SegmenterError):
        adjacency(torch.zeros(11, 2, 5))


def test_fp16_keys_do_not_overflow() -> None:
    k = torch.full((4, 3, 8, 128), 30.0, dtype=torch.float16)  # 4·8·128·900 ≈ 3.7e6 > fp16 max
    assert torch.isfinite(adjacency(k)).all()

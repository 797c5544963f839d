"""Retrieval queries: stream mean, centering, GQA folding, standardization, multi-vector events."""

from __future__ import annotations

import numpy as np
import pytest
from retrieval_configs import raw

from emserve.retrieval.errors import ConfigError, PlanError
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import EventIndex, IndexParams, max_scores
from emserve.retrieval.queries import QueryMean, as_query_tokens, encode_queries, fold_heads
from emserve.retrieval.retriever import Retriever


def test_query_mean_is_token_weighted_and_persisted(tmp_path):
    qm = QueryMean(tmp_path, 2, 3)
    assert qm.mean is None
    a, b = np.ones((2, 3), np.float32), np.full((2, 1, 3), 4.0, np.float32)  # [L, H, D] accepted too
    qm.observe(a, 3)
    qm.observe(b, 1)
    qm.observe(a * 100, 0)  # no tokens: ignored
    np.testing.assert_allclose(qm.mean, np.full((2, 3), (3 * 1 + 4) / 4))
    again = QueryMean(tmp_path, 2, 3)
    assert again.count == 4 and np.allclose(again.mean, qm.mean)
    assert QueryMean(tmp_path, 2, 5).mean is None  # another shape: starts empty
    with pytest.raises(PlanError):
        qm.observe(np.ones((2, 4)), 1)


def test_query_shapes():
    assert as_query_tokens(np.ones((3, 8)), 3, 8).shape == (1, 3, 8)
    assert as_query_tokens(np.ones((3, 2, 4)), 3, 8).shape == (1, 3, 8)
    assert as_query_tokens(np.ones((5, 3, 2, 4)), 3, 8).shape == (5, 3, 8)
    with pytest.raises(PlanError):
        as_query_tokens(np.ones((3, 7)), 3, 8)
    with pytest.raises(PlanError):
        as_query_tokens(np.ones((0, 3, 2, 4)), 3, 8)


def test_fold_heads_sums_each_gqa_group():
    q = np.arange(2 * 6 * 2, dtype=np.float32).reshape(2, 12)  # 6 heads of 2, groups of 3
    got = fold_heads(q, 3, 2)
    want = q.reshape(2, 2, 3, 2).sum(2).reshape(2, 4)
    np.testing.assert_array_equal(got, want)
    assert fold_heads(q, 1, 2) is q


def test_encode_centers_and_standardizes():
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((3, 2, 4)).astype(np.float32)
    mean = rng.standard_normal((2, 4)).astype(np.float32)
    sample = rng.standard_normal((2, 50, 2 * 4)).astype(np.float32)  # 2 vectors per event
    enc = encode_queries(tokens[:, :, None, :], num_layers=2, query_dim=4, mean=mean, rep_sample=sample, vectors=2)
    np.testing.assert_allclose(enc.tokens, tokens - mean[None], atol=1e-6)
    for lay in range(2):
        s = max_scores(sample[lay], enc.tokens[:, lay], 2) * enc.scale[:, lay, None]
        np.testing.assert_allclose(s.std(axis=1), 1.0, rtol=1e-4)
    plain = encode_queries(tokens[:, :, None, :], num_layers=2, query_dim=4)
    np.testing.assert_array_equal(plain.tokens, tokens)
    assert np.all(plain.scale == 1)
    only0 = encode_queries(tokens[:, :, None, :], num_layers=2, query_dim=4, rep_sample=sample, vectors=2,
                           layers=[0])
    assert np.all(only0.scale[:, 1] == 1) and not np.all(only0.scale[:, 0] == 1)


def _table(tmp_path, reps: np.ndarray, size: int = 4, vectors: int = 1) -> EventTable:
    n = reps.shape[0]
    t = EventTable.create(tmp_path, reps.shape[1], reps.shape[2], vectors=vectors)
    starts = 100 + size * np.arange(n)
    t.append(np.stack([starts, starts + size], 1), reps)
    return t


def test_centering_removes_what_every_query_attends_to(tmp_path):
    """Event 0's key is what the stream's average query points at (a 'sink'); event 1 matches the
    question's own direction. Raw scores pick the sink, centered scores the match."""
    d = 4
    reps = np.zeros((6, 1, d), np.float32)
    reps[0, 0] = [10, 0, 0, 0]  # sink
    reps[1, 0] = [0, 3, 0, 0]  # the needle
    reps[2:, 0, 2] = np.linspace(-1, 1, 4)
    ix = EventIndex.open(tmp_path, _table(tmp_path, reps), IndexParams())
    mean = QueryMean(None, 1, d)
    mean.observe(np.array([[1.0, 0, 0, 0]]), 100)
    question = np.array([[1.0, 1.0, 0, 0]], np.float32)  # average query + its own direction
    plain = Retriever(ix, raw(use_contiguity_buffer=False), query_mean=mean)
    centered = Retriever(ix, raw(use_contiguity_buffer=False, center_queries=True, standardize_queries=True),
                         query_mean=mean)
    assert plain.retrieve(question, 4).layers[0].ids == [0]
    assert centered.retrieve(question, 4).layers[0].ids == [1]


def test_multi_vector_events_score_by_their_best_vector(tmp_path):
    rng = np.random.default_rng(1)
    n, v, d = 40, 3, 8
    vecs = rng.standard_normal((n, v, d)).astype(np.float32)
    reps = vecs.reshape(n, 1, v * d)
    q = rng.standard_normal(d).astype(np.float32)
    want = (vecs @ q).max(axis=1)
    order = np.argsort(-want, kind="stable")
    for name, threshold in (("exact", 10**6), ("hnsw", 0)):
        path = tmp_path / name
        table = _table(path, reps, vectors=v)
        assert table.vectors == v and table.vector_dim == d
        ix = EventIndex.open(path, table, IndexParams(exact_threshold=threshold, ef=200))
        built = n if threshold == 0 else 0  # no HNSW graph below the build threshold (half the exact one)
        assert ix.dim == d and ix.count == built
        ids, scores = ix.search(0, q, 5)
        assert ids.tolist() == order[:5].tolist()
        np.testing.assert_allclose(scores, want[ids], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ix.scores(0, q, np.array([3, 7])), want[[3, 7]], rtol=1e-5)
        ix.save()
        again = EventIndex.open(path, EventTable.open(path, writable=True), IndexParams(exact_threshold=threshold))
        assert again.rebuilt_layers == [] and again.count == built


def test_retriever_multi_token_queries_and_score_layers(tmp_path):
    """Shared selection sums only the scoring layers; several query tokens average their scores."""
    d = 2
    reps = np.zeros((4, 2, d), np.float32)
    reps[0, 0] = [1, 0]  # layer 0 likes event 0 for token a
    reps[1, 0] = [0, 1]  # ... event 1 for token b
    reps[2, 1] = [5, 5]  # layer 1 (not scored) likes event 2
    reps[3, 0] = [0.6, 0.6]  # both tokens like event 3 a bit
    ix = EventIndex.open(tmp_path, _table(tmp_path, reps), IndexParams())
    r = Retriever(ix, raw(per_layer=False, use_contiguity_buffer=False, shared_score_layers=0.5))  # layer 0 of 2
    tokens = np.array([[[1, 0], [1, 0]], [[0, 1], [0, 1]]], np.float32)[:, :, None, :]  # [n=2, L, H=1, D]
    sel = r.retrieve(tokens, 4).layers[0]
    assert sel.ids == [3]  # mean over tokens: 0.6 beats 0.5 (events 0 and 1 each score 1 for one token)
    assert sel.events[0].score == pytest.approx(0.6)
    with pytest.raises(ConfigError):
        raw(shared_score_layers=1.5)

"""bench/lab/scale_sim.py: the shape fitted from a tokens table, synthetic events of that shape, and a small run
through the product's classes (the table, the token graph, both retrievers)."""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench.lab import scale_sim as sim
from emserve.retrieval.config import RetrievalConfig
from emserve.retrieval.events import EventTable


def _real_like_table(path, n=300, seed=0):
    layers = RetrievalConfig(repr_proxy="tokens").score_layers(sim.NUM_LAYERS)
    rng = np.random.default_rng(seed)
    t = EventTable.create(path, sim.NUM_LAYERS, sim.VECTORS * sim.WIDTH, vectors=sim.VECTORS, layers=layers)
    d = len(layers) * sim.WIDTH
    mean = rng.standard_normal(d).astype(np.float32)
    vecs = mean + rng.standard_normal((n, sim.VECTORS, 8)).astype(np.float32) @ rng.standard_normal((8, d)).astype(
        np.float32)
    sizes = rng.integers(8, 20, size=n)
    starts = 128 + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    t.append(np.stack([starts, starts + sizes], 1), sim.rows(vecs, len(layers)))
    return t, vecs


def test_shape_and_synthetic_events_follow_the_table(tmp_path):
    t, vecs = _real_like_table(tmp_path / "t")
    t.close()
    shape = sim.fit_shape(tmp_path / "t", sample=200, seed=0)
    d = vecs.shape[2]
    assert shape["basis"].shape == (sim.RANK, d) and shape["mean"].shape == (d,)
    np.testing.assert_allclose(shape["mean"], vecs.mean(axis=(0, 1)), atol=0.3)
    assert shape["spread"][7] > 10 * shape["spread"][8]  # the table's 8 latent directions
    assert shape["size_hist"][:8].sum() == 0 and shape["size_hist"].sum() == 300
    sizes, x = sim.Synth(shape, seed=1).events(500)
    assert x.shape == (500, sim.VECTORS, d) and sizes.min() >= 8 and sizes.max() < 20
    np.testing.assert_allclose(x.reshape(-1, d).mean(axis=0), shape["mean"], atol=0.5)
    q = sim.as_queries(x[0], 0.0, np.random.default_rng(0))
    assert q.shape == (sim.VECTORS, sim.NUM_LAYERS, sim.HEADS, sim.HEAD_DIM)
    folded = q.reshape(sim.VECTORS, sim.NUM_LAYERS, sim.KV_HEADS, sim.GROUP, sim.HEAD_DIM).sum(axis=3)
    np.testing.assert_allclose(folded[:, :20].reshape(sim.VECTORS, -1), x[0], rtol=1e-5, atol=1e-4)


def test_a_small_run_measures_every_checkpoint(tmp_path, monkeypatch):
    t, _ = _real_like_table(tmp_path / "t")
    t.close()
    np.savez(tmp_path / "shape.npz", **sim.fit_shape(tmp_path / "t", sample=200, seed=0))
    monkeypatch.setattr(sim, "write_results", lambda name, res: (tmp_path / f"{name}.json").write_text(
        json.dumps(res, default=str)) or tmp_path / f"{name}.json")
    args = argparse.Namespace(shape=tmp_path / "shape.npz", table_dtype="int8", tokens=6000, checkpoints=[3000, 6000],
                              queries=2, exact_upto=10**6, noise=0.5, threads=1, seed=0,
                              workdir=str(tmp_path / "w"), keep=False, out="sim")
    assert sim.run(args) == 0
    res = json.loads((tmp_path / "sim.json").read_text())
    assert [p["tokens"] >= c for p, c in zip(res["points"], (3000, 6000), strict=True)] == [True, True]
    for p in res["points"]:
        assert 0 <= p["step_recall"] <= 1 and 0 <= p["question_recall"] <= 1 and p["rss_anon_bytes"] > 0
        assert 1.0 < p["disk_vs_kv"] < 1.2  # an int8 table: ~1.5 KB per token beside 23 KB of KV
    assert not (tmp_path / "w").exists()

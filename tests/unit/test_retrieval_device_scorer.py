"""Device scoring (``retrieval.device_scorer``): the same selections as the CPU exact path.

On CPU (CI) the scorer runs on torch's CPU device in float32 and must select exactly what the numpy
exact path selects, for both rankings and across contiguity-buffer state; where a GPU is present the
same tests run there too (float32, then float16 against a recall bar).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emserve.retrieval.device_scorer import DeviceScorer, resolve_device
from emserve.retrieval.errors import PlanError
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import EventIndex, IndexParams
from emserve.retrieval.memory import NO_GRAPH
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


def pair(table, device, dtype=torch.float32, form="rq"):
    """A CPU-exact retriever and a device retriever over the same table, centred + standardized."""
    index = EventIndex.open(table.path, table, IndexParams(exact_threshold=NO_GRAPH), layers=())
    kw = dict(per_layer=False, score_layers=SCORE, standardize_queries=True, query_sample=64)
    cpu = Retriever(index, **kw)
    dev = Retriever(index, **kw, scorer=DeviceScorer(table, SCORE, device=device, dtype=dtype, form=form))
    return cpu, dev


def queries(rng, tokens):
    return rng.standard_normal((tokens, L, 1, V * D // V)).astype(np.float32) if tokens > 1 else \
        rng.standard_normal((L, D)).astype(np.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["rq", "qr"])
@pytest.mark.parametrize("rank,tokens", [("mean", 1), ("mean", 5), ("interleave", 8)])
def test_device_selects_what_exact_selects(tmp_path, device, form, rank, tokens):
    table = make_table(tmp_path)
    cpu, dev = pair(table, device, form=form)
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


def test_float16_keeps_the_selection(tmp_path):
    """float16 storage (the GPU default) against the float32 exact selection: most events agree."""
    table = make_table(tmp_path)
    cpu, dev = pair(table, "cuda" if torch.cuda.is_available() else "cpu", dtype=torch.float16)
    rng = np.random.default_rng(5)
    cpu.use_contiguity_buffer = dev.use_contiguity_buffer = False
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
        Retriever(index, per_layer=True, scorer=scorer)
    with pytest.raises(PlanError, match="shared selection"):
        Retriever(index, per_layer=False, score_layers=(0, 1), scorer=scorer)
    with pytest.raises(PlanError):
        DeviceScorer(table, (7,), device="cpu")
    assert resolve_device("cpu") is None and resolve_device(None) is None
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else None)
    if not torch.cuda.is_available():
        with pytest.raises(PlanError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(PlanError, match="unknown retrieval device"):
        resolve_device("tpu:x")

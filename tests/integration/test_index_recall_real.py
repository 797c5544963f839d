"""HNSW recall vs exact scoring on real event representatives of the default model (issue #4).

~6k tokens of ``big`` text go through a :class:`~emserve.server.session.Session` on the vLLM engine
(default model, :class:`MemoryConfig` with ``topk`` representatives: the per-layer graphs this test is
about; shared selection); a few
questions are probed for their query tokens as ``ask`` does. Then, on the session's own event table,
an index forced onto HNSW (``exact_threshold=0``) is compared with exact scoring:

* per scoring layer and query token, ``EventIndex.search`` top-k vs the exact top-k (k = 50 events);
* the retriever's selection (the default shared path with HNSW candidates) vs the exact selection.

About a minute on 2 idle CPU cores (ingestion ~250 tok/s, plus engine start).
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from model_sources import NEEDS_DEFAULT_MODEL

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed"),
    NEEDS_DEFAULT_MODEL,
]

TOKENS = 6000
K = 50
QUESTIONS = ("\n\nWhat is the pass key? The pass key is", "\n\nWho wrote the letter, and to whom?",
             "\n\nWhere did the soldiers go after the battle?")


async def _ingest_and_probe(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    from transformers import AutoTokenizer

    from emserve.server.engine.base import StepOptions
    from emserve.server.engine.config import EngineConfig
    from emserve.server.engine.vllm_engine import VLLMEngine
    from emserve.server.provision.corpus import load_text
    from emserve.server.provision.models import resolve_model
    from emserve.server.session import MemoryConfig, Session

    model = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(model.path)
    text = load_text("big")
    start = text.find(" ", len(text) // 3) + 1
    ids = tok(text[start : start + TOKENS * 8])["input_ids"][:TOKENS]
    engine = VLLMEngine(EngineConfig(model=str(model.path), kv_cache_gib=2))
    cfg = MemoryConfig.of(repr_proxy="topk")
    session = Session.create(tmp_path / "s", engine, cfg)
    try:
        await session.append(ids)
        await session.flush()
        planner = session.memory.planner
        queries = []
        for q in QUESTIONS:
            probe = await engine.step(planner.probe_plan(session.num_tokens, tok(q)["input_ids"]),
                                      options=StepOptions(surprise=False, query_tokens=cfg.question.query_tokens))
            assert probe.query_tokens is not None
            queries.append(probe.query_tokens)
    finally:
        session.close()
        await engine.close()
    return tmp_path / "s", queries


@pytest.mark.timeout(600)
def test_hnsw_recall_vs_exact_on_real_representatives(tmp_path: Path) -> None:
    from dataclasses import replace

    from emserve.retrieval.events import EventTable
    from emserve.retrieval.index import EventIndex
    from emserve.retrieval.queries import QueryMean
    from emserve.retrieval.retriever import Retriever
    from emserve.server.session import LOG_DIR, MemoryConfig

    loop = asyncio.new_event_loop()
    try:
        path, queries = loop.run_until_complete(_ingest_and_probe(tmp_path))
    finally:
        loop.close()
    log = path / LOG_DIR
    table = EventTable.open(log)
    n = len(table)
    assert n > 4 * K, f"only {n} events"
    cfg = MemoryConfig.of(repr_proxy="topk").bound(8192).retrieval
    num_layers = table.num_layers
    params = replace(cfg.index_params(), exact_threshold=0)
    layers = cfg.indexed_layers(num_layers)
    # HNSW indexes built anew (in another directory) over the session's table, and a read-only twin
    # of them that searches exactly
    (tmp_path / "forced").mkdir()
    index = EventIndex(tmp_path / "forced", table, params, layers=layers)
    index.save()
    exact_index = EventIndex(tmp_path / "forced", table, replace(params, exact_threshold=10**9),
                             writable=False, layers=layers)
    heads, head_dim = queries[0].shape[2:]
    mean = QueryMean(log, num_layers, heads * head_dim)
    kw = dict(query_mean=mean, query_group=heads * head_dim // table.vector_dim, head_dim=head_dim)
    hnsw = Retriever(index, cfg, **kw)  # type: ignore[arg-type]
    exact = Retriever(exact_index, cfg, **kw)  # type: ignore[arg-type]
    bounded = Retriever(index, replace(cfg, shared_rescore_factor=3.0, shared_search_vectors=128),
                        **kw)  # type: ignore[arg-type]

    hits = total = 0
    for q in queries:
        enc = hnsw.encode(q)
        for layer in hnsw.score_layers:
            for i in range(enc.tokens.shape[0]):
                a = index.search(layer, enc.tokens[i, layer], K, exact=False)[0]
                b = index.search(layer, enc.tokens[i, layer], K, exact=True)[0]
                hits += len(set(a.tolist()) & set(b.tolist()))
                total += K
    index_recall = hits / total
    selection_recall, bounded_recall = [], []
    for q in queries:
        for r in (hnsw, exact, bounded):
            r.reset_buffers()
        want = exact.retrieve(q, cfg.n_mem).layers[0]
        b = set(want.ids)
        selection_recall.append(len(set(hnsw.retrieve(q, cfg.n_mem).layers[0].ids) & b) / len(b))
        got = set(bounded.retrieve(q, cfg.n_mem).layers[0].ids)
        bounded_recall.append(len(got & b) / len(b))
        assert max(want.events, key=lambda e: e.score).id in got  # the best event survives bounded rescoring
    print(f"{n} events: per-layer HNSW recall@{K} {index_recall:.4f}; selection recall (union of HNSW "
          f"candidates) {selection_recall}; bounded rescoring x3 (opt-in) {bounded_recall}")
    assert index_recall >= 0.95
    assert min(selection_recall) >= 0.95

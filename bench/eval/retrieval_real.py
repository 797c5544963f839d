"""The default retrieval path on a real long session: per-step latency and selection recall vs exact.

``bench/eval/retrieval_index.py`` measures 100k / 1M tokens on synthetic representatives (fitted to real
ones) and 1M on 4 of the 20 scoring layers. This bench takes a kept session instead (e.g. the 1M
stream of ``bench/eval/eval.py --long-1m --keep``: ~100k real events, 20 real HNSW graphs) and runs the
product's :class:`~emserve.retrieval.retriever.Retriever`, configured as the session's
:class:`~emserve.retrieval.memory.EpisodicMemory` configures it, on real queries of the same model and
corpus (``bench/lab/retrieval_capture.py``: 8 questions x 4 query tokens with the question budget,
32 ingestion query summaries with the ingestion budget), centered on the session's own mean query:

* ``exact``: every event scored (the reference selection);
* ``union``: the default HNSW path (per-layer top-k of every scoring layer and query token, rescored
  exactly), at the default search ``ef`` and at larger ones (``--efs``; hnswlib searches with
  ``max(ef, k V)``);
* ``bounded xF`` (opt-in ``shared_rescore_factor``).

Per path: retrieval time per step p50 / p99 (one thread; the page cache warm after a first pass),
selection recall vs exact (``|selected & exact| / |exact|``, mean and min) and top-10 recall (the
exact ranking's 10 best among the selected). Contiguity buffers are reset before every step, so
each step's selection depends on its queries only.

    .venv/bin/python -m bench.eval.retrieval_real --session DIR/log [--efs 1600,3200] [--factors 3]
        [--kinds ask,chunk,ask64]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.eval.common import long_questions, machine, session_retrieval_config, table, write_results
from emserve.retrieval.config import RetrievalConfig
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import EventIndex, IndexParams
from emserve.retrieval.memory import build_retriever
from emserve.retrieval.queries import QueryMean
from emserve.retrieval.retriever import RetrievalResult, Retriever, interleave

REAL = Path.home() / ".cache" / "emserve" / "bench" / "real16k"
HEADS, HEAD_DIM = 9, 64


def retriever(index: EventIndex, cfg: RetrievalConfig, qm: QueryMean, factor: float = 0.0,
              candidates: float = 1.5) -> Retriever:
    """The session's retriever (``build_retriever``), with a bounded-rescoring factor / candidate factor."""
    return build_retriever(index, replace(cfg, shared_rescore_factor=factor), qm, num_heads=HEADS, head_dim=HEAD_DIM,
                           candidate_factor=candidates)


def similar(res: RetrievalResult) -> set[int]:
    return {e.id for e in res.layers[0].events}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--session", required=True, help="a session's log folder (event table, indexes, query mean)")
    ap.add_argument("--efs", default="1600,3200", help="search ef values of the union path beyond the default")
    ap.add_argument("--factors", default="3", help="rescore factors of the bounded path")
    ap.add_argument("--candidate-factors", default="", help="candidate_factor values of the union path beyond "
                    "the default (1.5): each HNSW list covers this many times the budget")
    ap.add_argument("--kinds", default="ask,chunk",
                    help="step kinds: ask (8 questions x 4 query tokens, mean ranking), chunk (32 ingestion "
                    "summaries), ask64 (the 8 questions with 64 query tokens each, interleaved ranking, the "
                    "session default: each question's 4 tokens last, after 28 of the others' and the 32 summaries)")
    ap.add_argument("--out", default="retrieval_real")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]

    log = Path(args.session)
    cfg: RetrievalConfig = session_retrieval_config(log)
    tbl = EventTable.open(log)
    if tbl.vector_dim != 3 * HEAD_DIM:  # the capture's queries are SmolLM2-135M's (9 heads, 3 kv heads of 64)
        raise SystemExit(f"{log} is not a SmolLM2-135M session (vectors of {tbl.vector_dim}); the real queries are")
    n = len(tbl)
    layers = cfg.indexed_layers(tbl.num_layers)
    t0 = time.perf_counter()
    index = EventIndex.open(log, tbl, cfg.index_params(), writable=False, layers=layers)
    open_s = time.perf_counter() - t0
    exact_index = EventIndex.open(log, tbl, IndexParams(), writable=False, layers=())  # no graph: exact
    qm = QueryMean(log, tbl.num_layers, HEADS * HEAD_DIM)
    tokens = int(tbl.ends[n - 1]) if n else 0
    print(f"{log}: {n} events ({tokens} tokens), {len(layers)} HNSW graphs opened in {open_s:.1f} s; "
          f"exact: {'yes' if index.uses_exact(n) else 'no'} at this size", flush=True)
    q = np.load(REAL / "queries.npz")
    ask, chunk = list(q["ask_queries"]), list(q["chunk_queries"])
    ask64 = long_questions(ask, chunk)
    sets: dict[str, list[tuple[str, np.ndarray, int, str]]] = {
        "ask": [("ask", x, cfg.question_n_mem, "mean") for x in ask],
        "chunk": [("chunk", x, cfg.n_mem, "mean") for x in chunk],
        "ask64": [("ask64", x, cfg.question_n_mem, "interleave") for x in ask64],
    }
    steps = [s for k in kinds for s in sets[k]]

    def run(r: Retriever) -> tuple[list[RetrievalResult], list[float]]:
        out, ts = [], []
        for _, x, budget, rank in steps:
            r.reset_buffers()
            t = time.perf_counter()
            out.append(r.retrieve(x, budget, rank=rank))  # type: ignore[arg-type]
            ts.append(time.perf_counter() - t)
        return out, ts

    exact_r = retriever(exact_index, cfg, qm)
    run(exact_r)  # warm the page cache and the representative sample
    ref, ref_t = run(exact_r)
    top10 = []
    for _, x, _, rank in steps:  # the exact ranking's 10 best (interleaved for ask64)
        enc = exact_r.encode(x)
        if rank == "interleave":
            top10.append(set(interleave(exact_r.token_scores(enc, None))[:10].tolist()))
        else:
            scores = exact_r.scores(enc, None)
            top10.append(set(np.argsort(-scores, kind="stable")[:10].tolist()))
    paths: list[tuple[str, Retriever, int | None]] = [
        ("exact", exact_r, None), (f"union (ef {cfg.hnsw_ef})", retriever(index, cfg, qm), cfg.hnsw_ef)]
    paths += [(f"union (ef {ef})", retriever(index, cfg, qm), ef) for ef in (int(x) for x in args.efs.split(",") if x)]
    paths += [(f"union (candidates x{c:g})", retriever(index, cfg, qm, candidates=c), cfg.hnsw_ef)
              for c in (float(x) for x in args.candidate_factors.split(",") if x)]
    paths += [(f"bounded x{f:g}", retriever(index, cfg, qm, f), cfg.hnsw_ef)
              for f in (float(x) for x in args.factors.split(",") if x)]
    rows: list[dict[str, Any]] = []
    for name, r, ef in paths:
        if ef is not None:
            index.set_ef(ef)
        if r is exact_r:
            got, ts = ref, ref_t
        else:
            run(r)
            got, ts = run(r)
        for kind in kinds:
            idx = [i for i, s in enumerate(steps) if s[0] == kind]
            rec = [len(similar(got[i]) & similar(ref[i])) / max(1, len(similar(ref[i]))) for i in idx]
            t10 = [len(top10[i] & similar(got[i])) / 10 for i in idx]
            tms = [ts[i] * 1e3 for i in idx]
            rows.append({"path": name, "steps": kind, "n": len(idx),
                         "p50_ms": float(np.percentile(tms, 50)), "p99_ms": float(np.percentile(tms, 99)),
                         "selection_recall_mean": float(np.mean(rec)), "selection_recall_min": float(np.min(rec)),
                         "top10_recall": float(np.mean(t10))})
            print(f"  {name:>18} {kind:>5}: {rows[-1]['p50_ms']:7.1f} / {rows[-1]['p99_ms']:7.1f} ms, "
                  f"selection recall {rows[-1]['selection_recall_mean']:.3f} (min "
                  f"{rows[-1]['selection_recall_min']:.3f}), top-10 {rows[-1]['top10_recall']:.3f}", flush=True)
    cols = list(rows[0])
    print(table(cols, [[r[c] for c in cols] for r in rows]))
    out = write_results(args.out, {"machine": machine(), "session": str(log), "events": n, "tokens": tokens,
                                   "graphs_open_s": open_s, "config": {**vars(args), "hnsw_ef": cfg.hnsw_ef,
                                                                       "n_mem": cfg.n_mem,
                                                                       "question_n_mem": cfg.question_n_mem},
                                   "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

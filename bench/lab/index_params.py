"""HNSW build parameters on real representatives at scale: what ``ef_construction`` costs and buys.

At 1M tokens a session closes ~47 events per 512-token chunk, and adding their vectors to the 20
per-layer graphs (``ef_construction`` 200, 2 threads) took 1.1 s of a 3 s step
(``bench/results/session_profile-1m-warm.json``). This bench measures, per ``ef_construction``, on the
real representatives of a kept session (e.g. the 1M stream of ``bench/eval/eval.py --long-1m --keep``):

* **build**: the first ``--events`` events of the table added to a fresh graph (ms per event, per layer);
* **add at scale**: the next ``--tail`` events added in chunks of ``--chunk`` events, as a session's
  steps add them (ms per event per layer; x ``len(indexed layers)`` is a step's index cost);
* **recall** of the events the default path asks each layer for (``k`` events = ``k * V`` vectors, ``ef
  = max(ef, k V)`` as :class:`~emserve.retrieval.index.EventIndex`) against the exact top-``k`` of the same
  vectors, for the real query tokens of ``bench/lab/retrieval_capture.py`` (8 questions x 4 tokens + 32
  ingestion summaries of the same model on the same corpus), centered on the session's mean query and
  standardized as the retriever does; and the search time.

Graphs are centered as the product's (mean vector of the first 64 events). Threads: ``--threads``
for adds (the product's default on 2 cores: 2), one for searches.

    .venv/bin/python -m bench.lab.index_params --session DIR/log [--layers 1,10,19] [--ef-construction 200,100,64,32]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import time
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from bench.eval.common import machine, session_retrieval_config, table, write_results
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import EventIndex, IndexParams
from emserve.retrieval.memory import build_retriever
from emserve.retrieval.queries import QueryMean

REAL = Path.home() / ".cache" / "emserve" / "bench" / "real16k"
SCORE_LAYERS, KV_HEADS, HEAD_DIM, HEADS = 20, 3, 64, 9


def queries(log: Path, tbl: EventTable) -> np.ndarray:
    """Real query tokens, encoded by the session's retriever: ``[n, L, kv_dim]`` (scale applied)."""
    q = np.load(REAL / "queries.npz")
    qm = QueryMean(log, tbl.num_layers, HEADS * HEAD_DIM)
    if qm.mean is None:
        raise SystemExit(f"{log} has no query mean (query_mean.npz)")
    exact = EventIndex.open(log, tbl, IndexParams(), writable=False, layers=())  # no graph is loaded
    r = build_retriever(exact, session_retrieval_config(log), qm, num_heads=HEADS, head_dim=HEAD_DIM)
    toks = []
    for raw in list(q["ask_queries"]) + list(q["chunk_queries"]):
        enc = r.encode(raw)
        toks.append(enc.tokens * enc.scale[..., None])
    return np.concatenate(toks)


def exact_events(vecs: np.ndarray, q: np.ndarray, k: int, v: int) -> list[set[int]]:
    """Exact top-``k`` events (``max_j``) per query row."""
    s = (vecs @ q.T).reshape(-1, v, q.shape[0]).max(axis=1)  # [E, nq]
    top = np.argpartition(-s, k, axis=0)[:k]
    return [set(top[:, i].tolist()) for i in range(q.shape[0])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--session", required=True, help="a session's log folder (event table + query_mean.npz)")
    ap.add_argument("--layers", default="1,10,19")
    ap.add_argument("--ef-construction", default="200,100,64,32")
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef", type=int, default=64)
    ap.add_argument("--events", type=int, default=48000, help="events in the graph before the timed adds")
    ap.add_argument("--tail", type=int, default=2400, help="events added after, timed")
    ap.add_argument("--chunk", type=int, default=48, help="events per add call (a 512-token step at 1M: ~47)")
    ap.add_argument("--k", default="50,200", help="events asked per search (the default path asks ~200 at n_mem 1024)")
    ap.add_argument("--search-ef", default="", help="also: recall@k (first k) at these search ef values (beyond "
                    "the product's max(ef, k V)), e.g. 400,800,1600")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="index_params")
    args = ap.parse_args()

    log = Path(args.session)
    tbl = EventTable.open(log)
    v, d = tbl.vectors, tbl.vector_dim
    if d != KV_HEADS * HEAD_DIM:  # the capture's queries are SmolLM2-135M's
        raise SystemExit(f"{log} is not a SmolLM2-135M session (vectors of {d}); the real queries are")
    n = min(len(tbl), args.events + args.tail)
    base = n - args.tail
    if base < 64:
        raise SystemExit(f"the table has {len(tbl)} events: too few for --events {args.events} --tail {args.tail}")
    layers = [int(x) for x in args.layers.split(",")]
    efcs = [int(x) for x in args.ef_construction.split(",")]
    ks = [int(x) for x in args.k.split(",")]
    qs = queries(log, tbl)
    print(f"{log}: {len(tbl)} events, using {n} ({base} built + {args.tail} added in chunks of {args.chunk}); "
          f"{qs.shape[0]} query tokens; layers {layers}; ef_construction {efcs}", flush=True)
    rows: list[dict[str, Any]] = []
    for layer in layers:
        vecs = np.ascontiguousarray(tbl.reps_of(layer, np.arange(n)).reshape(n * v, d), np.float32)
        data = vecs - vecs[: 64 * v].mean(0)
        q = np.ascontiguousarray(qs[:, layer])
        truth = {k: exact_events(vecs, q, k, v) for k in ks}
        for efc in efcs:
            h = hnswlib.Index(space="ip", dim=d)
            h.init_index(max_elements=n * v, ef_construction=efc, M=args.m, random_seed=100)
            t0 = time.perf_counter()
            h.add_items(data[: base * v], np.arange(base * v), num_threads=args.threads)
            build_ms = (time.perf_counter() - t0) / base * 1e3
            t0 = time.perf_counter()
            for s in range(base, n, args.chunk):
                e = min(n, s + args.chunk)
                h.add_items(data[s * v:e * v], np.arange(s * v, e * v), num_threads=args.threads)
            add_ms = (time.perf_counter() - t0) / args.tail * 1e3
            row: dict[str, Any] = {"layer": layer, "ef_construction": efc, "M": args.m, "events": n,
                                   "build_ms_per_event": build_ms, "add_ms_per_event_at_scale": add_ms}
            for k in ks:
                h.set_ef(max(args.ef, k * v))
                hits, ts, failed = 0, [], 0
                for i in range(q.shape[0]):
                    t0 = time.perf_counter()
                    try:
                        labels, _ = h.knn_query(q[i:i + 1], k=k * v, num_threads=1)
                    except RuntimeError:  # fewer than k*V vectors reachable: the retriever falls back to exact
                        failed += 1
                        continue
                    ts.append(time.perf_counter() - t0)
                    ev = labels[0] // v
                    _, first = np.unique(ev, return_index=True)
                    hits += len(set(ev[np.sort(first)][:k].tolist()) & truth[k][i])
                row[f"recall@{k}"] = hits / (k * q.shape[0])  # a failed search counts 0 hits
                row[f"failed@{k}"] = failed
                row[f"search_ms@{k}"] = float(np.median(ts) * 1e3) if ts else None
            for ef in [int(x) for x in args.search_ef.split(",") if x]:
                k = ks[0]
                h.set_ef(ef)
                hits, ts = 0, []
                for i in range(q.shape[0]):
                    t0 = time.perf_counter()
                    labels, _ = h.knn_query(q[i:i + 1], k=k * v, num_threads=1)
                    ts.append(time.perf_counter() - t0)
                    ev = labels[0] // v
                    _, first = np.unique(ev, return_index=True)
                    hits += len(set(ev[np.sort(first)][:k].tolist()) & truth[k][i])
                row.setdefault("search_ef", []).append({"ef": ef, f"recall@{k}": hits / (k * q.shape[0]),
                                                        "search_ms": float(np.median(ts) * 1e3)})
                print(f"    search ef {ef}: recall@{k} {hits / (k * q.shape[0]):.3f}, "
                      f"{np.median(ts) * 1e3:.2f} ms", flush=True)
            rows.append(row)
            print(f"  layer {layer:2d} ef_c {efc:3d}: build {build_ms:.3f} ms/ev, add {add_ms:.3f} ms/ev, "
                  + ", ".join(f"recall@{k} {row[f'recall@{k}']:.3f} ({row[f'failed@{k}']} failed)" for k in ks),
                  flush=True)
            del h
    cols = ["layer", "ef_construction", "build_ms_per_event", "add_ms_per_event_at_scale"] + \
        [c for k in ks for c in (f"recall@{k}", f"failed@{k}", f"search_ms@{k}")]
    print(table(cols, [[r[c] for c in cols] for r in rows]))
    summary = []
    for efc in efcs:
        sub = [r for r in rows if r["ef_construction"] == efc]
        add = float(np.mean([r["add_ms_per_event_at_scale"] for r in sub]))
        summary.append({"ef_construction": efc, "add_ms_per_event_20_layers": add * SCORE_LAYERS,
                        **{f"min_recall@{k}": min(r[f"recall@{k}"] for r in sub) for k in ks},
                        **{f"mean_recall@{k}": float(np.mean([r[f"recall@{k}"] for r in sub])) for k in ks}})
    print(table(list(summary[0]), [list(r.values()) for r in summary]))
    out = write_results(args.out, {"machine": machine(), "session": str(log), "table_events": len(tbl),
                                   "config": vars(args), "query_tokens": int(qs.shape[0]),
                                   "rows": rows, "summary": summary})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""The product's token graph (``retrieval/token_graph.py``) against exact token-level scoring, on real vectors.

``bench/lab/token_index.py`` measured one graph over token vectors with its own code; this runs the
product's classes instead: an ``EventTable`` of ``"tokens"`` representatives, the ``TokenGraph`` built as a
session builds it (lazy start at the build threshold, the projection fitted on the first events, adds in
order), and two retrievers from ``build_retriever``: exact (every event scored) and through the graph
(``GRAPH_CANDIDATE_FACTOR``). Per query it compares what ``Retriever.retrieve`` selects:

* ingestion steps (one query summary, ranked by the mean, ``n_mem`` tokens, no contiguity buffer):
  selection recall ``|graph & exact| / |exact|``;
* questions (64 query tokens, ``interleave``, no neighbours, no buffer), at the question budget and at
  ``n_mem``: the same recall, for each ``interleave_stats``;
* the graph path's retrieval time per query (one thread; the machine may be shared: see ``machine``).

Data (``token_index.py --cache``): the token vectors of the 1M run's reference haystack (the first 74,443
events) and real queries of the model on its text (12 ingestion chunks, 39 questions). The session itself
is gone, so two things are stand-ins: the stream's mean query is the mean of the 12 chunk summaries, and
event sizes are those of another real session's events (``--sizes-from``, cycled); both only shape the
selection, the same for the two retrievers.

    .venv/bin/python -m bench.lab.token_graph_real --cache /tmp/ti-cache --sizes-from SESSION/log/events.i64
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.eval.common import machine, table, wilson, write_results
from emserve.retrieval.config import RetrievalConfig
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import EventIndex, IndexParams
from emserve.retrieval.memory import GRAPH_CANDIDATE_FACTOR, build_retriever
from emserve.retrieval.queries import QueryMean
from emserve.retrieval.token_graph import TokenGraph

HEADS, KV_HEADS, HEAD_DIM, VECTORS, NUM_LAYERS = 9, 3, 64, 4, 30
WIDTH = KV_HEADS * HEAD_DIM


def build_table(path: Path, vecs: np.ndarray, sizes: np.ndarray, layers: range) -> EventTable:
    """The ``"tokens"`` table of ``vecs [n, V, layers * WIDTH]`` (made once; reused when complete)."""
    n = vecs.shape[0]
    if (path / "events.i64").exists():
        t = EventTable.open(path)
        if len(t) == n:
            return t
        t.close()
        for f in path.iterdir():
            f.unlink()
    path.mkdir(parents=True, exist_ok=True)
    t = EventTable.create(path, NUM_LAYERS, VECTORS * WIDTH, vectors=VECTORS, layers=layers)
    starts = 128 + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for a in range(0, n, 4096):
        b = min(n, a + 4096)
        per_token = np.asarray(vecs[a:b], np.float32).reshape(b - a, VECTORS, len(layers), WIDTH)
        reps = per_token.transpose(0, 2, 1, 3).reshape(b - a, len(layers), VECTORS * WIDTH)
        t.append(np.stack([starts[a:b], starts[a:b] + sizes[a:b]], 1), reps)
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True, help="token_index.py's cache folder")
    ap.add_argument("--events", type=int, default=74443)
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--questions", type=int, default=39)
    ap.add_argument("--sizes-from", type=Path, required=True, help="events.i64 of a real session")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/token-graph-real"))
    ap.add_argument("--dim", type=int, default=128, help="the graph's projection")
    ap.add_argument("--candidate-factor", type=float, default=GRAPH_CANDIDATE_FACTOR,
                    help="the graph retriever's candidate_factor (default: the product's)")
    ap.add_argument("--build-at", type=int, default=None,
                    help="events at which the graph starts, its projection fitted on them (default: the "
                         "product's build threshold; the table's size: a fit over every event)")
    ap.add_argument("--out", default="token_graph-1m")
    args = ap.parse_args()

    vecs = np.load(args.cache / f"vectors-{args.events}.npy", mmap_mode="r")
    with np.load(args.cache / f"queries-{args.events}-{args.chunks}-{args.questions}.npz") as f:
        queries = [np.asarray(f[f"q{i}"], np.float32) for i in range(args.chunks + args.questions)]
    ev = np.fromfile(args.sizes_from, np.int64).reshape(-1, 2)
    real_sizes = ev[:, 1] - ev[:, 0]
    sizes = np.resize(real_sizes, vecs.shape[0]).astype(np.int64)
    cfg = RetrievalConfig(repr_proxy="tokens")
    layers = cfg.score_layers(NUM_LAYERS)
    t0 = time.perf_counter()
    tab = build_table(args.workdir / "table", vecs, sizes, layers)
    print(f"table of {len(tab)} events ready in {time.perf_counter() - t0:.0f} s", flush=True)

    qm = QueryMean(None, NUM_LAYERS, HEADS * HEAD_DIM)
    for q in queries[: args.chunks]:
        qm.observe(q.reshape(NUM_LAYERS, -1), 512)
    params = cfg.index_params()
    exact_ix = EventIndex.open(args.workdir / "table", tab, dataclasses.replace(params, exact_threshold=1 << 62),
                               layers=())
    exact = build_retriever(exact_ix, cfg, qm, num_heads=HEADS, head_dim=HEAD_DIM)
    build_at = params.build_at if args.build_at is None else args.build_at
    graph_dir = args.workdir / f"graph-{args.dim}-{build_at}"
    graph_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    graph = TokenGraph(graph_dir, tab, layers, dataclasses.replace(params, num_threads=1, build_threshold=build_at),
                       dim=args.dim)
    build_s = time.perf_counter() - t0
    graph.save()
    print(f"token graph over {graph.count} events ({graph.count * VECTORS} vectors, dim {graph.dim}) in "
          f"{build_s:.0f} s{' (loaded)' if not graph.rebuilt else ''}; {graph.disk_bytes() / 2**20:.0f} MiB on disk",
          flush=True)
    graph_ix = EventIndex.open(args.workdir / "table", tab, params, layers=())
    fast = build_retriever(graph_ix, cfg, qm, num_heads=HEADS, head_dim=HEAD_DIM, graph=graph,
                           candidate_factor=args.candidate_factor)

    q_budget = cfg.question_n_mem or cfg.n_mem
    cells: dict[str, list[float]] = {}
    ms: dict[str, list[float]] = {}
    rows_out: list[dict[str, Any]] = []

    def compare(name: str, i: int, q: np.ndarray, budget: int, rank: str) -> None:
        exact.reset_buffers()
        fast.reset_buffers()
        want = exact.retrieve(q, budget, rank=rank, contiguity=False)
        s0 = time.perf_counter()
        got = fast.retrieve(q, budget, rank=rank, contiguity=False)
        dt = 1000 * (time.perf_counter() - s0)
        assert want.exact and not got.exact
        a, b = set(want.layers[0].ids), set(got.layers[0].ids)
        r = len(a & b) / max(1, len(a))
        cells.setdefault(name, []).append(r)
        ms.setdefault(name, []).append(dt)
        rows_out.append({"cell": name, "query": i, "recall": r, "ms": dt, "exact_events": len(a)})

    for i, q in enumerate(queries):
        if i < args.chunks:
            compare(f"chunk n_mem {cfg.n_mem}", i, q, cfg.n_mem, "mean")
            continue
        for stats in ("scored", "sample"):
            c = dataclasses.replace(cfg, interleave_stats=stats)
            exact.config = fast.config = c
            compare(f"question {stats} {q_budget}", i, q, q_budget, "interleave")
            compare(f"question {stats} {cfg.n_mem}", i, q, cfg.n_mem, "interleave")
        exact.config = fast.config = cfg
        print(f"question {i - args.chunks + 1}/{args.questions}", flush=True)

    headers = ["cell", "n", "recall mean", "min", "all found", "Wilson 95% (all found)", "ms p50", "ms p99"]
    rows, summary = [], []
    for name, xs in cells.items():
        full = sum(x == 1.0 for x in xs)
        lo, hi = wilson(full, len(xs))
        p50, p99 = np.percentile(ms[name], 50), np.percentile(ms[name], 99)
        rows.append([name, len(xs), f"{np.mean(xs):.3f}", f"{np.min(xs):.2f}", f"{full}/{len(xs)}",
                     f"[{lo:.2f}, {hi:.2f}]", f"{p50:.0f}", f"{p99:.0f}"])
        summary.append({"cell": name, "n": len(xs), "recall_mean": float(np.mean(xs)), "recall_min": float(np.min(xs)),
                        "all_found": full, "ms_p50": float(p50), "ms_p99": float(p99)})
    print(table(headers, rows))
    res = {"machine": machine(), "events": len(tab), "vectors": graph.count * VECTORS, "dim": graph.dim,
           "candidate_factor": args.candidate_factor, "build_at": build_at,
           "graph_build_s": build_s if graph.rebuilt else None,
           "graph_disk_bytes": graph.disk_bytes(), "params": dataclasses.asdict(params),
           "stand_ins": {"query_mean": f"mean of the {args.chunks} chunk summaries",
                         "sizes": f"{args.sizes_from} cycled ({real_sizes.shape[0]} events, mean "
                                  f"{float(real_sizes.mean()):.2f})"},
           "summary": summary, "rows": rows_out,
           "index_params": dataclasses.asdict(IndexParams())}
    print(f"wrote {write_results(args.out, res)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Retrieval index benchmark: event table + per-layer HNSW indexes on synthetic clustered representatives.

For sessions of 10k / 100k / 1M tokens (events = tokens / 64 on average, sizes 8..120), with
30 layers of dim 576 (SmolLM2-135M: 9 heads x 64), each size in its own process:

* add cost per event (all layers): event-table append + index add (hnswlib, events closed in
  batches of 8 as one 512-token chunk would close them), including the geometric auto-saves;
* query latency per step (all layers), p50 / p99: raw index search (exact and HNSW, k = 80, what the
  retriever asks for a 2048-token budget) and a full ``Retriever.retrieve`` (budget 2048,
  contiguity buffer on) on the path the default threshold picks;
* recall@10 and recall@80 of HNSW against exact search;
* resident memory (RssAnon: the hnswlib graphs; RssFile: mapped representatives touched), disk bytes;
* save and reopen (load + ``set_ef``) time.

The 1M session is measured on ``--layers-1m`` of the 30 layers (indexes are independent per
layer) and add cost, query latency, memory and disk are scaled to 30 layers: the table says so.
numpy/BLAS run single-threaded (one session's share of a server).

    .venv/bin/python bench/retrieval_index.py [--sizes 10000,100000,1000000] [--layers-1m 6] [--steps 200]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_results  # noqa: E402

from emserve.retrieval.events import EventTable  # noqa: E402
from emserve.retrieval.index import EventIndex, IndexParams  # noqa: E402
from emserve.retrieval.retriever import Retriever  # noqa: E402

LAYERS, DIM, AVG_EVENT, BATCH, K, BUDGET = 30, 576, 64, 8, 80, 2048


def rss() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0]) * 1024
    return out


def one(tokens: int, layers: int, steps: int, workdir: str) -> dict[str, Any]:
    rng = np.random.default_rng(tokens)
    n = tokens // AVG_EVENT
    centres = rng.standard_normal((layers, 256, DIM)).astype(np.float32)
    sizes = rng.integers(8, 121, n)
    starts = 128 + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    path = Path(tempfile.mkdtemp(dir=workdir))
    params = IndexParams()
    # queries: a cluster centre + noise, per layer (like a step's query summary)
    qs = [centres[np.arange(layers), rng.integers(0, 256, layers)]
          + 0.5 * rng.standard_normal((layers, DIM), dtype=np.float32) for _ in range(steps)]
    base = rss()
    tbl = EventTable.create(path, layers, DIM)
    ix = EventIndex.open(path, tbl, params)
    t_table = t_index = 0.0
    for lo in range(0, n, BATCH):
        hi = min(n, lo + BATCH)
        pick = rng.integers(0, 256, (hi - lo, layers))
        noise = rng.standard_normal((hi - lo, layers, DIM), dtype=np.float32)
        reps = centres[np.arange(layers)[None, :], pick] + 0.3 * noise
        t0 = time.perf_counter()
        tbl.append(np.stack([starts[lo:hi], starts[lo:hi] + sizes[lo:hi]], 1), reps)
        t1 = time.perf_counter()
        ix.sync()
        t2 = time.perf_counter()
        t_table += t1 - t0
        t_index += t2 - t1
    t0 = time.perf_counter()
    ix.save()
    t_save = time.perf_counter() - t0

    lat: dict[str, list[float]] = {"exact": [], "hnsw": [], "retrieve": []}
    r10 = r80 = 0
    for q in qs:
        t0 = time.perf_counter()
        ex = [ix.search(layer, q[layer], K, exact=True)[0] for layer in range(layers)]
        t1 = time.perf_counter()
        hn = [ix.search(layer, q[layer], K, exact=False)[0] for layer in range(layers)]
        t2 = time.perf_counter()
        lat["exact"].append(t1 - t0)
        lat["hnsw"].append(t2 - t1)
        for e, h in zip(ex, hn, strict=True):
            r10 += len(set(e[:10].tolist()) & set(h[:10].tolist()))
            r80 += len(set(e.tolist()) & set(h.tolist()))
    retr = Retriever(ix)
    for q in qs:
        t0 = time.perf_counter()
        res = retr.retrieve(q, BUDGET)
        lat["retrieve"].append(time.perf_counter() - t0)
        assert res.tokens == min(BUDGET, res.memory_tokens)
    mem = rss()
    disk = tbl.disk_bytes() + ix.disk_bytes()

    # reopen: load every layer's index, set_ef, check identical answers
    tbl.close()
    t0 = time.perf_counter()
    tbl2 = EventTable.open(path, writable=True)
    ix2 = EventIndex.open(path, tbl2, params)
    t_open = time.perf_counter() - t0
    assert ix2.rebuilt_layers == [] and ix2.ef == [params.ef] * layers
    same = all(np.array_equal(ix2.search(0, q[0], K, exact=False)[0], ix.search(0, q[0], K, exact=False)[0])
               for q in qs[:20])

    # ef sweep on the reopened index (recall@80, HNSW latency all layers)
    sweep = {}
    for ef in (32, 128):
        ixe = EventIndex.open(path, tbl2, IndexParams(ef=ef), writable=False)
        hits, ts = 0, []
        for q in qs[:50]:
            t0 = time.perf_counter()
            hn = [ixe.search(layer, q[layer], K, exact=False)[0] for layer in range(layers)]
            ts.append(time.perf_counter() - t0)
            ex = [ixe.search(layer, q[layer], K, exact=True)[0] for layer in range(layers)]
            hits += sum(len(set(e.tolist()) & set(h.tolist())) for e, h in zip(ex, hn, strict=True))
        sweep[ef] = {"recall@80": hits / (len(qs[:50]) * layers * min(K, n)),
                     "hnsw_p50_ms": float(np.percentile(ts, 50) * 1e3)}
    shutil.rmtree(path)

    scale = LAYERS / layers
    pct = {k: (float(np.percentile(v, 50)) * 1e3 * scale, float(np.percentile(v, 99)) * 1e3 * scale)
           for k, v in lat.items()}
    return {
        "tokens": tokens,
        "events": n,
        "layers_measured": layers,
        "scale_to_30_layers": scale,
        "path_by_threshold": "exact" if ix.uses_exact() else "hnsw",
        "table_append_ms_per_event": t_table / n * 1e3 * scale,
        "index_add_ms_per_event": t_index / n * 1e3 * scale,
        "save_s": t_save * scale,
        "reopen_s": t_open * scale,
        "reopen_identical": same,
        "query_ms_p50_p99": pct,
        "recall@10": r10 / (steps * layers * min(10, n)),
        "recall@80": r80 / (steps * layers * min(K, n)),
        "ef_sweep": sweep,
        "rss_anon_bytes": (mem["RssAnon"] - base["RssAnon"]) * scale,
        "rss_file_bytes": (mem["RssFile"] - base["RssFile"]) * scale,
        "disk_bytes": disk * scale,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--layers-1m", type=int, default=6, help="layers measured for sessions >= 1M tokens")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dir", default=None, help="where the session directories go (default: a temp dir)")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=LAYERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.layers, args.steps, args.dir)))
        return
    workdir = args.dir or tempfile.mkdtemp(prefix="emserve-bench-")
    rows, results = [], []
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    for tokens in (int(x) for x in args.sizes.split(",")):
        layers = args.layers_1m if tokens >= 1_000_000 else LAYERS
        cmd = [sys.executable, __file__, "--one", str(tokens), "--layers", str(layers),
               "--steps", str(args.steps), "--dir", workdir]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        res["wall_s"] = time.perf_counter() - t0
        results.append(res)
        q = res["query_ms_p50_p99"]
        rows.append([
            f"{tokens // 1000}k" + ("" if layers == LAYERS else f" ({layers}L x{LAYERS / layers:.0f})"),
            res["events"],
            res["path_by_threshold"],
            round(res["index_add_ms_per_event"], 2),
            round(res["table_append_ms_per_event"], 3),
            f"{q['exact'][0]:.2f}/{q['exact'][1]:.2f}",
            f"{q['hnsw'][0]:.2f}/{q['hnsw'][1]:.2f}",
            f"{q['retrieve'][0]:.2f}/{q['retrieve'][1]:.2f}",
            f"{res['recall@10']:.3f}/{res['recall@80']:.3f}",
            f"{res['rss_anon_bytes'] / 2**20:.0f}",
            f"{res['disk_bytes'] / 2**20:.0f}",
            f"{res['save_s']:.2f}/{res['reopen_s']:.2f}",
        ])
        print(f"{tokens} tokens done in {res['wall_s']:.0f} s", file=sys.stderr, flush=True)
    if args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    headers = ["session", "events", "path", "add ms/ev", "table ms/ev", "exact ms p50/p99", "hnsw ms p50/p99",
               "retrieve ms p50/p99", "recall@10/@80", "RSS MiB", "disk MiB", "save/reopen s"]
    print(table(headers, rows))
    for res in results:
        if res["ef_sweep"]:
            scale = res["scale_to_30_layers"]
            sweep = ", ".join(
                f"ef={ef}: recall@80 {v['recall@80']:.3f}, hnsw p50 {v['hnsw_p50_ms'] * scale:.2f} ms"
                for ef, v in res["ef_sweep"].items()
            )
            print(f"{res['tokens'] // 1000}k ef sweep (ef=64 in the table): {sweep}")
    payload = {
        "machine": machine(),
        "load_avg_start_end": [load_start, os.getloadavg()],
        "config": {"layers": LAYERS, "dim": DIM, "avg_event_tokens": AVG_EVENT, "batch_events": BATCH,
                   "k": K, "budget": BUDGET, "params": asdict(IndexParams()), "steps": args.steps},
        "wall_s": time.perf_counter() - t_start,
        "results": results,
    }
    print(f"wrote {write_results('retrieval_index', payload)}")


if __name__ == "__main__":
    main()

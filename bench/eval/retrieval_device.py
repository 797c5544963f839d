"""Retrieval scored on a GPU (``retrieval.device_scorer``) at 10k / 100k / 1M tokens, against the CPU
exact path on the same machine, in one run.

What a step costs is measured through the product ``Retriever.retrieve`` (query encoding, device
scoring, the ranking prefix back to the host, the selection walk with the contiguity buffer, the
selected events' scores), over an ``EventTable`` on disk:

* **10k**: the real events of the capture (``bench/lab/retrieval_capture.py``) ending by token 10,000
  and their real representatives (stored float16 in the export, so both paths read the same table);
* **100k / 1M**: event sizes from the real distribution, representatives from the Gaussian fitted to
  the real ones (``bench/retrieval_index.RepGen``), the real needle events planted at 1/3.
* Queries (real, default model): ``ingest`` = the 32 ingestion summaries (one query vector, mean
  ranking, budget 1024 = session ``n_mem``); ``ask4`` = the 8 question probes (4 tokens, interleaved,
  budget 256 = ``question_n_mem``); ``ask64`` = 64 real query vectors per question (its 4 tokens and
  the 32 summaries with 28 more tokens of the other questions: the length of
  ``question_query_tokens``), interleaved, budget 256.

Reported per size and path: p50 / p99 ms per step, selection recall of the device path vs the CPU
float32 exact selection (``|dev & cpu| / |cpu|``, mean / min, contiguity buffers reset per step so
both walk from the same state), whether the planted needle events are selected by the pass-key
question, the time to mirror the table to the device (a session's open), device memory, host RSS.

Run where a GPU is (the CPU path alone otherwise)::

    .venv/bin/python -m bench.eval.retrieval_device --export /tmp/real.npz       # here: the capture, compact
    python3 -m bench.eval.retrieval_device --real real.npz --device cuda         # there
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.eval.common import RESULTS, long_questions, machine, table
from bench.eval.retrieval_index import (
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    REAL,
    SCORE_LAYERS,
    D,
    V,
    load_real,
    make_data,
    rss,
)
from emserve.retrieval.config import RetrievalConfig
from emserve.retrieval.device_scorer import DeviceScorer
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import EventIndex, IndexParams
from emserve.retrieval.memory import NO_GRAPH
from emserve.retrieval.queries import QueryMean
from emserve.retrieval.retriever import RetrievalResult, Retriever

BUDGETS = {"ingest": 1024, "ask4": 256, "ask64": 256}
RANKS = {"ingest": "mean", "ask4": "interleave", "ask64": "interleave"}


def export(out: Path) -> None:
    real = load_real(REAL)
    np.savez_compressed(out, reps=real["reps"].astype(np.float16), starts=real["starts"], ends=real["ends"],
                        mean=real["mean"], ask=real["ask"], chunk=real["chunk"], needle_events=real["needle_events"])
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def load(path: Path) -> dict[str, Any]:
    with np.load(path) as f:
        real = {k: f[k] for k in f.files}
    real["reps"] = real["reps"].astype(np.float32)
    return real


def query_sets(real: dict[str, Any]) -> dict[str, list[np.ndarray]]:
    ask = [q[:, :SCORE_LAYERS] for q in real["ask"]]  # [4, 20, 9, 64] each
    chunk = real["chunk"][:, :SCORE_LAYERS]  # [32, 20, 9, 64]
    return {"ingest": list(chunk), "ask4": ask, "ask64": long_questions(ask, chunk)}


def build_table(tokens: int, real: dict[str, Any], workdir: Path) -> tuple[EventTable, list[int], float]:
    bounds, source, needle0 = make_data(tokens, SCORE_LAYERS, real, tokens)
    n = bounds.shape[0]
    needles = list(range(needle0, needle0 + len(real["needle_events"])))
    rng = np.random.default_rng(tokens + 1)
    path = Path(tempfile.mkdtemp(dir=workdir))
    tbl = EventTable.create(path, SCORE_LAYERS, V * D, vectors=V)
    t0 = time.perf_counter()
    step = 8192
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        if isinstance(source, np.ndarray):
            reps = np.ascontiguousarray(source[lo:hi])
        else:
            reps = source.sample(hi - lo, rng)
            for k in range(lo, hi):
                if needle0 <= k < needle0 + len(needles):
                    reps[k - lo] = real["reps"][real["needle_events"][k - needle0], :SCORE_LAYERS]
        tbl.append(bounds[lo:hi], reps)
    if isinstance(source, np.ndarray):
        needles = [int(x) for x in real["needle_events"] if x < n]
    return tbl, needles, time.perf_counter() - t0


def similar(res: RetrievalResult) -> set[int]:
    return {e.id for e in res.layers[0].events}


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, p)) if xs else float("nan")


def one(tokens: int, real: dict[str, Any], device: str | None, workdir: Path, steps: int, cpu_steps: int,
        dtypes: list[str]) -> dict[str, Any]:
    tbl, needles, t_build = build_table(tokens, real, workdir)
    n = len(tbl)
    index = EventIndex.open(tbl.path, tbl, IndexParams(exact_threshold=NO_GRAPH), layers=())
    qm = QueryMean(None, SCORE_LAYERS, HEADS * HEAD_DIM)
    qm.observe(real["mean"][:SCORE_LAYERS], 1)
    # the per-layer score (``topk``) these tables hold; the table holds the scoring layers only
    cfg = RetrievalConfig(repr_proxy="topk", shared_score_layers=1.0)
    common = dict(query_mean=qm, query_group=HEADS // KV_HEADS, head_dim=HEAD_DIM)
    cpu = Retriever(index, cfg, **common)  # type: ignore[arg-type]
    qsets = query_sets(real)
    out: dict[str, Any] = {"tokens": tokens, "events": n, "build_s": round(t_build, 1),
                           "memory_tokens": int(tbl.sizes.sum()), "paths": {}}
    # the CPU exact selections (the reference) and their times
    ref: dict[str, list[set[int]]] = {}
    cpu_times: dict[str, list[float]] = {}
    for kind, qs in qsets.items():
        ref[kind], cpu_times[kind] = [], []
        for q in qs[:max(1, cpu_steps)]:
            cpu.reset_buffers()
            t0 = time.perf_counter()
            res = cpu.retrieve(q, BUDGETS[kind], rank=RANKS[kind])  # type: ignore[arg-type]
            cpu_times[kind].append(time.perf_counter() - t0)
            ref[kind].append(similar(res))
    out["paths"]["cpu exact (numpy f32)"] = {k: {"p50_ms": pct(v, 50), "p99_ms": pct(v, 99), "steps": len(v)}
                                             for k, v in cpu_times.items()}
    out["needle_cpu"] = bool(set(needles) & ref["ask4"][0])
    if device is None:
        return out
    for config in dtypes:
        dname, _, form = config.partition(":")
        form = form or "rq"
        dtype = getattr(torch, dname)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        scorer = DeviceScorer(tbl, range(SCORE_LAYERS), device=device, dtype=dtype, form=form)
        t0 = time.perf_counter()
        scorer.sync()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t_sync = time.perf_counter() - t0
        dev = Retriever(index, cfg, **common, scorer=scorer)  # type: ignore[arg-type]
        row: dict[str, Any] = {"sync_s": round(t_sync, 3), "device_bytes": scorer.nbytes}
        for kind, qs in qsets.items():
            times: list[float] = []
            recall: list[float] = []
            for rep in range(max(1, steps // len(qs)) + 1):
                for i, q in enumerate(qs):
                    dev.reset_buffers()
                    t0 = time.perf_counter()
                    res = dev.retrieve(q, BUDGETS[kind], rank=RANKS[kind])  # type: ignore[arg-type]
                    dt = time.perf_counter() - t0
                    if rep == 0 and i < len(ref[kind]):
                        got = similar(res)
                        recall.append(len(got & ref[kind][i]) / max(1, len(ref[kind][i])))
                        if kind == "ask4" and i == 0:
                            row["needle"] = bool(set(needles) & got)
                    if rep > 0:  # the first pass warms up (kernels, caches)
                        times.append(dt)
            # where a step's time goes (device synchronized): query encoding (with the standardization on
            # the device) and the scoring + ranking prefix; the rest is the walk and the selected scores
            enc, rank = [], []
            for q in qs:
                t0 = time.perf_counter()
                eq = dev.encode(q)
                t1 = time.perf_counter()
                m = len(tbl)
                if RANKS[kind] == "interleave":
                    scorer.ranked_interleave(eq, m, tbl.sizes, BUDGETS[kind] + 77)
                else:
                    scorer.ranked_mean(eq, m, tbl.sizes, BUDGETS[kind] + 308)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                rank.append(time.perf_counter() - t1)
                enc.append(t1 - t0)
            row[kind] = {"encode_p50_ms": pct(enc, 50), "rank_p50_ms": pct(rank, 50), "p50_ms": pct(times, 50),
                         "p99_ms": pct(times, 99), "max_ms": pct(times, 100), "steps": len(times),
                         "recall_mean": float(np.mean(recall)), "recall_min": float(np.min(recall))}
        if torch.cuda.is_available():
            row["peak_device_bytes"] = int(torch.cuda.max_memory_allocated())
        out["paths"][f"device {device} ({dname}{', ' + form if form != 'rq' else ''})"] = row
        del dev, scorer
    out["rss"] = rss()
    shutil.rmtree(tbl.path, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, help="write the capture's compact export here and stop")
    ap.add_argument("--real", type=Path, help="the export (default: read the capture directly)")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else None)
    ap.add_argument("--dtypes", default="float16,float16:qr,bfloat16,float32",
                    help="device configs: dtype[:form] (form rq: reps x queries, qr: queries x reps)")
    ap.add_argument("--steps", type=int, default=64, help="timed device steps per query kind")
    ap.add_argument("--cpu-steps", type=int, default=8, help="timed CPU exact steps per query kind")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results (default: bench/results/retrieval_device.json)")
    args = ap.parse_args()
    if args.export:
        export(args.export)
        return
    real = load(args.real) if args.real else load_real(REAL)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="emserve-devbench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    dtypes = args.dtypes.split(",")
    results = []
    info: dict[str, Any] = {"machine": machine(), "device": args.device}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(info), flush=True)
    for tokens in sizes:
        r = one(tokens, real, args.device, workdir, args.steps, args.cpu_steps, dtypes)
        results.append(r)
        print(json.dumps(r), flush=True)
    rows = []
    for r in results:
        for path, row in r["paths"].items():
            for kind in BUDGETS:
                c = row[kind]
                rows.append([f"{r['tokens']:,} ({r['events']:,} ev.)", path, kind,
                             f"{c.get('encode_p50_ms', float('nan')):.2f} / {c.get('rank_p50_ms', float('nan')):.2f}",
                             f"{c['p50_ms']:.2f}",
                             f"{c['p99_ms']:.2f}", f"{c.get('recall_mean', 1.0):.3f} / {c.get('recall_min', 1.0):.3f}",
                             row.get("needle", r["needle_cpu"]), f"{row.get('sync_s', '-')}",
                             f"{row.get('device_bytes', 0) / 2**20:.0f}"])
    print(table(["session", "path", "queries", "encode / rank ms", "p50 ms", "p99 ms", "recall vs cpu mean/min",
                 "needle", "mirror s", "device MiB"], rows))
    dest = args.out or RESULTS / "retrieval_device.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({**info, "results": results}, indent=1, default=str))
    print(f"wrote {dest}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

"""Retrieval at 10M and 100M tokens, simulated (#19): a synthetic session shaped like a real one, grown
through the product's classes, measured as it grows.

A real session at 10M tokens takes days on this machine (and 230 GB of KV log); what its retrieval costs
does not depend on the KV, only on the event table and the token graph. So this grows those two as a
``"tokens"`` session grows them (``EventTable``, ``TokenGraph.sync`` after every 512-token step, the
retrievers of ``build_retriever``) from synthetic token vectors, and measures at checkpoints:

* the graph's adds per step, an ingestion step's retrieval (one query summary, ``n_mem``, ranked by the
  mean) and a question's (64 query tokens, ``interleave``, the question budget), p50 / p99, through the
  graph;
* selection recall of those against exact scoring of every event (where ``--exact-upto`` allows: exact
  costs O(events) per query);
* resident memory of this process (anonymous: the graph; file-backed: the mapped table) and disk per token.

**Shape** (``shape`` subcommand, from a real ``tokens`` session's log folder; a small npz, committed, so the
simulation needs no session): the event sizes (their histogram), and the token vectors (an event's 4
tokens, keys concatenated over the scoring layers) as a Gaussian with the real mean, the top 128
principal directions with their spreads and a per-dimension residual; an event's vectors share a latent
part (``within``: the mean cosine of two vectors of one event, matched) and that part follows an AR(1)
over events (``rho``: consecutive events, matched). Directions beyond 128 are independent noise.

**Queries** are synthetic too: an ingestion step's summary aims at the last events (the text it reads),
a question's 64 tokens at one old event (a needle), each with noise; each query head is the kv head's key
divided by the GQA group, so the folded query is the key. They give the retrievers realistic work, not a
real question's difficulty: the selection recall on real questions is ``token_graph_real.py``'s.

Past what fits here (RAM, disk), the numbers are extrapolated from the measured growth and labelled so.

    .venv/bin/python -m bench.lab.scale_sim shape --from SESSION/log --out bench/results/scale_sim-shape.npz
    .venv/bin/python -m bench.lab.scale_sim run --tokens 10m --checkpoints 1m,2m,5m,10m --out scale_sim
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.eval.common import RESULTS, machine, process_memory, table, write_results
from bench.eval.eval import _ints
from emserve.retrieval.config import RetrievalConfig
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import EventIndex
from emserve.retrieval.memory import build_retriever
from emserve.retrieval.queries import QueryMean
from emserve.retrieval.token_graph import TokenGraph

HEADS, KV_HEADS, HEAD_DIM, VECTORS, NUM_LAYERS = 9, 3, 64, 4, 30  # SmolLM2-135M
WIDTH = KV_HEADS * HEAD_DIM
GROUP = HEADS // KV_HEADS
KV_BYTES_PER_TOKEN = NUM_LAYERS * 2 * WIDTH * 2  # bf16 K and V of every layer
RANK = 128
STEP = 512
SHAPE = RESULTS / "scale_sim-shape.npz"


# ---------------------------------------------------------------------------------------------- shape
def token_vectors(tab: EventTable, ids: np.ndarray, layers: range) -> np.ndarray:
    """``[len(ids), V, layers * WIDTH]``: the events' token vectors (keys concatenated over ``layers``)."""
    parts = [tab.reps_of(lay, ids).reshape(len(ids), VECTORS, WIDTH) for lay in layers]
    return np.concatenate(parts, axis=2)


def fit_shape(log: Path, sample: int, seed: int) -> dict[str, np.ndarray]:
    tab = EventTable.open(log)
    n = len(tab)
    layers = RetrievalConfig(repr_proxy="tokens").score_layers(NUM_LAYERS)
    if tab.vectors != VECTORS or tab.vector_dim != WIDTH or not set(layers) <= set(tab.layers):
        raise SystemExit(f"{log}: not a SmolLM2 'tokens' table ({tab.vectors} x {tab.vector_dim}, layers {tab.layers})")
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(n - 1, size=min(sample, n - 1), replace=False))
    x = token_vectors(tab, ids, layers)  # [m, V, D]
    nxt = token_vectors(tab, ids + 1, layers)
    flat = x.reshape(-1, x.shape[2]).astype(np.float32)
    mean = flat.mean(axis=0, dtype=np.float64).astype(np.float32)
    centered = flat - mean
    m, d = centered.shape
    if m >= d:  # principal directions from the covariance [D, D]
        w, v = np.linalg.eigh((centered.T @ centered).astype(np.float64) / m)
        top = np.argsort(-w)[:RANK]
        vecs = v[:, top].T
    else:  # fewer vectors than dimensions: from their Gram matrix [m, m]
        w, u = np.linalg.eigh((centered @ centered.T).astype(np.float64) / m)
        top = np.argsort(-w)[:RANK]
        vecs = (centered.T.astype(np.float64) @ u[:, top]).T
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    spread = np.sqrt(np.maximum(w[top], 0.0))
    basis = np.zeros((RANK, d), np.float32)
    basis[: len(top)] = vecs
    spread = np.concatenate([spread, np.zeros(RANK - len(top))])
    resid = centered - (centered @ basis.T) @ basis
    unit = np.where(spread > 0, spread, 1.0)
    z = ((x.reshape(-1, x.shape[2]) - mean) @ basis.T / unit).reshape(len(ids), VECTORS, RANK)
    zn = ((nxt.reshape(-1, x.shape[2]) - mean) @ basis.T / unit).reshape(len(ids), VECTORS, RANK)

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)))

    within = cos(z[:, 0], z[:, 1])  # two vectors of one event
    across = cos(z.mean(axis=1), zn.mean(axis=1))  # the latent parts of consecutive events
    sizes = tab.sizes
    return {"mean": mean.astype(np.float32), "basis": basis.astype(np.float16), "spread": spread.astype(np.float32),
            "resid_std": resid.std(axis=0).astype(np.float32), "within": np.float64(within),
            "rho": np.float64(across), "size_hist": np.bincount(sizes).astype(np.int64),
            "source_events": np.int64(n), "sample": np.int64(len(ids))}


# ---------------------------------------------------------------------------------------------- synth
class Synth:
    """Synthetic events of the shape (module docstring): sizes and token vectors, in temporal order."""

    def __init__(self, shape: dict[str, np.ndarray], seed: int) -> None:
        self.mean = np.asarray(shape["mean"], np.float32)
        self.basis = np.asarray(shape["basis"], np.float32) * np.asarray(shape["spread"], np.float32)[:, None]
        self.resid = np.asarray(shape["resid_std"], np.float32)
        self.a = float(np.sqrt(max(0.0, min(1.0, float(shape["within"])))))  # shared-part weight: cos = a^2
        self.rho = float(min(0.999, max(0.0, float(shape["rho"]))))
        hist = np.asarray(shape["size_hist"], np.float64)
        self.size_p = hist / hist.sum()
        self.rng = np.random.default_rng(seed)
        self.u = self.rng.standard_normal(RANK).astype(np.float32)

    def events(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """``e`` more events: sizes ``[e]`` and token vectors ``[e, V, D]``."""
        rng = self.rng
        sizes = rng.choice(len(self.size_p), size=e, p=self.size_p).astype(np.int64)
        u = np.empty((e, RANK), np.float32)
        prev, c = self.u, float(np.sqrt(1 - self.rho ** 2))
        noise = rng.standard_normal((e, RANK)).astype(np.float32)
        for i in range(e):
            prev = self.rho * prev + c * noise[i]
            u[i] = prev
        self.u = prev
        own = rng.standard_normal((e, VECTORS, RANK)).astype(np.float32)
        z = self.a * u[:, None, :] + np.sqrt(1 - self.a ** 2) * own
        x = z.reshape(-1, RANK) @ self.basis + self.mean
        x += rng.standard_normal(x.shape).astype(np.float32) * self.resid
        return sizes, x.reshape(e, VECTORS, -1)


def rows(vecs: np.ndarray, n_layers: int) -> np.ndarray:
    """Token vectors ``[e, V, L * WIDTH]`` as table rows ``[e, L, V * WIDTH]``."""
    e = vecs.shape[0]
    return vecs.reshape(e, VECTORS, n_layers, WIDTH).transpose(0, 2, 1, 3).reshape(e, n_layers, VECTORS * WIDTH)


def as_queries(keys: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Token vectors ``[t, L * WIDTH]`` as query tokens ``[t, NUM_LAYERS, HEADS, HEAD_DIM]`` whose GQA fold is
    the key (plus ``noise`` x its spread); the layers beyond the scoring ones are noise."""
    t = keys.shape[0]
    n_layers = keys.shape[1] // WIDTH
    q = rng.standard_normal((t, NUM_LAYERS, KV_HEADS, HEAD_DIM)).astype(np.float32) * float(keys.std())
    q[:, :n_layers] = keys.reshape(t, n_layers, KV_HEADS, HEAD_DIM) + noise * q[:, :n_layers]
    return np.repeat(q / GROUP, GROUP, axis=2)


# ---------------------------------------------------------------------------------------------- run
def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def run(args: argparse.Namespace) -> int:
    with np.load(args.shape) as f:
        shape = {k: f[k] for k in f.files}
    cfg = RetrievalConfig(repr_proxy="tokens", table_dtype=args.table_dtype)
    layers = cfg.score_layers(NUM_LAYERS)
    mean_size = float((np.arange(len(shape["size_hist"])) * shape["size_hist"]).sum() / shape["size_hist"].sum())
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tab = EventTable.create(work, NUM_LAYERS, VECTORS * WIDTH, vectors=VECTORS, layers=layers,
                            dtype=args.table_dtype, groups=VECTORS * KV_HEADS)
    params = dataclasses.replace(cfg.index_params(), num_threads=args.threads)
    graph = TokenGraph(work, tab, layers, params)
    qm = QueryMean(None, NUM_LAYERS, HEADS * HEAD_DIM)
    graph_ix = EventIndex.open(work, tab, params, layers=())
    exact_ix = EventIndex.open(work, tab, dataclasses.replace(params, exact_threshold=1 << 62), layers=(),
                               writable=False)
    fast = build_retriever(graph_ix, cfg, qm, num_heads=HEADS, head_dim=HEAD_DIM, graph=graph)
    exact = build_retriever(exact_ix, cfg, qm, num_heads=HEADS, head_dim=HEAD_DIM)
    synth = Synth(shape, args.seed)
    qrng = np.random.default_rng(args.seed + 1)
    q_budget = cfg.question_n_mem or cfg.n_mem
    checkpoints = sorted(args.checkpoints)
    points: list[dict[str, Any]] = []
    start = cfg.n_init
    tokens = 0
    recent: list[np.ndarray] = []
    add_s: list[float] = []
    t_all = time.perf_counter()
    print(f"events of {mean_size:.2f} tokens on average; table {args.table_dtype}; to {args.tokens} tokens", flush=True)
    while checkpoints:
        per_step = max(1, round(STEP / mean_size))
        sizes, vecs = synth.events(per_step)
        bounds = np.stack([start + np.concatenate([[0], np.cumsum(sizes)[:-1]]), start + np.cumsum(sizes)], 1)
        start = int(bounds[-1, 1])
        tokens += int(sizes.sum())
        tab.append(bounds, rows(vecs, len(layers)))
        recent = [*recent[-3:], vecs.reshape(-1, vecs.shape[2])]
        summary = as_queries(np.concatenate(recent).mean(axis=0, keepdims=True), args.noise, qrng)[0]
        qm.observe(summary.reshape(NUM_LAYERS, -1), STEP)
        s0 = time.perf_counter()
        graph.sync()
        add_s.append(time.perf_counter() - s0)
        if tokens < checkpoints[0]:
            continue
        checkpoints.pop(0)
        n = len(tab)
        step_ms: list[float] = []
        ask_ms: list[float] = []
        step_rec: list[float] = []
        ask_rec: list[float] = []
        with_exact = n <= args.exact_upto
        recent_keys = np.concatenate(recent)
        for _ in range(args.queries):
            step_q = as_queries(recent_keys[qrng.integers(len(recent_keys), size=8)].mean(axis=0, keepdims=True),
                                args.noise, qrng)[0]  # [L, H, D]: a step's summary
            target = int(qrng.integers(0, max(1, n - 200)))
            needle = token_vectors(tab, np.array([target]), layers)[0]  # [V, D]
            ask_q = as_queries(needle[qrng.integers(VECTORS, size=64)], args.noise, qrng)
            for q, budget, rank, ms, rec in ((step_q, cfg.n_mem, "mean", step_ms, step_rec),
                                              (ask_q, q_budget, "interleave", ask_ms, ask_rec)):
                fast.reset_buffers()
                s0 = time.perf_counter()
                got = fast.retrieve(q, budget, rank=rank, contiguity=False)  # type: ignore[arg-type]
                ms.append(1000 * (time.perf_counter() - s0))
                if with_exact:
                    exact.reset_buffers()
                    want = set(exact.retrieve(q, budget, rank=rank, contiguity=False).layers[0].ids)  # type: ignore[arg-type]
                    rec.append(len(want & set(got.layers[0].ids)) / max(1, len(want)))
        mem = process_memory()
        disk = tab.disk_bytes() + graph.disk_bytes()
        tail = add_s[-64:]
        point = {"tokens": tokens, "events": n, "vectors": graph.count * VECTORS, "graph_started": graph.count > 0,
                 "adds_ms_per_step_p50": 1000 * pct(tail, 50), "step_retrieval_ms_p50": pct(step_ms, 50),
                 "step_retrieval_ms_p99": pct(step_ms, 99), "question_retrieval_ms_p50": pct(ask_ms, 50),
                 "question_retrieval_ms_p99": pct(ask_ms, 99),
                 "step_recall": float(np.mean(step_rec)) if step_rec else None,
                 "question_recall": float(np.mean(ask_rec)) if ask_rec else None, "queries": args.queries,
                 "rss_bytes": mem.get("VmRSS"), "rss_anon_bytes": mem.get("RssAnon"),
                 "rss_file_bytes": mem.get("RssFile"),
                 "table_bytes": tab.disk_bytes(), "graph_bytes": graph.disk_bytes(),
                 "disk_per_token": disk / tokens, "disk_vs_kv": 1 + disk / (KV_BYTES_PER_TOKEN * tokens),
                 "elapsed_s": time.perf_counter() - t_all}
        points.append(point)
        print(f"{tokens / 1e6:.2f}M tokens, {n} events: step {point['step_retrieval_ms_p50']:.0f} ms, question "
              f"{point['question_retrieval_ms_p50']:.0f} ms (p50), recall {point['step_recall']} / "
              f"{point['question_recall']}; anon RSS {mem.get('RssAnon', 0) / 2**20:.0f} MiB; "
              f"{point['elapsed_s']:.0f} s", flush=True)
        graph.save()
    headers = ["tokens", "events", "adds ms/step", "step ms p50/p99", "question ms p50/p99", "recall step/question",
               "anon RSS MiB", "file RSS MiB", "table+graph B/token", "disk / KV"]
    out_rows = [[f"{p['tokens'] / 1e6:.2f}M", p["events"], f"{p['adds_ms_per_step_p50']:.0f}",
                 f"{p['step_retrieval_ms_p50']:.0f} / {p['step_retrieval_ms_p99']:.0f}",
                 f"{p['question_retrieval_ms_p50']:.0f} / {p['question_retrieval_ms_p99']:.0f}",
                 "-" if p["step_recall"] is None else f"{p['step_recall']:.3f} / {p['question_recall']:.3f}",
                 f"{p['rss_anon_bytes'] / 2**20:.0f}", f"{p['rss_file_bytes'] / 2**20:.0f}",
                 f"{p['disk_per_token']:.0f}", f"{p['disk_vs_kv']:.3f}"] for p in points]
    print(table(headers, out_rows))
    res = {"machine": machine(), "config": {"table_dtype": args.table_dtype, "noise": args.noise, "seed": args.seed,
                                            "threads": args.threads, "queries": args.queries,
                                            "exact_upto_events": args.exact_upto},
           "shape": {"file": str(args.shape), "mean_event_tokens": mean_size, "within": float(shape["within"]),
                     "rho": float(shape["rho"]), "source_events": int(shape["source_events"])},
           "index_params": dataclasses.asdict(params), "kv_bytes_per_token": KV_BYTES_PER_TOKEN, "points": points}
    print(f"wrote {write_results(args.out, res)}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("shape", help="fit the shape of a real 'tokens' session's table")
    sp.add_argument("--from", dest="src", type=Path, required=True, help="the session's log folder")
    sp.add_argument("--sample", type=int, default=4000, help="events sampled")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", type=Path, default=SHAPE)
    rp = sub.add_parser("run", help="grow a synthetic session and measure it")
    rp.add_argument("--shape", type=Path, default=SHAPE)
    rp.add_argument("--tokens", type=lambda s: _ints(s)[0], default=_ints("1m")[0])
    rp.add_argument("--checkpoints", type=_ints, default=None, help="e.g. 128k,1m,2m (default: --tokens)")
    rp.add_argument("--table-dtype", choices=("float32", "int8"), default="int8")
    rp.add_argument("--queries", type=int, default=20, help="of each kind per checkpoint")
    rp.add_argument("--exact-upto", type=int, default=200_000, help="events up to which exact scoring is compared")
    rp.add_argument("--noise", type=float, default=0.5, help="query noise, x the keys' spread")
    rp.add_argument("--threads", type=int, default=0, help="hnswlib add threads (0: the product's)")
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--workdir", default="/tmp/scale-sim")
    rp.add_argument("--keep", action="store_true")
    rp.add_argument("--out", default="scale_sim")
    args = ap.parse_args()
    if args.cmd == "shape":
        shape = fit_shape(args.src, args.sample, args.seed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.out, **shape)
        print(f"shape of {int(shape['source_events'])} events (sample {int(shape['sample'])}): "
              f"within {float(shape['within']):.3f}, "
              f"rho {float(shape['rho']):.3f}, top spread {float(shape['spread'][0]):.3f} .. "
              f"{float(shape['spread'][-1]):.3f}; wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
        return 0
    if args.checkpoints is None:
        args.checkpoints = [args.tokens]
    args.checkpoints = [c for c in args.checkpoints if c <= args.tokens]
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())

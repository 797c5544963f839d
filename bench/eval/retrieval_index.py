"""Retrieval index benchmark: the per-layer retrieval path (one shared selection, ``topk`` multi-vector
representatives, centered + standardized question queries) at 10k / 100k / 1M tokens.

Data (derived from a real session, ``bench/lab/retrieval_capture.py``: 16k tokens of ``big`` text through
the product engine, default model and :class:`MemoryConfig`; run it first, ~3 min):

* **10k**: the real events ending by token 10,000, their real representatives;
* **100k / 1M**: event sizes drawn from the real size distribution (gamma 1.0: ~11 tokens), and
  representatives drawn from a Gaussian fitted to the real ones, per key slot ``j`` (4 largest-norm
  keys) jointly over the layers (mean + top-256 principal components + diagonal residual: the
  second-order structure of the keys, cross-layer correlations included). The real needle events
  are planted at a third of the stream.
* Queries: the real ones: 8 question probes (4 query tokens each; the passkey question first) and
  32 ingestion query summaries (what a chunk retrieves with), centered on the real stream mean.

Paths, per step (budget 1024 tokens = session ``n_mem``, contiguity buffer on, as a session):

* ``exact``: every event scored (``sum_l mean_i max_j``, layers 0..19);
* ``union`` (the `topk` HNSW path): candidates = union of the per-(layer, query token) HNSW top-k of
  the scoring layers (k covering 1.5x the budget), rescored exactly;
* ``bounded xF`` (opt-in, ``RetrievalConfig.shared_rescore_factor = F``): 128-vector lists per
  (layer, query token), candidates ranked by an upper bound of their score, only those covering F x
  the budget rescored exactly (``retriever``);
* ``concat xM`` (prototype, this file only): **one** HNSW index over the concatenation of the scoring
  layers' slot-``j`` vectors, PCA-reduced to ``--concat-dim`` values (fitted on the first 2048
  events), one search per step with the mean of the step's (centered, standardized, concatenated)
  query tokens, candidates (M x what the retriever asks) rescored exactly.
  ``u_j . C = sum_l rep_lj . c_l <= sum_l max_j rep_lj . c_l`` (the same slot in every layer): a
  lower bound of the exact score, not a good enough one (results).

Measured: add cost per event (table append, per-layer index, concat index), query latency per step
p50 / p99 per path, selection recall vs exact (``|selected & exact-selected| / |exact-selected|``,
mean and min over the queries) and top-10 recall (the exact ranking's 10 best events among the
selected), whether the needle events are selected (passkey question) and their exact rank, resident
memory (RssAnon growth: table maps excluded), disk bytes per token vs raw bf16 KV (30 layers x 2 x 3 kv
heads x 64 x 2 B = 23,040 B).

The 1M session is measured on ``--layers-1m`` of the 20 scoring layers; per-layer costs are scaled to
20 (indexes) or 30 (table), and so are the exact rescoring parts of the query time (the concat search
is one search whatever the layer count). numpy/BLAS single-threaded (one session's share).

    .venv/bin/python -m bench.eval.retrieval_index [--sizes 10000,100000,1000000] [--layers-1m 4]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from bench.eval.common import machine, module_command, process_memory, table, write_results
from emserve.retrieval.buffers import contiguity_tokens
from emserve.retrieval.config import RetrievalConfig
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import EventIndex, IndexParams
from emserve.retrieval.queries import QueryMean
from emserve.retrieval.retriever import Retriever, select_ranked

LAYERS, SCORE_LAYERS, V, KV_HEADS, HEAD_DIM, HEADS = 30, 20, 4, 3, 64, 9
D = KV_HEADS * HEAD_DIM
RAW_KV_PER_TOKEN = LAYERS * 2 * KV_HEADS * HEAD_DIM * 2
BUDGET, CHUNK, N_INIT = 1024, 512, 128
REAL = Path.home() / ".cache" / "emserve" / "bench" / "real16k"


def load_real(path: Path) -> dict[str, Any]:
    tbl = EventTable.open(path / "log")
    n = len(tbl)
    q = np.load(path / "queries.npz")
    mean = QueryMean(path / "log", LAYERS, HEADS * HEAD_DIM).mean
    assert mean is not None and tbl.vectors == V and tbl.vector_dim == D, "capture with the default config"
    return {
        "reps": np.stack([np.array(tbl.reps(layer)[:n]) for layer in range(SCORE_LAYERS)], 1),  # [n, 20, V*D]
        "starts": tbl.starts.copy(), "ends": tbl.ends.copy(), "mean": mean,
        "ask": q["ask_queries"], "chunk": q["chunk_queries"], "needle_events": q["needle_events"],
    }


class RepGen:
    """Gaussian fitted to the real representatives, per key slot, jointly over ``layers``."""

    def __init__(self, reps: np.ndarray, layers: int, rank: int = 256) -> None:
        n = reps.shape[0]
        self.layers = layers
        self.parts = []
        for j in range(V):
            x = reps[:, :layers, j * D:(j + 1) * D].reshape(n, -1).astype(np.float64)
            mu = x.mean(0)
            xc = x - mu
            _, s, vt = np.linalg.svd(xc, full_matrices=False)
            r = min(rank, s.shape[0] - 1)
            comp = (s[:r, None] / np.sqrt(n - 1)) * vt[:r]
            resid = np.sqrt(np.maximum(xc.var(0) - (comp**2).sum(0), 0.0))
            self.parts.append((mu.astype(np.float32), comp.astype(np.float32), resid.astype(np.float32)))

    def sample(self, e: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((e, self.layers, V * D), np.float32)
        for j, (mu, comp, sd) in enumerate(self.parts):
            z = rng.standard_normal((e, comp.shape[0]), dtype=np.float32)
            x = mu + z @ comp + sd * rng.standard_normal((e, mu.shape[0]), dtype=np.float32)
            out[:, :, j * D:(j + 1) * D] = x.reshape(e, self.layers, D)
        return out


class ConcatIndex:
    """Prototype: one HNSW index over PCA-reduced concatenations of the scoring layers' slot vectors."""

    def __init__(self, layers: int, dim: int, capacity: int, m: int = 16, ef_construction: int = 100) -> None:
        self.layers, self.dim = layers, dim
        self.proj: np.ndarray | None = None
        self.ix = hnswlib.Index(space="ip", dim=dim)
        self.ix.init_index(max_elements=capacity * V, ef_construction=ef_construction, M=m, random_seed=100)
        self.count = 0

    def concat(self, reps: np.ndarray) -> np.ndarray:
        """``reps [e, layers, V*D]`` -> ``[e*V, layers*D]`` (vector ``j``: slot ``j`` of every layer)."""
        e = reps.shape[0]
        return reps.reshape(e, self.layers, V, D).transpose(0, 2, 1, 3).reshape(e * V, self.layers * D)

    def fit(self, reps: np.ndarray) -> None:
        u = self.concat(reps).astype(np.float64)
        w, vec = np.linalg.eigh(u.T @ u)
        self.proj = np.ascontiguousarray(vec[:, ::-1][:, : self.dim], dtype=np.float32)

    def add(self, reps: np.ndarray) -> None:
        assert self.proj is not None
        e = reps.shape[0]
        self.ix.add_items(self.concat(reps) @ self.proj, np.arange(self.count * V, (self.count + e) * V))
        self.count += e

    def query(self, tokens: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Encoded query ``tokens [n, L, D]``, ``scale [n, L]`` -> the projected mean query ``[dim]``."""
        assert self.proj is not None
        c = (tokens[:, : self.layers] * scale[:, : self.layers, None]).reshape(tokens.shape[0], -1).mean(0)
        return c @ self.proj

    def search(self, qp: np.ndarray, k: int) -> np.ndarray:
        kv = min(k * V, self.ix.get_current_count())
        self.ix.set_ef(max(64, kv))
        try:
            labels, _ = self.ix.knn_query(qp[None, :], k=kv)
        except RuntimeError:  # k close to the whole index: hnswlib cannot find that many
            return np.arange(self.count, dtype=np.int64)
        return np.unique(labels[0].astype(np.int64) // V)


def make_data(tokens: int, layers: int, real: dict[str, Any], seed: int) -> tuple[np.ndarray, Any, int]:
    """(bounds [n, 2], reps source, planted needle id). reps source: an array (real) or a sampler."""
    rng = np.random.default_rng(seed)
    if tokens <= int(real["ends"][-1]):
        m = int(np.searchsorted(real["ends"], tokens, side="right"))
        bounds = np.stack([real["starts"][:m], real["ends"][:m]], 1)
        return bounds, real["reps"][:m, :layers], int(real["needle_events"][0])
    sizes_real = real["ends"] - real["starts"]
    n = int(tokens / sizes_real.mean())
    sizes = rng.choice(sizes_real, n)
    plant = n // 3
    ne = real["needle_events"]
    sizes[plant:plant + len(ne)] = sizes_real[ne]
    starts = N_INIT + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return np.stack([starts, starts + sizes], 1), RepGen(real["reps"], layers), plant


def one(tokens: int, layers: int, steps: int, workdir: str, concat_dim: int, mults: list[float],
        factors: list[float], search_vectors: int) -> dict[str, Any]:
    real = load_real(REAL)
    bounds, source, needle0 = make_data(tokens, layers, real, tokens)
    n = bounds.shape[0]
    ne = list(range(needle0, needle0 + len(real["needle_events"])))
    rng = np.random.default_rng(tokens + 1)
    path = Path(tempfile.mkdtemp(dir=workdir))
    avg = float((bounds[:, 1] - bounds[:, 0]).mean())
    batch = max(1, round(CHUNK / avg))  # events closed per 512-token chunk
    base = process_memory()
    tbl = EventTable.create(path, layers, V * D, vectors=V)
    ix = EventIndex.open(path, tbl, IndexParams(build_threshold=0))  # measures the adds: grow from event 0
    t_table = t_index = 0.0
    fit_n = min(n, 2048)
    fit_reps: list[np.ndarray] = []
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        if isinstance(source, np.ndarray):
            reps = source[lo:hi]
        else:
            reps = source.sample(hi - lo, rng)
            for k in range(lo, hi):
                if needle0 <= k < needle0 + len(ne):
                    reps[k - lo] = real["reps"][real["needle_events"][k - needle0], :layers]
        if lo < fit_n:
            fit_reps.append(reps)
        t0 = time.perf_counter()
        tbl.append(bounds[lo:hi], reps)
        t1 = time.perf_counter()
        ix.sync()
        t2 = time.perf_counter()
        t_table += t1 - t0
        t_index += t2 - t1
    t0 = time.perf_counter()
    ix.save()
    t_save = time.perf_counter() - t0
    mem_perlayer = process_memory()

    # concat index (PCA fitted on the first 2048 events, then every event added in chunk batches)
    cix = ConcatIndex(layers, concat_dim, n)
    cix.fit(np.concatenate(fit_reps)[:fit_n])
    del fit_reps
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        cix.add(np.stack([tbl.reps(layer)[lo:min(n, lo + batch)] for layer in range(layers)], 1))
    t_concat_add = time.perf_counter() - t0
    cfile = path / "concat.hnsw"
    cix.ix.save_index(str(cfile))
    concat_disk = cfile.stat().st_size

    qm = QueryMean(None, layers, HEADS * HEAD_DIM)
    qm.observe(real["mean"][:layers], 1)
    # the per-layer path (``topk``) this bench measures; the table holds the scoring layers only
    cfg = RetrievalConfig(repr_proxy="topk", shared_score_layers=1.0)
    common = dict(query_mean=qm, query_group=HEADS // KV_HEADS, head_dim=HEAD_DIM)
    retr = Retriever(ix, cfg, **common)  # type: ignore[arg-type]
    bounded = {f: Retriever(ix, replace(cfg, shared_rescore_factor=f, shared_search_vectors=search_vectors),
                            **common)  # type: ignore[arg-type]
               for f in factors}
    kinds = {"ask": [q[:, :layers] for q in real["ask"]], "ingest": [q[:layers] for q in real["chunk"]]}
    kc = contiguity_tokens(BUDGET, 0.3)
    need = BUDGET + kc
    sizes = tbl.sizes
    memory = int(sizes.sum())

    def concat_select(q: np.ndarray, mult: float) -> tuple[list[int], float]:
        """The prototype's selection (ids) and the time of its HNSW search alone."""
        eq = retr.encode(q)
        qp = cix.query(eq.tokens, eq.scale)
        k0 = min(n, 16 + int(np.ceil(mult * 1.5 * need * n / memory)))
        searched = [0.0]

        def cand(k: int) -> np.ndarray:
            ts = time.perf_counter()
            out = cix.search(qp, k)
            searched[0] += time.perf_counter() - ts
            return out

        ranked = retr._ranked(cand, eq, None, k0, n, n, sizes, need)
        picks = select_ranked(ranked, sizes, n, BUDGET, kc, retr.buffers[0])
        return [p[0] for p in picks], searched[0]

    paths = ["exact", "union"] + [f"bounded x{f:g}" for f in factors] + [f"concat x{m:g}" for m in mults]
    lat: dict[str, dict[str, list[float]]] = {k: {p: [] for p in paths} for k in kinds}
    unscaled: dict[str, dict[str, list[float]]] = {k: {p: [] for p in paths} for k in kinds}  # concat search
    rec: dict[str, dict[str, list[float]]] = {k: {p: [] for p in paths[1:]} for k in kinds}
    rec10: dict[str, dict[str, list[float]]] = {k: {p: [] for p in paths[1:]} for k in kinds}
    needle: dict[str, Any] = {}
    exact_thr, hnsw_thr = replace(ix.params, exact_threshold=10**12), replace(ix.params, exact_threshold=0)
    for kind, qs in kinds.items():
        for qi, q in enumerate(qs):
            sel: dict[str, set[int]] = {}
            for rep in range(steps):
                for p in paths:
                    if p == "exact" and rep and tokens >= 1_000_000:
                        continue
                    ix.params = exact_thr if p == "exact" else hnsw_thr
                    r = bounded[float(p.split("x")[1])] if p.startswith("bounded") else retr
                    r.reset_buffers()
                    t0 = time.perf_counter()
                    if p.startswith("concat"):
                        ids, t_search = concat_select(q, float(p.split("x")[1]))
                        unscaled[kind][p].append(t_search)
                    else:
                        ids = r.retrieve(q, BUDGET).layers[0].ids
                        unscaled[kind][p].append(0.0)
                    lat[kind][p].append(time.perf_counter() - t0)
                    sel[p] = set(ids)
            ix.params = exact_thr
            scores = retr.scores(retr.encode(q), None)
            top10 = set(np.argsort(-scores, kind="stable")[:10].tolist())
            for p in paths[1:]:
                rec[kind][p].append(len(sel[p] & sel["exact"]) / max(1, len(sel["exact"])))
                rec10[kind][p].append(len(sel[p] & top10) / 10)
            if kind == "ask" and qi == 0:
                needle = {"events": ne, "exact_rank": [int((scores > scores[e]).sum()) for e in ne],
                          "retrieved": {p: any(e in sel[p] for e in ne) for p in paths}}
    ix.params = IndexParams(build_threshold=0)
    disk_table = tbl.disk_bytes()
    disk_index = ix.disk_bytes()
    shutil.rmtree(path)

    s_tab, s_idx20, s_idx30 = LAYERS / layers, SCORE_LAYERS / layers, LAYERS / layers

    def pct(v: list[float]) -> list[float]:
        return [float(np.percentile(v, 50)) * 1e3, float(np.percentile(v, 99)) * 1e3]

    latency: dict[str, dict[str, list[float]]] = {}
    for kind in kinds:
        latency[kind] = {}
        for p in paths:
            # per-layer work scales with the scoring layers (20 / measured); the concat search does not
            u, v = np.array(unscaled[kind][p]), np.array(lat[kind][p])
            latency[kind][p] = pct(list(u + (v - u) * s_idx20))
    return {
        "tokens": tokens, "events": n, "avg_event_tokens": avg, "layers_measured": layers,
        "events_per_chunk": batch,
        "path_by_threshold": "exact" if n < IndexParams().exact_threshold else "hnsw",
        "table_append_ms_per_event_30L": t_table / n * 1e3 * s_tab,
        "perlayer_index_add_ms_per_event": {"20L": t_index / n * 1e3 * s_idx20, "30L": t_index / n * 1e3 * s_idx30},
        "concat_index_add_ms_per_event": t_concat_add / n * 1e3,
        "save_s_20L": t_save * s_idx20,
        "query_ms_p50_p99_20L": latency,
        "query_ms_p50_p99_measured": {k: {p: pct(v) for p, v in d.items()} for k, d in lat.items()},
        "selection_recall_mean_min": {k: {p: [float(np.mean(v)), float(np.min(v))] for p, v in d.items()}
                                      for k, d in rec.items()},
        "top10_recall_mean_min": {k: {p: [float(np.mean(v)), float(np.min(v))] for p, v in d.items()}
                                  for k, d in rec10.items()},
        "needle": needle,
        "rss_anon_bytes": {
            "perlayer_20L": (mem_perlayer["RssAnon"] - base["RssAnon"]) * s_idx20,
            "perlayer_30L": (mem_perlayer["RssAnon"] - base["RssAnon"]) * s_idx30,
            "concat_index_file": concat_disk,
        },
        "disk_bytes_per_token": {
            "table_30L_f32": disk_table * s_tab / tokens,
            "table_20L_f16": disk_table * s_idx20 / 2 / tokens,
            "perlayer_index_30L": disk_index * s_idx30 / tokens,
            "perlayer_index_20L": disk_index * s_idx20 / tokens,
            "concat_index": concat_disk / tokens,
            "raw_kv": RAW_KV_PER_TOKEN,
        },
    }


def sweep_real(layers: list[int], k: int = 50) -> dict[str, Any]:
    """Per-layer HNSW recall@k (events) vs exact on the real capture, for M / ef and with or without
    the graph centering (``EventIndex``): every real question token's centered, standardized query."""
    path = REAL / "log"
    tbl = EventTable.open(path)
    n = len(tbl)
    real = load_real(REAL)
    qm = QueryMean(None, LAYERS, HEADS * HEAD_DIM)
    qm.observe(real["mean"], 1)
    ix = EventIndex.open(path, tbl, IndexParams(), writable=False)
    cfg = RetrievalConfig(repr_proxy="topk", shared_score_layers=SCORE_LAYERS / LAYERS)
    retr = Retriever(ix, cfg, query_mean=qm, query_group=HEADS // KV_HEADS, head_dim=HEAD_DIM)
    enc = [retr.encode(q) for q in real["ask"]]
    out: dict[str, Any] = {"events": n, "k": k, "layers": layers, "rows": []}
    for layer in layers:
        reps = np.ascontiguousarray(tbl.reps(layer)[:n]).reshape(n * V, D)
        qs = np.concatenate([e.tokens[:, layer] for e in enc])
        exact = [set(ix.search(layer, q, k, exact=True)[0].tolist()) for q in qs]
        for centered in (False, True):
            data = reps - reps[: 64 * V].mean(0) if centered else reps
            for m in (8, 16, 32):
                h = hnswlib.Index(space="ip", dim=D)
                h.init_index(max_elements=n * V, ef_construction=200, M=m, random_seed=100)
                t0 = time.perf_counter()
                h.add_items(np.ascontiguousarray(data), np.arange(n * V), num_threads=1)
                add_ms = (time.perf_counter() - t0) / n * 1e3
                for ef in (32, 64, 128, 256):
                    h.set_ef(ef)
                    hits, ts, failed = 0, [], 0
                    for q, want in zip(qs, exact, strict=True):
                        t0 = time.perf_counter()
                        try:
                            labels, _ = h.knn_query(q[None, :], k=k * V)
                        except RuntimeError:  # the graph could not yield k*V vectors: counted as 0 hits
                            failed += 1
                            continue
                        ts.append(time.perf_counter() - t0)
                        ev = labels[0] // V
                        _, first = np.unique(ev, return_index=True)
                        hits += len(set(ev[np.sort(first)][:k].tolist()) & want)
                    out["rows"].append({"layer": layer, "centered": centered, "M": m, "ef": ef,
                                        "recall": hits / (k * len(qs)), "failed_searches": failed,
                                        "search_ms": float(np.median(ts) * 1e3) if ts else None,
                                        "add_ms_per_event": add_ms})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--layers-1m", type=int, default=4, help="scoring layers measured for sessions >= 1M tokens")
    ap.add_argument("--steps", type=int, default=2, help="repeats of each of the 40 real queries")
    ap.add_argument("--concat-dim", type=int, default=64)
    ap.add_argument("--concat-mult", default="2")
    ap.add_argument("--factors", default="1.5,3", help="rescore_factor values of the bounded path")
    ap.add_argument("--search-vectors", type=int, default=128, help="bounded path: vectors per HNSW list")
    ap.add_argument("--dir", default=None, help="where the session directories go (default: a temp dir)")
    ap.add_argument("--out", default="retrieval_index")
    ap.add_argument("--sweep-real", action="store_true",
                    help="only the M / ef / centering sweep of per-layer HNSW recall on the real capture")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=SCORE_LAYERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    mults = [float(x) for x in args.concat_mult.split(",")]
    factors = [float(x) for x in args.factors.split(",")]
    if args.one is not None:
        print(json.dumps(one(args.one, args.layers, args.steps, args.dir, args.concat_dim, mults, factors,
                             args.search_vectors)))
        return
    if not (REAL / "queries.npz").exists():
        sys.exit(f"no real data at {REAL}: run bench/lab/retrieval_capture.py first")
    if args.sweep_real:
        res = sweep_real([0, 1, 5, 10, 19])
        rows = [[r["layer"], "yes" if r["centered"] else "no", r["M"], r["ef"], f"{r['recall']:.3f}",
                 "-" if r["search_ms"] is None else f"{r['search_ms']:.3f}", r["failed_searches"],
                 f"{r['add_ms_per_event']:.3f}"] for r in res["rows"]]
        print(table(["layer", "centered", "M", "ef", f"recall@{res['k']}", "search ms (k*V vectors)", "failed",
                     "add ms/event"], rows))
        print(f"wrote {write_results(args.out + '_sweep', {'machine': machine(), **res})}")
        return
    workdir = args.dir or tempfile.mkdtemp(prefix="emserve-bench-")
    rows, results = [], []
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    for tokens in (int(x) for x in args.sizes.split(",")):
        layers = args.layers_1m if tokens >= 1_000_000 else SCORE_LAYERS
        argv, env = module_command(__spec__.name)
        cmd = [*argv, "--one", str(tokens), "--layers", str(layers), "--steps", str(args.steps),
               "--dir", workdir, "--concat-dim", str(args.concat_dim), "--concat-mult", args.concat_mult,
               "--factors", args.factors, "--search-vectors", str(args.search_vectors)]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        res = json.loads(out.strip().splitlines()[-1])
        res["wall_s"] = time.perf_counter() - t0
        results.append(res)
        print(f"{tokens} tokens done in {res['wall_s']:.0f} s", file=sys.stderr, flush=True)
        for kind in ("ask", "ingest"):
            for p, (p50, p99) in res["query_ms_p50_p99_20L"][kind].items():
                r = res["selection_recall_mean_min"][kind].get(p)
                r10 = res["top10_recall_mean_min"][kind].get(p)
                rows.append([
                    f"{tokens // 1000}k" + ("" if layers == SCORE_LAYERS else f" ({layers}L)"),
                    res["events"], kind, p, f"{p50:.1f}/{p99:.1f}",
                    "-" if r is None else f"{r[0]:.3f}/{r[1]:.3f}",
                    "-" if r10 is None else f"{r10[0]:.3f}/{r10[1]:.2f}",
                    "-" if kind == "ingest" else str(res["needle"]["retrieved"][p]),
                ])
    if args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(["session", "events", "step", "path", "ms p50/p99 (20L)", "sel. recall mean/min",
                 "top-10 recall mean/min", "needle"], rows))
    cost_rows = []
    for res in results:
        d = res["disk_bytes_per_token"]
        m = res["rss_anon_bytes"]
        cost_rows.append([
            f"{res['tokens'] // 1000}k", res["events"], f"{res['table_append_ms_per_event_30L']:.3f}",
            f"{res['perlayer_index_add_ms_per_event']['30L']:.1f}/{res['perlayer_index_add_ms_per_event']['20L']:.1f}",
            f"{res['concat_index_add_ms_per_event']:.2f}",
            f"{m['perlayer_30L'] / 2**20:.0f}/{m['perlayer_20L'] / 2**20:.0f}", f"{m['concat_index_file'] / 2**20:.1f}",
            f"{d['table_30L_f32']:.0f}", f"{d['perlayer_index_30L']:.0f}/{d['perlayer_index_20L']:.0f}",
            f"{(RAW_KV_PER_TOKEN + d['table_30L_f32'] + d['perlayer_index_30L']) / RAW_KV_PER_TOKEN:.2f}",
            f"{(RAW_KV_PER_TOKEN + d['table_30L_f32'] + d['perlayer_index_20L']) / RAW_KV_PER_TOKEN:.2f}",
            f"{(RAW_KV_PER_TOKEN + d['table_20L_f16'] + d['concat_index']) / RAW_KV_PER_TOKEN:.2f}",
        ])
    print(table(["session", "events", "table ms/ev", "index add ms/ev 30L/20L", "concat add ms/ev",
                 "index RSS MiB 30L/20L", "concat MiB", "table B/tok", "index B/tok 30L/20L",
                 "disk/raw KV: 30L idx (before)", "20L idx (now)", "20L f16 table + concat"], cost_rows))
    payload = {
        "machine": machine(),
        "load_avg_start_end": [load_start, os.getloadavg()],
        "config": {"layers": LAYERS, "score_layers": SCORE_LAYERS, "vectors": V, "vector_dim": D, "budget": BUDGET,
                   "params": asdict(IndexParams()), "steps": args.steps, "concat_dim": args.concat_dim,
                   "concat_mult": mults, "factors": factors, "search_vectors": args.search_vectors,
                   "raw_kv_bytes_per_token": RAW_KV_PER_TOKEN, "real_data": str(REAL)},
        "wall_s": time.perf_counter() - t_start,
        "results": results,
    }
    print(f"wrote {write_results(args.out, payload)}")


if __name__ == "__main__":
    main()

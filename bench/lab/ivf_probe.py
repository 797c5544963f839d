"""Can an inverted-file (IVF) index find what exact scoring selects, on a real long session?

A candidate generator for the shared selection that keeps no vectors of its own (#19: bounded RAM,
disk near the raw KV): per scoring layer, k-means centroids (L2, trained on a sample of the layer's
representatives) and, per centroid, the ids of the vectors assigned to it. A step probes, per (layer,
query vector), the ``p`` centroids with the best ``q . c`` (``--bound``: ``q . c + |q| r_c``, an upper
bound of ``q . x`` over the cluster of radius ``r_c``); the union of their events is scored exactly
from the table (the product's score: centered, GQA-folded, standardized, MaxSim, summed over the
scoring layers) and ranked. Compared with exact scoring of every event:

* ingestion steps (one query summary per layer, ranked by the mean, budget ``n_mem`` tokens):
  selection recall ``|top(budget) & exact top(budget)| / |exact top(budget)|``;
* questions (the last 64 query tokens, ``interleave`` ranking): recall of the exact ranking's first
  10 and 30 events.

Data: a kept session's event table (``--session DIR/log``: ``reps_LLL.f32``, ``events.i64``,
``tokens.i32``, ``query_mean.npz``; every layer's rows, table format 1) and real queries of the same
model computed on the session's own text with the HF model (``q_proj`` outputs are the pre-RoPE queries):
an ingestion chunk's summary is the mean over a 512-token chunk after 1,536 tokens of context; a
question's tokens are the last 64 of the recall suite's question prompt after the stream's last 1,024
tokens. Local context only (a server's window also holds the sink and retrieved events): an
approximation of the real queries, good enough to compare candidate generators against exact.

    .venv/bin/python -m bench.lab.ivf_probe --session DIR/log --haystack narrative-1048576
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.eval.common import machine, table, write_results
from emserve.retrieval.config import RetrievalConfig
from emserve.retrieval.queries import QueryMean, encode_queries
from emserve.retrieval.retriever import interleave, sample_ids_of, sample_span

HEADS, KV_HEADS, HEAD_DIM, VECTORS = 9, 3, 64, 4


class Table:
    """The first ``count`` events of a kept session's table (format 1: every layer's rows)."""

    def __init__(self, log: Path, layers: int, count: int | None) -> None:
        ev = np.fromfile(log / "events.i64", np.int64).reshape(-1, 2)
        dim = VECTORS * KV_HEADS * HEAD_DIM
        reps = [np.memmap(log / f"reps_{lay:03d}.f32", np.float32, "r").reshape(-1, dim) for lay in range(layers)]
        filled = int(np.flatnonzero(np.abs(reps[layers - 1][: ev.shape[0], :8]).sum(1) > 0)[-1]) + 1
        self.tokens = np.fromfile(log / "tokens.i32", np.int32)
        held = int(np.searchsorted(ev[:, 1], self.tokens.shape[0], side="right"))  # events within the tokens
        self.n = min(filled, held, count or ev.shape[0])
        self.starts, self.ends = ev[: self.n, 0], ev[: self.n, 1]
        self.sizes = self.ends - self.starts
        self.reps = [r[: self.n] for r in reps]


def model_queries(model_path: str, contexts: list[list[int]], last: int, layers: int) -> list[np.ndarray]:
    """Pre-RoPE query vectors ``[last, layers, HEADS, HEAD_DIM]`` of the last ``last`` tokens of each context."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    got: dict[int, torch.Tensor] = {}
    hooks = [model.model.layers[lay].self_attn.q_proj.register_forward_hook(
        lambda _m, _i, out, lay=lay: got.__setitem__(lay, out[0, -last:].detach())) for lay in range(layers)]
    out = []
    with torch.inference_mode():
        for ids in contexts:
            model(torch.tensor([ids]))
            out.append(np.stack([got[lay].reshape(-1, HEADS, HEAD_DIM).numpy() for lay in range(layers)], 1))
    for h in hooks:
        h.remove()
    return out


class IVF:
    """Per layer: k-means centroids, cluster radii, and the vectors of each cluster (CSR)."""

    def __init__(self, reps: np.ndarray, nlist: int, iters: int, seed: int) -> None:
        x = np.asarray(reps, np.float32).reshape(-1, KV_HEADS * HEAD_DIM)
        rng = np.random.default_rng(seed)
        sample = x[rng.choice(x.shape[0], min(x.shape[0], 64 * nlist), replace=False)]
        c = sample[rng.choice(sample.shape[0], nlist, replace=False)].copy()
        for _ in range(iters):
            a = self._assign(sample, c)
            for k in range(nlist):
                m = sample[a == k]
                if m.shape[0]:
                    c[k] = m.mean(0)
        self.centroids = c
        a = np.concatenate([self._assign(x[i:i + 65536], c) for i in range(0, x.shape[0], 65536)])
        order = np.argsort(a, kind="stable")
        self.vectors = order.astype(np.int64)
        self.offsets = np.searchsorted(a[order], np.arange(nlist + 1))
        d = np.linalg.norm(x - c[a], axis=1)
        self.radius = np.zeros(nlist, np.float32)
        np.maximum.at(self.radius, a, d)

    @staticmethod
    def _assign(x: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.argmin((c * c).sum(1)[None] - 2 * x @ c.T, axis=1)

    def probe(self, q: np.ndarray, p: int, bound: bool) -> np.ndarray:
        """Events of the ``p`` best clusters of each query vector ``q [n, d]``."""
        s = q @ self.centroids.T
        if bound:
            s = s + np.linalg.norm(q, axis=1)[:, None] * self.radius[None]
        best = np.argpartition(-s, p - 1, axis=1)[:, :p]
        parts = [self.vectors[self.offsets[k]:self.offsets[k + 1]] for k in np.unique(best)]
        return np.unique(np.concatenate(parts) // VECTORS) if parts else np.zeros(0, np.int64)


class PQ:
    """Per layer: product quantization of the representatives (``m`` sub-vectors, 256 centroids each:
    ``m`` bytes per vector), scanned in full by table lookups."""

    def __init__(self, reps: np.ndarray, m: int, iters: int, seed: int) -> None:
        x = np.asarray(reps, np.float32).reshape(-1, KV_HEADS * HEAD_DIM)
        self.m, self.sub = m, x.shape[1] // m
        rng = np.random.default_rng(seed)
        sample = x[rng.choice(x.shape[0], min(x.shape[0], 32768), replace=False)]
        self.books = np.zeros((m, 256, self.sub), np.float32)
        self.codes = np.zeros((x.shape[0], m), np.uint8)
        for k in range(m):
            sl = slice(k * self.sub, (k + 1) * self.sub)
            c = sample[rng.choice(sample.shape[0], 256, replace=False), sl].copy()
            for _ in range(iters):
                a = IVF._assign(sample[:, sl], c)
                for j in range(256):
                    mm = sample[a == j, sl]
                    if mm.shape[0]:
                        c[j] = mm.mean(0)
            self.books[k] = c
            self.codes[:, k] = np.concatenate([IVF._assign(x[i:i + 65536, sl], c) for i in range(0, x.shape[0], 65536)])

    def scores(self, q: np.ndarray) -> np.ndarray:
        """Approximate ``max_j q . rep_j`` per event: ``[n, events]``."""
        lut = np.einsum("nkd,kcd->nkc", q.reshape(q.shape[0], self.m, self.sub), self.books)  # [n, m, 256]
        s = np.zeros((q.shape[0], self.codes.shape[0]), np.float32)
        for k in range(self.m):
            s += lut[:, k][:, self.codes[:, k]]
        return s.reshape(q.shape[0], -1, VECTORS).max(-1)


def token_scores(t: Table, q: Any, layers: range, ids: np.ndarray | None) -> np.ndarray:
    """The product's per-token shared scores ``[n, len(ids)]`` (all events when ids is None)."""
    total = None
    for lay in layers:
        reps = t.reps[lay] if ids is None else t.reps[lay][ids]
        s = q.token_layer_scores(lay, reps, VECTORS)
        total = s if total is None else total + s
    assert total is not None
    return total


def top_budget(order: np.ndarray, sizes: np.ndarray, budget: int) -> set[int]:
    covered = np.cumsum(sizes[order])
    return set(order[: int(np.searchsorted(covered, budget)) + 1].tolist())


def pq_scan(t: Table, enc: list[Any], exact: list[Any], layers: range, args: argparse.Namespace,
            cfg: RetrievalConfig) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """Candidates by a full scan of PQ codes (the shared score with every vector replaced by its code),
    the best ``x`` times the selection's events rescored exactly; questions: each token's best."""
    t0 = time.perf_counter()
    pq = [PQ(t.reps[lay], args.pq_m, args.iters, seed=lay) for lay in layers]
    build_s = time.perf_counter() - t0
    print(f"PQ ({args.pq_m} bytes per vector x {len(layers)} layers) built in {build_s:.0f} s", flush=True)
    approx, scan_ms = [], []
    for q in enc:
        s0 = time.perf_counter()
        total = sum(pq[j].scores(q.tokens[:, lay]) * q.scale[:, lay, None] for j, lay in enumerate(layers))
        approx.append(total)
        scan_ms.append(1000 * (time.perf_counter() - s0))
    rows, results = [], []
    mean_events = cfg.n_mem / float(np.mean(t.sizes))
    for x in (float(v) for v in args.scan_factors.split(",")):
        rec_c, rec_q10, rec_q30, ncand_q = [], [], [], []
        for i, q in enumerate(enc):
            a = approx[i]
            if i < args.chunks:
                cand = np.argsort(-a.mean(0))[: int(x * mean_events)]
                s = token_scores(t, q, layers, cand).mean(0)
                got = top_budget(cand[np.lexsort((cand, -s))], t.sizes, cfg.n_mem)
                rec_c.append(len(got & exact[i]) / len(exact[i]))
            else:
                per = max(1, int(x))  # each token's best x events by the codes
                cand = np.unique(np.argpartition(-a, per, axis=1)[:, :per].ravel())
                order = cand[interleave(token_scores(t, q, layers, cand))]
                e10, e30 = exact[i]
                rec_q10.append(len(set(order[:10].tolist()) & e10) / 10)
                rec_q30.append(len(set(order[:30].tolist()) & e30) / 30)
                ncand_q.append(len(cand))
        r = {"factor": x, "chunk_candidates": int(x * mean_events), "chunk_recall_mean": float(np.mean(rec_c)),
             "chunk_recall_min": float(np.min(rec_c)), "question_candidates": float(np.mean(ncand_q)),
             "question_top10_recall": float(np.mean(rec_q10)), "question_top10_min": float(np.min(rec_q10)),
             "question_top30_recall": float(np.mean(rec_q30)),
             "scan_ms_chunk_p50": float(np.median(scan_ms[: args.chunks])),
             "scan_ms_question_p50": float(np.median(scan_ms[args.chunks:])), "build_s": build_s}
        results.append(r)
        rows.append([x, r["chunk_candidates"], f"{r['chunk_recall_mean']:.3f} / {r['chunk_recall_min']:.2f}",
                     f"{r['question_candidates']:.0f}",
                     f"{r['question_top10_recall']:.3f} / {r['question_top10_min']:.2f}",
                     f"{r['question_top30_recall']:.3f}"])
    print(table(["x", "chunk cand", "chunk recall mean/min", "q cand", "q top10 mean/min", "q top30"], rows))
    print(f"PQ scan (numpy, one thread): {np.median(scan_ms[: args.chunks]):.0f} ms per chunk, "
          f"{np.median(scan_ms[args.chunks:]):.0f} ms per 64-token question")
    return rows, results


@dataclass
class Setup:
    """A real session's table, real queries on its text, and their exact selections (the reference)."""

    table: Table
    layers: range
    cfg: RetrievalConfig
    enc: list[Any]  # the first ``chunks`` are ingestion steps, then the questions
    exact: list[Any]  # chunks: the exact selection's ids; questions: the ids of the first 10 and 30
    exact_s: list[float]
    chunks: int
    questions: int
    tokens: int
    asked: list[Any]  # the questions (bench.eval.eval_tasks.Question), in the order of their queries
    queries: list[np.ndarray]  # ``enc`` before encoding: a chunk's mean ``[layers, 9, 64]``, a question's tokens


def add_data_args(ap: argparse.ArgumentParser) -> None:
    """The arguments :func:`prepare` reads."""
    ap.add_argument("--session", type=Path, required=True, help="a kept session's log folder")
    ap.add_argument("--haystack", default="narrative-1048576", help="the recall suite's haystack it holds")
    ap.add_argument("--events", type=int, default=None, help="use the first N events (default all)")
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--chunks", type=int, default=16)


def prepare(args: argparse.Namespace, *, reference: bool = True, cache: Path | None = None) -> Setup:
    """Load the table, compute the real queries and (``reference``) the exact reference of today's
    score (minutes at 1M tokens). ``cache``: a folder the queries are kept in, by event count, chunks
    and questions."""
    from transformers import AutoTokenizer

    from bench.eval.recall_tasks import TASKS, build, source_filler
    from emserve.server.provision.models import resolve_model

    cfg = RetrievalConfig(repr_proxy="topk")  # the per-layer representatives of the capture
    num_layers = 30
    layers = cfg.score_layers(num_layers)
    t = Table(args.session, len(layers), args.events)
    end = int(t.ends[-1])
    print(f"{t.n} events, {end} tokens", flush=True)
    spec = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(spec.path)
    source, length = args.haystack.rsplit("-", 1)
    hs = build(source_filler(tok, "smollm2-135m", source), source, int(length), 10, 0, TASKS)
    assert np.array_equal(np.asarray(hs.ids[:end]), t.tokens[:end]), "the session does not hold this haystack"
    questions = [q for q in hs.questions if max(b for _, b in q.spans) < end - 1024][: args.questions]
    rng = np.random.default_rng(0)
    chunk_at = np.sort(rng.choice(np.arange(4096, end - 512, 512), args.chunks, replace=False))
    contexts = [list(t.tokens[p - 1536:p + 512]) for p in chunk_at]
    contexts += [list(t.tokens[end - 1024:end]) + list(q.prompt_ids) for q in questions]
    t0 = time.perf_counter()
    kept = None if cache is None else cache / f"queries-{t.n}-{args.chunks}-{len(questions)}.npz"
    if kept is not None and kept.exists():
        with np.load(kept) as f:
            qs = [f[f"q{i}"] for i in range(len(contexts))]
    else:
        qs = model_queries(str(spec.path), contexts[: args.chunks], 512, num_layers)
        qs = [x.mean(0) for x in qs] + model_queries(str(spec.path), contexts[args.chunks:], 64, num_layers)
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            np.savez(kept, **{f"q{i}": x for i, x in enumerate(qs)})
    print(f"queries in {time.perf_counter() - t0:.0f} s", flush=True)

    mean = QueryMean(args.session, num_layers, HEADS * HEAD_DIM).mean
    sample_ids = sample_ids_of(sample_span(t.n, cfg.query_sample), cfg.query_sample)
    rep_sample = np.zeros((num_layers, len(sample_ids), t.reps[0].shape[1]), np.float32)
    for lay in layers:
        rep_sample[lay] = t.reps[lay][sample_ids]
    enc = [encode_queries(x, num_layers=num_layers, query_dim=HEADS * HEAD_DIM, group=HEADS // KV_HEADS,
                          head_dim=HEAD_DIM, mean=mean, rep_sample=rep_sample, vectors=VECTORS, layers=layers)
           for x in qs]

    t0 = time.perf_counter()
    exact: list[Any] = []
    exact_s: list[float] = []
    for i, q in enumerate(enc if reference else []):
        s0 = time.perf_counter()
        ts = token_scores(t, q, layers, None)
        if i < args.chunks:
            s = ts.mean(0)
            exact.append(top_budget(np.lexsort((np.arange(t.n), -s)), t.sizes, cfg.n_mem))
        else:
            order = interleave(ts)
            exact.append((set(order[:10].tolist()), set(order[:30].tolist())))
        exact_s.append(time.perf_counter() - s0)
    print(f"exact in {time.perf_counter() - t0:.0f} s", flush=True)
    return Setup(t, layers, cfg, enc, exact, exact_s, args.chunks, len(questions), end, questions, qs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--probes", default="1,2,4,8,16")
    ap.add_argument("--pq-m", type=int, default=8, help="PQ bytes per vector (sub-quantizers)")
    ap.add_argument("--scan-factors", default="1,2,4,8",
                    help="PQ scan: chunks rescore x times the selection's events; questions each token's best x")
    ap.add_argument("--out", default="ivf_probe")
    args = ap.parse_args()
    d = prepare(args)
    t, layers, cfg, enc, exact, exact_s = d.table, d.layers, d.cfg, d.enc, d.exact, d.exact_s
    end = d.tokens
    t0 = time.perf_counter()
    ivf = [IVF(t.reps[lay], args.nlist, args.iters, seed=lay) for lay in layers]
    build_s = time.perf_counter() - t0
    print(f"IVF ({args.nlist} lists x {len(layers)} layers) built in {build_s:.0f} s", flush=True)

    rows, results = [], []
    for p in (int(x) for x in args.probes.split(",")):
        for bound in (False, True):
            rec_c, rec_q10, rec_q30, ncand_c, ncand_q, ms_c, ms_q = [], [], [], [], [], [], []
            for i, q in enumerate(enc):
                s0 = time.perf_counter()
                cand = np.unique(np.concatenate([ivf[j].probe(q.tokens[:, lay], p, bound)
                                                 for j, lay in enumerate(layers)]))
                ts = token_scores(t, q, layers, cand)
                if i < args.chunks:
                    s = ts.mean(0)
                    got = top_budget(cand[np.lexsort((cand, -s))], t.sizes, cfg.n_mem)
                    rec_c.append(len(got & exact[i]) / len(exact[i]))
                    ncand_c.append(len(cand))
                    ms_c.append(1000 * (time.perf_counter() - s0))
                else:
                    order = cand[interleave(ts)]
                    e10, e30 = exact[i]
                    rec_q10.append(len(set(order[:10].tolist()) & e10) / 10)
                    rec_q30.append(len(set(order[:30].tolist()) & e30) / 30)
                    ncand_q.append(len(cand))
                    ms_q.append(1000 * (time.perf_counter() - s0))
            r = {"probes": p, "bound": bound, "chunk_recall_mean": float(np.mean(rec_c)),
                 "chunk_recall_min": float(np.min(rec_c)), "chunk_candidates": float(np.mean(ncand_c)),
                 "chunk_ms_p50": float(np.median(ms_c)), "question_top10_recall": float(np.mean(rec_q10)),
                 "question_top30_recall": float(np.mean(rec_q30)), "question_top10_min": float(np.min(rec_q10)),
                 "question_candidates": float(np.mean(ncand_q)), "question_ms_p50": float(np.median(ms_q))}
            results.append(r)
            rows.append([p, "yes" if bound else "no", f"{r['chunk_recall_mean']:.3f} / {r['chunk_recall_min']:.2f}",
                         f"{r['chunk_candidates']:.0f}", f"{r['chunk_ms_p50']:.0f}",
                         f"{r['question_top10_recall']:.3f} / {r['question_top10_min']:.2f}",
                         f"{r['question_top30_recall']:.3f}", f"{r['question_candidates']:.0f}",
                         f"{r['question_ms_p50']:.0f}"])
            print(table(["probes", "bound", "chunk recall mean/min", "cand", "ms", "q top10 mean/min", "q top30",
                         "cand", "ms"], rows[-1:]), flush=True)
    print(table(["probes", "bound", "chunk recall mean/min", "cand", "ms", "q top10 mean/min", "q top30", "cand",
                 "ms"], rows))
    pq_rows, pq_results = pq_scan(t, enc, exact, layers, args, cfg)
    info = {"machine": machine(), "session": str(args.session), "events": t.n, "tokens": end,
            "questions": d.questions, "chunks": args.chunks, "nlist": args.nlist, "iters": args.iters,
            "build_s": build_s, "exact_chunk_s_p50": float(np.median(exact_s[: args.chunks])),
            "exact_question_s_p50": float(np.median(exact_s[args.chunks:])), "results": results,
            "pq_m": args.pq_m, "pq_results": pq_results}
    print(f"wrote {write_results(args.out, info)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

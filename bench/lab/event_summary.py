"""Can one vector per event find what exact scoring selects, on a real long session?

Exact scoring reads every event's 4 representatives in each of the 20 scoring layers (80 vectors of 192
floats per event) for every query token: a 64-token question at 1M tokens is ~9 s on this machine, and no
per-layer index keeps the selection (``ivf_probe``, ``retrieval_index.md``). This measures a candidate
stage that a single index could serve (#19): each event summarized by one vector, the concatenation over
the scoring layers of the mean of its representatives (3,840 floats), scored against the concatenation of
the query token's standardized, folded, centered per-layer vectors. ``q . summary`` is the product's
shared score with each layer's MaxSim replaced by the mean over the event's representatives, a lower
bound of it. The best ``C`` events of each question token by that proxy (an ingestion step: the best
``x`` times the budget's events by the mean query's proxy) are rescored exactly and ranked as the product
ranks them; recall is measured against exact scoring of every event, as in ``ivf_probe``. Optionally the
summaries are reduced by PCA (``--dims``), the size a compressed single index would hold.

Data and queries: those of ``ivf_probe`` (``--session DIR/log`` of a kept session in table format 1).

    .venv/bin/python -m bench.lab.event_summary --session DIR/log --haystack narrative-1048576
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import time
from typing import Any

import numpy as np

from bench.eval.common import machine, table, write_results
from bench.lab.ivf_probe import HEAD_DIM, KV_HEADS, VECTORS, Setup, add_data_args, prepare, token_scores, top_budget
from emserve.retrieval.retriever import interleave


def summaries(d: Setup) -> np.ndarray:
    """``[events, layers * 192]``: per scoring layer, the mean of each event's representatives."""
    dim = KV_HEADS * HEAD_DIM
    out = np.empty((d.table.n, len(d.layers) * dim), np.float32)
    for j, lay in enumerate(d.layers):
        out[:, j * dim:(j + 1) * dim] = np.asarray(d.table.reps[lay], np.float32).reshape(-1, VECTORS, dim).mean(1)
    return out


def query_vectors(q: Any, layers: range) -> np.ndarray:
    """``[n, layers * 192]``: each token's standardized per-layer query vectors, concatenated."""
    return np.concatenate([q.tokens[:, lay] * q.scale[:, lay, None] for lay in layers], axis=1)


class Reducer:
    """PCA of the summaries to ``k`` dimensions: ``q . s ~ q . mu + (q U) . ((s - mu) U)``."""

    def __init__(self, s: np.ndarray, k: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        sample = s[rng.choice(s.shape[0], min(s.shape[0], 20000), replace=False)]
        self.mu = sample.mean(0)
        _, _, vt = np.linalg.svd(sample - self.mu, full_matrices=False)
        self.u = np.ascontiguousarray(vt[:k].T)  # [D, k]
        self.codes = ((s - self.mu) @ self.u).astype(np.float32)  # [events, k]

    def scores(self, qv: np.ndarray) -> np.ndarray:
        return (qv @ self.mu)[:, None] + (qv @ self.u) @ self.codes.T


def evaluate(d: Setup, proxy: list[np.ndarray], label: str, cands: list[int], factors: list[float],
             ms: list[float]) -> list[dict[str, Any]]:
    """Recall of the proxy's candidates after exact rescoring, per candidate count."""
    t, cfg = d.table, d.cfg
    mean_events = cfg.n_mem / float(np.mean(t.sizes))
    out = []
    for c, x in zip(cands, factors, strict=True):
        rec_c, rec_q10, rec_q30, rec_raw10, ncand = [], [], [], [], []
        for i, q in enumerate(d.enc):
            p = proxy[i]
            if i < d.chunks:
                cand = np.argsort(-p.mean(0))[: int(x * mean_events)]
                s = token_scores(t, q, d.layers, cand).mean(0)
                got = top_budget(cand[np.lexsort((cand, -s))], t.sizes, cfg.n_mem)
                rec_c.append(len(got & d.exact[i]) / len(d.exact[i]))
            else:
                cand = np.unique(np.argpartition(-p, c, axis=1)[:, :c].ravel())
                order = cand[interleave(token_scores(t, q, d.layers, cand))]
                raw = interleave(p)  # the proxy's own ranking, without rescoring
                e10, e30 = d.exact[i]
                rec_q10.append(len(set(order[:10].tolist()) & e10) / 10)
                rec_q30.append(len(set(order[:30].tolist()) & e30) / 30)
                rec_raw10.append(len(set(raw[:10].tolist()) & e10) / 10)
                ncand.append(len(cand))
        out.append({"proxy": label, "per_token": c, "chunk_factor": x,
                    "chunk_recall_mean": float(np.mean(rec_c)), "chunk_recall_min": float(np.min(rec_c)),
                    "question_candidates": float(np.mean(ncand)), "question_top10_recall": float(np.mean(rec_q10)),
                    "question_top10_min": float(np.min(rec_q10)), "question_top30_recall": float(np.mean(rec_q30)),
                    "question_top30_min": float(np.min(rec_q30)), "proxy_only_top10": float(np.mean(rec_raw10)),
                    "proxy_ms_question_p50": float(np.median(ms[d.chunks:]))})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap)
    ap.add_argument("--per-token", default="8,16,32,64,128", help="questions: each token's best C by the proxy")
    ap.add_argument("--chunk-factors", default="1,2,4,8,16", help="ingestion: x times the budget's events")
    ap.add_argument("--dims", default="512,256,128", help="PCA sizes to try besides the full summary")
    ap.add_argument("--out", default="event_summary")
    args = ap.parse_args()
    cands = [int(v) for v in args.per_token.split(",")]
    factors = [float(v) for v in args.chunk_factors.split(",")]
    if len(cands) != len(factors):
        ap.error("--per-token and --chunk-factors pair up: give as many of each")
    d = prepare(args)
    t0 = time.perf_counter()
    s = summaries(d)
    print(f"summaries {s.shape} in {time.perf_counter() - t0:.0f} s", flush=True)
    qvs = [query_vectors(q, d.layers) for q in d.enc]

    results: list[dict[str, Any]] = []
    variants: list[tuple[str, Any]] = [(f"mean, {s.shape[1]} dims", lambda qv: qv @ s.T)]
    for k in (int(v) for v in args.dims.split(",") if v):
        red = Reducer(s, k)
        variants.append((f"mean, PCA {k}", red.scores))
    for label, score in variants:
        proxy, ms = [], []
        for qv in qvs:
            t0 = time.perf_counter()
            proxy.append(score(qv))
            ms.append(1000 * (time.perf_counter() - t0))
        rows = evaluate(d, proxy, label, cands, factors, ms)
        results += rows
        print(table(["proxy", "C", "q cand", "q top10 mean/min", "q top30 mean/min", "proxy only top10",
                     "x", "chunk recall mean/min", "proxy ms/question"],
                    [[r["proxy"], r["per_token"], f"{r['question_candidates']:.0f}",
                      f"{r['question_top10_recall']:.3f} / {r['question_top10_min']:.2f}",
                      f"{r['question_top30_recall']:.3f} / {r['question_top30_min']:.2f}",
                      f"{r['proxy_only_top10']:.3f}", r["chunk_factor"],
                      f"{r['chunk_recall_mean']:.3f} / {r['chunk_recall_min']:.2f}",
                      f"{r['proxy_ms_question_p50']:.0f}"] for r in rows]), flush=True)
    info = {"machine": machine(), "session": str(args.session), "events": d.table.n, "tokens": d.tokens,
            "questions": d.questions, "chunks": d.chunks, "summary_dims": int(s.shape[1]),
            "exact_question_s_p50": float(np.median(d.exact_s[d.chunks:])), "results": results}
    print(f"wrote {write_results(args.out, info)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Can one index over token vectors serve the token-level MaxSim, on a real long session?

With the ``"tokens"`` representatives (an event's 4 tokens of largest key norm summed over the scoring
layers, the same tokens in every layer) a shared selection scores an event by the token-level MaxSim
``max_j sum_l s_l q_l . k_{l,j}``: one inner product per token vector, the concatenation of a token's
de-rotated keys over the 20 scoring layers (3,840 floats), with the query's concatenation
``[s_l q_l]_l``. One index over those vectors (4 per event) could then replace the 20 per-layer indexes
(#19). This measures, against exact token-level scoring of every event (the product's score with
``repr_proxy="tokens"``):

* **PCA**: the vectors projected on the top ``d`` directions of their second moment (fitted on a
  sample), scanned in full: what the reduction alone loses;
* **HNSW over the projected vectors** (hnswlib, one graph): each query vector's best ``C`` vectors, their
  events' union rescored exactly (the candidate stage a product would run). ``hnsw-ip``: hnswlib's inner
  product space on the vectors as they are; ``hnsw-l2``: the MIPS-to-nearest-neighbour reduction
  (Bachrach et al. 2014: each vector gets the extra coordinate ``sqrt(M^2 - |x|^2)``, the query 0, so
  the L2 order is the inner-product order), since graph search needs a metric.

Steps, as ``ivf_probe``: ingestion chunks (one mean query; selection recall of the budget's events)
and questions (64 query tokens, ``interleave``; recall of the exact ranking's first 10 and 30).
``interleave`` orders a question's tokens by how far each token's best event stands out of its scores
(``(max - mean) / std``): over a candidate set those statistics are not the ones over every event, so
the order of the tokens, and with it the ranking, changes with the candidates even when each token's best
events are among them. ``--stats`` chooses where the mean and spread come from, for the reference and
the candidates alike: ``scored`` (the events scored: the product's rule today), ``all`` (every event:
an oracle, the candidate stage's own loss) or ``sample`` (the query sample's events, which every path
can score: a rule that does not depend on the candidates). Queries
are standardized as the product does with the ``"tokens"`` table (sigma of each layer's MaxSim over a
sample of its aligned representatives). Data: a session in table format 1 with its KV log (a live one
is only read), real queries of the same model (``ivf_probe.prepare``).

    .venv/bin/python -m bench.lab.token_index --session DIR/log --haystack reference-1048576 --questions 40
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.eval.common import machine, table, write_results
from bench.lab.ivf_probe import HEAD_DIM, HEADS, KV_HEADS, VECTORS, Setup, add_data_args, prepare, top_budget
from emserve.retrieval.kvlog import KVLog
from emserve.retrieval.queries import QueryMean, encode_queries
from emserve.retrieval.representatives import event_representatives
from emserve.retrieval.retriever import interleave, sample_ids_of, sample_span

BLOCK = 16384
WIDTH = KV_HEADS * HEAD_DIM


def aligned_vectors(d: Setup, log: KVLog, rotate: Any) -> np.ndarray:
    """float16 ``[events, 4, layers * 192]``: each event's ``"tokens"`` representatives (the product's
    ``event_representatives``), concatenated over the scoring layers, computed in blocks of events."""
    t, nl = d.table, len(d.layers)
    out = np.empty((t.n, VECTORS, nl * WIDTH), np.float16)
    first = 0
    while first < t.n:
        last = max(first + 1, int(np.searchsorted(t.ends, t.starts[first] + BLOCK, side="right")))
        ranges = list(zip(t.starts[first:last].tolist(), t.ends[first:last].tolist(), strict=True))
        reps = event_representatives(log, ranges, num_heads=HEADS, rotate=rotate, repr_topk=VECTORS,
                                     proxy="tokens", layers=d.layers)  # [E, L, V * 192]
        out[first:last] = reps.reshape(last - first, nl, VECTORS, WIDTH).transpose(0, 2, 1, 3).reshape(
            last - first, VECTORS, nl * WIDTH)
        first = last
    return out


def concat_queries(q: Any, layers: range) -> np.ndarray:
    """``[n, layers * 192]``: each query token's scaled per-layer vectors, concatenated."""
    return np.concatenate([q.tokens[:, lay] * q.scale[:, lay, None] for lay in layers], axis=1).astype(np.float32)


def exact_scores(vecs: np.ndarray, qc: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    """Token-level MaxSim ``[n, events]`` of events ``ids`` (None: all)."""
    n = vecs.shape[0] if ids is None else ids.shape[0]
    out = np.empty((qc.shape[0], n), np.float32)
    for a in range(0, n, 4096):
        b = min(n, a + 4096)
        v = (vecs[a:b] if ids is None else vecs[ids[a:b]]).astype(np.float32).reshape(-1, qc.shape[1])
        out[:, a:b] = (v @ qc.T).reshape(b - a, VECTORS, -1).max(axis=1).T
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap)
    ap.add_argument("--dims", default="64,128,256", help="PCA dimensions")
    ap.add_argument("--per-token", default="8,32,128", help="HNSW: candidate vectors per question token")
    ap.add_argument("--chunk-factors", default="2,4,8", help="HNSW: a chunk's candidates, x the budget's events")
    ap.add_argument("--hnsw-m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=100)
    ap.add_argument("--kinds", default="scan,hnsw-ip,hnsw-l2")
    ap.add_argument("--stats", choices=("scored", "all", "sample"), default="scored",
                    help="where interleave's per-token mean and spread come from (module docstring)")
    ap.add_argument("--cache", type=Path, default=None, help="keep the queries and vectors here between runs")
    ap.add_argument("--out", default="token_index")
    ap.set_defaults(chunks=12)
    args = ap.parse_args()
    d = prepare(args, reference=False, cache=args.cache)
    import hnswlib
    from transformers import AutoConfig

    from emserve.server.engine.rope import RopeSpec
    from emserve.server.provision.models import resolve_model

    rope = RopeSpec.from_hf_config(AutoConfig.from_pretrained(resolve_model("smollm2-135m").path))
    log = KVLog.open(args.session)
    t, layers, cfg = d.table, d.layers, d.cfg
    t0 = time.perf_counter()
    cached = None if args.cache is None else args.cache / f"vectors-{t.n}.npy"
    if cached is not None and cached.exists():
        vecs = np.load(cached, mmap_mode="r")
    else:
        vecs = aligned_vectors(d, log, rope.rotate)
        if cached is not None:
            args.cache.mkdir(parents=True, exist_ok=True)
            np.save(cached, vecs)
    print(f"aligned vectors of {t.n} events in {time.perf_counter() - t0:.0f} s", flush=True)

    # the queries again, standardized on the aligned table's sample (as the product would)
    nl, num_layers = len(layers), 30
    sample_ids = sample_ids_of(sample_span(t.n, cfg.query_sample), cfg.query_sample)
    rep_sample = np.zeros((num_layers, len(sample_ids), VECTORS * WIDTH), np.float32)
    sv = vecs[sample_ids].astype(np.float32).reshape(len(sample_ids), VECTORS, nl, WIDTH)
    for j, lay in enumerate(layers):
        rep_sample[lay] = sv[:, :, j].reshape(len(sample_ids), -1)
    mean = QueryMean(args.session, num_layers, HEADS * HEAD_DIM).mean
    enc = [encode_queries(x, num_layers=num_layers, query_dim=HEADS * HEAD_DIM, group=HEADS // KV_HEADS,
                          head_dim=HEAD_DIM, mean=mean, rep_sample=rep_sample, vectors=VECTORS, layers=layers)
           for x in d.queries]
    qcs = [concat_queries(q, layers) for q in enc]

    t0 = time.perf_counter()
    exact: list[Any] = []
    exact_ms: list[float] = []
    stats: list[tuple[np.ndarray, np.ndarray] | None] = []
    for i, qc in enumerate(qcs):
        s0 = time.perf_counter()
        ts = exact_scores(vecs, qc)
        if args.stats == "all":
            stats.append((ts.mean(axis=1), ts.std(axis=1)))
        elif args.stats == "sample":
            ss = exact_scores(vecs, qc, sample_ids)
            stats.append((ss.mean(axis=1), ss.std(axis=1)))
        else:
            stats.append(None)
        if i < d.chunks:
            exact.append(top_budget(np.lexsort((np.arange(t.n), -ts.mean(0))), t.sizes, cfg.n_mem))
        else:
            order = interleave(ts, stats[i])
            exact.append((set(order[:10].tolist()), set(order[:30].tolist())))
        exact_ms.append(1000 * (time.perf_counter() - s0))
    print(f"exact token-level in {time.perf_counter() - t0:.0f} s", flush=True)

    def judge(i: int, cand: np.ndarray) -> float | tuple[float, float]:
        ts = exact_scores(vecs, qcs[i], cand)
        if i < d.chunks:
            got = top_budget(cand[np.lexsort((cand, -ts.mean(0)))], t.sizes, cfg.n_mem)
            return len(got & exact[i]) / len(exact[i])
        order = cand[interleave(ts, stats[i])]
        e10, e30 = exact[i]
        return len(set(order[:10].tolist()) & e10) / 10, len(set(order[:30].tolist()) & e30) / 30

    rng = np.random.default_rng(0)
    fit = vecs[rng.choice(t.n, min(t.n, 6000), replace=False)].astype(np.float32).reshape(-1, nl * WIDTH)
    _, _, vt = np.linalg.svd(fit, full_matrices=False)  # uncentered: the inner products' subspace
    mean_events = cfg.n_mem / float(np.mean(t.sizes))
    rows, results = [], []
    for dim in (int(x) for x in args.dims.split(",")):
        p = vt[:dim].T.astype(np.float32)  # [3840, dim]
        proj = np.concatenate([vecs[a:a + 8192].astype(np.float32).reshape(-1, nl * WIDTH) @ p
                               for a in range(0, t.n, 8192)])  # [events * 4, dim]
        kept = float(np.linalg.norm(fit @ p) ** 2 / np.linalg.norm(fit) ** 2)
        # PCA alone, scanned in full: each question token's best C events / a chunk's best x budgets
        configs: list[tuple[str, Any]] = []
        norms = np.linalg.norm(proj, axis=1)
        lifted = np.concatenate([proj, np.sqrt(np.maximum(norms.max() ** 2 - norms ** 2, 0))[:, None]], axis=1)
        graphs, build = {}, {}
        for kind, space, data in (("hnsw-ip", "ip", proj), ("hnsw-l2", "l2", lifted)):
            if kind not in args.kinds.split(","):
                continue
            t0 = time.perf_counter()
            ix = hnswlib.Index(space=space, dim=data.shape[1])
            ix.init_index(max_elements=data.shape[0], M=args.hnsw_m, ef_construction=args.ef_construction)
            ix.set_num_threads(1)
            ix.add_items(data, np.arange(data.shape[0]))
            graphs[kind], build[kind] = ix, time.perf_counter() - t0
            print(f"PCA {dim} (keeps {kept:.3f} of the energy): {kind} over {data.shape[0]} vectors in "
                  f"{build[kind]:.0f} s ({1e6 * build[kind] / data.shape[0]:.0f} us per add)", flush=True)
        for c, x in zip((int(v) for v in args.per_token.split(",")),
                        (float(v) for v in args.chunk_factors.split(",")), strict=True):
            configs += [(kind, (c, x)) for kind in args.kinds.split(",")]
        for kind, (c, x) in configs:
            rec_c, q10, q30, cand_n, ms = [], [], [], [], []
            for i, qc in enumerate(qcs):
                s0 = time.perf_counter()
                qp = qc @ p
                k = int(x * mean_events) * VECTORS if i < d.chunks else c
                if i < d.chunks:
                    qp = qp.mean(0, keepdims=True)
                if kind == "scan":
                    s = qp @ proj.T
                    found = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
                else:
                    ix = graphs[kind]
                    ix.set_ef(max(k, 64))
                    qg = qp if kind == "hnsw-ip" else np.concatenate([qp, np.zeros((qp.shape[0], 1), np.float32)], 1)
                    found, _ = ix.knn_query(qg, k=k)
                cand = np.unique(found.ravel() // VECTORS).astype(np.int64)
                r = judge(i, cand)
                ms.append(1000 * (time.perf_counter() - s0))
                cand_n.append(len(cand))
                if i < d.chunks:
                    assert isinstance(r, float)
                    rec_c.append(r)
                else:
                    assert isinstance(r, tuple)
                    q10.append(r[0])
                    q30.append(r[1])
            res = {"dim": dim, "kind": kind, "per_token": c, "chunk_factor": x, "energy_kept": kept,
                   "hnsw_build_s": build.get(kind, 0.0), "vectors": int(proj.shape[0]),
                   "chunk_recall_mean": float(np.mean(rec_c)), "chunk_recall_min": float(np.min(rec_c)),
                   "question_top10_mean": float(np.mean(q10)), "question_top10_min": float(np.min(q10)),
                   "question_top30_mean": float(np.mean(q30)),
                   "chunk_candidates": float(np.mean(cand_n[: d.chunks])),
                   "question_candidates": float(np.mean(cand_n[d.chunks:])),
                   "chunk_ms_p50": float(np.median(ms[: d.chunks])), "question_ms_p50": float(np.median(ms[d.chunks:])),
                   "question_ms_max": float(np.max(ms[d.chunks:]))}
            results.append(res)
            rows.append([dim, kind, c, x, f"{res['chunk_recall_mean']:.3f} / {res['chunk_recall_min']:.2f}",
                         f"{res['chunk_candidates']:.0f}",
                         f"{res['question_top10_mean']:.3f} / {res['question_top10_min']:.2f}",
                         f"{res['question_top30_mean']:.3f}", f"{res['question_candidates']:.0f}",
                         f"{res['chunk_ms_p50']:.0f}", f"{res['question_ms_p50']:.0f}"])
            print(table(["dim", "kind", "C/token", "x", "chunk recall mean/min", "chunk cand", "q top10 mean/min",
                         "q top30", "q cand", "chunk ms", "q ms"], rows[-1:]), flush=True)
        del graphs, proj, lifted
    print(table(["dim", "kind", "C/token", "x", "chunk recall mean/min", "chunk cand", "q top10 mean/min",
                 "q top30", "q cand", "chunk ms", "q ms"], rows))
    info = {"machine": machine(), "session": str(args.session), "events": t.n, "tokens": d.tokens,
            "chunks": d.chunks, "questions": d.questions, "stats": args.stats,
            "exact_ms_p50_chunk": float(np.median(exact_ms[: d.chunks])),
            "exact_ms_p50_question": float(np.median(exact_ms[d.chunks:])), "results": results}
    print(f"wrote {write_results(args.out, info)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

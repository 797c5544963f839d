"""Would a scoring that one index can serve find the needles as well as today's, on a real long session?

Today a question token scores an event by a sum over the 20 scoring layers of a MaxSim over that layer's
4 representatives (the largest-norm keys *of that layer*), so the best key may be a different token in
every layer and no single vector per event or per token reproduces the score: per-layer indexes miss
the selection (``ivf_probe``, HNSW 0.65) and one summary vector per event washes the needle out
(``event_summary``). A *token-level* MaxSim, ``max_t sum_l s_l q_l . k_{l,t}`` over the tokens ``t`` of
the event, is one maximum inner product per token over the concatenation of its keys in the scoring
layers: one index over token vectors could serve it (#19). This compares, on real questions of the recall
suite with real queries, where each scoring ranks the events that hold the answer:

* ``today``: the product's shared score from the event table;
* ``token, all``: token-level MaxSim over every token of the event (de-rotated keys from the KV log);
* ``token, top-4``: the same over the 4 tokens with the largest key norm summed over the scoring layers
  (what a table of 4 token vectors per event would hold).

Each ranks the events with the product's ``interleave`` of the 64 question tokens' rankings. Per
question: the best rank of an event overlapping the answer's spans, and whether all of them are in the
first 30. Queries, standardization and data are ``ivf_probe``'s (``--session`` of a kept or live
session in table format 1, with its KV log; a live session is only read).

    .venv/bin/python -m bench.lab.token_maxsim --session DIR/log --haystack reference-1048576 --questions 24
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import time
from typing import Any

import numpy as np
import torch

from bench.eval.common import machine, table, write_results
from bench.lab.ivf_probe import HEAD_DIM, KV_HEADS, Setup, add_data_args, prepare, token_scores
from emserve.retrieval.kvlog import KVLog
from emserve.retrieval.retriever import interleave

BLOCK = 16384


def token_level(d: Setup, log: KVLog, rotate: Any, qv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token-level MaxSim ``max_t sum_l s_l q_l . k_{l,t}`` of every event for every query vector
    ``qv [Q, layers, 192]``: over all the event's tokens, and over its 4 tokens of largest key norm
    summed over the scoring layers; each ``[Q, events]``. Reads the keys in blocks of whole events."""
    t = d.table
    every = np.empty((qv.shape[0], t.n), np.float32)
    top4 = np.empty((qv.shape[0], t.n), np.float32)
    first = 0
    while first < t.n:
        last = int(np.searchsorted(t.ends, t.starts[first] + BLOCK, side="right"))
        last = max(last, first + 1)
        a, b = int(t.starts[first]), int(t.ends[last - 1])
        delta = -torch.from_numpy(log.positions(a, b).astype(np.int64))
        scores = np.zeros((b - a, qv.shape[0]), np.float32)
        norms = np.zeros(b - a, np.float32)
        for j, lay in enumerate(d.layers):
            k = rotate(log.keys(lay, a, b).to(torch.float32), delta).reshape(b - a, KV_HEADS * HEAD_DIM).numpy()
            scores += k @ qv[:, j].T
            norms += np.linalg.norm(k, axis=1)
        starts = t.starts[first:last].astype(np.int64) - a
        every[:, first:last] = np.maximum.reduceat(scores, starts, axis=0).T
        keep = np.zeros(b - a, bool)
        for s, e in zip(starts, t.ends[first:last] - a, strict=True):
            keep[s + np.argsort(-norms[s:e], kind="stable")[:4]] = True
        top4[:, first:last] = np.maximum.reduceat(np.where(keep[:, None], scores, -np.inf), starts, axis=0).T
        first = last
    return every, top4


def placement(order: np.ndarray, needed: set[int]) -> tuple[int, bool]:
    """(best rank of a needed event, all needed events in the first 30)."""
    rank = {int(e): i for i, e in enumerate(order)}
    ranks = [rank.get(e, len(order)) for e in needed]
    return min(ranks), max(ranks) < 30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap)
    ap.add_argument("--out", default="token_maxsim")
    ap.set_defaults(chunks=0)
    args = ap.parse_args()
    d = prepare(args)
    from transformers import AutoConfig

    from emserve.server.engine.rope import RopeSpec
    from emserve.server.provision.models import resolve_model

    rope = RopeSpec.from_hf_config(AutoConfig.from_pretrained(resolve_model("smollm2-135m").path))
    log = KVLog.open(args.session)
    t = d.table
    questions = d.enc[d.chunks:]
    qv = np.concatenate([np.stack([q.tokens[:, lay] * q.scale[:, lay, None] for lay in d.layers], 1)
                         for q in questions])  # [Q, layers, 192]
    t0 = time.perf_counter()
    every, top4 = token_level(d, log, rope.rotate, qv)
    print(f"token-level scores of {d.tokens} tokens x {qv.shape[0]} query vectors in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    rows, results = [], []
    for i, (q, asked) in enumerate(zip(questions, d.asked, strict=True)):
        needed = {int(e) for a, b in asked.spans for e in np.flatnonzero((t.starts < b) & (t.ends > a))}
        sl = slice(64 * i, 64 * (i + 1))
        got = {}
        for name, ts in (("today", token_scores(t, q, d.layers, None)), ("token, all", every[sl]),
                         ("token, top-4", top4[sl])):
            got[name] = placement(interleave(ts), needed)
        results.append({"task": asked.task, "qid": asked.qid, "needed_events": len(needed),
                        **{f"{k} best rank": v[0] for k, v in got.items()},
                        **{f"{k} all in 30": v[1] for k, v in got.items()}})
    names = ("today", "token, all", "token, top-4")
    for name in names:
        best = np.array([r[f"{name} best rank"] for r in results])
        rows.append([name, len(results), f"{np.mean(best < 1):.2f}", f"{np.mean(best < 10):.2f}",
                     f"{np.mean(best < 30):.2f}", f"{np.mean([r[f'{name} all in 30'] for r in results]):.2f}",
                     f"{np.median(best):.0f}"])
    print(table(["scoring", "questions", "needed first", "in 10", "in 30", "all needed in 30", "median best rank"],
                rows))
    for task in sorted({r["task"] for r in results}):
        mine = [r for r in results if r["task"] == task]
        print(task, {n: [r[f"{n} best rank"] for r in mine] for n in names})
    info = {"machine": machine(), "session": str(args.session), "events": t.n, "tokens": d.tokens,
            "questions": d.questions, "results": results, "summary": rows}
    print(f"wrote {write_results(args.out, info)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which of a question's query tokens find the needle: rank of the needle's event per query variant.

The evaluation (``docs/results.md``) finds the pass key at every length but the prose needle ("One
of the special magic numbers for quiet-harbor is: 4829173.") at no depth: emserve does not retrieve
its event (runs before ``MemoryConfig.question_rank``). A question was scored with its **last 4
tokens**, events ranked by their mean score: for the pass key they are " The pass key is", the
needle's own words; for the needle " the provided text is", which name nothing in it.

This bench ingests eval haystacks (``eval_tasks``: a needle haystack with needles at ``--depths``,
and a pass-key haystack per depth as the control) into a real
:class:`~emserve.server.session.Session` on the vLLM engine (default model and memory), probes each
question as ``Session.ask`` does but with the queries of *every* question token, and ranks all
events by the session's shared exact score under several query variants:

* ``last N``: the mean over the last N tokens of each token's score (``last 4``: the old default);
* ``all``: the mean over every question token;
* ``top M of all``: per event, the mean of its M best per-token scores (the question's tokens that
  match it, whatever their place).

Two diagnostics beyond one ranking: ``best token (oracle)``, the needle's best rank under any single
question token, and ``round robin``, each question token (in question order) taking its next best
event in turn until the similarity share of the budget is full.

Reported per question and variant: the rank of the best event overlapping the needle (0 = the top),
and whether a question's budget (``question_n_mem``) would take it, i.e. whether the events ranked
above it (plus it) fit the similarity share of the budget.

    .venv/bin/python -m bench.lab.question_queries [--length 16384] [--depths 0.1,0.5,0.9]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS: list[tuple[str, str, int]] = [
    ("last 4", "last", 4), ("last 8", "last", 8), ("last 16", "last", 16), ("all", "last", 0),
    ("top 1 of all", "top", 1), ("top 2 of all", "top", 2), ("top 4 of all", "top", 4), ("top 8 of all", "top", 8)]
NAMES = [v[0] for v in VARIANTS] + ["best token (oracle)", "round robin"]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bench.eval.eval_tasks import Corpus, HaystackSpec, build
    from emserve.retrieval.buffers import contiguity_tokens
    from emserve.server.engine.base import StepOptions
    from emserve.server.engine.config import EngineConfig
    from emserve.server.engine.vllm_engine import VLLMEngine
    from emserve.server.provision.models import resolve_model
    from emserve.server.session import MemoryConfig, Session

    spec = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(spec.path)
    corpus = Corpus(tok, spec.name)
    depths = tuple(float(x) for x in args.depths.split(","))
    stacks = [build(corpus, HaystackSpec("needle", args.length, depths), args.seed)]
    stacks += [build(corpus, HaystackSpec("passkey", args.length, (d,)), args.seed) for d in depths]
    engine = VLLMEngine(EngineConfig(model=str(spec.path), kv_cache_gib=2))
    cfg = MemoryConfig()
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for h in stacks:
                t0 = time.perf_counter()
                session = Session.create(Path(tmp) / h.hid, engine, cfg)
                await session.append(h.ids)
                await session.flush()
                memory = session.memory
                table, retriever = memory.table, memory.retriever
                n_ev = len(table)
                starts, ends, sizes = table.starts[:n_ev], table.ends[:n_ev], table.sizes[:n_ev]
                print(f"{h.hid}: {len(h.ids)} tokens, {n_ev} events, ingested in {time.perf_counter() - t0:.0f} s",
                      flush=True)
                for q in h.questions:
                    lay = memory.planner.layout(session.num_tokens, len(q.prompt_ids), reserve=10, question=True)
                    m = lay.num_events
                    ks = lay.budget - contiguity_tokens(lay.budget, cfg.retrieval.contiguity_buffer_size)
                    probe = await engine.step(memory.planner.probe_plan(session.num_tokens, q.prompt_ids),
                                              options=StepOptions(surprise=False, query_tokens=len(q.prompt_ids)))
                    qt = probe.query_tokens
                    assert qt is not None and qt.shape[0] == len(q.prompt_ids)
                    per_tok = retriever.token_scores(retriever.encode(qt), None)[:, :m]  # [n_q, m]
                    s0, e0 = q.spans[0]
                    needle = np.flatnonzero((starts[:m] < e0) & (ends[:m] > s0))
                    row: dict[str, Any] = {"hid": h.hid, "task": h.task, "qid": q.qid, "depth": q.depth,
                                           "events": m, "question_tokens": int(qt.shape[0]),
                                           "needle_events": needle.tolist(), "similarity_budget": int(ks)}
                    for name, kind, k in VARIANTS:
                        if kind == "last":
                            sc = per_tok[-k:].mean(0) if k else per_tok.mean(0)
                        else:
                            sc = -np.sort(-per_tok, axis=0)[:k].mean(0)
                        order = np.lexsort((np.arange(m), -sc))
                        pos = np.empty(m, np.int64)
                        pos[order] = np.arange(m)
                        if needle.size == 0:
                            row[name] = None
                            continue
                        best = int(needle[np.argmin(pos[needle])])
                        rank = int(pos[best])
                        fits = int(sizes[order[: rank + 1]].sum()) <= ks
                        row[name] = {"rank": rank, "selected": bool(fits)}
                    # diagnostics beyond a single ranking: the needle's best rank under any one token
                    # (an oracle), and a round robin over the tokens (each takes its next best event in
                    # turn until the similarity share is full)
                    if needle.size:
                        tok_rank = [int(np.flatnonzero(np.isin(np.lexsort((np.arange(m), -t)), needle))[0])
                                    for t in per_tok]
                        row["best token (oracle)"] = {"rank": min(tok_rank), "selected": None,
                                                      "token": int(np.argmin(tok_rank))}
                        orders = [np.lexsort((np.arange(m), -t)) for t in per_tok]
                        taken: list[int] = []
                        used, r = 0, 0
                        while used < ks and r < m:
                            for o in orders:
                                e = int(o[r])
                                if e not in taken and used + int(sizes[e]) <= ks:
                                    taken.append(e)
                                    used += int(sizes[e])
                            r += 1
                        hit = [i for i, e in enumerate(taken) if e in set(needle.tolist())]
                        row["round robin"] = {"rank": hit[0] if hit else -1, "selected": bool(hit)}
                    rows.append(row)
                    if args.dump:
                        np.savez(Path(args.dump) / f"{q.qid}.npz", per_tok=per_tok, sizes=sizes[:m], needle=needle,
                                 ks=ks, prompt_ids=np.asarray(q.prompt_ids))
                    print(f"  {q.qid} (depth {q.depth:.1f}): " + ", ".join(
                        f"{name} {row[name]['rank']}{'*' if row[name]['selected'] else ''}"
                        for name in NAMES if row.get(name) is not None), flush=True)
                session.close()
    finally:
        await engine.close()
    return {"model": spec.name, "length": args.length, "depths": list(depths), "seed": args.seed,
            "question_n_mem": cfg.retrieval.question_n_mem, "variants": NAMES, "rows": rows}


def main() -> int:
    from bench.eval.common import machine, table, write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="question_queries")
    ap.add_argument("--dump", default=None, help="also save each question's per-token scores here (npz)")
    args = ap.parse_args()
    res = asyncio.run(run(args))
    names = res["variants"]
    rows = [[r["qid"], f"{r['depth']:.1f}"] + ["-" if r.get(n) is None else
                                              f"{r[n]['rank']}{'*' if r[n]['selected'] else ''}" for n in names]
            for r in res["rows"]]
    print("\nrank of the needle's event (0 = best; * = within the question's similarity budget)")
    print(table(["question", "depth"] + names, rows))
    def count(sub: list[dict[str, Any]], n: str) -> str:  # selected, or (the oracle) ranked first
        ok = [r for r in sub if r.get(n) and (r[n]["rank"] == 0 if r[n]["selected"] is None else r[n]["selected"])]
        return f"{len(ok)}/{len(sub)}"

    summary = {task: {n: count([r for r in res["rows"] if r["task"] == task], n) for n in names}
               for task in ("needle", "passkey")}
    for task, counts in summary.items():
        print(f"{task}: selected (oracle: ranked first) " + ", ".join(f"{n} {c}" for n, c in counts.items()))
    print("wrote", write_results(args.out, {"machine": machine(), "command": " ".join(sys.argv), **res,
                                           "selected": summary}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())

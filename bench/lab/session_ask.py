"""Ask a kept long stream's labelled questions again, with the session's own search and with exact search.

Opens the session that ``bench/eval/eval.py --long-1m --keep`` (or ``--perf --keep``) left behind, rebuilds
the stream's labelled haystack (same length and seed: same keys and spans), and asks each question
in-process through :meth:`Session.ask_stream` twice: with the index as configured (HNSW once the
session has ``exact_search_threshold`` events) and with exact scoring forced. Per question: the answer,
whether the key's span was in the retrieved events (coverage), the rank-ordered retrieved events' count
and the retrieval time. Tells whether a miss is the approximate search's or the scoring's.

    .venv/bin/python -m bench.lab.session_ask --session DIR [--length 1048576] [--out session_ask-1m]

Asks only; the session's memory is not changed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from typing import Any


def coverage(ranges: list[tuple[int, int]], span: tuple[int, int]) -> float:
    s, e = span
    hit = sum(max(0, min(e, b) - max(s, a)) for a, b in ranges)
    return hit / max(1, e - s)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bench.eval.eval import LABEL_DEPTHS
    from bench.eval.eval_tasks import Corpus, build_labelled
    from emserve.server.engine.base import SamplingSpec
    from emserve.server.engine.config import EngineConfig
    from emserve.server.engine.vllm_engine import VLLMEngine
    from emserve.server.provision.models import resolve_model
    from emserve.server.session import AskResult, Session

    spec = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(spec.path)
    hs = build_labelled(Corpus(tok, spec.name), args.length, LABEL_DEPTHS, args.seed)
    spans = {it["depth"]: tuple(it["span"]) for it in hs.summary()["items"]}
    engine = VLLMEngine(EngineConfig(model=str(spec.path), kv_cache_gib=2))
    t0 = time.perf_counter()
    session = Session.open(args.session, engine)
    session.memory  # noqa: B018 - loads the event table and the indexes
    open_s = time.perf_counter() - t0
    index = session.memory.index
    n = len(session.memory.table)
    print(f"session at {session.num_tokens} tokens, {n} events, opened in {open_s:.1f} s", flush=True)
    default_params = index.params
    rows = []
    for mode in ("default", "exact"):
        index.params = (default_params if mode == "default"
                        else dataclasses.replace(default_params, exact_threshold=n + 1))
        for q in hs.questions:
            result: AskResult | None = None
            t = time.perf_counter()
            async for item in session.ask_stream(q.prompt_ids, SamplingSpec(max_tokens=args.max_tokens)):
                if isinstance(item, AskResult):
                    result = item
            assert result is not None and result.retrieval is not None
            r = result.retrieval
            ranges = r.layers[0].ranges
            answer = tok.decode(result.token_ids)
            row = {"mode": mode, "exact": r.exact, "qid": q.qid, "depth": q.depth, "expected": q.expected,
                   "answer": answer, "correct": q.expected in answer,
                   "coverage": coverage(ranges, spans[q.depth]), "events": len(ranges),
                   "retrieval_s": result.timings.get("retrieval_s"), "total_s": time.perf_counter() - t}
            rows.append(row)
            print(f"{mode:>7} {q.qid}: {answer!r} ({'OK' if row['correct'] else 'wrong'}), coverage "
                  f"{row['coverage']:.2f}, retrieval {row['retrieval_s']:.2f} s", flush=True)
    index.params = default_params
    res = {"session": args.session, "tokens": session.num_tokens, "events": n, "open_s": open_s, "rows": rows}
    session.close()
    engine.close()
    return res


def main() -> int:
    from bench.eval.common import machine, sigterm_exits, table, write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--session", required=True, help="the kept stream's session directory (data-*)")
    ap.add_argument("--length", type=int, default=1 << 20, help="the stream's length (its haystack is rebuilt)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=10)
    ap.add_argument("--out", default="session_ask-1m")
    args = ap.parse_args()
    sigterm_exits()
    res = asyncio.run(run(args))
    print(table(["mode", "question", "answer", "correct", "coverage", "retrieval s"],
                [[r["mode"], r["qid"], repr(r["answer"]), r["correct"], r["coverage"], r["retrieval_s"]]
                 for r in res["rows"]]))
    print("wrote", write_results(args.out, {"machine": machine(), "command": " ".join(sys.argv), **res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

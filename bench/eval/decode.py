"""Decode speed of a question vs vanilla vLLM decoding with a context of the same size, in one run.

One ``emserve serve`` (vLLM, the default model) ingests ``--tokens`` of a long public-domain text into a
session, then answers ``--questions`` questions greedily with ``ignore_eos`` (``--max-tokens`` each); the
server reports each answer's decode rate (``Timings.tokens_per_s``: tokens after the first over the time
from the first to the last) and its context (``Usage.window_tokens`` + ``prompt_tokens``). The server then
stops, and vanilla vLLM (``eval_vanilla.py``: ``vllm.LLM`` on the same model folder and dtype, in its own
process) generates the same number of tokens after a prompt of the same length (the session's text before
the question), ``--reps`` times each, timed the same way. Reported: both rates per question, their ratio,
and the median ratio (the goal: emserve >= 0.9 x vanilla).

    .venv/bin/python -m bench.eval.decode                       # results/decode.json
    .venv/bin/python -m bench.eval.decode --tokens 4096 --questions 2 --no-write   # a smoke run
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from bench.eval.common import machine, table, write_results
from bench.eval.eval import git_rev
from bench.eval.eval_server import Server, add_server_args, harness_inputs, log, text_ids
from bench.eval.eval_vanilla import run_subprocess
from bench.eval.load import QUESTIONS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens ingested into the session")
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per answer")
    ap.add_argument("--reps", type=int, default=3, help="vanilla generations per question")
    ap.add_argument("--dtype", default="auto", help="vanilla vLLM's dtype; auto: the server's rule (give the "
                    "server the same with --server-arg=--dtype when it is not auto)")
    add_server_args(ap, "decode")
    args = ap.parse_args(argv)

    spec, text, workdir = harness_inputs(args, "emserve-decode-")
    ids = text_ids(spec, text, args.tokens)
    server = Server(str(spec.path), workdir, extra=args.server_arg)
    rows: list[dict[str, Any]] = []
    try:
        c = server.client
        c.create_session("s")
        c.ingest_tokens("s", ids, finish=True)
        c.ask("s", QUESTIONS[0], max_tokens=4, chat_template=True)  # the first answer compiles and allocates
        for i in range(args.questions):
            q = QUESTIONS[i % len(QUESTIONS)]
            a = c.ask("s", q, max_tokens=args.max_tokens, ignore_eos=True, chat_template=True, timeout=600)
            u, t = a.complete.usage, a.complete.timings
            rows.append({"id": f"q{i}", "question": q, "tokens": len(a.token_ids), "prompt_tokens": u.prompt_tokens,
                         "window_tokens": u.window_tokens, "context_tokens": u.prompt_tokens + u.window_tokens,
                         "first_token_s": t.first_token_s, "tokens_per_s": t.tokens_per_s})
            log(f"q{i}: {t.tokens_per_s:.1f} tok/s after {u.window_tokens} + {u.prompt_tokens} tokens of context")
    finally:
        server.stop()

    job = {"model": str(spec.path), "max_model_len": max(r["context_tokens"] for r in rows) + args.max_tokens + 16,
           "max_tokens": 1, "prompts": [], "dtype": args.dtype, "decode_reps": args.reps,
           "decode": [{"id": r["id"], "ids": ids[-r["context_tokens"]:], "max_tokens": r["tokens"]} for r in rows]}
    van = run_subprocess(job, workdir, timeout=3600)
    for r in rows:
        reps = [d["tokens_per_s"] for d in van["decode"] if d["id"] == r["id"]]
        r["vanilla_tokens_per_s"] = float(np.median(reps))
        r["vanilla_reps"] = reps
        r["ratio"] = r["tokens_per_s"] / r["vanilla_tokens_per_s"]
    print(table(["question", "context", "tokens", "emserve tok/s", "vanilla tok/s (median)", "ratio"],
                [[r["id"], r["context_tokens"], r["tokens"], r["tokens_per_s"], r["vanilla_tokens_per_s"],
                  r["ratio"]] for r in rows]))
    median = float(np.median([r["ratio"] for r in rows]))
    print(f"\nmedian emserve/vanilla decode rate: {median:.3f} (goal >= 0.9); vanilla dtype {van['dtype']}")
    command = "python -m bench.eval.decode " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"name": args.out, "command": command, "git": git_rev(), "machine": machine(), "model": spec.name,
              "config": vars(args), "rows": rows, "median_ratio": median, "vanilla_dtype": van["dtype"],
              "vanilla_start_s": van["start_s"]}
    if not args.no_write:
        print("wrote", write_results(args.out, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What vLLM's iteration budget costs one session alone: ingest speed and idle question latency, A vs B.

``bench/eval/load.py`` measures what a small iteration budget (``--max-num-batched-tokens`` with
``--long-prefill-token-threshold``) gains: a question that arrives during another session's ingestion
step waits one iteration instead of the whole step. This harness measures what it costs when nothing else
runs: the same text ingested into a fresh session by a server started with each configuration in turn
(A B A B ..., one server at a time), then the same questions asked of it. Reported per pair: ingest
tokens/s and question TTFT p50 of each side and their ratio B/A; the median ratio over the pairs.

    .venv/bin/python -m bench.lab.iteration_budget                 # defaults vs one iteration per step
    .venv/bin/python -m bench.lab.iteration_budget --pairs 1 --tokens 2048 --no-write   # a smoke run
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.eval.common import machine, table, write_results
from bench.eval.eval import git_rev
from bench.eval.eval_server import Server, add_server_args, harness_inputs, log, text_ids
from bench.eval.load import QUESTIONS, ask_timed


def measure(model: str, workdir: Path, extra: list[str], ids: list[int], questions: int) -> dict[str, Any]:
    """One server with ``extra`` flags: a warm-up session, then ``ids`` ingested into a fresh session
    (tokens/s of the whole ingest call) and ``questions`` asked of it one after another."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    server = Server(model, workdir, extra=extra)
    try:
        c = server.client
        c.create_session("warm")
        c.ingest_tokens("warm", ids[-1024:], finish=True)  # the engine's first steps compile and allocate
        ask_timed(c, "warm", QUESTIONS[0], 8)
        c.create_session("s")
        t0 = time.perf_counter()
        c.ingest_tokens("s", ids, finish=True)
        ingest_s = time.perf_counter() - t0
        n = c.get_session("s").num_tokens
        ttft = [ask_timed(c, "s", QUESTIONS[i % len(QUESTIONS)], 8)["ttft_s"] for i in range(questions)]
    finally:
        server.stop()
    return {"tokens": n, "ingest_s": ingest_s, "ingest_tok_s": n / ingest_s, "ttft_s": ttft,
            "ttft_p50_s": float(np.median(ttft))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", default="--max-num-batched-tokens 0 --long-prefill-token-threshold 0",
                    help="`emserve serve` flags of side A (default: one iteration per step)")
    ap.add_argument("--b", default="", help="`emserve serve` flags of side B (default: none, the server's defaults)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens ingested per measurement")
    ap.add_argument("--questions", type=int, default=10, help="questions per measurement")
    add_server_args(ap, "iteration_budget")
    args = ap.parse_args(argv)

    spec, text, workdir = harness_inputs(args, "emserve-iteration-budget-")
    ids = text_ids(spec, text, args.tokens)
    sides = {"A": [*args.server_arg, *shlex.split(args.a)], "B": [*args.server_arg, *shlex.split(args.b)]}
    pairs: list[dict[str, Any]] = []
    for i in range(args.pairs):
        pair = {}
        for side, extra in sides.items():
            pair[side] = measure(str(spec.path), workdir / f"{i}{side}", extra, ids, args.questions)
            log(f"pair {i + 1}/{args.pairs} {side}: {pair[side]['ingest_tok_s']:.0f} tok/s, "
                f"TTFT p50 {pair[side]['ttft_p50_s']:.2f} s")
        pair["ingest_ratio"] = pair["B"]["ingest_tok_s"] / pair["A"]["ingest_tok_s"]
        pair["ttft_ratio"] = pair["B"]["ttft_p50_s"] / pair["A"]["ttft_p50_s"]
        pairs.append(pair)

    rows = [[i + 1, p["A"]["ingest_tok_s"], p["B"]["ingest_tok_s"], p["ingest_ratio"], p["A"]["ttft_p50_s"],
             p["B"]["ttft_p50_s"], p["ttft_ratio"]] for i, p in enumerate(pairs)]
    print(f"A: {args.a or '(defaults)'}\nB: {args.b or '(defaults)'}")
    print(table(["pair", "A tok/s", "B tok/s", "B/A", "A TTFT p50 s", "B TTFT p50 s", "B/A"], rows))
    med_ingest = float(np.median([p["ingest_ratio"] for p in pairs]))
    med_ttft = float(np.median([p["ttft_ratio"] for p in pairs]))
    print(f"\nmedian B/A over {len(pairs)} pairs: ingest tok/s {med_ingest:.3f}, idle question TTFT p50 {med_ttft:.3f}")
    command = "python -m bench.lab.iteration_budget " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"name": args.out, "command": command, "git": git_rev(), "machine": machine(), "model": spec.name,
              "config": vars(args), "pairs": pairs, "median_ingest_ratio": med_ingest, "median_ttft_ratio": med_ttft}
    if not args.no_write:
        print("wrote", write_results(args.out, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

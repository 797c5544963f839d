"""Load harness: questions answered while many sessions ingest, through a real server.

One ``emserve serve`` (vLLM, the default model) holds a question session (``--question-tokens`` of text,
ingested first) and ``--sessions`` ingesting sessions. Two phases, the same questions in both:

* **idle**: the questions are asked one after another on the otherwise idle server;
* **loaded**: the ingesting sessions each stream their own slice of the text without pause (one client
  and one thread per session, ``--piece-chars`` per message) while the same questions are asked again.

Reported: per phase, a question's time to first token seen by the client (call start -> first streamed
text) p50 / p99 / max and the server's ``first_token_s``, ``wait_s``, ``retrieval_s``; the loaded p99
over the idle p99 (one run, same questions); the ingesting sessions' tokens/s together while loaded;
every error of any call (the harness fails on one). Questions do not ``remember``: the question session
is the same in both phases.

    .venv/bin/python -m bench.eval.load                   # 8 sessions, 100 questions per phase: results/load.json
    .venv/bin/python -m bench.eval.load --sessions 2 --questions 5 --no-write   # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

import numpy as np

from bench.eval.common import machine, table, write_results
from bench.eval.eval import git_rev
from bench.eval.eval_server import Server, add_server_args, harness_inputs, log

QUESTIONS = (
    "Who speaks first in the passage above?",
    "What place is described in the text?",
    "Name one person mentioned above.",
    "What happened at the end of the last chapter?",
    "What is the weather like in the story?",
    "Which object is mentioned most often?",
)


def ask_timed(client: Any, sid: str, question: str, max_tokens: int) -> dict[str, float]:
    """One question, streamed: the client's time to the first text piece, and the server's timings."""
    t0 = time.perf_counter()
    first = None
    stream = client.generate(sid, question, max_tokens=max_tokens, chat_template=True, timeout=600)
    for resp in stream:
        if first is None and resp.HasField("chunk") and (resp.chunk.text or resp.chunk.token_ids):
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    assert stream.complete is not None
    tm = stream.complete.timings
    return {"ttft_s": first if first is not None else total, "total_s": total, "server_first_token_s": tm.first_token_s,
            "wait_s": tm.wait_s, "retrieval_s": tm.retrieval_s, "tokens": len(stream.complete.token_ids)}


class Ingester(threading.Thread):
    """Streams its slice of the text into its session until ``stop`` is set, one client of its own."""

    def __init__(self, address: str, sid: str, text: str, piece_chars: int, stop: threading.Event) -> None:
        super().__init__(daemon=True, name=f"ingest-{sid}")
        from emserve.client import Client

        self.client = Client(address, timeout=600)
        self.sid, self.text, self.piece_chars, self.stop = sid, text, piece_chars, stop
        self.tokens = 0
        self.errors: list[str] = []
        self.seconds = 0.0

    def pieces(self):  # noqa: ANN201 - a generator of text pieces
        i = 0
        while not self.stop.is_set():
            yield self.text[i:i + self.piece_chars]
            i = (i + self.piece_chars) % max(1, len(self.text) - self.piece_chars)

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            res = self.client.ingest(self.sid, self.pieces(), max_inflight=2)  # a short drain at the end
            self.tokens = res.tokens
        except Exception as e:  # noqa: BLE001 - every error is reported, none is expected
            self.errors.append(f"{self.sid}: {type(e).__name__}: {e}")
        self.seconds = time.perf_counter() - t0
        self.client.close()


def percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=float)
    return {"n": len(xs), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max()), "mean": float(a.mean())}


def run_phase(server: Server, sid: str, questions: list[str], max_tokens: int, name: str) -> list[dict[str, float]]:
    out = []
    for i, q in enumerate(questions):
        out.append(ask_timed(server.client, sid, q, max_tokens))
        if (i + 1) % 5 == 0 or i + 1 == len(questions):
            log(f"  {name}: {i + 1}/{len(questions)} questions, last TTFT {out[-1]['ttft_s']:.2f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=8, help="ingesting sessions in the loaded phase")
    ap.add_argument("--questions", type=int, default=100,
                    help="questions per phase (a p99 needs about 100: of 30 it is nearly the slowest one)")
    ap.add_argument("--question-tokens", type=int, default=16384, help="text in the question session (about)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--piece-chars", type=int, default=2048, help="characters per ingest message")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of load before the first loaded question")
    add_server_args(ap, "load")
    args = ap.parse_args(argv)

    spec, text, workdir = harness_inputs(args, "emserve-load-")
    server = Server(str(spec.path), workdir, extra=args.server_arg)
    errors: list[str] = []
    try:
        qsid = "question"
        server.client.create_session(qsid)
        qtext = text[: args.question_tokens * 4]  # ~4 characters per token of English prose
        server.client.ingest_text(qsid, qtext, finish=True)
        qtokens = server.client.get_session(qsid).num_tokens
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.questions)]
        ask_timed(server.client, qsid, questions[0], args.max_tokens)  # the first call warms the engine up
        log(f"question session: {qtokens} tokens; idle phase, {len(questions)} questions")
        idle = run_phase(server, qsid, questions, args.max_tokens, "idle")

        stop = threading.Event()
        span = max(1, (len(text) - len(qtext)) // max(1, args.sessions))
        ingesters = []
        for i in range(args.sessions):
            sid = f"load-{i}"
            server.client.create_session(sid)
            start = len(qtext) + i * span
            ingesters.append(Ingester(server.client.address, sid, text[start:start + span], args.piece_chars, stop))
        t0 = time.perf_counter()
        for ing in ingesters:
            ing.start()
        log(f"{args.sessions} sessions ingesting; {args.warmup:.0f} s of warm-up, then {len(questions)} questions")
        time.sleep(args.warmup)
        before = {ing.sid: server.client.get_session(ing.sid).num_tokens for ing in ingesters}
        t_load = time.perf_counter()
        try:
            loaded = run_phase(server, qsid, questions, args.max_tokens, "loaded")
        except Exception as e:  # noqa: BLE001
            errors.append(f"question: {type(e).__name__}: {e}")
            loaded = []
        load_s = time.perf_counter() - t_load
        after = {ing.sid: server.client.get_session(ing.sid).num_tokens for ing in ingesters}
        stop.set()
        for ing in ingesters:
            ing.join(timeout=600)
            errors += ing.errors
        wall = time.perf_counter() - t0
        rss = server.rss()
    finally:
        server.stop()

    ingest_tok_s = sum(after[s] - before[s] for s in after) / load_s if load_s else 0.0
    phases = {"idle": idle, "loaded": loaded}
    keys = ("ttft_s", "server_first_token_s", "wait_s", "retrieval_s")
    stats = {name: {k: percentiles([r[k] for r in rows]) for k in keys} for name, rows in phases.items() if rows}
    ratio = (stats["loaded"]["ttft_s"]["p99"] / stats["idle"]["ttft_s"]["p99"]) if "loaded" in stats else float("nan")
    rows = [[name, s["ttft_s"]["n"], s["ttft_s"]["p50"], s["ttft_s"]["p99"], s["ttft_s"]["max"],
             s["server_first_token_s"]["p50"], s["wait_s"]["p50"], s["retrieval_s"]["p50"]]
            for name, s in stats.items()]
    print(table(["phase", "questions", "TTFT p50 s", "TTFT p99 s", "max s", "server first token p50 s",
                 "wait p50 s", "retrieval p50 s"], rows))
    print(f"\nloaded/idle TTFT p99: {ratio:.2f} (goal <= 3); {args.sessions} sessions ingested "
          f"{ingest_tok_s:.0f} tok/s together while the questions ran; errors: {len(errors)}")
    for e in errors:
        print("  error:", e)
    command = "python -m bench.eval.load " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"name": args.out, "command": command,
              "git": git_rev(), "machine": machine(), "model": spec.name,
              "config": vars(args), "question_session_tokens": qtokens, "stats": stats, "ttft_p99_ratio": ratio,
              "ingest_tok_s_loaded": ingest_tok_s, "ingested_tokens": {s: after[s] for s in after},
              "errors": errors, "wall_s": wall, "rss": rss, "phases": phases}
    if not args.no_write:
        print("wrote", write_results(args.out, result))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""Determinism under traffic: does a session compute the same thing alone and among other sessions?

For each mode (the default, then ``--deterministic``), one ``emserve serve`` (vLLM, the default model):

* **alone**: session ``alone`` ingests the target text (``--target-chars``, 2,048-character messages) on the
  otherwise idle server, then is asked ``--questions`` greedy questions one after another;
* **loaded**: ``--others`` sessions ingest their own text without pause, each also asking itself a question
  every few messages, while session ``loaded`` ingests the same target text and is asked the same questions.

Compared, alone vs loaded: the surprise of every token (largest absolute difference, tokens that differ),
the event boundaries (how many are not in both), and the greedy answers (how many differ). Cost of the mode,
from the loaded phase: the target's ingest seconds, all sessions' tokens/s together, and the target's
question time to first token; the ratio deterministic / default is taken in the same run.

    .venv/bin/python -m bench.eval.determinism              # results/determinism.json
    .venv/bin/python -m bench.eval.determinism --target-chars 8000 --others 2 --questions 2 --no-write  # smoke
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.eval.common import machine, table, write_results
from bench.eval.eval import git_rev
from bench.eval.eval_server import Server, add_server_args, harness_inputs, log

QUESTIONS = ("Who speaks first in the passage above?", "Name one person mentioned above.",
             "What place is described in the text?", "What happened at the end of the passage?",
             "Which object is mentioned most often?", "What is the weather like in the story?")


class Other(threading.Thread):
    """Streams its text into its own session until ``stop``, asking itself a question every ``ask_every``
    messages; one client of its own."""

    def __init__(self, address: str, sid: str, text: str, args: argparse.Namespace, stop: threading.Event) -> None:
        super().__init__(daemon=True, name=sid)
        from emserve.client import Client

        self.client = Client(address, timeout=600)
        self.sid, self.text, self.ask_every, self.chat, self.stop = sid, text, args.ask_every, args.chat_template, stop
        self.tokens = 0
        self.errors: list[str] = []

    def run(self) -> None:
        i, n = 0, 0
        try:
            while not self.stop.is_set():
                piece = self.text[i:i + 2048]
                i = (i + 2048) % max(1, len(self.text) - 2048)
                self.tokens = self.client.ingest_text(self.sid, piece).committed_offset
                n += 1
                if n % self.ask_every == 0:
                    self.client.ask(self.sid, QUESTIONS[n % len(QUESTIONS)], max_tokens=16, chat_template=self.chat)
        except Exception as e:  # noqa: BLE001 - reported
            self.errors.append(f"{self.sid}: {type(e).__name__}: {e}")
        self.client.close()


def target_run(server: Server, sid: str, text: str, questions: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Ingest ``text`` into a new session ``sid``, ask ``questions``; what it computed and how long it took."""
    c = server.client
    c.create_session(sid)
    t0 = time.perf_counter()
    c.ingest_text(sid, text, piece_chars=2048, finish=True)
    ingest_s = time.perf_counter() - t0
    answers, ttft = [], []
    for q in questions:
        t = time.perf_counter()
        first = None
        stream = c.generate(sid, q, max_tokens=args.max_tokens, chat_template=args.chat_template, timeout=600)
        for resp in stream:
            if first is None and resp.HasField("chunk"):
                first = time.perf_counter() - t
        assert stream.complete is not None
        answers.append(list(stream.complete.token_ids))
        ttft.append(first if first is not None else time.perf_counter() - t)
    curve = c.surprise(sid)
    return {"ingest_s": ingest_s, "tokens": c.get_session(sid).num_tokens, "answers": answers, "ttft_s": ttft,
            "surprise": np.asarray(curve.surprise, dtype=np.float32), "boundaries": list(curve.boundaries)}


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    sa, sb = a["surprise"], b["surprise"]
    n = min(len(sa), len(sb))
    diff = np.abs(sa[:n].astype(np.float64) - sb[:n].astype(np.float64))
    ba, bb = set(a["boundaries"]), set(b["boundaries"])
    return {"tokens": n, "surprise_max_abs_diff": float(diff.max()) if n else 0.0,
            "surprise_tokens_differing": int((diff > 0).sum()), "boundaries": [len(ba), len(bb)],
            "boundaries_not_in_both": len(ba ^ bb),
            "answers_differing": sum(x != y for x, y in zip(a["answers"], b["answers"], strict=True)),
            "identical": bool(n == len(sa) == len(sb) and not diff.any() and ba == bb
                              and a["answers"] == b["answers"])}


def run_mode(name: str, spec_path: str, text: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    extra = [*args.server_arg, *(["--deterministic"] if name == "deterministic" else [])]
    (workdir / name).mkdir(parents=True, exist_ok=True)
    server = Server(spec_path, workdir / name, extra=extra)
    target = text[:args.target_chars]
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.questions)]
    errors: list[str] = []
    try:
        server.client.create_session("warm")  # the first call warms the engine up
        server.client.ingest_text("warm", text[-4096:], finish=True)
        server.client.ask("warm", questions[0], max_tokens=4, chat_template=args.chat_template)
        log(f"{name}: alone")
        alone = target_run(server, "alone", target, questions, args)
        stop = threading.Event()
        span = max(4096, (len(text) - args.target_chars) // max(1, args.others))
        others = []
        for i in range(args.others):
            sid = f"other-{i}"
            server.client.create_session(sid)
            start = args.target_chars + i * span
            others.append(Other(server.client.address, sid, text[start:start + span], args, stop))
        for o in others:
            o.start()
        time.sleep(args.warmup)
        log(f"{name}: loaded ({args.others} other sessions ingesting and asking)")
        t0 = time.perf_counter()
        before = sum(server.client.get_session(o.sid).num_tokens for o in others)
        loaded = target_run(server, "loaded", target, questions, args)
        wall = time.perf_counter() - t0
        after = sum(server.client.get_session(o.sid).num_tokens for o in others)
        stop.set()
        for o in others:
            o.join(timeout=600)
            errors += o.errors
    finally:
        server.stop()
    cmp = compare(alone, loaded)
    cost = {"target_ingest_s_loaded": loaded["ingest_s"], "target_ingest_s_alone": alone["ingest_s"],
            "all_tok_s_loaded": (after - before + loaded["tokens"]) / wall,
            "ttft_p50_loaded": float(np.percentile(loaded["ttft_s"], 50)),
            "ttft_p50_alone": float(np.percentile(alone["ttft_s"], 50))}
    log(f"{name}: {cmp}; {cost}")
    return {"compare": cmp, "cost": cost, "errors": errors,
            "answers": {"alone": alone["answers"], "loaded": loaded["answers"]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-chars", type=int, default=24000, help="the compared session's text (about 6k tokens)")
    ap.add_argument("--others", type=int, default=4, help="other sessions ingesting during the loaded phase")
    ap.add_argument("--ask-every", type=int, default=3, help="an other session asks itself every this many messages")
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of traffic before the loaded phase")
    ap.add_argument("--modes", default="default,deterministic")
    ap.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                    help="ask raw prompts (a model without a chat template)")
    add_server_args(ap, "determinism")
    args = ap.parse_args(argv)

    spec, text, workdir = harness_inputs(args, "emserve-determinism-")
    modes = {m: run_mode(m, str(spec.path), text, args, workdir) for m in args.modes.split(",")}
    rows = [[m, r["compare"]["tokens"], r["compare"]["surprise_max_abs_diff"],
             r["compare"]["surprise_tokens_differing"], r["compare"]["boundaries_not_in_both"],
             f"{r['compare']['answers_differing']}/{args.questions}",
             r["cost"]["target_ingest_s_loaded"], r["cost"]["all_tok_s_loaded"], r["cost"]["ttft_p50_loaded"]]
            for m, r in modes.items()]
    print(table(["mode", "tokens", "max |Δ surprise|", "tokens Δ", "boundaries Δ", "answers Δ",
                 "target ingest s (loaded)", "all tok/s (loaded)", "TTFT p50 s (loaded)"], rows))
    ratios = {}
    if {"default", "deterministic"} <= set(modes):
        d, s = modes["default"]["cost"], modes["deterministic"]["cost"]
        ratios = {"target_ingest_s": s["target_ingest_s_loaded"] / d["target_ingest_s_loaded"],
                  "all_tok_s": s["all_tok_s_loaded"] / d["all_tok_s_loaded"],
                  "ttft_p50": s["ttft_p50_loaded"] / d["ttft_p50_loaded"]}
        print(f"\ndeterministic / default, loaded phase: target ingest time {ratios['target_ingest_s']:.2f}x, "
              f"all sessions' tok/s {ratios['all_tok_s']:.2f}x, question TTFT p50 {ratios['ttft_p50']:.2f}x")
    errors = [e for r in modes.values() for e in r["errors"]]
    for e in errors:
        print("  error:", e)
    command = "python -m bench.eval.determinism " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"name": args.out, "command": command, "git": git_rev(), "machine": machine(), "model": spec.name,
              "config": vars(args), "modes": modes, "ratios": ratios, "errors": errors}
    if not args.no_write:
        print("wrote", write_results(args.out, result))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

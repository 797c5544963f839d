"""The recall suite's questions asked again, under several question-window variants, on kept sessions.

``bench/eval/recall.py --keep`` leaves its sessions (each haystack ingested once) in its work folder and
names that folder in its results file. This script rebuilds the same haystacks and questions from that
file, opens each ``emserve`` session in-process on the product engine (vLLM, the run's model), and asks
every question once per variant: a variant is a set of ``MemoryConfig`` overrides (the question
settings, ``bench.eval.common.is_question_setting``) applied to today's question defaults. Answers are
greedy and the sessions the same, so the variants compare question by question, without ingesting again.

    .venv/bin/python -m bench.eval.recall --systems emserve --reference-lengths '' --keep --out lab-32k
    .venv/bin/python -m bench.lab.recall_variants --from bench/results/lab-32k.json \\
        --variant 'reach 0={"question_reach": 0}' --variant 'neighbours 3={"question_neighbours": 3}'

A variant may also set ``_graph_ef`` (this lab's key, not a setting): its questions search the session's token
graph at that ``ef`` whatever the session's size (a ``repr_proxy="tokens"`` session on the CPU keeps one from
half the exact-search threshold on), so a kept session of ~12k events compares the graph path with the exact
one, question by question:

    .venv/bin/python -m bench.lab.recall_variants --from <a tokens run> --variant 'graph={"_graph_ef": 64}'

``_exact`` (``true``) is the other way round: its questions score every event exactly, so a session past the
exact-search threshold (where today's defaults search the graph) compares the two as well.

Per (variant, haystack, task): questions, the asked sentences wholly in the answer step's window
(``AskResult.window``, what the trace reports), answers right, and answer windows the same as with today's
defaults. Prints a table and writes ``bench/results/<out>.json`` (every answer, with its window, whether its
retrieval was exact and its retrieval time).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import glob
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.eval.common import is_question_setting, machine, question_defaults, report_results, wilson
from bench.eval.eval_server import window_coverage
from bench.eval.recall import haystacks

GRAPH_EF = "_graph_ef"
"""A variant key of this lab, not a setting: ask through the session's token graph at this ``ef``, whatever
the session's size (its exact-search threshold set to 0 while the variant asks)."""
EXACT = "_exact"
"""A variant key of this lab, not a setting: ``true`` asks by exact scoring of every event, whatever the
session's size (its exact-search threshold out of reach while the variant asks)."""


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, body = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON, got {text!r}")
    over = json.loads(body)
    if not isinstance(over, dict) or not all(is_question_setting(k) or k in (GRAPH_EF, EXACT) for k in over):
        raise argparse.ArgumentTypeError(f"a variant overrides question settings only (question_*, "
                                         f"interleave_stats) or sets {GRAPH_EF} or {EXACT}: {body!r}")
    if EXACT in over and (over[EXACT] is not True or GRAPH_EF in over):
        raise argparse.ArgumentTypeError(f"{EXACT} must be true, and not with {GRAPH_EF}: {body!r}")
    if GRAPH_EF in over and not (isinstance(over[GRAPH_EF], int) and over[GRAPH_EF] >= 1):
        raise argparse.ArgumentTypeError(f"{GRAPH_EF} must be a positive integer: {body!r}")
    return name, over


@contextlib.contextmanager
def exactly(memory: Any, on: bool) -> Iterator[None]:
    """Searches of ``memory`` score every event exactly while inside (``on``)."""
    if not on:
        yield
        return
    index = memory.index
    params = index.params
    index.params = dataclasses.replace(params, exact_threshold=1 << 62)
    try:
        yield
    finally:
        index.params = params


@contextlib.contextmanager
def through_graph(memory: Any, ef: int | None) -> Iterator[None]:
    """Searches of ``memory`` go through its token graph at ``ef`` (None: as the session is) while inside."""
    if ef is None:
        yield
        return
    graph, index = memory.graph, memory.index
    if graph is None:
        raise SystemExit(f"{GRAPH_EF}: the session has no token graph (a repr_proxy 'tokens' session on the CPU)")
    graph.sync()
    if graph.lags(len(memory.table)):
        print(f"  the token graph starts at {index.params.build_at} events: this session's questions are asked "
              "exactly (their 'exact' field says so)", flush=True)
    params, ef0 = index.params, graph.params.ef
    index.params = dataclasses.replace(params, exact_threshold=0)
    graph.set_ef(ef)
    try:
        yield
    finally:
        index.params = params
        graph.set_ef(ef0)


def kept_run(source: str) -> tuple[dict[str, Any], Any, Any, list[Any]]:
    """A ``recall.py --keep`` results file: its contents, the model's spec and tokenizer, and the run's
    haystacks rebuilt (their questions; the sessions are in the file's ``workdir``)."""
    from transformers import AutoTokenizer

    from emserve.server.provision.models import resolve_model

    src = json.loads(Path(source).read_text())
    if "workdir" not in src:
        raise SystemExit(f"{source}: no kept work folder (run bench/eval/recall.py with --keep)")
    cfg = src["config"]
    spec = resolve_model(src["model"]["name"])
    tok = AutoTokenizer.from_pretrained(spec.path)
    hss, _ = haystacks(tok, spec.name, cfg["lengths"], cfg["sources"], cfg["tasks"], cfg["per_task"], cfg["seed"],
                       cfg.get("phrasings", "suite"))
    return src, spec, tok, hss


def kept_sessions(src: dict[str, Any], hss: list[Any], engine: Any) -> Iterator[tuple[Any, Any]]:
    """Each haystack of a kept run with its session opened on ``engine`` (closed when the caller moves on);
    a haystack without a kept session is said and skipped."""
    from emserve.server.session import Session

    for hs in hss:
        found = glob.glob(f"{src['workdir']}/sessions/emserve-{hs.hid}/data-*")
        if not found:
            print(f"{hs.hid}: no kept session, skipped", flush=True)
            continue
        s = Session.open(Path(found[0]), engine)
        try:
            yield hs, s
        finally:
            s.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from emserve.server.engine.base import SamplingSpec
    from emserve.server.engine.config import EngineConfig
    from emserve.server.engine.vllm_engine import VLLMEngine

    src, spec, tok, hss = kept_run(args.source)
    cfg = src["config"]
    today = question_defaults()
    engine_cfg = EngineConfig(model=str(spec.path), kv_cache_gib=2, dtype=args.dtype)
    engine = VLLMEngine(engine_cfg)
    answers: list[dict[str, Any]] = []
    try:
        for hs, s in kept_sessions(src, hss, engine):
            saved, planner_cfg = s.config, s.memory.planner.config
            try:
                for name, over in args.variants.items():
                    settings = {k: v for k, v in over.items() if k not in (GRAPH_EF, EXACT)}
                    s.config = saved.with_settings(**{**today, **settings})
                    s.memory.planner.config = s.config.retrieval
                    t0 = time.perf_counter()
                    with through_graph(s.memory, over.get(GRAPH_EF)), exactly(s.memory, bool(over.get(EXACT))):
                        for q in hs.questions:
                            if args.tasks and q.task not in args.tasks.split(","):
                                continue
                            r = await s.ask(q.prompt_ids, SamplingSpec(max_tokens=cfg.get("max_tokens", 12)))
                            text = tok.decode(r.token_ids)
                            cov = min(window_coverage(sp, r.window) for sp in q.spans)
                            answers.append({"variant": name, "hid": hs.hid, "task": q.task, "qid": q.qid,
                                            "expected": q.expected, "answer": text, "correct": q.expected in text,
                                            "coverage": cov, "in_window": cov >= 1.0,
                                            "exact": None if r.retrieval is None else bool(r.retrieval.exact),
                                            "retrieval_s": r.timings.get("retrieval_s"),
                                            "ttft_s": None if r.report is None else r.report.ttft_s,
                                            "total_s": None if r.report is None else r.report.seconds,
                                            "window": [list(w) for w in r.window]})
                    mine = [a for a in answers if a["variant"] == name and a["hid"] == hs.hid]
                    print(f"{hs.hid} {name}: in window {sum(a['in_window'] for a in mine)}/{len(mine)}, "
                          f"right {sum(a['correct'] for a in mine)}/{len(mine)} "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
            finally:
                s.config, s.memory.planner.config = saved, planner_cfg
    finally:
        await engine.close()
    from bench.eval.eval import git_rev

    return {"machine": machine(), "git": git_rev(), "from": args.source, "source_git": src.get("git"),
            "model": spec.name, "dtype": engine_cfg.dtype, "variants": args.variants, "answers": answers}


def summary(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per (variant, task): questions, asked sentences in the window, right answers with their interval, and
    how many answer steps attended to the same tokens as with today's defaults (``same window``)."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    base = {(a["hid"], a["qid"]): a.get("window") for a in res["answers"] if a["variant"] == "defaults"}
    for a in res["answers"]:
        cells[(a["variant"], a["task"])].append(a)
    rows = []
    for (variant, task), xs in cells.items():
        k, w = sum(a["correct"] for a in xs), sum(a["in_window"] for a in xs)
        same = sum(a.get("window") is not None and a.get("window") == base.get((a["hid"], a["qid"])) for a in xs)
        lo, hi = wilson(k, len(xs))
        rows.append([variant, task, len(xs), f"{w}/{len(xs)}", f"{k}/{len(xs)}", f"[{lo:.2f}, {hi:.2f}]",
                     f"{same}/{len(xs)}"])
    return ["variant", "task", "n", "in window", "right", "Wilson 95%", "same window"], rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", required=True, help="results file of a bench/eval/recall.py --keep run")
    ap.add_argument("--variant", action="append", type=parse_variant, default=[],
                    help="NAME=JSON of question-setting overrides (repeatable; today's defaults are always asked)")
    ap.add_argument("--tasks", default="", help="ask only these tasks, e.g. kv,split (default: every task)")
    ap.add_argument("--out", default="recall_variants")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                    help="the engine's compute dtype (the sessions' KV logs keep theirs)")
    args = ap.parse_args(argv)
    args.variants = {"defaults": {}, **dict(args.variant)}
    report_results(args.out, asyncio.run(run(args)), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How an answer's start is chosen, offline: every question of kept recall sessions with the model's most
likely first tokens, each followed greedily to the answer's length, and the rules that pick among them.

For each question of the haystacks of a ``bench/eval/recall.py --keep`` results file, on the product
engine (vLLM, the run's model), with today's question settings but ``question_lookahead`` and
``question_echo`` off:

* the answer as the session gives it (``asked``: rule 8's copy, where it applies, chose its start);
* the question's window (the same planning), the model's ``--choices`` most likely first tokens there, and
  each followed greedily to the answer's ``max_tokens``, with every token's log-probability.

Scored offline, per task: plain greedy (the first choice), and each start rule ``mean L`` / ``sum L``: the
choice whose first ``L`` tokens have the highest mean / sum log-probability, for ``L`` in 2, 4, 6, 8, 12.
With ``--prior``, also ``support d`` (rule 21, ``question_lookahead_support``): ``mean 6`` among the
choices the retrieved memory supports by more than ``d`` nats per token. Where the asked answer is not the
greedy one (a copy chose it), the rule leaves it (rules 20 and 21 apply where no other rule chose the first
tokens). ``any`` counts questions where some choice is right.

    .venv/bin/python -m bench.lab.answer_starts --from bench/results/lab-32k.json --out answer_starts-32k

Prints the table and writes ``bench/results/<out>.json`` (every question's choices with their tokens'
log-probabilities, and the table).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import sys
from typing import Any

from bench.eval.common import machine, question_defaults, report_results
from bench.lab.recall_variants import kept_run, kept_sessions

LENGTHS = (2, 4, 6, 8, 12)
SUPPORTS = (1.0, 2.0, 2.5, 3.0)
RULES: tuple[tuple[str, float], ...] = (*((kind, n) for kind in ("mean", "sum") for n in LENGTHS),
                                        *(("support", d) for d in SUPPORTS))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from emserve.server.engine.base import SamplingSpec, StepOptions
    from emserve.server.engine.config import EngineConfig
    from emserve.server.engine.vllm_engine import VLLMEngine
    from emserve.server.report import PhaseClock
    from emserve.server.session.answer import prior_logprobs, recent_window
    from emserve.server.session.question import plan_question

    src, spec, tok, hss = kept_run(args.source)
    cfg = src["config"]
    settings = {**question_defaults(), "question_lookahead": 0, "question_echo": 0}
    engine = VLLMEngine(EngineConfig(model=str(spec.path), kv_cache_gib=2))
    n = cfg.get("max_tokens", 12)
    sampling = SamplingSpec(max_tokens=n)
    opts = StepOptions(surprise=False, queries=False)
    rows: list[dict[str, Any]] = []
    try:
        for hs, s in kept_sessions(src, hss, engine):
            s.config = s.config.with_settings(**settings)
            s.memory.planner.config = s.config.retrieval
            for q in hs.questions:
                if args.tasks and q.task not in args.tasks.split(","):
                    continue
                asked = tok.decode((await s.ask(q.prompt_ids, sampling)).token_ids)
                plan, _ = await plan_question(s, s.num_tokens, [int(t) for t in q.prompt_ids], sampling,
                                              PhaseClock())
                first = await engine.step(plan, SamplingSpec(max_tokens=1, top_logprobs=args.choices), opts)
                ranked = sorted(first.top_logprobs[0].items(), key=lambda kv: -kv[1])[: args.choices]
                steps = await asyncio.gather(*(
                    engine.step(dataclasses.replace(plan, new_token_ids=(*plan.new_token_ids, t)),
                                SamplingSpec(max_tokens=n - 1), opts) for t, _ in ranked))
                choices = []
                for (t, lp), st in zip(ranked, steps, strict=True):
                    text = tok.decode([t, *st.output_token_ids])
                    choices.append({"text": text, "logprobs": [lp, *st.output_logprobs],
                                    "correct": q.expected in text, "ids": [t, *st.output_token_ids]})
                recent = recent_window(plan) if args.prior else None
                if recent is not None:  # each choice's tokens in the window without its retrieved events
                    lps = await prior_logprobs(s, recent, [c["ids"] for c in choices])
                    for c, r in zip(choices, lps, strict=True):
                        c["prior_logprobs"] = r
                rows.append({"hid": hs.hid, "task": q.task, "qid": q.qid, "expected": q.expected,
                             "asked": asked, "asked_correct": q.expected in asked, "choices": choices})
                print(rows[-1]["asked_correct"], repr(asked), flush=True)
    finally:
        await engine.close()
    from bench.eval.eval import git_rev

    return {"machine": machine(), "git": git_rev(), "from": args.source, "source_git": src.get("git"),
            "model": spec.name, "choices": args.choices, "questions": rows}


def pick(row: dict[str, Any], rule: tuple[str, float] | None) -> bool:
    """Whether the answer a start rule gives is right (None: plain greedy, the first choice). ``support d``:
    ``mean 6`` among the choices whose mean over 6 tokens exceeds by more than ``d`` their mean without the
    retrieved events (``--prior``; none such, or no ``--prior``: among all), rule 21."""
    choices = row["choices"]
    if rule is None:
        return bool(choices[0]["correct"])
    if row["asked"] != choices[0]["text"]:  # another rule (the copy) chose the start
        return bool(row["asked_correct"])
    kind, x = rule
    n = 6 if kind == "support" else int(x)

    def score(c: dict[str, Any]) -> float:
        lps = c["logprobs"][:n]
        return sum(lps) / (len(lps) if kind != "sum" else 1)

    def gain(c: dict[str, Any]) -> float:
        prior = c["prior_logprobs"][:n]
        return score(c) - sum(prior) / len(prior)
    if kind == "support" and all("prior_logprobs" in c for c in choices):
        choices = [c for c in choices if gain(c) > x] or choices
    return bool(max(choices, key=score)["correct"])


def summary(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per task and in all: questions, right as asked, plain greedy, each start rule (right, and gained /
    lost against the asked answers), and questions where some choice is right."""
    by_task: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in res["questions"]:
        by_task[r["task"]].append(r)
        by_task["all"].append(r)
    rows = []
    for task, xs in by_task.items():
        row: list[Any] = [task, len(xs), sum(r["asked_correct"] for r in xs), sum(pick(r, None) for r in xs)]
        for rule in RULES:
            got = [pick(r, rule) for r in xs]
            plus = sum(g and not r["asked_correct"] for g, r in zip(got, xs, strict=True))
            minus = sum(r["asked_correct"] and not g for g, r in zip(got, xs, strict=True))
            row.append(f"{sum(got)} (+{plus} -{minus})")
        row.append(sum(any(c["correct"] for c in r["choices"]) for r in xs))
        rows.append(row)
    return ["task", "n", "asked", "greedy", *(f"{k} {n:g}" for k, n in RULES), "any"], rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", required=True, help="results file of a bench/eval/recall.py --keep run")
    ap.add_argument("--tasks", default="", help="ask only these tasks, e.g. kv,split (default: every task)")
    ap.add_argument("--choices", type=int, default=5, help="the model's most likely first tokens weighed")
    ap.add_argument("--prior", action="store_true",
                    help="also each choice's log-probabilities in the window without its retrieved events")
    ap.add_argument("--out", default="answer_starts")
    args = ap.parse_args(argv)
    report_results(args.out, asyncio.run(run(args)), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

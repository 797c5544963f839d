"""The recall suite: answer accuracy and retrieval recall per (task, length), through the real server.

    .venv/bin/python -m bench.eval.recall --quick          # smoke run (CI): 4k, narrative + noise, 2 needles per task
    .venv/bin/python -m bench.eval.recall                  # 32k: 3 sources + noise, 10 needles per task (30 per cell),
                                                      #   emserve, truncation, InfLLM-style; full attention 1k/2k/4k
    .venv/bin/python -m bench.eval.recall --lengths 128k   # the same grid at 128k
    .venv/bin/python -m bench.eval.recall --plan           # the haystacks and questions, nothing run
    .venv/bin/python -m bench.eval.recall --lengths 1m --resume  # go on with a stopped run of that grid
    .venv/bin/python -m bench.eval.recall --lengths 1m --stop-after 1  # one haystack now, --resume for the next
    .venv/bin/python -m bench.eval.recall --phrasings heldout  # needles and questions in other words (the rules
                                                      #   of docs/recall.md were chosen on the suite's)

Haystacks and tasks: ``recall_tasks.py`` (many needles per haystack, every needle asked, look-alike
distractors, phrasings drawn per needle). Per (task, length, system) the run reports:

* **accuracy**: the share of questions whose greedy answer (``--max-tokens``) holds the expected value,
  with its Wilson 95% interval;
* **retrieval recall**: the share of questions whose needed tokens (the inserted sentences the answer
  depends on) were all in the answer step's window, as the server's retrieval trace reports it
  (``RetrievalTrace.window``).

Systems: the server's default memory (``emserve``), ``truncation`` and ``infllm`` (``eval_server.py``),
each a session config of one server; then, after the server has stopped, the same model with full
attention (vanilla vLLM, ``eval_vanilla.py``) on short windows of ``--reference-lengths`` tokens holding
each asked needle and ``REFERENCE_DISTRACTORS`` look-alikes (``full@2k``: the in-context ceiling a perfect
memory would reach). Writes ``bench/results/<name>.json`` (every answer) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.eval.common import RESULTS, machine, sigterm_exits, wilson
from bench.eval.eval import _ints, git_rev
from bench.eval.eval_server import Job, Server, log, overrides, run_jobs
from bench.eval.eval_tasks import Haystack
from bench.eval.recall_tasks import NOISE, PHRASINGS, SOURCES, TASKS, build, reference_prompt, source_filler

SYSTEMS = ("emserve", "truncation", "infllm")


class Run:
    """One run's results, saved after every haystack (a stopped run keeps what it measured)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.path = Path(args.results_dir) / f"{args.out}.json"
        self.res: dict[str, Any] = {"name": args.out, "suite": "recall", "quick": args.quick, "complete": False,
                                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                                    "git": git_rev(), "machine": machine(), "answers": [], "haystacks": []}

    def resume(self, config: dict[str, Any], workdir_parent: str | None) -> Path:
        """Take up the saved results of a stopped run of the same grid (``--resume``): its answers and
        finished haystacks stay, and its work folder (sessions and logs) is used again. Where that folder
        is gone (another machine, a wiped ``/tmp``), a new one is made under ``workdir_parent`` and the
        haystack the run stopped in starts again from its first token; the resume entry says so
        (``workdir_lost``) and names the machine of this part of the run."""
        if not self.path.exists():
            raise SystemExit(f"--resume: no results at {self.path} to resume")
        saved = json.loads(self.path.read_text())
        if saved.get("complete"):
            raise SystemExit(f"--resume: {self.path} is a finished run")
        if saved.get("config") != config:
            raise SystemExit(f"--resume: {self.path} ran another grid: {saved.get('config')}")
        workdir = Path(saved.get("workdir") or "")
        lost = not saved.get("workdir") or not workdir.is_dir()
        if lost:
            workdir = new_workdir(workdir_parent)
        self.t0 -= float(saved.get("wall_s", 0.0))
        resumed = [*saved.get("resumed", []), {"command": self.res["command"], "git": self.res["git"],
                                               "machine": self.res["machine"], "workdir_lost": lost,
                                               "haystacks_done": len(saved["haystacks"])}]
        self.res = {**saved, "resumed": resumed, "workdir": str(workdir)}
        return workdir

    def save(self, complete: bool = False) -> Path:
        self.res["complete"] = complete
        self.res["wall_s"] = time.perf_counter() - self.t0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.res, indent=1, default=str))
        tmp.replace(self.path)
        return self.path


def new_workdir(parent: str | None) -> Path:
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="emserve-recall-", dir=parent))


def haystacks(tok: Any, model: str, lengths: Sequence[int], sources: Sequence[str], tasks: Sequence[str],
              per_task: int, seed: int, phrasings: str = "suite") -> tuple[list[Haystack], dict[str, Any]]:
    """The grid's haystacks (a prose haystack per source and length, a noise haystack per length holding
    ``per_task`` pass keys per source) and the filler of each source."""
    fillers: dict[str, Any] = {}
    out = []
    for n in lengths:
        for src in sources:
            if any(t != "passkey" for t in tasks):
                f = fillers.setdefault(src, source_filler(tok, model, src))
                out.append(build(f, src, n, per_task, seed, tasks, phrasings))
        if "passkey" in tasks:
            f = fillers.setdefault(NOISE, source_filler(tok, model, NOISE))
            out.append(build(f, NOISE, n, per_task * len(sources), seed, ("passkey",), phrasings))
    return out, fillers


def summary(answers: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """One row per (task, length, system): n, accuracy with its Wilson interval, retrieval recall."""
    cells: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for a in answers:
        cells.setdefault((a["task"], a["length"], a["system"]), []).append(a)
    order = {s: i for i, s in enumerate(SYSTEMS)}
    rows = []
    for (task, length, system), xs in sorted(cells.items(), key=lambda kv: (
            TASKS.index(kv[0][0]), kv[0][1], order.get(kv[0][2], 9), kv[0][2])):
        k, n = sum(bool(a["correct"]) for a in xs), len(xs)
        lo, hi = wilson(k, n)
        rec = [a["in_window"] for a in xs if a.get("in_window") is not None]
        rr = f"{sum(rec) / len(rec):.2f} ({sum(rec)}/{len(rec)})" if rec and not system.startswith("full@") else "-"
        rows.append([task, length, system, n, f"{k / n:.2f}", f"[{lo:.2f}, {hi:.2f}]", rr])
    return ["task", "length", "system", "n", "accuracy", "Wilson 95%", "retrieval recall"], rows


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def run_reference(run: Run, hss: Sequence[Haystack], fillers: dict[str, Any], lengths: Sequence[int],
                  native: int, model_path: str, workdir: Path) -> None:
    """Full attention (vanilla vLLM) on a short window per question and reference length."""
    from bench.eval.eval_vanilla import run_subprocess

    args = run.args
    prompts, meta = [], {}
    for hs in hss:
        f = fillers[hs.meta["source"]]
        for q in hs.questions:
            for n in lengths:
                ids = reference_prompt(f, hs, q, n, args.seed)
                prompts.append({"id": f"{q.qid}@{n}", "ids": ids})
                meta[f"{q.qid}@{n}"] = (hs, q, n)
    log(f"full attention: {len(prompts)} prompts ({', '.join(str(n) for n in lengths)} tokens)")
    job = {"model": model_path, "max_model_len": min(native, max(lengths) + 64), "max_tokens": args.max_tokens,
           "prompts": prompts, "dtype": "auto"}
    out = run_subprocess(job, workdir)
    for a in out["answers"]:
        hs, q, n = meta[a["id"]]
        run.res["answers"].append({
            "system": f"full@{n // 1024}k" if n % 1024 == 0 else f"full@{n}", "task": q.task,
            "length": hs.length, "hid": hs.hid, "qid": q.qid, "context_tokens": n, "depth": q.depth,
            "expected": q.expected, "answer": a["text"], "correct": q.expected in a["text"], "coverage": 1.0,
            "in_window": True, "total_s": a["seconds"], "completion_tokens": len(a["token_ids"])})
    run.res["vanilla"] = {"start_s": out["start_s"], "dtype": out.get("dtype")}
    run.save()


def main_run(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from emserve.server.provision.models import resolve_model

    spec = resolve_model(args.model, progress=lambda m: log(m))
    tok = AutoTokenizer.from_pretrained(spec.path)
    native = int(getattr(AutoConfig.from_pretrained(spec.path), "max_position_embeddings", 0) or 8192)
    t = time.perf_counter()
    hss, fillers = haystacks(tok, spec.name, args.lengths, args.sources, args.tasks, args.per_task, args.seed,
                             args.phrasings)
    nq = sum(len(h.questions) for h in hss)
    log(f"{len(hss)} haystacks, {nq} questions ({time.perf_counter() - t:.0f} s to build); "
        f"{sum(h.length for h in hss) * len(args.systems)} tokens to ingest")
    if args.plan:
        for hs in hss:
            print(hs.hid, [(q.task, q.expected, round(q.depth, 3)) for q in hs.questions])
        return 0
    run = Run(args)
    config = {"lengths": args.lengths, "sources": args.sources, "tasks": args.tasks, "per_task": args.per_task,
              "systems": args.systems, "seed": args.seed, "phrasings": args.phrasings,
              "reference_lengths": args.reference_lengths, "max_tokens": args.max_tokens}
    done_jobs: set[tuple[str, str]] = set()
    if args.resume:
        workdir = run.resume(config, args.workdir)
        done_jobs = {(h["system"], h["hid"]) for h in run.res["haystacks"]}
        lost = " (the stopped run's was gone: its unfinished haystack starts again)" if run.res["resumed"][-1][
            "workdir_lost"] else ""
        log(f"resuming {run.path.name}: {len(done_jobs)} haystacks done, work folder {workdir}{lost}")
        run.save()
    else:
        run.res.update({"config": config, "haystack_specs": [h.summary() for h in hss]})
        workdir = new_workdir(args.workdir)
        run.res["workdir"] = str(workdir)  # a stopped run is resumed from it (--resume)
        run.save()
    finished = False
    left = 0
    try:
        if args.systems:
            server = Server(str(spec.path), workdir, restart_bytes=args.restart_gib * 2**30)
            try:
                run.res["model"] = {"name": spec.name, "max_model_len": server.info.max_model_len}
                run.res["default_memory"] = server.default_memory()
                run.res["system_overrides"] = {s: overrides(s, run.res["default_memory"]) for s in args.systems}

                def done(row: dict[str, Any], answers: list[dict[str, Any]]) -> None:
                    run.res["haystacks"].append(row)
                    run.res["answers"].extend(answers)
                    run.save()

                jobs = [Job(s, hs) for hs in hss for s in args.systems if (s, hs.hid) not in done_jobs]
                if args.stop_after is not None and len(jobs) > args.stop_after:
                    jobs, left = jobs[:args.stop_after], len(jobs) - args.stop_after
                run_jobs(server, jobs, args.max_tokens, 1, done, keep=args.keep, resume=args.resume)
            finally:
                server.stop()
        if left:
            log(f"stopped after {args.stop_after} haystacks, {left} left")  # the resume hint: below
            return 0
        if args.reference_lengths and not any(a["system"].startswith("full@") for a in run.res["answers"]):
            run_reference(run, hss, fillers, args.reference_lengths, native, str(spec.path), workdir)
        finished = True
    finally:
        if args.keep or not finished:  # kept sessions are asked again by bench/lab/recall_variants.py
            log(f"kept {workdir}" + ("" if finished else f" (resume with --resume --out {args.out})"))
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            run.res.pop("workdir", None)
    out = run.save(complete=True)
    headers, rows = summary(run.res["answers"])
    run.res["summary"] = {"headers": headers, "rows": rows}
    run.save(complete=True)
    print(markdown(headers, rows))
    print(f"\nwall time {run.res['wall_s'] / 60:.1f} min; wrote {out}")
    return 0


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 4k tokens, the narrative source and the noise filler, 2 needles per task, "
                         "emserve and full attention at 2k")
    ap.add_argument("--lengths", type=_ints, help="haystack lengths, e.g. 32k,128k (k = 1024; default 32k)")
    ap.add_argument("--sources", type=lambda s: s.split(","), help=f"of {', '.join(SOURCES)} (default all)")
    ap.add_argument("--tasks", type=lambda s: s.split(","), help=f"of {', '.join(TASKS)} (default all)")
    ap.add_argument("--per-task", type=int, help="needles per task in each prose haystack (default 10; the noise "
                                                 "haystack holds this many per source)")
    ap.add_argument("--systems", type=lambda s: [x for x in s.split(",") if x],
                    help=f"server systems, of {', '.join(SYSTEMS)}; '' for none (default all)")
    ap.add_argument("--reference-lengths", type=lambda s: _ints(s) if s else [],
                    help="full-attention reference windows, e.g. 1k,2k,4k (default); '' for none")
    ap.add_argument("--model", default=None, help="smollm2-135m (default), qwen2.5-0.5b, or an HF folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phrasings", choices=sorted(PHRASINGS), default="suite",
                    help="needle and question templates: suite (the rules were chosen on it) or heldout")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--restart-gib", type=float, default=16.0, help="see bench/eval/eval.py")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--out", default=None, help="results name (default recall-<lengths>[-quick][-model])")
    ap.add_argument("--workdir", default=None, help="where sessions and logs go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder and the sessions in it (a run that "
                                                         "stops before its end always keeps them)")
    ap.add_argument("--resume", action="store_true",
                    help="go on with the stopped run of the same grid and --out: its finished haystacks are kept "
                         "and the session it stopped in continues from its committed tokens")
    ap.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="stop, resumable, once N haystacks are done in this invocation (a long grid run in parts)")
    ap.add_argument("--plan", action="store_true", help="print the haystacks and questions, run nothing")
    args = ap.parse_args(argv)
    quick = args.quick
    args.lengths = args.lengths or ([4096] if quick else [32768])
    args.sources = args.sources or (["narrative"] if quick else list(SOURCES))
    args.tasks = args.tasks or list(TASKS)
    args.per_task = args.per_task or (2 if quick else 10)
    if args.systems is None:
        args.systems = ["emserve"] if quick else list(SYSTEMS)
    if args.reference_lengths is None:
        args.reference_lengths = [2048] if quick else [1024, 2048, 4096]
    bad = ([s for s in args.sources if s not in SOURCES] + [t for t in args.tasks if t not in TASKS]
           + [s for s in args.systems if s not in SYSTEMS])
    if bad:
        ap.error(f"unknown sources / tasks / systems: {bad}")
    if args.stop_after is not None and args.stop_after < 1:
        ap.error(f"--stop-after needs at least 1 haystack, got {args.stop_after}")
    if args.out is None:
        lens = "-".join(f"{n // 1024}k" if n < 1 << 20 else f"{n >> 20}m" for n in args.lengths)
        args.out = f"recall-{lens}" + ("-quick" if quick else "") + (f"-{args.model}" if args.model else "")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    sigterm_exits()
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())

"""Long-context evaluation harness: accuracy and performance of emserve vs baselines, through the real server.

    .venv/bin/python -m bench.eval.eval --quick       # smoke run, <= 10 min on 2 cores
    .venv/bin/python -m bench.eval.eval --full        # default-model grid: 4k, 8k, 32k (~70-85 min, quiet 2 cores)
    .venv/bin/python -m bench.eval.eval --long-128k   # 128k: 5 depths x passkey, needle; emserve, truncation, infllm
                                                 #   (the 5 needles share one haystack; ~2 h: 18 sessions, 2.4M tokens)
    .venv/bin/python -m bench.eval.eval --long-1m     # one 1M-token stream, 3 labelled keys (1-2 h, ~42 GB; not CI)
    .venv/bin/python -m bench.eval.eval --perf        # one 128k stream: ingest tok/s, TTFT, RAM, disk vs length
    .venv/bin/python -m bench.eval.eval --full --model qwen2.5-0.5b --lengths 32768   # 32k grid, second model
    .venv/bin/python -m bench.eval.eval --full --plan  # print the plan and a time estimate only

Every mode takes ``--lengths``, ``--systems``, ``--tasks``, ``--depths``, ``--depth-cap``, ``--model``,
``--seed``, ``--concurrency``; ``--out NAME`` / ``--results-dir DIR`` say where results go,
``--no-docs`` skips rewriting ``docs/results.md``.

What a run does:

1. Builds the haystacks (``eval_tasks.py``: exact token lengths, public-domain text, seeded tasks).
2. Starts ``emserve serve`` (vLLM engine, the model) on a free port and, through the Python client, per
   system and haystack: creates a session with the system's memory overrides (``eval_server.py``),
   ingests the haystack as token ids, asks each question (greedy, ``--max-tokens`` 10, retrieval
   trace on), records the answer, timings, window and whether the needed sentences were in the
   answer step's window; deletes the session. Long-stream modes ingest one session checkpoint by
   checkpoint and measure at each; ``--stream-source narrative`` (or reference, dialogue) makes the
   stream a recall suite haystack (50 needles, each asked at the end), whose kept session
   ``question_search.py`` can ask again.
3. Stops the server, then runs vanilla vLLM (``eval_vanilla.py``) in its own process on the same
   model for the lengths that fit its native context (at the native length itself the haystack is
   shortened by the question and answer: ``context_tokens`` in the tables), and times its chunked
   prefill.
4. Writes ``bench/results/<name>.json`` (machine, versions, git, server info, config, every answer),
   ``<name>.csv`` (one row per question), plots ``<name>-depth.png`` (accuracy vs depth heat map),
   ``<name>-ingest.png``, ``<name>-ttft.png``, prints the tables, and regenerates ``docs/results.md``
   from all ``bench/results/eval*.json``.

Sampling (``--full``, default model; sized for ~70-85 min on a quiet 2-core machine): depths 0-100% in
10% steps; at each length each task asks at most ``--depth-cap`` depths (3 at 4k, 8k and 32k): every
4th depth, the offset rotated by task, so that the four tasks of a length together cover all 11
depths (passkey 0/40/80%, needle 10/50/90%, multikey 20/60/100%, twohop 30/70%) and every length asks
the same depths; ``multikey`` asks all of its depths at a length in one haystack (4 keys, the others
distractors); one question per depth and task (one seed): per length 9 haystacks and 11 questions
per system. The ablations (``no-refine``, ``no-contiguity``, ``mean-rank``) run at 32k only, on
``passkey``, ``needle`` and ``multikey`` (``--ablation-min-length``, ``--ablation-tasks``). Vanilla vLLM
answers at 4k and 8k. 1.48M tokens to ingest in all (before ``mean-rank`` and the needle ablations);
``--plan`` prints the plan. Results carry ``n`` per cell: small-sample accuracies, to be read as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.eval import eval_report
from bench.eval.cgroup import parse_bytes
from bench.eval.common import RESULTS, machine, sigterm_exits
from bench.eval.eval_server import (
    ABLATIONS,
    ALL_SYSTEMS,
    SERVER_SYSTEMS,
    Job,
    Server,
    log,
    overrides,
    run_jobs,
    run_stream,
)
from bench.eval.eval_tasks import (
    SHAREABLE,
    TASKS,
    Corpus,
    Haystack,
    HaystackSpec,
    build,
    build_labelled,
    plan,
    sized_question,
)

DEPTHS_11 = [round(0.1 * i, 1) for i in range(11)]
LABEL_DEPTHS = (0.1, 0.5, 0.9)
# A session's bytes per token, default model (KV log bf16 + event table + token graph): the 1M narrative
# session of recall-1m-emserve.json held 32.5 GB (31 KB per token) with repr_proxy tokens; 40 KiB before it.
DISK_PER_TOKEN = 32 * 1024


def long_stream(corpus: Corpus, tok: Any, model_name: str, length: int, args: argparse.Namespace) -> Haystack:
    """The long stream of --perf / --long-1m: three labelled pass keys, or a recall suite haystack
    (``--stream-source``; the suite's defaults: 10 needles per prose task, its phrasings)."""
    if args.stream_source == "labelled":
        return build_labelled(corpus, length, LABEL_DEPTHS, args.seed)
    from bench.eval.recall_tasks import build as build_recall
    from bench.eval.recall_tasks import source_filler

    return build_recall(source_filler(tok, model_name, args.stream_source), args.stream_source, length, 10, args.seed)


def disk_needed(job_lengths: Sequence[int], stream_length: int, concurrency: int, restart_bytes: float) -> float:
    """Bytes a run may hold at once: the biggest session per concurrent slot, plus the deleted sessions the
    engine may keep mapped until the harness restarts it (up to ``restart_bytes``, never more than the
    jobs write in all)."""
    biggest = max([stream_length, *job_lengths])
    held = min(restart_bytes, sum(job_lengths) * DISK_PER_TOKEN)
    return biggest * DISK_PER_TOKEN * max(1, concurrency) + held


@dataclass
class Mode:
    name: str
    title: str
    lengths: list[int] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    depths: list[float] = field(default_factory=list)
    caps: dict[int, int] = field(default_factory=dict)
    systems: list[str] = field(default_factory=list)
    ablation_min_length: int = 0
    ablation_tasks: tuple[str, ...] = TASKS
    shared: tuple[str, ...] = ()  # tasks whose depths share one haystack (eval_tasks.plan)
    stream_length: int = 0  # a long labelled-key stream (perf / 1M) of this many tokens
    prefill_reps: int = 1
    quick: bool = False


MODES = {
    "quick": Mode("eval-quick", "Quick run (smoke test)", [4096, 8192], ["passkey", "needle"], [0.25, 0.5, 0.75],
                  {8192: 1}, ["emserve", "truncation", "infllm", "vanilla"], quick=True),
    "full": Mode("eval", "Full grid (default model)", [4096, 8192, 32768], list(TASKS), DEPTHS_11,
                 {4096: 3, 8192: 3, 32768: 3}, list(ALL_SYSTEMS), ablation_min_length=32768,
                 ablation_tasks=("passkey", "needle", "multikey")),
    # the five needles share one haystack (5 keys, each asked): 18 sessions of 128k instead of 30
    "long_128k": Mode("eval-128k", "128k tokens", [131072], ["needle", "passkey"], [0.1, 0.3, 0.5, 0.7, 0.9], {},
                      ["emserve", "truncation", "infllm"], shared=("needle",)),
    "long_1m": Mode("eval-1m", "1M-token stream", systems=["emserve", "vanilla"], stream_length=1 << 20,
                    prefill_reps=3),
    "perf": Mode("eval-perf", "Performance over session length", systems=["emserve", "vanilla"],
                 stream_length=1 << 17, prefill_reps=3),
}


def _ints(s: str) -> list[int]:
    """``4096,8192`` or ``4k,32k,1m`` (k = 1024, m = 1024**2)."""
    out = []
    for x in (x.strip().lower() for x in s.split(",") if x.strip()):
        mult = {"k": 1024, "m": 1 << 20}.get(x[-1], 1)
        out.append(int(x[:-1] if mult > 1 else x) * mult)
    return out


def _caps(s: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in (x.split(":") for x in s.split(",") if x)}


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except OSError:
        return "?"


def jobs_for(mode: Mode, haystacks: Sequence[Haystack]) -> list[Job]:
    """(system, haystack) pairs of the server systems, ordered by length, haystack, system."""
    out = []
    for hs in sorted(haystacks, key=lambda h: h.length):
        for s in mode.systems:
            if s not in SERVER_SYSTEMS:
                continue
            if s in ABLATIONS and (hs.length < mode.ablation_min_length or hs.task not in mode.ablation_tasks):
                continue
            out.append(Job(s, hs))
    return out


def stream_checkpoints(n: int) -> list[int]:
    cps, c = [], 4096
    while c < n:
        cps.append(c)
        c *= 2
    return [*cps, n]


class Run:
    """One evaluation run: its results dict, saved after every haystack (a crash keeps what was done)."""

    def __init__(self, args: argparse.Namespace, mode: Mode) -> None:
        self.args, self.mode = args, mode
        self.results_dir = Path(args.results_dir)
        self.name = args.out or mode.name + (f"-{args.model}" if args.model else "")
        self.t0 = time.perf_counter()
        self.res: dict[str, Any] = {
            "name": self.name,
            "title": args.title or (mode.title.replace(" (default model)", f" ({args.model})") if args.model
                                    else mode.title),
            "quick": mode.quick,
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "complete": False, "git": git_rev(),
            "machine": machine(), "answers": [], "haystacks": [], "streams": [], "vanilla": {},
            "config": {"lengths": mode.lengths, "tasks": mode.tasks, "depths": mode.depths,
                       "depth_cap": {str(k): v for k, v in mode.caps.items()}, "systems": mode.systems,
                       "ablation_min_length": mode.ablation_min_length, "ablation_tasks": list(mode.ablation_tasks),
                       "one_haystack": list(mode.shared),
                       "seed": args.seed, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                       "stream_length": mode.stream_length, "passkey_haystack": "noise"},
            "load_avg_start": list(os.getloadavg()),
        }

    def save(self, complete: bool = False) -> Path:
        self.res["complete"] = complete
        self.res["wall_s"] = time.perf_counter() - self.t0
        self.res["load_avg_end"] = list(os.getloadavg())
        self.results_dir.mkdir(parents=True, exist_ok=True)
        out = self.results_dir / f"{self.name}.json"
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.res, indent=1, default=str))
        tmp.replace(out)
        return out


def run_vanilla(run: Run, corpus: Corpus, specs: Sequence[HaystackSpec], native: int, model_path: str,
                workdir: Path) -> None:
    from bench.eval.eval_vanilla import run_subprocess

    args, mode = run.args, run.mode
    if "vanilla" not in mode.systems:
        return
    prompts, meta = [], {}
    cap = min(native, args.vanilla_max_length or native)
    for spec in specs:
        if spec.length > cap:
            continue
        probe = build(corpus, spec, args.seed)
        reserve = max(len(q.prompt_ids) for q in probe.questions) + args.max_tokens + 1
        hs = build(corpus, spec, args.seed, length=min(spec.length, native - reserve))
        for q in hs.questions:
            prompts.append({"id": q.qid, "ids": hs.ids + q.prompt_ids})
            meta[q.qid] = (spec, hs, q)
    prefill = sorted({min(n, native - 1) for n in mode.lengths if n <= cap}
                     | ({native - 1} if mode.stream_length else set()))
    log(f"vanilla vLLM: {len(prompts)} questions, prefill at {prefill}")
    job = {"model": model_path, "max_model_len": native, "max_tokens": args.max_tokens, "prompts": prompts,
           "prefill_tokens": prefill, "prefill_reps": mode.prefill_reps,
           "filler": [int(t) for t in corpus.ids[: native + 1]]}
    out = run_subprocess(job, workdir)
    for a in out["answers"]:
        spec, hs, q = meta[a["id"]]
        run.res["answers"].append({
            "system": "vanilla", "task": spec.task, "length": spec.length, "hid": spec.hid, "qid": q.qid,
            "context_tokens": hs.length, "depth": q.depth, "expected": q.expected, "answer": a["text"],
            "correct": q.expected in a["text"], "coverage": 1.0, "in_window": True, "ttft_s": None,
            "total_s": a["seconds"], "completion_tokens": len(a["token_ids"])})
    run.res["vanilla"] = {"start_s": out["start_s"], "chunk_tokens": out["chunk_tokens"], "prefill": out["prefill"]}
    ok = sum(a["correct"] for a in run.res["answers"] if a["system"] == "vanilla")
    log(f"vanilla vLLM: {ok}/{len(prompts)} correct")
    run.save()


def main_run(args: argparse.Namespace, mode: Mode) -> int:
    from transformers import AutoTokenizer

    from emserve.server.provision.models import resolve_model

    spec = resolve_model(args.model, progress=lambda m: log(m))
    tok = AutoTokenizer.from_pretrained(spec.path)
    from transformers import AutoConfig

    native = int(getattr(AutoConfig.from_pretrained(spec.path), "max_position_embeddings", 0) or 8192)
    run = Run(args, mode)
    t = time.perf_counter()
    corpus = Corpus(tok, spec.name)
    specs = plan(mode.tasks, mode.lengths, mode.depths, mode.caps, mode.shared)
    haystacks = [build(corpus, s, args.seed) for s in specs]
    stream = long_stream(corpus, tok, spec.name, mode.stream_length, args) if mode.stream_length else None
    jobs = jobs_for(mode, haystacks)
    per_sys: dict[str, int] = {}
    for j in jobs:
        per_sys[j.system] = per_sys.get(j.system, 0) + j.haystack.length
    total = sum(per_sys.values()) + (mode.stream_length if stream else 0)
    log(f"{run.name}: {len(haystacks)} haystacks ({time.perf_counter() - t:.0f} s to build), {len(jobs)} sessions, "
        f"{total} tokens to ingest: " + ", ".join(f"{k} {v}" for k, v in per_sys.items())
        + (f", stream {mode.stream_length}" if stream else "")
        + f"; about {total / args.est_tok_s / 60:.0f} min at {args.est_tok_s:.0f} tok/s + engine starts")
    if args.plan:
        for hs in haystacks:
            print(hs.hid, [q.expected for q in hs.questions])
        return 0
    run.res["haystack_specs"] = [hs.summary() for hs in haystacks]
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    resume = None
    if args.resume:
        if stream is None or jobs:
            log("--resume continues a stopped long stream (--perf / --long-1m) only")
            return 1
        workdir = Path(args.resume)
        prior_path = run.results_dir / f"{run.name}.json"
        if not (workdir / "sessions").is_dir() or not prior_path.is_file():
            log(f"nothing to resume: need the stopped run's work folder (with sessions/) and {prior_path}")
            return 1
        prior = json.loads(prior_path.read_text())
        if not prior.get("streams") or not prior["streams"][0].get("partial"):
            log(f"{prior_path} holds no partial stream to resume")
            return 1
        resume = prior["streams"][0]
        run.res["resumed"] = {"git": prior.get("git"), "wall_s": prior.get("wall_s"), "time": prior["machine"]["time"],
                              "workdir": str(workdir)}
    else:
        workdir = Path(tempfile.mkdtemp(prefix="emserve-eval-", dir=args.workdir))
    need = disk_needed([j.haystack.length for j in jobs], mode.stream_length, args.concurrency,
                       args.restart_gib * 2**30)
    if resume is not None:  # the stream's session already holds part of what it needs
        need -= sum(f.stat().st_size for f in workdir.rglob("*") if f.is_file())
    free = shutil.disk_usage(workdir).free
    if free < need:
        log(f"not enough disk in {workdir}: {free / 2**30:.0f} GiB free, need ~{need / 2**30:.0f} GiB "
            f"(~{DISK_PER_TOKEN // 1024} KiB per session token; --workdir elsewhere, or a lower --restart-gib)")
        shutil.rmtree(workdir, ignore_errors=True)
        return 1
    try:
        if jobs or stream is not None:
            server = Server(str(spec.path), workdir, extra=args.server_arg, restart_bytes=args.restart_gib * 2**30,
                            memory_limit=args.server_memory)
            run.res["server_args"] = list(args.server_arg)
            run.res["server_memory_limit"] = args.server_memory
            try:
                info = server.info
                run.res["model"] = {"name": spec.name, "path": str(spec.path), "max_model_len": info.max_model_len,
                                    "num_layers": info.num_layers, "backend": info.backend,
                                    "emserve_version": info.version}
                run.res["default_memory"] = server.default_memory()
                run.res["system_overrides"] = {s: overrides(s, run.res["default_memory"])
                                               for s in mode.systems if s in SERVER_SYSTEMS}
                run.res["server_start_s"] = server.start_s
                run.res["server_starts"] = 1

                def done(row: dict[str, Any], answers: list[dict[str, Any]]) -> None:
                    run.res["haystacks"].append(row)
                    run.res["answers"].extend(answers)
                    run.save()

                run_jobs(server, jobs, args.max_tokens, args.concurrency, done)
                run.res["server_starts"] = server.starts
                if stream is not None:
                    if jobs:
                        server.restart()
                    def point(partial: dict[str, Any]) -> None:
                        run.res["streams"] = [partial]
                        run.save()

                    timing = [sized_question(corpus, q, args.timing_tokens) for q in
                              stream.questions[: args.timing_questions]] if args.timing_tokens > 0 else []
                    st = run_stream(server, "emserve", stream, stream_checkpoints(stream.length), args.max_tokens,
                                    on_point=point, keep=args.keep, resume=resume, timing=timing)
                    run.res["streams"] = [st]
                    run.save()
            finally:
                status = server.stop()
                if status != 0:
                    log(f"server exited with {status}; log {server.proc.log_path}")
                if args.server_memory:  # what each server process's cgroup used (bench/eval/cgroup.py)
                    run.res["cgroups"] = [json.loads(f.read_text()) for f in sorted(workdir.glob("cgroup-*.json"))]
                    run.save()
        else:
            run.res["model"] = {"name": spec.name, "path": str(spec.path), "max_model_len": native}
        run_vanilla(run, corpus, specs, native, str(spec.path), workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir}")
    out = run.save(complete=True)
    files = eval_report.write_outputs(run.res, run.name, run.results_dir)
    eval_report.print_tables(run.res)
    print(f"\nwall time {run.res['wall_s'] / 60:.1f} min; wrote {out}, " + ", ".join(str(f) for f in files))
    if not args.no_docs:
        print("wrote", eval_report.write_docs(run.results_dir))
    return 0


def parse(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Mode]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    for name in MODES:
        g.add_argument(f"--{name.replace('_', '-')}", dest="mode", action="store_const", const=name,
                       help=MODES[name].title)
    ap.add_argument("--lengths", type=_ints, help="haystack lengths in tokens, e.g. 4096,8192 or 4k,32k (k = 1024)")
    ap.add_argument("--systems", type=lambda s: s.split(","), help=f"of {', '.join(ALL_SYSTEMS)}")
    ap.add_argument("--tasks", type=lambda s: s.split(","), help=f"of {', '.join(TASKS)}")
    ap.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], help="e.g. 0.1,0.5,0.9")
    ap.add_argument("--depth-cap", type=_caps, help="most depths per task and length, e.g. 8192:4,32768:3")
    ap.add_argument("--ablation-min-length", type=int, help="ablation systems only at lengths >= this")
    ap.add_argument("--ablation-tasks", type=lambda s: tuple(s.split(",")), help="ablation systems only on these")
    ap.add_argument("--one-haystack", type=lambda s: tuple(x for x in s.split(",") if x),
                    help="tasks whose depths share one haystack, each asked (needle only: a distinct key per "
                         "needle, so the others are distractors); '' for none")
    ap.add_argument("--stream-length", type=_ints, help="perf / 1M modes: the stream's length")
    ap.add_argument("--model", default=None, help="smollm2-135m (default), qwen2.5-0.5b, or an HF folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=1, help="sessions ingested at a time (one engine)")
    ap.add_argument("--restart-gib", type=float, default=16.0,
                    help="restart the server once the deleted sessions add up to this (their KV logs may stay "
                         "mapped in the engine, holding disk and page cache)")
    ap.add_argument("--est-tok-s", type=float, default=330.0, help="ingest speed assumed by the time estimate")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--out", default=None, help="results name (default: the mode's, e.g. eval-quick)")
    ap.add_argument("--title", default=None, help="the run's heading in docs/results.md (default: the mode's)")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/results.md")
    ap.add_argument("--plan", action="store_true", help="print the plan and the estimate, run nothing")
    ap.add_argument("--workdir", default=None, help="where sessions and logs go (default: a temp folder)")
    ap.add_argument("--vanilla-max-length", type=lambda s: _ints(s)[0], default=None,
                    help="vanilla vLLM only on haystacks up to this length, e.g. 4k (default: the native "
                         "context; full attention over Qwen2.5-0.5B's 32k is slow on 2 CPU cores)")
    ap.add_argument("--resume", metavar="WORKDIR",
                    help="go on with a stopped --perf / --long-1m stream: its work folder (emserve-eval-*, kept "
                         "with --keep) and results file; points measured before are kept")
    ap.add_argument("--timing-tokens", type=int, default=64,
                    help="long streams: at every checkpoint also ask the stream's questions as prompts of this many "
                         "tokens (their first-token times at every length; 0: only the probe question)")
    ap.add_argument("--timing-questions", type=int, default=6,
                    help="long streams: how many of the stream's questions --timing-tokens asks (the first ones)")
    ap.add_argument("--stream-source", choices=["labelled", "narrative", "reference", "dialogue"], default="labelled",
                    help="long streams: 'labelled' (three labelled pass keys in the corpus text), or a recall suite "
                         "haystack of this source (bench/eval/recall_tasks.py: 10 needles per prose task, each asked "
                         "at the end; the kept session then serves bench/eval/question_search.py)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="one more argument for `emserve serve` (repeat it), e.g. --server-arg=--kv-cache-gib=0.5")
    ap.add_argument("--server-memory", type=parse_bytes, default=None,
                    help="run the server (and its engine) in a memory cgroup of this size, e.g. 4GiB "
                         "(bench/eval/cgroup.py; its usage goes into the results' cgroups)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work folder (server log, vanilla log) and a long stream's session")
    args = ap.parse_args(argv)
    mode = MODES[args.mode or "quick"]
    if args.lengths:
        mode.lengths = args.lengths
    for key in ("systems", "tasks", "depths"):
        if getattr(args, key):
            setattr(mode, key, getattr(args, key))
    if args.depth_cap is not None:
        mode.caps = args.depth_cap
    if args.ablation_min_length is not None:
        mode.ablation_min_length = args.ablation_min_length
    if args.ablation_tasks:
        mode.ablation_tasks = args.ablation_tasks
    if args.one_haystack is not None:
        mode.shared = args.one_haystack
    if args.stream_length:
        mode.stream_length = args.stream_length[0]
    bad = ([s for s in mode.systems if s not in ALL_SYSTEMS] + [t for t in mode.tasks if t not in TASKS]
           + [t for t in mode.shared if t not in SHAREABLE])
    if bad:
        ap.error(f"unknown systems / tasks: {bad}")
    return args, mode


def main(argv: Sequence[str] | None = None) -> int:
    args, mode = parse(argv)
    sigterm_exits()  # a SIGTERM stops the server processes too
    return main_run(args, mode)


if __name__ == "__main__":
    sys.exit(main())

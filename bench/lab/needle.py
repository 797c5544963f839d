"""Needle (passkey) check through the full stack, in-process: engine + segmenter + retrieval.

Per trial (``--tokens`` N, depth d, trial t): a 5-digit passkey (seeded by (t, d)) is inserted as
" The pass key is 71432. Remember it. 71432 is the pass key. " at depth d of N tokens of haystack:

* ``--haystack noise`` (default): the pass-key task as the literature runs it (InfiniteBench passkey,
  RULER niah_single_1): an instruction, then filler sentences repeated (``corpus.noise_haystack``);
  the needle goes at the filler sentence group nearest token ``d * N``. Results: ``needle.json``.
* ``--haystack text``: ``big`` prose (``server/provision/corpus.py``), needle at token ``d * N``; the start
  offset is seeded by (t, d) too, so the same trial at another length streams the same text from the
  same place. Results: ``needle-text.json``. SmolLM2-135M misses a key in prose even in a short
  full-attention context (``--baseline-tokens 512``), so this variant measures the model as much as
  the memory.
 The stream goes through a
:class:`~emserve.server.session.Session` on the product engine (``VLLMEngine``, default model,
default :class:`MemoryConfig` plus ``--mc`` overrides), chunk by chunk with lagged queries,
segmentation and event closing; then ``ask("\\n\\nWhat is the pass key? The pass key is")`` with
greedy ``max_tokens=8``. Recorded per trial:

* ``retrieved``: some retrieved event overlaps the needle (in every layer for a shared selection;
  ``layers``: in how many layers); ``in_local``: the needle is still in the local window / remainder
  (no retrieval needed); ``covered``: needle tokens in the answer step's window (min over layers);
* ``correct``: the passkey appears in the 8 generated tokens.

Baseline (``--baseline-tokens``, 4096 by default): the same model with the needle inside a
``B``-token full-attention context (noise: the same task at B tokens; text: the same trial's text
from the same start; needle at depth d),
plain prompt, greedy: one ``WindowPlan.build(context + question)`` step through the same engine.

``--question-windows none,64:256,...`` asks every trial again with other question windows
(``MemoryConfig.question_n_local:question_n_mem``; ``none``: the ingestion window, as EM-LLM) on the
same ingested session, and prints the answers per window (``bench/results/needle-window.json``).

Prints a table per length and writes ``bench/results/needle.json`` (``needle-text.json``).

``--compare-queries`` (ARCHITECTURE.md, "Retrieval queries": probe pass vs the previous step's
queries) runs every trial twice, ingesting with **lagged** queries (the session default: chunk k is
planned with chunk k-1's query summary) and with **probe** queries (a probe step, the chunk over
[sink | local], before every chunk step); per ingestion step of the probe run it also plans with the
lagged queries and records the overlap of the two selections (``|probe & lagged| / |probe|``, event
ids, the contiguity buffer restored in between). At the question, in both runs, it retrieves with
(a) the probe's last ``question_query_tokens`` query tokens (the default), (b) the probe's mean query
summary, (c) the lagged queries (the last ingestion step's summary: no probe step), and records per
variant the needle's rank in the shared ranking (exact scores, best needle event), whether a needle
event is selected, the answer (8 greedy tokens with that variant's plan) and the time to plan (probe
step included). Writes ``bench/results/needle_queries.json`` (``--out`` to change).

    .venv/bin/python -m bench.lab.needle [--tokens 8000,32000] [--depths 0.1,0.5,0.9] [--trials 3]
        [--baseline-tokens 4096] [--haystack noise|text] [--mc '{"per_layer": true}'] [--out NAME]
        [--no-save] [--keep]
        [--compare-queries]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.eval.common import ingest_all, machine, sigterm_exits, table, write_results

QUESTION = "\n\nWhat is the pass key? The pass key is"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "


@dataclass(frozen=True)
class Trial:
    ids: list[int]
    span: tuple[int, int]  # the needle's tokens [start, end)
    key: str
    depth: float
    seed: int
    text_start: int


def make_trial(tok: Any, text: str | None, n_tokens: int, depth: float, seed: int) -> Trial:
    """``n_tokens`` tokens of ``text`` with the needle inserted at token ``int(depth * n_tokens)``;
    ``text`` None: the pass-key task's noise haystack (``corpus.noise_haystack``), the needle at the
    noise sentence group nearest that token.

    The passkey and the text offset depend on (seed, depth) only, not on ``n_tokens``.
    """
    rng = np.random.default_rng([seed, round(depth * 1000)])
    key = str(int(rng.integers(10000, 100000)))
    needle = tok(NEEDLE.format(key=key))["input_ids"]
    if text is None:
        from emserve.server.provision.corpus import noise_haystack

        ids, pos = noise_haystack(tok, n_tokens, depth)
        return Trial(ids[:pos] + needle + ids[pos:], (pos, pos + len(needle)), key, depth, seed, -1)
    start = int(rng.integers(0, int(len(text) * 0.8)))  # the last fifth of big.txt is word lists
    start = text.find(" ", start) + 1
    ids = tok(text[start : start + n_tokens * 8])["input_ids"][:n_tokens]
    if len(ids) < n_tokens:
        raise ValueError(f"text too short at offset {start} for {n_tokens} tokens")
    pos = int(n_tokens * depth)
    return Trial(ids[:pos] + needle + ids[pos:], (pos, pos + len(needle)), key, depth, seed, start)


def window_name(w: tuple[int | None, int | None]) -> str:
    return "ingestion window" if w == (None, None) else f"local {w[0]} + mem {w[1]}"


async def ask_windows(session: Any, q: list[int], tok: Any, key: str,
                      windows: list[tuple[int | None, int | None]]) -> dict[str, Any]:
    """The same question with other question windows (``question_n_local``, ``question_n_mem``)."""
    from emserve.server.engine.base import SamplingSpec

    planner = session.memory.planner
    base = planner.config
    out = {}
    try:
        for w in windows:
            planner.config = dataclasses.replace(base, question_n_local=w[0], question_n_mem=w[1])
            res = await session.ask(q, SamplingSpec(max_tokens=8))
            answer = tok.decode(res.token_ids)
            out[window_name(w)] = {"answer": answer, "correct": key in answer}
    finally:
        planner.config = base
    return out


async def run_trial(engine: Any, tok: Any, trial: Trial, mc: dict[str, Any], workdir: Path,
                    windows: list[tuple[int | None, int | None]] | None = None) -> dict[str, Any]:
    from emserve.server.engine.base import SamplingSpec
    from emserve.server.session import MemoryConfig, Session

    cfg = MemoryConfig.of(**mc)
    session = Session.create(tempfile.mkdtemp(dir=workdir), engine, cfg)
    try:
        ingest_s = await ingest_all(session, trial.ids)
        q = tok(QUESTION)["input_ids"]
        t1 = time.perf_counter()
        res = await session.ask(q, SamplingSpec(max_tokens=8))
        ask_s = time.perf_counter() - t1
        a, b = trial.span
        table_ = session.event_table
        retrievable = table_.count_ending_by(session.num_tokens - cfg.retrieval.n_local) if table_ is not None else 0
        rem_start = int(table_.ends[retrievable - 1]) if retrievable else 0
        in_local = a >= rem_start  # remainder + local window: in every window, no retrieval needed
        layers = 0
        covered = b - a if in_local else 0
        if res.retrieval is not None:
            sels = res.retrieval.layers
            layers = sum(any(e.start < b and e.end > a for e in s.events) for s in sels)
            if not in_local:
                covered = min(sum(max(0, min(e.end, b) - max(e.start, a)) for e in s.events) for s in sels)
        answer = tok.decode(res.token_ids)
        other = await ask_windows(session, q, tok, trial.key, windows) if windows else {}
        return {
            "windows": other,
            "retrieved": layers > 0,
            "layers": layers,
            "num_layers": engine.info.num_layers,
            "in_local": bool(in_local),
            "covered": int(covered),
            "needle_tokens": b - a,
            "answer": answer,
            "correct": trial.key in answer,
            "events": int(len(table_)) if table_ is not None else 0,
            "ingest_tok_s": len(trial.ids) / ingest_s,
            "ask_s": ask_s,
        }
    finally:
        session.close()


async def run_baseline(engine: Any, tok: Any, trial: Trial, tokens: int) -> dict[str, Any]:
    from emserve.retrieval.plan import WindowPlan
    from emserve.server.engine.base import SamplingSpec, StepOptions

    a, b = trial.span
    if trial.text_start < 0:  # noise haystack: the same task at the baseline's length
        short = make_trial(tok, None, tokens, trial.depth, trial.seed)
        ctx, s0, a = short.ids, 0, short.span[0]
    else:
        s0 = max(0, a - int(trial.depth * tokens))
        ctx = trial.ids[s0 : s0 + tokens + (b - a)]
    res = await engine.step(
        WindowPlan.build(ctx + tok(QUESTION)["input_ids"]),
        SamplingSpec(max_tokens=8),
        StepOptions(surprise=False, queries=False),
    )
    answer = tok.decode(res.output_token_ids)
    return {"context": len(ctx), "needle_at": a - s0, "answer": answer, "correct": trial.key in answer}


def needle_rank(session: Any, queries: np.ndarray, span: tuple[int, int], m: int) -> int | None:
    """Rank (0 = best) of the best needle event among the ``m`` retrievable events (shared exact scores)."""
    r = session.memory.retriever
    table_ = session.memory.table
    a, b = span
    ne = [i for i in range(m) if table_.starts[i] < b and table_.ends[i] > a]
    if not ne:
        return None
    s = r.scores(r.encode(queries), None)[:m]
    return min(int((s > s[e]).sum()) for e in ne)


async def run_compare(engine: Any, tok: Any, trial: Trial, mc: dict[str, Any], workdir: Path,
                      ingest: str) -> dict[str, Any]:
    """One trial ingested with ``ingest`` ("lagged" or "probe") queries, then the question with each
    query variant (module docstring)."""
    from emserve.server.engine.base import SamplingSpec, StepOptions
    from emserve.server.session import MemoryConfig, Session

    cfg = MemoryConfig.of(**mc)
    session = Session.create(tempfile.mkdtemp(dir=workdir), engine, cfg)
    orig = session._ingest_chunk
    step_s: list[float] = []
    overlap: list[float] = []

    async def chunk_step(chunk: list[int]) -> Any:
        offset = session.num_tokens
        t0 = time.perf_counter()
        if ingest == "probe" and offset > 0:
            lagged = session._last_queries
            planner = session.memory.planner
            lay = planner.layout(offset, len(chunk))
            lag_ids = None
            if lagged is not None and lay.num_events and lay.budget:
                saved = copy.deepcopy(planner.retriever.buffers)
                lag_ids = set(planner.retriever.retrieve(lagged, lay.budget, num_events=lay.num_events).layers[0].ids)
                planner.retriever.buffers = saved
            t0 = time.perf_counter()
            session._last_queries = None  # the session then probes before planning
            res = await orig(chunk)
            step_s.append(time.perf_counter() - t0)
            if lag_ids is not None and planner.last_retrieval is not None:
                probe_ids = set(planner.last_retrieval.layers[0].ids)
                overlap.append(len(probe_ids & lag_ids) / max(1, len(probe_ids)))
            return res
        res = await orig(chunk)
        if offset > 0:
            step_s.append(time.perf_counter() - t0)
        return res

    session._ingest_chunk = chunk_step  # type: ignore[method-assign]
    try:
        ingest_s = await ingest_all(session, trial.ids)
        q = tok(QUESTION)["input_ids"]
        offset = session.num_tokens
        planner = session.memory.planner
        lay = planner.layout(offset, len(q), reserve=8)
        m = lay.num_events
        lagged = session._last_queries
        out: dict[str, Any] = {}
        for variant in ("probe_tokens", "probe_summary", "lagged"):
            t1 = time.perf_counter()
            if variant == "lagged":
                queries = lagged
            else:
                n_tok = cfg.question.query_tokens if variant == "probe_tokens" else 0
                probe = await engine.step(planner.probe_plan(offset, q),
                                          options=StepOptions(surprise=False, query_tokens=n_tok))
                queries = probe.query_tokens if n_tok else probe.queries
            saved = copy.deepcopy(planner.retriever.buffers)
            plan = planner.plan_step(offset, q, queries, reserve=8)
            plan_s = time.perf_counter() - t1
            planner.retriever.buffers = saved
            retrieval = planner.last_retrieval
            a, b = trial.span
            hit = retrieval is not None and any(e.start < b and e.end > a for e in retrieval.layers[0].events)
            res = await engine.step(dataclasses.replace(plan, capture_log=None), SamplingSpec(max_tokens=8),
                                    StepOptions(surprise=False, queries=False))
            answer = tok.decode(res.output_token_ids)
            out[variant] = {"rank": needle_rank(session, queries, trial.span, m) if queries is not None else None,
                            "selected": bool(hit), "answer": answer, "correct": trial.key in answer,
                            "plan_s": plan_s}
        table_ = session.memory.table
        rem_start = int(table_.ends[m - 1]) if m else 0
        return {"ingest": ingest, "in_local": trial.span[0] >= rem_start, "events": len(table_),
                "ingest_tok_s": len(trial.ids) / ingest_s, "step_s_mean": float(np.mean(step_s)),
                "step_s_median": float(np.median(step_s)),
                "selection_overlap_probe_vs_lagged": [float(np.mean(overlap)), float(np.min(overlap))]
                if overlap else None,
                "question": out}
    finally:
        session.close()


COMPARE_HEADERS = ["tokens", "ingest", "trials", "q: probe tokens rank / sel / ok", "q: probe summary rank / sel / ok",
                   "q: lagged rank / sel / ok", "plan s (tokens/summary/lagged)", "chunk step s", "ingest tok/s",
                   "chunk sel overlap probe~lagged mean/min"]


def summarize_compare(rows: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for n in sorted({r["tokens"] for r in rows}):
        for ingest in ("lagged", "probe"):
            sel = [r["cmp"] for r in rows if r["tokens"] == n and r["cmp"]["ingest"] == ingest]
            if not sel:
                continue
            mem = [r for r in sel if not r["in_local"]]
            cells = []
            for v in ("probe_tokens", "probe_summary", "lagged"):
                ranks = [r["question"][v]["rank"] for r in mem]
                cells.append(f"{ranks} / {sum(r['question'][v]['selected'] for r in mem)}/{len(mem)} / "
                             f"{sum(r['question'][v]['correct'] for r in sel)}/{len(sel)}")
            ov = [r["selection_overlap_probe_vs_lagged"] for r in sel if r["selection_overlap_probe_vs_lagged"]]
            out.append([n, ingest, len(sel), *cells,
                        "/".join(f"{np.mean([r['question'][v]['plan_s'] for r in sel]):.3f}"
                                 for v in ("probe_tokens", "probe_summary", "lagged")),
                        f"{np.mean([r['step_s_mean'] for r in sel]):.3f}",
                        f"{np.mean([r['ingest_tok_s'] for r in sel]):.0f}",
                        f"{np.mean([o[0] for o in ov]):.3f}/{min(o[1] for o in ov):.3f}" if ov else "-"])
    return out


def summarize(rows: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for n in sorted({r["tokens"] for r in rows}):
        for d in sorted({r["depth"] for r in rows if r["tokens"] == n}) + [None]:
            sel = [r for r in rows if r["tokens"] == n and (d is None or r["depth"] == d)]
            if not sel:
                continue
            mem = [r for r in sel if not r["em"]["in_local"]]
            out.append([
                n, "all" if d is None else d, len(sel),
                f"{sum(r['em']['retrieved'] for r in mem)}/{len(mem)}",
                f"{sum(r['em']['covered'] == r['em']['needle_tokens'] for r in mem)}/{len(mem)}",
                f"{sum(r['em']['correct'] for r in sel)}/{len(sel)}",
                f"{sum(r['baseline']['correct'] for r in sel)}/{len(sel)}" if sel[0].get("baseline") else "-",
                float(np.mean([r["em"]["ingest_tok_s"] for r in sel])),
            ])
    return out


HEADERS = ["tokens", "depth", "trials", "needle retrieved (in memory)", "needle fully in window",
           "EM answer correct", "4k full-attn correct", "ingest tok/s"]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from emserve.server.engine.config import EngineConfig
    from emserve.server.engine.vllm_engine import VLLMEngine
    from emserve.server.provision.corpus import load_text
    from emserve.server.provision.models import resolve_model

    spec = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(spec.path)
    text = load_text("big") if args.haystack == "text" else None
    mc = json.loads(args.mc)
    engine = VLLMEngine(EngineConfig(model=str(spec.path), kv_cache_gib=2))
    rows: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="emserve-needle-"))
    if args.keep:
        print("sessions in", workdir, flush=True)
    try:
        for n in args.tokens:
            for t in range(args.trials):
                for d in args.depths:
                    trial = make_trial(tok, text, n, d, t)
                    if args.compare_queries:
                        for ingest in ("lagged", "probe"):
                            cmp = await run_compare(engine, tok, trial, mc, workdir, ingest)
                            rows.append({"tokens": n, "depth": d, "trial": t, "key": trial.key,
                                         "needle": list(trial.span), "cmp": cmp})
                            qv = cmp["question"]
                            print(f"{n:6d} d={d:.2f} t={t} ingest={ingest}: in_local={cmp['in_local']} "
                                  + " ".join(f"{v}: rank {x['rank']} sel={x['selected']} {x['answer']!r} "
                                             f"{'OK' if x['correct'] else 'wrong'} {x['plan_s']:.3f}s;"
                                             for v, x in qv.items())
                                  + f" step {cmp['step_s_mean']:.3f}s"
                                  + f" overlap {cmp['selection_overlap_probe_vs_lagged']}",
                                  flush=True)
                        continue
                    em = await run_trial(engine, tok, trial, mc, workdir, args.question_windows)
                    base = (await run_baseline(engine, tok, trial, args.baseline_tokens)
                            if args.baseline_tokens else None)
                    row = {"tokens": n, "depth": d, "trial": t, "key": trial.key, "needle": list(trial.span),
                           "text_start": trial.text_start, "em": em, "baseline": base}
                    rows.append(row)
                    print(f"{n:6d} d={d:.2f} t={t}: retrieved={em['retrieved']} ({em['layers']}/{em['num_layers']}"
                          f" layers, in_local={em['in_local']}, covered {em['covered']}/{em['needle_tokens']}) "
                          f"answer={em['answer']!r} {'OK' if em['correct'] else 'wrong'}"
                          + (f" | 4k: {base['answer']!r} {'OK' if base['correct'] else 'wrong'}" if base else "")
                          + f" | {em['ingest_tok_s']:.0f} tok/s"
                          + "".join(f" | {k}: {'OK' if v['correct'] else repr(v['answer'])}"
                                    for k, v in em["windows"].items()), flush=True)
    finally:
        await engine.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)  # ~0.8 GB per 32k-token session
    print()
    from emserve.server.session import MemoryConfig

    if args.compare_queries:
        print(table(COMPARE_HEADERS, summarize_compare(rows)))
        return {"machine": machine(), "model": spec.name, "question": QUESTION, "needle": NEEDLE,
                "memory_config": MemoryConfig.of(**mc).settings(),
                "summary": {"headers": COMPARE_HEADERS, "rows": summarize_compare(rows)}, "trials": rows}
    print(table(HEADERS, summarize(rows)))
    windows = {}
    if args.question_windows:
        names = list(rows[0]["em"]["windows"]) if rows else []
        win_rows = [[name, f"{sum(r['em']['windows'][name]['correct'] for r in rows)}/{len(rows)}"] for name in names]
        win_rows.append(["(this run's config: the 'EM answer correct' column)",
                         f"{sum(r['em']['correct'] for r in rows)}/{len(rows)}"])
        if rows and rows[0].get("baseline"):
            win_rows.append([f"{args.baseline_tokens}-token full attention",
                             f"{sum(r['baseline']['correct'] for r in rows)}/{len(rows)}"])
        print()
        print(table(["question window", "answers correct"], win_rows))
        windows = {"headers": ["question window", "answers correct"], "rows": win_rows}

    return {"machine": machine(), "model": spec.name, "question": QUESTION, "needle": NEEDLE,
            "haystack": args.haystack, "memory_config": MemoryConfig.of(**mc).settings(),
            "baseline_tokens": args.baseline_tokens,
            "summary": {"headers": HEADERS, "rows": summarize(rows)}, "question_windows": windows, "trials": rows}


def _windows(spec: str) -> list[tuple[int | None, int | None]]:
    out: list[tuple[int | None, int | None]] = []
    for part in spec.split(","):
        if part.strip().lower() == "none":
            out.append((None, None))
        else:
            a, b = part.split(":")
            out.append((int(a), int(b)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[8000, 32000])
    ap.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.5, 0.9])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--baseline-tokens", type=int, default=4096, help="0: no baseline")
    ap.add_argument("--mc", default="{}", help="MemoryConfig overrides (JSON)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--question-windows", type=_windows, default=None,
                    help="also ask each trial with these question windows, e.g. none,64:256,0:128 "
                         "(question_n_local:question_n_mem; none: the ingestion window); default --out needle-window")
    ap.add_argument("--haystack", choices=["noise", "text"], default="noise",
                    help="noise: the pass-key task of the literature (default); text: the key hidden in prose")
    ap.add_argument("--out", default=None, help="results name (default: needle, needle-text, needle_queries)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the sessions (printed workdir)")
    ap.add_argument("--compare-queries", action="store_true",
                    help="probe vs lagged queries (module docstring); default --out needle_queries")
    args = ap.parse_args()
    sigterm_exits()
    if args.out is None:
        args.out = ("needle_queries" if args.compare_queries else "needle-window" if args.question_windows
                    else "needle" if args.haystack == "noise" else "needle-text")
    payload = asyncio.run(main_async(args))
    if not args.no_save:
        print("wrote", write_results(args.out, payload))


if __name__ == "__main__":
    main()

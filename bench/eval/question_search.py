"""A question's search on a kept recall session: its time, and what it selects against exact search.

Opens a session that ``bench/eval/recall.py --keep`` left (its ``data-*`` folder), rebuilds the haystack's
questions (the same source, length, seed, phrasings and needles per task), and plans each question's
window in-process with the product's own function (``server.session.question.plan_question``: the probe
step, the lexical matches, the retrieval and the layout) four times:

1. as the session does (the token graph once the session has ``exact_search_threshold`` events), cold;
2. the same again, warm: its ``retrieve`` phase (everything after the probe step: lexical matches,
   search, layout) is the question's retrieval time reported here (p50 / p99), and the lexical
   matching alone is timed apart;
3. without lexical matches (``question.lexical`` 0): the window is the similarity search's, which
   the product skips where the matches and their neighbours fill the budget;
4. as 3 with exact search forced (``exact_threshold`` above the table's size): every event scored.

Per question: the selections of 3 and 4 (event ids in the window, all of them and the similarity
picks alone), selection recall ``|search & exact| / |exact|`` on each, and whether the asked sentences
are in the window in 2, 3 and 4. The probe step gives the same queries each time (greedy, one request). The session
is read only (a question changes nothing in it).

    .venv/bin/python -m bench.eval.question_search --session DIR/data-XXXX --source narrative --length 1m \
        [--seed 0] [--phrasings suite] [--per-task 10] [--blas-threads N] [--out question_search-1m]

It runs its numpy work on the server's BLAS threads (``--host-blas-threads``, default 1) unless told otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.eval.common import machine, sigterm_exits, table, wilson, write_results
from bench.eval.eval_server import window_coverage


def covered(ranges: list[tuple[int, int]], spans: list[tuple[int, int]]) -> bool:
    """Every span lies inside the window ``ranges`` (the recall suite's rule: ``window_coverage`` 1)."""
    return min(window_coverage(span, ranges) for span in spans) >= 1.0


def recall(got: set[int], want: set[int]) -> float:
    return 1.0 if not want else len(got & want) / len(want)


async def plan_once(session: Any, q_ids: list[int], max_tokens: int) -> tuple[Any, Any, dict[str, float]]:
    from emserve.server.engine.base import SamplingSpec
    from emserve.server.report import PhaseClock
    from emserve.server.session.question import plan_question

    clock = PhaseClock()
    plan, retrieval = await plan_question(session, session.num_tokens, list(q_ids), SamplingSpec(max_tokens=max_tokens),
                                          clock)
    return plan, retrieval, dict(clock.phases)


def selection(retrieval: Any) -> tuple[set[int], set[int]]:
    """(every selected event, the similarity picks) of a question's retrieval (one shared selection)."""
    if retrieval is None:
        return set(), set()
    events = retrieval.layers[0].events
    return {e.id for e in events}, {e.id for e in events if e.source == "similarity"}


def build_postings(session: Any, model_path: str) -> tuple[float, int]:
    """The session's word postings built from scratch over its whole table (what its first question pays):
    seconds and bytes."""
    from emserve.server.session.question import word_postings
    from emserve.server.session.words import model_vocabulary

    vocab = model_vocabulary(model_path)
    table = session.memory.table
    starts = np.asarray(table.starts[: len(table)], np.int64)
    ends = starts + np.asarray(table.sizes[: len(table)], np.int64)
    session.memory.word_postings.clear()
    t0 = time.perf_counter()
    built = word_postings(session, vocab, starts, ends)
    return time.perf_counter() - t0, sum(p.nbytes for p in built)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bench.eval.recall_tasks import NOISE, build, source_filler
    from emserve.server.engine.config import EngineConfig
    from emserve.server.engine.vllm_engine import VLLMEngine
    from emserve.server.provision.models import resolve_model
    from emserve.server.session import Session
    from emserve.server.session.question import lexical_leads

    if not (Path(args.session) / "session.json").is_file():
        raise SystemExit(f"{args.session} is not a session's data folder (no session.json)")
    spec = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(spec.path)
    tasks = ["passkey"] if args.source == NOISE else args.tasks
    hs = build(source_filler(tok, spec.name, args.source), args.source, args.length, args.per_task, args.seed, tasks,
               args.phrasings)
    engine = VLLMEngine(EngineConfig(model=str(spec.path), kv_cache_gib=2))
    try:
        t0 = time.perf_counter()
        session = Session.open(args.session, engine)
        if session.num_tokens != hs.length:
            raise SystemExit(f"the session holds {session.num_tokens} tokens, the haystack {hs.length}: "
                             "not the stream of these arguments")
        index = session.memory.index
        n = len(session.memory.table)
        open_s = time.perf_counter() - t0
        postings_s, postings_bytes = build_postings(session, spec.path)
        print(f"{hs.hid}: session at {session.num_tokens} tokens, {n} events, opened in {open_s:.1f} s", flush=True)
        rows = []
        default_params = index.params
        with_leads = session.config
        # the search alone (no lexical matches: the window is the similarity ranking's), against exact search
        no_leads = dataclasses.replace(with_leads, question=dataclasses.replace(with_leads.question, lexical=0))
        for q in hs.questions:
            _, r_cold, ph_cold = await plan_once(session, q.prompt_ids, args.max_tokens)
            plan, r_def, ph = await plan_once(session, q.prompt_ids, args.max_tokens)
            session.config = no_leads
            try:
                plan_s, r_s, ph_s = await plan_once(session, q.prompt_ids, args.max_tokens)
                index.params = dataclasses.replace(default_params, exact_threshold=n + 1)
                plan_x, r_x, ph_x = await plan_once(session, q.prompt_ids, args.max_tokens)
            finally:
                index.params = default_params
                session.config = with_leads
            lay = session.memory.planner.layout(session.num_tokens, len(q.prompt_ids), reserve=args.max_tokens,
                                                question=True)
            # the product's lexical matching (word postings) and a pass over the stream, in alternating order
            timed = {}
            for use in ((True, False) if len(rows) % 2 == 0 else (False, True)):
                t_lex = time.perf_counter()
                leads = lexical_leads(session, q.prompt_ids, lay.num_events, postings=use)
                timed[use] = (time.perf_counter() - t_lex, leads)
            lexical_s, lexical_stream_s = timed[True][0], timed[False][0]
            (all_d, sim_d), (all_s, sim_s), (all_x, sim_x) = selection(r_def), selection(r_s), selection(r_x)
            row = {"qid": q.qid, "task": q.task, "depth": q.depth,
                   "exact_flags": [None if r is None else bool(r.exact) for r in (r_def, r_x)],
                   "probe_s": ph.get("probe", 0.0), "retrieve_s": ph.get("retrieve", 0.0), "lexical_s": lexical_s,
                   "lexical_stream_s": lexical_stream_s, "same_leads": timed[True][1] == timed[False][1],
                   "retrieve_cold_s": ph_cold.get("retrieve", 0.0), "search_only_s": ph_s.get("retrieve", 0.0),
                   "retrieve_exact_s": ph_x.get("retrieve", 0.0),
                   "events": len(all_d), "similarity_picks": len(sim_d), "events_search": len(all_s),
                   "recall_all": recall(all_s, all_x), "recall_similarity": recall(sim_s, sim_x),
                   "similarity_exact": len(sim_x), "same_cold": selection(r_cold) == (all_d, sim_d),
                   "in_window": covered(plan.log_ranges(session.log_path), q.spans),
                   "in_window_search": covered(plan_s.log_ranges(session.log_path), q.spans),
                   "in_window_exact": covered(plan_x.log_ranges(session.log_path), q.spans)}
            rows.append(row)
            print(f"{q.qid}: retrieve {1e3 * row['retrieve_s']:.0f} ms (lexical {1e3 * lexical_s:.0f}, "
                  f"cold {1e3 * row['retrieve_cold_s']:.0f}); without leads: search {1e3 * row['search_only_s']:.0f} "
                  f"ms, exact {1e3 * row['retrieve_exact_s']:.0f} ms, recall {row['recall_all']:.2f}, similarity "
                  f"{row['recall_similarity']:.2f} ({row['similarity_exact']} exact picks); in window "
                  f"{row['in_window']} / search {row['in_window_search']} / exact {row['in_window_exact']}", flush=True)
        session.close(checkpoint=False)
    finally:
        await engine.close()
    return {"session": args.session, "haystack": hs.hid, "tokens": hs.length, "events": n, "open_s": open_s,
            "postings_build_s": postings_s, "postings_bytes": postings_bytes,
            "index": dataclasses.asdict(default_params), "rows": rows}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ms = np.array([r["retrieve_s"] for r in rows]) * 1e3
    rec = np.array([r["recall_all"] for r in rows])
    sim = np.array([r["recall_similarity"] for r in rows])
    inw = sum(r["in_window"] for r in rows)
    ins = sum(r["in_window_search"] for r in rows)
    inx = sum(r["in_window_exact"] for r in rows)
    search = np.array([r["search_only_s"] for r in rows]) * 1e3
    return {"n": len(rows), "retrieve_ms_p50": float(np.percentile(ms, 50)),
            "retrieve_ms_p99": float(np.percentile(ms, 99)), "retrieve_ms_max": float(ms.max()),
            "probe_ms_p50": float(np.percentile([r["probe_s"] * 1e3 for r in rows], 50)),
            "lexical_ms_p50": float(np.percentile([r["lexical_s"] * 1e3 for r in rows], 50)),
            "lexical_ms_p99": float(np.percentile([r["lexical_s"] * 1e3 for r in rows], 99)),
            "lexical_stream_ms_p50": float(np.percentile([r["lexical_stream_s"] * 1e3 for r in rows], 50)),
            "lexical_stream_ms_p99": float(np.percentile([r["lexical_stream_s"] * 1e3 for r in rows], 99)),
            "lexical_ratio_median": float(np.median([r["lexical_s"] / r["lexical_stream_s"] for r in rows])),
            "same_leads": int(sum(r["same_leads"] for r in rows)),
            "search_ms_p50": float(np.percentile(search, 50)), "search_ms_p99": float(np.percentile(search, 99)),
            "exact_ms_p50": float(np.percentile([r["retrieve_exact_s"] * 1e3 for r in rows], 50)),
            "similarity_picks": int(sum(r["similarity_picks"] for r in rows)),
            "recall_all_mean": float(rec.mean()), "recall_all_min": float(rec.min()),
            "recall_similarity_mean": float(sim.mean()), "recall_similarity_min": float(sim.min()),
            "in_window": [inw, len(rows), *wilson(inw, len(rows))],
            "in_window_search": [ins, len(rows), *wilson(ins, len(rows))],
            "in_window_exact": [inx, len(rows), *wilson(inx, len(rows))]}


def main(argv: list[str] | None = None) -> int:
    from bench.eval.recall_tasks import NOISE, PHRASINGS, SOURCES, TASKS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--session", required=True, help="the kept session's data-* folder")
    ap.add_argument("--source", required=True, choices=[*SOURCES, NOISE])
    ap.add_argument("--length", required=True, help="the haystack's length, e.g. 1m or 131072")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phrasings", choices=sorted(PHRASINGS), default="suite")
    ap.add_argument("--per-task", type=int, default=10,
                    help="needles per task as the run had them (the noise haystack: per task x the run's sources, 30)")
    ap.add_argument("--tasks", type=lambda s: s.split(","), default=[t for t in TASKS if t != "passkey"],
                    help="the prose haystack's tasks as the run had them (default: all of them)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--blas-threads", type=int, default=None, metavar="N",
                    help="BLAS threads of this process, as the server's --host-blas-threads (default: the server's "
                         "default; 0: the library's)")
    ap.add_argument("--out", default=None, help="results name (default question_search-<source>-<length>)")
    args = ap.parse_args(argv)
    from emserve.server.config import ServerConfig
    from emserve.server.threads import blas_threads, limit_blas_threads

    if args.blas_threads is None:
        args.blas_threads = next(f.default for f in dataclasses.fields(ServerConfig) if f.name == "host_blas_threads")
    limit_blas_threads(args.blas_threads)
    from bench.eval.eval import _ints, git_rev

    args.length = _ints(args.length)[0]
    sigterm_exits()
    res = asyncio.run(run(args))
    summ = summarize(res["rows"])
    print(table(["n", "retrieve ms p50 / p99 / max", "lexical ms p50 / p99", "stream pass ms p50 / p99",
                 "postings / stream (median)", "same leads", "similarity picks", "probe ms p50",
                 "without leads: search ms p50 / p99", "exact ms p50", "recall mean / min",
                 "similarity recall mean / min", "in window: product / search / exact"],
                [[summ["n"],
                  f"{summ['retrieve_ms_p50']:.0f} / {summ['retrieve_ms_p99']:.0f} / {summ['retrieve_ms_max']:.0f}",
                  f"{summ['lexical_ms_p50']:.0f} / {summ['lexical_ms_p99']:.0f}",
                  f"{summ['lexical_stream_ms_p50']:.0f} / {summ['lexical_stream_ms_p99']:.0f}",
                  f"{summ['lexical_ratio_median']:.2f}", f"{summ['same_leads']} of {summ['n']}",
                  summ["similarity_picks"],
                  f"{summ['probe_ms_p50']:.0f}", f"{summ['search_ms_p50']:.0f} / {summ['search_ms_p99']:.0f}",
                  f"{summ['exact_ms_p50']:.0f}", f"{summ['recall_all_mean']:.3f} / {summ['recall_all_min']:.2f}",
                  f"{summ['recall_similarity_mean']:.3f} / {summ['recall_similarity_min']:.2f}",
                  f"{summ['in_window'][0]} / {summ['in_window_search'][0]} / {summ['in_window_exact'][0]} "
                  f"of {summ['n']}"]]))
    name = args.out or f"question_search-{args.source}-{args.length // 1024}k"
    print("wrote", write_results(name, {"machine": machine(), "git": git_rev(), "command": " ".join(sys.argv),
                                        "summary": summ, "blas_threads": blas_threads(), **res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

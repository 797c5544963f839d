"""The demo's task in-process, many seeds and depths, asked under several question-retrieval variants.

Builds ``emserve demo``'s documents (``server/cli.demo_document``: ~12k tokens of public-domain prose,
the pass-key sentence at depth ``d``, the key drawn from the seed), streams each into a
:class:`~emserve.server.session.Session` on the product engine (vLLM, default model) exactly as the
demo's client does (each text piece tokenized on its own), keeps the sessions, then asks the demo's
question once per variant: a variant is a set of :class:`~emserve.retrieval.config.RetrievalConfig`
overrides applied to the question only (``question_neighbours``, ``question_contiguity``, ...), on
the same ingested session, the contiguity buffers restored between variants. Recorded per (document,
variant): the answer, whether it holds the key, and **coverage**: the share of a copy of the key's digit
tokens in the answer step's window (the best copy; 1.0: a whole key was readable).

    .venv/bin/python -m bench.lab.demo_recall [--seeds 0-9] [--tokens 12000] [--workdir DIR]
        [--variant NAME='{"question_neighbours": 1}' ...] [--out NAME]

Prints a table (accuracy with Wilson 95% intervals, mean coverage per variant) and writes
``bench/results/demo_recall.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import time
from pathlib import Path
from typing import Any

from bench.eval.common import machine, question_defaults, table, wilson, write_results

# "before": the question window of the sessions saved before this benchmark's rules (the contiguity
# buffer, the 128-token sink); "rules 1-4": docs/recall.md's first four rules (its tables' "now" before the
# lexical matches); "now": today's MemoryConfig defaults; the others: one rule changed from "rules 1-4".
R14 = {"question_neighbours": 2, "question_reach": 0, "question_contiguity": False, "question_n_init": 0,
       "question_lexical": 0}
DEFAULT_VARIANTS = {
    "before": {"question_neighbours": 0, "question_reach": 0, "question_contiguity": True, "question_n_init": None,
               "question_lexical": 0},
    "rules 1-4": R14,
    "now": {},  # today's defaults: rules 1-4, the lexical matches (rule 5), neighbours by reach (rule 6)
    "rules 1-5 (no reach)": {"question_reach": 0},
    "rules 1-4, neighbours 1": {**R14, "question_neighbours": 1},
    "rules 1-4, sink 128": {**R14, "question_n_init": None},
    "rules 1-4, + contiguity buffer": {**R14, "question_contiguity": True},
    "rules 1-4, content query tokens": {**R14, "question_content_queries": True},
    "rules 1-4, memory 512": {**R14, "question_n_mem": 512},
    "rules 1-4, local 16": {**R14, "question_n_local": 16},
}


def _runs(xs: list[int]) -> list[list[int]]:
    """Consecutive runs of sorted ints (each copy of the key is one run of digit tokens)."""
    out: list[list[int]] = []
    for x in xs:
        if out and out[-1][-1] == x - 1:
            out[-1].append(x)
        else:
            out.append([x])
    return out


async def ingest(engine: Any, tok: Any, path: Path, seed: int, depth: float, tokens: int) -> dict[str, Any]:
    from emserve.client import split_text
    from emserve.server.cli import demo_document
    from emserve.server.session import Session

    before, needle, after, key = demo_document(tokens, depth, seed, tok, "text")
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731 - the server's TextCodec.encode
    head = [i for piece in split_text(before, 8192) for i in enc(piece)]
    nee = enc(needle)
    tail = [i for piece in split_text(after, 8192) for i in enc(piece)]
    # the digits' tokens: those of the needle whose text holds a digit of the key
    digits = [head.__len__() + j for j, t in enumerate(nee) if any(ch.isdigit() for ch in tok.decode([t]))]
    meta = {"seed": seed, "depth": depth, "key": key, "needle": [len(head), len(head) + len(nee)],
            "digits": digits, "tokens": len(head) + len(nee) + len(tail)}
    if (path / "meta.json").exists():
        return json.loads((path / "meta.json").read_text())
    s = Session.create(path, engine)
    try:
        t0 = time.perf_counter()
        await s.append(head + nee + tail)
        await s.flush()
        meta["ingest_s"] = time.perf_counter() - t0
        meta["events"] = len(s.event_table) if s.event_table is not None else 0
    finally:
        s.close()
    (path / "meta.json").write_text(json.dumps(meta))
    return meta


async def ask_variants(engine: Any, tok: Any, path: Path, meta: dict[str, Any],
                       variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from emserve.server.cli import DEMO_QUESTION as QUESTION
    from emserve.server.engine.base import SamplingSpec
    from emserve.server.session import Session

    s = Session.open(path, engine)
    out: dict[str, Any] = {}
    today = question_defaults()  # a variant overrides these, not those a kept session was saved with
    planner = s.memory.planner
    base, base_mc = planner.config, s.config  # put back in `finally`
    try:
        buffers = copy.deepcopy(planner.retriever.buffers)
        q = tok.encode(QUESTION, add_special_tokens=False)
        digits = set(meta["digits"])
        for name, over in variants.items():
            s.config = base_mc.with_settings(**{**today, **over})
            planner.config = s.config.retrieval
            planner.retriever.buffers = copy.deepcopy(buffers)
            res = await s.ask(q, SamplingSpec(max_tokens=12))
            answer = tok.decode(res.token_ids)
            plan_tokens: set[int] = set()
            if res.retrieval is not None:
                for e in res.retrieval.layers[0].events:
                    plan_tokens.update(range(e.start, e.end))
            lay = planner.layout(s.num_tokens, len(q), reserve=12, question=True)
            for a, b in (lay.sink, lay.remainder, lay.local):
                plan_tokens.update(range(a, b))
            if lay.anchor is not None:
                plan_tokens.add(lay.anchor)
            cov = max((len(set(run) & plan_tokens) / len(run) for run in _runs(sorted(digits))), default=0.0)
            events = [] if res.retrieval is None else [
                (e.start, e.end, e.source) for e in res.retrieval.layers[0].events
                if e.end > meta["needle"][0] - 40 and e.start < meta["needle"][1] + 40]
            out[name] = {"answer": answer, "correct": meta["key"] in answer, "coverage": cov,
                         "near_needle": events}
    finally:
        planner.config = base
        s.config = base_mc
        s.close()
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from emserve.server.cli import DEMO_QUESTION, demo_depths
    from emserve.server.engine.config import EngineConfig
    from emserve.server.engine.vllm_engine import VLLMEngine
    from emserve.server.provision.models import resolve_model

    spec = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(spec.path)
    tok.model_max_length = 1 << 30
    engine = VLLMEngine(EngineConfig(model=str(spec.path), kv_cache_gib=2))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for seed, depth in zip(args.seeds, demo_depths(len(args.seeds)), strict=True):
            path = workdir / f"{spec.name}-{args.tokens}-s{seed}-d{depth}"
            meta = await ingest(engine, tok, path, seed, depth, args.tokens)
            res = await ask_variants(engine, tok, path, meta, args.variants)
            rows.append({**meta, "variants": res})
            print(f"seed {seed} depth {depth:.2f} key {meta['key']}: " + "  ".join(
                f"{n}={'OK' if r['correct'] else 'x'}({r['coverage']:.2f})" for n, r in res.items()), flush=True)
            for n, r in res.items():
                if not r["correct"]:
                    print(f"    {n}: {r['answer']!r} near {r['near_needle']}", flush=True)
    finally:
        await engine.close()
    summary = []
    for name in args.variants:
        k = sum(r["variants"][name]["correct"] for r in rows)
        lo, hi = wilson(k, len(rows))
        cov = sum(r["variants"][name]["coverage"] for r in rows) / max(len(rows), 1)
        full = sum(r["variants"][name]["coverage"] == 1.0 for r in rows)
        summary.append([name, f"{k}/{len(rows)}", f"[{lo:.2f}, {hi:.2f}]", f"{cov:.2f}", f"{full}/{len(rows)}"])
    headers = ["variant", "correct", "Wilson 95%", "mean key coverage", "key fully in window"]
    print()
    print(table(headers, summary))
    return {"machine": machine(), "model": spec.name, "tokens": args.tokens, "question": DEMO_QUESTION,
            "variants": args.variants, "summary": {"headers": headers, "rows": summary}, "documents": rows}


def main() -> None:
    from emserve.server.cli import _seed_list

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seeds", type=_seed_list, default=_seed_list("0-9"))
    ap.add_argument("--tokens", type=int, default=12000)
    ap.add_argument("--workdir", default="/tmp/emserve-demo-recall")
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON overrides (repeatable)")
    ap.add_argument("--out", default="demo_recall")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    args.variants = dict(DEFAULT_VARIANTS) if not args.variant else {
        v.split("=", 1)[0]: json.loads(v.split("=", 1)[1]) for v in args.variant}
    payload = asyncio.run(main_async(args))
    if not args.no_save:
        print("wrote", write_results(args.out, payload))


if __name__ == "__main__":
    main()

"""``emserve`` command line.

    emserve demo [--tokens N] [--depth F] [--model SPEC]   the main job, end to end, on the default model
    emserve prepare [--model SPEC]                        convert/verify the model (done by ``make setup``)

``demo`` streams a long public-domain text with a hidden pass key into a fresh session (engine +
segmenter + episodic memory), asks for the key, and prints the answer and the retrieval trace: which
events were in the attention window and why. (It runs the memory loop in-process; the gRPC server and
client arrive with the server issue.)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from transformers import AutoTokenizer

    from emserve.server.corpus import load_text
    from emserve.server.engine.base import SamplingSpec
    from emserve.server.engine.config import EngineConfig
    from emserve.server.models import resolve_model
    from emserve.server.session import MemoryConfig, Session

    spec = resolve_model(args.model, progress=lambda m: print(f"  {m}", file=sys.stderr))
    tok = AutoTokenizer.from_pretrained(spec.path)
    rng = random.Random(args.seed)
    key = str(rng.randint(10000, 99999))
    text = load_text("big")
    start = rng.randint(0, len(text) // 2)
    ids = tok(text[start : start + args.tokens * 6])["input_ids"][: args.tokens]
    needle = tok(f" The pass key is {key}. Remember it. {key} is the pass key. ")["input_ids"]
    at = int(len(ids) * args.depth)
    ids = ids[:at] + needle + ids[at:]
    question = tok("\n\nWhat is the pass key? The pass key is")["input_ids"]

    print(f"model      {spec.name} ({spec.path})")
    print(
        f"document   {len(ids)} tokens of public-domain text, pass key {key} hidden at token {at} "
        f"({100 * args.depth:.0f}% depth)"
    )
    if args.backend == "reference":
        from emserve.server.engine.reference import ReferenceEngine

        engine = ReferenceEngine(str(spec.path), dtype="bfloat16", log_dtype="bfloat16")
    else:
        from emserve.server.engine.vllm_engine import VLLMEngine

        t = time.perf_counter()
        engine = VLLMEngine(EngineConfig(model=str(spec.path), kv_cache_gib=2))
        print(f"engine     vLLM up in {time.perf_counter() - t:.1f} s")

    async def run() -> bool:
        workdir = args.session_dir or tempfile.mkdtemp(prefix="emserve-demo-")
        session = Session.create(workdir, engine, MemoryConfig())
        cfg = session.config
        print(
            f"session    {workdir}  (window: {cfg.n_init} sink + {cfg.n_mem} memory + {cfg.n_local} local, "
            f"chunks of {cfg.exc_block_size})"
        )
        t0 = time.perf_counter()
        step = 4 * cfg.exc_block_size
        for i in range(0, len(ids), step):
            done = await session.append(ids[i : i + step])
            dt = time.perf_counter() - t0
            print(
                f"\r  ingest   {done:>7}/{len(ids)} tokens  {done / dt:6.0f} tok/s  "
                f"{session.events_closed:>5} events",
                end="",
                flush=True,
            )
        print()
        t1 = time.perf_counter()
        answer = await session.ask(question, SamplingSpec(max_tokens=12, stop_token_ids=()))
        text_out = tok.decode(answer.token_ids)
        print(f"question   {str(tok.decode(question)).strip()!r}")
        print(f"answer     {text_out!r}  ({time.perf_counter() - t1:.2f} s)")
        ok = key in text_out
        print(f"correct    {ok}")
        _print_trace(answer.retrieval, tok, session, at, at + len(needle))
        session.close()
        await engine.close()
        return ok

    ok = asyncio.run(run())
    return 0 if ok or not args.strict else 1


def _print_trace(retrieval, tok, session, needle_start: int, needle_end: int) -> None:  # type: ignore[no-untyped-def]
    if retrieval is None:
        print("retrieval  none (the whole document fit in the window)")
        return
    layers = retrieval.layers
    hit = sum(any(e.start < needle_end and e.end > needle_start for e in lay.events) for lay in layers)
    print(f"retrieval  {len(layers)} layer lists; the pass key's event is in {hit} of them")
    lay = layers[len(layers) // 2]
    print(f"  layer {len(layers) // 2} (middle), {len(lay.events)} events in temporal order:")
    log = session.log
    for e in lay.events[:12]:
        preview = tok.decode(log.tokens(e.start, min(e.end, e.start + 12))).replace("\n", " ")
        mark = "  <- pass key" if e.start < needle_end and e.end > needle_start else ""
        print(f"    [{e.start:>6}, {e.end:>6})  {e.source:<10} score {e.score:8.3f}  {preview!r}{mark}")
    if len(lay.events) > 12:
        print(f"    ... {len(lay.events) - 12} more")


def _prepare(args: argparse.Namespace) -> int:
    from emserve.server.models import main as models_main

    return models_main(["prepare"] + (["--model", args.model] if args.model else []))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="emserve", description="streaming episodic-memory inference server")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="stream a long text with a hidden fact into a session, ask about it")
    d.add_argument("--model", default=None, help="smollm2-135m (default), qwen2.5-0.5b, or an HF folder")
    d.add_argument("--tokens", type=int, default=12000, help="document length in tokens")
    d.add_argument("--depth", type=float, default=0.5, help="where the pass key is hidden (0..1)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--backend", choices=["vllm", "reference"], default="vllm")
    d.add_argument("--session-dir", default=None)
    d.add_argument("--strict", action="store_true", help="exit 1 if the answer is wrong")
    d.set_defaults(fn=_demo)
    p = sub.add_parser("prepare", help="convert and verify the model")
    p.add_argument("--model", default=None)
    p.set_defaults(fn=_prepare)
    args = ap.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())

"""Where a session's ingestion time goes, per step, at any session length (issues #4, #6).

Opens a session directory (e.g. the 1M-token stream that ``bench/eval/eval.py --long-1m --keep`` leaves
under ``<workdir>/emserve-eval-*/sessions/``), or creates a fresh one, and appends ``--tokens`` more
tokens of ``big`` text through the real vLLM engine and the product's :class:`Session`, timing every
ingestion step by phase:

* ``step``: the whole ingestion step, host bookkeeping included;
* the phases of the session's step reports (``emserve.server.report.PHASES``): ``retrieve`` (query
  encoding, exact or HNSW search over every scoring layer, rescoring, contiguity buffer, the window
  layout), ``inject`` / ``compute`` / ``write`` (the vLLM step: K/V read into the cache, the forward
  pass, the new K/V appended to the log), ``segment`` (surprise threshold, boundary refinement),
  ``close`` (representatives, table append), ``index`` (index adds / graph catch-up), ``save``.

And how long the event loop stalls while the session ingests (a coroutine that wakes every 5 ms
records its gaps): in the server the same loop serves every other session and the health checks, so
a stall is what they wait.

Also: the time to open the session (what a server restart pays), the resident memory of this process
(indexes, table, caches; vLLM's engine core is a separate process), and disk bytes per token by part
(KV log, event table, HNSW indexes, the rest) against the raw bf16 KV of the tokens.

    .venv/bin/python -m bench.lab.session_profile --session DIR [--tokens 16384] [--out NAME]
    .venv/bin/python -m bench.lab.session_profile --create /tmp/s --prefix 32768 --tokens 16384   # --prefix >= 512

Prints a table; writes ``bench/results/<out>.json``. Appends to the session it opens (use a scratch copy
of anything you want unchanged).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

PHASES = ("step", "retrieve", "inject", "compute", "write", "segment", "close", "index", "save")
TICK_S = 0.005


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def stats(ts: list[float]) -> dict[str, float]:
    a = np.asarray(ts) * 1e3
    return {"n": len(ts), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "total_s": float(a.sum() / 1e3)}


async def profile(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from emserve.server.engine.config import EngineConfig
    from emserve.server.engine.vllm_engine import VLLMEngine
    from emserve.server.metrics import disk_parts
    from emserve.server.provision.corpus import load_text
    from emserve.server.provision.models import resolve_model
    from emserve.server.session import MemoryConfig, Session

    spec = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(spec.path)
    text = load_text("big")
    start = text.find(" ", int(len(text) * args.text_at)) + 1
    need = args.tokens + (args.prefix if args.create else 0)
    ids: list[int] = []
    pos = start
    while len(ids) < need:  # wrap around the text for long prefixes
        piece = text[pos: pos + need * 6]
        ids += tok(piece)["input_ids"]
        pos = 0
    ids = ids[:need]

    engine = VLLMEngine(EngineConfig(model=str(spec.path), kv_cache_gib=2))
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    if args.create:
        session = Session.create(args.create, engine, MemoryConfig(), score_device=args.score_device)
        path = Path(args.create)
        if args.prefix:
            print(f"ingesting a {args.prefix}-token prefix ...", flush=True)
            await session.append(ids[: args.prefix])
            ids = ids[args.prefix:]
        open_s = None
    else:
        path = Path(args.session)
        session = Session.open(path, engine, score_device=args.score_device)
        session.memory  # noqa: B018 - loads the event table and the indexes (what a first step would)
        open_s = time.perf_counter() - t0
    rss_open = rss_bytes()
    tokens0, events0 = session.num_tokens, len(session.memory.table)
    print(f"session at {tokens0} tokens, {events0} events"
          + (f"; opened in {open_s:.1f} s" if open_s is not None else ""), flush=True)

    times: dict[str, list[float]] = defaultdict(list)

    def record(steps: Any) -> None:  # the session's step reports: the one source of the phases
        for r in steps:
            times["step"].append(r.seconds)
            for k in PHASES[1:]:
                times[k].append(r.phases.get(k, 0.0))

    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:  # the event loop's responsiveness meanwhile
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            gaps.append(now - last - TICK_S)
            last = now

    tick = asyncio.ensure_future(ticker())
    t = time.perf_counter()
    every = 8 * session.config.retrieval.exc_block_size
    for a in range(0, len(ids), every):
        record((await session.append(ids[a: a + every])).steps)
        print(f"  +{len(times['step']) * session.config.retrieval.exc_block_size} tokens, "
              f"step p50 {np.median(times['step']) * 1e3:.0f} ms", flush=True)
    record((await session.flush()).steps)
    wall = time.perf_counter() - t
    done.set()
    await tick
    rss_end = rss_bytes()
    n_tok = session.num_tokens
    parts = disk_parts(path)
    info = engine.info
    raw_kv = 2 * info.num_layers * info.num_kv_heads * info.head_dim * 2  # K and V, bf16
    res = {
        "session": str(path), "model": spec.name, "tokens_before": tokens0, "events_before": events0,
        "tokens_after": n_tok, "events_after": len(session.memory.table), "appended": len(ids),
        "open_s": open_s, "wall_s": wall, "tok_s": len(ids) / wall,
        "uses_exact": bool(session.memory.index.uses_exact(len(session.memory.table))),
        "phases": {k: stats(times[k]) for k in PHASES},
        "loop_stall": {**stats(gaps), "max_ms": float(max(gaps, default=0.0) * 1e3)},
        "rss_bytes": {"engine_loaded": rss0, "session_open": rss_open, "end": rss_end},
        "disk_bytes": parts, "disk_bytes_per_token": {k: v / n_tok for k, v in parts.items()},
        "raw_kv_bytes_per_token": raw_kv,
        "disk_vs_raw_kv": sum(parts.values()) / n_tok / raw_kv,
    }
    session.close()
    await engine.close()
    return res


def main() -> int:
    from bench.eval.common import machine, sigterm_exits, table, write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--session", help="an existing session directory (appended to)")
    g.add_argument("--create", help="create a new session here")
    ap.add_argument("--prefix", type=int, default=0, help="--create: tokens ingested before profiling")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens appended while profiling")
    ap.add_argument("--text-at", type=float, default=0.5, help="where in the text the appended tokens start")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="session_profile")
    ap.add_argument("--score-device", default="auto",
                    help="retrieval scoring: auto, cpu, cuda, or torch-cpu (the GPU path on the CPU: its disk layout)")
    args = ap.parse_args()
    if args.tokens < 1 or args.prefix < 0:
        ap.error("--tokens must be >= 1 and --prefix >= 0")
    if args.create and args.prefix < 512:  # the session's KV log (and memory) exist after its first step
        ap.error("--create needs --prefix >= 512 (one ingestion step) before the profiled tokens")
    sigterm_exits()
    res = asyncio.run(profile(args))
    n = res["phases"]["step"]["total_s"]
    rows = [[k, s["n"], s["p50_ms"], s["p99_ms"], s["mean_ms"], f"{100 * s['total_s'] / n:.0f}%"]
            for k, s in res["phases"].items()]
    print(f"\n{res['tokens_before']} -> {res['tokens_after']} tokens ({res['events_after']} events, "
          f"{'exact' if res['uses_exact'] else 'HNSW'} search): {res['tok_s']:.0f} tok/s")
    print(table(["phase", "steps", "p50 ms", "p99 ms", "mean ms", "share"], rows))
    print("disk per token: " + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in res["disk_bytes_per_token"].items())
          + f"; {res['disk_vs_raw_kv']:.2f}x raw bf16 KV; RSS {res['rss_bytes']['end'] / 2**30:.2f} GiB"
          + (f"; open {res['open_s']:.1f} s" if res["open_s"] is not None else ""))
    st = res["loop_stall"]
    print(f"event loop stalls (beyond its 5 ms sleeps): p50 {st['p50_ms']:.1f} ms, p99 {st['p99_ms']:.0f} ms, "
          f"max {st['max_ms']:.0f} ms")
    print("wrote", write_results(args.out, {"machine": machine(), "command": " ".join(sys.argv), **res}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())

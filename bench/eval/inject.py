"""Injection benchmark: a step with N injected tokens + 64 new vs recomputing all N+64 tokens.

Both run through the same VLLMEngine on the same model, with the same outputs asked for (surprise
of every new token and the per-layer query summary), so the ratio isolates what injection saves.
The injected step re-rotates every key (the source positions differ from the window positions).

    .venv/bin/python -m bench.eval.inject [--model smollm2-135m] [--ns 1024,2048,4096,7168] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from bench.eval.common import machine, sigterm_exits, table, timeit, write_results
from emserve.retrieval.plan import Anchor, Segment, WindowPlan
from emserve.server.engine.base import StepOptions
from emserve.server.engine.config import EngineConfig
from emserve.server.engine.vllm_engine import VLLMEngine
from emserve.server.provision.corpus import load_text
from emserve.server.provision.models import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--ns", default="1024,2048,4096,7168")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shift", type=int, default=512, help="source positions are offset by this much")
    args = ap.parse_args()
    sigterm_exits()
    ns = [int(x) for x in args.ns.split(",")]
    spec = resolve_model(args.model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.path)
    ids = tok(load_text("big")[:200_000])["input_ids"]
    n_max = max(ns) + args.new + args.shift + 1
    assert len(ids) >= n_max, "text too short"
    cfg = EngineConfig(model=str(spec.path), dtype="bfloat16", log_dtype="bfloat16", kv_cache_gib=2)
    eng = VLLMEngine(cfg)
    opts = StepOptions(surprise=True, queries=True)
    work = Path(tempfile.mkdtemp(prefix="emserve-bench-inject-"))
    log = str(work / "log")

    async def prepare() -> None:
        # One prefill step writes the source log: tokens [0, shift + max(N)] at positions 0.. .
        await eng.step(WindowPlan.build(ids[: max(ns) + args.shift + 1], capture_log=log), options=opts)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(prepare())
    rows, records = [], []
    for n in ns:
        s = args.shift
        # window: [log[s, s+n-1) at positions 0..n-2 | anchor log[s+n-1] | 64 new] -> every key re-rotated by -s
        inj = WindowPlan.build(
            ids[s + n : s + n + args.new], [Segment(log, s, s + n - 1)], anchor=Anchor(log, s + n - 1)
        )
        full = WindowPlan.build(ids[s : s + n + args.new])
        t_inj, all_inj = timeit(lambda p=inj: loop.run_until_complete(eng.step(p, options=opts)), args.reps)
        t_full, all_full = timeit(lambda p=full: loop.run_until_complete(eng.step(p, options=opts)), args.reps)
        ratio = t_inj / t_full
        rows.append([n, args.new, f"{t_inj * 1e3:.0f}", f"{t_full * 1e3:.0f}", f"{100 * ratio:.1f}%"])
        records.append(
            {
                "n_injected": n,
                "n_new": args.new,
                "inject_s": all_inj,
                "recompute_s": all_full,
                "inject_median_s": t_inj,
                "recompute_median_s": t_full,
                "ratio": ratio,
            }
        )
        print(
            f"N={n}: inject {t_inj * 1e3:.0f} ms, recompute {t_full * 1e3:.0f} ms, ratio {100 * ratio:.1f}%", flush=True
        )
    loop.run_until_complete(eng.close())
    print()
    print(table(["N injected", "new", "inject ms", "recompute N+new ms", "ratio"], rows))
    out = write_results("inject", {"model": spec.name, "dtype": cfg.dtype, "machine": machine(), "rows": records})
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()

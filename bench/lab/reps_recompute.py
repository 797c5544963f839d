"""Representatives recomputed from the KV log: as fast as a session open needs, and equal to the stored ones.

On a GPU a session stores no representatives (``EpisodicMemory`` with a device scorer: they are derived
from the KV log); reopening it recomputes them for the device mirror, on the GPU. This measures how long
that takes per event and per token, for the scoring layers (what the device path computes) and for all
layers (what a CPU writer computes when it takes over such a session), on each ``--devices``:

* ``--session DIR``: a real session (e.g. the 1M-token one ``bench/eval/eval.py --long-1m --keep`` leaves),
  read-only; the recomputed rows are compared with the rows the session stored when its events closed
  (same function, same log: on the CPU they must be equal bit for bit);
* ``--synthetic TOKENS``: a fresh KV log of random bf16 keys in the default model's layout (30 layers x
  3 kv heads x 64) and events of the real size distribution's mean (~11 tokens), in a temp dir: for a
  machine without a session (the GPU machine); rows compared between the devices instead.

    .venv/bin/python -m bench.lab.reps_recompute --session DIR [--events 8192] [--at 0.5]
    python3 -m bench.lab.reps_recompute --synthetic 200000 --devices cpu,cuda

Prints a table; writes ``bench/results/<out>.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.eval.common import machine, table, write_results
from emserve.retrieval.kvlog import KVLayout, KVLog
from emserve.retrieval.memory import RECOMPUTE_BATCH
from emserve.retrieval.representatives import event_representatives
from emserve.server.engine.rope import RopeSpec

LAYERS, KV_HEADS, HEAD_DIM, HEADS, THETA, SCORE = 30, 3, 64, 9, 100000.0, 20  # SmolLM2-135M


def synthetic(tokens: int, path: Path) -> tuple[KVLog, np.ndarray]:
    log = KVLog.create(path, KVLayout(LAYERS, KV_HEADS, HEAD_DIM, "bfloat16"))
    g = torch.Generator().manual_seed(0)
    chunk = 16384
    for a in range(0, tokens, chunk):
        c = min(chunk, tokens - a)
        keys = [torch.randn(c, KV_HEADS, HEAD_DIM, generator=g).to(torch.bfloat16) for _ in range(LAYERS)]
        log.append(np.zeros(c, np.int64), np.arange(a, a + c), keys, keys)
    rng = np.random.default_rng(1)
    sizes = rng.integers(4, 19, tokens // 11)  # mean 11 tokens, as the real events
    ends = 128 + np.cumsum(sizes)
    ends = ends[ends <= tokens]
    return log, np.stack([ends - sizes[: ends.shape[0]], ends], 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--session", help="a session's data directory (holds log/)")
    src.add_argument("--synthetic", type=int, help="tokens of a random KV log made for the run")
    ap.add_argument("--events", type=int, default=8192, help="events recomputed (--session)")
    ap.add_argument("--at", type=float, default=0.5, help="where in the session they start (fraction)")
    ap.add_argument("--devices", default="cpu")
    ap.add_argument("--model", default="smollm2-135m", help="the session's model")
    ap.add_argument("--out", default="reps_recompute")
    args = ap.parse_args()
    stored: Any = None
    if args.session:
        from transformers import AutoConfig

        from bench.eval.common import session_retrieval_config
        from emserve.retrieval.events import EventTable
        from emserve.server.provision.models import resolve_model

        logdir = Path(args.session) / "log"
        log = KVLog.open(logdir)
        stored = EventTable.open(logdir)
        cfg = session_retrieval_config(logdir)
        hf = AutoConfig.from_pretrained(resolve_model(args.model).path)
        rope = RopeSpec.from_hf_config(hf)
        heads, topk, proxy = hf.num_attention_heads, cfg.repr_topk, cfg.repr_proxy
        score = list(cfg.score_layers(stored.num_layers))
        n = len(stored)
        a = int(args.at * n)
        b = min(n, a + args.events)
        bounds = np.stack([stored.starts[a:b], stored.ends[a:b]], 1)
        total = (n, int(stored.ends[-1]))
    else:
        t0 = time.perf_counter()
        log, bounds = synthetic(args.synthetic, Path(tempfile.mkdtemp(prefix="emserve-reps-")))
        print(f"synthetic log of {args.synthetic:,} tokens, {bounds.shape[0]:,} events in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        inv = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
        rope = RopeSpec(inv_freq=inv, rot_dim=HEAD_DIM, head_dim=HEAD_DIM)
        heads, topk, proxy, score = HEADS, 4, "topk", list(range(SCORE))
        a, b = 0, bounds.shape[0]
        total = (b, int(bounds[-1, 1]))
    tokens = int((bounds[:, 1] - bounds[:, 0]).sum())
    out: dict[str, Any] = {"machine": machine(), "source": args.session or f"synthetic {args.synthetic}",
                           "events_total": total[0], "tokens_total": total[1], "events": b - a, "tokens": tokens,
                           "runs": {}}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    rows = []
    first: dict[str, np.ndarray] = {}
    for device in args.devices.split(","):
        for name, layers in (("scoring layers (device open)", score), ("all layers (CPU takeover)", None)):
            t0 = time.perf_counter()
            worst = 0.0
            parts = []
            for lo in range(0, b - a, RECOMPUTE_BATCH):
                hi = min(b - a, lo + RECOMPUTE_BATCH)
                reps = event_representatives(log, [tuple(r) for r in bounds[lo:hi].tolist()], num_heads=heads,
                                             rotate=rope.rotate, repr_topk=topk, proxy=proxy, layers=layers,
                                             device=None if device == "cpu" else device)
                if stored is not None:
                    for j, lay in enumerate(score if layers is not None else range(stored.num_layers)):
                        if lay in stored.layers:  # a session's table stores the layers its retrieval reads
                            worst = max(worst, float(np.abs(reps[:, j] - stored.reps(lay)[a + lo:a + hi]).max()))
                elif layers is not None:
                    parts.append(reps)
            dt = time.perf_counter() - t0
            if parts:  # synthetic: the scoring layers' rows against the first device's
                got = np.concatenate(parts)
                ref = first.setdefault(name, got)
                worst = float(np.abs(got - ref).max())
            per_event = dt / (b - a)
            out["runs"][f"{device} {name}"] = {"seconds": dt, "us_per_event": per_event * 1e6,
                                              "us_per_token": dt / tokens * 1e6,
                                              "whole_session_s": per_event * total[0], "max_abs_diff": worst}
            rows.append([device, name, f"{b - a:,}", f"{dt:.2f}", f"{per_event * 1e6:.0f}",
                         f"{dt / tokens * 1e6:.2f}", f"{per_event * total[0]:.1f}", f"{worst:.2e}"])
    ref_name = "stored rows" if stored is not None else "first device"
    print(table(["device", "layers", "events", "s", "us/event", "us/token", f"all {total[0]:,} ev. s",
                 f"max |diff| vs {ref_name}"], rows))
    print(f"wrote {write_results(args.out, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

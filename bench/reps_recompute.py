"""Representatives recomputed from the KV log: as fast as a session open needs, and equal to the stored ones.

On a GPU a session stores no representatives (``EpisodicMemory`` with a device scorer: they are derived
from the KV log); reopening it recomputes them for the device mirror. This measures, on a real session
(e.g. the 1M-token one ``bench/eval.py --long-1m --keep`` leaves), how long that takes per event and per
token on this machine, for the scoring layers (what the device path computes) and for all layers (what a
CPU writer computes when it takes over such a session), and checks that the recomputed rows equal the
rows the session stored when its events closed (same function, same log: they must, bit for bit up to
float rounding of the de-rotation).

    .venv/bin/python bench/reps_recompute.py --session DIR [--events 8192] [--at 0.5]

Read-only: opens the log and the table for reading. Prints a table; writes ``bench/results/<out>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, session_retrieval_config, table, write_results  # noqa: E402

from emserve.retrieval.events import EventTable  # noqa: E402
from emserve.retrieval.kvlog import KVLog  # noqa: E402
from emserve.retrieval.memory import RECOMPUTE_BATCH  # noqa: E402
from emserve.retrieval.representatives import event_representatives  # noqa: E402
from emserve.server.engine.rope import RopeSpec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--session", required=True, help="a session's data directory (holds log/)")
    ap.add_argument("--events", type=int, default=8192, help="events recomputed per layer set")
    ap.add_argument("--at", type=float, default=0.5, help="where in the session they start (fraction)")
    ap.add_argument("--model", default="smollm2-135m", help="the session's model")
    ap.add_argument("--out", default="reps_recompute")
    args = ap.parse_args()
    logdir = Path(args.session) / "log"
    log = KVLog.open(logdir)
    tbl = EventTable.open(logdir)
    cfg = session_retrieval_config(logdir)
    from transformers import AutoConfig

    from emserve.server.models import resolve_model

    hf = AutoConfig.from_pretrained(resolve_model(args.model).path)
    rope = RopeSpec.from_hf_config(hf)
    n = len(tbl)
    a = int(args.at * n)
    b = min(n, a + args.events)
    bounds = np.stack([tbl.starts[a:b], tbl.ends[a:b]], 1)
    tokens = int((bounds[:, 1] - bounds[:, 0]).sum())
    score = list(cfg.score_layers(tbl.num_layers))
    out: dict[str, Any] = {"machine": machine(), "session": args.session, "events_total": n,
                           "tokens_total": int(tbl.ends[-1]), "events": b - a, "tokens": tokens, "runs": {}}
    rows = []
    for name, layers in (("scoring layers (device open)", score), ("all layers (CPU takeover)", None)):
        t0 = time.perf_counter()
        worst = 0.0
        for lo in range(0, b - a, RECOMPUTE_BATCH):
            hi = min(b - a, lo + RECOMPUTE_BATCH)
            reps = event_representatives(log, [tuple(r) for r in bounds[lo:hi].tolist()],
                                         num_heads=hf.num_attention_heads, rotate=rope.rotate,
                                         repr_topk=cfg.repr_topk, proxy=cfg.repr_proxy, layers=layers)
            for j, lay in enumerate(score if layers is not None else range(tbl.num_layers)):
                stored = tbl.reps(lay)[a + lo:a + hi]
                worst = max(worst, float(np.abs(reps[:, j] - stored).max()))
        dt = time.perf_counter() - t0
        per_event = dt / (b - a)
        est = per_event * n
        out["runs"][name] = {"seconds": dt, "us_per_event": per_event * 1e6, "us_per_token": dt / tokens * 1e6,
                             "whole_session_s": est, "max_abs_diff_vs_stored": worst}
        rows.append([name, f"{b - a:,}", f"{dt:.1f}", f"{per_event * 1e6:.0f}", f"{dt / tokens * 1e6:.1f}",
                     f"{est:.0f}", f"{worst:.2e}"])
    print(table(["layers", "events", "s", "us/event", "us/token", f"whole session ({n:,} ev.) s",
                 "max |recomputed - stored|"], rows))
    print(f"wrote {write_results(args.out, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cold candidate reads from an int8 event table, a file per layer (format 3) vs one record per event
(format 4), at the size of a long session (#19).

A rescoring at 2M tokens reads ~1,500 candidates' rows in all 20 scoring layers, scattered over a table
far larger than the page cache a 4 GiB cgroup leaves. With a file per layer each candidate costs a page
in each layer's file (20 scattered pages for ~16 KiB of rows); with one record per event it is one run of
~4 pages. This builds the two layouts of the same table (``--events`` events of the product's row shape,
random values: the read cost does not depend on them) through ``EventTable``, then reads ``--candidates``
random events' rows in every layer (``prefetch`` then ``reps_of``, as ``Retriever`` does), cold: before
each read the table's pages are dropped from the page cache (``POSIX_FADV_DONTNEED``). The layouts
alternate, each pair on the same fresh draw; the ratio is taken pair by pair.

It also times what a record per event costs the scans (exact search below 16k events and the token graph's
adds read a block of events' rows layer by layer, now a strided view of the block's records): the first
``--scan-events`` events' rows in every layer, in blocks of 8192 as ``Retriever`` reads them, warm (the
pages cached), alternating the layouts.

    .venv/bin/python -m bench.lab.table_layout [--events 190000] [--trials 8] [--out table_layout]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.eval.common import machine, table, write_results
from bench.lab.read_prefetch import drop_cache
from emserve.retrieval.events import EventTable

LAYERS, VECTORS, KV_HEADS, HEAD_DIM = 20, 4, 3, 64  # SmolLM2-135M's scoring layers and a `tokens` row
DIM, GROUPS = VECTORS * KV_HEADS * HEAD_DIM, VECTORS * KV_HEADS
LAYOUTS = {"layer": False, "event": True}
"""Layout name -> ``EventTable.create``'s ``event_major``."""


def build(folder: Path, events: int, event_major: bool, seed: int, block: int = 4096) -> EventTable:
    t = EventTable.create(folder, 30, DIM, vectors=VECTORS, layers=range(LAYERS), dtype="int8", groups=GROUPS,
                          event_major=event_major)
    rng = np.random.default_rng(seed)
    for a in range(0, events, block):
        e = min(block, events - a)
        bounds = np.stack([np.arange(a, a + e) * 11, np.arange(a, a + e) * 11 + 11], 1)
        t.append(bounds, rng.standard_normal((e, LAYERS, DIM), dtype=np.float32))
    return t


def read(folder: Path, ids: np.ndarray) -> float:
    drop_cache(folder)
    t0 = time.perf_counter()
    t = EventTable.open(folder)
    t.prefetch(t.layers, ids)
    for layer in t.layers:
        t.reps_of(layer, ids)
    t.close()
    return time.perf_counter() - t0


def scan(folder: Path, events: int, block: int = 8192) -> float:
    t = EventTable.open(folder)
    for layer in t.layers:  # warm: the pages cached before the timed pass
        t.rows(layer, 0, events)
    t0 = time.perf_counter()
    for a in range(0, events, block):
        for layer in t.layers:
            t.rows(layer, a, min(events, a + block))
    took = time.perf_counter() - t0
    t.close()
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=190_000, help="events in the table (~2M tokens of SmolLM2)")
    ap.add_argument("--candidates", type=int, default=1500, help="events per read (a rescoring's candidates)")
    ap.add_argument("--trials", type=int, default=8, help="pairs")
    ap.add_argument("--scan-events", type=int, default=16384, help="events of the warm scan (exact search's most)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/table-layout")
    ap.add_argument("--keep", action="store_true", help="keep the two tables (reused by the next run)")
    ap.add_argument("--out", default="table_layout")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    folders = {name: work / name for name in LAYOUTS}
    for name, em in LAYOUTS.items():
        f = folders[name]
        if f.exists():
            t = EventTable.open(f)
            if len(t) == args.events and t.event_major == em:
                t.close()
                continue
            t.close()
            shutil.rmtree(f)
        t0 = time.perf_counter()
        build(f, args.events, em, args.seed).close()
        print(f"built the {name}-major table of {args.events} events in {time.perf_counter() - t0:.0f} s", flush=True)
    sizes = {}
    for name, f in folders.items():
        with EventTable.open(f) as t:
            sizes[name] = t.disk_bytes()
    rng = np.random.default_rng(args.seed + 1)
    trials: list[dict[str, Any]] = []
    for i in range(args.trials):
        ids = np.sort(rng.choice(args.events, args.candidates, replace=False))
        row: dict[str, Any] = {"trial": i}
        for name in LAYOUTS if i % 2 == 0 else reversed(LAYOUTS):
            row[f"{name}_s"] = read(folders[name], ids)
        trials.append(row)
        print(f"trial {i}: layer {row['layer_s']:.3f} s, event {row['event_s']:.3f} s", flush=True)
    for i in range(args.trials):
        for name in LAYOUTS if i % 2 == 0 else reversed(LAYOUTS):
            trials[i][f"scan_{name}_s"] = scan(folders[name], min(args.scan_events, args.events))
    lay = [t["layer_s"] for t in trials]
    ev = [t["event_s"] for t in trials]
    ratios = [a / b for a, b in zip(lay, ev, strict=True)]
    summary = {"layer_p50_s": statistics.median(lay), "event_p50_s": statistics.median(ev),
               "ratio_p50": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    scans = [t["scan_event_s"] / t["scan_layer_s"] for t in trials]
    summary.update(scan_layer_p50_s=statistics.median(t["scan_layer_s"] for t in trials),
                   scan_event_p50_s=statistics.median(t["scan_event_s"] for t in trials),
                   scan_ratio_p50=statistics.median(scans), scan_ratio_min=min(scans), scan_ratio_max=max(scans))
    print(table(["events", "candidates", "pairs", "file per layer p50 s", "record per event p50 s", "ratio p50",
                 "ratio min", "ratio max"],
                [[args.events, args.candidates, len(trials), summary["layer_p50_s"], summary["event_p50_s"],
                  summary["ratio_p50"], summary["ratio_min"], summary["ratio_max"]]]))
    print(table(["warm scan events", "pairs", "file per layer p50 s", "record per event p50 s",
                 "event / layer p50", "min", "max"],
                [[min(args.scan_events, args.events), len(trials), summary["scan_layer_p50_s"],
                  summary["scan_event_p50_s"], summary["scan_ratio_p50"], summary["scan_ratio_min"],
                  summary["scan_ratio_max"]]]))
    out = write_results(args.out, {
        "name": args.out, "command": " ".join(["python -m bench.lab.table_layout", *(argv or sys.argv[1:])]),
        "machine": machine(), "config": vars(args), "disk_bytes": sizes, "trials": trials, "summary": summary})
    print("wrote", out)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cold scattered reads of a long session, page by page vs asked for first (#19).

Past the page cache, an ingestion step reads a retrieved window's K/V (a few KiB per event, layer and
K or V, from all over the log) and a rescoring reads its candidates' table rows (one row per event and
scoring layer). Each first touch of a page is a fault that reads that page and waits. ``KVLog.prefetch``
and ``EventTable.prefetch`` (``retrieval/mapping.py``, ``Mapping.willneed``: ``MADV_WILLNEED`` on the
merged ranges) ask for every page before the first read, so the kernel queues them all at once.

This measures both reads on a kept session, cold: before each trial the pages of the session's log and
table files are dropped from the page cache (``POSIX_FADV_DONTNEED``; clean pages only, so nothing is
lost, but a server using the session at the same time would be slowed). Per trial, random real events:

* ``kv``: ``--events`` events' K and V in every layer and their positions, as the connector's gathers
  read them (one reader, layer by layer), with or without ``KVLog.prefetch`` first;
* ``table``: ``--candidates`` events' rows in every stored layer (``reps_of``), with or without
  ``EventTable.prefetch`` first.

The two arms alternate, each trial on fresh random events (the same draw for both arms of a pair), and the
ratio is taken pair by pair.

    .venv/bin/python -m bench.lab.read_prefetch --session DIR/data-XXXX [--trials 8] [--out read_prefetch]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.eval.common import machine, table, write_results


def drop_cache(folder: Path) -> None:
    """Drop the clean cached pages of every file in ``folder`` (the kernel may keep pages still mapped)."""
    for f in folder.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def kv_read(log_dir: Path, ranges: list[tuple[int, int]], prefetch: bool) -> float:
    from emserve.retrieval.kvlog import KVLog

    t0 = time.perf_counter()
    log = KVLog.open(log_dir)
    if prefetch:
        log.prefetch(ranges)
    for layer in range(log.layout.num_layers):
        log.gather(layer, ranges)
    log.close()
    return time.perf_counter() - t0


def table_read(log_dir: Path, ids: np.ndarray, prefetch: bool) -> float:
    from emserve.retrieval.events import EventTable

    t0 = time.perf_counter()
    table_ = EventTable.open(log_dir)
    if prefetch:
        table_.prefetch(table_.layers, ids)
    for layer in table_.layers:
        table_.reps_of(layer, ids)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--session", required=True, help="a kept session's data-* folder")
    ap.add_argument("--trials", type=int, default=8, help="pairs per read kind")
    ap.add_argument("--events", type=int, default=90, help="events in a window's KV read")
    ap.add_argument("--candidates", type=int, default=1500, help="events in a rescoring's table read")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="read_prefetch")
    args = ap.parse_args(argv)
    from emserve.retrieval.events import EventTable

    log_dir = Path(args.session) / "log"
    events = EventTable.open(log_dir)
    n = events.reps_count
    bounds = np.stack([events.starts[:n], events.ends[:n]], 1)
    tokens = int(bounds[-1, 1])
    rng = np.random.default_rng(args.seed)
    trials: list[dict[str, Any]] = []
    for i in range(args.trials):
        picked = np.sort(rng.choice(n, args.events, replace=False))
        ranges = [(int(s), int(e)) for s, e in bounds[picked]]
        ids = np.sort(rng.choice(n, args.candidates, replace=False))
        row: dict[str, Any] = {"trial": i}
        for kind in ("kv", "table"):
            for prefetch in (False, True) if i % 2 == 0 else (True, False):
                drop_cache(log_dir)
                took = kv_read(log_dir, ranges, prefetch) if kind == "kv" else table_read(log_dir, ids, prefetch)
                row[f"{kind}_{'prefetch' if prefetch else 'serial'}_s"] = took
        trials.append(row)
        print(f"trial {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "trial"), flush=True)
    rows = []
    summary: dict[str, Any] = {}
    for kind in ("kv", "table"):
        ser = [t[f"{kind}_serial_s"] for t in trials]
        pre = [t[f"{kind}_prefetch_s"] for t in trials]
        ratios = [a / b for a, b in zip(ser, pre, strict=True)]
        summary[kind] = {"serial_p50_s": statistics.median(ser), "prefetch_p50_s": statistics.median(pre),
                         "ratio_p50": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
        rows.append([kind, len(trials), statistics.median(ser), statistics.median(pre), statistics.median(ratios),
                     min(ratios), max(ratios)])
    print(table(["read", "pairs", "serial p50 s", "prefetch p50 s", "ratio p50", "ratio min", "ratio max"], rows))
    out = write_results(args.out, {
        "name": args.out, "command": " ".join(["python -m bench.lab.read_prefetch", *(argv or sys.argv[1:])]),
        "machine": machine(), "session": str(args.session), "tokens": tokens, "events": n,
        "table_dtype": events.dtype, "config": vars(args), "trials": trials, "summary": summary})
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

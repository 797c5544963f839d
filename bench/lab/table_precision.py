"""What a coarser event table would change in a question's window: int8 or bfloat16 representatives (#19).

A session's event table holds float32 representatives (5.5 KiB per token with the defaults: a quarter of
the raw bf16 KV), which keeps a session's disk above the 1.1x goal of #19. This copies a kept recall run's
sessions with every stored representative rounded as a coarser table would store it, then asks both with
``bench/lab/recall_variants.py`` and compares the answers' windows question by question:

* ``int8``: per vector and kv head (64 values) a scale ``max |x| / 127`` and ``round(x / scale)``
  (16 B of scales and 256 B of codes per 4-vector, 3-head row instead of 3 KiB: 0.27x);
* ``bf16``: float32 rounded to bfloat16 (0.5x).

The KV log, the graphs and the session files are hard links (asking a session appends nothing to them, and a
graph is saved by replacing its file); the table's representative files are rounded copies. Only the
questions' scoring sees the rounding: the sessions were ingested with float32 representatives (ingestion
steps' retrieval, and so the stored KV, would differ slightly with a coarser table).

    .venv/bin/python -m bench.lab.table_precision --from RUN.json --mode int8 --out-dir /tmp/q8
    .venv/bin/python -m bench.lab.recall_variants --from RUN.json --out a
    .venv/bin/python -m bench.lab.recall_variants --from /tmp/q8/RUN-int8.json --out b
    .venv/bin/python -m bench.lab.table_precision --compare bench/results/a.json bench/results/b.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emserve.retrieval.events import dequantize_rows, quantize_rows

MODES = ("int8", "bf16")
HEAD_DIM = 64


def rounded(x: np.ndarray, mode: str, head_dim: int = HEAD_DIM) -> np.ndarray:
    """``x [n, dim]`` float32 as a ``mode`` table would give it back (``dim`` a multiple of ``head_dim``)."""
    if mode == "bf16":
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).float().numpy()
    if mode != "int8":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    flat = np.asarray(x, np.float32).reshape(x.shape[0], -1)
    return dequantize_rows(*quantize_rows(flat, flat.shape[1] // head_dim)).reshape(x.shape)  # an int8 table's


def copy_session(src: Path, dst: Path, mode: str) -> int:
    """``src``'s session folder as ``dst``: representatives rounded per kv head (the log's ``head_dim``),
    everything else hard-linked (a graph, built on the float32 table, only proposes candidates: they are
    scored on the rounded table). Returns the representative files rounded."""
    head_dim = int(json.loads((src / "log" / "layout.json").read_text())["head_dim"])
    n = 0
    for root, _dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            s, d = Path(root) / f, dst / rel / f
            if f.startswith("reps_") and f.endswith(".f32"):
                a = np.fromfile(s, dtype=np.float32)
                rows = a.reshape(-1, head_dim)  # a row is whole kv heads
                rounded(rows, mode, head_dim).tofile(d)
                n += 1
            else:
                os.link(s, d)
    return n


def copy_run(source: Path, mode: str, out_dir: Path) -> Path:
    src = json.loads(source.read_text())
    if "workdir" not in src:
        raise SystemExit(f"{source}: no kept work folder (run bench/eval/recall.py with --keep)")
    work = out_dir / f"work-{mode}"
    if work.exists():
        shutil.rmtree(work)
    sessions = sorted(glob.glob(f"{src['workdir']}/sessions/*"))
    for s in sessions:
        for data in sorted(Path(s).glob("data-*")):
            files = copy_session(data, work / "sessions" / Path(s).name / data.name, mode)
            print(f"{Path(s).name}: {files} representative files rounded to {mode}", flush=True)
        for f in Path(s).iterdir():
            if f.is_file():
                os.link(f, work / "sessions" / Path(s).name / f.name)
    out = out_dir / f"{source.stem}-{mode}.json"
    out.write_text(json.dumps({**src, "workdir": str(work), "table_precision": {"mode": mode, "from": str(source)}}))
    return out


def compare(a_path: Path, b_path: Path) -> dict[str, Any]:
    """Question by question (today's defaults in both): the same window, the same answer, right in each."""
    a = {(x["hid"], x["qid"]): x for x in json.loads(a_path.read_text())["answers"] if x["variant"] == "defaults"}
    b = {(x["hid"], x["qid"]): x for x in json.loads(b_path.read_text())["answers"] if x["variant"] == "defaults"}
    keys = sorted(set(a) & set(b))
    out = {"n": len(keys), "same_window": sum(a[k]["window"] == b[k]["window"] for k in keys),
           "same_answer": sum(a[k]["answer"] == b[k]["answer"] for k in keys),
           "right_a": sum(a[k]["correct"] for k in keys), "right_b": sum(b[k]["correct"] for k in keys),
           "in_window_a": sum(a[k]["in_window"] for k in keys), "in_window_b": sum(b[k]["in_window"] for k in keys)}
    print(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", help="results file of a bench/eval/recall.py --keep run")
    ap.add_argument("--mode", choices=MODES, default="int8")
    ap.add_argument("--out-dir", default="/tmp/table_precision")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two recall_variants results files")
    args = ap.parse_args(argv)
    if args.compare:
        compare(Path(args.compare[0]), Path(args.compare[1]))
        return 0
    if not args.source:
        ap.error("--from or --compare")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    print(f"wrote {copy_run(Path(args.source), args.mode, Path(args.out_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers for benchmarks: machine/version record, table printing, results files."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
"""The repository: ``bench`` is importable from here."""
RESULTS = ROOT / "bench" / "results"


def module_command(module: str) -> tuple[list[str], dict[str, str]]:
    """The argv prefix and environment that run ``python -m <module>`` of this repository from any
    working directory (a benchmark that starts itself, or another, in a fresh process)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-m", module], env


QUESTION_ONLY = ("interleave_stats",)
"""Settings without the ``question_`` prefix that only a question reads (ingestion ranks by the mean and
never interleaves): a kept session can be asked with other values without ingesting again."""


def is_question_setting(name: str) -> bool:
    return name.startswith("question_") or name in QUESTION_ONLY


def question_defaults() -> dict[str, Any]:
    """Today's defaults of the question settings (:func:`is_question_setting`): what a question-window
    variant overrides (a kept session may have been saved with others)."""
    from emserve.server.session import SETTINGS, MemoryConfig

    return {name: MemoryConfig().setting(name) for name in SETTINGS if is_question_setting(name)}


def machine() -> dict[str, Any]:
    flags: list[str] = []
    model_name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                fl = line.split(":", 1)[1].split()
                flags = sorted(f for f in fl if f.startswith(("avx", "amx", "fma", "sse4")))
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    versions = {}
    for mod in ("torch", "vllm", "transformers", "numpy", "hnswlib"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            versions[mod] = None
    return {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "cpu_flags": flags,
        "python": platform.python_version(),
        "versions": versions,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials (95% by default); (0, 1) when n is 0."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def timeit(fn: Callable[[], Any], reps: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


async def ingest_all(session: Any, ids: Sequence[int]) -> float:
    """Append ``ids`` to an in-process ``Session`` and flush its pending tail; returns seconds."""
    t0 = time.perf_counter()
    await session.append(list(ids))
    await session.flush()
    return time.perf_counter() - t0


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def session_retrieval_config(log: Path, max_window: int = 8192) -> Any:
    """The ``RetrievalConfig`` of the session whose KV log folder is ``log`` (its saved ``MemoryConfig``;
    the defaults when it has none)."""
    from emserve.server.session import SESSION_FILE, MemoryConfig, read_state

    folder = Path(log).parent
    mem = read_state(folder).config if (folder / SESSION_FILE).exists() else MemoryConfig()
    return mem.bound(max_window).retrieval


def process_memory() -> dict[str, int]:
    """This process's resident memory in bytes (``/proc/self/status``): ``VmRSS``, ``RssAnon`` (anonymous:
    heaps, graphs) and ``RssFile`` (mapped files)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0]) * 1024
    return out


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(payload, indent=1, default=str))
    return out


def report_results(name: str, res: dict[str, Any],
                   summarize: Callable[[dict[str, Any]], tuple[list[str], list[list[Any]]]]) -> Path:
    """``res`` with its summary table (``summarize(res)``: headers and rows) stored under ``summary`` and
    printed, written as ``bench/results/<name>.json`` (:func:`write_results`); the path."""
    headers, rows = summarize(res)
    res["summary"] = {"headers": headers, "rows": rows}
    print()
    print(table(headers, rows))
    out = write_results(name, res)
    print(f"wrote {out}")
    return out


def sigterm_exits() -> None:
    """Turn SIGTERM into ``SystemExit`` so that ``finally`` blocks and exit handlers run: a benchmark
    that owns an in-process vLLM engine and dies of a plain SIGTERM leaves the engine-core processes
    running (they keep the CPU busy until killed)."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def long_questions(ask: Sequence[Any], chunk: Sequence[Any]) -> list[Any]:
    """64-token questions from the capture's real queries (the length of ``question_query_tokens``): each
    of the 8 questions' 4 tokens last, after 28 tokens of the other questions and the 32 ingestion
    summaries (so the 8 share 60 of their 64 tokens)."""
    import numpy as np

    others = np.concatenate(list(ask))  # the 32 question tokens
    return [np.concatenate([np.concatenate([others[:4 * i], others[4 * i + 4:]])[:28], np.stack(list(chunk)), q])
            for i, q in enumerate(ask)]

"""A session directory's files: their names, the statistics read from them alone, the crash check, and
the JSON codec of the saved state (``session.json``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emserve.retrieval.errors import EmserveError

SESSION_FILE = "session.json"
SURPRISE_FILE = "surprise.f32"
QUERIES_FILE = "queries.npz"  # the last step's query summary (lagged queries for the next chunk), see _save_queries
LEGACY_QUERIES_FILE = "queries.npy"  # sessions saved before queries.npz: the summary alone
LOG_DIR = "log"
EXCHANGES_FILE = "exchanges.json"


class SessionError(EmserveError):
    """A session is missing, corrupt, or used against its configuration."""


@dataclass(frozen=True)
class SessionStats:
    """A session's size, read from its files (cheap; no engine involved)."""

    num_tokens: int
    num_events: int
    event_tokens: int
    disk_bytes: int
    surprise_mean: float
    surprise_std: float
    surprise_min: float
    surprise_max: float


def session_stats(path: str | os.PathLike[str]) -> SessionStats:
    """Statistics of the session directory ``path`` from its files alone (open or not)."""
    from emserve.retrieval.events import RECORDS_FILE

    p = Path(path)
    sur = p / SURPRISE_FILE
    n = sur.stat().st_size // 4 if sur.exists() else 0
    records = p / LOG_DIR / RECORDS_FILE
    rows = records.stat().st_size // 16 if records.exists() else 0
    bounds = np.fromfile(records, dtype=np.int64, count=2 * rows).reshape(-1, 2) if rows else np.zeros((0, 2))
    disk = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    values = np.fromfile(sur, dtype=np.float32, count=n) if n else np.zeros(0, np.float32)
    values = values[np.isfinite(values)]
    if values.size:
        mean, std = float(values.mean()), float(values.std())
        lo, hi = float(values.min()), float(values.max())
    else:
        mean = std = lo = hi = 0.0
    return SessionStats(n, int(bounds.shape[0]), int((bounds[:, 1] - bounds[:, 0]).sum()), disk, mean, std, lo, hi)


def write_json(path: Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON atomically (a reader or a crash sees the old file or the new)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def needs_recovery(path: str | os.PathLike[str]) -> bool:
    """Whether the session directory ``path`` holds a step its saved state does not (a crash between a
    step's files and its state): :meth:`Session.open` repairs it (replays the segmenter over the
    surprise, or drops K/V whose surprise never arrived), and until then its files tell stale statistics."""
    from emserve.retrieval.kvlog import TOKENS_FILE

    p = Path(path)
    try:
        seen = int(json.loads((p / SESSION_FILE).read_text())["segmenter"]["seen"])
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return False  # not a session (yet): nothing to replay
    sur = p / SURPRISE_FILE
    n_sur = sur.stat().st_size // 4 if sur.exists() else 0
    tokens = p / LOG_DIR / TOKENS_FILE
    n_log = tokens.stat().st_size // 4 if tokens.exists() else 0
    return n_sur != seen or n_log != n_sur


def to_json(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def from_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    return obj

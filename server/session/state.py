"""A session directory's files: their names, the statistics read from them alone, the crash check, and
the saved state (``session.json``): its one reader (:func:`read_state`), its writer (:func:`state_dict`)
and their JSON codec."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emserve.retrieval.errors import EmserveError
from emserve.server.session.config import MemoryConfig

SESSION_FILE = "session.json"
SURPRISE_FILE = "surprise.f32"
QUERIES_FILE = "queries.npz"  # the last step's query summary (lagged queries for the next chunk), see _save_queries
LEGACY_QUERIES_FILE = "queries.npy"  # sessions saved before queries.npz: the summary alone
LOG_DIR = "log"
EXCHANGES_FILE = "exchanges.json"


STATE_VERSION = 3
"""The layout of ``session.json``: ``{"version", "config", "segmenter", "contiguity"?}``, where ``config``
is, in layout 1 (no ``"version"``: written before versions) and 2, the flat settings, and from 3 the
tree (``MemoryConfig.to_saved``: every field of every part). Every layout is read by :func:`read_state`;
a file of a newer one is refused, not misread. A config field added later needs no new layout (files
without it take the value sessions ran with before it: ``SAVED_BEFORE``, ``ADDED_TO_TREE``)."""


class SessionError(EmserveError):
    """A session is missing, corrupt, or used against its configuration."""


@dataclass(frozen=True)
class SavedState:
    """A ``session.json`` as the running code reads it, whatever version wrote it."""

    version: int
    config: MemoryConfig
    segmenter: dict[str, Any]
    """The segmenter's state (``OnlineSegmenter.state_dict``), decoded."""
    contiguity: dict[str, Any] | None
    """The contiguity buffers of the last planned step (None: saved before they were, or none yet)."""


def read_state(path: str | os.PathLike[str]) -> SavedState:
    """The saved state of the session directory ``path``, migrated to today's layout. The one reader of
    ``session.json`` (opening a session, GetSession / ListSessions, the crash check, the benchmarks).
    Raises :class:`SessionError` when there is none, it is damaged, or a newer emserve wrote it."""
    file = Path(path) / SESSION_FILE
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise SessionError(f"no session at {path}") from None
    except ValueError as e:
        raise SessionError(f"{file} is not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise SessionError(f"{file} is not a session state")
    version = raw.get("version", 1)
    if not isinstance(version, int) or version < 1:
        raise SessionError(f"{file}: bad version {version!r}")
    if version > STATE_VERSION:
        raise SessionError(f"{file} was written by a newer emserve (state version {version}; this one reads "
                           f"up to {STATE_VERSION})")
    try:
        config = MemoryConfig.from_saved(raw["config"], version)
        segmenter = from_json(raw["segmenter"])
    except KeyError as e:
        raise SessionError(f"{file}: no {e.args[0]!r}") from None
    except (TypeError, ValueError, EmserveError) as e:  # ConfigError: a damaged or foreign config
        raise SessionError(f"{file}: {e}") from None
    if not isinstance(segmenter, dict):
        raise SessionError(f"{file}: the segmenter state is not an object")
    return SavedState(version, config, segmenter, raw.get("contiguity"))


def state_dict(config: MemoryConfig, segmenter: dict[str, Any], contiguity: dict[str, Any] | None) -> dict[str, Any]:
    """The ``session.json`` of today's layout (:data:`STATE_VERSION`), as :func:`read_state` reads it."""
    state: dict[str, Any] = {"version": STATE_VERSION, "config": config.to_saved(),
                             "segmenter": to_json(segmenter)}
    if contiguity is not None:
        state["contiguity"] = contiguity
    return state


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
        seen = int(read_state(p).segmenter["seen"])
    except (SessionError, KeyError, TypeError, ValueError):
        return False  # not a session (yet), or one that opening will refuse: nothing to replay
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

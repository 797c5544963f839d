"""The engine's scratch dirs: a killed owner's is removed by the next engine, a live owner's is not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from emserve.server.engine.vllm_engine import OWNER_FILE, SCRATCH_PREFIX, STALE_AFTER_S, sweep_stale_scratch


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_dead_owners_scratch_is_removed_and_a_live_ones_is_kept(tmp_path: Path) -> None:
    dead = tmp_path / f"{SCRATCH_PREFIX}dead"
    live = tmp_path / f"{SCRATCH_PREFIX}live"
    mine = tmp_path / f"{SCRATCH_PREFIX}mine"
    other = tmp_path / "emserve-other"  # not an engine's: never touched
    for d, pid in ((dead, _dead_pid()), (live, os.getppid()), (mine, os.getpid()), (other, _dead_pid())):
        (d / "ipc").mkdir(parents=True)
        (d / OWNER_FILE).write_text(str(pid))
        (d / "questions.i64").write_bytes(b"\0" * 8)
    assert sweep_stale_scratch(tmp_path) == [dead]
    assert not dead.exists() and live.is_dir() and mine.is_dir() and other.is_dir()


def test_a_scratch_without_owner_is_removed_only_once_old(tmp_path: Path) -> None:
    """No owner file: an engine is making the dir right now, or it predates owner files."""
    fresh = tmp_path / f"{SCRATCH_PREFIX}fresh"
    old = tmp_path / f"{SCRATCH_PREFIX}old"
    for d in (fresh, old):
        d.mkdir()
        (d / "questions.i64").write_bytes(b"\0" * 8)
    t = time.time() - STALE_AFTER_S - 5
    os.utime(old, (t, t))
    assert sweep_stale_scratch(tmp_path) == [old]
    assert fresh.is_dir() and not old.exists()

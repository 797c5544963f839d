"""The evaluation harness's disk estimate (``bench/eval/eval.py``: ``disk_needed``), checked before a run starts.

A small run must not demand the restart headroom meant for long grids: CI machines with ~14 GiB free
refused the 4k-token smoke run when the estimate added the whole ``--restart-gib`` (16 GiB) to it.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ev():  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")  # eval_report draws the figures
    from bench.eval import eval as ev_module
    return ev_module


def test_smoke_run_needs_what_its_sessions_write(ev) -> None:  # type: ignore[no-untyped-def]
    per_token = ev.DISK_PER_TOKEN
    need = ev.disk_needed([4096, 4096], 0, 1, 16 * 2**30)
    # one session at a time, plus both sessions' files possibly still mapped after deletion
    assert need == 4096 * per_token + 2 * 4096 * per_token
    assert need < 1 * 2**30


def test_long_grid_holds_at_most_the_restart_headroom(ev) -> None:  # type: ignore[no-untyped-def]
    per_token = ev.DISK_PER_TOKEN
    jobs = [131072] * 40  # far more than 16 GiB written in all
    assert ev.disk_needed(jobs, 0, 2, 16 * 2**30) == 131072 * per_token * 2 + 16 * 2**30


def test_stream_counts_as_the_biggest_session(ev) -> None:  # type: ignore[no-untyped-def]
    per_token = ev.DISK_PER_TOKEN
    assert ev.disk_needed([], 1 << 20, 1, 16 * 2**30) == (1 << 20) * per_token

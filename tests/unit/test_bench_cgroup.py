"""bench/eval/cgroup.py: a command in a memory cgroup of its own, with a limit (real cgroups where allowed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench.eval.cgroup import MemoryCgroup, main, parse_bytes

ALLOC = "import time\nkeep = []\nfor _ in range({n}):\n    keep.append(bytearray(40 << 20))\n    time.sleep(0.2)\n"


def test_sizes_take_binary_units():
    assert parse_bytes("4GiB") == 4 << 30
    assert parse_bytes("512m") == 512 << 20
    assert parse_bytes("1.5GiB") == 3 << 29
    assert parse_bytes("1024") == 1024
    with pytest.raises(ValueError):
        parse_bytes("4 apples")


def _cgroups_allowed() -> bool:
    try:
        MemoryCgroup(1 << 30).remove()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _cgroups_allowed(), reason="creating a memory cgroup is not allowed here")
def test_the_limit_holds_and_usage_is_recorded(tmp_path):
    """Under the limit the command exits 0 with its usage sampled; past it the kernel kills it (137, an
    OOM kill recorded); the cgroup is gone afterwards either way."""
    ok = tmp_path / "ok.json"
    assert main(["--memory", "256MiB", "--record", str(ok), "--every", "0.1", "--",
                 sys.executable, "-c", ALLOC.format(n=3)]) == 0
    rec = json.loads(ok.read_text())
    assert rec["exit"] == 0 and rec["oom_kills"] == 0 and rec["limit"] == 256 << 20
    assert max(s["anon"] for s in rec["samples"]) >= 80 << 20  # two of the three 40 MiB blocks, at least
    over = tmp_path / "over.json"
    assert main(["--memory", "128MiB", "--record", str(over), "--every", "0.1", "--",
                 sys.executable, "-c", ALLOC.format(n=8)]) == 137
    rec2 = json.loads(over.read_text())
    assert rec2["oom_kills"] >= 1 and rec2["peak"] <= 128 << 20
    assert not Path(rec["cgroup"]).exists() and not Path(rec2["cgroup"]).exists()

"""Run a command in a memory cgroup of its own, with a limit, recording what the cgroup used.

    .venv/bin/python -m bench.eval.cgroup --memory 4GiB --record usage.json [--every 10] -- CMD [ARGS...]

Rules:

* The cgroup is created under the memory controller's hierarchy the machine offers (cgroup v2's unified
  tree, ``memory.max``; else v1's ``memory`` tree, ``memory.limit_in_bytes``), named ``emserve-<pid>``
  next to this process's own cgroup (where this process may create one), and removed when the command
  ends. The limit counts everything the kernel charges to the group: anonymous memory and the page
  cache of the files it reads and writes (the kernel reclaims the latter under the limit).
* The command starts inside it (the child joins the cgroup before it execs, so everything it spawns is
  in it too), inherits stdin, stdout and stderr, and gets SIGTERM / SIGINT forwarded. The exit status is
  the command's (a signal ``N`` gives ``128 + N``).
* ``--record``: a JSON file rewritten every ``--every`` seconds and at the end: the limit, the samples
  (time, usage, anonymous and file bytes from ``memory.stat``), the peak, OOM kills, the exit status.
* Needs permission to create a cgroup (root, or a delegated subtree); says so and exits 2 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path("/sys/fs/cgroup")
UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """``4GiB``, ``4g``, ``512MiB``, ``1073741824`` -> bytes (binary units)."""
    s = text.strip().lower()
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    if unit not in UNITS or not num:
        raise ValueError(f"not a size: {text!r} (e.g. 4GiB, 512MiB)")
    return int(float(num) * UNITS[unit])


class MemoryCgroup:
    """A memory cgroup made for one command (module docstring); v2 where the unified tree has the
    memory controller, else v1."""

    def __init__(self, limit: int, root: Path = ROOT) -> None:
        self.limit = limit
        own = self._own(root)
        if own is None:
            raise PermissionError(f"no memory cgroup hierarchy under {root}")
        self.v2, parent = own
        self.path = parent / f"emserve-{os.getpid()}"
        self.path.mkdir()  # PermissionError / OSError where creating one is not allowed
        try:
            (self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit))
            if self.v2 and (self.path / "memory.swap.max").exists():  # no swapping out of the limit
                (self.path / "memory.swap.max").write_text("0")
        except OSError:
            self.path.rmdir()
            raise

    @staticmethod
    def _own(root: Path) -> tuple[bool, Path] | None:
        """(v2?, the folder of this process's cgroup in the hierarchy with the memory controller)."""
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        for line in lines:  # v1: "4:memory:/some/path"
            _, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                return False, root / "memory" / rel.lstrip("/")
        for line in lines:  # v2: "0::/some/path"
            if line.startswith("0::"):
                base = root if (root / "cgroup.controllers").exists() else root / "unified"
                if "memory" in (base / "cgroup.controllers").read_text().split():
                    return True, base / line[3:].lstrip("/")
        return None

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def stat(self) -> dict[str, int]:
        out = {}
        for line in self._read("memory.stat").splitlines():
            k, _, v = line.partition(" ")
            out[k] = int(v)
        return out

    def sample(self) -> dict[str, Any]:
        st = self.stat()
        usage = int(self._read("memory.current" if self.v2 else "memory.usage_in_bytes"))
        anon = st.get("anon", st.get("total_rss", st.get("rss", 0)))
        file = st.get("file", st.get("total_cache", st.get("cache", 0)))
        return {"time": round(time.time(), 1), "usage": usage, "anon": anon, "file": file}

    def peak(self) -> int | None:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        return int(self._read(name)) if (self.path / name).exists() else None

    def oom_kills(self) -> int:
        if self.v2:
            events = dict(line.split() for line in self._read("memory.events").splitlines())
            return int(events.get("oom_kill", 0))
        ctl = dict(line.split() for line in self._read("memory.oom_control").splitlines())
        return int(ctl.get("oom_kill", 0))

    def join_self(self) -> None:
        """Move the calling process into the cgroup (run in the child, before it execs)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        for _ in range(50):  # the last processes may take a moment to leave
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def run(cmd: Sequence[str], limit: int, record: Path | None, every: float) -> int:
    try:
        group = MemoryCgroup(limit)
    except OSError as e:
        print(f"cgroup: cannot create a memory cgroup here ({e}); run as root or in a delegated subtree",
              file=sys.stderr)
        return 2
    res: dict[str, Any] = {"command": list(cmd), "limit": limit, "cgroup": str(group.path),
                           "version": 2 if group.v2 else 1, "samples": [], "started": time.time()}

    def record_sample(**final: Any) -> None:
        res["samples"].append(group.sample())
        res.update(peak=group.peak(), oom_kills=group.oom_kills(), **final)
        if record is not None:
            tmp = record.with_name(record.name + ".tmp")
            tmp.write_text(json.dumps(res, indent=1))
            os.replace(tmp, record)

    try:
        child = subprocess.Popen(list(cmd), preexec_fn=group.join_self)  # noqa: PLW1509 - joins before exec
        forward = lambda sig, _frame: child.send_signal(sig)  # noqa: E731
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        while True:
            try:
                status = child.wait(timeout=every)
                break
            except subprocess.TimeoutExpired:
                record_sample()
        record_sample(exit=status if status >= 0 else 128 - status, wall_s=round(time.time() - res["started"], 1))
        return int(res["exit"])
    finally:
        group.remove()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", required=True, type=parse_bytes, help="the limit, e.g. 4GiB")
    ap.add_argument("--record", type=Path, default=None, help="write the samples here (JSON)")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command and its arguments")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given (after --)")
    return run(cmd, args.memory, args.record, args.every)


if __name__ == "__main__":
    raise SystemExit(main())

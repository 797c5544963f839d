"""Disk quotas: the bytes one session, and all sessions together, may hold on disk.

Contract
--------
* Usage is allocated bytes (``st_blocks`` × 512, as ``du`` counts them) of every file under a session's
  folder (its KV log, event table, indexes, tokens and state).
* A step that writes (an ingestion commit, a remembered exchange) is admitted by :meth:`DiskQuota.admit`
  before it writes. It is refused with :class:`~emserve.server.errors.LimitExceeded` (RESOURCE_EXHAUSTED,
  QuotaFailure subject ``session_disk`` or ``disk``) when the usage plus the step's estimate would pass a
  quota. The estimate is the session's own bytes per token times the step's tokens (0 for a session that
  holds no token yet), so a quota is passed by at most the misestimate of one step. A refused step wrote
  nothing: every acknowledged token stays, and the error carries ``committed_offset``.
* A session's usage is measured after each of its steps (:meth:`refresh`: a walk of its folder, in a
  worker thread), when it is created or opened, and at server start (:meth:`scan`); the server's usage is
  the sum of its sessions' last measurements. Deleting a session removes its share (:meth:`forget`).
* Nothing else is ever refused for space: reads, questions that do not remember, CreateSession and
  DeleteSession (so space can always be freed through the API).
* With both quotas 0 (the default) nothing is measured and nothing refused.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from emserve.server.errors import LimitExceeded


def allocated_files(root: str | os.PathLike[str]) -> Iterator[tuple[str, int]]:
    """``(file name, allocated bytes)`` of every file under ``root``; files deleted meanwhile are skipped."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                yield name, os.stat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue


def folder_bytes(root: str | os.PathLike[str]) -> int:
    """Allocated bytes under ``root`` (0 if it does not exist)."""
    return sum(size for _, size in allocated_files(root))


class DiskQuota:
    """The quotas of one server's sessions folder; lives on the server's event loop."""

    def __init__(self, session_bytes: int = 0, total_bytes: int = 0) -> None:
        if session_bytes < 0 or total_bytes < 0:
            raise ValueError("disk quotas must be >= 0")
        self.session_bytes = session_bytes
        """Largest usage of one session (0: no limit)."""
        self.total_bytes = total_bytes
        """Largest usage of all sessions together (0: no limit)."""
        self._used: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.session_bytes or self.total_bytes)

    def usage(self, key: str) -> int | None:
        """The last measured usage of the session in folder ``key`` (None: not measured)."""
        return self._used.get(key)

    def total(self) -> int:
        """The sessions' usage together, as last measured."""
        return sum(self._used.values())

    def scan(self, folders: Iterable[Path]) -> None:
        """Measure every session folder in ``folders`` (blocking: call it from a worker thread at start)."""
        for folder in folders:
            self._used[folder.name] = folder_bytes(folder)

    async def refresh(self, folder: Path) -> None:
        """Measure the session folder ``folder`` again (after a step wrote to it)."""
        if self.enabled:
            self._used[folder.name] = await asyncio.to_thread(folder_bytes, folder)

    def forget(self, key: str) -> None:
        self._used.pop(key, None)

    def admit(self, folder: Path, tokens_held: int, tokens_new: int) -> None:
        """Raise LimitExceeded if writing ``tokens_new`` more tokens into the session in ``folder`` (which
        holds ``tokens_held``) would pass a quota."""
        if not self.enabled or tokens_new <= 0:
            return
        key = folder.name
        used = self._used.get(key)
        if used is None:  # not seen since start (a folder that appeared afterwards): measure it now
            used = self._used[key] = folder_bytes(folder)
        estimate = used * tokens_new // tokens_held if tokens_held > 0 else 0
        if self.session_bytes and used + estimate > self.session_bytes:
            raise LimitExceeded("session_disk", f"the session holds {_gib(used)} on disk; {tokens_new} more tokens "
                                f"(about {_gib(estimate)}) would pass its quota of {_gib(self.session_bytes)}",
                                limit=self.session_bytes, used=used, committed_offset=tokens_held)
        total = self.total()
        if self.total_bytes and total + estimate > self.total_bytes:
            raise LimitExceeded("disk", f"the sessions hold {_gib(total)} on disk; {tokens_new} more tokens "
                                f"(about {_gib(estimate)}) would pass the server's quota of "
                                f"{_gib(self.total_bytes)}; delete sessions to free space",
                                limit=self.total_bytes, used=total, committed_offset=tokens_held)


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"

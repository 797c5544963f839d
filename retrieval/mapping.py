"""Read-only memory maps of the session files, with the access pattern told to the kernel.

A session's files outgrow the page cache in long sessions, and then a read of old data is a page
fault. On a fault in an ordinary file mapping Linux reads around it, up to the device's readahead
(``read_ahead_kb``: 8 MiB on the development VM). That suits scans and dense gathers, and is ruinous
for the KV log: a step's window reads each retrieved event's few KiB per layer, scattered over the
whole session. The representatives are left to readahead: exact search scans them whole and HNSW rescoring gathers
thousands of events per step. Recent data (the local window, just written) is in the page cache either
way. A reader that knows what it will read soon says so (``Mapping.willneed``): the kernel then reads
all of those pages at once, instead of one page per fault in the order they are touched.
Measurements: ``docs/decisions.md``, "KV log reads".
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Mapping:
    """A read-only mapped array and the mapping under it (None for an empty array)."""

    array: np.ndarray
    mm: mmap.mmap | None

    def willneed(self, rows: Iterable[tuple[int, int]]) -> None:
        """Start reading rows ``[lo, hi)`` of each span into the page cache, without waiting
        (``MADV_WILLNEED``: the kernel queues the reads of every span at once). Spans are clipped to
        the array; pages already cached cost one lookup. No-op where the platform lacks it."""
        if self.mm is None or not hasattr(mmap, "MADV_WILLNEED") or self.array.ndim == 0:
            return
        row = self.array.strides[0]
        size = len(self.mm)
        for lo, hi in rows:
            b0 = max(0, lo * row) // mmap.PAGESIZE * mmap.PAGESIZE
            b1 = min(hi * row, size)
            if b1 > b0:
                self.mm.madvise(mmap.MADV_WILLNEED, b0, b1 - b0)


def map_file(path: str | os.PathLike[str], dtype: np.dtype | type[np.generic] | str,
             shape: tuple[int, ...], *, random: bool = False) -> Mapping:
    """Read-only ``[shape]`` array over the start of ``path``, memory-mapped; ``random``: advise
    ``MADV_RANDOM`` (a fault reads only its page).

    The file must hold at least ``prod(shape)`` items; the array keeps the mapping alive.
    """
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dt.itemsize
    if nbytes == 0:
        return Mapping(np.zeros(shape, dt), None)
    with open(Path(path), "rb") as f:
        mm = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_READ)
    if random and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return Mapping(np.frombuffer(mm, dtype=dt, count=count).reshape(shape), mm)


def map_array(path: str | os.PathLike[str], dtype: np.dtype | type[np.generic] | str,
              shape: tuple[int, ...], *, random: bool = False) -> np.ndarray:
    """:func:`map_file`'s array."""
    return map_file(path, dtype, shape, random=random).array

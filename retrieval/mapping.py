"""Read-only memory maps of the session files, with the access pattern told to the kernel.

A session's files outgrow the page cache in long sessions, and then a read of old data is a page
fault. On a fault in an ordinary file mapping Linux reads around it, up to the device's readahead
(``read_ahead_kb``: 8 MiB on the development VM). That suits scans and dense gathers, and is ruinous
for the KV log: a step's window reads each retrieved event's few KiB per layer, scattered over the
whole session. The representatives are left to readahead: exact search scans them whole and HNSW rescoring gathers
thousands of events per step. Recent data (the local window, just written) is in the page cache either
way. Measurements: ``docs/decisions.md``, "KV log reads".
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np


def map_array(path: str | os.PathLike[str], dtype: np.dtype | type[np.generic] | str,
              shape: tuple[int, ...], *, random: bool = False) -> np.ndarray:
    """Read-only ``[shape]`` array over the start of ``path``, memory-mapped; ``random``: advise
    ``MADV_RANDOM`` (a fault reads only its page).

    The file must hold at least ``prod(shape)`` items; the array keeps the mapping alive.
    """
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dt.itemsize
    if nbytes == 0:
        return np.zeros(shape, dt)
    with open(Path(path), "rb") as f:
        mm = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_READ)
    if random and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mm, dtype=dt, count=count).reshape(shape)

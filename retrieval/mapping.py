"""Read-only memory maps for random access.

A session's files (KV log, event representatives) outgrow the page cache in long sessions, and then
every read of an old event is a page fault. On a fault in an ordinary file mapping Linux reads
around it, up to the device's readahead (``read_ahead_kb``: 8 MiB on the development VM), so each
retrieved event's few KiB cost megabytes of disk reads. Retrieval reads exactly that way: a few
KiB per event and layer, scattered over the whole session. :func:`map_array` maps with
``MADV_RANDOM`` (only the faulting page is read). Recent data (the local window, just written) is
in the page cache anyway, where the advice changes nothing.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np


def map_array(path: str | os.PathLike[str], dtype: np.dtype | type[np.generic] | str,
              shape: tuple[int, ...]) -> np.ndarray:
    """Read-only ``[shape]`` array over the start of ``path``, memory-mapped for random access.

    The file must hold at least ``prod(shape)`` items; the array keeps the mapping alive.
    """
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dt.itemsize
    if nbytes == 0:
        return np.zeros(shape, dt)
    with open(Path(path), "rb") as f:
        mm = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_READ)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mm, dtype=dt, count=count).reshape(shape)

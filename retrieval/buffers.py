"""EM-LLM's contiguity buffer: temporal neighbours of similarity hits, kept across steps as a FIFO.

One buffer per layer (or one shared buffer when retrieval is not per layer). It holds event ids,
oldest first, and at most ``cap`` tokens (``cap = k_c``, see ``contiguity_tokens``). The update at
each step follows ``_update_contiguity_buffer`` of EM-LLM (``cm.py``):

1. **New neighbours.** For each similarity hit ``b`` in rank order, the neighbours ``b+1`` then
   ``b-1`` are taken when they exist, are not similarity hits, and are not taken already, until
   their tokens reach ``cap``. The list is then reversed, so the neighbours of the best hit are last
   (newest).
2. **Buffer update** (nothing happens when there are no new neighbours):

   * *replace*: the buffer is empty, or the new neighbours filled ``cap``: the buffer becomes them;
   * *append*: old buffer + new neighbours still fit under ``cap``: they are appended;
   * *fifo*: otherwise the new neighbours go in, and old entries are re-added newest first (skipping
     similarity hits and the new neighbours) until ``cap`` is reached, so the oldest drop out.

Deviations from EM-LLM, all so that the token budget is never exceeded and nothing is loaded twice:

* EM-LLM keeps the neighbour that crosses ``cap`` when that lands nearer to ``cap`` than dropping it
  ("nearest fit"); here an entry is taken only if it fits (``tokens + size <= cap``). Reaching
  ``cap`` exactly, or meeting a neighbour that does not fit, both count as "filled".
* In the *append* case, an old entry that is also a new neighbour is moved to the new position
  (EM-LLM would hold it twice).
* :meth:`ContiguityBuffer.select` (what is injected this step) skips entries that are similarity
  hits of this step (EM-LLM would load them twice) or no longer retrievable, and drops the oldest
  entries if ``cap`` shrank since they were added.

EM-LLM keeps the buffer in memory only; here its state goes to the session's file with every step
(``Retriever.buffer_state``), so a reopened session computes what an uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Literal

import numpy as np

BufferUpdate = Literal["none", "replace", "append", "fifo"]


def contiguity_tokens(budget: int, contiguity_buffer_size: float) -> int:
    """``k_c``: tokens of ``budget`` reserved for the contiguity buffer (EM-LLM's formula).

    A fraction (``< 1``) gives ``int(size * budget + 1)``; ``>= 1`` is an absolute token count.
    Never more than ``budget``.
    """
    if budget <= 0:
        return 0
    kc = int(contiguity_buffer_size * budget + 1) if contiguity_buffer_size < 1 else int(contiguity_buffer_size)
    return min(kc, budget)


class ContiguityBuffer:
    """A FIFO of event ids (oldest first) bounded by a token cap. See the module docstring."""

    __slots__ = ("_ids",)

    def __init__(self, ids: Sequence[int] = ()) -> None:
        self._ids: list[int] = [int(i) for i in ids]

    @property
    def ids(self) -> tuple[int, ...]:
        """Buffered event ids, oldest first."""
        return tuple(self._ids)

    def clear(self) -> None:
        self._ids = []

    def update(self, similar: Sequence[int], sizes: np.ndarray, num_events: int, cap: int) -> BufferUpdate:
        """Fold this step's similarity hits (rank order) into the buffer. Returns which case applied.

        ``sizes[i]``: tokens of event ``i``; only events ``0 .. num_events-1`` are retrievable.
        """
        sim = set(similar)

        def eligible(c: int) -> bool:
            return 0 <= c < num_events and c not in sim

        new: list[int] = []
        taken: set[int] = set()
        tokens = 0
        filled = False
        for b in similar:
            for c in (b + 1, b - 1):
                if c in taken or not eligible(c):
                    continue
                size = int(sizes[c])
                if tokens + size > cap:
                    filled = True
                    break
                new.append(c)
                taken.add(c)
                tokens += size
                if tokens >= cap:
                    filled = True
                    break
            if filled:
                break
        if not new:
            return "none"
        new.reverse()
        if not self._ids or filled:
            self._ids = new
            return "replace"
        old = [c for c in self._ids if c not in taken]
        old_tokens = sum(int(sizes[c]) for c in old if 0 <= c < len(sizes))
        if old_tokens + tokens < cap:
            self._ids = old + new
            return "append"
        kept: list[int] = []
        for c in reversed(self._ids):
            if c in taken or not eligible(c):
                continue
            size = int(sizes[c])
            if tokens + size > cap:
                break
            kept.append(c)
            tokens += size
            if tokens >= cap:
                break
        kept.reverse()
        self._ids = kept + new
        return "fifo"

    def select(self, exclude: Collection[int], sizes: np.ndarray, num_events: int, cap: int) -> list[int]:
        """Entries to inject this step (oldest first): not in ``exclude``, retrievable, ``<= cap`` tokens.

        Walks from the newest entry back and stops at the first one that does not fit.
        """
        out: list[int] = []
        tokens = 0
        for c in reversed(self._ids):
            if c in exclude or not 0 <= c < num_events:
                continue
            size = int(sizes[c])
            if tokens + size > cap:
                break
            out.append(c)
            tokens += size
        out.reverse()
        return out

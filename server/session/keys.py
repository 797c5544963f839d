"""The segmenter's keys: pre-RoPE keys of the KV log, read and de-rotated once per range."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from emserve.retrieval.kvlog import KVLog
from emserve.server.engine.rope import RopeSpec
from emserve.server.session.state import SessionError


def refinement_keys(log: KVLog, rope: RopeSpec, layers: tuple[int, int], start: int, end: int) -> torch.Tensor:
    """Pre-RoPE keys ``[L, T, H, D]`` (fp32) of layers ``[layers[0], layers[1])`` for the segmenter's
    refinement graph: one de-rotation for all layers (the angles are computed once)."""
    pos = torch.from_numpy(log.positions(start, end).astype(np.int64))
    k = torch.stack([log.keys(layer, start, end) for layer in range(*layers)], dim=1).float()  # [T, L, H, D]
    t, n_layers, h, d = k.shape
    k = rope.rotate(k.view(t, n_layers * h, d), -pos).view(t, n_layers, h, d)
    return k.transpose(0, 1)


class RefinementKeys:
    """The segmenter's ``keys(start, end)`` callback with a cache: :func:`refinement_keys` of a range
    is read and de-rotated once, not once per boundary window (windows of neighbouring boundaries
    overlap, and a chunk decides tens of boundaries at γ=1).

    The cache covers ``[lo, hi)`` of the log; a call past ``hi`` reads only the missing tail, a call
    starting after ``lo`` drops the prefix (requests start at the last refined boundary, which only
    moves forward), a call before ``lo`` re-reads. Log rows are immutable once written, so cached rows
    stay valid; :meth:`reset` after a truncation.
    """

    READ_AHEAD = 2048

    def __init__(self, log: Callable[[], KVLog], rope: RopeSpec, layers: tuple[int, int]) -> None:
        self._log, self._rope, self._layers = log, rope, layers
        self._lo = self._hi = 0
        self._keys: torch.Tensor | None = None  # [L, hi - lo, H, D]

    def reset(self) -> None:
        self._lo = self._hi = 0
        self._keys = None

    def __call__(self, start: int, end: int) -> torch.Tensor:
        if end < start:
            raise SessionError(f"refinement keys: invalid range [{start}, {end}) (end before start)")
        if self._keys is None or start < self._lo or start > self._hi:
            self._keys, self._lo, self._hi = None, start, start
        elif start > self._lo:
            self._keys = self._keys[:, start - self._lo :]
            self._lo = start
        if end > self._hi:
            # read ahead to what the log holds (bounded): the next windows of this chunk need it
            log = self._log()
            stop = max(end, min(len(log), end + self.READ_AHEAD))
            tail = refinement_keys(log, self._rope, self._layers, self._hi, stop)
            self._keys = tail if self._keys is None else torch.cat([self._keys, tail], dim=1)
            self._hi = stop
        assert self._keys is not None
        return self._keys[:, start - self._lo : end - self._lo]

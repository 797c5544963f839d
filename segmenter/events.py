"""The segmenter's result type and the oversize-split rule."""

from __future__ import annotations

from dataclasses import dataclass

from emserve.segmenter.errors import SegmenterError


@dataclass(frozen=True, slots=True)
class Event:
    """Stream tokens ``[start, end)`` (absolute offsets, half-open) forming one closed event."""

    start: int
    end: int
    start_surprise: float
    """Surprise of token ``start`` (for a surprise boundary, the value that crossed the threshold;
    after refinement or a split, just the surprise of the event's first token)."""
    max_surprise: float
    """Largest surprise of the event's tokens."""

    def __len__(self) -> int:
        return self.end - self.start


def split_even(start: int, end: int, max_size: int) -> list[tuple[int, int]]:
    """Cut ``[start, end)`` into ``k = ceil(n / max_size)`` near-equal ranges (the first ``n mod k``
    one token longer). With ``max_size >= 2·min_size`` and ``n >= min_size`` every piece is in
    ``[min_size, max_size]``."""
    n = end - start
    if n <= 0:
        raise SegmenterError(f"empty range [{start}, {end})")
    k = -(-n // max_size)
    base, extra = divmod(n, k)
    out: list[tuple[int, int]] = []
    a = start
    for i in range(k):
        b = a + base + (1 if i < extra else 0)
        out.append((a, b))
        a = b
    return out

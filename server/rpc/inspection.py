"""What a session's memory kept: its events (boundaries, sizes, surprise, preview) and surprise curve."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emserve.server.errors import InvalidArgument
from emserve.server.rpc.text import TextCodec
from emserve.server.session.manager import Entry

MAX_PAGE = 1000
MAX_POINTS = 1 << 18  # points in one surprise curve (1 MiB of float32)


@dataclass(frozen=True)
class EventInfo:
    id: int
    start: int
    end: int
    boundary_surprise: float
    mean_surprise: float
    max_surprise: float
    preview: str


@dataclass(frozen=True)
class EventPage:
    events: list[EventInfo]
    next_first: int | None
    total_events: int
    num_tokens: int


@dataclass(frozen=True)
class Curve:
    start: int
    end: int
    stride: int
    mean: np.ndarray
    max: np.ndarray | None
    boundaries: np.ndarray


def page_size(requested: int, field: str = "page_size") -> int:
    if requested > MAX_PAGE:
        raise InvalidArgument(field, f"page_size must be <= {MAX_PAGE}")
    return requested or 100


def parse_page_token(token: str, field: str = "page_token") -> int:
    if not token:
        return 0
    try:
        value = int(token)
    except ValueError:
        raise InvalidArgument(field, f"bad page token {token!r}") from None
    if value < 0:
        raise InvalidArgument(field, f"bad page token {token!r}")
    return value


def list_events(entry: Entry, codec: TextCodec, first: int, count: int, *, preview_tokens: int = 0) -> EventPage:
    session = entry.session
    table = session.event_table
    total = 0 if table is None else len(table)
    bounds = session.events(first, count)
    events: list[EventInfo] = []
    if bounds.shape[0]:
        lo, hi = int(bounds[0, 0]), int(bounds[-1, 1])
        sur = session.surprise(lo, hi)
        for i, (s, e) in enumerate(bounds.tolist()):
            part = sur[s - lo : e - lo]
            preview = ""
            if preview_tokens:
                preview = codec.decode(session.tokens(s, min(e, s + preview_tokens)).tolist())
            events.append(EventInfo(first + i, s, e, float(part[0]), float(part.mean()), float(part.max()), preview))
    nxt = first + len(events)
    return EventPage(events, nxt if nxt < total else None, total, session.num_tokens)


def surprise_curve(entry: Entry, start: int, end: int | None, stride: int) -> Curve:
    session = entry.session
    n = session.num_tokens
    stop = n if end is None else end
    if start > stop or stop > n:
        raise InvalidArgument("end" if end is not None else "start",
                              f"range [{start}, {stop}) is not inside the committed tokens [0, {n})")
    stride = min(max(1, stride), max(1, stop - start))  # a stride past the range is one point: no padding to it
    points = -(-(stop - start) // stride)
    if points > MAX_POINTS:
        raise InvalidArgument("stride", f"{points} points requested, at most {MAX_POINTS}: raise stride to "
                              f">= {-(-(stop - start) // MAX_POINTS)}")
    values = session.surprise(start, stop)
    if stride == 1:
        mean, peak = values, None
    else:
        pad = points * stride - values.shape[0]
        padded = np.pad(values, (0, pad), constant_values=np.nan).reshape(points, stride)
        mean, peak = np.nanmean(padded, axis=1), np.nanmax(padded, axis=1)
    bounds = session.events()
    starts = bounds[:, 0] if bounds.shape[0] else np.zeros(0, np.int64)
    return Curve(start, stop, stride, mean.astype(np.float32), None if peak is None else peak.astype(np.float32),
                 starts[(starts >= start) & (starts < stop)])

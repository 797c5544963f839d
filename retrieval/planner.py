"""The window planner: turns a session's log, events and a step's queries into a WindowPlan.

A step over new tokens at log offset ``o`` (the log holds tokens ``0 .. o-1``) sees, per layer::

    [ sink | retrieved events | remainder + local | anchor ] + new tokens
      [0, n_init)                [r, o-1)            o-1

* **sink**: the first ``n_init`` tokens of the stream (never part of an event);
* **retrieved events**: chosen per layer by the :class:`~emserve.retrieval.retriever.Retriever`
  within the memory budget, in temporal order;
* **remainder**: tokens after the last retrievable event and before the local window (not yet
  closed into an event); always included;
* **local window**: ``[o - n_local, o - 1)``, the ``n_local`` tokens before the new ones minus the
  last, which is the **anchor** (recomputed, so the first new token gets a surprise value).

An event is retrievable when it ends at or before the local window's start. When
``o - n_local <= n_init`` the sink and the local window meet and the window is simply
``[0, o-1) | anchor``: no memory yet. At ``o == 0`` the window is the new tokens alone.

**Questions** (``question=True``) may use a smaller window (``question_n_local``, ``question_n_mem``):
``[ sink | retrieved events | remainder + last question_n_local tokens | anchor ] + question``, where
an event is retrievable when it ends at or before the question's local window and the remainder is
what lies between the last such event and that window. Why: SmolLM2-135M reads a pass key from such
a short window far more often than from the ingestion window (``bench/lab/needle.py
--question-windows``). The recent tokens are covered only if their events are already in the table:
the server's segmenter closes events as soon as their boundaries are final (``close_lag``), not
when they leave the ingestion's local window; with EM-LLM's closing the older part of the local
window would fall into the remainder instead.

**Positions.** Window positions are ``0 .. window_len-1`` and always satisfy
``window_len + reserve + 1 <= max_window`` (``reserve``: tokens the caller will generate in the same
request; the ``+1`` matches the engine's own check). The memory budget of a step is
``min(n_mem, room)`` where ``room`` is what the sink, remainder, local window, anchor, new tokens and
reserve leave of ``max_window``: with ``exc_block_size``-sized steps and a remainder no longer than
the slack of the configuration it is ``n_mem``; a longer remainder is taken out of the budget (as in
EM-LLM, where it always is). A step that cannot fit even with no memory raises ``PlanError``.

The planner reads only the event table and the index (never KV); the plan names log ranges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from emserve.retrieval.config import RetrievalConfig
from emserve.retrieval.errors import ConfigError, PlanError, WindowFull
from emserve.retrieval.plan import Anchor, Segment, WindowPlan
from emserve.retrieval.retriever import RetrievalResult, Retriever


@dataclass(frozen=True)
class WindowLayout:
    """The fixed parts of a step's window (log ranges), before retrieval."""

    offset: int
    sink: tuple[int, int]
    remainder: tuple[int, int]
    local: tuple[int, int]
    anchor: int | None
    num_events: int
    budget: int

    @property
    def fixed_tokens(self) -> int:
        """Window tokens other than retrieved events and new tokens."""
        parts = (self.sink, self.remainder, self.local)
        return sum(e - s for s, e in parts) + (self.anchor is not None)


def _merge(ranges: Sequence[tuple[int, int]], log: str) -> tuple[Segment, ...]:
    """Segments for ranges in window order, adjacent ones merged, empty ones dropped."""
    out: list[list[int]] = []
    for s, e in ranges:
        if e <= s:
            continue
        if out and out[-1][1] == s:
            out[-1][1] = e
        else:
            out.append([s, e])
    return tuple(Segment(log, s, e) for s, e in out)


def _context(config: RetrievalConfig) -> int:
    """``config.max_window``, which a planner needs (ConfigError while it is None)."""
    if config.max_window is None:
        raise ConfigError("a planner needs the model's context (RetrievalConfig.max_window)")
    return config.max_window


class WindowPlanner:
    """Plans the steps of one session (server side). Not thread-safe: one stepping thread per session."""

    def __init__(self, retriever: Retriever, log: str) -> None:
        """Plans with ``retriever``'s config over its event table; ``log`` names the KV log the plans read."""
        _context(retriever.config)
        self.log = log
        self.table = retriever.table
        self.retriever = retriever
        self.last_retrieval: RetrievalResult | None = None

    @property
    def config(self) -> RetrievalConfig:
        """The retriever's config: the planner and its retriever always plan with the same settings."""
        return self.retriever.config

    @config.setter
    def config(self, config: RetrievalConfig) -> None:
        _context(config)
        self.retriever.config = config

    def layout(self, offset: int, num_new: int, *, reserve: int = 0, question: bool = False) -> WindowLayout:
        """Where sink, remainder, local window and anchor lie for a step at ``offset``; the memory budget.

        ``question``: the layout of a question (``question_n_local`` / ``question_n_mem``)."""
        cfg = self.config
        if offset < 0 or num_new < 1 or reserve < 0:
            raise PlanError(
                f"need offset >= 0, num_new >= 1, reserve >= 0; got {offset}, {num_new}, {reserve}"
            )
        limit = _context(cfg) - 1 - reserve - num_new
        if offset == 0:
            layout = WindowLayout(0, (0, 0), (0, 0), (0, 0), None, 0, 0)
        else:
            local_start = max(0, offset - cfg.n_local)
            if local_start <= cfg.n_init:
                layout = WindowLayout(offset, (0, 0), (0, 0), (0, offset - 1), offset - 1, 0, 0)
            else:
                base = self._fixed(offset, local_start)
                first_start = int(self.table.starts[0]) if base.num_events else cfg.n_init
                if first_start < cfg.n_init:
                    raise PlanError(f"event 0 starts at {first_start}, inside the sink [0, {cfg.n_init})")
                if question and cfg.question_n_local is not None:
                    q_base = self._fixed(offset, max(offset - cfg.question_n_local, cfg.n_init))
                    if q_base.num_events:  # none before the question's local window: the ingestion layout
                        base = q_base
                if question and base.num_events and cfg.question_n_init is not None:
                    base = dataclasses.replace(base, sink=(0, min(cfg.question_n_init, cfg.n_init)))
                m = base.num_events
                n_mem = cfg.n_mem
                if question and m and cfg.question_n_mem is not None:
                    n_mem = min(cfg.question_n_mem, cfg.n_mem)
                budget = min(n_mem, limit - base.fixed_tokens) if m else 0
                layout = WindowLayout(offset, base.sink, base.remainder, base.local, base.anchor, m,
                                      max(budget, 0))
        if layout.fixed_tokens > limit:
            raise WindowFull(
                f"step at offset {offset} with {num_new} new tokens (+{reserve} reserved) needs "
                f"{layout.fixed_tokens + num_new + reserve + 1} window positions, "
                f"max_window is {cfg.max_window}",
                cause="reserve" if layout.fixed_tokens <= limit + reserve else "new",
            )
        return layout

    def _fixed(self, offset: int, local_start: int) -> WindowLayout:
        """Sink, remainder and local window of a step at ``offset`` whose local window starts at
        ``local_start``: the events that end by then are retrievable (no budget yet)."""
        n_init = self.config.n_init
        m = self.table.count_ending_by(local_start)
        rem_start = max(n_init, int(self.table.ends[m - 1])) if m else n_init
        return WindowLayout(offset, (0, n_init), (rem_start, local_start), (local_start, offset - 1),
                            offset - 1, m, 0)

    def plan_step(
        self,
        offset: int,
        new_token_ids: Sequence[int],
        queries: np.ndarray | None,
        *,
        reserve: int = 0,
        request_id: str | None = None,
        question: bool = False,
        lead: Sequence[int] = (),
        lead_joint: int = 1,
    ) -> WindowPlan:
        """The step's plan: [sink | retrieved | remainder + local | anchor] + new tokens, captured to the log.

        ``queries``: the step's per-layer query summaries (``StepResult.queries`` of a probe, or of
        the previous step) or per-token queries (``StepResult.query_tokens``); may be None when
        nothing must be selected (everything fits). ``question``: a question's window (``layout``);
        ``lead``: events its ranking starts with, the first ``lead_joint`` of them read together
        (``Retriever.retrieve``'s ``first`` and ``joint``; questions only).
        The retrieval is kept in :attr:`last_retrieval`.
        """
        lay = self.layout(offset, len(new_token_ids), reserve=reserve, question=question)
        fixed_head = [lay.sink]
        fixed_tail = [lay.remainder, lay.local]
        anchor = None if lay.anchor is None else Anchor(self.log, lay.anchor)
        segments: tuple[Segment, ...] = _merge(fixed_head + fixed_tail, self.log)
        layer_segments = None
        self.last_retrieval = None
        if lay.num_events and lay.budget:
            cfg = self.config
            res = self.retriever.retrieve(queries, lay.budget, num_events=lay.num_events,
                                          rank=cfg.question_rank if question else "mean",
                                          neighbours=cfg.question_neighbours if question else 0,
                                          reach=cfg.question_reach if question else 0,
                                          part=cfg.question_parts if question else 0,
                                          contiguity=cfg.question_contiguity or not question,
                                          first=lead if question else (), joint=lead_joint)
            self.last_retrieval = res
            if question and cfg.question_memory_last:
                fixed_head, fixed_tail = fixed_head + fixed_tail, []
            first = res.layers[0].ranges
            if res.shared or all(sel.ranges == first for sel in res.layers[1:]):
                segments = _merge(fixed_head + first + fixed_tail, self.log)
            else:
                layer_segments = [
                    _merge(fixed_head + sel.ranges + fixed_tail, self.log) for sel in res.layers
                ]
                segments = ()
        plan = WindowPlan.build(new_token_ids, segments, layer_segments=layer_segments, anchor=anchor,
                                capture_log=self.log, request_id=request_id)
        plan.extra["recent"] = (lay.sink[1], lay.remainder[0])  # what is not memory: [0, a) and [b, offset)
        assert plan.window_len + reserve + 1 <= _context(self.config), "window exceeds max_window"
        return plan

    def probe_plan(self, offset: int, new_token_ids: Sequence[int], *,
                   request_id: str | None = None) -> WindowPlan:
        """The new tokens over [sink | local | anchor] only, not captured: run it for the step's queries."""
        lay = self.layout(offset, len(new_token_ids))
        anchor = None if lay.anchor is None else Anchor(self.log, lay.anchor)
        plan = WindowPlan.build(new_token_ids, _merge([lay.sink, lay.local], self.log), anchor=anchor,
                                request_id=request_id)
        assert plan.window_len + 1 <= _context(self.config), "window exceeds max_window"
        return plan

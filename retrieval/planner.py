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
a short window far more often than from the ingestion window (``bench/needle.py
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
from typing import Literal

import numpy as np

from emserve.retrieval.errors import ConfigError, PlanError, WindowFull
from emserve.retrieval.events import EventTable
from emserve.retrieval.index import IndexParams
from emserve.retrieval.plan import Anchor, Segment, WindowPlan
from emserve.retrieval.representatives import REPR_PROXIES
from emserve.retrieval.retriever import RANKS, RetrievalResult, Retriever


@dataclass(frozen=True, kw_only=True)
class RetrievalConfig:
    """Retrieval and window settings of a session (EM-LLM's names where they mean the same).

    The defaults are the product's, sized for SmolLM2-135M (8k context), and the only ones: a session's
    ``MemoryConfig`` holds one of these as its ``retrieval`` part. Where EM-LLM's value differs, the field says it."""

    n_init: int = 128
    """Sink tokens: the first ``n_init`` tokens of the stream, in every window."""
    n_local: int = 1024
    """Local window: the ``n_local`` tokens just before the new tokens (the last one is the anchor;
    EM-LLM: 4096)."""
    n_mem: int = 1024
    """Memory budget: retrieved event tokens per layer per step (never exceeded; EM-LLM: 2048)."""
    exc_block_size: int = 512
    """Tokens computed per step (the chunk size of ingestion and of re-planning while generating)."""
    question_n_local: int | None = 64
    """A question's local window (``plan_step(question=True)``): its last ``question_n_local`` tokens;
    the events that end before it are retrievable, the tokens between the last of them and it are
    the remainder. None: the same as ingestion (EM-LLM). See the module docstring."""
    question_n_mem: int | None = 160
    """A question's memory budget (at most ``n_mem``: a question's window is never larger than a
    step's); None: ``n_mem`` (EM-LLM)."""
    question_rank: Literal["mean", "interleave"] = "interleave"
    """How a question's query tokens rank the events (``Retriever.retrieve``): their mean score, or
    each token by its own scores, interleaved. Ingestion steps rank by the mean."""
    question_neighbours: int = 6
    """A question's similarity hits bring their temporal neighbours, this many events each side,
    before any lower-ranked event (``Retriever.retrieve``; 0: none, EM-LLM)."""
    question_reach: int = 96
    """...and, beyond those, the neighbours that start or end within this many tokens of the hit
    (``Retriever.retrieve``; 0: ``question_neighbours`` alone)."""
    question_parts: int = 16
    """With ``question_reach``: a hit's neighbours are read in parts of this many tokens, nearest the
    hit first, each only as far as the reach (``Retriever.retrieve``); 0: whole events, nearest first."""
    question_contiguity: bool = False
    """A question uses the contiguity buffer (EM-LLM); False: its share goes to the rank walk, and the
    buffer is left as ingestion left it."""
    question_n_init: int | None = 0
    """A question's sink: the first ``question_n_init`` tokens of the stream (at most ``n_init``; the
    tokens between it and ``n_init`` are then out of the question's window). None: ``n_init`` (EM-LLM)."""
    question_memory_last: bool = False
    """A question's window puts the retrieved events after the local window, right before the question:
    ``[ sink | remainder + local + last token | retrieved events ] + question`` (no anchor: a question
    needs no surprise). False: the ingestion order (retrieved events before the remainder)."""
    repr_topk: int = 4
    """Keys per event: kept as separate vectors (``"topk"``) or averaged (EM-LLM, attention top-k)."""
    repr_proxy: Literal["topk", "mean", "central"] = "topk"
    """Representative when attention scores are not available (see ``representatives``)."""
    use_contiguity_buffer: bool = True
    """Add temporal neighbours of similarity hits through a per-layer FIFO buffer."""
    contiguity_buffer_size: float = 0.3
    """Share of the budget for the contiguity buffer (``< 1``: fraction; ``>= 1``: tokens)."""
    per_layer: bool = False
    """Retrieve per layer (EM-LLM); False: one list for all layers, scored by the sum over the
    scoring layers (``shared_score_layers``)."""
    shared_score_layers: float = 2 / 3
    """A shared selection sums the scores of the first ``round(f * num_layers)`` layers (``queries``)."""
    shared_rescore_factor: float = 0.0
    """Bounded rescoring of a shared selection's HNSW candidates (``retriever``): only the best by an
    upper bound, covering this many times the budget (+ contiguity share), are scored exactly; 0 (the
    default): every candidate of the union is. Faster at scale, lower recall vs exact (measured in
    ``bench/retrieval_index.py``)."""
    shared_search_vectors: int = 128
    """HNSW vectors per (layer, query vector) list of the bounded rescoring."""
    center_queries: bool = True
    """Score with queries minus the stream's mean query (``queries``: the needle is found without it
    in a fraction of the layers only)."""
    standardize_queries: bool = True
    """Scale each query vector (per layer) to unit score spread over a sample of the events."""
    query_sample: int = 256
    """Events sampled (evenly spaced) to estimate that spread."""
    max_window: int | None = None
    """The model's native context: every window position stays below it. None: not known yet (a session
    sets its engine's); a planner needs it."""
    hnsw_m: int = 16
    """HNSW graph degree (hnswlib ``M``)."""
    hnsw_ef_construction: int = 200
    """HNSW build beam width."""
    hnsw_ef: int = 64
    """HNSW query beam width."""
    exact_search_threshold: int = 16384
    """Below this many events (about 180k tokens of SmolLM2 at ~11 tokens per event), search is
    exact; the HNSW indexes are built from half of it on (``index``: lazy build, and why)."""
    index_save_min_events: int = 256
    """Auto-save the indexes after at least this many new events ..."""
    index_save_fraction: float = 0.25
    """... that are also at least this fraction of the saved ones."""
    index_threads: int = 0
    """hnswlib threads for adds (0: one per CPU core, at most 4)."""

    def __post_init__(self) -> None:
        for name, least in (("n_init", 0), ("n_local", 1), ("n_mem", 0), ("exc_block_size", 1),
                            ("question_n_local", 1), ("question_n_mem", 0)):
            value = getattr(self, name)
            if value is not None and value < least:  # the one broken rule, not the list of all of them
                raise ConfigError(f"{name} must be >= {least}, got {value}")
        if self.repr_topk < 1:
            raise ConfigError(f"repr_topk must be >= 1, got {self.repr_topk}")
        if self.repr_proxy not in REPR_PROXIES:
            raise ConfigError(f"repr_proxy must be one of {REPR_PROXIES}, got {self.repr_proxy!r}")
        if not (self.shared_rescore_factor >= 0 and self.shared_search_vectors >= 1):
            raise ConfigError("need shared_rescore_factor >= 0 and shared_search_vectors >= 1")
        if not 0 < self.shared_score_layers <= 1:
            raise ConfigError(f"shared_score_layers must be in (0, 1], got {self.shared_score_layers}")
        if self.query_sample < 2:
            raise ConfigError(f"query_sample must be >= 2, got {self.query_sample}")
        if self.question_n_init is not None and self.question_n_init < 0:
            raise ConfigError(f"question_n_init must be >= 0 (or None), got {self.question_n_init}")
        if self.question_neighbours < 0:
            raise ConfigError(f"question_neighbours must be >= 0, got {self.question_neighbours}")
        if self.question_reach < 0:
            raise ConfigError(f"question_reach must be >= 0, got {self.question_reach}")
        if self.question_parts < 0:
            raise ConfigError(f"question_parts must be >= 0 (0: whole events), got {self.question_parts}")
        if self.question_rank not in RANKS:
            raise ConfigError(f"question_rank must be one of {RANKS}, got {self.question_rank!r}")
        if not self.contiguity_buffer_size >= 0:
            raise ConfigError(f"contiguity_buffer_size must be >= 0, got {self.contiguity_buffer_size}")
        need = self.n_init + self.n_mem + self.n_local + self.exc_block_size + 1
        if self.max_window is not None and need > self.max_window:
            raise ConfigError(
                f"n_init + n_mem + n_local + exc_block_size + 1 = {need} exceeds max_window {self.max_window}"
            )
        self.index_params()  # validates the index fields

    def score_layers(self, num_layers: int) -> range:
        """The layers a shared selection is scored on."""
        return range(max(1, round(self.shared_score_layers * num_layers)))

    def indexed_layers(self, num_layers: int) -> range:
        """The layers that get an HNSW index: all for per-layer selection, else the scoring layers
        (the only ones a shared selection searches)."""
        return range(num_layers) if self.per_layer else self.score_layers(num_layers)

    def index_params(self) -> IndexParams:
        return IndexParams(
            m=self.hnsw_m,
            ef_construction=self.hnsw_ef_construction,
            ef=self.hnsw_ef,
            exact_threshold=self.exact_search_threshold,
            save_min_events=self.index_save_min_events,
            save_fraction=self.index_save_fraction,
            num_threads=self.index_threads,
        )


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

    def __init__(self, config: RetrievalConfig, log: str, table: EventTable, retriever: Retriever) -> None:
        _context(config)
        self.config = config
        self.log = log
        self.table = table
        self.retriever = retriever
        self.last_retrieval: RetrievalResult | None = None

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
                fixed_head, fixed_tail = fixed_head + fixed_tail + [(lay.local[1], offset)], []
                anchor = None
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

"""Retrieval: which events enter the attention window at a step, per layer, within a token budget.

Per layer ``l`` (EM-LLM retrieves per layer), with the step's queries and a budget of ``B`` tokens,
an event scores ``s_l(e) = mean_i max_j (q_il - q̄_l) . rep_e,j / sigma_il`` over the step's query
vectors ``i`` (a mean summary, or a question's last tokens) and the event's representative vectors
``j`` (:mod:`~emserve.retrieval.queries`: centered on the stream's mean query, MaxSim, standardized;
with ``center_queries`` and ``standardize_queries`` off: ``mean_i max_j q_i . rep_j``).
Why each part is there: ``queries``, ``representatives`` and ``docs/decisions.md``.

* **All fits.** When the retrievable events hold ``<= B`` tokens, every layer takes all of them
  (source ``"similarity"``). The contiguity buffers are not touched.
* Otherwise every layer fills **exactly** ``B`` tokens (the engine needs equal per-layer window
  lengths):

  1. *similarity*: events in rank order while they fit in ``k_s = B - k_c`` tokens; the walk stops
     at the first event that does not fit (EM-LLM stops there too, keeping it when that is the
     nearer fit; here it goes to step 3 instead, so the budget is never exceeded);
  2. *contiguity*: the layer's :class:`~emserve.retrieval.buffers.ContiguityBuffer` is updated with
     the similarity hits and contributes at most ``k_c = int(contiguity_buffer_size * B + 1)``
     tokens (``k_c = 0`` when the buffer is off);
  3. *top-up*: the rank walk resumes where step 1 stopped, skipping events already taken, until the
     budget is full; the last event taken is **truncated to a prefix** ``[start, start + r)`` when
     only ``r`` tokens are left (a neighbour before its hit read in parts: to a suffix, the text nearer
     the hit; :func:`near_parts`). (Deviation from EM-LLM, whose nearest-fit rule lets totals differ
     per layer and exceed the cap. Also, a contiguity share left unused returns to similarity.)

  Below the index's exact threshold every event is scored exactly; above it, candidates are the
  union of the HNSW top-k of every (scored layer, query vector), asked for enough events to cover
  ``candidate_factor`` (1.5) x ``B + k_c`` tokens (doubling when a walk runs short), then scored
  exactly (one hnswlib call per layer for all the step's query vectors).
* **Bounded rescoring** (shared selection, ``rescore_factor > 0``; off by default): the union above grows with
  the memory (one list per scoring layer and query vector, all scored exactly). Instead, every (layer ``l``,
  query vector ``i``) list is ``search_vectors`` HNSW vectors long; its last score ``tau_il`` bounds the score
  of any event it does not hold, so ``UB(e) = sum_il w_il * (s_il(e) if e is in the list else tau_il)``
  (``w_il = scale_il / n``) is an upper bound of the exact score (up to HNSW misses). Candidates are ranked by
  ``UB``, and only the best covering ``rescore_factor * (B + k_c)`` tokens are scored exactly and ranked
  (speed and recall vs exact: ``docs/decisions.md``, "Bounded rescoring").
* **On a device** (``scorer``, a shared selection; ``EpisodicMemory`` on a GPU): every event is scored
  exactly at every step from representatives held in device memory
  (:mod:`~emserve.retrieval.device_scorer`), and
  only the ranking's prefix that the walk below can need comes back to the host. No HNSW.
* Selected events are returned in temporal order with their exact scores.

``per_layer=False`` selects one list for all layers: an event's score is the **sum over the scoring
layers** (``score_layers``; sessions: the first 2/3) of its per-layer scores; one contiguity buffer
is shared. With ``repr_proxy="tokens"`` it is the token-level MaxSim instead (``queries``, 4.): HNSW
candidates and the bounded rescoring's upper bound stay per layer (``sum_l max_j`` bounds ``max_j sum_l``).

**Ranking** (``retrieve(rank=...)``), when a step has several query tokens ``i``:

* ``"mean"``: by ``s(e) = mean_i s_i(e)`` (above). Right when the tokens ask the same thing: a pass-key
  question's last tokens " The pass key is" all point at the key's sentence.
* ``"interleave"``: every token ranks the events by its own ``s_i``; the rank walk takes the event
  with the best mean score first (what the tokens agree on), then every token's best, then their
  second best, ... (each event once; within a round the tokens whose best
  event stands out most go first, :func:`interleave`, measured against the scored events or the query
  sample's, ``interleave_stats``). A question names what it
  wants in a few of its tokens ("... the special magic number for quiet-harbor ..."): in the mean those
  few are outvoted by the generic rest, while in its own list the key word's token ranks the needle's
  event first (``bench/lab/question_queries.py``). HNSW lists are then asked for ``1/t`` of the usual
  length (``t`` tokens share the budget).

Size: the selection rules (ranking, neighbours, contiguity, budget) act on one candidate walk, and
most of the length is their documentation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np

from emserve.retrieval.buffers import ContiguityBuffer, contiguity_tokens
from emserve.retrieval.config import RANKS, Rank, RetrievalConfig
from emserve.retrieval.device_scorer import DeviceScorer
from emserve.retrieval.errors import PlanError
from emserve.retrieval.index import EventIndex
from emserve.retrieval.queries import EncodedQuery, QueryMean, encode_queries
from emserve.retrieval.token_graph import TokenGraph

Source = Literal["similarity", "contiguity", "lexical"]


@dataclass(frozen=True, slots=True)
class SelectedEvent:
    """Event ``id`` placed in the window as tokens ``[start, end)`` of the log.

    ``truncated``: ``[start, end)`` is a part of the event: its start when the budget ended inside it, or
    (a neighbour read in parts, :func:`near_parts`) the part nearest its hit.
    """

    id: int
    start: int
    end: int
    score: float
    source: Source
    truncated: bool = False

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class LayerSelection:
    """One layer's retrieved events, in temporal order."""

    events: tuple[SelectedEvent, ...]

    @property
    def tokens(self) -> int:
        return sum(e.end - e.start for e in self.events)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(e.start, e.end) for e in self.events]

    @property
    def ids(self) -> list[int]:
        return [e.id for e in self.events]


@dataclass(frozen=True)
class RetrievalResult:
    """A step's retrieval. ``layers[l]`` for every layer (the same object for all when shared)."""

    layers: tuple[LayerSelection, ...]
    budget: int
    num_events: int
    memory_tokens: int
    shared: bool
    exact: bool

    @property
    def tokens(self) -> int:
        """Retrieved tokens per layer (equal for every layer)."""
        return self.layers[0].tokens if self.layers else 0


Pick = tuple[int, int, int, Source]
"""A selected event part: ``(event id, first, last, source)``, tokens ``[first, last)`` of the event
(offsets from its start)."""


def select_ranked(
    ranked: np.ndarray,
    sizes: np.ndarray,
    num_events: int,
    budget: int,
    kc: int,
    buffer: ContiguityBuffer | None,
    via: np.ndarray | None = None,
    parts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> list[Pick]:
    """Steps 1-3 of the module docstring over a ranked candidate list.

    Returns the picks in selection order: whole events, except a truncated last one (its prefix).
    Candidates ``>= num_events`` are skipped. ``via[i]`` (optional, parallel to ``ranked``): True
    where ``ranked[i]`` is there as a temporal neighbour of a hit (:func:`with_neighbours`); such
    events are reported as ``"contiguity"`` and never fed to the contiguity buffer as hits.

    ``parts`` (optional, parallel to ``ranked``; :func:`near_parts`): ``(first, last, tail)``, entry
    ``i`` is tokens ``[first[i], last[i])`` of its event instead of the whole event, and an event may
    have several entries (its parts); a truncated last entry keeps its end when ``tail[i]`` (a part
    before its hit: the text nearest the hit), else its start. Without a contiguity buffer the picks
    are a prefix of ``ranked``'s entries.
    """
    if parts is not None and buffer is not None and kc > 0:
        raise PlanError("an event's parts are walked without a contiguity buffer")
    keep = ranked < num_events
    ranked = ranked[keep]
    near = np.zeros(ranked.shape[0], bool) if via is None else np.asarray(via, bool)[keep]
    if parts is None:
        lo = np.zeros(ranked.shape[0], np.int64)
        hi = np.asarray(sizes, np.int64)[ranked]
        tail = np.zeros(ranked.shape[0], bool)
    else:
        lo, hi, tail = (np.asarray(a)[keep] for a in parts)
    ks = budget - kc
    used = 0
    i = 0
    similar: list[int] = []
    out: list[Pick] = []
    while i < ranked.shape[0]:
        c, a, b = int(ranked[i]), int(lo[i]), int(hi[i])
        if used + b - a > ks:
            break
        out.append((c, a, b, "contiguity" if near[i] else "similarity"))
        if not near[i]:
            similar.append(c)
        used += b - a
        i += 1
    chosen = {c for c, _, _, _ in out}
    if buffer is not None and kc > 0:
        buffer.update(similar, sizes, num_events, kc)
        for c in buffer.select(chosen, sizes, num_events, kc):
            out.append((c, 0, int(sizes[c]), "contiguity"))
            chosen.add(c)
            used += int(sizes[c])
    while used < budget and i < ranked.shape[0]:
        c, a, b = int(ranked[i]), int(lo[i]), int(hi[i])
        i += 1
        if parts is None and c in chosen:  # (parts: the walk is a prefix of the entries, each once)
            continue
        take = min(b - a, budget - used)
        a, b = (b - take, b) if tail[i - 1] else (a, a + take)
        out.append((c, a, b, "contiguity" if near[i - 1] else "similarity"))
        chosen.add(c)
        used += take
    return out


MAX_NEIGHBOURS = 16
"""The most temporal neighbours a hit brings on each side (:func:`with_neighbours`)."""


def with_neighbours(ranked: np.ndarray, num_events: int, radius: int, starts: np.ndarray | None = None,
                    ends: np.ndarray | None = None, reach: int = 0, joint: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``ranked`` with each event followed at once by its temporal neighbours ``+1, -1, +2, -2, ...``
    (those in ``0 .. num_events-1``; each event at its first appearance): a hit's neighbours rank with
    the hit, before any lower-ranked event. Returns ``(order, via)``, ``via`` True where the event
    entered as a neighbour rather than by its own rank.

    Each side of a hit holds ``radius`` events, and more while they start (following) or end
    (preceding) within ``reach`` tokens of the hit (``starts``/``ends``: the events' bounds; at most
    :data:`MAX_NEIGHBOURS` a side): short events bring more of them, so a neighbourhood spans about
    the same text whatever the segmentation. ``radius`` 0 and ``reach`` 0: ``ranked`` unchanged.
    With ``reach`` the neighbours come nearest text first: by the tokens between the hit and the
    neighbour (ties: the following one first), so a long event on one side does not push the near
    text of the other side out of a tight budget; without it they alternate ``+1, -1, +2, -2, ...``.

    With ``reach``, the first ``joint`` events of ``ranked`` are read together: the hits first, then
    all their neighbours in one order, nearest text first (ties: the earlier hit's), so that two
    passages one answer needs (a two-hop question's link and fact) both get their near text before
    either gets its far text.

    Why: a fact is often cut in two by a surprise boundary right before its unpredictable value (a
    number, a name), so the sentence naming the key is one event and its value the next; similarity
    finds the first. The following neighbour goes first: a value comes after what names it.
    """
    order, via, _ = neighbour_walk(ranked, num_events, radius, starts, ends, reach, joint)
    return order, via


def neighbour_walk(ranked: np.ndarray, num_events: int, radius: int, starts: np.ndarray | None = None,
                   ends: np.ndarray | None = None, reach: int = 0,
                   joint: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`with_neighbours`, and with each entry the index in ``ranked`` of the hit it came with."""
    ranked = np.asarray(ranked, np.int64)
    reach = 0 if starts is None or ends is None else max(0, int(reach))
    if (radius <= 0 and reach <= 0) or ranked.size == 0:
        return ranked, np.zeros(ranked.shape[0], bool), np.arange(ranked.shape[0], dtype=np.int64)
    fwd = np.full(ranked.shape[0], max(0, radius), np.int64)
    back = fwd.copy()
    if reach > 0:
        assert starts is not None and ends is not None
        st, en = np.asarray(starts[:num_events], np.int64), np.asarray(ends[:num_events], np.int64)
        inside = (ranked >= 0) & (ranked < num_events)
        c = np.clip(ranked, 0, max(num_events - 1, 0))
        after = np.searchsorted(st, en[c] + reach, side="left") - (c + 1)  # start within reach of the end
        before = c - np.searchsorted(en, st[c] - reach, side="right")  # end within reach of the start
        fwd = np.where(inside, np.maximum(fwd, after), fwd)
        back = np.where(inside, np.maximum(back, before), back)
    fwd = np.minimum(fwd, MAX_NEIGHBOURS)
    back = np.minimum(back, MAX_NEIGHBOURS)
    k = int(max(fwd.max(), back.max()))
    steps = [0]
    for d in range(1, k + 1):
        steps += [d, -d]
    offs = np.broadcast_to(np.asarray(steps, np.int64)[None, :], (ranked.shape[0], len(steps)))
    dist = np.abs(offs)
    use = (offs == 0) | ((offs > 0) & (dist <= fwd[:, None])) | ((offs < 0) & (dist <= back[:, None]))
    if reach > 0:  # nearest text first: by the tokens between the hit and the neighbour (ties: following first)
        n = max(num_events, 1)
        nb = np.clip(ranked[:, None] + offs, 0, n - 1)
        gap = np.where(offs > 0, st[nb] - en[c][:, None], st[c][:, None] - en[nb])
        gap = np.where(inside[:, None], np.where(offs == 0, -1, gap), np.arange(offs.shape[1])[None, :])
        gap = np.where(use, gap, np.iinfo(np.int64).max)
        by = np.argsort(gap, axis=1, kind="stable")
        offs, use, gap = np.take_along_axis(offs, by, 1), np.take_along_axis(use, by, 1), np.take_along_axis(gap, by, 1)
    cand = (ranked[:, None] + offs)[use]
    via = (offs != 0)[use]
    row = np.broadcast_to(np.arange(ranked.shape[0])[:, None], use.shape)[use]
    j = min(max(int(joint), 1), ranked.shape[0]) if reach > 0 else 1
    if j > 1:  # the first j rows' entries in one order: by gap (hits: -1), ties by row, then by column
        head = int(use[:j].sum())
        by = np.lexsort((np.arange(head), row[:head], gap[:j][use[:j]]))
        cand[:head], via[:head], row[:head] = cand[:head][by], via[:head][by], row[:head][by]
    ok = (cand >= 0) & (cand < num_events)
    cand, via, row = cand[ok], via[ok], row[ok]
    _, first = np.unique(cand, return_index=True)
    first = np.sort(first)
    return cand[first], via[first], row[first]


def near_parts(order: np.ndarray, via: np.ndarray, row: np.ndarray, ranked: np.ndarray, starts: np.ndarray,
               ends: np.ndarray, reach: int, joint: int = 1,
               part: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A walk of hits and neighbours (:func:`with_neighbours` with a reach; ``row[i]``: the index in
    ``ranked`` of the hit that ``order[i]`` came with) read nearest text first, token by token rather
    than event by event. Returns ``(events, first, last, tail, via)``: entry ``i`` is tokens
    ``[first[i], last[i])`` of event ``events[i]`` (offsets from its start), ``tail[i]`` True for a
    part before its hit (its end is the nearer text), for :func:`select_ranked`.

    * A hit is one entry, the whole event.
    * A neighbour is only read as far as the reach: its tokens within ``reach`` tokens of the hit, cut
      into parts of ``part`` tokens from its near end; a neighbour wholly beyond the reach (there by
      the radius) is left out.
    * Each hit's entries (the first ``joint`` hits': together) go by the tokens between the hit and
      the part, ties in the walk's order, so a long event on one side of a hit no longer takes the
      budget before the near text on the other side.

    Why: in predictable text surprise makes events of up to ``max_block_size`` tokens; taken whole, a
    long neighbour right after a hit spent a small budget on filler while the short events just
    before the hit, holding the start of its sentence, were left out.
    """
    order = np.asarray(order, np.int64)
    n = order.shape[0]
    if n == 0:
        empty = np.zeros(0, np.int64)
        return order, empty, empty, np.zeros(0, bool), np.zeros(0, bool)
    hit = np.asarray(ranked, np.int64)[row]
    st, en = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    size = en[order] - st[order]
    before = order < hit
    gap = np.where(before, st[hit] - en[order], st[order] - en[hit])
    span = np.where(via, np.clip(reach - gap, 0, size), size)  # tokens within reach, from the near end
    count = np.where(via, -(-span // part), 1)
    idx = np.repeat(np.arange(n), count)
    k = np.arange(idx.shape[0]) - np.repeat(np.cumsum(count) - count, count)  # part number within the entry
    near_end = np.where(via[idx], np.minimum(k * part, span[idx]), 0)
    far_end = np.where(via[idx], np.minimum((k + 1) * part, span[idx]), size[idx])
    tail = before[idx] & via[idx]
    first = np.where(tail, size[idx] - far_end, near_end)
    last = np.where(tail, size[idx] - near_end, far_end)
    dist = np.where(via[idx], gap[idx] + k * part, -1)
    group = np.where(row[idx] < max(int(joint), 1), 0, row[idx])
    by = np.lexsort((k, idx, dist, group))
    return order[idx][by], first[by], last[by], tail[by], via[idx][by]


def interleave(per_token: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Column order of ``per_token [tokens, candidates]``: first the candidate with the best mean
    score (the one the tokens agree on), then every token's best candidate, then every token's second
    best, ... (each candidate at its first appearance; ties: the lower column first).
    Within a round the tokens go by how far their best candidate stands out of their scores
    (``(max - mean) / std``): a key word's sharp match before the flat preferences of "the" or a
    newline, which matters when the budget holds only a few events. ``stats``: each token's
    ``(mean, std)`` to use there (default: those of ``per_token``)."""
    mu, sd = (per_token.mean(axis=1), per_token.std(axis=1)) if stats is None else stats
    peak = (per_token.max(axis=1) - mu) / np.where(sd > 0, sd, 1.0)
    rows = per_token[np.argsort(-peak, kind="stable")]
    order = np.argsort(-rows, axis=1, kind="stable")  # [t, c]
    consensus = np.array([int(np.argmax(per_token.mean(axis=0)))])
    flat = np.concatenate([consensus, order.T.ravel()])
    _, first = np.unique(flat, return_index=True)
    return flat[np.sort(first)].astype(np.int64)


def sample_span(n: int, sample: int) -> int:
    """The events a query sample is drawn from, of a table of ``n``: all of them below ``sample`` events,
    else the largest of ``sample``, ``ceil(1.25 * sample)``, ``ceil(1.25^2 * sample)``, ... that is at most ``n``."""
    if n < sample:
        return n
    m = sample
    while (nxt := (5 * m + 3) // 4) <= n:
        m = nxt
    return m


def sample_ids_of(span: int, sample: int) -> np.ndarray:
    """Up to ``sample`` evenly spaced event ids among events ``0 .. span - 1`` (the query sample's events)."""
    return np.unique(np.linspace(0, span - 1, min(span, sample)).round().astype(np.int64))


_TOKEN_LEVEL_BLOCK = 8192
"""Events scored at once by the token-level MaxSim (bounds its ``events x vectors x tokens`` buffer)."""


class Retriever:
    """Per-session retrieval state (the contiguity buffers) over an :class:`EventIndex`."""

    def __init__(
        self,
        index: EventIndex,
        config: RetrievalConfig | None = None,
        *,
        query_mean: QueryMean | None = None,
        query_group: int = 1,
        head_dim: int = 0,
        candidate_factor: float = 1.5,
        scorer: DeviceScorer | None = None,
        graph: TokenGraph | None = None,
    ) -> None:
        """``config``: the session's retrieval settings (None: the defaults); the retriever reads
        ``per_layer``, the contiguity buffer, the query scoring (``center_queries``,
        ``standardize_queries``, ``query_sample``), the scoring layers (``shared_score_layers``) and the
        bounded rescoring (``shared_rescore_factor``, ``shared_search_vectors``).

        The rest is what the session knows and the config does not: ``query_mean``, the stream's mean
        query (needed to center); ``query_group``: query heads per kv head when the table's vectors are
        kv-head keys (queries are then summed over each group; ``head_dim`` needed), else 1.
        ``candidate_factor``: each HNSW list of the union path asks for enough events to cover this many
        times the budget (+ contiguity share), at the memory's mean event size.
        ``scorer``: score a shared selection exactly on a device (:mod:`~emserve.retrieval.device_scorer`)
        instead of the CPU exact / HNSW paths; its layers must be the scoring layers.
        ``graph``: the candidates of a token-level shared selection come from this one graph over token
        vectors (:mod:`~emserve.retrieval.token_graph`, its layers the scoring layers) instead of the
        per-layer HNSW indexes; search is exact while it lags the table.
        """
        config = RetrievalConfig() if config is None else config
        if candidate_factor <= 0:
            raise PlanError(f"need candidate_factor > 0, got {candidate_factor}")
        self._config = config
        self.candidate_factor = candidate_factor
        self.index = index
        self.table = index.table
        self.query_mean = query_mean
        n_layers = index.num_layers
        self.score_layers = tuple(config.score_layers(n_layers))
        self.query_group = query_group
        self.head_dim = head_dim
        self.query_dim = index.dim * query_group
        self._sample: np.ndarray | None = None
        self._sample_ids: np.ndarray | None = None
        self._sample_n = 0
        if scorer is not None and (config.per_layer or scorer.layers != self.score_layers
                                   or scorer.table is not self.table):
            raise PlanError("a device scorer serves a shared selection (per_layer=False) of the same table "
                            "and scoring layers")
        self.scorer = scorer
        self.token_level = config.token_level
        if graph is not None and (not self.token_level or scorer is not None
                                  or tuple(graph.layers) != self.score_layers or graph.table is not self.table):
            raise PlanError("a token graph serves a token-level shared selection on the CPU, of the same table "
                            "and scoring layers")
        self.graph = graph
        if scorer is not None and scorer.token_level != self.token_level:
            raise PlanError("the device scorer's MaxSim (token-level or per layer) must be the config's")
        nbuf = n_layers if config.per_layer else 1
        self.buffers: tuple[ContiguityBuffer, ...] = tuple(ContiguityBuffer() for _ in range(nbuf))

    @property
    def config(self) -> RetrievalConfig:
        return self._config

    @config.setter
    def config(self, config: RetrievalConfig) -> None:
        """Retrieve with other settings from the next step on (a kept session asked with variants). The
        selection's shape stays: ``per_layer`` (the contiguity buffers) and, with a device scorer, the
        scoring layers cannot change."""
        layers = tuple(config.score_layers(self.index.num_layers))
        fixed = self.scorer is not None or self.graph is not None
        if config.per_layer != self._config.per_layer or (fixed and layers != self.score_layers):
            raise PlanError("per_layer (and, on a device or a token graph, the scoring layers) cannot change "
                            "on a retriever")
        if (config.repr_proxy, config.repr_topk) != (self._config.repr_proxy, self._config.repr_topk):
            raise PlanError("the representatives (repr_proxy, repr_topk) are the table's: they cannot change")
        self._config, self.score_layers = config, layers
        self._sample_ids = self._sample = None  # drawn again, by the new query_sample and layers

    @property
    def per_layer(self) -> bool:
        return self._config.per_layer

    def _sync_scorer(self) -> None:
        """The device mirror must hold every event of the table (rows on disk are copied here; the
        others are appended by the table's writer, ``EpisodicMemory``)."""
        assert self.scorer is not None
        self.scorer.sync()
        if self.scorer.count < len(self.table):
            raise PlanError(f"the device mirror holds {self.scorer.count} of {len(self.table)} events")

    def reset_buffers(self) -> None:
        for b in self.buffers:
            b.clear()

    def buffer_state(self) -> list[list[int]]:
        """The contiguity buffers' event ids (oldest first), one list per buffer: JSON for a session file."""
        return [list(b.ids) for b in self.buffers]

    def restore_buffers(self, state: Sequence[Sequence[int]]) -> None:
        """Put back :meth:`buffer_state` (of a retriever with as many buffers)."""
        if len(state) != len(self.buffers):
            raise PlanError(f"{len(state)} saved contiguity buffers for {len(self.buffers)}")
        self.buffers = tuple(ContiguityBuffer(ids) for ids in state)

    def sample_ids(self) -> np.ndarray | None:
        """Up to ``query_sample`` evenly spaced event ids among the first :func:`sample_span` events (cached;
        a new array when the span changes: at every event while the table is smaller than the sample,
        then at each 25% of growth). A function of the table's length alone, so a reopened session
        samples what an uninterrupted one does (the span once depended on when the steps came)."""
        n = len(self.table)
        if n < 2 or self.config.query_sample < 2:
            return None
        m = sample_span(n, self.config.query_sample)
        if self._sample_ids is None or m != self._sample_n:
            self._sample_ids = sample_ids_of(m, self.config.query_sample)
            self._sample_n = m
            self._sample = None
        return self._sample_ids

    def rep_sample(self) -> np.ndarray | None:
        """The representatives ``[L, S, row]`` of the :meth:`sample_ids` events (cached)."""
        ids = self.sample_ids()
        if ids is None:
            return None
        if self._sample is None:  # the layers this retriever scores (rows of the others stay zero: never read)
            sample = np.zeros((self.index.num_layers, len(ids), self.table.dim), np.float32)
            for lay in self.config.indexed_layers(self.index.num_layers):
                sample[lay] = self.table.reps_of(lay, ids)
            self._sample = sample
        return self._sample

    def encode(self, queries: np.ndarray) -> EncodedQuery:
        """A step's queries ready to score (see :mod:`emserve.retrieval.queries`).

        ``queries``: a summary ``[L, H*D]`` / ``[L, H, D]`` or query tokens ``[n, L, H, D]``.
        """
        mean = self.query_mean.mean if (self.config.center_queries and self.query_mean is not None) else None
        if self.scorer is not None:  # standardized on the device, from the mirror (one batched product)
            q = encode_queries(queries, num_layers=self.index.num_layers, query_dim=self.query_dim,
                               group=self.query_group, head_dim=self.head_dim, mean=mean)
            ids = self.sample_ids() if self.config.standardize_queries else None
            if ids is None:
                return q
            self._sync_scorer()
            return EncodedQuery(q.tokens, self.scorer.scales(ids, q.tokens))
        sample = self.rep_sample() if self.config.standardize_queries else None
        return encode_queries(
            queries, num_layers=self.index.num_layers, query_dim=self.query_dim, group=self.query_group,
            head_dim=self.head_dim, mean=mean, rep_sample=sample, vectors=self.index.vectors,
            layers=None if self.per_layer else self.score_layers,
        )

    def token_scores(self, q: EncodedQuery, layer: int | None, ids: np.ndarray | None = None, *,
                     sampled: bool = False) -> np.ndarray:
        """Per query token exact scores ``[n_tokens, len(ids)]`` (their mean over tokens is :meth:`scores`).
        ``sampled``: ``ids`` are among :meth:`sample_ids`, whose rows are read from the cached
        :meth:`rep_sample` instead of the table (the same values, without a gather from the mapping)."""
        if layer is None and self.scorer is not None and ids is None:
            self._sync_scorer()
            return self.scorer.token_scores(q, len(self.table)).cpu().numpy()
        if sampled:
            sample, drawn = self.rep_sample(), self._sample_ids
            assert ids is not None and sample is not None and drawn is not None
            assert np.isin(ids, drawn).all(), "sampled ids must be among the sample's"

            def rows(lay: int, part: np.ndarray) -> np.ndarray:
                pos = np.searchsorted(drawn, part)
                if pos.size and pos[-1] - pos[0] == pos.size - 1:  # sorted and consecutive: a view, no copy
                    return sample[lay, pos[0]: pos[-1] + 1]
                return sample[lay, pos]
        else:
            rows = self.table.reps_of
        if layer is None and self.token_level:
            return self._token_level_scores(q, ids, rows)
        layers = self.score_layers if layer is None else (layer,)
        n = len(self.table) if ids is None else len(ids)
        total = np.zeros((q.tokens.shape[0], n), np.float32)
        for lay in layers:
            reps = self.table.reps(lay) if ids is None else rows(lay, ids)
            total += q.token_layer_scores(lay, reps, self.index.vectors)
        return total

    def scores(self, q: EncodedQuery, layer: int | None, ids: np.ndarray | None = None) -> np.ndarray:
        """Exact scores of events ``ids`` (None: all): one layer's, or (``layer=None``) the shared sum."""
        if layer is None and self.scorer is not None:
            self._sync_scorer()
            return self.scorer.scores(q, ids)
        if layer is None and self.token_level:
            return self._token_level_scores(q, ids).mean(axis=0)
        layers = self.score_layers if layer is None else (layer,)
        n = len(self.table) if ids is None else len(ids)
        if ids is not None and len(layers) > 1:
            self.table.prefetch(layers, ids)
        total = np.zeros(n, np.float32)
        for lay in layers:
            reps = self.table.reps(lay) if ids is None else self.table.reps_of(lay, ids)
            total += q.layer_scores(lay, reps, self.index.vectors)
        return total

    def _token_level_scores(self, q: EncodedQuery, ids: np.ndarray | None,
                            rows: Callable[[int, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """:meth:`token_scores` of the shared selection with the token-level MaxSim, in blocks of events
        (``rows(layer, ids)``: where the rows of ``ids`` come from; the table by default)."""
        if rows is None:
            rows = self.table.reps_of
            if ids is not None:
                self.table.prefetch(self.score_layers, ids)
        n = len(self.table) if ids is None else len(ids)
        out = np.empty((q.tokens.shape[0], n), np.float32)
        for a in range(0, n, _TOKEN_LEVEL_BLOCK):
            b = min(n, a + _TOKEN_LEVEL_BLOCK)
            reps = [self.table.rows(lay, a, b) if ids is None else rows(lay, ids[a:b])
                    for lay in self.score_layers]
            out[:, a:b] = q.token_level_scores(self.score_layers, reps, self.index.vectors)
        return out

    def retrieve(self, queries: np.ndarray | None, budget: int, *,
                 num_events: int | None = None, rank: Rank = "mean", neighbours: int = 0, reach: int = 0,
                 contiguity: bool = True, first: Sequence[int] = (), joint: int = 1, part: int = 0) -> RetrievalResult:
        """Select among events ``0 .. num_events-1`` (default: all) within ``budget`` tokens.

        ``rank``: how several query tokens rank the events (module docstring, "Ranking"): by their mean
        score (``"mean"``), or each token by its own scores, interleaved (``"interleave"``; the
        bounded path always ranks by the mean).

        ``queries``: float32 ``[num_layers, num_heads*head_dim]`` or ``[num_layers, num_heads, head_dim]``
        (``StepResult.queries``), or per-token ``[n, num_layers, num_heads, head_dim]``
        (``StepResult.query_tokens``); encoded by :meth:`encode`. May be None only when everything
        fits (scores are then NaN). Reported scores are :meth:`scores`.

        ``neighbours``: each similarity hit brings its temporal neighbours up to this many events
        each side right after it in the rank walk (:func:`with_neighbours`; 0: none); ``reach``: and
        those within this many tokens of it. ``part`` > 0 (with a reach): the neighbours are read in parts
        of this many tokens, nearest the hit first, each only as far as the reach (:func:`near_parts`);
        0: whole events, nearest first.
        ``contiguity``: False leaves the contiguity buffer out of this step (neither read nor updated),
        its share going to the rank walk.
        ``first``: events ranked before the similarity ranking, in this order (a question's lexical
        matches, :mod:`emserve.retrieval.lexical`), reported as ``"lexical"``; each brings its
        neighbours like a hit. Those ``>= num_events`` are skipped. ``joint``: the first this-many of
        ``first`` are read together, their neighbours nearest text first across them
        (:func:`with_neighbours`).
        """
        n_layers = self.index.num_layers
        n = len(self.table)
        m = n if num_events is None else num_events
        if not 0 <= m <= n:
            raise PlanError(f"num_events {m} outside table of {n} events")
        budget = max(0, int(budget))
        sizes = self.table.sizes
        memory = int(sizes[:m].sum())
        # exact also while the HNSW indexes lag the table (catching up, or a reader in another process)
        exact = self.scorer is not None or self.index.uses_exact(n) or (self.graph is not None and self.graph.lags(n))
        q = None if queries is None else self.encode(queries)

        if m == 0 or budget == 0:
            empty = LayerSelection(())
            return RetrievalResult((empty,) * n_layers, budget, m, memory, not self.per_layer, exact)
        if memory <= budget:
            everything: list[Pick] = [(c, 0, int(sizes[c]), "similarity") for c in range(m)]
            if self.per_layer:
                layers = tuple(self._layer_selection(q, everything, lay) for lay in range(n_layers))
            else:
                layers = (self._layer_selection(q, everything, None),) * n_layers
            return RetrievalResult(layers, budget, m, memory, not self.per_layer, exact)
        if q is None:
            raise PlanError("retrieval needs the step's queries when the memory exceeds the budget")
        if rank not in RANKS:
            raise PlanError(f"unknown rank {rank!r}; use one of {RANKS}")

        cfg = self.config
        kc = contiguity_tokens(budget, cfg.contiguity_buffer_size) if cfg.use_contiguity_buffer and contiguity else 0
        inside = [0 <= int(c) < m for c in first]
        pre = np.asarray([c for c, ok in zip(first, inside, strict=True) if ok], np.int64)
        walk = partial(self._walk, num_events=m, budget=budget, kc=kc, neighbours=neighbours, reach=reach,
                       first=pre, joint=sum(inside[:max(1, joint)]), part=max(0, int(part)))
        led = self._leads_fill(walk, budget) if pre.size and kc == 0 else None
        if led is not None:  # the lexical matches and their neighbours fill the budget: no search
            if self.per_layer:
                layers = tuple(self._layer_selection(q, led, lay) for lay in range(n_layers))
            else:
                layers = (self._layer_selection(q, led, None),) * n_layers
            return RetrievalResult(layers, budget, m, memory, not self.per_layer, exact)
        layers = self._select(q, walk, rank, exact, m, memory, budget + kc, use_buffers=kc > 0)
        distinct = {id(x): x for x in layers}.values()  # a shared selection is one object
        assert all(sel.tokens == budget for sel in distinct), "every layer must fill the budget exactly"
        return RetrievalResult(layers, budget, m, memory, not self.per_layer, exact)

    @staticmethod
    def _leads_fill(walk: Callable[[np.ndarray, ContiguityBuffer | None], list[Pick]],
                    budget: int) -> list[Pick] | None:
        """The picks of the walk over the ``first`` events alone (no ranked event, no buffer) when they fill
        ``budget``, else None. Then they are the whole selection whatever the ranking: the walk reads every
        ``first`` event's entries (hit, neighbours, parts) before any ranked hit's (:func:`neighbour_walk`,
        :func:`near_parts`: entries go by their hit's place, the ``first`` events at the head), and without a
        contiguity buffer the picks are a prefix of the entries (:func:`select_ranked`)."""
        picks = walk(np.zeros(0, np.int64), None)
        return picks if sum(b - a for _, a, b, _ in picks) >= budget else None

    def _layer_selection(self, q: EncodedQuery | None, picks: list[Pick], layer: int | None) -> LayerSelection:
        """``picks`` in temporal order with their exact scores (NaN without queries); an event's parts
        (:func:`near_parts`) are one contiguous range."""
        starts, sizes = self.table.starts, self.table.sizes
        span: dict[int, tuple[int, int, int, Source]] = {}
        for c, a, b, source in picks:
            lo, hi, n, src = span.get(c, (a, b, 0, source))
            span[c] = (min(lo, a), max(hi, b), n + b - a, src)
        ids = np.array(sorted(span), np.int64)
        scores = np.full(ids.shape[0], np.nan, np.float32) if q is None else self.scores(q, layer, ids)
        events = []
        for j, c in enumerate(ids.tolist()):
            a, b, n, source = span[c]
            assert n == b - a, "an event's parts must be taken as one contiguous range"
            s = int(starts[c])
            events.append(SelectedEvent(c, s + a, s + b, float(scores[j]), source, b - a < int(sizes[c])))
        return LayerSelection(tuple(events))

    def _walk(self, ranked: np.ndarray, buf: ContiguityBuffer | None, *, num_events: int, budget: int, kc: int,
              neighbours: int, reach: int, first: np.ndarray, joint: int = 1, part: int = 0) -> list[Pick]:
        """Events ``first`` (lexical matches), then ``ranked``, each with its temporal neighbours (the first
        ``joint`` read together; with a reach and ``part``, nearest tokens first, :func:`near_parts`), selected into
        ``budget`` tokens (:func:`select_ranked`); ``first``'s similarity picks reported as lexical."""
        starts, sizes = self.table.starts, self.table.sizes
        if first.size:
            ranked = np.concatenate([first, ranked[~np.isin(ranked, first)]])
        joint = joint if first.size else 1
        order, via, row = neighbour_walk(ranked, num_events, neighbours, starts, starts + sizes, reach, joint=joint)
        if reach > 0 and part > 0:
            order, lo, hi, tail, via = near_parts(order, via, row, ranked, starts, starts + sizes, reach, joint, part)
            picks = select_ranked(order, sizes, num_events, budget, kc, buf, via, (lo, hi, tail))
        else:
            picks = select_ranked(order, sizes, num_events, budget, kc, buf, via)
        if first.size:
            lexical = set(first.tolist())
            picks = [(c, a, b, "lexical" if c in lexical and src == "similarity" else src) for c, a, b, src in picks]
        return picks

    def _select(self, q: EncodedQuery, walk: Callable[[np.ndarray, ContiguityBuffer | None],
                                                      list[Pick]],
                rank: Rank, exact: bool, m: int, memory: int, need: int,
                use_buffers: bool) -> tuple[LayerSelection, ...]:
        """Every layer's selection: its own ranking and buffer per layer, else one shared list (ranked on
        the device, by bounded rescoring, or exactly among the HNSW candidates)."""
        n_layers, n, sizes = self.index.num_layers, len(self.table), self.table.sizes
        # interleaved tokens each fill ~1/t of the budget: their HNSW lists can be t times shorter
        share = q.tokens.shape[0] if rank == "interleave" else 1
        k = min(n, (n - m) + 16 + math.ceil(self.candidate_factor * need * m / max(memory, 1) / share))
        if self.per_layer:
            sel = []
            for lay in range(n_layers):
                cand = partial(self._candidates, q, (lay,), exact=exact)
                ranked = self._ranked(cand, q, lay, k, n, m, sizes, need, rank)
                sel.append(self._layer_selection(q, walk(ranked, self.buffers[lay] if use_buffers else None), lay))
            return tuple(sel)
        if self.scorer is not None:
            self._sync_scorer()
            if rank == "interleave" and q.tokens.shape[0] > 1:
                ranked = self.scorer.ranked_interleave(q, m, sizes, need, self._stats_ids(m))
            else:
                ranked = self.scorer.ranked_mean(q, m, sizes, need)
        elif not exact and self.config.shared_rescore_factor > 0 and self.graph is None:
            ranked = self._ranked_bounded(q, n, m, sizes, need)
        else:
            ranked = self._ranked(partial(self._candidates, q, self.score_layers, exact=exact), q, None,
                                  k, n, m, sizes, need, rank)
        shared = self._layer_selection(q, walk(ranked, self.buffers[0] if use_buffers else None), None)
        return (shared,) * n_layers

    # ------------------------------------------------------------------ candidates
    def _ranked(self, candidates: Callable[[int], np.ndarray | None], q: EncodedQuery, layer: int | None,
                k: int, n: int, m: int, sizes: np.ndarray, need: int, rank: Rank = "mean") -> np.ndarray:
        """Events ranked by exact score (ties: lower id first) among ``candidates(k)`` (None: all
        events), asking for more candidates until those before ``m`` cover ``need`` tokens;
        ``rank="interleave"``: by :func:`interleave` of the per-token scores."""
        while True:
            ids = candidates(k)
            if ids is None:
                ids = np.arange(m, dtype=np.int64)
                full = True
            else:
                ids = ids[ids < m]
                full = k >= n or int(sizes[ids].sum()) >= need
            if full:
                sub = None if ids.shape[0] == m else ids  # ids < m are unique: m of them are all of them
                if rank == "interleave" and q.tokens.shape[0] > 1:
                    return ids[interleave(self.token_scores(q, layer, sub)[:, :m], self._interleave_stats(q, layer, m))]
                scores = self.scores(q, layer, sub)[:m]
                return ids[np.lexsort((ids, -scores))]
            k = min(n, 2 * k)

    def _stats_ids(self, m: int) -> np.ndarray | None:
        """The events whose scores give :func:`interleave` its token statistics among events ``< m``:
        the query sample's (``interleave_stats="sample"``, at least two of them), else None (the scored
        events' own)."""
        if self.config.interleave_stats != "sample":
            return None
        ids = self.sample_ids()
        ids = None if ids is None else ids[ids < m]
        return ids if ids is not None and ids.shape[0] >= 2 else None

    def _interleave_stats(self, q: EncodedQuery, layer: int | None,
                          m: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Each query token's ``(mean, std)`` over the :meth:`_stats_ids` events (None: no such events)."""
        ids = self._stats_ids(m)
        if ids is None:
            return None
        ts = self.token_scores(q, layer, ids, sampled=True)
        return ts.mean(axis=1), ts.std(axis=1)

    def _candidates(self, q: EncodedQuery, layers: Sequence[int], k: int, *, exact: bool) -> np.ndarray | None:
        """None (score every event) on the exact path; else the union of every query token's first ``k``
        distinct events in the token graph (with one), or in each layer's HNSW index (the exact scores then
        rank them)."""
        if exact:
            return None
        kv = k * self.index.vectors
        try:
            if self.graph is not None:
                rows = list(self.graph.search(self.graph.query_vectors(q.tokens, q.scale), kv))
            elif set(layers) <= set(self.index.layers):
                rows = [row for lay in layers for row in self.index.search_batch(lay, q.tokens[:, lay], kv)[0]]
            else:  # a layer without an HNSW index: exact
                return None
        except RuntimeError:  # hnswlib could not find k results (tiny ef / disconnected graph)
            return None
        found = []
        for row in rows:  # each row's first k distinct events (as EventIndex.search)
            _, first = np.unique(row, return_index=True)
            found.append(row[np.sort(first)[:k]])
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def _ranked_bounded(self, q: EncodedQuery, n: int, m: int, sizes: np.ndarray, need: int) -> np.ndarray:
        """Bounded rescoring (module docstring): events ranked by exact score among the best by the
        upper bound ``UB`` covering ``rescore_factor * need`` tokens; lists grow (doubling) until the
        candidates before ``m`` cover ``need`` tokens, and the exact path takes over when they cannot."""
        nq = q.tokens.shape[0]
        kv = self.config.shared_search_vectors
        if not set(self.score_layers) <= set(self.index.layers):  # a layer without an HNSW index: exact
            scores = self.scores(q, None)[:m]
            return np.lexsort((np.arange(m), -scores)).astype(np.int64)
        while True:
            evs: list[np.ndarray] = []
            gains: list[np.ndarray] = []
            try:
                for lay in self.score_layers:
                    ids, sc = self.index.search_batch(lay, q.tokens[:, lay], kv)
                    w = q.scale[:, lay] / nq
                    tau = sc[:, -1:]
                    key = (ids + np.arange(nq)[:, None] * n).ravel()
                    _, first = np.unique(key, return_index=True)  # each event's best vector in each list
                    evs.append(ids.ravel()[first])
                    gains.append(((sc - tau) * w[:, None]).ravel()[first])
            except RuntimeError:  # hnswlib could not return kv vectors: score everything
                scores = self.scores(q, None)[:m]
                return np.lexsort((np.arange(m), -scores)).astype(np.int64)
            ev = np.concatenate(evs)
            ub = np.bincount(ev, weights=np.concatenate(gains), minlength=n)[:m]
            cand = np.unique(ev[ev < m])
            order = cand[np.lexsort((cand, -ub[cand]))]
            covered = np.cumsum(sizes[order])
            if covered.size and covered[-1] >= need or kv * 2 > self.index.count * self.index.vectors:
                if not covered.size or covered[-1] < need:  # the lists hold everything and still fall short
                    scores = self.scores(q, None)[:m]
                    return np.lexsort((np.arange(m), -scores)).astype(np.int64)
                take = order[: int(np.searchsorted(covered, max(1.0, self.config.shared_rescore_factor) * need)) + 1]
                scores = self.scores(q, None, take)
                return take[np.lexsort((take, -scores))]
            kv *= 2

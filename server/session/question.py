"""A question's window: the question rules of ``docs/recall.md`` that choose what it reads, applied to one
session (the answer's start: :mod:`emserve.server.session.answer`).

Contract
--------
* Called by :meth:`Session.ask_stream <emserve.server.session.session.Session.ask_stream>` while it
  holds the session's lock; reads the session (its memory, tokens, config and engine), never changes it.
* :func:`plan_question`: a probe step gives the question's queries; its content words' rows are kept
  (``question_content_queries``); the lexical matches (``question_lexical``, the second hop
  ``question_bridge``) lead the selection; the planner builds the window (``plan_step(question=True)``).
* Host work (vocabulary reads, lexical search, planning) runs in a worker thread (``host``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from emserve.retrieval.bridge import bridge_hit
from emserve.retrieval.lexical import Vocabulary, lexical_hits
from emserve.retrieval.postings import WordPostings
from emserve.retrieval.retriever import RetrievalResult
from emserve.server.engine.base import SamplingSpec, StepOptions
from emserve.server.logs import current_request_id
from emserve.server.report import PhaseClock
from emserve.server.session.words import content_rows, model_vocabulary

if TYPE_CHECKING:
    from emserve.retrieval.memory import EpisodicMemory
    from emserve.retrieval.plan import WindowPlan
    from emserve.server.engine.base import Engine
    from emserve.server.session.config import MemoryConfig


class AskedSession(Protocol):
    """What the question path reads of a session (:class:`~emserve.server.session.session.Session`)."""

    config: MemoryConfig
    engine: Engine

    @property
    def memory(self) -> EpisodicMemory: ...

    def tokens(self, start: int, end: int) -> np.ndarray: ...

    def token_view(self, start: int, end: int) -> np.ndarray: ...

    async def host(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...


async def plan_question(session: AskedSession, offset: int, q: list[int], sampling: SamplingSpec,
                         clock: PhaseClock) -> tuple[WindowPlan, RetrievalResult | None]:
    """A question's window (probe step, lexical matches, retrieval; the question rules of
    docs/recall.md) and what was retrieved (None: nothing to select)."""
    retrieval = None
    if offset == 0:
        from emserve.retrieval.plan import WindowPlan

        plan = WindowPlan.build(q)
    else:
        planner = session.memory.planner
        lay = planner.layout(offset, len(q), reserve=sampling.max_tokens, question=True)
        queries = None
        per_token = False  # the probe reported one query per question token
        if lay.num_events and lay.budget:  # something to select: a probe step gives the queries
            n_tok = session.config.question.query_tokens
            with clock("probe"):
                probe = await session.engine.step(
                    planner.probe_plan(offset, q), options=StepOptions(surprise=False, query_tokens=n_tok)
                )
            per_token = probe.query_tokens is not None
            queries = probe.query_tokens if per_token else probe.queries
        with clock("retrieve"):
            if queries is not None and per_token and session.config.question.content_queries:
                # off the event loop: the first call per model reads its vocabulary (seconds)
                rows = await session.host(content_rows, session.engine.info.path, q[len(q) - queries.shape[0]:])
                queries = queries[rows]
            lead: tuple[int, ...] = ()
            joint = 1
            if lay.num_events and lay.budget and session.config.question.lexical > 0:
                lead, joint = await session.host(lexical_leads, session, q, lay.num_events)
            plan = await session.host(planner.plan_step, offset, q, queries, reserve=sampling.max_tokens,
                                    question=True, lead=lead, lead_joint=joint)
        plan = dataclasses.replace(plan, capture_log=None)
        retrieval = planner.last_retrieval
    rid = current_request_id()  # the engine's request carries the call's (vLLM's logs, aborts)
    return (dataclasses.replace(plan, request_id=f"{rid}-{os.urandom(4).hex()}") if rid else plan), retrieval

def lexical_leads(session: AskedSession, question_ids: Sequence[int], num_events: int, *,
                  postings: bool = True) -> tuple[tuple[int, ...], int]:
    """The question's lexical matches among the first ``num_events`` events (``question_lexical``), and
    how many of them are read together: 2 when the first has a second hop (``question_bridge``, right
    after it: the two halves of one answer get their near text first), else 1. The words' events come
    from the session's word postings (``postings`` False: from a pass over the stream, the same leads)."""
    vocab = model_vocabulary(session.engine.info.path)
    table = session.memory.table
    n = len(table)
    num_events = min(num_events, n)
    if vocab is None or num_events <= 0:
        return (), 1
    starts = np.asarray(table.starts[:n], np.int64)
    ends = starts + np.asarray(table.sizes[:n], np.int64)
    stems, words = word_postings(session, vocab, starts, ends) if postings else (None, None)
    starts, ends = starts[:num_events], ends[:num_events]
    tokens = session.token_view(int(starts[0]), int(ends[-1]))  # read where the rules look, not copied
    # each hit brings its neighbours (question_neighbours): the next hit is another place
    spacing = session.config.retrieval.question_neighbours
    hits = [int(h) for h in lexical_hits(question_ids, tokens, starts, ends, vocab,
                                         session.config.question.lexical, spacing=spacing, postings=stems)]
    if hits and session.config.question.bridge:  # the second hop goes right after the first hit
        hop = bridge_hit(question_ids, tokens, starts, ends, vocab, hits[0], spacing, postings=words)
        if hop is not None:
            return (hits[0], hop, *(h for h in hits[1:] if h != hop)), 2
    return tuple(hits), 1


def word_postings(session: AskedSession, vocab: Vocabulary, starts: np.ndarray,
                  ends: np.ndarray) -> tuple[WordPostings, WordPostings]:
    """The session's word postings by stem (``Vocabulary.canonical``, the lexical matches) and by exact word
    (``Vocabulary.verbatim``, the second hop), over the events ``starts``/``ends`` (the whole table): built
    at a session's first question, then extended by the events closed since (their tokens only)."""
    cache = session.memory.word_postings
    out = []
    for name, word_of in (("stems", vocab.canonical), ("words", vocab.verbatim)):
        postings = cache.get(name)
        if postings is None or postings.word_of is not word_of:
            postings = cache[name] = WordPostings(word_of)
        k = postings.needs_from(starts, ends)
        if k < starts.shape[0]:
            postings.extend(session.tokens(int(starts[k]), int(ends[-1])), starts, ends)
        out.append(postings)
    return out[0], out[1]

"""A question's window and its answer's first tokens: the question rules of ``docs/recall.md`` applied to
one session.

Contract
--------
* Called by :meth:`Session.ask_stream <emserve.server.session.session.Session.ask_stream>` while it
  holds the session's lock; reads the session (its memory, tokens, config and engine), never changes it.
* :func:`plan_question`: a probe step gives the question's queries; its content words' rows are kept
  (``question_content_queries``); the lexical matches (``question_lexical``, the second hop
  ``question_bridge``) lead the selection; the planner builds the window (``plan_step(question=True)``).
* :func:`first_tokens`: the answer's first tokens by rule (the copied word, ``question_copy``; else the
  first token by contrast with the model's prior, ``question_contrast``), or None for plain greedy.
* :func:`answer_stream`: the rest of the answer from the engine; a greedy answer that restates the question
  is decided again (``question_echo``).
* Host work (vocabulary reads, lexical search, planning) runs in a worker thread (``host``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from emserve.retrieval.bridge import bridge_hit
from emserve.retrieval.lexical import Vocabulary, lexical_hits
from emserve.retrieval.postings import WordPostings
from emserve.retrieval.retriever import RetrievalResult
from emserve.retrieval.verbatim import continuation, grounded, restates
from emserve.server.engine.base import SamplingSpec, StepOptions, StepResult, TokenDelta
from emserve.server.logs import current_request_id
from emserve.server.report import PhaseClock
from emserve.server.session.words import content_rows, model_vocabulary

if TYPE_CHECKING:
    from emserve.retrieval.memory import EpisodicMemory
    from emserve.retrieval.plan import WindowPlan
    from emserve.server.engine.base import Engine
    from emserve.server.session.config import MemoryConfig

COPY_PLAUSIBLE = 0.001
"""``question_copy`` copies a token only if the model gives it at least this probability (after the window,
the question and the tokens copied before it). A weak guard on purpose: the verbatim run is the evidence;
the guard keeps out what the model all but rules out."""
MAX_COPY = 16
"""The most tokens ``question_copy`` copies (the first word of what followed)."""
ECHO_CHOICES = 5
"""``question_echo`` decides again among the model's this-many most likely first tokens (the echo's own
first token and stop tokens aside)."""
ECHO_LOOKAHEAD = 8
"""Tokens each of ``question_echo``'s other first tokens is followed by, greedily, before it is judged."""
ECHO_GROUND = 3
"""The shortest run of an answer the window must say for ``question_echo`` to take it
(:func:`emserve.retrieval.verbatim.grounded`)."""


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

async def first_tokens(session: AskedSession, plan: WindowPlan, question: list[int], window: Sequence[tuple[int, int]],
                        sampling: SamplingSpec, options: StepOptions) -> tuple[list[int], StepResult] | None:
    """The answer's first tokens chosen by a rule, and a StepResult of them (``finish_reason`` set when
    they end the answer: a stop or end-of-sequence token, or ``max_tokens``): the copied word
    (``question_copy``) as far as the model finds it plausible, else the first token by contrast with
    the model's prior (``question_contrast``; :mod:`emserve.server.contrast`). None where no rule
    applies (then the answer is plain greedy): both off, nothing to copy and no contrast, sampling
    (temperature > 0), or no memory in the window."""
    if sampling.temperature > 0 or plan.num_injected == 0 or sampling.max_tokens < 1:
        return None
    rid = plan.request_id
    stops = _stop_ids(session, sampling)
    draft = await session.host(copy_draft, session, question, window) if session.config.question.copy > 0 else []
    draft = draft[: sampling.max_tokens]
    if draft:
        check = dataclasses.replace(plan, new_token_ids=(*plan.new_token_ids, *draft),
                                    request_id=None if rid is None else f"{rid}-copy")
        res = await session.engine.step(check, None, StepOptions(surprise=True, queries=False))
        nats = res.surprise[len(plan.new_token_ids):].tolist()
        limit = -math.log(COPY_PLAUSIBLE)
        kept: list[int] = []
        for token, s_k in zip(draft, nats, strict=True):
            if s_k > limit or token in stops:
                break
            kept.append(token)
        if kept:
            finish = "length" if len(kept) >= sampling.max_tokens else None
            logprobs = [-x for x in nats[: len(kept)]]
            return kept, dataclasses.replace(res, output_token_ids=kept, output_logprobs=logprobs,
                                             finish_reason=finish, surprise=np.zeros(0, np.float32))
    alpha = session.config.question.contrast
    if alpha <= 0:
        return None
    from emserve.retrieval.plan import WindowPlan
    from emserve.server.contrast import TOP_K, contrast_choice

    one = dataclasses.replace(sampling, max_tokens=1, top_logprobs=TOP_K, stop=())
    prior = WindowPlan.build(question, request_id=None if rid is None else f"{rid}-prior")
    with_memory = plan if rid is None else dataclasses.replace(plan, request_id=f"{rid}-first")
    mem, base = await asyncio.gather(session.engine.step(with_memory, one, options),
                                     session.engine.step(prior, one, options))
    token = contrast_choice(mem.top_logprobs[0], base.top_logprobs[0], alpha)
    finish = "stop" if token in stops else ("length" if sampling.max_tokens == 1 else None)
    lp = mem.top_logprobs[0][token]  # contrast_choice picks among the window's listed tokens
    return [token], dataclasses.replace(mem, output_token_ids=[token], output_logprobs=[lp], finish_reason=finish,
                                        top_logprobs=[])

def _stop_ids(session: AskedSession, sampling: SamplingSpec) -> set[int]:
    """The token ids that end an answer: the sampling's stop tokens and, unless ``ignore_eos``, the model's EOS."""
    return set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(session.engine.info.eos_token_ids))


def copy_draft(session: AskedSession, question: list[int], window: Sequence[tuple[int, int]]) -> list[int]:
    """``question_copy``'s draft: the word that followed the question's last words in the window, as
    far as the window holds it (empty: nothing to copy)."""
    vocab = model_vocabulary(session.engine.info.path)
    if vocab is None:
        return []
    segments = [(a, session.tokens(a, b)) for a, b in window if b > a]
    found = continuation(question, segments, vocab, session.config.question.copy)
    if found is None:
        return []
    at = found[1]
    start, ids = next((a, ids) for a, ids in segments if a <= at < a + len(ids))
    following = ids[at - start : at - start + MAX_COPY]
    return [int(t) for t in following[: vocab.first_word(following)]]

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


async def answer_stream(session: AskedSession, plan: WindowPlan, question: list[int], window: Sequence[tuple[int, int]],
                        sampling: SamplingSpec, options: StepOptions, *,
                        guard: bool = True) -> AsyncIterator[TokenDelta | StepResult]:
    """The answer as the engine streams it for ``plan`` (TokenDeltas, then its StepResult), with
    ``question_echo`` (``guard`` and the setting on, greedy, memory in the window): while the answer's
    content tokens are all question words it is held back; when ``question_echo`` of them are
    (:func:`~emserve.retrieval.verbatim.restates`), the stream is stopped and :func:`_decide_again` chooses
    the answer's start, the engine goes on after it, and the StepResult holds the whole answer (the start's
    log-probabilities from a surprise of it). Otherwise the engine's stream as it is."""
    n_echo = session.config.question.echo
    vocab = None
    if guard and n_echo > 0 and sampling.temperature == 0 and plan.num_injected > 0 and sampling.max_tokens > 1:
        vocab = await session.host(model_vocabulary, session.engine.info.path)
    if vocab is None:
        async for item in session.engine.stream(plan, sampling, options):
            yield item
        return
    held: list[int] = []
    watching, echoed = True, False
    stream = session.engine.stream(plan, sampling, options)
    try:
        async for item in stream:
            if isinstance(item, StepResult):
                if watching and held:  # the answer ended undecided: it is what it is
                    yield TokenDelta(tuple(held))
                yield item
                return
            if not watching:
                yield item
                continue
            held.extend(item.token_ids)
            verdict = restates(held, question, vocab, n_echo)
            if verdict is None:
                continue
            if verdict:
                echoed = True
                break
            watching = False
            yield TokenDelta(tuple(held))
    finally:
        await stream.aclose()  # an echo stops it here (the engine aborts the request)
    if not echoed:
        return
    start, finish = await _decide_again(session, plan, question, window, sampling, options, held, vocab)
    start = start[: sampling.max_tokens]
    yield TokenDelta(tuple(start))
    rid = plan.request_id
    rest = dataclasses.replace(plan, new_token_ids=(*plan.new_token_ids, *start),
                               request_id=None if rid is None else f"{rid}-rest")
    left = sampling.max_tokens - len(start)
    stops = _stop_ids(session, sampling)
    if finish is None and start[-1] in stops:
        finish = "stop"
    if finish is not None or left <= 0:  # the start ended the answer; the surprise step gives its log-probabilities
        res = await session.engine.step(rest, None, dataclasses.replace(options, surprise=True))
        lps = (-res.surprise[len(plan.new_token_ids):]).tolist()
        yield dataclasses.replace(res, output_token_ids=list(start), output_logprobs=lps, top_logprobs=[],
                                  finish_reason=finish or "length", surprise=np.zeros(0, np.float32))
        return
    async for item in session.engine.stream(rest, dataclasses.replace(sampling, max_tokens=left),
                                            dataclasses.replace(options, surprise=True)):
        if isinstance(item, StepResult):
            lps = (-item.surprise[len(plan.new_token_ids):]).tolist()
            item = dataclasses.replace(item, output_token_ids=[*start, *item.output_token_ids],
                                       output_logprobs=lps + item.output_logprobs,
                                       top_logprobs=[], surprise=np.zeros(0, np.float32))
        yield item


async def _decide_again(session: AskedSession, plan: WindowPlan, question: list[int],
                        window: Sequence[tuple[int, int]], sampling: SamplingSpec, options: StepOptions,
                        echo: list[int], vocab: Vocabulary) -> tuple[list[int], str | None]:
    """``question_echo``'s choice for an answer that began with ``echo``: the first of the model's
    :data:`ECHO_CHOICES` most likely first tokens (in their order; the echo's first token and stop tokens
    aside) that, followed greedily for :data:`ECHO_LOOKAHEAD` tokens, does not restate the question and
    is said in part by the window (:func:`~emserve.retrieval.verbatim.grounded`, :data:`ECHO_GROUND`): its
    tokens and the finish reason of its lookahead (None: the answer goes on). None chosen: ``echo`` and
    None (the answer goes on as the model began it)."""
    rid = plan.request_id
    stops = _stop_ids(session, sampling)
    one = dataclasses.replace(sampling, max_tokens=1, top_logprobs=ECHO_CHOICES, stop=())
    first = await session.engine.step(plan if rid is None else dataclasses.replace(plan, request_id=f"{rid}-echo"),
                                      one, options)
    ranked = sorted((first.top_logprobs[0] if first.top_logprobs else {}).items(), key=lambda kv: -kv[1])
    others = [t for t, _ in ranked if t != echo[0] and t not in stops][: ECHO_CHOICES - 1]
    if not others:
        return echo, None
    look = dataclasses.replace(sampling, max_tokens=min(ECHO_LOOKAHEAD, sampling.max_tokens - 1))
    steps = await asyncio.gather(*(
        session.engine.step(dataclasses.replace(plan, new_token_ids=(*plan.new_token_ids, t),
                                                request_id=None if rid is None else f"{rid}-echo{i}"), look, options)
        for i, t in enumerate(others)))
    segments = [(a, session.tokens(a, b)) for a, b in window if b > a]
    for t, res in zip(others, steps, strict=True):
        answer = [t, *res.output_token_ids]
        if restates(answer, question, vocab, session.config.question.echo):
            continue
        if grounded(answer, segments, question, vocab, ECHO_GROUND):
            ended = res.finish_reason == "stop" or len(answer) >= sampling.max_tokens  # not the lookahead's cap
            return answer, ("stop" if res.finish_reason == "stop" else "length") if ended else None
    return echo, None

"""An answer's start: the question rules of ``docs/recall.md`` that choose an answer's first tokens (rules
8, 19 and 20), applied to one session's question window.

Contract
--------
* Called by :meth:`Session.ask_stream <emserve.server.session.session.Session.ask_stream>` while it
  holds the session's lock, with the window :func:`~emserve.server.session.question.plan_question` built;
  reads the session, never changes it.
* :func:`first_tokens`: the answer's first tokens by rule (the copied word, ``question_copy``; else the
  first token by contrast with the model's prior, ``question_contrast``), or None.
* :func:`answer_stream`: the rest of the answer from the engine; where no rule chose the first tokens, a
  greedy answer starts with the choice the model reads on best (``question_lookahead``), and an answer
  that restates the question is decided again (``question_echo``).
* Each records in ``chosen["by"]`` the rule that chose the start (``StepReport.answer_start``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from emserve.retrieval.lexical import Vocabulary
from emserve.retrieval.verbatim import continuation, grounded, restates
from emserve.server.engine.base import SamplingSpec, StepOptions, StepResult, TokenDelta
from emserve.server.session.words import model_vocabulary

if TYPE_CHECKING:
    from emserve.retrieval.plan import WindowPlan
    from emserve.server.session.question import AskedSession

COPY_PLAUSIBLE = 0.001
"""``question_copy`` copies a token only if the model gives it at least this probability (after the window,
the question and the tokens copied before it). A weak guard on purpose: the verbatim run is the evidence;
the guard keeps out what the model all but rules out."""
MAX_COPY = 16
"""The most tokens ``question_copy`` copies (the first word of what followed)."""
LOOKAHEAD_CHOICES = 5
"""``question_lookahead`` weighs the model's this-many most likely first tokens (stop tokens aside)."""
ECHO_CHOICES = 5
"""``question_echo`` decides again among the model's this-many most likely first tokens (the echo's own
first token and stop tokens aside)."""
ECHO_LOOKAHEAD = 8
"""Tokens each of ``question_echo``'s other first tokens is followed by, greedily, before it is judged."""
ECHO_GROUND = 3
"""The shortest run of an answer the window must say for ``question_echo`` to take it
(:func:`emserve.retrieval.verbatim.grounded`)."""


def _after(plan: WindowPlan, tokens: Sequence[int], tag: str) -> WindowPlan:
    """``plan`` with ``tokens`` after its new tokens, its request id (if any) tagged ``-tag`` (each engine
    request of one answer is named apart in vLLM's logs and aborts)."""
    rid = plan.request_id
    return dataclasses.replace(plan, new_token_ids=(*plan.new_token_ids, *tokens),
                               request_id=None if rid is None else f"{rid}-{tag}")


def _ranked(res: StepResult) -> list[tuple[int, float]]:
    """The first generated position's listed tokens and log-probabilities, most likely first."""
    return sorted((res.top_logprobs[0] if res.top_logprobs else {}).items(), key=lambda kv: -kv[1])


async def _follow_each(session: AskedSession, plan: WindowPlan, firsts: Sequence[int], sampling: SamplingSpec,
                       options: StepOptions, tag: str) -> list[StepResult]:
    """Each of ``firsts`` after ``plan``, followed as ``sampling`` says; the requests run together."""
    return list(await asyncio.gather(*(session.engine.step(_after(plan, [t], f"{tag}{i}"), sampling, options)
                                       for i, t in enumerate(firsts))))


async def first_tokens(session: AskedSession, plan: WindowPlan, question: list[int], window: Sequence[tuple[int, int]],
                       sampling: SamplingSpec, options: StepOptions,
                       chosen: dict[str, str]) -> tuple[list[int], StepResult] | None:
    """The answer's first tokens chosen by a rule, and a StepResult of them (``finish_reason`` set when
    they end the answer: a stop or end-of-sequence token, or ``max_tokens``): the copied word
    (``question_copy``) as far as the model finds it plausible, else the first token by contrast with
    the model's prior (``question_contrast``; :mod:`emserve.server.contrast`). None where no rule
    applies (then :func:`answer_stream` answers): both off, nothing to copy and no contrast, sampling
    (temperature > 0), or no memory in the window."""
    if sampling.temperature > 0 or plan.num_injected == 0 or sampling.max_tokens < 1:
        return None
    stops = _stop_ids(session, sampling)
    draft = await session.host(copy_draft, session, question, window) if session.config.question.copy > 0 else []
    draft = draft[: sampling.max_tokens]
    if draft:
        res, lps = await _read_after(session, plan, draft, "copy")
        floor = math.log(COPY_PLAUSIBLE)
        kept: list[int] = []
        for token, lp in zip(draft, lps, strict=True):
            if lp < floor or token in stops:
                break
            kept.append(token)
        if kept:
            chosen["by"] = "copy"
            finish = "length" if len(kept) >= sampling.max_tokens else None
            return kept, dataclasses.replace(res, output_token_ids=kept, output_logprobs=lps[: len(kept)],
                                             finish_reason=finish, surprise=np.zeros(0, np.float32))
    alpha = session.config.question.contrast
    if alpha <= 0:
        return None
    from emserve.retrieval.plan import WindowPlan
    from emserve.server.contrast import TOP_K, contrast_choice

    one = dataclasses.replace(sampling, max_tokens=1, top_logprobs=TOP_K, stop=())
    rid = plan.request_id
    prior = WindowPlan.build(question, request_id=None if rid is None else f"{rid}-prior")
    mem, base = await asyncio.gather(session.engine.step(_after(plan, (), "first"), one, options),
                                     session.engine.step(prior, one, options))
    token = contrast_choice(mem.top_logprobs[0], base.top_logprobs[0], alpha)
    chosen["by"] = "contrast"
    finish = "stop" if token in stops else ("length" if sampling.max_tokens == 1 else None)
    lp = mem.top_logprobs[0][token]  # contrast_choice picks among the window's listed tokens
    return [token], dataclasses.replace(mem, output_token_ids=[token], output_logprobs=[lp], finish_reason=finish,
                                        top_logprobs=[])

async def lookahead_start(session: AskedSession, plan: WindowPlan, sampling: SamplingSpec, options: StepOptions,
                          stops: set[int], chosen: dict[str, str]) -> tuple[list[int], StepResult] | None:
    """``question_lookahead``'s start: of the model's :data:`LOOKAHEAD_CHOICES` most likely first tokens (stop
    tokens aside), each followed greedily to ``question_lookahead`` tokens (fewer where the answer ends
    sooner), the one whose tokens have the highest mean log-probability (ties: the model's order) among
    those the retrieved memory supports (``question_lookahead_support``; :func:`supported`), or among all
    where none is or the setting is off; its tokens and a StepResult of them, ``finish_reason`` set when
    they end the answer. None: the setting off (below 2), ``max_tokens`` below 2, or the model's first choice
    ends the answer (the plain answer). ``chosen["by"]`` is set to ``lookahead`` where the start is not the
    model's first choice.

    The greedy start is followed first. Where it is weighed (supported, or the support off), another first
    token ``t`` is followed only if ``log p(t) / n`` exceeds its mean (``n`` the lookahead): a start's mean is
    at most ``log p(t) / k`` for its ``k <= n`` tokens, so no other can win; a confident answer costs one
    request (and the support's one short one)."""
    n = min(session.config.question.lookahead, sampling.max_tokens)
    if n < 2:
        return None
    greedy = await session.engine.step(_after(plan, (), "ahead"),
                                       dataclasses.replace(sampling, max_tokens=n, top_logprobs=LOOKAHEAD_CHOICES),
                                       options)
    if not greedy.output_token_ids or greedy.output_token_ids[0] in stops:
        return None
    delta = session.config.question.lookahead_support
    recent = recent_window(plan) if delta > 0 else None
    starts = [(greedy.output_token_ids[:n], greedy.output_logprobs[:n], greedy)]
    ok = [True]
    if recent is not None:
        ok = await supported(session, recent, [starts[0][:2]], delta)
    top = greedy.output_token_ids[0]
    others = [(t, lp) for t, lp in _ranked(greedy) if t != top and t not in stops][: LOOKAHEAD_CHOICES - 1]
    if ok[0]:
        others = [(t, lp) for t, lp in others if lp / n > float(np.mean(starts[0][1]))]
    steps = await _follow_each(session, plan, [t for t, _ in others], dataclasses.replace(sampling, max_tokens=n - 1),
                               options, "ahead")
    more = [([t, *res.output_token_ids][:n], [lp, *res.output_logprobs][:n], res)
            for (t, lp), res in zip(others, steps, strict=True)]
    if recent is not None and more:
        ok += await supported(session, recent, [(tokens, lps) for tokens, lps, _ in more], delta)
    else:
        ok += [True] * len(more)
    starts += more
    weighed = [i for i, good in enumerate(ok) if good] or list(range(len(starts)))
    best = max(weighed, key=lambda i: (float(np.mean(starts[i][1])), -i))  # ties: the model's order
    if best > 0:
        chosen["by"] = "lookahead"
    tokens, logprobs, res = starts[best]
    finish = "stop" if res.finish_reason == "stop" else ("length" if len(tokens) >= sampling.max_tokens else None)
    return tokens, dataclasses.replace(res, output_token_ids=tokens, output_logprobs=logprobs, top_logprobs=[],
                                       finish_reason=finish)


async def supported(session: AskedSession, recent: WindowPlan, starts: Sequence[tuple[Sequence[int], Sequence[float]]],
                    delta: float) -> list[bool]:
    """Whether the retrieved memory supports each start (its tokens and their log-probabilities in the
    question's window): their mean log-probability exceeds by more than ``delta`` their mean after
    ``recent`` (:func:`recent_window`; one prompt-only request each, run together)."""
    recent_lps = await prior_logprobs(session, recent, [tokens for tokens, _ in starts])
    return [float(np.mean(lps)) - float(np.mean(r)) > delta for (_, lps), r in zip(starts, recent_lps, strict=True)]


def recent_window(plan: WindowPlan) -> WindowPlan | None:
    """``plan`` without its retrieved events: of its injected tokens only the sink and the remainder and
    local tail (``plan.extra["recent"]``, the planner's ``(sink end, remainder start)``), in every layer, in
    their window order; the anchor and the new tokens as they are. None: the plan does not say where they
    lie, or nothing lies between them (no memory to leave out)."""
    from emserve.retrieval.plan import Segment

    recent = plan.extra.get("recent")
    if not isinstance(recent, tuple):
        return None
    sink_end, tail_start = int(recent[0]), int(recent[1])
    if sink_end >= tail_start:
        return None

    def keep(segs: Sequence[Segment]) -> tuple[Segment, ...]:
        out = []
        for s in segs:
            if s.start < sink_end:
                out.append(Segment(s.log, s.start, min(s.end, sink_end)))
            if s.end > tail_start:
                out.append(Segment(s.log, max(s.start, tail_start), s.end))
        return tuple(out)
    if plan.layer_segments is not None:
        return dataclasses.replace(plan, layer_segments=tuple(keep(segs) for segs in plan.layer_segments))
    return dataclasses.replace(plan, segments=keep(plan.segments))


async def prior_logprobs(session: AskedSession, prior: WindowPlan,
                         starts: Sequence[Sequence[int]]) -> list[list[float]]:
    """Each of ``starts``' tokens' log-probabilities after ``prior`` (one prompt-only request each, run
    together)."""
    reads = await asyncio.gather(*(_read_after(session, prior, tokens, f"prior{i}") for i, tokens in enumerate(starts)))
    return [lps for _, lps in reads]


async def _read_after(session: AskedSession, plan: WindowPlan, tokens: Sequence[int],
                      tag: str) -> tuple[StepResult, list[float]]:
    """A prompt-only request of ``tokens`` after ``plan`` (nothing generated, nothing captured): its
    StepResult and each of ``tokens``' log-probabilities there."""
    res = await session.engine.step(_after(plan, tokens, tag), None, StepOptions(surprise=True, queries=False))
    k = len(plan.new_token_ids)
    return res, (-res.surprise[k : k + len(tokens)]).tolist()


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

async def answer_stream(session: AskedSession, plan: WindowPlan, question: list[int], window: Sequence[tuple[int, int]],
                        sampling: SamplingSpec, options: StepOptions, chosen: dict[str, str], *,
                        guard: bool = True) -> AsyncIterator[TokenDelta | StepResult]:
    """The answer as the engine streams it for ``plan`` (TokenDeltas, then its StepResult). With ``guard``
    (no other rule chose the first tokens), greedy sampling and memory in the window: the answer starts
    with :func:`lookahead_start`'s choice (``question_lookahead``) and goes on greedily after it; and
    (``question_echo``) while its content tokens are all question words it is held back; when
    ``question_echo`` of them are (:func:`~emserve.retrieval.verbatim.restates`), the stream is stopped and
    :func:`_decide_again` chooses the answer's start, the engine goes on after it, and the StepResult holds
    the whole answer (the start's log-probabilities from a surprise of it). Otherwise the engine's stream
    as it is. ``chosen["by"]`` is set to the rule that changed the start (``lookahead``, ``echo``)."""
    ruled = guard and sampling.temperature == 0 and plan.num_injected > 0 and sampling.max_tokens > 1
    stops = _stop_ids(session, sampling)
    picked = await lookahead_start(session, plan, sampling, options, stops, chosen) if ruled else None
    start, head = picked if picked is not None else ([], None)
    n_echo = session.config.question.echo
    vocab = await session.host(model_vocabulary, session.engine.info.path) if ruled and n_echo > 0 else None
    if head is not None and head.finish_reason is not None:  # the start is the whole answer
        yield TokenDelta(tuple(start))
        yield head
        return
    run_plan = dataclasses.replace(plan, new_token_ids=(*plan.new_token_ids, *start))
    run_sampling = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - len(start))

    def whole(res: StepResult) -> StepResult:  # the answer with its start
        if head is None:
            return res
        return dataclasses.replace(res, output_token_ids=[*start, *res.output_token_ids],
                                   output_logprobs=head.output_logprobs + res.output_logprobs)
    held = list(start)
    verdict = restates(held, question, vocab, n_echo) if vocab is not None and held else None
    watching, echoed = vocab is not None and verdict is None, bool(verdict)
    if held and not watching and not echoed:
        yield TokenDelta(tuple(held))
    if not echoed:
        stream = session.engine.stream(run_plan, run_sampling, options)
        try:
            async for item in stream:
                if isinstance(item, StepResult):
                    if watching and held:  # the answer ended undecided: it is what it is
                        yield TokenDelta(tuple(held))
                    yield whole(item)
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
    assert vocab is not None
    async for item in _answer_again(session, plan, question, window, sampling, options, held, vocab, chosen):
        yield item


async def _answer_again(session: AskedSession, plan: WindowPlan, question: list[int],
                        window: Sequence[tuple[int, int]], sampling: SamplingSpec, options: StepOptions,
                        echo: list[int], vocab: Vocabulary,
                        chosen: dict[str, str]) -> AsyncIterator[TokenDelta | StepResult]:
    """An answer that began with ``echo`` (a restatement of the question), decided again
    (:func:`_decide_again`) and streamed from its new start (``chosen["by"]`` ``echo`` where it changed)."""
    start, finish = await _decide_again(session, plan, question, window, sampling, options, echo, vocab)
    if start != echo:
        chosen["by"] = "echo"
    start = start[: sampling.max_tokens]
    yield TokenDelta(tuple(start))
    rest = _after(plan, start, "rest")
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
    stops = _stop_ids(session, sampling)
    one = dataclasses.replace(sampling, max_tokens=1, top_logprobs=ECHO_CHOICES, stop=())
    first = await session.engine.step(_after(plan, (), "echo"), one, options)
    others = [t for t, _ in _ranked(first) if t != echo[0] and t not in stops][: ECHO_CHOICES - 1]
    if not others:
        return echo, None
    look = dataclasses.replace(sampling, max_tokens=min(ECHO_LOOKAHEAD, sampling.max_tokens - 1))
    steps = await _follow_each(session, plan, others, look, options, "echo")
    segments = [(a, session.tokens(a, b)) for a, b in window if b > a]
    for t, res in zip(others, steps, strict=True):
        answer = [t, *res.output_token_ids]
        if restates(answer, question, vocab, session.config.question.echo):
            continue
        if grounded(answer, segments, question, vocab, ECHO_GROUND):
            ended = res.finish_reason == "stop" or len(answer) >= sampling.max_tokens  # not the lookahead's cap
            return answer, ("stop" if res.finish_reason == "stop" else "length") if ended else None
    return echo, None

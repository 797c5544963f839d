"""One Generate call: a prompt answered against a session's memory (the Generate RPC minus protobuf).

* The prompt is tokenized (optionally inside the model's chat template) and answered by
  :meth:`Session.ask_stream`: a probe step gives the prompt's queries, retrieval picks the events,
  the engine generates. Tokens stream out as :class:`Chunk` s; the last item is a :class:`Completion`.
* Stop strings are applied here, on the decoded text, for every engine alike: the text is cut before
  the stop string and the engine request is closed (vLLM aborts it).
* ``remember``: the prompt and the generated tokens are appended to the session afterwards (as an
  ingest would), holding the session's writer slot for the whole call. Otherwise the memory is
  unchanged. With a ``request_id`` it is idempotent: a retry of an exchange the session already
  stored (the client saw an error, the exchange got in) answers the stored exchange again and stores
  nothing; the same id with another prompt is INVALID_ARGUMENT.
* Cancelling the consumer closes the engine stream, which aborts the engine request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field

from emserve.retrieval.errors import WindowFull
from emserve.retrieval.retriever import RetrievalResult
from emserve.server.engine.base import SamplingSpec, TokenDelta
from emserve.server.errors import InvalidArgument, LimitExceeded
from emserve.server.rpc.text import StreamDecoder, TextCodec, checked_ids
from emserve.server.session import AskResult
from emserve.server.session.manager import Entry, SessionManager, check_session_id

DEFAULT_MAX_TOKENS = 64
DEFAULT_PREVIEW_TOKENS = 16

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateParams:
    session_id: str
    prompt: str | None = None
    prompt_tokens: Sequence[int] | None = None
    sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec(max_tokens=DEFAULT_MAX_TOKENS))
    stop: tuple[str, ...] = ()
    chat_template: bool = False
    include_trace: bool = False
    remember: bool = False
    preview_tokens: int = DEFAULT_PREVIEW_TOKENS
    request_id: str = ""
    """The client's request id (``GenerateRequest.request_id``; not a generated one): the key that makes
    a remembering Generate idempotent."""


@dataclass(frozen=True)
class Chunk:
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class Trace:
    """A step's retrieval (None: nothing to select, e.g. everything fits the window), a text preview of
    every retrieved event, and the stream's tokens in the step's window (``AskResult.window``)."""

    retrieval: RetrievalResult | None
    previews: dict[int, str]
    window: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Completion:
    finish_reason: str  # "stop" | "length"
    stop_string: str
    token_ids: tuple[int, ...]
    text: str
    prompt_tokens: int
    memory_tokens: int
    window_tokens: int
    retrieved_tokens: int
    timings: dict[str, float]
    trace: Trace | None
    committed_offset: int


class Generator:
    def __init__(self, manager: SessionManager, codec: TextCodec, *, max_session_tokens: int = 0) -> None:
        self.manager = manager
        self.codec = codec
        self.max_session_tokens = max_session_tokens
        self.cancelled = 0  # generations whose consumer went away before the end (tests, metrics)

    def _prompt_ids(self, p: GenerateParams) -> list[int]:
        if p.prompt_tokens is not None:
            if p.chat_template:
                raise InvalidArgument("chat_template", "chat_template needs a text prompt, not prompt_tokens")
            ids = checked_ids(p.prompt_tokens, self.manager.engine.info.vocab_size, "prompt_tokens")
        else:
            text = p.prompt or ""
            ids = self.codec.chat_prompt(text) if p.chat_template else self.codec.encode(text)
        if not ids:
            raise InvalidArgument("prompt", "the prompt is empty")
        return ids

    def _previews(self, entry: Entry, retrieval: RetrievalResult, n: int) -> dict[int, str]:
        out: dict[int, str] = {}
        for layer in retrieval.layers:
            for e in layer.events:
                if e.id not in out:
                    ids = entry.session.tokens(e.start, min(e.end, e.start + n))
                    out[e.id] = self.codec.decode(ids.tolist())
        return out

    def _check_sampling(self, sampling: SamplingSpec) -> None:
        if sampling.max_tokens < 1:
            raise InvalidArgument("sampling.max_tokens", "max_tokens must be >= 1")
        vocab = self.manager.engine.info.vocab_size
        bad = [t for t in sampling.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidArgument("sampling.stop_token_ids",
                                  f"token ids outside the vocabulary (size {vocab}): {bad[:5]}")

    async def _replay(self, entry: Entry, p: GenerateParams, prompt_ids: list[int],
                      t0: float) -> list[Chunk | Completion] | None:
        """The exchange stored under ``p.request_id`` answered again (an idempotent retry), or None. An
        exchange whose append a crash cut short (or never began) is appended to its end first."""
        session = entry.session
        found = await asyncio.to_thread(session.exchange, p.request_id)
        if found is None:
            return None
        rec, held = found
        if rec["prompt"] != prompt_ids:
            raise InvalidArgument("request_id", f"request id {p.request_id!r} was used for another remembered "
                                  "exchange of this session")
        out = tuple(int(t) for t in rec["token_ids"])
        rest = [*prompt_ids, *out][held:]
        if rest:
            appended = await entry.run_commit(lambda: session.append(rest, flush=True), tokens=len(rest))
            self.manager.report(*appended.steps)
        return [Chunk(out, str(rec["text"])), Completion(
            finish_reason=str(rec["finish_reason"]), stop_string=str(rec["stop_string"]), token_ids=out,
            text=str(rec["text"]), prompt_tokens=len(rec["prompt"]), memory_tokens=int(rec["memory_tokens"]),
            window_tokens=0, retrieved_tokens=0, timings={"total_s": time.perf_counter() - t0, "replayed": 1.0},
            trace=None, committed_offset=int(rec["committed_offset"]))]

    async def _remember(self, entry: Entry, p: GenerateParams, prompt_ids: list[int], out_ids: list[int],
                        decoder: StreamDecoder, reason: str, memory_tokens: int) -> int:
        """Append the exchange to the session (with a request id, its record first: it counts only once its
        tokens are in the log); returns the committed offset."""
        session = entry.session
        stored = prompt_ids + out_ids
        if p.request_id:
            start = session.num_tokens
            record = {"start": start, "prompt": prompt_ids, "token_ids": out_ids,
                      "text": decoder.text, "stop_string": decoder.stopped or "", "finish_reason": reason,
                      "memory_tokens": memory_tokens, "committed_offset": start + len(stored)}
            await asyncio.to_thread(session.record_exchange, p.request_id, record)
        appended = await entry.run_commit(lambda: session.append(stored, flush=True))  # quota: admitted up front
        self.manager.report(*appended.steps)
        return appended.committed

    def _check_room(self, need: int) -> None:
        """A remembered exchange that could take its session past ``max_session_tokens`` is refused up front."""
        if self.max_session_tokens and need > self.max_session_tokens:
            raise LimitExceeded("session_tokens", f"remembering this exchange could exceed the session limit of "
                                f"{self.max_session_tokens} tokens", limit=self.max_session_tokens)

    def _completion(self, entry: Entry, p: GenerateParams, planned: dict[str, object], result: AskResult | None,
                    decoder: StreamDecoder, reason: str, prompt_tokens: int, memory_tokens: int, committed: int,
                    clock: tuple[float, float | None, float]) -> Completion:
        """The last message: what was generated, the window's sizes, timings (``clock``: start, first token,
        end) and, when asked, the retrieval trace."""
        t0, t_first, t_end = clock
        retrieval = planned.get("retrieval")
        assert retrieval is None or isinstance(retrieval, RetrievalResult)
        timings: dict[str, float] = dict(planned.get("timings", {}))  # type: ignore[call-overload]
        timings["total_s"] = time.perf_counter() - t0
        out_ids = list(decoder.ids)
        if t_first is not None:
            timings["first_token_s"] = t_first - t0
            if len(out_ids) > 1 and t_end > t_first:
                timings["tokens_per_s"] = (len(out_ids) - 1) / (t_end - t_first)
        trace = None
        if p.include_trace:
            previews = {} if retrieval is None else self._previews(entry, retrieval, p.preview_tokens)
            window = planned.get("window", ())
            assert isinstance(window, tuple)
            trace = Trace(retrieval, previews, window)
        return Completion(
            finish_reason=reason,
            stop_string=decoder.stopped or "",
            token_ids=tuple(out_ids),
            text=decoder.text,
            prompt_tokens=prompt_tokens,
            memory_tokens=memory_tokens,
            window_tokens=result.step.num_injected if result is not None else 0,
            retrieved_tokens=retrieval.tokens if retrieval is not None else 0,
            timings=timings,
            trace=trace,
            committed_offset=committed,
        )

    async def run(self, p: GenerateParams) -> AsyncIterator[Chunk | Completion]:
        sid = check_session_id(p.session_id)
        self._check_sampling(p.sampling)
        t0 = time.perf_counter()
        prompt_ids = self._prompt_ids(p)
        async with self.manager.lease(sid) as entry:
            writer: AbstractAsyncContextManager[object] = (
                self.manager.attach(entry, "a remembering Generate") if p.remember else nullcontext()
            )
            async with writer:
                session = entry.session
                replay = await self._replay(entry, p, prompt_ids, t0) if p.remember and p.request_id else None
                if replay is not None:
                    for item in replay:
                        yield item
                    return
                memory_tokens = session.num_tokens
                if p.remember:
                    self._check_room(memory_tokens + len(prompt_ids) + p.sampling.max_tokens)
                    if entry.quota is not None:  # the disk quota, before anything is generated
                        entry.quota.admit(entry.folder, memory_tokens, len(prompt_ids) + p.sampling.max_tokens)
                planned: dict[str, object] = {}

                def on_plan(retrieval: RetrievalResult | None, timings: dict[str, float],
                            window: tuple[tuple[int, int], ...]) -> None:
                    planned["retrieval"] = retrieval
                    planned["timings"] = dict(timings)
                    planned["window"] = window

                decoder = StreamDecoder(self.codec, p.stop)
                result: AskResult | None = None
                t_first: float | None = None
                done = False
                stream = session.ask_stream(prompt_ids, p.sampling, on_plan=on_plan, on_report=self.manager.report)
                try:
                    async for item in stream:
                        if isinstance(item, TokenDelta):
                            if t_first is None:
                                t_first = time.perf_counter()
                            text = decoder.push(item.token_ids)
                            yield Chunk(tuple(item.token_ids), text)
                            if decoder.stopped is not None:
                                break
                        else:
                            result = item
                    done = True
                except WindowFull as e:
                    raise InvalidArgument(_window_field(e, p), str(e)) from None
                finally:
                    if not done:
                        self.cancelled += 1
                    await stream.aclose()
                tail = decoder.finish()
                if tail:
                    yield Chunk((), tail)
                t_end = time.perf_counter()
                out_ids = list(decoder.ids)
                final_ids = list(result.token_ids) if result is not None else out_ids
                if decoder.stopped is None and final_ids != out_ids:
                    if final_ids[:len(out_ids)] == out_ids:  # the deltas trail the engine's final output: send the rest
                        logger.warning("generation: %d streamed tokens, engine result has %d",
                                       len(out_ids), len(final_ids))
                        tail = decoder.push(final_ids[len(out_ids):]) + decoder.finish()
                        if tail:
                            yield Chunk(tuple(final_ids[len(out_ids):]), tail)
                        out_ids = list(decoder.ids)
                    else:  # an engine bug: what the client saw is what is kept (and remembered)
                        logger.error("generation: the streamed tokens differ from the engine's result "
                                     "(%d vs %d tokens); keeping the streamed ones", len(out_ids), len(final_ids))
                reason = _finish_reason(decoder, result)
                committed = session.num_tokens
                if p.remember:
                    committed = await self._remember(entry, p, prompt_ids, out_ids, decoder, reason, memory_tokens)
                yield self._completion(entry, p, planned, result, decoder, reason, len(prompt_ids), memory_tokens,
                                       committed, (t0, t_first, t_end))


def _window_field(e: WindowFull, p: GenerateParams) -> str:
    """The request field a window too small for the prompt and ``max_tokens`` names: ``sampling.max_tokens``
    when the prompt alone would fit, else the prompt."""
    if e.cause == "reserve":
        return "sampling.max_tokens"
    return "prompt" if p.prompt is not None else "prompt_tokens"


def _finish_reason(decoder: StreamDecoder, result: AskResult | None) -> str:
    if decoder.stopped is not None:
        return "stop"
    if result is not None and result.finish_reason not in ("stop", "length"):
        logger.warning("generation ended with engine finish reason %r", result.finish_reason)
    return "stop" if result is not None and result.finish_reason == "stop" else "length"

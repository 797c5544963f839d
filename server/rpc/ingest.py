"""One ingest stream: data messages in, receipts and commit acks out (the Ingest RPC minus protobuf).

Contract
--------
* The stream holds the session's writer slot (one ingest stream per session) for its lifetime.
* State: ``committed`` (the session's durable token count) and ``pending`` (tokens received after
  it, not yet committed). ``received = committed + len(pending)``.
* A data message's tokens land at ``offset`` (or at ``received`` when unset). An offset beyond
  ``received`` is a gap (InvalidArgument). The part below ``received`` is already held: it is
  checked against what the session holds (a different token there is InvalidArgument) and skipped.
  This makes re-sending after a reconnect idempotent.
* Commit rule (the session's, ``Session.next_chunk``): every full chunk (``exc_block_size`` tokens) is
  committed before the next message is read; ``flush``, ``finish`` and the end of the client's stream
  commit the partial rest too. So a stream buffers at most one chunk plus one message (flow control;
  HTTP/2 holds back the client).
* Commits are shielded (:meth:`Entry.run_commit`): a client that disconnects mid-commit loses
  nothing that the step produces, and the session stays consistent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from emserve.server.errors import InvalidArgument, LimitExceeded, ShuttingDown
from emserve.server.rpc.text import TextCodec, checked_ids
from emserve.server.session.manager import Entry, SessionManager, check_session_id

_TOKENIZE_INLINE_CHARS = 4096  # shorter texts are tokenized on the event loop


@dataclass(frozen=True)
class IngestMessage:
    session_id: str = ""
    offset: int | None = None
    text: str | None = None
    tokens: Sequence[int] | None = None
    flush: bool = False
    finish: bool = False


@dataclass(frozen=True)
class Ready:
    committed_offset: int
    chunk_tokens: int
    max_inflight_messages: int
    max_message_bytes: int
    max_message_tokens: int = 0


@dataclass(frozen=True)
class Receipt:
    index: int
    start: int
    end: int
    skipped: int


@dataclass(frozen=True)
class Ack:
    committed_offset: int
    received_offset: int
    num_events: int
    receipt: Receipt | None = None
    finished: bool = False


@dataclass
class IngestStats:
    """Counters for tests and metrics (no per-token work)."""

    streams: int = 0
    messages: int = 0
    tokens_committed: int = 0
    tokens_skipped: int = 0
    max_pending_tokens: int = 0


class Ingestor:
    """Runs ingest streams against a :class:`SessionManager`."""

    def __init__(self, manager: SessionManager, codec: TextCodec, *, max_inflight_messages: int,
                 max_message_bytes: int, max_session_tokens: int = 0, max_message_tokens: int = 0,
                 draining: asyncio.Event | None = None) -> None:
        self.manager = manager
        self.codec = codec
        self.max_inflight_messages = max_inflight_messages
        self.max_message_bytes = max_message_bytes
        self.max_session_tokens = max_session_tokens
        self.max_message_tokens = max_message_tokens
        """Most tokens of one message (0: no limit): the work one message may ask for is bounded."""
        self.draining = draining or asyncio.Event()
        self.stats = IngestStats()

    async def _tokens(self, msg: IngestMessage) -> list[int]:
        if msg.tokens is not None:
            self._check_size(len(msg.tokens))  # before reading them: a message's work is bounded
            return checked_ids(msg.tokens, self.manager.engine.info.vocab_size, "tokens")
        text = msg.text or ""
        if len(text) <= _TOKENIZE_INLINE_CHARS:
            ids = self.codec.encode(text)
        else:
            ids = await asyncio.to_thread(self.codec.encode, text)
        self._check_size(len(ids))
        return ids

    def _check_size(self, n: int) -> None:
        cap = self.max_message_tokens
        if cap and n > cap:
            raise LimitExceeded("message_tokens", f"an Ingest message of {n} tokens is over the limit of {cap} "
                                "tokens per message; send it in smaller pieces", limit=cap)

    async def run(self, messages: AsyncIterator[IngestMessage], session_id: str = "") -> AsyncIterator[Ready | Ack]:
        """``session_id``: the stream's session named by the call's ``x-session-id`` header; then
        ``ready`` is sent before any message is read, and messages may leave ``session_id`` empty.
        Without it the first message names the session (and ``ready`` answers it)."""
        first: IngestMessage | None = None
        if not session_id:
            first = await anext(messages, None)
            if first is None:
                return
            if not first.session_id:
                raise InvalidArgument("session_id", "the first message must name the session (or the call its "
                                      "x-session-id header)")
        sid = check_session_id(session_id or (first.session_id if first is not None else ""))
        self.stats.streams += 1
        async with self.manager.lease(sid) as entry, self.manager.attach(entry, "an ingest stream"):
            stream = _Stream(self, entry)
            yield Ready(stream.committed, entry.session.config.retrieval.exc_block_size, self.max_inflight_messages,
                        self.max_message_bytes, self.max_message_tokens)
            msg: IngestMessage | None = first if first is not None else await anext(messages, None)
            while msg is not None:
                if msg.session_id and msg.session_id != sid:
                    raise InvalidArgument("session_id", f"stream is for session {sid!r}, message names "
                                          f"{msg.session_id[:128]!r}")
                if msg.text is not None or msg.tokens is not None:
                    yield await stream.receive(msg, await self._tokens(msg))
                acked = False
                async for ack in stream.commit(force=msg.flush or msg.finish):
                    acked = True
                    yield ack
                if msg.flush and not acked and not msg.finish:  # a flush is always answered
                    yield stream.ack()
                if msg.finish:
                    entry.mark_finished()
                    yield stream.ack(finished=True)
                    return
                if self.draining.is_set():
                    raise ShuttingDown(f"server is shutting down; resume from committed offset {stream.committed}",
                                       committed_offset=stream.committed)
                msg = await anext(messages, None)
            async for ack in stream.commit(force=True):
                yield ack


class _Stream:
    def __init__(self, ingestor: Ingestor, entry: Entry) -> None:
        self.ingestor = ingestor
        self.entry = entry
        self.session = entry.session
        self.committed = self.session.num_tokens
        self.pending: list[int] = []
        self.index = 0

    @property
    def received(self) -> int:
        return self.committed + len(self.pending)

    def ack(self, receipt: Receipt | None = None, finished: bool = False) -> Ack:
        table = self.session.event_table
        return Ack(self.committed, self.received, 0 if table is None else len(table), receipt, finished)

    def _check_resent(self, start: int, ids: list[int], skip: int) -> None:
        """The ``skip`` leading tokens of a message at ``start`` must equal what is already held."""
        held_committed = max(0, min(self.committed, start + skip) - start)
        if held_committed:
            have = self.session.tokens(start, start + held_committed).tolist()
            if have != ids[:held_committed]:
                raise InvalidArgument("offset", f"re-sent data at offset {start} differs from the committed "
                                      "tokens there", committed_offset=self.committed)
        lo = max(start, self.committed)
        if skip - held_committed > 0:
            mine = self.pending[lo - self.committed : start + skip - self.committed]
            if mine != ids[lo - start : skip]:
                raise InvalidArgument("offset", f"re-sent data at offset {lo} differs from the data received "
                                      "there", committed_offset=self.committed)

    async def receive(self, msg: IngestMessage, ids: list[int]) -> Ack:
        start = self.received if msg.offset is None else int(msg.offset)
        if start > self.received:
            raise InvalidArgument("offset", f"offset {start} is beyond the data received ({self.received}); "
                                  f"resume from the committed offset {self.committed}",
                                  committed_offset=self.committed, received_offset=self.received)
        skip = min(len(ids), self.received - start)
        self._check_resent(start, ids, skip)
        new = ids[skip:]
        limit = self.ingestor.max_session_tokens
        if limit and self.received + len(new) > limit:
            raise LimitExceeded("session_tokens", f"session would exceed its limit of {limit} tokens",
                                limit=limit, committed_offset=self.committed)
        self.pending.extend(new)
        stats = self.ingestor.stats
        stats.messages += 1
        stats.tokens_skipped += skip
        stats.max_pending_tokens = max(stats.max_pending_tokens, len(self.pending))
        receipt = Receipt(self.index, start, start + len(ids), skip)
        self.index += 1
        return self.ack(receipt)

    async def commit(self, *, force: bool) -> AsyncIterator[Ack]:
        while n := self.session.next_chunk(len(self.pending), flush=force):  # the session's chunk rule
            take = self.pending[:n]
            res = await self.entry.run_commit(lambda take=take: self.session.append(take, flush=True),
                                              tokens=len(take))
            self.committed = res.committed
            self.ingestor.manager.report(*res.steps)
            del self.pending[: len(take)]
            self.ingestor.stats.tokens_committed += len(take)
            yield self.ack()

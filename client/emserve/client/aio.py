"""``emserve.client.aio``: the asyncio client, method for method the twin of :class:`emserve.client.Client`.

    import asyncio
    from emserve.client.aio import AsyncClient

    async def main() -> None:
        async with AsyncClient("127.0.0.1:50051") as c:
            await c.wait_ready()
            s = await c.create_session()
            await c.ingest_text(s.session_id, open("book.txt").read())
            async for piece in c.generate(s.session_id, "Who is the narrator?").text():
                print(piece, end="", flush=True)

    asyncio.run(main())

The contract is :mod:`emserve.client`'s (deadlines, retries on UNAVAILABLE, ingest resumed from the
committed offset with bounded memory, readiness by the health Watch); only the waiting is asyncio's.
``ingest`` takes a plain or an asynchronous iterable of pieces; a plain one (a file) is read in a
worker thread, so reading never blocks the event loop. One client belongs to one event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emserve.api.v1 import emserve_pb2 as pb
from emserve.api.v1 import emserve_pb2_grpc as pb_grpc
from emserve.client import (
    _RETRYABLE,
    DEFAULT_ADDRESS,
    Answer,
    Client,
    ClientError,
    IngestProgress,
    IngestResult,
    _IngestState,
    _Msg,
    channel_options,
    generate_request,
    new_session_id,
    retry_delay,
    split_text,
)

__all__ = ["AsyncClient", "AsyncGenerateStream"]

_END = object()


class AsyncGenerateStream:
    """``async for`` the ``GenerateResponse`` chunks; ``complete`` is set at the end; ``cancel()`` aborts.
    Started again on UNAVAILABLE before the first response, as :class:`emserve.client.GenerateStream`."""

    def __init__(self, start: Callable[[], Any], retries: int = 0) -> None:
        self._start = start
        self._retries = retries
        self._call = start()
        self._cancelled = False
        self.complete: pb.GenerateComplete | None = None

    async def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        attempt = 0
        while True:
            answered = False
            try:
                async for resp in self._call:
                    answered = True
                    if resp.HasField("complete"):
                        self.complete = resp.complete
                    yield resp
                return
            except grpc.aio.AioRpcError as e:
                err = ClientError.from_rpc(e)
                if err.code not in _RETRYABLE or answered or self._cancelled or attempt >= self._retries:
                    raise err from None
            attempt += 1
            await asyncio.sleep(retry_delay(attempt))
            self._call = self._start()

    async def text(self) -> AsyncIterator[str]:
        """Just the text pieces."""
        async for resp in self:
            if resp.HasField("chunk") and resp.chunk.text:
                yield resp.chunk.text

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


async def _pieces(source: Iterable[str | Sequence[int]] | AsyncIterable[str | Sequence[int]]
                  ) -> AsyncIterator[str | Sequence[int]]:
    if isinstance(source, AsyncIterable):
        async for piece in source:
            yield piece
        return
    it = iter(source)

    def step() -> object:
        return next(it, _END)

    while True:
        item: Any = await asyncio.to_thread(step)
        if item is _END:
            return
        yield item


class AsyncClient:
    """Asyncio client; the arguments are :class:`emserve.client.Client`'s."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, token: str | None = None, timeout: float | None = 60.0,
                 generate_timeout: float | None = 600.0, retries: int = 4, max_message_bytes: int = 4 << 20,
                 channel: grpc.aio.Channel | None = None, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self.generate_timeout = generate_timeout
        self.retries = retries
        self._token = token
        options = channel_options(max_message_bytes, retries)
        if channel is None:
            channel = (grpc.aio.insecure_channel(address, options=options) if credentials is None
                       else grpc.aio.secure_channel(address, credentials, options=options))
        self.channel = channel
        self.stub = pb_grpc.SessionServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _md(self, session_id: str | None = None) -> list[tuple[str, str]]:
        return Client._md(self, session_id)  # type: ignore[arg-type]

    async def _unary(self, method: Callable[..., Any], request: Any, session_id: str | None = None,
                     timeout: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._md(session_id))
        except grpc.aio.AioRpcError as e:
            raise ClientError.from_rpc(e) from None

    # ------------------------------------------------------------------ server
    async def health(self, service: str = "") -> str:
        try:
            resp = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.aio.AioRpcError as e:
            raise ClientError.from_rpc(e) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    async def wait_ready(self, timeout: float = 600.0, poll_s: float = 0.5) -> pb.ServerInfo:
        """As :meth:`emserve.client.Client.wait_ready`."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while (left := deadline - time.monotonic()) > 0:
            call = self.health_stub.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=left)
            try:
                async for resp in call:
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        call.cancel()
                        return await self.server_info()
            except grpc.aio.AioRpcError as e:
                err = last = ClientError.from_rpc(e)
                if err.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    break
            await asyncio.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        raise TimeoutError(f"server at {self.address} not ready after {timeout:.0f} s (last error: {last})")

    async def server_info(self) -> pb.ServerInfo:
        return await self._unary(self.stub.GetServerInfo, pb.GetServerInfoRequest())

    # ------------------------------------------------------------------ sessions
    async def create_session(self, session_id: str | None = None, *, memory: Mapping[str, Any] | None = None,
                             labels: Mapping[str, str] | None = None) -> pb.Session:
        sid = session_id or new_session_id()
        req = pb.CreateSessionRequest(session_id=sid, memory=pb.MemoryConfig(**dict(memory or {})),
                                      labels=dict(labels or {}))
        return await self._unary(self.stub.CreateSession, req, sid)

    async def get_session(self, session_id: str) -> pb.Session:
        return await self._unary(self.stub.GetSession, pb.GetSessionRequest(session_id=session_id), session_id)

    async def list_sessions(self, page_size: int = 100) -> AsyncIterator[pb.Session]:
        token = ""
        while True:
            resp = await self._unary(self.stub.ListSessions,
                                     pb.ListSessionsRequest(page_size=page_size, page_token=token))
            for s in resp.sessions:
                yield s
            token = resp.next_page_token
            if not token:
                return

    async def delete_session(self, session_id: str) -> None:
        await self._unary(self.stub.DeleteSession, pb.DeleteSessionRequest(session_id=session_id), session_id)

    # ------------------------------------------------------------------ ingest
    async def ingest_text(self, session_id: str, text: str, *, piece_chars: int = 8192, **kw: Any) -> IngestResult:
        return await self.ingest(session_id, split_text(text, piece_chars), **kw)

    async def ingest_tokens(self, session_id: str, ids: Sequence[int], *, piece_tokens: int = 2048,
                            **kw: Any) -> IngestResult:
        pieces = [list(ids[i : i + piece_tokens]) for i in range(0, len(ids), piece_tokens)]
        return await self.ingest(session_id, pieces, **kw)

    async def ingest(self, session_id: str,
                     pieces: Iterable[str | Sequence[int]] | AsyncIterable[str | Sequence[int]], *,
                     finish: bool = False, max_inflight: int = 8,
                     on_progress: Callable[[IngestProgress], None] | None = None, retries: int = 5,
                     retry_wait_s: float = 600.0) -> IngestResult:
        """As :meth:`emserve.client.Client.ingest`: returns when every piece is committed."""
        t0 = time.perf_counter()
        st = _IngestState()
        wake = asyncio.Condition()
        source = _pieces(pieces).__aiter__()
        reconnects = 0
        while True:
            call = self.stub.Ingest(self._ingest_requests(session_id, st, wake, source, finish),
                                    metadata=self._md(session_id))
            try:
                async for resp in call:
                    Client._on_ingest_response(st, resp, max_inflight)
                    async with wake:
                        wake.notify_all()
                    if on_progress is not None and resp.HasField("ack"):
                        a = resp.ack
                        on_progress(IngestProgress(a.committed_offset, a.received_offset, a.num_events,
                                                   st.sent_total, reconnects))
                break
            except grpc.aio.AioRpcError as e:
                err = ClientError.from_rpc(e)
                if err.code not in _RETRYABLE or reconnects >= retries:
                    raise err from None
                reconnects += 1
                retry = err.detail(error_details_pb2.RetryInfo)
                delay = retry.retry_delay.ToTimedelta().total_seconds() if retry is not None else 0.0
                await asyncio.sleep(min(max(delay, 0.1 * 2**reconnects), 10.0))
                await self.wait_ready(timeout=retry_wait_s)
            finally:
                st.stream += 1  # ends a request generator still waiting on this stream
                st.ready = False
                st.unreceipted = 0
                st.sent = {}
                st.sent_in_stream = 0
                async with wake:
                    wake.notify_all()
        if st.base is None:  # nothing was sent
            st.base = st.committed = (await self.get_session(session_id)).num_tokens
        return IngestResult(session_id, st.base, st.committed, st.events, st.sent_total, reconnects,
                            time.perf_counter() - t0, st.finished)

    @staticmethod
    async def _ingest_requests(session_id: str, st: _IngestState, wake: asyncio.Condition,
                               source: AsyncIterator[str | Sequence[int]], finish: bool
                               ) -> AsyncIterator[pb.IngestRequest]:
        """One stream's requests, as the blocking client's: first the unconfirmed ones again, then new pieces."""
        stream = st.stream
        resend = list(st.messages)
        first = True
        while True:
            if resend:
                msg = resend.pop(0)
            elif st.exhausted:
                break
            else:
                try:
                    payload = await source.__anext__()
                except StopAsyncIteration:
                    st.exhausted = True
                    break
                msg = _Msg(payload if isinstance(payload, str) else [int(t) for t in payload], st.pieces)
                st.pieces += 1
                st.messages.append(msg)
            req = pb.IngestRequest(session_id=session_id)
            if msg.start is not None:
                req.offset = msg.start
            elif first and st.base is not None:
                req.offset = st.prev_end  # a resumed stream starts where the last committed message ended
            if isinstance(msg.payload, str):
                req.text = msg.payload
            else:
                req.tokens.ids.extend(msg.payload)
            if not first:  # the first message opens the stream; the rest wait for `ready` and credit
                async with wake:
                    await wake.wait_for(lambda: st.stream != stream or (st.ready and st.unreceipted < st.inflight))
            if st.stream != stream:
                return
            st.unreceipted += 1
            st.sent_total += 1
            st.sent[st.sent_in_stream] = msg
            st.sent_in_stream += 1
            first = False
            yield req
        if finish:
            yield pb.IngestRequest(session_id=session_id, finish=True)

    # ------------------------------------------------------------------ generate
    def generate(self, session_id: str, prompt: str | Sequence[int], *, timeout: float | None = None,
                 **kw: Any) -> AsyncGenerateStream:
        """As :meth:`emserve.client.Client.generate` (the same keyword arguments)."""
        req = generate_request(session_id, prompt, **kw)
        deadline = timeout or self.generate_timeout
        return AsyncGenerateStream(lambda: self.stub.Generate(req, timeout=deadline, metadata=self._md(session_id)),
                                   self.retries)

    async def ask(self, session_id: str, prompt: str | Sequence[int], **kw: Any) -> Answer:
        stream = self.generate(session_id, prompt, **kw)
        async for _ in stream:
            pass
        if stream.complete is None:
            raise ClientError(grpc.StatusCode.INTERNAL, "the stream ended without a completion")
        return Answer(stream.complete.text, list(stream.complete.token_ids), stream.complete)

    # ------------------------------------------------------------------ inspect
    async def list_events(self, session_id: str, *, preview: bool = False, preview_tokens: int = 0,
                          page_size: int = 500) -> AsyncIterator[pb.Event]:
        token = ""
        while True:
            req = pb.ListEventsRequest(session_id=session_id, page_size=page_size, page_token=token,
                                       include_preview=preview, preview_tokens=preview_tokens)
            resp = await self._unary(self.stub.ListEvents, req, session_id)
            for e in resp.events:
                yield e
            token = resp.next_page_token
            if not token:
                return

    async def surprise(self, session_id: str, start: int = 0, end: int | None = None,
                       stride: int = 1) -> pb.SurpriseCurve:
        req = pb.GetSurpriseRequest(session_id=session_id, start=start, stride=stride)
        if end is not None:
            req.end = end
        return await self._unary(self.stub.GetSurprise, req, session_id)

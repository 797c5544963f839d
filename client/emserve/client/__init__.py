"""``emserve.client``: a small typed Python client of the emserve gRPC API, blocking (:class:`Client`);
the asyncio twin is :class:`emserve.client.aio.AsyncClient`.

    from emserve.client import Client, split_stream

    with Client("127.0.0.1:50051") as c:
        c.wait_ready()
        s = c.create_session()
        with open("book.txt") as f:
            c.ingest(s.session_id, split_stream(f, 8192))
        print(c.ask(s.session_id, "Who is the narrator?").text)

Responses are the API's protobuf messages (``emserve.api.v1.emserve_pb2``, typed through
their ``.pyi`` stubs); failures raise :class:`ClientError` with the status code and the server's
google.rpc details.

Contract:

* Every call has a deadline: ``timeout`` (60 s) for unary calls, ``generate_timeout`` (600 s) for a
  generation; ``None`` waits forever.
* A call that fails with UNAVAILABLE before the server answered anything (server restarting, engine
  loading, connection refused) is tried again with exponential backoff, up to ``retries`` more
  attempts: the reads (GetServerInfo, GetSession, ListSessions, ListEvents, GetSurprise) by gRPC
  itself (:func:`service_config`), Generate by the client (:class:`GenerateStream`; gRPC's retry
  policy on a server-streaming call hung in the crash harness, grpcio 1.85). A Generate carries a
  request id (one is made up when not given), so a retried remembering generation is stored once
  (see ``request_id`` in the .proto). CreateSession and DeleteSession are not retried: a lost answer
  would turn a retry into ALREADY_EXISTS / NOT_FOUND.
* :meth:`Client.ingest` resumes after a dropped connection or a server restart from the last
  committed offset without duplicating anything (see the Ingest RPC in the .proto); its memory is
  bounded by ``max_inflight`` pieces whatever the length of the source.
* :meth:`Client.wait_ready` follows the health service's ``Watch`` of ``readiness`` (no polling while
  connected).

Size: the blocking client is one module, so that its users read one file; ``aio`` reuses its
messages, errors and ingest bookkeeping.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from emserve.api.v1 import emserve_pb2 as pb
from emserve.api.v1 import emserve_pb2_grpc as pb_grpc

__all__ = ["Answer", "Client", "ClientError", "GenerateStream", "IngestProgress", "IngestResult", "pb",
           "service_config", "split_stream", "split_text"]

DEFAULT_ADDRESS = "127.0.0.1:50051"
SERVICE = "emserve.v1.SessionService"
# Methods gRPC retries on UNAVAILABLE (see the module's contract): the reads. Generate: GenerateStream.
RETRIED_METHODS = ("GetServerInfo", "GetSession", "ListSessions", "ListEvents", "GetSurprise")
_DETAIL_TYPES = (error_details_pb2.ErrorInfo, error_details_pb2.ResourceInfo, error_details_pb2.BadRequest,
                 error_details_pb2.QuotaFailure, error_details_pb2.PreconditionFailure, error_details_pb2.RetryInfo)
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


def service_config(retries: int = 4) -> str:
    """The channel's gRPC service config: ``retries`` more attempts (0: none) of :data:`RETRIED_METHODS`
    and the health Check on UNAVAILABLE, with backoff from 0.2 s doubling to at most 5 s (gRPC jitters
    it). gRPC retries a call only while the server has not answered anything, so no streamed answer is
    ever replayed."""
    if retries < 0:
        raise ValueError("retries must be >= 0")
    names = [{"service": SERVICE, "method": m} for m in RETRIED_METHODS]
    names.append({"service": "grpc.health.v1.Health", "method": "Check"})
    method: dict[str, Any] = {"name": names}
    if retries:
        method["retryPolicy"] = {"maxAttempts": min(retries + 1, 5),  # gRPC caps attempts at 5
                                 "initialBackoff": "0.2s", "maxBackoff": "5s", "backoffMultiplier": 2,
                                 "retryableStatusCodes": ["UNAVAILABLE"]}
    return json.dumps({"methodConfig": [method]})


def channel_options(max_message_bytes: int, retries: int) -> list[tuple[str, Any]]:
    """The options of the channels both clients open (message sizes, retries)."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_retries", 1 if retries else 0),
            ("grpc.service_config", service_config(retries))]


def new_request_id() -> str:
    """A fresh Generate request id (the key that makes a remembering generation idempotent)."""
    return f"r-{uuid.uuid4().hex}"


def generate_request(session_id: str, prompt: str | Sequence[int], *, max_tokens: int | None = None,
                     temperature: float = 0.0, top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                     stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                     chat_template: bool = False, trace: bool = False, remember: bool = False,
                     preview_tokens: int = 0, request_id: str = "") -> pb.GenerateRequest:
    """The GenerateRequest of :meth:`Client.generate` (a request id made up when empty)."""
    sampling = pb.SamplingParams(temperature=temperature, top_k=top_k, stop=list(stop),
                                 stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos)
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    req = pb.GenerateRequest(session_id=session_id, sampling=sampling, chat_template=chat_template,
                             include_trace=trace, remember=remember, preview_tokens=preview_tokens,
                             request_id=request_id or new_request_id())
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_tokens.ids.extend(int(t) for t in prompt)
    return req


def new_session_id() -> str:
    """A fresh session id, chosen on the client side (see :meth:`Client.create_session`)."""
    return f"s-{uuid.uuid4().hex[:16]}"


class ClientError(Exception):
    """A failed call: ``code`` (grpc.StatusCode), ``message``, ``reason`` (ErrorInfo), ``details``."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[Any] = ()) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.details = list(details)

    @property
    def reason(self) -> str:
        for d in self.details:
            if isinstance(d, error_details_pb2.ErrorInfo):
                return str(d.reason)
        return ""

    def detail(self, kind: type) -> Any:
        return next((d for d in self.details if isinstance(d, kind)), None)

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> ClientError:
        details: list[Any] = []
        try:
            status = rpc_status.from_call(e)  # type: ignore[arg-type]
        except (AttributeError, ValueError):
            status = None
        if status is not None:
            for any_msg in status.details:
                for kind in _DETAIL_TYPES:
                    if any_msg.Is(kind.DESCRIPTOR):
                        d = kind()
                        any_msg.Unpack(d)
                        details.append(d)
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        message = e.details() if hasattr(e, "details") else str(e)
        return cls(code, message or "", details)


def split_text(text: str, max_chars: int) -> Iterator[str]:
    """Pieces of at most ``max_chars`` characters, cut before a whitespace character when possible
    (so that each piece, tokenized on its own, gives the tokens of the unsplit text)."""
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    i, n = 0, len(text)
    while i < n:
        j = min(n, i + max_chars)
        if j < n:
            k = j
            while k > i + 1 and not text[k].isspace():
                k -= 1
            if k > i + 1:
                j = k
        yield text[i:j]
        i = j


def split_stream(f: TextIO, max_chars: int) -> Iterator[str]:
    """:func:`split_text` over a text stream (a file, stdin), read ``max_chars`` at a time: memory stays
    bounded by a few pieces however long the stream is. The pieces are those of :func:`split_text` on
    the whole text."""
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    buf = ""
    while True:
        block = f.read(max_chars)
        buf += block
        if not block:
            yield from split_text(buf, max_chars)
            return
        while len(buf) > max_chars:  # a whole piece and the character after its end are known
            piece = next(split_text(buf, max_chars))
            yield piece
            buf = buf[len(piece):]


@dataclass(frozen=True)
class IngestProgress:
    committed_offset: int
    received_offset: int
    num_events: int
    messages_sent: int
    reconnects: int


@dataclass(frozen=True)
class IngestResult:
    session_id: str
    start_offset: int        # committed offset before this ingest
    committed_offset: int    # after it
    num_events: int
    messages: int
    reconnects: int
    seconds: float
    finished: bool

    @property
    def tokens(self) -> int:
        return self.committed_offset - self.start_offset


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: list[int]
    complete: pb.GenerateComplete

    @property
    def trace(self) -> pb.RetrievalTrace | None:
        return self.complete.trace if self.complete.HasField("trace") else None


@dataclass
class _Msg:
    payload: str | list[int]
    ordinal: int  # position among the pieces of this ingest call
    start: int | None = None
    end: int | None = None


def retry_delay(attempt: int) -> float:
    """Backoff before retry ``attempt`` (1, 2, ...): 0.2 s doubling, at most 5 s, jittered by ±20%."""
    return min(0.2 * 2 ** (attempt - 1), 5.0) * random.uniform(0.8, 1.2)


class GenerateStream:
    """Iterate for ``GenerateResponse`` chunks; ``complete`` is set at the end; ``cancel()`` aborts.

    A call that fails with UNAVAILABLE before its first response is started again (the same request,
    so the same request id), up to ``retries`` times with :func:`retry_delay`; once a response has
    arrived, a failure is the caller's."""

    def __init__(self, start: Callable[[], Any], retries: int = 0) -> None:
        self._start = start
        self._retries = retries
        self._call = start()
        self._cancelled = False
        self.complete: pb.GenerateComplete | None = None

    def __iter__(self) -> Iterator[pb.GenerateResponse]:
        attempt = 0
        while True:
            answered = False
            try:
                for resp in self._call:
                    answered = True
                    if resp.HasField("complete"):
                        self.complete = resp.complete
                    yield resp
                return
            except grpc.RpcError as e:
                err = ClientError.from_rpc(e)
                if err.code not in _RETRYABLE or answered or self._cancelled or attempt >= self._retries:
                    raise err from None
            attempt += 1
            time.sleep(retry_delay(attempt))
            self._call = self._start()

    def text(self) -> Iterator[str]:
        """Just the text pieces."""
        for resp in self:
            if resp.HasField("chunk") and resp.chunk.text:
                yield resp.chunk.text

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


@dataclass
class _IngestState:
    """Shared by the response loop (caller's thread) and the request iterator (a gRPC thread)."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    messages: list[_Msg] = field(default_factory=list)  # sent, not yet known to be committed, in order
    base: int | None = None     # committed offset when this ingest started
    prev_end: int = 0           # end of the last message known to be committed
    committed: int = 0
    events: int = 0
    finished: bool = False
    exhausted: bool = False
    stream: int = 0             # bumped when a stream ends
    ready: bool = False
    inflight: int = 8
    unreceipted: int = 0
    sent_total: int = 0
    sent: dict[int, _Msg] = field(default_factory=dict)  # this stream's unreceipted messages by stream index
    sent_in_stream: int = 0     # data messages sent on this stream (the next one's index)
    pieces: int = 0             # pieces taken from the source so far


class Client:
    """Blocking client. ``token``: bearer token; ``timeout``: default deadline of unary calls (s);
    ``generate_timeout``: of a generation; ``retries``: see :func:`service_config`."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, token: str | None = None, timeout: float | None = 60.0,
                 generate_timeout: float | None = 600.0, retries: int = 4, max_message_bytes: int = 4 << 20,
                 channel: grpc.Channel | None = None, credentials: grpc.ChannelCredentials | None = None) -> None:
        """``credentials``: TLS to a server started with a certificate, e.g.
        ``grpc.ssl_channel_credentials(ca_pem)`` (with ``private_key`` and ``certificate_chain`` for mutual TLS).
        ``channel``: a channel of your own (its options replace the client's retries and message sizes)."""
        self.address = address
        self.timeout = timeout
        self.generate_timeout = generate_timeout
        self.retries = retries
        self._token = token
        options = channel_options(max_message_bytes, retries)
        if channel is None:
            channel = (grpc.insecure_channel(address, options=options) if credentials is None
                       else grpc.secure_channel(address, credentials, options=options))
        self.channel = channel
        self.stub = pb_grpc.SessionServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _md(self, session_id: str | None = None) -> list[tuple[str, str]]:
        md = []
        if self._token:
            md.append(("authorization", f"Bearer {self._token}"))
        if session_id:
            md.append(("x-session-id", session_id))
        return md

    def _unary(self, method: Callable[..., Any], request: Any, session_id: str | None = None,
               timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._md(session_id))
        except grpc.RpcError as e:
            raise ClientError.from_rpc(e) from None

    # ------------------------------------------------------------------ server
    def health(self, service: str = "") -> str:
        """``SERVING`` / ``NOT_SERVING`` / ... of a health service name (``""``: liveness)."""
        try:
            resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError as e:
            raise ClientError.from_rpc(e) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def wait_ready(self, timeout: float = 600.0, poll_s: float = 0.5) -> pb.ServerInfo:
        """Wait until readiness is SERVING (the engine is loaded); returns the server info. Follows the
        health service's Watch stream; while the server cannot be reached it tries again every ``poll_s``."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while (left := deadline - time.monotonic()) > 0:
            try:
                for resp in self.health_stub.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=left):
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return self.server_info()
            except grpc.RpcError as e:
                last = ClientError.from_rpc(e)
                if last.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    break
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        raise TimeoutError(f"server at {self.address} not ready after {timeout:.0f} s (last error: {last})")

    def server_info(self) -> pb.ServerInfo:
        return self._unary(self.stub.GetServerInfo, pb.GetServerInfoRequest())

    # ------------------------------------------------------------------ sessions
    def create_session(self, session_id: str | None = None, *, memory: Mapping[str, Any] | None = None,
                       labels: Mapping[str, str] | None = None) -> pb.Session:
        """Create a session. Without ``session_id`` the client chooses one (``s-`` and 16 hex digits)
        before the call: a gateway routes every call of a session by its ``x-session-id`` header, the
        creation included, so the replica that creates it is the one its later calls reach."""
        sid = session_id or new_session_id()
        req = pb.CreateSessionRequest(session_id=sid, memory=pb.MemoryConfig(**dict(memory or {})),
                                      labels=dict(labels or {}))
        return self._unary(self.stub.CreateSession, req, sid)

    def get_session(self, session_id: str) -> pb.Session:
        return self._unary(self.stub.GetSession, pb.GetSessionRequest(session_id=session_id), session_id)

    def list_sessions(self, page_size: int = 100) -> Iterator[pb.Session]:
        token = ""
        while True:
            resp = self._unary(self.stub.ListSessions, pb.ListSessionsRequest(page_size=page_size, page_token=token))
            yield from resp.sessions
            token = resp.next_page_token
            if not token:
                return

    def delete_session(self, session_id: str) -> None:
        self._unary(self.stub.DeleteSession, pb.DeleteSessionRequest(session_id=session_id), session_id)

    # ------------------------------------------------------------------ ingest
    def ingest_text(self, session_id: str, text: str, *, piece_chars: int = 8192, **kw: Any) -> IngestResult:
        """Stream ``text`` in pieces cut before whitespace (see :meth:`ingest`)."""
        return self.ingest(session_id, split_text(text, piece_chars), **kw)

    def ingest_tokens(self, session_id: str, ids: Sequence[int], *, piece_tokens: int = 2048,
                      **kw: Any) -> IngestResult:
        pieces = (list(ids[i : i + piece_tokens]) for i in range(0, len(ids), piece_tokens))
        return self.ingest(session_id, pieces, **kw)

    def ingest(self, session_id: str, pieces: Iterable[str | Sequence[int]], *, finish: bool = False,
               max_inflight: int = 8, on_progress: Callable[[IngestProgress], None] | None = None,
               on_receipt: Callable[[int, int, int], None] | None = None, retries: int = 5,
               retry_wait_s: float = 600.0) -> IngestResult:
        """Append ``pieces`` (texts or token-id lists) to a session; returns when all are committed.

        Keeps at most ``max_inflight`` messages (and the server's limit) ahead of their receipts.
        On UNAVAILABLE (connection lost, server restarting) it waits for the server to be ready
        again (up to ``retry_wait_s``) and resumes from the committed offset, up to ``retries`` times:
        messages not known to be committed are re-sent with their offsets, and the server skips what
        it already holds.
        """
        t0 = time.perf_counter()
        st = _IngestState()
        source = iter(pieces)
        reconnects = 0
        while True:
            call = self.stub.Ingest(self._ingest_requests(session_id, st, source, finish, max_inflight),
                                    metadata=self._md(session_id))
            try:
                for resp in call:
                    landed = self._on_ingest_response(st, resp, max_inflight)
                    if on_receipt is not None and landed is not None:
                        on_receipt(landed.ordinal, int(landed.start or 0), int(landed.end or 0))
                    if on_progress is not None and resp.HasField("ack"):
                        a = resp.ack
                        on_progress(IngestProgress(a.committed_offset, a.received_offset, a.num_events,
                                                   st.sent_total, reconnects))
                break
            except grpc.RpcError as e:
                err = ClientError.from_rpc(e)
                if err.code not in _RETRYABLE or reconnects >= retries:
                    raise err from None
                reconnects += 1
                retry = err.detail(error_details_pb2.RetryInfo)
                delay = retry.retry_delay.ToTimedelta().total_seconds() if retry is not None else 0.0
                time.sleep(min(max(delay, 0.1 * 2**reconnects), 10.0))  # the server's hint, else backoff
                self.wait_ready(timeout=retry_wait_s)
            finally:
                with st.cond:
                    st.stream += 1  # releases a request thread still waiting on this stream
                    st.ready = False
                    st.unreceipted = 0
                    st.sent = {}
                    st.sent_in_stream = 0
                    st.cond.notify_all()
        if st.base is None:  # nothing was sent
            st.base = st.committed = self.get_session(session_id).num_tokens
        return IngestResult(session_id, st.base, st.committed, st.events, st.sent_total, reconnects,
                            time.perf_counter() - t0, st.finished)

    @staticmethod
    def _ingest_requests(session_id: str, st: _IngestState, source: Iterator[str | Sequence[int]], finish: bool,
                         max_inflight: int) -> Iterator[pb.IngestRequest]:
        """One stream's requests: first what is not known to be committed (re-sent), then new pieces."""
        with st.cond:
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
                    payload = next(source)
                except StopIteration:
                    st.exhausted = True
                    break
                with st.cond:
                    msg = _Msg(payload if isinstance(payload, str) else [int(t) for t in payload], st.pieces)
                    st.pieces += 1
                    st.messages.append(msg)
            req = pb.IngestRequest(session_id=session_id)
            with st.cond:
                if msg.start is not None:
                    req.offset = msg.start
                elif first and st.base is not None:
                    # a resumed stream: the message starts where the last committed message ended
                    req.offset = st.prev_end
            if isinstance(msg.payload, str):
                req.text = msg.payload
            else:
                req.tokens.ids.extend(msg.payload)
            with st.cond:
                # the first message opens the stream; the rest wait for `ready` and for credit
                while not first and (not st.ready or st.unreceipted >= st.inflight) and st.stream == stream:
                    st.cond.wait()
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

    @staticmethod
    def _on_ingest_response(st: _IngestState, resp: pb.IngestResponse, max_inflight: int) -> _Msg | None:
        """Update the state; returns the message a receipt answered, if any."""
        landed = None
        with st.cond:
            if resp.HasField("ready"):
                st.committed = resp.ready.committed_offset
                if st.base is None:
                    st.base = st.prev_end = st.committed
                st.inflight = min(max_inflight, resp.ready.max_inflight_messages or max_inflight)
                st.ready = True
            else:
                ack = resp.ack
                if ack.HasField("receipt"):
                    st.unreceipted -= 1
                    landed = st.sent.pop(ack.receipt.index)  # kept until answered, then forgotten
                    landed.start, landed.end = ack.receipt.start, ack.receipt.end
                st.committed = ack.committed_offset
                st.events = ack.num_events
                st.finished = st.finished or ack.finished
                while st.messages and st.messages[0].end is not None and st.messages[0].end <= st.committed:
                    st.prev_end = st.messages.pop(0).end  # type: ignore[assignment]
            st.cond.notify_all()
        return landed

    # ------------------------------------------------------------------ generate
    def generate(self, session_id: str, prompt: str | Sequence[int], *, max_tokens: int | None = None,
                 temperature: float = 0.0, top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                 stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                 chat_template: bool = False, trace: bool = False, remember: bool = False,
                 preview_tokens: int = 0, request_id: str = "", timeout: float | None = None) -> GenerateStream:
        """Start a generation; iterate the returned stream (cancel() aborts it on the server).
        ``request_id`` names the call in the server's logs and makes a remembering generation
        idempotent (empty: the client makes one up); ``timeout``: the deadline (default
        ``generate_timeout``)."""
        req = generate_request(session_id, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                               chat_template=chat_template, trace=trace, remember=remember,
                               preview_tokens=preview_tokens, request_id=request_id)
        deadline = timeout or self.generate_timeout
        return GenerateStream(lambda: self.stub.Generate(req, timeout=deadline, metadata=self._md(session_id)),
                              self.retries)

    def ask(self, session_id: str, prompt: str | Sequence[int], **kw: Any) -> Answer:
        """:meth:`generate` to the end; returns the whole answer."""
        stream = self.generate(session_id, prompt, **kw)
        for _ in stream:
            pass
        if stream.complete is None:
            raise ClientError(grpc.StatusCode.INTERNAL, "the stream ended without a completion")
        return Answer(stream.complete.text, list(stream.complete.token_ids), stream.complete)

    # ------------------------------------------------------------------ inspect
    def list_events(self, session_id: str, *, preview: bool = False, preview_tokens: int = 0,
                    page_size: int = 500) -> Iterator[pb.Event]:
        token = ""
        while True:
            req = pb.ListEventsRequest(session_id=session_id, page_size=page_size, page_token=token,
                                       include_preview=preview, preview_tokens=preview_tokens)
            resp = self._unary(self.stub.ListEvents, req, session_id)
            yield from resp.events
            token = resp.next_page_token
            if not token:
                return

    def surprise(self, session_id: str, start: int = 0, end: int | None = None, stride: int = 1) -> pb.SurpriseCurve:
        req = pb.GetSurpriseRequest(session_id=session_id, start=start, stride=stride)
        if end is not None:
            req.end = end
        return self._unary(self.stub.GetSurprise, req, session_id)


"""The gRPC servicer of ``emserve.v1.SessionService``: protobuf in, domain calls, protobuf out.

This is the only module that touches protobuf messages (``*_from_pb`` / ``*_to_pb``) and the only
place where errors become status codes (:func:`status_of`, applied to every handler by the
``_unary`` / ``_streaming`` wrappers, and used by the auth interceptor).

Deadlines: a call whose deadline has already passed is refused with DEADLINE_EXCEEDED; grpc.aio
cancels a handler whose deadline passes while it runs, which closes the engine stream (vLLM aborts
the request). Ingest commits are shielded from that cancellation (see ``ingest.py``).

Size: every RPC's protobuf conversion is here by design: the only module that touches protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from emserve.api.v1 import emserve_pb2 as pb
from emserve.api.v1 import emserve_pb2_grpc as pb_grpc
from emserve.retrieval.errors import ConfigError, DeviceMemoryError, EmserveError, PlanError
from emserve.segmenter.errors import SegmenterError
from emserve.server.engine.base import EngineDead, EngineError, SamplingError, SamplingSpec
from emserve.server.errors import (
    SESSION_RESOURCE,
    InvalidArgument,
    LimitExceeded,
    NotReady,
    ServiceError,
    SessionBusy,
    SessionExists,
    SessionFinished,
    SessionNotFound,
    SessionReopening,
    ShuttingDown,
    Unauthenticated,
)
from emserve.server.logs import bind_session, call_context, request_id_of
from emserve.server.rpc.generation import DEFAULT_MAX_TOKENS, Chunk, Completion, GenerateParams, Generator, Trace
from emserve.server.rpc.ingest import Ack, IngestMessage, Ingestor, Ready
from emserve.server.rpc.inspection import Curve, EventPage, list_events, page_size, parse_page_token, surprise_curve
from emserve.server.rpc.text import TextCodec
from emserve.server.session import SETTINGS, MemoryConfig, SessionError
from emserve.server.session.manager import SessionInfo, SessionManager, check_session_id
from emserve.server.tenants import tenant_context

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SessionService"].full_name
ERROR_DOMAIN = "emserve.dev"
SESSION_HEADER = "x-session-id"  # routing key: gateways hash it to the replica holding the session
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


# ---------------------------------------------------------------------------------- errors → status
def status_of(exc: BaseException) -> grpc.Status:
    """The status (code, message, google.rpc details) a client sees for ``exc``."""
    code: int
    details: list[Any] = []
    reason = getattr(exc, "reason", type(exc).__name__.upper())
    metadata = dict(getattr(exc, "metadata", {}))
    message = str(exc)
    if isinstance(exc, SessionNotFound | SessionExists):
        code = code_pb2.NOT_FOUND if isinstance(exc, SessionNotFound) else code_pb2.ALREADY_EXISTS
        details.append(error_details_pb2.ResourceInfo(resource_type=SESSION_RESOURCE, resource_name=exc.resource,
                                                      description=message))
    elif isinstance(exc, InvalidArgument | PlanError | ConfigError | SegmenterError):
        code = code_pb2.INVALID_ARGUMENT
        field = exc.field if isinstance(exc, InvalidArgument) else ""
        reason = reason if isinstance(exc, InvalidArgument) else "INVALID_ARGUMENT"
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]))
    elif _disk_full(exc):
        code, reason = code_pb2.RESOURCE_EXHAUSTED, "DISK_FULL"
        message = f"the sessions disk is full ({exc}); nothing beyond the committed offset was stored"
        details.append(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject="disk", description=message)]))
    elif isinstance(exc, LimitExceeded | DeviceMemoryError):
        code = code_pb2.RESOURCE_EXHAUSTED
        subject = exc.subject if isinstance(exc, LimitExceeded) else "retrieval_device_memory"
        reason = reason if isinstance(exc, LimitExceeded) else "DEVICE_MEMORY_EXHAUSTED"
        details.append(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=subject, description=message)]))
    elif isinstance(exc, SessionFinished | SessionBusy):
        code = code_pb2.FAILED_PRECONDITION
        details.append(error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(type=exc.kind, subject=exc.resource,
                                                            description=message)]))
    elif isinstance(exc, NotReady | ShuttingDown | SessionReopening | EngineDead):
        code = code_pb2.UNAVAILABLE
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(int(exc.retry_after_s * 1000))
        details.append(retry)
    elif isinstance(exc, Unauthenticated):
        code = code_pb2.UNAUTHENTICATED
    elif isinstance(exc, TimeoutError):
        code, reason, message = code_pb2.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "deadline exceeded"
    elif isinstance(exc, SessionError):
        code, reason = code_pb2.DATA_LOSS, "SESSION_CORRUPT"
    elif isinstance(exc, EngineError):
        code, reason = code_pb2.INTERNAL, "ENGINE_ERROR"
    else:
        code, reason = code_pb2.INTERNAL, "INTERNAL"
        message = f"internal error: {type(exc).__name__}: {exc}"
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    status = status_pb2.Status(code=code, message=message)
    for d in [info, *details]:
        status.details.add().Pack(d)
    return rpc_status.to_status(status)


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) is the disk or a quota being full."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if _disk_full(exc):
        logger.warning("call failed: the sessions disk is full: %s", exc)
    elif not isinstance(exc, ServiceError | PlanError | ConfigError | SegmenterError):
        logger.error("call failed: %s", exc, exc_info=exc if not isinstance(exc, EmserveError) else None)
    s = status_of(exc)
    await context.abort(s.code, s.details, s.trailing_metadata)


def _check_deadline(context: grpc.aio.ServicerContext) -> None:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise TimeoutError


def _context(method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
    """The log context of a call (:func:`emserve.server.logs.call_context`): its session id from the
    request or the ``x-session-id`` metadata, its request id from the request or ``x-request-id``."""
    metadata = context.invocation_metadata()
    sid = getattr(request, "session_id", "") or dict(metadata or ()).get(SESSION_HEADER, "")
    rid = request_id_of(metadata, getattr(request, "request_id", ""))
    return call_context(method, str(sid)[:128], rid)


def _access(method: str, t0: float, exc: BaseException | None) -> None:
    code = "OK" if exc is None else ("CANCELLED" if isinstance(exc, asyncio.CancelledError)
                                      else status_of(exc).code.name)
    logger.info("%s %s in %.3f s", method, code, time.perf_counter() - t0)


def _tenant_of(service: Any, context: grpc.aio.ServicerContext) -> str:
    """The tenant of the call's bearer token (the auth interceptor has refused unknown ones)."""
    tenants = getattr(service, "tenants", None)
    if not tenants:
        return ""
    got = dict(context.invocation_metadata() or ()).get("authorization", "")
    got = got.decode() if isinstance(got, bytes) else got
    return tenants.get(got.removeprefix("Bearer "), "")


@contextlib.asynccontextmanager
async def _served(method: str, request: Any, context: grpc.aio.ServicerContext,
                  tenant: str = "") -> AsyncIterator[None]:
    """What every call runs inside: its log context and tenant, the deadline check, the one place that
    maps errors to statuses (:func:`abort`), and the call's access line."""
    t0, failed = time.perf_counter(), None
    with _context(method, request, context), tenant_context(tenant):
        try:
            _check_deadline(context)
            yield
        except grpc.aio.AbortError:
            raise
        except BaseException as e:
            failed = e
            if not isinstance(e, Exception):
                raise
            await abort(context, e)
            raise AssertionError("unreachable") from e
        finally:
            _access(method, t0, failed)


def _unary(fn: Callable[[Any, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]]) -> Any:
    @functools.wraps(fn)
    async def handler(self: Any, request: _Req, context: grpc.aio.ServicerContext) -> _Resp:
        async with _served(fn.__name__, request, context, _tenant_of(self, context)):
            return await fn(self, request, context)
        raise AssertionError("unreachable")  # _served re-raises or aborts every failure

    return handler


def _streaming(fn: Callable[[Any, Any, grpc.aio.ServicerContext], AsyncGenerator[_Resp, None]]) -> Any:
    @functools.wraps(fn)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[_Resp]:
        async with _served(fn.__name__, request, context, _tenant_of(self, context)):
            gen = fn(self, request, context)
            try:
                async for item in gen:
                    yield item
            finally:
                await gen.aclose()

    return handler


# ---------------------------------------------------------------------------------- conversions
# Settings exposed in the API: the flat names of the config tree (SETTINGS) that the proto has, by the
# same name (a new setting stays server-side, at its default, until the proto names it).
_MEMORY_FIELDS = [name for name in SETTINGS if name in pb.MemoryConfig.DESCRIPTOR.fields_by_name]


def memory_overrides_from_pb(m: pb.MemoryConfig) -> dict[str, Any]:
    """The settings a request's ``MemoryConfig`` gives (flat names; the fields it leaves unset are not)."""
    return {name: getattr(m, name) for name in _MEMORY_FIELDS if m.HasField(name)}


def memory_to_pb(cfg: MemoryConfig) -> pb.MemoryConfig:
    """The settings ``cfg`` has, as the API reports them."""
    return pb.MemoryConfig(**{name: cfg.setting(name) for name in _MEMORY_FIELDS})


def session_to_pb(info: SessionInfo) -> pb.Session:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(info.create_time * 1e9))
    st = info.stats
    return pb.Session(
        session_id=info.session_id,
        create_time=ts,
        state=pb.Session.FINISHED if info.finished else pb.Session.ACTIVE,
        num_tokens=st.num_tokens,
        num_events=st.num_events,
        event_tokens=st.event_tokens,
        memory=memory_to_pb(info.memory),
        disk_bytes=st.disk_bytes,
        writer_attached=info.writer is not None,
        labels=dict(info.labels),
        surprise=pb.SurpriseStats(mean=st.surprise_mean, std=st.surprise_std, min=st.surprise_min,
                                  max=st.surprise_max),
    )


def ingest_from_pb(req: pb.IngestRequest) -> IngestMessage:
    kind = req.WhichOneof("data")
    return IngestMessage(
        session_id=req.session_id,
        offset=req.offset if req.HasField("offset") else None,
        text=req.text if kind == "text" else None,
        tokens=list(req.tokens.ids) if kind == "tokens" else None,
        flush=req.flush,
        finish=req.finish,
    )


def ingest_to_pb(item: Ready | Ack) -> pb.IngestResponse:
    if isinstance(item, Ready):
        return pb.IngestResponse(ready=pb.IngestReady(
            committed_offset=item.committed_offset, chunk_tokens=item.chunk_tokens,
            max_inflight_messages=item.max_inflight_messages, max_message_bytes=item.max_message_bytes,
            max_message_tokens=item.max_message_tokens))
    ack = pb.IngestAck(committed_offset=item.committed_offset, received_offset=item.received_offset,
                       num_events=item.num_events, finished=item.finished)
    if item.receipt is not None:
        r = item.receipt
        ack.receipt.CopyFrom(pb.MessageReceipt(index=r.index, start=r.start, end=r.end, skipped=r.skipped))
    return pb.IngestResponse(ack=ack)


def generate_from_pb(req: pb.GenerateRequest) -> GenerateParams:
    s = req.sampling
    try:
        spec = SamplingSpec(
            max_tokens=s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
            temperature=s.temperature,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            top_k=s.top_k,
            seed=s.seed if s.HasField("seed") else None,
            stop_token_ids=tuple(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
        )
    except SamplingError as e:
        raise InvalidArgument(f"sampling.{e.field}", str(e)) from None
    kind = req.WhichOneof("prompt_input")
    return GenerateParams(
        session_id=req.session_id,
        prompt=req.prompt if kind == "prompt" else None,
        prompt_tokens=list(req.prompt_tokens.ids) if kind == "prompt_tokens" else None,
        sampling=spec,
        stop=tuple(s.stop),
        chat_template=req.chat_template,
        include_trace=req.include_trace,
        remember=req.remember,
        preview_tokens=req.preview_tokens or 16,
        request_id=req.request_id[:128],
    )


_SOURCES = {"similarity": pb.SIMILARITY, "contiguity": pb.CONTIGUITY, "lexical": pb.LEXICAL}


def trace_to_pb(trace: Trace) -> pb.RetrievalTrace:
    out = pb.RetrievalTrace()
    for a, b in trace.window:
        out.window.add(start=a, end=b)
    r = trace.retrieval
    if r is None:
        return out
    out.budget, out.num_events, out.memory_tokens, out.shared, out.exact = (
        r.budget, r.num_events, r.memory_tokens, r.shared, r.exact)
    layers = r.layers[:1] if r.shared else r.layers
    agg: dict[int, dict[str, Any]] = {}
    for i, layer in enumerate(layers):
        sel = out.layers.add(layer=i)
        for e in layer.events:
            sel.events.add(id=e.id, start=e.start, end=e.end, score=e.score, source=_SOURCES[e.source],
                           truncated=e.truncated)
            a = agg.setdefault(e.id, {"start": e.start, "end": e.end, "scores": [], "similarity": 0, "contiguity": 0,
                                      "lexical": 0})
            a["start"], a["end"] = min(a["start"], e.start), max(a["end"], e.end)
            a["scores"].append(e.score)
            a[e.source] += 1
    weight = len(r.layers) if r.shared else 1  # a shared list stands for every layer
    for eid in sorted(agg, key=lambda k: agg[k]["start"]):
        a = agg[eid]
        scores = a["scores"]
        out.events.add(id=eid, start=a["start"], end=a["end"], preview=trace.previews.get(eid, ""),
                       layers=len(scores) * weight, similarity_layers=a["similarity"] * weight,
                       contiguity_layers=a["contiguity"] * weight, lexical_layers=a["lexical"] * weight,
                       max_score=max(scores),
                       mean_score=sum(scores) / len(scores))
    return out


def generate_to_pb(item: Chunk | Completion) -> pb.GenerateResponse:
    if isinstance(item, Chunk):
        return pb.GenerateResponse(chunk=pb.GenerateChunk(token_ids=item.token_ids, text=item.text))
    t = item.timings
    done = pb.GenerateComplete(
        finish_reason=pb.STOP if item.finish_reason == "stop" else pb.LENGTH,
        stop_string=item.stop_string,
        token_ids=item.token_ids,
        text=item.text,
        usage=pb.Usage(prompt_tokens=item.prompt_tokens, completion_tokens=len(item.token_ids),
                       memory_tokens=item.memory_tokens, window_tokens=item.window_tokens,
                       retrieved_tokens=item.retrieved_tokens),
        timings=pb.Timings(wait_s=t.get("wait_s", 0.0), retrieval_s=t.get("retrieval_s", 0.0),
                           first_token_s=t.get("first_token_s", 0.0), total_s=t.get("total_s", 0.0),
                           tokens_per_s=t.get("tokens_per_s", 0.0), probe_s=t.get("probe_s", 0.0)),
        committed_offset=item.committed_offset,
    )
    if item.trace is not None:
        done.trace.CopyFrom(trace_to_pb(item.trace))
    return pb.GenerateResponse(complete=done)


def events_to_pb(page: EventPage) -> pb.ListEventsResponse:
    return pb.ListEventsResponse(
        events=[pb.Event(id=e.id, start=e.start, end=e.end, size=e.end - e.start,
                         boundary_surprise=e.boundary_surprise, mean_surprise=e.mean_surprise,
                         max_surprise=e.max_surprise, preview=e.preview) for e in page.events],
        next_page_token="" if page.next_first is None else str(page.next_first),
        total_events=page.total_events,
        num_tokens=page.num_tokens,
    )


def curve_to_pb(c: Curve) -> pb.SurpriseCurve:
    return pb.SurpriseCurve(start=c.start, end=c.end, stride=c.stride, surprise=c.mean.tolist(),
                            max_surprise=[] if c.max is None else c.max.tolist(), boundaries=c.boundaries.tolist())


# ---------------------------------------------------------------------------------- the servicer
@dataclass
class Runtime:
    """What the service needs once the engine is loaded."""

    manager: SessionManager
    codec: TextCodec
    ingestor: Ingestor
    generator: Generator
    backend: str


@dataclass(frozen=True)
class Limits:
    max_sessions: int
    max_message_bytes: int
    max_inflight_messages: int
    max_session_tokens: int
    default_memory: MemoryConfig
    max_session_disk_bytes: int = 0
    max_disk_bytes: int = 0
    max_message_tokens: int = 0


class SessionService(pb_grpc.SessionServiceServicer):
    def __init__(self, limits: Limits, version: str, *, tenants: Mapping[str, str] | None = None) -> None:
        """``tenants``: token -> tenant (:mod:`emserve.server.tenants`); None: every call is the tenant ""."""
        self.limits = limits
        self.version = version
        self.tenants = tenants
        self.runtime: Runtime | None = None
        self.draining = asyncio.Event()

    def _rt(self) -> Runtime:
        if self.draining.is_set():
            raise ShuttingDown("the server is shutting down")
        if self.runtime is None:
            raise NotReady("the engine is still loading; retry shortly")
        return self.runtime

    @_unary
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: Any) -> pb.ServerInfo:
        lim = self.limits
        info = pb.ServerInfo(version=self.version, ready=self.runtime is not None,
                             default_memory=memory_to_pb(lim.default_memory), max_sessions=lim.max_sessions,
                             max_message_bytes=lim.max_message_bytes,
                             max_inflight_messages=lim.max_inflight_messages,
                             max_session_tokens=lim.max_session_tokens,
                             max_session_disk_bytes=lim.max_session_disk_bytes, max_disk_bytes=lim.max_disk_bytes,
                             max_message_tokens=lim.max_message_tokens)
        if self.runtime is not None:
            m = self.runtime.manager.engine.info
            info.model, info.model_path, info.max_model_len = m.name, m.path, m.max_model_len
            info.vocab_size, info.num_layers, info.backend = m.vocab_size, m.num_layers, self.runtime.backend
            info.eos_token_ids.extend(m.eos_token_ids)
        return info

    @_unary
    async def CreateSession(self, request: pb.CreateSessionRequest, context: Any) -> pb.Session:
        rt = self._rt()
        overrides = memory_overrides_from_pb(request.memory)
        info = await rt.manager.create(request.session_id or None, overrides, dict(request.labels))
        return session_to_pb(info)

    @_unary
    async def GetSession(self, request: pb.GetSessionRequest, context: Any) -> pb.Session:
        return session_to_pb(self._rt().manager.info(check_session_id(request.session_id)))

    @_unary
    async def ListSessions(self, request: pb.ListSessionsRequest, context: Any) -> pb.ListSessionsResponse:
        size = page_size(request.page_size)
        infos, nxt = self._rt().manager.list(request.page_token, size)
        return pb.ListSessionsResponse(sessions=[session_to_pb(i) for i in infos], next_page_token=nxt)

    @_unary
    async def DeleteSession(self, request: pb.DeleteSessionRequest, context: Any) -> pb.DeleteSessionResponse:
        await self._rt().manager.delete(check_session_id(request.session_id))
        return pb.DeleteSessionResponse()

    @_streaming
    async def Ingest(self, request_iterator: AsyncIterator[pb.IngestRequest], context: Any
                     ) -> AsyncGenerator[pb.IngestResponse, None]:
        rt = self._rt()

        async def messages() -> AsyncIterator[IngestMessage]:
            async for req in request_iterator:
                if req.session_id:
                    bind_session(req.session_id[:128])  # the log context learns it from the first message
                yield ingest_from_pb(req)

        header = dict(context.invocation_metadata() or ()).get(SESSION_HEADER, "")
        async for item in rt.ingestor.run(messages(), session_id=str(header)):
            yield ingest_to_pb(item)

    @_streaming
    async def Generate(self, request: pb.GenerateRequest, context: Any) -> AsyncGenerator[pb.GenerateResponse, None]:
        rt = self._rt()
        async for item in rt.generator.run(generate_from_pb(request)):
            yield generate_to_pb(item)

    @_unary
    async def ListEvents(self, request: pb.ListEventsRequest, context: Any) -> pb.ListEventsResponse:
        rt = self._rt()
        size = page_size(request.page_size)
        first = parse_page_token(request.page_token)
        preview = (request.preview_tokens or 16) if request.include_preview else 0
        async with rt.manager.lease(check_session_id(request.session_id)) as entry:
            return events_to_pb(list_events(entry, rt.codec, first, size, preview_tokens=preview))

    @_unary
    async def GetSurprise(self, request: pb.GetSurpriseRequest, context: Any) -> pb.SurpriseCurve:
        rt = self._rt()
        end = request.end if request.HasField("end") else None
        async with rt.manager.lease(check_session_id(request.session_id)) as entry:
            return curve_to_pb(surprise_curve(entry, request.start, end, request.stride))

"""The gRPC server's interceptors: bearer-token auth, and request bytes checked before any handler.

Order (outermost first, as ``app.EmserveServer`` installs them): metrics (``metrics.GrpcMetrics``, which
sees the calls auth refuses too), :class:`Auth`, :class:`Decoding` (innermost: the handlers outside it
take its deserializer).
"""

from __future__ import annotations

import hmac
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from emserve.server.errors import InvalidArgument, LimitExceeded, Unauthenticated
from emserve.server.metrics import method_kind, replace_behavior
from emserve.server.rpc.service import abort

GRPC_RECEIVE_HEADROOM = 16 << 20
"""gRPC's own receive limit is ``max_message_bytes`` plus this: messages between the two get emserve's
RESOURCE_EXHAUSTED with its error details (:class:`Decoding`), larger ones gRPC's bare status."""
_OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Auth(grpc.aio.ServerInterceptor):
    """``authorization: Bearer <token>`` with one of ``tokens`` on every call but health and reflection."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._expected = [f"Bearer {t}".encode() for t in tokens]

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_METHODS):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        raw = got.encode() if isinstance(got, str) else got
        if any([hmac.compare_digest(raw, e) for e in self._expected]):  # a list: every token compared
            return handler
        return _denied(handler)


class _Undecodable:
    """What the request deserializer gives for bytes that are not the method's message."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class Decoding(grpc.aio.ServerInterceptor):
    """Request bytes that are not the method's message are the client's error: INVALID_ARGUMENT (field
    ``request``), not grpc's UNKNOWN; a message over ``max_bytes`` is RESOURCE_EXHAUSTED with the
    QuotaFailure (subject ``message_bytes``) and ErrorInfo every emserve error carries, not grpc's bare
    status. The deserializer keeps the error; the call reports it (a unary call before its behaviour
    runs, a stream at the message, through the service's error mapping). gRPC's own receive limit is
    set above ``max_bytes`` (:data:`GRPC_RECEIVE_HEADROOM`) so that such messages reach it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        method = details.method.rpartition("/")[2]

        limit = self.max_bytes

        def tolerant(data: bytes) -> Any:
            if len(data) > limit:
                return _Undecodable(LimitExceeded("message_bytes", f"a {method} request message of {len(data)} "
                                                  f"bytes exceeds the server's limit of {limit}", limit=limit))
            try:
                return parse(data)
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or anything a parser raises
                return _Undecodable(e)

        def bad(u: _Undecodable) -> Exception:
            if isinstance(u.error, LimitExceeded):
                return u.error
            return InvalidArgument("request", f"the request bytes are not a valid {method} request message: {u.error}")

        behavior = method_kind(handler)[1]
        if handler.request_streaming:
            async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
                async for msg in requests:
                    if isinstance(msg, _Undecodable):
                        raise bad(msg)
                    yield msg

            if inspect.isasyncgenfunction(behavior):
                async def stream_in_out(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    async for out in behavior(checked(requests), context):
                        yield out
                return replace_behavior(handler, stream_in_out, tolerant)

            async def stream_in(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                return await behavior(checked(requests), context)
            return replace_behavior(handler, stream_in, tolerant)

        if inspect.isasyncgenfunction(behavior):
            async def unary_in_stream_out(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await abort(context, bad(request))
                async for out in behavior(request, context):
                    yield out
            return replace_behavior(handler, unary_in_stream_out, tolerant)

        async def unary_in(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await abort(context, bad(request))
            return await behavior(request, context)
        return replace_behavior(handler, unary_in, tolerant)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await abort(context, Unauthenticated("missing or wrong bearer token in the authorization metadata"))

    return replace_behavior(handler, deny)

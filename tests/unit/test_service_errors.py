"""The one error mapping: domain errors -> canonical status codes with google.rpc details."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from emserve.retrieval.errors import ConfigError, DeviceMemoryError, PlanError
from emserve.segmenter.errors import SegmenterError
from emserve.server.engine.base import EngineError
from emserve.server.errors import (
    InvalidArgument,
    LimitExceeded,
    NotReady,
    SessionBusy,
    SessionExists,
    SessionFinished,
    SessionNotFound,
    SessionReopening,
    ShuttingDown,
    Unauthenticated,
)
from emserve.server.rpc.service import status_of
from emserve.server.session import SessionError

E = error_details_pb2


def _details(s: grpc.Status) -> tuple[status_pb2.Status, list[object]]:
    md = dict(s.trailing_metadata)
    st = status_pb2.Status.FromString(md["grpc-status-details-bin"])
    out = []
    for any_msg in st.details:
        for kind in (E.ErrorInfo, E.ResourceInfo, E.BadRequest, E.QuotaFailure, E.PreconditionFailure, E.RetryInfo):
            if any_msg.Is(kind.DESCRIPTOR):
                d = kind()
                any_msg.Unpack(d)
                out.append(d)
    return st, out


@pytest.mark.parametrize(
    ("exc", "code", "detail", "reason"),
    [
        (SessionNotFound("a"), grpc.StatusCode.NOT_FOUND, E.ResourceInfo, "SESSION_NOT_FOUND"),
        (SessionExists("a"), grpc.StatusCode.ALREADY_EXISTS, E.ResourceInfo, "SESSION_EXISTS"),
        (InvalidArgument("offset", "gap"), grpc.StatusCode.INVALID_ARGUMENT, E.BadRequest, "INVALID_ARGUMENT"),
        (PlanError("window too long"), grpc.StatusCode.INVALID_ARGUMENT, E.BadRequest, "INVALID_ARGUMENT"),
        (ConfigError("bad"), grpc.StatusCode.INVALID_ARGUMENT, E.BadRequest, "INVALID_ARGUMENT"),
        (SegmenterError("bad"), grpc.StatusCode.INVALID_ARGUMENT, E.BadRequest, "INVALID_ARGUMENT"),
        (LimitExceeded("sessions", "full"), grpc.StatusCode.RESOURCE_EXHAUSTED, E.QuotaFailure, "LIMIT_EXCEEDED"),
        (SessionFinished("a"), grpc.StatusCode.FAILED_PRECONDITION, E.PreconditionFailure, "SESSION_FINISHED"),
        (SessionBusy("a", "x"), grpc.StatusCode.FAILED_PRECONDITION, E.PreconditionFailure, "SESSION_BUSY"),
        (NotReady("loading"), grpc.StatusCode.UNAVAILABLE, E.RetryInfo, "NOT_READY"),
        (ShuttingDown("bye"), grpc.StatusCode.UNAVAILABLE, E.RetryInfo, "SHUTTING_DOWN"),
        (SessionReopening("a", RuntimeError("x")), grpc.StatusCode.UNAVAILABLE, E.RetryInfo, "SESSION_REOPENING"),
        (DeviceMemoryError("oom"), grpc.StatusCode.RESOURCE_EXHAUSTED, E.QuotaFailure, "DEVICE_MEMORY_EXHAUSTED"),
        (Unauthenticated("who"), grpc.StatusCode.UNAUTHENTICATED, None, "UNAUTHENTICATED"),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED, None, "DEADLINE_EXCEEDED"),
        (SessionError("torn"), grpc.StatusCode.DATA_LOSS, None, "SESSION_CORRUPT"),
        (EngineError("boom"), grpc.StatusCode.INTERNAL, None, "ENGINE_ERROR"),
        (RuntimeError("bug"), grpc.StatusCode.INTERNAL, None, "INTERNAL"),
    ],
)
def test_status_of(exc: Exception, code: grpc.StatusCode, detail: type | None, reason: str) -> None:
    s = status_of(exc)
    assert s.code == code
    st, details = _details(s)
    assert st.code == code.value[0] and st.message == s.details
    info = details[0]
    assert isinstance(info, E.ErrorInfo) and info.reason == reason and info.domain == "emserve.dev"
    if detail is not None:
        assert any(isinstance(d, detail) for d in details[1:])


def test_details_carry_the_specifics() -> None:
    _, d = _details(status_of(InvalidArgument("offset", "gap at 5", committed_offset=3)))
    assert d[0].metadata["committed_offset"] == "3" and d[0].metadata["field"] == "offset"
    assert d[1].field_violations[0].field == "offset"
    _, d = _details(status_of(SessionNotFound("abc")))
    assert d[1].resource_type == "emserve.v1.Session" and d[1].resource_name == "abc"
    _, d = _details(status_of(SessionBusy("abc", "an ingest stream")))
    assert d[1].violations[0].type == "BUSY" and d[1].violations[0].subject == "abc"
    _, d = _details(status_of(LimitExceeded("session_tokens", "too long")))
    assert d[1].violations[0].subject == "session_tokens"
    _, d = _details(status_of(NotReady("loading")))
    assert d[1].retry_delay.seconds == 5

"""Domain errors of the server process. No gRPC here: ``rpc/service.py`` maps them to status codes.

Each error names what a client needs to react: the session (``resource``), the offending request
field (``field``), the limit (``subject``), the violated precondition (``kind``). The mapping (one
place, ``service.status_of``):

======================  ===================  ==========================================
error                   status code          detail
======================  ===================  ==========================================
SessionNotFound         NOT_FOUND            ResourceInfo
SessionExists           ALREADY_EXISTS       ResourceInfo
InvalidArgument         INVALID_ARGUMENT     BadRequest.FieldViolation
LimitExceeded           RESOURCE_EXHAUSTED   QuotaFailure.Violation
SessionFinished         FAILED_PRECONDITION  PreconditionFailure.Violation (FINISHED)
SessionBusy             FAILED_PRECONDITION  PreconditionFailure.Violation (BUSY)
NotReady, ShuttingDown  UNAVAILABLE          RetryInfo
SessionReopening        UNAVAILABLE          RetryInfo (a step failed: the session reopens from disk)
Unauthenticated         UNAUTHENTICATED      ErrorInfo
======================  ===================  ==========================================

Errors of the other packages are mapped too: ``PlanError``/``ConfigError``/``SegmenterError`` →
INVALID_ARGUMENT, ``DeviceMemoryError`` (the retrieval GPU's memory) → RESOURCE_EXHAUSTED, ``SessionError``
(corrupt session directory) → DATA_LOSS, ``EngineDead`` (the engine's processes died; the server stops for a
restart) → UNAVAILABLE with RetryInfo, another ``EngineError`` → INTERNAL, anything else → INTERNAL (logged with
its traceback).
"""

from __future__ import annotations

from emserve.retrieval.errors import EmserveError

SESSION_RESOURCE = "emserve.v1.Session"


class ServiceError(EmserveError):
    """Base of the errors below. ``reason`` is a stable UPPER_SNAKE_CASE name for ErrorInfo."""

    reason = "ERROR"

    def __init__(self, message: str, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = {k: str(v) for k, v in metadata.items()}


class SessionNotFound(ServiceError):
    reason = "SESSION_NOT_FOUND"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"no session {session_id!r}", session_id=session_id)
        self.resource = session_id


class SessionExists(ServiceError):
    reason = "SESSION_EXISTS"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} already exists", session_id=session_id)
        self.resource = session_id


class InvalidArgument(ServiceError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, **metadata: object) -> None:
        super().__init__(message, field=field, **metadata)
        self.field = field


class LimitExceeded(ServiceError):
    reason = "LIMIT_EXCEEDED"

    def __init__(self, subject: str, message: str, **metadata: object) -> None:
        super().__init__(message, subject=subject, **metadata)
        self.subject = subject


class SessionFinished(ServiceError):
    reason = "SESSION_FINISHED"
    kind = "FINISHED"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} is finished: it accepts questions, not ingest",
                         session_id=session_id)
        self.resource = session_id


class SessionBusy(ServiceError):
    reason = "SESSION_BUSY"
    kind = "BUSY"

    def __init__(self, session_id: str, holder: str) -> None:
        super().__init__(f"session {session_id!r} is busy: {holder} holds it", session_id=session_id,
                         holder=holder)
        self.resource = session_id


class NotReady(ServiceError):
    reason = "NOT_READY"
    retry_after_s = 5.0


class SessionReopening(ServiceError):
    """A step of the session failed after the engine had logged it: the open session's state in memory
    may be behind its files, so it is closed and reopened from disk (the crash recovery) before the next
    call. Retry; ingest resumes from the committed offset."""

    reason = "SESSION_REOPENING"
    retry_after_s = 0.5

    def __init__(self, session: str, cause: BaseException) -> None:
        super().__init__(f"session {session!r} is reopening after a failed step ({type(cause).__name__}: {cause}); "
                         "retry: ingest resumes from the committed offset", session_id=session)
        self.resource = session


class ShuttingDown(ServiceError):
    reason = "SHUTTING_DOWN"
    retry_after_s = 1.0


class Unauthenticated(ServiceError):
    reason = "UNAUTHENTICATED"

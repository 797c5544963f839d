"""Server logs: text or JSON lines, each record carrying the call's method, session id and request id.

Contract
--------
* :func:`configure` is called once by the process (``emserve`` commands): level and format
  (``text`` | ``json``). In JSON every record is one line, an object with ``time`` (ISO 8601, UTC),
  ``level``, ``logger``, ``message``, and when known ``method``, ``session_id``, ``request_id``,
  ``exception`` (the formatted traceback) and ``step`` (a step report's fields). vLLM's loggers in
  its engine processes write the same lines (:func:`vllm_logging_config`); what native libraries
  write to stderr themselves (torch's C++ warnings, vLLM's weight-loading progress bar) is not a record.
* :func:`call_context` binds the method, session id and request id of the gRPC call being served to
  every record logged while it runs: in its task, in the tasks it starts and in the worker threads
  it hands work to (``asyncio.to_thread`` copies the context). :func:`bind_session` adds the session
  id once a streaming call learns it (an Ingest stream's first message).
* A request id comes from the client (``GenerateRequest.request_id`` or an ``x-request-id``
  metadata entry) or is generated (16 hex digits).
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from emserve.server.report import StepReport

Format = Literal["text", "json"]

_method: contextvars.ContextVar[str] = contextvars.ContextVar("emserve_method", default="")
_session: contextvars.ContextVar[str] = contextvars.ContextVar("emserve_session_id", default="")
_request: contextvars.ContextVar[str] = contextvars.ContextVar("emserve_request_id", default="")

REQUEST_ID_HEADER = "x-request-id"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s:%(call)s %(message)s"


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def request_id_of(metadata: Any, given: str = "") -> str:
    """The call's request id: ``given`` (a request field), else the ``x-request-id`` metadata entry,
    else a new one. Client-chosen ids are kept to 128 printable characters."""
    rid = given or dict(metadata or ()).get(REQUEST_ID_HEADER, "")
    if isinstance(rid, bytes):
        rid = rid.decode("utf-8", "replace")
    rid = "".join(ch for ch in str(rid) if ch.isprintable())[:128]
    return rid or new_request_id()


@contextmanager
def call_context(method: str, session_id: str = "", request_id: str = "") -> Iterator[str]:
    """Bind a call's method, session id and request id (generated when empty) to the records logged
    inside; yields the request id."""
    rid = request_id or new_request_id()
    tokens = (_method.set(method), _session.set(session_id), _request.set(rid))
    try:
        yield rid
    finally:
        for var, tok in zip((_method, _session, _request), tokens, strict=True):
            var.reset(tok)


def bind_session(session_id: str) -> None:
    """Name the session of the call being served (for a stream that learns it from a message)."""
    _session.set(session_id)


def current_request_id() -> str:
    return _request.get()


_steps = logging.getLogger("emserve.server.steps")


def log_step(report: StepReport) -> None:
    """A step report as a DEBUG record of ``emserve.server.steps`` (JSON: the ``step`` object)."""
    if _steps.isEnabledFor(logging.DEBUG):
        _steps.debug("%s step at %d: %d new tokens, %d retrieved, %d events closed, %.3f s", report.kind,
                     report.offset, report.new_tokens, report.retrieved_tokens, report.events_closed, report.seconds,
                     extra={"step": dataclasses.asdict(report)})


class ContextFilter(logging.Filter):
    """Copies the call context onto every record (``record.method``, ``session_id``, ``request_id``, and
    ``record.call``, a short text form for the text format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        sid, rid = _session.get(), _request.get()
        record.method, record.session_id, record.request_id = _method.get(), sid, rid
        parts = [f"{k}={v}" for k, v in (("session", sid), ("request", rid)) if v]
        record.call = (" [" + " ".join(parts) + "]") if parts else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("method", "session_id", "request_id"):
            value = getattr(record, key, "")
            if value:
                out[key] = value
        step = getattr(record, "step", None)
        if isinstance(step, Mapping):
            out["step"] = dict(step)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str = "WARNING", fmt: Format = "text") -> None:
    """Route every record (vLLM's too, in this process) through one handler on stderr, in ``fmt``."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings become records (py.warnings) in this format too


def vllm_logging_config(level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for vLLM's loggers in every process it starts (its engine core and
    workers read ``VLLM_LOGGING_CONFIG_PATH``): JSON lines on stderr, as :func:`configure` writes."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"emserve_json": {"()": f"{__name__}.JsonFormatter"}},
        "filters": {"emserve_context": {"()": f"{__name__}.ContextFilter"}},
        "handlers": {"emserve_json": {"class": "logging.StreamHandler", "formatter": "emserve_json",
                                      "filters": ["emserve_context"], "stream": "ext://sys.stderr"}},
        "loggers": {"vllm": {"handlers": ["emserve_json"], "level": level.upper(), "propagate": False}},
    }

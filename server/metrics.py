"""Prometheus metrics: the ``emserve_*`` family, per-method gRPC server metrics, the ``/metrics`` port.

Contract
--------
* Off unless the server has a metrics port (``ServerConfig.metrics_port``, ``--metrics-port``,
  ``EMSERVE_METRICS_PORT``); then one HTTP endpoint serves one registry: these metrics, vLLM's own
  ``vllm:*`` engine metrics (the engine runs with its statistics on: one vLLM request is one emserve
  step, an ingestion chunk, a question's probe or its answer) and the process collectors.
* Every step metric is read from the sessions' step reports (:mod:`emserve.server.report`), handed
  over by :meth:`SessionManager.report`; nothing here times anything itself but the gRPC calls.
* Names follow Prometheus practice: base units (seconds, bytes), ``_total`` counters, histograms for
  latencies and sizes; labels are bounded (``kind``, ``phase``, ``part``, gRPC method and code), never
  a session id.
* Gauges of state (sessions, disk, device memory) are read at scrape time; the disk walk is cached for
  :data:`DISK_TTL_S` seconds.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args
from wsgiref.simple_server import make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from emserve.server.quota import allocated_files
from emserve.server.report import ANSWER_STARTS, PHASES, Kind, StepReport

if TYPE_CHECKING:
    from emserve.server.session.manager import SessionManager

logger = logging.getLogger(__name__)

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
RATE = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
DISK_TTL_S = 10.0


class Metrics:
    """The server's metrics in ``registry``. :meth:`observe` takes step reports; :meth:`bind` attaches
    the session manager once the engine is loaded (state gauges read it at scrape time)."""

    def __init__(self, registry: CollectorRegistry, *, sessions_dir: str | os.PathLike[str]) -> None:
        self.registry = registry
        self._manager: SessionManager | None = None
        self.steps = Counter("emserve_steps", "Engine steps run for sessions, by kind (ingest chunk, question)",
                             ["kind"], registry=None)
        self.step_seconds = Histogram("emserve_step_seconds", "Wall time of a session step, lock wait included",
                                      ["kind"], buckets=SECONDS, registry=None)
        self.phase_seconds = Histogram("emserve_step_phase_seconds", "Wall time of a step's phases",
                                       ["kind", "phase"], buckets=SECONDS, registry=None)
        self.ingested = Counter("emserve_ingested_tokens", "Tokens committed to session memories", registry=None)
        self.events = Counter("emserve_events_closed", "Events closed into session memories", registry=None)
        self.event_tokens = Histogram("emserve_event_tokens", "Size of the events closed, tokens",
                                      buckets=TOKENS, registry=None)
        self.retrieval_seconds = Histogram("emserve_retrieval_seconds",
                                           "Choosing a step's window (a question's probe step included)",
                                           ["kind"], buckets=SECONDS, registry=None)
        self.retrieved_tokens = Histogram("emserve_retrieved_tokens", "Tokens retrieved from memory into a window",
                                          ["kind"], buckets=TOKENS, registry=None)
        self.window_tokens = Histogram("emserve_window_tokens", "Tokens in a step's attention window",
                                       ["kind"], buckets=TOKENS, registry=None)
        self.kv_read = Counter("emserve_kv_read_bytes", "KV bytes read from session logs into windows",
                               registry=None)
        self.kv_written = Counter("emserve_kv_written_bytes", "KV bytes appended to session logs", registry=None)
        self.ttft = Histogram("emserve_question_ttft_seconds", "From a question's call to its first token",
                              buckets=SECONDS, registry=None)
        self.decode_rate = Histogram("emserve_question_decode_tokens_per_second",
                                     "A question's generation rate after its first token", buckets=RATE, registry=None)
        self.output_tokens = Counter("emserve_question_output_tokens", "Tokens generated for questions",
                                     registry=None)
        self.answer_starts = Counter("emserve_question_answer_starts",
                                     "Questions whose first answer tokens a rule chose, by rule", ["rule"],
                                     registry=None)
        self.errors = Counter("emserve_errors", "Calls that ended with an error, by gRPC code",
                              ["grpc_code"], registry=None)
        self.stored = stored = Gauge("emserve_sessions", "Sessions stored on disk", registry=None)
        stored.set_function(lambda: self._manager.stored_count() if self._manager else 0)
        self.open = open_ = Gauge("emserve_sessions_open", "Sessions open in memory (table, indexes, files)",
                                  registry=None)
        open_.set_function(lambda: self._manager.open_count if self._manager else 0)
        self.active = active = Gauge("emserve_sessions_active", "Sessions with a call in progress", registry=None)
        active.set_function(lambda: self._manager.active_count() if self._manager else 0)
        self.device = device = Gauge("emserve_device_mirror_bytes",
                                     "Device memory held by the sessions' retrieval mirrors", registry=None)
        device.set_function(lambda: self._manager.device_bytes() if self._manager else 0)
        self.quota = quota = Gauge("emserve_sessions_disk_quota_bytes",
                                   "The server's disk quota of all sessions together (0: none)", registry=None)
        quota.set_function(lambda: self._manager.quota.total_bytes if self._manager else 0)
        self.quota_used = used = Gauge("emserve_sessions_disk_quota_used_bytes",
                                       "What the disk quota counts: the sessions' bytes as last measured after "
                                       "their steps (0 without a quota)", registry=None)
        used.set_function(lambda: self._manager.quota.total() if self._manager and self._manager.quota.enabled
                          else 0)
        self.ready_fn: Callable[[], bool] = lambda: False
        self.ready = ready = Gauge("emserve_ready", "1 when the server takes session calls (engine loaded, not "
                                   "draining): the gRPC health service's readiness", registry=None)
        ready.set_function(lambda: 1.0 if self.ready_fn() else 0.0)
        self.disk = _DiskCollector(Path(sessions_dir))
        self._own: list[Collector] = []
        self.adopt(*(v for v in vars(self).values() if isinstance(v, MetricWrapperBase | _DiskCollector)))
        for kind in get_args(Kind):  # the series exist from the start (a rate() over them is defined)
            self.steps.labels(kind)
            self.step_seconds.labels(kind)
            self.window_tokens.labels(kind)
            self.retrieval_seconds.labels(kind)
            self.retrieved_tokens.labels(kind)
            for phase in PHASES:
                self.phase_seconds.labels(kind, phase)
        for rule in ANSWER_STARTS:
            self.answer_starts.labels(rule)

    def bind(self, manager: SessionManager) -> None:
        self._manager = manager
        manager.observers.append(self.observe)

    def adopt(self, *collectors: Collector) -> None:
        """Register ``collectors`` in the registry; :meth:`close` takes them out again."""
        for c in collectors:
            self.registry.register(c)
            self._own.append(c)

    def close(self) -> None:
        """Take every collector registered here out of the registry (a later server in the same process
        registers its own)."""
        while self._own:
            self.registry.unregister(self._own.pop())
        if self._manager is not None and self.observe in self._manager.observers:
            self._manager.observers.remove(self.observe)

    def observe(self, r: StepReport) -> None:
        kind = r.kind
        self.steps.labels(kind).inc()
        self.step_seconds.labels(kind).observe(r.seconds)
        for phase in PHASES:
            if phase in r.phases:
                self.phase_seconds.labels(kind, phase).observe(r.phases[phase])
        self.window_tokens.labels(kind).observe(r.window_tokens)
        self.kv_read.inc(r.bytes_read)
        if kind == "ingest":
            self.ingested.inc(r.new_tokens)
            self.kv_written.inc(r.bytes_written)
            self.events.inc(r.events_closed)
            for n in r.event_tokens:
                self.event_tokens.observe(n)
        if "retrieve" in r.phases:
            self.retrieval_seconds.labels(kind).observe(r.retrieval_s)
            self.retrieved_tokens.labels(kind).observe(r.retrieved_tokens)
        if kind == "question":
            self.output_tokens.inc(r.output_tokens)
            if r.ttft_s is not None:
                self.ttft.observe(r.ttft_s)
            if r.output_tokens > 1 and r.decode_s > 0:
                self.decode_rate.observe((r.output_tokens - 1) / r.decode_s)
            if r.answer_start is not None:
                self.answer_starts.labels(r.answer_start).inc()


class _DiskCollector(Collector):
    """``emserve_session_disk_bytes{part}``: allocated bytes under the sessions folder by part (KV log,
    event table, indexes, the rest), walked at most every :data:`DISK_TTL_S` seconds."""

    def __init__(self, root: Path, ttl_s: float = DISK_TTL_S) -> None:
        self.root = root
        self.ttl_s = ttl_s
        self._at = -math.inf
        self._parts: dict[str, int] = {}
        self._lock = threading.Lock()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl_s:
                self._parts = disk_parts(self.root)
                self._at = time.monotonic()
            parts = dict(self._parts)
        g = GaugeMetricFamily("emserve_session_disk_bytes", "Bytes the sessions use on disk, by part",
                              labels=["part"])
        for part in ("kv_log", "table", "index", "other"):
            g.add_metric([part], parts.get(part, 0))
        yield g
        try:  # the filesystem holding the sessions folder, read at every scrape (one statvfs)
            st = os.statvfs(self.root)
        except OSError:
            return
        yield GaugeMetricFamily("emserve_sessions_disk_free_bytes",
                                "Bytes free for the sessions folder's filesystem (to an unprivileged user)",
                                value=st.f_bavail * st.f_frsize)
        yield GaugeMetricFamily("emserve_sessions_disk_size_bytes", "Size of the sessions folder's filesystem",
                                value=st.f_blocks * st.f_frsize)


def disk_parts(root: Path) -> dict[str, int]:
    """Allocated bytes under ``root`` by part: ``kv_log`` (K/V rows), ``table`` (event records and
    representatives), ``index`` (HNSW graphs), ``other`` (tokens, positions, surprise, state)."""
    parts = {"kv_log": 0, "table": 0, "index": 0, "other": 0}
    for name, size in allocated_files(root):
        if name.endswith(".hnsw"):
            parts["index"] += size
        elif name.startswith(("k_", "v_")) and name.endswith(".bin"):
            parts["kv_log"] += size
        elif name.startswith(("reps_", "events.")):
            parts["table"] += size
        else:
            parts["other"] += size
    return parts


# ---------------------------------------------------------------- gRPC server metrics
_CODES = {c.value[0]: c for c in grpc.StatusCode}
_FACTORIES = {
    "bidi_stream": grpc.stream_stream_rpc_method_handler,
    "client_stream": grpc.stream_unary_rpc_method_handler,
    "server_stream": grpc.unary_stream_rpc_method_handler,
    "unary": grpc.unary_unary_rpc_method_handler,
}


def method_kind(handler: grpc.RpcMethodHandler) -> tuple[str, Callable[..., Any]]:
    """A method handler's ``grpc_type`` (``unary``, ``client_stream``, ``server_stream``,
    ``bidi_stream``) and its behaviour."""
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream", handler.stream_stream
    if handler.request_streaming:
        return "client_stream", handler.stream_unary
    if handler.response_streaming:
        return "server_stream", handler.unary_stream
    return "unary", handler.unary_unary


def replace_behavior(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any],
                     request_deserializer: Callable[[bytes], Any] | None = None) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serializers as ``handler`` that runs ``behavior`` (interceptors);
    ``request_deserializer`` replaces the handler's."""
    return _FACTORIES[method_kind(handler)[0]](
        behavior, request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer)


class GrpcMetrics(grpc.aio.ServerInterceptor):
    """Per-method gRPC server metrics with the names of go-grpc-prometheus / py-grpc-prometheus:
    ``grpc_server_started_total``, ``grpc_server_handled_total`` (by code), ``grpc_server_msg_received_total``,
    ``grpc_server_msg_sent_total``, ``grpc_server_handling_seconds``; non-OK codes also count in
    ``emserve_errors_total``."""

    def __init__(self, metrics: Metrics) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter("grpc_server_started", "RPCs started on the server", labels, registry=None)
        self.handled = Counter("grpc_server_handled", "RPCs completed on the server, by code",
                               [*labels, "grpc_code"], registry=None)
        self.received = Counter("grpc_server_msg_received", "Messages received by the server", labels, registry=None)
        self.sent = Counter("grpc_server_msg_sent", "Messages sent by the server", labels, registry=None)
        self.seconds = Histogram("grpc_server_handling_seconds", "Time to handle an RPC on the server", labels,
                                 buckets=SECONDS, registry=None)
        self.errors = metrics.errors
        metrics.adopt(self.started, self.handled, self.received, self.sent, self.seconds)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        kind, behavior = method_kind(handler)
        call = _Call(self, (kind, service, method))
        return replace_behavior(handler, call.wrap(behavior, handler.request_streaming, handler.response_streaming))


class _Call:
    def __init__(self, m: GrpcMetrics, labels: tuple[str, str, str]) -> None:
        self.m, self.labels = m, labels

    def _start(self) -> float:
        self.m.started.labels(*self.labels).inc()
        return time.perf_counter()

    def _end(self, t0: float, context: Any, exc: BaseException | None) -> None:
        if isinstance(exc, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        else:
            code = _code(context.code())
            if code is None:
                aborted = isinstance(exc, grpc.aio.AbortError)
                code = grpc.StatusCode.UNKNOWN if exc is not None and not aborted else grpc.StatusCode.OK
        self.m.handled.labels(*self.labels, code.name).inc()
        self.m.seconds.labels(*self.labels).observe(time.perf_counter() - t0)
        if code is not grpc.StatusCode.OK:
            self.m.errors.labels(code.name).inc()

    def _requests(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        received = self.m.received.labels(*self.labels)

        async def counted() -> AsyncIterator[Any]:
            async for msg in requests:
                received.inc()
                yield msg

        return counted()

    def wrap(self, behavior: Callable[..., Any], request_streaming: bool, response_streaming: bool) -> Any:
        sent = self.m.sent.labels(*self.labels)
        received = self.m.received.labels(*self.labels)

        def arg(request: Any) -> Any:
            if request_streaming:
                return self._requests(request)
            received.inc()
            return request

        if response_streaming and inspect.isasyncgenfunction(behavior):
            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                t0, exc = self._start(), None
                try:
                    async for msg in behavior(arg(request), context):
                        sent.inc()
                        yield msg
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    self._end(t0, context, exc)
            return stream

        async def unary(request: Any, context: Any) -> Any:
            t0, exc = self._start(), None
            try:
                out = await behavior(arg(request), context)
                if not response_streaming:
                    sent.inc()
                return out
            except BaseException as e:
                exc = e
                raise
            finally:
                self._end(t0, context, exc)
        return unary


def _code(value: Any) -> grpc.StatusCode | None:
    if value is None:
        return None
    if isinstance(value, grpc.StatusCode):
        return value
    try:
        return _CODES.get(int(value))
    except (TypeError, ValueError):
        return None


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[Any, int]:
    """Serve ``registry`` on ``http://host:port/metrics`` in a daemon thread; returns the HTTP server
    (``shutdown()`` stops it) and the bound port (``port`` 0: any free one).

    A scraper that asks for OpenMetrics without ``escaping=allow-utf-8`` (Prometheus 2.x) gets the
    classic text format instead: prometheus_client's OpenMetrics writer would turn the colons of vLLM's
    names into underscores in that case (``vllm_num_requests_running``; client_python issue #1177),
    and the dashboards and rules read ``vllm:*``."""
    app = make_wsgi_app(registry)

    def exposition(environ: dict[str, Any], start_response: Any) -> Any:
        accept = environ.get("HTTP_ACCEPT", "")
        if "openmetrics" in accept and "allow-utf-8" not in accept:
            environ["HTTP_ACCEPT"] = "text/plain; version=0.0.4"
        return app(environ, start_response)

    server = make_server(host, port, exposition, ThreadingWSGIServer, handler_class=_SilentHandler)
    threading.Thread(target=server.serve_forever, name="emserve-metrics", daemon=True).start()
    return server, int(server.server_address[1])

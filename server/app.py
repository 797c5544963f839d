"""The server process: gRPC server (SessionService + health + reflection), engine, shutdown.

Run it with ``emserve serve`` (``python -m emserve.server serve``); :func:`serve` is the entry point.

Lifecycle
---------
1. :func:`create_server` binds the port and starts serving at once: health ``""`` (liveness) is
   SERVING, ``readiness`` and the service name are NOT_SERVING, session calls answer UNAVAILABLE.
2. The engine loads (model resolved and converted if needed, vLLM started) in a worker thread;
   then readiness turns SERVING. An engine passed in (tests) makes the server ready at once.
3. :meth:`EmserveServer.stop` (SIGTERM / SIGINT under :func:`serve`): health turns NOT_SERVING,
   new calls are refused (UNAVAILABLE), ingest streams end after their current commit, in-flight
   calls get ``grace_s`` to finish and are cancelled after it; every commit in flight finishes,
   every open session is checkpointed and closed, then the engine shuts down.
4. An engine whose processes die (vLLM's worker killed: the OOM killer under a memory limit, a signal)
   runs no step again: within :data:`ENGINE_WATCH_S` liveness, readiness and the service name turn
   NOT_SERVING, calls answer UNAVAILABLE (``ENGINE_DEAD``), and :func:`serve` shuts down as in 3 and
   exits with :data:`EXIT_ENGINE_DEAD`, for a supervisor (Kubernetes, systemd) to start it again. The
   sessions are on disk; acknowledged tokens are kept, as after any crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry

from emserve.api.v1 import emserve_pb2_grpc as pb_grpc
from emserve.server import version
from emserve.server.config import ServerConfig
from emserve.server.engine.base import Engine
from emserve.server.logs import log_step
from emserve.server.metrics import GrpcMetrics, Metrics, serve_metrics
from emserve.server.quota import DiskQuota
from emserve.server.rpc.generation import Generator
from emserve.server.rpc.ingest import Ingestor
from emserve.server.rpc.interceptors import GRPC_RECEIVE_HEADROOM, Auth, Decoding
from emserve.server.rpc.service import SERVICE_NAME, Limits, Runtime, SessionService
from emserve.server.rpc.text import TextCodec
from emserve.server.session.manager import SessionManager, question_within
from emserve.server.tenants import load_tenants
from emserve.server.threads import limit_blas_threads

logger = logging.getLogger(__name__)

EXIT_WATCHDOG_S = 60.0  # after "emserve stopped": longest wait for asyncio.run to return
ENGINE_WATCH_S = 1.0
"""How often a ready server asks its engine whether it died (``Engine.failure``)."""
EXIT_ENGINE_DEAD = 3
""":func:`serve`'s exit status after the engine died (lifecycle step 4)."""
READINESS = "readiness"


def build_engine(config: ServerConfig, progress: Callable[[str], None] | None = None) -> tuple[Engine, str]:
    """Resolve the model (converting an embedded one on first use) and start the configured engine."""
    import dataclasses

    from emserve.server.engine.admission import Admission
    from emserve.server.provision.models import resolve_model

    cfg = dataclasses.replace(config.engine, log_stats=config.metrics_port is not None)
    spec = resolve_model(cfg.model, progress=progress)
    engine: Engine
    if cfg.backend == "reference":
        from emserve.server.engine.reference import ReferenceEngine

        engine = ReferenceEngine(str(spec.path), dtype=cfg.dtype, log_dtype=cfg.log_dtype,
                                 max_model_len=cfg.max_model_len, name=spec.name)
    else:
        from emserve.server.engine.vllm_engine import VLLMEngine

        engine = VLLMEngine(dataclasses.replace(cfg, model=str(spec.path)))
    engine.admission = Admission(cfg.ingest_slots or 0, serial=cfg.deterministic)  # slots: never None here
    return engine, cfg.backend


class EmserveServer:
    """One server process's gRPC server and runtime. Use :func:`create_server`."""

    def __init__(self, config: ServerConfig, engine: Engine | None = None, *,
                 registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.engine = engine
        self._owns_engine = engine is None
        self.quota = DiskQuota(int(config.max_session_disk_gib * 2**30), int(config.max_disk_gib * 2**30))
        self.service = SessionService(
            Limits(config.max_sessions, config.max_message_bytes, config.max_inflight_messages,
                   config.max_session_tokens, question_within(config.memory),
                   self.quota.session_bytes, self.quota.total_bytes, config.max_message_tokens),
            version(),
            tenants=load_tenants(config.tenants_file, config.auth_token) if config.tenants_file else None,
        )
        self.health = health.aio.HealthServicer()
        self.ready = asyncio.Event()
        self.load_error: BaseException | None = None
        self._loader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.engine_failed = asyncio.Event()
        """Set when the engine died (lifecycle step 4); ``engine_failure`` says why."""
        self.engine_failure: str | None = None
        self._stopped = False
        size = config.max_message_bytes
        options = [
            ("grpc.max_send_message_length", size),
            # above our own limit, so that Decoding answers oversized messages with emserve's error details
            ("grpc.max_receive_message_length", size + GRPC_RECEIVE_HEADROOM),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10000),
            ("grpc.so_reuseport", 0),
        ]
        self.metrics: Metrics | None = None
        """The server's metrics, with a metrics port (``registry``: where; default the process's
        global registry, where vLLM's engine statistics are too)."""
        self._metrics_http: Any = None
        self.metrics_port: int | None = None
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if config.metrics_port is not None:
            self.metrics = Metrics(registry if registry is not None else REGISTRY, sessions_dir=config.sessions_dir)
            interceptors.append(GrpcMetrics(self.metrics))  # first: it sees the calls auth denies too
            self.metrics.ready_fn = lambda: self.ready.is_set() and not self.service.draining.is_set()
        tokens = load_tenants(config.tenants_file, config.auth_token)
        if tokens:
            interceptors.append(Auth(tokens))
        interceptors.append(Decoding(size))  # innermost: the handlers outside it take its deserializer
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_SessionServiceServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        self.port = 0
        self._health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self._openai: Any = None
        self._openai_task: asyncio.Task[None] | None = None
        self.openai_port: int | None = None

    def _credentials(self) -> grpc.ServerCredentials | None:
        """TLS of the gRPC port (mutual with a client CA), or None: plaintext."""
        cfg = self.config
        if cfg.tls_cert is None or cfg.tls_key is None:
            return None
        ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
        return grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
                                           root_certificates=ca, require_client_auth=ca is not None)

    async def _start_openai(self) -> None:
        """The OpenAI-compatible endpoint, served by uvicorn on this loop (its signal handling off: the
        server's own SIGTERM handling stops it)."""
        import contextlib as _contextlib

        import uvicorn

        from emserve.server.rpc.openai_api import OpenAIDoor, build_app

        class _Server(uvicorn.Server):
            @_contextlib.contextmanager
            def capture_signals(self) -> Any:
                yield

        door = OpenAIDoor(self.service, load_tenants(self.config.tenants_file, self.config.auth_token))
        config = uvicorn.Config(build_app(door), host=self.config.host, port=int(self.config.openai_port or 0),
                                log_level="warning", lifespan="off", access_log=False)
        self._openai = _Server(config)
        self._openai_task = asyncio.create_task(self._openai.serve())
        while not self._openai.started:
            if self._openai_task.done():  # could not bind: its exception (or uvicorn's SystemExit)
                self._openai_task.result()
                raise OSError(f"cannot serve the OpenAI endpoint on {self.config.host}:{self.config.openai_port}")
            await asyncio.sleep(0.01)
        self.openai_port = int(self._openai.servers[0].sockets[0].getsockname()[1])

    async def start(self) -> int:
        limit_blas_threads(self.config.host_blas_threads)
        address = f"{self.config.host}:{self.config.port}"
        creds = self._credentials()
        self.port = self.server.add_insecure_port(address) if creds is None else self.server.add_secure_port(
            address, creds)
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        await self.server.start()
        if self.config.health_port is not None:  # plaintext health alone, for probes
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(f"{self.config.host}:{self.config.health_port}")
            if self.health_port == 0:
                raise OSError(f"cannot bind {self.config.host}:{self.config.health_port}")
            await self._health_server.start()
        if self.config.openai_port is not None:
            await self._start_openai()
        if self.metrics is not None and self.config.metrics_port is not None:
            self._metrics_http, self.metrics_port = serve_metrics(
                self.metrics.registry, self.config.host, self.config.metrics_port)
            logger.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in (READINESS, SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.engine is not None:
            await self._become_ready(self.engine, "given")
        else:
            self._loader = asyncio.create_task(self._load())
        return self.port

    async def _load(self) -> None:
        try:
            engine, backend = await asyncio.to_thread(
                build_engine, self.config, lambda line: logger.info("model: %s", line)
            )
        except BaseException as e:  # noqa: BLE001 - reported through readiness and load_error
            self.load_error = e
            logger.exception("engine failed to load")
            return
        self.engine = engine
        await self._become_ready(engine, backend)

    async def _become_ready(self, engine: Engine, backend: str) -> None:
        cfg = self.config
        codec = await asyncio.to_thread(TextCodec, engine.info.path)
        manager = SessionManager(cfg.sessions_dir, engine, cfg.memory, max_sessions=cfg.max_sessions,
                                 max_open=cfg.max_open_sessions, score_device=cfg.retrieval_device,
                                 device_budget=int(cfg.retrieval_device_gib * 2**30),
                                 quota=self.quota)
        ingestor = Ingestor(manager, codec, max_inflight_messages=cfg.max_inflight_messages,
                            max_message_bytes=cfg.max_message_bytes, max_session_tokens=cfg.max_session_tokens,
                            max_message_tokens=cfg.max_message_tokens, draining=self.service.draining)
        generator = Generator(manager, codec, max_session_tokens=cfg.max_session_tokens)
        if backend == "given":
            backend = type(engine).__name__.removesuffix("Engine").lower()
        await manager.recover()  # what a crash left: interrupted deletions, sessions behind their files
        manager.observers.append(log_step)
        self.service.runtime = Runtime(manager, codec, ingestor, generator, backend)
        if self.metrics is not None:
            self.metrics.bind(manager)
        for name in (READINESS, SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.ready.set()
        self._watcher = asyncio.create_task(self._watch_engine(engine))
        logger.info("ready: %s (%s), sessions in %s", engine.info.name, backend, cfg.sessions_dir)

    async def _watch_engine(self, engine: Engine) -> None:
        """Lifecycle step 4: every :data:`ENGINE_WATCH_S`, whether the engine died."""
        while not self._stopped:
            await asyncio.sleep(ENGINE_WATCH_S)
            why = engine.failure()
            if why is None or self._stopped:
                continue
            logger.error("the engine died: %s; the server stops (exit status %d) to be started again", why,
                         EXIT_ENGINE_DEAD)
            self.engine_failure = why
            for name in ("", READINESS, SERVICE_NAME):
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            self.engine_failed.set()
            return

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the engine is loaded (raises its load error, or TimeoutError)."""
        waiter = asyncio.ensure_future(self.ready.wait())
        tasks: list[asyncio.Future[Any]] = [waiter] + ([self._loader] if self._loader is not None else [])
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self.load_error is not None:
            raise self.load_error
        if not self.ready.is_set():
            raise TimeoutError("the engine did not load in time")

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown (see the module docstring). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._watcher is not None:
            self._watcher.cancel()
        grace = self.config.grace_s if grace is None else grace
        t0 = time.perf_counter()
        await self.health.enter_graceful_shutdown()
        self.service.draining.set()
        await self.server.stop(grace)
        if self._loader is not None and not self._loader.done():
            await asyncio.gather(self._loader, return_exceptions=True)
        t1 = time.perf_counter()
        rt = self.service.runtime
        if rt is not None:
            await rt.manager.close_all()
        t2 = time.perf_counter()
        if self._owns_engine and self.engine is not None:
            await self.engine.close()
        if self._openai is not None:  # its in-flight answers end with the drain's cancellations
            self._openai.should_exit = True
            if self._openai_task is not None:
                await asyncio.gather(self._openai_task, return_exceptions=True)
        if self._health_server is not None:  # a probe during the drain learns NOT_SERVING
            await self._health_server.stop(0)
        if self._metrics_http is not None:  # last: a scrape during the drain still answers
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self.metrics is not None:
            self.metrics.close()
        logger.info("shutdown: calls drained in %.1f s, sessions closed in %.1f s, engine closed in %.1f s",
                    t1 - t0, t2 - t1, time.perf_counter() - t2)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def create_server(config: ServerConfig, *, engine: Engine | None = None,
                        registry: CollectorRegistry | None = None) -> tuple[EmserveServer, int]:
    """Start a server for ``config`` (port 0: any free port); returns it and its bound port.

    ``engine``: use this engine (tests); otherwise the configured one loads in the background.
    ``registry``: where its metrics go (tests; default the process's global registry).
    """
    server = EmserveServer(config, engine, registry=registry)
    port = await server.start()
    return server, port


def announce_line(line: str) -> None:
    """Print a status line to stdout; a stdout that is gone (a closed pipe: the parent that read it has
    exited) loses the line instead of stopping the server, at startup or in the middle of its shutdown."""
    with contextlib.suppress(BrokenPipeError, ValueError):  # ValueError: stdout already closed
        print(line, flush=True)


def serve(config: ServerConfig, *, announce: Callable[[str], None] | None = None) -> int:
    """Run a server until SIGTERM / SIGINT, then shut down gracefully. Returns the exit status."""
    say = announce or announce_line

    async def main() -> int:
        server, port = await create_server(config)
        say(f"emserve listening on {config.host}:{port}" + (" (TLS)" if config.tls_cert else ""))
        if server.openai_port is not None:
            say(f"emserve OpenAI-compatible endpoint on http://{config.host}:{server.openai_port}/v1")
        if server.health_port is not None:
            say(f"emserve health on {config.host}:{server.health_port} (plaintext, grpc.health.v1 only)")
        if server.metrics_port is not None:
            say(f"emserve metrics on http://{config.host}:{server.metrics_port}/metrics")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stopper = asyncio.ensure_future(stop.wait())
        try:
            ready = asyncio.ensure_future(server.wait_ready())
            await asyncio.wait([ready, stopper], return_when=asyncio.FIRST_COMPLETED)
            if ready.done():
                if ready.exception() is not None:
                    say(f"emserve failed to load the engine: {ready.exception()}")
                    await server.stop(0)
                    return 1
                info = server.engine.info if server.engine is not None else None
                say(f"emserve ready: model {info.name if info else '?'}, sessions in {config.sessions_dir}")
                failed = asyncio.ensure_future(server.engine_failed.wait())
                await asyncio.wait([stopper, failed], return_when=asyncio.FIRST_COMPLETED)
                failed.cancel()
            status = 0
            if server.engine_failed.is_set():
                say(f"emserve: the engine died ({server.engine_failure}); shutting down, exit status "
                    f"{EXIT_ENGINE_DEAD}")
                status = EXIT_ENGINE_DEAD
            say("emserve shutting down")
            await server.stop()
            say("emserve stopped")
            # asyncio.run still cancels leftover tasks and joins its worker threads: should that hang,
            # the log gets every thread's stack and the process exits (1) instead of waiting forever.
            faulthandler.dump_traceback_later(EXIT_WATCHDOG_S, exit=True)
            return status
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    try:
        return asyncio.run(main())
    finally:
        faulthandler.cancel_dump_traceback_later()

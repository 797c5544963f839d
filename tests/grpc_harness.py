"""Test harness for the gRPC server: a server on a background event loop, engine wrappers, helpers.

The server runs on its own thread and loop (as in production, a separate process would), bound to
127.0.0.1 port 0; tests talk to it over the real socket with the blocking client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from emserve.retrieval.plan import WindowPlan
from emserve.server.app import EmserveServer, create_server
from emserve.server.config import ServerConfig, build_config
from emserve.server.engine.base import Engine, SamplingSpec, StepOptions, StepResult, TokenDelta

_T = TypeVar("_T")

TINY_MEMORY = dict(n_init=16, n_local=64, n_mem=64, exc_block_size=32, min_block_size=4, max_block_size=24,
                   surprisal_threshold_gamma=1.0)  # pinned: the tests rely on events forming in a few hundred tokens


def tiny_config(model_dir: Path, sessions: Path, **overrides: Any) -> ServerConfig:
    flags: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "sessions_dir": sessions, "model": str(model_dir),
                             "backend": "reference", "memory": TINY_MEMORY, "grace_s": 2.0}
    flags.update(overrides)
    return build_config(flags, env={})


class ServerThread:
    """An EmserveServer on a background event loop."""

    def __init__(self, config: ServerConfig, engine: Engine | None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="emserve-test-server", daemon=True)
        self.thread.start()
        self.server: EmserveServer
        self.server, self.port = self.run(create_server(config, engine=engine))
        self.address = f"127.0.0.1:{self.port}"

    def run(self, coro: Awaitable[_T], timeout: float = 120.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run a plain function on the server's loop (to read its state safely)."""

        async def go() -> _T:
            return fn()

        return self.run(go())

    @property
    def runtime(self) -> Any:
        return self.server.service.runtime

    def stop(self, grace: float = 1.0) -> None:
        try:
            self.run(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


class WatchedEngine(Engine):
    """Wraps an engine: optional delay per generated token; records streams closed before their end."""

    def __init__(self, inner: Engine, token_delay: float = 0.0) -> None:
        self.inner = inner
        self.info = inner.info
        self.log_dtype = inner.log_dtype
        self.token_delay = token_delay
        self.started = 0
        self.aborted = 0
        self.finished = 0
        self.first_token = asyncio.Event()

    async def stream(self, plan: WindowPlan, sampling: SamplingSpec | None = None,
                     options: StepOptions = StepOptions()) -> AsyncIterator[TokenDelta | StepResult]:
        self.started += 1
        gen = self.inner.stream(plan, sampling, options)
        try:
            async for item in gen:
                if isinstance(item, TokenDelta) and self.token_delay:
                    await asyncio.sleep(self.token_delay)
                yield item
            self.finished += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted += 1
            raise
        finally:
            await gen.aclose()

    def release_log(self, path: str) -> None:
        release = getattr(self.inner, "release_log", None)
        if release is not None:
            release(path)

    async def close(self) -> None:
        await self.inner.close()

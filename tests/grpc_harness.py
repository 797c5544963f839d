"""Test harness for the gRPC server: a server on a background event loop, engine wrappers, helpers.

The server runs on its own thread and loop (as in production, a separate process would), bound to
127.0.0.1 port 0; tests talk to it over the real socket with the blocking client.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from prometheus_client.parser import text_string_to_metric_families

from emserve.client import Client
from emserve.retrieval.kvlog import KVLog
from emserve.retrieval.plan import WindowPlan
from emserve.server.app import EmserveServer, create_server
from emserve.server.config import ServerConfig, build_config
from emserve.server.engine.base import Engine, EngineDead, SamplingSpec, StepOptions, StepResult, TokenDelta

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

    def __init__(self, config: ServerConfig, engine: Engine | None, registry: Any = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="emserve-test-server", daemon=True)
        self.thread.start()
        self.server: EmserveServer
        self.server, self.port = self.run(create_server(config, engine=engine, registry=registry))
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


def random_ids(n: int, seed: int, lo: int = 3, hi: int = 500) -> list[int]:
    return torch.randint(lo, hi, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def log_tokens(srv: ServerThread, session_id: str) -> list[int]:
    """The token ids in a session's KV log, read from its directory."""
    folder = srv.server.config.sessions_dir / session_id
    data = next(p for p in folder.iterdir() if p.is_dir())
    with KVLog.open(data / "log") as log:
        return log.tokens().tolist()


def check_isolated_sessions(
    srv: ServerThread,
    client: Client,
    *,
    n: int,
    at: int,
    piece_tokens: int,
    max_tokens: int,
    join_s: float,
    full_budget: bool,
) -> None:
    """Two sessions ingest at the same time over their own connections — A from ids [3, 250) with a
    "fact" inserted at ``at``, B from [250, 500) — and each retrieves only from its own log."""
    fact = [7, 11, 13, 17, 19, 23, 29, 31]
    a_ids = random_ids(n, 1, 3, 250)
    a_ids[at:at] = fact * 2
    b_ids = random_ids(n, 2, 250, 500)
    client.create_session("A")
    client.create_session("B")
    spans: dict[str, tuple[float, float]] = {}

    def run(sid: str, ids: list[int]) -> None:
        with Client(srv.address) as c:
            t0 = time.monotonic()
            c.ingest_tokens(sid, ids, piece_tokens=piece_tokens)
            spans[sid] = (t0, time.monotonic())

    threads = [threading.Thread(target=run, args=a) for a in (("A", a_ids), ("B", b_ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_s)
    (a0, a1), (b0, b1) = spans["A"], spans["B"]
    assert a0 < b1 and b0 < a1  # they overlapped
    assert log_tokens(srv, "A") == a_ids and log_tokens(srv, "B") == b_ids
    for sid, lo, hi in (("B", 250, 500), ("A", 3, 250)):
        ans = client.ask(sid, fact, max_tokens=max_tokens, ignore_eos=True, trace=True)
        assert len(ans.token_ids) == max_tokens and ans.trace is not None and ans.trace.events
        log = log_tokens(srv, sid)
        for lay in ans.trace.layers:
            if full_budget:
                assert sum(e.end - e.start for e in lay.events) == ans.trace.budget
            for e in lay.events:
                assert all(lo <= t < hi for t in log[e.start : e.end]), (sid, e)
    b_log = log_tokens(srv, "B")
    assert not any(b_log[i : i + len(fact)] == fact for i in range(len(b_log)))
    assert client.get_session("A").num_tokens == len(a_ids)


class WatchedEngine(Engine):
    """Wraps an engine: optional delay per generated token; records streams closed before their end.
    ``dead``: set it to a reason to stand for an engine whose processes died (``failure`` says it, a
    step raises ``EngineDead``)."""

    def __init__(self, inner: Engine, token_delay: float = 0.0) -> None:
        self.dead: str | None = None
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
        if self.dead is not None:
            raise EngineDead(self.dead)
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

    def failure(self) -> str | None:
        return self.dead

    def running(self) -> int:
        """Engine requests started and neither finished nor aborted."""
        return self.started - self.finished - self.aborted

    def release_log(self, path: str) -> None:
        release = getattr(self.inner, "release_log", None)
        if release is not None:
            release(path)

    async def close(self) -> None:
        await self.inner.close()


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``(sample name, labels) -> value`` of one scrape of ``http://127.0.0.1:port/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def scrape_settled(port: int, timeout_s: float = 10.0) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A scrape taken once every RPC the server started is counted as handled. A client sees an RPC's
    status as soon as the server sends it; the server's interceptor counts it an instant later, so a
    scrape right after a call may precede the count."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(port)
        settled = value(m, "grpc_server_started_total", 0.0) == value(m, "grpc_server_handled_total", 0.0)
        if settled or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def value(samples: dict, name: str, default: float = math.nan, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (none: ``default``)."""
    hits = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    return sum(hits) if hits else default

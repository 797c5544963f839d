"""The client distribution (``client/``) against a real server socket (HF reference engine, tiny model):
the asyncio client method by method against the blocking one, its resumed ingest, readiness through the
health Watch, gRPC's retries of reads on UNAVAILABLE, and the request id a generation always carries.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_harness import ServerThread, WatchedEngine, log_tokens, tiny_config

from emserve.client import Client, ClientError, generate_request, split_stream, split_text
from emserve.client.aio import AsyncClient
from emserve.server.engine.reference import ReferenceEngine

TEXT = "The quick brown fox jumps over the lazy dog. Retrieval picks similar and contiguous events. " * 24


@pytest.fixture
def srv(tiny_model_dir: Path, tmp_path: Path, ref_engine: ReferenceEngine) -> Iterator[ServerThread]:
    s = ServerThread(tiny_config(tiny_model_dir, tmp_path / "sessions"), WatchedEngine(ref_engine))
    yield s
    s.stop()


def test_the_async_client_answers_as_the_blocking_one(srv: ServerThread) -> None:
    sync = Client(srv.address, timeout=30)
    sync.create_session("sync")
    sync.ingest_text("sync", TEXT, piece_chars=200)
    want = sync.ask("sync", "The fox", max_tokens=8)

    async def pieces() -> AsyncIterator[str]:
        for p in split_text(TEXT, 200):
            await asyncio.sleep(0)
            yield p

    async def go() -> dict[str, Any]:
        async with AsyncClient(srv.address, timeout=30) as c:
            info = await c.wait_ready(timeout=30)
            s = await c.create_session("aio", labels={"k": "v"})
            res = await c.ingest(s.session_id, pieces())
            streamed = [t async for t in c.generate("aio", "The fox", max_tokens=8).text()]
            answer = await c.ask("aio", "The fox", max_tokens=8, trace=True)
            events = [e async for e in c.list_events("aio", page_size=3)]
            sessions = [x.session_id async for x in c.list_sessions(page_size=1)]
            curve = await c.surprise("aio", 0, 64)
            got = await c.get_session("aio")
            with pytest.raises(ClientError) as missing:
                await c.get_session("nope")
            await c.delete_session("aio")
            with pytest.raises(ClientError) as gone:
                await c.ask("aio", "x", max_tokens=1)
            return dict(info=info, res=res, streamed=streamed, answer=answer, events=events, sessions=sessions,
                        curve=curve, got=got, missing=missing.value, gone=gone.value)

    out = asyncio.run(go())
    assert out["info"].ready
    assert out["res"].committed_offset == sync.get_session("sync").num_tokens == out["got"].num_tokens
    assert out["answer"].token_ids == want.token_ids and out["answer"].text == want.text
    assert "".join(out["streamed"]) == want.text
    assert out["answer"].trace is not None
    assert [(e.start, e.end) for e in out["events"]] == [(e.start, e.end) for e in sync.list_events("sync")]
    assert set(out["sessions"]) == {"sync", "aio"}
    assert list(out["curve"].surprise) == list(sync.surprise("sync", 0, 64).surprise)
    assert out["got"].labels["k"] == "v"
    assert out["missing"].code == grpc.StatusCode.NOT_FOUND and out["missing"].reason
    assert out["gone"].code == grpc.StatusCode.NOT_FOUND
    sync.close()


def test_async_ingest_from_a_file_resumes_after_the_server_ends_the_stream(srv: ServerThread) -> None:
    """The stream is ended mid-ingest (UNAVAILABLE while draining): the async client resumes from the
    committed offset and every token lands once; a plain file is read in a worker thread."""
    codec = srv.runtime.codec
    pieces = list(split_text(TEXT, 120))
    f = io.StringIO("".join(pieces))
    reads = [0]

    class Slow(io.StringIO):
        def read(self, n: int = -1) -> str:
            reads[0] += 1
            if reads[0] == len(pieces) // 2:
                srv.call(srv.server.service.draining.set)  # the stream ends after its current commit
                threading.Timer(0.5, lambda: srv.call(srv.server.service.draining.clear)).start()
            return super().read(n)

    async def go() -> Any:
        async with AsyncClient(srv.address, timeout=30) as c:
            await c.create_session("rc")
            return await c.ingest("rc", split_stream(Slow(f.getvalue()), 120), retry_wait_s=30)

    res = asyncio.run(go())
    assert res.reconnects >= 1
    expect = [t for p in pieces for t in codec.encode(p)]
    assert res.committed_offset == len(expect)
    assert log_tokens(srv, "rc") == expect


def test_wait_ready_follows_the_health_watch_until_the_engine_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    s = ServerThread(tiny_config(tiny_model_dir, tmp_path / "sessions"), None)  # loads the model itself
    try:
        with Client(s.address) as c:
            info = c.wait_ready(timeout=120, poll_s=30)  # a poll would take 30 s; the Watch answers at once
            assert info.ready

        async def go() -> Any:
            async with AsyncClient(s.address) as ac:
                return await ac.wait_ready(timeout=30, poll_s=30)

        assert asyncio.run(go()).ready
    finally:
        s.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_reads_are_retried_on_unavailable_until_the_server_listens(tiny_model_dir: Path, tmp_path: Path,
                                                                     ref_engine: ReferenceEngine) -> None:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    with Client(address, retries=0) as c:
        t0 = time.monotonic()
        with pytest.raises(ClientError) as ei:
            c.server_info()
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 5
    started: list[ServerThread] = []
    timer = threading.Timer(0.7, lambda: started.append(
        ServerThread(tiny_config(tiny_model_dir, tmp_path / "sessions", port=port), WatchedEngine(ref_engine))))
    try:
        with Client(address) as c:  # default: 4 more attempts, backoff 0.2 s doubling
            timer.start()
            t0 = time.monotonic()
            info = c.server_info()
            assert info.vocab_size == 512 and time.monotonic() - t0 >= 0.5
    finally:
        timer.join()
        for s in started:
            s.stop()


def test_a_generation_always_carries_a_request_id(srv: ServerThread) -> None:
    """The client makes up a fresh request id per generation, so a remembering generation that gRPC
    retries is stored once, and two generations are never taken for one."""
    a, b = generate_request("s", "x"), generate_request("s", "x", request_id="mine")
    assert a.request_id.startswith("r-") and a.request_id != generate_request("s", "x").request_id
    assert b.request_id == "mine"
    with Client(srv.address, timeout=30) as c:
        c.create_session("rid")
        c.ingest_text("rid", TEXT[:400])
        before = c.get_session("rid").num_tokens
        first = c.ask("rid", "Hello", max_tokens=4, ignore_eos=True, remember=True)
        second = c.ask("rid", "Hello", max_tokens=4, ignore_eos=True, remember=True)
        n = first.complete.usage.prompt_tokens + 4
        assert second.complete.committed_offset == before + 2 * n == c.get_session("rid").num_tokens

"""The client distribution's own tests: they import nothing but the client, gRPC and protobuf (they run in
a fresh environment holding only ``emserve-client`` at its lowest allowed dependency versions:
tests/e2e/test_client_install.py). A real gRPC server on 127.0.0.1 with a scripted SessionService stands
in for emserve where a call's path through gRPC (retries, deadlines, error details) is the subject."""

from __future__ import annotations

import asyncio
import io
import json
import random
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from emserve.api.v1 import emserve_pb2 as pb
from emserve.api.v1 import emserve_pb2_grpc as pb_grpc
from emserve.client import Client, ClientError, generate_request, service_config, split_stream, split_text
from emserve.client.aio import AsyncClient


def test_split_text_cuts_before_whitespace_and_loses_nothing() -> None:
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice("ab \n") for _ in range(rng.randrange(0, 300)))
        n = rng.randrange(1, 40)
        pieces = list(split_text(text, n))
        assert "".join(pieces) == text and all(0 < len(p) <= n for p in pieces)
        for prev, p in zip(pieces, pieces[1:], strict=False):  # a cut inside a word only when it has no blank
            if not p[0].isspace():
                assert not any(c.isspace() for c in prev[2:])
        assert list(split_stream(io.StringIO(text), n)) == pieces
    with pytest.raises(ValueError):
        list(split_text("x", 0))


def test_generate_request_carries_every_setting_and_a_fresh_request_id() -> None:
    r = generate_request("s", [1, 2], max_tokens=3, temperature=0.5, top_p=0.9, seed=7, stop=["."], remember=True)
    assert list(r.prompt_tokens.ids) == [1, 2] and r.sampling.max_tokens == 3 and r.sampling.seed == 7
    assert r.sampling.top_p == pytest.approx(0.9) and list(r.sampling.stop) == ["."] and r.remember
    assert r.request_id.startswith("r-") and r.request_id != generate_request("s", "x").request_id
    assert generate_request("s", "x", request_id="mine").request_id == "mine"


def test_service_config_retries_the_reads_only() -> None:
    (method,) = json.loads(service_config(4))["methodConfig"]
    names = {n["method"] for n in method["name"]}
    assert {"GetSession", "ListEvents", "Check"} <= names
    assert not {"CreateSession", "DeleteSession", "Ingest", "Generate"} & names  # Generate: GenerateStream
    policy = method["retryPolicy"]
    assert policy["maxAttempts"] == 5 and policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "retryPolicy" not in json.loads(service_config(0))["methodConfig"][0]
    with pytest.raises(ValueError):
        service_config(-1)


class Scripted(pb_grpc.SessionServiceServicer):
    """Fails the first ``fail`` calls of each method with UNAVAILABLE (and a RetryInfo), then answers."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.calls: dict[str, int] = {}
        self.request_ids: list[str] = []

    def _maybe_fail(self, name: str, context: grpc.ServicerContext) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] <= self.fail:
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.ErrorInfo(reason="NOT_READY", domain="emserve"))
            context.abort_with_status(rpc_status.to_status(status_pb2.Status(
                code=code_pb2.UNAVAILABLE, message="loading", details=[detail])))

    def GetServerInfo(self, request: Any, context: grpc.ServicerContext) -> pb.ServerInfo:
        self._maybe_fail("GetServerInfo", context)
        return pb.ServerInfo(ready=True, vocab_size=7)

    def CreateSession(self, request: Any, context: grpc.ServicerContext) -> pb.Session:
        self._maybe_fail("CreateSession", context)
        return pb.Session(session_id=request.session_id)

    def Generate(self, request: Any, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        self._maybe_fail("Generate", context)
        self.request_ids.append(request.request_id)
        yield pb.GenerateResponse(chunk=pb.GenerateChunk(text="ok"))
        yield pb.GenerateResponse(complete=pb.GenerateComplete(text="ok", token_ids=[1]))


@pytest.fixture
def scripted() -> Iterator[tuple[str, Scripted]]:
    servicer = Scripted(fail=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_SessionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def test_unavailable_reads_and_generations_are_retried_writes_are_not(scripted: tuple[str, Scripted]) -> None:
    address, servicer = scripted
    with Client(address) as c:
        assert c.server_info().vocab_size == 7
        assert servicer.calls["GetServerInfo"] == 3
        assert c.ask("s", "hi").text == "ok" and servicer.calls["Generate"] == 3
        assert len(set(servicer.request_ids)) == 1  # every attempt: the same request id
        with pytest.raises(ClientError) as ei:
            c.create_session("a")
        assert servicer.calls["CreateSession"] == 1
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE and ei.value.reason == "NOT_READY"
    with Client(address, retries=0) as c:
        servicer.calls.clear()
        with pytest.raises(ClientError):
            c.server_info()
        assert servicer.calls["GetServerInfo"] == 1


def test_the_async_client_retries_and_reads_error_details(scripted: tuple[str, Scripted]) -> None:
    address, servicer = scripted

    async def go() -> tuple[int, str, ClientError]:
        async with AsyncClient(address) as c:
            info = await c.server_info()
            answer = await c.ask("s", "hi")
            with pytest.raises(ClientError) as ei:
                await c.create_session("a")
            return info.vocab_size, answer.text, ei.value

    vocab, text, err = asyncio.run(go())
    assert (vocab, text) == (7, "ok") and servicer.calls["GetServerInfo"] == servicer.calls["Generate"] == 3
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "NOT_READY"
    assert err.detail(error_details_pb2.ErrorInfo).domain == "emserve"


def test_a_generation_has_a_default_deadline() -> None:
    release = threading.Event()

    class Stuck(pb_grpc.SessionServiceServicer):
        def Generate(self, request: Any, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
            release.wait(10)
            yield pb.GenerateResponse(complete=pb.GenerateComplete(text="late"))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_SessionServiceServicer_to_server(Stuck(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", generate_timeout=0.5) as c:
            with pytest.raises(ClientError) as ei:
                c.ask("s", "hi")
            assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        release.set()
        server.stop(0)

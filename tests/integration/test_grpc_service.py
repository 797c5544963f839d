"""The gRPC service over a real socket (127.0.0.1, port 0) on the HF reference engine and a tiny model.

Plumbing only (random weights): sessions, every status-code path, ingest acks / resume / flow
control, cancel and deadlines, isolation of concurrent sessions, auth, health and reflection,
graceful shutdown and reopening. The real model and vLLM are in test_grpc_vllm.py and tests/e2e.
"""

from __future__ import annotations

import queue
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2 as E
from grpc_harness import ServerThread, WatchedEngine, check_isolated_sessions, log_tokens, random_ids, tiny_config
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from emserve.client import Client, ClientError, pb

CHUNK = 32  # exc_block_size of the tiny memory config


def _server(tiny_model_dir: Path, tmp_path: Path, engine: Any, **kw: Any) -> ServerThread:
    return ServerThread(tiny_config(tiny_model_dir, tmp_path / "sessions", **kw), engine)


@pytest.fixture
def srv(tiny_model_dir: Path, tmp_path: Path, engine: WatchedEngine) -> Iterator[ServerThread]:
    s = _server(tiny_model_dir, tmp_path, engine)
    yield s
    s.stop()


@pytest.fixture
def client(srv: ServerThread) -> Iterator[Client]:
    c = Client(srv.address, timeout=30)
    yield c
    c.close()



def _code(fn: Any, *args: Any, **kw: Any) -> ClientError:
    """The ClientError that ``fn(*args, **kw)`` raises (generators are drained)."""
    with pytest.raises(ClientError) as ei:
        out = fn(*args, **kw)
        if isinstance(out, types.GeneratorType):
            list(out)
    return ei.value



class RawIngest:
    """An Ingest stream driven message by message (the generated stub, no client logic)."""

    def __init__(self, client: Client, session_id: str, *, header: bool = False) -> None:
        """``header``: name the session in the x-session-id header only (messages leave it empty)."""
        self.session_id = "" if header else session_id
        self.q: queue.Queue[pb.IngestRequest | None] = queue.Queue()
        md = [("x-session-id", session_id)] if header else None
        self.call = client.stub.Ingest(iter(self.q.get, None), metadata=md)

    def send(self, **kw: Any) -> None:
        self.q.put(pb.IngestRequest(session_id=self.session_id, **kw))

    def tokens(self, ids: list[int], offset: int | None = None, **kw: Any) -> None:
        if offset is not None:
            kw["offset"] = offset
        self.send(tokens=pb.TokenIds(ids=ids), **kw)

    def half_close(self) -> None:
        self.q.put(None)

    def next(self) -> pb.IngestResponse:
        return next(self.call)

    def rest(self) -> list[pb.IngestResponse]:
        return list(self.call)


# ------------------------------------------------------------------------------------------ health
def test_health_and_reflection(srv: ServerThread, client: Client) -> None:
    stub = health_pb2_grpc.HealthStub(client.channel)
    for name in ("", "readiness", "emserve.v1.SessionService"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, name
    with pytest.raises(grpc.RpcError) as ei:
        stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    db = ProtoReflectionDescriptorDatabase(client.channel)
    services = set(db.get_services())
    assert {"emserve.v1.SessionService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(db)
    svc = pool.FindServiceByName("emserve.v1.SessionService")
    assert "Ingest" in [m.name for m in svc.methods]
    assert pool.FindMessageTypeByName("emserve.v1.IngestAck").fields_by_name["committed_offset"]
    info = client.server_info()
    assert info.ready and info.backend == "watched"
    assert info.vocab_size == 512 and info.default_memory.exc_block_size == CHUNK


def test_not_ready_until_the_engine_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    s = _server(tiny_model_dir, tmp_path, None, model=str(tmp_path / "no-such-model"))
    try:
        with Client(s.address) as c:
            deadline = time.monotonic() + 30
            while s.server.load_error is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s.server.load_error is not None
            assert c.health("") == "SERVING"
            assert c.health("readiness") == "NOT_SERVING"
            assert not c.server_info().ready
            e = _code(c.create_session, "a")
            assert e.code == grpc.StatusCode.UNAVAILABLE and e.reason == "NOT_READY"
            assert e.detail(E.RetryInfo).retry_delay.seconds > 0
    finally:
        s.stop()


def test_an_engine_that_died_turns_the_server_unavailable(tiny_model_dir: Path, tmp_path: Path,
                                                           engine: WatchedEngine) -> None:
    """Lifecycle step 4 (``server/app.py``): within a second or two of the engine's death, liveness,
    readiness and the service name turn NOT_SERVING (a supervisor restarts the server; ``serve`` exits 3,
    tests/integration/test_engine_orphans.py) and calls answer UNAVAILABLE with a retry delay."""
    s = _server(tiny_model_dir, tmp_path, engine)
    try:
        with Client(s.address, timeout=30) as c:
            c.create_session("a")
            c.ingest_tokens("a", random_ids(100, 1))
            assert c.health("") == "SERVING" and not s.server.engine_failed.is_set()
            engine.dead = "its worker was killed (test)"
            deadline = time.monotonic() + 10
            while c.health("") == "SERVING" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert [c.health(n) for n in ("", "readiness", "emserve.v1.SessionService")] == ["NOT_SERVING"] * 3
            assert s.server.engine_failed.is_set() and s.server.engine_failure == engine.dead
            e = _code(c.ingest_tokens, "a", random_ids(64, 2), retries=0)  # (the client would wait for a restart)
            assert e.code == grpc.StatusCode.UNAVAILABLE and e.reason in ("ENGINE_DEAD", "SESSION_REOPENING")
            assert e.detail(E.RetryInfo).retry_delay.ToMilliseconds() > 0
            assert c.get_session("a").num_tokens == 100  # what was acknowledged stays
    finally:
        engine.dead = None
        s.stop()


# ------------------------------------------------------------------------------------------ sessions
def test_session_lifecycle(client: Client) -> None:
    s = client.create_session("alpha", memory={"n_local": 48, "per_layer": False, "question_n_local": 8},
                              labels={"doc": "book"})
    assert s.session_id == "alpha" and s.state == pb.Session.ACTIVE
    assert s.memory.n_local == 48 and s.memory.per_layer is False and s.memory.n_init == 16
    assert s.memory.question_n_local == 8 and s.memory.question_n_mem == 64  # the default 256, as used: n_mem
    assert s.memory.question_rank == "interleave" and s.memory.question_query_tokens == 64
    mean = client.create_session("mean", memory={"question_rank": "mean", "question_query_tokens": 4})
    assert mean.memory.question_rank == "mean" and mean.memory.question_query_tokens == 4
    client.delete_session("mean")
    assert s.labels["doc"] == "book" and s.num_tokens == 0 and s.create_time.seconds > 0
    e = _code(client.create_session, "alpha")
    assert e.code == grpc.StatusCode.ALREADY_EXISTS and e.detail(E.ResourceInfo).resource_name == "alpha"
    anon = client.create_session()
    assert anon.session_id.startswith("s-")
    for i in range(3):
        client.create_session(f"b{i}")
    ids = [x.session_id for x in client.list_sessions(page_size=2)]
    assert ids == sorted(["alpha", anon.session_id, "b0", "b1", "b2"])
    got = client.get_session("alpha")
    assert got.memory.n_local == 48 and not got.writer_attached
    client.delete_session("alpha")
    assert _code(client.get_session, "alpha").code == grpc.StatusCode.NOT_FOUND
    assert _code(client.delete_session, "alpha").code == grpc.StatusCode.NOT_FOUND
    again = client.create_session("alpha")  # the same id again: a fresh session
    assert again.num_tokens == 0 and again.memory.n_local == 64


def test_delete_and_recreate_then_ingest(client: Client) -> None:
    client.create_session("r")
    client.ingest_tokens("r", random_ids(100, 1))
    client.delete_session("r")
    client.create_session("r")
    res = client.ingest_tokens("r", random_ids(70, 2))
    assert res.committed_offset == 70 and client.get_session("r").num_tokens == 70


def test_unknown_session_is_not_found_everywhere(client: Client) -> None:
    for call in (
        lambda: client.get_session("ghost"),
        lambda: client.delete_session("ghost"),
        lambda: client.ingest_tokens("ghost", [5, 6, 7]),
        lambda: client.ask("ghost", [5, 6], max_tokens=2),
        lambda: list(client.list_events("ghost")),
        lambda: client.surprise("ghost"),
    ):
        e = _code(call)
        assert e.code == grpc.StatusCode.NOT_FOUND and e.reason == "SESSION_NOT_FOUND"
        assert e.detail(E.ResourceInfo).resource_type == "emserve.v1.Session"


# ------------------------------------------------------------------------------------------ ingest / ask
def test_ingest_ask_events_surprise(srv: ServerThread, client: Client) -> None:
    client.create_session("doc")
    ids = random_ids(700, 3)
    progress: list[Any] = []
    res = client.ingest_tokens("doc", ids, piece_tokens=90, on_progress=progress.append)
    assert res.committed_offset == 700 and res.start_offset == 0 and res.messages == 8
    assert [p.committed_offset for p in progress] == sorted(p.committed_offset for p in progress)
    assert log_tokens(srv, "doc") == ids
    s = client.get_session("doc")
    assert s.num_tokens == 700 and s.num_events > 0 and s.disk_bytes > 0 and s.surprise.max > s.surprise.min
    events = list(client.list_events("doc", preview=True, preview_tokens=4, page_size=7))
    assert len(events) == s.num_events and [e.id for e in events] == list(range(len(events)))
    assert events[0].start == 16 and all(a.end == b.start for a, b in zip(events, events[1:], strict=False))
    assert all(4 <= e.size <= 24 and e.size == e.end - e.start for e in events)
    # events close once their boundaries are final (close lag = min_block_size 4), before leaving the local window
    assert sum(e.size for e in events) == s.event_tokens and 700 - 64 < events[-1].end <= 700 - 4
    curve = client.surprise("doc")
    assert len(curve.surprise) == 700 and curve.end == 700 and not curve.max_surprise
    assert list(curve.boundaries) == [e.start for e in events]
    assert events[3].boundary_surprise == pytest.approx(curve.surprise[events[3].start])
    coarse = client.surprise("doc", 100, 300, stride=64)
    assert len(coarse.surprise) == 4 and len(coarse.max_surprise) == 4
    assert coarse.surprise[0] == pytest.approx(float(np.mean(curve.surprise[100:164])), rel=1e-5)
    # a stride past the range is one point (it once padded the range to the stride on the event loop)
    t0 = time.perf_counter()
    whole = client.surprise("doc", 0, 700, stride=4294967295)
    assert time.perf_counter() - t0 < 5 and len(whole.surprise) == 1 and whole.stride == 700
    assert whole.surprise[0] == pytest.approx(float(np.mean(curve.surprise)), rel=1e-5)

    ans = client.ask("doc", random_ids(6, 4), max_tokens=5, ignore_eos=True, trace=True, preview_tokens=3)
    done = ans.complete
    assert len(ans.token_ids) == 5 and done.finish_reason == pb.LENGTH
    assert done.usage.prompt_tokens == 6 and done.usage.memory_tokens == 700 and done.usage.retrieved_tokens == 64
    assert done.timings.total_s > 0 and done.timings.first_token_s > 0
    tr = ans.trace
    assert tr is not None and tr.budget == 64 and tr.num_events == len([e for e in events if e.end <= 700 - 64])
    assert len(tr.layers) == (1 if tr.shared else 2)  # one entry when one list serves all layers
    assert all(sum(e.end - e.start for e in lay.events) == 64 for lay in tr.layers)
    bounds = {e.id: (e.start, e.end) for e in events}
    for e in tr.events:  # the part of the event the window holds (a neighbour before its hit: its end)
        assert bounds[e.id][0] <= e.start < e.end <= bounds[e.id][1]
        assert e.layers == e.similarity_layers + e.contiguity_layers + e.lexical_layers >= 1 and e.preview
    # the window: the stream's tokens the answer step attended to (events, recent tokens, anchor; no sink)
    win = [(r.start, r.end) for r in tr.window]
    assert win[-1][1] == 700 and all(a < b < c for (a, b), (c, _) in zip(win, win[1:], strict=False))
    assert sum(b - a for a, b in win) == done.usage.window_tokens + 1  # + the recomputed anchor (token 699)
    for e in tr.layers[0].events:
        assert any(a <= e.start and e.end <= b for a, b in win)
    assert client.get_session("doc").num_tokens == 700  # a question leaves the memory unchanged
    assert log_tokens(srv, "doc") == ids

    conv = client.ask("doc", [9, 8, 7], max_tokens=4, ignore_eos=True, remember=True)
    assert conv.complete.committed_offset == 707 == client.get_session("doc").num_tokens
    assert log_tokens(srv, "doc") == ids + [9, 8, 7] + conv.token_ids


def test_trace_without_retrieval_reports_the_window(client: Client) -> None:
    client.create_session("short")
    client.ingest_tokens("short", random_ids(40, 5))
    ans = client.ask("short", random_ids(3, 6), max_tokens=2, ignore_eos=True, trace=True)
    tr = ans.trace
    assert tr is not None and not tr.events and tr.budget == 0  # nothing to select: all 40 tokens fit
    assert [(r.start, r.end) for r in tr.window] == [(0, 40)]


def test_text_ingest_matches_tokenizer(srv: ServerThread, client: Client) -> None:
    text = "Hello world! This is a tiny tokenizer trained offline. " * 40
    client.create_session("t")
    res = client.ingest_text("t", text, piece_chars=100)
    codec = srv.runtime.codec
    assert res.committed_offset == len(codec.encode(text))
    assert log_tokens(srv, "t") == codec.encode(text)
    stream = client.generate("t", "Hello world", max_tokens=6, ignore_eos=True)
    text_out = "".join(stream.text())
    assert stream.complete is not None and text_out == stream.complete.text
    assert text_out == codec.decode(list(stream.complete.token_ids))


def test_stop_strings_end_generation(client: Client, engine: WatchedEngine) -> None:
    client.create_session("st")
    client.ingest_tokens("st", random_ids(100, 5))
    full = client.ask("st", [5, 6, 7], max_tokens=30, ignore_eos=True)
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = client.ask("st", [5, 6, 7], max_tokens=30, ignore_eos=True, stop=[stop])
    assert cut.complete.finish_reason == pb.STOP and cut.complete.stop_string == stop
    assert cut.text == full.text[: full.text.index(stop)]
    assert len(cut.token_ids) < 30


def test_invalid_arguments(client: Client) -> None:
    client.create_session("v")
    client.ingest_tokens("v", random_ids(80, 6))

    def bad(call: Any, field: str | None = None) -> None:
        e = _code(call)
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT, e
        if field is not None:
            assert e.detail(E.BadRequest).field_violations[0].field == field

    bad(lambda: client.create_session("../escape"), "session_id")
    bad(lambda: client.create_session("x" * 200), "session_id")
    bad(lambda: client.create_session("m1", memory={"n_local": 0}), "memory.n_local")
    assert "n_local must be >= 1, got 0" in str(_code(lambda: client.create_session("m1", memory={"n_local": 0})))
    bad(lambda: client.create_session("m2", memory={"question_rank": "max"}), "memory.question_rank")
    bad(lambda: client.create_session("m2", memory={"similarity_metric": "cosine"}), "memory.similarity_metric")
    bad(lambda: client.create_session("m3", memory={"n_local": 5000}), "memory.n_local")  # beyond the context
    e = _code(lambda: client.create_session("m4", memory={"n_mem": 64, "question_n_mem": 128}))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "question_n_mem (128) must be at most n_mem (64)" in str(e)
    no_memory = client.create_session("m5", memory={"n_mem": 0})  # the question's default follows: reported as used
    assert no_memory.memory.n_mem == 0 and no_memory.memory.question_n_mem == 0
    bad(lambda: client.ingest_tokens("v", [1, 2, 600]), "tokens")
    bad(lambda: client.ask("v", [5, 6], top_p=2.0), "sampling.top_p")
    bad(lambda: client.ask("v", [5, 6], max_tokens=0), "sampling.max_tokens")
    bad(lambda: client.ask("v", ""), "prompt")
    bad(lambda: client.ask("v", [700]), "prompt_tokens")
    bad(lambda: client.ask("v", "hi", chat_template=True), "chat_template")
    bad(lambda: client.ask("v", [5, 6], max_tokens=2000), "sampling.max_tokens")  # the window cannot hold it
    bad(lambda: client.ask("v", [5] * 1100, max_tokens=1), "prompt_tokens")  # nor this prompt, whatever max_tokens
    bad(lambda: client.surprise("v", 0, 81), "end")
    bad(lambda: client._unary(client.stub.ListEvents, pb.ListEventsRequest(session_id="v", page_token="x")),
        "page_token")
    assert client.get_session("v").num_tokens == 80  # nothing bad got in


def test_ingest_offset_gap_and_conflicting_resend(client: Client) -> None:
    client.create_session("g")
    ids = random_ids(64, 7)
    client.ingest_tokens("g", ids)
    raw = RawIngest(client, "g")
    raw.tokens([5, 6], offset=70)  # beyond what the server holds
    assert raw.next().ready.committed_offset == 64
    with pytest.raises(grpc.RpcError) as ei:
        raw.rest()
    e = ClientError.from_rpc(ei.value)
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.detail(E.ErrorInfo).metadata["committed_offset"] == "64"
    raw = RawIngest(client, "g")
    raw.tokens([ids[0] + 1, ids[1]], offset=0)  # "re-sent" data that differs from what was committed
    raw.next()
    with pytest.raises(grpc.RpcError) as ei:
        raw.rest()
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.get_session("g").num_tokens == 64


# ------------------------------------------------------------------------------------------ limits
def test_an_ingest_message_over_the_token_cap_is_refused_before_any_work(tiny_model_dir: Path, tmp_path: Path,
                                                                         engine: WatchedEngine) -> None:
    """One message may not ask for unbounded work: more tokens than ``max_message_tokens`` (ids, or text once
    tokenized) is RESOURCE_EXHAUSTED, nothing of it committed; the cap is advertised in IngestReady and
    GetServerInfo. Before, one 1.33M-token message kept the engine busy for minutes."""
    s = _server(tiny_model_dir, tmp_path, engine, max_message_tokens=100)
    try:
        with Client(s.address) as c:
            assert c.server_info().max_message_tokens == 100
            c.create_session("m")
            raw = RawIngest(c, "m")
            raw.tokens(random_ids(101, 1))
            raw.half_close()
            assert raw.next().ready.max_message_tokens == 100
            with pytest.raises(grpc.RpcError) as ei:
                raw.rest()
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "101 tokens" in (ei.value.details() or "")
            e = _code(c.ingest, "m", ["word " * 150])  # text: counted once tokenized
            assert e.detail(E.QuotaFailure).violations[0].subject == "message_tokens"
            assert c.get_session("m").num_tokens == 0
            assert c.ingest_tokens("m", random_ids(300, 2), piece_tokens=100).committed_offset == 300
    finally:
        s.stop()


def test_limits_are_resource_exhausted(tiny_model_dir: Path, tmp_path: Path, engine: WatchedEngine) -> None:
    s = _server(tiny_model_dir, tmp_path, engine, max_sessions=2, max_session_tokens=100,
                max_message_bytes=16 * 1024)
    try:
        with Client(s.address) as c:
            c.create_session("a")
            c.create_session("b")
            e = _code(c.create_session, "c")
            assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert e.detail(E.QuotaFailure).violations[0].subject == "sessions"
            e = _code(c.ingest_tokens, "a", random_ids(150, 8), piece_tokens=40)
            assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert e.detail(E.QuotaFailure).violations[0].subject == "session_tokens"
            assert c.get_session("a").num_tokens <= 100
            e = _code(c.ingest, "b", ["word " * 5000])  # one 25 kB message > 16 kB
            assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "LIMIT_EXCEEDED"  # ErrorInfo
            assert e.detail(E.QuotaFailure).violations[0].subject == "message_bytes"
            big = pb.CreateSessionRequest(session_id="big", labels={"k": "v" * 20_000})
            call = c.channel.unary_unary("/emserve.v1.SessionService/CreateSession",
                                         request_serializer=pb.CreateSessionRequest.SerializeToString,
                                         response_deserializer=pb.Session.FromString)
            e = _code(c._unary, call, big)  # a unary request over the limit: the same details
            assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "LIMIT_EXCEEDED"
            assert e.detail(E.QuotaFailure).violations[0].subject == "message_bytes"
            e = _code(c.ask, "a", [5, 6], max_tokens=60, remember=True)
            assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------ preconditions
def test_finished_session_refuses_ingest(client: Client) -> None:
    client.create_session("f")
    res = client.ingest_tokens("f", random_ids(50, 9), finish=True)
    assert res.finished and res.committed_offset == 50
    assert client.get_session("f").state == pb.Session.FINISHED
    e = _code(client.ingest_tokens, "f", [5, 6])
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "SESSION_FINISHED"
    assert e.detail(E.PreconditionFailure).violations[0].type == "FINISHED"
    e = _code(client.ask, "f", [5, 6], max_tokens=2, remember=True)
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION
    assert len(client.ask("f", [5, 6], max_tokens=2, ignore_eos=True).token_ids) == 2  # questions still work


def test_busy_session_refuses_a_second_writer(client: Client) -> None:
    client.create_session("w")
    first = RawIngest(client, "w")
    first.tokens(random_ids(10, 10))
    assert first.next().HasField("ready") and first.next().ack.receipt.end == 10
    assert client.get_session("w").writer_attached
    e = _code(client.ingest_tokens, "w", [5, 6])
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "SESSION_BUSY"
    assert e.detail(E.PreconditionFailure).violations[0].type == "BUSY"
    assert _code(client.delete_session, "w").code == grpc.StatusCode.FAILED_PRECONDITION
    assert _code(client.ask, "w", [5], max_tokens=1, remember=True).code == grpc.StatusCode.FAILED_PRECONDITION
    assert len(client.ask("w", [5], max_tokens=1, ignore_eos=True).token_ids) == 1  # a plain question is fine
    first.half_close()
    assert first.rest()[-1].ack.committed_offset == 10
    assert client.ingest_tokens("w", [5, 6]).committed_offset == 12
    client.delete_session("w")


# ------------------------------------------------------------------------------------------ resume
def test_resume_from_ack_without_duplication(srv: ServerThread, client: Client) -> None:
    client.create_session("res")
    ids = random_ids(400, 11)
    raw = RawIngest(client, "res")
    for i in range(0, 400, 40):
        raw.tokens(ids[i : i + 40], offset=i)
    assert raw.next().ready.committed_offset == 0
    committed = 0
    while committed < 128:
        committed = raw.next().ack.committed_offset
    raw.call.cancel()  # the client goes away mid-stream
    # reconnect; re-send everything from offset 0: what is committed is skipped, not duplicated
    raw = RawIngest(client, "res")
    for i in range(0, 400, 40):
        raw.tokens(ids[i : i + 40], offset=i)
    raw.half_close()
    ready = raw.next().ready
    assert ready.committed_offset >= committed and ready.committed_offset % CHUNK == 0
    acks = [r.ack for r in raw.rest()]
    receipts = [a.receipt for a in acks if a.HasField("receipt")]
    assert [(r.start, r.end) for r in receipts] == [(i, i + 40) for i in range(0, 400, 40)]
    assert sum(r.skipped for r in receipts) == ready.committed_offset
    assert acks[-1].committed_offset == 400
    assert log_tokens(srv, "res") == ids
    # and once more: everything is already there
    assert client.ingest_tokens("res", []).committed_offset == 400
    raw = RawIngest(client, "res")
    raw.tokens(ids[360:], offset=360)
    raw.half_close()
    assert raw.next().ready.committed_offset == 400
    assert raw.rest()[-1].ack.receipt.skipped == 40
    assert log_tokens(srv, "res") == ids


def test_text_resume_mid_message(srv: ServerThread, client: Client) -> None:
    codec = srv.runtime.codec
    text = "Episodic memory segments a stream of tokens into events by surprise. " * 8
    whole = codec.encode(text)
    assert len(whole) > 3 * CHUNK
    client.create_session("tx")
    raw = RawIngest(client, "tx")
    raw.send(text=text)
    raw.next()
    receipt = raw.next().ack.receipt
    assert (receipt.start, receipt.end) == (0, len(whole))
    while raw.next().ack.committed_offset < 2 * CHUNK:
        pass
    raw.call.cancel()
    raw = RawIngest(client, "tx")
    raw.send(text=text, offset=receipt.start)  # the whole message again, from its receipt's start
    raw.half_close()
    ready = raw.next().ready
    acks = [r.ack for r in raw.rest()]
    assert acks[0].receipt.skipped == ready.committed_offset >= 2 * CHUNK
    assert acks[-1].committed_offset == len(whole)
    assert log_tokens(srv, "tx") == whole


def test_client_ingest_reconnects_and_resumes(srv: ServerThread, client: Client) -> None:
    """A server-side interruption mid-ingest (UNAVAILABLE): the client resumes; the text lands once."""
    codec = srv.runtime.codec
    text = "The quick brown fox jumps over the lazy dog. Retrieval picks similar and contiguous events. " * 30
    pieces = list(client_split(text, 120))
    sent = [0]

    def source() -> Iterator[str]:
        for i, p in enumerate(pieces):
            if i == len(pieces) // 2:
                srv.call(srv.server.service.draining.set)  # the stream ends after its current commit
                threading.Timer(0.5, lambda: srv.call(srv.server.service.draining.clear)).start()
            sent[0] += 1
            yield p

    client.create_session("rc")
    res = client.ingest("rc", source(), retry_wait_s=30)
    assert res.reconnects >= 1
    expect = [t for p in pieces for t in codec.encode(p)]
    assert res.committed_offset == len(expect)
    assert log_tokens(srv, "rc") == expect


def client_split(text: str, n: int) -> Iterator[str]:
    from emserve.client import split_text

    return split_text(text, n)


# ------------------------------------------------------------------------------------------ flow control
def test_flow_control_bounds_server_buffering(srv: ServerThread, client: Client) -> None:
    client.create_session("fc")
    ids = random_ids(60 * 50, 12)
    raw = RawIngest(client, "fc")
    for i in range(0, len(ids), 50):  # as fast as the client can: no waiting for receipts
        raw.tokens(ids[i : i + 50])
    raw.half_close()
    out = [raw.next()] + raw.rest()
    acks = [r.ack for r in out[1:]]
    assert out[0].ready.max_inflight_messages == 8
    assert len([a for a in acks if a.HasField("receipt")]) == 60 and acks[-1].committed_offset == len(ids)
    # never more than one chunk (minus one) plus one message held uncommitted
    assert max(a.received_offset - a.committed_offset for a in acks) <= CHUNK - 1 + 50
    assert srv.runtime.ingestor.stats.max_pending_tokens <= CHUNK - 1 + 50
    assert log_tokens(srv, "fc") == ids


# ------------------------------------------------------------------------------------------ cancel / deadline
def test_cancel_mid_generation_aborts_the_engine_request(srv: ServerThread, client: Client,
                                                          engine: WatchedEngine) -> None:
    client.create_session("c")
    client.ingest_tokens("c", random_ids(200, 13))
    engine.token_delay = 0.05
    stream = client.generate("c", [5, 6, 7], max_tokens=200, ignore_eos=True)
    it = iter(stream)
    got = [next(it) for _ in range(3)]
    assert all(r.HasField("chunk") for r in got)
    before = engine.finished
    stream.cancel()
    deadline = time.monotonic() + 10
    while srv.call(lambda: engine.aborted) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.aborted == 1 and engine.finished == before
    assert srv.call(lambda: srv.runtime.generator.cancelled) == 1
    engine.token_delay = 0.0
    t0 = time.monotonic()
    assert len(client.ask("c", [5], max_tokens=2, ignore_eos=True).token_ids) == 2  # the session is free again
    assert time.monotonic() - t0 < 5


def test_deadline_exceeded_aborts_generation(srv: ServerThread, client: Client, engine: WatchedEngine) -> None:
    client.create_session("d")
    client.ingest_tokens("d", random_ids(100, 14))
    engine.token_delay = 0.05
    e = _code(client.ask, "d", [5, 6], max_tokens=200, ignore_eos=True, timeout=0.5)
    assert e.code == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10  # the call's engine requests (an answer's start may take several) all end
    while srv.call(lambda: (engine.aborted < 1 or engine.running() > 0)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.aborted >= 1 and engine.running() == 0


# ------------------------------------------------------------------------------------------ isolation
def test_concurrent_sessions_have_isolated_memories(srv: ServerThread, client: Client) -> None:
    """Two sessions ingest concurrently with isolated memories: a fact in A is never retrievable from B."""
    check_isolated_sessions(srv, client, n=500, at=240, piece_tokens=40, max_tokens=3, join_s=120, full_budget=False)


# ------------------------------------------------------------------------------------------ auth
def test_auth_token(tiny_model_dir: Path, tmp_path: Path, engine: WatchedEngine) -> None:
    s = _server(tiny_model_dir, tmp_path, engine, auth_token="s3cret")
    try:
        with Client(s.address) as anon, Client(s.address, token="wrong") as wrong, \
                Client(s.address, token="s3cret") as ok:
            assert anon.health("readiness") == "SERVING"  # probes need no token
            assert set(ProtoReflectionDescriptorDatabase(anon.channel).get_services()) >= {"emserve.v1.SessionService"}
            for c in (anon, wrong):
                e = _code(c.create_session, "a")
                assert e.code == grpc.StatusCode.UNAUTHENTICATED and e.reason == "UNAUTHENTICATED"
                assert _code(c.ingest_tokens, "a", [5]).code == grpc.StatusCode.UNAUTHENTICATED
                assert _code(c.ask, "a", [5]).code == grpc.StatusCode.UNAUTHENTICATED
            ok.create_session("a")
            assert ok.ingest_tokens("a", [5, 6, 7]).committed_offset == 3
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------ shutdown / reopen
def test_graceful_shutdown_then_reopen_resumes(tiny_model_dir: Path, tmp_path: Path, engine: WatchedEngine) -> None:
    s = _server(tiny_model_dir, tmp_path, engine)
    ids = random_ids(900, 17)
    acked: list[int] = []
    errors: list[ClientError] = []
    with Client(s.address) as c:
        c.create_session("gs")
        c.ingest_tokens("gs", ids[:100])
        c.ask("gs", [5], max_tokens=1)

        def ingest() -> None:
            try:
                c.ingest_tokens("gs", ids[100:], piece_tokens=20, retries=0,
                                on_progress=lambda p: acked.append(p.committed_offset))
            except ClientError as e:
                errors.append(e)

        t = threading.Thread(target=ingest)
        t.start()
        while not acked or acked[-1] < 300:
            time.sleep(0.01)
        s.stop(grace=5)  # SIGTERM path: drain, finish commits, checkpoint, close
        t.join(30)
    assert errors and errors[0].code == grpc.StatusCode.UNAVAILABLE and errors[0].reason == "SHUTTING_DOWN"
    s2 = _server(tiny_model_dir, tmp_path, engine)  # the same sessions directory: "restart"
    try:
        with Client(s2.address) as c:
            n = c.get_session("gs").num_tokens
            assert n >= acked[-1] and log_tokens(s2, "gs") == ids[:n]
            res = c.ingest_tokens("gs", ids[n:])
            assert res.committed_offset == 900 and log_tokens(s2, "gs") == ids
            assert len(c.ask("gs", [5], max_tokens=2, ignore_eos=True).token_ids) == 2
            assert c.get_session("gs").num_events > 0
    finally:
        s2.stop()


def test_idle_sessions_are_closed_lru_and_reopen(tiny_model_dir: Path, tmp_path: Path, engine: WatchedEngine) -> None:
    s = _server(tiny_model_dir, tmp_path, engine, max_open_sessions=2)
    try:
        with Client(s.address) as c:
            for i in range(4):
                c.create_session(f"l{i}")
                c.ingest_tokens(f"l{i}", random_ids(100 + i, 20 + i))
            assert s.call(lambda: s.runtime.manager.open_count) <= 2
            for i in range(4):
                assert c.get_session(f"l{i}").num_tokens == 100 + i
                assert len(c.ask(f"l{i}", [5], max_tokens=1, ignore_eos=True).token_ids) == 1
            assert s.call(lambda: s.runtime.manager.open_count) <= 2
    finally:
        s.stop()


def test_device_memory_budget_closes_idle_sessions(tiny_model_dir: Path, tmp_path: Path,
                                                   engine: WatchedEngine) -> None:
    """Retrieval on a device (here torch's CPU device: the same mirrors, no GPU needed): beyond
    ``retrieval_device_gib`` the least recently used idle sessions are closed, and reopen intact."""
    s = _server(tiny_model_dir, tmp_path, engine)
    manager = s.runtime.manager
    manager.score_device = "torch-cpu"  # what "auto" picks on a GPU machine, on the CPU
    try:
        with Client(s.address) as c:
            c.create_session("d0")
            c.ingest_tokens("d0", random_ids(300, 30))
            one = s.call(manager.device_bytes)
            assert one > 0  # its memory is scored on the device: a mirror exists
            manager.device_budget = int(2.5 * one)
            for i in range(1, 5):
                c.create_session(f"d{i}")
                c.ingest_tokens(f"d{i}", random_ids(300, 30 + i))
                assert s.call(manager.device_bytes) <= manager.device_budget
            assert s.call(lambda: manager.open_count) < 5
            for i in range(5):  # closed ones reopen (mirror recomputed from the log) and answer
                assert c.get_session(f"d{i}").num_tokens == 300
                assert len(c.ask(f"d{i}", [5], max_tokens=1, ignore_eos=True).token_ids) == 1
                assert s.call(manager.device_bytes) <= manager.device_budget
    finally:
        s.stop()


def test_out_of_device_memory_mid_ingest_then_resume(tiny_model_dir: Path, tmp_path: Path, engine: WatchedEngine,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The retrieval device runs out of memory while a step's events close (injected into the mirror's growth,
    mirrors on torch's CPU device): Ingest fails with RESOURCE_EXHAUSTED (DEVICE_MEMORY_EXHAUSTED), the session
    is reopened from its files, and the client resuming from the committed offset gets exactly the memory of a
    session that never failed (before, the failed chunk was ingested twice)."""
    import torch

    from emserve.retrieval.device_scorer import DeviceScorer

    s = _server(tiny_model_dir, tmp_path, engine)
    s.runtime.manager.score_device = "torch-cpu"  # what "auto" picks on a GPU machine, on the CPU
    grow = DeviceScorer._grow
    calls = [0]

    def failing_grow(self: DeviceScorer, n: int) -> None:
        calls[0] += 1
        if calls[0] == 4:  # a step in the middle of the stream
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (injected)")
        grow(self, n)

    ids = random_ids(400, 40)
    try:
        with Client(s.address) as c:
            c.create_session("clean")
            c.ingest_tokens("clean", ids, piece_tokens=50)
            c.create_session("oom")
            monkeypatch.setattr(DeviceScorer, "_grow", failing_grow)
            err = _code(c.ingest_tokens, "oom", ids, piece_tokens=50)
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "DEVICE_MEMORY_EXHAUSTED"
            assert "out of memory" in err.message and calls[0] == 4
            committed = c.get_session("oom").num_tokens
            assert 0 < committed < 400
            res = c.ingest_tokens("oom", ids[committed:], piece_tokens=50)
            assert res.committed_offset == 400
            assert log_tokens(s, "oom") == ids
            ev = [(e.start, e.end) for e in c.list_events("oom")]
            assert ev == [(e.start, e.end) for e in c.list_events("clean")] and ev
            assert len(c.ask("oom", [5], max_tokens=1, ignore_eos=True).token_ids) == 1
    finally:
        s.stop()


def test_out_of_device_memory_closes_idle_mirrors(tiny_model_dir: Path, tmp_path: Path, engine: WatchedEngine,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of retrieval device memory, the idle sessions' mirrors are given back (those sessions close and
    reopen on their next call): a failed step's retry, and an open that ran out (retried once at once), go
    through where nothing else would free the memory."""
    import torch

    from emserve.retrieval.device_scorer import DeviceScorer

    s = _server(tiny_model_dir, tmp_path, engine)
    manager = s.runtime.manager
    manager.score_device = "torch-cpu"
    grow = DeviceScorer._grow
    fail = [False]

    def maybe_failing_grow(self: DeviceScorer, n: int) -> None:
        if fail[0]:
            fail[0] = False
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (injected)")
        grow(self, n)

    monkeypatch.setattr(DeviceScorer, "_grow", maybe_failing_grow)
    open_ids = lambda: s.call(lambda: sorted(manager._open))  # noqa: E731
    try:
        with Client(s.address) as c:
            for i in range(2):
                c.create_session(f"m{i}")
                c.ingest_tokens(f"m{i}", random_ids(200, 50 + i))
            assert open_ids() == ["m0", "m1"]
            c.create_session("m2")
            fail[0] = True  # the new session's first mirror allocation fails
            err = _code(c.ingest_tokens, "m2", random_ids(200, 52))
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert open_ids() == []  # the failed session and the idle mirrors were closed
            committed = c.get_session("m2").num_tokens
            c.ingest_tokens("m2", random_ids(200, 52)[committed:])
            assert c.get_session("m2").num_tokens == 200 and open_ids() == ["m2"]
            fail[0] = True  # reopening m0 recomputes its mirror: out of memory once
            assert len(c.ask("m0", [5], max_tokens=1, ignore_eos=True).token_ids) == 1
            assert open_ids() == ["m0"]  # the idle m2 gave its mirror back, m0's open was retried
    finally:
        s.stop()


def test_bad_values_are_invalid_arguments_not_internal_errors(client: Client) -> None:
    client.create_session("vals")
    client.ingest_tokens("vals", random_ids(64, 9))
    for bad in (float("nan"), float("inf"), 1e30, -1.0):
        e = _code(client.ask, "vals", [5, 6], max_tokens=2, temperature=bad)
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT, (bad, e)
    e = _code(client.ask, "vals", [5, 6], max_tokens=2, stop_token_ids=[4294967295])
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.detail(E.BadRequest).field_violations[0].field == "sampling.stop_token_ids"
    for sid in ("abc\n", "good1\n", "a" * 129):  # `$` once accepted a trailing newline (raw stub: no header)
        with pytest.raises(grpc.RpcError) as ei:
            client.stub.CreateSession(pb.CreateSessionRequest(session_id=sid), timeout=30)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(sid)
    with pytest.raises(grpc.RpcError) as ei:  # a 100 KB id is not echoed back whole into the error
        client.stub.GetSession(pb.GetSessionRequest(session_id="x" * 100_000), timeout=30)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(ei.value.details()) < 1000
    assert {x.session_id for x in client.list_sessions()} == {"vals"}


def test_ingest_with_the_header_sends_ready_first_and_answers_every_flush(client: Client) -> None:
    client.create_session("hdr")
    raw = RawIngest(client, "hdr", header=True)
    ready = raw.next()  # before the client sends anything: a client waiting for it does not deadlock
    assert ready.HasField("ready") and ready.ready.committed_offset == 0 and ready.ready.chunk_tokens == CHUNK
    raw.send(flush=True)  # nothing to commit: still answered
    ack = raw.next().ack
    assert ack.committed_offset == 0 and ack.received_offset == 0 and not ack.HasField("receipt")
    raw.tokens(random_ids(40, 3))
    assert raw.next().ack.receipt.end == 40  # the receipt, then the chunk it completed
    assert raw.next().ack.committed_offset == CHUNK
    raw.send(flush=True)
    assert raw.next().ack.committed_offset == 40
    raw.half_close()
    assert raw.rest() == []
    # without the header the first message must name the session, and the error says so
    raw = RawIngest(client, "", header=False)
    raw.tokens([5, 6])
    with pytest.raises(grpc.RpcError) as ei:
        raw.next()
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "first message" in ei.value.details()


def test_undecodable_requests_are_invalid_arguments(srv: ServerThread, client: Client) -> None:
    """Bytes that are not the method's message (a truncated field, a wrong wire type) are the client's
    error: INVALID_ARGUMENT naming the request, on unary and on streaming calls, and the server goes on
    serving. Before, grpc's deserializer failure answered INTERNAL (unary) or UNKNOWN."""
    service = "/emserve.v1.SessionService/"
    garbage = [b"\x0a\xff\xff\xff\x0f", b"\xff", b"\x0a\x05ab"]
    with grpc.insecure_channel(srv.address) as ch:
        for data in garbage:
            for method in ("CreateSession", "GetSession", "GetSurprise"):
                call = ch.unary_unary(service + method, request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
                with pytest.raises(grpc.RpcError) as ei:
                    call(data, timeout=10)
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, data, ei.value)
                assert "request" in (ei.value.details() or ""), ei.value.details()
            gen = ch.unary_stream(service + "Generate", request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as ei:
                list(gen(data, timeout=10))
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ("Generate", data, ei.value)
            ingest = ch.stream_stream(service + "Ingest", request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as ei:
                list(ingest(iter([data]), timeout=10))
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ("Ingest", data, ei.value)
    client.create_session("after-garbage")  # still serving
    assert client.get_session("after-garbage").num_tokens == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MiB filesystem (tmpfs) for the sessions: fills up in a few hundred tokens of the tiny model."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("retrieval_device", ["cpu", "torch-cpu"])
def test_a_full_disk_refuses_writes_cleanly_and_space_can_be_freed(
        tiny_model_dir: Path, small_disk: Path, engine: WatchedEngine, retrieval_device: str) -> None:
    """The disk fills during an ingest: the ingest fails with RESOURCE_EXHAUSTED (reason DISK_FULL), nothing
    acknowledged is lost, and while the disk is full the session can still be read and deleted, which frees
    the space for new sessions. Before, DeleteSession failed too (closing checkpointed the index first),
    so space could not be freed through the API; on the device path (``torch-cpu`` here, a GPU in
    production) closing a session for its delete still wrote the index's metadata, and failed."""
    s = ServerThread(tiny_config(tiny_model_dir, small_disk / "sessions", max_open_sessions=1), engine)
    s.runtime.manager.score_device = retrieval_device  # "torch-cpu": what "auto" picks on a GPU machine
    try:
        with Client(s.address, timeout=30) as c:
            c.create_session("keep")
            c.ingest_tokens("keep", random_ids(200, 3))
            c.create_session("big")
            ids = random_ids(1_000_000, 4)
            acked: list[int] = []
            with pytest.raises(ClientError) as ei:
                for i in range(0, len(ids), 4096):
                    acked.append(c.ingest_tokens("big", ids[i : i + 4096], retries=0).committed_offset)
            assert ei.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value
            assert ei.value.reason == "DISK_FULL"
            big = c.get_session("big").num_tokens
            logged = log_tokens(s, "big")
            # the log may still hold the failed step's K/V past the committed tokens (its surprise was not
            # written): reopening the session drops them (Session._recover)
            assert big >= (acked[-1] if acked else 0) and len(logged) >= big and logged[:big] == ids[:big]
            list(c.list_events("big"))  # reopens it, on the full disk: the repair drops them
            assert log_tokens(s, "big") == ids[:big] and c.get_session("big").num_tokens == big
            assert c.get_session("keep").num_tokens == 200
            assert len(list(c.list_events("keep"))) > 0
            c.delete_session("big")  # frees the space
            c.create_session("again")
            assert c.ingest_tokens("again", random_ids(100, 5)).committed_offset > 0
            assert c.get_session("keep").num_tokens == 200
    finally:
        s.stop()


def test_a_remembering_generate_with_a_request_id_is_idempotent(srv: ServerThread, client: Client) -> None:
    """A client that saw an error after its exchange was stored retries with the same request id: the
    stored exchange comes back and nothing is stored twice. Before, the retry stored the exchange again."""
    client.create_session("idem")
    client.ingest_tokens("idem", random_ids(120, 8))
    first = client.ask("idem", [5, 6, 7], max_tokens=4, ignore_eos=True, remember=True, request_id="turn-1")
    n = client.get_session("idem").num_tokens
    assert n == 120 + 3 + 4 and first.complete.committed_offset == n
    again = client.ask("idem", [5, 6, 7], max_tokens=4, ignore_eos=True, remember=True, request_id="turn-1")
    assert again.token_ids == first.token_ids and again.text == first.text
    assert again.complete.committed_offset == first.complete.committed_offset
    assert client.get_session("idem").num_tokens == n
    assert log_tokens(srv, "idem")[120:] == [5, 6, 7, *first.token_ids]
    e = _code(lambda: client.ask("idem", [9, 9], max_tokens=2, remember=True, request_id="turn-1"))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.detail(E.BadRequest).field_violations[0].field == "request_id"
    client.ask("idem", [5, 6, 7], max_tokens=4, ignore_eos=True, remember=True, request_id="turn-2")
    client.ask("idem", [5, 6, 7], max_tokens=4, ignore_eos=True, remember=True)  # no id: stored each time
    assert client.get_session("idem").num_tokens == n + 2 * 7


def test_an_exchange_cut_by_a_crash_is_completed_by_the_retry(srv: ServerThread, client: Client) -> None:
    """The record is kept before the exchange is appended, and the append runs in steps: a crash after the
    record (before the append, or between two of its steps) leaves the exchange partly stored, and the
    retry appends the rest and answers the recorded exchange: stored once. Before, a cut append was
    regenerated and stored again after its first step (found by bench/eval/crash.py)."""
    client.create_session("idem2")
    client.ingest_tokens("idem2", random_ids(100, 9))
    runtime = srv.runtime
    prompt = random_ids(40, 10)
    start = 100
    for rid, held in (("cut", CHUNK), ("unstored", 0)):
        stored = [*prompt, 1, 2, 3]
        record = {"start": start, "prompt": prompt, "token_ids": [1, 2, 3], "text": "abc", "stop_string": "",
                  "finish_reason": "length", "memory_tokens": start, "committed_offset": start + len(stored)}

        def crash_after(rid: str = rid, record: dict = record, head: list[int] = stored[:held]) -> None:
            async def go() -> None:
                async with runtime.manager.lease("idem2") as entry:
                    entry.session.record_exchange(rid, record)
                    await entry.session.append(head, flush=True)
            srv.run(go())

        crash_after()
        assert client.get_session("idem2").num_tokens == start + held
        res = client.ask("idem2", prompt, max_tokens=3, ignore_eos=True, remember=True, request_id=rid)
        assert res.token_ids == [1, 2, 3] and res.text == "abc"
        assert res.complete.committed_offset == start + len(stored)
        assert client.get_session("idem2").num_tokens == start + len(stored)
        assert log_tokens(srv, "idem2")[start:] == stored
        again = client.ask("idem2", prompt, max_tokens=3, ignore_eos=True, remember=True, request_id=rid)
        assert again.token_ids == [1, 2, 3] and client.get_session("idem2").num_tokens == start + len(stored)
        start += len(stored)

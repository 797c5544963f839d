"""The API's contract, promise by promise: every sentence of ``proto/emserve/v1/emserve.proto``'s comments
that says what the server does, checked from raw generated stubs over a real socket.

Nothing here goes through :mod:`emserve.client` (a client in another language sees only the proto): calls
are ``SessionServiceStub`` calls, errors are decoded from ``grpc-status-details-bin`` by hand. The server
is the real one (:func:`emserve.server.app.create_server`) on the HF reference engine and the tiny random
model; each test names the comment it checks. ``test_every_rpc_is_driven_here`` keeps the file whole:
each RPC of the service (and health's) is called by some test below.
"""

from __future__ import annotations

import logging
import queue
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2 as E
from google.rpc import status_pb2
from grpc_harness import TINY_MEMORY, ServerThread, WatchedEngine, random_ids, tiny_config
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from emserve.api.v1 import emserve_pb2 as pb
from emserve.api.v1 import emserve_pb2_grpc as pb_grpc
from emserve.server.logs import ContextFilter

CHUNK = TINY_MEMORY["exc_block_size"]
DOMAIN = "emserve.dev"
SERVICE = pb.DESCRIPTOR.services_by_name["SessionService"]


@pytest.fixture
def srv(tiny_model_dir: Path, tmp_path: Path, engine: WatchedEngine) -> Iterator[ServerThread]:
    s = ServerThread(tiny_config(tiny_model_dir, tmp_path / "sessions"), engine)
    yield s
    s.stop()


@pytest.fixture
def channel(srv: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(srv.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.SessionServiceStub:
    return pb_grpc.SessionServiceStub(channel)


# ------------------------------------------------------------------------------------------ helpers
def details(err: grpc.RpcError) -> dict[str, Any]:
    """The google.rpc details of an error, by message name (decoded from the trailer by hand)."""
    raw = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw is not None, f"no grpc-status-details-bin on {err.code()}: {err.details()}"
    status = status_pb2.Status.FromString(raw)
    assert status.code == err.code().value[0] and status.message == err.details()
    out: dict[str, Any] = {}
    for item in status.details:
        for cls in (E.ErrorInfo, E.ResourceInfo, E.BadRequest, E.QuotaFailure, E.PreconditionFailure, E.RetryInfo):
            if item.Is(cls.DESCRIPTOR):
                msg = cls()
                item.Unpack(msg)
                out[cls.DESCRIPTOR.name] = msg
    return out


def fails(call: Any, *args: Any, **kw: Any) -> grpc.RpcError:
    """The RpcError of a call (a streaming call is drained); every error carries an emserve ErrorInfo."""
    with pytest.raises(grpc.RpcError) as ei:
        out = call(*args, timeout=30, **kw)
        if not isinstance(out, pb.Session | pb.ServerInfo | pb.ListSessionsResponse | pb.DeleteSessionResponse |
                          pb.ListEventsResponse | pb.SurpriseCurve):
            list(out)
    err = ei.value
    info = details(err)["ErrorInfo"]
    assert info.domain == DOMAIN and info.reason, info
    return err


def fails_or(stub: pb_grpc.SessionServiceStub, request: pb.GenerateRequest) -> list[pb.GenerateResponse] | None:
    """A Generate's replies, or None where it is refused as INVALID_ARGUMENT."""
    try:
        return list(stub.Generate(request, timeout=60))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        return None


class Ingest:
    """One Ingest stream, message by message."""

    def __init__(self, stub: pb_grpc.SessionServiceStub, session_id: str, *, header: bool = False) -> None:
        self.sid = "" if header else session_id
        self.q: queue.Queue[pb.IngestRequest | None] = queue.Queue()
        self.call = stub.Ingest(iter(self.q.get, None), timeout=60,
                                metadata=[("x-session-id", session_id)] if header else None)

    def send(self, **kw: Any) -> None:
        self.q.put(pb.IngestRequest(**{"session_id": self.sid, **kw}))

    def tokens(self, ids: list[int], **kw: Any) -> None:
        self.send(tokens=pb.TokenIds(ids=ids), **kw)

    def next(self) -> pb.IngestResponse:
        return next(self.call)

    def close(self) -> list[pb.IngestResponse]:
        self.q.put(None)
        return list(self.call)


def ingest(stub: pb_grpc.SessionServiceStub, sid: str, ids: list[int], piece: int = 40) -> list[pb.IngestResponse]:
    reqs = [pb.IngestRequest(session_id=sid, tokens=pb.TokenIds(ids=ids[i : i + piece]))
            for i in range(0, len(ids), piece)]
    return list(stub.Ingest(iter(reqs), timeout=60))


def generate(stub: pb_grpc.SessionServiceStub, **kw: Any) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(**kw), timeout=60))


def greedy(n: int, **kw: Any) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=n, ignore_eos=True, **kw)


# ------------------------------------------------------------------------------------------ the file is whole
def test_every_rpc_is_driven_here() -> None:
    """Each RPC of SessionService and of grpc.health.v1.Health is called from a raw stub in this file."""
    source = Path(__file__).read_text()
    methods = [m.name for m in SERVICE.methods] + ["Check", "Watch"]
    missing = [m for m in methods if not re.search(rf"\b(stub|health)\.{m}\(", source)]
    assert not missing, missing


# ------------------------------------------------------------------------------------------ conventions
def test_errors_carry_canonical_codes_and_their_details(stub: pb_grpc.SessionServiceStub,
                                                        tiny_model_dir: Path, tmp_path: Path,
                                                        engine: WatchedEngine) -> None:
    """"Errors use canonical status codes with google.rpc details in grpc-status-details-bin (always an
    ErrorInfo with domain "emserve.dev" and a reason; plus): NOT_FOUND unknown session (ResourceInfo),
    ALREADY_EXISTS CreateSession with a taken id (ResourceInfo), INVALID_ARGUMENT (BadRequest),
    RESOURCE_EXHAUSTED limits (QuotaFailure), FAILED_PRECONDITION finished or busy (PreconditionFailure)"."""
    for call, req in ((stub.GetSession, pb.GetSessionRequest(session_id="ghost")),
                      (stub.DeleteSession, pb.DeleteSessionRequest(session_id="ghost")),
                      (stub.ListEvents, pb.ListEventsRequest(session_id="ghost")),
                      (stub.GetSurprise, pb.GetSurpriseRequest(session_id="ghost")),
                      (stub.Generate, pb.GenerateRequest(session_id="ghost", prompt_tokens=pb.TokenIds(ids=[5])))):
        err = fails(call, req)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        res = details(err)["ResourceInfo"]
        assert res.resource_type == "emserve.v1.Session" and res.resource_name == "ghost"
    err = fails(stub.Ingest, iter([pb.IngestRequest(session_id="ghost", tokens=pb.TokenIds(ids=[5]))]))
    assert err.code() == grpc.StatusCode.NOT_FOUND and details(err)["ResourceInfo"].resource_name == "ghost"

    stub.CreateSession(pb.CreateSessionRequest(session_id="taken"), timeout=30)
    err = fails(stub.CreateSession, pb.CreateSessionRequest(session_id="taken"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and details(err)["ResourceInfo"].resource_name == "taken"

    err = fails(stub.CreateSession, pb.CreateSessionRequest(session_id="../up"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err)["BadRequest"].field_violations[0].field == "session_id"

    limited = ServerThread(tiny_config(tiny_model_dir, tmp_path / "limited", max_sessions=1), engine)
    try:
        with grpc.insecure_channel(limited.address) as ch:
            other = pb_grpc.SessionServiceStub(ch)
            other.CreateSession(pb.CreateSessionRequest(session_id="one"), timeout=30)
            err = fails(other.CreateSession, pb.CreateSessionRequest(session_id="two"))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details(err)["QuotaFailure"].violations[0].subject == "sessions"
            assert ingest(other, "one", [5, 6, 7], piece=3)[-1].ack.committed_offset == 3
            list(other.Ingest(iter([pb.IngestRequest(session_id="one", finish=True)]), timeout=30))
            err = fails(other.Ingest, iter([pb.IngestRequest(session_id="one", tokens=pb.TokenIds(ids=[5]))]))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert details(err)["PreconditionFailure"].violations[0].type == "FINISHED"
    finally:
        limited.stop()


def test_unavailable_while_the_engine_loads_with_retry_info(tiny_model_dir: Path, tmp_path: Path) -> None:
    """"UNAVAILABLE engine still loading ... (RetryInfo)"; health: "readiness" turns SERVING once the
    engine is loaded (here it never loads), service "" is liveness."""
    s = ServerThread(tiny_config(tiny_model_dir, tmp_path / "s", model=str(tmp_path / "no-model")), None)
    try:
        with grpc.insecure_channel(s.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 30
            while s.server.load_error is None and time.monotonic() < deadline:
                time.sleep(0.05)
            check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            for name in ("readiness", SERVICE.full_name):
                check = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = pb_grpc.SessionServiceStub(ch)
            assert not stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).ready
            err = fails(stub.CreateSession, pb.CreateSessionRequest(session_id="a"))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert details(err)["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0
    finally:
        s.stop()


def test_health_readiness_and_reflection(channel: grpc.Channel) -> None:
    """"Health: standard grpc.health.v1.Health. Service "" is liveness; "readiness" (and this service's
    full name) turn SERVING once the engine is loaded. Server reflection is enabled." Watch streams it."""
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "readiness", SERVICE.full_name):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {SERVICE.full_name, "grpc.health.v1.Health"} <= services


def test_auth_token_guards_every_call_but_health_and_reflection(tiny_model_dir: Path, tmp_path: Path,
                                                                engine: WatchedEngine) -> None:
    """"When the server runs with an auth token, every call but health and reflection needs the metadata
    authorization: Bearer <token> (else UNAUTHENTICATED)"."""
    s = ServerThread(tiny_config(tiny_model_dir, tmp_path / "auth", auth_token="t0ken"), engine)
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = pb_grpc.SessionServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert SERVICE.full_name in set(ProtoReflectionDescriptorDatabase(ch).get_services())
            for md in (None, [("authorization", "Bearer wrong")], [("authorization", "t0ken")]):
                for method in SERVICE.methods:  # every RPC, with an empty request of its type
                    request = getattr(pb, method.input_type.name)()
                    err = fails(getattr(stub, method.name), iter([request]) if method.client_streaming else request,
                                metadata=md)
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, method.name
            good = [("authorization", "Bearer t0ken")]
            assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10, metadata=good).ready
            stub.CreateSession(pb.CreateSessionRequest(session_id="a"), timeout=10, metadata=good)
    finally:
        s.stop()


def test_sessions_survive_a_restart_and_reopen_on_first_use(tiny_model_dir: Path, tmp_path: Path,
                                                            engine: WatchedEngine) -> None:
    """"A session is a directory on the server: it survives server restarts. After a restart every session
    is available again; its first use reopens it"."""
    cfg = tiny_config(tiny_model_dir, tmp_path / "keep")
    ids = random_ids(150, 1)
    s = ServerThread(cfg, engine)
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = pb_grpc.SessionServiceStub(ch)
            stub.CreateSession(pb.CreateSessionRequest(session_id="kept", labels={"k": "v"}), timeout=10)
            ingest(stub, "kept", ids)
            before = stub.GetSession(pb.GetSessionRequest(session_id="kept"), timeout=10)
    finally:
        s.stop()
    s = ServerThread(cfg, engine)
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = pb_grpc.SessionServiceStub(ch)
            listed = stub.ListSessions(pb.ListSessionsRequest(), timeout=10).sessions
            assert [x.session_id for x in listed] == ["kept"]
            after = stub.GetSession(pb.GetSessionRequest(session_id="kept"), timeout=10)
            assert (after.num_tokens, after.num_events, after.labels["k"]) == (150, before.num_events, "v")
            assert after.memory == before.memory and after.create_time == before.create_time
            ready = Ingest(stub, "kept", header=True).next().ready
            assert ready.committed_offset == 150
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------ server info, sessions
def test_server_info_and_session_memory_report_every_field_as_used(stub: pb_grpc.SessionServiceStub) -> None:
    """MemoryConfig: "In requests, unset fields take the server default; in responses every field is
    set"; CreateSession "optionally with per-session memory settings (unset fields: server defaults)".
    Reported = used: a question's retrieved tokens (the trace's budget) are the reported question_n_mem,
    also when a default above n_mem took n_mem's value."""
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert info.ready and info.backend and info.model and info.max_model_len == 1024 and info.vocab_size == 512
    assert info.num_layers == 2 and info.max_sessions > 0 and info.max_message_bytes > 0
    assert info.max_inflight_messages > 0 and list(info.eos_token_ids)
    every = {f.name for f in pb.MemoryConfig.DESCRIPTOR.fields}
    assert {f.name for f, _ in info.default_memory.ListFields()} == every
    for k, v in TINY_MEMORY.items():
        assert getattr(info.default_memory, k) == pytest.approx(v), k

    plain = stub.CreateSession(pb.CreateSessionRequest(session_id="plain"), timeout=10)
    assert {f.name for f, _ in plain.memory.ListFields()} == every
    assert plain.memory == info.default_memory
    tuned = stub.CreateSession(pb.CreateSessionRequest(session_id="tuned", memory=pb.MemoryConfig(n_mem=32)),
                               timeout=10)
    assert {f.name for f, _ in tuned.memory.ListFields()} == every
    assert tuned.memory.n_mem == 32 and tuned.memory.question_n_mem == min(32, info.default_memory.question_n_mem)
    assert tuned.memory.n_local == info.default_memory.n_local  # unset: the server's default
    assert stub.GetSession(pb.GetSessionRequest(session_id="tuned"), timeout=10).memory == tuned.memory
    listed = {x.session_id: x.memory for x in stub.ListSessions(pb.ListSessionsRequest(), timeout=10).sessions}
    assert listed == {"plain": plain.memory, "tuned": tuned.memory}
    for sid, memory in listed.items():
        ingest(stub, sid, random_ids(600, 2))
        done = generate(stub, session_id=sid, prompt_tokens=pb.TokenIds(ids=[5, 6, 7]), sampling=greedy(1),
                        include_trace=True)[-1].complete
        assert done.trace.budget == memory.question_n_mem, sid
        assert all(sum(e.end - e.start for e in lay.events) == memory.question_n_mem for lay in done.trace.layers)

    err = fails(stub.CreateSession, pb.CreateSessionRequest(session_id="over", memory=pb.MemoryConfig(
        n_mem=32, question_n_mem=48)))  # given above its limit: refused with the reason, not clamped
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "question_n_mem (48)" in err.details()
    assert details(err)["BadRequest"].field_violations[0].field == "memory.question_n_mem"
    for broken in (dict(top_p=2.0), dict(temperature=-1.0), dict(max_tokens=0)):
        err = fails(stub.Generate, pb.GenerateRequest(session_id="plain", prompt_tokens=pb.TokenIds(ids=[5, 6]),
                                                      sampling=pb.SamplingParams(**broken)))
        (name, _), = broken.items()
        assert details(err)["BadRequest"].field_violations[0].field == f"sampling.{name}", broken
        assert name in err.details()  # the broken rule, not a list of every rule

    # "question_n_mem is a bound": a prompt that leaves the window less room retrieves fewer tokens, and the
    # trace says how many; one that leaves none for the rest of the window is refused
    for n in range(info.max_model_len - 8, 0, -8):  # the longest prompt the window takes
        replies = fails_or(stub, pb.GenerateRequest(session_id="plain", prompt_tokens=pb.TokenIds(ids=[5] * n),
                                                    sampling=greedy(1), include_trace=True))
        if replies is not None:
            break
    else:
        pytest.fail("every prompt length was refused")
    trace = replies[-1].complete.trace
    assert 0 <= trace.budget < plain.memory.question_n_mem
    assert all(sum(e.end - e.start for e in lay.events) == trace.budget for lay in trace.layers)

    err = fails(stub.CreateSession, pb.CreateSessionRequest(session_id="bad", memory=pb.MemoryConfig(
        n_local=64, question_rank="max")))  # one broken rule, named
    violation = details(err)["BadRequest"].field_violations[0]
    assert violation.field == "memory.question_rank" and "question_rank" in violation.description
    assert "n_local" not in violation.description


def test_create_get_list_delete(stub: pb_grpc.SessionServiceStub) -> None:
    """CreateSession: "Empty: the server picks one"; ids match [A-Za-z0-9][A-Za-z0-9._-]{0,127}.
    ListSessions: "Sessions in id order, paginated"; page_size "0: 100; at most 1000"; next_page_token
    "empty on the last page". DeleteSession: "Delete a session and its directory"."""
    picked = stub.CreateSession(pb.CreateSessionRequest(), timeout=10)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", picked.session_id)
    assert picked.state == pb.Session.ACTIVE and picked.create_time.seconds > 0 and picked.num_tokens == 0
    longest = "a" + "b" * 127
    for sid in ("Z9._-x", longest):
        stub.CreateSession(pb.CreateSessionRequest(session_id=sid), timeout=10)
    for sid in ("a" + "b" * 128, "-lead", ".hidden", "a/b", "a\n"):
        assert fails(stub.CreateSession, pb.CreateSessionRequest(session_id=sid)).code() == \
            grpc.StatusCode.INVALID_ARGUMENT, sid
    for i in range(101):
        stub.CreateSession(pb.CreateSessionRequest(session_id=f"n{i:03d}"), timeout=10)
    everyone = sorted([picked.session_id, "Z9._-x", longest] + [f"n{i:03d}" for i in range(101)])
    first = stub.ListSessions(pb.ListSessionsRequest(), timeout=10)  # page_size 0: 100
    assert [x.session_id for x in first.sessions] == everyone[:100] and first.next_page_token
    seen: list[str] = []
    token = ""
    while True:
        page = stub.ListSessions(pb.ListSessionsRequest(page_size=7, page_token=token), timeout=10)
        assert len(page.sessions) <= 7
        seen += [x.session_id for x in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert seen == everyone
    err = fails(stub.ListSessions, pb.ListSessionsRequest(page_size=1001))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err)["BadRequest"].field_violations[0].field == "page_size"
    stub.DeleteSession(pb.DeleteSessionRequest(session_id="n000"), timeout=10)
    assert fails(stub.GetSession, pb.GetSessionRequest(session_id="n000")).code() == grpc.StatusCode.NOT_FOUND
    assert stub.CreateSession(pb.CreateSessionRequest(session_id="n000"), timeout=10).num_tokens == 0


# ------------------------------------------------------------------------------------------ ingest
def test_ingest_ready_first_then_acks_receipts_chunks_and_flushes(stub: pb_grpc.SessionServiceStub) -> None:
    """Ingest: "The server first sends ready (the committed offset), then one ack per data message (its
    receipt: where its tokens landed) and one per committed chunk (a flush is always answered). With the
    x-session-id header naming the session, ready comes before the client sends anything". Tokens are
    committed in chunks of chunk_tokens; flush and the end of the client's stream commit a partial chunk.
    A later message "may leave it empty (or must repeat it)"."""
    stub.CreateSession(pb.CreateSessionRequest(session_id="acks"), timeout=10)
    s = Ingest(stub, "acks", header=True)
    ready = s.next()  # nothing sent yet
    assert ready.WhichOneof("kind") == "ready"
    assert (ready.ready.committed_offset, ready.ready.chunk_tokens) == (0, CHUNK)
    assert ready.ready.max_inflight_messages > 0 and ready.ready.max_message_bytes > 0
    s.send(flush=True)  # a data-less flush on an empty session: answered
    ack = s.next().ack
    assert (ack.committed_offset, ack.received_offset, ack.HasField("receipt")) == (0, 0, False)
    ids = random_ids(100, 3)
    s.tokens(ids[:50])  # receipt, then the chunk it completed
    got = s.next().ack
    assert (got.receipt.index, got.receipt.start, got.receipt.end, got.receipt.skipped) == (0, 0, 50, 0)
    assert got.received_offset == 50
    chunk = s.next().ack
    assert not chunk.HasField("receipt") and chunk.committed_offset == CHUNK
    s.send(session_id="acks", tokens=pb.TokenIds(ids=ids[50:100]))  # repeating the id is fine too
    got = s.next().ack
    assert (got.receipt.index, got.receipt.start, got.receipt.end) == (1, 50, 100)
    assert [s.next().ack.committed_offset for _ in range(2)] == [2 * CHUNK, 3 * CHUNK]
    s.send(flush=True)  # the partial chunk
    assert s.next().ack.committed_offset == 100
    s.send(flush=True)  # nothing left: still answered
    assert s.next().ack.committed_offset == 100
    s.send(session_id="other", tokens=pb.TokenIds(ids=[5]))  # "must repeat it": another id is refused
    with pytest.raises(grpc.RpcError) as ei:
        s.next()
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(ei.value)["BadRequest"].field_violations[0].field == "session_id"

    # without the header, the first message names the session and ready answers it
    s = Ingest(stub, "acks")
    s.tokens([5, 6, 7])
    assert s.next().ready.committed_offset == 100
    assert s.next().ack.receipt.start == 100
    tail = s.close()  # the end of the stream commits the partial chunk
    assert tail[-1].ack.committed_offset == 103
    assert stub.GetSession(pb.GetSessionRequest(session_id="acks"), timeout=10).num_tokens == 103

    # "Only committed tokens survive a disconnect": a chunk and a half sent, the stream cancelled
    s = Ingest(stub, "acks", header=True)
    assert s.next().ready.committed_offset == 103
    s.tokens(random_ids(CHUNK + CHUNK // 2, 4))
    assert s.next().ack.received_offset == 103 + CHUNK + CHUNK // 2
    assert s.next().ack.committed_offset == 103 + CHUNK
    s.call.cancel()
    deadline = time.monotonic() + 10
    while stub.GetSession(pb.GetSessionRequest(session_id="acks"), timeout=10).writer_attached:
        assert time.monotonic() < deadline, "the cancelled stream's writer is still attached"
        time.sleep(0.05)
    assert stub.GetSession(pb.GetSessionRequest(session_id="acks"), timeout=10).num_tokens == 103 + CHUNK
    # and a first message without it is refused, naming the field
    err = fails(stub.Ingest, iter([pb.IngestRequest(tokens=pb.TokenIds(ids=[5]))]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err)["BadRequest"].field_violations[0].field == "session_id"


def test_ingest_finish_seals_the_session(stub: pb_grpc.SessionServiceStub) -> None:
    """finish: "flush, then mark the session FINISHED (no more ingest); ends the stream"; IngestAck.finished
    "the session is FINISHED (last message of the stream)"; Session.State FINISHED: "questions only"."""
    stub.CreateSession(pb.CreateSessionRequest(session_id="fin"), timeout=10)
    out = list(stub.Ingest(iter([pb.IngestRequest(session_id="fin", tokens=pb.TokenIds(ids=random_ids(45, 4))),
                                 pb.IngestRequest(finish=True)]), timeout=30))
    assert out[0].HasField("ready") and out[-1].ack.finished and out[-1].ack.committed_offset == 45
    assert not any(r.ack.finished for r in out[:-1])
    assert stub.GetSession(pb.GetSessionRequest(session_id="fin"), timeout=10).state == pb.Session.FINISHED
    err = fails(stub.Generate, pb.GenerateRequest(session_id="fin", prompt_tokens=pb.TokenIds(ids=[5]),
                                                  sampling=greedy(1), remember=True))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    answer = generate(stub, session_id="fin", prompt_tokens=pb.TokenIds(ids=[5]), sampling=greedy(2))
    assert len(answer[-1].complete.token_ids) == 2


def test_ingest_resume_skips_what_the_server_holds(stub: pb_grpc.SessionServiceStub) -> None:
    """offset: "Session offset of this message's first token. Unset: right after the previous message (on a
    new stream: at the committed offset). Must not be beyond what the server holds (INVALID_ARGUMENT)".
    Resume: "Data below what the server already holds is skipped, never duplicated"."""
    stub.CreateSession(pb.CreateSessionRequest(session_id="res"), timeout=10)
    ids = random_ids(120, 5)
    ingest(stub, "res", ids[:70])
    s = Ingest(stub, "res")
    s.tokens(ids[40:90], offset=40)  # re-sent from before the committed offset
    assert s.next().ready.committed_offset == 70
    receipt = s.next().ack.receipt
    assert (receipt.start, receipt.end, receipt.skipped) == (40, 90, 30)
    s.tokens(ids[90:120])  # unset offset: right after the previous message
    while (r := s.next().ack).HasField("receipt") is False or r.receipt.index != 1:
        pass
    assert (r.receipt.start, r.receipt.end, r.receipt.skipped) == (90, 120, 0)
    assert s.close()[-1].ack.committed_offset == 120
    curve = stub.GetSurprise(pb.GetSurpriseRequest(session_id="res"), timeout=10)
    assert curve.end == 120 and len(curve.surprise) == 120  # nothing duplicated
    err = fails(stub.Ingest, iter([pb.IngestRequest(session_id="res", offset=121, tokens=pb.TokenIds(ids=[5]))]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err)["BadRequest"].field_violations[0].field == "offset"


def test_a_failed_ingest_commits_nothing_beyond_its_reported_offset(stub: pb_grpc.SessionServiceStub) -> None:
    """"A failed Ingest commits nothing beyond the committed offset its session reports afterwards
    (GetSession, or ready on a new stream): resume from there"."""
    stub.CreateSession(pb.CreateSessionRequest(session_id="torn"), timeout=10)
    ids = random_ids(100, 6)
    bad = list(ids[:80])
    bad[75] = 100_000  # not in the vocabulary: the second message fails
    err = fails(stub.Ingest, iter([pb.IngestRequest(session_id="torn", tokens=pb.TokenIds(ids=bad[:40])),
                                   pb.IngestRequest(tokens=pb.TokenIds(ids=bad[40:80]))]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    reported = stub.GetSession(pb.GetSessionRequest(session_id="torn"), timeout=10).num_tokens
    s = Ingest(stub, "torn", header=True)
    assert s.next().ready.committed_offset == reported <= 40
    curve = stub.GetSurprise(pb.GetSurpriseRequest(session_id="torn"), timeout=10)
    assert curve.end == reported
    s.tokens(ids[reported:100], offset=reported)
    assert s.close()[-1].ack.committed_offset == 100


def test_one_ingest_stream_per_session_and_delete_waits_for_the_writer(stub: pb_grpc.SessionServiceStub) -> None:
    """"One ingest stream per session at a time (else FAILED_PRECONDITION)"; DeleteSession:
    "FAILED_PRECONDITION while a writer (ingest stream) is attached"; Session.writer_attached."""
    stub.CreateSession(pb.CreateSessionRequest(session_id="busy"), timeout=10)
    s = Ingest(stub, "busy", header=True)
    s.next()
    assert stub.GetSession(pb.GetSessionRequest(session_id="busy"), timeout=10).writer_attached
    err = fails(stub.Ingest, iter([pb.IngestRequest(session_id="busy", tokens=pb.TokenIds(ids=[5]))]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(err)["PreconditionFailure"].violations[0].type == "BUSY"
    err = fails(stub.DeleteSession, pb.DeleteSessionRequest(session_id="busy"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    s.close()
    assert not stub.GetSession(pb.GetSessionRequest(session_id="busy"), timeout=10).writer_attached
    stub.DeleteSession(pb.DeleteSessionRequest(session_id="busy"), timeout=10)


def test_flow_control_holds_at_most_a_chunk_and_a_message(stub: pb_grpc.SessionServiceStub) -> None:
    """"the server reads the next message only after committing every full chunk it holds, so it buffers
    at most one chunk plus one message per stream": every ack's received - committed stays within it."""
    stub.CreateSession(pb.CreateSessionRequest(session_id="flow"), timeout=10)
    piece = 20
    out = ingest(stub, "flow", random_ids(400, 7), piece=piece)
    acks = [r.ack for r in out if r.HasField("ack")]
    assert acks and all(a.received_offset - a.committed_offset <= CHUNK + piece for a in acks)
    assert acks[-1].committed_offset == 400


def test_text_messages_are_tokenized_alone_without_special_tokens(stub: pb_grpc.SessionServiceStub,
                                                                   tiny_model_dir: Path) -> None:
    """"Text is tokenized on the server, each message on its own: a message boundary is a token boundary
    ... No special tokens (BOS) are added"."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    pieces = ["Hello wor", "ld! This is", " a tiny tokenizer trained offline."]
    want = [len(tok.encode(p, add_special_tokens=False)) for p in pieces]
    stub.CreateSession(pb.CreateSessionRequest(session_id="text"), timeout=10)
    out = list(stub.Ingest(iter([pb.IngestRequest(session_id="text", text=p) for p in pieces]), timeout=30))
    receipts = [r.ack.receipt for r in out if r.HasField("ack") and r.ack.HasField("receipt")]
    assert [x.end - x.start for x in receipts] == want
    assert [x.start for x in receipts] == [0, want[0], want[0] + want[1]]
    first = stub.ListEvents(pb.ListEventsRequest(session_id="text"), timeout=10).num_tokens
    assert first == sum(want)


# ------------------------------------------------------------------------------------------ generate
def test_generate_streams_chunks_then_complete_and_leaves_memory_unchanged(
        stub: pb_grpc.SessionServiceStub) -> None:
    """Generate: "streaming tokens; the last message is complete. The memory is unchanged unless remember
    is set". complete: token_ids "all generated tokens", text "the whole answer", committed_offset "the
    session's offset afterwards (grows when remember)"; max_tokens "unset: 64"; STOP on "a stop token"."""
    stub.CreateSession(pb.CreateSessionRequest(session_id="gen"), timeout=10)
    ingest(stub, "gen", random_ids(300, 8))
    out = generate(stub, session_id="gen", prompt_tokens=pb.TokenIds(ids=[5, 6, 7]),
                   sampling=pb.SamplingParams(ignore_eos=True))
    assert [r.WhichOneof("kind") for r in out[:-1]] == ["chunk"] * (len(out) - 1)
    done = out[-1].complete
    assert len(done.token_ids) == 64 and done.finish_reason == pb.LENGTH  # max_tokens unset: 64
    assert [t for r in out[:-1] for t in r.chunk.token_ids] == list(done.token_ids)
    assert "".join(r.chunk.text for r in out[:-1]) == done.text
    assert done.committed_offset == 300 and done.usage.prompt_tokens == 3 and done.usage.completion_tokens == 64
    assert done.usage.memory_tokens == 300 and not done.HasField("trace")  # no include_trace: no trace
    assert stub.GetSession(pb.GetSessionRequest(session_id="gen"), timeout=10).num_tokens == 300
    stop_at = done.token_ids[2]
    first_stop = list(done.token_ids).index(stop_at)
    stopped = generate(stub, session_id="gen", prompt_tokens=pb.TokenIds(ids=[5, 6, 7]),
                       sampling=greedy(10, stop_token_ids=[stop_at]))[-1].complete
    assert stopped.finish_reason == pb.STOP and len(stopped.token_ids) <= first_stop + 1
    remembered = generate(stub, session_id="gen", prompt_tokens=pb.TokenIds(ids=[5, 6, 7]), sampling=greedy(4),
                          remember=True)[-1].complete
    assert remembered.committed_offset == 300 + 3 + 4
    assert stub.GetSession(pb.GetSessionRequest(session_id="gen"), timeout=10).num_tokens == 307


def test_a_text_prompt_and_stop_strings(stub: pb_grpc.SessionServiceStub, tiny_model_dir: Path) -> None:
    """GenerateRequest.prompt: text, tokenized on the server (no special tokens); SamplingParams.stop: "stop
    strings (excluded from the output)"; complete.stop_string: "the stop string that ended generation";
    STOP: "a stop string"; chunk text "held back while a ... stop string is open"."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    stub.CreateSession(pb.CreateSessionRequest(session_id="words"), timeout=10)
    ingest(stub, "words", random_ids(200, 11))
    prompt = "Tell me what you read."
    plain = generate(stub, session_id="words", prompt=prompt, sampling=greedy(24))[-1].complete
    assert plain.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    assert plain.finish_reason == pb.LENGTH and not plain.stop_string
    at = next(i for i in range(3, len(plain.text) - 3) if plain.text[i:i + 3].strip() == plain.text[i:i + 3])
    stop = plain.text[at:at + 3]
    out = generate(stub, session_id="words", prompt=prompt, sampling=greedy(24, stop=[stop, "never-said"]))
    done = out[-1].complete
    assert done.finish_reason == pb.STOP and done.stop_string == stop
    assert done.text == plain.text[:plain.text.index(stop)] and stop not in done.text
    assert "".join(r.chunk.text for r in out[:-1]) == done.text  # no piece of the stop string was streamed


def test_trace_is_set_when_asked_also_when_nothing_was_retrieved(stub: pb_grpc.SessionServiceStub) -> None:
    """complete.trace "when include_trace (empty when nothing was retrieved)"; RetrievalTrace.window: "Set
    also when nothing was retrieved"; sorted, disjoint ranges; every selected event lies inside it."""
    stub.CreateSession(pb.CreateSessionRequest(session_id="few"), timeout=10)
    ingest(stub, "few", random_ids(40, 9))
    done = generate(stub, session_id="few", prompt_tokens=pb.TokenIds(ids=[5]), sampling=greedy(1),
                    include_trace=True)[-1].complete
    assert done.HasField("trace") and not done.trace.events and done.trace.budget == 0
    assert [(r.start, r.end) for r in done.trace.window] == [(0, 40)]
    stub.CreateSession(pb.CreateSessionRequest(session_id="many"), timeout=10)
    ingest(stub, "many", random_ids(700, 10))
    tr = generate(stub, session_id="many", prompt_tokens=pb.TokenIds(ids=[5]), sampling=greedy(1),
                  include_trace=True, preview_tokens=3)[-1].complete.trace
    win = [(r.start, r.end) for r in tr.window]
    assert tr.events and all(a < b < c for (a, b), (c, _) in zip(win, win[1:], strict=False))
    assert win[-1][1] == 700 and len(tr.layers) == (1 if tr.shared else 2)
    for lay in tr.layers:
        for e in lay.events:
            assert e.source != pb.SOURCE_UNSPECIFIED and any(a <= e.start and e.end <= b for a, b in win)
    assert [e.start for e in tr.events] == sorted(e.start for e in tr.events)  # temporal order
    assert all(e.preview and e.layers >= 1 for e in tr.events)

    # the trace's counts and the usage agree with the session's own events and the window
    own = {e.id: e for e in stub.ListEvents(pb.ListEventsRequest(session_id="many", page_size=1000,
                                                                 include_preview=True), timeout=10).events}
    assert 0 < tr.num_events <= len(own) and tr.exact  # a few events: exact search
    assert tr.memory_tokens == sum(own[i].size for i in range(tr.num_events))  # "tokens in those events"
    for lay in tr.layers:
        for e in lay.events:  # "[start, end) is the part of the event in the window"; "truncated: less than it"
            o = own[e.id]
            assert o.start <= e.start < e.end <= o.end and e.truncated == (e.start > o.start or e.end < o.end)
    done = generate(stub, session_id="many", prompt_tokens=pb.TokenIds(ids=[5]), sampling=greedy(4),
                    include_trace=True)[-1].complete  # preview_tokens unset: 16
    cut = {e.id for lay in done.trace.layers for e in lay.events if e.truncated}
    assert all(e.preview == own[e.id].preview for e in done.trace.events if e.id not in cut)  # both 16 tokens
    usage, t = done.usage, done.timings
    assert usage.retrieved_tokens == done.trace.budget == sum(e.end - e.start for e in done.trace.layers[0].events)
    assert usage.window_tokens == sum(r.end - r.start for r in done.trace.window) - 1  # the anchor is computed
    assert (usage.prompt_tokens, usage.completion_tokens, usage.memory_tokens) == (1, 4, 700)
    assert t.wait_s >= 0 and 0 < t.retrieval_s <= t.first_token_s <= t.total_s and t.tokens_per_s > 0
    assert 0 <= t.probe_s <= t.retrieval_s  # "of retrieval_s: the probe step"


def test_request_id_is_echoed_in_logs_and_makes_remember_idempotent(stub: pb_grpc.SessionServiceStub) -> None:
    """request_id: "Echoed in logs; empty: generated. With remember it makes the call idempotent: retried
    with the same id after the session stored the exchange ..., the stored exchange is answered again and
    nothing is stored twice (...; another prompt under the same id is INVALID_ARGUMENT)"."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.INFO)
    handler.addFilter(ContextFilter())
    log = logging.getLogger("emserve")
    old = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        stub.CreateSession(pb.CreateSessionRequest(session_id="rid"), timeout=10)
        ingest(stub, "rid", random_ids(100, 11))
        first = generate(stub, session_id="rid", prompt_tokens=pb.TokenIds(ids=[5, 6]), sampling=greedy(3),
                         remember=True, request_id="contract-turn-1")[-1].complete
        generate(stub, session_id="rid", prompt_tokens=pb.TokenIds(ids=[5, 6]), sampling=greedy(1))
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    mine = [r for r in records if getattr(r, "request_id", "") == "contract-turn-1"]
    assert mine and all(r.session_id == "rid" and r.method == "Generate" for r in mine)
    generated = {r.request_id for r in records if r.method == "Generate"} - {"contract-turn-1"}
    assert len(generated) == 1 and all(re.fullmatch(r"[0-9a-f]{16}", x) for x in generated)  # empty: generated

    n = stub.GetSession(pb.GetSessionRequest(session_id="rid"), timeout=10).num_tokens
    assert n == 100 + 2 + 3 == first.committed_offset
    again = generate(stub, session_id="rid", prompt_tokens=pb.TokenIds(ids=[5, 6]), sampling=greedy(3),
                     remember=True, request_id="contract-turn-1")[-1].complete
    assert again.token_ids == first.token_ids and again.committed_offset == first.committed_offset
    assert stub.GetSession(pb.GetSessionRequest(session_id="rid"), timeout=10).num_tokens == n
    err = fails(stub.Generate, pb.GenerateRequest(session_id="rid", prompt_tokens=pb.TokenIds(ids=[9]),
                                                  sampling=greedy(1), remember=True, request_id="contract-turn-1"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err)["BadRequest"].field_violations[0].field == "request_id"


def test_cancelling_generate_aborts_the_engine_request(srv: ServerThread, stub: pb_grpc.SessionServiceStub,
                                                       engine: WatchedEngine) -> None:
    """"Cancelling the call aborts the engine request"; DEADLINE_EXCEEDED likewise ("a cancelled Generate
    aborts the engine request"): the engine requests the call started (an answer's start may take
    several, docs/recall.md rule 20) all end, at least one aborted."""
    stub.CreateSession(pb.CreateSessionRequest(session_id="cancel"), timeout=10)
    ingest(stub, "cancel", random_ids(100, 12))
    engine.token_delay = 0.05

    def settled(aborted_before: int) -> None:
        deadline = time.monotonic() + 10
        while srv.call(lambda: engine.aborted <= aborted_before or engine.running() > 0):
            assert time.monotonic() < deadline, (engine.started, engine.finished, engine.aborted)
            time.sleep(0.05)

    call = stub.Generate(pb.GenerateRequest(session_id="cancel", prompt_tokens=pb.TokenIds(ids=[5]),
                                            sampling=greedy(200)), timeout=60)
    assert next(call).HasField("chunk")
    call.cancel()
    settled(0)
    aborted = engine.aborted
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.Generate(pb.GenerateRequest(session_id="cancel", prompt_tokens=pb.TokenIds(ids=[5]),
                                              sampling=greedy(200)), timeout=0.5))
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    settled(aborted)
    engine.token_delay = 0.0


def test_a_remembering_generate_holds_the_session_as_its_writer(stub: pb_grpc.SessionServiceStub,
                                                                engine: WatchedEngine) -> None:
    """Session.writer_attached: "an ingest stream (or a remembering Generate) holds the session"; a plain
    Generate does not."""
    stub.CreateSession(pb.CreateSessionRequest(session_id="talk"), timeout=10)
    ingest(stub, "talk", random_ids(100, 13))
    engine.token_delay = 0.05
    try:
        for remember in (False, True):
            call = stub.Generate(pb.GenerateRequest(session_id="talk", prompt_tokens=pb.TokenIds(ids=[5]),
                                                    sampling=greedy(20), remember=remember), timeout=60)
            assert next(call).HasField("chunk")  # answering now
            held = stub.GetSession(pb.GetSessionRequest(session_id="talk"), timeout=10).writer_attached
            assert held == remember, remember
            list(call)
    finally:
        engine.token_delay = 0.0
    assert not stub.GetSession(pb.GetSessionRequest(session_id="talk"), timeout=10).writer_attached


# ------------------------------------------------------------------------------------------ inspect
def test_list_events_and_surprise_describe_the_same_memory(stub: pb_grpc.SessionServiceStub) -> None:
    """ListEvents: "The session's closed events ..., in temporal order, paginated"; total_events, num_tokens
    "committed tokens". GetSurprise: "The surprise (-ln p, nats) of every token in a range, optionally
    averaged over buckets"; end "unset: the committed offset"; max_surprise "per point, when stride > 1";
    boundaries "event starts in [start, end)"."""
    stub.CreateSession(pb.CreateSessionRequest(session_id="insp"), timeout=10)
    ingest(stub, "insp", random_ids(500, 13))
    events: list[pb.Event] = []
    token = ""
    while True:
        page = stub.ListEvents(pb.ListEventsRequest(session_id="insp", page_size=6, page_token=token,
                                                    include_preview=True, preview_tokens=2), timeout=10)
        assert len(page.events) <= 6 and page.num_tokens == 500
        events += page.events
        token = page.next_page_token
        if not token:
            break
    session = stub.GetSession(pb.GetSessionRequest(session_id="insp"), timeout=10)
    assert len(events) == page.total_events == session.num_events > 0
    assert [e.id for e in events] == list(range(len(events)))
    assert all(a.end <= b.start for a, b in zip(events, events[1:], strict=False))
    assert all(e.size == e.end - e.start and e.preview for e in events)
    assert sum(e.size for e in events) == session.event_tokens
    bare = stub.ListEvents(pb.ListEventsRequest(session_id="insp"), timeout=10)
    assert not any(e.preview for e in bare.events)

    curve = stub.GetSurprise(pb.GetSurpriseRequest(session_id="insp"), timeout=10)
    assert (curve.start, curve.end) == (0, 500) and len(curve.surprise) == 500 and not curve.max_surprise
    assert all(x >= 0 for x in curve.surprise)  # -ln p
    assert list(curve.boundaries) == [e.start for e in events]
    assert events[2].boundary_surprise == pytest.approx(curve.surprise[events[2].start])
    part = stub.GetSurprise(pb.GetSurpriseRequest(session_id="insp", start=100, end=260, stride=50), timeout=10)
    assert len(part.surprise) == len(part.max_surprise) == 4  # 50, 50, 50, 10
    assert part.surprise[0] == pytest.approx(sum(curve.surprise[100:150]) / 50, rel=1e-5)
    assert part.max_surprise[3] == pytest.approx(max(curve.surprise[250:260]), rel=1e-6)
    assert list(part.boundaries) == [e.start for e in events if 100 <= e.start < 260]
    assert session.surprise.max == pytest.approx(max(curve.surprise), rel=1e-6)
    err = fails(stub.GetSurprise, pb.GetSurpriseRequest(session_id="insp", start=0, end=501))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err)["BadRequest"].field_violations[0].field == "end"


def test_question_copy_answers_with_what_followed_the_question_words(stub: pb_grpc.SessionServiceStub,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """MemoryConfig.question_copy: "A greedy answer starts with the word that followed the question's last
    words where its window holds them verbatim (the longest such run, at least question_copy tokens ...),
    token by token while the model gives each at least 0.1% probability; then greedy. 0: off"."""
    import emserve.server.session.answer as answer_mod

    # every token plausible (the server runs in this process): the tiny random model gives the copied token
    # about 1/vocab, around the 0.1% bar, so whether it passes would turn on the window, not on the rule
    monkeypatch.setattr(answer_mod, "COPY_PLAUSIBLE", 1e-30)
    lead, value = [41, 42, 43, 44], 45
    ids = random_ids(300, 14)
    ids[250:250] = [*lead, value]  # in the question's local window
    answers = {}
    for copy in (0, 3, 5):
        sid = f"copy{copy}"
        stub.CreateSession(pb.CreateSessionRequest(session_id=sid, memory=pb.MemoryConfig(question_copy=copy)),
                           timeout=10)
        ingest(stub, sid, ids)
        done = generate(stub, session_id=sid, prompt_tokens=pb.TokenIds(ids=[7, 8, *lead]),
                        sampling=greedy(3))[-1].complete
        answers[copy] = list(done.token_ids)
    assert answers[3][0] == value and answers[0][0] != value
    assert answers[5] == answers[0]  # a 4-token run is shorter than asked for: plain greedy
    assert stub.GetSession(pb.GetSessionRequest(session_id="copy3"), timeout=10).memory.question_copy == 3

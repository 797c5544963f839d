"""Fuzz every RPC over a real socket: generated requests get canonical codes, the server stays healthy.

Requests are drawn from the proto's own descriptors (every field of every request message, nested
messages, repeated fields, oneofs, unknown enum values, extreme integers, NaN / inf floats, odd and
long strings) or are bytes that are no message at all, and go through raw stubs (no client-side
checks). Each call must end OK or with a code a client's bad input earns (``ALLOWED``): never
INTERNAL, UNKNOWN, UNAVAILABLE or a deadline, and every error carries emserve's ``ErrorInfo``.
Throughout, a probe asks health every 0.2 s and each answer must come within 1 s. Two sessions the
fuzzer may read but never write are asked the same questions before and after: identical answers.

``EMSERVE_FUZZ_CASES`` sets the number of generated cases (default 1000, the CI run); the cases are the
same every run unless ``EMSERVE_FUZZ_SEED`` draws others (a failure prints the seed-free example).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import hypothesis
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_harness import ServerThread, random_ids, tiny_config
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emserve.client import Client, pb
from emserve.server.engine.reference import ReferenceEngine

CASES = int(os.environ.get("EMSERVE_FUZZ_CASES", "1000"))
SEED = os.environ.get("EMSERVE_FUZZ_SEED")
SERVICE = "/emserve.v1.SessionService/"
DEADLINE_S = 30.0
HEALTH_EVERY_S = 0.2
HEALTH_WITHIN_S = 1.0

ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
KEPT = ("kept-a", "kept-b")  # read by the fuzzer, never written
POOL = ("fz-0", "fz-1", "fz-2")  # written, deleted and recreated by the fuzzer
READ_ONLY = {"GetSession", "ListEvents", "GetSurprise", "GetServerInfo", "ListSessions"}

# (method, kind, request message): kind as grpc's multicallables name it
METHODS: dict[str, tuple[str, type[Message]]] = {
    "GetServerInfo": ("unary_unary", pb.GetServerInfoRequest),
    "CreateSession": ("unary_unary", pb.CreateSessionRequest),
    "GetSession": ("unary_unary", pb.GetSessionRequest),
    "ListSessions": ("unary_unary", pb.ListSessionsRequest),
    "DeleteSession": ("unary_unary", pb.DeleteSessionRequest),
    "Ingest": ("stream_stream", pb.IngestRequest),
    "Generate": ("unary_stream", pb.GenerateRequest),
    "ListEvents": ("unary_unary", pb.ListEventsRequest),
    "GetSurprise": ("unary_unary", pb.GetSurpriseRequest),
}

# -------------------------------------------------------------------------------- strategies

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# words the server gives meaning to (config names, stop strings), so values past the first check are drawn
_WORDS = ("modularity", "conductance", "none", "surprise", "uniform", "random", "mean", "interleave", "\n", ".")


def _text(long: bool = True) -> st.SearchStrategy[str]:
    parts = [st.text(max_size=24), st.sampled_from(_WORDS)]
    if long:
        parts.append(st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=4000))
    return st.one_of(*parts)


def _ids(method: str) -> st.SearchStrategy[str]:
    known = POOL + KEPT if method in READ_ONLY else POOL
    return st.one_of(st.sampled_from(known), st.sampled_from(known).map(lambda s: s + "\n"),
                     st.text(max_size=12), st.text(min_size=200, max_size=2000))


def _scalar(f: FieldDescriptor, method: str) -> st.SearchStrategy[Any]:
    t = f.type
    if t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        edges = sorted({v for v in (lo, hi, -1, 2**31 - 1, 2**32 - 1, 2**53 + 1) if lo <= v <= hi})
        return st.one_of(st.integers(max(lo, -2), 64), st.sampled_from(edges), st.integers(max(lo, 0), 4096),
                         st.integers(lo, hi))
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.one_of(st.floats(-2, 12, width=32), st.floats(width=32))
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return _ids(method) if f.name.endswith("session_id") else _text()
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), st.integers(-3, 50))
    raise AssertionError(f"unhandled field type {t} of {f.full_name}")


def _field(f: FieldDescriptor, method: str, depth: int) -> st.SearchStrategy[Any]:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        key, val = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        return st.dictionaries(_scalar(key, method), _scalar(val, method), max_size=4)
    one = _message(f.message_type, method, depth + 1) if f.message_type is not None else _scalar(f, method)
    if f.is_repeated:
        return st.lists(one, max_size=64 if f.message_type is None else 3)
    return one


def _message(desc: Descriptor, method: str, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``desc``: any subset of its fields set (nested messages to depth 3)."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(desc)
    fields = [f for f in desc.fields if depth < 3 or f.message_type is None]

    def build(values: dict[str, Any]) -> Message:
        msg = cls()
        for name, v in values.items():
            f = desc.fields_by_name[name]
            target = getattr(msg, name)
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                target.update(v)
            elif f.is_repeated:
                if f.message_type is not None:
                    for item in v:
                        target.add().CopyFrom(item)
                else:
                    target.extend(v)
            elif f.message_type is not None:
                target.CopyFrom(v)
            else:
                setattr(msg, name, v)
        return msg

    return st.fixed_dictionaries({}, optional={f.name: _field(f, method, depth) for f in fields}).map(build)


def _paths(desc: Descriptor, prefix: tuple[str, ...] = ()) -> list[tuple[FieldDescriptor, tuple[str, ...]]]:
    """Every field of ``desc`` and of its singular message fields (two levels), with its path."""
    out = []
    for f in desc.fields:
        out.append((f, prefix + (f.name,)))
        if f.message_type is not None and not f.is_repeated and not prefix:
            out.extend(_paths(f.message_type, (f.name,)))
    return out


def _valid(method: str) -> st.SearchStrategy[Message]:
    """A request the server accepts (on a pool session; reads also on a kept one)."""
    pool = st.sampled_from(POOL + KEPT if method in READ_ONLY else POOL)
    tokens = st.lists(st.integers(3, 400), min_size=1, max_size=96)
    if method == "GetServerInfo":
        return st.just(pb.GetServerInfoRequest())
    if method == "CreateSession":
        return st.builds(pb.CreateSessionRequest, session_id=pool | st.from_regex(r"n-[a-z0-9]{1,10}", fullmatch=True))
    if method in ("GetSession", "DeleteSession"):
        return st.builds(METHODS[method][1], session_id=pool)
    if method == "ListSessions":
        return st.builds(pb.ListSessionsRequest, page_size=st.integers(0, 5))
    if method == "ListEvents":
        return st.builds(pb.ListEventsRequest, session_id=pool, page_size=st.integers(0, 50),
                         include_preview=st.booleans())
    if method == "GetSurprise":
        return st.builds(pb.GetSurpriseRequest, session_id=pool, start=st.integers(0, 300), stride=st.integers(0, 64))
    if method == "Ingest":
        return st.one_of(
            st.builds(pb.IngestRequest, session_id=pool, tokens=tokens.map(lambda ids: pb.TokenIds(ids=ids))),
            st.builds(pb.IngestRequest, session_id=pool, text=st.text(min_size=1, max_size=200)),
            st.builds(pb.IngestRequest, session_id=pool, flush=st.just(True)))
    if method == "Generate":
        sampling = st.builds(pb.SamplingParams, max_tokens=st.integers(1, 12), temperature=st.sampled_from([0.0, 0.7]))
        return st.builds(pb.GenerateRequest, session_id=pool, sampling=sampling, include_trace=st.booleans(),
                         remember=st.booleans(), prompt_tokens=tokens.map(lambda ids: pb.TokenIds(ids=ids[:16])))
    raise AssertionError(method)


@st.composite
def _mutated(draw: st.DrawFn, method: str) -> Message:
    """A valid request with 1-2 of its fields (nested ones too) replaced by generated values."""
    msg = draw(_valid(method))
    paths = _paths(msg.DESCRIPTOR)
    if not paths:
        return msg
    for f, path in draw(st.lists(st.sampled_from(paths), min_size=1, max_size=2)):
        owner = msg
        for name in path[:-1]:
            owner = getattr(owner, name)
        value = draw(_field(f, method, len(path)))
        owner.ClearField(f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            getattr(owner, f.name).update(value)
        elif f.is_repeated:
            target = getattr(owner, f.name)
            for item in value:
                target.add().CopyFrom(item) if f.message_type is not None else target.append(item)
        elif f.message_type is not None:
            getattr(owner, f.name).CopyFrom(value)
        else:
            setattr(owner, f.name, value)
    return msg


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, list[bytes], tuple[tuple[str, str], ...]]:
    """(method, request payloads, metadata). A payload is a valid request with 1-2 fields replaced, any
    message of the method's type, or bytes that are no message; a stream carries 1-4 of them."""
    method = draw(st.sampled_from(sorted(METHODS)))
    kind, cls = METHODS[method]
    kinds = {"mutated": _mutated(method), "valid": _valid(method), "any": _message(cls.DESCRIPTOR, method)}

    def one() -> bytes:
        kind = draw(st.sampled_from(["mutated"] * 4 + ["valid", "any", "bytes"]))
        return draw(st.binary(min_size=1, max_size=40)) if kind == "bytes" else draw(kinds[kind]).SerializeToString()

    payloads = [one() for _ in range(draw(st.integers(1, 4)) if kind == "stream_stream" else 1)]
    metadata: tuple[tuple[str, str], ...] = ()
    if method in ("Ingest", "Generate") and draw(st.booleans()):
        metadata = (("x-session-id", draw(st.sampled_from(POOL) | st.text(alphabet="abc-_0", max_size=8))),)
    return method, payloads, metadata


# -------------------------------------------------------------------------------- calls and checks

def call(channel: grpc.Channel, method: str, payloads: list[bytes],
         metadata: tuple[tuple[str, str], ...]) -> tuple[grpc.StatusCode, Any]:
    """The call's final code and its error (None when OK); every response message is read."""
    kind = METHODS[method][0]
    fn = getattr(channel, kind)(SERVICE + method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        if kind == "unary_unary":
            fn(payloads[0], timeout=DEADLINE_S, metadata=metadata)
        elif kind == "unary_stream":
            for _ in fn(payloads[0], timeout=DEADLINE_S, metadata=metadata):
                pass
        else:
            for _ in fn(iter(payloads), timeout=DEADLINE_S, metadata=metadata):
                pass
    except grpc.RpcError as e:
        return e.code(), e
    return grpc.StatusCode.OK, None


def error_info(err: Any) -> error_details_pb2.ErrorInfo | None:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info
    return None


class HealthProbe:
    """Asks health (service "") every HEALTH_EVERY_S on its own channel; keeps the slowest answer."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.slowest = 0.0
        self.checks = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEALTH_EVERY_S):
            t0 = time.perf_counter()
            try:
                r = self.stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                if r.status != health_pb2.HealthCheckResponse.SERVING:
                    self.failures.append(f"status {r.status}")
            except grpc.RpcError as e:
                self.failures.append(f"{e.code()}: {e.details()}")
            self.slowest = max(self.slowest, time.perf_counter() - t0)
            self.checks += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        self.channel.close()


def snapshot(client: Client, sid: str) -> tuple[Any, ...]:
    """What a kept session answers: its state, events, surprise and a greedy answer (not remembered)."""
    s = client.get_session(sid)
    events = [(e.start, e.end) for e in client.list_events(sid)]
    surprise = client.surprise(sid).surprise
    answer = client.ask(sid, [5, 6, 7, 8], max_tokens=8).token_ids
    return s.num_tokens, s.num_events, s.event_tokens, events, list(surprise), list(answer)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    engine = ReferenceEngine(str(tiny_model_dir), dtype="float32", log_dtype="float32", max_model_len=1024)
    srv = ServerThread(tiny_config(tiny_model_dir, tmp_path_factory.mktemp("fuzz") / "sessions",
                                   max_message_bytes=64 * 1024, max_session_tokens=20_000), engine)
    yield srv
    srv.stop()


def test_fuzz_every_rpc(server: ServerThread) -> None:
    client = Client(server.address, timeout=60)
    for i, sid in enumerate(KEPT):
        client.create_session(sid)
        client.ingest_tokens(sid, random_ids(300, 100 + i))
    for sid in POOL:
        client.create_session(sid)
    before = {sid: snapshot(client, sid) for sid in KEPT}
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    probe = HealthProbe(server.address)
    codes: collections.Counter[tuple[str, str]] = collections.Counter()
    bad: list[str] = []
    slowest = [0.0, ""]

    @settings(max_examples=CASES, deadline=None, database=None, derandomize=SEED is None,
              suppress_health_check=list(HealthCheck))
    @hypothesis.seed(int(SEED or 0))
    @given(cases())
    def one(case: tuple[str, list[bytes], tuple[tuple[str, str], ...]]) -> None:
        method, payloads, metadata = case
        t0 = time.perf_counter()
        code, err = call(channel, method, payloads, metadata)
        took = time.perf_counter() - t0
        if took > slowest[0]:
            slowest[:] = [took, method]
        codes[(method, code.name)] += 1
        if code not in ALLOWED:
            bad.append(f"{method} {code.name}: {err.details() if err else ''} <- {payloads!r:.300} {metadata}")
        elif err is not None and error_info(err) is None:
            bad.append(f"{method} {code.name} without ErrorInfo: {err.details()} <- {payloads!r:.300}")
        assert not bad, bad[-1]

    try:
        one()
    finally:
        probe.stop()
        channel.close()
        print(f"\nfuzz: {sum(codes.values())} calls, slowest {slowest[0]:.2f} s ({slowest[1]}); "
              f"health: {probe.checks} checks, slowest {probe.slowest:.3f} s")
        for (method, code), k in sorted(codes.items()):
            print(f"  {method:14s} {code:20s} {k}")
    assert sum(codes.values()) >= CASES
    assert {m for m, _ in codes} == set(METHODS), "every RPC was called"
    assert probe.checks > 0 and not probe.failures, probe.failures[:5]
    assert probe.slowest <= HEALTH_WITHIN_S, f"a health check took {probe.slowest:.2f} s"
    after = {sid: snapshot(client, sid) for sid in KEPT}
    assert after == before
    client.close()

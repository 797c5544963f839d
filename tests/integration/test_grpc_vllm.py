"""The gRPC server on the real vLLM engine (tiny random model), loaded the way production loads it.

One server for the module (one vLLM engine at a time): readiness after loading, concurrent sessions
batched on one engine with isolated memories, and a client cancel that aborts the vLLM request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from grpc_harness import ServerThread, tiny_config

from emserve.client import Client
from emserve.retrieval.kvlog import KVLog

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    cfg = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("vllm-sessions"), backend="vllm", dtype="float32",
                      max_model_len=1024, kv_cache_gib=1)
    s = ServerThread(cfg, None)  # the engine loads in the background, as in production
    yield s
    s.stop(grace=2)


@pytest.fixture(scope="module")
def client(srv: ServerThread) -> Iterator[Client]:
    with Client(srv.address) as c:
        assert c.health("") == "SERVING"
        info = c.wait_ready(timeout=300)
        assert info.backend == "vllm" and c.health("readiness") == "SERVING"
        yield c


def _ids(n: int, seed: int, lo: int = 3, hi: int = 500) -> list[int]:
    return torch.randint(lo, hi, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _log_tokens(srv: ServerThread, session_id: str) -> list[int]:
    folder = srv.server.config.sessions_dir / session_id
    data = next(p for p in folder.iterdir() if p.is_dir())
    with KVLog.open(data / "log") as log:
        return log.tokens().tolist()


def test_concurrent_sessions_on_one_vllm_engine_are_isolated(srv: ServerThread, client: Client) -> None:
    fact = [7, 11, 13, 17, 19, 23, 29, 31]
    a_ids = _ids(600, 1, 3, 250)
    a_ids[300:300] = fact * 2
    b_ids = _ids(600, 2, 250, 500)
    client.create_session("A")
    client.create_session("B")
    spans: dict[str, tuple[float, float]] = {}

    def run(sid: str, ids: list[int]) -> None:
        with Client(srv.address) as c:
            t0 = time.monotonic()
            c.ingest_tokens(sid, ids, piece_tokens=64)
            spans[sid] = (t0, time.monotonic())

    threads = [threading.Thread(target=run, args=a) for a in (("A", a_ids), ("B", b_ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    (a0, a1), (b0, b1) = spans["A"], spans["B"]
    assert a0 < b1 and b0 < a1
    assert _log_tokens(srv, "A") == a_ids and _log_tokens(srv, "B") == b_ids
    for sid, lo, hi in (("B", 250, 500), ("A", 3, 250)):
        ans = client.ask(sid, fact, max_tokens=4, ignore_eos=True, trace=True)
        assert len(ans.token_ids) == 4 and ans.trace is not None and ans.trace.events
        log = _log_tokens(srv, sid)
        for lay in ans.trace.layers:
            assert sum(e.end - e.start for e in lay.events) == ans.trace.budget
            for e in lay.events:
                assert all(lo <= t < hi for t in log[e.start : e.end]), (sid, e)
    assert client.get_session("A").num_tokens == len(a_ids)


def test_cancel_aborts_the_vllm_request(srv: ServerThread, client: Client) -> None:
    client.create_session("C")
    client.ingest_tokens("C", _ids(200, 3))
    stream = client.generate("C", [5, 6, 7], max_tokens=700, ignore_eos=True)
    it = iter(stream)
    first = next(it)
    assert first.HasField("chunk")
    engine = srv.server.engine
    assert srv.call(lambda: engine.llm.get_num_unfinished_requests()) == 1
    stream.cancel()
    deadline = time.monotonic() + 20
    while srv.call(lambda: engine.llm.get_num_unfinished_requests()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.call(lambda: engine.llm.get_num_unfinished_requests()) == 0
    assert srv.call(lambda: srv.runtime.generator.cancelled) == 1
    ans = client.ask("C", [5], max_tokens=3, ignore_eos=True)  # the session and the engine are free
    assert len(ans.token_ids) == 3

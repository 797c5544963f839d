"""The gRPC server on the real vLLM engine (tiny random model), loaded the way production loads it.

One server for the module (one vLLM engine at a time): readiness after loading, concurrent sessions
batched on one engine with isolated memories, and a client cancel that aborts the vLLM request.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_harness import ServerThread, check_isolated_sessions, random_ids, scrape, tiny_config, value

from emserve.client import Client

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    cfg = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("vllm-sessions"), backend="vllm", dtype="float32",
                      max_model_len=1024, kv_cache_gib=1, metrics_port=0)
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




def test_metrics_port_serves_vllm_metrics_one_request_per_step(srv: ServerThread, client: Client) -> None:
    """vLLM's own metrics are on the server's /metrics port, and one vLLM request is one emserve step
    (an ingestion chunk, a question's answer) or a question's probe, where no rule weighs the answer's
    start (docs/recall.md rules 19 and 20 ask the engine for other starts: more requests)."""
    port = srv.server.metrics_port
    assert port

    def requests(m: dict) -> float:
        return value(m, "vllm:request_success_total")

    def steps(m: dict) -> float:
        return value(m, "emserve_steps_total") + value(m, "emserve_step_phase_seconds_count", 0.0, phase="probe")

    before = scrape(port)
    client.create_session("M", memory={"question_lookahead": 0, "question_echo": 0})
    client.ingest_tokens("M", random_ids(300, 7))
    client.ask("M", [5, 6, 7], max_tokens=3, ignore_eos=True)
    after = scrape(port)
    assert steps(after) - steps(before) == requests(after) - requests(before) >= 300 // 32 + 1
    assert value(after, "vllm:prompt_tokens_total") - value(before, "vllm:prompt_tokens_total") >= 300
    assert value(after, "vllm:generation_tokens_total") > value(before, "vllm:generation_tokens_total")
    ttft = "vllm:time_to_first_token_seconds_count"
    assert value(after, ttft) > value(before, ttft)
    # Prometheus 2.x asks for OpenMetrics without allow-utf-8: vLLM's names keep their colons all the same
    prom2 = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75," \
            "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                                       headers={"Accept": prom2}), timeout=10) as r:
        text = r.read().decode()
    assert "\nvllm:request_success_total{" in text and "\nvllm_request_success_total" not in text
    assert value(after, "emserve_ingested_tokens_total") - value(before, "emserve_ingested_tokens_total") == 300


def test_concurrent_sessions_on_one_vllm_engine_are_isolated(srv: ServerThread, client: Client) -> None:
    """Two sessions ingest concurrently with isolated memories: a fact in A is never retrievable from B."""
    check_isolated_sessions(srv, client, n=600, at=300, piece_tokens=64, max_tokens=4, join_s=300, full_budget=True)


def test_cancel_aborts_the_vllm_request(srv: ServerThread, client: Client) -> None:
    client.create_session("C")
    client.ingest_tokens("C", random_ids(200, 3))
    stream = client.generate("C", [5, 6, 7], max_tokens=700, ignore_eos=True)
    it = iter(stream)
    first = next(it)
    assert first.HasField("chunk")
    engine = srv.server.engine
    deadline = time.monotonic() + 20  # the first chunk may be the answer's start, chosen before the stream
    while srv.call(lambda: engine.llm.get_num_unfinished_requests()) != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.call(lambda: engine.llm.get_num_unfinished_requests()) == 1
    stream.cancel()
    deadline = time.monotonic() + 20
    while srv.call(lambda: engine.llm.get_num_unfinished_requests()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.call(lambda: engine.llm.get_num_unfinished_requests()) == 0
    assert srv.call(lambda: srv.runtime.generator.cancelled) == 1
    ans = client.ask("C", [5], max_tokens=3, ignore_eos=True)  # the session and the engine are free
    assert len(ans.token_ids) == 3


def _held_paths(fragments: tuple[str, ...]) -> list[str]:
    """Files (open descriptors or memory maps) of this process and its children (the engine core)
    whose path contains one of ``fragments``."""
    import psutil

    me = psutil.Process()
    held: list[str] = []
    for p in [me, *me.children(recursive=True)]:
        try:
            paths = [f.path for f in p.open_files()] + [m.path for m in p.memory_maps()]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        held += [path for path in paths if any(f in path for f in fragments)]
    return held


def test_deleting_a_session_closes_its_files_in_every_process(srv: ServerThread, client: Client) -> None:
    client.create_session("D")
    client.ingest_tokens("D", random_ids(300, 5))
    client.ask("D", [5, 6], max_tokens=2, ignore_eos=True)
    folder = str(srv.server.config.sessions_dir / "D")
    fragments = (folder + "/", ".deleted-D-")
    assert _held_paths(fragments), "the engine should hold the live session's log"
    client.delete_session("D")
    client.create_session("E")
    client.ingest_tokens("E", random_ids(64, 6))  # any step: the engine core drops logs whose directory is gone
    assert _held_paths(fragments) == []

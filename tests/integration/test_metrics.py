"""Prometheus metrics of a real server (real gRPC socket, real HTTP /metrics port) on the HF reference
engine and a tiny model: every emserve_* and grpc_server_* metric moves with the value the calls imply.
vLLM's own metrics on the same port: tests/integration/test_grpc_vllm.py."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_harness import ServerThread, random_ids, scrape, scrape_settled, tiny_config, value
from prometheus_client import CollectorRegistry

from emserve.client import Client, ClientError
from emserve.retrieval.device_scorer import resolve_device
from emserve.server.engine.reference import ReferenceEngine
from emserve.server.report import ANSWER_STARTS

CHUNK = 32  # exc_block_size of the tiny memory config


@pytest.fixture
def srv(tiny_model_dir: Path, tmp_path: Path) -> Iterator[ServerThread]:
    engine = ReferenceEngine(str(tiny_model_dir), dtype="float32", log_dtype="float32", max_model_len=1024)
    s = ServerThread(tiny_config(tiny_model_dir, tmp_path / "sessions", metrics_port=0), engine, CollectorRegistry())
    yield s
    s.stop()


def test_every_metric_moves_with_the_calls(srv: ServerThread) -> None:
    port = srv.server.metrics_port
    assert port and srv.server.metrics is not None
    srv.server.metrics.disk.ttl_s = 0  # walk the sessions folder at every scrape
    before = scrape(port)
    assert value(before, "emserve_steps_total", kind="ingest") == 0 and value(before, "emserve_sessions") == 0
    with Client(srv.address, timeout=30) as c:
        c.create_session("m")
        c.ingest_tokens("m", random_ids(300, 1))
        events = list(c.list_events("m"))
        answer = c.ask("m", random_ids(6, 2), max_tokens=4, ignore_eos=True)
        with pytest.raises(ClientError):
            c.get_session("absent")
    m = scrape_settled(port)
    steps = math.ceil(300 / CHUNK)
    per_token = srv.server.engine.info.kv_layout(srv.server.engine.log_dtype).bytes_per_token
    assert value(m, "emserve_steps_total", kind="ingest") == steps
    assert value(m, "emserve_steps_total", kind="question") == 1
    assert value(m, "emserve_step_seconds_count", kind="ingest") == steps
    assert 0 < value(m, "emserve_step_seconds_sum", kind="ingest") < 60
    for phase in ("compute", "segment", "save"):
        assert value(m, "emserve_step_phase_seconds_count", kind="ingest", phase=phase) == steps
    for phase in ("retrieve", "inject", "close", "index", "write"):
        assert 0 < value(m, "emserve_step_phase_seconds_count", kind="ingest", phase=phase) <= steps
    for phase in ("probe", "retrieve", "compute"):
        assert value(m, "emserve_step_phase_seconds_count", kind="question", phase=phase) == 1
    assert value(m, "emserve_ingested_tokens_total") == 300
    n_events = len(events)
    assert n_events > 0
    assert value(m, "emserve_events_closed_total") == n_events == value(m, "emserve_event_tokens_count")
    assert value(m, "emserve_event_tokens_sum") == sum(e.end - e.start for e in events)
    assert value(m, "emserve_retrieval_seconds_count", kind="question") == 1
    assert 0 < value(m, "emserve_retrieval_seconds_count", kind="ingest") < steps  # the first step has no memory
    assert value(m, "emserve_retrieved_tokens_sum", kind="question") > 0
    assert value(m, "emserve_window_tokens_count") == steps + 1
    assert value(m, "emserve_kv_written_bytes_total") == 300 * per_token
    assert value(m, "emserve_kv_read_bytes_total") > 0
    assert value(m, "emserve_kv_read_bytes_total") % per_token == 0
    assert value(m, "emserve_question_ttft_seconds_count") == 1
    assert 0 < value(m, "emserve_question_ttft_seconds_sum") <= answer.complete.timings.total_s + 1
    assert value(m, "emserve_question_decode_tokens_per_second_count") == 1
    assert value(m, "emserve_question_output_tokens_total") == 4
    # every rule's series exists from the start; this one question's start was chosen by one rule at most
    starts = [value(m, "emserve_question_answer_starts_total", rule=rule) for rule in ANSWER_STARTS]
    assert value(before, "emserve_question_answer_starts_total", default=-1) == 0
    assert all(v in (0, 1) for v in starts) and sum(starts) <= 1
    assert value(m, "emserve_sessions") == 1 and value(m, "emserve_sessions_open") == 1
    assert value(m, "emserve_sessions_active") == 0
    # the open session's mirror: retrieval_device "auto" scores on a GPU where torch sees one
    mirror = value(m, "emserve_device_mirror_bytes")
    assert (mirror > 0) if resolve_device("auto") is not None else (mirror == 0)
    assert value(m, "emserve_sessions_disk_quota_bytes") == value(m, "emserve_sessions_disk_quota_used_bytes") == 0
    assert value(m, "emserve_session_disk_bytes", part="kv_log") >= 300 * per_token
    assert value(m, "emserve_session_disk_bytes", part="table") > 0
    assert value(m, "emserve_errors_total", grpc_code="NOT_FOUND") == 1
    assert value(m, "emserve_ready") == 1
    assert 0 < value(m, "emserve_sessions_disk_free_bytes") < value(m, "emserve_sessions_disk_size_bytes")
    # per-method gRPC server metrics (the names of go-grpc-prometheus)
    svc = "emserve.v1.SessionService"
    assert value(m, "grpc_server_handled_total", grpc_service=svc, grpc_method="GetSession",
                 grpc_code="NOT_FOUND") == 1
    assert value(m, "grpc_server_handled_total", grpc_method="CreateSession", grpc_code="OK") == 1
    assert value(m, "grpc_server_started_total", grpc_method="Ingest", grpc_type="bidi_stream") == 1
    assert value(m, "grpc_server_handled_total", grpc_method="Ingest", grpc_code="OK") == 1
    assert value(m, "grpc_server_msg_received_total", grpc_method="Ingest") >= 1
    assert value(m, "grpc_server_msg_sent_total", grpc_method="Ingest") >= 2  # ready + at least one ack
    assert value(m, "grpc_server_msg_sent_total", grpc_method="Generate", grpc_type="server_stream") >= 2
    assert value(m, "grpc_server_handling_seconds_count", grpc_method="Generate") == 1


def test_metrics_are_off_without_a_port(tiny_model_dir: Path, tmp_path: Path) -> None:
    engine = ReferenceEngine(str(tiny_model_dir), dtype="float32", log_dtype="float32", max_model_len=1024)
    registry = CollectorRegistry()
    s = ServerThread(tiny_config(tiny_model_dir, tmp_path / "sessions"), engine, registry)
    try:
        assert s.server.metrics is None and s.server.metrics_port is None
        assert list(registry.collect()) == []
    finally:
        s.stop()


def test_a_stopped_server_leaves_the_registry_empty(tiny_model_dir: Path, tmp_path: Path) -> None:
    engine = ReferenceEngine(str(tiny_model_dir), dtype="float32", log_dtype="float32", max_model_len=1024)
    registry = CollectorRegistry()
    s = ServerThread(tiny_config(tiny_model_dir, tmp_path / "sessions", metrics_port=0), engine, registry)
    assert any(f.name.startswith("emserve_") for f in registry.collect())
    s.stop()
    assert list(registry.collect()) == []

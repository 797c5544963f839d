"""JSON logs of a real `emserve serve` process (HF reference engine, tiny model, real gRPC socket): every
record is one JSON object; records logged while a call runs carry its method, session id and request id
(the client's GenerateRequest.request_id is echoed); per-call lines at INFO, step reports at DEBUG."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from grpc_harness import TINY_MEMORY, random_ids

from emserve.client import Client, ClientError
from emserve.server.cli import ServerProcess


def test_json_logs_carry_session_and_request_ids(tiny_model_dir: Path, tmp_path: Path) -> None:
    memory = [f"--memory={k}={v}" for k, v in TINY_MEMORY.items()]
    srv = ServerProcess(tmp_path / "sessions", tmp_path / "server.log", [
        "--backend", "reference", "--model", str(tiny_model_dir), "--dtype", "float32", "--max-model-len", "1024",
        "--log-format", "json", "--log-level", "DEBUG", *memory])
    try:
        address = srv.wait_listening()
        with Client(address, timeout=60) as c:
            c.wait_ready(timeout=120)
            health = [sys.executable, "-m", "emserve.server.cli", "health", "--server", address]
            ok = subprocess.run(health, capture_output=True, text=True, timeout=60)
            assert ok.returncode == 0 and "SERVING" in ok.stdout
            bad = subprocess.run([*health, "--service", "no.such.Service"], capture_output=True, text=True, timeout=60)
            assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
            c.create_session("logs")
            c.ingest_tokens("logs", random_ids(200, 1))
            answer = c.generate("logs", random_ids(5, 2), max_tokens=3, ignore_eos=True, request_id="req-abc-1")
            assert len(list(answer)) >= 2
            with pytest.raises(ClientError):
                c.get_session("missing")
    finally:
        assert srv.stop() == 0
    lines = (tmp_path / "server.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    stray = [line for line in lines if not line.startswith("{") and not line.startswith("emserve ")]
    assert not stray, stray[:5]  # every log line is JSON (the startup announcements go to stdout)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)

    def find(**want: object) -> list[dict]:
        return [r for r in records if all(r.get(k) == v for k, v in want.items())]

    gen = find(method="Generate", session_id="logs", request_id="req-abc-1", level="INFO")
    assert [r["message"].split(" in ")[0] for r in gen] == ["Generate OK"]
    asked = [r for r in find(logger="emserve.server.steps", request_id="req-abc-1") if r["step"]["kind"] == "question"]
    assert len(asked) == 1 and asked[0]["step"]["output_tokens"] == 3 and asked[0]["session_id"] == "logs"
    ingested = [r for r in find(logger="emserve.server.steps", method="Ingest", session_id="logs")
                if r["step"]["kind"] == "ingest"]
    assert sum(r["step"]["new_tokens"] for r in ingested) == 200
    assert len({r["request_id"] for r in ingested}) == 1  # one Ingest call, one generated request id
    missing = find(method="GetSession", session_id="missing")
    assert [r["message"].split(" in ")[0] for r in missing] == ["GetSession NOT_FOUND"]
    blas = find(logger="emserve.server.threads")  # the server's own numpy work on one BLAS thread (the default)
    assert len(blas) == 1 and blas[0]["message"].startswith("BLAS threads of the server process: now {")
    assert set(ast.literal_eval(blas[0]["message"].split("now ")[1].split(" (were")[0]).values()) == {1}


def test_a_server_whose_engine_does_not_load_is_reported_at_once(tmp_path: Path) -> None:
    """The server listens before its engine loads; when the engine cannot load, the process exits and
    ``ServerProcess.wait_ready`` says so with the log's path, not after its whole timeout."""
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    srv = ServerProcess(tmp_path / "sessions", tmp_path / "server.log", [
        "--backend", "reference", "--model", str(broken), "--max-model-len", "1024"])
    try:
        address = srv.wait_listening()
        with Client(address, timeout=60) as c:
            t0 = time.monotonic()
            with pytest.raises(RuntimeError, match="server exited .* before it was ready; see .*server.log"):
                srv.wait_ready(c, timeout=600)
            assert time.monotonic() - t0 < 120
    finally:
        srv.stop()

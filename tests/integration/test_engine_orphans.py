"""A SIGKILLed server leaves no engine behind: vLLM's engine-core and worker processes (gigabytes of
weights and KV cache) exit once their parent is gone. A real `emserve serve` process on the vLLM engine
and a tiny model, killed mid-life with SIGKILL."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from grpc_harness import TINY_MEMORY, random_ids

from emserve.client import Client
from emserve.server.cli import ServerProcess

pytest.importorskip("vllm")


def test_a_killed_server_leaves_no_engine_processes(tiny_model_dir: Path, tmp_path: Path) -> None:
    memory = [f"--memory={k}={v}" for k, v in TINY_MEMORY.items()]
    srv = ServerProcess(tmp_path / "sessions", tmp_path / "server.log", [
        "--backend", "vllm", "--model", str(tiny_model_dir), "--dtype", "float32", "--max-model-len", "1024",
        "--kv-cache-gib", "1", *memory])
    children: list[psutil.Process] = []
    try:
        address = srv.wait_listening()
        with Client(address, timeout=120) as c:
            c.wait_ready(timeout=300)
            c.create_session("k")
            c.ingest_tokens("k", random_ids(200, 1))  # the engine has run steps
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        assert len(children) >= 2, children  # vLLM's engine core and its worker
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(30)
        t0 = time.monotonic()
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [(p.pid, p.name()) for p in alive]
        assert time.monotonic() - t0 < 15
    finally:
        for p in children:
            if p.is_running():
                p.kill()
        srv.stop()


def test_a_killed_engine_stops_the_server_for_a_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    """vLLM's worker SIGKILLed (what the OOM killer does under a memory limit): the server notices, shuts
    down and exits with status 3 (``server/app.py``, lifecycle step 4), leaving no engine process; a
    server started again on the same folder serves the session with every acknowledged token."""
    memory = [f"--memory={k}={v}" for k, v in TINY_MEMORY.items()]
    args = ["--backend", "vllm", "--model", str(tiny_model_dir), "--dtype", "float32", "--max-model-len", "1024",
            "--kv-cache-gib", "0.25", *memory]
    srv = ServerProcess(tmp_path / "sessions", tmp_path / "server.log", args)
    children: list[psutil.Process] = []
    try:
        with Client(srv.wait_listening(), timeout=120) as c:
            c.wait_ready(timeout=300)
            c.create_session("k")
            c.ingest_tokens("k", random_ids(200, 1))
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        workers = [p for p in children if "Worker" in p.name()]
        assert len(workers) == 1, [(p.pid, p.name()) for p in children]
        workers[0].kill()
        assert srv.proc.wait(120) == 3
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        for p in children:
            if p.is_running():
                p.kill()
        srv.stop()
    assert "the engine died" in (tmp_path / "server.log").read_text()
    again = ServerProcess(tmp_path / "sessions", tmp_path / "server-2.log", args)
    try:
        with Client(again.wait_listening(), timeout=120) as c:
            c.wait_ready(timeout=300)
            assert c.get_session("k").num_tokens == 200
    finally:
        again.stop()

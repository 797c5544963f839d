"""End to end as a user runs it: ``emserve serve`` in its own process, the ``emserve`` CLI against it,
health probe and reflection over the socket, SIGTERM, restart on the same sessions directory, resume.

The reference engine and a tiny random model keep it fast (the real model: test_e2e_passkey.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from emserve.api.v1 import emserve_pb2 as pb
from emserve.api.v1 import emserve_pb2_grpc as pb_grpc
from emserve.client import Client
from emserve.server.cli import ServerProcess

MEMORY = ["n_init=16", "n_local=64", "n_mem=64", "exc_block_size=32", "min_block_size=4", "max_block_size=24",
          "surprisal_threshold_gamma=1.0"]
TEXT = ("Once upon a time there was a little model that could only count to five hundred and twelve. "
        "The quick brown fox jumps over the lazy dog. Episodic memory segments a stream of tokens into events. ") * 20


def _start(tmp: Path, model: Path, name: str) -> ServerProcess:
    extra = ["--backend", "reference", "--model", str(model), "--max-model-len", "1024", "--grace", "5"]
    for m in MEMORY:
        extra += ["--memory", m]
    proc = ServerProcess(tmp / "sessions", tmp / f"{name}.log", extra)
    proc.wait_listening(timeout=120)
    return proc


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EMSERVE_AUTH_TOKEN": ""}
    env.pop("EMSERVE_AUTH_TOKEN")
    return subprocess.run([sys.executable, "-m", "emserve.server.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, input=stdin)


def _check_scripting(addr: str, n: int) -> None:
    """What a script needs: text from standard input, JSON output, a clear error for a missing file,
    and a progress log of lines (stderr is not a terminal here)."""
    r = _cli("ingest", "-", "--session", "piped", "--server", addr, "--piece-chars", "300", "--json", stdin=TEXT)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["session_id"] == "piped" and res["tokens"] == res["committed_offset"] == n  # the same text as book
    assert "\r" not in r.stderr and "tokens committed" in r.stderr
    r = _cli("ingest", "/no/such/file.txt", "--session", "x", "--server", addr)
    assert r.returncode == 1 and "cannot read /no/such/file.txt" in r.stderr and "Traceback" not in r.stderr
    r = _cli("ask", "piped", "Once upon a time", "--server", addr, "--max-tokens", "4", "--trace", "--json")
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert len(done["token_ids"]) == done["usage"]["completion_tokens"] == 4 and "trace" in done and "timings" in done
    r = _cli("sessions", "--server", addr, "--json")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 0 and {"book", "piped"} <= {s["session_id"] for s in rows}
    r = _cli("events", "piped", "--server", addr, "--json", "--limit", "3", "--preview", "2")
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 0 and len(events) == 3 and all("start" in e or e.get("id", 0) == 0 for e in events)
    with Client(addr) as c:
        c.delete_session("piped")


@pytest.fixture
def server(tmp_path: Path, tiny_model_dir: Path) -> Iterator[ServerProcess]:
    proc = _start(tmp_path, tiny_model_dir, "server1")
    yield proc
    proc.stop()


def test_serve_cli_sigterm_restart_resume(tmp_path: Path, tiny_model_dir: Path, server: ServerProcess) -> None:
    addr = server.address
    assert addr.startswith("127.0.0.1:")
    channel = grpc.insecure_channel(addr)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == 1  # SERVING
    with Client(addr) as c:
        c.wait_ready(timeout=120)
    assert health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=10).status == 1
    assert "emserve.v1.SessionService" in ProtoReflectionDescriptorDatabase(channel).get_services()
    channel.close()

    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    r = _cli("ingest", str(doc), "--session", "book", "--server", addr, "--piece-chars", "300")
    assert r.returncode == 0, r.stderr
    assert "created session book" in r.stderr and "tok/s" in r.stderr and "events" in r.stderr
    assert "book: +" in r.stdout
    with Client(addr) as c:
        n = c.get_session("book").num_tokens
        assert n > 300
    r = _cli("ask", "book", "Once upon a time", "--server", addr, "--max-tokens", "5", "--trace")
    assert r.returncode == 0, r.stderr
    assert "retrieval" in r.stdout and "tokens of the stream in" in r.stdout and "tokens, finish" in r.stderr
    r = _cli("events", "book", "--server", addr, "--preview", "4", "--limit", "5")
    assert r.returncode == 0 and f"book: {n} tokens" in r.stdout and "boundary" in r.stdout
    r = _cli("sessions", "--server", addr)
    assert r.returncode == 0 and "book" in r.stdout and str(n) in r.stdout
    r = _cli("ask", "nobody", "hi", "--server", addr)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "Traceback" not in r.stderr
    _check_scripting(addr, n)

    assert server.stop() == 0  # SIGTERM: graceful
    log = server.log_path.read_text()
    assert "emserve shutting down" in log and "emserve stopped" in log

    again = _start(tmp_path, tiny_model_dir, "server2")
    try:
        with Client(again.address) as c:
            c.wait_ready(timeout=120)
            s = c.get_session("book")
            assert s.num_tokens == n and s.num_events > 0  # a session is its directory
            more = c.ingest_text("book", " And then the story went on.")
            assert more.start_offset == n and more.committed_offset > n
            assert len(c.ask("book", "Once upon", max_tokens=3, ignore_eos=True).token_ids) == 3
        r = _cli("delete", "book", "--server", again.address)
        assert r.returncode == 0
    finally:
        assert again.stop() == 0


def test_client_commands_without_a_server_fail_with_one_line_and_exit_1(tmp_path: Path) -> None:
    """Server down (nothing listens on the port): every client command says UNAVAILABLE in one line on
    stderr and exits 1, after the client's retries; no traceback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"  # closed again below: nothing listens there
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    for cmd in (["sessions"], ["ask", "x", "hello"], ["events", "x"], ["ingest", str(book), "--session", "x"],
                ["delete", "x"], ["health"]):
        r = _cli(*cmd, "--server", addr)
        assert r.returncode == 1, (cmd, r.returncode, r.stderr)
        assert "UNAVAILABLE" in r.stderr and "Traceback" not in r.stderr, (cmd, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (cmd, r.stderr)


def test_serve_with_an_unknown_or_invalid_memory_setting_says_which_and_exits_2(tmp_path: Path) -> None:
    """A memory setting given by flag or environment that does not exist or is invalid: one line naming it
    on stderr, exit 2, before any model is loaded; no traceback."""
    env = {**os.environ, "EMSERVE_HOME": str(tmp_path)}
    for extra, env_extra, says in ((["--memory", "n_lokal=5"], {}, "unknown memory setting(s) n_lokal"),
                                   (["--memory", "n_local=0"], {}, "n_local must be >= 1, got 0"),
                                   ([], {"EMSERVE_MEMORY_QUESTION_RANK": "max"}, "question_rank must be one of")):
        r = subprocess.run([sys.executable, "-m", "emserve.server.cli", "serve", "--port", "0", *extra],
                           capture_output=True, text=True, timeout=120, env={**env, **env_extra})
        assert r.returncode == 2, (extra, env_extra, r.returncode, r.stderr[-2000:])
        assert says in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


class _AckingService(pb_grpc.SessionServiceServicer):
    """A stand-in server for the CLI's memory test: GetSession answers, Ingest acknowledges every message at
    once (one 'token' per character) and keeps nothing. emserve itself would take hours over this much text."""

    def __init__(self) -> None:
        self.received = 0

    def GetSession(self, request: Any, context: Any) -> Any:
        return pb.Session(session_id=request.session_id)

    def Ingest(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        yield pb.IngestResponse(ready=pb.IngestReady(committed_offset=self.received, max_inflight_messages=4))
        for i, req in enumerate(requests):
            start = self.received
            self.received += len(req.text)
            yield pb.IngestResponse(ack=pb.IngestAck(committed_offset=self.received, received_offset=self.received,
                                                     receipt=pb.MessageReceipt(index=i, start=start,
                                                                              end=self.received)))


def test_ingest_from_stdin_streams_more_text_than_the_process_may_hold(tmp_path: Path) -> None:
    """``emserve ingest -`` under an address-space limit (RLIMIT_AS) smaller than the text piped into it:
    it reads, sends and forgets a piece at a time, so it finishes; the whole text arrives."""
    import resource
    import threading
    from concurrent import futures

    service = _AckingService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_SessionServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    limit = 512 << 20  # 512 MiB of address space for the CLI process (it peaks near 130 MiB); it is sent 640 MiB
    block = ("word " * 200_000).encode()  # 1 MB
    blocks = (limit + limit // 4) // len(block) + 1

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    # one malloc arena: glibc reserves 64 MiB of address space per thread arena, which the limit counts
    env = {k: v for k, v in os.environ.items() if k != "EMSERVE_AUTH_TOKEN"} | {"MALLOC_ARENA_MAX": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "emserve.server.cli", "ingest", "-", "--session", "big",
                             "--server", f"127.0.0.1:{port}", "--piece-chars", "1000000", "--json"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(tmp_path / "err").open("wb"),
                            preexec_fn=limited, env=env)

    def feed() -> None:
        assert proc.stdin is not None
        try:
            for _ in range(blocks):
                proc.stdin.write(block)
        finally:
            proc.stdin.close()

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.wait(600)
    finally:
        server.stop(0)
    writer.join(10)
    assert proc.returncode == 0, (tmp_path / "err").read_text()[-2000:]
    assert json.loads(out.decode().strip().splitlines()[-1])["committed_offset"] == blocks * len(block) > limit
    assert service.received == blocks * len(block)

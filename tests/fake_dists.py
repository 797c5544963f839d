"""Minimal distribution files for the tests of fetching packages as data (served to the real pip from a
find-links folder, with ``PIP_NO_INDEX=1``)."""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
from pathlib import Path


def make_wheel(folder: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A pure-Python wheel holding ``files`` (what ``pip download`` needs to accept it)."""
    norm = re.sub(r"[-_.]+", "_", package)
    path = folder / f"{norm}-{version}-py3-none-any.whl"
    info = f"{norm}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


# An in-tree PEP 517 backend: ``pip download`` of an sdist asks the backend for its metadata, and a test
# with no index cannot install setuptools into the isolated build environment.
_BACKEND = """import os

def get_requires_for_build_wheel(config_settings=None):
    return []

def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info = os.path.join(metadata_directory, "{dist}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\\nName: {name}\\nVersion: {version}\\n")
    return "{dist}.dist-info"
"""


def make_sdist(folder: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A source distribution ``<package>-<version>.tar.gz`` holding ``files`` under its top folder."""
    top = f"{package}-{version}"
    path = folder / f"{top}.tar.gz"
    dist = f"{re.sub(r'[-_.]+', '_', package)}-{version}"
    project = {
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
        "pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        "backend.py": _BACKEND.format(dist=dist, name=package, version=version).encode(),
    }
    with tarfile.open(path, "w:gz") as t:
        for name, data in {**project, **files}.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path

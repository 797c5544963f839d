"""Generate the Python code of the public API: ``python -m emserve.proto.generate [--check]``.

Compiles every ``proto/emserve/**/*.proto`` with grpcio-tools (its bundled ``protoc`` and the
well-known types it ships) into ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py``, written into the
client distribution: ``proto/emserve/v1/x.proto`` gives ``client/emserve/api/v1/x_pb2.py``, imported
as ``emserve.api.v1.x_pb2`` (the client and the server both import the API from there; the client
distribution must not need this folder). The ``.proto`` files themselves are copied next to their code
(``client/emserve/api/v1/x.proto``): the client distribution ships them, and
``python -m emserve.api.protos DIR`` writes them with the google.rpc protos a client in another language
needs to decode error details. The proto root is ``proto/``, so descriptors are registered
under their canonical names (``emserve/v1/emserve.proto``); protoc then writes imports such as ``from
emserve.v1 import x_pb2``, which are rewritten to ``from emserve.api.v1 import x_pb2``.

``--check`` regenerates into a temporary folder and exits 1 if any checked-in file differs (CI).
The output depends on the grpcio-tools version (pinned in CI through the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
OUT_ROOT = PROTO_ROOT.parent / "client" / "emserve" / "api"  # proto/emserve/<rest> -> OUT_ROOT/<rest>
PACKAGE = "emserve.api"
_IMPORT = re.compile(r"^from (emserve\.v\d+(?:\.\w+)*) import ", re.MULTILINE)


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((root / "emserve").rglob("*.proto"))


def generated_names(proto: Path) -> list[str]:
    stem = proto.stem
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def generate(out: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every .proto under ``root/emserve`` into ``out``: ``root/emserve/<rest>/x.proto`` gives
    ``out/<rest>/x_pb2.py`` and its siblings."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    protos = proto_files(root)
    rel = [str(p.relative_to(root)) for p in protos]
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *rel,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = []
    for p in protos:
        rel_dir = p.parent.relative_to(root / "emserve")
        for name in generated_names(p):
            src, dest = out / "emserve" / rel_dir / name, out / rel_dir / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            rewritten = _IMPORT.sub(lambda m: f"from {PACKAGE}.{m.group(1)[len('emserve.'):]} import ", src.read_text())
            src.unlink()
            dest.write_text(rewritten)
            written.append(dest)
        copy = out / rel_dir / p.name
        shutil.copyfile(p, copy)
        written.append(copy)
    return written


def check(root: Path = PROTO_ROOT, dest_root: Path = OUT_ROOT) -> list[str]:
    """Differences between the checked-in generated files and a fresh generation (empty: none)."""
    with tempfile.TemporaryDirectory(prefix="emserve-proto-") as tmp:
        fresh = generate(Path(tmp), root)
        problems = []
        for f in fresh:
            mine = dest_root / f.relative_to(tmp)
            if not mine.exists():
                problems.append(f"missing: {mine}")
                continue
            a, b = mine.read_text().splitlines(), f.read_text().splitlines()
            if a != b:
                diff = "\n".join(list(difflib.unified_diff(a, b, str(mine), "regenerated", lineterm=""))[:40])
                problems.append(diff)
        return problems


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the checked-in code is stale")
    args = ap.parse_args(argv)
    if args.check:
        problems = check()
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    with tempfile.TemporaryDirectory(prefix="emserve-proto-") as tmp:
        for f in generate(Path(tmp)):
            dest = OUT_ROOT / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
            print(dest.relative_to(PROTO_ROOT.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The API's ``.proto`` files for a client in another language: ``python -m emserve.api.protos DIR``.

Writes, under ``DIR`` and at their import paths:

* ``emserve/v1/emserve.proto``: the service (shipped in this distribution, next to its generated code);
* ``google/rpc/status.proto``, ``google/rpc/error_details.proto``, ``google/rpc/code.proto``: the
  messages of the ``grpc-status-details-bin`` trailer every emserve error carries (``google.rpc.Status``
  holding ``ErrorInfo``, ``BadRequest``, ...), from the installed googleapis-common-protos (a dependency).

Together with the well-known types every ``protoc`` ships (``google/protobuf/*.proto``) they are all a
code generator needs: ``protoc -I DIR --<lang>_out=... emserve/v1/emserve.proto google/rpc/*.proto``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

#: (package holding the file, file name, path under the export folder)
PROTOS: tuple[tuple[str, str, str], ...] = (
    ("emserve.api.v1", "emserve.proto", "emserve/v1/emserve.proto"),
    ("google.rpc", "status.proto", "google/rpc/status.proto"),
    ("google.rpc", "error_details.proto", "google/rpc/error_details.proto"),
    ("google.rpc", "code.proto", "google/rpc/code.proto"),
)


def export(dest: str | Path) -> list[Path]:
    """Write every file of :data:`PROTOS` under ``dest`` (created; existing files are replaced).
    Raises FileNotFoundError naming the file when an installed package lacks it."""
    out = Path(dest)
    written = []
    for package, name, rel in PROTOS:
        source = resources.files(package).joinpath(name)
        if not source.is_file():
            raise FileNotFoundError(f"{name} is not in the installed package {package}")
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emserve.api.protos", description=__doc__.splitlines()[0])
    ap.add_argument("dest", help="folder to write the .proto files under (created)")
    args = ap.parse_args(argv)
    try:
        for path in export(args.dest):
            print(path)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

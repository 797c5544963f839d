"""``python -m emserve.api.protos``: the .proto files a client in another language generates code from,
the google.rpc ones included (to decode the error details every emserve error carries)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from emserve.api import protos
from emserve.api.v1 import emserve_pb2 as pb

WANT = ["emserve/v1/emserve.proto", "google/rpc/status.proto", "google/rpc/error_details.proto",
        "google/rpc/code.proto"]


def test_export_writes_the_service_and_the_error_detail_protos(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "emserve.api.protos", str(tmp_path / "api")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [Path(line).relative_to(tmp_path / "api").as_posix() for line in out.stdout.splitlines()] == WANT
    service = (tmp_path / "api/emserve/v1/emserve.proto").read_text()
    assert "service SessionService" in service and "package emserve.v1;" in service
    details = (tmp_path / "api/google/rpc/error_details.proto").read_text()
    assert all(f"message {m} " in details for m in ("ErrorInfo", "BadRequest", "QuotaFailure", "RetryInfo",
                                                      "ResourceInfo", "PreconditionFailure"))
    assert "message Status " in (tmp_path / "api/google/rpc/status.proto").read_text()


def test_export_into_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = subprocess.run([sys.executable, "-m", "emserve.api.protos", str(blocker / "api")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1


def test_the_exported_files_compile_alone_to_the_shipped_descriptor(tmp_path: Path) -> None:
    """protoc with only the export and its own well-known types compiles every file, and the service's
    descriptor is the one the shipped Python code was generated from (the .proto is not stale)."""
    grpc_tools = pytest.importorskip("grpc_tools", reason="protoc comes with grpcio-tools (the dev extra)")
    from grpc_tools import protoc

    root = tmp_path / "api"
    protos.export(root)
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out = tmp_path / "set.pb"
    assert protoc.main(["protoc", f"-I{root}", f"-I{well_known}", "--include_imports",
                        f"--descriptor_set_out={out}", *WANT]) == 0
    files = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}
    assert set(WANT) <= set(files)
    compiled = files["emserve/v1/emserve.proto"]
    messages = list(compiled.message_type)
    while messages:  # the embedded descriptor leaves out the derived JSON names
        message = messages.pop()
        messages += message.nested_type
        for field in message.field:
            field.ClearField("json_name")
    assert compiled == descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    names = {m.name for m in files["google/rpc/error_details.proto"].message_type}
    assert {"ErrorInfo", "BadRequest", "QuotaFailure", "PreconditionFailure", "RetryInfo", "ResourceInfo"} <= names

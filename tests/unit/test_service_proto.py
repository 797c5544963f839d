"""The public API's generated code: current (regenerating gives no diff) and importable in-package."""

from __future__ import annotations

import importlib.metadata

import pytest

from emserve.proto import generate


def test_regenerating_gives_no_diff() -> None:
    from emserve.api.v1 import emserve_pb2_grpc

    tools = importlib.metadata.version("grpcio-tools")
    if tools != emserve_pb2_grpc.GRPC_GENERATED_VERSION:
        pytest.skip(f"grpcio-tools {tools} installed; the code was generated with "
                    f"{emserve_pb2_grpc.GRPC_GENERATED_VERSION} (pinned in the dev extra)")
    assert generate.check() == []


def test_generated_modules_use_package_imports() -> None:
    from emserve.api.v1 import emserve_pb2, emserve_pb2_grpc

    assert emserve_pb2.DESCRIPTOR.name == "emserve/v1/emserve.proto"
    assert emserve_pb2.DESCRIPTOR.package == "emserve.v1"
    svc = emserve_pb2.DESCRIPTOR.services_by_name["SessionService"]
    assert {m.name for m in svc.methods} == {
        "GetServerInfo", "CreateSession", "GetSession", "ListSessions", "DeleteSession",
        "Ingest", "Generate", "ListEvents", "GetSurprise",
    }
    ingest = svc.methods_by_name["Ingest"]
    assert ingest.client_streaming and ingest.server_streaming
    gen = svc.methods_by_name["Generate"]
    assert gen.server_streaming and not gen.client_streaming
    src = (generate.OUT_ROOT / "v1" / "emserve_pb2_grpc.py").read_text()
    assert "from emserve.v1 import" not in src and "from emserve.api.v1 import" in src
    assert emserve_pb2_grpc.SessionServiceStub is not None

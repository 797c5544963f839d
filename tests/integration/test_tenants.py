"""Tenants over a real socket (HF reference engine, tiny model): each bearer token's calls see only its
own tenant's sessions, in every RPC; a session id is free per tenant; health needs no token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_harness import ServerThread, random_ids, tiny_config

from emserve.client import Client, ClientError
from emserve.server.config import ConfigError
from emserve.server.engine.reference import ReferenceEngine

TOKENS = {"acme": "token-acme", "globex": "token-globex"}


@pytest.fixture
def srv(tiny_model_dir: Path, tmp_path: Path) -> Iterator[ServerThread]:
    engine = ReferenceEngine(str(tiny_model_dir), dtype="float32", log_dtype="float32", max_model_len=1024)
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps(TOKENS))
    s = ServerThread(tiny_config(tiny_model_dir, tmp_path / "sessions", tenants_file=str(tenants),
                                 auth_token="token-admin"), engine)
    yield s
    s.stop()


def _code(fn: object, *args: object, **kw: object) -> grpc.StatusCode:
    with pytest.raises(ClientError) as ei:
        r = fn(*args, **kw)  # type: ignore[operator]
        if hasattr(r, "__next__"):
            list(r)
    return ei.value.code


def test_a_tenant_sees_only_its_own_sessions(srv: ServerThread) -> None:
    acme = Client(srv.address, token=TOKENS["acme"], timeout=30)
    globex = Client(srv.address, token=TOKENS["globex"], timeout=30)
    admin = Client(srv.address, token="token-admin", timeout=30)
    acme.create_session("doc", labels={"owner": "acme"})
    acme.ingest_tokens("doc", random_ids(120, 1))
    before = acme.ask("doc", [5, 6, 7], max_tokens=4, ignore_eos=True).token_ids
    # every RPC on acme's session is NOT_FOUND for another tenant (the unnamed one too)
    for other in (globex, admin):
        assert [s.session_id for s in other.list_sessions()] == []
        assert _code(other.get_session, "doc") == grpc.StatusCode.NOT_FOUND
        assert _code(other.list_events, "doc") == grpc.StatusCode.NOT_FOUND
        assert _code(other.surprise, "doc") == grpc.StatusCode.NOT_FOUND
        assert _code(other.ask, "doc", [5, 6, 7], max_tokens=2) == grpc.StatusCode.NOT_FOUND
        assert _code(other.ingest_tokens, "doc", [5, 6]) == grpc.StatusCode.NOT_FOUND
        assert _code(other.delete_session, "doc") == grpc.StatusCode.NOT_FOUND
    # the same id is free for another tenant, and a session of its own
    globex.create_session("doc")
    globex.ingest_tokens("doc", random_ids(40, 2))
    assert globex.get_session("doc").num_tokens == 40
    assert [s.session_id for s in globex.list_sessions()] == ["doc"]
    assert acme.get_session("doc").num_tokens == 120  # untouched
    assert dict(acme.get_session("doc").labels) == {"owner": "acme"}
    assert acme.ask("doc", [5, 6, 7], max_tokens=4, ignore_eos=True).token_ids == before
    globex.delete_session("doc")
    assert acme.get_session("doc").num_tokens == 120
    # no token, or an unknown one: UNAUTHENTICATED; health needs none
    for token in (None, "token-nobody"):
        with Client(srv.address, token=token, timeout=10) as c:
            assert _code(c.get_session, "doc") == grpc.StatusCode.UNAUTHENTICATED
            assert c.health() == "SERVING"
    for c in (acme, globex, admin):
        c.close()


def test_tenant_sessions_survive_a_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps(TOKENS))
    engine = ReferenceEngine(str(tiny_model_dir), dtype="float32", log_dtype="float32", max_model_len=1024)
    cfg = tiny_config(tiny_model_dir, tmp_path / "sessions", tenants_file=str(tenants))
    srv = ServerThread(cfg, engine)
    with Client(srv.address, token=TOKENS["acme"], timeout=30) as c:
        c.create_session("kept")
        c.ingest_tokens("kept", random_ids(64, 3))
    srv.stop()
    srv = ServerThread(cfg, engine)
    try:
        with Client(srv.address, token=TOKENS["acme"], timeout=30) as c:
            assert c.get_session("kept").num_tokens == 64
        with Client(srv.address, token=TOKENS["globex"], timeout=30) as c:
            assert [s.session_id for s in c.list_sessions()] == []
    finally:
        srv.stop()


@pytest.mark.parametrize("content, error", [
    ({"bad name!": "t"}, "must match"),
    ({"a": "same", "b": "same"}, "shares its token"),
    ({"a": " "}, "non-blank"),
    ([], "JSON object"),
])
def test_a_bad_tenants_file_is_refused_at_start(tiny_model_dir: Path, tmp_path: Path, content: object,
                                                error: str) -> None:
    f = tmp_path / "tenants.json"
    f.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=error):
        tiny_config(tiny_model_dir, tmp_path, tenants_file=str(f))

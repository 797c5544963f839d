"""Disk quotas through the gRPC API (reference engine, real sockets, real files): a step that would pass a
session's or the server's quota is refused before it writes, nothing acknowledged is lost, the session
can still be read and asked, and deleting a session frees the server's quota."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2 as E
from grpc_harness import ServerThread, WatchedEngine, log_tokens, random_ids, scrape, tiny_config, value
from prometheus_client import CollectorRegistry

from emserve.client import Client, ClientError
from emserve.server.quota import DiskQuota, folder_bytes

MIB = 2**20


def _refused(c: Client, sid: str, ids: list[int], piece: int = 64) -> tuple[ClientError, list[int]]:
    """Ingest ``ids`` in pieces until a call fails; the error and the committed offsets acknowledged."""
    acked: list[int] = []
    with pytest.raises(ClientError) as ei:
        for i in range(0, len(ids), piece):
            acked.append(c.ingest_tokens(sid, ids[i : i + piece], retries=0).committed_offset)
    return ei.value, acked


def _session_folder(s: ServerThread, sid: str) -> Path:
    return Path(s.server.config.sessions_dir) / sid


def _check_refusal(e: ClientError, subject: str, limit: int) -> dict[str, Any]:
    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED, e
    assert e.reason == "LIMIT_EXCEEDED"
    assert e.detail(E.QuotaFailure).violations[0].subject == subject
    meta = dict(e.detail(E.ErrorInfo).metadata)
    assert int(meta["limit"]) == limit and int(meta["used"]) <= limit
    return meta


def test_a_session_quota_refuses_the_step_that_would_pass_it(tiny_model_dir: Path, tmp_path: Path,
                                                             engine: WatchedEngine) -> None:
    quota = 1 * MIB
    s = ServerThread(tiny_config(tiny_model_dir, tmp_path / "sessions", max_session_disk_gib=quota / 2**30), engine)
    try:
        with Client(s.address, timeout=60) as c:
            assert c.server_info().max_session_disk_bytes == quota
            c.create_session("a")
            ids = random_ids(20_000, 1)
            e, acked = _refused(c, "a", ids)
            meta = _check_refusal(e, "session_disk", quota)
            n = c.get_session("a").num_tokens
            # nothing acknowledged lost; a call of several chunks may have committed some before the refused one
            assert acked and 0 < acked[-1] <= n == int(meta["committed_offset"])
            assert log_tokens(s, "a") == ids[:n]
            assert folder_bytes(_session_folder(s, "a")) <= quota  # the refused step wrote nothing
            assert c.ask("a", [5, 6, 7], max_tokens=3, ignore_eos=True).token_ids  # still answers
            e2 = pytest.raises(ClientError, c.ask, "a", [5, 6, 7], max_tokens=256, remember=True).value
            _check_refusal(e2, "session_disk", quota)  # a remembering one is refused before generating
            assert c.get_session("a").num_tokens == n
            c.create_session("b")  # other sessions have their own quota
            assert c.ingest_tokens("b", ids[:256]).committed_offset == 256
    finally:
        s.stop()


def test_the_server_quota_counts_every_session_and_a_delete_frees_it(tiny_model_dir: Path, tmp_path: Path,
                                                                     engine: WatchedEngine) -> None:
    quota = 2 * MIB
    cfg = tiny_config(tiny_model_dir, tmp_path / "sessions", max_disk_gib=quota / 2**30, metrics_port=0)
    s = ServerThread(cfg, engine, CollectorRegistry())
    try:
        with Client(s.address, timeout=60) as c:
            assert c.server_info().max_disk_bytes == quota
            c.create_session("a")
            c.ingest_tokens("a", random_ids(1024, 2))
            used_a = folder_bytes(_session_folder(s, "a"))
            c.create_session("b")
            e, _ = _refused(c, "b", random_ids(40_000, 3))
            _check_refusal(e, "disk", quota)
            used_b = folder_bytes(_session_folder(s, "b"))
            assert used_a + used_b <= quota < used_a + used_b + 2 * used_a  # filled, within a step
            assert s.server.metrics_port
            m = scrape(s.server.metrics_port)
            assert value(m, "emserve_sessions_disk_quota_bytes") == quota
            assert value(m, "emserve_sessions_disk_quota_used_bytes") == used_a + used_b
            c.delete_session("a")  # frees its share: b can go on
            assert c.ingest_tokens("b", random_ids(256, 4)).committed_offset > 0
    finally:
        s.stop()
    s = ServerThread(cfg, engine)  # a restart measures what is on disk before the first step
    try:
        with Client(s.address, timeout=60) as c:
            e, _ = _refused(c, "b", random_ids(40_000, 5))
            _check_refusal(e, "disk", quota)
    finally:
        s.stop()


def test_the_quota_estimates_a_step_from_the_session_s_own_bytes_per_token(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "k_000.bin").write_bytes(b"x" * (64 * 1024))
    q = DiskQuota(session_bytes=96 * 1024)
    q.admit(folder, 0, 512)  # no token yet: no estimate, under the quota
    used = folder_bytes(folder)
    q.admit(folder, 100, (96 * 1024 - used) * 100 // used)  # exactly fits
    with pytest.raises(Exception, match="would pass its quota") as ei:
        q.admit(folder, 100, (96 * 1024 - used) * 100 // used + 10)
    assert ei.value.subject == "session_disk"  # type: ignore[attr-defined]
    q.forget("s")
    assert q.usage("s") is None and DiskQuota().enabled is False

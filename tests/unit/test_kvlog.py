"""KV log: append/read round trips, crash recovery, cross-process readers, validation."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch

from emserve.retrieval.errors import LogError
from emserve.retrieval.kvlog import KVLayout, KVLog

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=32, dtype="bfloat16")


def _kv(c: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(c, 2, 32, generator=g) for _ in range(3)]
    vs = [torch.randn(c, 2, 32, generator=g) for _ in range(3)]
    return ks, vs


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_append_and_read_back(tmp_path: Path, dtype: str) -> None:
    layout = KVLayout(3, 2, 32, dtype)
    log = KVLog.create(tmp_path, layout)
    ks, vs = _kv(10, 0)
    assert log.append(range(10), range(100, 110), ks, vs) == 0
    ks2, vs2 = _kv(5, 1)
    assert log.append(range(10, 15), range(5), ks2, vs2) == 10
    r = KVLog.open(tmp_path)
    assert len(r) == 15
    assert r.tokens().tolist() == list(range(15))
    view = r.token_view(3, 12)  # the same tokens, not copied, read-only
    assert view.tolist() == list(range(3, 12)) and not view.flags.writeable and not view.flags.owndata
    assert r.token_view(4, 4).size == 0
    with pytest.raises(LogError):
        r.token_view(10, 16)
    assert r.positions().tolist() == list(range(100, 110)) + list(range(5))
    td = layout.torch_dtype
    for layer in range(3):
        torch.testing.assert_close(r.keys(layer, 0, 10), ks[layer].to(td), atol=0, rtol=0)
        torch.testing.assert_close(r.values(layer, 10, 15), vs2[layer].to(td), atol=0, rtol=0)
    k, v, p = r.gather(1, [(12, 15), (0, 2)])
    torch.testing.assert_close(k, torch.cat([ks2[1][2:5], ks[1][0:2]]).to(td), atol=0, rtol=0)
    assert p.tolist() == [2, 3, 4, 100, 101]
    assert r.disk_bytes() == 15 * (layout.bytes_per_token + 8)


def test_torn_tail_is_truncated_on_open(tmp_path: Path) -> None:
    log = KVLog.create(tmp_path, LAYOUT)
    ks, vs = _kv(8, 0)
    log.append(range(8), range(8), ks, vs)
    log.close()
    # a crash mid-append: K/V of 3 more tokens written for some layers, token ids never committed
    with open(tmp_path / "k_000.bin", "ab") as f:
        f.write(b"\x01" * (3 * 2 * 32 * 2))
    with open(tmp_path / "positions.i32", "ab") as f:
        f.write(b"\x00" * 6)  # even a partial row
    assert len(KVLog.open(tmp_path)) == 8  # readers only trust the committed length
    w = KVLog.open(tmp_path, writable=True)
    assert (tmp_path / "k_000.bin").stat().st_size == 8 * 2 * 32 * 2
    ks2, vs2 = _kv(2, 5)
    assert w.append([100, 101], [8, 9], ks2, vs2) == 8
    torch.testing.assert_close(KVLog.open(tmp_path).keys(0, 8, 10), ks2[0].bfloat16(), atol=0, rtol=0)


def _reader_proc(path: str, q: mp.Queue) -> None:  # type: ignore[type-arg]
    import time

    r = KVLog.open(path)
    q.put(("ready", len(r)))
    for _ in range(3000):
        if r.refresh() >= 12:
            break
        time.sleep(0.01)
    q.put(("done", len(r), float(r.keys(2, 10, 12).float().sum())))


def test_reader_in_another_process_sees_appends(tmp_path: Path) -> None:
    w = KVLog.create(tmp_path, LAYOUT)
    ks, vs = _kv(10, 0)
    w.append(range(10), range(10), ks, vs)
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    p = ctx.Process(target=_reader_proc, args=(str(tmp_path), q))
    p.start()
    assert q.get(timeout=60) == ("ready", 10)
    ks2, vs2 = _kv(2, 3)
    w.append([1, 2], [10, 11], ks2, vs2)
    tag, n, s = q.get(timeout=60)
    p.join(30)
    assert (tag, n) == ("done", 12)
    assert s == pytest.approx(float(ks2[2].bfloat16().float().sum()))


def test_validation_errors(tmp_path: Path) -> None:
    log = KVLog.create(tmp_path, LAYOUT)
    ks, vs = _kv(4, 0)
    with pytest.raises(LogError, match="layers"):
        log.append(range(4), range(4), ks[:2], vs[:2])
    with pytest.raises(LogError, match="shape"):
        log.append(range(4), range(4), [k[:, :1] for k in ks], vs)
    with pytest.raises(LogError, match="already exists"):
        KVLog.create(tmp_path, LAYOUT)
    with pytest.raises(LogError, match="no KV log"):
        KVLog.open(tmp_path / "nope")
    with pytest.raises(LogError, match="layout"):
        KVLog.open_or_create(tmp_path, KVLayout(3, 2, 64))
    log.append(range(4), range(4), ks, vs)
    with pytest.raises(LogError, match="outside"):
        log.keys(0, 2, 9)
    with pytest.raises(LogError, match="read-only"):
        KVLog.open(tmp_path).append(range(4), range(4), ks, vs)
    with pytest.raises(LogError, match="dtype"):
        KVLayout(1, 1, 32, "int8")
    assert np.array_equal(KVLog.open(tmp_path).tokens(2, 2), np.zeros(0))


def test_prefetch_reads_ahead_and_changes_nothing(tmp_path: Path) -> None:
    """Prefetching any ranges (outside the log, overlapping, empty, some layers) leaves what a gather
    reads unchanged."""
    log = KVLog.create(tmp_path, LAYOUT)
    ks, vs = _kv(40, 3)
    log.append(range(40), range(40), ks, vs)
    r = KVLog.open(tmp_path)
    r.prefetch([(30, 60), (-5, 3), (2, 9), (5, 12), (20, 20)])
    r.prefetch([(0, 40)], layers=[2])
    r.prefetch([])
    k, v, p = r.gather(2, [(35, 40), (2, 12)])
    td = LAYOUT.torch_dtype
    torch.testing.assert_close(k, torch.cat([ks[2][35:40], ks[2][2:12]]).to(td), atol=0, rtol=0)
    torch.testing.assert_close(v, torch.cat([vs[2][35:40], vs[2][2:12]]).to(td), atol=0, rtol=0)
    assert p.tolist() == [*range(35, 40), *range(2, 12)]

"""``bench/lab/table_precision.py``: the rounding a coarser event table would apply, and the session copy that
rounds only the representatives."""

from __future__ import annotations

import numpy as np
import pytest


def test_int8_and_bf16_rounding_stay_within_their_steps() -> None:
    from bench.lab.table_precision import rounded

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((50, 768)) * rng.uniform(0.1, 10, (50, 1))).astype(np.float32)
    x[3, :64] = 0.0  # an all-zero head stays zero
    q8 = rounded(x, "int8")
    step = np.abs(x.reshape(50, 12, 64)).max(axis=2, keepdims=True) / 127
    assert np.all(np.abs(q8 - x).reshape(50, 12, 64) <= step / 2 + 1e-6)
    assert np.all(q8[3, :64] == 0) and not np.array_equal(q8, x)
    assert len(np.unique(q8[0, :64] / step[0, 0, 0])) <= 255  # at most 255 levels per head
    b16 = rounded(x, "bf16")
    assert np.all(np.abs(b16 - x) <= np.abs(x) * 2.0 ** -8) and not np.array_equal(b16, x)
    with pytest.raises(ValueError):
        rounded(x, "int4")


def test_a_session_copy_rounds_the_representatives_and_links_the_rest(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bench.lab.table_precision import copy_session, rounded

    src = tmp_path / "s"
    (src / "log").mkdir(parents=True)
    reps = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    reps.tofile(src / "log" / "reps_000.f32")
    (src / "log" / "k_000.bin").write_bytes(b"kv")
    (src / "log" / "layout.json").write_text('{"num_layers": 1, "num_kv_heads": 2, "head_dim": 64}')
    (src / "session.json").write_text("{}")
    assert copy_session(src, tmp_path / "d", "int8") == 1
    got = np.fromfile(tmp_path / "d" / "log" / "reps_000.f32", dtype=np.float32).reshape(4, 128)
    np.testing.assert_array_equal(got, rounded(reps, "int8"))
    for f in ("log/k_000.bin", "log/layout.json", "session.json"):
        assert (tmp_path / "d" / f).stat().st_ino == (src / f).stat().st_ino
    assert (tmp_path / "d" / "log" / "reps_000.f32").stat().st_ino != (src / "log" / "reps_000.f32").stat().st_ino

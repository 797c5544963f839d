"""bench/lab/table_layout.py: both layouts hold the same rows, and a small run measures every pair."""

from __future__ import annotations

import json

import numpy as np

from bench.lab import table_layout as bench


def test_the_two_layouts_hold_the_same_rows(tmp_path):
    tables = {name: bench.build(tmp_path / name, 50, em, seed=3, block=16) for name, em in bench.LAYOUTS.items()}
    assert not tables["layer"].event_major and tables["event"].event_major
    ids = np.array([49, 0, 17, 18])
    for layer in range(bench.LAYERS):
        np.testing.assert_array_equal(tables["layer"].reps_of(layer, ids), tables["event"].reps_of(layer, ids))
    for t in tables.values():
        t.close()


def test_a_small_run_measures_every_pair(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "write_results", lambda name, res: (tmp_path / f"{name}.json").write_text(
        json.dumps(res, default=str)) or tmp_path / f"{name}.json")
    assert bench.main(["--events", "300", "--candidates", "20", "--trials", "2", "--scan-events", "100",
                       "--workdir", str(tmp_path / "w"), "--out", "t"]) == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert len(res["trials"]) == 2 and all(t["layer_s"] > 0 and t["event_s"] > 0 and t["scan_event_s"] > 0
                                           for t in res["trials"])
    assert res["summary"]["ratio_p50"] > 0 and not (tmp_path / "w").exists()  # not kept without --keep
    assert set(res["disk_bytes"]) == {"layer", "event"}

"""Event table: append, reopen without rebuild, crash recovery (torn tails are truncated)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from emserve.retrieval.errors import EventTableError
from emserve.retrieval.events import HEADER_FILE, RECORDS_FILE, EventTable

L, D = 3, 8


def _reps(e: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((e, L, D)).astype(np.float32)


def _fill(path: os.PathLike[str], bounds: list[tuple[int, int]]) -> tuple[EventTable, np.ndarray]:
    t = EventTable.create(path, L, D)
    reps = _reps(len(bounds))
    t.append(bounds, reps)
    return t, reps


def test_append_and_reopen(tmp_path):
    bounds = [(128, 140), (140, 200), (200, 201), (210, 300)]
    t, reps = _fill(tmp_path, bounds[:2])
    assert t.append(bounds[2:], _reps(2, 1)) == 2
    all_reps = np.concatenate([reps, _reps(2, 1)])
    assert len(t) == 4 and t.end_offset == 300
    assert t.sizes.tolist() == [12, 60, 1, 90]
    assert t.count_ending_by(200) == 2 and t.count_ending_by(199) == 1 and t.count_ending_by(10**9) == 4
    for layer in range(L):
        np.testing.assert_array_equal(t.reps(layer), all_reps[:, layer])
    np.testing.assert_array_equal(t.reps_of(1, [3, 0]), all_reps[[3, 0], 1])
    t.close()
    r = EventTable.open(tmp_path)
    assert (r.starts.tolist(), r.ends.tolist()) == ([b[0] for b in bounds], [b[1] for b in bounds])
    np.testing.assert_array_equal(r.reps(2), all_reps[:, 2])
    with pytest.raises(EventTableError):
        r.append([(300, 310)], _reps(1))


def test_growth_beyond_initial_capacity(tmp_path):
    t = EventTable.create(tmp_path, L, D)
    reps = _reps(300)
    for i in range(300):
        t.append([(10 * i, 10 * i + 10)], reps[i : i + 1])
    assert len(t) == 300
    np.testing.assert_array_equal(t.reps(1), reps[:, 1])
    t.close()
    np.testing.assert_array_equal(EventTable.open(tmp_path, writable=True).reps(0), reps[:, 0])


def test_rejects_bad_events(tmp_path):
    t, _ = _fill(tmp_path, [(10, 20)])
    for bad in ([(15, 30)], [(30, 30)], [(40, 35)], [(30, 40), (35, 50)]):
        with pytest.raises(EventTableError):
            t.append(bad, _reps(len(bad)))
    with pytest.raises(EventTableError):
        t.append([(20, 30)], _reps(1)[:, :2])
    nan = _reps(1)
    nan[0, 0, 0] = np.nan
    with pytest.raises(EventTableError):
        t.append([(20, 30)], nan)
    assert len(t) == 1


def test_reader_sees_appends_after_refresh(tmp_path):
    w, reps = _fill(tmp_path, [(0, 5)])
    r = EventTable.open(tmp_path)
    assert len(r) == 1
    w.append([(5, 9)], _reps(1, 3))
    assert len(r) == 1 and r.refresh() == 2
    np.testing.assert_array_equal(r.reps(0)[1], _reps(1, 3)[0, 0])


def test_torn_record_is_truncated(tmp_path):
    t, reps = _fill(tmp_path, [(0, 5), (5, 9), (9, 20)])
    t.close()
    with open(tmp_path / RECORDS_FILE, "ab") as f:
        f.write(b"\x07" * 11)  # a record cut short by a crash
    r = EventTable.open(tmp_path)  # readers ignore the torn tail too
    assert len(r) == 3
    w = EventTable.open(tmp_path, writable=True)
    assert len(w) == 3 and (tmp_path / RECORDS_FILE).stat().st_size == 48
    w.append([(20, 30)], _reps(1, 9))
    w.close()
    r = EventTable.open(tmp_path)
    assert r.ends.tolist() == [5, 9, 20, 30]
    np.testing.assert_array_equal(r.reps(1)[:3], reps[:, 1])


def test_record_without_representatives_is_truncated(tmp_path):
    """A record whose representative rows never reached the file (files shorter than the count)."""
    t, reps = _fill(tmp_path, [(0, 5), (5, 9)])
    t.close()
    with open(tmp_path / RECORDS_FILE, "ab") as f:
        f.write(np.array([9, 12], "<i8").tobytes())
    os.truncate(tmp_path / "reps_001.f32", 2 * D * 4)  # layer 1 has rows for 2 events only
    w = EventTable.open(tmp_path, writable=True)
    assert len(w) == 2
    np.testing.assert_array_equal(w.reps(0), reps[:, 0])


def test_garbage_record_ends_the_table(tmp_path):
    t, _ = _fill(tmp_path, [(0, 5), (5, 9)])
    t.close()
    with open(tmp_path / RECORDS_FILE, "ab") as f:
        f.write(np.array([3, 2, 50, 60], "<i8").tobytes())  # out of order: not a committed event
    w = EventTable.open(tmp_path, writable=True)
    assert w.ends.tolist() == [5, 9]


def test_truncate_and_open_or_create(tmp_path):
    t, _ = _fill(tmp_path, [(0, 5), (5, 9), (9, 12)])
    t.truncate(1)
    assert len(t) == 1 and t.end_offset == 5
    t.append([(5, 7)], _reps(1))
    t.close()
    assert EventTable.open_or_create(tmp_path, L, D).ends.tolist() == [5, 7]
    with pytest.raises(EventTableError):
        EventTable.open_or_create(tmp_path, L + 1, D)
    with pytest.raises(EventTableError):
        EventTable.open(tmp_path / "nowhere")


def test_a_table_of_some_layers_stores_and_reads_only_those(tmp_path):
    """Rows of the stored layers only: no file for the others, reading one is an error; the header says
    which (format 2, which a format-1 reader refuses rather than taking the missing files for a torn table)."""
    t = EventTable.create(tmp_path, 3, D, layers=[2, 0])
    assert t.layers == (0, 2)
    head = json.loads((tmp_path / HEADER_FILE).read_text())
    assert head["version"] == 2 and head["layers"] == [0, 2]
    reps = np.random.default_rng(0).standard_normal((4, 2, D)).astype(np.float32)
    t.append([(0, 3), (3, 5), (5, 9), (9, 10)], reps)
    with pytest.raises(EventTableError, match=r"reps must be \[1, 2, 8\]"):
        t.append([(10, 12)], np.zeros((1, 3, D), np.float32))
    with pytest.raises(EventTableError, match="layer 1 has no representatives"):
        t.reps(1)
    assert sorted(f.name for f in tmp_path.glob("reps_*")) == ["reps_000.f32", "reps_002.f32"]
    t.close()
    again = EventTable.open(tmp_path, writable=True)  # recovery reads the stored layers' rows
    assert again.layers == (0, 2) and len(again) == 4
    np.testing.assert_array_equal(again.reps(2), reps[:, 1])
    again.close()
    with pytest.raises(EventTableError, match="need 3 x 8"):  # asks for a layer it does not store
        EventTable.open_or_create(tmp_path, 3, D, layers=[0, 1])
    EventTable.open_or_create(tmp_path, 3, D, layers=[2]).close()  # fewer than stored: fine


def test_a_table_of_every_layer_stays_format_1_and_serves_a_subset(tmp_path):
    t = EventTable.create(tmp_path, 3, D)
    assert t.layers == (0, 1, 2) and json.loads((tmp_path / HEADER_FILE).read_text())["version"] == 1
    t.close()
    t = EventTable.open_or_create(tmp_path, 3, D, layers=[0, 1])  # an older session: it keeps every layer
    assert t.layers == (0, 1, 2)
    t.close()
    with pytest.raises(EventTableError, match="non-empty subset"):
        EventTable.create(tmp_path / "x", 3, D, layers=[3])

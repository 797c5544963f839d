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


@pytest.mark.parametrize("event_major", [True, False])
def test_an_int8_table_rounds_each_group_and_reads_float32_back(tmp_path, event_major):
    """int8 rows: a scale per group (``max |x| / 127``), each value within half a step of the original and
    the largest of a group exact; every read path (reps, rows, reps_of, stored_rows) gives the same floats,
    which are :meth:`quantized`'s; the header is format 4 (one record per event, the default) or 3 (a file
    per layer, as older builds wrote); a reopen and recovery read the same."""
    g = 2  # groups of D // g = 4 values
    t = EventTable.create(tmp_path, L, D, layers=[0, 2], dtype="int8", groups=g, event_major=event_major)
    head = json.loads((tmp_path / HEADER_FILE).read_text())
    version = 4 if event_major else 3
    assert (head["version"], head["dtype"], head["groups"], head["layers"]) == (version, "int8", g, [0, 2])
    reps = np.random.default_rng(1).standard_normal((70, 2, D)).astype(np.float32) * 3
    reps[5, 1, :4] = 0.0  # an all-zero group
    bounds = [(10 * i, 10 * i + 7) for i in range(70)]  # 70 > the initial capacity: the files grow
    t.append(bounds[:30], reps[:30])
    t.append(bounds[30:], reps[30:])
    got = t.reps(2)
    assert got.dtype == np.float32 and got.shape == (70, D)
    np.testing.assert_array_equal(got, t.quantized(reps[:, 1]))
    groups = reps[:, 1].reshape(70, g, D // g)
    step = np.abs(groups).max(axis=2, keepdims=True) / 127
    err = np.abs(got.reshape(70, g, D // g) - groups)
    assert (err <= step / 2 + 1e-6).all() and not np.array_equal(got, reps[:, 1])
    top = np.abs(groups).argmax(axis=2)
    np.testing.assert_allclose(np.take_along_axis(got.reshape(70, g, -1), top[..., None], 2),
                               np.take_along_axis(groups, top[..., None], 2), rtol=1e-6)
    assert (got[5, :4] == 0).all()
    np.testing.assert_array_equal(t.rows(0, 20, 45), t.reps(0)[20:45])
    np.testing.assert_array_equal(t.stored_rows(0, 20, 45), t.reps(0)[20:45])
    np.testing.assert_array_equal(t.reps_of(2, [69, 3]), got[[69, 3]])
    with pytest.raises(EventTableError, match="outside"):
        t.stored_rows(0, 60, 71)
    files = ["reps.q8"] if event_major else ["reps_000.q8", "reps_002.q8"]
    assert sorted(f.name for f in tmp_path.glob("reps*")) == files
    t.close()
    r = EventTable.open(tmp_path, writable=True)
    assert (r.dtype, r.groups, len(r), r.event_major) == ("int8", g, 70, event_major)
    np.testing.assert_array_equal(r.reps(2), got)
    r.append([(700, 703)], reps[:1])
    np.testing.assert_array_equal(r.rows(0, 70, 71), t.quantized(reps[:1, 0]))


def test_an_int8_table_is_about_a_quarter_of_float32_on_disk(tmp_path):
    dim, groups, n = 768, 12, 1024  # a SmolLM2 token-level row: 4 vectors x 3 kv heads x 64
    reps = np.random.default_rng(0).standard_normal((n, 1, dim)).astype(np.float32)
    sizes = {}
    for dtype in ("float32", "int8"):
        t = EventTable.create(tmp_path / dtype, 1, dim, dtype=dtype, groups=groups)
        t.append([(i, i + 1) for i in range(n)], reps)
        sizes[dtype] = t.disk_bytes()
        t.close()
    assert 0.26 < sizes["int8"] / sizes["float32"] < 0.28  # (4 x 12 + 768) / (4 x 768) = 0.266 + the records


@pytest.mark.parametrize("event_major", [True, False])
def test_an_int8_table_recovers_a_torn_row_and_refuses_another_dtype(tmp_path, event_major):
    t = EventTable.create(tmp_path, L, D, dtype="int8", groups=2, event_major=event_major)
    reps = _reps(3)
    t.append([(0, 5), (5, 9)], reps[:2])
    t.close()
    with open(tmp_path / RECORDS_FILE, "ab") as f:
        f.write(np.array([9, 12], "<i8").tobytes())
    row = 4 * 2 + D
    if event_major:  # the third record's first two layers reached the file, its last did not
        os.truncate(tmp_path / "reps.q8", 2 * L * row + 2 * row)
    else:
        os.truncate(tmp_path / "reps_001.q8", 2 * row)  # layer 1's third row never reached its file
    w = EventTable.open(tmp_path, writable=True)
    assert len(w) == 2
    np.testing.assert_array_equal(w.reps(1), w.quantized(reps[:2, 1]))
    w.close()
    with pytest.raises(EventTableError, match="float32"):
        EventTable.open_or_create(tmp_path, L, D)  # a float32 table asked of an int8 one
    with pytest.raises(EventTableError, match="scale groups"):
        EventTable.create(tmp_path / "x", L, D, dtype="int8", groups=3)
    with pytest.raises(EventTableError, match="dtype"):
        EventTable.create(tmp_path / "y", L, D, dtype="float16")
    with pytest.raises(EventTableError, match="event-major"):
        EventTable.create(tmp_path / "z", L, D, event_major=True)  # float32 tables stay a file per layer


def test_an_event_major_record_holds_every_layer_side_by_side(tmp_path):
    """Format 4 stores event i's rows of every stored layer as one record, in the order of the layers, each
    row as format 3 stores it; a reader of either layout gets the same floats."""
    g, layers = 2, [0, 2]
    reps = np.random.default_rng(3).standard_normal((9, 2, D)).astype(np.float32)
    bounds = [(5 * i, 5 * i + 4) for i in range(9)]
    em = EventTable.create(tmp_path / "em", L, D, layers=layers, dtype="int8", groups=g)
    pl = EventTable.create(tmp_path / "pl", L, D, layers=layers, dtype="int8", groups=g, event_major=False)
    for t in (em, pl):
        t.append(bounds, reps)
    row = 4 * g + D
    raw = np.fromfile(tmp_path / "em" / "reps.q8", np.uint8)[: 9 * 2 * row].reshape(9, 2, row)
    for slot, layer in enumerate(layers):
        own = np.fromfile(tmp_path / "pl" / f"reps_{layer:03d}.q8", np.uint8)[: 9 * row].reshape(9, row)
        np.testing.assert_array_equal(raw[:, slot], own)
        np.testing.assert_array_equal(em.reps(layer), pl.reps(layer))
        np.testing.assert_array_equal(em.reps_of(layer, [8, 0, 4]), pl.reps_of(layer, [8, 0, 4]))
    assert abs(em.disk_bytes() - pl.disk_bytes()) <= 2 * 4096  # the same rows; files round to blocks


@pytest.mark.parametrize(("dtype", "event_major"), [("float32", False), ("int8", False), ("int8", True)])
def test_prefetch_changes_no_read(tmp_path, dtype, event_major):
    """Prefetching any ids (unsorted, repeated, runs, past the stored rows, none) leaves every read as it was."""
    t = EventTable.create(tmp_path, L, D, dtype=dtype, event_major=event_major)
    assert t.reps_count == 0
    t.prefetch([0, 1], [0, 3])  # nothing stored yet: a no-op
    bounds = [(10 * i, 10 * i + 7) for i in range(70)]
    t.append(bounds, _reps(70))
    ids = np.array([69, 3, 4, 5, 3, 40, 0])
    before = [t.reps_of(lay, ids) for lay in range(L)]
    t.prefetch(range(L), np.r_[ids, 70, 500, -1])
    t.prefetch([1], [])
    for lay in range(L):
        np.testing.assert_array_equal(t.reps_of(lay, ids), before[lay])

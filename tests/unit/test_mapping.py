"""retrieval.mapping: read-only random-access maps of the session files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emserve.retrieval.mapping import map_array, map_file


def test_map_array_reads_the_file_prefix(tmp_path: Path) -> None:
    data = np.arange(6 * 4, dtype="<f4").reshape(6, 4)
    f = tmp_path / "x.f32"
    f.write_bytes(data.tobytes() + b"\0" * 8)  # a longer file: only the asked rows are mapped
    m = map_array(f, "<f4", (5, 4), random=True)
    np.testing.assert_array_equal(m, data[:5])
    assert not m.flags.writeable
    with pytest.raises(ValueError):
        m[0, 0] = 1.0
    np.testing.assert_array_equal(m[[4, 0, 2]], data[[4, 0, 2]])  # gathers (the retrieval access pattern)


def test_map_array_empty_and_short(tmp_path: Path) -> None:
    f = tmp_path / "e.bin"
    f.write_bytes(b"")
    assert map_array(f, np.int32, (0,)).shape == (0,)
    f.write_bytes(b"\0" * 8)
    with pytest.raises(ValueError):  # asks for more than the file holds
        map_array(f, np.int32, (3,))


def test_map_array_sees_appends_on_remap(tmp_path: Path) -> None:
    f = tmp_path / "t.i32"
    f.write_bytes(np.arange(3, dtype=np.int32).tobytes())
    first = map_array(f, np.int32, (3,))
    with open(f, "ab") as w:
        w.write(np.arange(3, 5, dtype=np.int32).tobytes())
    np.testing.assert_array_equal(map_array(f, np.int32, (5,)), np.arange(5))
    np.testing.assert_array_equal(first, np.arange(3))  # an old map stays valid


def test_willneed_clips_spans_to_the_mapping(tmp_path: Path) -> None:
    f = tmp_path / "w.i32"
    f.write_bytes(np.arange(5000, dtype=np.int32).tobytes())
    m = map_file(f, np.int32, (5000,), random=True)
    # spans are clipped to the mapping (a negative start makes mmap.madvise raise); empty and reversed ones skipped
    m.willneed([(-3, 10), (1000, 2000), (4990, 10**9), (7, 7), (30, 20)])
    np.testing.assert_array_equal(m.array[4990:], np.arange(4990, 5000))
    empty = tmp_path / "e.bin"
    empty.write_bytes(b"")
    map_file(empty, np.int32, (0,)).willneed([(0, 10)])  # nothing mapped: a no-op

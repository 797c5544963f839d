"""Contiguity buffer: EM-LLM's FIFO semantics, hand-worked (every event has 10 tokens unless noted)."""

from __future__ import annotations

import numpy as np

from emserve.retrieval.buffers import ContiguityBuffer, contiguity_tokens

SIZES = np.full(100, 10, np.int64)


def test_kc_formula():
    assert contiguity_tokens(2048, 0.3) == int(0.3 * 2048 + 1) == 615
    assert contiguity_tokens(1, 0.3) == 1
    assert contiguity_tokens(0, 0.3) == 0
    assert contiguity_tokens(100, 64) == 64  # >= 1: absolute tokens
    assert contiguity_tokens(10, 64) == 10


def test_new_neighbours_order_and_eligibility():
    buf = ContiguityBuffer()
    # hits 5 then 9: neighbours 6, 4, 10, 8 (b+1 before b-1), then reversed: best hit's last
    assert buf.update([5, 9], SIZES, 100, 50) == "replace"
    assert buf.ids == (8, 10, 4, 6)
    # edges and hits are never neighbours: 0 has no left, 99 no right, 1 is itself a hit
    buf = ContiguityBuffer()
    buf.update([0, 99, 1], SIZES, 100, 1000)
    assert buf.ids == (2, 98)
    # only events below num_events are retrievable
    buf = ContiguityBuffer()
    buf.update([49], SIZES, 50, 1000)
    assert buf.ids == (48,)


def test_case_replace_when_new_neighbours_fill_the_buffer():
    buf = ContiguityBuffer([1, 2])
    # cap 30: 6, 4, 10 fill it exactly -> filled -> the buffer becomes the new neighbours
    assert buf.update([5, 9], SIZES, 100, 30) == "replace"
    assert buf.ids == (10, 4, 6)


def test_case_replace_when_buffer_empty():
    buf = ContiguityBuffer()
    assert buf.update([5], SIZES, 100, 40) == "replace"
    assert buf.ids == (4, 6)


def test_case_append_when_everything_fits():
    buf = ContiguityBuffer([20])
    # new 20 tokens, not filled (cap 40); old 10 + new 20 < 40 -> appended after the old entries
    assert buf.update([5], SIZES, 100, 40) == "append"
    assert buf.ids == (20, 4, 6)


def test_case_fifo_drops_the_oldest():
    buf = ContiguityBuffer([20, 30, 40])
    # new [4, 6] = 20 tokens; old 30 + 20 >= 40 -> new go in, old re-added newest first until full
    assert buf.update([5], SIZES, 100, 40) == "fifo"
    assert buf.ids == (30, 40, 4, 6)


def test_case_fifo_skips_hits_and_new_neighbours():
    buf = ContiguityBuffer([20, 5, 40, 6])
    # 6 is a new neighbour again and 5 a hit: neither is re-added from the old buffer
    assert buf.update([5], SIZES, 100, 40) == "fifo"
    assert buf.ids == (20, 40, 4, 6)


def test_no_neighbours_leaves_buffer_unchanged():
    buf = ContiguityBuffer([20, 30])
    assert buf.update([], SIZES, 100, 40) == "none"
    assert buf.update([4, 5], SIZES, 6, 40) == "append"  # 6 is not retrievable, 3 is
    assert buf.ids == (20, 30, 3)
    buf = ContiguityBuffer([20, 30])
    big = SIZES.copy()
    big[6] = 100
    big[4] = 100
    assert buf.update([5], big, 100, 40) == "none"  # the first neighbour does not fit: nothing new
    assert buf.ids == (20, 30)


def test_never_overshoots_cap():
    sizes = np.array([10, 25, 10, 10, 40, 10, 10], np.int64)
    buf = ContiguityBuffer()
    # hit 2: neighbour 3 (10), then 1 (25) would make 35 > 30 -> filled, not taken (EM-LLM nearest fit
    # would keep it: |30-10| > |35-30|)
    assert buf.update([2], sizes, 7, 30) == "replace"
    assert buf.ids == (3,)


def test_select_excludes_hits_and_respects_a_smaller_cap():
    buf = ContiguityBuffer([20, 30, 40, 50])
    assert buf.select({40}, SIZES, 100, 40) == [20, 30, 50]
    assert buf.select(set(), SIZES, 100, 25) == [40, 50]  # oldest dropped first
    assert buf.select(set(), SIZES, 45, 100) == [20, 30, 40]  # 50 not retrievable

"""The stream goals of docs/results.md (#19, ``bench/eval/eval_report.py``: ``goals``): the longest stream's last
point against its own 16k point, judged only once a stream reached 2M tokens."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="module")
def er():  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")  # eval_report draws the figures
    from bench.eval import eval_report
    return eval_report


def _point(tokens: int, tok_s: float, ttfts: list[float], anon_gib: float) -> dict[str, Any]:
    return {"tokens": tokens, "segment_tok_s": tok_s, "probe": {"ttft_s": 9.0},
            "timing": [{"ttft_s": t} for t in ttfts], "rss_anon_bytes": anon_gib * 2**30}


def _run(*points: dict[str, Any]) -> dict[str, Any]:
    return {"streams": [{"system": "emserve", "points": list(points)}]}


def test_stream_goals_compare_the_longest_stream_with_its_own_16k(er) -> None:  # type: ignore[no-untyped-def]
    short = _run(_point(16384, 800, [0.2], 3.0), _point(1 << 20, 700, [0.25], 3.5))
    long = _run(_point(16384, 700, [0.2, 0.2, 0.3], 3.0), _point(1 << 21, 600, [0.2, 0.3, 0.5], 4.2))
    rows = {r[0]: r for r in er.goals({"a": short, "b": long})}
    ingest = rows["ingest tok/s at 2M >= 0.8x at 16k"]
    assert ingest[2] == "met" and "600 vs 700" in ingest[1] and "(b)" in ingest[1]
    ttft = rows["TTFT of a 64-token question at 2M <= 1.5x at 16k"]
    assert ttft[2] == "met" and "0.30 vs 0.20" in ttft[1]  # the timing questions' medians, not the probe
    rss = rows["server + engine anonymous RSS at 2M within 1 GiB of 16k"]
    assert rss[2] == "NOT met" and "+1.20" in rss[1]


def test_a_stream_short_of_2m_judges_nothing(er) -> None:  # type: ignore[no-untyped-def]
    short = _run(_point(16384, 800, [0.2], 3.0), _point(1 << 20, 790, [0.2], 3.1))
    rows = er.goals({"a": short})
    assert [r[2] for r in rows[:3]] == ["not measured"] * 3
    assert "2M not reached" in rows[0][1]
    assert [r[2] for r in er.goals({})[:3]] == ["not measured"] * 3


def test_of_two_streams_as_long_the_latest_run_is_judged(er) -> None:  # type: ignore[no-untyped-def]
    old = {**_run(_point(16384, 700, [0.2], 3.0), _point(1 << 21, 300, [0.2], 3.2)),
           "machine": {"time": "2026-12-07T08:02:08+0000"}}
    new = {**_run(_point(16384, 700, [0.2], 3.0), _point(1 << 21, 600, [0.2], 3.2)),
           "machine": {"time": "2026-12-07T12:00:00+0000"}}
    for runs in ({"a": old, "b": new}, {"b": new, "a": old}):  # whatever the order the runs are read in
        ingest = {r[0]: r for r in er.goals(runs)}["ingest tok/s at 2M >= 0.8x at 16k"]
        assert ingest[2] == "met" and "600 vs 700" in ingest[1] and "(b)" in ingest[1]

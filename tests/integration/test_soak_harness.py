"""The soak harness (bench/eval/soak.py) in a short run: a real `emserve serve` process (HF reference engine, the
tiny model) under writers that create, grow, ask (remembering half the time) and delete sessions, sampled
every few seconds. It must finish without a call error and report every sampled quantity and its drift.
The 30-minute run on vLLM is recorded in bench/results/soak.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.eval import soak


@pytest.mark.slow
def test_a_short_soak_runs_clean_and_reports_drift(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = soak.run(["--minutes", "0.5", "--sample-s", "8", "--warmup-min", "0.1", "--writers", "2",
                       "--session-tokens", "2000", "--model", str(tiny_model_dir), "--server-arg=--backend",
                       "--server-arg=reference", "--no-chat-template", "--workdir", str(tmp_path), "--no-write"])
    assert result["errors"] == []
    assert len(result["samples"]) >= 3
    for s in result["samples"]:
        assert s["rss_anon_bytes"] > 0 and s["fds"] > 0 and s["health_s"] < 1.0 and s["sessions"] >= 1
    t = result["traffic"]
    assert t["deleted"] >= 1 and t["questions"] >= 2 and t["remembered"] >= 1  # every kind of call ran
    assert {"rss_anon_bytes_per_hour", "fds", "threads", "processes"} <= set(result["drift"])

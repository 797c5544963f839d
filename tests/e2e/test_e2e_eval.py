"""Smoke test of the evaluation harness (``bench/eval/eval.py``): one command end to end, reduced grid.

Starts ``emserve serve`` on the real default model, ingests one 4k-token passkey haystack per system
(emserve, truncation) through the client, asks, stops the server, and writes the results files. Checks
their structure, not the accuracy. A few minutes on 2 cores; marked slow.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from model_sources import NEEDS_DEFAULT_MODEL

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed"),
    NEEDS_DEFAULT_MODEL,
    pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed"),
]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_eval_quick_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.eval.eval", "--quick", "--lengths", "4096", "--depths", "0.5",
           "--tasks", "passkey", "--systems", "emserve,truncation", "--results-dir", str(tmp_path), "--out", "smoke",
           "--no-docs"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=840, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    res = json.loads((tmp_path / "smoke.json").read_text())
    assert res["complete"] is True and res["quick"] is True
    assert res["model"]["name"] == "smollm2-135m" and res["model"]["max_model_len"] == 8192
    assert res["machine"]["cores"] and "versions" in res["machine"]
    assert res["default_memory"]["n_mem"] > 0
    assert res["config"]["systems"] == ["emserve", "truncation"]
    assert {h["system"] for h in res["haystacks"]} == {"emserve", "truncation"}
    for h in res["haystacks"]:
        assert h["length"] == 4096 and h["ingest_tok_s"] > 0 and h["disk_bytes"] > 0 and h["rss_bytes"] > 0
    answers = res["answers"]
    assert len(answers) == 2
    for a in answers:
        assert a["task"] == "passkey" and a["length"] == 4096 and a["depth"] == 0.5
        assert isinstance(a["correct"], bool) and a["expected"].isdigit() and isinstance(a["answer"], str)
        assert a["ttft_s"] > 0 and a["window_tokens"] > 0
    trunc = next(a for a in answers if a["system"] == "truncation")
    assert trunc["retrieved_tokens"] == 0  # sink + local window only

    with open(tmp_path / "smoke.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {"system", "task", "length", "depth", "correct", "ttft_s"} <= set(rows[0])
    for png in ("smoke-depth.png", "smoke-ingest.png", "smoke-ttft.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "accuracy" in proc.stdout and "emserve" in proc.stdout

"""Smoke test of the recall suite (``bench/eval/recall.py --quick``): one command end to end.

Starts ``emserve serve`` on the real default model, ingests a 4k-token prose haystack (2 needles of each
prose task) and a 4k-token pass-key haystack (2 keys), asks every needle with the retrieval trace on,
stops the server, then asks the same questions of vanilla vLLM on 2k-token full-attention windows.
Checks the results' structure and that retrieval recall comes from the window the server reports, not
the accuracy. A few minutes on 2 cores; marked slow.
"""

from __future__ import annotations

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
]

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("passkey", "passkey-prose", "kv", "split", "after", "twohop")


@pytest.mark.timeout(1200)
def test_recall_quick_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.eval.recall", "--quick", "--results-dir", str(tmp_path),
           "--out", "smoke"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1140, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    res = json.loads((tmp_path / "smoke.json").read_text())
    assert res["complete"] is True and res["quick"] is True and res["model"]["name"] == "smollm2-135m"
    assert res["config"]["lengths"] == [4096] and res["config"]["systems"] == ["emserve"]
    assert res["default_memory"]["question_neighbours"] == 6
    answers = res["answers"]
    served = [a for a in answers if a["system"] == "emserve"]
    full = [a for a in answers if a["system"] == "full@2k"]
    assert len(served) == len(full) == 12 and {a["task"] for a in served} == set(TASKS)
    assert sorted(a["qid"] for a in served) == sorted(a["qid"] for a in full)
    for a in served:
        assert isinstance(a["correct"], bool) and a["expected"].isdigit() and isinstance(a["answer"], str)
        assert 0.0 <= a["coverage"] <= 1.0 and a["in_window"] == (a["coverage"] >= 1.0)
        assert a["window_tokens"] > 0 and a["retrieved_events"] > 0  # 4k tokens: a question retrieves
        assert a["window_tokens"] < 1024  # the question's own window, not the whole haystack
    for a in full:
        assert a["context_tokens"] == 2048 and isinstance(a["correct"], bool)
    headers, rows = res["summary"]["headers"], res["summary"]["rows"]
    assert headers[-1] == "retrieval recall"
    assert {(r[0], r[2]) for r in rows} == {(t, s) for t in TASKS for s in ("emserve", "full@2k")}
    assert all(r[3] == 2 for r in rows)
    assert "retrieval recall" in proc.stdout


@pytest.mark.timeout(2400)
def test_a_stopped_run_is_resumed_where_it_stopped(tmp_path: Path) -> None:
    """``--resume`` takes up a stopped run: its finished haystacks stay as measured, the haystack it
    stopped in continues from the session's committed tokens (here all of them: the run stopped before
    saving that haystack's answers), and the answers are those of an uninterrupted run (greedy)."""
    base = [sys.executable, "-m", "bench.eval.recall", "--quick", "--tasks", "passkey,kv",
            "--reference-lengths", "", "--results-dir", str(tmp_path), "--out", "resumed",
            "--workdir", str(tmp_path / "work")]
    whole = subprocess.run([*base, "--keep"], capture_output=True, text=True, timeout=1080, cwd=ROOT)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    path = tmp_path / "resumed.json"
    first = json.loads(path.read_text())
    last = first["haystacks"][-1]["hid"]
    stopped = {**first, "complete": False, "haystacks": first["haystacks"][:-1],
               "answers": [a for a in first["answers"] if a["hid"] != last]}
    path.write_text(json.dumps(stopped))

    again = subprocess.run([*base, "--resume"], capture_output=True, text=True, timeout=1080, cwd=ROOT)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    res = json.loads(path.read_text())
    assert res["complete"] is True and len(res["resumed"]) == 1 and res["resumed"][0]["haystacks_done"] == 1
    row = res["haystacks"][-1]
    assert row["hid"] == last and row["resumed_from"] == row["length"]  # nothing left to ingest
    key = lambda a: (a["qid"], a["answer"], a["correct"], a["in_window"])  # noqa: E731
    assert sorted(map(key, res["answers"])) == sorted(map(key, first["answers"]))
    assert "workdir" not in res and list((tmp_path / "work").iterdir()) == []  # finished, not --keep: removed
    # a finished run is not resumed
    done = subprocess.run([*base, "--resume"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0 and "finished run" in done.stderr

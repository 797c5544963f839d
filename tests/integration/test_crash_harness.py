"""The crash harness's quick mode (bench/eval/crash.py): 10 SIGKILLs of a real `emserve serve` process at random
points of ingest, remembering Generate and delete, on the HF reference engine and the tiny model. Nothing
acknowledged lost, no orphan process, no leftover folder, and the resumed sessions (tokens, events,
surprise, answers) bit-identical to an uninterrupted run of the same operations. The full run (30 kills,
vLLM) is recorded in bench/results/crash-vllm.json."""

from __future__ import annotations

from pathlib import Path

from bench.eval import crash


def test_ten_kills_lose_nothing_and_change_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = crash.main(["--kills", "10", "--backend", "reference", "--model", str(tiny_model_dir),
                         "--workdir", str(tmp_path), "--no-write"])
    assert result["checks"]["kills"] >= 10
    assert result["lost"] == [] and result["orphans"] == [] and result["leftovers"] == []
    assert result["differences"] == []
    assert result["passed"]

"""bench/results: every file is listed in manifest.toml and INDEX.md is the one generated from it."""

from __future__ import annotations

from pathlib import Path

import pytest


def _module():  # type: ignore[no-untyped-def]
    from bench.eval import results_index

    return results_index


def test_every_result_is_listed_and_the_index_is_current() -> None:
    ri = _module()
    benchmarks = ri.load()
    ri.owners(benchmarks)
    assert (ri.RESULTS / ri.INDEX).read_text() == ri.render(benchmarks), "run python -m bench.eval.results_index"


def test_an_unlisted_file_and_an_entry_without_files_are_named(tmp_path: Path) -> None:
    ri = _module()
    (tmp_path / ri.MANIFEST).write_text(
        '[[benchmark]]\nscript = "bench/x.py"\nkind = "experiment"\ncommand = "c"\nmeasures = "m"\n'
        'files = [{ name = "x-*.json" }, { name = "gone.json", status = "superseded" }]\n')
    for name in ("x-1.json", "x-2.json", "stray.json"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(ri.ManifestError) as e:
        ri.owners(ri.load(tmp_path), tmp_path)
    assert "gone.json (bench/x.py) lists no file" in str(e.value) and "stray.json is not in" in str(e.value)
    (tmp_path / "stray.json").unlink()
    (tmp_path / "gone.json").write_text("{}")
    got = ri.owners(ri.load(tmp_path), tmp_path)
    assert sorted(got) == ["gone.json", "x-1.json", "x-2.json"] and got["gone.json"].status == "superseded"
    text = ri.render(ri.load(tmp_path))
    assert "## Experiments" in text and "## Superseded runs" in text and "| `gone.json` | `bench/x.py` |" in text

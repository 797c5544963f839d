"""Generate ``bench/results/INDEX.md`` from ``bench/results/manifest.toml``.

    .venv/bin/python -m bench.eval.results_index           # write INDEX.md
    .venv/bin/python -m bench.eval.results_index --check   # exit 1 if a file is unlisted or INDEX.md is stale

Rules (checked by ``--check`` and the test suite): every file in ``bench/results`` but the index and the
manifest is listed by exactly one manifest entry (a name or a glob), every entry lists at least one file,
and INDEX.md is what this script writes. The index has one table for the acceptance benchmarks, one for
the experiments, and the superseded runs apart.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bench.eval.common import RESULTS

MANIFEST = "manifest.toml"
INDEX = "INDEX.md"
KINDS = ("acceptance", "experiment")
STATUSES = ("current", "superseded")


@dataclass(frozen=True)
class Entry:
    script: str
    pattern: str
    status: str
    note: str


class ManifestError(Exception):
    """The manifest and the results folder disagree."""


def load(results: Path = RESULTS) -> list[dict]:
    benchmarks = tomllib.loads((results / MANIFEST).read_text())["benchmark"]
    for b in benchmarks:
        if b.get("kind") not in KINDS:
            raise ManifestError(f"{b.get('script')}: kind must be one of {KINDS}, got {b.get('kind')!r}")
        for f in b["files"]:
            if f.get("status", "current") not in STATUSES:
                raise ManifestError(f"{f['name']}: status must be one of {STATUSES}")
    return benchmarks


def owners(benchmarks: list[dict], results: Path = RESULTS) -> dict[str, Entry]:
    """Every results file with the one entry that lists it; raises :class:`ManifestError` on a file no
    entry or two entries list, or an entry that lists nothing."""
    names = sorted(p.name for p in results.iterdir() if p.is_file() and p.name not in (INDEX, MANIFEST))
    owner: dict[str, Entry] = {}
    problems = []
    for b in benchmarks:
        for f in b["files"]:
            e = Entry(b["script"], f["name"], f.get("status", "current"), f.get("note", ""))
            hit = [n for n in names if fnmatch.fnmatchcase(n, e.pattern)]
            if not hit:
                problems.append(f"{e.pattern} ({e.script}) lists no file")
            for n in hit:
                if n in owner:
                    problems.append(f"{n} is listed twice: {owner[n].pattern} and {e.pattern}")
                owner[n] = e
    problems += [f"{n} is not in {MANIFEST}" for n in names if n not in owner]
    if problems:
        raise ManifestError("; ".join(problems))
    return owner


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(benchmarks: list[dict]) -> str:
    out = [
        "# Benchmark results",
        "",
        f"Generated from [`{MANIFEST}`]({MANIFEST}) by `bench/eval/results_index.py` (edit the manifest, then run it;",
        "a test fails when a file is unlisted or this index is stale). One row per benchmark: the script, the",
        "command behind its current results, the files it wrote. Accuracies carry their sample size; read small",
        "cells as such. Superseded runs are listed at the end until the docs that cite them move on; git keeps",
        "every run.",
    ]
    for kind, title in (("acceptance", "Acceptance benchmarks"), ("experiment", "Experiments")):
        out += ["", f"## {title}", "", "| benchmark | command | results | what it measures |", "|---|---|---|---|"]
        for b in benchmarks:
            if b["kind"] != kind:
                continue
            files = "; ".join(f"`{f['name']}`" + (f" ({f['note']})" if f.get("note") else "")
                              for f in b["files"] if f.get("status", "current") == "current")
            out.append(f"| `{b['script']}` | `{_cell(b['command'])}` | {_cell(files)} | {_cell(b['measures'])} |")
    old = [(b["script"], f) for b in benchmarks for f in b["files"] if f.get("status") == "superseded"]
    if old:
        out += ["", "## Superseded runs", "", "| file | benchmark | what it was |", "|---|---|---|"]
        out += [f"| `{f['name']}` | `{s}` | {_cell(f.get('note', ''))} |" for s, f in old]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a file is unlisted or INDEX.md is stale")
    args = ap.parse_args(argv)
    try:
        benchmarks = load()
        owners(benchmarks)
    except ManifestError as e:
        print(f"bench/results: {e}", file=sys.stderr)
        return 1
    text = render(benchmarks)
    index = RESULTS / INDEX
    if args.check:
        if not index.exists() or index.read_text() != text:
            print(f"bench/results/{INDEX} is stale: run .venv/bin/python -m bench.eval.results_index", file=sys.stderr)
            return 1
        return 0
    index.write_text(text)
    print(f"wrote {index} ({sum(len(b['files']) for b in benchmarks)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

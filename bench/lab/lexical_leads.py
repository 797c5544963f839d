"""A question's lexical leads on a kept session, timed: the rules of whatever ``emserve`` is importable.

Opens a kept recall session read-only (its event table and token log; no engine), rebuilds the
haystack's questions (``bench/eval/recall_tasks.py``: same source, length, seed), and runs the question
path's lexical rules on each, as ``server.session.question.lexical_leads`` does: the hits
(``lexical_hits``, ``question_lexical`` 2, ``question_neighbours`` 6) and the second hop (``bridge_hit``).
Where the installed code has word postings (``emserve.retrieval.postings``) it builds them first, grown in
20 steps as a session grows them, and the rules read them; older code makes its pass over the stream.
Per question: the hits, the hop, the seconds of each; p50 / p99 over the questions.

An A/B of two commits runs this script under each (``PYTHONPATH`` naming a tree of the other commit's
packages, as ``bench/eval/recall.py`` runs are pinned), alternating, then ``--compare`` checks that the
leads are the same question by question and gives the ratios of the medians, run by run:

    .venv/bin/python -m bench.lab.lexical_leads --session DIR/data-XXXX --source narrative --length 1m \\
        --out lexical_leads-new-1
    .venv/bin/python -m bench.lab.lexical_leads --compare old-1,new-1 old-2,new-2 --out lexical_leads-ab
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.eval.common import RESULTS, machine, table, write_results


def _git() -> str:
    import emserve.retrieval.lexical as lexical

    root = Path(lexical.__file__).resolve().parents[1]
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"(not a git tree: {root})"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bench.eval.recall_tasks import TASKS, build, source_filler
    from emserve.retrieval.bridge import bridge_hit
    from emserve.retrieval.events import EventTable
    from emserve.retrieval.kvlog import KVLog
    from emserve.retrieval.lexical import lexical_hits
    from emserve.server.provision.models import resolve_model
    from emserve.server.session.words import model_vocabulary

    spec = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(spec.path)
    hs = build(source_filler(tok, spec.name, args.source), args.source, args.length, 10, args.seed,
               [t for t in TASKS if t != "passkey"])
    log = KVLog.open(Path(args.session) / "log")
    tab = EventTable.open(Path(args.session) / "log")
    vocab = model_vocabulary(str(spec.path))
    n = len(tab)
    starts = np.asarray(tab.starts[:n], np.int64)
    ends = starts + np.asarray(tab.sizes[:n], np.int64)
    tokens = np.asarray(log.tokens(int(starts[0]), int(ends[-1])))
    stems = words = None
    build_s = 0.0
    postings_bytes = 0
    if "postings" in inspect.signature(lexical_hits).parameters:  # else older code: a pass over the stream
        from emserve.retrieval.postings import WordPostings

        t0 = time.perf_counter()
        stems, words = WordPostings(vocab.canonical), WordPostings(vocab.verbatim)
        for c in np.linspace(0, n, 21).astype(int)[1:]:
            for p in (stems, words):
                k = p.needs_from(starts[:c], ends[:c])
                if k < c:
                    p.extend(tokens[int(starts[k]) - int(starts[0]):], starts[:c], ends[:c])
        build_s = time.perf_counter() - t0
        postings_bytes = stems.nbytes + words.nbytes
    extra_hits = {"postings": stems} if stems is not None else {}
    extra_hop = {"postings": words} if words is not None else {}
    rows = []
    for q in hs.questions:
        t0 = time.perf_counter()
        hits = [int(h) for h in lexical_hits(q.prompt_ids, tokens, starts, ends, vocab, 2, spacing=6, **extra_hits)]
        t1 = time.perf_counter()
        hop = bridge_hit(q.prompt_ids, tokens, starts, ends, vocab, hits[0], 6, **extra_hop) if hits else None
        t2 = time.perf_counter()
        rows.append({"qid": q.qid, "hits": hits, "hop": hop, "hits_s": t1 - t0, "hop_s": t2 - t1})
    return {"git": args.git or _git(), "session": args.session, "haystack": hs.hid, "events": n,
            "postings": stems is not None, "postings_build_s": build_s, "postings_bytes": postings_bytes,
            "rows": rows, **summary(rows)}


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for key in ("hits_s", "hop_s"):
        ms = np.array([r[key] for r in rows]) * 1e3
        out[f"{key[:-2]}_ms_p50"] = float(np.percentile(ms, 50))
        out[f"{key[:-2]}_ms_p99"] = float(np.percentile(ms, 99))
    return out


def compare(pairs: list[str]) -> dict[str, Any]:
    """Per ``A,B`` pair of results names: the leads the same for every question, and B's medians over A's."""
    out = []
    for pair in pairs:
        a, b = (json.loads((RESULTS / f"lexical_leads-{x}.json").read_text()) for x in pair.split(","))
        same = sum((ra["hits"], ra["hop"]) == (rb["hits"], rb["hop"]) for ra, rb in zip(a["rows"], b["rows"],
                                                                                        strict=True))
        out.append({"a": pair.split(",")[0], "b": pair.split(",")[1], "git": [a["git"], b["git"]],
                    "same_leads": same, "questions": len(a["rows"]),
                    "hits_ratio_p50": b["hits_ms_p50"] / a["hits_ms_p50"],
                    "hop_ratio_p50": b["hop_ms_p50"] / a["hop_ms_p50"],
                    "a_ms_p50": [a["hits_ms_p50"], a["hop_ms_p50"]], "b_ms_p50": [b["hits_ms_p50"], b["hop_ms_p50"]],
                    "a_ms_p99": [a["hits_ms_p99"], a["hop_ms_p99"]],
                    "b_ms_p99": [b["hits_ms_p99"], b["hop_ms_p99"]]})
    return {"pairs": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--session", help="the kept session's data-* folder")
    ap.add_argument("--source", default="narrative")
    ap.add_argument("--length", default="1m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--git", default=None, help="the commit of the code run, where it is not a git tree")
    ap.add_argument("--compare", nargs="+", metavar="A,B", help="results names (lexical_leads-<name>.json) to compare")
    ap.add_argument("--out", required=True, help="results name: bench/results/lexical_leads-<out>.json")
    args = ap.parse_args(argv)
    if args.compare:
        res = compare(args.compare)
        print(table(["A", "B", "same leads", "hits ms p50 A / B", "hop ms p50 A / B", "hits p50 B/A", "hop p50 B/A"],
                    [[p["a"], p["b"], f"{p['same_leads']} of {p['questions']}",
                      f"{p['a_ms_p50'][0]:.1f} / {p['b_ms_p50'][0]:.1f}",
                      f"{p['a_ms_p50'][1]:.1f} / {p['b_ms_p50'][1]:.1f}",
                      f"{p['hits_ratio_p50']:.3f}", f"{p['hop_ratio_p50']:.3f}"] for p in res["pairs"]]))
    else:
        if not args.session:
            ap.error("--session is needed (or --compare)")
        from bench.eval.eval import _ints

        args.length = _ints(args.length)[0]
        res = run(args)
        print(table(["git", "events", "postings (build s, MB)", "hits ms p50 / p99", "hop ms p50 / p99"],
                    [[res["git"], res["events"],
                      f"{res['postings_build_s']:.2f}, {res['postings_bytes'] / 1e6:.1f}" if res["postings"] else "no",
                      f"{res['hits_ms_p50']:.1f} / {res['hits_ms_p99']:.1f}",
                      f"{res['hop_ms_p50']:.1f} / {res['hop_ms_p99']:.1f}"]]))
    res["machine"] = machine()
    res["command"] = " ".join(sys.argv)
    print(write_results(f"lexical_leads-{args.out}", res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

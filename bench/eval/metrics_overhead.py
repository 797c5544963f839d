"""What the metrics cost: ingest tok/s of one `emserve serve` process with its metrics port on vs off.

Each pair starts two fresh server processes one after the other (off then on, or on then off: the order
alternates pair by pair), each ingesting the same text into a new session through the gRPC client; the
ratio on/off is taken within the pair, so slow drifts of this shared machine cancel. With metrics on, a
scraper reads ``/metrics`` every ``--scrape-s`` seconds while the text streams (Prometheus' default is 15 s;
the default here, 1 s, is the harsh case), and vLLM's own statistics run, as the port turns them on.

    .venv/bin/python -m bench.eval.metrics_overhead [--pairs 3] [--tokens 8192] [--scrape-s 1]

Prints a table; writes ``bench/results/<out>.json``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.eval.common import machine, sigterm_exits, table, write_results


def run_one(metrics: bool, ids: list[int], scrape_s: float, work: Path, tag: str) -> dict[str, Any]:
    from emserve.client import Client
    from emserve.server.cli import ServerProcess

    extra = ["--metrics-port", "0"] if metrics else []
    log = work / f"{tag}.log"
    srv = ServerProcess(work / f"{tag}-sessions", log, extra)
    scrapes: list[float] = []
    stop = threading.Event()
    try:
        address = srv.wait_listening(timeout=600)
        with Client(address, timeout=600) as c:
            c.wait_ready(timeout=900)
            url = None
            if metrics:
                m = re.search(r"metrics on (http://\S+/metrics)", log.read_text())
                assert m, "the server did not announce its metrics port"
                url = m.group(1)

            def scrape() -> None:
                while not stop.wait(scrape_s):
                    t = time.perf_counter()
                    with urllib.request.urlopen(url, timeout=30) as r:  # type: ignore[arg-type]
                        r.read()
                    scrapes.append(time.perf_counter() - t)

            scraper = threading.Thread(target=scrape, daemon=True)
            if metrics:
                scraper.start()
            c.create_session("bench")
            res = c.ingest_tokens("bench", ids)
            stop.set()
            if metrics:
                scraper.join(30)
    finally:
        stop.set()
        srv.stop()
    return {"metrics": metrics, "tokens": res.committed_offset, "seconds": res.seconds,
            "tok_s": res.committed_offset / res.seconds, "scrapes": len(scrapes),
            "scrape_ms_p50": 1e3 * statistics.median(scrapes) if scrapes else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--scrape-s", type=float, default=1.0)
    ap.add_argument("--out", default="metrics_overhead")
    args = ap.parse_args()
    if args.pairs < 1 or args.tokens < 512:
        ap.error("--pairs >= 1 and --tokens >= 512")
    sigterm_exits()
    from transformers import AutoTokenizer

    from emserve.server.provision.corpus import load_text
    from emserve.server.provision.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    text = load_text("big")
    ids = tok(text[len(text) // 3: len(text) // 3 + args.tokens * 8])["input_ids"][: args.tokens]
    rows, pairs = [], []
    with tempfile.TemporaryDirectory(prefix="emserve-metrics-bench-") as tmp:
        for p in range(args.pairs):
            order = (False, True) if p % 2 == 0 else (True, False)
            got = {m: run_one(m, ids, args.scrape_s, Path(tmp), f"p{p}-{'on' if m else 'off'}") for m in order}
            ratio = got[True]["tok_s"] / got[False]["tok_s"]
            pairs.append({"pair": p, "order": ["on" if m else "off" for m in order], "off": got[False],
                          "on": got[True], "ratio_on_off": ratio})
            rows.append([p, "/".join("on" if m else "off" for m in order), f"{got[False]['tok_s']:.0f}",
                         f"{got[True]['tok_s']:.0f}", f"{ratio:.3f}", got[True]["scrapes"],
                         f"{got[True]['scrape_ms_p50']:.1f}" if got[True]["scrape_ms_p50"] else "-"])
            print(table(["pair", "order", "off tok/s", "on tok/s", "on/off", "scrapes", "scrape ms p50"], rows[-1:]),
                  flush=True)
    ratios = [p["ratio_on_off"] for p in pairs]
    summary = {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    print()
    print(table(["pair", "order", "off tok/s", "on tok/s", "on/off", "scrapes", "scrape ms p50"], rows))
    print(f"on/off ingest tok/s: median {summary['ratio_median']:.3f} (range {summary['ratio_min']:.3f}-"
          f"{summary['ratio_max']:.3f}, {len(ratios)} pairs of {len(ids)} tokens, scrape every {args.scrape_s} s)")
    out = write_results(args.out, {"machine": machine(), "command": " ".join(sys.argv), "tokens": len(ids),
                                   "scrape_s": args.scrape_s, "pairs": pairs, **summary})
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

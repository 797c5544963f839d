"""Soak harness: a real server under steady mixed traffic for a long time, sampled every minute.

One ``emserve serve`` (vLLM and the default model unless told otherwise) serves ``--writers`` client
threads for ``--minutes``. Each writer loops: create a session, stream its slice of the text in
``--piece-chars`` messages, ask a question every ``--ask-every`` messages (every other one remembered,
with a request id), and once the session holds ``--session-tokens`` delete it and start a new one, so
sessions are created, grown, asked and deleted all the time. A probe thread asks a fixed, finished
session one question per ``--sample-s`` and samples, at the same moment:

* resident memory of the server and its engine processes (all, and anonymous: rss - shared);
* open file descriptors and threads of those processes, and how many processes there are;
* the health check's latency, the probe question's time to first token;
* the sessions folder's bytes on disk and the number of sessions.

Reported: the samples as a table; the drift of each from the first sample after ``--warmup-min`` to the
last (memory per hour, descriptors, threads); the probe TTFT p50/p99 in the first and last third; every
call error. The harness exits 1 on any error; drift is reported, not judged (a leak shows as a slope).

    .venv/bin/python -m bench.eval.soak                         # 30 minutes: results/soak.json
    .venv/bin/python -m bench.eval.soak --minutes 2 --sample-s 15 --no-write    # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

import numpy as np

from bench.eval.common import machine, table, write_results
from bench.eval.eval import git_rev
from bench.eval.eval_server import Server, add_server_args, harness_inputs, log

QUESTIONS = ("Who speaks first in the passage above?", "Name one person mentioned above.",
             "What place is described in the text?")


def processes(server: Server) -> list[Any]:
    """The server process and its descendants (the engine core and its workers)."""
    import psutil

    p = psutil.Process(server.proc.proc.pid)
    return [p, *p.children(recursive=True)]


def sample_processes(server: Server) -> dict[str, int]:
    import psutil

    out = {"rss_bytes": 0, "rss_anon_bytes": 0, "fds": 0, "threads": 0, "processes": 0}
    for q in processes(server):
        try:
            m = q.memory_info()
            out["rss_bytes"] += m.rss
            out["rss_anon_bytes"] += m.rss - getattr(m, "shared", 0)
            out["fds"] += q.num_fds()
            out["threads"] += q.num_threads()
            out["processes"] += 1
        except psutil.Error:  # exited meanwhile
            continue
    return out


class Writer(threading.Thread):
    """Creates, grows, asks and deletes sessions in a loop until ``stop`` is set; one client of its own."""

    def __init__(self, address: str, index: int, text: str, args: argparse.Namespace, stop: threading.Event) -> None:
        super().__init__(daemon=True, name=f"writer-{index}")
        from emserve.client import Client

        self.client = Client(address, timeout=600)
        self.index, self.text, self.args, self.stop = index, text, args, stop
        self.counts = {"sessions": 0, "messages": 0, "questions": 0, "remembered": 0, "deleted": 0, "tokens": 0}
        self.errors: list[str] = []

    def run(self) -> None:
        pos = 0
        while not self.stop.is_set():
            sid = f"w{self.index}-{self.counts['sessions']}"
            try:
                self.client.create_session(sid)
                self.counts["sessions"] += 1
                held = 0
                while held < self.args.session_tokens and not self.stop.is_set():
                    piece = self.text[pos:pos + self.args.piece_chars]
                    pos = (pos + self.args.piece_chars) % max(1, len(self.text) - self.args.piece_chars)
                    held = self.client.ingest_text(sid, piece).committed_offset
                    self.counts["messages"] += 1
                    if self.counts["messages"] % self.args.ask_every == 0:
                        remember = self.counts["questions"] % 2 == 1
                        q = QUESTIONS[self.counts["questions"] % len(QUESTIONS)]
                        rid = f"{sid}-{self.counts['questions']}" if remember else ""
                        self.client.ask(sid, q, max_tokens=self.args.max_tokens, chat_template=self.args.chat_template,
                                        remember=remember, request_id=rid)
                        self.counts["questions"] += 1
                        self.counts["remembered"] += remember
                self.counts["tokens"] += held
                self.client.delete_session(sid)
                self.counts["deleted"] += 1
            except Exception as e:  # noqa: BLE001 - every error is reported, none is expected
                self.errors.append(f"{sid}: {type(e).__name__}: {e}")
                if len(self.errors) > 20:
                    return
        self.client.close()


def probe(server: Server, sid: str, t0: float, args: argparse.Namespace) -> dict[str, float]:
    from emserve.client import Client
    from emserve.server.quota import folder_bytes

    row: dict[str, float] = {"minute": (time.perf_counter() - t0) / 60}
    row.update(sample_processes(server))
    with Client(server.client.address, timeout=60) as c:
        t = time.perf_counter()
        c.health()
        row["health_s"] = time.perf_counter() - t
        t = time.perf_counter()
        first = None
        stream = c.generate(sid, QUESTIONS[0], max_tokens=args.max_tokens, chat_template=args.chat_template,
                            timeout=600)
        for resp in stream:
            if first is None and resp.HasField("chunk"):
                first = time.perf_counter() - t
        row["ttft_s"] = first if first is not None else time.perf_counter() - t
        row["sessions"] = sum(1 for _ in c.list_sessions())
    row["disk_bytes"] = folder_bytes(server.workdir / "sessions")  # what the server's disk quota counts
    return row


def drift(samples: list[dict[str, float]], warmup_min: float) -> dict[str, float]:
    """Change of each sampled quantity from the first sample after the warm-up to the last, and the
    least-squares slope of memory per hour over the same span."""
    after = [s for s in samples if s["minute"] >= warmup_min] or samples
    first, last = after[0], after[-1]
    hours = max(1e-9, (last["minute"] - first["minute"]) / 60)
    out = {k: float(last[k] - first[k]) for k in ("rss_bytes", "rss_anon_bytes", "fds", "threads", "processes")}
    out["span_min"] = last["minute"] - first["minute"]
    for k in ("rss_bytes", "rss_anon_bytes"):
        if len(after) >= 3:
            x = np.array([s["minute"] / 60 for s in after])
            y = np.array([s[k] for s in after], dtype=float)
            out[f"{k}_per_hour"] = float(np.polyfit(x, y, 1)[0])
        else:
            out[f"{k}_per_hour"] = out[k] / hours
    return out


def thirds(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    n = max(1, len(samples) // 3)
    out = {}
    for name, part in (("first", samples[:n]), ("last", samples[-n:])):
        a = np.array([s["ttft_s"] for s in part])
        out[name] = {"n": len(part), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}
    return out


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, run the soak, print the report; returns the results (also written unless ``--no-write``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--sample-s", type=float, default=60.0, help="seconds between samples")
    ap.add_argument("--warmup-min", type=float, default=3.0, help="drift is measured from this minute on")
    ap.add_argument("--writers", type=int, default=3, help="client threads creating, growing, asking, deleting")
    ap.add_argument("--session-tokens", type=int, default=12000, help="a writer's session is deleted past this")
    ap.add_argument("--piece-chars", type=int, default=2048)
    ap.add_argument("--ask-every", type=int, default=4, help="a question every this many messages of a writer")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                    help="ask raw prompts (a model without a chat template)")
    add_server_args(ap, "soak")
    args = ap.parse_args(argv)

    spec, text, workdir = harness_inputs(args, "emserve-soak-")
    server = Server(str(spec.path), workdir, extra=args.server_arg)
    errors: list[str] = []
    samples: list[dict[str, float]] = []
    writers: list[Writer] = []
    try:
        server.client.create_session("probe")
        server.client.ingest_text("probe", text[:16000], finish=True)
        span = max(1, (len(text) - 16000) // max(1, args.writers))
        stop = threading.Event()
        writers = [Writer(server.client.address, i, text[16000 + i * span:16000 + (i + 1) * span], args, stop)
                   for i in range(args.writers)]
        t0 = time.perf_counter()
        for w in writers:
            w.start()
        log(f"{args.writers} writers started; sampling every {args.sample_s:.0f} s for {args.minutes:g} min")
        while time.perf_counter() - t0 < args.minutes * 60:
            tick = time.perf_counter()
            try:
                samples.append(probe(server, "probe", t0, args))
                s = samples[-1]
                log(f"  min {s['minute']:5.1f}: rss {s['rss_bytes'] / 2**30:.2f} GiB (anon "
                    f"{s['rss_anon_bytes'] / 2**30:.2f}), fds {s['fds']:.0f}, threads {s['threads']:.0f}, "
                    f"health {s['health_s'] * 1000:.0f} ms, TTFT {s['ttft_s']:.2f} s, sessions {s['sessions']:.0f}")
            except Exception as e:  # noqa: BLE001
                errors.append(f"probe: {type(e).__name__}: {e}")
            if any(not w.is_alive() for w in writers):
                errors.append("a writer stopped early")
                break
            time.sleep(max(0.0, args.sample_s - (time.perf_counter() - tick)))
        stop.set()
        for w in writers:
            w.join(timeout=600)
            errors += w.errors
        wall = time.perf_counter() - t0
    finally:
        server.stop()

    if not samples:
        print("no samples; errors:", *errors, sep="\n  ")
        return {"samples": [], "errors": errors or ["no samples"]}
    d = drift(samples, args.warmup_min)
    ttft = thirds(samples)
    counts = {k: sum(w.counts[k] for w in writers) for k in writers[0].counts} if writers else {}
    print(table(["minute", "RSS GiB", "anon GiB", "fds", "threads", "procs", "health ms", "TTFT s", "sessions",
                 "disk MiB"],
                [[s["minute"], s["rss_bytes"] / 2**30, s["rss_anon_bytes"] / 2**30, int(s["fds"]), int(s["threads"]),
                  int(s["processes"]), s["health_s"] * 1000, s["ttft_s"], int(s["sessions"]), s["disk_bytes"] / 2**20]
                 for s in samples]))
    print(f"\nfrom minute {args.warmup_min:g} to the end ({d['span_min']:.1f} min): "
          f"RSS {d['rss_bytes'] / 2**20:+.0f} MiB "
          f"({d['rss_bytes_per_hour'] / 2**20:+.0f} MiB/h fitted), anonymous {d['rss_anon_bytes'] / 2**20:+.0f} MiB "
          f"({d['rss_anon_bytes_per_hour'] / 2**20:+.0f} MiB/h), fds {d['fds']:+.0f}, threads {d['threads']:+.0f}, "
          f"processes {d['processes']:+.0f}")
    print(f"probe TTFT p50/p99: first third {ttft['first']['p50']:.2f}/{ttft['first']['p99']:.2f} s, last third "
          f"{ttft['last']['p50']:.2f}/{ttft['last']['p99']:.2f} s; traffic: {counts}; errors: {len(errors)}")
    for e in errors:
        print("  error:", e)
    command = "python -m bench.eval.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"name": args.out, "command": command, "git": git_rev(), "machine": machine(), "model": spec.name,
              "config": vars(args), "wall_s": wall, "samples": samples, "drift": d, "probe_ttft": ttft,
              "traffic": counts, "errors": errors}
    if not args.no_write:
        print("wrote", write_results(args.out, result))
    return result


def main(argv: list[str] | None = None) -> int:
    return 1 if run(argv)["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

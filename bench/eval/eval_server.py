"""The memory systems of the evaluation, run through a real ``emserve serve`` process as a client would.

Systems (one server, one engine; each system is a per-session ``MemoryConfig`` override):

* ``emserve``: the server's default memory (surprise events, refinement, similarity + contiguity);
* ``truncation``: sink + local window only, same window size: ``n_mem = 0`` and the local window
  grown by the default ``n_mem`` (StreamingLLM-style; the few tokens between the last closed event
  and the local window stay in the window too); its questions keep the sink;
* ``infllm``: InfLLM-style: uniform 128-token blocks (``splitter uniform``, ``max_block_size 128``),
  no refinement, similarity retrieval only (no contiguity buffer, no question neighbours, no lexical
  matches), the sink in questions too, the same ``n_mem`` budget;
* ``no-refine``, ``no-contiguity``: emserve ablations (``similarity_metric none``;
  ``use_contiguity_buffer false`` and ``question_neighbours 0``);
* ``mean-rank``: emserve with the question ranking before ``question_rank`` (a question's last 4 query
  tokens, events ranked by their mean score).

The full-attention baseline (vanilla vLLM, ``vanilla``) runs in ``eval_vanilla.py`` after the server
has stopped, so that two engines never compete for the CPU.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.eval.eval_tasks import Haystack, Question

if TYPE_CHECKING:
    from emserve.client import IngestProgress

SERVER_SYSTEMS = ("emserve", "truncation", "infllm", "no-refine", "no-contiguity", "mean-rank")
ABLATIONS = ("no-refine", "no-contiguity", "mean-rank")
ALL_SYSTEMS = (*SERVER_SYSTEMS, "vanilla")


def overrides(system: str, default: Mapping[str, Any]) -> dict[str, Any]:
    """The session memory overrides of ``system`` given the server's default memory."""
    if system == "emserve":
        return {}
    if system == "truncation":
        # a question sees the whole local window (2**30: at least remainder + local; a stronger baseline
        # than emserve's short question window, and the same tokens as an ingestion step)
        # the sink stays in a question's window (StreamingLLM's attention sinks)
        return {"n_mem": 0, "n_local": int(default["n_local"]) + int(default["n_mem"]), "question_n_local": 2**30,
                "question_n_init": int(default["n_init"])}
    if system == "infllm":
        return {"splitter": "uniform", "max_block_size": 128, "similarity_metric": "none",
                "use_contiguity_buffer": False, "question_neighbours": 0, "question_reach": 0,
                "question_lexical": 0,
                "question_n_init": int(default["n_init"])}
    if system == "no-refine":
        return {"similarity_metric": "none"}
    if system == "no-contiguity":
        return {"use_contiguity_buffer": False, "question_neighbours": 0, "question_reach": 0}
    if system == "mean-rank":
        return {"question_rank": "mean", "question_query_tokens": 4}
    raise ValueError(f"unknown system {system!r}; known: {', '.join(ALL_SYSTEMS)}")


def add_server_args(ap: Any, out: str) -> None:
    """The flags every harness driving one ``emserve serve`` shares: ``--model``, ``--server-arg``,
    ``--workdir``, ``--out`` (default ``out``), ``--no-write``."""
    ap.add_argument("--model", default=None, help="smollm2-135m (default) or an HF folder")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `emserve serve` flag (repeat)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=out)
    ap.add_argument("--no-write", action="store_true")


def harness_inputs(args: Any, prefix: str) -> tuple[Any, str, Path]:
    """For :func:`add_server_args`' flags: the resolved model, the long public-domain text, and the work
    folder (``--workdir``, created; else a fresh temporary one named ``prefix...``)."""
    import tempfile

    from emserve.server.provision.corpus import text_path
    from emserve.server.provision.models import resolve_model

    spec = resolve_model(args.model, progress=log)
    text = Path(text_path("big")).read_text()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=prefix))
    workdir.mkdir(parents=True, exist_ok=True)
    return spec, text, workdir


def text_ids(spec: Any, text: str, n: int) -> list[int]:
    """The first ``n`` token ids of ``text`` as ``spec``'s tokenizer encodes it with its own defaults."""
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(str(spec.path))(text[: n * 8])["input_ids"][:n])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Server:
    """``emserve serve`` on a free port (``emserve.server.cli.ServerProcess``) and a client to it.

    ``restart()`` replaces the process by a fresh one on the same sessions folder: the harness does so
    when the deleted sessions' files the old one may still hold (the engine keeps up to 64 KV logs
    mapped) add up to ``restart_bytes``.
    """

    def __init__(self, model_path: str, workdir: Path, extra: Sequence[str] = (), restart_bytes: float = 16 * 2**30,
                 memory_limit: int | None = None) -> None:
        self.args = ["--model", model_path, "--backend", "vllm", *extra]
        self.memory_limit = memory_limit
        self.workdir = workdir
        self.restart_bytes = restart_bytes
        self.starts = 0
        self.start_s = 0.0
        self.released = 0  # bytes of sessions deleted since the process started
        self._start()

    def _start(self) -> None:
        from emserve.client import Client
        from emserve.server.cli import ServerProcess

        t0 = time.perf_counter()
        self.starts += 1
        n = self.starts
        while (self.workdir / f"server-{n}.log").exists():  # a resumed run's folder keeps its old logs
            n += 1
        logf = self.workdir / f"server-{n}.log"
        wrapper: list[str] = []
        if self.memory_limit:  # the server (and its engine) in a memory cgroup of its own: bench/eval/cgroup.py
            wrapper = [sys.executable, "-m", "bench.eval.cgroup", "--memory", str(self.memory_limit),
                       "--record", str(self.workdir / f"cgroup-{n}.json"), "--"]
        self.proc = ServerProcess(self.workdir / "sessions", logf, self.args, wrapper)
        try:
            address = self.proc.wait_listening(timeout=300)
            self.client = Client(address, timeout=600)
            self.info = self.proc.wait_ready(self.client, timeout=900)
        except BaseException:
            self.proc.stop()
            raise
        self.start_s = time.perf_counter() - t0
        self.released = 0
        log(f"server {address} ready in {self.start_s:.0f} s (log {logf})")

    def restart(self) -> None:
        log(f"restarting the server ({self.released / 2**30:.1f} GiB of deleted sessions may still be mapped)")
        self.stop()
        self._start()

    def maybe_restart(self) -> bool:
        if self.released >= self.restart_bytes:
            self.restart()
            return True
        return False

    def rss(self) -> dict[str, int]:
        """Resident memory (bytes) of the server process and of its children (the vLLM engine core),
        in all and without file-backed pages (``anon``: rss - shared)."""
        import psutil

        out = {"rss_bytes": 0, "rss_anon_bytes": 0, "rss_server_bytes": 0, "rss_engine_bytes": 0}
        try:
            p = psutil.Process(self.proc.proc.pid)
            for i, q in enumerate([p, *p.children(recursive=True)]):
                m = q.memory_info()
                out["rss_bytes"] += m.rss
                out["rss_anon_bytes"] += m.rss - getattr(m, "shared", 0)
                out["rss_server_bytes" if i == 0 else "rss_engine_bytes"] += m.rss
        except psutil.Error:
            pass
        return out

    def default_memory(self) -> dict[str, Any]:
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(self.info.default_memory, preserving_proto_field_name=True)

    def delete(self, sid: str, disk_bytes: int = 0) -> None:
        try:
            self.client.delete_session(sid)
            self.released += disk_bytes
        except Exception as e:  # noqa: BLE001 - report and go on
            log(f"could not delete {sid}: {e}")

    def stop(self) -> int:
        self.client.close()
        return self.proc.stop()


def window_coverage(span: tuple[int, int], window: Sequence[tuple[int, int]]) -> float:
    """Share of ``span``'s tokens inside the ``[start, end)`` ranges of ``window`` (the answer step's
    window: ``RetrievalTrace.window``, ``AskResult.window``)."""
    a, b = span
    inside = sum(max(0, min(int(e), b) - max(int(s), a)) for s, e in window)
    return inside / (b - a) if b > a else 1.0


def ask(client: Any, sid: str, q: Question, max_tokens: int) -> dict[str, Any]:
    """Ask ``q``; coverage: the least share of a needed span in the window the server reports
    (``RetrievalTrace.window``, sent with every trace)."""
    ans = client.ask(sid, q.prompt_ids, max_tokens=max_tokens, trace=True, preview_tokens=4)
    done = ans.complete
    t, u = done.timings, done.usage
    window = [(r.start, r.end) for r in ans.trace.window] if ans.trace is not None else []
    cov = min(window_coverage(s, window) for s in q.spans)
    return {
        "qid": q.qid, "depth": q.depth, "expected": q.expected, "answer": ans.text,
        "correct": q.expected in ans.text, "coverage": cov, "in_window": cov >= 1.0,
        "ttft_s": t.first_token_s, "total_s": t.total_s, "retrieval_s": t.retrieval_s,
        "search_s": t.retrieval_s - t.probe_s, "decode_tok_s": t.tokens_per_s, "completion_tokens": u.completion_tokens,
        "window_tokens": u.window_tokens, "retrieved_tokens": u.retrieved_tokens,
        "retrieved_events": len(ans.trace.events) if ans.trace is not None else 0,
    }


@dataclass
class Job:
    system: str
    haystack: Haystack


def run_job(server: Server, job: Job, memory: dict[str, Any], max_tokens: int, tag: str, keep: bool = False,
            resume: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ingest one haystack into a new session of ``job.system``, ask its questions, delete the session
    (``keep``: leave it in the server's store, for later inspection). ``resume``: a session of this job
    that the server still holds (a stopped run's) goes on from its committed tokens instead of starting
    again; its row says from where (``resumed_from``) and its ingest rate counts the tokens ingested now."""
    c = server.client
    hs = job.haystack
    sid = f"{job.system}-{hs.hid}"
    start = 0
    if resume:
        with contextlib.suppress(Exception):  # absent: the job had not started
            start = int(c.get_session(sid).num_tokens)
    if start:
        log(f"{tag} {sid}: resumed at {start} of {hs.length} tokens")
    else:
        with contextlib.suppress(Exception):  # absent: the usual case
            c.delete_session(sid)
        c.create_session(sid, memory=memory)
    disk = 0
    try:
        t0 = time.perf_counter()
        committed = start
        if start < hs.length:
            committed = c.ingest_tokens(sid, hs.ids[start:], piece_tokens=2048,
                                        on_progress=IngestLog(f"{tag} {sid}", start, hs.length)).committed_offset
        ingest_s = time.perf_counter() - t0
        if committed != hs.length:
            raise RuntimeError(f"{sid}: committed {committed} of {hs.length} tokens")
        info = c.get_session(sid)
        disk = int(info.disk_bytes)
        row = {"system": job.system, "hid": hs.hid, "task": hs.task, "length": hs.length, "ingest_s": ingest_s,
               "ingest_tok_s": (hs.length - start) / ingest_s if ingest_s > 0 else 0.0, "events": int(info.num_events),
               "disk_bytes": disk, **server.rss(), **({"resumed_from": start} if start else {})}
        answers = []
        for q in hs.questions:
            a = ask(c, sid, q, max_tokens)
            answers.append({"system": job.system, "task": q.task or hs.task, "length": hs.length, "hid": hs.hid,
                            "context_tokens": hs.length, **a})
        ok = sum(a["correct"] for a in answers)
        log(f"{tag} {job.system:>13} {hs.hid}: {hs.length / ingest_s:4.0f} tok/s, {ok}/{len(answers)} correct "
            + " ".join(repr(a["answer"][:24]) for a in answers))
        return row, answers
    finally:
        if not keep:
            server.delete(sid, disk)


class IngestLog:
    """A long ingest's progress, logged at most every ``every_s`` seconds: tokens committed, rate since the
    start, events, time left at that rate (a 1M-token session takes hours here)."""

    def __init__(self, label: str, start: int, length: int, every_s: float = 300.0) -> None:
        self.label, self.start, self.length, self.every_s = label, start, length, every_s
        self.t0 = self.last = time.perf_counter()

    def __call__(self, p: IngestProgress) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = (p.committed_offset - self.start) / (now - self.t0)
        left = f", about {(self.length - p.committed_offset) / rate / 60:.0f} min left" if rate > 0 else ""
        log(f"{self.label}: {p.committed_offset} of {self.length} tokens, {rate:.0f} tok/s, "
            f"{p.num_events} events{left}")


def run_jobs(server: Server, jobs: Sequence[Job], max_tokens: int, concurrency: int,
             on_done: Callable[[dict[str, Any], list[dict[str, Any]]], None], keep: bool = False,
             resume: bool = False) -> None:
    """Run ``jobs``, ``concurrency`` sessions at a time (the engine batches their steps), in waves;
    between waves the server is restarted when the deleted sessions' bytes reach its limit. ``keep``:
    the sessions stay in the server's store; ``resume``: a job's session left by a stopped run goes on
    where it stopped (:func:`run_job`)."""
    default = server.default_memory()
    t0 = time.perf_counter()
    total_tokens = sum(j.haystack.length for j in jobs)
    tokens = 0
    width = max(1, concurrency)
    with ThreadPoolExecutor(max_workers=width) as pool:
        for w in range(0, len(jobs), width):
            server.maybe_restart()
            wave = list(enumerate(jobs))[w : w + width]
            futures = [pool.submit(run_job, server, j, overrides(j.system, default), max_tokens,
                                   f"[{i + 1}/{len(jobs)}]", keep, resume) for i, j in wave]
            for f, (i, j) in zip(futures, wave, strict=True):
                row, answers = f.result()
                on_done(row, answers)
                tokens += j.haystack.length
                if (i + 1) % 5 == 0 or i + 1 == len(jobs):
                    dt = time.perf_counter() - t0
                    eta = dt / tokens * (total_tokens - tokens)
                    log(f"  {i + 1}/{len(jobs)} haystacks, {tokens} of {total_tokens} tokens in {dt:.0f} s "
                        f"({tokens / dt:.0f} tok/s), about {eta / 60:.0f} min left")


# ------------------------------------------------------------------------------------------ streams
def run_stream(server: Server, system: str, hs: Haystack, checkpoints: Sequence[int], max_tokens: int,
               piece_tokens: int = 4096,
               on_point: Callable[[dict[str, Any]], None] | None = None, keep: bool = False,
               resume: Mapping[str, Any] | None = None, timing: Sequence[Question] = ()) -> dict[str, Any]:
    """One long session: ingest ``hs`` up to each checkpoint, then measure there (ingest tok/s over the
    last segment, time to first token of a question, decode tok/s, retrieval time, RSS, disk bytes
    per token); at the end ask every question of ``hs`` in turn. ``on_point`` gets the stream's
    partial result after every checkpoint (``"partial": True``), so a long run that is stopped keeps
    what it measured. ``keep``: leave the session in the server's store (for later inspection).
    ``resume``: such a partial result of a stopped run whose session the server still holds: ingestion
    goes on from the session's committed offset, keeping the measured points; the tokens between the
    last saved checkpoint and that offset were ingested unmeasured (``unmeasured`` in the result), and
    the next point's segment starts at the offset. ``timing``: questions also asked at every checkpoint
    (``timing`` in the point; e.g. of one fixed length, ``eval_tasks.sized_question``), for timings that
    do not rest on one question."""
    c = server.client
    sid = f"stream-{system}-{hs.hid}"
    series: list[tuple[float, int]] = [(0.0, 0)]  # (ingest seconds, committed tokens), every >= 2048 tokens
    points: list[dict[str, Any]] = []
    t_ingest = 0.0
    prev = 0
    unmeasured: list[int] | None = None
    if resume is None:
        with contextlib.suppress(Exception):  # absent: the usual case
            c.delete_session(sid)
        c.create_session(sid, memory=overrides(system, server.default_memory()))
    else:
        s = c.get_session(sid)  # metadata only: the first ingest call opens the memory, in the first segment
        points = [dict(p) for p in resume["points"]]
        series = [(float(a), int(b)) for a, b in resume["series"]]
        t_ingest = float(resume["ingest_s"])
        prev = int(s.num_tokens)
        unmeasured = [int(points[-1]["tokens"]) if points else 0, prev]
        log(f"{system} stream resumed at {prev} tokens; tokens {unmeasured} were ingested unmeasured")
    skipped = unmeasured[1] - unmeasured[0] if unmeasured else 0

    def result(answers: list[dict[str, Any]], upto: int, partial: bool) -> dict[str, Any]:
        return {"system": system, "hid": hs.hid, "length": hs.length, "partial": partial, "ingest_s": t_ingest,
                "ingest_tok_s": (upto - skipped) / t_ingest, "points": points, "series": series,
                "answers": answers, "haystack": hs.summary(), "unmeasured": unmeasured}

    probe = hs.questions[0]
    try:
        for cp in sorted({min(x, hs.length) for x in checkpoints} | {hs.length}):
            if cp <= prev:
                continue
            t0 = time.perf_counter()
            last = [prev]

            def progress(p: Any, t0: float = t0, base: float = t_ingest, last: list[int] = last) -> None:
                if p.committed_offset - last[0] >= 2048:
                    last[0] = p.committed_offset
                    series.append((base + time.perf_counter() - t0, int(p.committed_offset)))
                    if p.committed_offset // 65536 != (p.committed_offset - 2048) // 65536:
                        log(f"  {system} stream: {p.committed_offset} tokens")

            res = c.ingest_tokens(sid, hs.ids[prev:cp], piece_tokens=piece_tokens, on_progress=progress)
            dt = time.perf_counter() - t0
            t_ingest += dt
            info = c.get_session(sid)
            a = ask(c, sid, probe, max_tokens)
            pt = {"tokens": int(res.committed_offset), "segment": [prev, cp], "segment_tok_s": (cp - prev) / dt,
                  "ingest_s_total": t_ingest, "disk_bytes": int(info.disk_bytes),
                  "disk_bytes_per_token": info.disk_bytes / max(1, info.num_tokens), "events": int(info.num_events),
                  **server.rss(), "probe": a}
            pt["timing"] = [ask(c, sid, q, max_tokens) for q in timing]
            points.append(pt)
            ttfts = sorted(t["ttft_s"] for t in pt["timing"])
            log(f"{system} stream at {cp}: {pt['segment_tok_s']:.0f} tok/s over [{prev}, {cp}), "
                f"TTFT {a['ttft_s']:.2f} s" + (f" (timing questions {', '.join(f'{x:.2f}' for x in ttfts)})"
                                              if ttfts else "")
                + f", RSS {pt['rss_bytes'] / 2**30:.2f} GiB, {pt['disk_bytes_per_token'] / 1024:.1f} KiB/token")
            prev = cp
            if on_point is not None:
                on_point(result([], cp, partial=True))
        answers = []
        for q in hs.questions:
            a = ask(c, sid, q, max_tokens)
            answers.append({"system": system, "task": hs.task, "length": hs.length, "hid": hs.hid,
                            "context_tokens": hs.length, **a})
            log(f"{system} {q.qid}: {a['answer']!r} ({'OK' if a['correct'] else 'wrong'}, expected {q.expected})")
        return result(answers, hs.length, partial=False)
    finally:
        if not keep:
            server.delete(sid, int(points[-1]["disk_bytes"]) if points else 0)

"""Crash harness: a scripted workload against ``emserve serve``, SIGKILLed at random points, resumed.

A seeded script of operations on two sessions (ingest a piece of token ids; a remembering Generate
with a ``request_id``; a scratch session created, ingested and deleted) runs twice on fresh session
folders: once without interruption (the reference), once while the server process is SIGKILLed at
random moments (``--kills`` times) and restarted on the same port. The client side resumes each
operation the way the API documents: an ingest from the committed offset the session reports (the
piece's data re-sent with ``offset``), a Generate by retrying its ``request_id``, a delete by retrying
until the session is gone. Checked after every kill and at the end:

* **no acknowledged token lost**: every session holds at least every committed offset an ack reported;
* **no orphan process**: every process the killed server had started is gone within 30 s;
* **no leftover**: no ``.deleted-*`` folder and no scratch session once the server is back;
* **bit-identical**: each session's tokens (read from its KV log), events, per-token surprise and every
  answer equal the uninterrupted run's.

    .venv/bin/python -m bench.eval.crash --kills 30 --backend vllm      # full run, results/crash-vllm.json
    .venv/bin/python -m bench.eval.crash --kills 10 --backend reference # the CI quick mode (tests/integration)

The model is the tiny random Llama the tests build (``tests/tinymodel.py``) unless ``--model`` names
another; it keeps a server start to seconds (reference) or ~1 minute (vLLM).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench.eval.common import ROOT, machine, table, write_results
from bench.eval.eval import git_rev
from emserve.client import Client, pb
from emserve.retrieval.kvlog import KVLog
from emserve.server.cli import ServerProcess

SESSIONS = ("s0", "s1")
MEMORY = dict(n_init=16, n_local=64, n_mem=64, exc_block_size=32, min_block_size=4, max_block_size=24,
              surprisal_threshold_gamma=1.0)  # events form within a few hundred tokens of the tiny model
GONE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}


class ServerGone(Exception):
    """The server died under a call (killed): restart it and resume the operation."""


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str  # "create" | "ingest" | "ask" | "scratch"
    sid: str
    ids: tuple[int, ...] = ()
    rid: str = ""


def script(seed: int, n_ops: int, vocab: int) -> list[Op]:
    """Both sessions created, then ``n_ops`` operations: ingest 2/3, remembering questions 1/4, scratch the rest."""
    rng = random.Random(seed)
    ops = [Op("create", sid) for sid in SESSIONS]
    for k in range(n_ops):
        sid = rng.choice(SESSIONS)
        r = rng.random()
        if r < 0.65:
            ops.append(Op("ingest", sid, tuple(rng.randrange(3, vocab) for _ in range(rng.randint(20, 300)))))
        elif r < 0.9:  # prompts up to 60 tokens: an exchange spans more than one 32-token step
            ops.append(Op("ask", sid, tuple(rng.randrange(3, vocab) for _ in range(rng.randint(4, 60))), f"q{k}"))
        else:
            ops.append(Op("scratch", f"x{k}", tuple(rng.randrange(3, vocab) for _ in range(rng.randint(40, 120)))))
    return ops


class Runner:
    """Runs operations against a server; each is resumable after the server died under it."""

    def __init__(self) -> None:
        self.client: Client | None = None  # the current server's (a new one after each restart)
        self.acked: Counter[str] = Counter()  # session -> highest committed offset an ack reported
        self.answers: dict[str, list[int]] = {}
        self.starts: dict[int, int] = {}  # op index -> session offset where its piece starts
        self.deleting: set[str] = set()  # sessions a delete was sent for (their acks no longer count)

    @property
    def stub(self) -> Any:
        assert self.client is not None
        return self.client.stub

    def _rpc(self, fn: Any, *args: Any, ok: tuple[grpc.StatusCode, ...] = (), **kw: Any) -> Any:
        try:
            return fn(*args, timeout=60, **kw)
        except grpc.RpcError as e:
            if e.code() in GONE:
                raise ServerGone(str(e.code())) from None
            if e.code() in ok:
                return None
            raise

    def num_tokens(self, sid: str) -> int:
        """The session's committed tokens (0 when it does not exist: a kill before its create took)."""
        got = self._rpc(self.stub.GetSession, pb.GetSessionRequest(session_id=sid), ok=(grpc.StatusCode.NOT_FOUND,))
        return 0 if got is None else int(got.num_tokens)

    def ingest(self, key: int, sid: str, ids: tuple[int, ...]) -> None:
        """Append ``ids`` (op ``key``) to ``sid``: from the committed offset, re-sending what is missing."""
        if key not in self.starts:
            self.starts[key] = self.num_tokens(sid)
        start = self.starts[key]
        have = self.num_tokens(sid)
        if have < start:
            raise AssertionError(f"{sid}: {have} tokens, fewer than the {start} before this piece")
        if have >= start + len(ids):
            return
        rest = ids[have - start:]
        msgs = [pb.IngestRequest(offset=have + i, tokens=pb.TokenIds(ids=rest[i:i + 50]))
                for i in range(0, len(rest), 50)]
        try:
            for resp in self.stub.Ingest(iter(msgs), timeout=120, metadata=[("x-session-id", sid)]):
                if resp.HasField("ack"):
                    self.acked[sid] = max(self.acked[sid], resp.ack.committed_offset)
        except grpc.RpcError as e:
            if e.code() in GONE:
                raise ServerGone(str(e.code())) from None
            raise

    def ask(self, sid: str, ids: tuple[int, ...], rid: str) -> None:
        req = pb.GenerateRequest(session_id=sid, prompt_tokens=pb.TokenIds(ids=ids), remember=True, request_id=rid,
                                 sampling=pb.SamplingParams(max_tokens=8, temperature=0.0))
        out: list[int] = []
        try:
            for resp in self.stub.Generate(req, timeout=120, metadata=[("x-session-id", sid)]):
                if resp.HasField("complete"):
                    out = list(resp.complete.token_ids)
                    self.acked[sid] = max(self.acked[sid], resp.complete.committed_offset)
        except grpc.RpcError as e:
            if e.code() in GONE:
                raise ServerGone(str(e.code())) from None
            raise
        self.answers[rid] = out

    def run(self, i: int, op: Op) -> None:
        if op.kind == "create":
            self._rpc(self.stub.CreateSession, pb.CreateSessionRequest(session_id=op.sid),
                      ok=(grpc.StatusCode.ALREADY_EXISTS,))
        elif op.kind == "ingest":
            self.ingest(i, op.sid, op.ids)
        elif op.kind == "ask":
            self.ask(op.sid, op.ids, op.rid)
        else:  # scratch: create, ingest, delete (each step resumable)
            self._rpc(self.stub.CreateSession, pb.CreateSessionRequest(session_id=op.sid),
                      ok=(grpc.StatusCode.ALREADY_EXISTS,))
            if op.sid not in self.deleting:
                self.ingest(i, op.sid, op.ids)
            self.deleting.add(op.sid)
            self._rpc(self.stub.DeleteSession, pb.DeleteSessionRequest(session_id=op.sid),
                      ok=(grpc.StatusCode.NOT_FOUND,))
            self.acked.pop(op.sid, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``emserve serve`` on a fixed port, restartable."""

    def __init__(self, sessions: Path, logs: Path, args: argparse.Namespace, port: int) -> None:
        self.sessions, self.logs, self.port = sessions, logs, port
        self.extra = ["--port", str(port), "--backend", args.backend, "--model", args.model, "--dtype", "float32",
                      "--max-model-len", "1024", "--kv-cache-gib", "1", "--grace", "2",
                      *[f"--memory={k}={v}" for k, v in MEMORY.items()]]
        self.starts = 0
        self.proc: ServerProcess | None = None

    def start(self) -> tuple[ServerProcess, list[psutil.Process]]:
        self.starts += 1
        proc = ServerProcess(self.sessions, self.logs / f"server-{self.starts}.log", self.extra)
        proc.wait_listening(timeout=300)
        with Client(f"127.0.0.1:{self.port}", timeout=60) as c:
            c.wait_ready(timeout=600)
        self.proc = proc
        return proc, psutil.Process(proc.proc.pid).children(recursive=True)


def orphans(children: list[psutil.Process]) -> list[str]:
    """The processes of ``children`` still alive 30 s after their server died."""
    _, alive = psutil.wait_procs(children, timeout=30)
    out = [f"{p.pid} {p.name()}" for p in alive]
    for p in alive:
        p.kill()
    return out


def state(sessions: Path, client: Client) -> dict[str, Any]:
    """Per durable session: tokens (its KV log), events, per-token surprise."""
    out = {}
    for sid in SESSIONS:
        data = next(p for p in (sessions / sid).iterdir() if p.is_dir() and p.name.startswith("data"))
        with KVLog.open(data / "log") as log:
            tokens = log.tokens().tolist()
        events = [(e.start, e.end) for e in client.list_events(sid)]
        surprise = [float(x) for x in client.surprise(sid).surprise]
        out[sid] = {"tokens": tokens, "events": events, "surprise": surprise}
    return out


def leftovers(sessions: Path, scratch: bool) -> list[str]:
    """Folders of interrupted deletions; with ``scratch``, scratch sessions too (none is left at the end)."""
    return sorted(p.name for p in sessions.iterdir()
                  if p.name.startswith(".deleted") or scratch and p.name.startswith("x"))


def kill_plan(n_ops: int, kills: int, rng: random.Random) -> list[int]:
    """The operation each kill aims at: one drawn uniformly from each of ``kills`` equal strata of the
    script, so kills spread over all of it (a restart's slow first calls do not soak them up)."""
    return [min(n_ops - 1, int((j + rng.random()) * n_ops / kills)) for j in range(kills)]


def run_script(ops: list[Op], work: Path, args: argparse.Namespace, kills: int, rng: random.Random,
               durations: list[float]) -> dict[str, Any]:
    """Run ``ops`` to the end, killing the server ``kills`` times; returns what was checked and each
    operation's duration. Kill ``j`` is armed when its operation (:func:`kill_plan`) starts and fires
    after a random share (0-1.2) of that operation's duration in the uninterrupted run (``durations``),
    so it lands inside the operation or just after it; an attempt cut by a kill arms the next one."""
    sessions, logs = work / "sessions", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server = Server(sessions, logs, args, free_port())
    runner = Runner()
    plan = kill_plan(len(ops), kills, rng) if kills else []
    killed_in: Counter[str] = Counter()
    kill_log: list[str] = []  # each kill: during what, and the sessions' committed offsets after the restart
    lost: list[str] = []
    orphaned: list[str] = []
    left: list[str] = []
    took = [0.0] * len(ops)
    done = 0
    t0 = time.perf_counter()

    def kill(pid: int, during: dict[str, str]) -> None:
        os.kill(pid, signal.SIGKILL)
        killed_in[during["op"] or "between"] += 1
        kill_log.append(f"{during['op'] or 'between'} op {during.get('i')}")

    while True:
        proc, children = server.start()
        left += leftovers(sessions, scratch=False)  # recovery ran before readiness
        client = Client(f"127.0.0.1:{server.port}", timeout=60)
        runner.client = client
        if kill_log:
            kill_log[-1] += ", then " + " ".join(f"{sid} {runner.num_tokens(sid)}" for sid in SESSIONS
                                                  if (sessions / sid).exists())
        for sid, acked in runner.acked.items():
            if sid in runner.deleting:
                continue
            have = runner.num_tokens(sid) if (sessions / sid).exists() else 0
            if have < acked:
                lost.append(f"{sid}: {have} tokens after restart, {acked} acknowledged")
        timer: threading.Timer | None = None
        current = {"op": ""}
        try:
            while done < len(ops):
                if timer is None and plan and plan[0] <= done:
                    plan.pop(0)
                    delay = rng.uniform(0.0, 1.2) * max(durations[done], 0.005)
                    timer = threading.Timer(delay, kill, args=(proc.proc.pid, current))
                    timer.start()
                current["op"], current["i"] = ops[done].kind, str(done)
                t_op = time.perf_counter()
                runner.run(done, ops[done])
                took[done] += time.perf_counter() - t_op
                current["op"] = ""
                done += 1
        except ServerGone:
            pass
        if timer is not None:
            timer.join()  # armed kills always fire: after the last operation too (then resume once more)
        elif done == len(ops):
            break
        proc.proc.wait(30)
        if proc.proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"server exited by itself ({proc.proc.returncode}); see {proc.log_path}")
        orphaned += orphans(children)
        client.close()
    wall = time.perf_counter() - t0
    final = state(sessions, client)
    left += leftovers(sessions, scratch=True)
    for sid, acked in runner.acked.items():
        if sid in final and len(final[sid]["tokens"]) < acked:
            lost.append(f"{sid}: {len(final[sid]['tokens'])} tokens at the end, {acked} acknowledged")
    client.close()
    server.proc.stop() if server.proc is not None else None
    return {"state": final, "answers": dict(runner.answers), "kills": dict(killed_in),
            "restarts": server.starts - 1, "kill_log": kill_log, "lost": lost, "orphans": orphaned,
            "leftovers": left, "wall_s": wall, "durations": took}


def compare(ref: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Differences between two runs' sessions and answers (empty: bit-identical)."""
    diffs = []
    for sid in SESSIONS:
        for key in ("tokens", "events", "surprise"):
            a, b = ref["state"][sid][key], got["state"][sid][key]
            if a != b:
                first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                diffs.append(f"{sid} {key}: differ from index {first} (lengths {len(a)} vs {len(b)})")
    for rid, ans in ref["answers"].items():
        if got["answers"].get(rid) != ans:
            diffs.append(f"answer {rid}: {ans} vs {got['answers'].get(rid)}")
    return diffs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--ops", type=int, default=0, help="operations (default: 5 per kill)")
    ap.add_argument("--backend", choices=("vllm", "reference"), default="vllm")
    ap.add_argument("--model", default="", help="an HF folder (default: the tests' tiny random Llama)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--out", default="", help="results name (default crash-<backend>); '' with --no-write")
    ap.add_argument("--no-write", action="store_true", help="print only (the CI test)")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="emserve-crash-"))
    if not args.model:
        import importlib.util  # the tests' tiny model builder, loaded from its file (tests/ is not a package)

        spec = importlib.util.spec_from_file_location("tinymodel", ROOT / "tests" / "tinymodel.py")
        assert spec is not None and spec.loader is not None
        tinymodel = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tinymodel)
        make_tiny_llama = tinymodel.make_tiny_llama

        args.model = str(make_tiny_llama(work / "tiny-llama", arch="llama"))
    vocab = 500
    ops = script(args.seed, args.ops or 5 * args.kills, vocab)
    print(f"{len(ops)} operations, {args.kills} kills, backend {args.backend}; work in {work}", flush=True)

    ref = run_script(ops, work / "reference", args, 0, random.Random(args.seed), [0.0] * len(ops))
    print(f"uninterrupted: {ref['wall_s']:.1f} s, {ref['wall_s'] / len(ops) * 1000:.0f} ms per operation", flush=True)
    got = run_script(ops, work / "killed", args, args.kills, random.Random(args.seed + 1), ref["durations"])
    diffs = compare(ref, got)
    kills = sum(got["kills"].values())
    rows = [[k, v] for k, v in sorted(got["kills"].items())]
    print(table(["killed during", "kills"], rows))
    checks = {"kills": kills, "acknowledged tokens lost": len(got["lost"]), "orphan processes": len(got["orphans"]),
              "leftovers": len(got["leftovers"]), "differences from uninterrupted": len(diffs)}
    print(table(["check", "value"], [[k, v] for k, v in checks.items()]))
    for line in got["lost"] + got["orphans"] + got["leftovers"] + diffs:
        print("  ", line)
    result = {
        "name": args.out or f"crash-{args.backend}", "command": " ".join(sys.argv), "machine": machine(),
        "git": os.environ.get("EMSERVE_GIT") or git_rev(),  # EMSERVE_GIT: a run from an exported tree
        "config": {"kills": args.kills, "ops": len(ops), "backend": args.backend, "seed": args.seed, "memory": MEMORY},
        "checks": checks, "killed_during": got["kills"], "kill_log": got["kill_log"], "lost": got["lost"],
        "orphans": got["orphans"],
        "leftovers": got["leftovers"], "differences": diffs,
        "tokens": {s: len(got["state"][s]["tokens"]) for s in SESSIONS},
        "events": {s: len(got["state"][s]["events"]) for s in SESSIONS},
        "wall_s": {"reference": ref["wall_s"], "killed": got["wall_s"]},
        "passed": kills >= args.kills and not (got["lost"] or got["orphans"] or got["leftovers"] or diffs),
    }
    if not args.no_write:
        print("wrote", write_results(result["name"], result))
    print("PASSED" if result["passed"] else "FAILED")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)

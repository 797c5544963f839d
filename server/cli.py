"""``emserve`` command line.

    emserve demo [--tokens N] [--depth F] [--model SPEC]   the main job end to end: starts a server,
                 [--seeds 0-9] [--strict]                streams a long text with a hidden pass key,
                                                         asks for it, prints answer + retrieval trace
    emserve serve [--host H] [--port P] [...]             run the gRPC server (SIGTERM: graceful stop)
    emserve ingest FILE --session S [--finish]            stream a text file into a session (progress bar)
    emserve ask S "question" [--trace] [--chat]           stream an answer from a session's memory
    emserve events S [--preview N]                        the session's events (what the memory kept)
    emserve sessions                                      list sessions
    emserve delete S                                      delete a session
    emserve prepare [--model SPEC]                        convert/verify the model (done by ``make setup``)

Client commands talk to ``--server`` (env ``EMSERVE_SERVER``, default 127.0.0.1:50051) with the
bearer token ``--token`` (env ``EMSERVE_AUTH_TOKEN``) when the server requires one.

Size: the subcommands share their argument handling, the server child process (:class:`ServerProcess`)
and the demo's report; each subcommand is a short function of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emserve.server import version

if TYPE_CHECKING:
    from emserve.server.config import ServerConfig

DEFAULT_SERVER = "127.0.0.1:50051"


# ---------------------------------------------------------------------------------- serve
def _serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from emserve.retrieval.errors import EmserveError
    from emserve.server.app import serve

    memory: dict[str, Any] = {}
    for item in args.memory or []:
        key, _, value = item.partition("=")
        memory[key.strip()] = _parse_value(value.strip())
    try:
        config = _serve_config(args, memory)
    except EmserveError as e:  # a setting (flag or EMSERVE_* variable) that is unknown or invalid
        print(f"emserve serve: {e}", file=sys.stderr)
        return 2
    status = serve(config)
    # Every session is checkpointed and closed and the engine is shut down: nothing is left to save.
    # Skip the interpreter's teardown (vLLM / ZMQ / torch threads and atexit hooks): it takes seconds,
    # and once, under heavy load, it did not end in 120 s after "emserve stopped".
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _serve_config(args: argparse.Namespace, memory: dict[str, Any]) -> ServerConfig:
    """The server's config from ``serve``'s flags over the environment (``build_config``)."""
    from emserve.server.config import build_config

    return build_config({
        "host": args.host, "port": args.port, "sessions_dir": args.sessions_dir, "model": args.model,
        "backend": args.backend, "dtype": args.dtype, "kv_cache_gib": args.kv_cache_gib,
        "max_model_len": args.max_model_len, "ingest_slots": args.ingest_slots,
        "deterministic": args.deterministic, "max_num_batched_tokens": args.max_num_batched_tokens,
        "long_prefill_token_threshold": args.long_prefill_token_threshold, "max_sessions": args.max_sessions,
        "max_message_bytes": args.max_message_bytes, "max_message_tokens": args.max_message_tokens,
        "max_inflight_messages": args.max_inflight,
        "max_session_tokens": args.max_session_tokens, "max_session_disk_gib": args.max_session_disk_gib,
        "max_disk_gib": args.max_disk_gib, "auth_token": args.auth_token, "grace_s": args.grace,
        "retrieval_device": args.retrieval_device, "retrieval_device_gib": args.retrieval_device_gib,
        "metrics_port": args.metrics_port, "memory": memory or None, "tls_cert": args.tls_cert,
        "tls_key": args.tls_key, "tls_client_ca": args.tls_client_ca, "health_port": args.health_port,
        "tenants_file": args.tenants_file, "openai_port": args.openai_port,
        "host_blas_threads": args.host_blas_threads,
    })


def _metrics_port(value: str) -> int | str:
    """``--metrics-port``: a port number, or ``off``."""
    if value.strip().lower() == "off":
        return "off"
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number or 'off': {value!r}") from None
    if not 0 <= port < 65536:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {port}")
    return port


def _parse_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, help="listen address (EMSERVE_HOST; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port, 0 for any free one (EMSERVE_PORT; default 50051)")
    p.add_argument("--sessions-dir", default=None, help="EMSERVE_SESSIONS_DIR; default $EMSERVE_HOME/sessions")
    p.add_argument("--model", default=None, help="smollm2-135m (default), qwen2.5-0.5b, or an HF folder")
    p.add_argument("--backend", choices=["vllm", "reference"], default=None)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default=None,
                   help="compute dtype (default auto: bfloat16 where the hardware has it natively, else float32)")
    p.add_argument("--kv-cache-gib", type=float, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--ingest-slots", type=int, default=None,
                   help="ingestion steps in the engine at once, all sessions (EMSERVE_INGEST_SLOTS; 0: no limit; "
                        "default 1 on a CPU, no limit on a GPU); "
                        "questions go first either way")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="one session step at a time in the engine, so a session's results do not depend on other "
                        "sessions' traffic (EMSERVE_DETERMINISTIC; costs the overlap of their engine work)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                   help="tokens of one vLLM iteration, all sessions together; longer steps run in several "
                        "(EMSERVE_MAX_NUM_BATCHED_TOKENS; 0: max_model_len; default 256 on a CPU, 0 on a GPU)")
    p.add_argument("--long-prefill-token-threshold", type=int, default=None, metavar="N",
                   help="most tokens of one session's step per iteration while other steps wait, so a question "
                        "need not wait for a whole ingestion chunk (EMSERVE_LONG_PREFILL_TOKEN_THRESHOLD; 0: no cap; "
                        "default 64 on a CPU, 0 on a GPU)")
    p.add_argument("--max-sessions", type=int, default=None)
    p.add_argument("--max-message-bytes", type=int, default=None)
    p.add_argument("--max-inflight", type=int, default=None, help="ingest messages ahead of receipts")
    p.add_argument("--max-message-tokens", type=int, default=None,
                   help="most tokens of one Ingest message (EMSERVE_MAX_MESSAGE_TOKENS; default 65536; 0: no limit)")
    p.add_argument("--max-session-tokens", type=int, default=None, help="0: unlimited")
    p.add_argument("--max-session-disk-gib", type=float, default=None,
                   help="disk quota of one session, GiB (EMSERVE_MAX_SESSION_DISK_GIB; default 0: none)")
    p.add_argument("--max-disk-gib", type=float, default=None,
                   help="disk quota of all sessions together, GiB (EMSERVE_MAX_DISK_GIB; default 0: none)")
    p.add_argument("--auth-token", default=None, help="require 'authorization: Bearer <token>' (EMSERVE_AUTH_TOKEN)")
    p.add_argument("--grace", type=float, default=None, help="graceful shutdown grace period, s")
    p.add_argument("--log-format", choices=["text", "json"], default=None,
                   help="text, or json: one object per line with session_id and request_id (EMSERVE_LOG_FORMAT)")
    p.add_argument("--log-level", default=None, type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="EMSERVE_LOG_LEVEL; default WARNING (INFO: one line per call, DEBUG: per step)")
    p.add_argument("--metrics-port", type=_metrics_port, default=None, metavar="PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics; 'off' for none "
                        "(EMSERVE_METRICS_PORT; default off)")
    p.add_argument("--openai-port", type=int, default=None, metavar="PORT",
                   help="also serve an OpenAI-compatible HTTP endpoint (/v1/completions, /v1/chat/completions, "
                        "/v1/models) answering from sessions' memory (EMSERVE_OPENAI_PORT)")
    p.add_argument("--tenants-file", default=None,
                   help='JSON {"tenant": "token", ...}: each token sees only its tenant\'s sessions '
                        "(EMSERVE_TENANTS_FILE)")
    p.add_argument("--tls-cert", default=None,
                   help="PEM certificate chain: the gRPC port speaks TLS (EMSERVE_TLS_CERT)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert (EMSERVE_TLS_KEY)")
    p.add_argument("--tls-client-ca", default=None,
                   help="PEM CA certificates: clients must present a certificate they signed, mutual TLS "
                        "(EMSERVE_TLS_CLIENT_CA)")
    p.add_argument("--health-port", type=int, default=None, metavar="PORT",
                   help="also serve grpc.health.v1 alone in plaintext on this port, for probes that cannot "
                        "speak TLS (EMSERVE_HEALTH_PORT)")
    p.add_argument("--retrieval-device", default=None,
                   help="where retrieval scores events: auto (a GPU if torch sees one), cpu, cuda[:N]")
    p.add_argument("--retrieval-device-gib", type=float, default=None,
                   help="GPU memory for open sessions' retrieval mirrors (idle ones closed beyond it; 0: no limit)")
    p.add_argument("--host-blas-threads", type=int, default=None, metavar="N",
                   help="BLAS threads of the server process's own numpy work (default 1; 0: the library's "
                        "default; EMSERVE_HOST_BLAS_THREADS)")
    p.add_argument("--memory", action="append", metavar="KEY=VALUE",
                   help="default memory setting of new sessions, e.g. --memory n_local=2048 (repeatable)")


# ---------------------------------------------------------------------------------- client commands
def _client(args: argparse.Namespace) -> Any:
    from emserve.client import Client

    return Client(args.server, token=args.token)


def _fail(e: Exception | str) -> int:
    print(f"emserve: {e}", file=sys.stderr)
    return 1


class Progress:
    """One progress line on stderr: redrawn in place on a terminal, else printed every ``every_s`` seconds
    (a log file gets lines, not one line of carriage returns). ``final()`` prints the last state."""

    def __init__(self, every_s: float = 10.0, out: Any = None) -> None:
        self.out = out or sys.stderr
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.every_s = every_s
        self._last = -1e9
        self._line = ""

    def show(self, line: str) -> None:
        self._line = line
        if self.tty:
            print(f"\r{line}", end="", file=self.out, flush=True)
        elif time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            print(line, file=self.out, flush=True)

    def final(self) -> None:
        if self.tty:
            print(file=self.out)
        elif self._line:
            print(self._line, file=self.out, flush=True)


def _open_text(name: str) -> Any:
    """The text stream ``emserve ingest`` reads: a file, or standard input for ``-``."""
    if name == "-":
        return contextlib.nullcontext(sys.stdin)
    return open(name, encoding="utf-8", errors="replace")  # noqa: SIM115 - the caller's with closes it


def _ingest(args: argparse.Namespace) -> int:
    from emserve.client import ClientError, IngestProgress, split_stream

    source = "standard input" if args.file == "-" else args.file
    try:
        f_cm = _open_text(args.file)
    except OSError as e:
        return _fail(f"cannot read {source}: {e.strerror or e}")
    size = 0 if args.file == "-" else os.path.getsize(args.file)
    sent = [0]
    t0, start = time.perf_counter(), [None]
    bar = Progress()

    def progress(p: IngestProgress) -> None:
        if start[0] is None:
            start[0] = p.committed_offset  # type: ignore[assignment]
        rate = (p.committed_offset - (start[0] or 0)) / max(time.perf_counter() - t0, 1e-9)
        where = f"{100.0 * sent[0] / size:5.1f}% of {source} sent" if size else f"{sent[0]} characters of {source} sent"
        bar.show(f"  {where}  {p.committed_offset:>9} tokens committed  {rate:7.0f} tok/s  {p.num_events:>6} events")

    with f_cm as f, _client(args) as c:
        def pieces() -> Any:
            for piece in split_stream(f, args.piece_chars):
                sent[0] += len(piece.encode("utf-8")) if size else len(piece)
                yield piece

        try:
            try:
                c.get_session(args.session)
            except ClientError as e:
                if e.code.name != "NOT_FOUND":
                    raise
                c.create_session(args.session)
                print(f"created session {args.session}", file=sys.stderr)
            res = c.ingest(args.session, pieces(), finish=args.finish, on_progress=progress)
        except ClientError as e:
            bar.final()
            return _fail(e)
    bar.final()
    if args.json:
        print(json.dumps(dataclasses.asdict(res) | {"tokens": res.tokens}))
    else:
        print(f"{res.session_id}: +{res.tokens} tokens in {res.seconds:.1f} s "
              f"({res.tokens / max(res.seconds, 1e-9):.0f} tok/s), committed offset {res.committed_offset}, "
              f"{res.num_events} events" + (", finished" if res.finished else "")
              + (f", {res.reconnects} reconnects" if res.reconnects else ""))
    return 0


def _as_dict(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


def _ask(args: argparse.Namespace) -> int:
    from emserve.client import ClientError

    with _client(args) as c:
        try:
            stream = c.generate(args.session, args.question, max_tokens=args.max_tokens,
                                temperature=args.temperature, stop=args.stop or (), chat_template=args.chat,
                                trace=args.trace, remember=args.remember, preview_tokens=args.preview)
            for piece in stream.text():
                if not args.json:
                    print(piece, end="", flush=True)
            if not args.json:
                print()
        except ClientError as e:
            return _fail(e)
    done = stream.complete
    if done is None:
        return _fail("the answer ended without a completion")
    if args.json:  # the whole GenerateComplete: text, token ids, finish reason, usage, timings, trace
        print(json.dumps(_as_dict(done)))
        return 0
    t, u = done.timings, done.usage
    print(f"[{u.completion_tokens} tokens, finish {'stop' if done.finish_reason == 1 else 'length'}, "
          f"first token {t.first_token_s:.2f} s, "
          f"total {t.total_s:.2f} s, memory {u.memory_tokens} tokens, window {u.window_tokens}]", file=sys.stderr)
    if args.trace:
        print_trace(done.trace if done.HasField("trace") else None)
    return 0


def print_trace(trace: Any, mark: tuple[int, int] | None = None, limit: int = 14, out: Any = None) -> None:
    """Print a RetrievalTrace: the events in the window, temporal order (``mark``: a token range to flag)."""
    out = out or sys.stdout
    window = list(trace.window) if trace is not None else []
    if window:
        line = f"window     {sum(r.end - r.start for r in window)} tokens of the stream in {len(window)} ranges"
        if mark is not None:
            inside = sum(max(0, min(r.end, mark[1]) - max(r.start, mark[0])) for r in window)
            line += f"; {inside} of the marked range's {mark[1] - mark[0]} tokens in it"
        print(line, file=out)
    if trace is None or not trace.events:
        print("retrieval  none (everything fit in the attention window)", file=out)
        return
    n_layers = len(trace.layers) if not trace.shared else 1
    print(f"retrieval  {len(trace.events)} events in the window from {trace.num_events} in memory "
          f"({trace.memory_tokens} tokens), budget {trace.budget} tokens per layer, "
          f"{'shared list' if trace.shared else f'{n_layers} layers'}, {'exact' if trace.exact else 'HNSW'} search",
          file=out)
    events = list(trace.events)
    if mark is not None:
        hits = [e for e in events if e.start < mark[1] and e.end > mark[0]]
        layers = max((e.layers for e in hits), default=0)
        print(f"  the marked range [{mark[0]}, {mark[1]}) is in {len(hits)} retrieved event(s), "
              f"selected by up to {layers} layer(s)", file=out)
        if len(events) > limit and hits:  # show the neighbourhood of the mark
            i = events.index(hits[0])
            lo = max(0, min(i - limit // 2, len(events) - limit))
            events = events[lo : lo + limit]
    for e in events[:limit]:
        src = f"sim {e.similarity_layers:>2} / ctg {e.contiguity_layers:>2}" + (
            f" / lex {e.lexical_layers:>2}" if e.lexical_layers else "")
        flag = "  <- pass key" if mark is not None and e.start < mark[1] and e.end > mark[0] else ""
        print(f"    [{e.start:>6}, {e.end:>6})  layers {e.layers:>2} ({src})  max score {e.max_score:8.3f}  "
              f"{e.preview.replace(chr(10), ' ')!r}{flag}", file=out)
    if len(trace.events) > limit:
        print(f"    ... {len(trace.events)} events in all", file=out)


def _events(args: argparse.Namespace) -> int:
    from emserve.client import ClientError

    with _client(args) as c:
        try:
            s = c.get_session(args.session)
            if args.json:  # one event per line
                for i, e in enumerate(c.list_events(args.session, preview=args.preview > 0,
                                                    preview_tokens=args.preview)):
                    if args.limit and i >= args.limit:
                        break
                    print(json.dumps(_as_dict(e)))
                return 0
            print(f"{s.session_id}: {s.num_tokens} tokens, {s.num_events} events ({s.event_tokens} tokens in events; "
                  f"the rest is the sink and the local window)")
            print(f"{'id':>6} {'start':>8} {'end':>8} {'size':>5} {'boundary':>8} {'mean':>6} {'max':>6}  preview")
            for i, e in enumerate(c.list_events(args.session, preview=args.preview > 0, preview_tokens=args.preview)):
                if args.limit and i >= args.limit:
                    print(f"... ({s.num_events} in all)")
                    break
                print(f"{e.id:>6} {e.start:>8} {e.end:>8} {e.size:>5} {e.boundary_surprise:>8.2f} "
                      f"{e.mean_surprise:>6.2f} {e.max_surprise:>6.2f}  {e.preview.replace(chr(10), ' ')!r}")
        except ClientError as e:
            return _fail(e)
    return 0


def _health(args: argparse.Namespace) -> int:
    """Exit 0 if the server's health service reports SERVING for ``--service`` (container health checks)."""
    from emserve.client import ClientError

    with _client(args) as c:
        try:
            status = c.health(args.service)
        except ClientError as e:
            print(f"{args.server}: {e}", file=sys.stderr)
            return 1
    print(f"{args.server} {args.service or '(liveness)'}: {status}")
    return 0 if status == "SERVING" else 1


def _sessions(args: argparse.Namespace) -> int:
    from emserve.client import ClientError

    with _client(args) as c:
        try:
            rows = list(c.list_sessions())
        except ClientError as e:
            return _fail(e)
    if args.json:  # one session per line
        for s in rows:
            print(json.dumps(_as_dict(s)))
        return 0
    print(f"{'session':<28} {'state':<9} {'tokens':>9} {'events':>7} {'disk MB':>8}  created")
    for s in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.create_time.seconds))
        state = "finished" if s.state == 2 else "active"
        mb = s.disk_bytes / 1e6
        print(f"{s.session_id:<28} {state:<9} {s.num_tokens:>9} {s.num_events:>7} {mb:>8.1f}  {created}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    from emserve.client import ClientError

    with _client(args) as c:
        try:
            c.delete_session(args.session)
        except ClientError as e:
            return _fail(e)
    print(f"deleted {args.session}")
    return 0


# ---------------------------------------------------------------------------------- demo
class ServerProcess:
    """``emserve serve`` in a child process on a free loopback port; its output goes to ``log``.
    ``wrapper``: a command the server runs under (its arguments, then the server's command line: e.g.
    ``bench.eval.cgroup``'s), which must pass SIGTERM on."""

    def __init__(self, sessions_dir: Path, log: Path, extra: Sequence[str] = (), wrapper: Sequence[str] = ()) -> None:
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - lives as long as the process
        cmd = [*wrapper, sys.executable, "-m", "emserve.server", "serve", "--host", "127.0.0.1", "--port", "0",
               "--sessions-dir", str(sessions_dir), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
        self.address = ""
        self._pump: threading.Thread | None = None

    def wait_listening(self, timeout: float = 120.0) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited ({self.proc.poll()}); see {self.log_path}")
            self._log.write(line)
            m = re.search(r"listening on (\S+)", line)
            if m:
                self.address = m.group(1)
                # keep draining the pipe into the log, or a chatty server would block on a full pipe
                self._pump = threading.Thread(target=self._copy_output, daemon=True)
                self._pump.start()
                return self.address
        raise TimeoutError(f"server did not start in {timeout:.0f} s; see {self.log_path}")

    def wait_ready(self, client: Any, timeout: float = 900.0, slice_s: float = 5.0) -> Any:
        """``client.wait_ready`` (the engine is loaded; returns the server info), failing as soon as the
        server process has exited instead of at ``timeout``: a server whose engine does not load exits,
        and its log says why."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}) before it was ready; see {self.log_path}")
            left = deadline - time.monotonic()
            try:
                return client.wait_ready(timeout=max(0.1, min(slice_s, left)))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise

    def _copy_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM (graceful shutdown), then wait; returns the exit status. Idempotent."""
        if self._log.closed:
            return int(self.proc.returncode)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._pump is not None:
            self._pump.join(10)
        elif self.proc.stdout is not None:
            self._log.write(self.proc.stdout.read())
        self._log.close()
        return int(self.proc.returncode)


def demo_document(tokens: int, depth: float, seed: int, tokenizer: Any,
                  haystack: str = "text") -> tuple[str, str, str, str]:
    """(before, needle, after, key): ~``tokens`` tokens with a pass key at ``depth``.

    ``haystack``: ``"text"``, public-domain prose (``big``); ``"noise"``, the pass-key task of the
    literature (an instruction, then repeated filler sentences: ``corpus.noise_haystack``).
    """
    from emserve.server.provision.corpus import load_text, noise_haystack

    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    tokenizer.model_max_length = 1 << 30  # a long document, not a model input: no length warning
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    if haystack == "noise":
        ids, at = noise_haystack(tokenizer, tokens, depth)
        return tokenizer.decode(ids[:at]), needle, tokenizer.decode(ids[at:]), key
    if haystack != "text":
        raise ValueError(f"haystack must be 'text' or 'noise', got {haystack!r}")
    text = load_text("big")
    start = rng.randint(0, len(text) // 2)
    ids = tokenizer(text[start : start + tokens * 6], add_special_tokens=False)["input_ids"][:tokens]
    doc = tokenizer.decode(ids)
    cut = int(len(doc) * depth)
    while cut < len(doc) and not doc[cut].isspace():
        cut += 1
    return doc[:cut], needle, doc[cut:], key


DEMO_QUESTION = "\n\nWhat is the pass key? The pass key is"


def demo_depths(n: int) -> list[float]:
    """Where ``n`` demo documents hide their key: one at 50%; several from 5% to 95%, evenly spaced."""
    return [0.5] if n == 1 else [round(0.05 + 0.9 * i / (n - 1), 4) for i in range(n)]


def _seed_list(spec: str) -> list[int]:
    """``"3"``, ``"0-9"`` or ``"1,4,7"``."""
    try:
        if "-" in spec:
            a, b = spec.split("-", 1)
            out = list(range(int(a), int(b) + 1))
        else:
            out = [int(x) for x in spec.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds: expected N, A-B or A,B,C; got {spec!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"seeds: no seed in {spec!r}")
    return out


def _demo_document(c: Any, tok: Any, args: argparse.Namespace, seed: int, depth: float, *,
                   verbose: bool) -> bool:
    """Stream one demo document into a new session, ask for its key; True if the answer holds it."""
    from emserve.client import split_text

    before, needle, after, key = demo_document(args.tokens, depth, seed, tok, args.haystack)
    s = c.create_session()
    m = s.memory
    if verbose:
        question = ""
        if m.HasField("question_n_local") or m.HasField("question_n_mem"):
            q_mem = min(m.question_n_mem, m.n_mem) if m.HasField("question_n_mem") else m.n_mem
            q_local = m.question_n_local if m.HasField("question_n_local") else m.n_local
            question = f"; a question's: {m.n_init} sink + {q_mem} memory + {q_local} local"
        print(f"session    {s.session_id}  (window: {m.n_init} sink + {m.n_mem} memory + {m.n_local} local, "
              f"chunks of {m.exc_block_size}{question})")
    t0 = time.perf_counter()
    bar = Progress(out=sys.stdout) if verbose else None

    def progress(p: Any) -> None:
        if bar is not None:
            dt = time.perf_counter() - t0
            bar.show(f"  ingest   {p.committed_offset:>7} tokens  {p.committed_offset / dt:6.0f} tok/s  "
                     f"{p.num_events:>5} events")

    head = list(split_text(before, 8192))
    landed: dict[int, tuple[int, int]] = {}
    pieces = [*head, needle, *split_text(after, 8192)]
    r = c.ingest(s.session_id, pieces, on_progress=progress,
                 on_receipt=lambda i, start, end: landed.__setitem__(i, (start, end)))
    if bar is not None:
        bar.final()
    mark = landed[len(head)]
    where = f"pass key {key} at tokens [{mark[0]}, {mark[1]}) ({100 * mark[0] / max(r.committed_offset, 1):.0f}% depth)"
    answer = c.ask(s.session_id, DEMO_QUESTION, max_tokens=12, trace=True, preview_tokens=12)
    done = answer.complete
    ok = key in answer.text
    if verbose:
        print(f"document   {r.committed_offset} tokens of public-domain text in {time.perf_counter() - t0:.1f} s; "
              f"{where}; {r.num_events} events")
        print(f"question   {DEMO_QUESTION.strip()!r}")
        print(f"answer     {answer.text!r}  (first token {done.timings.first_token_s:.2f} s, "
              f"total {done.timings.total_s:.2f} s)")
        print(f"correct    {ok}")
        print_trace(answer.trace, mark)
    else:
        print(f"seed {seed:>3}  {where}: answer {answer.text!r}  {'correct' if ok else 'WRONG'}  "
              f"({r.committed_offset} tokens in {time.perf_counter() - t0:.0f} s)", flush=True)
        c.delete_session(s.session_id)
    return ok


def _demo(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from emserve.client import Client, ClientError
    from emserve.server.provision.models import resolve_model

    spec = resolve_model(args.model, progress=lambda m: print(f"  {m}", file=sys.stderr))
    tok = AutoTokenizer.from_pretrained(spec.path)
    seeds = args.seeds or [args.seed]
    depths = [args.depth] * len(seeds) if args.depth is not None else demo_depths(len(seeds))
    workdir = Path(args.session_dir or tempfile.mkdtemp(prefix="emserve-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    server = None
    results: list[bool] = []
    if args.server:
        address = args.server
    else:
        t = time.perf_counter()
        extra = ["--model", str(spec.path), "--backend", args.backend]
        server = ServerProcess(workdir / "sessions", workdir / "server.log", extra)
        address = server.wait_listening()
        print(f"server     emserve serve on {address} (log {workdir / 'server.log'})")
    try:
        with Client(address) as c:
            info = c.wait_ready() if server is None else server.wait_ready(c, timeout=600)
            if server is not None:
                print(f"           engine {info.backend} ready in {time.perf_counter() - t:.1f} s")
            print(f"model      {info.model} ({info.model_path}), context {info.max_model_len} tokens")
            for seed, depth in zip(seeds, depths, strict=True):
                results.append(_demo_document(c, tok, args, seed, depth, verbose=len(seeds) == 1))
            if len(seeds) > 1:
                print(f"correct    {sum(results)} of {len(results)}")
            elif server is not None:
                print(f"next       emserve serve --sessions-dir {workdir / 'sessions'} &   then   "
                      f"emserve events <session> --preview 8")
    except (ClientError, RuntimeError, TimeoutError) as e:
        if server is not None:
            print(f"server log: {server.log_path}", file=sys.stderr)
        return _fail(e)
    finally:
        if server is not None:
            server.stop()
    return 0 if all(results) or not args.strict else 1


def _prepare(args: argparse.Namespace) -> int:
    from emserve.server.provision.models import main as models_main

    return models_main(["prepare"] + (["--model", args.model] if args.model else []))


# ---------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    """``emserve``'s command line: one subcommand per job (demo, serve, the client commands, prepare)."""
    ap = argparse.ArgumentParser(prog="emserve", description="streaming episodic-memory inference server")
    ap.add_argument("--version", action="version", version=f"emserve {version()}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="start a server, stream a long text with a hidden fact, ask about it")
    d.add_argument("--model", default=None, help="smollm2-135m (default), qwen2.5-0.5b, or an HF folder")
    d.add_argument("--tokens", type=int, default=12000, help="document length in tokens")
    d.add_argument("--depth", type=float, default=None,
                   help="where the pass key is hidden (0..1); default 0.5, or 5%%..95%% spread over --seeds")
    d.add_argument("--seed", type=int, default=0, help="draws the key and the text's offset")
    d.add_argument("--seeds", type=_seed_list, default=None,
                   help="several documents on one server, e.g. 0-9 or 1,4,7 (one line each)")
    d.add_argument("--haystack", choices=["text", "noise"], default="text",
                   help="text: public-domain prose (default); noise: the literature's pass-key task "
                        "(repeated filler sentences)")
    d.add_argument("--backend", choices=["vllm", "reference"], default="vllm")
    d.add_argument("--session-dir", default=None, help="work folder (sessions, server log); default: a temp dir")
    d.add_argument("--server", default=None, help="use the server at this address instead of starting one")
    d.add_argument("--strict", action="store_true", help="exit 1 if an answer is wrong")
    d.set_defaults(fn=_demo)

    s = sub.add_parser("serve", help="run the gRPC server")
    _add_serve_flags(s)
    s.set_defaults(fn=_serve)

    def client_parser(name: str, help_: str, json_help: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--server", default=os.environ.get("EMSERVE_SERVER", DEFAULT_SERVER),
                       help=f"host:port of the server (EMSERVE_SERVER; default {DEFAULT_SERVER})")
        p.add_argument("--token", default=os.environ.get("EMSERVE_AUTH_TOKEN"),
                       help="bearer token (EMSERVE_AUTH_TOKEN)")
        if json_help:
            p.add_argument("--json", action="store_true", help=json_help)
        return p

    i = client_parser("ingest", "stream a text file into a session (created if missing)",
                      "print the result as one JSON object (IngestResult's fields)")
    i.add_argument("file", help="a UTF-8 text file, or - for standard input (read as it comes)")
    i.add_argument("--session", required=True, help="session id (created with the server's defaults if missing)")
    i.add_argument("--finish", action="store_true", help="seal the session afterwards (questions only)")
    i.add_argument("--piece-chars", type=int, default=8192, help="characters per message")
    i.set_defaults(fn=_ingest)

    a = client_parser("ask", "ask a question against a session's memory (streams the answer)",
                      "print the whole GenerateComplete as one JSON object at the end instead")
    a.add_argument("session")
    a.add_argument("question")
    a.add_argument("--max-tokens", type=int, default=64, help="longest answer, tokens")
    a.add_argument("--temperature", type=float, default=0.0, help="0: greedy (deterministic)")
    a.add_argument("--stop", action="append", help="stop string (repeatable)")
    a.add_argument("--chat", action="store_true", help="wrap the question in the model's chat template")
    a.add_argument("--trace", action="store_true", help="print the retrieval trace")
    a.add_argument("--remember", action="store_true", help="append question and answer to the session")
    a.add_argument("--preview", type=int, default=12, help="preview tokens per traced event")
    a.set_defaults(fn=_ask)

    e = client_parser("events", "list a session's events", "one JSON object per event and line")
    e.add_argument("session")
    e.add_argument("--preview", type=int, default=0, help="preview tokens per event")
    e.add_argument("--limit", type=int, default=0, help="the first this many events (0: all)")
    e.set_defaults(fn=_events)

    h = client_parser("health", "check the server's grpc.health.v1 status (exit 0: SERVING)")
    h.add_argument("--service", default="readiness",
                   help="health service name: readiness (engine loaded, the default) or '' (liveness)")
    h.set_defaults(fn=_health)

    ss = client_parser("sessions", "list sessions", "one JSON object per session and line")
    ss.set_defaults(fn=_sessions)

    dl = client_parser("delete", "delete a session")
    dl.add_argument("session", help="session id (its folder and memory are removed)")
    dl.set_defaults(fn=_delete)

    p = sub.add_parser("prepare", help="convert and verify the model")
    p.add_argument("--model", default=None, help="smollm2-135m (default), qwen2.5-0.5b, or an HF folder")
    p.set_defaults(fn=_prepare)
    return ap


def _configure_logging(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Logging by ``--log-level`` / ``--log-format`` or their environment variables; with JSON, vLLM's
    records (engine core and workers too) as JSON through a logging config file it reads."""
    from emserve.server.logs import configure

    level = getattr(args, "log_level", None) or os.environ.get("EMSERVE_LOG_LEVEL", "WARNING")
    fmt = getattr(args, "log_format", None) or os.environ.get("EMSERVE_LOG_FORMAT", "text")
    if fmt not in ("text", "json"):
        ap.error(f"EMSERVE_LOG_FORMAT must be text or json, got {fmt!r}")
    if fmt == "json":  # vLLM's records (engine core and workers too) as JSON; no progress bars between lines
        import hashlib
        import json
        import tempfile

        from emserve.server.logs import vllm_logging_config

        text = json.dumps(vllm_logging_config(os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")), sort_keys=True)
        # one file per distinct config (named by its hash), not one per start: the engine's processes read
        # it while the server lives, and the server exits without an interpreter teardown to remove it
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"emserve-vllm-logging-{digest}.json"
        if not path.exists():
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        os.environ.setdefault("VLLM_LOGGING_CONFIG_PATH", str(path))
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    configure(level, fmt)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    _configure_logging(ap, args)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())

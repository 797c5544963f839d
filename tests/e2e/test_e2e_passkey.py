"""Acceptance: the real default model on vLLM, over a real socket, in server processes started as a user.

Stream >= 32k tokens (4x SmolLM2's 8k context) holding a hidden pass key into a session, ask for the
key, get it; SIGTERM the server, start a new one on the same sessions directory,
ask again (the session resumes from its directory), get it again.

The haystack is the pass-key task as the literature runs it (InfiniteBench passkey, RULER
niah_single_1: an instruction, then filler sentences repeated; ``emserve.server.provision.corpus.noise_haystack``).
A key hidden in prose is beyond this 135M model even in a 512-token full-attention context (measured in
``bench/lab/needle.py --haystack text``), so prose would test the model, not the memory.

Minutes on a 2-core CPU (the ingest runs at ~150-400 tok/s). Marked slow.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import pytest
from model_sources import NEEDS_DEFAULT_MODEL

from emserve.client import Client, split_text
from emserve.server.cli import ServerProcess, demo_document

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed"),
    NEEDS_DEFAULT_MODEL,
]

TOKENS = 4 * 8192 + 512
QUESTION = "\n\nWhat is the pass key? The pass key is"


def _start(tmp: Path, model: Path, name: str) -> tuple[ServerProcess, Client]:
    proc = ServerProcess(tmp / "sessions", tmp / f"{name}.log", ["--model", str(model), "--backend", "vllm"])
    client = Client(proc.wait_listening(timeout=300), timeout=120)
    client.wait_ready(timeout=900)
    return proc, client


def _needle_in_trace(trace: Any, mark: tuple[int, int]) -> int:
    return max((e.layers for e in trace.events if e.start < mark[1] and e.end > mark[0]), default=0)


def test_passkey_in_32k_tokens_survives_a_restart(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from emserve.server.provision.models import resolve_model

    spec = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(spec.path)
    before, needle, after, key = demo_document(TOKENS, 0.5, 1, tok, haystack="noise")
    head = list(split_text(before, 8192))
    pieces = [*head, needle, *split_text(after, 8192)]
    landed: dict[int, tuple[int, int]] = {}

    proc, client = _start(tmp_path, spec.path, "server1")
    try:
        info = client.server_info()
        assert info.backend == "vllm" and info.max_model_len == 8192
        session = client.create_session("passkey").session_id
        t0 = time.perf_counter()
        res = client.ingest(session, pieces, on_receipt=lambda i, s, e: landed.__setitem__(i, (s, e)))
        ingest_s = time.perf_counter() - t0
        assert res.committed_offset >= 4 * info.max_model_len
        mark = landed[len(head)]
        first = client.ask(session, QUESTION, max_tokens=12, trace=True)
        assert client.get_session(session).num_tokens == res.committed_offset  # the question changed nothing
    finally:
        client.close()
        status = proc.stop()
    assert status == 0, proc.log_path.read_text()[-3000:]

    proc, client = _start(tmp_path, spec.path, "server2")
    try:
        s = client.get_session(session)
        assert s.num_tokens == res.committed_offset and s.num_events == res.num_events
        second = client.ask(session, QUESTION, max_tokens=12, trace=True)
    finally:
        client.close()
        assert proc.stop() == 0

    report = (f"key {key} at {mark} of {res.committed_offset} tokens ({res.committed_offset / ingest_s:.0f} tok/s); "
              f"before restart {first.text!r} (needle event in {_needle_in_trace(first.trace, mark)} layers), "
              f"after {second.text!r} (needle event in {_needle_in_trace(second.trace, mark)} layers)")
    print(report)
    assert key in first.text, report
    assert key in second.text, report

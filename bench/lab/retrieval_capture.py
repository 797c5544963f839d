"""Real retrieval data for the index benchmark: a session ingested through the product engine, plus queries.

Streams ``--tokens`` tokens of ``big`` text with a passkey needle (``bench/lab/needle.py``'s trial, depth
``--depth``) through a :class:`~emserve.server.session.Session` on the default model and default
:class:`MemoryConfig`, and keeps the session directory (KV log, event table with the default ``topk``
representatives, query mean). Also saves ``queries.npz`` next to it:

* ``chunk_queries [C, L, H, D]``: every ingestion step's query summary (what the next chunk retrieves
  with: lagged queries);
* ``ask_queries [A, n, L, H, D]``: probe query tokens (the last ``question_query_tokens``) of ``A``
  questions at the end of the stream: the passkey question first, then ``A - 1`` snippets of later
  ``big`` text (question-like probes);
* ``needle [2]``: the needle's token span; ``needle_events``: ids of the events that overlap it.

    .venv/bin/python -m bench.lab.retrieval_capture [--tokens 16000] [--out ~/.cache/emserve/bench/real16k]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUT = Path.home() / ".cache" / "emserve" / "bench" / "real16k"


async def capture(tokens: int, depth: float, asks: int, out: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bench.eval.common import ingest_all
    from bench.lab.needle import QUESTION, make_trial
    from emserve.server.engine.base import StepOptions
    from emserve.server.engine.config import EngineConfig
    from emserve.server.engine.vllm_engine import VLLMEngine
    from emserve.server.provision.corpus import load_text
    from emserve.server.provision.models import resolve_model
    from emserve.server.session import MemoryConfig, Session

    spec = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(spec.path)
    text = load_text("big")
    trial = make_trial(tok, text, tokens, depth, 0)
    engine = VLLMEngine(EngineConfig(model=str(spec.path), kv_cache_gib=2))
    if out.exists():
        shutil.rmtree(out)
    cfg = MemoryConfig.of(repr_proxy="topk")  # per-layer keys: what retrieval_index and ivf_probe model
    session = Session.create(out, engine, cfg)
    chunk_queries: list[np.ndarray] = []
    orig = session._ingest_chunk

    async def ingest(chunk: list[int]) -> Any:
        res = await orig(chunk)
        if res.queries is not None:
            chunk_queries.append(np.asarray(res.queries, np.float32))
        return res

    session._ingest_chunk = ingest  # type: ignore[method-assign]
    try:
        ingest_s = await ingest_all(session, trial.ids)
        planner = session.memory.planner
        rng = np.random.default_rng(1)
        questions = [tok(QUESTION)["input_ids"]]
        for _ in range(asks - 1):
            s = int(rng.integers(trial.text_start + tokens * 5, len(text) * 4 // 5))
            s = text.find(" ", s) + 1
            questions.append(tok(text[s : s + 200])["input_ids"][:24])
        ask_q = []
        for q in questions:
            probe = await engine.step(planner.probe_plan(session.num_tokens, q),
                                      options=StepOptions(surprise=False, query_tokens=cfg.question.query_tokens))
            assert probe.query_tokens is not None
            ask_q.append(probe.query_tokens.astype(np.float32))
        table = session.memory.table
        a, b = trial.span
        needle_events = [i for i in range(len(table)) if table.starts[i] < b and table.ends[i] > a]
        np.savez(out / "queries.npz", chunk_queries=np.stack(chunk_queries), ask_queries=np.stack(ask_q),
                 needle=np.array(trial.span), needle_events=np.array(needle_events, np.int64))
        return {"tokens": len(trial.ids), "events": len(table), "ingest_s": ingest_s,
                "needle_events": needle_events, "chunks": len(chunk_queries)}
    finally:
        session.close()
        await engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16000)
    ap.add_argument("--depth", type=float, default=0.3)
    ap.add_argument("--asks", type=int, default=8)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    from bench.eval.common import sigterm_exits

    sigterm_exits()
    print(asyncio.run(capture(args.tokens, args.depth, args.asks, args.out)))


if __name__ == "__main__":
    main()

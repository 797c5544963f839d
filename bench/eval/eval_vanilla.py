"""Full-attention baseline: vanilla vLLM (``vllm.LLM``) on the same model folder, in its own process.

Run by ``bench/eval/eval.py`` after the emserve server has stopped (two engines never share the CPU)::

    .venv/bin/python -m bench.eval.eval_vanilla JOB.json OUT.json

JOB: ``{"model": path, "max_model_len": n, "max_tokens": m, "prompts": [{"id": .., "ids": [..]}],
"prefill_tokens": [n, ..], "prefill_reps": r}``. Each prompt is answered alone, greedy, with
``max_tokens`` (wall time recorded). ``prefill_tokens``: prompts of that many tokens with
``max_tokens=1``, timed ``prefill_reps`` times (prefill throughput). ``decode``: ``[{"id": .., "ids": [..],
"max_tokens": n}]``, each prompt generated greedily with ``ignore_eos`` ``decode_reps`` times (default 3),
streamed, its decode rate ``(n - 1) / (last token - first token)`` recorded (the server's ``tokens_per_s``
rule). vLLM runs with chunked prefill
in chunks of 512 tokens (emserve's ``exc_block_size``), the job's ``dtype`` (default bfloat16; ``auto``: the
server's rule, ``EngineConfig``), no prefix caching, eager mode,
the same KV-cache size as the server (2 GiB, ``kv_cache_memory_bytes``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.eval.common import module_command

CHUNK = 512


def run(job: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from emserve.server.engine.config import EngineConfig, gpu_build, kv_cache_bytes
    from emserve.server.engine.vllm_engine import _prepare_env

    cfg = EngineConfig(model=job["model"], kv_cache_gib=2, dtype=job.get("dtype", "bfloat16"))
    _prepare_env(cfg)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=cfg.dtype, max_model_len=job["max_model_len"], enforce_eager=True,
              enable_prefix_caching=False, enable_chunked_prefill=True, max_num_batched_tokens=CHUNK,
              max_num_seqs=16, seed=0,
              kv_cache_memory_bytes=None if gpu_build() else kv_cache_bytes(cfg.kv_cache_gib))
    start_s = time.perf_counter() - t0
    greedy = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0)
    answers = []
    for i, p in enumerate(job["prompts"]):
        t = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=p["ids"])], greedy, use_tqdm=False)[0].outputs[0]
        answers.append({"id": p["id"], "text": out.text, "token_ids": list(out.token_ids),
                        "seconds": time.perf_counter() - t, "prompt_tokens": len(p["ids"])})
        print(f"vanilla {i + 1}/{len(job['prompts'])} {p['id']}: {out.text[:24]!r}", file=sys.stderr, flush=True)
    prefill = []
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for n in job.get("prefill_tokens", []):
        ids = (job["filler"] * (n // max(1, len(job["filler"])) + 1))[:n]
        for r in range(int(job.get("prefill_reps", 2))):
            t = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=ids)], one, use_tqdm=False)
            dt = time.perf_counter() - t
            prefill.append({"tokens": n, "rep": r, "seconds": dt, "tok_s": n / dt})
            print(f"vanilla prefill {n} tokens: {n / dt:.0f} tok/s", file=sys.stderr, flush=True)
    decode = [dict(d, **_decode_rate(llm, d, r)) for d in job.get("decode", [])
              for r in range(int(job.get("decode_reps", 3)))]
    for d in decode:
        d.pop("ids", None)
    return {"start_s": start_s, "chunk_tokens": CHUNK, "answers": answers, "prefill": prefill, "decode": decode,
            "dtype": cfg.dtype}


def _decode_rate(llm: Any, d: dict[str, Any], rep: int) -> dict[str, Any]:
    """One greedy generation of ``d["max_tokens"]`` tokens after ``d["ids"]``, streamed through the engine's
    step loop: the time of each new token, and the decode rate between the first and the last."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=int(d["max_tokens"]), temperature=0.0, ignore_eos=True)
    rid = f"decode-{d['id']}-{rep}"
    engine.add_request(rid, TokensPrompt(prompt_token_ids=d["ids"]), params)
    t0 = time.perf_counter()
    stamps: list[float] = []
    n = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid and len(out.outputs[0].token_ids) > n:
                n = len(out.outputs[0].token_ids)
                stamps.append(time.perf_counter())
    rate = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else 0.0
    print(f"vanilla decode {d['id']} ({len(d['ids'])} tokens of context): {rate:.1f} tok/s", file=sys.stderr,
          flush=True)
    return {"rep": rep, "context_tokens": len(d["ids"]), "tokens": n, "first_token_s": stamps[0] - t0,
            "tokens_per_s": rate}


def run_subprocess(job: dict[str, Any], workdir: Path, timeout: float | None = None) -> dict[str, Any]:
    """Run ``job`` in a fresh Python process (this file as a script); returns its results. Its output
    goes to ``workdir/vanilla.log``; its progress lines are echoed on stderr."""
    jp, op = workdir / "vanilla-job.json", workdir / "vanilla-out.json"
    jp.write_text(json.dumps(job))
    with open(workdir / "vanilla.log", "w") as logf:
        argv, env = module_command("bench.eval.eval_vanilla")
        proc = subprocess.Popen([*argv, str(jp), str(op)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            if line.startswith("vanilla"):
                print(f"[{time.strftime('%H:%M:%S')}] {line.rstrip()}", file=sys.stderr, flush=True)
        rc = proc.wait(timeout)
    if rc != 0 or not op.exists():
        raise RuntimeError(f"vanilla vLLM run failed ({rc}); see {workdir / 'vanilla.log'}")
    return dict(json.loads(op.read_text()))


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out = run(job)
    Path(sys.argv[2]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()

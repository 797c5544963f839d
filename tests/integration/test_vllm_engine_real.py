"""Acceptance checks of the engine on the real default model (SmolLM2-135M-Instruct), vLLM vs HF oracle.

Window: [4 sink | two non-adjacent earlier ranges of a long text | 256 local (incl. anchor) | 32 new],
every range placed at window positions other than those it was computed at (keys re-rotated).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from emserve.retrieval.kvlog import KVLog
from emserve.retrieval.plan import Anchor, Segment, WindowPlan
from emserve.server.engine.base import SamplingSpec, StepOptions, StepResult
from emserve.server.engine.config import EngineConfig

pytestmark = pytest.mark.slow
vllm = pytest.importorskip("vllm")

from emserve.server.engine.reference import ReferenceEngine  # noqa: E402
from emserve.server.engine.vllm_engine import VLLMEngine  # noqa: E402

FP32_TOL = 1e-3  # the bound for per-token logprobs in fp32
# bf16: both engines round activations to bf16 at different points (vLLM's fused CPU kernels vs HF
# eager); measured max |Δ logprob| on this plan is ~0.05-0.1, so the documented bound is 0.25 nats.
BF16_TOL = 0.25


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from emserve.server.provision.models import resolve_model

    return Path(resolve_model(None).path)


@pytest.fixture(scope="module")
def text_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    from emserve.server.provision.corpus import load_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    return list(tok(load_text("big")[20_000:40_000])["input_ids"])


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def _plans(log: str, ids: list[int], cap: str | None) -> tuple[WindowPlan, WindowPlan]:
    sink = Segment(log, 0, 4)
    a, b = Segment(log, 200, 400), Segment(log, 700, 900)
    local = Segment(log, 1200, 1455)  # + anchor 1455 = 256 local tokens
    new = ids[1456:1488]
    shared = WindowPlan.build(new, [sink, a, b, local], anchor=Anchor(log, 1455), capture_log=cap)
    n_layers = 30
    per_layer = [
        [sink, a, b, local] if layer % 2 == 0 else [sink, Segment(log, 300, 500), Segment(log, 1000, 1200), local]
        for layer in range(n_layers)
    ]
    layered = WindowPlan.build(new, layer_segments=per_layer, anchor=Anchor(log, 1455))
    return shared, layered


def _comparable(rv: StepResult, rr: StepResult, tol: float, name: str) -> int:
    """How many greedy tokens the engine and the oracle share: all of them, or up to a position where the
    oracle's top tokens are within ``tol`` nats of each other (a near-tie the engines' rounding may break
    either way; after it they continue different texts) and the engine's token is one of those."""
    m = 0
    while m < len(rr.output_token_ids) and m < len(rv.output_token_ids) \
            and rv.output_token_ids[m] == rr.output_token_ids[m]:
        m += 1
    if m < len(rr.output_token_ids):
        top = rr.top_logprobs[m]
        mine = rv.output_token_ids[m]
        assert mine in top and max(top.values()) - top[mine] <= tol, (name, m, mine, top)
    return m


def _compare(dtype: str, tol: float, model_dir: Path, text_ids: list[int], loop, tmp: Path) -> dict[str, float]:
    cfg = EngineConfig(model=str(model_dir), dtype=dtype, log_dtype="float32", max_model_len=4096, kv_cache_gib=1)
    v = VLLMEngine(cfg)
    r = ReferenceEngine(str(model_dir), dtype=dtype, log_dtype="float32", max_model_len=4096)
    try:
        log = str(tmp / "src")
        loop.run_until_complete(v.step(WindowPlan.build(text_ids[:1456], capture_log=log), options=StepOptions()))
        spec = SamplingSpec(max_tokens=16, ignore_eos=True, top_logprobs=2)
        errs: dict[str, float] = {}
        shared_v, layered = _plans(log, text_ids, str(tmp / "cap_v"))
        shared_r, _ = _plans(log, text_ids, str(tmp / "cap_r"))
        for name, pv, pr in (("shared", shared_v, shared_r), ("per_layer", layered, layered)):
            rv = loop.run_until_complete(v.step(pv, spec))
            rr = r.run(pr, spec)
            assert rv.num_injected == 4 + 200 + 200 + 255
            n = _comparable(rv, rr, tol, name)
            errs[f"{name}_gen_logprob"] = float(np.abs(np.subtract(rv.output_logprobs[:n],
                                                                   rr.output_logprobs[:n])).max(initial=0.0))
            errs[f"{name}_tokens_shared"] = n
            errs[f"{name}_surprise"] = float(np.abs(rv.surprise - rr.surprise).max())
            assert errs[f"{name}_gen_logprob"] < tol, errs
            assert errs[f"{name}_surprise"] < tol, errs
        cv, cr = KVLog.open(tmp / "cap_v"), KVLog.open(tmp / "cap_r")
        assert len(cv) == len(cr) == 32
        kerr = max(float((cv.keys(li, 0, 32) - cr.keys(li, 0, 32)).abs().max()) for li in range(30))
        verr = max(float((cv.values(li, 0, 32) - cr.values(li, 0, 32)).abs().max()) for li in range(30))
        kscale = max(float(cr.keys(li, 0, 32).abs().max()) for li in range(30))
        errs["k_rel"], errs["v_abs"] = kerr / kscale, verr
        return errs
    finally:
        loop.run_until_complete(v.close())
        loop.run_until_complete(r.close())


def test_real_model_fp32_matches_oracle(model_dir, text_ids, loop, tmp_path: Path) -> None:
    errs = _compare("float32", FP32_TOL, model_dir, text_ids, loop, tmp_path)
    assert errs["k_rel"] < 1e-4 and errs["v_abs"] < 1e-3, errs
    print("fp32 errors", errs)


def test_real_model_bf16_matches_oracle(model_dir, text_ids, loop, tmp_path: Path) -> None:
    errs = _compare("bfloat16", BF16_TOL, model_dir, text_ids, loop, tmp_path)
    assert errs["k_rel"] < 0.05, errs
    print("bf16 errors", errs)


def test_plain_run_equals_vanilla_vllm(model_dir, text_ids, loop) -> None:
    """No injection: the EM engine's greedy output and prompt logprobs equal a stock vLLM engine's.

    fp32: in bf16 the logits of this prompt's first generated token are *exactly* tied between three
    tokens (-1.5974 each), so the greedy pick is an arbitrary tie-break, not a property of emserve.
    """
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    prompt = text_ids[:600]
    vanilla = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=str(model_dir),
            dtype="float32",
            max_model_len=4096,
            kv_cache_memory_bytes=1 << 30,  # not VLLM_CPU_KVCACHE_SPACE: it would size later engines too
            enforce_eager=True,
            enable_prefix_caching=False,
            disable_log_stats=True,
        )
    )

    async def run_vanilla():
        sp = SamplingParams(
            max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0, detokenize=False
        )
        final = None
        async for out in vanilla.generate(TokensPrompt(prompt_token_ids=prompt), sp, request_id="vanilla"):
            final = out
        return final

    try:
        ref = loop.run_until_complete(run_vanilla())
    finally:
        vanilla.shutdown()
    ours = VLLMEngine(EngineConfig(model=str(model_dir), dtype="float32", max_model_len=4096, kv_cache_gib=1))
    try:
        res = loop.run_until_complete(ours.step(WindowPlan.build(prompt), SamplingSpec(max_tokens=16, ignore_eos=True)))
    finally:
        loop.run_until_complete(ours.close())
    assert res.output_token_ids == list(ref.outputs[0].token_ids)
    want = np.array([-ref.prompt_logprobs[i][prompt[i]].logprob for i in range(1, len(prompt))])
    # fp32 rounding of two log-softmax kernels over a 49k vocabulary: up to 1.5e-5 apart on AMD EPYC (1e-5 held
    # on the machines before); a wrong position or logit is off by 0.1 and more
    np.testing.assert_allclose(res.surprise[1:], want.astype(np.float32), atol=5e-5)
    assert torch.isfinite(torch.from_numpy(res.surprise)).all()

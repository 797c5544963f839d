"""The HF reference engine against plain transformers forwards, on the tiny Llama and Qwen2 models.

Every oracle here is built independently of the engine's step code: plain forwards, ``model.generate``,
caches assembled by hand from ``RopeSpec`` and HF's own rotary embedding.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from emserve.retrieval.errors import LogError, PlanError
from emserve.retrieval.kvlog import KVLayout, KVLog
from emserve.retrieval.plan import Anchor, Segment, WindowPlan
from emserve.server.engine.base import SamplingSpec, StepOptions, StepResult, TokenDelta
from emserve.server.engine.reference import ReferenceEngine, full_forward_kv

TOL = 1e-5  # fp32, tiny models: observed errors are ~1e-6 (see the engine's report)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def engine(request: pytest.FixtureRequest) -> Iterator[ReferenceEngine]:
    model_dir = request.getfixturevalue("tiny_model_dir" if request.param == "llama" else "tiny_qwen_dir")
    eng = ReferenceEngine(str(model_dir))
    yield eng
    eng.close_logs()


def _stream(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (n,), generator=g).tolist()


def _plain_forward(eng: ReferenceEngine, ids: Sequence[int]) -> tuple[torch.Tensor, Any, tuple]:
    with torch.no_grad():
        out = eng.model(input_ids=torch.tensor([list(ids)]), use_cache=True, output_hidden_states=True)
    return out.logits[0], out.past_key_values, out.hidden_states


def _neg_logp(logits: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
    lp = torch.log_softmax(logits.double(), -1)
    return -lp[torch.arange(len(targets)), torch.tensor(list(targets))].numpy()


def _write_log(path: Path, eng: ReferenceEngine, ids: Sequence[int]) -> None:
    """A log of ``ids`` computed by a plain forward at positions 0..n-1 (not by the engine's step)."""
    _, cache, _ = _plain_forward(eng, ids)
    layers = range(eng.info.num_layers)
    with KVLog.create(path, eng.kv_layout) as log:
        log.append(
            ids,
            np.arange(len(ids)),
            [cache.layers[i].keys[0].transpose(0, 1) for i in layers],
            [cache.layers[i].values[0].transpose(0, 1) for i in layers],
        )


def _hand_step(
    eng: ReferenceEngine, kv: list[tuple[torch.Tensor, torch.Tensor]], ids: Sequence[int], n_gen: int
) -> tuple[np.ndarray, list[int], list[float]]:
    """HF forward of ``ids`` (anchor first) on a hand-filled cache: surprise of ids[1:], greedy ids, log p."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k.transpose(0, 1)[None].contiguous(), v.transpose(0, 1)[None].contiguous(), i)
    n = kv[0][0].shape[0]
    with torch.no_grad():
        out = eng.model(
            input_ids=torch.tensor([list(ids)]),
            position_ids=torch.arange(n, n + len(ids))[None],
            past_key_values=cache,
            use_cache=True,
        )
        surprise = _neg_logp(out.logits[0, :-1], ids[1:])
        toks: list[int] = []
        logps: list[float] = []
        pos, logits = n + len(ids), out.logits[0, -1]
        for _ in range(n_gen):
            toks.append(int(logits.argmax()))
            logps.append(float(torch.log_softmax(logits.double(), -1)[toks[-1]]))
            out = eng.model(
                input_ids=torch.tensor([[toks[-1]]]),
                position_ids=torch.tensor([[pos]]),
                past_key_values=cache,
                use_cache=True,
            )
            pos, logits = pos + 1, out.logits[0, -1]
    return surprise, toks, logps


def _pre_rope(eng: ReferenceEngine, hidden: tuple, layer: int, proj: str) -> torch.Tensor:
    """Pre-RoPE queries or keys ``[n, heads, D]`` of ``layer`` from the plain forward's hidden states."""
    ly = eng.layers[layer]
    with torch.no_grad():
        x = getattr(ly.self_attn, proj)(ly.input_layernorm(hidden[layer][0]))
    return x.view(x.shape[0], -1, eng.info.head_dim)


# ---------------------------------------------------------------------------------------------------
def test_plain_run_matches_hf(engine: ReferenceEngine, tmp_path: Path) -> None:
    ids = _stream(64, seed=1)
    res = engine.run(
        WindowPlan.build(ids, capture_log=str(tmp_path / "log")),
        SamplingSpec(max_tokens=12, ignore_eos=True),
    )
    logits, cache, hidden = _plain_forward(engine, ids)

    assert res.surprise.dtype == np.float32 and res.surprise.shape == (64,)
    assert res.surprise[0] == pytest.approx(math.log(engine.info.vocab_size))
    np.testing.assert_allclose(res.surprise[1:], _neg_logp(logits[:-1], ids[1:]), atol=TOL)
    np.testing.assert_allclose(res.surprise, engine.reference_surprise(ids), atol=TOL)

    log = KVLog.open(tmp_path / "log")
    assert res.log_offset == 0 and len(log) == 64  # generated tokens are not captured
    assert log.tokens().tolist() == ids and log.positions().tolist() == list(range(64))
    ref_k, ref_v = full_forward_kv(engine, ids)
    for i in range(engine.info.num_layers):
        hf_k, hf_v = cache.layers[i].keys[0].transpose(0, 1), cache.layers[i].values[0].transpose(0, 1)
        torch.testing.assert_close(log.keys(i, 0, 64), hf_k, atol=TOL, rtol=0)
        torch.testing.assert_close(log.values(i, 0, 64), hf_v, atol=TOL, rtol=0)
        torch.testing.assert_close(ref_k[i], hf_k, atol=TOL, rtol=0)
        torch.testing.assert_close(ref_v[i], hf_v, atol=TOL, rtol=0)

    # queries: post-RoPE, de-rotated to position 0 == pre-RoPE q_proj output (averaged)
    assert res.queries is not None and res.queries.dtype == np.float32
    assert res.queries.shape == (engine.info.num_layers, engine.info.num_heads, engine.info.head_dim)
    for i in range(engine.info.num_layers):
        np.testing.assert_allclose(res.queries[i], _pre_rope(engine, hidden, i, "q_proj").mean(0), atol=TOL)

    with torch.no_grad():
        gen = engine.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, 64, dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
        )[0, 64:].tolist()
    assert gen and res.output_token_ids[: len(gen)] == gen
    assert len(gen) == 12 or gen[-1] in engine.info.eos_token_ids
    assert res.finish_reason == "length" and len(res.output_token_ids) == 12
    assert set(res.timings) >= {"inject_s", "forward_s", "write_s", "total_s"}


def test_query_tokens_are_the_last_tokens_pre_rope_queries(engine: ReferenceEngine) -> None:
    ids = _stream(40, seed=11)
    res = engine.run(WindowPlan.build(ids), None, StepOptions(surprise=False, query_tokens=6))
    _, _, hidden = _plain_forward(engine, ids)
    n_l, n_h, d = engine.info.num_layers, engine.info.num_heads, engine.info.head_dim
    assert res.query_tokens is not None and res.query_tokens.dtype == np.float32
    assert res.query_tokens.shape == (6, n_l, n_h, d)
    for i in range(n_l):
        np.testing.assert_allclose(res.query_tokens[:, i], _pre_rope(engine, hidden, i, "q_proj")[-6:], atol=TOL)
    every = engine.run(WindowPlan.build(ids), None, StepOptions(surprise=False, query_tokens=100))
    assert every.query_tokens is not None and every.query_tokens.shape[0] == 40  # capped at the new tokens
    np.testing.assert_allclose(every.query_tokens.mean(0), every.queries, atol=TOL)
    assert engine.run(WindowPlan.build(ids), None, StepOptions(surprise=False)).query_tokens is None


def test_chunked_ingestion_equals_full_forward(engine: ReferenceEngine, tmp_path: Path) -> None:
    """Inject everything seen so far + recompute the last token as anchor: exact when nothing is dropped."""
    ids = _stream(200, seed=2)
    log = str(tmp_path / "log")
    chunks = [37, 1, 50, 64, 48]
    surprise, off = [], 0
    for c in chunks:
        new = ids[off : off + c]
        if off == 0:
            plan = WindowPlan.build(new, capture_log=log)
        else:
            segs = [Segment(log, 0, off - 1)] if off > 1 else []
            plan = WindowPlan.build(new, segs, anchor=Anchor(log, off - 1), capture_log=log)
        res = engine.run(plan)
        assert res.log_offset == off and res.num_injected == max(off - 1, 0)
        surprise.append(res.surprise)
        off += c
    logits, cache, _ = _plain_forward(engine, ids)
    full = engine.reference_surprise(ids)
    got = np.concatenate(surprise)
    assert got[0] == full[0]
    np.testing.assert_allclose(got[1:], _neg_logp(logits[:-1], ids[1:]), atol=TOL)

    rd = KVLog.open(log)
    assert rd.tokens().tolist() == ids and rd.positions().tolist() == list(range(200))
    for i in range(engine.info.num_layers):
        torch.testing.assert_close(
            rd.keys(i, 0, 200), cache.layers[i].keys[0].transpose(0, 1), atol=TOL, rtol=0
        )
        torch.testing.assert_close(
            rd.values(i, 0, 200), cache.layers[i].values[0].transpose(0, 1), atol=TOL, rtol=0
        )


def test_rerotation_matches_hand_built_cache(engine: ReferenceEngine, tmp_path: Path) -> None:
    ids = _stream(100, seed=3)
    _write_log(tmp_path / "a", engine, ids)
    a = str(tmp_path / "a")
    new = _stream(9, seed=4)
    # sink [0, 4) stays at 0..3; [40, 80) computed at 40..79 is placed at window 4..43 (delta -36)
    plan = WindowPlan.build(new, [Segment(a, 0, 4), Segment(a, 40, 80)], anchor=Anchor(a, 80))
    res = engine.run(plan, SamplingSpec(max_tokens=6, ignore_eos=True))

    rd = KVLog.open(a)
    _, _, hidden = _plain_forward(engine, ids)
    rotary = engine.model.model.rotary_emb
    apply_rope = sys.modules[type(engine.layers[0].self_attn).__module__].apply_rotary_pos_emb
    kv, kv_unrotated = [], []
    for i in range(engine.info.num_layers):
        moved = engine.rope.rotate(rd.keys(i, 40, 80), torch.full((40,), -36))
        # independent check of RopeSpec: HF's rotary embedding applied to the pre-RoPE keys at 4..43
        k0 = _pre_rope(engine, hidden, i, "k_proj")[40:80].transpose(0, 1)[None]
        cos, sin = rotary(k0, torch.arange(4, 44)[None])
        hf_moved, _ = apply_rope(k0, k0, cos, sin)
        torch.testing.assert_close(moved, hf_moved[0].transpose(0, 1), atol=TOL, rtol=0)
        v = torch.cat([rd.values(i, 0, 4), rd.values(i, 40, 80)])
        kv.append((torch.cat([rd.keys(i, 0, 4), moved]), v))
        kv_unrotated.append((torch.cat([rd.keys(i, 0, 4), rd.keys(i, 40, 80)]), v))

    surprise, toks, logps = _hand_step(engine, kv, [ids[80], *new], 6)
    np.testing.assert_allclose(res.surprise, surprise, atol=TOL)
    assert res.output_token_ids == toks
    np.testing.assert_allclose(res.output_logprobs, logps, atol=TOL)
    wrong, _, _ = _hand_step(engine, kv_unrotated, [ids[80], *new], 0)
    assert np.abs(wrong - surprise).max() > 1e-3  # the rotation is observable


def test_per_layer_segments(engine: ReferenceEngine, tmp_path: Path) -> None:
    ids = _stream(100, seed=5)
    _write_log(tmp_path / "a", engine, ids)
    a = str(tmp_path / "a")
    new = _stream(8, seed=6)
    shared = [Segment(a, 0, 4), Segment(a, 40, 80)]
    per_layer = [[Segment(a, 0, 44)]] + [shared] * (engine.info.num_layers - 1)
    res_shared = engine.run(WindowPlan.build(new, shared, anchor=Anchor(a, 80)))
    res = engine.run(
        WindowPlan.build(new, layer_segments=per_layer, anchor=Anchor(a, 80)),
        SamplingSpec(max_tokens=5, ignore_eos=True),
    )
    assert np.abs(res.surprise - res_shared.surprise).max() > 1e-3
    assert res.queries is not None and res_shared.queries is not None
    np.testing.assert_allclose(res.queries[0], res_shared.queries[0], atol=TOL)  # layer 0 input is the same

    rd = KVLog.open(a)
    kv = [(rd.keys(0, 0, 44), rd.values(0, 0, 44))]
    for i in range(1, engine.info.num_layers):
        moved = engine.rope.rotate(rd.keys(i, 40, 80), torch.full((40,), -36))
        kv.append(
            (torch.cat([rd.keys(i, 0, 4), moved]), torch.cat([rd.values(i, 0, 4), rd.values(i, 40, 80)]))
        )
    surprise, toks, _ = _hand_step(engine, kv, [ids[80], *new], 5)
    np.testing.assert_allclose(res.surprise, surprise, atol=TOL)
    assert res.output_token_ids == toks


def test_stream_and_sampling(engine: ReferenceEngine, tmp_path: Path) -> None:
    ids = _stream(30, seed=7)

    async def collect(sampling: SamplingSpec) -> tuple[list[int], StepResult]:
        deltas: list[int] = []
        result = None
        async for item in engine.stream(WindowPlan.build(ids), sampling):
            if isinstance(item, TokenDelta):
                deltas.extend(item.token_ids)
            else:
                result = item
        assert result is not None
        return deltas, result

    greedy = SamplingSpec(max_tokens=8, ignore_eos=True)
    deltas, res = asyncio.run(collect(greedy))
    assert deltas == res.output_token_ids == engine.run(WindowPlan.build(ids), greedy).output_token_ids

    hot = SamplingSpec(max_tokens=8, temperature=1.5, top_p=0.9, top_k=50, seed=11, ignore_eos=True)
    a, b = engine.run(WindowPlan.build(ids), hot), engine.run(WindowPlan.build(ids), hot)
    assert a.output_token_ids == b.output_token_ids
    top1 = SamplingSpec(max_tokens=8, temperature=1.0, top_k=1, seed=3, ignore_eos=True)
    assert engine.run(WindowPlan.build(ids), top1).output_token_ids == res.output_token_ids

    stop_at = res.output_token_ids[3]
    first = res.output_token_ids.index(stop_at)
    stopped = engine.run(WindowPlan.build(ids), SamplingSpec(max_tokens=8, stop_token_ids=(stop_at,)))
    assert stopped.output_token_ids == res.output_token_ids[: first + 1] and stopped.finish_reason == "stop"

    no_out = engine.run(WindowPlan.build(ids), None, StepOptions(surprise=False, queries=False))
    assert no_out.surprise.shape == (0,) and no_out.queries is None and no_out.output_token_ids == []
    assert no_out.log_offset is None and no_out.finish_reason is None


def test_plan_validation(engine: ReferenceEngine, tmp_path: Path) -> None:
    ids = _stream(20, seed=8)
    _write_log(tmp_path / "a", engine, ids)
    a = str(tmp_path / "a")
    seg = Segment(a, 0, 10)
    with pytest.raises(PlanError, match="layers"):
        engine.run(
            WindowPlan.build([5], layer_segments=[[seg]] * (engine.info.num_layers + 1), anchor=Anchor(a, 10))
        )
    with pytest.raises(PlanError, match="anchor"):
        engine.run(WindowPlan.build([5], [seg]))
    with pytest.raises(PlanError, match="vocabulary"):
        engine.run(WindowPlan.build([5, engine.info.vocab_size]))
    with pytest.raises(PlanError, match="vocabulary"):
        engine.run(WindowPlan.build([-1]))
    with pytest.raises(PlanError, match="max_model_len"):
        engine.run(WindowPlan.build([5] * engine.info.max_model_len))
    with pytest.raises(LogError, match="outside"):
        engine.run(WindowPlan.build([5], [Segment(a, 10, 21)], anchor=Anchor(a, 3)))
    with pytest.raises(LogError):
        engine.run(WindowPlan.build([5], [seg], anchor=Anchor(a, 20)))
    with pytest.raises(LogError, match="no KV log"):
        engine.run(WindowPlan.build([5], [Segment(str(tmp_path / "missing"), 0, 1)], anchor=Anchor(a, 3)))
    other = KVLayout(engine.info.num_layers, engine.info.num_kv_heads * 2, engine.info.head_dim, "float32")
    KVLog.create(tmp_path / "other", other).close()
    with pytest.raises(LogError, match="layout"):
        engine.run(WindowPlan.build([5], capture_log=str(tmp_path / "other")))

    async def first_item() -> object:
        return await engine.stream(WindowPlan.build([5], [seg])).__anext__()

    with pytest.raises(PlanError):
        asyncio.run(first_item())
    # without surprise, an injected window needs no anchor
    res = engine.run(WindowPlan.build([5, 6], [seg]), options=StepOptions(surprise=False))
    assert res.num_injected == 10 and res.queries is not None


def test_bfloat16_log_round_trip(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A bf16 log is widened to float32 before re-rotation; chunked ingestion stays close to exact."""
    eng = ReferenceEngine(str(tiny_model_dir), log_dtype="bfloat16")
    try:
        ids = _stream(60, seed=9)
        log = str(tmp_path / "log")
        first = eng.run(WindowPlan.build(ids[:30], capture_log=log))
        second = eng.run(
            WindowPlan.build(ids[30:], [Segment(log, 0, 29)], anchor=Anchor(log, 29), capture_log=log)
        )
        assert KVLog.open(log).layout.dtype == "bfloat16" and second.log_offset == 30
        full = eng.reference_surprise(ids)
        np.testing.assert_allclose(first.surprise, full[:30], atol=TOL)
        np.testing.assert_allclose(second.surprise, full[30:], atol=5e-2)
    finally:
        eng.close_logs()


def test_refuses_unsupported_models(tmp_path: Path) -> None:
    from tinymodel import make_tiny_llama
    from transformers import AutoConfig

    from emserve.server.engine.rope import UnsupportedModelError

    path = make_tiny_llama(tmp_path / "m", num_layers=1, arch="llama")
    with pytest.raises(ValueError, match="max_model_len"):
        ReferenceEngine(str(path), max_model_len=10**6)
    cfg = AutoConfig.from_pretrained(path)
    cfg.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    cfg.save_pretrained(path)
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        ReferenceEngine(str(path))

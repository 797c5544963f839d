"""RopeSpec re-rotation against HF's own rotary embeddings, for every supported RoPE type."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from emserve.server.engine.rope import RopeSpec, UnsupportedModelError

BASE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
CASES = {
    "default": {"rope_type": "default", "rope_theta": 100000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
}


def _hf_rotate(cfg: LlamaConfig, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """HF's RoPE (incl. attention scaling) applied to pre-RoPE ``x [n, heads, hd]`` at ``pos``."""
    emb = LlamaRotaryEmbedding(cfg)
    xt = x.transpose(0, 1)[None].double()
    cos, sin = emb(xt, pos[None])
    out, _ = apply_rotary_pos_emb(xt, xt, cos.double(), sin.double())
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("name", list(CASES))
def test_delta_rotation_matches_hf(name: str) -> None:
    cfg = LlamaConfig(**BASE, rope_parameters=CASES[name], architectures=["LlamaForCausalLM"])
    spec = RopeSpec.from_hf_config(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, 64, generator=g, dtype=torch.float64)
    src = torch.randint(0, 3000, (50,), generator=g)
    dst = torch.randint(0, 3000, (50,), generator=g)
    at_src = _hf_rotate(cfg, x, src)
    at_dst = _hf_rotate(cfg, x, dst)
    moved = spec.rotate(at_src, dst - src)
    # HF computes its angles in fp32 (error ~ position x 6e-8 rad, ~2e-4 at position 3000); ours in fp64
    torch.testing.assert_close(moved, at_dst, atol=2e-3, rtol=0)
    wrong = spec.rotate(at_src, dst - src + 1)
    assert (wrong - at_dst).abs().max() > 0.05
    # de-rotation to position 0 gives the pre-RoPE vector (times the yarn attention factor, if any)
    back = spec.rotate(at_src, -src)
    scale = _hf_rotate(cfg, x[:1], torch.zeros(1, dtype=torch.long)).norm() / x[:1].norm()  # yarn's factor
    torch.testing.assert_close(back, x * scale, atol=2e-3, rtol=0)


def test_partial_rotary_leaves_the_tail_alone() -> None:
    cfg = Qwen2Config(
        **BASE,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
        architectures=["Qwen2ForCausalLM"],
    )
    spec = RopeSpec.from_hf_config(cfg)
    assert spec.rot_dim == 32 and spec.head_dim == 64
    x = torch.randn(5, 2, 64)
    y = spec.rotate(x, torch.full((5,), 17))
    assert torch.equal(y[..., 32:], x[..., 32:])
    torch.testing.assert_close(spec.rotate(y, torch.full((5,), -17)), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "params", [{"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, {"rope_type": "longrope", "rope_theta": 1e4}]
)
def test_sequence_length_dependent_rope_is_refused(params: dict) -> None:
    cfg = LlamaConfig(**BASE, architectures=["LlamaForCausalLM"])
    cfg.rope_parameters = params
    with pytest.raises(UnsupportedModelError, match="re-rotated"):
        RopeSpec.from_hf_config(cfg)


def test_unknown_architecture_is_refused() -> None:
    cfg = LlamaConfig(**BASE, architectures=["GPTJForCausalLM"])
    with pytest.raises(UnsupportedModelError, match="rotate-half"):
        RopeSpec.from_hf_config(cfg)


def test_bf16_rotation_is_computed_in_fp32() -> None:
    spec = RopeSpec.from_hf_config(LlamaConfig(**BASE, architectures=["LlamaForCausalLM"]))
    x = torch.randn(8, 2, 64)
    y = spec.rotate(x.bfloat16(), torch.full((8,), 1000))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), spec.rotate(x, torch.full((8,), 1000)), atol=0.05, rtol=0.02)

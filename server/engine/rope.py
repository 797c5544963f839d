"""RoPE re-rotation of cached keys (and de-rotation of queries) by a position difference.

Engines cache keys *after* RoPE. A key computed at position p and placed at window position p' is
re-rotated by Δ = p' − p: ``R(p') k₀ = R(Δ) R(p) k₀`` — exact for RoPE variants whose inverse
frequencies do not depend on the sequence length (default, linear, llama3, yarn; partial rotary).
YaRN's attention factor (mscale) scales cos/sin equally at every position and is already inside the
stored key, so Δ-rotation uses the bare frequencies. Sequence-length-dependent variants (dynamic
NTK, longrope) cannot be re-rotated exactly and are refused.

Only the neox / rotate-half layout is supported (Llama, Mistral, Qwen2, ... in both HF and vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from emserve.retrieval.errors import EmserveError

# Architectures known to use neox-style (rotate-half) RoPE in both HF and vLLM.
NEOX_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
EXACT_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(EmserveError):
    """The model's positional encoding cannot be re-rotated exactly."""


@dataclass(frozen=True)
class RopeSpec:
    inv_freq: torch.Tensor  # float64 [rot_dim / 2]
    rot_dim: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, config: Any) -> RopeSpec:
        archs = tuple(getattr(config, "architectures", None) or ())
        if archs and not any(a in NEOX_ARCHITECTURES for a in archs):
            raise UnsupportedModelError(
                f"architecture {archs} is not known to use rotate-half RoPE; supported: {NEOX_ARCHITECTURES}"
            )
        params = dict(getattr(config, "rope_parameters", None) or {})
        legacy = getattr(config, "rope_scaling", None)
        if isinstance(legacy, dict):
            params = {**legacy, **params}
        if "rope_theta" not in params and hasattr(config, "rope_theta"):
            params["rope_theta"] = config.rope_theta
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in EXACT_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} depends on sequence length and cannot be re-rotated exactly; "
                f"supported: {EXACT_ROPE_TYPES}"
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        partial = float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)
        rot_dim = int(head_dim * partial)
        if rope_type == "default":
            base = float(params["rope_theta"])
            inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv32, _attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, None)
            inv = inv32.to(torch.float64)
            rot_dim = 2 * inv.shape[0]
        return cls(inv_freq=inv, rot_dim=rot_dim, head_dim=int(head_dim))

    def angles(self, delta: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of the rotation by ``delta [n]`` positions, ``[n, 1, rot_dim / 2]`` (angles in fp64)."""
        ang = delta.to(torch.float64)[:, None] * self.inv_freq[None, :]
        return ang.cos().to(dtype)[:, None, :], ang.sin().to(dtype)[:, None, :]

    def rotate(
        self, x: torch.Tensor, delta: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Rotate ``x [n, heads, head_dim]`` by ``delta [n]`` positions (any sign). Returns x's dtype.

        Computed in float32 (float64 when x is float64); the angles in float64. ``angles`` (from
        :meth:`angles` for the same ``delta``) skips recomputing them when many layers share a delta.
        """
        if x.shape[0] == 0:
            return x.clone()
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        rd = self.rot_dim
        cos, sin = angles if angles is not None else self.angles(delta.cpu(), work)
        cos, sin = cos.to(x.device, work), sin.to(x.device, work)  # angles on the CPU (fp64), applied where x is
        xr = x[..., :rd].to(work)
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        if rd == x.shape[-1]:
            return out
        return torch.cat([out, x[..., rd:]], dim=-1)

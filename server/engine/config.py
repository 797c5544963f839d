"""Engine configuration (one frozen dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from emserve.retrieval.errors import EmserveError


class ConfigError(EmserveError, ValueError):
    """A configuration value is invalid."""


@dataclass(frozen=True)
class EngineConfig:
    model: str
    """Path of an HF model folder (``emserve.server.models.resolve_model`` turns names into paths)."""

    backend: Literal["vllm", "reference"] = "vllm"
    """``vllm``: the product engine (AsyncLLM, engine core in its own process). ``reference``: the HF
    transformers engine (test oracle; fallback where vLLM is not installed)."""

    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    """Compute dtype of the model."""

    log_dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    """dtype of K/V in the session KV logs on disk."""

    max_model_len: int | None = None
    """Longest window (tokens). None: the model's native context (max_position_embeddings)."""

    kv_cache_gib: float = 2.0
    """vLLM KV-cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``), GiB."""

    gpu_memory_utilization: float = 0.85
    """Fraction of GPU memory vLLM may take (CUDA only)."""

    max_num_seqs: int = 16
    """Most requests (session steps) vLLM batches together."""

    max_num_batched_tokens: int | None = None
    """Token budget of one vLLM step. None: max_model_len (a whole window fits in one step)."""

    enforce_eager: bool = True
    """No torch.compile / CUDA graphs (fast start; on CPU compile gains ~20% decode for 3x start)."""

    scratch_dir: str | None = None
    """Where the engine core writes per-step results. None: a fresh temp dir."""

    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ConfigError("max_model_len must be >= 16")
        if self.kv_cache_gib <= 0:
            raise ConfigError("kv_cache_gib must be > 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be >= 1")

"""Engine configuration (one frozen dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from emserve.retrieval.errors import ConfigError


@dataclass(frozen=True)
class EngineConfig:
    model: str
    """Path of an HF model folder (``emserve.server.provision.models.resolve_model`` turns names into paths)."""

    backend: Literal["vllm", "reference"] = "vllm"
    """``vllm``: the product engine (AsyncLLM, engine core in its own process). ``reference``: the HF
    transformers engine (test oracle; fallback where vLLM is not installed)."""

    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """Compute dtype of the model. ``auto`` resolves on construction (:func:`auto_dtype`): bfloat16
    on a GPU build or a CPU with native bf16 arithmetic, float32 on other CPUs."""

    log_dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    """dtype of K/V in the session KV logs on disk."""

    max_model_len: int | None = None
    """Longest window (tokens). None: the model's native context (max_position_embeddings)."""

    kv_cache_gib: float = 2.0
    """vLLM KV-cache size on CPU, GiB (fractions too: :func:`kv_cache_bytes`). It must hold one window of
    ``max_model_len`` tokens (vLLM refuses to start otherwise); what it holds beyond that is how many
    steps run at once. Ignored on a GPU (``gpu_memory_utilization`` sizes it there)."""

    gpu_memory_utilization: float = 0.85
    """Fraction of GPU memory vLLM may take (CUDA only)."""

    max_num_seqs: int = 16
    """Most requests (session steps) vLLM batches together."""

    ingest_slots: int | None = None
    """Ingestion steps in the engine at once, all sessions together (0: no limit); questions go first
    either way (``emserve.server.engine.admission``). None resolves on construction
    (:func:`auto_ingest_slots`): 1 with a CPU-only torch, else 0."""

    deterministic: bool = False
    """One session step at a time in the engine (``emserve.server.engine.admission``, rule 4), so that a
    session's surprise, events and answers do not depend on other sessions' traffic. Off: steps of
    different sessions share vLLM batches, which changes their floating-point results slightly."""

    max_num_batched_tokens: int | None = None
    """Token budget of one vLLM iteration, all requests together (vLLM's ``max_num_batched_tokens``). A
    step with more new tokens runs over several iterations (chunked prefill), so a question that arrives
    while another session's step is in the engine waits at most one iteration. 0: max_model_len (a whole
    window in one iteration). None resolves on construction (:func:`auto_iteration_budget`). vLLM only."""

    long_prefill_token_threshold: int | None = None
    """Most new tokens of one request per iteration while other requests wait or run (vLLM's
    ``long_prefill_token_threshold``; vLLM lets a lone request use the whole budget), so that a question
    shares the iteration after its arrival with an ingestion step instead of waiting for all of it.
    0: no cap. None resolves on construction (:func:`auto_iteration_budget`). vLLM only."""

    enforce_eager: bool = True
    """No torch.compile / CUDA graphs: a fast start (``docs/decisions.md``, "Eager mode")."""

    scratch_dir: str | None = None
    """Where the engine core writes per-step results. None: a fresh temp dir."""

    seed: int = 0

    log_stats: bool = False
    """vLLM's own statistics: its ``vllm:*`` Prometheus metrics in this process's default registry
    (the server turns them on with its metrics port)."""

    def __post_init__(self) -> None:
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", auto_dtype())
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ConfigError("max_model_len must be >= 16")
        if self.kv_cache_gib <= 0:
            raise ConfigError("kv_cache_gib must be > 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be >= 1")
        auto_budget, auto_cap = auto_iteration_budget()
        budget = auto_budget if self.max_num_batched_tokens is None else self.max_num_batched_tokens
        cap = auto_cap if self.long_prefill_token_threshold is None else self.long_prefill_token_threshold
        if budget < 0 or 0 < budget < self.max_num_seqs:
            raise ConfigError(f"max_num_batched_tokens must be 0 (max_model_len) or >= max_num_seqs "
                              f"({self.max_num_seqs}), got {budget}")
        if cap < 0:
            raise ConfigError(f"long_prefill_token_threshold must be >= 0 (0: no cap), got {cap}")
        if self.max_model_len is not None and cap > self.max_model_len:
            raise ConfigError(f"long_prefill_token_threshold must be <= max_model_len ({self.max_model_len}), "
                              f"got {cap}")
        object.__setattr__(self, "max_num_batched_tokens", budget)
        object.__setattr__(self, "long_prefill_token_threshold", cap)
        slots = auto_ingest_slots() if self.ingest_slots is None else self.ingest_slots
        if slots < 0:
            raise ConfigError(f"ingest_slots must be >= 0 (0: no limit), got {slots}")
        object.__setattr__(self, "ingest_slots", slots)


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def kv_cache_bytes(gib: float) -> int:
    """vLLM's ``kv_cache_memory_bytes`` for a CPU KV cache of ``gib`` GiB (vLLM's own
    ``VLLM_CPU_KVCACHE_SPACE`` takes whole GiB only)."""
    if gib <= 0:
        raise ConfigError(f"kv_cache_gib must be > 0, got {gib}")
    return int(gib * (1 << 30))


def gpu_build() -> bool:
    """Whether torch is a CUDA or ROCm build (the ``auto`` defaults below split on it, not on a visible GPU)."""
    import torch

    return torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None


def auto_ingest_slots() -> int:
    """The ``ingest_slots`` that None stands for. Rule: 1 with a CPU-only torch build, else 0 (no limit).

    On a CPU, steps batched together take as long as run one after another, so a question waits behind
    every ingestion step in the engine, and batching gained nothing in ingest throughput either (measured
    with 8 sessions: docs/reliability.md, "Load"). A GPU's batching is where its throughput comes from;
    there vLLM batches every step (not measured here)."""
    return 0 if gpu_build() else 1


def auto_iteration_budget() -> tuple[int, int]:
    """The ``(max_num_batched_tokens, long_prefill_token_threshold)`` that None stands for. Rule: (256, 64)
    with a CPU-only torch build, else (0, 0): one iteration per step, as vLLM's scheduler was tuned for GPUs.

    On a CPU a 512-token ingestion step takes a second or more in one iteration, and a question arriving
    meanwhile waited for all of it; in 256-token iterations, with a step capped at 64 tokens while a
    question waits, it waits a fraction of that. Measured with 8 sessions ingesting, and what it costs one
    session alone: docs/reliability.md, "Load"."""
    return (0, 0) if gpu_build() else (256, 64)


def auto_dtype(cpuinfo: str | None = None) -> Literal["bfloat16", "float32"]:
    """The compute dtype ``auto`` stands for.

    Rule: bfloat16 unless torch is a CPU-only build and the CPU lacks native bf16 arithmetic (none of
    :data:`BF16_CPU_FLAGS` in ``/proc/cpuinfo``), where float32: without those instructions bf16
    matrix products are emulated and far slower than float32 ones (measured: docs/configuration.md).
    The KV log keeps its own dtype (``log_dtype``) either way. ``cpuinfo``: the text of
    ``/proc/cpuinfo`` (read when None; unreadable: assumed without the flags).
    """
    if gpu_build():
        return "bfloat16"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return "bfloat16" if any(f in flags for f in BF16_CPU_FLAGS) else "float32"

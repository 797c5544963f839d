"""The engine contract shared by the vLLM engine and the HF reference engine.

An engine executes one :class:`~emserve.retrieval.plan.WindowPlan` per call:

* injects the plan's segments (K/V from KV logs, keys re-rotated to their window positions),
* recomputes the anchor token (if any), computes the new tokens,
* appends the new tokens' K/V (post-RoPE, at their window positions) to ``plan.capture_log``,
* reports each new token's surprise ``−log p(token | window before it)`` (natural log), and the
  per-layer mean of the new tokens' *pre-RoPE* queries (the step's retrieval query summary),
* optionally (``StepOptions.query_tokens = n``) the pre-RoPE queries of the last ``n`` new tokens
  one by one (a question's per-token queries: retrieval standardizes and averages them itself),
* optionally generates tokens after the new tokens (``SamplingSpec.max_tokens > 0``), streamed.

Surprise of the very first token of a stream (no anchor and nothing injected: the token has no
context at all) is defined as ``ln(vocab_size)``, the surprise under an uninformed prior.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emserve.retrieval.errors import EmserveError, PlanError
from emserve.retrieval.kvlog import KVLayout
from emserve.retrieval.plan import WindowPlan
from emserve.server.engine.admission import Admission


class EngineError(EmserveError):
    """The engine failed to run a step (not the caller's fault)."""


class EngineDead(EngineError):
    """The engine's processes are gone (killed: the OOM killer under a memory limit, a signal): it runs
    no step again. The server stops and exits for its supervisor to start it again; the sessions are on
    disk (``emserve.server.app``, "Lifecycle")."""

    reason = "ENGINE_DEAD"
    retry_after_s = 5.0


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    dtype: str  # compute dtype: "bfloat16" | "float32" | "float16"
    eos_token_ids: tuple[int, ...] = ()

    def kv_layout(self, log_dtype: str) -> KVLayout:
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_dim, log_dtype)

    @property
    def uninformed_surprise(self) -> float:
        return math.log(self.vocab_size)

    @classmethod
    def from_hf_config(cls, name: str, path: str, config: Any, dtype: str, max_model_len: int) -> ModelInfo:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        eos = config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (int(eos),))
        return cls(
            name=name,
            path=path,
            architecture=(config.architectures or ["?"])[0],
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=int(head_dim),
            vocab_size=config.vocab_size,
            max_model_len=max_model_len,
            dtype=dtype,
            eos_token_ids=eos_ids,
        )


MAX_TEMPERATURE = 100.0  # beyond it sampling is uniform noise; NaN and inf fail every comparison too
MAX_TOP_LOGPROBS = 20
"""The most ``SamplingSpec.top_logprobs`` an engine reports (vLLM's default ``max_logprobs``)."""


class SamplingError(PlanError):
    """A :class:`SamplingSpec` field out of its range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingSpec:
    """Generation after the new tokens. ``max_tokens == 0``: no generation (an ingest or probe step)."""

    max_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0
    """Also report, for each generated token, the log-probabilities of the this-many most likely tokens
    at its position (``StepResult.top_logprobs``; under the model, before temperature / top-k / top-p)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise SamplingError("max_tokens", f"max_tokens must be >= 0, got {self.max_tokens}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingError("top_logprobs",
                                f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # NaN fails too
            raise SamplingError("temperature",
                                f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SamplingError("top_k", f"top_k must be >= 0 (0: off), got {self.top_k}")


@dataclass(frozen=True)
class StepOptions:
    surprise: bool = True
    queries: bool = True
    query_tokens: int = 0
    """Also report the pre-RoPE queries of the last ``query_tokens`` new tokens (needs ``queries``)."""

    def __post_init__(self) -> None:
        if self.query_tokens < 0:
            raise PlanError("query_tokens must be >= 0")


@dataclass
class StepResult:
    request_id: str
    log_offset: int | None  # first log index of the captured new tokens (None: not captured)
    surprise: np.ndarray  # float32 [C]; empty when not requested
    queries: np.ndarray | None  # float32 [num_layers, num_heads, head_dim]; None when not requested
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)  # log p of each generated token
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    """Per generated token, ``{token: log p}`` of the ``SamplingSpec.top_logprobs`` most likely tokens at its
    position (empty when not requested)."""
    finish_reason: str | None = None
    num_injected: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds: ``total_s`` (the whole step, as the caller waited for it), ``inject_s`` (reading the
    window's K/V from the logs into the model's cache, keys re-rotated), ``write_s`` (appending the new
    tokens' K/V to the capture log; 0 without one), ``first_token_s`` (to the first generated token,
    when generating). Engines may add their own."""
    query_tokens: np.ndarray | None = None
    """float32 ``[n, num_layers, num_heads, head_dim]``: pre-RoPE queries of the last
    ``n = min(StepOptions.query_tokens, C)`` new tokens, in order; None when not requested."""


@dataclass(frozen=True)
class TokenDelta:
    """Generated tokens since the previous delta of the same step."""

    token_ids: tuple[int, ...]


class Engine(ABC):
    """Runs WindowPlans. Implementations: ``VLLMEngine`` (product), ``ReferenceEngine`` (HF oracle)."""

    info: ModelInfo
    log_dtype: str

    @property
    def admission(self) -> Admission:
        """The admission rules every session on this engine follows (:mod:`.admission`): one object per
        engine; without one set, questions first and no ingestion slot limit."""
        adm = self.__dict__.get("_admission")
        if adm is None:
            adm = self.admission = Admission()
        return adm

    @admission.setter
    def admission(self, value: Admission) -> None:
        value.listener = self.questions_holding
        self.__dict__["_admission"] = value

    def failure(self) -> str | None:
        """Why the engine can run no step again (its processes died), else None. Default: None (an
        in-process engine fails step by step instead)."""
        return None

    def questions_holding(self, n: int) -> None:  # noqa: B027 - a hook; most engines need nothing
        """Hook: ``n`` questions now hold ingestion back (admission rule 1). Default: nothing."""

    def check_plan(self, plan: WindowPlan, options: StepOptions) -> None:
        plan.check_layers(self.info.num_layers)
        if plan.window_len + 1 > self.info.max_model_len:
            raise PlanError(f"window of {plan.window_len} tokens exceeds max_model_len {self.info.max_model_len}")
        if options.surprise and plan.anchor is None and plan.num_injected > 0:
            raise PlanError("surprise of the first new token needs an anchor when segments are injected")
        bad = [t for t in plan.new_token_ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise PlanError(f"token ids outside the vocabulary (size {self.info.vocab_size}): {bad[:5]}")

    @abstractmethod
    def stream(
        self,
        plan: WindowPlan,
        sampling: SamplingSpec | None = None,
        options: StepOptions = StepOptions(),
    ) -> AsyncIterator[TokenDelta | StepResult]:
        """Run one step; yield TokenDeltas while generating, then exactly one StepResult."""

    async def step(
        self,
        plan: WindowPlan,
        sampling: SamplingSpec | None = None,
        options: StepOptions = StepOptions(),
    ) -> StepResult:
        result: StepResult | None = None
        async for item in self.stream(plan, sampling, options):
            if isinstance(item, StepResult):
                result = item
        if result is None:
            raise EngineError("engine produced no result")
        return result

    def release_log(self, path: str) -> None:
        """Close whatever this engine holds open of the KV log at ``path`` (its session is being
        deleted: the files must go). Logs opened by the engine's other processes are closed there at
        the next step, when their directory is gone. Default: nothing is held."""
        return None

    @abstractmethod
    async def close(self) -> None: ...

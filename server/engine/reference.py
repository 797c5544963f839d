"""The Hugging Face reference engine: the test oracle of the vLLM engine, and the fallback engine.

Contract
--------
* Runs in the server process; every torch call runs in a worker thread (``asyncio.to_thread``) under
  one lock, one forward at a time. Concurrent streams interleave at token granularity (each step owns
  its cache); the caller orders steps that write the same log.
* It is the only writer of the logs named as ``capture_log`` while it runs (one open writer per log,
  kept until :meth:`close` or :meth:`release_log`).
* Same plan, same results as ``VLLMEngine`` (see ``base.py`` and ``emserve.retrieval.plan``):

  1. the injected K/V of layer ``l`` is the concatenation over ``plan.segments_for_layer(l)`` of the
     logged K/V, keys re-rotated from their stored positions to window positions ``0 .. N-1``;
  2. the anchor token (id read from its log) and the new tokens run at positions ``N ..`` on top of
     that cache (HF ``DynamicCache`` + explicit ``position_ids``);
  3. surprise, the de-rotated per-layer query mean (and, on request, the de-rotated queries of the
     last ``StepOptions.query_tokens`` new tokens), and the captured K/V of the new tokens
     (post-RoPE, at their window positions) come from that forward; generation continues from the
     same cache.

Numerics: logged keys are widened to float32, re-rotated (angles in float64), then cast to the compute
dtype once. Surprise is computed in float64 from the logits. ``attn_implementation="eager"`` is the
default (see ``ReferenceEngine.__init__``).

Not supported here: stop *strings* (``SamplingSpec.stop`` is ignored: this engine has no detokenizer
in the loop; stop token ids and EOS are honoured), sliding-window attention, logprobs of generated
tokens. A generated EOS / stop token is included in ``output_token_ids`` (as vLLM does).
``output_logprobs`` are the raw model log-probabilities of the generated tokens (vLLM's default
``raw_logprobs``: before temperature, top-k and top-p).

Size: the oracle reimplements the vLLM engine's contract end to end (injection, prefill, decode,
logs) in one place, so that the two can be compared rule by rule.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from emserve.retrieval.errors import LogError
from emserve.retrieval.kvlog import KVLog
from emserve.retrieval.plan import WindowPlan
from emserve.server.engine.base import (
    Engine,
    EngineError,
    ModelInfo,
    SamplingSpec,
    StepOptions,
    StepResult,
    TokenDelta,
)
from emserve.server.engine.rope import RopeSpec, UnsupportedModelError

_T = TypeVar("_T")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SURPRISE_ROWS = 256  # logits rows widened to float64 at a time
_DEFAULT_OPTIONS = StepOptions()


@dataclass
class _Step:
    """Everything one step carries from its prefill to its last generated token."""

    plan: WindowPlan
    sampling: SamplingSpec | None
    cache: Any  # transformers.DynamicCache
    next_position: int  # window position of the next token fed to the model
    last_logits: torch.Tensor  # float32 [V]: the distribution of the next token
    result: StepResult
    generator: torch.Generator | None = None
    done: bool = False
    t_decode: float = 0.0
    stop_ids: frozenset[int] = field(default_factory=frozenset)


class ReferenceEngine(Engine):
    """Runs WindowPlans with ``transformers`` (eager attention, CPU)."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        log_dtype: str = "float32",
        max_model_len: int | None = None,
        name: str | None = None,
        attn_implementation: str = "eager",
    ) -> None:
        """Load the model.

        ``attn_implementation``: "eager" (default) or "sdpa". Both reproduce vLLM's CPU engine to
        float32 rounding on the tiny models; eager is the plain matmul-softmax-matmul reference and
        does not depend on which SDPA kernel torch picks.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        if dtype not in _DTYPES:
            raise ValueError(f"unsupported compute dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        config = AutoConfig.from_pretrained(model_path)
        self.rope = RopeSpec.from_hf_config(config)  # refuses models it cannot re-rotate exactly
        limit = int(config.max_position_embeddings)
        max_len = limit if max_model_len is None else int(max_model_len)
        if not 0 < max_len <= limit:
            raise ValueError(f"max_model_len {max_len} must be in 1 .. max_position_embeddings ({limit})")
        _refuse_sliding_window(config, max_len)

        self.compute_dtype = _DTYPES[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=self.compute_dtype, attn_implementation=attn_implementation
        ).eval()
        self.model.requires_grad_(False)
        self.layers = _decoder_layers(self.model)
        info = ModelInfo.from_hf_config(name or Path(model_path).name, str(model_path), config, dtype, max_len)
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        gen_eos_ids = (gen_eos,) if isinstance(gen_eos, int) else tuple(gen_eos or ())
        extra_eos = tuple(int(t) for t in gen_eos_ids if int(t) not in info.eos_token_ids)
        self.info = replace(info, eos_token_ids=info.eos_token_ids + extra_eos)
        if len(self.layers) != self.info.num_layers:
            raise UnsupportedModelError(f"found {len(self.layers)} decoder layers, config says {self.info.num_layers}")
        self.log_dtype = log_dtype
        self.kv_layout = self.info.kv_layout(log_dtype)  # validates log_dtype
        self.attn_implementation = attn_implementation
        self._lock = threading.Lock()
        self._writers: dict[str, KVLog] = {}

    # ------------------------------------------------------------------ Engine API
    async def stream(
        self,
        plan: WindowPlan,
        sampling: SamplingSpec | None = None,
        options: StepOptions = _DEFAULT_OPTIONS,
    ) -> AsyncIterator[TokenDelta | StepResult]:
        self.check_plan(plan, options)
        step = await asyncio.to_thread(self._locked, self._prefill, plan, sampling, options)
        while True:
            token = await asyncio.to_thread(self._locked, self._next_token, step)
            if token is None:
                break
            yield TokenDelta((token,))
        yield self._finish(step)

    def run(
        self,
        plan: WindowPlan,
        sampling: SamplingSpec | None = None,
        options: StepOptions = _DEFAULT_OPTIONS,
    ) -> StepResult:
        """Synchronous :meth:`stream` (same implementation, no event loop): for tests and benchmarks."""
        self.check_plan(plan, options)
        step = self._locked(self._prefill, plan, sampling, options)
        while self._locked(self._next_token, step) is not None:
            pass
        return self._finish(step)

    async def close(self) -> None:
        self.close_logs()

    def close_logs(self) -> None:
        """Close every cached log writer (synchronous :meth:`close`)."""
        with self._lock:
            for log in self._writers.values():
                log.close()
            self._writers.clear()

    def release_log(self, path: str | os.PathLike[str]) -> None:
        """Close the writer of one log (e.g. before its session directory is deleted)."""
        with self._lock:
            log = self._writers.pop(os.path.abspath(path), None)
            if log is not None:
                log.close()

    # ------------------------------------------------------------------ oracle helpers
    @torch.no_grad()
    def prefill_reference(self, token_ids: Sequence[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Plain forward of a prompt at positions 0..n-1: per layer post-RoPE keys, values ``[n, Hkv, D]``."""
        from transformers import DynamicCache

        cache: Any = DynamicCache()
        with self._lock:
            self.model(
                input_ids=torch.tensor([list(token_ids)]),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        keys = [cache.layers[i].keys[0].transpose(0, 1).contiguous() for i in range(self.info.num_layers)]
        values = [cache.layers[i].values[0].transpose(0, 1).contiguous() for i in range(self.info.num_layers)]
        return keys, values

    @torch.no_grad()
    def reference_surprise(self, token_ids: Sequence[int]) -> np.ndarray:
        """Surprise of every token of a plain prompt (first token: ``info.uninformed_surprise``), float32."""
        with self._lock:
            logits = self.model(input_ids=torch.tensor([list(token_ids)])).logits[0]
        out = np.empty(len(token_ids), np.float32)
        out[0] = self.info.uninformed_surprise
        out[1:] = _surprise(logits[:-1], torch.tensor(list(token_ids[1:])))
        return out

    # ------------------------------------------------------------------ the step
    def _locked(self, fn: Callable[..., _T], *args: Any) -> _T:
        with self._lock:
            return fn(*args)

    @torch.no_grad()
    def _prefill(self, plan: WindowPlan, sampling: SamplingSpec | None, options: StepOptions) -> _Step:
        from transformers import DynamicCache

        t0 = time.perf_counter()
        n_inj, n_new = plan.num_injected, plan.num_new
        first_new = plan.first_new_position
        cache: Any = DynamicCache()
        anchor_ids = self._inject(plan, cache)
        t1 = time.perf_counter()

        ids = torch.tensor([anchor_ids + list(plan.new_token_ids)])
        positions = torch.arange(n_inj, first_new + n_new)[None]
        queries: dict[int, torch.Tensor] = {}
        hooks = self._query_hooks(queries, n_new) if options.queries else []
        try:
            out = self.model(
                input_ids=ids,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=0 if options.surprise else 1,
            )
        finally:
            for h in hooks:
                h.remove()
        logits = out.logits[0]
        t2 = time.perf_counter()

        surprise = self._new_surprise(plan, logits) if options.surprise else np.zeros(0, np.float32)
        q_mean, q_tok = self._queries(plan, queries, options.query_tokens) if options.queries else (None, None)
        t3 = time.perf_counter()

        log_offset: int | None = None
        if plan.capture_log is not None:
            layers = [cache.layers[i] for i in range(self.info.num_layers)]
            keys = [ly.keys[0, :, first_new:].transpose(0, 1) for ly in layers]
            values = [ly.values[0, :, first_new:].transpose(0, 1) for ly in layers]
            log_offset = self._writer(plan.capture_log).append(
                list(plan.new_token_ids), np.arange(first_new, first_new + n_new), keys, values
            )
        t4 = time.perf_counter()

        result = StepResult(
            request_id=plan.request_id or uuid.uuid4().hex,
            log_offset=log_offset,
            surprise=surprise,
            queries=q_mean,
            query_tokens=q_tok,
            num_injected=n_inj,
            timings={"inject_s": t1 - t0, "forward_s": t2 - t1, "outputs_s": t3 - t2, "write_s": t4 - t3},
        )
        step = _Step(plan, sampling, cache, plan.window_len, logits[-1].float(), result)
        if sampling is None or sampling.max_tokens == 0:
            step.done = True
        else:
            stop = set(sampling.stop_token_ids)
            if not sampling.ignore_eos:
                stop.update(self.info.eos_token_ids)
            step.stop_ids = frozenset(stop)
            if sampling.temperature > 0:
                step.generator = torch.Generator()
                if sampling.seed is None:
                    step.generator.seed()
                else:
                    step.generator.manual_seed(sampling.seed)
        result.timings["prefill_s"] = time.perf_counter() - t0
        return step

    def _inject(self, plan: WindowPlan, cache: Any) -> list[int]:
        """Fill ``cache`` with the plan's injected KV, layer by layer; returns the anchor token's id (or none)."""
        readers: dict[str, KVLog] = {}
        try:
            for layer in range(self.info.num_layers):
                k, v = self._injected_kv(plan, layer, readers)
                if k is not None and v is not None:
                    cache.update(k, v, layer)
            if plan.anchor is None:
                return []
            reader = self._reader(plan.anchor.log, readers)
            return [int(reader.tokens(plan.anchor.index, plan.anchor.index + 1)[0])]
        finally:
            for r in readers.values():
                r.close()

    def _new_surprise(self, plan: WindowPlan, logits: torch.Tensor) -> np.ndarray:
        """``-ln p`` of every new token, from the logits of the anchor and new tokens."""
        n_anchor, n_new = plan.num_anchor, plan.num_new
        surprise = np.empty(n_new, np.float32)
        rows = logits[: n_anchor + n_new - 1]  # predicts new[1 - n_anchor:]
        targets = torch.tensor(list(plan.new_token_ids[1 - n_anchor :]))
        if n_anchor:
            surprise[:] = _surprise(rows, targets)
        else:  # no anchor and (checked) nothing injected: new[0] has no context at all
            surprise[0] = self.info.uninformed_surprise
            surprise[1:] = _surprise(rows, targets)
        return surprise

    def _queries(self, plan: WindowPlan, queries: dict[int, torch.Tensor],
                 query_tokens: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The new tokens' queries with their rotation undone: their mean ``[L, H*D]`` and the last
        ``query_tokens`` of them ``[n, L, H, D]`` (None when 0)."""
        first_new, n_new = plan.first_new_position, plan.num_new
        window_pos = torch.arange(first_new, first_new + n_new)
        derot = [self.rope.rotate(queries[i].float(), -window_pos) for i in range(self.info.num_layers)]
        q_mean = np.stack([q.mean(0).numpy() for q in derot]).astype(np.float32)
        n_tok = min(query_tokens, n_new)
        if n_tok <= 0:
            return q_mean, None
        return q_mean, torch.stack([q[n_new - n_tok :] for q in derot], 1).numpy().astype(np.float32)

    @torch.no_grad()
    def _next_token(self, step: _Step) -> int | None:
        """Sample one token from the step's pending distribution; feed it back unless the step ends."""
        if step.done:
            return None
        assert step.sampling is not None
        t0 = time.perf_counter()
        token = _sample(step.last_logits, step.sampling, step.generator)
        out_ids = step.result.output_token_ids
        out_ids.append(token)
        raw = step.last_logits.double()  # log p under the model, before temperature / top-k / top-p (as vLLM)
        norm = torch.logsumexp(raw, -1)
        step.result.output_logprobs.append(float(raw[token] - norm))
        if step.sampling.top_logprobs:
            top = torch.topk(raw, step.sampling.top_logprobs)
            step.result.top_logprobs.append(
                {int(t): float(v - norm) for t, v in zip(top.indices.tolist(), top.values, strict=True)})
        if token in step.stop_ids:
            step.result.finish_reason = "stop"
        elif len(out_ids) >= step.sampling.max_tokens or step.next_position + 1 >= self.info.max_model_len:
            step.result.finish_reason = "length"
        else:
            out = self.model(
                input_ids=torch.tensor([[token]]),
                position_ids=torch.tensor([[step.next_position]]),
                past_key_values=step.cache,
                use_cache=True,
            )
            step.last_logits = out.logits[0, -1].float()
            step.next_position += 1
        step.done = step.result.finish_reason is not None
        step.t_decode += time.perf_counter() - t0
        return token

    def _finish(self, step: _Step) -> StepResult:
        res = step.result
        res.timings["decode_s"] = step.t_decode
        res.timings["total_s"] = res.timings["prefill_s"] + step.t_decode
        step.cache = None  # free the window's K/V now, not when the caller drops the result
        return res

    # ------------------------------------------------------------------ pieces
    def _reader(self, path: str, readers: dict[str, KVLog]) -> KVLog:
        r = readers.get(path)
        if r is None:
            r = KVLog.open(path)
            lay = r.layout
            if (lay.num_layers, lay.num_kv_heads, lay.head_dim) != (
                self.info.num_layers,
                self.info.num_kv_heads,
                self.info.head_dim,
            ):
                r.close()
                need = self.info.kv_layout(lay.dtype)
                raise LogError(f"KV log at {path} has layout {lay}; the model needs {need}")
            readers[path] = r
        return r

    def _injected_kv(
        self, plan: WindowPlan, layer: int, readers: dict[str, KVLog]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Layer ``layer``'s injected K/V in HF cache layout ``[1, Hkv, N, D]`` (None when N == 0)."""
        segs = plan.segments_for_layer(layer)
        if not segs:
            return None, None
        ks, vs, ps = [], [], []
        for seg in segs:
            k, v, p = self._reader(seg.log, readers).gather(layer, [(seg.start, seg.end)])
            ks.append(k)
            vs.append(v)
            ps.append(p)
        k_all, v_all, stored = torch.cat(ks), torch.cat(vs), torch.cat(ps)
        delta = torch.arange(k_all.shape[0], dtype=torch.int64) - stored
        k_rot = self.rope.rotate(k_all.float(), delta)
        return (
            k_rot.to(self.compute_dtype).transpose(0, 1)[None].contiguous(),
            v_all.to(self.compute_dtype).transpose(0, 1)[None].contiguous(),
        )

    def _query_hooks(self, store: dict[int, torch.Tensor], n_new: int) -> list[Any]:
        """Pre-hooks on each layer's attention that recompute HF's post-RoPE queries of the new tokens.

        They redo ``q_proj`` (+ ``q_norm`` where the family has one) and the model module's own
        ``apply_rotary_pos_emb`` with the ``position_embeddings`` the layer receives, so the result is
        bit-identical to the queries the attention uses. Stores ``[n_new, H, D]`` per layer.
        """
        handles = []
        for idx, layer in enumerate(self.layers):
            attn: Any = layer.self_attn
            apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb

            def hook(
                module: Any,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                *,
                _idx: int = idx,
                _rope: Any = apply_rope,
            ) -> None:
                h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                cos, sin = kwargs["position_embeddings"]
                q = module.q_proj(h).view(*h.shape[:-1], -1, module.head_dim)
                if hasattr(module, "q_norm"):
                    q = module.q_norm(q)
                q = q.transpose(1, 2)
                q, _ = _rope(q, q, cos, sin)
                store[_idx] = q[0, :, -n_new:].transpose(0, 1)

            handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
        return handles

    def _writer(self, path: str) -> KVLog:
        key = os.path.abspath(path)
        log = self._writers.get(key)
        if log is None:
            log = KVLog.open_or_create(key, self.kv_layout)
            self._writers[key] = log
        return log


# ---------------------------------------------------------------------- helpers
def full_forward_kv(
    model: str | os.PathLike[str] | ReferenceEngine, token_ids: Sequence[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer post-RoPE keys and values ``[n, Hkv, D]`` of a plain prompt (positions 0..n-1).

    ``model``: a loaded engine, or a model directory (loaded in float32 for this call).
    """
    engine = model if isinstance(model, ReferenceEngine) else ReferenceEngine(os.fspath(model))
    return engine.prefill_reference(token_ids)


def _decoder_layers(model: torch.nn.Module) -> list[Any]:
    layers: Any = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(getattr(ly, "self_attn", None), "q_proj") for ly in layers):
        raise UnsupportedModelError(
            f"{type(model).__name__}: expected model.model.layers[i].self_attn.q_proj (Llama-style decoder)"
        )
    mod = sys.modules[type(layers[0].self_attn).__module__]
    if not hasattr(mod, "apply_rotary_pos_emb"):
        raise UnsupportedModelError(f"{mod.__name__} has no apply_rotary_pos_emb")
    return list(layers)


def _refuse_sliding_window(config: Any, max_model_len: int) -> None:
    types = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    if types - {"full_attention"} or (window is not None and window < max_model_len):
        raise UnsupportedModelError(
            f"sliding-window attention (layer types {sorted(types)}, window {window}) is not supported"
        )


def _surprise(rows: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """``-log softmax(rows)[targets]`` in float64, in blocks of rows (bounded memory for big vocabularies)."""
    out = np.empty(rows.shape[0], np.float32)
    for s in range(0, rows.shape[0], _SURPRISE_ROWS):
        block = rows[s : s + _SURPRISE_ROWS].double()
        tgt = targets[s : s + _SURPRISE_ROWS]
        lse = torch.logsumexp(block, -1)
        out[s : s + block.shape[0]] = (lse - block.gather(1, tgt[:, None])[:, 0]).numpy()
    return out


def _sample(logits: torch.Tensor, spec: SamplingSpec, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; else temperature, then top-k, then top-p, then a multinomial draw."""
    if spec.temperature == 0:
        return int(torch.argmax(logits))
    x = logits.float() / spec.temperature
    if 0 < spec.top_k < x.shape[0]:
        kth = torch.topk(x, spec.top_k).values[-1]
        x = x.masked_fill(x < kth, -math.inf)
    if spec.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, -1)
        drop = (torch.cumsum(probs, -1) - probs) > spec.top_p  # keeps at least the most likely token
        x = x.scatter(0, order, sorted_x.masked_fill(drop, -math.inf))
    probs = torch.softmax(x, -1)
    if not torch.isfinite(probs).all():
        raise EngineError("sampling distribution is not finite")
    return int(torch.multinomial(probs, 1, generator=generator))

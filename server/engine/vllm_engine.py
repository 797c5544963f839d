"""VLLMEngine: runs WindowPlans on vLLM's AsyncLLM (engine core in its own process).

One plan is one vLLM request whose prompt is ``[placeholder × N | anchor | new tokens]``. The EM
connector (``connector.py``, in the engine-core process) injects the N planned tokens' K/V, captures
the new tokens' K/V into the session's KV log and writes the step's query summary to a result file;
this side reads surprise from ``prompt_logprobs`` and streams generated tokens. Concurrent calls from
different sessions are batched by vLLM.

Settings that matter (see research/vllm-cpu/REPORT.md): prefix caching is off (placeholder prompts
must never hit a cache); ``prompt_logprobs`` needs ``skip_reading_prefix_cache=False`` (otherwise
vLLM silently ignores the connector's claim) and ``detokenize=False`` (vLLM's detokenizer crashes on
the placeholder entries); entries of injected positions are garbage and are never read.

With a CPU-only torch and chunked iterations (``max_num_batched_tokens`` > 0) the engine core runs
:class:`~.scheduler.QuestionFirstScheduler`, and :meth:`VLLMEngine.questions_holding` tells it how many
questions hold ingestion back (admission rule 1 carried into the engine's iterations).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emserve.retrieval.kvlog import KVLog
from emserve.retrieval.plan import Anchor, WindowPlan
from emserve.server.engine.base import (
    Engine,
    EngineDead,
    EngineError,
    ModelInfo,
    SamplingSpec,
    StepOptions,
    StepResult,
    TokenDelta,
)
from emserve.server.engine.config import EngineConfig, gpu_build, kv_cache_bytes

if TYPE_CHECKING:
    from emserve.server.engine.scheduler import QuestionCounter

CONNECTOR_MODULE = "emserve.server.engine.connector"
MAX_OPEN_LOGS = 64  # anchor-token readers kept open (one per recently stepped session)
PLACEHOLDER_TOKEN = 0


SCRATCH_PREFIX = "emserve-engine-"
OWNER_FILE = "owner.pid"
STALE_AFTER_S = 60.0
"""A scratch dir without an owner file is another engine's only while it is being made: left alone this long."""


def sweep_stale_scratch(root: Path | None = None) -> list[Path]:
    """Remove the scratch dirs that engines made under ``root`` (the temp dir) and whose owner process is
    gone (a killed server's; :data:`OWNER_FILE` holds its pid), and those older than :data:`STALE_AFTER_S`
    without an owner file (made before owners were recorded). Returns the dirs removed."""
    root = Path(tempfile.gettempdir()) if root is None else root
    gone = []
    for d in root.glob(SCRATCH_PREFIX + "*"):
        try:
            pid = int((d / OWNER_FILE).read_text())
        except (OSError, ValueError):
            try:
                stale = time.time() - d.stat().st_mtime > STALE_AFTER_S
            except OSError:
                continue
        else:
            stale = pid != os.getpid() and not _alive(pid)
        if stale and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _prepare_env(config: EngineConfig) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")


class VLLMEngine(Engine):
    def __init__(self, config: EngineConfig) -> None:
        _prepare_env(config)
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(config.model)
        native = int(getattr(hf, "max_position_embeddings", 0) or 0) or 8192
        max_len = config.max_model_len or native
        self.info = ModelInfo.from_hf_config(
            name=Path(config.model).name,
            path=config.model,
            config=hf,
            dtype=config.dtype,
            max_model_len=max_len,
        )
        self.log_dtype = config.log_dtype
        self.config = config
        self._own_scratch = config.scratch_dir is None
        """The engine made its scratch dir, so :meth:`close` removes it (a given one is left, emptied of
        the engine's files). The dir the engine makes records its owner's pid, so the next engine removes
        it if this process dies without closing (:func:`sweep_stale_scratch`)."""
        sweep_stale_scratch()
        made = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
        (made / OWNER_FILE).write_text(str(os.getpid()))
        self._ipc = made / "ipc"
        """vLLM's IPC sockets (its engine core's ZMQ endpoints) go here, under the temp dir whatever the
        scratch dir (a socket's path must stay under 108 bytes); gone when the engine closes."""
        self._ipc.mkdir()
        if self._own_scratch:
            self._scratch = made
        else:
            self._scratch = Path(str(config.scratch_dir))
            self._scratch.mkdir(parents=True, exist_ok=True)
        self._made = made
        self._readers: OrderedDict[str, KVLog] = OrderedDict()  # anchor-token readers, LRU-bounded
        self._questions: QuestionCounter | None = None
        try:
            self._start(config, max_len)
        except BaseException:  # a failed start leaves nothing behind either
            self._remove_scratch()
            raise
        self._closed = False

    def _start(self, config: EngineConfig, max_len: int) -> None:
        """Start vLLM's AsyncLLM (its engine core in another process) with the EM connector."""
        from vllm import AsyncEngineArgs
        from vllm.config import KVTransferConfig
        from vllm.v1.engine.async_llm import AsyncLLM

        extra: dict[str, Any] = {"log_dtype": config.log_dtype}
        scheduler_cls = None
        if config.max_num_batched_tokens and not gpu_build():  # a step spans iterations: hold it for questions
            from emserve.server.engine.scheduler import COUNTER_KEY, QuestionCounter, QuestionFirstScheduler

            self._questions = QuestionCounter(self._scratch / "questions.i64", create=True)
            extra[COUNTER_KEY] = str(self._questions.path)
            scheduler_cls = f"{QuestionFirstScheduler.__module__}.{QuestionFirstScheduler.__qualname__}"
        args = AsyncEngineArgs(
            model=config.model,
            dtype=config.dtype,
            max_model_len=max_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens or max_len,
            long_prefill_token_threshold=min(config.long_prefill_token_threshold or 0, max_len),
            enforce_eager=config.enforce_eager,
            enable_prefix_caching=False,
            gpu_memory_utilization=config.gpu_memory_utilization,
            # CPU: the KV cache in bytes (fractions of a GiB too; vLLM's VLLM_CPU_KVCACHE_SPACE, whole GiB,
            # still wins where the environment sets it); a GPU sizes it by gpu_memory_utilization
            kv_cache_memory_bytes=None if gpu_build() else kv_cache_bytes(config.kv_cache_gib),
            seed=config.seed,
            disable_log_stats=not config.log_stats,
            scheduler_cls=scheduler_cls,
            kv_transfer_config=KVTransferConfig(
                kv_connector="EMConnector",
                kv_connector_module_path=CONNECTOR_MODULE,
                kv_role="kv_both",
                kv_connector_extra_config=extra,
            ),
        )
        # vLLM's IPC sockets go into a dir that goes with the engine, instead of one socket file per
        # endpoint left in the temp dir for every start (vLLM never removes them)
        before = os.environ.get("VLLM_RPC_BASE_PATH")
        os.environ["VLLM_RPC_BASE_PATH"] = str(self._ipc)
        try:
            self.llm = AsyncLLM.from_engine_args(args)
        finally:
            if before is None:
                os.environ.pop("VLLM_RPC_BASE_PATH", None)
            else:
                os.environ["VLLM_RPC_BASE_PATH"] = before

    # ------------------------------------------------------------------ helpers
    def _anchor_token(self, anchor: Anchor) -> int:
        r = self._readers.get(anchor.log)
        if r is None:
            r = self._readers[anchor.log] = KVLog.open(anchor.log)
            while len(self._readers) > MAX_OPEN_LOGS:
                self._readers.popitem(last=False)[1].close()
        self._readers.move_to_end(anchor.log)
        return int(r.tokens(anchor.index, anchor.index + 1)[0])

    def _sampling_params(
        self, plan: WindowPlan, sampling: SamplingSpec | None, options: StepOptions, result_path: Path
    ) -> Any:
        from vllm import SamplingParams

        gen = sampling is not None and sampling.max_tokens > 0
        s = sampling or SamplingSpec()
        if gen and s.stop and options.surprise:
            raise EngineError("stop strings need detokenization, which cannot be combined with surprise")
        em = dict(plan.to_wire())
        em["result_path"] = str(result_path)
        em["want_queries"] = options.queries
        em["query_tokens"] = options.query_tokens if options.queries else 0
        return SamplingParams(
            max_tokens=s.max_tokens if gen else 1,
            temperature=s.temperature if gen else 0.0,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=s.seed,
            stop=list(s.stop) if gen else None,
            stop_token_ids=list(s.stop_token_ids) if gen else None,
            ignore_eos=s.ignore_eos if gen else True,
            prompt_logprobs=0 if options.surprise else None,
            logprobs=s.top_logprobs if gen else None,
            skip_reading_prefix_cache=False,
            detokenize=bool(gen and s.stop),
            extra_args={"kv_transfer_params": {"em": em}},
        )

    # ------------------------------------------------------------------ Engine API
    async def stream(
        self,
        plan: WindowPlan,
        sampling: SamplingSpec | None = None,
        options: StepOptions = StepOptions(),
    ) -> AsyncIterator[TokenDelta | StepResult]:
        from vllm.inputs import TokensPrompt

        if self._closed:
            raise EngineError("engine is closed")
        self.check_plan(plan, options)
        t0 = time.perf_counter()
        rid = plan.request_id or f"em-{uuid.uuid4().hex}"
        n = plan.num_injected
        anchor = [self._anchor_token(plan.anchor)] if plan.anchor is not None else []
        prompt = [PLACEHOLDER_TOKEN] * n + anchor + list(plan.new_token_ids)
        first_new = n + len(anchor)
        result_path = self._scratch / f"{rid}.npz"
        params = self._sampling_params(plan, sampling, options, result_path)
        gen = sampling is not None and sampling.max_tokens > 0
        s_top = sampling.top_logprobs if sampling is not None else 0
        sent = 0
        final = None
        t_first = None
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt), params, request_id=rid):
                final = out
                if gen:
                    # vLLM hands out its live token list (no detokenizer): it grows while this generator is
                    # suspended in ``yield``, so what was sent is counted before yielding, never after
                    toks = out.outputs[0].token_ids
                    if len(toks) > sent:
                        if t_first is None:
                            t_first = time.perf_counter()
                        delta = tuple(toks[sent:])
                        sent += len(delta)
                        yield TokenDelta(delta)
            if final is None:
                raise EngineError(f"vLLM returned no output for request {rid}")
            surprise = np.zeros(0, np.float32)
            if options.surprise:
                surprise = self._surprise(final.prompt_logprobs, prompt, first_new)
            try:
                with np.load(result_path) as res:
                    log_offset = int(res["log_offset"])
                    queries = np.array(res["queries"]) if "queries" in res.files else None
                    qtok = np.array(res["query_tokens"]) if "query_tokens" in res.files else None
                    core = {f[2:]: float(res[f]) for f in res.files if f.startswith("t_")}
            except FileNotFoundError:
                raise EngineError(f"engine core wrote no step result for request {rid}") from None
            out0 = final.outputs[0]
            t_end = time.perf_counter()
            timings = {**core, "total_s": t_end - t0}
            if t_first is not None:
                timings["first_token_s"] = t_first - t0
            yield StepResult(
                request_id=rid,
                log_offset=log_offset if plan.capture_log else None,
                surprise=surprise,
                queries=queries if options.queries else None,
                output_token_ids=list(out0.token_ids) if gen else [],
                output_logprobs=_sampled_logprobs(out0) if gen else [],
                top_logprobs=_top_logprobs(out0, s_top) if gen and s_top else [],
                finish_reason=out0.finish_reason if gen else None,
                num_injected=n,
                timings=timings,
                query_tokens=qtok if options.queries else None,
            )
        except (asyncio.CancelledError, GeneratorExit):
            await self.llm.abort(rid)
            raise
        except Exception as e:
            why = self.failure()
            if why is not None:
                raise EngineDead(why) from e
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                result_path.unlink()

    def failure(self) -> str | None:
        llm = getattr(self, "llm", None)
        if getattr(self, "_closed", True) or llm is None or not llm.errored:
            return None
        return ("vLLM's engine core is dead (one of its processes was killed: the OOM killer under a memory "
                "limit? see the log above)")

    def _surprise(self, prompt_logprobs: Any, prompt: list[int], first_new: int) -> np.ndarray:
        if prompt_logprobs is None:
            raise EngineError("vLLM returned no prompt logprobs")
        out = np.empty(len(prompt) - first_new, np.float32)
        for j, i in enumerate(range(first_new, len(prompt))):
            if i == 0:
                out[j] = self.info.uninformed_surprise
                continue
            entry = prompt_logprobs[i]
            lp = None if entry is None else entry.get(prompt[i])
            if lp is None or not np.isfinite(lp.logprob):
                raise EngineError(f"no logprob for prompt position {i}")
            out[j] = -lp.logprob
        return out

    def questions_holding(self, n: int) -> None:
        if self._questions is not None:
            self._questions.set(n)

    def release_log(self, path: str) -> None:
        for key in {path, os.path.abspath(path)}:  # a KVLog is falsy when empty: no `or` between the pops
            r = self._readers.pop(key, None)
            if r is not None:
                r.close()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.llm.shutdown()
            for r in self._readers.values():
                r.close()
            self._remove_scratch()
            # Drop AsyncLLM now: its __del__ calls shutdown() again, which fails if it only runs at
            # interpreter teardown (module globals already gone).
            del self.llm
            gc.collect()

    def _remove_scratch(self) -> None:
        """The engine's files in its scratch dir (step results of aborted requests, the question counter,
        vLLM's IPC sockets), and the dir itself when the engine made it: nothing is left behind a closed
        engine, or one that failed to start."""
        if self._questions is not None:
            self._questions.close()
        shutil.rmtree(self._made, ignore_errors=True)  # the own scratch dir, or the IPC sockets' dir
        if not self._own_scratch:
            counter = [self._questions.path] if self._questions is not None else []
            for f in [*self._scratch.glob("*.npz"), *counter]:
                f.unlink(missing_ok=True)


def _sampled_logprobs(completion: object) -> list[float]:
    out: list[float] = []
    for tok, entry in zip(completion.token_ids, completion.logprobs or [], strict=False):  # type: ignore[attr-defined]
        out.append(float(entry[tok].logprob))
    return out


def _top_logprobs(completion: object, k: int) -> list[dict[int, float]]:
    """Per generated token, the ``k`` most likely tokens' log p (vLLM adds the sampled one when it is not
    among them: dropped here unless it is)."""
    out: list[dict[int, float]] = []
    for entry in completion.logprobs or []:  # type: ignore[attr-defined]
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
        out.append({int(t): float(lp.logprob) for t, lp in ranked[:k]})
    return out

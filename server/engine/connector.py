"""EMConnector: vLLM KV connector that executes WindowPlans inside the engine-core process.

Contract (read with vLLM's ``KVConnectorBase_V1``)
-------------------------------------------------
Both halves run in the vLLM engine-core process (scheduler half) and its worker(s) (worker half);
neither talks to the emserve server except through files:

* Input: a request whose ``SamplingParams.extra_args["kv_transfer_params"]["em"]`` holds a
  WindowPlan in wire form (``WindowPlan.to_wire()``) plus ``result_path``. Its prompt is
  ``[placeholder × N | anchor token? | new tokens]``.
* **Scheduler half** (side-effect free ``get_num_new_matched_tokens``): claims the first N prompt
  tokens as externally computed, so vLLM allocates their blocks and computes only the rest. Every
  step it sends the worker (a) the injection of newly admitted (or resumed) requests and (b) for
  requests being captured, the cache slots of the new tokens scheduled in this step.
* **Worker half**: ``start_load_kv`` copies each layer's planned K/V from the KV logs into the
  paged cache through the attention backend's own ``do_kv_cache_update`` (layout independent),
  re-rotating keys to their window positions. During the forward, a capture shim on each attention
  layer's impl records the new tokens' post-RoPE K/V and sums their de-rotated queries (rows found
  by slot, so chunked prefill and batching with other requests are handled); with
  ``query_tokens = n`` in the wire plan it also keeps the de-rotated queries of the last ``n`` new
  tokens one by one. ``wait_for_save`` appends completed captures to the plan's ``capture_log`` and
  writes ``result_path`` (``log_offset``, the query summary and the per-token queries) atomically,
  before vLLM returns the step's outputs.

Requirements on the engine: prefix caching off (placeholder prompts must never hit a cache),
``kv_role="kv_both"``. The plan's token placeholders are never embedded.

Size: vLLM's connector has a scheduler half and a worker half that must agree on one wire format;
both live in one module, as vLLM's own connectors do.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger

from emserve.retrieval.kvlog import KVLayout, KVLog
from emserve.retrieval.plan import WindowPlan
from emserve.server.engine.rope import RopeSpec

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)

EM_KEY = "em"


def plan_of(request_params: dict[str, Any] | None) -> dict[str, Any] | None:
    if not request_params:
        return None
    em = request_params.get(EM_KEY)
    return em if isinstance(em, dict) else None


def num_injected(em: dict[str, Any]) -> int:
    segs = em.get("layer_segments")
    first = segs[0] if segs else em.get("segments") or []
    return sum(int(e) - int(s) for _, s, e in first)


def layer_index(layer_name: str) -> int:
    """``model.layers.3.self_attn.attn`` → 3."""
    parts = layer_name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    raise ValueError(f"cannot find the layer index in {layer_name!r}")


def _slots(block_ids: list[int], block_size: int, idx: np.ndarray) -> torch.Tensor:
    b = np.asarray(block_ids, dtype=np.int64)
    return torch.from_numpy(b[idx // block_size] * block_size + idx % block_size)


# ---------------------------------------------------------------- metadata (scheduler → worker)
@dataclass
class LoadSpec:
    req_id: str
    slots: torch.Tensor  # [N] cache slots of window positions 0..N-1
    segments: list[list[Any]]  # shared wire segments, or
    layer_segments: list[list[list[Any]]] | None


@dataclass
class CaptureSpec:
    """The new tokens of one request that are computed in this step."""

    req_id: str
    slots: torch.Tensor  # their cache slots
    dest: torch.Tensor  # their indices among the request's new tokens (0..C-1)
    positions: torch.Tensor  # their window positions
    first: CaptureInit | None  # sent once, on the request's first capture step


@dataclass
class CaptureInit:
    num_new: int
    first_new: int  # window position of the first new token
    token_ids: list[int]
    capture_log: str | None
    result_path: str | None
    want_queries: bool
    query_tokens: int = 0  # report the de-rotated queries of the last this-many new tokens


@dataclass
class EMConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    captures: list[CaptureSpec] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # requests gone: drop their partial captures


@dataclass
class _ReqState:
    em: dict[str, Any]
    block_ids: list[int]
    first_new: int  # prompt index of the first new token
    num_new: int
    sent_tokens: bool = False
    captured: bool = False  # every new token was sent for capture (a preempted+resumed request recomputes)
    prompt_token_ids: list[int] = field(default_factory=list)


@dataclass
class _Capture:
    req_id: str
    init: CaptureInit
    seen: torch.Tensor  # bool [C]: new tokens captured in every layer
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    qsum: torch.Tensor | None = None
    qtok: torch.Tensor | None = None  # float32 [n, L, H, D]: queries of the last n new tokens


class EMConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._vllm_config = vllm_config
        self.block_size = vllm_config.cache_config.block_size
        hf = vllm_config.model_config.hf_config
        self.rope = RopeSpec.from_hf_config(hf)
        self.num_layers = int(hf.num_hidden_layers)
        self.num_heads = int(hf.num_attention_heads)
        self.num_kv_heads = int(getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads)
        self.head_dim = self.rope.head_dim
        ktc = vllm_config.kv_transfer_config
        self.log_dtype = ((ktc.kv_connector_extra_config if ktc else None) or {}).get("log_dtype", "bfloat16")
        # scheduler half
        self._reqs: dict[str, _ReqState] = {}
        self._pending_load: set[str] = set()
        # worker half
        # open logs, least recently used first; bounded so idle or deleted sessions' files get closed
        self._readers: OrderedDict[str, KVLog] = OrderedDict()
        self._writers: OrderedDict[str, KVLog] = OrderedDict()
        self._captures: dict[str, _Capture] = {}
        self._step_captures: list[tuple[_Capture, CaptureSpec]] = []
        self._inv_cache: tuple[int, int, torch.Tensor] | None = None
        self._inject_s: dict[str, float] = {}  # per request: seconds spent injecting its window's K/V
        exit_with_parent()

    # ================================================================ scheduler half
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        em = plan_of(request.kv_transfer_params)
        if em is None:
            return 0, False
        n = num_injected(em)
        return max(0, n - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: Any, num_external_tokens: int) -> None:
        em = plan_of(request.kv_transfer_params)
        if em is None:
            return
        if request.request_id not in self._reqs:
            n_new = int(em["num_new"])
            self._reqs[request.request_id] = _ReqState(
                em=em,
                block_ids=[],
                first_new=request.num_prompt_tokens - n_new,
                num_new=n_new,
                prompt_token_ids=list(request.prompt_token_ids or []),
            )
        if num_external_tokens > 0:
            self._pending_load.add(request.request_id)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = EMConnectorMetadata()
        scheduled: list[tuple[str, int]] = []
        for new_req in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new_req.req_id)
            if st is None:
                continue
            st.block_ids = list(new_req.block_ids[0])
            scheduled.append((new_req.req_id, new_req.num_computed_tokens))
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            st = self._reqs.get(rid)
            if st is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                st.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                st.block_ids.extend(new_blocks[0])
            scheduled.append((rid, cached.num_computed_tokens[i]))

        for rid, num_computed in scheduled:
            st = self._reqs[rid]
            if rid in self._pending_load:
                self._pending_load.discard(rid)
                n = num_injected(st.em)
                meta.loads.append(
                    LoadSpec(
                        rid,
                        _slots(st.block_ids, self.block_size, np.arange(n)),
                        st.em.get("segments") or [],
                        st.em.get("layer_segments"),
                    )
                )
            n_sched = scheduler_output.num_scheduled_tokens.get(rid, 0)
            if st.captured:
                continue
            lo = max(num_computed, st.first_new)
            hi = min(num_computed + n_sched, st.first_new + st.num_new)
            if hi <= lo:
                continue
            idx = np.arange(lo, hi)
            init = None
            if not st.sent_tokens:
                st.sent_tokens = True
                init = CaptureInit(
                    num_new=st.num_new,
                    first_new=st.first_new,
                    token_ids=st.prompt_token_ids[st.first_new :],
                    capture_log=st.em.get("capture_log"),
                    result_path=st.em.get("result_path"),
                    want_queries=bool(st.em.get("want_queries", True)),
                    query_tokens=int(st.em.get("query_tokens", 0) or 0),
                )
            st.captured = hi == st.first_new + st.num_new
            meta.captures.append(
                CaptureSpec(
                    req_id=rid,
                    slots=_slots(st.block_ids, self.block_size, idx),
                    dest=torch.from_numpy(idx - st.first_new),
                    positions=torch.from_numpy(idx),
                    first=init,
                )
            )
        meta.finished = list(scheduler_output.finished_req_ids)
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        self._pending_load.discard(request.request_id)
        return False, None

    # ================================================================ worker half
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Install the capture shim on every attention layer's impl (once, after model load)."""
        ctx = self._vllm_config.compilation_config.static_forward_context
        n = 0
        for name, layer in ctx.items():
            impl = getattr(layer, "impl", None)
            if impl is None or not hasattr(impl, "do_kv_cache_update") or name not in kv_caches:
                continue
            install_capture(impl, self, name)
            n += 1
        if n != self.num_layers:
            raise RuntimeError(f"EMConnector: capture installed on {n} layers, model has {self.num_layers}")
        logger.info("EMConnector: capture shim on %d attention layers", n)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, EMConnectorMetadata)
        _close_deleted(self._readers)
        _close_deleted(self._writers)
        self._inv_cache = None
        self._step_captures = []
        for rid in connector_metadata.finished:
            self._captures.pop(rid, None)
            self._inject_s.pop(rid, None)
        for spec in connector_metadata.captures:
            if spec.first is not None:
                self._captures[spec.req_id] = _Capture(
                    spec.req_id, spec.first, torch.zeros(spec.first.num_new, dtype=torch.bool)
                )
            cap = self._captures.get(spec.req_id)
            if cap is not None:
                self._step_captures.append((cap, spec))

    def _reader(self, path: str) -> KVLog:
        r = self._readers.get(path)
        if r is None:
            r = self._readers[path] = KVLog.open(path)
            _evict(self._readers)
        self._readers.move_to_end(path)
        return r

    def _gather(
        self, segs: list[list[Any]], layer: int, angles: dict[tuple, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ks, vs, ps = [], [], []
        for seg in WindowPlan.segments_from_wire(segs):
            k, v, p = self._reader(seg.log).gather(layer, [(seg.start, seg.end)])
            ks.append(k)
            vs.append(v)
            ps.append(p)
        k, v, p = torch.cat(ks), torch.cat(vs), torch.cat(ps)
        delta = torch.arange(k.shape[0]) - p
        key = tuple(map(tuple, segs))  # layers with the same segments share the rotation angles
        if key not in angles:
            angles[key] = self.rope.angles(delta)
        return self.rope.rotate(k.float(), delta, angles[key]), v

    def _prefetch(self, loads: list[LoadSpec]) -> None:
        """Ask for every page of the logs this step's loads gather (``KVLog.prefetch``) before the
        first layer's gather waits on one: the kernel reads them all at once, not a page per fault."""
        want: dict[tuple[str, int | None], list[tuple[int, int]]] = {}
        for ld in loads:
            per_layer = [ld.segments] if ld.layer_segments is None else ld.layer_segments
            for li, segs in enumerate(per_layer):
                layer = None if ld.layer_segments is None else li
                for seg in WindowPlan.segments_from_wire(segs):
                    want.setdefault((seg.log, layer), []).append((seg.start, seg.end))
        for (log, layer), ranges in want.items():
            self._reader(log).prefetch(ranges, None if layer is None else [layer])

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, EMConnectorMetadata)
        if not meta.loads:
            return
        for r in self._readers.values():
            r.refresh()
        self._prefetch(meta.loads)
        angles: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, layer in forward_context.no_compile_layers.items():
            impl = getattr(layer, "impl", None)
            kv_cache = getattr(layer, "kv_cache", None)
            if impl is None or not isinstance(kv_cache, torch.Tensor) or kv_cache.numel() == 0:
                continue
            li = layer_index(name)
            for ld in meta.loads:
                t0 = time.perf_counter()
                segs = ld.layer_segments[li] if ld.layer_segments is not None else ld.segments
                k, v = self._gather(segs, li, angles)
                dt = kv_cache.dtype
                impl.do_kv_cache_update(layer, k.to(dt).contiguous(), v.to(dt).contiguous(), kv_cache, ld.slots)
                self._inject_s[ld.req_id] = self._inject_s.get(ld.req_id, 0.0) + time.perf_counter() - t0

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def capture(
        self, layer_name: str, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None
    ) -> None:
        """Called by the shim during each attention layer's forward (hot path: no logging)."""
        if not self._step_captures or key is None or value is None:
            return
        slot_mapping = get_forward_context().slot_mapping
        sm = slot_mapping.get(layer_name) if isinstance(slot_mapping, dict) else None
        if sm is None:
            return
        inv = self._inverse(sm)
        li = layer_index(layer_name)
        kvh, hd, nh = self.num_kv_heads, self.head_dim, self.num_heads
        for cap, spec in self._step_captures:
            rows = inv[spec.slots]
            if bool((rows < 0).any()):
                raise RuntimeError(f"EMConnector: slots of request {spec.req_id} not in this batch")
            if not cap.keys:
                c = cap.init.num_new
                cap.keys = [torch.empty(c, kvh, hd, dtype=key.dtype) for _ in range(self.num_layers)]
                cap.values = [torch.empty(c, kvh, hd, dtype=value.dtype) for _ in range(self.num_layers)]
                if cap.init.want_queries:
                    cap.qsum = torch.zeros(self.num_layers, nh, hd, dtype=torch.float64)
                    n_tok = min(cap.init.query_tokens, c)
                    if n_tok > 0:
                        cap.qtok = torch.zeros(n_tok, self.num_layers, nh, hd, dtype=torch.float32)
            cap.keys[li][spec.dest] = key.view(-1, kvh, hd)[rows]
            cap.values[li][spec.dest] = value.view(-1, kvh, hd)[rows]
            if cap.qsum is not None:
                q = self.rope.rotate(query.view(-1, nh, hd)[rows].float(), -spec.positions)
                cap.qsum[li] += q.sum(0, dtype=torch.float64)
                if cap.qtok is not None:
                    tail = spec.dest - (cap.init.num_new - cap.qtok.shape[0])  # index among the last n
                    keep = tail >= 0
                    cap.qtok[tail[keep], li] = q[keep]
            if li == self.num_layers - 1:
                cap.seen[spec.dest] = True

    def _inverse(self, sm: torch.Tensor) -> torch.Tensor:
        key = (sm.data_ptr(), sm.shape[0])
        if self._inv_cache is not None and self._inv_cache[:2] == key:
            return self._inv_cache[2]
        sm64 = sm.to(torch.int64)
        valid = sm64 >= 0
        hi = int(sm64.max()) + 1 if bool(valid.any()) else 1
        hi = max(hi, max((int(s.slots.max()) + 1 for _, s in self._step_captures), default=1))
        inv = torch.full((hi,), -1, dtype=torch.int64)
        inv[sm64[valid]] = torch.arange(sm64.shape[0])[valid]
        self._inv_cache = (key[0], key[1], inv)
        return inv

    def wait_for_save(self) -> None:
        done = {cap.req_id: cap for cap, _ in self._step_captures if bool(cap.seen.all())}
        for cap in done.values():
            self._finish(cap)
        self._step_captures = []

    def _finish(self, cap: _Capture) -> None:
        init = cap.init
        self._captures.pop(cap.req_id, None)
        offset = -1
        t0 = time.perf_counter()
        if init.capture_log:
            w = self._writers.get(init.capture_log)
            if w is None:
                layout = KVLayout(self.num_layers, self.num_kv_heads, self.head_dim, self.log_dtype)
                w = self._writers[init.capture_log] = KVLog.open_or_create(init.capture_log, layout)
                _evict(self._writers)
            self._writers.move_to_end(init.capture_log)
            positions = np.arange(init.first_new, init.first_new + init.num_new, dtype=np.int32)
            offset = w.append(init.token_ids, positions, cap.keys, cap.values)
        timings = {"inject_s": self._inject_s.pop(cap.req_id, 0.0), "write_s": time.perf_counter() - t0}
        if init.result_path:
            q = None if cap.qsum is None else (cap.qsum / init.num_new).to(torch.float32).numpy()
            write_result(init.result_path, offset, q, None if cap.qtok is None else cap.qtok.numpy(), timings)

    def shutdown(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        self._readers.clear()


MAX_OPEN_LOGS = 64
PARENT_POLL_S = 1.0
_watching = False


def exit_with_parent() -> None:
    """In a process started by multiprocessing (vLLM's engine core, its workers): exit as soon as the
    parent is gone. A server killed with SIGKILL cannot stop its engine, whose processes (gigabytes of
    weights and KV cache) would otherwise live on as orphans; a worker whose engine core dies this way
    exits too. Once per process; a no-op in a main process."""
    global _watching
    if _watching or multiprocessing.parent_process() is None:
        return
    _watching = True
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)  # the parent is dead: nothing to report to, nothing to flush for it

    threading.Thread(target=watch, name="emserve-exit-with-parent", daemon=True).start()


def _close_deleted(logs: OrderedDict[str, KVLog]) -> None:
    """Close the logs whose directory is gone (a deleted session): their disk space is freed only
    once no process holds the files. One stat per open log per step."""
    for path in [p for p in logs if not os.path.isdir(p)]:
        logs.pop(path).close()


def _evict(logs: OrderedDict[str, KVLog]) -> None:
    while len(logs) > MAX_OPEN_LOGS:
        _, log = logs.popitem(last=False)
        log.close()


def write_result(
    path: str, log_offset: int, queries: np.ndarray | None, query_tokens: np.ndarray | None = None,
    timings: dict[str, float] | None = None,
) -> None:
    """The step's result for the server process: the log offset of its new tokens, their query summary,
    the last query tokens, and ``timings`` (seconds, stored as ``t_<name>`` scalars: ``inject_s``
    reading and re-rotating the window's K/V from the logs into the cache, ``write_s`` appending the
    new tokens' K/V to the log)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    arrays: dict[str, np.ndarray] = {"log_offset": np.asarray(log_offset, dtype=np.int64)}
    for name, seconds in (timings or {}).items():
        arrays[f"t_{name}"] = np.asarray(seconds, dtype=np.float64)
    if queries is not None:
        arrays["queries"] = queries
    if query_tokens is not None:
        arrays["query_tokens"] = query_tokens
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, p)


# ---------------------------------------------------------------- capture shim
def install_capture(impl: Any, connector: EMConnector, layer_name: str) -> None:
    """Shadow ``impl.forward`` (an instance attribute wins over the class method) with a wrapper that
    hands q/k/v to the connector first. Only engines started with the EM connector are affected."""
    if getattr(impl, "_em_layer_name", None) is not None:
        return
    inner = impl.forward

    def forward(layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kw: Any) -> Any:
        connector.capture(layer_name, query, key, value)
        return inner(layer, query, key, value, *args, **kw)

    impl.forward = forward
    impl._em_layer_name = layer_name


__all__ = ["EMConnector", "EMConnectorMetadata"]

"""QuestionFirstScheduler: vLLM's scheduler, told by the server when questions hold ingestion back.

Admission rule 1 (:mod:`.admission`) keeps ingestion steps from *entering* the engine while a question
is between its admission and its first token. A step already in the engine runs on in iterations of
at most ``max_num_batched_tokens`` tokens, so a question's engine steps (the probe, the first-token
steps, the answer) shared their iterations with it, and each one could wait for an iteration of it that
began during the question's host work between two steps. This scheduler carries rule 1 into the engine:

* **Hold**: while the server's count of holding questions is above zero, running requests that capture
  into a KV log (ingestion steps: the wire plan's ``capture_log`` is set) and still have prompt tokens
  to compute get no tokens in an iteration. Every other request is scheduled as vLLM would schedule it,
  alone in its iteration if nothing else runs. An ingestion step that was still *waiting* in the engine
  when the hold began is scheduled once (it enters, and its KV is injected) and held from then on.
* **Linger**: for :data:`LINGER_S` after the last iteration that saw a question (a holding count above
  zero, or a request in the engine that does not capture: a question's step or its decode), ingestion
  running alone gets iterations of at most ``long_prefill_token_threshold`` tokens, the cap vLLM applies
  while other requests run. Questions come in bursts (a conversation, a client's list of questions), and
  a question waits for the iteration in flight when it arrives: after a question, that iteration is a
  short one. What it costs ingestion while questions come: ``docs/reliability.md``, "Load".
* When the hold leaves nothing to schedule, the iteration is empty and the engine core polls again
  after :data:`HOLD_POLL_S` (an idle core, not a busy one, while the question's host work runs).
* The count lives in a :class:`QuestionCounter`: 8 bytes of a file that the server (writer) and the
  engine-core process (reader, once per iteration) both map; its path reaches the engine core in the
  connector's ``kv_connector_extra_config`` under :data:`COUNTER_KEY` (none configured: the count is 0).

Runs in the engine-core process; used by ``VLLMEngine`` with a CPU-only torch and chunked iterations
(``EngineConfig.max_num_batched_tokens`` > 0), where a step spans iterations. It keeps vLLM's order
of the running requests and its preemption rules: held requests are set aside for the call to vLLM's
``schedule`` and put back in their places after it, so a held request is never preempted for a
question's blocks (the question then waits, as it would for any full cache).
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from emserve.server.engine.connector import plan_of

COUNTER_KEY = "question_counter"
HOLD_POLL_S = 0.002
LINGER_S = 2.0
_FORMAT = "<q"
_SIZE = struct.calcsize(_FORMAT)


class QuestionCounter:
    """A signed 64-bit count in a file both processes map (native, little-endian). Aligned 8-byte
    stores and loads do not tear on the platforms vLLM runs on; one writer (the server's event loop)."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path)
        if create:
            self.path.write_bytes(bytes(_SIZE))
        self._file = open(self.path, "r+b")  # noqa: SIM115 - mapped for the object's lifetime
        self._map = mmap.mmap(self._file.fileno(), _SIZE)

    def set(self, n: int) -> None:
        struct.pack_into(_FORMAT, self._map, 0, n)

    def get(self) -> int:
        return int(struct.unpack_from(_FORMAT, self._map, 0)[0])

    def close(self) -> None:
        self._map.close()
        self._file.close()


def captures(request: Any) -> bool:
    """Whether ``request`` is an ingestion step (its wire plan captures into a KV log)."""
    em = plan_of(request.kv_transfer_params)
    return bool(em and em.get("capture_log"))


def ingests(request: Any) -> bool:
    """Whether ``request`` is an ingestion step with prompt tokens left to compute (the ones held)."""
    return captures(request) and request.num_computed_tokens < request.num_prompt_tokens


def lingering(now: float, last_question: float, *, holding: bool, questions_in_engine: bool) -> bool:
    """The linger rule: ingestion alone, within :data:`LINGER_S` of the last question seen."""
    return not holding and not questions_in_engine and now - last_question < LINGER_S


class QuestionFirstScheduler(Scheduler):
    _last_question = float("-inf")

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        kv = vllm_config.kv_transfer_config
        path = ((kv.kv_connector_extra_config or {}) if kv is not None else {}).get(COUNTER_KEY)
        self._questions = QuestionCounter(path) if path else None

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        holding = self._questions is not None and self._questions.get() > 0
        present = any(not captures(r) for r in self.running) or any(not captures(r) for r in self.waiting)
        if holding or present:
            self._last_question = now
        cap = self.scheduler_config.long_prefill_token_threshold
        if cap > 0 and lingering(now, self._last_question, holding=holding, questions_in_engine=present):
            full = self.max_num_scheduled_tokens
            self.max_num_scheduled_tokens = min(full, cap)
            try:
                return super().schedule(*args, **kwargs)
            finally:
                self.max_num_scheduled_tokens = full
        if not holding:
            return super().schedule(*args, **kwargs)
        before = self.running
        held = {id(r) for r in before if ingests(r)}
        if not held:
            return super().schedule(*args, **kwargs)
        self.running = [r for r in before if id(r) not in held]
        try:
            out = super().schedule(*args, **kwargs)
        finally:
            after = self.running
            kept = {id(r) for r in after}
            old = {id(r) for r in before}
            self.running = [r for r in before if id(r) in held or id(r) in kept]
            self.running += [r for r in after if id(r) not in old]
        if out.total_num_scheduled_tokens == 0:
            time.sleep(HOLD_POLL_S)
        return out

    def shutdown(self) -> None:
        super().shutdown()
        if self._questions is not None:
            self._questions.close()

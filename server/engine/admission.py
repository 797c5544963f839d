"""Admission of session steps into the shared engine: questions first.

All sessions share one engine, which batches whatever steps are in it. An ingestion step computes a
whole chunk (512 tokens by default); a question's first token needs only its short window. Left to
the engine, a question that arrives while many sessions ingest waits behind their chunks, in every
step it needs (the probe and the answer). Rules, for every session on one engine:

1. **A question holds ingestion back until its first token.** From the moment a question has its
   session (:meth:`Admission.question`, taken inside the session's lock) until its first token is out
   (or it ends), no ingestion step *enters* the engine; steps already in it finish. A question never
   waits for another question or for a slot.
2. **At most ``ingest_slots`` ingestion steps are in the engine at once** (0: no limit), so a question
   never waits for more than that many chunks. Steps of different sessions still overlap their host
   work (retrieval, segmentation, index adds) with each other's engine steps.
3. Ingestion steps enter in the order they asked (FIFO among themselves).
4. **Serial mode** (``serial``, the server's ``--deterministic``): one session step at a time in the
   engine. An ingestion step enters only when no other step is in it, and a question holds the engine
   alone from its admission to its last token (its decode included); waiting questions still go before
   waiting ingestion steps. Every step then computes in a batch of its own, so a session's surprise,
   events and answers do not depend on other sessions' traffic (vLLM batches change the floating-point
   sums otherwise). It costs the overlap of sessions' engine work: measured in ``docs/reliability.md``.

The engine sees the count of holding questions (:attr:`Admission.listener`, called at every change): with
chunked iterations on vLLM its scheduler then gives the ingestion steps already in it no tokens either
(:mod:`.scheduler`), so a question's steps run alone in their iterations.

Outside serial mode, a question's decode (after its first token) shares the engine with ingestion
again. Questions that arrive without pause starve ingestion: that is the rule, not an accident. The
ingestion step's session lock is held while it waits, so a question on that same session waits for it (rule 1 cannot
deadlock: a question is admitted only once it holds its session).

Single event loop: the object is created and used on the loop that runs the sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from emserve.retrieval.errors import ConfigError


class Admission:
    """Rules 1-4 of the module docstring. ``questions``, ``ingesting`` and ``waiting_ingest``: the current
    counts (for inspection; the rules read the first two)."""

    def __init__(self, ingest_slots: int = 0, *, serial: bool = False) -> None:
        if ingest_slots < 0:
            raise ConfigError(f"ingest_slots must be >= 0 (0: no limit), got {ingest_slots}")
        self.ingest_slots = ingest_slots
        self.serial = serial
        self.busy = False  # serial mode: a step holds the engine alone
        self.questions = 0  # questions admitted and before their first token
        self.ingesting = 0  # ingestion steps in the engine
        self.waiting_ingest = 0
        self.listener: Callable[[int], None] | None = None
        """Called with ``questions`` each time it changes (synchronously, on the loop): the engine's view."""
        self._cond: asyncio.Condition | None = None

    def _questions_changed(self, delta: int) -> None:
        self.questions += delta
        if self.listener is not None:
            self.listener(self.questions)

    @property
    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    def _ingest_may_enter(self) -> bool:
        if self.serial and self.busy:
            return False
        return self.questions == 0 and (self.ingest_slots == 0 or self.ingesting < self.ingest_slots)

    @contextlib.asynccontextmanager
    async def ingest(self) -> AsyncIterator[None]:
        """Around an ingestion step's engine call: waits while rule 1 or 2 holds it back."""
        cond = self._condition
        async with cond:
            self.waiting_ingest += 1
            try:
                await cond.wait_for(self._ingest_may_enter)  # Condition wakes waiters in FIFO order
            finally:
                self.waiting_ingest -= 1
            self.ingesting += 1
            self.busy = self.serial
        try:
            yield
        finally:
            async with cond:
                self.ingesting -= 1
                self.busy = False
                cond.notify_all()

    def question(self) -> QuestionHold:
        """A question's hold on ingestion (rule 1): ``async with admission.question() as hold``;
        ``await hold.release()`` at its first token (idempotent; leaving the block releases it too)."""
        return QuestionHold(self)


class QuestionHold:
    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._held = False
        self._engine = False  # serial mode: this question holds the engine alone

    async def __aenter__(self) -> QuestionHold:
        adm = self._admission
        adm._questions_changed(+1)  # no await before it: takes effect for the next ingestion step
        self._held = True
        if adm.serial:  # rule 4: wait for the engine to be free, then hold it to the last token
            try:
                async with adm._condition:
                    await adm._condition.wait_for(lambda: not adm.busy)
                    adm.busy = True
            except BaseException:
                await self.release()
                raise
            self._engine = True
        return self

    async def release(self) -> None:
        if self._held:
            self._held = False
            adm = self._admission
            adm._questions_changed(-1)
            if adm.questions == 0:
                async with adm._condition:
                    adm._condition.notify_all()

    async def __aexit__(self, *exc: object) -> None:
        await self.release()
        if self._engine:
            self._engine = False
            adm = self._admission
            async with adm._condition:
                adm.busy = False
                adm._condition.notify_all()

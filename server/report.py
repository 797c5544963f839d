"""Step reports: the one record of what a session step did and where its time went.

Contract
--------
* Every engine step a session runs for its caller produces exactly one :class:`StepReport`: each
  ingestion chunk (``Session.append`` / ``flush`` return them with the committed offset) and each
  question (``AskResult.report``). Nothing else measures a step: the metrics, the logs, the retrieval
  trace's timings and the benchmarks read these records.
* ``phases`` holds wall seconds of the step's parts, each name in :data:`PHASES`, absent when the
  part did not run. They do not overlap; their sum is at most ``seconds`` (the rest is bookkeeping
  and the engine's scheduling).
* Sizes are per step: the new tokens computed, the window's tokens, the tokens injected from the KV
  logs (and their bytes read), the retrieved events and tokens (one layer's count; every layer
  retrieves as many tokens), the bytes appended to the log, the events closed and their sizes.
* A question adds ``ttft_s`` (from the call to its first generated token, lock wait included),
  ``output_tokens``, ``decode_s`` (from the first generated token to the last) and ``answer_start``
  (the rule that chose the answer's first tokens, if one did).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

PHASES = ("wait", "admit", "probe", "retrieve", "inject", "compute", "write", "segment", "close", "index", "save")
"""Parts of a step, in order:

* ``wait``: for the session's lock (another call stepping the same session);
* ``admit``: an ingestion step waiting to enter the engine (a question of any session goes first, or
  every ingestion slot is taken: :mod:`emserve.server.engine.admission`);
* ``probe``: a question's probe step (the engine computes the question's queries);
* ``retrieve``: choosing the window: lexical matches, retrieval (similarity search, neighbours,
  contiguity) and the window's layout;
* ``inject``: reading the window's K/V from the logs into the engine's cache (in the engine);
* ``compute``: the engine's forward pass over the new tokens, generation included for a question
  (the engine step's time less ``inject`` and ``write``);
* ``write``: appending the new tokens' K/V to the session's log (in the engine);
* ``segment``: the online segmenter (surprise threshold, boundary refinement);
* ``close``: closing events: representatives from the log's keys, appended to the event table;
* ``index``: syncing the similarity indexes with the table;
* ``save``: the session's own files (surprise, query statistics, segmenter state).
"""

Kind = Literal["ingest", "question"]
ANSWER_STARTS = ("copy", "contrast", "lookahead", "echo")
"""The rules that may choose a question's first answer tokens (``StepReport.answer_start``)."""


@dataclass(frozen=True)
class StepReport:
    kind: Kind
    offset: int
    """The session's committed tokens when the step started (where an ingestion chunk is written)."""
    new_tokens: int
    window_tokens: int
    injected_tokens: int
    retrieved_events: int
    retrieved_tokens: int
    bytes_read: int
    bytes_written: int
    events_closed: int
    event_tokens: tuple[int, ...]
    """The size of each event the step closed."""
    phases: dict[str, float]
    seconds: float
    ttft_s: float | None = None
    output_tokens: int = 0
    decode_s: float = 0.0
    answer_start: str | None = None
    """The rule that chose a question's first answer tokens where one did (``copy``, ``contrast``, and where
    the start is not the model's greedy one, ``lookahead`` or ``echo``; docs/recall.md rules 8, 19, 20);
    None: the model's own start."""

    @property
    def retrieval_s(self) -> float:
        return retrieval_seconds(self.phases)


def retrieval_seconds(phases: dict[str, float]) -> float:
    """Seconds spent choosing a step's window before its engine step: probe + retrieve (what the
    retrieval trace reports as ``retrieval_s``)."""
    return phases.get("probe", 0.0) + phases.get("retrieve", 0.0)


def question_timings(phases: dict[str, float]) -> dict[str, float]:
    """A question's timings once its window is chosen (``QuestionResult.timings``): ``wait_s``,
    ``retrieval_s`` (:func:`retrieval_seconds`) and ``probe_s`` (its probe step alone)."""
    return {"wait_s": phases.get("wait", 0.0), "retrieval_s": retrieval_seconds(phases),
            "probe_s": phases.get("probe", 0.0)}


@dataclass
class PhaseClock:
    """Collects the phases of one step (:data:`PHASES`); ``with clock("segment"): ...`` adds to a phase."""

    t0: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t)

    def add(self, phase: str, seconds: float) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown step phase {phase!r}")
        self.phases[phase] = self.phases.get(phase, 0.0) + max(0.0, seconds)

    def engine(self, timings: dict[str, float]) -> None:
        """An engine step's timings (``StepResult.timings``) as inject / compute / write."""
        inject, write = timings.get("inject_s", 0.0), timings.get("write_s", 0.0)
        self.add("inject", inject)
        self.add("write", write)
        self.add("compute", timings.get("total_s", 0.0) - inject - write)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

"""The engine admission rules (emserve.server.engine.admission), on the event loop alone."""

from __future__ import annotations

import asyncio

import pytest

from emserve.retrieval.errors import ConfigError
from emserve.server.engine.admission import Admission


async def _enter(adm: Admission, name: str, log: list[str], gate: asyncio.Event) -> None:
    async with adm.ingest():
        log.append(f"in {name}")
        await gate.wait()
    log.append(f"out {name}")


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_ingestion_enters_at_once_without_questions_or_limit() -> None:
    async def run() -> list[str]:
        adm, log, gate = Admission(), [], asyncio.Event()
        tasks = [asyncio.create_task(_enter(adm, str(i), log, gate)) for i in range(4)]
        await _settle()
        assert adm.ingesting == 4
        gate.set()
        await asyncio.gather(*tasks)
        return log

    assert asyncio.run(run())[:4] == ["in 0", "in 1", "in 2", "in 3"]


def test_a_question_holds_ingestion_back_until_it_releases() -> None:
    async def run() -> None:
        adm, log, gate = Admission(), [], asyncio.Event()
        gate.set()
        async with adm.question() as hold:
            task = asyncio.create_task(_enter(adm, "a", log, gate))
            await _settle()
            assert log == [] and adm.waiting_ingest == 1
            await hold.release()
            await _settle()
            assert log == ["in a", "out a"]
            await hold.release()  # idempotent: the count does not go below zero
            assert adm.questions == 0
        await task

    asyncio.run(run())


def test_leaving_the_block_releases_a_question_that_never_got_a_token() -> None:
    async def run() -> None:
        adm, log, gate = Admission(), [], asyncio.Event()
        gate.set()
        with pytest.raises(RuntimeError):
            async with adm.question():
                task = asyncio.create_task(_enter(adm, "a", log, gate))
                await _settle()
                raise RuntimeError("the question failed before its first token")
        await asyncio.wait_for(task, 1.0)
        assert log == ["in a", "out a"] and adm.questions == 0

    asyncio.run(run())


def test_a_question_does_not_wait_for_steps_already_in_the_engine() -> None:
    async def run() -> None:
        adm, log, gate = Admission(ingest_slots=1), [], asyncio.Event()
        first = asyncio.create_task(_enter(adm, "a", log, gate))
        await _settle()
        assert adm.ingesting == 1
        async with adm.question():  # entered while a step runs and the only slot is taken
            assert adm.questions == 1
        gate.set()
        await first

    asyncio.run(run())


def test_slots_bound_the_steps_in_the_engine_and_keep_their_order() -> None:
    async def run() -> list[str]:
        adm, log = Admission(ingest_slots=2), []
        gates = [asyncio.Event() for _ in range(4)]
        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(_enter(adm, str(i), log, gates[i])))
            await _settle()
        assert log == ["in 0", "in 1"] and adm.waiting_ingest == 2
        gates[1].set()
        await _settle()
        assert log == ["in 0", "in 1", "out 1", "in 2"]
        for g in gates:
            g.set()
        await asyncio.gather(*tasks)
        return log

    log = asyncio.run(run())
    assert [x for x in log if x.startswith("in")] == ["in 0", "in 1", "in 2", "in 3"]


def test_negative_slots_are_refused() -> None:
    with pytest.raises(ConfigError):
        Admission(ingest_slots=-1)


async def _ask(adm: Admission, name: str, log: list[str], first: asyncio.Event, last: asyncio.Event) -> None:
    async with adm.question() as hold:
        log.append(f"in {name}")
        await first.wait()
        await hold.release()  # its first token
        log.append(f"first {name}")
        await last.wait()
    log.append(f"out {name}")


def test_serial_mode_runs_one_step_at_a_time_and_questions_hold_the_engine_to_their_last_token() -> None:
    async def run() -> list[str]:
        adm, log = Admission(serial=True), []
        g = {k: asyncio.Event() for k in ("a", "b", "q1", "q2", "end1")}
        a = asyncio.create_task(_enter(adm, "a", log, g["a"]))
        b = asyncio.create_task(_enter(adm, "b", log, g["b"]))
        await _settle()
        assert log == ["in a"]  # no slot limit, but one step at a time
        q = asyncio.create_task(_ask(adm, "q", log, g["q1"], g["end1"]))
        await _settle()
        assert log == ["in a"]  # the question waits for the step in the engine
        g["a"].set()
        await _settle()
        assert log == ["in a", "out a", "in q"]  # ... and goes before the waiting ingestion step
        g["q1"].set()
        await _settle()
        assert log[-1] == "first q" and "in b" not in log  # its decode still holds the engine alone
        g["end1"].set()
        await _settle()
        assert log[-2:] == ["out q", "in b"]
        g["b"].set()
        await asyncio.gather(a, b, q)
        assert not adm.busy and adm.questions == 0
        return log

    asyncio.run(run())


def test_serial_mode_frees_the_engine_when_a_waiting_question_is_cancelled() -> None:
    async def run() -> None:
        adm, log, gate = Admission(serial=True), [], asyncio.Event()
        a = asyncio.create_task(_enter(adm, "a", log, gate))
        await _settle()
        never = asyncio.Event()
        q = asyncio.create_task(_ask(adm, "q", log, never, never))
        await _settle()
        q.cancel()
        await _settle()
        assert adm.questions == 0
        gate.set()
        await a
        b = asyncio.create_task(_enter(adm, "b", log, gate))
        await asyncio.wait_for(b, 1.0)
        assert log == ["in a", "out a", "in b", "out b"] and not adm.busy

    asyncio.run(run())


def test_the_listener_sees_every_change_of_the_question_count() -> None:
    async def run() -> list[int]:
        adm, seen = Admission(), []
        adm.listener = seen.append
        async with adm.question() as first:
            async with adm.question():
                pass
            await first.release()
            await first.release()  # idempotent: no second change
        with pytest.raises(RuntimeError):
            async with adm.question():
                raise RuntimeError("the question failed before its first token")
        return seen

    assert asyncio.run(run()) == [1, 2, 1, 0, 1, 0]


def test_ingestion_alone_lingers_in_short_iterations_only_after_a_question() -> None:
    sched = pytest.importorskip("emserve.server.engine.scheduler")  # imports vLLM's scheduler
    linger = sched.LINGER_S
    assert not sched.lingering(100.0, float("-inf"), holding=False, questions_in_engine=False)  # no question yet
    assert sched.lingering(100.0, 100.0 - linger / 2, holding=False, questions_in_engine=False)
    assert not sched.lingering(100.0, 100.0 - linger, holding=False, questions_in_engine=False)  # it has passed
    # with a question holding or in the engine, the hold and vLLM's own per-request cap decide instead
    assert not sched.lingering(100.0, 100.0, holding=True, questions_in_engine=False)
    assert not sched.lingering(100.0, 100.0, holding=False, questions_in_engine=True)

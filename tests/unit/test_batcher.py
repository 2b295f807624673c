"""Unit tests for service.batcher: routing of results, batch limits, policies, admission and shutdown."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from service.batcher import Batcher, BatchObserver, BatchPolicy, BatchResultMismatch, Row
from store.errors import DeadlineExceeded, Draining, QueueFull

pytestmark = pytest.mark.asyncio

HOLDER_LENGTH = 10**9


def result_of(row: Row) -> tuple[str, int, Any]:
    """What the fake model answers for a row: derived from the payload so misrouting is visible."""
    return row.task, row.version, ("out", row.payload)


class Engine:
    """Fake run_batch that records every batch and can be held on a gate."""

    def __init__(
        self, *, hold: bool = False, compute: Callable[[list[Row]], list[Any]] | None = None
    ) -> None:
        self.batches: list[list[Row]] = []
        self.gate = asyncio.Event()
        if not hold:
            self.gate.set()
        self.entered = asyncio.Event()
        self.compute = compute or (lambda rows: [result_of(r) for r in rows])

    async def __call__(self, rows: list[Row]) -> list[Any]:
        self.batches.append(list(rows))
        self.entered.set()
        await self.gate.wait()
        return self.compute(rows)

    def payloads(self) -> list[list[Any]]:
        return [[r.payload for r in batch] for batch in self.batches]


class Recorder(BatchObserver):
    """Observer that keeps everything it is told."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[Row], list[float]]] = []
        self.rejects: list[str] = []
        self.depths: list[int] = []

    def on_batch(self, rows: list[Row], queue_waits: list[float]) -> None:
        self.batches.append((rows, queue_waits))

    def on_reject(self, reason: str) -> None:
        self.rejects.append(reason)

    def on_queue_depth(self, depth: int) -> None:
        self.depths.append(depth)


class FakeClock:
    """Injectable clock that only moves when a test moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(engine: Engine, **overrides: Any) -> Batcher:
    options: dict[str, Any] = {
        "run_batch": engine,
        "max_batch_size": 8,
        "max_batch_tokens": 10_000,
        "max_wait_ms": 0,
        "max_queue": 1000,
    }
    options.update(overrides)
    return Batcher(**options)


def row(task: str, payload: Any, *, version: int = 1, length: int = 10) -> Row:
    return Row(task=task, version=version, length=length, payload=payload)


async def settle(predicate: Callable[[], bool], *, spins: int = 2000) -> None:
    """Yield to the event loop until predicate holds (no timed sleeps)."""
    for _ in range(spins):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def hold_engine(batcher: Batcher, engine: Engine) -> asyncio.Task[list[Any]]:
    """Occupy the worker with one row so that everything submitted afterwards queues."""
    # Longer than any token budget here, so its batch is full at once and no wait window applies.
    holder = asyncio.create_task(batcher.submit([row("holder", "h", length=HOLDER_LENGTH)], deadline=None))
    await engine.entered.wait()
    return holder


def spawn(batcher: Batcher, rows: list[Row], *, deadline: float | None = None) -> asyncio.Task[list[Any]]:
    return asyncio.create_task(batcher.submit(rows, deadline=deadline))


async def test_results_reach_the_right_waiters_under_concurrency() -> None:
    rng = random.Random(7)
    engine = Engine()
    batcher = make(engine, max_batch_size=7, max_batch_tokens=7 * 64)
    requests = []
    for r in range(150):
        rows = [
            row(f"task{rng.randrange(9)}", (r, i), version=1, length=rng.randint(1, 64))
            for i in range(rng.randint(1, 5))
        ]
        requests.append(rows)
    outcomes = await asyncio.gather(*(batcher.submit(rows, deadline=None) for rows in requests))
    for rows, outcome in zip(requests, outcomes, strict=True):
        assert outcome == [result_of(r) for r in rows]
    assert sum(len(b) for b in engine.batches) == sum(len(r) for r in requests)
    await batcher.stop()


async def test_request_spread_over_several_batches_completes_in_order() -> None:
    engine = Engine()
    batcher = make(engine, max_batch_size=2)
    rows = [row("a", i) for i in range(5)]
    assert await batcher.submit(rows, deadline=None) == [result_of(r) for r in rows]
    assert [len(b) for b in engine.batches] == [2, 2, 1]
    await batcher.stop()


async def test_batch_size_and_token_budget_are_respected() -> None:
    engine = Engine(hold=True)
    batcher = make(engine, max_batch_size=4, max_batch_tokens=100)
    holder = await hold_engine(batcher, engine)
    lengths = [5, 30, 10, 60, 25, 7, 250, 40, 3, 50, 20, 33]
    tasks = [spawn(batcher, [row(f"t{i % 3}", i, length=n)]) for i, n in enumerate(lengths)]
    await settle(lambda: batcher.queue_depth == len(lengths))
    engine.gate.set()
    await asyncio.gather(holder, *tasks)
    for batch in engine.batches[1:]:
        assert len(batch) <= 4
        cost = len(batch) * max(r.length for r in batch)
        assert cost <= 100 or len(batch) == 1
    # The over-long row still ran, on its own.
    assert any(len(b) == 1 and b[0].length == 250 for b in engine.batches)
    await batcher.stop()


async def test_mixed_policy_puts_many_tasks_in_one_batch() -> None:
    engine = Engine(hold=True)
    recorder = Recorder()
    batcher = make(engine, observer=recorder)
    holder = await hold_engine(batcher, engine)
    tasks = [spawn(batcher, [row(t, t)]) for t in ("a", "b", "c", "d")]
    await settle(lambda: batcher.queue_depth == 4)
    engine.gate.set()
    await asyncio.gather(holder, *tasks)
    assert len(engine.batches) == 2
    assert {r.task for r in engine.batches[1]} == {"a", "b", "c", "d"}
    assert [len(rows) for rows, _ in recorder.batches] == [1, 4]
    await batcher.stop()


async def test_per_task_policy_one_task_per_batch_round_robin() -> None:
    engine = Engine(hold=True)
    batcher = make(engine, max_batch_size=2, policy=BatchPolicy.PER_TASK)
    holder = await hold_engine(batcher, engine)
    tasks = [spawn(batcher, [row("a", f"a{i}")]) for i in range(6)]
    tasks += [spawn(batcher, [row("b", "b0")]), spawn(batcher, [row("c", "c0"), row("c", "c1")])]
    await settle(lambda: batcher.queue_depth == 9)
    engine.gate.set()
    await asyncio.gather(holder, *tasks)
    later = engine.batches[1:]
    for batch in later:
        assert len({r.task for r in batch}) == 1
    # "a" arrived first with most rows, yet b and c are served before a gets a second turn.
    assert [[r.payload for r in b] for b in later] == [
        ["a0", "a1"],
        ["b0"],
        ["c0", "c1"],
        ["a2", "a3"],
        ["a4", "a5"],
    ]
    await batcher.stop()


@pytest.mark.parametrize("policy", [BatchPolicy.MIXED, BatchPolicy.PER_TASK])
async def test_never_two_versions_of_one_task_in_a_batch(policy: BatchPolicy) -> None:
    engine = Engine(hold=True)
    batcher = make(engine, policy=policy)
    holder = await hold_engine(batcher, engine)
    rows = [
        row("t", "t1-a", version=1),
        row("t", "t2-a", version=2),
        row("u", "u1", version=1),
        row("t", "t1-b", version=1),
        row("t", "t2-b", version=2),
    ]
    tasks = [spawn(batcher, [r]) for r in rows]
    await settle(lambda: batcher.queue_depth == len(rows))
    engine.gate.set()
    outcomes = await asyncio.gather(*tasks)
    await holder
    assert outcomes == [[result_of(r)] for r in rows]
    for batch in engine.batches:
        versions: dict[str, set[int]] = {}
        for r in batch:
            versions.setdefault(r.task, set()).add(r.version)
        assert all(len(v) == 1 for v in versions.values())
    # The older version drains first.
    t_batches = [b for b in engine.batches if any(r.task == "t" for r in b)]
    assert {r.version for r in t_batches[0] if r.task == "t"} == {1}
    await batcher.stop()


async def test_mixed_policy_packs_rows_of_similar_length() -> None:
    engine = Engine(hold=True)
    batcher = make(engine, max_batch_size=2, max_wait_ms=60_000)
    holder = await hold_engine(batcher, engine)
    lengths = [10, 100, 12, 98, 11, 101]
    tasks = [spawn(batcher, [row(f"t{i}", n, length=n)]) for i, n in enumerate(lengths)]
    await settle(lambda: batcher.queue_depth == len(lengths))
    engine.gate.set()
    await asyncio.gather(holder, *tasks)
    # Oldest first (10), then its nearest in length; the long rows pad only among themselves.
    assert [sorted(p) for p in engine.payloads()[1:]] == [[10, 11], [100, 101], [12, 98]]
    await batcher.stop()


async def test_packing_does_not_starve_the_oldest_row() -> None:
    engine = Engine(hold=True)
    batcher = make(engine, max_batch_size=2, max_wait_ms=60_000)
    holder = await hold_engine(batcher, engine)
    lengths = [500, 10, 10, 10, 10, 10]
    tasks = [spawn(batcher, [row(f"t{i}", i, length=n)]) for i, n in enumerate(lengths)]
    await settle(lambda: batcher.queue_depth == len(lengths))
    engine.gate.set()
    await asyncio.gather(holder, *tasks)
    assert 0 in engine.payloads()[1]
    await batcher.stop()


async def test_loop_waits_for_a_full_batch_within_the_window() -> None:
    engine = Engine()
    batcher = make(engine, max_batch_size=3, max_wait_ms=60_000)
    first = spawn(batcher, [row("a", 0)])
    await settle(lambda: batcher.queue_depth == 1)
    for _ in range(50):
        await asyncio.sleep(0)
    assert engine.batches == []
    rest = spawn(batcher, [row("b", 1), row("c", 2)])
    await asyncio.gather(first, rest)
    assert engine.payloads() == [[0, 1, 2]]
    await batcher.stop()


async def test_lone_row_runs_when_the_window_closes() -> None:
    engine = Engine()
    batcher = make(engine, max_batch_size=8, max_wait_ms=5)
    assert await batcher.submit([row("a", 0)], deadline=None) == [result_of(row("a", 0))]
    await batcher.stop()


async def test_queue_full_rejects_without_enqueueing_and_admitted_work_completes() -> None:
    engine = Engine(hold=True)
    recorder = Recorder()
    batcher = make(engine, max_queue=3, observer=recorder)
    holder = await hold_engine(batcher, engine)
    first = spawn(batcher, [row("a", 0), row("a", 1)])
    await settle(lambda: batcher.queue_depth == 2)
    with pytest.raises(QueueFull) as info:
        await batcher.submit([row("b", 2), row("b", 3)], deadline=None)
    retry_after = info.value.details["retry_after"]
    assert isinstance(retry_after, int)
    assert retry_after >= 1
    assert batcher.queue_depth == 2
    assert recorder.rejects == ["queue_full"]
    second = spawn(batcher, [row("c", 4)])
    await settle(lambda: batcher.queue_depth == 3)
    engine.gate.set()
    assert await first == [result_of(row("a", 0)), result_of(row("a", 1))]
    assert await second == [result_of(row("c", 4))]
    await holder
    assert all(r.task != "b" for b in engine.batches for r in b)
    await batcher.stop()


async def test_deadline_passed_while_queued_is_rejected_and_never_run() -> None:
    clock = FakeClock()
    engine = Engine(hold=True)
    recorder = Recorder()
    batcher = make(engine, clock=clock, observer=recorder)
    holder = await hold_engine(batcher, engine)
    late = spawn(batcher, [row("late", 0), row("late", 1)], deadline=clock.now + 5)
    fine = spawn(batcher, [row("fine", 2)], deadline=clock.now + 500)
    await settle(lambda: batcher.queue_depth == 3)
    clock.now += 10
    engine.gate.set()
    with pytest.raises(DeadlineExceeded):
        await late
    assert await fine == [result_of(row("fine", 2))]
    await holder
    assert all(r.task != "late" for b in engine.batches for r in b)
    assert recorder.rejects == ["deadline"]
    await batcher.stop()


async def test_deadline_fails_the_waiter_promptly_while_the_worker_is_busy() -> None:
    engine = Engine(hold=True)
    batcher = make(engine)
    holder = await hold_engine(batcher, engine)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit([row("a", 0)], deadline=time.monotonic() + 0.02)
    assert batcher.queue_depth == 0
    engine.gate.set()
    await holder
    assert engine.payloads() == [["h"]]
    await batcher.stop()


async def test_deadline_already_passed_is_rejected_at_submit() -> None:
    clock = FakeClock()
    batcher = make(Engine(), clock=clock)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit([row("a", 0)], deadline=clock.now - 1)
    assert batcher.queue_depth == 0


async def test_cancelled_request_rows_are_dropped() -> None:
    engine = Engine(hold=True)
    recorder = Recorder()
    batcher = make(engine, observer=recorder)
    holder = await hold_engine(batcher, engine)
    gone = spawn(batcher, [row("gone", 0), row("gone", 1)])
    kept = spawn(batcher, [row("kept", 2)])
    await settle(lambda: batcher.queue_depth == 3)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert batcher.queue_depth == 1
    assert recorder.rejects == ["cancelled"]
    engine.gate.set()
    assert await kept == [result_of(row("kept", 2))]
    await holder
    assert all(r.task != "gone" for b in engine.batches for r in b)
    await batcher.stop()


async def test_exception_in_run_batch_reaches_only_that_batch() -> None:
    def compute(rows: list[Row]) -> list[Any]:
        if any(r.payload == "boom" for r in rows):
            raise ValueError("model failed")
        return [result_of(r) for r in rows]

    engine = Engine(hold=True, compute=compute)
    batcher = make(engine, max_batch_size=2)
    holder = await hold_engine(batcher, engine)
    victim = spawn(batcher, [row("a", "ok")])
    culprit = spawn(batcher, [row("b", "boom")])
    bystander = spawn(batcher, [row("c", "fine")])
    await settle(lambda: batcher.queue_depth == 3)
    engine.gate.set()
    for task in (victim, culprit):
        with pytest.raises(ValueError, match="model failed"):
            await task
    assert await bystander == [result_of(row("c", "fine"))]
    await holder
    assert engine.payloads()[1:] == [["ok", "boom"], ["fine"]]
    await batcher.stop()


async def test_failure_cancels_the_rest_of_a_spread_request() -> None:
    def compute(rows: list[Row]) -> list[Any]:
        if any(r.payload == "boom" for r in rows):
            raise ValueError("model failed")
        return [result_of(r) for r in rows]

    engine = Engine(compute=compute)
    batcher = make(engine, max_batch_size=1)
    with pytest.raises(ValueError):
        await batcher.submit([row("a", "boom"), row("a", "never")], deadline=None)
    await settle(lambda: batcher.queue_depth == 0)
    assert engine.payloads() == [["boom"]]
    await batcher.stop()


async def test_wrong_result_count_fails_every_waiter_of_that_batch() -> None:
    def compute(rows: list[Row]) -> list[Any]:
        out = [result_of(r) for r in rows]
        return out[:-1] if len(rows) > 1 else out

    engine = Engine(hold=True, compute=compute)
    batcher = make(engine, max_batch_size=2)
    holder = await hold_engine(batcher, engine)
    first = spawn(batcher, [row("a", 0)])
    second = spawn(batcher, [row("b", 1)])
    third = spawn(batcher, [row("c", 2)])
    await settle(lambda: batcher.queue_depth == 3)
    engine.gate.set()
    for task in (first, second):
        with pytest.raises(BatchResultMismatch) as info:
            await task
        assert isinstance(info.value, RuntimeError)
    assert await third == [result_of(row("c", 2))]
    await holder
    await batcher.stop()


async def test_stop_with_drain_finishes_queued_and_running_work() -> None:
    engine = Engine(hold=True)
    batcher = make(engine, max_batch_size=2, max_wait_ms=60_000)
    holder = await hold_engine(batcher, engine)
    queued = [spawn(batcher, [row("a", i)]) for i in range(3)]
    await settle(lambda: batcher.queue_depth == 3)
    stopping = asyncio.create_task(batcher.stop(drain=True))
    await settle(lambda: not batcher.running)
    with pytest.raises(Draining):
        await batcher.submit([row("late", 9)], deadline=None)
    engine.gate.set()
    await stopping
    assert await holder == [result_of(row("holder", "h", length=HOLDER_LENGTH))]
    assert [await t for t in queued] == [[result_of(row("a", i))] for i in range(3)]
    assert batcher.queue_depth == 0


async def test_stop_without_drain_fails_queued_but_finishes_running() -> None:
    engine = Engine(hold=True)
    batcher = make(engine)
    holder = await hold_engine(batcher, engine)
    queued = spawn(batcher, [row("a", 0)])
    await settle(lambda: batcher.queue_depth == 1)
    stopping = asyncio.create_task(batcher.stop(drain=False))
    with pytest.raises(Draining):
        await queued
    engine.gate.set()
    await stopping
    assert await holder == [result_of(row("holder", "h", length=HOLDER_LENGTH))]
    assert engine.payloads() == [["h"]]


async def test_stop_timeout_fails_the_running_batch_with_draining() -> None:
    engine = Engine(hold=True)
    batcher = make(engine)
    holder = await hold_engine(batcher, engine)
    queued = spawn(batcher, [row("a", 0)])
    await settle(lambda: batcher.queue_depth == 1)
    await batcher.stop(drain=True, timeout=0.01)
    for task in (holder, queued):
        with pytest.raises(Draining):
            await task
    assert not batcher.running


async def test_submit_after_stop_raises_draining() -> None:
    batcher = make(Engine())
    batcher.start()
    assert batcher.running
    await batcher.stop()
    with pytest.raises(Draining):
        await batcher.submit([row("a", 0)], deadline=None)


async def test_observer_sees_batches_queue_waits_and_depth() -> None:
    clock = FakeClock()
    engine = Engine(hold=True)
    recorder = Recorder()
    batcher = make(engine, clock=clock, observer=recorder)
    holder = await hold_engine(batcher, engine)
    queued = spawn(batcher, [row("a", 0), row("b", 1)])
    await settle(lambda: batcher.queue_depth == 2)
    clock.now += 3
    engine.gate.set()
    await asyncio.gather(holder, queued)
    rows, waits = recorder.batches[-1]
    assert [r.payload for r in rows] == [0, 1]
    assert waits == [3.0, 3.0]
    assert recorder.depths[-1] == 0
    assert 2 in recorder.depths
    await batcher.stop()


async def test_failing_observer_does_not_break_serving() -> None:
    class Broken(BatchObserver):
        def on_batch(self, rows: list[Row], queue_waits: list[float]) -> None:
            raise RuntimeError("metrics down")

    batcher = make(Engine(), observer=Broken())
    assert await batcher.submit([row("a", 0)], deadline=None) == [result_of(row("a", 0))]
    await batcher.stop()


async def test_invalid_settings_raise() -> None:
    engine = Engine()
    with pytest.raises(ValueError):
        make(engine, max_batch_size=0)
    with pytest.raises(ValueError):
        make(engine, max_queue=0)
    with pytest.raises(ValueError):
        Row(task="a", version=1, length=-1, payload=None)
    assert BatchPolicy("per_task") is BatchPolicy.PER_TASK

"""The batcher's bookkeeping: reserved room, what clients are told, packing bounds, rates, late timers.

Each case pins a promise that the broader batcher tests pass over: the numbers a refusal reports,
the exact token budget, the bounded packing scan, the throughput average behind Retry-After and
a deadline timer that fires before the injected clock says the deadline passed.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import pytest
from test_batcher import (
    HOLDER_LENGTH,
    Engine,
    FakeClock,
    Recorder,
    hold_engine,
    make,
    result_of,
    row,
    settle,
    spawn,
)

from service.batcher import BatchPolicy, BatchResultMismatch, Row
from store.errors import DeadlineExceeded, Draining, PayloadTooLarge, QueueFull

pytestmark = pytest.mark.asyncio

SHUTTING_DOWN = "the service is shutting down and takes no new work"


async def test_reserved_room_counts_until_submitted_or_given_back() -> None:
    engine = Engine(hold=True)
    batcher = make(engine, max_queue=4)
    holder = await hold_engine(batcher, engine)
    batcher.reserve(2)
    batcher.reserve(1)
    assert batcher.reserved == 3
    with pytest.raises(QueueFull) as info:
        await batcher.submit([row("a", 0), row("a", 1)], deadline=None)
    assert info.value.details == {"retry_after": 1, "queue_depth": 0, "max_queue": 4}
    assert info.value.message == "the queue is full (3 of 4 rows); retry in 1 s"
    batcher.unreserve(1)
    assert batcher.reserved == 2
    # the two reserved rows take the room held for them, without a second admission check
    queued = asyncio.create_task(batcher.submit([row("a", 0), row("a", 1)], deadline=None, reserved=True))
    await settle(lambda: batcher.queue_depth == 2)
    assert batcher.reserved == 0
    with pytest.raises(QueueFull) as info:
        await batcher.submit([row("b", i) for i in range(3)], deadline=None)
    assert info.value.message == "the queue is full (2 of 4 rows); retry in 1 s"
    assert info.value.details["queue_depth"] == 2
    engine.gate.set()
    assert await queued == [result_of(row("a", 0)), result_of(row("a", 1))]
    await holder
    await batcher.stop()
    with pytest.raises(Draining) as refused:
        batcher.reserve(1)
    assert refused.value.message == SHUTTING_DOWN


async def test_the_running_batch_is_in_flight_and_a_cut_short_one_is_told_why() -> None:
    engine = Engine(hold=True)
    batcher = make(engine)
    assert batcher.in_flight == 0
    task = spawn(batcher, [row("a", 0), row("a", 1)])
    await engine.entered.wait()
    assert batcher.in_flight == 2 and batcher.queue_depth == 0
    await batcher.stop(timeout=0)
    with pytest.raises(Draining) as info:
        await task
    assert info.value.message == "the service shut down while the request was running"
    assert batcher.in_flight == 0


async def test_a_result_that_is_no_list_fails_the_batch_with_a_count_of_none() -> None:
    async def run(rows: list[Row]) -> Any:
        return (result_of(r) for r in rows)  # a generator has no length: it cannot be paired

    batcher = make(run)
    with pytest.raises(BatchResultMismatch) as info:
        await batcher.submit([row("a", 0)], deadline=None)
    assert str(info.value) == "run_batch returned None results for a batch of 1 rows"
    await batcher.stop()


class SteppedEngine:
    """Fake run_batch whose every call waits for its own release."""

    def __init__(self) -> None:
        self.batches: list[list[Row]] = []
        self.gates: list[asyncio.Event] = []
        self.entered = asyncio.Event()

    async def __call__(self, rows: list[Row]) -> list[Any]:
        self.batches.append(list(rows))
        gate = asyncio.Event()
        self.gates.append(gate)
        self.entered.set()
        await gate.wait()
        return [result_of(r) for r in rows]


async def test_a_request_cancelled_mid_batch_does_not_cost_later_rows_their_results() -> None:
    engine = SteppedEngine()
    batcher = make(engine)
    holder = spawn(batcher, [row("holder", "h", length=HOLDER_LENGTH)])
    await settle(lambda: len(engine.gates) == 1)
    first = spawn(batcher, [row("a", "gone")])
    second = spawn(batcher, [row("b", "kept")])
    await settle(lambda: batcher.queue_depth == 2)
    engine.gates[0].set()
    await holder
    await settle(lambda: len(engine.gates) == 2)  # the batch with both rows is running
    assert [r.payload for r in engine.batches[1]] == ["gone", "kept"]
    first.cancel()
    await settle(first.done)
    engine.gates[1].set()
    assert await second == [result_of(row("b", "kept"))]
    await batcher.stop()


async def test_rows_that_fill_the_token_budget_exactly_share_one_batch() -> None:
    engine = Engine(hold=True)
    batcher = make(engine, max_batch_tokens=30)
    holder = await hold_engine(batcher, engine)
    tasks = [spawn(batcher, [row("a", i, length=10)]) for i in range(3)]
    await settle(lambda: batcher.queue_depth == 3)
    engine.gate.set()
    await asyncio.gather(holder, *tasks)
    assert engine.payloads()[1:] == [[0, 1, 2]]  # 3 rows x 10 tokens = the budget of 30
    await batcher.stop()


@pytest.mark.parametrize(("batch_size", "scanned"), [(2, 64), (10, 80)])
async def test_mixed_packing_looks_at_a_bounded_prefix_of_the_queue(batch_size: int, scanned: int) -> None:
    engine = Engine(hold=True)
    batcher = make(engine, max_batch_size=batch_size)  # scans max(8 x size, 64) rows past the oldest
    holder = await hold_engine(batcher, engine)
    tasks = [spawn(batcher, [row("a", "oldest", length=10)])]
    tasks += [spawn(batcher, [row("a", f"long{i}", length=100)]) for i in range(scanned)]
    tasks.append(spawn(batcher, [row("a", "far", length=10)]))
    await settle(lambda: batcher.queue_depth == scanned + 2)
    engine.gate.set()
    await asyncio.gather(holder, *tasks)
    # the equally short row just past the scan is not seen: the closest rows within it go along
    assert engine.payloads()[1] == ["oldest"] + [f"long{i}" for i in range(batch_size - 1)]
    await batcher.stop()


async def test_per_task_packing_looks_at_a_bounded_prefix_of_the_task() -> None:
    engine = Engine(hold=True)
    batcher = make(engine, max_batch_size=2, policy=BatchPolicy.PER_TASK)
    holder = await hold_engine(batcher, engine)
    tasks = [spawn(batcher, [row("a", "v1-first", version=1)])]
    tasks += [spawn(batcher, [row("a", f"v2-{i}", version=2)]) for i in range(70)]
    tasks.append(spawn(batcher, [row("a", "v1-far", version=1)]))
    await settle(lambda: batcher.queue_depth == 72)
    engine.gate.set()
    await asyncio.gather(holder, *tasks)
    # 63 candidates of another version fill the scan: the far row of version 1 is not reached
    assert engine.payloads()[1] == ["v1-first"]
    await batcher.stop()


async def test_a_failed_batch_reports_the_rows_it_took_off_the_queue() -> None:
    recorder = Recorder()

    async def fail(rows: list[Row]) -> list[Any]:
        raise RuntimeError("device lost")

    batcher = make(fail, max_batch_size=2, observer=recorder)
    with pytest.raises(RuntimeError):
        await batcher.submit([row("a", i) for i in range(3)], deadline=None)
    # queued 3, the batch of 2 started (1 left), the failure dropped the third row too
    assert recorder.depths == [3, 1, 0]
    recorder.depths.clear()
    with pytest.raises(RuntimeError):
        await batcher.submit([row("a", 0)], deadline=None)
    assert recorder.depths == [1, 0]  # nothing more was queued, so the failure reports nothing
    await batcher.stop()


async def test_an_expired_request_is_told_its_deadline_and_the_depth_drops() -> None:
    clock = FakeClock()
    recorder = Recorder()
    engine = Engine(hold=True)
    batcher = make(engine, clock=clock, observer=recorder)
    holder = await hold_engine(batcher, engine)
    deadline = clock.now + 5.0
    late = spawn(batcher, [row("a", 0)], deadline=deadline)
    await settle(lambda: batcher.queue_depth == 1)
    clock.now = deadline
    engine.gate.set()
    await holder
    with pytest.raises(DeadlineExceeded) as info:
        await late
    assert info.value.message == "the request deadline passed while it was queued"
    assert info.value.details == {"deadline": deadline}
    assert recorder.depths[-1] == 0 and recorder.rejects == ["deadline"]
    await batcher.stop()


class LoopClock:
    """Moves the event loop's clock forward on demand, so due timers run on the next iteration."""

    def __init__(self, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = 0.0
        real = loop.time
        monkeypatch.setattr(loop, "time", lambda: real() + self.offset)


async def spins(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_deadline_timer_early_by_the_injected_clock_looks_again(monkeypatch) -> None:
    loop_clock = LoopClock(asyncio.get_running_loop(), monkeypatch)
    clock = FakeClock()
    engine = Engine(hold=True)
    batcher = make(engine, clock=clock)
    holder = await hold_engine(batcher, engine)
    deadline = clock.now + 0.5
    late = spawn(batcher, [row("a", 0)], deadline=deadline)
    await settle(lambda: batcher.queue_depth == 1)
    # the event loop's timer is due, but by the batcher's clock half a second is left: keep waiting
    loop_clock.offset += 10.0
    await spins()
    assert not late.done() and batcher.queue_depth == 1
    # the clock reaches the deadline exactly: the next look expires it
    clock.now = deadline
    loop_clock.offset += 10.0
    await settle(late.done)
    with pytest.raises(DeadlineExceeded):
        await late
    assert batcher.queue_depth == 0
    engine.gate.set()
    await holder
    await batcher.stop()


class TimedBatches:
    """Fake run_batch whose n-th call advances the event loop's clock by `seconds[n]`; can be held."""

    def __init__(self, loop_clock: LoopClock, seconds: list[float]) -> None:
        self.loop_clock = loop_clock
        self.seconds = list(seconds)
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

    async def __call__(self, rows: list[Row]) -> list[Any]:
        self.entered.set()
        await self.gate.wait()
        self.loop_clock.offset += self.seconds.pop(0) if self.seconds else 0.0
        return [result_of(r) for r in rows]


async def _retry_after(batcher, rows: int) -> int:
    with pytest.raises(QueueFull) as info:
        await batcher.submit([row("late", i) for i in range(rows)], deadline=None)
    return info.value.details["retry_after"]


async def test_retry_after_follows_the_weighted_average_of_batch_rates(monkeypatch) -> None:
    loop_clock = LoopClock(asyncio.get_running_loop(), monkeypatch)
    engine = TimedBatches(loop_clock, [2.0, 1.0])  # 4 rows in 2 s, then 4 rows in 1 s
    batcher = make(engine, max_batch_size=4, max_queue=10)
    await batcher.submit([row("a", i) for i in range(4)], deadline=None)
    await batcher.submit([row("a", i) for i in range(4)], deadline=None)
    rate = 0.2 * (4 / 1.0) + 0.8 * (4 / 2.0)  # the newest batch weighs a fifth: 2.4 rows/s
    engine.gate.clear()
    engine.entered.clear()
    holder = spawn(batcher, [row("holder", "h", length=HOLDER_LENGTH)])
    await engine.entered.wait()
    queued = spawn(batcher, [row("q", i) for i in range(8)])
    await settle(lambda: batcher.queue_depth == 8)
    assert await _retry_after(batcher, 9) == math.ceil(7 / rate) == 3  # 7 rows over
    assert await _retry_after(batcher, 3) == math.ceil(1 / rate) == 1  # under a second: one
    engine.gate.set()
    await holder
    await queued
    await batcher.stop()


async def test_batches_that_take_no_measurable_time_leave_the_rate_unknown(monkeypatch) -> None:
    loop_clock = LoopClock(asyncio.get_running_loop(), monkeypatch)
    frozen = asyncio.get_running_loop().time()
    monkeypatch.setattr(asyncio.get_running_loop(), "time", lambda: frozen + loop_clock.offset)
    engine = TimedBatches(loop_clock, [0.0, 0.5])
    batcher = make(engine, max_batch_size=4, max_queue=10)
    # a batch of zero seconds: no rate (and no division by zero), results as usual
    assert await batcher.submit([row("a", 0)], deadline=None) == [result_of(row("a", 0))]
    engine.gate.clear()
    engine.entered.clear()
    holder = spawn(batcher, [row("holder", "h", length=HOLDER_LENGTH)])
    await engine.entered.wait()
    queued = spawn(batcher, [row("q", i) for i in range(10)])
    await settle(lambda: batcher.queue_depth == 10)
    assert await _retry_after(batcher, 10) == 1  # nothing measured yet: the shortest hint
    engine.gate.set()
    await holder
    await queued
    # the holder's batch took half a second for one row: 2 rows/s; 10 queued rows over -> 5 s
    engine.gate.clear()
    engine.entered.clear()
    holder = spawn(batcher, [row("holder", "h", length=HOLDER_LENGTH)])
    await engine.entered.wait()
    queued = spawn(batcher, [row("q", i) for i in range(10)])
    await settle(lambda: batcher.queue_depth == 10)
    assert await _retry_after(batcher, 10) == math.ceil(10 / 2.0) == 5
    engine.gate.set()
    await holder
    await queued
    await batcher.stop()


async def test_settings_at_their_bounds_are_accepted_and_out_of_bounds_ones_say_why() -> None:
    engine = Engine()
    batcher = make(engine, max_batch_size=1, max_batch_tokens=1, max_wait_ms=0, max_queue=1)
    assert await batcher.submit([row("a", 0, length=1)], deadline=None) == [result_of(row("a", 0, length=1))]
    await batcher.stop()
    for setting, value, message in [
        ("max_batch_size", 0, "max_batch_size must be >= 1, got 0"),
        ("max_batch_tokens", 0, "max_batch_tokens must be >= 1, got 0"),
        ("max_wait_ms", -1, "max_wait_ms must be >= 0, got -1"),
        ("max_queue", 0, "max_queue must be >= 1, got 0"),
    ]:
        with pytest.raises(ValueError) as info:
            make(engine, **{setting: value})
        assert str(info.value) == message
    with pytest.raises(ValueError) as info:
        Row(task="a", version=1, length=-1, payload=None)
    assert str(info.value) == "row length must be >= 0, got -1"
    assert Row(task="a", version=1, length=0, payload=None).length == 0


async def test_stop_drains_by_default_and_each_way_of_stopping_says_what_happened() -> None:
    engine = Engine(hold=True)
    batcher = make(engine)
    holder = await hold_engine(batcher, engine)
    queued = spawn(batcher, [row("a", 0)])
    await settle(lambda: batcher.queue_depth == 1)
    stopping = asyncio.create_task(batcher.stop())
    await settle(lambda: not batcher.running)
    engine.gate.set()
    await stopping
    assert await queued == [result_of(row("a", 0))]  # drained, not refused
    await holder
    with pytest.raises(Draining) as info:
        batcher.start()
    assert info.value.message == "the batcher is shutting down"

    engine = Engine(hold=True)
    batcher = make(engine)
    holder = await hold_engine(batcher, engine)
    queued = spawn(batcher, [row("a", 0)])
    await settle(lambda: batcher.queue_depth == 1)
    stopping = asyncio.create_task(batcher.stop(drain=False))
    with pytest.raises(Draining) as info:
        await queued
    assert info.value.message == "the service is shutting down; the request was not run"
    engine.gate.set()
    await stopping
    await holder

    engine = Engine(hold=True)
    batcher = make(engine)
    holder = await hold_engine(batcher, engine)
    queued = spawn(batcher, [row("a", 0)])
    await settle(lambda: batcher.queue_depth == 1)
    await batcher.stop(timeout=0)
    with pytest.raises(Draining) as info:
        await queued
    assert info.value.message == "the service shut down before the request ran"
    with pytest.raises(Draining):
        await holder

    # never started: queued work cannot exist, and stop still refuses what comes after
    batcher = make(Engine())
    await batcher.stop()
    with pytest.raises(Draining) as info:
        await batcher.submit([row("a", 0)], deadline=None)
    assert info.value.message == SHUTTING_DOWN


async def test_a_deadline_equal_to_now_is_already_passed_at_submit() -> None:
    clock = FakeClock()
    recorder = Recorder()
    batcher = make(Engine(), clock=clock, observer=recorder)
    with pytest.raises(DeadlineExceeded) as info:
        await batcher.submit([row("a", 0)], deadline=clock.now)
    assert info.value.message == "the request deadline passed before it was queued"
    assert info.value.details == {"deadline": clock.now}
    assert recorder.rejects == ["deadline"] and batcher.queue_depth == 0
    await batcher.stop()


class Poison:
    """A row length that passes Row's check but breaks batch formation (a bug in the loop)."""

    def __lt__(self, other: object) -> bool:
        return False

    def __sub__(self, other: object) -> int:
        raise TypeError("not a length")


async def test_a_crashed_loop_releases_queued_waiters_with_a_reason(caplog) -> None:
    engine = Engine(hold=True)
    batcher = make(engine)
    holder = await hold_engine(batcher, engine)
    waiting = spawn(batcher, [row("a", 0)])
    poisoned = spawn(batcher, [Row(task="b", version=1, length=Poison(), payload=1)])  # type: ignore[arg-type]
    await settle(lambda: batcher.queue_depth == 2)
    engine.gate.set()
    await holder
    for task in (waiting, poisoned):
        with pytest.raises(Draining) as info:
            await task
        assert info.value.message == "the batcher stopped before the request ran"
    assert not batcher.running
    with pytest.raises(Draining):
        await batcher.submit([row("a", 1)], deadline=None)
    with caplog.at_level(logging.ERROR, logger="service.batcher"):
        await batcher.stop()  # retrieves the loop's error (logged), so nothing is left unretrieved
    assert "the batcher loop failed" in caplog.messages
    assert "the batcher loop ended with an error (logged when it happened)" in caplog.messages


async def test_a_request_too_large_for_the_queue_says_how_large_it_may_be() -> None:
    batcher = make(Engine(), max_queue=3)
    with pytest.raises(PayloadTooLarge) as info:
        await batcher.submit([row("a", i) for i in range(4)], deadline=None)
    assert info.value.message == "request has 4 inputs; at most 3 can be queued"
    await batcher.stop()


async def test_a_started_request_is_past_its_deadline_for_good(monkeypatch) -> None:
    """Rows spread over several batches: once the first runs, the deadline no longer applies."""
    clock = FakeClock()
    engine = SteppedEngine()
    batcher = make(engine, max_batch_size=2, clock=clock)
    rows = [row("a", i) for i in range(3)]
    request = spawn(batcher, rows, deadline=clock.now + 5.0)
    await settle(lambda: len(engine.gates) == 1)  # the first two rows run
    clock.now += 10.0
    engine.gates[0].set()
    await settle(lambda: len(engine.gates) == 2)
    engine.gates[1].set()
    assert await request == [result_of(r) for r in rows]
    await batcher.stop()


async def test_queue_depth_is_reported_after_a_cancel_and_after_a_stop_without_drain() -> None:
    recorder = Recorder()
    engine = Engine(hold=True)
    batcher = make(engine, observer=recorder)
    holder = await hold_engine(batcher, engine)
    gone = spawn(batcher, [row("a", 0), row("a", 1)])
    await settle(lambda: batcher.queue_depth == 2)
    gone.cancel()
    await settle(gone.done)
    assert recorder.depths[-1] == 0 and recorder.rejects == ["cancelled"]
    queued = spawn(batcher, [row("b", 0)])
    await settle(lambda: batcher.queue_depth == 1)
    assert recorder.depths[-1] == 1
    stopping = asyncio.create_task(batcher.stop(drain=False))
    with pytest.raises(Draining):
        await queued
    assert recorder.depths[-1] == 0
    engine.gate.set()
    await stopping
    await holder


async def test_mixed_packing_skips_rows_that_do_not_fit_and_keeps_looking() -> None:
    engine = Engine(hold=True)
    batcher = make(engine, max_batch_size=4, max_batch_tokens=30)
    holder = await hold_engine(batcher, engine)
    tasks = [
        spawn(batcher, [row("a", "anchor", length=10)]),
        spawn(batcher, [row("a", "other version", version=2, length=10)]),  # never with version 1
        spawn(batcher, [row("b", "too long", length=16)]),  # 2 x 16 = 32 > 30
        spawn(batcher, [row("c", "fits", length=3)]),  # further in length, but 2 x 10 = 20 fits
    ]
    await settle(lambda: batcher.queue_depth == 4)
    engine.gate.set()
    await asyncio.gather(holder, *tasks)
    assert engine.payloads()[1] == ["anchor", "fits"]
    await batcher.stop()


def frozen_loop(monkeypatch: pytest.MonkeyPatch) -> LoopClock:
    """Stop the event loop's clock (timers never come due unless the test moves it)."""
    loop = asyncio.get_running_loop()
    clock = LoopClock(loop, monkeypatch)
    now = loop.time()
    monkeypatch.setattr(loop, "time", lambda: now + clock.offset)
    return clock


@pytest.mark.parametrize("budget", [20, 25])
async def test_a_batch_with_room_for_one_more_row_waits_for_it_within_the_window(monkeypatch, budget) -> None:
    frozen_loop(monkeypatch)
    engine = Engine()
    batcher = make(engine, max_batch_size=4, max_batch_tokens=budget, max_wait_ms=500)
    first = spawn(batcher, [row("a", 0, length=10)])
    await spins()
    assert engine.batches == []  # a second row of 10 would still fit: the window is open
    second = spawn(batcher, [row("b", 1, length=10)])
    await asyncio.gather(first, second)
    assert engine.payloads() == [[0, 1]]  # and once it came the batch was full: no more waiting
    await batcher.stop()


async def test_rows_inside_the_oldest_rows_window_go_before_newer_closer_ones(monkeypatch) -> None:
    loop_clock = frozen_loop(monkeypatch)
    engine = Engine(hold=True)
    batcher = make(engine, max_batch_size=2, max_wait_ms=1000)
    holder = await hold_engine(batcher, engine)
    tasks = [
        spawn(batcher, [row("a", "oldest", length=10)]),
        spawn(batcher, [row("b", "same window", length=90)]),
    ]
    await settle(lambda: batcher.queue_depth == 2)
    loop_clock.offset += 5.0  # later arrivals are outside the oldest row's one-second window
    tasks.append(spawn(batcher, [row("c", "newer and closer", length=10)]))
    await settle(lambda: batcher.queue_depth == 3)
    engine.gate.set()
    await asyncio.gather(holder, *tasks[:2])
    assert engine.payloads()[1] == ["oldest", "same window"]
    await batcher.stop()  # the last row waits out its window on a stopped clock: draining runs it now
    assert await tasks[2] == [result_of(row("c", "newer and closer", length=10))]


async def test_an_observer_without_some_hooks_is_fine_and_failing_hooks_are_logged(caplog) -> None:
    class OnlyBatches:
        def __init__(self) -> None:
            self.seen: list[int] = []

        def on_batch(self, rows: list[Row], queue_waits: list[float]) -> None:
            self.seen.append(len(rows))

    observer = OnlyBatches()
    batcher = make(Engine(), observer=observer)
    assert await batcher.submit([row("a", 0)], deadline=None) == [result_of(row("a", 0))]
    assert observer.seen == [1]
    await batcher.stop()

    class Broken(Recorder):
        def on_queue_depth(self, depth: int) -> None:
            raise RuntimeError("metrics down")

    batcher = make(Engine(), observer=Broken())
    with caplog.at_level(logging.ERROR, logger="service.batcher"):
        assert await batcher.submit([row("a", 0)], deadline=None) == [result_of(row("a", 0))]
    assert "batch observer hook on_queue_depth failed" in caplog.messages
    await batcher.stop()

"""Admission: Retry-After from the queue's backlog and the measured throughput, capped; oversized requests.

The event loop's clock is moved by the fake model instead of by waiting: each batch "takes" a fixed
number of seconds, so the throughput estimate, and every Retry-After derived from it, is exact.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from test_batcher import HOLDER_LENGTH, make, result_of, row, settle, spawn

from service.batcher import Row
from store.errors import PayloadTooLarge, QueueFull

pytestmark = pytest.mark.asyncio

MAX_QUEUE = 20
BATCH_ROWS = 10
BATCH_SECONDS = 41.0
"""10 rows per 41 s: a rate whose backlogs below never land on a whole second (ceil stays exact)."""
CAP_S = 60


class TimedEngine:
    """Fake run_batch that advances the event loop's clock by BATCH_SECONDS per full batch; can be held."""

    def __init__(self, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = 0.0
        real = loop.time
        monkeypatch.setattr(loop, "time", lambda: real() + self.offset)
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

    async def __call__(self, rows: list[Row]) -> list[Any]:
        self.entered.set()
        await self.gate.wait()
        self.offset += BATCH_SECONDS * len(rows) / BATCH_ROWS
        return [result_of(r) for r in rows]


async def _retry_after(batcher, rows: int) -> int:
    with pytest.raises(QueueFull) as info:
        await batcher.submit([row("late", i) for i in range(rows)], deadline=None)
    return info.value.details["retry_after"]


async def test_retry_after_is_the_backlog_over_the_measured_rate_capped_at_a_minute(monkeypatch) -> None:
    engine = TimedEngine(asyncio.get_running_loop(), monkeypatch)
    batcher = make(engine, max_batch_size=BATCH_ROWS, max_queue=MAX_QUEUE)
    # before any batch ran there is no rate to go by: the shortest hint
    engine.gate.clear()
    holder = spawn(batcher, [row("holder", "h", length=HOLDER_LENGTH)])
    await engine.entered.wait()
    queued = spawn(batcher, [row("q", i) for i in range(MAX_QUEUE)])
    await settle(lambda: batcher.queue_depth == MAX_QUEUE)
    assert await _retry_after(batcher, 1) == 1
    engine.gate.set()
    await holder
    await queued
    # every batch ran at 10 rows per 41 s; hold the worker again and fill 15 of the 20 rows
    engine.gate.clear()
    engine.entered.clear()
    holder = spawn(batcher, [row("holder", "h", length=HOLDER_LENGTH)])
    await engine.entered.wait()
    queued = spawn(batcher, [row("q", i) for i in range(15)])
    await settle(lambda: batcher.queue_depth == 15)
    rate = BATCH_ROWS / BATCH_SECONDS
    # 12 more rows overshoot the queue by 7: those must run first
    assert await _retry_after(batcher, 12) == math.ceil(7 / rate) == 29
    batcher.reserve(2)  # rows being tokenized count too: 9 over
    assert await _retry_after(batcher, 12) == math.ceil(9 / rate) == 37
    assert math.ceil(17 / rate) > CAP_S
    assert await _retry_after(batcher, 20) == CAP_S  # 17 over would be 70 s
    batcher.unreserve(2)
    assert batcher.queue_depth == 15  # refused rows were never queued
    engine.gate.set()
    await holder
    await queued
    await batcher.stop()


async def test_request_larger_than_the_queue_is_too_large_not_full() -> None:
    """More rows than the queue can ever hold: 413-type PayloadTooLarge, nothing queued or run."""
    ran: list[list[Row]] = []

    async def run(rows: list[Row]) -> list[Any]:
        ran.append(rows)
        return [result_of(r) for r in rows]

    batcher = make(run, max_queue=MAX_QUEUE)
    with pytest.raises(PayloadTooLarge) as info:
        await batcher.submit([row("big", i) for i in range(MAX_QUEUE + 1)], deadline=None)
    assert info.value.details == {"rows": MAX_QUEUE + 1, "max_queue": MAX_QUEUE}
    assert batcher.queue_depth == 0 and ran == []
    # exactly a queue's worth is accepted and runs
    out = await batcher.submit([row("fits", i) for i in range(MAX_QUEUE)], deadline=None)
    assert out == [result_of(row("fits", i)) for i in range(MAX_QUEUE)]
    await batcher.stop()

"""The service's decoding loop: a cancelled row leaves at the next step, a new one joins mid-decode."""

from __future__ import annotations

import asyncio

import pytest
from api_support import tiny_gpt2_backbone, until

from adapters.generate import Sampling
from adapters.model import BankConfig, MultiTaskModel
from service.cache import DeviceSlots
from service.engine import Engine
from service.generation import Generation, Generations
from service.metrics import Metrics

pytestmark = pytest.mark.asyncio


def _loop() -> Generations:
    model = MultiTaskModel(tiny_gpt2_backbone(), banks=BankConfig(slots=2))
    metrics = Metrics(max_tasks=4)
    device = DeviceSlots(model=model, budget_bytes=1 << 30, metrics=metrics)
    engine = Engine(model=model, device=device, metrics=metrics, max_input_tokens=32, compute_threads=1)
    return Generations(
        engine=engine, device=device, metrics=metrics, max_rows=8, max_tokens_in_flight=100, eos_token_id=None
    )


def _gen(index: int, ids: list[int], n: int, events) -> Generation:
    return Generation(
        index=index, adapter=None, ids=ids, sampling=Sampling(), max_tokens=n, stop=(), events=events
    )


async def test_cancelled_row_leaves_and_new_row_joins_mid_decode():
    loop = _loop()
    turns = []
    turn = loop._turn
    loop._turn = lambda leaving, joining: turns.append(len(loop.batch)) or turn(leaving, joining)
    loop.start()
    try:
        events: asyncio.Queue = asyncio.Queue()
        long = _gen(0, [3, 4, 5], 40, events)
        loop.submit([long])
        assert loop.tokens_in_flight == 43
        await until(lambda: len(long.tokens) >= 2)
        short = _gen(1, [6, 7], 3, events)
        loop.submit([short])
        # it joins while the long row is still decoding, and finishes first
        await until(lambda: short.finish_reason is not None)
        assert short.finish_reason == "length" and len(short.tokens) == 3
        assert long.finish_reason is None and len(long.tokens) < 40
        long.cancel()
        before = len(turns)
        await until(lambda: len(loop.batch) == 0)
        assert len(turns) - before <= 2  # it leaves at the next step, at most one step after this one
        at_cancel = len(long.tokens)
        await asyncio.sleep(0.05)
        assert len(long.tokens) == at_cancel  # no more steps for it
        assert loop.tokens_in_flight == 0 and loop.rows == 0
        # it left by being cancelled, not through a failed step (past the model's 64 positions)
        seen = [events.get_nowait() for _ in range(events.qsize())]
        assert not [e for e in seen if e.error is not None]
        assert [e.finish_reason for e in seen if e.finish_reason] == ["length"]
        assert loop.m.generated_tokens.labels(task="other")._value.get() == at_cancel + 3
    finally:
        await loop.stop()
        loop.engine.close()


async def test_tokens_in_flight_are_capped():
    from store.errors import QueueFull

    loop = _loop()
    events: asyncio.Queue = asyncio.Queue()
    loop.submit([_gen(0, [3] * 10, 80, events)])
    with pytest.raises(QueueFull) as err:
        loop.submit([_gen(1, [3] * 5, 10, events)])
    assert err.value.retry_after >= 1 and loop.tokens_in_flight == 90
    loop.engine.close()

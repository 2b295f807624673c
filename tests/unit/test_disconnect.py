"""`unless_disconnected`: work stops with its client, with its handler, and no failure is logged as lost."""

from __future__ import annotations

import asyncio
import gc

import pytest

from service.disconnect import unless_disconnected
from store.errors import ClientDisconnected

pytestmark = pytest.mark.asyncio


class FakeRequest:
    """An ASGI request whose `receive()` reports a disconnect once `gone` is set."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def held(started: asyncio.Event, cancelled: asyncio.Event) -> None:
    """Work that runs until cancelled, and says when it started and when it was cancelled."""
    started.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        cancelled.set()
        raise


async def test_the_answer_is_returned_while_the_client_stays() -> None:
    assert await unless_disconnected(FakeRequest(), asyncio.sleep(0, result=42)) == 42


async def test_a_client_that_goes_cancels_the_work() -> None:
    request, started, cancelled = FakeRequest(), asyncio.Event(), asyncio.Event()

    handler = asyncio.ensure_future(unless_disconnected(request, held(started, cancelled)))
    await started.wait()
    request.gone.set()
    with pytest.raises(ClientDisconnected):
        await handler
    assert cancelled.is_set()


async def test_a_cancelled_handler_cancels_running_work() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    handler = asyncio.ensure_future(unless_disconnected(FakeRequest(), held(started, cancelled)))
    await started.wait()
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_work_that_failed_as_its_handler_was_cancelled_is_not_logged_as_lost() -> None:
    """The handler is cancelled after its work failed: the failure is moot, and not 'never retrieved'."""
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    failed = asyncio.Event()

    async def work() -> None:
        failed.set()
        raise ValueError("boom")

    try:
        handler = asyncio.ensure_future(unless_disconnected(FakeRequest(), work()))
        await failed.wait()
        handler.cancel()  # lands before the handler sees the work's result
        with pytest.raises(asyncio.CancelledError):
            await handler
        del handler
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert [c.get("message") for c in reported] == []

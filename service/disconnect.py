"""Stop work for clients that went away: a request's rows are dropped when its connection closes.

ASGI servers do not cancel a handler when the client disconnects; they only report it on
`receive()`. After the body is read, the next message is `http.disconnect`, sent when the client
goes (or once the response is complete), so waiting on it beside the work tells the two apart.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from store.errors import ClientDisconnected

__all__ = ["unless_disconnected"]

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        # Cancelled ourselves (server shutdown): take the work down with us. Work that already
        # failed has its exception retrieved here, or asyncio would log it as never retrieved.
        if not task.cancel() and not task.cancelled():
            task.exception()
        raise
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    if not task.done():
        # Cancelling reaches the batcher, which drops the rows that have not started.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnected("the client disconnected before the answer was ready")
    return task.result()

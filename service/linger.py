"""Answers sent before the request body was read reach the client: `Connection: close`, then a lingering close.

An upload refused early (413 over the limit, 401 without a key, 400 on a bad part) is answered while
the client is still sending. Closing the socket with unread bytes in it makes the kernel send a TCP
reset, which throws away the answer the client had not read yet, so the client sees "connection reset"
instead of the 413. Well-behaved servers (nginx's lingering close) answer, then read and discard the
rest of the body for a bounded time before closing; this middleware does the same in ASGI terms: the
answer goes out at once (status, headers and body), the body is drained, and only then is the
response completed, which is when the server closes the connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["LINGER_IDLE_S", "LINGER_TOTAL_S", "LingeringClose"]

LINGER_TOTAL_S = 30.0
"""The longest an unread body is drained after the answer (nginx's `lingering_time`)."""

LINGER_IDLE_S = 5.0
"""Stop draining when the client sends nothing for this long (nginx's `lingering_timeout`)."""

Scope = dict[str, Any]
Message = dict[str, Any]


def _declares_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
        if name == b"transfer-encoding":
            return True
    return False


async def _drain(receive: Any, *, total_s: float, idle_s: float) -> None:
    """Read and discard the request body until it ends, the client goes, or the time is up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total_s
    while (remaining := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(receive(), min(idle_s, remaining))
        except TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


class LingeringClose:
    """ASGI middleware: a response to a request whose body was not read closes the connection gracefully."""

    def __init__(self, app: Any, *, total_s: float = LINGER_TOTAL_S, idle_s: float = LINGER_IDLE_S) -> None:
        self.app = app
        self.total_s = total_s
        self.idle_s = idle_s

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not _declares_body(scope):
            await self.app(scope, receive, send)
            return
        body_read = False
        lingering = False

        async def tracked_receive() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read = True
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal lingering
            if message["type"] == "http.response.start" and not body_read:
                # The connection cannot carry another request after an unread body: say so.
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
                lingering = True
            elif (
                message["type"] == "http.response.body"
                and lingering
                and not body_read
                and not message.get("more_body")
            ):
                # The whole answer is written now; completing the response (which closes the
                # connection) waits until the client has finished sending.
                await send({**message, "more_body": True})
                await _drain(tracked_receive, total_s=self.total_s, idle_s=self.idle_s)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, tracked_receive, tracked_send)

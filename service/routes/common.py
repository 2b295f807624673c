"""What every protocol surface shares: the keys it needs, the counted path into the runtime, JSON out."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson
from fastapi import Depends, Request, Response

from service.auth import require_admin, require_inference
from service.disconnect import unless_disconnected
from service.errors import status_of
from service.runtime import Service
from store.errors import AdapterServeError

__all__ = ["ADMIN_KEY", "INFERENCE_KEY", "counted", "orjson_response", "service_of"]

T = TypeVar("T")

ADMIN_KEY = [Depends(require_admin)]
"""Route dependencies of management routes: an admin key."""

INFERENCE_KEY = [Depends(require_inference)]
"""Route dependencies of inference routes on every surface: an API key when any are configured."""


def service_of(request: Request) -> Service:
    """The running service of the app that got `request`."""
    return request.app.state.service


async def counted(request: Request, task: str, work: Callable[[Service], Awaitable[T]]) -> T:
    """Run one inference request's `work`, as every surface does.

    It is admitted (503 while warming up or draining), counted until it ends so a drain waits for it,
    cancelled when the client goes away, and measured under the task's label in the request metrics.
    """
    svc = service_of(request)
    started = time.perf_counter()
    registered = svc.started and svc.knows(task)
    label = svc.metrics.task_label(task, registered=registered)
    status = 500
    svc.metrics.requests_in_flight.inc()
    try:
        svc.enter()
        try:
            result = await unless_disconnected(request, work(svc))
        finally:
            svc.leave()
        status = 200
    except AdapterServeError as exc:
        status = status_of(exc)
        raise
    finally:
        svc.metrics.requests_in_flight.dec()
        svc.metrics.requests.labels(task=label, status=str(status)).inc()
        svc.metrics.request_duration.labels(task=label).observe(time.perf_counter() - started)
    return result


def orjson_response(
    body: object, *, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON response encoded by orjson (numpy arrays included), skipping response-model validation."""
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )

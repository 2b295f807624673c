"""What the OpenAPI schema says about each route's error codes and the multipart upload body.

Every status a route can answer is listed on the route, with the one error shape, so clients and
the schema fuzzer know exactly what to expect.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import BaseModel

from service.schemas import ErrorBody

__all__ = [
    "ADMIN",
    "HEALTH_503",
    "METRICS_200",
    "NAME_PATTERN",
    "UPLOAD_BODY",
    "TaskName",
    "Version",
    "VersionNumber",
    "errors",
]

NAME_PATTERN = r"^[a-z0-9]([a-z0-9_-]|\.[a-z0-9_-])*\.?$"
"""store.base's name rule as a JSON-schema pattern: `[a-z0-9][a-z0-9_.-]{0,63}` without `..`."""

# Documented only: the route itself checks the name, so a bad one is a 400 `invalid_name`, not a 422.
TaskName = Annotated[
    str,
    Path(
        description="Task or hypernetwork name: 1 to 64 of a-z, 0-9, '_', '.', '-', starting with a letter "
        "or digit, without '..'.",
        json_schema_extra={"pattern": NAME_PATTERN, "minLength": 1, "maxLength": 64},
    ),
]

# `/versions/{version}` of the delete routes: out of range is a 422, as the store refuses it.
VersionNumber = Annotated[
    int, Path(ge=1, le=999_999_999, description="A stored version number (versions count from 1).")
]

# `?version=N` of the upload routes (tasks and hypernetworks): out of range is a 422.
Version = Annotated[
    int | None,
    Query(
        ge=1,
        le=999_999_999,
        description="Store as exactly this version number; 409 if that version already exists.",
    ),
]

_DESCRIPTIONS = {
    400: "Invalid request or name.",
    401: "No valid key was sent.",
    403: "The key is valid but may not use this route (an API key on a management route).",
    404: "Unknown task, version or hypernetwork.",
    409: "Version conflict: the version exists, is current, or changed meanwhile.",
    413: "The body, an input, a header or a file is too large.",
    415: "Not multipart/form-data, or the weights are not safetensors (pickle, zip).",
    422: "The body or the artifact breaks a validation rule.",
    429: "The queue is full; retry after `Retry-After` seconds.",
    503: "Warming up, draining, a damaged stored artifact, or a store I/O error.",
    504: "The request's deadline passed while it was queued; it never ran.",
    507: "The store is full; nothing was stored.",
}

ADMIN = (401, 403)
"""Codes of every route guarded by an admin key."""


def errors(*codes: int, body: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for error codes, each with the error body of the route's protocol."""
    return {code: {"model": body, "description": _DESCRIPTIONS[code]} for code in codes}


HEALTH_503: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "Not ready: warming up or draining.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"status": {"type": "string", "enum": ["starting", "draining"]}},
                    "required": ["status"],
                }
            }
        },
    }
}

METRICS_200: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}

UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "config": {
                            "type": "object",
                            "description": "The config: a JSON object (the artifact's `adapter_config.json`).",
                        },
                        "weights": {
                            "type": "string",
                            "format": "binary",
                            "description": "The weights: a safetensors file.",
                        },
                    },
                    "required": ["config", "weights"],
                    # Any other part is refused with 400 (service/uploads.py).
                    "additionalProperties": False,
                },
                # What each part holds; a config that is not JSON is refused with 422.
                "encoding": {
                    "config": {"contentType": "application/json"},
                    "weights": {"contentType": "application/octet-stream"},
                },
            }
        },
    }
}

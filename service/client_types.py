"""Errors and typed results of the adapterserve HTTP client (`service.client` re-exports them)."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict

__all__ = [
    "AdapterDetail",
    "AdapterSummary",
    "ApiError",
    "AuthenticationError",
    "BackboneInfo",
    "BadRequestError",
    "ClientError",
    "ConflictError",
    "ConnectionFailed",
    "DeadlineError",
    "Health",
    "HypernetworkSummary",
    "NotFoundError",
    "Output",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PredictResult",
    "RateLimitedError",
    "Residency",
    "Result",
    "ServerError",
    "StoreFullError",
    "UnavailableError",
    "UnsupportedMediaTypeError",
    "UploadResult",
    "VersionDetail",
    "error_of",
    "retry_after_of",
]

# -- errors ---------------------------------------------------------------------------------------


class ClientError(Exception):
    """Base of every error the client raises."""


class ConnectionFailed(ClientError):
    """The server could not be reached (after the retries the budget allowed)."""


class ApiError(ClientError):
    """A non-2xx answer, with the API's error type and message; subclasses by status code."""

    def __init__(self, status: int, kind: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status = status
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
        """Seconds the server asked to wait before retrying, when it said."""


class BadRequestError(ApiError):
    """400 or 422: the request or the artifact is invalid; the message says what to fix."""


class AuthenticationError(ApiError):
    """401: no key, or an unknown one."""


class PermissionDeniedError(ApiError):
    """403: the key may not use this route (an API key on a management route)."""


class NotFoundError(ApiError):
    """404: unknown task, version or hypernetwork."""


class ConflictError(ApiError):
    """409: the version exists already, or changed underneath the request."""


class PayloadTooLargeError(ApiError):
    """413: too many inputs, too long an input, or too large an upload."""


class UnsupportedMediaTypeError(ApiError):
    """415: the weights are not safetensors."""


class RateLimitedError(ApiError):
    """429: the queue is full (retried until the retry budget is spent)."""


class ServerError(ApiError):
    """5xx: the server failed."""


class UnavailableError(ServerError):
    """503: not ready, draining, or the store is unavailable (retried until the budget is spent)."""


class DeadlineError(ServerError):
    """504: the request's deadline passed while it was queued."""


class StoreFullError(ServerError):
    """507: the store is full; nothing was stored."""


_ERRORS: dict[int, type[ApiError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: BadRequestError,
    429: RateLimitedError,
    503: UnavailableError,
    504: DeadlineError,
    507: StoreFullError,
}


def error_of(response: httpx.Response) -> ApiError:
    """The `ApiError` subclass of an error answer, with its type, message and `Retry-After`."""
    try:
        err = response.json()["error"]
        kind, message = str(err["type"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        kind, message = "http_error", response.text[:200]
    status = response.status_code
    cls = _ERRORS.get(status, ServerError if status >= 500 else ApiError)
    return cls(status, kind, message, retry_after=retry_after_of(response))


def retry_after_of(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (a number, or an HTTP date); None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


# -- results --------------------------------------------------------------------------------------


class Result(BaseModel):
    """A typed, immutable answer; `result["field"]` also reads a field, as the dict answers did."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    def __getitem__(self, name: str) -> Any:
        if name not in type(self).model_fields:
            raise KeyError(name)
        return getattr(self, name)


class Output(Result):
    """One input's result; which fields are set depends on the task's head."""

    label: str | None = None
    score: float | None = None
    scores: dict[str, float] | None = None
    labels: list[str] | None = None
    value: float | None = None
    generated_text: str | None = None

    def get(self, name: str, default: Any = None) -> Any:
        """A field's value when set, else `default`."""
        value = getattr(self, name, None)
        return default if value is None else value


class PredictResult(Result):
    """The outputs of a predict request, all from one adapter version."""

    task: str
    version: int
    outputs: list[Output]


class UploadResult(Result):
    """What an upload stored."""

    task: str
    version: int
    sha256: str
    method: str
    num_parameters: int
    size_bytes: int
    current: bool


class VersionDetail(Result):
    """One stored version."""

    version: int
    sha256: str
    size_bytes: int
    created_at: str


class Residency(Result):
    """Where a task's versions are loaded."""

    device: list[int]
    host: list[int]
    pinned: bool


class AdapterSummary(Result):
    """A task in the list."""

    task: str
    current_version: int | None
    method: str | None


class AdapterDetail(AdapterSummary):
    """A task with its versions and residency."""

    versions: list[VersionDetail]
    residency: Residency
    in_flight: int


class HypernetworkSummary(Result):
    """A shared hypernetwork."""

    name: str
    current_version: int | None
    versions: list[int]
    variant: str | None = None
    sites: list[str] | None = None
    bottleneck_dim: int | None = None
    task_embedding_dim: int | None = None


class BackboneInfo(Result):
    """The backbone the server runs."""

    name: str
    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    fingerprint: str
    generative: bool
    device: str
    dtype: str
    slots: int


class Health(Result):
    """`/livez` or `/readyz`: `ok`, `ready`, `starting` or `draining`."""

    status: str

    @property
    def ok(self) -> bool:
        """Whether the probe passed."""
        return self.status in ("ok", "ready")

"""Domain exceptions of adapterserve, in one place; the service maps them to HTTP codes by class."""

from __future__ import annotations

__all__ = [
    "AdapterServeError",
    "ArtifactCorrupt",
    "BackboneMismatch",
    "ClientDisconnected",
    "DeadlineExceeded",
    "Draining",
    "Forbidden",
    "InvalidArtifact",
    "InvalidName",
    "InvalidRequest",
    "NotFound",
    "NotImplementedYet",
    "NotReady",
    "NotSafetensors",
    "PayloadTooLarge",
    "QueueFull",
    "SlotsExhausted",
    "StoreFull",
    "StoreUnavailable",
    "Unauthorized",
    "UnsupportedMediaType",
    "VersionConflict",
]


class AdapterServeError(Exception):
    """Base class: every error the product raises on purpose."""

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRequest(AdapterServeError):
    """The request is well-formed HTTP but its content is wrong (400)."""


class InvalidName(InvalidRequest):
    """A task or hypernetwork name does not match the allowed pattern."""


class InvalidArtifact(AdapterServeError):
    """An uploaded config or weights file breaks a validation rule (422)."""


class NotSafetensors(InvalidArtifact):
    """The weights are not a safetensors file (pickle, zip, ...) (415)."""


class BackboneMismatch(InvalidArtifact):
    """The artifact was made for another backbone, or its shapes do not fit this one (422)."""


class PayloadTooLarge(AdapterServeError):
    """A body, header or file exceeds a size limit (413)."""


class NotFound(AdapterServeError):
    """Unknown task, version or hypernetwork (404)."""


class VersionConflict(AdapterServeError):
    """The version already exists or changed underneath the request (409)."""


class InUse(VersionConflict):
    """Still named by stored artifacts, or by an upload in flight, so it cannot be removed (409)."""


class ArtifactCorrupt(AdapterServeError):
    """A stored file no longer matches its recorded sha256 (503 for that task)."""


class StoreFull(AdapterServeError):
    """The store ran out of space while writing; nothing was acknowledged (507)."""


class StoreUnavailable(AdapterServeError):
    """The store failed with an I/O error; nothing was acknowledged (503)."""


class SlotsExhausted(AdapterServeError):
    """Every device slot is pinned or in use by the running batch (503)."""


class QueueFull(AdapterServeError):
    """The request queue is full; retry after a while (429)."""

    @property
    def retry_after(self) -> int:
        """Whole seconds the client should wait before retrying (at least 1)."""
        return max(int(self.details.get("retry_after", 1)), 1)


class DeadlineExceeded(AdapterServeError):
    """The request's deadline passed while it was queued; it never ran (504)."""


class NotReady(AdapterServeError):
    """The service is still warming up (503)."""


class Draining(AdapterServeError):
    """The service is shutting down and takes no new work (503)."""


class ClientDisconnected(AdapterServeError):
    """The client went away before its answer was ready; its rows were dropped (499, never sent)."""


class Unauthorized(AdapterServeError):
    """No valid key was presented (401)."""


class Forbidden(AdapterServeError):
    """The key is valid but lacks the right for this route (403)."""


class UnsupportedMediaType(InvalidRequest):
    """The request body has a content type the route does not accept (415)."""


class NotImplementedYet(AdapterServeError):
    """The route or feature is part of the contract but not available in this build (501)."""

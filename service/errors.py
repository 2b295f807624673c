"""Domain exceptions mapped to HTTP status codes by class, in one place; one JSON error shape."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from store import errors as e

__all__ = ["STATUS", "error_body", "install_handlers", "protocol_body", "status_of", "surface_of"]

log = logging.getLogger(__name__)

# Most specific class first is not needed: the lookup walks each exception's MRO.
STATUS: dict[type[e.AdapterServeError], int] = {
    e.InvalidRequest: 400,
    e.UnsupportedMediaType: 415,
    e.InvalidArtifact: 422,
    e.NotSafetensors: 415,
    e.BackboneMismatch: 422,
    e.PayloadTooLarge: 413,
    e.NotFound: 404,
    e.VersionConflict: 409,
    e.ArtifactCorrupt: 503,
    e.StoreFull: 507,
    e.StoreUnavailable: 503,
    e.SlotsExhausted: 503,
    e.QueueFull: 429,
    e.DeadlineExceeded: 504,
    e.NotReady: 503,
    e.Draining: 503,
    e.Unauthorized: 401,
    e.Forbidden: 403,
    e.NotImplementedYet: 501,
    # nginx's code for "client closed request": only ever seen in logs and metrics.
    e.ClientDisconnected: 499,
}

_HTTP_TYPES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def status_of(exc: e.AdapterServeError) -> int:
    """The HTTP status of a domain exception, by the nearest class in its MRO."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(kind: str, message: str) -> dict:
    """The one error shape of the API: `{"error": {"type", "message"}}`."""
    return {"error": {"type": kind, "message": message}}


_OPENAI = ("/v1/embeddings", "/v1/models", "/v1/completions")
_TEI = ("/embed", "/predict", "/rerank", "/tokenize", "/decode", "/info")
# text-embeddings-inference's error types, by status: bad input of any kind is a "Validation" error
# (TEI's own 400, 413 and 422 carry "Empty", "Validation" and "Tokenizer"), a full queue or a
# deadline passed in it "Overloaded", warming up or draining "Unhealthy", the rest "Backend".
_TEI_TYPES = {429: "Overloaded", 503: "Unhealthy", 504: "Overloaded"}


def surface_of(path: str) -> str:
    """Which protocol a path belongs to: `openai`, `v2` (KServe/Triton), `tei` or `native`."""
    if path.startswith(_OPENAI):
        return "openai"
    if path == "/v2" or path.startswith("/v2/"):
        return "v2"
    if path in _TEI:
        return "tei"
    return "native"


def protocol_body(path: str, kind: str, message: str, status: int) -> dict:
    """An error in the shape of the protocol `path` belongs to.

    Ours and OpenAI's are `{"error": {"type", "message", ...}}` (OpenAI's adds `param` and `code`),
    the Open Inference Protocol's is `{"error": message}`, text-embeddings-inference's
    `{"error": message, "error_type": ...}`.
    """
    surface = surface_of(path)
    if surface == "openai":
        return {"error": {"message": message, "type": kind, "param": None, "code": kind}}
    if surface == "v2":
        return {"error": message}
    if surface == "tei":
        default = "Validation" if status < 500 else "Backend"
        return {"error": message, "error_type": _TEI_TYPES.get(status, default)}
    return error_body(kind, message)


def _headers(exc: e.AdapterServeError, status: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    if isinstance(exc, e.QueueFull):
        headers["Retry-After"] = str(exc.retry_after)
    elif status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    elif status == 503 and isinstance(exc, e.NotReady | e.Draining):
        headers["Retry-After"] = "1"
    return headers


def _domain_response(path: str, exc: e.AdapterServeError) -> JSONResponse:
    status = status_of(exc)
    if status >= 500:
        log.warning("%s: %s", type(exc).__name__, exc.message)
    return JSONResponse(
        protocol_body(path, _snake(type(exc).__name__), exc.message, status),
        status_code=status,
        headers=_headers(exc, status),
    )


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "the request is invalid"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = f" ({len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


def _allowed_methods(request: Request) -> str:
    """Every method of every route on the request's path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def install_handlers(app: FastAPI) -> None:
    """Register the exception handlers that turn every failure into the API's error shape."""

    @app.exception_handler(e.AdapterServeError)
    async def _domain(request: Request, exc: e.AdapterServeError) -> JSONResponse:
        return _domain_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        body = protocol_body(request.url.path, "invalid_request", _validation_message(exc), 422)
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _HTTP_TYPES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        body = protocol_body(request.url.path, kind, message, exc.status_code)
        return JSONResponse(body, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Never leak a traceback or a path to the client; the log has the details.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = protocol_body(request.url.path, "internal_error", "internal server error", 500)
        return JSONResponse(body, status_code=500)

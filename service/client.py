"""HTTP client of the adapterserve API on httpx: `Client` (sync) and `AsyncClient`, typed results.

Both clients have the same methods (`AsyncClient`'s are awaited). Refusals that say "come back
later" (429 queue full, 503 not ready or draining) are retried, honouring `Retry-After`, within a
bounded number of attempts and seconds; every other error answer raises an `ApiError` subclass
chosen by status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from service.client_types import (
    AdapterDetail,
    AdapterSummary,
    ApiError,
    AuthenticationError,
    BackboneInfo,
    BadRequestError,
    ClientError,
    ConflictError,
    ConnectionFailed,
    DeadlineError,
    Health,
    HypernetworkSummary,
    NotFoundError,
    Output,
    PayloadTooLargeError,
    PermissionDeniedError,
    PredictResult,
    RateLimitedError,
    Residency,
    Result,
    ServerError,
    StoreFullError,
    UnavailableError,
    UnsupportedMediaTypeError,
    UploadResult,
    VersionDetail,
    error_of,
    retry_after_of,
)

__all__ = [
    "AdapterDetail",
    "AdapterSummary",
    "ApiError",
    "AsyncClient",
    "AuthenticationError",
    "BackboneInfo",
    "BadRequestError",
    "Client",
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
    "Retry",
    "ServerError",
    "StoreFullError",
    "UnavailableError",
    "UnsupportedMediaTypeError",
    "UploadResult",
    "VersionDetail",
]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter.safetensors"
HYPER_CONFIG = "hypernetwork_config.json"
HYPER_WEIGHTS = "hypernetwork.safetensors"
Progress = Callable[[int, int], None]
"""Called with (bytes sent, bytes in all) while an upload's weights are sent."""

# -- retries --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Retry:
    """Retry budget for 429/503 answers and refused connections: at most `attempts` tries in `budget_s`.

    The wait is the server's `Retry-After` when it sent one, else an exponential backoff from
    `backoff_s` up to `max_backoff_s`. A wait that would end past the budget is not started: the
    last answer's error is raised instead.
    """

    attempts: int = 5
    budget_s: float = 30.0
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    statuses: frozenset[int] = field(default=frozenset({429, 503}))

    def wait(self, *, attempt: int, started: float, retry_after: float | None) -> float | None:
        """Seconds to wait before try `attempt + 1`, or None when the budget does not allow it."""
        if attempt >= self.attempts:
            return None
        if retry_after is None:
            delay = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
        else:
            delay = retry_after
        if time.monotonic() - started + delay > self.budget_s:
            return None
        return delay


# -- calls ----------------------------------------------------------------------------------------


class _ProgressFile(io.RawIOBase):
    """A read-only file that reports how much of it was read (httpx streams multipart files by reading)."""

    def __init__(self, path: Path, progress: Progress) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.name = str(path)
        self._total = os.fstat(self._f.fileno()).st_size
        self._progress = progress

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._f.fileno()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._progress(self._f.tell(), self._total)
        return data

    def close(self) -> None:
        self._f.close()
        super().close()


Files = Callable[[contextlib.ExitStack], dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class _Call:
    """One API call, independent of the sync or async transport that runs it."""

    method: str
    path: str
    parse: Callable[[httpx.Response], Any] | None = None
    """Turns a successful answer into the result; None: the call has no result."""
    json: Any = None
    params: Mapping[str, str] | None = None
    files: Files | None = None
    """Opens the multipart parts; run again for every try, so a retry sends the whole body again."""
    ok: tuple[int, ...] = ()
    """Non-2xx statuses that are answers rather than errors (503 of /readyz while starting)."""

    def request(self, http: httpx.Client | httpx.AsyncClient, stack: contextlib.ExitStack) -> httpx.Request:
        """The httpx request of this try."""
        files = self.files(stack) if self.files is not None else None
        return http.build_request(self.method, self.path, json=self.json, params=self.params, files=files)

    def result(self, response: httpx.Response) -> Any:
        """The parsed answer, or the error it means."""
        if not (response.is_success or response.status_code in self.ok):
            raise error_of(response)
        return self.parse(response) if self.parse is not None else None


def _model(cls: type[Result]) -> Callable[[httpx.Response], Any]:
    return lambda response: cls.model_validate(response.json())


def _models(cls: type[Result], key: str) -> Callable[[httpx.Response], Any]:
    return lambda response: [cls.model_validate(item) for item in response.json()[key]]


class _Tries:
    """The retry state of one call: decides, after each try, whether and how long to wait."""

    def __init__(self, retry: Retry, call: _Call) -> None:
        self.retry = retry
        self.call = call
        self.started = time.monotonic()
        self.attempt = 1

    def after(self, response: httpx.Response) -> float | None:
        """None: `response` is the answer; else the seconds to wait before the next try."""
        status = response.status_code
        if status not in self.retry.statuses or status in self.call.ok:
            return None
        delay = self.retry.wait(
            attempt=self.attempt, started=self.started, retry_after=retry_after_of(response)
        )
        if delay is None:
            raise error_of(response)
        self.attempt += 1
        return delay

    def after_connect_error(self, exc: httpx.ConnectError, url: object) -> float:
        """The seconds to wait before trying to connect again; raises when the budget is spent."""
        delay = self.retry.wait(attempt=self.attempt, started=self.started, retry_after=None)
        if delay is None:
            raise ConnectionFailed(f"cannot connect to {url}: {exc}") from exc
        self.attempt += 1
        return delay


def _artifact_files(
    directory: str | Path, progress: Progress | None, *, config: str = CONFIG, weights: str = WEIGHTS
) -> Files:
    d = Path(directory)

    def files(stack: contextlib.ExitStack) -> dict[str, Any]:
        config_bytes = (d / config).read_bytes()
        path = d / weights
        fh = _ProgressFile(path, progress) if progress else open(path, "rb")  # noqa: SIM115
        stack.enter_context(fh)
        return {
            "config": (config, config_bytes, "application/json"),
            "weights": (weights, fh, "application/octet-stream"),
        }

    return files


def _memory_files(config: Mapping[str, Any] | bytes, tensors: Mapping[str, Any]) -> Files:
    """Multipart parts from a config and tensors (numpy arrays or torch tensors) held in memory."""
    config_bytes = config if isinstance(config, bytes) else json.dumps(config).encode()
    if any(type(t).__module__.startswith("torch") for t in tensors.values()):
        import torch
        from safetensors.torch import save

        # one serializer for all: numpy arrays among torch tensors become tensors (no copy)
        weights = save({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()})
    else:
        from safetensors.numpy import save

        weights = save(dict(tensors))

    def files(stack: contextlib.ExitStack) -> dict[str, Any]:
        return {
            "config": (CONFIG, config_bytes, "application/json"),
            "weights": (WEIGHTS, weights, "application/octet-stream"),
        }

    return files


def _upload_params(*, activate: bool, version: int | None) -> dict[str, str]:
    params = {} if activate else {"activate": "false"}
    if version is not None:
        params["version"] = str(version)
    return params


class _Routes:
    """Every route of the API, once; `_send` runs a call on the sync or the async transport."""

    def _send(self, call: _Call) -> Any:
        raise NotImplementedError

    # -- inference ------------------------------------------------------------------------------

    def predict(self, task: str, inputs: list, **parameters: Any) -> PredictResult:
        """Predict with a task's current adapter; `parameters`: return_all_scores, max_new_tokens."""
        body: dict[str, Any] = {"inputs": list(inputs)}
        if parameters:
            body["parameters"] = parameters
        return self._send(
            _Call(method="POST", path=f"/v1/tasks/{task}/predict", json=body, parse=_model(PredictResult))
        )

    def backbone(self) -> BackboneInfo:
        """The backbone the server runs."""
        return self._send(_Call(method="GET", path="/v1/backbone", parse=_model(BackboneInfo)))

    # -- adapters -------------------------------------------------------------------------------

    def upload(
        self,
        task: str,
        directory: str | Path,
        *,
        activate: bool = True,
        version: int | None = None,
        progress: Progress | None = None,
    ) -> UploadResult:
        """Upload an artifact directory (adapter_config.json + adapter.safetensors) as a new version."""
        return self._upload(
            f"/v1/adapters/{task}", _artifact_files(directory, progress), activate=activate, version=version
        )

    def upload_tensors(
        self,
        task: str,
        *,
        config: Mapping[str, Any] | bytes,
        tensors: Mapping[str, Any],
        activate: bool = True,
        version: int | None = None,
    ) -> UploadResult:
        """Upload a config and tensors (numpy arrays or torch tensors) held in memory as a new version."""
        return self._upload(
            f"/v1/adapters/{task}", _memory_files(config, tensors), activate=activate, version=version
        )

    def _upload(self, path: str, files: Files, *, activate: bool, version: int | None) -> UploadResult:
        params = _upload_params(activate=activate, version=version)
        call = _Call(method="POST", path=path, files=files, params=params, parse=_model(UploadResult))
        return self._send(call)

    def adapters(self) -> list[AdapterSummary]:
        """Every task with its current version."""
        return self._send(
            _Call(
                method="GET",
                path="/v1/adapters",
                parse=_models(AdapterSummary, "adapters"),
            )
        )

    def adapter(self, task: str) -> AdapterDetail:
        """One task's versions, current version and residency."""
        return self._send(_Call(method="GET", path=f"/v1/adapters/{task}", parse=_model(AdapterDetail)))

    def set_current(self, task: str, version: int) -> AdapterDetail:
        """Make a stored version current (roll forward or back)."""
        return self._send(
            _Call(
                method="PUT",
                path=f"/v1/adapters/{task}/current",
                json={"version": version},
                parse=_model(AdapterDetail),
            )
        )

    def pin(self, task: str, *, pinned: bool = True) -> AdapterDetail:
        """Keep (or, with pinned=False, stop keeping) a task's current version on the device."""
        params = {"pinned": "true" if pinned else "false"}
        return self._send(
            _Call(method="PUT", path=f"/v1/adapters/{task}/pin", params=params, parse=_model(AdapterDetail))
        )

    def delete(self, task: str, version: int | None = None) -> None:
        """Delete a task, or one version of it that is not current."""
        path = f"/v1/adapters/{task}" + (f"/versions/{version}" if version is not None else "")
        return self._send(_Call(method="DELETE", path=path))

    # -- hypernetworks --------------------------------------------------------------------------

    def upload_hypernetwork(
        self,
        name: str,
        directory: str | Path,
        *,
        activate: bool = True,
        version: int | None = None,
        progress: Progress | None = None,
    ) -> UploadResult:
        """Upload a hypernetwork directory (hypernetwork_config.json + .safetensors) as a new version."""
        return self._upload(
            f"/v1/hypernetworks/{name}",
            _artifact_files(directory, progress, config=HYPER_CONFIG, weights=HYPER_WEIGHTS),
            activate=activate,
            version=version,
        )

    def delete_hypernetwork(self, name: str, version: int | None = None) -> None:
        """Delete a hypernetwork no stored task names, or one version of it that is not current."""
        path = f"/v1/hypernetworks/{name}" + (f"/versions/{version}" if version is not None else "")
        return self._send(_Call(method="DELETE", path=path))

    def hypernetworks(self) -> list[HypernetworkSummary]:
        """Every shared hypernetwork with its versions."""
        return self._send(
            _Call(
                method="GET",
                path="/v1/hypernetworks",
                parse=_models(HypernetworkSummary, "hypernetworks"),
            )
        )

    # -- health ---------------------------------------------------------------------------------

    def livez(self) -> Health:
        """Liveness: the process is up."""
        return self._send(_Call(method="GET", path="/livez", parse=_model(Health)))

    def readyz(self) -> Health:
        """Readiness; `ok` is False while starting or draining (answered 503, not raised, not retried)."""
        return self._send(_Call(method="GET", path="/readyz", parse=_model(Health), ok=(503,)))

    def metrics(self) -> str:
        """The Prometheus text exposition."""
        return self._send(_Call(method="GET", path="/metrics", parse=lambda response: response.text))


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


class Client(_Routes):
    """Synchronous client of one server; `key` is sent as `Authorization: Bearer <key>`."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        key: str | None = None,
        timeout: float = 60.0,
        retry: Retry | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retry = retry or Retry()
        self.http = httpx.Client(base_url=url, headers=_headers(key), timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def _send(self, call: _Call) -> Any:
        tries = _Tries(self.retry, call)
        while True:
            try:
                with contextlib.ExitStack() as stack:
                    response = self.http.send(call.request(self.http, stack))
            except httpx.ConnectError as exc:
                delay = tries.after_connect_error(exc, self.http.base_url)
            else:
                delay = tries.after(response)
                if delay is None:
                    return call.result(response)
            time.sleep(delay)


class AsyncClient(_Routes):
    """Asynchronous client of one server: `Client`'s methods, awaited."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        key: str | None = None,
        timeout: float = 60.0,
        retry: Retry | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry or Retry()
        self.http = httpx.AsyncClient(
            base_url=url, headers=_headers(key), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.http.aclose()

    async def _send(self, call: _Call) -> Any:
        tries = _Tries(self.retry, call)
        while True:
            try:
                with contextlib.ExitStack() as stack:
                    response = await self.http.send(call.request(self.http, stack))
            except httpx.ConnectError as exc:
                delay = tries.after_connect_error(exc, self.http.base_url)
            else:
                delay = tries.after(response)
                if delay is None:
                    return call.result(response)
            await asyncio.sleep(delay)

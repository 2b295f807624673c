"""A small synchronous HTTP client of the adapterserve API (used by `adapterserve upload` and tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

__all__ = ["ApiError", "Client"]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter.safetensors"


class ApiError(Exception):
    """A non-2xx answer, with the API's error type and message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status = status
        self.kind = kind
        self.message = message


class Client:
    """Calls one server; `key` is sent as `Authorization: Bearer <key>`."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    @staticmethod
    def _check(response: httpx.Response) -> Any:
        if response.is_success:
            return response.json() if response.content else None
        try:
            err = response.json()["error"]
            kind, message = err["type"], err["message"]
        except (ValueError, KeyError, TypeError):
            kind, message = "http_error", response.text[:200]
        raise ApiError(response.status_code, kind, message)

    def upload(self, task: str, directory: str | Path, *, activate: bool = True) -> dict:
        """Upload an artifact directory (adapter_config.json + adapter.safetensors) as a new version."""
        d = Path(directory)
        config = (d / CONFIG).read_bytes()
        with open(d / WEIGHTS, "rb") as weights:
            files = {
                "config": (CONFIG, config, "application/json"),
                "weights": (WEIGHTS, weights, "application/octet-stream"),
            }
            params = {} if activate else {"activate": "false"}
            return self._check(self.http.post(f"/v1/adapters/{task}", files=files, params=params))

    def predict(self, task: str, inputs: list, **parameters: Any) -> dict:
        """Predict with a task's current adapter."""
        body: dict[str, Any] = {"inputs": inputs}
        if parameters:
            body["parameters"] = parameters
        return self._check(self.http.post(f"/v1/tasks/{task}/predict", json=body))

    def adapters(self) -> list[dict]:
        """Every task."""
        return self._check(self.http.get("/v1/adapters"))["adapters"]

    def adapter(self, task: str) -> dict:
        """One task's versions and residency."""
        return self._check(self.http.get(f"/v1/adapters/{task}"))

    def set_current(self, task: str, version: int) -> dict:
        """Make a stored version current."""
        return self._check(self.http.put(f"/v1/adapters/{task}/current", json={"version": version}))

    def delete(self, task: str, version: int | None = None) -> None:
        """Delete a task, or one of its versions."""
        path = f"/v1/adapters/{task}" + (f"/versions/{version}" if version is not None else "")
        self._check(self.http.delete(path))

    def backbone(self) -> dict:
        """The backbone the server runs."""
        return self._check(self.http.get("/v1/backbone"))

"""Bearer-key authorization: admin keys for management routes, API keys for predict when configured."""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import stat
import sys
from pathlib import Path

from fastapi import Request

from store.errors import Forbidden, Unauthorized

__all__ = ["KeyRing", "load_or_create_admin_key", "require_admin", "require_inference"]

log = logging.getLogger(__name__)

_KEY_BYTES = 32


class KeyRing:
    """The configured keys; every comparison is constant-time and looks at every key."""

    def __init__(self, *, admin_keys: list[str], api_keys: list[str]) -> None:
        if not admin_keys:
            raise ValueError("at least one admin key is required; management is never left open")
        self._admin = [k.encode() for k in admin_keys]
        self._api = [k.encode() for k in api_keys]

    @property
    def inference_open(self) -> bool:
        """Whether predict needs no key (no API keys configured)."""
        return not self._api

    @staticmethod
    def _match(candidate: bytes, keys: list[bytes]) -> bool:
        found = False
        for key in keys:
            # No early exit: the time taken does not depend on which key matched.
            found |= hmac.compare_digest(candidate, key)
        return found

    def role(self, presented: str | None) -> str | None:
        """'admin', 'inference' or None for a presented key."""
        if presented is None:
            return None
        candidate = presented.encode()
        is_admin = self._match(candidate, self._admin)
        is_api = self._match(candidate, self._api)
        if is_admin:
            return "admin"
        return "inference" if is_api else None


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    return token.strip()


def _keys(request: Request) -> KeyRing:
    return request.app.state.keys


async def require_admin(request: Request) -> None:
    """FastAPI dependency: an admin key (401 without a valid key, 403 with an API key)."""
    token = _bearer(request)
    if token is None:
        raise Unauthorized("this route needs an admin key: send 'Authorization: Bearer <key>'")
    role = _keys(request).role(token)
    if role is None:
        raise Unauthorized("the key is not valid")
    if role != "admin":
        raise Forbidden("this route needs an admin key; an API key only allows inference")


async def require_inference(request: Request) -> None:
    """FastAPI dependency: an API or admin key, unless no API keys are configured."""
    keys = _keys(request)
    token = _bearer(request)
    if token is None:
        if keys.inference_open:
            return
        raise Unauthorized("this route needs an API key: send 'Authorization: Bearer <key>'")
    if keys.role(token) is None:
        raise Unauthorized("the key is not valid")


def load_or_create_admin_key(path: Path) -> str:
    """Read the generated admin key at `path`, or create one (mode 0600) and print it once."""
    path = path.expanduser()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    if fd >= 0:
        with os.fdopen(fd, "r") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            key = fh.read(1024).strip()
        if mode & 0o077:
            raise PermissionError(
                f"admin key file {path} is readable by others (mode {mode:o}); chmod 600 it"
            )
        if len(key) < 16:
            raise ValueError(f"admin key file {path} holds no usable key; delete it to get a new one")
        log.info("admin key read from %s", path)
        return key
    key = secrets.token_urlsafe(_KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (key + "\n").encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    # Printed once, to the operator's terminal; it is never logged again.
    print(f"adapterserve: generated admin key {key} (kept in {path}, mode 0600)", file=sys.stderr, flush=True)
    return key

"""Fixtures of the API tests: settings for a test app, and running apps with an ASGI client."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from api_support import ADMIN, tiny_backbone

from adapters.backbone import Backbone
from service.app import create_app
from service.settings import Settings


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a test app: store under tmp_path, fixed keys, no seed dir, small batches."""

    def make(**overrides) -> Settings:
        base = {
            "store": tmp_path / "store",
            "admin_keys": [ADMIN],
            "seed_dir": None,
            "max_wait_ms": 1.0,
            "slots": 8,
            "request_timeout_s": 30.0,
            "drain_timeout_s": 5.0,
        }
        base.update(overrides)
        return Settings(**base)

    return make


@pytest.fixture
def running(settings_for):
    """Factory of running apps: `async with running(**settings) as (app, client): ...`."""

    @contextlib.asynccontextmanager
    async def start(
        *, backbone: Backbone | None = None, wait_ready: bool = True, **overrides
    ) -> AsyncIterator:
        app = create_app(settings_for(**overrides), backbone=backbone or tiny_backbone())
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30.0) as client:
                if wait_ready:
                    await app.state.service.ready.wait()
                yield app, client

    return start


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """A directory for test artifacts."""
    path = tmp_path / "artifacts"
    path.mkdir()
    return path

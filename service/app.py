"""FastAPI app factory: the Service, its life cycle, error handlers and every protocol's routes."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from adapters.backbone import Backbone
from service.docs import install_docs
from service.errors import install_handlers
from service.linger import LingeringClose
from service.routes import install_routes
from service.runtime import Service
from service.settings import Settings
from store.base import ArtifactStore

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _telemetry(enabled: bool) -> dict:
    """FastAPI's telemetry argument, where this FastAPI has one (its native OpenTelemetry support).

    Left on, every request asks the global OpenTelemetry providers whether they are configured
    (environment lookups on the event loop) even when nothing exports.
    """
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": enabled, "metrics": enabled, "logs": enabled}}


def create_app(
    settings: Settings | None = None, *, backbone: Backbone | None = None, store: ArtifactStore | None = None
) -> FastAPI:
    """Build the app; `backbone` and `store` may be injected (tests use tiny in-process models)."""
    settings = settings or Settings()
    service = Service(settings, backbone=backbone, store=store)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        app.state.keys = service.keys
        try:
            yield
        finally:
            await service.drain(settings.drain_timeout_s)
            await service.close()

    app = FastAPI(
        title="adapterserve",
        version="0.1.0",
        summary="One frozen backbone, many hot-swapped adapters, mixed-task batches.",
        lifespan=lifespan,
        # Built by install_docs on local assets: FastAPI's own pages load them from public CDNs.
        docs_url=None,
        redoc_url=None,
        **_telemetry(settings.otel),
    )
    app.state.service = service
    # A refused upload's answer must reach a client that is still sending the body.
    app.add_middleware(LingeringClose)
    install_handlers(app)
    install_routes(app)
    install_docs(app)
    return app

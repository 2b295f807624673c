"""FastAPI app factory: the Service, its life cycle, error handlers and every protocol's routes."""

from __future__ import annotations

import contextlib
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
    )
    app.state.service = service
    # A refused upload's answer must reach a client that is still sending the body.
    app.add_middleware(LingeringClose)
    install_handlers(app)
    install_routes(app)
    install_docs(app)
    return app

"""One thin module per protocol surface, each a translation onto the same runtime calls."""

from __future__ import annotations

from fastapi import FastAPI

from service.routes import native, openai, tei, v2

__all__ = ["install_routes"]


def install_routes(app: FastAPI) -> None:
    """Add every surface's routes to `app`."""
    # The routes themselves, not an included router: the app's route list stays flat, so a 405's
    # Allow header and the admin-route checks see every route (FastAPI includes routers lazily).
    for surface in (native, openai, v2, tei):
        app.router.routes.extend(surface.router.routes)

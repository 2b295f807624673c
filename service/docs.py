"""The interactive API docs (Swagger UI at /docs, ReDoc at /redoc) served from installed files only.

FastAPI's own pages load their script, stylesheet, favicon and fonts from public CDNs, so on an
air-gapped host (the usual place for a model server) they stay blank. The same pages are built here
on the assets that the `fastapi-offline` package ships (the swagger-ui-dist 5 bundle, which renders
OpenAPI 3.1, and ReDoc's standalone build), mounted under `ASSETS_URL`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS_URL", "DOCS_URL", "REDOC_URL", "assets_dir", "install_docs"]

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = "/docs/assets"
"""Where the page assets are mounted (not part of the OpenAPI document)."""

_SWAGGER_JS = "swagger-ui-bundle.js"
_SWAGGER_CSS = "swagger-ui.css"
_REDOC_JS = "redoc.standalone.js"
_FAVICON = "favicon.png"


def assets_dir() -> Path:
    """The installed directory of the docs pages' script, stylesheet and favicon."""
    path = Path(str(files("fastapi_offline") / "static"))
    missing = [f for f in (_SWAGGER_JS, _SWAGGER_CSS, _REDOC_JS, _FAVICON) if not (path / f).is_file()]
    if missing:
        # A packaging change upstream must fail at start-up, not as a blank page in a browser.
        raise RuntimeError(f"the installed fastapi-offline package lacks the docs assets {missing}")
    return path


def install_docs(app: FastAPI) -> None:
    """Serve /docs and /redoc on local assets; the app must be built with docs_url=redoc_url=None."""
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        # root_path: behind a proxy that mounts the app under a prefix, the browser needs the prefix.
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + redirect_url if redirect_url else None,
            swagger_js_url=f"{root}{ASSETS_URL}/{_SWAGGER_JS}",
            swagger_css_url=f"{root}{ASSETS_URL}/{_SWAGGER_CSS}",
            swagger_favicon_url=f"{root}{ASSETS_URL}/{_FAVICON}",
            # No badge from the public online validator: it would be another request leaving the host.
            swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None},
        )

    if redirect_url:

        @app.get(redirect_url, include_in_schema=False)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/{_REDOC_JS}",
            redoc_favicon_url=f"{root}{ASSETS_URL}/{_FAVICON}",
            with_google_fonts=False,
        )

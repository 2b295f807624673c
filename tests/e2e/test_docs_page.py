"""End-to-end: /docs and /redoc render in a headless browser that can reach nothing but 127.0.0.1.

The page's script, stylesheet and favicon must come from the server itself (an air-gapped host has no
CDN), and the rendered Swagger UI must list every operation of the server's own OpenAPI document.
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from e2e_support import Server

pytestmark = pytest.mark.e2e

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install -y chromium)"
)
# Virtual time runs only while the page is idle; 20 s of it covers loading the 1.5 MB bundle, fetching
# /openapi.json and rendering, and costs a few seconds of real time.
VIRTUAL_TIME_MS = 20_000
BROWSER_TIMEOUT_S = 90
METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


def rendered_dom(url: str, profile: Path) -> str:
    """The DOM of `url` after scripts ran, from headless chromium with every other host unreachable."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        f"--user-data-dir={profile}",
        # Offline like an air-gapped host: names other than 127.0.0.1 do not resolve, and every
        # request that is not to loopback goes to a proxy port where nothing listens.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, timeout=BROWSER_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode()


class _Page(HTMLParser):
    """The page's asset URLs, and the (method, path) of each Swagger UI operation block."""

    def __init__(self) -> None:
        super().__init__()
        self.assets: list[str] = []
        self.operations: set[tuple[str, str]] = set()
        self._method: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("script", "img") and a.get("src"):
            self.assets.append(a["src"] or "")
        if tag == "link" and a.get("href"):
            self.assets.append(a["href"] or "")
        classes = set((a.get("class") or "").split())
        if "opblock" in classes:
            methods = {c.removeprefix("opblock-") for c in classes} & METHODS
            self._method = methods.pop() if methods else None
        if "opblock-summary-path" in classes and self._method and a.get("data-path"):
            self.operations.add((self._method, a["data-path"] or ""))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """One server for the module's tests: they only read."""
    server = Server(tmp_path_factory.mktemp("docs"), backbone=tiny_model_dir)
    try:
        yield server.wait_ready()
    finally:
        server.kill()


def parse(html: str) -> _Page:
    """Parse a page's HTML."""
    page = _Page()
    page.feed(html)
    return page


@needs_chromium
def test_swagger_ui_renders_every_operation_offline(server, tmp_path):
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    documented = {(m, p) for p, item in schema["paths"].items() for m in item if m in METHODS}
    assert len(documented) >= 13

    # Every asset of the page as served is on this server, and is really there.
    served = parse(httpx.get(f"{server.url}/docs", timeout=10).text)
    assert len(served.assets) == 3, served.assets
    for asset in served.assets:
        url = urljoin(f"{server.url}/docs", asset)
        assert urlsplit(url).netloc == f"127.0.0.1:{server.port}", asset
        r = httpx.get(url, timeout=10)
        assert r.status_code == 200 and len(r.content) > 1000, (asset, r.status_code)

    page = parse(rendered_dom(f"{server.url}/docs", tmp_path / "chromium"))
    assert page.operations == documented, (documented - page.operations, page.operations - documented)


@needs_chromium
def test_redoc_renders_offline(server, tmp_path):
    served = parse(httpx.get(f"{server.url}/redoc", timeout=10).text)
    assert served.assets and all(a.startswith("/docs/assets/") for a in served.assets), served.assets
    dom = rendered_dom(f"{server.url}/redoc", tmp_path / "chromium")
    # ReDoc writes each operation's path into its rendered page once the document is loaded.
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    missing = [p for p in schema["paths"] if p not in dom]
    assert not missing, missing

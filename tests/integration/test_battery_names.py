"""Battery: hostile task and hypernetwork names, a planted symlink, and the auth of every management route."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from api_support import API, admin, make_artifact, multipart
from battery_support import raw_request, tree_digest, tree_listing

from service.auth import require_admin

pytestmark = pytest.mark.asyncio

# Raw path segments exactly as a client would put them on the wire.
HOSTILE = [
    "..",
    ".",
    "../x",
    "..%2Fx",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e",
    "%2E%2E%2Fx",
    "%2e",
    "%252e%252e",  # double-encoded: decodes once to a name with '%'
    "%2Fetc%2Fpasswd",  # an absolute path
    "%2Ftmp",
    "C:%5Cwindows",
    "..%5C..%5Cx",
    "a%00b",
    "%00",
    "x" * 300,
    "y" * 65,  # one past the limit
    "Task",
    "%20t",
    "t%20",
    "t%0A",
    "t%0D%0Aset-cookie:x",
    "%09",
    "%EF%BD%94%EF%BD%81%EF%BD%93%EF%BD%8B",  # fullwidth "task"
    "t%D0%B0sk",  # Cyrillic a
    "t%E2%80%8Bask",  # zero-width space
    "%C4%B0",  # dotted capital I, lowercases to two code points
    "%F0%9F%92%A5",
    "-x",
    "_x",
    ".hidden",
    ".locks",
    ".tmp-abc",
    ".trash-abc",
    "a..b",
    "~root",
    "%24HOME",
    "x%3By",
    "x%3Fy",
    "x%2A",
    "....",
    "x%2F..",
    "evil",  # planted as a symlink in the store, pointing outside it
]


def _no_path(body: bytes, *roots: Path) -> None:
    text = body.decode("utf-8", "replace")
    for root in roots:
        assert str(root) not in text, text
    assert "Traceback" not in text and "/etc/" not in text


def _outside(tmp_path: Path, store: Path) -> dict[str, str]:
    """Everything under tmp_path except the store and the spool."""
    return {k: v for k, v in tree_listing(tmp_path).items() if not k.startswith(("store/", "spool"))}


async def test_hostile_names_are_4xx_everywhere_and_create_nothing(running, artifacts, tmp_path):
    assert len(HOSTILE) >= 30
    store = tmp_path / "store"
    outside = tmp_path / "outside"
    (outside / "v1").mkdir(parents=True)
    (outside / "current.json").write_text('{"version": 1, "last_version": 1}')
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        d = make_artifact(artifacts, "good", "lora", spec, seed=1)
        assert (
            await client.post("/v1/adapters/good", files=multipart(d), headers=admin())
        ).status_code == 201
        os.symlink(outside, store / "tasks" / "evil")
        os.symlink(outside, store / "hypernetworks" / "evil")
        body = b"".join(
            [
                b'--b\r\nContent-Disposition: form-data; name="config"; filename="c"\r\n\r\n',
                (d / "adapter_config.json").read_bytes(),
                b'\r\n--b\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n',
                (d / "adapter.safetensors").read_bytes(),
                b"\r\n--b--\r\n",
            ]
        )
        upload = {**admin(), "content-type": "multipart/form-data; boundary=b"}
        json_h = {**admin(), "content-type": "application/json"}
        routes = [
            ("POST", "/v1/tasks/{}/predict", json_h, json.dumps({"inputs": ["fun"]}).encode()),
            ("POST", "/v1/adapters/{}", upload, body),
            ("POST", "/v1/adapters/{}?version=5", upload, body),
            ("GET", "/v1/adapters/{}", admin(), b""),
            ("PUT", "/v1/adapters/{}/current", json_h, b'{"version": 1}'),
            ("PUT", "/v1/adapters/{}/pin", admin(), b""),
            ("DELETE", "/v1/adapters/{}/versions/1", admin(), b""),
            ("DELETE", "/v1/adapters/{}", admin(), b""),
            ("POST", "/v1/hypernetworks/{}", upload, body),
        ]
        store_before, outside_before = tree_digest(store), _outside(tmp_path, store)
        seen: dict[int, int] = {}
        for name in HOSTILE:
            for method, template, headers, payload in routes:
                status, answer = await raw_request(
                    app, method, template.format(name), headers=headers, body=payload
                )
                seen[status] = seen.get(status, 0) + 1
                assert 400 <= status < 500, (method, template, name, status, answer[:300])
                _no_path(answer, tmp_path, store)
                if answer:
                    assert set(json.loads(answer)) == {"error"}
            assert tree_digest(store) == store_before, name
            assert _outside(tmp_path, store) == outside_before, name
        # Most are refused by the name check itself, not just by routing.
        assert seen.get(400, 0) > len(HOSTILE) * 4, seen
        # The good task still serves, and the planted link was neither followed nor removed.
        r = await client.post("/v1/tasks/good/predict", json={"inputs": ["fun"]})
        assert r.status_code == 200
        assert os.path.islink(store / "tasks" / "evil") and sorted(os.listdir(outside)) == [
            "current.json",
            "v1",
        ]


def _admin_routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route guarded by require_admin, with placeholders filled in."""
    out = []
    for route in app.routes:
        deps = getattr(route, "dependant", None)
        if deps is None or not any(d.call is require_admin for d in deps.dependencies):
            continue
        path = route.path.replace("{task}", "t").replace("{name}", "h").replace("{version}", "1")
        out += [(m, path) for m in sorted(route.methods)]
    return out


async def test_every_management_route_needs_an_admin_key(running, artifacts):
    async with running(api_keys=[API]) as (app, client):
        d = make_artifact(artifacts, "t", "lora", app.state.service.backbone.spec, seed=1)
        assert (await client.post("/v1/adapters/t", files=multipart(d), headers=admin())).status_code == 201
        routes = _admin_routes(app)
        paths = {p for _, p in routes}
        assert {"/v1/adapters", "/v1/adapters/t", "/v1/adapters/t/current", "/v1/hypernetworks"} <= paths
        assert len(routes) >= 9
        bodies = {"PUT": {"json": {"version": 1}}, "POST": {"files": multipart(d)}}
        for method, path in routes:
            extra = bodies.get(method, {})
            for headers, want in (
                ({}, 401),
                ({"Authorization": "Bearer not-a-key-000000000000"}, 401),
                ({"Authorization": "Basic " + API}, 401),
                (admin(API), 403),
            ):
                r = await client.request(method, path, headers=headers, **extra)
                assert r.status_code == want, (method, path, headers, r.status_code, r.text)
                assert r.json()["error"]["type"] == ("unauthorized" if want == 401 else "forbidden")
        # Nothing was changed by any of those requests.
        detail = (await client.get("/v1/adapters/t", headers=admin())).json()
        assert [v["version"] for v in detail["versions"]] == [1] and detail["residency"]["pinned"] is False

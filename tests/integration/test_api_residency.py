"""Pinning through the API: a pinned task stays on the device under pressure until it is unpinned."""

from __future__ import annotations

import pytest
from api_support import admin, make_artifact, multipart

pytestmark = pytest.mark.asyncio


async def _upload(client, artifacts, spec, task: str, seed: int) -> None:
    d = make_artifact(artifacts, task, "ia3", spec, seed=seed)
    r = await client.post(f"/v1/adapters/{task}", files=multipart(d), headers=admin())
    assert r.status_code == 201, r.text


async def _predict(client, task: str) -> int:
    return (
        await client.post(f"/v1/tasks/{task}/predict", json={"inputs": ["the movie was good"]})
    ).status_code


async def _residency(client, task: str) -> dict:
    r = await client.get(f"/v1/adapters/{task}", headers=admin())
    assert r.status_code == 200, r.text
    return r.json()["residency"]


async def _pin(client, task: str, pinned: bool) -> dict:
    r = await client.put(f"/v1/adapters/{task}/pin", params={"pinned": str(pinned).lower()}, headers=admin())
    assert r.status_code == 200, r.text
    return r.json()["residency"]


async def test_pinned_task_survives_eviction_until_unpinned(running, artifacts):
    """Two usable slots, three tasks: the pinned one is never the victim; unpinned, it is evicted."""
    async with running(slots=3) as (app, client):
        spec = app.state.service.backbone.spec
        for i, task in enumerate(["t1", "t2", "t3"]):
            await _upload(client, artifacts, spec, task, seed=i)
        assert await _pin(client, "t1", True) == {"device": [1], "host": [1], "pinned": True}
        for task in ["t2", "t3", "t2", "t3"]:
            assert await _predict(client, task) == 200
            assert (await _residency(client, "t1"))["device"] == [1]
        assert (await _pin(client, "t1", False))["pinned"] is False
        for task in ["t2", "t3"]:
            assert await _predict(client, task) == 200
        assert (await _residency(client, "t1"))["device"] == []
        assert await _predict(client, "t1") == 200  # loads again on demand


async def test_a_task_that_needs_the_only_pinned_slot_is_503_until_unpinned(running, artifacts):
    """One usable slot held by a pinned task: another task's request fails typed, then works once unpinned."""
    async with running(slots=2) as (app, client):
        spec = app.state.service.backbone.spec
        for i, task in enumerate(["t1", "t2"]):
            await _upload(client, artifacts, spec, task, seed=i)
        await _pin(client, "t1", True)
        r = await client.post("/v1/tasks/t2/predict", json={"inputs": ["fun"]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "slots_exhausted"
        assert await _predict(client, "t1") == 200
        await _pin(client, "t1", False)
        assert await _predict(client, "t2") == 200
        assert (await _residency(client, "t1"))["device"] == []

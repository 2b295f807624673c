"""Prefetch: a cold adapter's bank entries are prepared off the device worker while it is busy, and
the answer is the same as without prefetch."""

from __future__ import annotations

import asyncio
import threading

import pytest
from api_support import Reference, WorkerGate, admin, make_artifact, multipart, tiny_backbone, until

pytestmark = pytest.mark.asyncio

TEXTS = ["the movie was good", "a dull and tired plot"]


def spy_entries(model) -> tuple[list[tuple[str, str]], threading.Event]:
    """Record (thread name, method) of every `model.entries` call; the event is set on each."""
    calls: list[tuple[str, str]] = []
    called = threading.Event()
    real = model.entries

    def entries(config, tensors, **kw):
        calls.append((threading.current_thread().name, config.method))
        called.set()
        return real(config, tensors, **kw)

    model.entries = entries
    return calls, called


async def _answer_cold(running, artifacts, *, prefetch: bool) -> tuple[list[dict], list[tuple[str, str]]]:
    """One usable slot, held by an IA3 task; then a Compacter request arrives while the worker is busy."""
    async with running(slots=2, prefetch=prefetch) as (app, client):
        service = app.state.service
        spec = service.backbone.spec
        for task, method in (("warm", "ia3"), ("cold", "compacter")):
            d = make_artifact(artifacts, task, method, spec, seed=3)
            r = await client.post(f"/v1/adapters/{task}", files=multipart(d), headers=admin())
            assert r.status_code == 201, r.text
        r = await client.post("/v1/tasks/warm/predict", json={"inputs": TEXTS})
        assert r.status_code == 200, r.text
        calls, called = spy_entries(service.model)
        called.clear()
        async with WorkerGate(service) as gate:
            job = asyncio.ensure_future(client.post("/v1/tasks/cold/predict", json={"inputs": TEXTS}))
            if prefetch:
                # prepared while the worker thread is still held: the preparation ran beside it
                assert await asyncio.to_thread(called.wait, 10), (
                    "nothing was prepared while the worker was busy"
                )
                assert calls == [("adapterserve-prefetch_0", "compacter")]
            else:
                await asyncio.sleep(0)
                assert not called.is_set()
            gate.open()
            r = await job
        assert r.status_code == 200, r.text
        return r.json()["outputs"], calls


async def test_a_cold_adapter_is_prepared_beside_the_busy_worker_and_answers_the_same(running, artifacts):
    """With prefetch the worker only copies what the prefetch thread prepared; the outputs are identical."""
    with_prefetch, calls = await _answer_cold(running, artifacts, prefetch=True)
    # the worker thread did not prepare the entries a second time
    assert [c for c in calls if c[1] == "compacter"] == [("adapterserve-prefetch_0", "compacter")]
    without, calls_off = await _answer_cold(running, artifacts / "off", prefetch=False)
    assert [name for name, _ in calls_off] == ["adapterserve-cpu_0"]
    assert with_prefetch == without
    want = Reference(tiny_backbone).outputs(artifacts / "cold", TEXTS)
    assert [o["label"] for o in with_prefetch] == [o["label"] for o in want]
    for got, ref in zip(with_prefetch, want, strict=True):
        assert abs(got["score"] - ref["score"]) < 1e-4


async def test_a_resident_adapter_is_not_prepared_again(running, artifacts):
    """A request to a task already in a slot starts no preparation."""
    async with running(slots=4) as (app, client):
        service = app.state.service
        d = make_artifact(artifacts, "t", "lora", service.backbone.spec, seed=1)
        assert (await client.post("/v1/adapters/t", files=multipart(d), headers=admin())).status_code == 201
        assert (await client.post("/v1/tasks/t/predict", json={"inputs": TEXTS})).status_code == 200
        calls, _ = spy_entries(service.model)
        for _ in range(3):
            assert (await client.post("/v1/tasks/t/predict", json={"inputs": TEXTS})).status_code == 200
        assert calls == []


async def test_a_refused_request_prepares_nothing(running, artifacts):
    """A request the full queue cannot take is answered 429 and leaves no prepared weights behind."""
    async with running(slots=3, max_queue=2, max_inputs=2) as (app, client):
        service = app.state.service
        spec = service.backbone.spec
        for task, method in (("warm", "ia3"), ("cold", "compacter")):
            d = make_artifact(artifacts, task, method, spec, seed=1)
            assert (
                await client.post(f"/v1/adapters/{task}", files=multipart(d), headers=admin())
            ).status_code == 201
        assert (await client.post("/v1/tasks/warm/predict", json={"inputs": TEXTS})).status_code == 200
        service.device_slots.evict_where([k for k in service.device_slots.resident_keys() if k[0] == "cold"])
        calls, _ = spy_entries(service.model)
        batcher = service.batcher
        async with WorkerGate(service) as gate:
            warm = [asyncio.ensure_future(client.post("/v1/tasks/warm/predict", json={"inputs": TEXTS}))]
            await until(lambda: batcher.in_flight == 2)  # the first is the batch waiting for the worker
            warm.append(asyncio.ensure_future(client.post("/v1/tasks/warm/predict", json={"inputs": TEXTS})))
            await until(lambda: batcher.queue_depth == 2)  # the second fills the queue
            r = await client.post("/v1/tasks/cold/predict", json={"inputs": ["a"]})
            assert r.status_code == 429, r.text
            gate.open()
            assert [(await w).status_code for w in warm] == [200, 200]
        assert calls == []

"""Battery: overload, deadlines, disconnects, hot swaps and deletes under many concurrent clients."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from api_support import (
    Reference,
    WorkerGate,
    admin,
    artifact_config,
    assert_outputs_close,
    make_artifact,
    multipart,
    random_arrays,
    tiny_backbone,
    until,
)
from battery_support import raw_request, safetensors_bytes, upload_bytes
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.asyncio

TEXTS = ["the movie was good", "bad plot and boring ending"]


class RowLog:
    """Records the task of every row the device worker actually runs."""

    def __init__(self, service) -> None:
        self.tasks: list[str] = []
        self._lock = threading.Lock()
        original = service.engine._run

        def run(rows):
            with self._lock:
                self.tasks += [r.task for r in rows]
            return original(rows)

        service.engine._run = run


def _sample(text: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def _predict(client, task: str, inputs: list[str]):
    return await client.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs})


async def test_a_full_queue_answers_429_and_every_admitted_request_completes(running, artifacts):
    async with running(max_queue=8, max_inputs=4, max_batch_size=32) as (app, client):
        svc = app.state.service
        d = make_artifact(artifacts, "t", "lora", svc.backbone.spec, seed=1)
        assert (await client.post("/v1/adapters/t", files=multipart(d), headers=admin())).status_code == 201
        log = RowLog(svc)
        async with WorkerGate(svc) as gate:
            first = asyncio.create_task(_predict(client, "t", ["fun"]))
            await until(lambda: svc.batcher.in_flight == 1)
            admitted = [asyncio.create_task(_predict(client, "t", TEXTS)) for _ in range(4)]
            await until(lambda: svc.batcher.queue_depth == 8)
            for size in (1, 2, 1):
                r = await _predict(client, "t", ["fun"] * size)
                assert r.status_code == 429 and r.json()["error"]["type"] == "queue_full"
                assert int(r.headers["Retry-After"]) >= 1
            assert svc.batcher.queue_depth == 8
            assert (await client.get("/livez")).status_code == 200
            gate.open()
            answers = await asyncio.gather(first, *admitted)
        assert [r.status_code for r in answers] == [200] * 5
        assert all(len(r.json()["outputs"]) == 2 for r in answers[1:])
        assert len(log.tasks) == 9  # one running row and exactly the eight queued ones
        text = (await client.get("/metrics")).text
        assert _sample(text, "adapterserve_rejected_total", reason="queue_full") == 3


async def test_a_request_past_its_deadline_is_504_and_never_runs(running, artifacts):
    async with running(request_timeout_s=0.5) as (app, client):
        svc = app.state.service
        for i, name in enumerate(("t", "late")):
            d = make_artifact(artifacts, name, "lora", svc.backbone.spec, seed=i)
            assert (
                await client.post(f"/v1/adapters/{name}", files=multipart(d), headers=admin())
            ).status_code == 201
        log = RowLog(svc)
        async with WorkerGate(svc) as gate:
            # The first request's batch waits for the worker; the next one waits in the queue.
            first = asyncio.create_task(_predict(client, "t", ["fun"]))
            await until(lambda: svc.batcher.in_flight == 1)
            r = await _predict(client, "late", TEXTS)
            assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded"
            assert svc.batcher.queue_depth == 0
            gate.open()
            assert (await first).status_code == 200
        assert (await _predict(client, "t", ["fun"])).status_code == 200
        assert log.tasks == ["t", "t"]


async def test_a_disconnected_clients_rows_are_dropped(running, artifacts):
    async with running() as (app, client):
        svc = app.state.service
        for i, name in enumerate(("t", "gone")):
            d = make_artifact(artifacts, name, "lora", svc.backbone.spec, seed=i)
            assert (
                await client.post(f"/v1/adapters/{name}", files=multipart(d), headers=admin())
            ).status_code == 201
        log = RowLog(svc)
        hang_up = asyncio.Event()
        async with WorkerGate(svc) as gate:
            first = asyncio.create_task(_predict(client, "t", ["fun"]))
            await until(lambda: svc.batcher.in_flight == 1)
            body = json.dumps({"inputs": ["fun", "bad", "good"]}).encode()
            gone = asyncio.create_task(
                raw_request(
                    app,
                    "POST",
                    "/v1/tasks/gone/predict",
                    headers={"content-type": "application/json"},
                    body=body,
                    disconnect=hang_up,
                )
            )
            await until(lambda: svc.batcher.queue_depth == 3)
            hang_up.set()
            await until(lambda: svc.batcher.queue_depth == 0)
            gate.open()
            assert (await first).status_code == 200
            status, _ = await gone
        assert status == 499
        assert log.tasks == ["t"]
        text = (await client.get("/metrics")).text
        assert _sample(text, "adapterserve_rejected_total", reason="cancelled") == 1
        assert _sample(text, "adapterserve_requests_total", task="gone", status="499") == 1
        assert svc.registry.leases_total() == 0


async def test_32_clients_through_20_hot_swaps_a_corrupt_upload_and_a_delete(running, artifacts):
    async with running(max_wait_ms=2.0, slots=8) as (app, client):
        svc = app.state.service
        spec = svc.backbone.spec
        versions = [make_artifact(artifacts, f"v{i}", "lora", spec, seed=200 + i) for i in range(21)]
        ref = Reference(tiny_backbone)
        expected = {i + 1: ref.outputs(d, TEXTS) for i, d in enumerate(versions)}
        assert (
            await client.post("/v1/adapters/t", files=multipart(versions[0]), headers=admin())
        ).status_code == 201
        answers: list[list[tuple[int, str | None, dict]]] = [[] for _ in range(32)]
        stop = asyncio.Event()

        async def predictor(i: int) -> None:
            while not stop.is_set():
                r = await _predict(client, "t", TEXTS)
                answers[i].append((r.status_code, r.headers.get("X-Adapter-Version"), r.json()))
                if r.status_code == 404:
                    return

        workers = [asyncio.create_task(predictor(i)) for i in range(32)]
        await until(lambda: all(answers))
        for n, d in enumerate(versions[1:], start=2):
            r = await client.post("/v1/adapters/t", files=multipart(d), headers=admin())
            assert r.status_code == 201 and r.json()["version"] == n
        config = artifact_config("lora", spec.fingerprint)
        arrays = random_arrays(config, spec, seed=9)
        arrays[sorted(arrays)[0]].flat[0] = float("nan")
        r = await upload_bytes(client, "t", json.dumps(config).encode(), safetensors_bytes(arrays))
        assert r.status_code == 422
        mark = [len(a) for a in answers]
        await until(lambda: all(len(a) >= m + 2 for a, m in zip(answers, mark, strict=True)))
        # Deleting under load: what was admitted finishes, everything after is 404.
        async with WorkerGate(svc) as gate:
            await until(lambda: svc.batcher.queue_depth > 0)
            admitted = svc.registry.leases_total()
            assert admitted > 0
            assert (await client.delete("/v1/adapters/t", headers=admin())).status_code == 204
            gate.open()
            await asyncio.wait_for(asyncio.gather(*workers), timeout=30)
        stop.set()
        finished_on_last = 0
        for a in answers:
            statuses = [s for s, _, _ in a]
            assert set(statuses) <= {200, 404}, statuses
            # Each client saw 200s, then the task disappeared once and for all.
            assert statuses[-1] == 404 and 404 not in statuses[:-1]
            seen = []
            for _status, header, body in a[:-1]:
                assert header == str(body["version"])
                assert_outputs_close(body["outputs"], expected[body["version"]])
                seen.append(body["version"])
            assert seen == sorted(seen), "a client went back to an older version"
            # Each client asked at least twice after the refused corrupt upload: the last good version.
            finished_on_last += seen[-1] == 21
        assert finished_on_last == 32
        assert len({v for a in answers for _, _, b in a[:-1] for v in [b["version"]]}) >= 2
        assert svc.registry.leases_total() == 0


async def test_requests_waiting_for_the_tokenizer_count_against_the_queue(running, artifacts):
    async with running(max_queue=4, max_inputs=4) as (app, client):
        svc = app.state.service
        d = make_artifact(artifacts, "t", "lora", svc.backbone.spec, seed=1)
        assert (await client.post("/v1/adapters/t", files=multipart(d), headers=admin())).status_code == 201
        gate, entered = threading.Event(), threading.Event()

        def hold_the_tokenizer() -> None:
            entered.set()
            gate.wait(30)

        loop = asyncio.get_running_loop()
        blocker = loop.run_in_executor(svc.engine._tokenize_pool, hold_the_tokenizer)
        await asyncio.to_thread(entered.wait, 10)
        waiting = [asyncio.create_task(_predict(client, "t", TEXTS)) for _ in range(2)]
        await until(lambda: svc.batcher.reserved == 4)
        # Nothing is queued yet, but the room is taken: an overload never piles up unbounded in front.
        assert svc.batcher.queue_depth == 0
        r = await _predict(client, "t", ["fun"])
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        gate.set()
        await blocker
        assert [r.status_code for r in await asyncio.gather(*waiting)] == [200, 200]
        assert svc.batcher.reserved == 0
        assert (await _predict(client, "t", TEXTS)).status_code == 200

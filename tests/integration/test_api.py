"""The HTTP API through the ASGI app, on tiny in-process backbones: contract, errors, swaps, drain."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading

import numpy as np
import pytest
from api_support import (
    ADMIN,
    API,
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
    write_artifact,
)
from helpers import REQUIRED_METRICS
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings

pytestmark = pytest.mark.asyncio

TEXTS = ["the movie was good", "bad plot and boring ending", "i loved it", "this film is not very fun"]


async def upload(client, task: str, directory, **params):
    """POST an artifact directory as a new version."""
    return await client.post(
        f"/v1/adapters/{task}", files=multipart(directory), headers=admin(), params=params
    )


# -- health, backbone, settings ------------------------------------------------------------------


async def test_readyz_is_503_until_warm_up_finishes(running, monkeypatch):
    gate = threading.Event()
    from service.engine import Engine

    original = Engine.warm_up

    def slow_warm_up(self) -> None:
        gate.wait(30)
        original(self)

    monkeypatch.setattr(Engine, "warm_up", slow_warm_up)
    async with running(wait_ready=False) as (app, client):
        assert (await client.get("/livez")).status_code == 200
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json() == {"status": "starting"}
        r = await client.post("/v1/tasks/any/predict", json={"inputs": ["x"]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
        gate.set()
        await app.state.service.ready.wait()
        assert (await client.get("/readyz")).json() == {"status": "ready"}


async def test_backbone_route_describes_the_model(running):
    async with running() as (app, client):
        body = (await client.get("/v1/backbone")).json()
        spec = app.state.service.backbone.spec
        assert body["fingerprint"] == spec.fingerprint
        assert (body["architecture"], body["hidden_size"], body["num_layers"]) == ("bert", 32, 2)
        assert body["generative"] is False and body["slots"] == 7


@pytest.mark.parametrize("otel", [False, True])
async def test_opentelemetry_is_asked_per_request_only_when_enabled(running, monkeypatch, otel):
    """ADAPTERSERVE_OTEL=false: a request never asks OpenTelemetry for its providers (no per-request cost)."""
    pytest.importorskip("fastapi.telemetry", reason="this FastAPI has no native OpenTelemetry support")
    from opentelemetry import trace

    asked = []
    real = trace.get_tracer_provider
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: asked.append(1) or real())
    async with running(otel=otel) as (_, client):
        asked.clear()
        assert (await client.get("/livez")).status_code == 200
    assert bool(asked) is otel


async def test_settings_read_comma_separated_keys_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERSERVE_ADMIN_KEYS", f"{ADMIN}, second-admin-key-000000")
    monkeypatch.setenv("ADAPTERSERVE_API_KEYS", API)
    monkeypatch.setenv("ADAPTERSERVE_SEED_DIR", "")
    monkeypatch.setenv("ADAPTERSERVE_PORT", "9123")
    s = Settings(store=tmp_path)
    assert s.admin_keys == [ADMIN, "second-admin-key-000000"] and s.api_keys == [API]
    assert s.seed_dir is None and s.port == 9123 and s.host == "127.0.0.1"
    with pytest.raises(ValueError, match="at least 16"):
        Settings(admin_keys=["short"])
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description"


# -- predict ---------------------------------------------------------------------------------------


CASES = [
    ("lora-cls", "lora", "classification"),
    ("bottleneck-3", "bottleneck", "three"),
    ("parallel-reg", "parallel", "regression"),
    ("ia3-cls", "ia3", "classification"),
    ("layernorm-cls", "layernorm", "classification"),
]


async def test_concurrent_predicts_across_methods_match_in_process_outputs(running, artifacts):
    async with running(max_wait_ms=20.0) as (app, client):
        spec = app.state.service.backbone.spec
        dirs = {}
        for i, (task, method, head) in enumerate(CASES):
            dirs[task] = make_artifact(artifacts, task, method, spec, seed=10 + i, head=head)
            r = await upload(client, task, dirs[task])
            assert r.status_code == 201, r.text
            assert r.json()["method"] == method and r.json()["version"] == 1 and r.json()["current"]

        async def ask(task: str, texts: list) -> tuple[str, object]:
            r = await client.post(
                f"/v1/tasks/{task}/predict", json={"inputs": texts, "parameters": {"return_all_scores": True}}
            )
            assert r.status_code == 200, r.text
            assert r.headers["X-Adapter-Version"] == "1"
            return task, r.json()

        jobs = [ask(task, TEXTS[i % 4 :] + TEXTS[: i % 4]) for i, (task, _, _) in enumerate(CASES * 3)]
        answers = await asyncio.gather(*jobs)
        ref = Reference(tiny_backbone)
        for i, (task, body) in enumerate(answers):
            texts = TEXTS[i % 4 :] + TEXTS[: i % 4]
            assert body["task"] == task and body["version"] == 1
            assert_outputs_close(body["outputs"], ref.outputs(dirs[task], texts, all_scores=True))
        regression = next(body for task, body in answers if task == "parallel-reg")
        assert set(regression["outputs"][0]) == {"value"}
        metrics = (await client.get("/metrics")).text
        # Rows of several tasks shared forward passes.
        assert _sample(metrics, "adapterserve_batch_tasks_sum") > _sample(
            metrics, "adapterserve_batch_tasks_count"
        )


async def test_pairs_and_truncation(running, artifacts):
    async with running(max_input_tokens=8, max_batch_tokens=64) as (app, client):
        spec = app.state.service.backbone.spec
        d = make_artifact(artifacts, "nli", "lora", spec, seed=3, head="three")
        assert (await upload(client, "nli", d)).status_code == 201
        inputs = [["the movie was good", "i loved it"], " ".join(["very"] * 40), "fun"]
        r = await client.post("/v1/tasks/nli/predict", json={"inputs": inputs})
        assert r.status_code == 200
        outputs = r.json()["outputs"]
        assert "scores" not in outputs[0]
        assert_outputs_close(outputs, Reference(tiny_backbone).outputs(d, inputs, max_len=8))


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"inputs": []}, 422),
        ({"inputs": ["a", ["b"]]}, 422),
        ({"inputs": ["a"], "parameters": {"nope": 1}}, 422),
        ({"inputs": ["x"] * 9}, 413),
        ({"inputs": ["x" * 101]}, 413),
        ({"inputs": [""]}, 200),
    ],
)
async def test_predict_input_errors(running, artifacts, body, status):
    async with running(max_inputs=8, max_input_chars=100) as (app, client):
        d = make_artifact(artifacts, "t", "ia3", app.state.service.backbone.spec, seed=1)
        assert (await upload(client, "t", d)).status_code == 201
        r = await client.post("/v1/tasks/t/predict", json=body)
        assert r.status_code == status, r.text
        if status != 200:
            assert set(r.json()["error"]) == {"type", "message"}


async def test_unknown_task_and_bad_names_are_404_and_400(running):
    async with running() as (_app, client):
        r = await client.post("/v1/tasks/missing/predict", json={"inputs": ["x"]})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
        r = await client.post("/v1/tasks/Bad%20Name/predict", json={"inputs": ["x"]})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_name"
        # the client resolves a literal `..` segment away (GET /v1: no such route); encoded, it is a bad name
        r = await client.get("/v1/adapters/..", headers=admin())
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
        r = await client.get("/v1/adapters/%2E%2E", headers=admin())
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_name"
        r = await client.post("/v1/adapters/a..b", headers=admin(), files={"config": ("c", b"{}")})
        assert r.status_code == 400


# -- auth ------------------------------------------------------------------------------------------


async def test_auth_roles(running, artifacts):
    async with running(api_keys=[API]) as (app, client):
        d = make_artifact(artifacts, "t", "lora", app.state.service.backbone.spec, seed=1)
        r = await client.post("/v1/adapters/t", files=multipart(d))
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        r = await client.post("/v1/adapters/t", files=multipart(d), headers=admin("wrong-key-000000000000"))
        assert r.status_code == 401
        r = await client.post("/v1/adapters/t", files=multipart(d), headers=admin(API))
        assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"
        assert (await client.get("/v1/adapters", headers=admin(API))).status_code == 403
        assert (await client.delete("/v1/adapters/t", headers=admin(API))).status_code == 403
        r = await client.post(
            "/v1/adapters/t", files=multipart(d), headers={"Authorization": f"Basic {ADMIN}"}
        )
        assert r.status_code == 401
        assert (await upload(client, "t", d)).status_code == 201
        body = {"inputs": ["fun"]}
        assert (await client.post("/v1/tasks/t/predict", json=body)).status_code == 401
        assert (await client.post("/v1/tasks/t/predict", json=body, headers=admin(API))).status_code == 200
        assert (await client.post("/v1/tasks/t/predict", json=body, headers=admin())).status_code == 200
        assert (await client.get("/v1/backbone")).status_code == 401
        # Health and metrics stay open for probes and scrapers.
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


async def test_generated_admin_key_is_kept_in_a_private_file(running, tmp_path, capsys):
    key_file = tmp_path / "store.admin-key"
    async with running(admin_keys=[]) as (_app, client):
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        key = key_file.read_text().strip()
        assert key in capsys.readouterr().err
        assert (await client.get("/v1/adapters")).status_code == 401
        assert (await client.get("/v1/adapters", headers=admin(key))).status_code == 200
    async with running(admin_keys=[]) as (_app, client):
        assert key not in capsys.readouterr().err
        assert (await client.get("/v1/adapters", headers=admin(key))).status_code == 200


# -- uploads ---------------------------------------------------------------------------------------


def _variant(spec, kind: str) -> tuple[bytes, bytes]:
    """Config and weights bytes of one broken upload."""
    import io

    from store.safetensors_io import write_safetensors

    config = artifact_config("lora", spec.fingerprint)
    arrays = random_arrays(config, spec, seed=1)
    if kind == "fingerprint":
        config["backbone_fingerprint"] = "0" * 64
    elif kind == "unknown_key":
        config["surprise"] = True
    elif kind == "shape":
        name = next(iter(arrays))
        arrays[name] = np.zeros((3, 3), dtype=np.float32)
    elif kind == "missing_tensor":
        arrays.pop(next(iter(arrays)))
    elif kind == "nan":
        name = next(iter(arrays))
        arrays[name] = arrays[name].copy()
        arrays[name].flat[0] = np.nan
    elif kind == "rank":
        config["r"] = 64
        arrays = random_arrays(config, spec, seed=1)
    elif kind == "prefix_length":
        config = {"method": "prefix", "prefix_length": 40, "backbone_fingerprint": spec.fingerprint}
        config["head"] = {"type": "regression"}
        arrays = random_arrays(config, spec, seed=1)
    elif kind == "no_head":
        config.pop("head")
        arrays = random_arrays(config, spec, seed=1)
    buf = io.BytesIO()
    write_safetensors(buf, arrays)
    weights = buf.getvalue()
    if kind == "pickle":
        weights = b"\x80\x04\x95" + b"\x00" * 64
    elif kind == "zip":
        weights = b"PK\x03\x04" + b"\x00" * 64
    raw = b"{not json" if kind == "json" else json.dumps(config).encode()
    return raw, weights


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("pickle", 415),
        ("zip", 415),
        ("json", 422),
        ("unknown_key", 422),
        ("fingerprint", 422),
        ("shape", 422),
        ("missing_tensor", 422),
        ("nan", 422),
        ("no_head", 422),
        ("rank", 413),
        ("prefix_length", 413),
    ],
)
async def test_invalid_uploads_are_refused_and_store_nothing(running, kind, status):
    # No rank or prefix length is too large by default; an operator's caps refuse past them.
    async with running(lora_max_rank=16, prefix_max_len=32) as (app, client):
        config, weights = _variant(app.state.service.backbone.spec, kind)
        files = {
            "config": ("c.json", config, "application/json"),
            "weights": ("w", weights, "application/octet-stream"),
        }
        r = await client.post("/v1/adapters/bad", files=files, headers=admin())
        assert r.status_code == status, r.text
        message = r.json()["error"]["message"]
        assert "/tmp" not in message and "Traceback" not in message
        assert (await client.get("/v1/adapters", headers=admin())).json() == {"adapters": []}
        metrics = (await client.get("/metrics")).text
        assert 'adapterserve_uploads_total{result="ok"}' not in metrics


async def test_upload_needs_multipart_with_both_parts(running, artifacts):
    async with running() as (app, client):
        r = await client.post(
            "/v1/adapters/t", content=b"{}", headers={**admin(), "Content-Type": "application/json"}
        )
        assert r.status_code == 415
        d = make_artifact(artifacts, "t", "lora", app.state.service.backbone.spec, seed=1)
        r = await client.post("/v1/adapters/t", files={"config": multipart(d)["config"]}, headers=admin())
        assert r.status_code == 400 and "weights" in r.json()["error"]["message"]
        files = {**multipart(d), "extra": ("x", b"1")}
        assert (await client.post("/v1/adapters/t", files=files, headers=admin())).status_code == 400


async def test_oversized_upload_is_413_with_connection_close(running, artifacts):
    async with running(max_upload_bytes=64 << 10) as (app, client):
        d = make_artifact(artifacts, "t", "lora", app.state.service.backbone.spec, seed=1)
        headers = {
            **admin(),
            "Content-Type": "multipart/form-data; boundary=xyz",
            "Content-Length": str(10 << 20),
        }
        sent = []

        async def body():
            for _ in range(160):
                sent.append(1)
                yield b"x" * 65536

        r = await client.post("/v1/adapters/t", content=body(), headers=headers)
        # Refused on the declared length: the answer closes the connection, and the rest of the body
        # is only drained so the client can read it (tests/e2e/test_upload_refusals.py, real sockets).
        assert r.status_code == 413 and r.headers["connection"] == "close"
        # Without a Content-Length it is refused as soon as the stream crosses the limit.
        sent.clear()
        headers.pop("Content-Length")
        prefix = b'--xyz\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n'

        async def chunked():
            yield prefix
            for _ in range(160):
                sent.append(1)
                yield b"x" * 16384

        r = await client.post("/v1/adapters/t", content=chunked(), headers=headers)
        assert r.status_code == 413 and r.headers["connection"] == "close"
        assert r.json()["error"]["type"] == "payload_too_large"
        assert (await upload(client, "t", d)).status_code == 201


async def test_hypernetwork_routes_need_the_admin_key(running):
    # behaviour of the routes themselves: tests/integration/test_hypernet_api.py
    async with running() as (_app, client):
        r = await client.get("/v1/hypernetworks", headers=admin())
        assert r.status_code == 200 and r.json() == {"hypernetworks": []}
        assert (await client.get("/v1/hypernetworks")).status_code == 401
        assert (await client.post("/v1/hypernetworks/h")).status_code == 401


# -- versions, hot swap, delete ----------------------------------------------------------------------


async def test_versions_roll_forward_and_back(running, artifacts):
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        v1 = make_artifact(artifacts, "v1", "lora", spec, seed=1)
        v2 = make_artifact(artifacts, "v2", "bottleneck", spec, seed=2)
        assert (await upload(client, "t", v1)).status_code == 201
        r = await upload(client, "t", v2, activate="false")
        assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["current"] is False
        ref = Reference(tiny_backbone)

        async def check(version: int, directory) -> None:
            r = await client.post("/v1/tasks/t/predict", json={"inputs": TEXTS})
            assert r.json()["version"] == version and r.headers["X-Adapter-Version"] == str(version)
            assert_outputs_close(r.json()["outputs"], ref.outputs(directory, TEXTS))

        await check(1, v1)
        r = await client.put("/v1/adapters/t/current", json={"version": 2}, headers=admin())
        assert (
            r.status_code == 200 and r.json()["current_version"] == 2 and r.json()["method"] == "bottleneck"
        )
        await check(2, v2)
        assert (
            await client.put("/v1/adapters/t/current", json={"version": 9}, headers=admin())
        ).status_code == 404
        assert (await client.delete("/v1/adapters/t/versions/2", headers=admin())).status_code == 409
        assert (
            await client.put("/v1/adapters/t/current", json={"version": 1}, headers=admin())
        ).status_code == 200
        await check(1, v1)
        assert (await client.delete("/v1/adapters/t/versions/2", headers=admin())).status_code == 204
        detail = (await client.get("/v1/adapters/t", headers=admin())).json()
        assert [v["version"] for v in detail["versions"]] == [1]
        assert detail["residency"]["host"] == [1]
        listing = (await client.get("/v1/adapters", headers=admin())).json()["adapters"]
        assert listing == [{"task": "t", "current_version": 1, "method": "lora"}]


async def test_hot_swap_under_load_never_mixes_versions(running, artifacts):
    async with running(max_wait_ms=2.0) as (app, client):
        spec = app.state.service.backbone.spec
        v1 = make_artifact(artifacts, "v1", "lora", spec, seed=1)
        v2 = make_artifact(artifacts, "v2", "lora", spec, seed=2)
        assert (await upload(client, "t", v1)).status_code == 201
        stop = asyncio.Event()
        answers: list = []

        async def load() -> None:
            while not stop.is_set():
                r = await client.post("/v1/tasks/t/predict", json={"inputs": TEXTS})
                answers.append((r.status_code, r.headers.get("X-Adapter-Version"), r.json()))

        workers = [asyncio.create_task(load()) for _ in range(6)]
        await until(lambda: len(answers) >= 6)
        assert (await upload(client, "t", v2)).status_code == 201
        seen = len(answers)
        await until(lambda: len(answers) >= seen + 12)
        stop.set()
        await asyncio.gather(*workers)
        ref = Reference(tiny_backbone)
        expected = {1: ref.outputs(v1, TEXTS), 2: ref.outputs(v2, TEXTS)}
        assert {status for status, _, _ in answers} == {200}
        for _, header, body in answers:
            assert header == str(body["version"])
            assert_outputs_close(body["outputs"], expected[body["version"]])
        assert answers[-1][2]["version"] == 2 and answers[0][2]["version"] == 1


async def test_failed_activation_keeps_the_previous_version(running, artifacts):
    async with running() as (app, client):
        svc = app.state.service
        v1 = make_artifact(artifacts, "v1", "lora", svc.backbone.spec, seed=1)
        v2 = make_artifact(artifacts, "v2", "ia3", svc.backbone.spec, seed=2)
        assert (await upload(client, "t", v1)).status_code == 201
        original = svc.model.load

        def broken(slot, config, tensors, **kw):
            if config.method == "ia3":
                raise RuntimeError("device copy failed")
            return original(slot, config, tensors, **kw)

        svc.model.load = broken
        r = await upload(client, "t", v2)
        assert r.status_code == 500 and "device" not in r.json()["error"]["message"]
        r = await client.post("/v1/tasks/t/predict", json={"inputs": TEXTS})
        assert r.status_code == 200 and r.json()["version"] == 1
        detail = (await client.get("/v1/adapters/t", headers=admin())).json()
        assert detail["current_version"] == 1 and [v["version"] for v in detail["versions"]] == [1]


async def test_delete_lets_admitted_requests_finish(running, artifacts):
    async with running() as (app, client):
        svc = app.state.service
        d = make_artifact(artifacts, "t", "lora", svc.backbone.spec, seed=1)
        assert (await upload(client, "t", d)).status_code == 201
        async with WorkerGate(svc) as gate:
            admitted = asyncio.create_task(client.post("/v1/tasks/t/predict", json={"inputs": TEXTS}))
            await until(lambda: svc.batcher.in_flight == len(TEXTS))
            assert (await client.delete("/v1/adapters/t", headers=admin())).status_code == 204
            r = await client.post("/v1/tasks/t/predict", json={"inputs": TEXTS})
            assert r.status_code == 404
            assert (await client.get("/v1/adapters/t", headers=admin())).status_code == 404
            gate.open()
            r = await admitted
        assert r.status_code == 200
        assert_outputs_close(r.json()["outputs"], Reference(tiny_backbone).outputs(d, TEXTS))
        await until(lambda: not svc.device_slots.resident_keys())
        # A new task of the same name starts fresh, never served from the deleted one's caches.
        d2 = make_artifact(artifacts, "t2", "bottleneck", svc.backbone.spec, seed=5)
        assert (await upload(client, "t", d2)).json()["version"] == 1
        r = await client.post("/v1/tasks/t/predict", json={"inputs": TEXTS})
        assert_outputs_close(r.json()["outputs"], Reference(tiny_backbone).outputs(d2, TEXTS))


# -- backpressure, deadlines, drain ------------------------------------------------------------------


async def test_queue_full_is_429_and_a_passed_deadline_is_504(running, artifacts):
    async with running(max_queue=2, max_inputs=2, request_timeout_s=1.5) as (app, client):
        svc = app.state.service
        d = make_artifact(artifacts, "t", "lora", svc.backbone.spec, seed=1)
        assert (await upload(client, "t", d)).status_code == 201
        async with WorkerGate(svc) as gate:
            running_one = asyncio.create_task(client.post("/v1/tasks/t/predict", json={"inputs": ["fun"]}))
            await until(lambda: svc.batcher.in_flight == 1)
            queued = asyncio.create_task(client.post("/v1/tasks/t/predict", json={"inputs": ["a", "b"]}))
            await until(lambda: svc.batcher.queue_depth == 2)
            r = await client.post("/v1/tasks/t/predict", json={"inputs": ["fun"]})
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "queue_full"
            r = await queued
            assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded"
            gate.open()
            assert (await running_one).status_code == 200
        text = (await client.get("/metrics")).text
        assert _sample(text, "adapterserve_rejected_total", reason="queue_full") == 1
        assert _sample(text, "adapterserve_rejected_total", reason="deadline") == 1
        assert _sample(text, "adapterserve_requests_total", task="t", status="429") == 1
        assert _sample(text, "adapterserve_requests_total", task="t", status="504") == 1


async def test_a_refusal_is_answered_after_the_pause_and_never_later_than_its_retry_after(running, artifacts):
    """Clients that retry at once must not keep the event loop busy: each 429 waits min(pause, Retry-After)."""
    async with running(max_queue=2, max_inputs=2, refusal_pause_ms=250) as (app, client):
        svc = app.state.service
        d = make_artifact(artifacts, "t", "lora", svc.backbone.spec, seed=1)
        assert (await upload(client, "t", d)).status_code == 201
        pauses: list[float] = []
        paused, release = asyncio.Event(), asyncio.Event()

        async def pause(seconds: float) -> None:
            pauses.append(seconds)
            paused.set()
            await release.wait()

        svc.pause = pause
        async with WorkerGate(svc) as gate:
            first = asyncio.create_task(client.post("/v1/tasks/t/predict", json={"inputs": ["fun"]}))
            await until(lambda: svc.batcher.in_flight == 1)
            queued = asyncio.create_task(client.post("/v1/tasks/t/predict", json={"inputs": ["a", "b"]}))
            await until(lambda: svc.batcher.queue_depth == 2)
            refused = asyncio.create_task(client.post("/v1/tasks/t/predict", json={"inputs": ["fun"]}))
            await asyncio.wait_for(paused.wait(), 10)
            assert not refused.done()  # held while it pauses
            release.set()
            r = await refused
            assert r.status_code == 429
            assert pauses == [min(0.25, int(r.headers["Retry-After"]))]
            gate.open()
            assert (await first).status_code == 200 and (await queued).status_code == 200


async def test_drain_finishes_admitted_work_and_refuses_new(running, artifacts):
    async with running() as (app, client):
        svc = app.state.service
        d = make_artifact(artifacts, "t", "lora", svc.backbone.spec, seed=1)
        assert (await upload(client, "t", d)).status_code == 201
        async with WorkerGate(svc) as gate:
            admitted = asyncio.create_task(client.post("/v1/tasks/t/predict", json={"inputs": TEXTS}))
            await until(lambda: svc.batcher.in_flight == len(TEXTS))
            drain = asyncio.create_task(svc.drain(10.0))
            await until(lambda: svc.draining)
            r = await client.get("/readyz")
            assert r.status_code == 503 and r.json() == {"status": "draining"}
            r = await client.post("/v1/tasks/t/predict", json={"inputs": TEXTS})
            assert r.status_code == 503 and r.json()["error"]["type"] == "draining"
            assert not drain.done()
            gate.open()
            assert (await admitted).status_code == 200
            await drain
        assert not svc.batcher.running


# -- caches ------------------------------------------------------------------------------------------


async def test_more_tasks_than_slots_evict_and_reload_correctly(running, artifacts):
    async with running(slots=3, max_wait_ms=5.0, pinned=["pinned"]) as (app, client):
        svc = app.state.service
        names = ["pinned", "a", "b", "c"]
        dirs = {
            n: make_artifact(artifacts, n, "lora", svc.backbone.spec, seed=20 + i)
            for i, n in enumerate(names)
        }
        for n in names:
            assert (await upload(client, n, dirs[n])).status_code == 201
        ref = Reference(tiny_backbone)
        for _ in range(2):
            answers = await asyncio.gather(
                *[client.post(f"/v1/tasks/{n}/predict", json={"inputs": TEXTS}) for n in names]
            )
            for n, r in zip(names, answers, strict=True):
                assert r.status_code == 200, r.text
                assert_outputs_close(r.json()["outputs"], ref.outputs(dirs[n], TEXTS))
        detail = (await client.get("/v1/adapters/pinned", headers=admin())).json()
        assert detail["residency"] == {"device": [1], "host": [1], "pinned": True}
        text = (await client.get("/metrics")).text
        assert _sample(text, "adapterserve_adapter_evictions_total") > 0
        assert _sample(text, "adapterserve_adapters_resident") == 2
        r = await client.put("/v1/adapters/a/pin", headers=admin())
        assert r.status_code == 200 and r.json()["residency"]["pinned"] is True


async def test_seed_dir_imports_valid_artifacts_at_first_start(running, tmp_path):
    seed = tmp_path / "seed"
    spec = tiny_backbone().spec
    make_artifact(seed, "demo-sentiment", "lora", spec, seed=1)
    make_artifact(seed, "demo-topic", "bottleneck", spec, seed=2, head="three")
    config = artifact_config("lora", "f" * 64)
    write_artifact(
        seed / "other-backbone",
        config,
        random_arrays(artifact_config("lora", spec.fingerprint), spec, seed=3),
    )
    (seed / "not-an-artifact").mkdir()
    async with running(seed_dir=seed) as (_app, client):
        listing = (await client.get("/v1/adapters", headers=admin())).json()["adapters"]
        assert [a["task"] for a in listing] == ["demo-sentiment", "demo-topic"]
        r = await client.post("/v1/tasks/demo-topic/predict", json={"inputs": TEXTS})
        assert r.status_code == 200
        assert_outputs_close(
            r.json()["outputs"], Reference(tiny_backbone).outputs(seed / "demo-topic", TEXTS)
        )
        await client.delete("/v1/adapters/demo-topic", headers=admin())
    # A store that already has tasks is not seeded again.
    async with running(seed_dir=seed) as (_app, client):
        listing = (await client.get("/v1/adapters", headers=admin())).json()["adapters"]
        assert [a["task"] for a in listing] == ["demo-sentiment"]


# -- metrics -----------------------------------------------------------------------------------------


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def test_metrics_are_complete_typed_and_task_label_is_bounded(running, artifacts):
    from safetensors.numpy import load_file

    spec = tiny_backbone().spec
    dirs = {n: make_artifact(artifacts, n, "ia3", spec, seed=i) for i, n in enumerate(["t1", "t2", "t3"])}
    one = sum(a.nbytes for a in load_file(dirs["t1"] / "adapter.safetensors").values())
    async with running(metrics_max_tasks=2, host_cache_bytes=one) as (_app, client):
        for n, d in dirs.items():
            assert (await upload(client, n, d)).status_code == 201
        for n in dirs:
            assert (await client.post(f"/v1/tasks/{n}/predict", json={"inputs": TEXTS})).status_code == 200
        assert (await client.post("/v1/tasks/nope/predict", json={"inputs": TEXTS})).status_code == 404
        text = (await client.get("/metrics")).text
        families = _families(text)
        for name, kind in REQUIRED_METRICS.items():
            assert families[name].type == kind, name
        tasks = {s.labels["task"] for s in families["adapterserve_requests"].samples}
        assert tasks == {"t1", "t2", "other"}
        assert _sample(text, "adapterserve_requests_total", task="other", status="404") == 1
        assert _sample(text, "adapterserve_requests_total", task="other", status="200") == 1
        assert _sample(text, "adapterserve_tokens_total") > 0
        assert _sample(text, "adapterserve_uploads_total", result="ok") == 3
        # a host cache of one adapter: each upload evicts the one before, and each predict the one
        # the last load brought (t3 goes when t1 loads), so every predict loads from the store once;
        # each upload put its adapter in a device slot, where the predicts hit
        assert _sample(text, "adapterserve_adapter_loads_total", source="store", result="ok") == 3
        assert _sample(text, "adapterserve_adapter_loads_total", result="error") == 0
        assert _sample(text, "adapterserve_adapter_cache_misses_total") == 3
        assert _sample(text, "adapterserve_adapter_cache_hits_total") == 3
        assert _sample(text, "adapterserve_batch_size_count") >= 3


# -- generation --------------------------------------------------------------------------------------


async def test_a_short_generation_is_not_held_back_by_a_long_one(running, artifacts):
    """Predict's rows join the decoding loop step by step: a short request sent while a long one
    decodes is answered first, and both equal generating each prompt alone."""
    from api_support import reference_generation, tiny_gpt2_backbone

    async with running(backbone=tiny_gpt2_backbone(), max_new_tokens=48) as (app, client):
        spec = app.state.service.backbone.spec
        loop = app.state.service.generations
        config = {"method": "lora", "r": 4, "targets": ["qkv"], "backbone_fingerprint": spec.fingerprint}
        d = write_artifact(artifacts / "gen", config, random_arrays(config, spec, seed=7, scale=2.0))
        assert (await upload(client, "gen", d)).status_code == 201

        def ask(prompt: str, n: int):
            body = {"inputs": [prompt], "parameters": {"max_new_tokens": n}}
            return asyncio.ensure_future(client.post("/v1/tasks/gen/predict", json=body))

        long = ask("the movie was", 48)
        await until(lambda: len(loop.batch) == 1)
        short = await ask("bad", 2)
        assert short.status_code == 200, short.text
        assert not long.done()  # still decoding when the short one was answered
        long = await long
        assert (
            long.json()["outputs"][0]["generated_text"]
            == reference_generation(d, ["the movie was"], max_new_tokens=48)[0]
        )
        assert (
            short.json()["outputs"][0]["generated_text"]
            == reference_generation(d, ["bad"], max_new_tokens=2)[0]
        )


async def test_generative_backbone_returns_generated_text(running, artifacts):
    from api_support import reference_generation, tiny_gpt2_backbone

    async with running(backbone=tiny_gpt2_backbone(), max_new_tokens=6) as (app, client):
        spec = app.state.service.backbone.spec
        info = (await client.get("/v1/backbone")).json()
        assert info["generative"] is True and info["architecture"] == "gpt2"
        config = {"method": "lora", "r": 4, "targets": ["qkv"], "backbone_fingerprint": spec.fingerprint}
        d = write_artifact(artifacts / "gen", config, random_arrays(config, spec, seed=7, scale=2.0))
        assert (await upload(client, "gen", d)).status_code == 201
        prompts = ["the movie was", "i loved it and", "bad"]
        r = await client.post(
            "/v1/tasks/gen/predict", json={"inputs": prompts, "parameters": {"max_new_tokens": 4}}
        )
        assert r.status_code == 200, r.text
        got = [o["generated_text"] for o in r.json()["outputs"]]
        assert got == reference_generation(d, prompts, max_new_tokens=4)
        assert all(got) and len(got[0].split()) == 4, got
        r = await client.post(
            "/v1/tasks/gen/predict", json={"inputs": prompts[:1], "parameters": {"max_new_tokens": 99}}
        )
        assert (
            r.json()["outputs"][0]["generated_text"]
            == reference_generation(d, prompts[:1], max_new_tokens=6)[0]
        )
        r = await client.post("/v1/tasks/gen/predict", json={"inputs": [["a", "b"]]})
        assert r.status_code == 400
        # A head needs an encoder; GPT-2 has none.
        bad = {**config, "head": {"type": "regression"}}
        d = write_artifact(artifacts / "bad", bad, random_arrays(config, spec, seed=7))
        assert (await upload(client, "bad", d)).status_code == 422

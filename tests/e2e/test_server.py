"""End-to-end: `adapterserve serve` as a real uvicorn process on 127.0.0.1, driven over HTTP."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from e2e_support import ADMIN, API, REPO, InProcess, assert_close, write_random_artifact
from helpers import REQUIRED_METRICS
from prometheus_client.parser import text_string_to_metric_families

from service.client import ApiError, Client

pytestmark = pytest.mark.e2e

TEXTS = ["the movie was good", "bad plot and boring ending", "i loved it", "this film is not very fun"]
HEADS = {
    "two": {"type": "classification", "labels": ["negative", "positive"]},
    "three": {"type": "classification", "labels": ["a", "b", "c"]},
    "reg": {"type": "regression"},
}
METHODS = {
    "lora": {"method": "lora", "r": 4, "alpha": 8.0},
    "bottleneck": {"method": "bottleneck", "bottleneck_dim": 8},
    "parallel": {"method": "parallel", "bottleneck_dim": 8, "scaling": 4.0},
    "ia3": {"method": "ia3"},
}


def artifact(root: Path, name: str, method: str, spec, *, head: str = "two", seed: int = 0) -> Path:
    """A random artifact of `method` for the backbone `spec`."""
    config = {**METHODS[method], "backbone_fingerprint": spec.fingerprint, "head": HEADS[head]}
    return write_random_artifact(root / name, config, spec, seed=seed)


def metric_samples(url: str) -> dict:
    """Scrape /metrics and index the families by name."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_tasks_of_several_methods_serve_concurrently_like_in_process(start_server, tiny_model_dir, tmp_path):
    server = start_server(backbone=tiny_model_dir, max_wait_ms=10, api_keys=API, metrics_max_tasks=3)
    ref = InProcess(tiny_model_dir)
    tasks = {
        "sentiment": artifact(tmp_path, "sentiment", "lora", ref.spec, seed=1),
        "topic": artifact(tmp_path, "topic", "bottleneck", ref.spec, head="three", seed=2),
        "score": artifact(tmp_path, "score", "parallel", ref.spec, head="reg", seed=3),
        "toxicity": artifact(tmp_path, "toxicity", "ia3", ref.spec, seed=4),
    }
    with Client(server.url, key=ADMIN) as admin:
        assert admin.backbone()["fingerprint"] == ref.spec.fingerprint
        for name, directory in tasks.items():
            assert admin.upload(name, directory)["version"] == 1
        assert {a["task"] for a in admin.adapters()} == set(tasks)

    def ask(i: int) -> tuple[str, dict]:
        name = list(tasks)[i % len(tasks)]
        inputs = TEXTS[i % 4 :] + TEXTS[: i % 4]
        with Client(server.url, key=API) as client:
            return name, client.predict(name, inputs, return_all_scores=True)

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(32)))
    for i, (name, body) in enumerate(answers):
        assert body["task"] == name and body["version"] == 1
        inputs = TEXTS[i % 4 :] + TEXTS[: i % 4]
        assert_close(body["outputs"], ref.outputs(tasks[name], inputs, all_scores=True))

    families = metric_samples(server.url)
    for name, kind in REQUIRED_METRICS.items():
        assert families[name].type == kind, name
    labels = {s.labels["task"] for s in families["adapterserve_requests"].samples}
    # Four tasks, a cap of three: the fourth is counted as `other`.
    assert len(labels) == 4 and "other" in labels and labels - {"other"} <= set(tasks)
    total = sum(s.value for s in families["adapterserve_requests"].samples if s.name.endswith("_total"))
    assert total == 32
    resident = next(s.value for s in families["adapterserve_adapters_resident"].samples)
    assert resident == 4


def test_status_codes_over_http(start_server, tiny_model_dir, tmp_path):
    server = start_server(backbone=tiny_model_dir, api_keys=API, max_upload_bytes=64 * 1024)
    ref_spec = InProcess(tiny_model_dir).spec
    d = artifact(tmp_path, "t", "lora", ref_spec, seed=1)
    with Client(server.url) as anonymous, pytest.raises(ApiError) as err:
        anonymous.upload("t", d)
    assert err.value.status == 401
    with Client(server.url, key=API) as inference, pytest.raises(ApiError) as err:
        inference.upload("t", d)
    assert err.value.status == 403
    with Client(server.url, key=ADMIN) as admin:
        admin.upload("t", d)
        with pytest.raises(ApiError) as err:
            admin.predict("missing", ["x"])
        assert err.value.status == 404
        files = {
            "config": ("c", (d / "adapter_config.json").read_bytes()),
            "weights": ("w", b"\x80\x04" + b"0" * 99),
        }
        r = admin.http.post("/v1/adapters/t", files=files)
        assert r.status_code == 415 and r.json()["error"]["type"] == "not_safetensors"
        files = {
            "config": ("c", (d / "adapter_config.json").read_bytes()),
            "weights": ("w", b"\0" * (200 * 1024)),
        }
        r = admin.http.post("/v1/adapters/t", files=files)
        assert r.status_code == 413
        assert admin.adapter("t")["versions"][0]["version"] == 1 and len(admin.adapter("t")["versions"]) == 1
    with Client(server.url) as anonymous, pytest.raises(ApiError) as err:
        anonymous.predict("t", ["fun"])
    assert err.value.status == 401


def test_cli_upload(start_server, tiny_model_dir, tmp_path):
    server = start_server(backbone=tiny_model_dir)
    d = artifact(tmp_path, "t", "ia3", InProcess(tiny_model_dir).spec, seed=1)
    cmd = [sys.executable, "-m", "service.cli", "upload", "t", str(d), "--url", server.url]
    done = subprocess.run([*cmd, "--key", ADMIN], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert '"version": 1' in done.stdout and '"method": "ia3"' in done.stdout
    done = subprocess.run([*cmd, "--key", API], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "401" in done.stderr


def test_connections_past_max_connections_answer_503_until_some_close(start_server, tiny_model_dir):
    """Idle connections count against the limit: the next request is refused unread, and served once they go."""
    server = start_server(backbone=tiny_model_dir, max_connections=3)
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
    try:
        assert httpx.get(f"{server.url}/livez", timeout=10).status_code == 503
    finally:
        for sock in idle:
            sock.close()
    # the server notices the closed sockets asynchronously; it is another process, so poll
    deadline = time.monotonic() + 10
    while (status := httpx.get(f"{server.url}/livez", timeout=10).status_code) != 200:
        assert time.monotonic() < deadline, f"still {status} after the idle connections closed"
        time.sleep(0.05)


def test_hot_swap_under_concurrent_load(start_server, tiny_model_dir, tmp_path):
    server = start_server(backbone=tiny_model_dir, max_wait_ms=2)
    ref = InProcess(tiny_model_dir)
    v1 = artifact(tmp_path, "v1", "lora", ref.spec, seed=1)
    v2 = artifact(tmp_path, "v2", "bottleneck", ref.spec, seed=2)
    expected = {1: ref.outputs(v1, TEXTS), 2: ref.outputs(v2, TEXTS)}
    with Client(server.url, key=ADMIN) as admin:
        admin.upload("t", v1)
    stop = threading.Event()
    answers: list[tuple[int, str | None, dict]] = []
    lock = threading.Lock()
    started = threading.Barrier(5)

    def hammer() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            started.wait(30)
            for _ in range(400):
                if stop.is_set():
                    return
                r = http.post("/v1/tasks/t/predict", json={"inputs": TEXTS})
                with lock:
                    answers.append((r.status_code, r.headers.get("x-adapter-version"), r.json()))

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    for w in workers:
        w.start()
    started.wait(30)
    with Client(server.url, key=ADMIN) as admin:
        admin.upload("t", v2)
        # Some requests after the swap finished too.
        for _ in range(20):
            admin.predict("t", TEXTS)
    stop.set()
    for w in workers:
        w.join(60)
    assert answers and {status for status, _, _ in answers} == {200}
    for _, header, body in answers:
        assert header == str(body["version"])
        assert_close(body["outputs"], expected[body["version"]])
    assert {body["version"] for _, _, body in answers} <= {1, 2}
    assert answers[-1][2]["version"] == 2


@pytest.mark.minilm
def test_minilm_predicts_like_in_process_and_sigterm_drains(start_server, tmp_path):
    server = start_server(backbone=None, max_batch_size=4, max_wait_ms=1)
    ref = InProcess(None)
    lora = artifact(tmp_path, "lora", "lora", ref.spec, seed=1)
    bottleneck = artifact(tmp_path, "bottleneck", "bottleneck", ref.spec, head="three", seed=2)
    with Client(server.url, key=ADMIN) as admin:
        info = admin.backbone()
        assert info["fingerprint"] == ref.spec.fingerprint and info["hidden_size"] == 384
        admin.upload("lora", lora)
        admin.upload("bottleneck", bottleneck)
        assert_close(admin.predict("lora", TEXTS)["outputs"], ref.outputs(lora, TEXTS))
        assert_close(admin.predict("bottleneck", TEXTS)["outputs"], ref.outputs(bottleneck, TEXTS))

    # Enough work in flight that the drain has something to wait for.
    inputs = [f"{t} and the story was {w}" for t in TEXTS for w in ("great", "awful", "long", "fun")] * 3
    results: list[httpx.Response | Exception] = []

    def one(task: str) -> None:
        try:
            results.append(
                httpx.post(f"{server.url}/v1/tasks/{task}/predict", json={"inputs": inputs}, timeout=120)
            )
        except httpx.HTTPError as exc:
            results.append(exc)

    threads = [threading.Thread(target=one, args=(t,)) for t in ("lora", "bottleneck") * 3]
    for t in threads:
        t.start()
    in_flight = 0.0
    end = time.monotonic() + 60.0
    while time.monotonic() < end:
        families = metric_samples(server.url)
        in_flight = next(s.value for s in families["adapterserve_requests_in_flight"].samples)
        if in_flight >= len(threads):
            break
    assert in_flight >= 1
    server.proc.send_signal(signal.SIGTERM)
    r = httpx.get(f"{server.url}/readyz", timeout=10)
    assert r.status_code == 503 and r.json() == {"status": "draining"}
    r = httpx.post(f"{server.url}/v1/tasks/lora/predict", json={"inputs": ["x"]}, timeout=10)
    assert r.status_code == 503
    # one SIGTERM only: a second one would force the exit without draining
    assert server.proc.wait(90) == 0, server.log()
    for t in threads:
        t.join(10)
    assert len(results) == len(threads)
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results), (
        results,
        server.log(),
    )

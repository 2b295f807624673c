"""The Ray Serve application on a local Ray cluster: 2 engine replicas, task-affine routing, one S3 store."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from e2e_support import ADMIN, InProcess, assert_close, free_port, write_random_artifact
from store_backends import MotoS3, moto_s3  # noqa: F401  (a fixture)

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["the movie was good", "bad plot and boring ending"]
HEAD = {"type": "classification", "labels": ["negative", "positive"]}


def _sample(metrics: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture(scope="module")
def cluster(moto_s3: MotoS3, tiny_model_dir: Path):  # noqa: F811
    """A local Ray cluster on 127.0.0.1 serving the application with 2 replicas over one S3 bucket."""
    from service.ray_app import RaySettings, build_app

    # Serve's controller kills a proxy that has not answered its readiness check within 5 s three
    # times; a proxy starting beside other CPU-bound work on 2 cores takes longer. The controller
    # and proxy inherit this process's environment through ray.init.
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")

    bucket = moto_s3.new_bucket()
    env = {
        "ADAPTERSERVE_BACKBONE": str(tiny_model_dir),
        "ADAPTERSERVE_STORE": f"s3://{bucket}/ray",
        "ADAPTERSERVE_STORE_POLL_S": "0.3",
        "ADAPTERSERVE_ADMIN_KEYS": ADMIN,
        "ADAPTERSERVE_SEED_DIR": "",
        "ADAPTERSERVE_SLOTS": "4",
        "ADAPTERSERVE_MAX_WAIT_MS": "1",
        "ADAPTERSERVE_COMPUTE_THREADS": "1",
        "AWS_ENDPOINT_URL": moto_s3.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    port = free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
        _node_ip_address="127.0.0.1",
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = RaySettings(replicas=2, cpus_per_replica=0.5)
        serve.run(build_app(settings, env=env), name="adapterserve", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + 120
            while _sample(client.get("/metrics").text, "adapterserve_ready") < 2:
                assert time.monotonic() < deadline, "the replicas never became ready"
                time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        patch.undo()


def test_routing_affinity_and_an_upload_served_by_both_replicas(
    cluster: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    ref = InProcess(tiny_model_dir)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    dirs = {}
    with httpx.Client(base_url=cluster, timeout=60) as client:
        for i, task in enumerate(("alpha", "beta")):
            config = {
                "method": "ia3",
                "backbone_fingerprint": ref.spec.fingerprint,
                "head": HEAD,
            }
            dirs[task] = write_random_artifact(tmp_path / task, config, ref.spec, seed=i + 1)
            files = {
                "config": (
                    "adapter_config.json",
                    (dirs[task] / "adapter_config.json").read_bytes(),
                    "application/json",
                ),
                "weights": (
                    "adapter.safetensors",
                    (dirs[task] / "adapter.safetensors").read_bytes(),
                    "application/octet-stream",
                ),
            }
            r = client.post(f"/v1/adapters/{task}", files=files, headers=admin)
            assert r.status_code == 201, r.text
        # The upload went to one replica; the other serves it once its poll of the store sees it.
        want = {task: ref.outputs(d, TEXTS) for task, d in dirs.items()}
        seen: dict[str, set[str]] = {"alpha": set(), "beta": set()}
        deadline = time.monotonic() + 30
        for task in ("alpha", "beta"):
            while True:
                r = client.post(f"/v1/tasks/{task}/predict", json={"inputs": TEXTS})
                if r.status_code == 200:
                    break
                assert r.status_code == 404 and time.monotonic() < deadline, r.text
                time.sleep(0.2)
        for task in ("alpha", "beta"):
            for _ in range(12):
                r = client.post(f"/v1/tasks/{task}/predict", json={"inputs": TEXTS})
                assert r.status_code == 200, r.text
                assert_close(r.json()["outputs"], want[task])
                seen[task].add(r.headers["x-adapterserve-replica"])
        # Affinity: every request of a task landed on the one replica where it is resident.
        assert all(len(replicas) == 1 for replicas in seen.values()), seen
        time.sleep(1.5)  # one metrics push
        metrics = client.get("/metrics").text
        for task, replicas in seen.items():
            (home,) = replicas
            assert _sample(metrics, "adapterserve_requests_total", task=task, replica=home) >= 12
        # Both replicas answer for the upload: sent with no model id, Ray spreads requests over both.
        handle = serve.get_deployment_handle("Engine", app_name="adapterserve")
        answered: set[str] = set()
        body = b'{"inputs": ["the movie was good", "bad plot and boring ending"]}'
        for _ in range(40):
            out = handle.remote(
                {
                    "method": "POST",
                    "path": "/v1/tasks/alpha/predict",
                    "query": [],
                    "headers": [("content-type", "application/json")],
                    "body": body,
                }
            ).result(timeout_s=60)
            assert out["status"] == 200, out
            import json

            assert_close(json.loads(out["body"])["outputs"], want["alpha"])
            answered.add(dict(out["headers"])["x-adapterserve-replica"])
            if len(answered) == 2:
                break
        assert len(answered) == 2, answered
        # Each task was answered by its home: the first replica of its rendezvous order over both.
        from service.ray_router import home_order

        for task, replicas in seen.items():
            assert replicas == {home_order(task, answered)[0]}, (task, replicas, answered)


def test_a_replica_killed_under_load_loses_no_request(
    cluster: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    ref = InProcess(tiny_model_dir)
    config = {"method": "ia3", "backbone_fingerprint": ref.spec.fingerprint, "head": HEAD}
    d = write_random_artifact(tmp_path / "gamma", config, ref.spec, seed=7)
    want = ref.outputs(d, TEXTS)
    files = {
        "config": ("adapter_config.json", (d / "adapter_config.json").read_bytes(), "application/json"),
        "weights": (
            "adapter.safetensors",
            (d / "adapter.safetensors").read_bytes(),
            "application/octet-stream",
        ),
    }
    with httpx.Client(base_url=cluster, timeout=60) as client:
        r = client.post("/v1/adapters/gamma", files=files, headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 30
        while (r := client.post("/v1/tasks/gamma/predict", json={"inputs": TEXTS})).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        home = r.headers["x-adapterserve-replica"]
        (victim,) = [
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "Engine" in a["name"] and home in a["name"]
        ]
        # Four clients keep requests in flight while the replica where gamma is resident is killed.
        results: list[httpx.Response] = []

        def client_loop() -> None:
            with httpx.Client(base_url=cluster, timeout=60) as own:
                for _ in range(12):
                    results.append(own.post("/v1/tasks/gamma/predict", json={"inputs": TEXTS}))

        threads = [threading.Thread(target=client_loop) for _ in range(4)]
        for t in threads:
            t.start()
        while len(results) < 4:
            time.sleep(0.01)
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        for t in threads:
            t.join()
        statuses = [r.status_code for r in results]
        for r in results:
            if r.status_code == 200:
                assert_close(r.json()["outputs"], want)
            else:  # never a bare 500: a clear 503 the client can retry
                assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
                assert r.json()["error"]["type"] == "replica_unavailable"
        r = client.post("/v1/tasks/gamma/predict", json={"inputs": TEXTS})
        statuses.append(r.status_code)
        assert len(statuses) == 49 and statuses[-1] == 200, statuses  # the survivor took the task over
        assert r.headers["x-adapterserve-replica"] != home

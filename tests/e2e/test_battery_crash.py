"""Battery, end to end: SIGKILL at each step of an upload; SIGTERM and a disconnect under concurrent clients."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from battery_server import HookedServer
from e2e_support import ADMIN, InProcess, write_random_artifact

from store.local import PUT_STEPS, LocalStore

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {ADMIN}"}
TEXTS = ["the movie was good", "bad plot and boring ending"]
# The last step before the version becomes visible (a complete, fsynced but unnamed temp dir) and one
# after it (the pointer replaced but not yet synced); the store's unit tests kill at every step.
KILL_STEPS = ("tmp_synced", "pointer_replaced")


@pytest.fixture
def servers():
    """Every hooked server started by a test is stopped at teardown."""
    started: list[HookedServer] = []
    yield started
    for server in started:
        server.close()


def _artifact(root: Path, name: str, spec, seed: int) -> tuple[Path, str]:
    config = {
        "method": "lora",
        "r": 4,
        "alpha": 8.0,
        "backbone_fingerprint": spec.fingerprint,
        "head": {"type": "classification", "labels": ["negative", "positive"]},
    }
    d = write_random_artifact(root / name, config, spec, seed=seed)
    return d, hashlib.sha256((d / "adapter.safetensors").read_bytes()).hexdigest()


def _files(d: Path) -> dict:
    return {
        "config": ("adapter_config.json", (d / "adapter_config.json").read_bytes()),
        "weights": ("adapter.safetensors", (d / "adapter.safetensors").read_bytes()),
    }


def _verify(url: str, store: Path, known: set[str]) -> dict[int, str]:
    """Every stored version is complete: its hash is one we sent, on disk too, and it loads and serves."""
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    tasks = httpx.get(f"{url}/v1/adapters", headers=AUTH, timeout=10).json()["adapters"]
    assert [a["task"] for a in tasks] == ["t"]
    detail = httpx.get(f"{url}/v1/adapters/t", headers=AUTH, timeout=10).json()
    versions = {v["version"]: v["sha256"] for v in detail["versions"]}
    assert versions and detail["current_version"] in versions
    for version, sha in versions.items():
        assert sha in known, (version, sha)
        on_disk = store / "tasks" / "t" / f"v{version}" / "adapter.safetensors"
        assert hashlib.sha256(on_disk.read_bytes()).hexdigest() == sha
    # Loading re-checks both files against their manifest; the current version serves.
    r = httpx.post(f"{url}/v1/tasks/t/predict", json={"inputs": TEXTS}, timeout=30)
    assert r.status_code == 200 and r.json()["version"] == detail["current_version"], r.text
    # Recovery left no temp or trash entries behind.
    assert not [p for p in (store / "tasks").rglob("*") if p.name.startswith((".tmp-", ".trash-"))]
    return versions


def test_sigkill_at_each_step_of_an_upload_leaves_every_version_absent_or_complete(
    servers, tiny_model_dir, tmp_path
):
    spec = InProcess(tiny_model_dir).spec
    store, log = tmp_path / "store", tmp_path / "server.log"

    def start(**hooks: str) -> HookedServer:
        server = HookedServer(store=store, backbone=tiny_model_dir, log=log, hooks=hooks)
        servers.append(server)
        return server.wait_ready()

    first, sha = _artifact(tmp_path, "v0", spec, seed=0)
    known = {sha}
    # Version 1 goes straight into the store: one server start less (each costs seconds).
    config = (first / "adapter_config.json").read_bytes()
    LocalStore(store).put_version(
        "tasks", "t", config_bytes=config, weights_src=first / "adapter.safetensors"
    )
    for i, step in enumerate(KILL_STEPS, start=1):
        server = start(BATTERY_CRASH_AT=step)
        _verify(server.url, store, known)
        d, sha = _artifact(tmp_path, f"v{i}", spec, seed=i)
        known.add(sha)
        with pytest.raises(httpx.TransportError):
            httpx.post(f"{server.url}/v1/adapters/t", files=_files(d), headers=AUTH, timeout=60)
        assert server.proc.wait(30) == -signal.SIGKILL, server.log()
        server.close()
    # A kill while the body is still arriving, from outside the process.
    server = start()
    before_partial = _verify(server.url, store, known)
    d, _ = _artifact(tmp_path, "partial", spec, seed=99)
    body_started, finished = threading.Event(), threading.Event()

    def slow_body():
        yield b'--b\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n'
        yield (d / "adapter.safetensors").read_bytes()[:64]
        body_started.set()
        finished.wait(30)  # the server dies meanwhile; the rest never comes

    def post() -> None:
        headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=b"}
        with contextlib.suppress(httpx.TransportError):
            httpx.post(f"{server.url}/v1/adapters/t", content=slow_body(), headers=headers, timeout=60)

    poster = threading.Thread(target=post, daemon=True)
    poster.start()
    assert body_started.wait(30)
    server.proc.send_signal(signal.SIGKILL)
    assert server.proc.wait(30) == -signal.SIGKILL
    finished.set()
    server.close()
    # After all the kills: every version is complete, and the store takes the next upload.
    server = start()
    versions = _verify(server.url, store, known)
    assert versions == before_partial
    # Kills from `renamed` on left their version in place (complete, as checked); earlier ones left nothing.
    visible = [s for s in KILL_STEPS if PUT_STEPS.index(s) >= PUT_STEPS.index("renamed")]
    assert sorted(versions) == list(range(1, 2 + len(visible)))
    d, sha = _artifact(tmp_path, "after", spec, seed=50)
    r = httpx.post(f"{server.url}/v1/adapters/t", files=_files(d), headers=AUTH, timeout=30)
    assert r.status_code == 201 and r.json()["sha256"] == sha and r.json()["version"] > max(versions)


def _metric(url: str, name: str, labels: str) -> float:
    """Sum of the samples of `name` whose label text contains `labels`."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        head, _, value = line.rpartition(" ")
        if (head == name or head.startswith(name + "{")) and labels in head:
            total += float(value)
    return total


def test_sigterm_under_ten_clients_drains_and_exits_zero(servers, tiny_model_dir, tmp_path):
    spec = InProcess(tiny_model_dir).spec
    gate = tmp_path / "gate"
    server = HookedServer(
        store=tmp_path / "store",
        backbone=tiny_model_dir,
        log=tmp_path / "server.log",
        hooks={"BATTERY_ENGINE_GATE": str(gate)},
        drain_timeout_s=120,
    )
    servers.append(server)
    server.wait_ready()
    d, _ = _artifact(tmp_path, "t", spec, seed=1)
    assert (
        httpx.post(f"{server.url}/v1/adapters/t", files=_files(d), headers=AUTH, timeout=30).status_code
        == 201
    )
    results: list[httpx.Response | Exception] = []

    def client(i: int) -> None:
        try:
            results.append(
                httpx.post(f"{server.url}/v1/tasks/t/predict", json={"inputs": TEXTS[i % 2 :]}, timeout=60)
            )
        except httpx.HTTPError as exc:
            results.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    in_flight = 0.0
    while in_flight < 10 and time.monotonic() < deadline:
        in_flight = _metric(server.url, "adapterserve_requests_in_flight", "")
    assert in_flight == 10
    # A client that gives up: its connection closes, the server cancels it and drops its queued rows.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/tasks/t/predict", json={"inputs": TEXTS}, timeout=1.0)
    while (
        time.monotonic() < deadline
        and _metric(server.url, "adapterserve_rejected_total", 'reason="cancelled"') < 1
    ):
        pass
    assert _metric(server.url, "adapterserve_rejected_total", 'reason="cancelled"') == 1
    assert _metric(server.url, "adapterserve_requests_total", 'status="499"') == 1
    assert _metric(server.url, "adapterserve_requests_in_flight", "") == 10
    server.proc.send_signal(signal.SIGTERM)  # exactly one: a second one forces the exit
    r = httpx.get(f"{server.url}/readyz", timeout=10)
    assert r.status_code == 503 and r.json() == {"status": "draining"}
    r = httpx.post(f"{server.url}/v1/tasks/t/predict", json={"inputs": TEXTS}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["type"] == "draining"
    assert server.proc.poll() is None and not results
    gate.touch()
    assert server.proc.wait(60) == 0, server.log()
    for t in threads:
        t.join(30)
    assert len(results) == 10
    # all ten answered: the drain waited for the work, not for its timeout (which fails running batches)
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results), results
    assert sorted(len(r.json()["outputs"]) for r in results) == [1] * 5 + [2] * 5

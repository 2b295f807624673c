"""The Python client: every route against a real server, and its retries against a scripted local server."""

from __future__ import annotations

import asyncio
import email.utils
import http.server
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from e2e_support import ADMIN, API, InProcess, assert_close, free_port, write_random_artifact

from service import client as client_module
from service import client_types
from service.client import (
    AdapterDetail,
    AsyncClient,
    AuthenticationError,
    BackboneInfo,
    BadRequestError,
    Client,
    ConflictError,
    ConnectionFailed,
    NotFoundError,
    PermissionDeniedError,
    PredictResult,
    RateLimitedError,
    Retry,
    ServerError,
    UnavailableError,
    UploadResult,
)
from service.client_types import retry_after_of
from store.safetensors_io import SafetensorsLimits, load_arrays

pytestmark = pytest.mark.e2e

TEXTS = ["the movie was good", "bad plot and boring ending", "i loved it"]
HEAD = {"type": "classification", "labels": ["negative", "positive"]}


def artifact(root: Path, name: str, spec, *, method: dict, seed: int) -> Path:
    """A random artifact directory for the backbone `spec`."""
    config = {**method, "backbone_fingerprint": spec.fingerprint, "head": HEAD}
    return write_random_artifact(root / name, config, spec, seed=seed)


def in_memory(directory: Path) -> tuple[dict, dict]:
    """The config and tensors of an artifact directory, as a caller holding them in memory would."""
    config = json.loads((directory / "adapter_config.json").read_text())
    return config, load_arrays(directory / "adapter.safetensors", limits=SafetensorsLimits())


def test_every_route_on_a_real_server(start_server, tiny_model_dir, tmp_path):
    server = start_server(backbone=tiny_model_dir, api_keys=API)
    ref = InProcess(tiny_model_dir)
    v1 = artifact(tmp_path, "v1", ref.spec, method={"method": "lora", "r": 4, "alpha": 8.0}, seed=1)
    v2 = artifact(tmp_path, "v2", ref.spec, method={"method": "bottleneck", "bottleneck_dim": 8}, seed=2)
    other = artifact(tmp_path, "other", ref.spec, method={"method": "ia3"}, seed=3)
    with Client(server.url, key=ADMIN) as admin, Client(server.url, key=API) as user:
        assert admin.livez().ok and admin.readyz().ok
        info = admin.backbone()
        assert isinstance(info, BackboneInfo) and info.fingerprint == ref.spec.fingerprint
        assert info.device == "cpu" and info.hidden_size == 32

        sent: list[tuple[int, int]] = []
        up = admin.upload("sent", v1, progress=lambda done, total: sent.append((done, total)))
        size = (v1 / "adapter.safetensors").stat().st_size
        assert isinstance(up, UploadResult) and (up.version, up.current, up.method) == (1, True, "lora")
        assert sent[-1] == (size, size) and up["version"] == 1  # mapping access, as the dict answers had

        config, arrays = in_memory(v2)
        up = admin.upload_tensors("sent", config=config, tensors=arrays, activate=False)
        assert (up.version, up.current, up.method) == (2, False, "bottleneck")
        with pytest.raises(ConflictError) as err:
            admin.upload_tensors("sent", config=config, tensors=arrays, version=2)
        assert err.value.status == 409
        config, arrays = in_memory(other)
        # torch tensors, and numpy arrays among them
        mixed = {k: torch.from_numpy(v) if i % 2 else v for i, (k, v) in enumerate(arrays.items())}
        up = admin.upload_tensors("other", config=config, tensors=mixed)
        assert (up.version, up.method) == (1, "ia3")

        detail = admin.adapter("sent")
        assert isinstance(detail, AdapterDetail) and detail.current_version == 1
        assert [v.version for v in detail.versions] == [1, 2]
        answer = user.predict("sent", TEXTS, return_all_scores=True)
        assert isinstance(answer, PredictResult) and answer.version == 1
        assert_close(answer.outputs, ref.outputs(v1, TEXTS, all_scores=True))

        assert admin.set_current("sent", 2).current_version == 2
        answer = user.predict("sent", TEXTS)
        assert answer.version == 2
        assert_close(answer.outputs, ref.outputs(v2, TEXTS))

        assert admin.pin("sent").residency.pinned is True
        assert admin.pin("sent", pinned=False).residency.pinned is False
        assert {a.task: a.current_version for a in admin.adapters()} == {"sent": 2, "other": 1}
        admin.delete("sent", 1)
        assert [v.version for v in admin.adapter("sent").versions] == [2]
        admin.delete("other")
        with pytest.raises(NotFoundError) as err:
            admin.adapter("other")
        assert (err.value.status, err.value.kind) == (404, "not_found")
        assert admin.hypernetworks() == []

        with pytest.raises(PermissionDeniedError):
            user.adapters()
        with Client(server.url) as anonymous, pytest.raises(AuthenticationError):
            anonymous.adapters()
        with pytest.raises(BadRequestError) as err:
            user.predict("sent", [])
        assert err.value.status == 422 and "inputs" in err.value.message
        assert "adapterserve_requests_total" in admin.metrics()

    asyncio.run(_async_round_trip(server.url, v1=v1, expected=ref.outputs(v1, TEXTS)))


async def _async_round_trip(url: str, *, v1: Path, expected: list[dict]) -> None:
    async with AsyncClient(url, key=ADMIN) as admin:
        assert (await admin.readyz()).ok
        up = await admin.upload("async", v1)
        assert (up.task, up.version) == ("async", 1)
        answers = await asyncio.gather(*(admin.predict("async", TEXTS) for _ in range(4)))
        for answer in answers:
            assert answer.version == 1
            assert_close(answer.outputs, expected)
        assert "async" in {a.task for a in await admin.adapters()}
        with pytest.raises(NotFoundError):
            await admin.predict("missing", TEXTS)


# -- retries, against a scripted local HTTP server -------------------------------------------------

PREDICTED = {"task": "t", "version": 3, "outputs": [{"label": "positive", "score": 0.9}]}
UPLOADED = {
    "task": "t",
    "version": 1,
    "sha256": "0" * 64,
    "method": "lora",
    "num_parameters": 10,
    "size_bytes": 100,
    "current": True,
}


class Scripted:
    """A real HTTP server on 127.0.0.1 that answers from a script and records what it received."""

    def __init__(self, script: list[tuple[int, dict[str, str], object]]) -> None:
        self.script = list(script)
        self.received: list[tuple[float, str, bytes]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                owner.received.append((time.monotonic(), self.path, body))
                status, headers, payload = owner.script.pop(0) if owner.script else (500, {}, "script ended")
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    """Factory of scripted servers, all closed at teardown."""
    servers: list[Scripted] = []

    def make(*script: tuple[int, dict[str, str], object]) -> Scripted:
        servers.append(Scripted(list(script)))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _queue_full(retry_after: str | None) -> tuple[int, dict[str, str], object]:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return 429, headers, {"error": {"type": "queue_full", "message": "the queue is full"}}


class FakeTime:
    """The client's `time` module with a clock that moves only when the client sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time(monkeypatch) -> FakeTime:
    """Retry waits are recorded, not slept: exact delays, and no test time spent waiting."""
    fake = FakeTime()
    monkeypatch.setattr(client_module, "time", fake)
    return fake


def test_429_is_retried_after_the_servers_retry_after(scripted, fake_time):
    server = scripted(_queue_full("1"), (200, {}, PREDICTED))
    with Client(server.url, retry=Retry(attempts=3, budget_s=10)) as client:
        answer = client.predict("t", ["x"])
    assert answer.version == 3 and answer.outputs[0].label == "positive"
    assert len(server.received) == 2 and fake_time.slept == [1.0]


def test_a_wait_past_the_budget_is_not_started(scripted, fake_time):
    server = scripted((503, {"Retry-After": "30"}, {"error": {"type": "draining", "message": "draining"}}))
    with (
        Client(server.url, retry=Retry(attempts=5, budget_s=5)) as client,
        pytest.raises(UnavailableError) as err,
    ):
        client.predict("t", ["x"])
    assert fake_time.slept == [] and len(server.received) == 1
    assert (err.value.status, err.value.kind, err.value.retry_after) == (503, "draining", 30.0)


def test_the_budget_counts_time_already_spent(scripted, fake_time):
    """The first 3 s wait fits a 5 s budget; the second would end past it, so it is not started."""
    server = scripted(_queue_full("3"), _queue_full("3"), (200, {}, PREDICTED))
    with Client(server.url, retry=Retry(attempts=5, budget_s=5)) as client, pytest.raises(RateLimitedError):
        client.predict("t", ["x"])
    assert fake_time.slept == [3.0] and len(server.received) == 2


def test_attempts_are_bounded_and_backoff_grows(scripted, fake_time):
    server = scripted(*[_queue_full(None)] * 5)
    retry = Retry(attempts=3, budget_s=10, backoff_s=0.05)
    with Client(server.url, retry=retry) as client, pytest.raises(RateLimitedError) as err:
        client.predict("t", ["x"])
    assert err.value.status == 429 and len(server.received) == 3
    assert fake_time.slept == [0.05, 0.1]


def test_a_retried_upload_sends_the_whole_body_again(scripted, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"method": "lora"}')
    weights = bytes(range(256)) * 1024
    (tmp_path / "adapter.safetensors").write_bytes(weights)
    server = scripted(_queue_full("0"), (201, {}, UPLOADED))
    sent: list[tuple[int, int]] = []
    with Client(server.url) as client:
        up = client.upload("t", tmp_path, activate=False, progress=lambda d, t: sent.append((d, t)))
    assert up.version == 1
    (_, path1, body1), (_, path2, body2) = server.received
    assert path1 == path2 == "/v1/adapters/t?activate=false"
    # the same parts each time; only the multipart boundary (the first line) differs
    strip = [body.replace(body.split(b"\r\n", 1)[0], b"") for body in (body1, body2)]
    assert strip[0] == strip[1] and weights in body1 and b'{"method": "lora"}' in body1
    assert sent[-1] == (len(weights), len(weights))


def test_other_errors_are_not_retried_and_raise_by_status(scripted):
    server = scripted(
        (404, {}, {"error": {"type": "not_found", "message": "unknown task 'x'"}}),
        (500, {}, "<html>proxy error</html>"),
    )
    with Client(server.url) as client:
        with pytest.raises(NotFoundError) as err:
            client.adapter("x")
        assert str(err.value) == "404 not_found: unknown task 'x'"
        with pytest.raises(ServerError) as err:
            client.adapter("x")
        assert (err.value.status, err.value.kind) == (500, "http_error")
    assert len(server.received) == 2


def test_a_refused_connection_is_retried_then_raises():
    retry = Retry(attempts=3, backoff_s=0.01)
    with Client(f"http://127.0.0.1:{free_port()}", retry=retry) as client, pytest.raises(ConnectionFailed):
        client.livez()


def test_retry_after_as_an_http_date(monkeypatch):
    now = 1_700_000_000.0
    monkeypatch.setattr(client_types.time, "time", lambda: now)
    when = email.utils.formatdate(now + 20, usegmt=True)
    assert retry_after_of(httpx.Response(429, headers={"Retry-After": when})) == 20.0
    past = email.utils.formatdate(now - 5, usegmt=True)
    assert retry_after_of(httpx.Response(429, headers={"Retry-After": past})) == 0.0
    assert retry_after_of(httpx.Response(429, headers={"Retry-After": "soon"})) is None


@pytest.mark.asyncio
async def test_async_client_retries_like_the_sync_one(scripted):
    server = scripted(
        _queue_full("0"),
        (503, {}, {"error": {"type": "not_ready", "message": "warming"}}),
        (200, {}, PREDICTED),
    )
    async with AsyncClient(server.url, retry=Retry(attempts=3, backoff_s=0.01)) as client:
        answer = await client.predict("t", ["x"])
    assert answer.version == 3 and len(server.received) == 3

"""End-to-end: refused uploads against a real server, as hostile or careless clients send them.

A body over the limit is answered 413 in the API's error shape with `Connection: close`, and the
client reads that answer (no connection reset), whether it sends the whole body first (httpx) or
reads while it is still sending (a raw socket). And a store is unchanged by anything it refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
from pathlib import Path

import httpx
import pytest
from e2e_support import ADMIN, InProcess, Server, write_random_artifact

pytestmark = pytest.mark.e2e

LIMIT = 1 << 20
OVER = 8 * LIMIT
CHUNK = 64 << 10


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The server's directory: its store, its spool directory for uploads, its log."""
    root = tmp_path_factory.mktemp("refusals")
    (root / "spool").mkdir()
    return root


@pytest.fixture(scope="module")
def server(root, tiny_model_dir):
    """One server for the module: every test here is refused, so none changes what another sees."""
    server = Server(root, backbone=tiny_model_dir, max_upload_bytes=LIMIT, upload_tmp_dir=root / "spool")
    try:
        yield server.wait_ready()
    finally:
        server.kill()


def assert_too_large(r: httpx.Response) -> None:
    assert r.status_code == 413, r.text
    assert r.headers["connection"] == "close"
    error = r.json()["error"]
    assert error["type"] == "payload_too_large" and str(LIMIT) in error["message"]


def multipart_body(boundary: str, weights_bytes: int) -> bytes:
    """A multipart upload whose weights part is `weights_bytes` of zeros."""
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="config"; filename="c.json"\r\n'
        f'Content-Type: application/json\r\n\r\n{{"method": "lora"}}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="weights"; filename="w.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + bytes(weights_bytes) + f"\r\n--{boundary}--\r\n".encode()


def test_a_body_over_the_limit_is_a_readable_413_for_a_client_that_sends_it_all(server):
    boundary = "b0undary"
    body = multipart_body(boundary, OVER)
    headers = {**admin(), "Content-Type": f"multipart/form-data; boundary={boundary}"}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        # Declared too large: refused before a byte of the body is read.
        assert_too_large(client.post("/v1/adapters/big", content=body, headers=headers))

        # Chunked, so the size is only known once the limit is crossed mid-stream.
        def chunks():
            for i in range(0, len(body), CHUNK):
                yield body[i : i + CHUNK]

        assert_too_large(client.post("/v1/adapters/big", content=chunks(), headers=headers))
        # The hypernetwork upload shares the path.
        assert_too_large(client.post("/v1/hypernetworks/big", content=body, headers=headers))


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def request_head(port: int, *, length: int, close: bool) -> bytes:
    """The head of a multipart upload request of `length` body bytes."""
    return (
        f"POST /v1/adapters/big HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {ADMIN}\r\n"
        f"Content-Type: multipart/form-data; boundary=b0undary\r\nContent-Length: {length}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    ).encode()


@pytest.mark.parametrize("close", [True, False], ids=["client-closes", "keep-alive"])
def test_a_client_that_sends_it_all_then_reads_gets_the_413_and_a_clean_close(server, close):
    # Before answers lingered, a client that asked for Connection: close got a reset here: the server
    # closed with the body unread, and the kernel's RST threw the 413 away.
    body = multipart_body("b0undary", OVER)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request_head(server.port, length=len(body), close=close))
        sock.sendall(body)
        status, headers, answer = read_response(sock)
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(answer)["error"]["type"] == "payload_too_large"
        assert sock.recv(1) == b""  # an orderly close (FIN), not a reset


def test_a_client_that_reads_while_sending_gets_the_413_before_it_finishes(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request_head(server.port, length=64 * LIMIT, close=False))
        # Part of the body, then read: the answer is already there, long before the body would end.
        sock.sendall(multipart_body("b0undary", 2 * LIMIT)[: 2 * LIMIT])
        status, headers, body = read_response(sock)
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(body)["error"]["type"] == "payload_too_large"
        # The server keeps reading (and discarding) what is still sent, so sending goes on unharmed.
        sock.sendall(bytes(LIMIT))


def tree(root: Path) -> dict[str, str | None]:
    """Every entry under `root`: sha256 of each file, None for each directory."""
    out: dict[str, str | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        out |= {str(rel / d): None for d in dirnames}
        out |= {str(rel / f): hashlib.sha256((Path(dirpath) / f).read_bytes()).hexdigest() for f in filenames}
    return out


def test_the_store_is_unchanged_by_every_refused_upload(server, root, tiny_model_dir, tmp_path):
    spec = InProcess(tiny_model_dir).spec
    config = {"method": "lora", "r": 4, "alpha": 8.0, "backbone_fingerprint": spec.fingerprint}
    config["head"] = {"type": "classification", "labels": ["negative", "positive"]}
    good = write_random_artifact(tmp_path / "good", config, spec, seed=1)
    good_config = (good / "adapter_config.json").read_bytes()
    good_weights = (good / "adapter.safetensors").read_bytes()

    def files(config_bytes: bytes = good_config, weights: bytes = good_weights) -> dict:
        return {"config": ("c.json", config_bytes), "weights": ("w.safetensors", weights)}

    store = root / f"store-{server.port}"
    with httpx.Client(base_url=server.url, timeout=60, headers=admin()) as client:
        r = client.post("/v1/adapters/kept", files=files())
        assert r.status_code == 201, r.text
        before = tree(store)
        assert str(Path(".locks", "tasks.kept.lock")) in before
        too_big = bytes(2 * LIMIT)
        wrong_shape = json.dumps({**config, "r": 8}).encode()
        refused = [
            ("/v1/adapters/Bad..Name", {"files": files()}, 400),
            ("/v1/adapters/new", {"files": files(config_bytes=b"{not json")}, 422),
            ("/v1/adapters/new", {"files": files(config_bytes=wrong_shape)}, 422),
            ("/v1/adapters/new", {"files": files(weights=pickle.dumps({"w": [1.0]}))}, 415),
            ("/v1/adapters/new", {"files": files(weights=b"\x00" * 64)}, 422),
            ("/v1/adapters/new", {"files": files(weights=too_big)}, 413),
            ("/v1/adapters/kept?version=1", {"files": files()}, 409),
            ("/v1/adapters/new", {"files": {"other": ("x", b"x"), **files()}}, 400),
            ("/v1/hypernetworks/new", {"files": files()}, 422),
            ("/v1/adapters/new", {"files": files(), "headers": {"Authorization": "Bearer wrong"}}, 401),
        ]
        for path, kwargs, want in refused:
            r = client.post(path, **kwargs)
            assert r.status_code == want, (path, r.status_code, r.text)
            assert tree(store) == before, path
        # Management requests for names that do not exist change nothing either.
        assert client.put("/v1/adapters/ghost/current", json={"version": 1}).status_code == 404
        assert client.delete("/v1/adapters/ghost").status_code == 404
        assert client.delete("/v1/adapters/ghost/versions/1").status_code == 404
        assert tree(store) == before
    assert os.listdir(root / "spool") == []  # no upload left its spooled weights behind

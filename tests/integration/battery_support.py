"""Helpers of the reliability and security battery: store snapshots, raw safetensors, pickle canaries."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import pickle
import stat
import struct
import zipfile
from pathlib import Path

import numpy as np
from api_support import admin

from store.safetensors_io import write_safetensors

__all__ = [
    "canary_pickles",
    "files",
    "raw_request",
    "raw_safetensors",
    "safetensors_bytes",
    "tree_digest",
    "tree_listing",
    "upload_bytes",
]


def tree_listing(root: Path) -> dict[str, str]:
    """Every entry under `root` (never following links): relative path -> type and content digest."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                out[rel] = f"link:{os.readlink(path)}"
            elif stat.S_ISDIR(mode):
                out[rel] = "dir"
            else:
                out[rel] = "file:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def tree_digest(root: Path) -> str:
    """One sha256 over the whole tree: names, types, link targets and file bytes."""
    return hashlib.sha256(json.dumps(tree_listing(root), sort_keys=True).encode()).hexdigest()


def safetensors_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A valid safetensors file of `arrays`, in memory."""
    buf = io.BytesIO()
    write_safetensors(buf, arrays)
    return buf.getvalue()


def raw_safetensors(header: object, data: bytes, *, header_len: int | None = None) -> bytes:
    """A safetensors-shaped file with an arbitrary header (a dict is JSON-encoded) and data buffer."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(text) if header_len is None else header_len
    return struct.pack("<Q", length) + text + data


class _Canary:
    """Unpickling this creates a directory at `marker`: proof that something ran pickle.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def canary_pickles(marker: Path) -> dict[str, bytes]:
    """Payloads whose unpickling would create `marker`: every pickle protocol and torch's zip layout."""
    payload = {"encoder.0.q.lora.A": _Canary(marker)}
    out = {
        f"pickle-protocol-{p}": pickle.dumps(payload, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        # The layout torch.save writes: archive/data.pkl plus a version record.
        zf.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        zf.writestr("archive/version", "3\n")
    out["torch-zip"] = buf.getvalue()
    # A pickle after a plausible length prefix, so format sniffing alone does not catch it.
    body = pickle.dumps(payload, protocol=4)
    out["length-prefixed-pickle"] = struct.pack("<Q", len(body)) + body
    return out


def files(config: bytes, weights: bytes, *, weights_name: str = "adapter.safetensors") -> dict:
    """httpx `files=` of one upload."""
    return {
        "config": ("adapter_config.json", config, "application/json"),
        "weights": (weights_name, weights, "application/octet-stream"),
    }


async def upload_bytes(client, task: str, config: bytes, weights: bytes, **params):
    """POST raw config and weights bytes as an upload with the admin key."""
    return await client.post(
        f"/v1/adapters/{task}", files=files(config, weights), headers=admin(), params=params
    )


async def raw_request(
    app,
    method: str,
    raw_path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    disconnect: asyncio.Event | None = None,
) -> tuple[int, bytes]:
    """Call the ASGI app with `raw_path` exactly as a client sent it (httpx would normalize `..`).

    The decoded `path` is made the way uvicorn makes it, by percent-decoding the raw path. Setting
    `disconnect` makes the client go away, as a closed connection does under uvicorn.
    """
    from urllib.parse import unquote

    path, _, query = raw_path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(path),
        "raw_path": path.encode("ascii"),
        "query_string": query.encode("ascii"),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]
        + [(b"content-length", str(len(body)).encode()), (b"host", b"test")],
        "client": ("127.0.0.1", 40000),
        "server": ("test", 80),
    }
    sent = False
    status, chunks = 0, []

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        # Until then the client stays connected, like a real one waiting for its answer.
        await (disconnect or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)

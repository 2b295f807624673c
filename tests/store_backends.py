"""Both store backends for the contract tests: the filesystem store, and the S3 store on a moto server."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

from store.local import LocalStore
from store.s3 import S3Store

__all__ = ["MotoS3", "atomic_conditional_writes", "contents", "leftovers", "moto_s3"]

# Re-entrant: modules that import the fixture each get their own session server, so the patch can nest
# (one wrapper calling the other on the same thread); a plain lock would deadlock every later PutObject.
_ATOMIC = threading.RLock()


@contextlib.contextmanager
def atomic_conditional_writes() -> Iterator[None]:
    """Make moto's PutObject check-and-store one step, as AWS S3, MinIO and Ceph RGW do.

    moto 5.2 checks If-Match / If-None-Match and then stores the object without a lock: measured on this
    machine, 8 threads with one If-Match ETag gave two winners in 3 to 4 rounds out of 30 (If-None-Match
    has the same window). A real server decides atomically; one lock around moto's handler does too.
    """
    from moto.s3.responses import S3Response

    original = S3Response.put_object
    if getattr(original, "_adapterserve_atomic", False):
        yield
        return

    def put_object(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _ATOMIC:
            return original(self, *args, **kwargs)

    put_object._adapterserve_atomic = True  # type: ignore[attr-defined]
    S3Response.put_object = put_object  # type: ignore[method-assign]
    try:
        yield
    finally:
        S3Response.put_object = original  # type: ignore[method-assign]


class MotoS3:
    """A moto S3 server on 127.0.0.1 that can be stopped and started again on the same port.

    moto keeps its buckets in this process, so a restarted server serves what the stopped one held,
    like an object store coming back after an outage.
    """

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.host, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://{self.host}:{self.port}"
        self.running = True
        self._buckets = 0
        self._client: Any = None

    def stop(self) -> None:
        """Stop answering: connections are refused until start()."""
        self._server.stop()
        self.running = False

    def start(self) -> None:
        """Serve again on the same port, with the same contents."""
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.running = True

    def client(self, **config: Any) -> Any:
        """A boto3 client for this server (fast failure: no retries, short timeouts)."""
        cfg = Config(
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=2,
            read_timeout=10,
            s3={"addressing_style": "path"},
            **config,
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=cfg,
        )

    def shared_client(self) -> Any:
        """One client for the whole session (creating a boto3 client costs a few hundred milliseconds)."""
        if self._client is None:
            self._client = self.client()
        return self._client

    def new_bucket(self) -> str:
        """A fresh, empty bucket."""
        self._buckets += 1
        name = f"adapterserve-{os.getpid()}-{self._buckets}"
        self.shared_client().create_bucket(Bucket=name)
        return name


def contents(store: LocalStore | S3Store) -> dict[str, bytes | None]:
    """Everything the store holds, by path or key (lock files are not content)."""
    if isinstance(store, S3Store):
        s3, out = store._s3, {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=store._bucket):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = s3.get_object(Bucket=store._bucket, Key=obj["Key"])["Body"].read()
        return out
    out_local: dict[str, bytes | None] = {}
    root: Path = store._root
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.parts[:1] == (".locks",):
            continue
        for d in dirnames:
            out_local[str(rel / d)] = None
        for f in filenames:
            out_local[str(rel / f)] = (Path(dirpath) / f).read_bytes()
    return out_local


def leftovers(store: LocalStore | S3Store) -> list[str]:
    """What a finished write or delete left behind: temp and trash entries, or blobs no manifest names."""
    if isinstance(store, S3Store):
        named = {m[f]["sha256"] for _, m in store._all_manifests() for f in ("config", "weights")}
        return [
            key
            for key in contents(store)
            if key.split("/")[-3:-1] == ["blobs", "sha256"] and key.rsplit("/", 1)[1] not in named
        ]
    return [
        str(Path(dp) / n)
        for dp, dns, fns in os.walk(store._root)
        for n in dns + fns
        if n.startswith((".tmp-", ".trash-"))
    ]


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """One S3-protocol server on 127.0.0.1 for the session (each test takes its own bucket)."""
    with atomic_conditional_writes():
        server = MotoS3()
        try:
            yield server
        finally:
            if server.running:
                server.stop()

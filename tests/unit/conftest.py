"""Unit-test fixtures shared by the store tests: a moto S3 server and a factory over both backends."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from store_backends import moto_s3  # noqa: F401  (a fixture)


@pytest.fixture(params=["local", "s3"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Any]:
    """Factory of the store under test, on each backend; every call opens the same store again."""
    if request.param == "local":
        from store.local import LocalStore

        return lambda **kw: LocalStore(tmp_path / "store", **kw)
    from store.s3 import S3Location, S3Store

    server = request.getfixturevalue("moto_s3")
    bucket = server.new_bucket()
    location = S3Location(bucket=bucket, prefix="adapterserve/test")
    # Blobs are collected at once: these tests check that a delete leaves nothing behind.
    return lambda **kw: S3Store(
        location, client=server.shared_client(), cache_dir=tmp_path / "s3-cache", blob_grace_s=0, **kw
    )

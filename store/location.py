"""Open the store a location names: a directory (the filesystem store) or ``s3://bucket/prefix``."""

from __future__ import annotations

import hashlib
from pathlib import Path

from store.base import ArtifactStore
from store.s3 import S3Location, is_s3_url
from store.safetensors_io import SafetensorsLimits

__all__ = ["admin_key_file", "is_s3_url", "open_store"]


def open_store(
    location: str | Path,
    *,
    limits: SafetensorsLimits | None = None,
    max_store_bytes: int | None = None,
    cache_dir: Path | None = None,
) -> ArtifactStore:
    """The store at `location`; an S3 store takes its endpoint, region and credentials from the AWS environment."""
    if is_s3_url(location):
        from store.s3 import S3Store

        return S3Store(str(location), limits=limits, max_store_bytes=max_store_bytes, cache_dir=cache_dir)
    from store.local import LocalStore

    return LocalStore(Path(location).expanduser(), limits=limits, max_store_bytes=max_store_bytes)


def admin_key_file(location: str | Path) -> Path:
    """Where a generated admin key is kept: beside a store directory, or per bucket and prefix in the home."""
    if is_s3_url(location):
        parsed = S3Location.parse(str(location))
        tag = hashlib.sha256(str(parsed).encode()).hexdigest()[:12]
        return Path.home() / ".local" / "share" / "adapterserve" / f"s3-{parsed.bucket}-{tag}.admin-key"
    store = Path(location).expanduser()
    return store.with_name(store.name + ".admin-key")

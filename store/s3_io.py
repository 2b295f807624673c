"""The S3 protocol side of the object store: locations, the client, error mapping, verified downloads."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store import durable
from store.errors import ArtifactCorrupt, StoreFull, StoreUnavailable

__all__ = [
    "S3Location",
    "default_client",
    "error_code",
    "fetch_verified",
    "is_missing",
    "is_s3_url",
    "lost_race",
    "probe_conditional_writes",
    "s3_errors",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_FULL_CODES = {"QuotaExceeded", "XMinioStorageFull", "InsufficientCapacity", "EntityTooLarge"}
# 412: the condition failed. 409 ConditionalRequestConflict: AWS saw a concurrent conditional write to
# the same key in flight; both mean "someone else changed it first".
_LOST_RACE_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def is_s3_url(location: object) -> bool:
    """True when a store location names an S3 bucket (``s3://bucket[/prefix]``)."""
    return isinstance(location, str) and location.startswith("s3://")


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix (no leading or trailing slash; may be empty)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """Parse ``s3://bucket/prefix``; a bucket name that S3 would refuse is a configuration error."""
        if not is_s3_url(url):
            raise ValueError(f"not an s3:// URL: {url!r}")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r} in the store URL")
        prefix = prefix.strip("/")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise ValueError(f"invalid S3 key prefix {prefix!r}: empty, '.' or '..' segments")
        return cls(bucket=bucket, prefix=prefix)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def error_code(exc: Exception) -> str:
    """The S3 error code of a botocore ClientError (or its HTTP status)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) or str(
        response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )


def is_missing(exc: Exception) -> bool:
    """True when S3 answered that the key does not exist."""
    return error_code(exc) in {"NoSuchKey", "404", "NotFound"}


def lost_race(exc: Exception) -> bool:
    """True when a conditional write failed because someone else wrote first."""
    return error_code(exc) in _LOST_RACE_CODES


def default_client() -> Any:
    """A boto3 S3 client from the usual AWS environment (AWS_ENDPOINT_URL, AWS_REGION, credentials...)."""
    import boto3
    from botocore.config import Config

    custom_endpoint = bool(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    config = Config(
        connect_timeout=5,
        read_timeout=30,
        retries={"max_attempts": 3, "mode": "standard"},
        # MinIO and Ceph are usually reached by host name or IP without wildcard DNS: path-style keys.
        s3={"addressing_style": "path" if custom_endpoint else "auto"},
    )
    return boto3.session.Session().client("s3", config=config)


@contextlib.contextmanager
def s3_errors(what: str, *, undone: bool = False) -> Iterator[None]:
    """Map boto errors to StoreFull / StoreUnavailable; messages name no bucket, key or credential."""
    from botocore.exceptions import BotoCoreError, ClientError

    outcome = "; nothing was changed" if undone else ""
    try:
        yield
    except ClientError as exc:
        code = error_code(exc)
        if code in _FULL_CODES:
            raise StoreFull(f"the object store ran out of space while {what}{outcome}", reason=code) from None
        if code in {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            raise StoreUnavailable(
                f"the object store refused {what}: {code} (check the bucket and the credentials)",
                reason=code,
            ) from None
        raise StoreUnavailable(
            f"the object store failed while {what}: {code}{outcome}", reason=code
        ) from None
    except BotoCoreError as exc:
        reason = type(exc).__name__
        raise StoreUnavailable(
            f"the object store failed while {what}: {reason}{outcome}", reason=reason
        ) from None
    except OSError as exc:
        raise durable.io_error(exc, what, undone=undone) from None


def probe_conditional_writes(client: Any, bucket: str, key: str) -> None:
    """Refuse a server that ignores If-None-Match / If-Match: it could not keep two writers apart."""
    from botocore.exceptions import ClientError

    client.put_object(Bucket=bucket, Key=key, Body=b"1", IfNoneMatch="*")
    try:
        for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"0123456789abcdef0123456789abcdef"'}):
            try:
                client.put_object(Bucket=bucket, Key=key, Body=b"2", **condition)
            except ClientError as exc:
                if lost_race(exc):
                    continue
                raise
            raise StoreUnavailable(
                f"the object store ignores conditional writes ({next(iter(condition))}); it cannot "
                "hold the store safely (AWS S3, MinIO and Ceph RGW honour them)"
            )
    finally:
        with contextlib.suppress(ClientError):
            client.delete_object(Bucket=bucket, Key=key)


def fetch_verified(
    client: Any, bucket: str, key: str, *, entry: dict[str, Any], cache: Path, what: str
) -> Path:
    """A verified local copy of a blob under `cache`: the cached one if it still hashes right, else fetched."""
    path = cache / "blobs" / entry["sha256"]
    if os.path.lexists(path):
        try:
            durable.verified_file(path, entry, what, keep=False)
            with contextlib.suppress(OSError):
                os.utime(path)
            return path
        except (ArtifactCorrupt, OSError):
            # The cache is only a copy: a damaged one is fetched again, never served.
            log.warning("%s: the local copy was damaged; fetching it again", what)
            with contextlib.suppress(OSError):
                os.unlink(path)
    from botocore.exceptions import ClientError

    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_missing(exc):
            raise ArtifactCorrupt(f"{what}: the blob is missing") from None
        raise
    tmp = cache / "tmp" / f"{secrets.token_hex(8)}.part"
    try:
        limit = entry["size"]
        chunks = response["Body"].iter_chunks(_CHUNK)

        def bounded() -> Iterator[bytes]:
            seen = 0
            for chunk in chunks:
                seen += len(chunk)
                if seen > limit:
                    raise ArtifactCorrupt(f"{what}: the blob is longer than its recorded size")
                yield chunk

        sha, size = durable.write_file(tmp, bounded())
        if size != limit or sha != entry["sha256"]:
            raise ArtifactCorrupt(
                f"{what}: the blob does not match its recorded sha256; restore or re-upload it"
            )
        os.replace(tmp, path)
    finally:
        response["Body"].close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return path

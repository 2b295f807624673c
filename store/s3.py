"""S3-compatible object-store backend of the artifact store (AWS S3, MinIO, Ceph RGW), same contract as local.

Layout under ``s3://<bucket>/<prefix>/``::

    blobs/sha256/<hex>             content-addressed bytes (configs and weights), written before any
                                   manifest names them
    <kind>/<name>/v<N>.json        a version's manifest (sha256 and size of both blobs); it is created
                                   with ``If-None-Match: *``, which is how exactly one writer claims N
    <kind>/<name>/current.json     {"version": N | null, "last_version": M}, replaced only with
                                   ``If-Match: <etag it was read with>`` (or ``If-None-Match: *`` when
                                   absent), so concurrent movers never lose an update

Every object is written by a single PutObject, which S3 makes visible all at once or not at all, and a
manifest only ever names blobs that were completely written before it: after a crash or an outage a
version is either absent or complete. Reads check every blob's sha256; weights are fetched into a local
cache directory (the interface hands the decoder a file path) and re-hashed on every read, like the
filesystem store does.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from store import durable
from store.base import (
    KINDS,
    ArtifactStore,
    StoredArtifact,
    VersionInfo,
    build_manifest,
    check_kind,
    is_valid_name,
    label,
    parse_manifest,
    validate_name,
    version_info,
)
from store.errors import (
    ArtifactCorrupt,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    StoreFull,
    VersionConflict,
)
from store.s3_io import (
    S3Location,
    default_client,
    fetch_verified,
    is_missing,
    is_s3_url,
    lost_race,
    probe_conditional_writes,
    s3_errors,
)
from store.safetensors_io import SafetensorsLimits

__all__ = ["PUT_STEPS", "S3Location", "S3Store", "is_s3_url"]

log = logging.getLogger(__name__)

_VERSION_KEY_RE = re.compile(r"v([1-9][0-9]{0,8})\.json")
_MAX_VERSION = 999_999_999
_MAX_CONFIG_BYTES = 1 << 20
_MAX_SMALL_OBJECT = 64 << 10
_CHUNK = 1 << 20
# A conditional write that lost a race is retried against the new state; past this many losses in a
# row something is wrong (a hot loop of writers), and the caller gets a 409 instead of a livelock.
_MAX_CAS_TRIES = 64
# The steps of put_version, in order; _crash_point is called with each name (tests stop the server there).
PUT_STEPS = ("copied", "validated", "blobs_written", "manifest_written", "pointer_written")
_crash_point: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _crash_point is not None:
        _crash_point(name)


class S3Store(ArtifactStore):
    """Versioned artifacts in an S3-compatible bucket; see the module docstring for the layout."""

    def __init__(
        self,
        location: S3Location | str,
        *,
        client: Any = None,
        cache_dir: Path | None = None,
        limits: SafetensorsLimits | None = None,
        max_store_bytes: int | None = None,
        blob_grace_s: float = 900.0,
        check_conditional_writes: bool = True,
    ) -> None:
        self.location = S3Location.parse(location) if isinstance(location, str) else location
        self.limits = limits or SafetensorsLimits()
        self.max_store_bytes = max_store_bytes
        self.blob_grace_s = blob_grace_s
        """Unreferenced blobs younger than this are kept: a writer may be about to name them."""
        self._s3 = client if client is not None else default_client()
        self._bucket = self.location.bucket
        self._prefix = f"{self.location.prefix}/" if self.location.prefix else ""
        if cache_dir is None:
            tag = hashlib.sha256(str(self.location).encode()).hexdigest()[:16]
            cache_dir = Path(tempfile.gettempdir()) / f"adapterserve-s3-{os.getuid()}" / tag
        self._cache = Path(cache_dir)
        # Manifests never change once written; cached by (key, ETag) so a listing costs no GETs.
        self._manifests: dict[tuple[str, str], dict[str, object] | None] = {}
        # Pointers by (key, ETag): one listing tells which moved, and only those are read again.
        self._pointers: dict[tuple[str, str], tuple[str, int | None]] = {}
        try:
            os.makedirs(self._cache / "tmp", mode=0o700, exist_ok=True)
            os.makedirs(self._cache / "blobs", mode=0o700, exist_ok=True)
        except OSError as exc:
            raise durable.io_error(exc, "creating the local cache of the object store") from None
        with s3_errors("opening the store"):
            self._s3.head_bucket(Bucket=self._bucket)
            if check_conditional_writes:
                probe_conditional_writes(self._s3, self._bucket, self._key(".probe", secrets.token_hex(8)))

    # -- keys and errors ----------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return self._prefix + "/".join(parts)

    def _blob_key(self, sha: str) -> str:
        return self._key("blobs", "sha256", sha)

    def _name_key(self, kind: str, name: str, leaf: str) -> str:
        return self._key(check_kind(kind), validate_name(name), leaf)

    @staticmethod
    def _check_version(version: object) -> int:
        if type(version) is not int or not 1 <= version <= _MAX_VERSION:
            raise InvalidRequest(f"version must be an integer from 1 to {_MAX_VERSION}, got {version!r:.40}")
        return version

    # -- small objects --------------------------------------------------------------------------------

    def _get_small(self, key: str) -> tuple[bytes, str] | None:
        """An object's bytes and ETag, or None when absent; objects past the small-file limit are refused."""
        from botocore.exceptions import ClientError

        try:
            response = self._s3.get_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            if is_missing(exc):
                return None
            raise
        if response.get("ContentLength", 0) > _MAX_SMALL_OBJECT:
            response["Body"].close()
            raise ArtifactCorrupt("a small object of the store is too large to be one of ours")
        return response["Body"].read(), response["ETag"]

    def _manifest(self, key: str, etag: str | None = None) -> dict[str, object] | None:
        """A version's parsed manifest (None when absent or malformed); cached by ETag."""
        if etag is not None and (key, etag) in self._manifests:
            return self._manifests[(key, etag)]
        got = self._get_small(key)
        if got is None:
            return None
        raw, etag = got
        try:
            manifest = parse_manifest(json.loads(raw))
        except ValueError:
            manifest = None
        if len(self._manifests) > 100_000:
            self._manifests.clear()
        self._manifests[(key, etag)] = manifest
        return manifest

    def _read_pointer(self, kind: str, name: str) -> tuple[dict[str, int | None] | None, str | None]:
        """The current-version pointer and the ETag to replace it with (None, None when absent)."""
        got = self._get_small(self._name_key(kind, name, "current.json"))
        if got is None:
            return None, None
        raw, etag = got
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        current = data.get("version") if isinstance(data, dict) else None
        if not (
            isinstance(data, dict)
            and type(data.get("last_version", 0)) is int
            and (current is None or type(current) is int)
        ):
            raise ArtifactCorrupt(f"the current-version pointer of {label(kind, name)} is unreadable")
        return {"version": current, "last_version": data.get("last_version", 0)}, etag

    def _move_pointer(
        self,
        kind: str,
        name: str,
        change: Callable[[dict[str, int | None] | None], dict[str, int | None] | None],
    ) -> dict[str, int | None] | None:
        """Replace the pointer by `change(old)` with a conditional write, retried against what won."""
        from botocore.exceptions import ClientError

        key = self._name_key(kind, name, "current.json")
        for _ in range(_MAX_CAS_TRIES):
            try:
                state, etag = self._read_pointer(kind, name)
            except ArtifactCorrupt:
                state, etag = None, self._etag_of(key)
            new = change(state)
            if new is None or new == state:
                return state
            condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
            try:
                self._s3.put_object(
                    Bucket=self._bucket,
                    Key=key,
                    Body=json.dumps(new, sort_keys=True).encode(),
                    ContentType="application/json",
                    **condition,
                )
                return new
            except ClientError as exc:
                if lost_race(exc) or (etag is not None and is_missing(exc)):
                    continue
                raise
        raise VersionConflict(f"the current version of {label(kind, name)} kept changing; try again")

    def _etag_of(self, key: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self._s3.head_object(Bucket=self._bucket, Key=key)["ETag"]
        except ClientError as exc:
            if is_missing(exc):
                return None
            raise

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self._s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self._bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def _scan(self, kind: str, name: str) -> dict[int, VersionInfo]:
        """Valid versions of a name (a well-formed manifest), oldest first."""
        found: dict[int, VersionInfo] = {}
        base = self._name_key(kind, name, "")
        for obj in self._list(base):
            match = _VERSION_KEY_RE.fullmatch(obj["Key"][len(base) :])
            if match:
                manifest = self._manifest(obj["Key"], obj.get("ETag"))
                if manifest is not None:
                    version = int(match.group(1))
                    found[version] = version_info(kind, name, version, manifest)
        return dict(sorted(found.items()))

    def _all_manifests(self) -> Iterator[tuple[str, dict[str, object]]]:
        for kind in KINDS:
            for obj in self._list(self._key(kind, "")):
                rest = obj["Key"][len(self._key(kind, "")) :].split("/")
                if len(rest) == 2 and _VERSION_KEY_RE.fullmatch(rest[1]):
                    manifest = self._manifest(obj["Key"], obj.get("ETag"))
                    if manifest is not None:
                        yield obj["Key"], manifest

    def usage_bytes(self) -> int:
        """Bytes held by all stored versions (config plus weights), counted per version like the local store."""
        with s3_errors("checking the size of the store"):
            return sum(
                m["config"]["size"] + m["weights"]["size"]  # type: ignore[index]
                for _, m in self._all_manifests()
            )

    # -- writing --------------------------------------------------------------------------------------

    def _put_blob(self, sha: str, path: Path | None = None, data: bytes | None = None) -> None:
        """Upload a blob under its sha256; S3 checks the body against the checksum we send."""
        checksum = base64.b64encode(bytes.fromhex(sha)).decode()
        # Unconditional: identical bytes under a content address, and rewriting repairs a damaged copy
        # and renews the blob's age, which keeps garbage collection away from a version being written.
        if path is not None:
            with open(path, "rb") as body:
                self._s3.put_object(
                    Bucket=self._bucket, Key=self._blob_key(sha), Body=body, ChecksumSHA256=checksum
                )
        else:
            self._s3.put_object(
                Bucket=self._bucket, Key=self._blob_key(sha), Body=data, ChecksumSHA256=checksum
            )

    def put_version(
        self,
        kind: str,
        name: str,
        *,
        config_bytes: bytes,
        weights_src: Path,
        version: int | None = None,
        activate: bool = True,
        validate: Callable[[bytes, Path], None] | None = None,
    ) -> VersionInfo:
        """Store a new version (None: the next number); return only once the pointer names it."""
        from botocore.exceptions import ClientError

        manifest_base = self._name_key(kind, name, "")
        if version is not None:
            self._check_version(version)
        who = label(kind, name)
        config_name, weights_name = ("adapter_config.json", "adapter.safetensors")
        if kind == "hypernetworks":
            config_name, weights_name = ("hypernetwork_config.json", "hypernetwork.safetensors")
        with durable.io_errors(f"reading the uploaded weights of {who}"):
            src_size = os.stat(weights_src).st_size
        if src_size > self.limits.max_file_bytes or len(config_bytes) > _MAX_CONFIG_BYTES:
            raise PayloadTooLarge(
                f"{who}: config ({len(config_bytes)} bytes) or weights ({src_size} bytes) exceed the limits "
                f"of {_MAX_CONFIG_BYTES} and {self.limits.max_file_bytes} bytes"
            )
        with s3_errors(f"checking {who}", undone=True):
            if version is not None and self._etag_of(f"{manifest_base}v{version}.json") is not None:
                raise VersionConflict(f"{who} already has version {version}")
            self._check_quota(len(config_bytes) + src_size, who)
        tmp = self._cache / "tmp" / f"{secrets.token_hex(8)}.part"
        try:
            with durable.io_errors(f"storing {who}", undone=True):
                weights_sha, weights_size = durable.write_file(tmp, durable.read_chunks(weights_src))
            _step("copied")
            if validate is not None:
                # On the private copy: what is validated is exactly what is uploaded.
                validate(config_bytes, tmp)
            _step("validated")
            config_sha = hashlib.sha256(config_bytes).hexdigest()
            manifest = build_manifest(
                kind,
                name,
                config={"file": config_name, "sha256": config_sha, "size": len(config_bytes)},
                weights={"file": weights_name, "sha256": weights_sha, "size": weights_size},
            )
            body = json.dumps(manifest, indent=2, sort_keys=True).encode()
            with s3_errors(f"storing {who}", undone=True):
                self._put_blob(config_sha, data=config_bytes)
                self._put_blob(weights_sha, path=tmp)
                _step("blobs_written")
                version = self._claim(kind, name, body, version)
            _step("manifest_written")
            manifest_key = f"{manifest_base}v{version}.json"
            try:
                with s3_errors(f"storing {who}", undone=True):
                    if self.max_store_bytes is not None:
                        # Checked again after the claim, when every concurrent writer's manifest is
                        # listed: two racing uploads may both be refused, never both admitted past it.
                        self._check_quota(0, who)
                    number = version

                    def change(state: dict[str, int | None] | None) -> dict[str, int | None]:
                        old = state or {"version": None, "last_version": 0}
                        current = number if activate else old["version"]
                        return {"version": current, "last_version": max(number, old["last_version"] or 0)}

                    self._move_pointer(kind, name, change)
                _step("pointer_written")
            except BaseException:
                # Not acknowledged: take the claim back (best effort; an outage leaves a complete,
                # inactive version, exactly what a crash at this point leaves in the local store).
                with contextlib.suppress(ClientError, Exception):
                    self._s3.delete_object(Bucket=self._bucket, Key=manifest_key)
                raise
            # The bytes just uploaded are the ones a read on this host would fetch next.
            with contextlib.suppress(OSError):
                os.replace(tmp, self._cache / "blobs" / weights_sha)
            return version_info(kind, name, version, manifest)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _claim(self, kind: str, name: str, body: bytes, version: int | None) -> int:
        """Create the manifest of `version` (None: the next free number) with If-None-Match: *."""
        from botocore.exceptions import ClientError

        who = label(kind, name)
        for _ in range(_MAX_CAS_TRIES):
            number = version
            if number is None:
                state, _ = self._read_pointer_or_none(kind, name)
                existing = self._scan(kind, name)
                # Numbers are not reused after a delete, so a cached (name, version) never changes meaning.
                number = max([*existing, (state or {}).get("last_version") or 0]) + 1
                if number > _MAX_VERSION:
                    raise VersionConflict(f"{who} has used up its version numbers")
            try:
                self._s3.put_object(
                    Bucket=self._bucket,
                    Key=self._name_key(kind, name, f"v{number}.json"),
                    Body=body,
                    ContentType="application/json",
                    IfNoneMatch="*",
                )
                return number
            except ClientError as exc:
                if not lost_race(exc):
                    raise
                if version is not None:
                    raise VersionConflict(f"{who} already has version {version}") from None
        raise VersionConflict(f"{who}: too many uploads at once; try again")

    def _read_pointer_or_none(self, kind: str, name: str) -> tuple[dict[str, int | None] | None, str | None]:
        try:
            return self._read_pointer(kind, name)
        except ArtifactCorrupt:
            return None, None

    def _check_quota(self, extra: int, who: str) -> None:
        if self.max_store_bytes is not None and self.usage_bytes() + extra > self.max_store_bytes:
            raise StoreFull(
                f"storing {who} ({extra} bytes) would exceed the store limit of {self.max_store_bytes} bytes",
                limit=self.max_store_bytes,
            )

    def set_current(self, kind: str, name: str, version: int, *, expected: int | None = None) -> VersionInfo:
        """Make `version` current; with `expected`, only if the current version is still that one."""
        self._check_version(version)
        who = label(kind, name)
        key = self._name_key(kind, name, f"v{version}.json")
        with s3_errors(f"changing the current version of {who}"):
            manifest = self._manifest(key)
            if manifest is None:
                raise NotFound(f"{who} has no version {version}")
            if expected is not None:
                # A damaged pointer with an expectation is a conflict to report, not to overwrite.
                self._read_pointer(kind, name)

            def change(state: dict[str, int | None] | None) -> dict[str, int | None]:
                old = state or {"version": None, "last_version": max(self._scan(kind, name), default=0)}
                if expected is not None and old["version"] != expected:
                    raise VersionConflict(f"the current version of {who} is {old['version']}, not {expected}")
                return {"version": version, "last_version": max(version, old["last_version"] or 0)}

            self._move_pointer(kind, name, change)
            if self._manifest(key) is None:
                # Deleted between the check and the write: point at what remains rather than at nothing.
                remaining = self._scan(kind, name)
                self._move_pointer(
                    kind, name, lambda s: {**(s or {}), "version": max(remaining) if remaining else None}
                )
                raise NotFound(f"{who} has no version {version}; it was just deleted")
            return version_info(kind, name, version, manifest)

    def delete_version(self, kind: str, name: str, version: int) -> None:
        """Remove one version; if it was current, the newest remaining one becomes current."""
        self._check_version(version)
        who = label(kind, name)
        key = self._name_key(kind, name, f"v{version}.json")
        with s3_errors(f"deleting version {version} of {who}"):
            versions = self._scan(kind, name)
            if version not in versions and self._etag_of(key) is None:
                raise NotFound(f"{who} has no version {version}")
            doomed = self._manifest(key)
            remaining = [v for v in versions if v != version]
            # Pointer first: an outage then leaves an extra version, never a dangling pointer; and the
            # number is recorded as used, so it is never handed out again.

            def change(state: dict[str, int | None] | None) -> dict[str, int | None]:
                old = state or {"version": None, "last_version": 0}
                current = old["version"]
                if current == version:
                    current = max(remaining) if remaining else None
                return {
                    "version": current,
                    "last_version": max([version, *remaining, old["last_version"] or 0]),
                }

            self._move_pointer(kind, name, change)
            self._s3.delete_object(Bucket=self._bucket, Key=key)
            if not remaining:
                self._s3.delete_object(Bucket=self._bucket, Key=self._name_key(kind, name, "current.json"))
            if doomed is not None:
                self._collect([doomed["config"]["sha256"], doomed["weights"]["sha256"]])  # type: ignore[index]

    def delete(self, kind: str, name: str) -> None:
        """Remove a name and all its versions."""
        who = label(kind, name)
        with s3_errors(f"deleting {who}"):
            versions = self._scan(kind, name)
            if not versions:
                raise NotFound(f"{who} does not exist")
            # The pointer first: from then on the name serves nothing, whatever is removed next.
            self._s3.delete_object(Bucket=self._bucket, Key=self._name_key(kind, name, "current.json"))
            shas: list[str] = []
            for obj in list(self._list(self._name_key(kind, name, ""))):
                manifest = self._manifest(obj["Key"], obj.get("ETag"))
                if manifest is not None:
                    shas += [manifest["config"]["sha256"], manifest["weights"]["sha256"]]  # type: ignore[index]
                self._s3.delete_object(Bucket=self._bucket, Key=obj["Key"])
            self._collect(shas)

    def _collect(self, shas: list[str]) -> None:
        """Delete blobs that no manifest names any more and that are older than the grace period."""
        from botocore.exceptions import ClientError

        named = {m[f]["sha256"] for _, m in self._all_manifests() for f in ("config", "weights")}  # type: ignore[index]
        for sha in set(shas) - named:
            try:
                head = self._s3.head_object(Bucket=self._bucket, Key=self._blob_key(sha))
            except ClientError as exc:
                if is_missing(exc):
                    continue
                raise
            if time.time() - head["LastModified"].timestamp() >= self.blob_grace_s:
                self._s3.delete_object(Bucket=self._bucket, Key=self._blob_key(sha))
                with contextlib.suppress(OSError):
                    os.unlink(self._cache / "blobs" / sha)

    def collect_garbage(self) -> int:
        """Delete every unreferenced blob past the grace period (left by crashed writers); return the count."""
        with s3_errors("collecting unreferenced blobs"):
            shas = [obj["Key"].rsplit("/", 1)[1] for obj in self._list(self._key("blobs", "sha256", ""))]
            before = len(shas)
            self._collect(shas)
            after = sum(1 for _ in self._list(self._key("blobs", "sha256", "")))
        return before - after

    # -- reading --------------------------------------------------------------------------------------

    def get(self, kind: str, name: str, version: int | None = None) -> StoredArtifact:
        """Return a version (None: the current one) after checking both blobs against the manifest."""
        if version is None:
            version = self.current_version(kind, name)
            if version is None:
                raise NotFound(f"{label(kind, name)} has no current version")
        manifest, config = self._verified(kind, name, version)
        what = f"{label(kind, name)} version {version} weights"
        with s3_errors(f"reading {label(kind, name)} version {version}"):
            path = fetch_verified(
                self._s3,
                self._bucket,
                self._blob_key(manifest["weights"]["sha256"]),  # type: ignore[index]
                entry=manifest["weights"],  # type: ignore[arg-type]
                cache=self._cache,
                what=what,
            )
        return StoredArtifact(
            info=version_info(kind, name, version, manifest), config_bytes=config, weights_path=path
        )

    def get_config(self, kind: str, name: str, version: int) -> bytes:
        """One version's config bytes, checked against the manifest (the weights are not read)."""
        return self._verified(kind, name, version)[1]

    def _verified(self, kind: str, name: str, version: int) -> tuple[dict[str, object], bytes]:
        who = label(kind, name)
        self._check_version(version)
        with s3_errors(f"reading {who} version {version}"):
            key = self._name_key(kind, name, f"v{version}.json")
            manifest = self._manifest(key)
            if manifest is None:
                if self._etag_of(key) is None:
                    raise NotFound(f"{who} has no version {version}")
                raise ArtifactCorrupt(f"{who} version {version}: its manifest is missing or unreadable")
            entry = manifest["config"]
            got = self._get_small(self._blob_key(entry["sha256"]))  # type: ignore[index]
            config = got[0] if got is not None else None
            if config is None:
                raise ArtifactCorrupt(f"{who} version {version} config: the blob is missing")
            if len(config) != entry["size"] or hashlib.sha256(config).hexdigest() != entry["sha256"]:  # type: ignore[index]
                raise ArtifactCorrupt(
                    f"{who} version {version} config: the blob does not match its recorded sha256; "
                    "restore or re-upload it"
                )
        return manifest, config

    def current_version(self, kind: str, name: str) -> int | None:
        """The current version of a name, or None when none is active; NotFound for an unknown name."""
        who = label(kind, name)
        with s3_errors(f"reading {who}"):
            state, _ = self._read_pointer(kind, name)
            if state is not None and state["version"] is not None:
                return state["version"]
            if not self._scan(kind, name):
                raise NotFound(f"{who} does not exist")
            return None

    def list_names(self, kind: str) -> list[str]:
        """Names of the given kind that hold at least one version, sorted."""
        base = self._key(check_kind(kind), "")
        names = set()
        with s3_errors(f"listing {kind}"):
            for obj in self._list(base):
                parts = obj["Key"][len(base) :].split("/")
                if len(parts) == 2 and _VERSION_KEY_RE.fullmatch(parts[1]):
                    names.add(parts[0])
        return sorted(n for n in names if is_valid_name(n))

    def current_versions(self, kind: str) -> dict[str, int | None]:
        """Every name with its current version: one listing, and a read of only the pointers that moved."""
        base = self._key(check_kind(kind), "")
        names: set[str] = set()
        pointers: dict[str, str] = {}
        with s3_errors(f"listing {kind}"):
            for obj in self._list(base):
                parts = obj["Key"][len(base) :].split("/")
                if len(parts) != 2 or not is_valid_name(parts[0]):
                    continue
                if _VERSION_KEY_RE.fullmatch(parts[1]):
                    names.add(parts[0])
                elif parts[1] == "current.json":
                    pointers[parts[0]] = obj.get("ETag", "")
            out: dict[str, int | None] = {}
            for name in sorted(names):
                etag, cached = pointers.get(name), self._pointers.get((kind, name))
                if etag is None:
                    out[name] = None
                elif cached is not None and cached[0] == etag:
                    out[name] = cached[1]
                else:
                    try:
                        state, read_etag = self._read_pointer(kind, name)
                    except ArtifactCorrupt as exc:
                        log.error("%s", exc.message)
                        continue
                    out[name] = state["version"] if state else None
                    if read_etag is not None:
                        self._pointers[(kind, name)] = (read_etag, out[name])
        return out

    def list_versions(self, kind: str, name: str) -> list[VersionInfo]:
        """All versions of a name, oldest first; NotFound for an unknown name."""
        with s3_errors(f"listing {label(kind, name)}"):
            versions = self._scan(kind, name)
        if not versions:
            raise NotFound(f"{label(kind, name)} does not exist")
        return list(versions.values())

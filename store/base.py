"""The storage backend interface: versioned, immutable artifacts per kind and name, plus a current pointer."""

from __future__ import annotations

import abc
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from store.errors import InvalidName, NotFound

__all__ = [
    "KINDS",
    "ArtifactStore",
    "Kind",
    "StoredArtifact",
    "VersionInfo",
    "build_manifest",
    "check_kind",
    "is_valid_name",
    "label",
    "parse_manifest",
    "validate_name",
    "version_info",
]

Kind = Literal["tasks", "hypernetworks"]
KINDS: tuple[str, ...] = ("tasks", "hypernetworks")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


def is_valid_name(name: object) -> bool:
    """True when `name` may name a task or hypernetwork."""
    # fullmatch, not `$`: `$` would accept a trailing newline.
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None and ".." not in name


def validate_name(name: str) -> str:
    """Return `name` if it is a valid task or hypernetwork name, else raise InvalidName."""
    if not is_valid_name(name):
        raise InvalidName(
            f"invalid name {str(name)[:80]!r}: use 1 to 64 characters from a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def check_kind(kind: str) -> str:
    """Return `kind` if it is one of KINDS; anything else is a programming error."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return kind


def label(kind: str, name: str) -> str:
    """How messages refer to a stored name: "task 'sst2'" or "hypernetwork 'glue'"."""
    return f"{'task' if kind == 'tasks' else 'hypernetwork'} {name!r}"


@dataclass(frozen=True)
class VersionInfo:
    """What the store knows about one stored version, without reading its files."""

    kind: str
    name: str
    version: int
    sha256: str
    """sha256 (hex) of the weights file."""
    config_sha256: str
    size_bytes: int
    """Bytes of config plus weights."""
    created_at: str
    """When the version was written, ISO 8601 in UTC."""


@dataclass(frozen=True)
class StoredArtifact:
    """A version whose files were just checked against their recorded sha256."""

    info: VersionInfo
    config_bytes: bytes
    weights_path: Path


class ArtifactStore(abc.ABC):
    """Durable, versioned artifact storage; a version never changes once written."""

    @abc.abstractmethod
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
        """Store a new version durably (None: the next number); return only once it is safe on disk."""

    @abc.abstractmethod
    def get(self, kind: str, name: str, version: int | None = None) -> StoredArtifact:
        """Return a version (None: the current one) after verifying its files."""

    @abc.abstractmethod
    def get_config(self, kind: str, name: str, version: int) -> bytes:
        """One version's config bytes after verifying that file alone (not the weights)."""

    @abc.abstractmethod
    def current_version(self, kind: str, name: str) -> int | None:
        """The current version of a name, or None when none is active."""

    @abc.abstractmethod
    def set_current(self, kind: str, name: str, version: int, *, expected: int | None = None) -> VersionInfo:
        """Make `version` current; with `expected`, only if the current version is still that one."""

    @abc.abstractmethod
    def list_names(self, kind: str) -> list[str]:
        """Names of the given kind that hold at least one version, sorted."""

    def current_versions(self, kind: str) -> dict[str, int | None]:
        """Every name of a kind with its current version: what a server sharing the store polls."""
        out: dict[str, int | None] = {}
        for name in self.list_names(kind):
            try:
                out[name] = self.current_version(kind, name)
            except NotFound:
                continue  # deleted between the listing and the read
        return out

    @abc.abstractmethod
    def list_versions(self, kind: str, name: str) -> list[VersionInfo]:
        """All versions of a name, oldest first."""

    @abc.abstractmethod
    def delete_version(self, kind: str, name: str, version: int) -> None:
        """Remove one version; the current pointer moves to the newest remaining one."""

    @abc.abstractmethod
    def delete(self, kind: str, name: str) -> None:
        """Remove a name and all its versions."""


def build_manifest(
    kind: str, name: str, *, config: dict[str, object], weights: dict[str, object]
) -> dict[str, object]:
    """The manifest stored beside a version: file names, sha256 and sizes, and the creation time."""
    return {
        "format_version": 1,
        "kind": kind,
        "name": name,
        "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
        "config": config,
        "weights": weights,
    }


def _valid_file_entry(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
        and type(entry.get("size")) is int
        and entry["size"] >= 0
    )


def parse_manifest(data: object) -> dict[str, object] | None:
    """The manifest if it is well formed, else None."""
    if (
        isinstance(data, dict)
        and _valid_file_entry(data.get("config"))
        and _valid_file_entry(data.get("weights"))
        and isinstance(data.get("created_at"), str)
    ):
        return data
    return None


def version_info(kind: str, name: str, version: int, manifest: dict[str, object]) -> VersionInfo:
    """VersionInfo of a version from its (parsed) manifest."""
    config, weights = manifest["config"], manifest["weights"]
    return VersionInfo(
        kind=kind,
        name=name,
        version=version,
        sha256=weights["sha256"],  # type: ignore[index]
        config_sha256=config["sha256"],  # type: ignore[index]
        size_bytes=weights["size"] + config["size"],  # type: ignore[index]
        created_at=str(manifest["created_at"]),
    )

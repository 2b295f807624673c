"""Filesystem backend of the artifact store: crash-safe, durable and safe across threads and processes.

Layout under the root::

    .locks/<kind>.<name>.lock     flock per name, while the name has a directory (durable.flocked)
    .locks/store.lock             flock for the store-wide size limit
    <kind>/<name>/current.json    {"version": N | null, "last_version": M}
    <kind>/<name>/v<N>/           config, weights, manifest.json (sha256 and size of each file)
    <kind>/<name>/.tmp-*          a version being written (locked by its writer) or a pointer being replaced
    <kind>/.trash-*, <kind>/<name>/.trash-*   removed names/versions, renamed away before deletion

A version directory only ever appears by renaming a complete, fsynced temp directory, so after any
crash a version is either absent or complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

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
from store.durable import (
    fsync_dir,
    io_errors,
    is_plain_dir,
    read_chunks,
    read_small_json,
    remove_tree,
    write_file,
)
from store.errors import (
    ArtifactCorrupt,
    InvalidName,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    StoreFull,
    StoreUnavailable,
    VersionConflict,
)
from store.safetensors_io import SafetensorsLimits

__all__ = ["LocalStore", "validate_name"]

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"v([1-9][0-9]{0,8})")
_MAX_VERSION = 999_999_999
_FILES = {
    "tasks": ("adapter_config.json", "adapter.safetensors"),
    "hypernetworks": ("hypernetwork_config.json", "hypernetwork.safetensors"),
}
_MANIFEST = "manifest.json"
_CURRENT = "current.json"
_LOCKS = ".locks"
_TMP = ".tmp-"
_TRASH = ".trash-"
_MAX_CONFIG_BYTES = 1 << 20

# The steps of put_version, in order; _crash_point is called with each name (tests kill or fail there).
PUT_STEPS = (
    "tmp_created",
    "config_written",
    "weights_written",
    "validated",
    "manifest_written",
    "tmp_synced",
    "locked",
    "renamed",
    "dir_synced",
    "pointer_tmp_written",
    "pointer_replaced",
    "pointer_synced",
)
_crash_point: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _crash_point is not None:
        _crash_point(name)


class LocalStore(ArtifactStore):
    """Versioned artifacts in a local directory tree; see the module docstring for the layout."""

    def __init__(
        self, root: Path, *, limits: SafetensorsLimits | None = None, max_store_bytes: int | None = None
    ) -> None:
        self.limits = limits or SafetensorsLimits()
        self.max_store_bytes = max_store_bytes
        try:
            made_root = not os.path.lexists(root)
            os.makedirs(root, exist_ok=True)
            # The root itself may legitimately be a symlink chosen by the operator; everything below it
            # is checked against the resolved root.
            self._root = Path(root).resolve(strict=True)
            if made_root:
                fsync_dir(self._root.parent)
            made = False
            for sub in (*KINDS, _LOCKS):
                path = self._root / sub
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path, 0o755)
                    made = True
                if not is_plain_dir(path):
                    raise StoreUnavailable(f"the store's {sub!r} entry is not a plain directory")
            if made:
                # Every name lives under a kind's directory: a power cut must not take that entry away
                # after the first upload into it was acknowledged.
                fsync_dir(self._root)
            self._recover()
        except OSError as exc:
            raise durable.io_error(exc, "opening the store") from None

    # -- paths and locks ----------------------------------------------------------------------------

    def _task_dir(self, kind: str, name: str) -> Path:
        path = self._root / check_kind(kind) / validate_name(name)
        if os.path.islink(self._root / kind):
            raise StoreUnavailable(f"the store's {kind!r} directory is a symbolic link; refusing it")
        if os.path.islink(path):
            # Someone planted it: the name cannot be used until an operator removes the link (400, not 5xx).
            raise InvalidName(f"the store entry of {label(kind, name)} is a symbolic link; refusing the name")
        if not os.path.realpath(path).startswith(str(self._root) + os.sep):
            raise InvalidName(f"{label(kind, name)} resolves outside the store")
        return path

    def _version_dir(self, kind: str, name: str, version: int) -> Path:
        if type(version) is not int or not 1 <= version <= _MAX_VERSION:
            raise InvalidRequest(f"version must be an integer from 1 to {_MAX_VERSION}, got {version!r:.40}")
        path = self._task_dir(kind, name) / f"v{version}"
        if os.path.islink(path):
            raise StoreUnavailable(f"{label(kind, name)} version {version} is a symbolic link; refusing it")
        return path

    def _lock(self, lock_name: str) -> contextlib.AbstractContextManager[None]:
        return durable.flocked(self._root / _LOCKS / lock_name)

    @contextlib.contextmanager
    def _task_lock(self, kind: str, name: str) -> Iterator[None]:
        path = self._root / _LOCKS / f"{kind}.{name}.lock"
        with durable.flocked(path):
            try:
                yield
            finally:
                # A name with nothing stored keeps no lock file either, so a refused upload (or a
                # request for an unknown name) leaves the store exactly as it was. Unlinked while held:
                # flocked makes a waiter on the old file lock the path afresh.
                if not os.path.lexists(self._root / kind / name):
                    durable.unlink_lock(path)

    # -- state ----------------------------------------------------------------------------------------

    def _manifest(self, vdir: Path) -> dict[str, object] | None:
        return parse_manifest(read_small_json(vdir / _MANIFEST))

    def _scan(self, kind: str, name: str) -> dict[int, VersionInfo]:
        """Valid versions of a name (plain directories with a well-formed manifest)."""
        task_dir = self._task_dir(kind, name)
        found: dict[int, VersionInfo] = {}
        try:
            entries = os.listdir(task_dir)
        except (FileNotFoundError, NotADirectoryError):
            return found
        for entry in entries:
            match = _VERSION_RE.fullmatch(entry)
            if match and is_plain_dir(task_dir / entry):
                manifest = self._manifest(task_dir / entry)
                if manifest is not None:
                    found[int(match.group(1))] = version_info(kind, name, int(match.group(1)), manifest)
        return dict(sorted(found.items()))

    def _read_state(self, kind: str, name: str) -> dict[str, int | None] | None:
        path = self._task_dir(kind, name) / _CURRENT
        if not os.path.lexists(path):
            return None
        data = read_small_json(path)
        if not (isinstance(data, dict) and type(data.get("last_version", 0)) is int):
            raise ArtifactCorrupt(f"the current-version pointer of {label(kind, name)} is unreadable")
        current = data.get("version")
        if current is not None and type(current) is not int:
            raise ArtifactCorrupt(f"the current-version pointer of {label(kind, name)} is unreadable")
        return {"version": current, "last_version": data.get("last_version", 0)}

    def _write_state(
        self, kind: str, name: str, state: dict[str, int | None], *, rollback: bool = False
    ) -> None:
        """Replace the pointer atomically: temp file, fsync, rename over, fsync the directory."""
        step = (lambda _: None) if rollback else _step
        task_dir = self._task_dir(kind, name)
        tmp = task_dir / f"{_TMP}current-{secrets.token_hex(8)}"
        try:
            write_file(tmp, [json.dumps(state, sort_keys=True).encode()])
            step("pointer_tmp_written")
            durable.fs.replace(tmp, task_dir / _CURRENT)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        step("pointer_replaced")
        fsync_dir(task_dir)
        step("pointer_synced")

    def usage_bytes(self) -> int:
        """Bytes held by all stored versions (config plus weights)."""
        total = 0
        for kind in KINDS:
            for name in self._names_on_disk(kind):
                total += sum(info.size_bytes for info in self._scan(kind, name).values())
        return total

    def _names_on_disk(self, kind: str) -> list[str]:
        base = self._root / kind
        return sorted(e for e in os.listdir(base) if is_valid_name(e) and is_plain_dir(base / e))

    def _check_quota(self, extra: int, who: str) -> None:
        if self.max_store_bytes is not None and self.usage_bytes() + extra > self.max_store_bytes:
            raise StoreFull(
                f"storing {who} ({extra} bytes) would exceed the store limit of {self.max_store_bytes} bytes",
                limit=self.max_store_bytes,
            )

    # -- recovery -------------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Remove what crashed writers and deleters left behind, and repair dangling pointers."""
        for kind in KINDS:
            base = self._root / kind
            for entry in os.listdir(base):
                if entry.startswith(_TRASH):
                    remove_tree(base / entry)
            for name in self._names_on_disk(kind):
                with self._task_lock(kind, name):
                    try:
                        self._recover_task(kind, name)
                    except ArtifactCorrupt as exc:
                        # One damaged pointer must not keep the whole store from opening.
                        log.error("could not recover %s: %s", label(kind, name), exc)

    def _recover_task(self, kind: str, name: str) -> None:
        task_dir = self._task_dir(kind, name)
        live_tmp = False
        for entry in os.listdir(task_dir):
            path = task_dir / entry
            if entry.startswith(_TRASH):
                remove_tree(path)
            elif entry.startswith(_TMP):
                live_tmp |= not durable.remove_if_abandoned(path)
            elif _VERSION_RE.fullmatch(entry) and (
                not is_plain_dir(path) or not os.path.lexists(path / _MANIFEST)
            ):
                # Only a rename of a complete directory creates v<N>, so this was made by someone else.
                log.warning("removing %s: not a version directory", path)
                remove_tree(path)
            elif _VERSION_RE.fullmatch(entry) and self._manifest(path) is None:
                # A damaged manifest may sit beside the only copy of good data: leave it to the operator.
                log.error("ignoring %s: its manifest is unreadable", path)
        if not live_tmp and not any(_VERSION_RE.fullmatch(e) for e in os.listdir(task_dir)):
            self._remove_task_dir(kind, task_dir)
            return
        state = self._read_state(kind, name)
        current = state["version"] if state else None
        if current is not None and not os.path.lexists(task_dir / f"v{current}"):
            versions = self._scan(kind, name)
            newest = max(versions) if versions else None
            self._write_state(kind, name, {"version": newest, "last_version": state["last_version"]})

    def _remove_task_dir(self, kind: str, task_dir: Path) -> None:
        trash = self._root / kind / f"{_TRASH}{secrets.token_hex(8)}"
        durable.fs.rename(task_dir, trash)
        fsync_dir(self._root / kind)
        remove_tree(trash)

    # -- writing --------------------------------------------------------------------------------------

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
        task_dir = self._task_dir(kind, name)
        if version is not None:
            self._version_dir(kind, name, version)
        who = label(kind, name)
        config_name, weights_name = _FILES[kind]
        with io_errors(f"reading the uploaded weights of {who}"):
            src_size = os.stat(weights_src).st_size
        if src_size > self.limits.max_file_bytes or len(config_bytes) > _MAX_CONFIG_BYTES:
            raise PayloadTooLarge(
                f"{who}: config ({len(config_bytes)} bytes) or weights ({src_size} bytes) exceed the limits "
                f"of {_MAX_CONFIG_BYTES} and {self.limits.max_file_bytes} bytes"
            )
        # Cheap early refusals; both are checked again under the lock at commit time.
        if version is not None and os.path.lexists(task_dir / f"v{version}"):
            raise VersionConflict(f"{who} already has version {version}")
        with io_errors(f"checking the size of the store for {who}"):
            self._check_quota(len(config_bytes) + src_size, who)
        tmp: Path | None = None
        tmp_fd = -1
        try:
            with io_errors(f"storing {who}", undone=True):
                with self._task_lock(kind, name):
                    self._ensure_task_dir(kind, task_dir)
                    tmp = task_dir / f"{_TMP}{secrets.token_hex(8)}"
                    durable.fs.mkdir(tmp)
                    # Holding a lock on the temp dir tells other processes' recovery that it is in use.
                    tmp_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    fcntl.flock(tmp_fd, fcntl.LOCK_EX)
                _step("tmp_created")
                config_sha, config_size = write_file(tmp / config_name, [config_bytes])
                _step("config_written")
                weights_sha, weights_size = write_file(tmp / weights_name, read_chunks(weights_src))
                _step("weights_written")
                if validate is not None:
                    # On the private copy: what is validated is exactly what becomes visible.
                    validate(config_bytes, tmp / weights_name)
                _step("validated")
                manifest = build_manifest(
                    kind,
                    name,
                    config={"file": config_name, "sha256": config_sha, "size": config_size},
                    weights={"file": weights_name, "sha256": weights_sha, "size": weights_size},
                )
                write_file(tmp / _MANIFEST, [json.dumps(manifest, indent=2, sort_keys=True).encode()])
                _step("manifest_written")
                durable.fs.fsync(tmp_fd)
                _step("tmp_synced")
                with self._task_lock(kind, name):
                    _step("locked")
                    info = self._commit(kind, name, tmp, manifest, version, activate=activate)
                tmp = None
                return info
        finally:
            if tmp is not None:
                self._discard_tmp(kind, name, tmp)
            if tmp_fd >= 0:
                os.close(tmp_fd)

    def _ensure_task_dir(self, kind: str, task_dir: Path) -> None:
        try:
            durable.fs.mkdir(task_dir)
        except FileExistsError:
            if not is_plain_dir(task_dir):
                raise StoreUnavailable(
                    f"the store entry of {task_dir.name!r} is not a plain directory"
                ) from None
            return
        try:
            # The new name must survive a crash as well as the version inside it.
            fsync_dir(self._root / kind)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(task_dir)
            raise

    def _commit(
        self,
        kind: str,
        name: str,
        tmp: Path,
        manifest: dict[str, object],
        version: int | None,
        *,
        activate: bool,
    ) -> VersionInfo:
        """Under the name's lock: give the temp dir its version number and move the pointer."""
        task_dir = self._task_dir(kind, name)
        who = label(kind, name)
        if not is_plain_dir(tmp):
            raise VersionConflict(f"{who} was deleted while the new version was written; upload it again")
        state = self._read_state(kind, name)
        last = state["last_version"] if state else 0
        if version is None:
            existing = [int(m.group(1)) for e in os.listdir(task_dir) if (m := _VERSION_RE.fullmatch(e))]
            # Numbers are not reused after a delete, so a cached (name, version) never changes meaning.
            version = max([*existing, last or 0]) + 1
            if version > _MAX_VERSION:
                raise VersionConflict(f"{who} has used up its version numbers")
        final = task_dir / f"v{version}"
        # Exclusivity: rename(2) would silently replace an empty directory, so the existence check and
        # the rename happen under the name's flock, which every writer in every process takes. A crash
        # releases the flock, and the rename itself is atomic, so no state is left half-claimed.
        if os.path.lexists(final):
            raise VersionConflict(f"{who} already has version {version}")
        size = manifest["config"]["size"] + manifest["weights"]["size"]  # type: ignore[index]
        quota = self._lock("store.lock") if self.max_store_bytes is not None else contextlib.nullcontext()
        with quota:
            self._check_quota(size, who)
            durable.fs.rename(tmp, final)
        try:
            _step("renamed")
            fsync_dir(task_dir)
            _step("dir_synced")
            current = version if activate else (state["version"] if state else None)
            self._write_state(kind, name, {"version": current, "last_version": max(version, last or 0)})
        except BaseException:
            self._rollback(kind, name, final, state)
            raise
        return version_info(kind, name, version, manifest)

    def _rollback(self, kind: str, name: str, final: Path, state: dict[str, int | None] | None) -> None:
        """Undo a commit that could not be made durable; the caller was never told it succeeded."""
        try:
            if self._read_state(kind, name) != state:
                if state is not None:
                    self._write_state(kind, name, state, rollback=True)
                else:
                    os.unlink(final.parent / _CURRENT)
            trash = final.parent / f"{_TRASH}{secrets.token_hex(8)}"
            os.rename(final, trash)
            remove_tree(trash)
            fsync_dir(final.parent)
        except (OSError, ArtifactCorrupt) as exc:
            log.error("could not roll back %s version dir %s: %s", label(kind, name), final.name, exc)

    def _discard_tmp(self, kind: str, name: str, tmp: Path) -> None:
        try:
            remove_tree(tmp)
            # A failed first upload leaves no empty name behind.
            with self._task_lock(kind, name), contextlib.suppress(OSError):
                if not os.listdir(tmp.parent):
                    os.rmdir(tmp.parent)
        except OSError as exc:
            log.error("could not remove a temp dir of %s: %s", label(kind, name), exc)

    def set_current(self, kind: str, name: str, version: int, *, expected: int | None = None) -> VersionInfo:
        """Make `version` current; with `expected`, only if the current version is still that one."""
        vdir = self._version_dir(kind, name, version)
        who = label(kind, name)
        with io_errors(f"changing the current version of {who}"), self._task_lock(kind, name):
            manifest = self._manifest(vdir)
            if manifest is None:
                raise NotFound(f"{who} has no version {version}")
            try:
                state = self._read_state(kind, name) or {"version": None, "last_version": 0}
            except ArtifactCorrupt:
                if expected is not None:
                    raise
                # Setting the pointer outright is how an operator repairs a damaged one.
                state = {"version": None, "last_version": max(self._scan(kind, name), default=0)}
            if expected is not None and state["version"] != expected:
                raise VersionConflict(f"the current version of {who} is {state['version']}, not {expected}")
            if state["version"] != version:
                last = max(version, state["last_version"] or 0)
                self._write_state(kind, name, {"version": version, "last_version": last})
            return version_info(kind, name, version, manifest)

    def delete_version(self, kind: str, name: str, version: int) -> None:
        """Remove one version; if it was current, the newest remaining one becomes current."""
        vdir = self._version_dir(kind, name, version)
        who = label(kind, name)
        with io_errors(f"deleting version {version} of {who}"), self._task_lock(kind, name):
            versions = self._scan(kind, name)
            # A version with a damaged manifest can still be deleted.
            if version not in versions and not is_plain_dir(vdir):
                raise NotFound(f"{who} has no version {version}")
            remaining = [v for v in versions if v != version]
            if not remaining:
                self._remove_task_dir(kind, vdir.parent)
                return
            state = self._read_state(kind, name)
            if state and state["version"] == version:
                # Pointer first: a crash then leaves an extra version, never a dangling pointer.
                self._write_state(
                    kind, name, {"version": max(remaining), "last_version": state["last_version"]}
                )
            trash = vdir.parent / f"{_TRASH}{secrets.token_hex(8)}"
            durable.fs.rename(vdir, trash)
            _step("trash_renamed")
            fsync_dir(vdir.parent)
            _step("trash_synced")
            remove_tree(trash)

    def delete(self, kind: str, name: str) -> None:
        """Remove a name and all its versions at once."""
        task_dir = self._task_dir(kind, name)
        who = label(kind, name)
        with io_errors(f"deleting {who}"), self._task_lock(kind, name):
            if not self._scan(kind, name):
                raise NotFound(f"{who} does not exist")
            self._remove_task_dir(kind, task_dir)

    # -- reading --------------------------------------------------------------------------------------

    def get(self, kind: str, name: str, version: int | None = None) -> StoredArtifact:
        """Return a version (None: the current one) after checking both files against the manifest."""
        if version is None:
            version = self.current_version(kind, name)
            if version is None:
                raise NotFound(f"{label(kind, name)} has no current version")
        manifest, config = self._verified(kind, name, version, weights=True)
        return StoredArtifact(
            info=version_info(kind, name, version, manifest),
            config_bytes=config,
            weights_path=self._version_dir(kind, name, version) / _FILES[kind][1],
        )

    def get_config(self, kind: str, name: str, version: int) -> bytes:
        """One version's config bytes, checked against the manifest (the weights are not read)."""
        return self._verified(kind, name, version, weights=False)[1]

    def _verified(self, kind: str, name: str, version: int, *, weights: bool) -> tuple[dict, bytes]:
        """A version's manifest and config bytes, after checking the config (and `weights`) file."""
        who = label(kind, name)
        vdir = self._version_dir(kind, name, version)
        config_name, weights_name = _FILES[kind]
        with io_errors(f"reading {who} version {version}"):
            manifest = self._manifest(vdir)
            if manifest is None:
                if not is_plain_dir(vdir):
                    raise NotFound(f"{who} has no version {version}")
                raise ArtifactCorrupt(f"{who} version {version}: its manifest is missing or unreadable")
            what = f"{who} version {version}"
            try:
                config = durable.verified_file(
                    vdir / config_name, manifest["config"], f"{what} config", keep=True
                )
                if weights:
                    durable.verified_file(
                        vdir / weights_name, manifest["weights"], f"{what} weights", keep=False
                    )
            except ArtifactCorrupt:
                if not is_plain_dir(vdir):
                    raise NotFound(f"{who} has no version {version}; it was just deleted") from None
                raise
        return manifest, config

    def current_version(self, kind: str, name: str) -> int | None:
        """The current version of a name, or None when none is active; NotFound for an unknown name."""
        who = label(kind, name)
        with io_errors(f"reading {who}"):
            state = self._read_state(kind, name)
            if state is None:
                if not self._scan(kind, name):
                    raise NotFound(f"{who} does not exist")
                return None
            return state["version"]

    def list_names(self, kind: str) -> list[str]:
        """Names of the given kind that hold at least one version, sorted."""
        check_kind(kind)
        with io_errors(f"listing {kind}"):
            return [name for name in self._names_on_disk(kind) if self._scan(kind, name)]

    def list_versions(self, kind: str, name: str) -> list[VersionInfo]:
        """All versions of a name, oldest first; NotFound for an unknown name."""
        with io_errors(f"listing {label(kind, name)}"):
            versions = self._scan(kind, name)
        if not versions:
            raise NotFound(f"{label(kind, name)} does not exist")
        return list(versions.values())

"""Durable file primitives for the filesystem store: exclusive create + fsync, directory fsync, hashing.

Every system call of the write path goes through `fs`, so tests can replace it and inject ENOSPC or EIO
at any single call.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from store.errors import ArtifactCorrupt, StoreFull, StoreUnavailable

__all__ = [
    "FS",
    "flocked",
    "fs",
    "fsync_dir",
    "hash_file",
    "io_errors",
    "is_plain_dir",
    "read_chunks",
    "read_small_json",
    "remove_if_abandoned",
    "remove_tree",
    "unlink_lock",
    "verified_file",
    "write_file",
]

log = logging.getLogger(__name__)

MAX_SMALL_FILE = 64 << 10
_CHUNK = 1 << 20
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Errors that mean "this entry is not a readable file of ours", as opposed to an I/O failure.
_ABSENT_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


class FS:
    """The os calls of the write path, behind one replaceable object."""

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        """os.open, close-on-exec."""
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        """os.write."""
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        """os.fsync."""
        os.fsync(fd)

    def close(self, fd: int) -> None:
        """os.close."""
        os.close(fd)

    def mkdir(self, path: Path) -> None:
        """os.mkdir with mode 0755."""
        os.mkdir(path, 0o755)

    def rename(self, src: Path, dst: Path) -> None:
        """os.rename."""
        os.rename(src, dst)

    def replace(self, src: Path, dst: Path) -> None:
        """os.replace."""
        os.replace(src, dst)


fs = FS()


def io_error(exc: OSError, what: str, *, undone: bool = False) -> StoreFull | StoreUnavailable:
    """Map an OSError to StoreFull (no space) or StoreUnavailable, with a message free of paths."""
    # strerror only: str(exc) would carry a filesystem path into a client-visible message.
    reason = exc.strerror or type(exc).__name__
    outcome = "; nothing was changed" if undone else ""
    if exc.errno in _FULL_ERRNOS:
        return StoreFull(f"the store ran out of space while {what}{outcome}", reason=reason)
    return StoreUnavailable(f"the store failed while {what}: {reason}{outcome}", reason=reason)


@contextlib.contextmanager
def io_errors(what: str, *, undone: bool = False) -> Iterator[None]:
    """Turn OSError raised inside the block into the store's typed errors (`undone`: the write was undone)."""
    try:
        yield
    except OSError as exc:
        raise io_error(exc, what, undone=undone) from None


def is_plain_dir(path: Path) -> bool:
    """True for a real directory, False for a symlink, a file or nothing."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def remove_tree(path: Path) -> None:
    """Remove a tree (or a file or link) we own; an entry that vanished meanwhile is not an error."""

    def onerror(func: object, p: str, info: tuple[type[BaseException], BaseException, object]) -> None:
        if not isinstance(info[1], FileNotFoundError):
            log.warning("could not remove %s: %s", p, info[1])

    if not is_plain_dir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    # shutil.rmtree never follows symlinks inside the tree.
    shutil.rmtree(path, onerror=onerror)


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (creations, renames) durable."""
    fd = fs.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fs.fsync(fd)
    finally:
        fs.close(fd)


def write_file(path: Path, chunks: Iterable[bytes]) -> tuple[str, int]:
    """Create `path` exclusively (never through a symlink), write and fsync it; return sha256 and size."""
    digest, size = hashlib.sha256(), 0
    fd = fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[fs.write(fd, view) :]
        fs.fsync(fd)
    finally:
        fs.close(fd)
    return digest.hexdigest(), size


def read_chunks(path: Path) -> Iterator[bytes]:
    """Yield a file's bytes in 1 MiB chunks."""
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            yield chunk


def hash_file(path: Path, *, keep_up_to: int) -> tuple[str, int, bytes | None]:
    """sha256 and size of a file (never through a symlink), and its bytes when at most keep_up_to long."""
    digest, size, kept = hashlib.sha256(), 0, []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if size <= keep_up_to:
                kept.append(chunk)
    return digest.hexdigest(), size, b"".join(kept) if size <= keep_up_to else None


def read_small_json(path: Path) -> object:
    """Parse a small JSON file of ours; None when absent, a symlink, too large or malformed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        # Real I/O errors propagate: treating them as "absent" would let recovery delete good data.
        if exc.errno in _ABSENT_ERRNOS:
            return None
        raise
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(MAX_SMALL_FILE + 1)
    if len(raw) > MAX_SMALL_FILE:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if needed) for the duration of the block.

    The holder may unlink `path` before leaving the block (see `unlink_lock`): whoever was waiting on
    the unlinked file sees that it is no longer the one at `path` and locks the path afresh, so every
    holder always holds the lock of the file that is at `path`.
    """
    while True:
        # A fresh open file description per acquisition, so the lock also excludes threads of one process.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def unlink_lock(path: Path) -> None:
    """Remove the lock file `path`; only while holding its flock (inside `flocked(path)`)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def remove_if_abandoned(path: Path) -> bool:
    """Remove a temp directory unless its writer still holds a flock on it; True when removed.

    Plain files are removed outright: the caller holds the lock under which they are written.
    """
    if not is_plain_dir(path):
        remove_tree(path)
        return True
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        remove_tree(path)
        return True
    finally:
        os.close(fd)


def verified_file(path: Path, entry: object, what: str, *, keep: bool) -> bytes:
    """Check a stored file against its manifest entry (size, sha256); return its bytes when `keep`."""
    expected_size, expected_sha = entry["size"], entry["sha256"]  # type: ignore[index]
    try:
        sha, size, data = hash_file(path, keep_up_to=expected_size if keep else 0)
    except FileNotFoundError:
        raise ArtifactCorrupt(f"{what}: the file is missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ArtifactCorrupt(f"{what}: the file was replaced by a symbolic link") from None
        raise
    if size != expected_size or sha != expected_sha:
        raise ArtifactCorrupt(f"{what}: the file does not match its recorded sha256; restore or re-upload it")
    return data or b""

"""store.durable's error mapping: what a client is told when the disk fails, and that no path leaks."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import threading
import time

import pytest

from store import durable
from store.errors import ArtifactCorrupt, StoreFull, StoreUnavailable


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_out_of_space_is_store_full(code: int) -> None:
    exc = OSError(code, "No space left", "/srv/secret/path")
    error = durable.io_error(exc, "storing task 'a'", undone=True)
    assert type(error) is StoreFull
    assert error.message == "the store ran out of space while storing task 'a'; nothing was changed"
    assert error.details == {"reason": "No space left"}
    assert "/srv" not in error.message


def test_any_other_failure_is_store_unavailable_with_its_reason() -> None:
    error = durable.io_error(OSError(errno.EIO, "Input/output error", "/srv/x"), "reading task 'a'")
    assert type(error) is StoreUnavailable
    assert error.message == "the store failed while reading task 'a': Input/output error"
    assert error.details == {"reason": "Input/output error"}
    undone = durable.io_error(OSError(errno.EIO, "Input/output error"), "storing", undone=True)
    assert undone.message == "the store failed while storing: Input/output error; nothing was changed"


def test_an_error_without_strerror_is_named_by_its_type() -> None:
    error = durable.io_error(PermissionError(), "listing tasks")
    assert error.message == "the store failed while listing tasks: PermissionError"
    assert error.details == {"reason": "PermissionError"}


def test_io_errors_turns_os_errors_into_store_errors_and_lets_others_through() -> None:
    with pytest.raises(StoreFull) as info, durable.io_errors("storing", undone=True):
        raise OSError(errno.ENOSPC, "No space left")
    assert info.value.message.endswith("; nothing was changed")
    assert info.value.__suppress_context__  # `from None`: the OSError (with its path) is not chained
    with pytest.raises(ValueError), durable.io_errors("storing"):
        raise ValueError("not an I/O error")


def test_hash_file_keeps_bytes_only_up_to_the_limit(tmp_path) -> None:

    path = tmp_path / "f"
    data = b"x" * 100
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    assert durable.hash_file(path, keep_up_to=100) == (sha, 100, data)
    assert durable.hash_file(path, keep_up_to=99) == (sha, 100, None)
    big = tmp_path / "big"
    blob = bytes(range(256)) * 4097  # more than one 1 MiB read
    big.write_bytes(blob)
    assert durable.hash_file(big, keep_up_to=len(blob)) == (hashlib.sha256(blob).hexdigest(), len(blob), blob)
    empty = tmp_path / "e"
    empty.write_bytes(b"")
    assert durable.hash_file(empty, keep_up_to=0) == (hashlib.sha256(b"").hexdigest(), 0, b"")


def test_small_json_is_read_up_to_its_limit_and_never_through_a_link(tmp_path) -> None:

    limit = durable.MAX_SMALL_FILE
    exact = tmp_path / "exact.json"
    body = json.dumps("x" * (limit - 2)).encode()  # a JSON string of exactly `limit` bytes
    assert len(body) == limit
    exact.write_bytes(body)
    assert durable.read_small_json(exact) == "x" * (limit - 2)
    over = tmp_path / "over.json"
    over.write_bytes(json.dumps("x" * (limit - 1)).encode())
    assert durable.read_small_json(over) is None
    link = tmp_path / "link.json"
    os.symlink(exact, link)
    assert durable.read_small_json(link) is None
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"{not json")
    assert durable.read_small_json(bad) is None
    assert durable.read_small_json(tmp_path / "absent.json") is None


def test_write_file_creates_exclusively_never_through_a_link_and_reports_the_bytes(tmp_path) -> None:

    path = tmp_path / "f"
    assert durable.write_file(path, [b"ab", b"cd"]) == (hashlib.sha256(b"abcd").hexdigest(), 4)
    assert path.read_bytes() == b"abcd"
    with pytest.raises(FileExistsError):
        durable.write_file(path, [b"x"])
    target = tmp_path / "target"
    os.symlink(target, tmp_path / "link")
    with pytest.raises(OSError):
        durable.write_file(tmp_path / "link", [b"x"])
    assert not target.exists()


def test_store_directories_are_made_with_mode_755(tmp_path) -> None:

    old = os.umask(0)
    try:
        durable.fs.mkdir(tmp_path / "d")
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_remove_if_abandoned_spares_a_dir_its_writer_still_locks(tmp_path) -> None:

    plain = tmp_path / "file"
    plain.write_bytes(b"x")
    assert durable.remove_if_abandoned(plain) is True and not plain.exists()
    held = tmp_path / "held"
    held.mkdir()
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert durable.remove_if_abandoned(held) is False and held.is_dir()
    finally:
        os.close(fd)
    assert durable.remove_if_abandoned(held) is True and not held.exists()


def test_verified_file_returns_the_bytes_it_checked(tmp_path) -> None:

    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    entry = {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    assert durable.verified_file(empty, entry, "config", keep=True) == b""
    os.symlink(empty, tmp_path / "link")
    with pytest.raises(ArtifactCorrupt) as info:
        durable.verified_file(tmp_path / "link", entry, "config", keep=True)
    assert info.value.message == "config: the file was replaced by a symbolic link"


def _waiting_on(path_ino: int) -> bool:
    """True when some flock waits on the inode (Linux lists blocked waiters in /proc/locks with '->')."""
    with open("/proc/locks") as fh:
        return any("->" in line and line.split()[-3].endswith(f":{path_ino}") for line in fh)


def _until(cond, *, timeout: float = 10.0) -> None:
    # Another thread blocking in flock(2) has no event to wait on: the kernel's lock table is polled.
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs Linux's /proc/locks")
def test_a_lock_file_unlinked_by_its_holder_still_excludes_a_waiter(tmp_path) -> None:
    path = tmp_path / "name.lock"
    entered_a, unlink_now, unlinked, release_a, inside_b = (threading.Event() for _ in range(5))

    def holder_a() -> None:
        with durable.flocked(path):
            entered_a.set()
            unlink_now.wait(10)
            durable.unlink_lock(path)
            unlinked.set()
            release_a.wait(10)

    def waiter_b() -> None:
        with durable.flocked(path):
            inside_b.set()

    a = threading.Thread(target=holder_a)
    a.start()
    assert entered_a.wait(10)
    old_ino = os.stat(path).st_ino
    b = threading.Thread(target=waiter_b)
    b.start()
    _until(lambda: _waiting_on(old_ino))  # b waits on the file that a is about to unlink
    unlink_now.set()
    assert unlinked.wait(10)
    with durable.flocked(path):
        # This thread got in at once, on a new lock file.
        new_ino = os.stat(path).st_ino
        assert new_ino != old_ino
        release_a.set()
        a.join(10)
        # b woke on the unlinked file, saw it was no longer the lock at `path` and now waits on this one.
        _until(lambda: _waiting_on(new_ino))
        assert not inside_b.is_set()
    b.join(10)
    assert inside_b.is_set()
    assert path.exists()  # only a holder that means to unlink the file does so

"""store.durable's error mapping: what a client is told when the disk fails, and that no path leaks."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os

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

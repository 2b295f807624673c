"""store.durable's error mapping: what a client is told when the disk fails, and that no path leaks."""

from __future__ import annotations

import errno

import pytest

from store import durable
from store.errors import StoreFull, StoreUnavailable


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
    import hashlib

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

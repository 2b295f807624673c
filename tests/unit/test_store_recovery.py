"""Recovery at open: a name whose only entries are temp dirs is kept while any writer still holds one."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from store.local import LocalStore


def test_a_live_writer_keeps_its_new_name_while_abandoned_temps_go(tmp_path: Path) -> None:
    root = tmp_path / "store"
    LocalStore(root)
    task_dir = root / "tasks" / "t"
    task_dir.mkdir()
    live = task_dir / ".tmp-live"
    live.mkdir()
    abandoned = [task_dir / f".tmp-gone{i}" for i in range(4)]
    for path in abandoned:
        path.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what put_version holds while it writes
    try:
        LocalStore(root)  # another process opening the store recovers
        assert live.is_dir() and task_dir.is_dir()
        assert not any(p.exists() for p in abandoned)
    finally:
        os.close(fd)
    LocalStore(root)  # the writer is gone: its temp and the empty name go too
    assert not task_dir.exists()

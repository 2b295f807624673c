"""Power loss: after a cut at any point, every acknowledged change survives and nothing partial shows.

SIGKILL keeps the page cache, so the crash tests in test_store_local.py cannot see a missing fsync.
Here `PowerLossFS` replaces the store's system-call layer (`store.durable.fs`) and keeps what a power
cut could no longer take away: a file's bytes as of its last fsync, and a directory's entries as of
the last fsync of that directory. After every call it also notes the live tree. For each point of a
scripted run (uploads, activation changes, deletions) it builds the trees a disk could hold after a
cut there: the fsynced state, plus any subset of the directory-entry changes made since (a rename is
one change; the bytes of files never fsynced are lost), opens a store on each, and checks it against
the acknowledged history.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from store import durable
from store.base import KINDS
from store.errors import AdapterServeError
from store.local import LocalStore

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads fsynced files back through /proc/self/fd"
)

Key = tuple[int, int]
"""An inode and its generation (inode numbers are reused after deletion)."""
Listing = dict[str, tuple[Key, bool]]
"""A directory's entries: name -> (key, is a directory)."""
EXHAUSTIVE_UNITS = 6
"""Up to this many pending entry changes, every subset is tried; above it, each one alone and all."""


@dataclass
class Point:
    """What a power cut at one moment could leave, and which acknowledgements preceded it."""

    dirs: dict[Key, Listing]
    files: dict[Key, bytes]
    live: dict[Key, Listing]
    acks: int
    at_ack: bool


class PowerLossFS(durable.FS):
    """The store's system calls, noting after each one what is durable and what is only live."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gen: dict[int, int] = {}
        self.dirs: dict[Key, Listing] = {}
        self.files: dict[Key, bytes] = {}
        self.points: list[Point] = []
        self.acks = 0
        # what exists when the run starts is durable (the test made the empty root itself)
        self.dirs = self._live()
        self.root_key = self._key(os.lstat(root).st_ino)
        self._note()

    def _key(self, ino: int) -> Key:
        return ino, self.gen.get(ino, 0)

    def _born(self, ino: int) -> None:
        self.gen[ino] = self.gen.get(ino, 0) + 1

    def _listing(self, path: Path) -> Listing:
        with os.scandir(path) as it:
            return {e.name: (self._key(e.inode()), e.is_dir(follow_symlinks=False)) for e in it}

    def _live(self) -> dict[Key, Listing]:
        out: dict[Key, Listing] = {}
        todo = [self.root]
        while todo:
            path = todo.pop()
            listing = self._listing(path)
            out[self._key(os.lstat(path).st_ino)] = listing
            todo += [path / name for name, (_, is_dir) in listing.items() if is_dir]
        return out

    def _note(self, *, at_ack: bool = False) -> None:
        self.points.append(Point(dict(self.dirs), dict(self.files), self._live(), self.acks, at_ack))

    def ack(self) -> None:
        """The store just returned from a call: its effect is promised from here on."""
        self.acks += 1
        self._note(at_ack=True)

    def open(self, path, flags, mode=0o644):  # type: ignore[no-untyped-def]
        fd = super().open(path, flags, mode)
        if flags & os.O_CREAT:
            self._born(os.fstat(fd).st_ino)
        self._note()
        return fd

    def write(self, fd, data):  # type: ignore[no-untyped-def]
        n = super().write(fd, data)
        self._note()
        return n

    def fsync(self, fd):  # type: ignore[no-untyped-def]
        super().fsync(fd)
        st = os.fstat(fd)
        proc = Path(f"/proc/self/fd/{fd}")
        if stat.S_ISDIR(st.st_mode):
            self.dirs[self._key(st.st_ino)] = self._listing(proc)
        else:
            self.files[self._key(st.st_ino)] = proc.read_bytes()
        self._note()

    def close(self, fd):  # type: ignore[no-untyped-def]
        super().close(fd)
        self._note()

    def mkdir(self, path):  # type: ignore[no-untyped-def]
        super().mkdir(path)
        self._born(os.lstat(path).st_ino)
        self._note()

    def rename(self, src, dst):  # type: ignore[no-untyped-def]
        super().rename(src, dst)
        self._note()

    def replace(self, src, dst):  # type: ignore[no-untyped-def]
        super().replace(src, dst)
        self._note()


class _NoSync(durable.FS):
    """The store's system calls without fsync."""

    def fsync(self, fd):  # type: ignore[no-untyped-def]
        return None


def _units(point: Point) -> list[tuple[Key, dict[str, tuple[Key, bool] | None]]]:
    """The directory-entry changes not yet fsynced, one per unit (a rename's two names together)."""
    out = []
    for d in sorted(set(point.dirs) | set(point.live)):
        old, new = point.dirs.get(d, {}), point.live.get(d, {})
        changed = {n: new.get(n) for n in set(old) | set(new) if old.get(n) != new.get(n)}
        groups: dict[Key, dict[str, tuple[Key, bool] | None]] = {}
        for name, value in sorted(changed.items()):
            # an entry that moved keeps its inode: the old and the new name change together
            inode = value[0] if value is not None else old[name][0]
            groups.setdefault(inode, {})[name] = value
        out += [(d, g) for g in groups.values()]
    return out


def _subsets(n: int):
    if n <= EXHAUSTIVE_UNITS:
        yield from itertools.product((False, True), repeat=n)
        return
    yield (False,) * n
    yield (True,) * n
    for i in range(n):
        yield tuple(j == i for j in range(n))
        yield tuple(j != i for j in range(n))


def disks(point: Point, root_key: Key):
    """Every tree (nested dicts, file bytes) a disk could hold after a power cut at `point`."""
    units = _units(point)
    for chosen in _subsets(len(units)):
        dirs = {k: dict(v) for k, v in point.dirs.items()}
        for (d, change), on in zip(units, chosen, strict=True):
            if on:
                listing = dirs.setdefault(d, {})
                for name, value in change.items():
                    if value is None:
                        listing.pop(name, None)
                    else:
                        listing[name] = value
        yield _tree(root_key, dirs, point.files, depth=0)


def _tree(key: Key, dirs: dict[Key, Listing], files: dict[Key, bytes], *, depth: int) -> dict:
    assert depth < 8
    out: dict[str, dict | bytes] = {}
    for name, (k, is_dir) in sorted(dirs.get(key, {}).items()):
        out[name] = _tree(k, dirs, files, depth=depth + 1) if is_dir else files.get(k, b"")
    return out


def _write(tree: dict, path: Path) -> None:
    path.mkdir()
    for name, value in tree.items():
        if isinstance(value, dict):
            _write(value, path / name)
        else:
            (path / name).write_bytes(value)


State = dict[tuple[str, str], dict]
"""Acknowledged content: (kind, name) -> {"versions": {n: (config, weights)}, "current": n | None}."""


def observe(root: Path) -> State:
    """What a store opened on `root` (recovery included) serves, every version read and verified."""
    store = LocalStore(root)
    out: State = {}
    for kind in KINDS:
        for name in store.list_names(kind):
            versions = {}
            for info in store.list_versions(kind, name):
                art = store.get(kind, name, info.version)
                versions[info.version] = (art.config_bytes, art.weights_path.read_bytes())
            out[(kind, name)] = {"versions": versions, "current": store.current_version(kind, name)}
    return out


def check(seen: State, before: State, after: State) -> str | None:
    """Why `seen` is not a state a cut between `before` and `after` may leave, or None."""
    for key in set(before) | set(after) | set(seen):
        b, a, s = (x.get(key, {"versions": {}, "current": None}) for x in (before, after, seen))
        for v, content in s["versions"].items():
            if content not in (b["versions"].get(v), a["versions"].get(v)):
                return f"{key} version {v} is visible but was never stored with that content"
        for v, content in b["versions"].items():
            if a["versions"].get(v) == content and s["versions"].get(v) != content:
                return f"{key} version {v} was acknowledged but is missing or damaged"
        if s["current"] not in (b["current"], a["current"]):
            return f"{key} current is {s['current']}, neither {b['current']} nor {a['current']}"
        if s["current"] is not None and s["current"] not in s["versions"]:
            return f"{key} current {s['current']} is not a stored version"
    return None


def _history(store: LocalStore, fs: PowerLossFS, tmp_path: Path) -> list[State]:
    """Uploads, an inactive upload, activation changes, version and name deletions; each acknowledged."""
    state: State = {}
    history = [_copy(state)]
    n = itertools.count()

    def put(name: str, *, activate: bool = True) -> None:
        i = next(n)
        config = f'{{"upload": {i}}}'.encode()
        weights = hashlib.sha256(config).digest() * 40
        src = tmp_path / f"src-{i}"
        src.write_bytes(weights)
        info = store.put_version("tasks", name, config_bytes=config, weights_src=src, activate=activate)
        entry = state.setdefault(("tasks", name), {"versions": {}, "current": None})
        entry["versions"][info.version] = (config, weights)
        if activate:
            entry["current"] = info.version
        done()

    def done() -> None:
        fs.ack()
        history.append(_copy(state))

    put("alpha")
    put("alpha")
    put("alpha", activate=False)
    put("beta")
    store.set_current("tasks", "alpha", 1)
    state[("tasks", "alpha")]["current"] = 1
    done()
    # pointer to a new version while a newer inactive one exists: a pointer that became durable before
    # the version it names would be repaired to version 3, which was never current
    put("alpha")
    store.delete_version("tasks", "alpha", 4)
    del state[("tasks", "alpha")]["versions"][4]
    state[("tasks", "alpha")]["current"] = 3
    done()
    store.delete_version("tasks", "alpha", 2)
    del state[("tasks", "alpha")]["versions"][2]
    done()
    store.delete("tasks", "beta")
    del state[("tasks", "beta")]
    done()
    put("beta")
    return history


def _copy(state: State) -> State:
    return {k: {"versions": dict(v["versions"]), "current": v["current"]} for k, v in state.items()}


def test_every_power_cut_keeps_what_was_acknowledged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At every point of the run, every disk a power cut could leave opens to an allowed state."""
    root = tmp_path / "store"
    root.mkdir()
    fs = PowerLossFS(root)
    monkeypatch.setattr(durable, "fs", fs)
    (tmp_path / "src").mkdir()
    history = _history(LocalStore(root), fs, tmp_path / "src")
    # the disks below are only read back: recovery's own fsyncs would cost time and prove nothing
    monkeypatch.setattr(durable, "fs", _NoSync())
    assert fs.acks == len(history) - 1 and len(fs.points) > 100
    checked: dict[tuple, str | None] = {}
    served: dict[str, State | str] = {}
    failures = []
    for i, point in enumerate(fs.points):
        before = history[point.acks]
        after = before if point.at_ack else history[min(point.acks + 1, len(history) - 1)]
        for tree in disks(point, fs.root_key):
            text = repr(tree)
            if text not in served:
                disk = tmp_path / f"disk-{len(served)}"
                _write(tree, disk)
                try:
                    served[text] = observe(disk)
                except AdapterServeError as exc:
                    served[text] = f"the store fails after recovery: {exc}"
            fingerprint = (text, point.acks, point.at_ack)
            if fingerprint not in checked:
                seen = served[text]
                checked[fingerprint] = seen if isinstance(seen, str) else check(seen, before, after)
            if checked[fingerprint] is not None:
                failures.append(f"point {i} (after {point.acks} acks): {checked[fingerprint]}")
    assert len(served) > 100  # many distinct disks were tried, not one
    assert not failures, "\n".join(failures[:5])

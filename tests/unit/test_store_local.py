"""The filesystem store: versions, integrity, hostile names and symlinks, I/O faults, races and crashes."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from store import durable, local
from store.errors import (
    ArtifactCorrupt,
    InvalidArtifact,
    InvalidName,
    NotFound,
    StoreFull,
    StoreUnavailable,
    VersionConflict,
)
from store.local import PUT_STEPS, LocalStore, validate_name

# fork: children inherit the test's module state (crash hooks) without pickling closures.
FORK = mp.get_context("fork")
CONFIG = b'{"method": "lora", "r": 4}'


def make_weights(directory: Path, content: bytes = b"weights-" * 64, name: str = "src.bin") -> Path:
    path = directory / name
    path.write_bytes(content)
    return path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under the store with its bytes (None for directories), lock files included."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for d in dirnames:
            out[str(rel / d)] = None
        for f in filenames:
            out[str(rel / f)] = (Path(dirpath) / f).read_bytes()
    return out


def leftovers(root: Path) -> list[str]:
    return [
        str(Path(dp) / n)
        for dp, dns, fns in os.walk(root)
        for n in dns + fns
        if n.startswith((".tmp-", ".trash-"))
    ]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> LocalStore:
    return LocalStore(root)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_weights(tmp_path)


# The backend-neutral contract (versions, the pointer, deletes, limits, names, thread races) runs on this
# store and on the S3 one in test_store_contract.py; what follows is particular to the filesystem.


# -- integrity -------------------------------------------------------------------------------------------


def _edit_manifest(vdir: Path, edit: Callable[[dict], object]) -> None:
    manifest = json.loads((vdir / "manifest.json").read_text())
    edit(manifest)
    (vdir / "manifest.json").write_text(json.dumps(manifest))


def _flip(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda v: _flip(v / "adapter_config.json", 3),
        lambda v: _flip(v / "adapter.safetensors", 100),
        lambda v: (v / "adapter.safetensors").write_bytes((v / "adapter.safetensors").read_bytes()[:-1]),
        lambda v: (v / "adapter.safetensors").write_bytes((v / "adapter.safetensors").read_bytes() + b"\0"),
        lambda v: (v / "adapter_config.json").unlink(),
        lambda v: _edit_manifest(v, lambda m: m["weights"].update(sha256="0" * 64)),
        lambda v: _edit_manifest(v, lambda m: m["config"].update(size=m["config"]["size"] + 1)),
        lambda v: (v / "manifest.json").write_text("{not json"),
    ],
    ids=[
        "config-bit",
        "weights-bit",
        "truncated",
        "extended",
        "config-missing",
        "manifest-sha",
        "manifest-size",
        "manifest-junk",
    ],
)
def test_damage_is_detected_on_read(store: LocalStore, src: Path, root: Path, damage: Callable) -> None:
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src, activate=False)
    damage(root / "tasks" / "t" / "v1")
    with pytest.raises(ArtifactCorrupt) as info:
        store.get("tasks", "t")
    assert "task 't' version 1" in str(info.value)
    assert str(root) not in str(info.value)
    assert store.get("tasks", "t", 2).config_bytes == CONFIG


def test_get_config_checks_the_config_file_alone(store: LocalStore, src: Path, root: Path) -> None:
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
    v1 = root / "tasks" / "t" / "v1"
    assert store.get_config("tasks", "t", 1) == CONFIG
    # damaged weights fail a full read but not a config read
    (v1 / "adapter.safetensors").write_bytes(b"x" + (v1 / "adapter.safetensors").read_bytes()[1:])
    with pytest.raises(ArtifactCorrupt):
        store.get("tasks", "t", 1)
    assert store.get_config("tasks", "t", 1) == CONFIG
    (v1 / "adapter_config.json").write_bytes(CONFIG.replace(b"4", b"8"))
    with pytest.raises(ArtifactCorrupt, match="task 't' version 1 config"):
        store.get_config("tasks", "t", 1)
    with pytest.raises(NotFound):
        store.get_config("tasks", "t", 2)


def test_unreadable_manifest_is_ignored_but_kept(store: LocalStore, src: Path, root: Path) -> None:
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
    (root / "tasks/t/v2/manifest.json").write_text("{")
    assert [v.version for v in store.list_versions("tasks", "t")] == [1]
    LocalStore(root)
    # The data beside a damaged manifest may be the only copy: listings skip it, nothing deletes it.
    assert (root / "tasks/t/v2/adapter.safetensors").exists()
    store.delete_version("tasks", "t", 2)
    assert not (root / "tasks/t/v2").exists()


def test_recovery_at_open(store: LocalStore, src: Path, root: Path) -> None:
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
    task = root / "tasks" / "t"
    for junk in (".tmp-abc", ".trash-def", "v7"):
        (task / junk).mkdir()
        (task / junk / "adapter.safetensors").write_bytes(b"partial")
    (task / ".tmp-current-1").write_bytes(b"{")
    (root / "tasks" / ".trash-old" / "v1").mkdir(parents=True)
    (root / "tasks" / "empty").mkdir()
    live = task / ".tmp-live"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer in another process still working on it
    try:
        reopened = LocalStore(root)
    finally:
        os.close(fd)
    assert sorted(os.listdir(task)) == [".tmp-live", "current.json", "v1"]
    assert sorted(os.listdir(root / "tasks")) == ["t"]
    assert [v.version for v in reopened.list_versions("tasks", "t")] == [1]
    LocalStore(root)
    assert leftovers(root) == []


def test_damaged_pointer_fails_only_its_task(store: LocalStore, src: Path, root: Path) -> None:
    store.put_version("tasks", "a", config_bytes=CONFIG, weights_src=src)
    store.put_version("tasks", "b", config_bytes=CONFIG, weights_src=src)
    (root / "tasks/a/current.json").write_text("{")
    reopened = LocalStore(root)
    with pytest.raises(ArtifactCorrupt, match="task 'a'"):
        reopened.get("tasks", "a")
    assert reopened.get("tasks", "b").config_bytes == CONFIG
    with pytest.raises(ArtifactCorrupt):
        reopened.set_current("tasks", "a", 1, expected=1)
    reopened.set_current("tasks", "a", 1)
    assert reopened.get("tasks", "a").info.version == 1


def test_dangling_pointer_is_repaired_at_open(store: LocalStore, src: Path, root: Path) -> None:
    for _ in range(3):
        store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
    os.rename(root / "tasks/t/v3", root / "tasks/t/.trash-x")  # as if deleted behind the store's back
    assert LocalStore(root).current_version("tasks", "t") == 2


# -- names and symlinks ----------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "../x", "..", ".", "/etc", "/etc/passwd", "%2e%2e", "%2e%2e%2fx", "a/b", "a\\b", "a\x00b", "x" * 300,
    "x" * 65, "A", "Sst2", "аbc", "ｓｓｔ２", "sst2\n", "\nsst2", " sst2", "sst2 ", "", "-x", "_x", ".hidden",
    "a..b", "a/../b", "~root", "$HOME", "a:b", "a*b", "a?b", "sst\u200b2", "straße", "café", "a\tb",
    "a;rm -rf", "tasks/../../x", "x\r", "\u2024\u2024", "a\u2215b", "a\uff0fb", "..\\..\\x", "ǅ",
    123, None, b"abc",
]  # fmt: skip


def test_hostile_name_count() -> None:
    assert len(HOSTILE_NAMES) >= 30


@pytest.mark.parametrize("name", ["a", "0", "sst2", "my-task_v1.2", "a" * 64, "x.y-z_0"])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


def _fake_version(directory: Path, src: Path) -> None:
    """A complete-looking version directory outside the store."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_bytes(CONFIG)
    (directory / "adapter.safetensors").write_bytes(src.read_bytes())
    sha = hashlib.sha256
    manifest = {
        "created_at": "2020-01-01T00:00:00+00:00",
        "config": {"sha256": sha(CONFIG).hexdigest(), "size": len(CONFIG)},
        "weights": {"sha256": sha(src.read_bytes()).hexdigest(), "size": src.stat().st_size},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_planted_task_symlink_cannot_escape(store: LocalStore, src: Path, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _fake_version(outside / "v1", src)
    (outside / "current.json").write_text('{"version": 1, "last_version": 1}')
    before_outside = snapshot(outside)
    os.symlink(outside, root / "tasks" / "evil")
    with pytest.raises((StoreUnavailable, InvalidName)) as info:
        store.put_version("tasks", "evil", config_bytes=CONFIG, weights_src=src)
    assert str(tmp_path) not in str(info.value)
    for call in (store.get, store.current_version, store.list_versions, store.delete):
        with pytest.raises((StoreUnavailable, InvalidName)):
            call("tasks", "evil")
    assert store.list_names("tasks") == []
    LocalStore(root)  # recovery must not follow it either
    assert snapshot(outside) == before_outside


def test_planted_version_and_file_symlinks(store: LocalStore, src: Path, root: Path, tmp_path: Path) -> None:
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
    outside = tmp_path / "outside"
    _fake_version(outside / "v2", src)
    os.symlink(outside / "v2", root / "tasks/t/v2")
    assert [v.version for v in store.list_versions("tasks", "t")] == [1]
    with pytest.raises(StoreUnavailable):
        store.get("tasks", "t", 2)
    with pytest.raises(StoreUnavailable):
        store.set_current("tasks", "t", 2)
    # Same bytes, but through a link: refused rather than followed.
    weights = root / "tasks/t/v1/adapter.safetensors"
    weights.unlink()
    os.symlink(outside / "v2" / "adapter.safetensors", weights)
    with pytest.raises(ArtifactCorrupt):
        store.get("tasks", "t", 1)
    LocalStore(root)
    assert (outside / "v2" / "adapter.safetensors").exists()
    assert not os.path.lexists(root / "tasks/t/v2")


@pytest.mark.parametrize("entry", ["tasks", ".locks"])
def test_symlinked_layout_refused_at_open(root: Path, tmp_path: Path, entry: str) -> None:
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / entry)
    with pytest.raises(StoreUnavailable):
        LocalStore(root)


# -- I/O faults ------------------------------------------------------------------------------------------


class FaultyFS(durable.FS):
    """Fails the n-th system call of the write path with the given errno."""

    def __init__(self, fail_at: int, err: int) -> None:
        self.fail_at, self.err, self.calls = fail_at, err, 0

    def _tick(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(self.err, os.strerror(self.err), "/secret/path")

    def open(self, path, flags, mode=0o644):  # type: ignore[no-untyped-def]
        self._tick()
        return super().open(path, flags, mode)

    def write(self, fd, data):  # type: ignore[no-untyped-def]
        self._tick()
        return super().write(fd, data)

    def fsync(self, fd):  # type: ignore[no-untyped-def]
        self._tick()
        super().fsync(fd)

    def close(self, fd):  # type: ignore[no-untyped-def]
        # A failed close still releases the descriptor, as on Linux.
        super().close(fd)
        self._tick()

    def mkdir(self, path):  # type: ignore[no-untyped-def]
        self._tick()
        super().mkdir(path)

    def rename(self, src, dst):  # type: ignore[no-untyped-def]
        self._tick()
        super().rename(src, dst)

    def replace(self, src, dst):  # type: ignore[no-untyped-def]
        self._tick()
        super().replace(src, dst)


ERRNOS = [(errno.ENOSPC, StoreFull), (errno.EIO, StoreUnavailable)]


@pytest.mark.parametrize(("err", "error"), ERRNOS, ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("name", ["t", "new"], ids=["existing-task", "new-task"])
def test_fault_at_every_system_call(
    store: LocalStore,
    src: Path,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    err: int,
    error: type,
    name: str,
) -> None:
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
    before = snapshot(root)
    fail_at = 0
    while True:
        fail_at += 1
        fs = FaultyFS(fail_at, err)
        monkeypatch.setattr(durable, "fs", fs)
        try:
            store.put_version("tasks", name, config_bytes=b"{}", weights_src=src)
        except error as exc:
            assert "/secret/path" not in str(exc) and str(root) not in str(exc)
            assert snapshot(root) == before, f"store changed after a fault at call {fail_at}"
            continue
        assert fs.calls < fail_at, f"call {fail_at} failed but the write was acknowledged"
        break
    assert fail_at > 15  # every call of a full write was tried
    assert store.get("tasks", name).config_bytes == b"{}"


@pytest.mark.parametrize(("err", "error"), ERRNOS, ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("step", PUT_STEPS)
def test_fault_at_every_step(
    store: LocalStore,
    src: Path,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    err: int,
    error: type,
    step: str,
) -> None:
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
    before = snapshot(root)

    def fail(at: str) -> None:
        if at == step:
            raise OSError(err, os.strerror(err))

    monkeypatch.setattr(local, "_crash_point", fail)
    for name in ("t", "new"):
        with pytest.raises(error):
            store.put_version("tasks", name, config_bytes=b"{}", weights_src=src)
        assert snapshot(root) == before
    assert store.current_version("tasks", "t") == 1


# -- concurrency -----------------------------------------------------------------------------------------


def _refuse(config: bytes, weights: Path) -> None:
    raise InvalidArtifact("refused by the test")


def _race(root: Path, src: Path, version: int | None, barrier, results, refuse: bool = False) -> None:  # type: ignore[no-untyped-def]
    store = LocalStore(root)
    barrier.wait()
    try:
        info = store.put_version(
            "tasks",
            "race",
            config_bytes=CONFIG,
            weights_src=src,
            version=version,
            validate=_refuse if refuse else None,
        )
        results.put(("ok", info.version, info.sha256))
    except VersionConflict:
        results.put(("conflict", None, None))
    except InvalidArtifact:
        results.put(("refused", None, None))
    except Exception as exc:  # reported to the parent, which fails the test
        results.put(("error", repr(exc), None))


def _run_racers(root: Path, tmp_path: Path, n: int, version: int | None, *, refused: int = 0) -> list[tuple]:
    """`n` processes put a version of one name at once; the first `refused` of them fail validation."""
    LocalStore(root)
    barrier, results = FORK.Barrier(n), FORK.Queue()
    sources = [make_weights(tmp_path, f"writer {i} ".encode() * 50, name=f"w{i}") for i in range(n)]
    procs = [
        FORK.Process(target=_race, args=(root, s, version, barrier, results, i < refused))
        for i, s in enumerate(sources)
    ]
    for p in procs:
        p.start()
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


def test_processes_racing_for_one_version(root: Path, tmp_path: Path) -> None:
    results = _run_racers(root, tmp_path, 16, version=7)
    winners = [r for r in results if r[0] == "ok"]
    assert len(winners) == 1, results
    assert sorted(r[0] for r in results) == ["conflict"] * 15 + ["ok"]
    store = LocalStore(root)
    assert store.get("tasks", "race", 7).info.sha256 == winners[0][2]
    assert [v.version for v in store.list_versions("tasks", "race")] == [7]
    assert leftovers(root) == []


def test_processes_appending_get_distinct_versions(root: Path, tmp_path: Path) -> None:
    results = _run_racers(root, tmp_path, 8, version=None)
    assert all(r[0] == "ok" for r in results), results
    assert sorted(r[1] for r in results) == list(range(1, 9))
    store = LocalStore(root)
    for _, version, sha in results:
        assert store.get("tasks", "race", version).info.sha256 == sha
    assert store.current_version("tasks", "race") in range(1, 9)


def test_processes_refused_on_a_new_name_leave_the_store_as_it_was(root: Path, tmp_path: Path) -> None:
    LocalStore(root)
    before = snapshot(root)
    results = _run_racers(root, tmp_path, 8, version=None, refused=8)
    assert [r[0] for r in results] == ["refused"] * 8
    assert snapshot(root) == before


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_refused_and_accepted_writers_of_a_new_name_race_safely(root: Path, tmp_path: Path) -> None:
    # Refused writers remove the name's lock file whenever they find the name empty, while the others
    # wait on it or are about to: each accepted writer must still get a version of its own.
    for round_ in range(3):
        results = _run_racers(root, _mkdir(tmp_path / f"r{round_}"), 8, version=None, refused=4)
        assert sorted(r[0] for r in results) == ["ok"] * 4 + ["refused"] * 4, results
        store = _check_consistent(root)
        assert sorted(r[1] for r in results if r[0] == "ok") == [1, 2, 3, 4]
        store.delete("tasks", "race")  # the next round starts from a new name again


def test_requests_for_unknown_names_leave_no_lock_file(store: LocalStore, src: Path, root: Path) -> None:
    store.put_version("tasks", "kept", config_bytes=CONFIG, weights_src=src)
    before = snapshot(root)
    assert (root / ".locks" / "tasks.kept.lock").exists()  # a stored name keeps its lock file
    for call in (
        lambda: store.set_current("tasks", "ghost", 1),
        lambda: store.delete_version("tasks", "ghost", 1),
        lambda: store.delete("tasks", "ghost"),
        lambda: store.put_version("tasks", "ghost", config_bytes=CONFIG, weights_src=src, validate=_refuse),
    ):
        with pytest.raises((NotFound, InvalidArtifact)):
            call()
    assert snapshot(root) == before
    store.delete("tasks", "kept")
    assert not (root / ".locks" / "tasks.kept.lock").exists()  # nor does a deleted one


# -- crashes ---------------------------------------------------------------------------------------------


def _crash_at(step: str, action: Callable[[], object]) -> None:
    """Run `action` in a forked child that SIGKILLs itself when it reaches `step`."""

    def child() -> None:
        local._crash_point = lambda at: os.kill(os.getpid(), signal.SIGKILL) if at == step else None
        action()
        os._exit(0)

    proc = FORK.Process(target=child)
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL, f"child did not reach step {step}"


def _check_consistent(root: Path) -> LocalStore:
    store = LocalStore(root)
    assert leftovers(root) == []
    for kind in ("tasks", "hypernetworks"):
        for name in store.list_names(kind):
            versions = [v.version for v in store.list_versions(kind, name)]
            assert versions
            for v in versions:
                store.get(kind, name, v)  # verifies both sha256
            assert store.current_version(kind, name) in [*versions, None]
    return store


@pytest.mark.parametrize("step", PUT_STEPS)
def test_crash_during_put(tmp_path: Path, src: Path, step: str) -> None:
    visible = PUT_STEPS.index(step) >= PUT_STEPS.index("renamed")
    activated = PUT_STEPS.index(step) >= PUT_STEPS.index("pointer_replaced")
    for rep in range(3):
        root = tmp_path / f"r{rep}"
        LocalStore(root).put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
        new = make_weights(tmp_path, f"new {rep}".encode() * 40, name=f"new{rep}")

        def put(root: Path = root, new: Path = new) -> None:
            LocalStore(root).put_version("tasks", "t", config_bytes=b"{}", weights_src=new)
            LocalStore(root).put_version("tasks", "fresh", config_bytes=b"{}", weights_src=new)

        _crash_at(step, put)
        store = _check_consistent(root)
        assert [v.version for v in store.list_versions("tasks", "t")] == ([1, 2] if visible else [1])
        assert store.current_version("tasks", "t") == (2 if activated else 1)
        assert store.list_names("tasks") == ["t"]
        if visible:
            assert store.get("tasks", "t", 2).weights_path.read_bytes() == new.read_bytes()
        # The store goes on working: the next write gets the next number.
        assert store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src).version == (
            3 if visible else 2
        )


@pytest.mark.parametrize("step", PUT_STEPS)
def test_crash_during_first_put(tmp_path: Path, src: Path, step: str) -> None:
    root = tmp_path / "r"
    LocalStore(root)
    _crash_at(step, lambda: LocalStore(root).put_version("tasks", "t", config_bytes=CONFIG, weights_src=src))
    store = _check_consistent(root)
    visible = PUT_STEPS.index(step) >= PUT_STEPS.index("renamed")
    assert store.list_names("tasks") == (["t"] if visible else [])
    assert sorted(os.listdir(root / "tasks")) == (["t"] if visible else [])


@pytest.mark.parametrize(
    "step", ["pointer_tmp_written", "pointer_replaced", "pointer_synced", "trash_renamed", "trash_synced"]
)
def test_crash_during_delete_version(tmp_path: Path, src: Path, step: str) -> None:
    for rep in range(2):
        root = tmp_path / f"r{rep}"
        store = LocalStore(root)
        for _ in range(3):
            store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
        _crash_at(step, lambda root=root: LocalStore(root).delete_version("tasks", "t", 3))
        store = _check_consistent(root)
        versions = [v.version for v in store.list_versions("tasks", "t")]
        assert versions in ([1, 2], [1, 2, 3])
        if step.startswith("trash"):
            assert versions == [1, 2]
        assert store.current_version("tasks", "t") in versions

"""The store contract, run on every backend: versions, the current pointer, deletes, limits, names, races."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from store_backends import contents, leftovers
from test_store_local import CONFIG, HOSTILE_NAMES, make_weights

from store.base import validate_name
from store.errors import (
    InvalidArtifact,
    InvalidName,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    StoreFull,
    VersionConflict,
)
from store.safetensors_io import SafetensorsLimits


@pytest.fixture
def store(make_store: Callable[..., Any]) -> Any:
    return make_store()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_weights(tmp_path)


# -- versions and the current pointer ------------------------------------------------------------------


def test_put_get_round_trip(store: Any, src: Path) -> None:
    info = store.put_version("tasks", "sst2", config_bytes=CONFIG, weights_src=src)
    assert (info.kind, info.name, info.version) == ("tasks", "sst2", 1)
    assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert info.config_sha256 == hashlib.sha256(CONFIG).hexdigest()
    assert info.size_bytes == len(CONFIG) + src.stat().st_size
    got = store.get("tasks", "sst2")
    assert got.info == info
    assert got.config_bytes == CONFIG
    assert got.weights_path.read_bytes() == src.read_bytes()
    assert store.get("tasks", "sst2", 1) == got
    assert store.list_names("tasks") == ["sst2"]
    assert store.list_names("hypernetworks") == []
    assert store.list_versions("tasks", "sst2") == [info]


def test_versions_count_up_and_are_not_reused(store: Any, src: Path) -> None:
    for expected in (1, 2, 3):
        assert store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src).version == expected
    store.delete_version("tasks", "t", 3)
    assert store.current_version("tasks", "t") == 2
    # A cached (name, 3) must never mean different bytes later.
    assert store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src).version == 4
    assert store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src, version=10).version == 10
    assert store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src).version == 11
    assert [v.version for v in store.list_versions("tasks", "t")] == [1, 2, 4, 10, 11]


def test_activate_false(store: Any, src: Path) -> None:
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src, activate=False)
    assert store.current_version("tasks", "t") is None
    with pytest.raises(NotFound):
        store.get("tasks", "t")
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
    store.put_version("tasks", "t", config_bytes=b"{}", weights_src=src, activate=False)
    assert store.current_version("tasks", "t") == 2
    assert store.get("tasks", "t").config_bytes == CONFIG


def test_explicit_version_conflict(store: Any, src: Path) -> None:
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src, version=2)
    with pytest.raises(VersionConflict, match="already has version 2"):
        store.put_version("tasks", "t", config_bytes=b"{}", weights_src=src, version=2)
    assert store.get("tasks", "t", 2).config_bytes == CONFIG


@pytest.mark.parametrize("version", [0, -1, True, "1", 1.0, 10**12])
def test_bad_version_numbers(store: Any, src: Path, version: object) -> None:
    with pytest.raises(InvalidRequest):
        store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src, version=version)


def test_set_current(store: Any, src: Path) -> None:
    for _ in range(3):
        store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
    assert store.set_current("tasks", "t", 1).version == 1
    assert store.current_version("tasks", "t") == 1
    with pytest.raises(VersionConflict, match="is 1, not 3"):
        store.set_current("tasks", "t", 2, expected=3)
    store.set_current("tasks", "t", 2, expected=1)
    assert store.current_version("tasks", "t") == 2
    with pytest.raises(NotFound):
        store.set_current("tasks", "t", 7)
    with pytest.raises(NotFound):
        store.set_current("tasks", "other", 1)


def test_delete_version_and_delete(store: Any, src: Path) -> None:
    for _ in range(3):
        store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
    store.set_current("tasks", "t", 2)
    store.delete_version("tasks", "t", 3)
    assert store.current_version("tasks", "t") == 2
    store.delete_version("tasks", "t", 2)
    assert store.current_version("tasks", "t") == 1
    with pytest.raises(NotFound):
        store.delete_version("tasks", "t", 2)
    store.delete_version("tasks", "t", 1)
    assert store.list_names("tasks") == []
    for call in (store.list_versions, store.current_version, store.get, store.delete):
        with pytest.raises(NotFound):
            call("tasks", "t")
    store.put_version("tasks", "u", config_bytes=CONFIG, weights_src=src)
    store.put_version("hypernetworks", "u", config_bytes=CONFIG, weights_src=src)
    store.delete("tasks", "u")
    assert store.list_names("tasks") == []
    assert store.list_names("hypernetworks") == ["u"]
    assert store.get("hypernetworks", "u").weights_path.read_bytes() == src.read_bytes()
    assert leftovers(store) == []


def test_deleting_an_inactive_version_keeps_none_current(store: Any, src: Path) -> None:
    for _ in range(2):
        store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src, activate=False)
    store.delete_version("tasks", "t", 2)
    assert store.current_version("tasks", "t") is None


def test_validate_runs_on_the_private_copy(store: Any, src: Path) -> None:
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
    before = contents(store)
    seen: list[Path] = []

    def refuse(config: bytes, weights: Path) -> None:
        seen.append(weights)
        assert config == b"{}" and weights.read_bytes() == src.read_bytes() and weights != src
        assert [v.version for v in store.list_versions("tasks", "t")] == [1]
        raise InvalidArtifact("tensor 'x' is missing")

    for name in ("t", "new"):
        with pytest.raises(InvalidArtifact, match="'x'"):
            store.put_version("tasks", name, config_bytes=b"{}", weights_src=src, validate=refuse)
    assert len(seen) == 2 and not any(p.exists() for p in seen)
    assert contents(store) == before


def test_size_limits(make_store: Callable[..., Any], tmp_path: Path) -> None:
    store = make_store(max_store_bytes=1000, limits=SafetensorsLimits(max_file_bytes=600))
    store.put_version("tasks", "a", config_bytes=CONFIG, weights_src=make_weights(tmp_path, b"x" * 500))
    before = contents(store)
    with pytest.raises(StoreFull, match="limit of 1000"):
        store.put_version("tasks", "b", config_bytes=CONFIG, weights_src=make_weights(tmp_path, b"y" * 500))
    with pytest.raises(PayloadTooLarge):
        store.put_version("tasks", "b", config_bytes=CONFIG, weights_src=make_weights(tmp_path, b"y" * 700))
    assert contents(store) == before
    assert store.usage_bytes() == 500 + len(CONFIG)


# -- names -----------------------------------------------------------------------------------------------


def test_hostile_names_are_refused(store: Any, src: Path) -> None:
    # One store for all the names (a loop, not parameters): the S3 store costs a bucket per test.
    before = contents(store)
    for name in HOSTILE_NAMES:
        with pytest.raises(InvalidName):
            validate_name(name)  # type: ignore[arg-type]
        calls: list[Callable[[], object]] = [
            lambda name=name: store.put_version("tasks", name, config_bytes=CONFIG, weights_src=src),
            lambda name=name: store.get("tasks", name),
            lambda name=name: store.current_version("hypernetworks", name),
            lambda name=name: store.set_current("tasks", name, 1),
            lambda name=name: store.list_versions("tasks", name),
            lambda name=name: store.delete_version("tasks", name, 1),
            lambda name=name: store.delete("tasks", name),
        ]
        for call in calls:
            with pytest.raises(InvalidName):
                call()
    assert contents(store) == before


@pytest.mark.parametrize("kind", ["../tasks", "task", "", ".locks", "blobs"])
def test_unknown_kinds_are_refused(store: Any, kind: str) -> None:
    with pytest.raises(ValueError):
        store.list_names(kind)
    with pytest.raises(ValueError):
        store.get(kind, "t")


# -- races -----------------------------------------------------------------------------------------------


def test_threads_racing_for_one_version(store: Any, tmp_path: Path) -> None:
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def write(i: int) -> None:
        src = make_weights(tmp_path, bytes([i]) * 100, name=f"t{i}")
        barrier.wait()
        try:
            info = store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src, version=1)
            outcomes.append(f"ok {info.sha256}")
        except VersionConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.split()[0] for o in outcomes) == ["conflict"] * 7 + ["ok"]
    winner = next(o.split()[1] for o in outcomes if o.startswith("ok"))
    assert store.get("tasks", "t").info.sha256 == winner
    assert [v.version for v in store.list_versions("tasks", "t")] == [1]


def test_threads_appending_get_distinct_versions(store: Any, tmp_path: Path) -> None:
    results: list[tuple[int, str]] = []
    barrier = threading.Barrier(6)

    def write(i: int) -> None:
        src = make_weights(tmp_path, f"writer {i} ".encode() * 30, name=f"a{i}")
        barrier.wait()
        info = store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
        results.append((info.version, info.sha256))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v for v, _ in results) == list(range(1, 7))
    for version, sha in results:
        assert store.get("tasks", "t", version).info.sha256 == sha
    assert store.current_version("tasks", "t") in range(1, 7)

"""The S3 store on a real S3-protocol server: racing replicas, an outage mid-write, damaged blobs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from store_backends import MotoS3, contents, leftovers
from test_store_local import CONFIG, make_weights

from store import s3
from store.errors import ArtifactCorrupt, StoreUnavailable, VersionConflict
from store.s3 import PUT_STEPS, S3Location, S3Store

PREFIX = "serving/prod"


@pytest.fixture
def bucket(moto_s3: MotoS3) -> str:
    return moto_s3.new_bucket()


@pytest.fixture
def open_store(moto_s3: MotoS3, bucket: str, tmp_path: Path) -> Callable[..., S3Store]:
    """Open the bucket as a fresh replica would: its own client and its own (empty) local cache."""
    opened = 0

    def make(**kw: Any) -> S3Store:
        nonlocal opened
        opened += 1
        kw.setdefault("client", moto_s3.client())
        kw.setdefault("cache_dir", tmp_path / f"cache-{opened}")
        return S3Store(S3Location(bucket=bucket, prefix=PREFIX), **kw)

    return make


def test_replicas_racing_for_a_name_one_wins_the_others_get_409(
    open_store: Callable[..., S3Store], tmp_path: Path
) -> None:
    replicas = [open_store() for _ in range(6)]
    barrier, outcomes = threading.Barrier(len(replicas)), {}

    def upload(i: int) -> None:
        src = make_weights(tmp_path, f"replica {i} ".encode() * 40, name=f"r{i}")
        barrier.wait()
        try:
            outcomes[i] = replicas[i].put_version(
                "tasks", "t", config_bytes=CONFIG, weights_src=src, version=1
            )
        except VersionConflict as exc:  # the class the local store raises, answered 409
            outcomes[i] = exc

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(replicas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in outcomes.items() if not isinstance(o, VersionConflict)]
    assert len(winners) == 1 and len(outcomes) == len(replicas), outcomes
    for replica in replicas:  # every replica reads the winner's bytes, whatever it uploaded itself
        got = replica.get("tasks", "t")
        assert got.info == outcomes[winners[0]]
        assert got.weights_path.read_bytes() == f"replica {winners[0]} ".encode() * 40


def test_racing_pointer_moves_lose_no_update(open_store: Callable[..., S3Store], tmp_path: Path) -> None:
    store = open_store()
    src = make_weights(tmp_path)
    for _ in range(4):
        store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src, activate=False)
    store.set_current("tasks", "t", 1)
    # Each replica moves the pointer only from the version it expects: a compare-and-swap chain 1->2->3->4
    # that a lost update (two winners from one state) would break.
    replicas = [open_store() for _ in range(3)]
    moved: list[int] = []
    barrier = threading.Barrier(3)

    def move(replica: S3Store) -> None:
        barrier.wait()
        for _ in range(40):
            current = replica.current_version("tasks", "t")
            if current == 4:
                return
            try:
                replica.set_current("tasks", "t", current + 1, expected=current)
                moved.append(current + 1)
            except VersionConflict:
                pass

    threads = [threading.Thread(target=move, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(moved) == [2, 3, 4]
    assert store.current_version("tasks", "t") == 4


@pytest.mark.parametrize("step", PUT_STEPS)
def test_server_stopped_mid_write_leaves_nothing_partial(
    moto_s3: MotoS3,
    open_store: Callable[..., S3Store],
    tmp_path: Path,
    step: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = open_store()
    old = make_weights(tmp_path, b"old " * 100, name="old")
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=old)
    new = make_weights(tmp_path, b"new " * 100, name="new")
    monkeypatch.setattr(s3, "_crash_point", lambda at: moto_s3.stop() if at == step else None)
    acknowledged = False
    try:
        try:
            store.put_version("tasks", "t", config_bytes=b"{}", weights_src=new)
            acknowledged = True
        except StoreUnavailable as exc:
            assert moto_s3.endpoint not in exc.message and "serving/prod" not in exc.message
    finally:
        monkeypatch.setattr(s3, "_crash_point", None)
        if not moto_s3.running:
            moto_s3.start()
    assert acknowledged == (step == "pointer_written")
    reader = open_store()  # another replica, with nothing cached
    versions = [v.version for v in reader.list_versions("tasks", "t")]
    # What the failed upload may leave is a complete version that is not current (the claim could not
    # be taken back while the server was down), never a partial one, and never a moved pointer.
    assert versions in ([1], [1, 2])
    if step in ("copied", "validated", "blobs_written"):
        assert versions == [1]
    for version in versions:
        reader.get("tasks", "t", version)  # both sha256 checked
    assert reader.current_version("tasks", "t") == (2 if acknowledged else 1)
    assert reader.get("tasks", "t").weights_path.read_bytes() == (new if acknowledged else old).read_bytes()
    assert reader.put_version("tasks", "t", config_bytes=CONFIG, weights_src=old).version == len(versions) + 1


def test_outage_answers_503_and_reads_resume(
    moto_s3: MotoS3, open_store: Callable[..., S3Store], tmp_path: Path
) -> None:
    store = open_store()
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=make_weights(tmp_path))
    moto_s3.stop()
    try:
        for call in (lambda: store.get("tasks", "t"), lambda: store.list_names("tasks")):
            with pytest.raises(StoreUnavailable, match="the object store failed"):
                call()
    finally:
        moto_s3.start()
    assert store.get("tasks", "t").config_bytes == CONFIG


def _blob_key(store: S3Store, sha: str) -> str:
    return f"{PREFIX}/blobs/sha256/{sha}"


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: bytes([data[0] ^ 1]) + data[1:],
        lambda data: data[:-1],
        lambda data: data + b"\0",
        None,
    ],
    ids=["bit", "truncated", "extended", "missing"],
)
@pytest.mark.parametrize("which", ["weights", "config"])
def test_a_damaged_blob_is_refused_on_read(
    open_store: Callable[..., S3Store], bucket: str, tmp_path: Path, damage: Callable | None, which: str
) -> None:
    store = open_store()
    info = store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=make_weights(tmp_path))
    sha = info.sha256 if which == "weights" else info.config_sha256
    key, client = _blob_key(store, sha), store._s3
    if damage is None:
        client.delete_object(Bucket=bucket, Key=key)
    else:
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        client.put_object(Bucket=bucket, Key=key, Body=damage(data))
    reader = open_store()
    with pytest.raises(ArtifactCorrupt, match=f"task 't' version 1 {which}"):
        reader.get("tasks", "t")
    if which == "weights":
        assert reader.get_config("tasks", "t", 1) == CONFIG  # the config alone is still good
        assert not list((tmp_path / "cache-2" / "blobs").iterdir())  # nothing unverified was kept


def test_a_damaged_local_copy_is_fetched_again(open_store: Callable[..., S3Store], tmp_path: Path) -> None:
    store = open_store()
    src = make_weights(tmp_path)
    info = store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=src)
    path = store.get("tasks", "t").weights_path
    path.write_bytes(b"x" + path.read_bytes()[1:])
    assert store.get("tasks", "t").weights_path.read_bytes() == src.read_bytes()
    assert store.get("tasks", "t").info == info


def test_a_server_that_ignores_conditions_is_refused_at_open(
    moto_s3: MotoS3, open_store: Callable[..., S3Store]
) -> None:
    client = moto_s3.client()

    def drop_conditions(params: dict, **_: object) -> None:
        params.pop("IfNoneMatch", None)
        params.pop("IfMatch", None)

    client.meta.events.register("provide-client-params.s3.PutObject", drop_conditions)
    with pytest.raises(StoreUnavailable, match="ignores conditional writes"):
        open_store(client=client)


def test_blobs_are_shared_by_content_and_collected_after_the_last_reference(
    open_store: Callable[..., S3Store], tmp_path: Path
) -> None:
    store = open_store(blob_grace_s=0)
    src = make_weights(tmp_path)
    a = store.put_version("tasks", "a", config_bytes=CONFIG, weights_src=src)
    store.put_version("tasks", "b", config_bytes=CONFIG, weights_src=src)
    blobs = [k for k in contents(store) if "/blobs/" in k]
    assert sorted(blobs) == sorted(_blob_key(store, s) for s in (a.sha256, a.config_sha256))
    store.delete("tasks", "a")
    assert sorted(k for k in contents(store) if "/blobs/" in k) == sorted(blobs)
    store.delete("tasks", "b")
    assert [k for k in contents(store) if "/blobs/" in k] == []


def test_young_orphans_are_kept_for_a_writer_then_collected(
    open_store: Callable[..., S3Store], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store()  # the default grace period
    store.put_version("tasks", "a", config_bytes=CONFIG, weights_src=make_weights(tmp_path))
    store.delete("tasks", "a")
    assert len(leftovers(store)) == 2  # young: a writer may be about to name them
    store.blob_grace_s = 0
    assert store.collect_garbage() == 2
    assert contents(store) == {}


def test_opened_from_the_aws_environment(
    moto_s3: MotoS3, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in {
        "AWS_ENDPOINT_URL": moto_s3.endpoint,
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }.items():
        monkeypatch.setenv(var, value)
    store = S3Store(f"s3://{bucket}/{PREFIX}/", cache_dir=tmp_path / "c")
    store.put_version("tasks", "t", config_bytes=CONFIG, weights_src=make_weights(tmp_path))
    assert any(k.startswith(f"{PREFIX}/tasks/t/") for k in contents(store))


@pytest.mark.parametrize(
    "url", ["s3://", "s3://A_b/x", "s3://ab", "s3://bucket/a//b", "s3://bucket/../x", "/data"]
)
def test_bad_locations(url: str) -> None:
    with pytest.raises(ValueError):
        S3Location.parse(url)


def test_locations() -> None:
    assert S3Location.parse("s3://my-bucket") == S3Location("my-bucket", "")
    assert S3Location.parse("s3://my-bucket/a/b/") == S3Location("my-bucket", "a/b")
    assert str(S3Location("my-bucket", "a/b")) == "s3://my-bucket/a/b"

"""Battery: malformed and hostile uploads change nothing; faults and races never acknowledge a bad write."""

from __future__ import annotations

import asyncio
import copy
import errno
import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from api_support import ADMIN, admin, artifact_config, make_artifact, multipart, random_arrays
from battery_support import (
    canary_pickles,
    files,
    raw_safetensors,
    safetensors_bytes,
    tree_digest,
    upload_bytes,
)

from store import durable

pytestmark = pytest.mark.asyncio

TEXTS = ["the movie was good", "bad plot and boring ending"]
CLIENT_STATUSES = {400, 413, 415, 422}


def _layout(arrays: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    """The header and data buffer write_safetensors would produce for `arrays`."""
    header, chunks, offset = {}, [], 0
    for name in sorted(arrays):
        data = arrays[name].astype("<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(arrays[name].shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    return header, b"".join(chunks)


def _torch_bin(arrays: dict[str, np.ndarray]) -> bytes:
    """A real legacy `torch.save` checkpoint (pickle protocol 2), as PEFT's adapter_model.bin."""
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def malformed_uploads(spec) -> list[tuple[str, bytes, bytes, int, str]]:
    """(kind, config, weights, expected status, weights file name) of every malformed upload we refuse."""
    config = artifact_config("lora", spec.fingerprint)
    good_config = json.dumps(config).encode()
    arrays = random_arrays(config, spec, seed=1)
    good = safetensors_bytes(arrays)
    header, data = _layout(arrays)
    first, second = sorted(arrays)[:2]
    cases: list[tuple[str, bytes, bytes, int, str]] = []

    def add(kind: str, weights: bytes, status: int, *, cfg: bytes = good_config, name: str = "w.safetensors"):
        cases.append((kind, cfg, weights, status, name))

    def edited(fn) -> bytes:
        h = copy.deepcopy(header)
        fn(h)
        return raw_safetensors(h, data)

    def with_arrays(fn) -> bytes:
        a = {k: v.copy() for k, v in arrays.items()}
        fn(a)
        return safetensors_bytes(a)

    add("empty_file", b"", 422)
    add("shorter_than_8_bytes", b"\x01\x00\x00", 422)
    add("header_length_beyond_file", raw_safetensors(header, data, header_len=len(good) * 4), 422)
    add("oversized_header", raw_safetensors(header, data, header_len=2 << 20), 413)
    add("header_not_json", raw_safetensors(b"{not json at all}", data), 422)
    add("header_not_utf8", raw_safetensors(b'{"\xff\xfe": 1}', data), 422)
    add("header_not_an_object", raw_safetensors(b"[1, 2, 3]", data), 422)
    add("header_nan_constant", raw_safetensors(b'{"__metadata__": NaN}', data), 422)
    text = json.dumps(header)
    entry = json.dumps(header[first])
    add("duplicate_keys", raw_safetensors(f'{{"{first}": {entry}, {text[1:]}'.encode(), data), 422)
    add("overlapping_offsets", edited(lambda h: h[second].update(data_offsets=h[first]["data_offsets"])), 422)
    add("offsets_out_of_range", edited(lambda h: h[first].update(data_offsets=[0, len(data) + 64])), 422)
    hole = raw_safetensors(
        {
            k: {**v, "data_offsets": [v["data_offsets"][0] + 16, v["data_offsets"][1] + 16]}
            for k, v in header.items()
        },
        b"\0" * 16 + data,
    )
    add("hole_in_data", hole, 422)
    add("bytes_after_last_tensor", good + b"\0" * 16, 422)
    add("shape_size_mismatch", edited(lambda h: h[first].update(shape=[4, 31])), 422)
    add("negative_dimension", edited(lambda h: h[first].update(shape=[-4, -32])), 422)
    add("metadata_not_strings", raw_safetensors({"__metadata__": {"a": 1}, **header}, data), 422)
    add("dtype_not_allowed_f64", safetensors_bytes({k: v.astype(np.float64) for k, v in arrays.items()}), 422)
    i32 = {k: {**v, "dtype": "I32"} for k, v in header.items()}
    add("dtype_not_allowed_i32", raw_safetensors(i32, data), 422)
    add("unknown_dtype", edited(lambda h: h[first].update(dtype="F128")), 422)
    add("extra_tensor", with_arrays(lambda a: a.update({"surprise.weight": np.zeros(4, np.float32)})), 422)
    add("renamed_tensor", with_arrays(lambda a: a.update({"renamed": a.pop(first)})), 422)
    add("missing_tensor", with_arrays(lambda a: a.pop(first)), 422)
    add(
        "shape_not_the_backbones",
        with_arrays(lambda a: a.update({first: np.zeros((4, 16), np.float32)})),
        422,
    )
    add("nan_value", with_arrays(lambda a: a[first].flat.__setitem__(3, np.nan)), 422)
    add("inf_value", with_arrays(lambda a: a[second].flat.__setitem__(0, -np.inf)), 422)
    many = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(100_000)}
    add("header_with_100k_entries", raw_safetensors(many, b""), 413)
    # Under the header's byte limit but over the tensor-count limit: refused while parsing, by count.
    some = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(5000)}
    add("header_with_5k_entries", raw_safetensors(some, b""), 413)
    add("torch_bin", _torch_bin(arrays), 415, name="adapter_model.bin")
    zipped = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, zipped)
    add("torch_zip", zipped.getvalue(), 415, name="adapter_model.pt")
    add("config_not_json", good, 422, cfg=b"{'method': 'lora',")
    add("config_not_utf8", good, 422, cfg=b'{"method": "\xff"}')
    add("config_not_an_object", good, 422, cfg=b'["lora"]')
    for key, value in (
        ("auto_map", {"AutoModel": "evil.Model"}),
        ("path", "/etc/passwd"),
        ("url", "http://x"),
    ):
        add(f"config_unknown_key_{key}", good, 422, cfg=json.dumps({**config, key: value}).encode())
    add("config_wrong_type", good, 422, cfg=json.dumps({**config, "r": "four"}).encode())
    add("config_wrong_method", good, 422, cfg=json.dumps({**config, "method": "__import__"}).encode())
    add(
        "config_other_backbone",
        good,
        422,
        cfg=json.dumps({**config, "backbone_fingerprint": "0" * 64}).encode(),
    )
    add("config_too_large", good, 413, cfg=json.dumps({**config, "pad": "x" * (70 << 10)}).encode())
    return cases


@pytest.fixture
def upload_tmp(tmp_path: Path) -> Path:
    """Where the server spools uploads, so the test can see that nothing is left there."""
    path = tmp_path / "spool"
    path.mkdir()
    return path


def _no_path_in(body: str, *roots: Path) -> None:
    for root in roots:
        assert str(root) not in body, body
    assert "Traceback" not in body and tempfile.gettempdir() + "/" not in body


async def test_malformed_uploads_are_4xx_and_change_nothing(running, artifacts, tmp_path, upload_tmp):
    store = tmp_path / "store"
    async with running(upload_tmp_dir=upload_tmp) as (app, client):
        spec = app.state.service.backbone.spec
        assert (
            await client.post(
                "/v1/adapters/t",
                files=multipart(make_artifact(artifacts, "t", "lora", spec, seed=1)),
                headers=admin(),
            )
        ).status_code == 201
        cases = malformed_uploads(spec)
        assert len(cases) >= 22
        before = tree_digest(store)
        got = {}
        for kind, config, weights, _status, name in cases:
            r = await client.post(
                "/v1/adapters/t", files=files(config, weights, weights_name=name), headers=admin()
            )
            got[kind] = r.status_code
            assert r.status_code in CLIENT_STATUSES, (kind, r.status_code, r.text)
            assert set(r.json()["error"]) == {"type", "message"}
            _no_path_in(r.text, store, upload_tmp)
            assert tree_digest(store) == before, kind
            assert os.listdir(upload_tmp) == [], kind
            # Refused before 100k entries are built: by the header's byte size before it is parsed, and
            # a smaller one by the tensor count while it is parsed (only the parse hook says "more than").
            if kind == "header_with_100k_entries":
                assert re.search(r"header is \d+ bytes; the limit is \d+", r.json()["error"]["message"])
            if kind == "header_with_5k_entries":
                assert "more than 4096 tensors" in r.json()["error"]["message"]
        assert got == {kind: status for kind, _, _, status, _ in cases}
        # A body over the limit is refused as soon as it crosses the limit; what the client still sends
        # is read and discarded (service/linger.py) so that it can read the answer, never spooled.
        # tests/e2e/test_upload_refusals.py shows the answer arriving before the body ends.
        app.state.service.settings.max_upload_bytes = 256 << 10
        sent = []

        async def endless():
            yield b'--b\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n'
            for _ in range(1000):
                sent.append(1)
                yield b"\0" * 16384

        r = await client.post(
            "/v1/adapters/t",
            content=endless(),
            headers={**admin(), "Content-Type": "multipart/form-data; boundary=b"},
        )
        assert r.status_code == 413 and r.headers["connection"] == "close"
        assert len(sent) == 1000  # drained to the end, not left unread
        assert tree_digest(store) == before and os.listdir(upload_tmp) == []
        detail = (await client.get("/v1/adapters/t", headers=admin())).json()
        assert [v["version"] for v in detail["versions"]] == [1]
        assert (await client.post("/v1/tasks/t/predict", json={"inputs": TEXTS})).json()["version"] == 1


async def test_pickle_canaries_never_run(running, artifacts, tmp_path, upload_tmp):
    marker = tmp_path / "canary-fired"
    payloads = canary_pickles(marker)
    # The payloads are live: unpickling one here does create the marker.
    import pickle

    pickle.loads(payloads["pickle-protocol-4"])
    assert marker.exists()
    marker.rmdir()
    store = tmp_path / "store"
    async with running(upload_tmp_dir=upload_tmp) as (app, client):
        spec = app.state.service.backbone.spec
        config = json.dumps(artifact_config("lora", spec.fingerprint)).encode()
        assert (
            await upload_bytes(
                client,
                "t",
                config,
                safetensors_bytes(random_arrays(artifact_config("lora", spec.fingerprint), spec, seed=1)),
            )
        ).status_code == 201
        before = tree_digest(store)
        for kind, weights in payloads.items():
            for name in ("adapter.safetensors", "adapter_model.bin"):
                r = await client.post(
                    "/v1/adapters/t", files=files(config, weights, weights_name=name), headers=admin()
                )
                assert r.status_code in (415, 422), (kind, r.status_code, r.text)
                assert not marker.exists(), kind
            # Pickles are never stored, so nothing could unpickle them later either.
            assert tree_digest(store) == before
        assert os.listdir(upload_tmp) == []
    assert not marker.exists()


async def test_sixteen_clients_race_for_one_version(running, artifacts, tmp_path):
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        dirs = [make_artifact(artifacts, f"c{i}", "lora", spec, seed=100 + i) for i in range(16)]
        digests = [hashlib.sha256((d / "adapter.safetensors").read_bytes()).hexdigest() for d in dirs]
        outcomes: list[tuple[int, int, dict]] = []
        start = asyncio.Event()

        async def contender(i: int) -> None:
            await start.wait()
            for _ in range(50):
                r = await client.post(
                    "/v1/adapters/race", files=multipart(dirs[i]), headers=admin(), params={"version": 7}
                )
                outcomes.append((i, r.status_code, r.json()))

        workers = [asyncio.create_task(contender(i)) for i in range(16)]
        start.set()
        await asyncio.gather(*workers)
        statuses = [s for _, s, _ in outcomes]
        assert len(statuses) == 800 and statuses.count(201) == 1 and statuses.count(409) == 799
        winner, _, body = next(o for o in outcomes if o[1] == 201)
        assert body["version"] == 7 and body["sha256"] == digests[winner]
        conflict = next(b for _, s, b in outcomes if s == 409)
        assert conflict["error"]["type"] == "version_conflict" and "7" in conflict["error"]["message"]
        detail = (await client.get("/v1/adapters/race", headers=admin())).json()
        assert [(v["version"], v["sha256"]) for v in detail["versions"]] == [(7, digests[winner])]
        stored = tmp_path / "store" / "tasks" / "race" / "v7" / "adapter.safetensors"
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == digests[winner]
        # Without ?version the next upload appends after the highest number.
        r = await client.post("/v1/adapters/race", files=multipart(dirs[0]), headers=admin())
        assert r.status_code == 201 and r.json()["version"] == 8


def _fail_on(monkeypatch, method: str, err: int, *, after: int = 0) -> list[int]:
    """Make `durable.fs.<method>` raise OSError(err) from its (after+1)-th call on; returns the call log."""
    calls: list[int] = []
    original = getattr(durable.fs, method)

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise OSError(err, os.strerror(err))
        return original(*args, **kwargs)

    monkeypatch.setattr(durable.fs, method, failing)
    return calls


def _dev_full_spool(monkeypatch) -> None:
    """Spool uploads into /dev/full, which answers every write with ENOSPC, like a full disk."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    import service.uploads

    monkeypatch.setattr(service.uploads.tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize(
    ("where", "status", "kind"),
    [
        ("spool_enospc", 507, "store_full"),
        ("write_enospc", 507, "store_full"),
        ("fsync_eio", 503, "store_unavailable"),
        ("rename_eio", 503, "store_unavailable"),
        ("pointer_enospc", 507, "store_full"),
    ],
)
async def test_disk_full_and_eio_acknowledge_nothing(
    running, artifacts, tmp_path, upload_tmp, monkeypatch, where, status, kind
):
    store = tmp_path / "store"
    async with running(upload_tmp_dir=upload_tmp) as (app, client):
        spec = app.state.service.backbone.spec
        v1 = make_artifact(artifacts, "v1", "lora", spec, seed=1)
        v2 = make_artifact(artifacts, "v2", "lora", spec, seed=2)
        assert (await client.post("/v1/adapters/t", files=multipart(v1), headers=admin())).status_code == 201
        before = tree_digest(store)
        if where == "spool_enospc":
            _dev_full_spool(monkeypatch)
        elif where == "write_enospc":
            _fail_on(monkeypatch, "write", errno.ENOSPC)
        elif where == "fsync_eio":
            _fail_on(monkeypatch, "fsync", errno.EIO)
        elif where == "rename_eio":
            _fail_on(monkeypatch, "rename", errno.EIO)
        else:
            # The version directory is in place; writing the current pointer fails.
            _fail_on(monkeypatch, "replace", errno.ENOSPC)
        r = await client.post("/v1/adapters/t", files=multipart(v2), headers=admin())
        assert r.status_code == status and r.json()["error"]["type"] == kind, r.text
        _no_path_in(r.text, store, upload_tmp)
        monkeypatch.undo()
        assert tree_digest(store) == before and os.listdir(upload_tmp) == []
        r = await client.post("/v1/tasks/t/predict", json={"inputs": TEXTS})
        assert r.status_code == 200 and r.json()["version"] == 1
        # Once the fault is gone the same upload succeeds, as version 2.
        r = await client.post("/v1/adapters/t", files=multipart(v2), headers=admin())
        assert r.status_code == 201 and r.json()["version"] == 2


async def test_a_flipped_byte_fails_only_its_task(running, artifacts, tmp_path):
    store = tmp_path / "store"
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        for i, name in enumerate(("broken", "fine")):
            d = make_artifact(artifacts, name, "lora", spec, seed=i)
            assert (
                await client.post(f"/v1/adapters/{name}", files=multipart(d), headers=admin())
            ).status_code == 201
    weights = store / "tasks" / "broken" / "v1" / "adapter.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x01
    weights.write_bytes(bytes(raw))
    async with running() as (app, client):
        assert (await client.get("/readyz")).status_code == 200
        r = await client.post("/v1/tasks/broken/predict", json={"inputs": TEXTS})
        assert r.status_code == 503 and r.json()["error"]["type"] == "artifact_corrupt", r.text
        message = r.json()["error"]["message"]
        assert "broken" in message and "sha256" in message
        _no_path_in(r.text, store)
        r = await client.post("/v1/tasks/fine/predict", json={"inputs": TEXTS})
        assert r.status_code == 200 and r.json()["task"] == "fine"
        # The damage is reported again, not cached as a success, and not turned into a 5xx elsewhere.
        assert (await client.post("/v1/tasks/broken/predict", json={"inputs": TEXTS})).status_code == 503
        assert (
            await client.get("/v1/adapters", headers={"Authorization": f"Bearer {ADMIN}"})
        ).status_code == 200

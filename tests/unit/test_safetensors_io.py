"""Torch-free safetensors reading: every malformed file is refused with the right error class."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from store import safetensors_io
from store.errors import BackboneMismatch, InvalidArtifact, NotSafetensors, PayloadTooLarge
from store.safetensors_io import (
    SafetensorsLimits,
    TensorInfo,
    check_expected,
    load_arrays,
    read_header,
    read_metadata,
    sniff_format,
    write_safetensors,
)

LIMITS = SafetensorsLimits()


def build(header: dict | str | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file from a header (dict, raw JSON text or raw bytes) and a data buffer."""
    if isinstance(header, dict):
        text = json.dumps(header).encode()
    elif isinstance(header, str):
        text = header.encode()
    else:
        text = header
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def entry(dtype: str = "F32", shape: list | object = (2,), offsets: list | object = (0, 8)) -> dict:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


EIGHT = b"\x00" * 8
GOOD_ENTRY = entry()


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"x")
    return buf.getvalue()


BAD_FILES: list[tuple[str, bytes, type[Exception], SafetensorsLimits]] = [
    ("empty file", b"", InvalidArtifact, LIMITS),
    ("shorter than 8 bytes", b"\x01\x00\x00", InvalidArtifact, LIMITS),
    ("header length beyond the file", build({"a": GOOD_ENTRY}, EIGHT, length=1000), InvalidArtifact, LIMITS),
    ("header length over the limit", build(b"{}", length=1 << 40), PayloadTooLarge, LIMITS),
    ("header length zero", build(b"", length=0), InvalidArtifact, LIMITS),
    ("header not utf-8", build(b'{"a\xff": 1}'), InvalidArtifact, LIMITS),
    ("header not json", build("{not json}"), InvalidArtifact, LIMITS),
    ("header a json array", build("[1, 2]"), InvalidArtifact, LIMITS),
    ("header with leading space", build(' {"a": 1}'), InvalidArtifact, LIMITS),
    ("header with trailing garbage", build('{"__metadata__": {}} x'), InvalidArtifact, LIMITS),
    ("NaN constant in header", build('{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}'),
     InvalidArtifact, LIMITS),
    ("deeply nested header", build('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"), InvalidArtifact, LIMITS),
    ("duplicate tensor name",
     build('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
           '"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', EIGHT),
     InvalidArtifact, LIMITS),
    ("duplicate key inside an entry",
     build('{"a": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}', EIGHT),
     InvalidArtifact, LIMITS),
    ("metadata not an object", build({"__metadata__": ["x"], "a": GOOD_ENTRY}, EIGHT), InvalidArtifact, LIMITS),
    ("metadata value not a string", build({"__metadata__": {"k": 1}, "a": GOOD_ENTRY}, EIGHT),
     InvalidArtifact, LIMITS),
    ("entry not an object", build({"a": [1, 2]}, EIGHT), InvalidArtifact, LIMITS),
    ("empty tensor name", build({"": GOOD_ENTRY}, EIGHT), InvalidArtifact, LIMITS),
    ("missing dtype", build({"a": {"shape": [2], "data_offsets": [0, 8]}}, EIGHT), InvalidArtifact, LIMITS),
    ("missing shape", build({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, EIGHT), InvalidArtifact, LIMITS),
    ("missing data_offsets", build({"a": {"dtype": "F32", "shape": [2]}}, EIGHT), InvalidArtifact, LIMITS),
    ("unknown entry key", build({"a": {**GOOD_ENTRY, "extra": 1}}, EIGHT), InvalidArtifact, LIMITS),
    ("dtype not a string", build({"a": entry(dtype=4)}, EIGHT), InvalidArtifact, LIMITS),
    ("unknown dtype", build({"a": entry(dtype="F33")}, EIGHT), InvalidArtifact, LIMITS),
    ("dtype not allowed", build({"a": entry(dtype="I64", shape=(1,))}, EIGHT), InvalidArtifact, LIMITS),
    ("F64 not allowed by default", build({"a": entry(dtype="F64", shape=(1,))}, EIGHT), InvalidArtifact, LIMITS),
    ("shape not a list", build({"a": entry(shape="2")}, EIGHT), InvalidArtifact, LIMITS),
    ("float dimension", build({"a": entry(shape=[2.0])}, EIGHT), InvalidArtifact, LIMITS),
    ("bool dimension", build({"a": entry(shape=[True, True])}, EIGHT), InvalidArtifact, LIMITS),
    ("negative dimension", build({"a": entry(shape=[-2])}, EIGHT), InvalidArtifact, LIMITS),
    ("negative dimensions cancelling", build({"a": entry(shape=[-1, -2])}, EIGHT), InvalidArtifact, LIMITS),
    ("too many dimensions", build({"a": entry(shape=[1] * 40, offsets=(0, 4))}, b"\x00" * 4),
     InvalidArtifact, LIMITS),
    ("huge dimension", build({"a": entry(shape=[10**30, 10**30])}, EIGHT), InvalidArtifact, LIMITS),
    ("offsets not a pair", build({"a": entry(offsets=[0, 4, 8])}, EIGHT), InvalidArtifact, LIMITS),
    ("offsets not integers", build({"a": entry(offsets=[0.0, 8.0])}, EIGHT), InvalidArtifact, LIMITS),
    ("offsets reversed", build({"a": entry(offsets=(8, 0))}, EIGHT), InvalidArtifact, LIMITS),
    ("negative offset", build({"a": entry(offsets=(-8, 0))}, EIGHT), InvalidArtifact, LIMITS),
    ("offsets beyond the data", build({"a": entry(shape=(4,), offsets=(0, 16))}, EIGHT), InvalidArtifact, LIMITS),
    ("byte size does not match shape", build({"a": entry(shape=(3,))}, EIGHT), InvalidArtifact, LIMITS),
    ("F16 byte size mismatch", build({"a": entry(dtype="F16", shape=(2,))}, EIGHT), InvalidArtifact, LIMITS),
    ("overlapping tensors",
     build({"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, b"\x00" * 12), InvalidArtifact, LIMITS),
    ("identical offsets", build({"a": entry(), "b": entry()}, EIGHT), InvalidArtifact, LIMITS),
    ("hole between tensors",
     build({"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))}, b"\x00" * 20), InvalidArtifact, LIMITS),
    ("hole at the start", build({"a": entry(offsets=(4, 12))}, b"\x00" * 12), InvalidArtifact, LIMITS),
    ("bytes after the last tensor", build({"a": GOOD_ENTRY}, b"\x00" * 12), InvalidArtifact, LIMITS),
    ("data but no tensors", build({"__metadata__": {}}, EIGHT), InvalidArtifact, LIMITS),
    ("more tensors than allowed",
     build({f"t{i}": entry(shape=(0,), offsets=(0, 0)) for i in range(5)}), PayloadTooLarge,
     SafetensorsLimits(max_tensors=3)),
    ("file over the size limit", build({"a": entry(shape=(4,), offsets=(0, 16))}, b"\x00" * 16),
     PayloadTooLarge, SafetensorsLimits(max_file_bytes=32)),
    ("header over a small header limit", build({"a": GOOD_ENTRY}, EIGHT), PayloadTooLarge,
     SafetensorsLimits(max_header_bytes=16)),
    ("pickle protocol 2", b"\x80\x02}q\x00.", NotSafetensors, LIMITS),
    ("pickle protocol 4", pickle.dumps({"w": [1.0, 2.0]}, protocol=4), NotSafetensors, LIMITS),
    ("pickle protocol 0", pickle.dumps({"w": [1.0, 2.0]}, protocol=0), NotSafetensors, LIMITS),
    ("torch zip archive", _zip_bytes(), NotSafetensors, LIMITS),
]  # fmt: skip


@pytest.mark.parametrize(
    ("content", "error", "limits"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_file_is_refused(tmp_path: Path, content: bytes, error: type[Exception], limits) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(error) as info:
        read_header(path, limits=limits)
    # The exact class, not a subclass: a pickle must not pass as a mere InvalidArtifact and vice versa.
    assert type(info.value) is error
    assert str(tmp_path) not in str(info.value)
    with pytest.raises(error):
        load_arrays(path, limits=limits)


def test_table_covers_enough_kinds() -> None:
    assert len(BAD_FILES) >= 20


@pytest.mark.parametrize(
    ("header", "data", "needle"),
    [
        ({"enc.w": entry(shape=(3,))}, EIGHT, "'enc.w'"),
        ({"enc.w": entry(dtype="I64", shape=(1,))}, EIGHT, "I64"),
        ({"a": entry(offsets=(0, 8)), "enc.b": entry(offsets=(4, 12))}, b"\x00" * 12, "'enc.b'"),
    ],
)
def test_messages_name_the_tensor(tmp_path: Path, header: dict, data: bytes, needle: str) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(build(header, data))
    with pytest.raises(InvalidArtifact, match=needle):
        read_header(path, limits=LIMITS)


def test_size_mismatch_message_has_expected_and_actual(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(build({"a": entry(shape=(3,))}, EIGHT))
    with pytest.raises(InvalidArtifact, match=r"needs 12 bytes; its data_offsets span 8"):
        read_header(path, limits=LIMITS)


def test_header_limit_is_checked_before_the_header_is_read(tmp_path: Path) -> None:
    # The claimed length is beyond the file; refusing for size proves the claim was never followed.
    path = tmp_path / "w.safetensors"
    path.write_bytes(build(b"{}", length=(1 << 20) + 1))
    with pytest.raises(PayloadTooLarge):
        read_header(path, limits=LIMITS)


def test_hundred_thousand_entries_are_refused_while_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsing stops once the objects outnumber the tensor limit: no entry is validated, the rest unread."""
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(100_000)}
    path = tmp_path / "w.safetensors"
    path.write_bytes(build(header))
    limits = SafetensorsLimits(max_header_bytes=64 << 20)
    built, checked = [], []
    hook_call, parse_entry = safetensors_io._HeaderHook.__call__, safetensors_io._parse_entry
    monkeypatch.setattr(
        safetensors_io._HeaderHook, "__call__", lambda self, p: built.append(1) or hook_call(self, p)
    )
    monkeypatch.setattr(safetensors_io, "_parse_entry", lambda *a: checked.append(1) or parse_entry(*a))
    with pytest.raises(PayloadTooLarge, match="more than 4096 tensors"):
        read_header(path, limits=limits)
    # the header's own object and __metadata__ aside, one object past the limit ends the parse
    assert len(built) == limits.max_tensors + 3 and checked == []


def test_round_trip_and_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "b.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "a.half": rng.standard_normal(5).astype(np.float16),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    path = tmp_path / "w.safetensors"
    write_safetensors(path, arrays, metadata={"format": "np"})
    infos = read_header(path, limits=LIMITS)
    assert list(infos) == sorted(arrays)
    assert infos["b.weight"] == TensorInfo(name="b.weight", dtype="F32", shape=(3, 4), begin=10, end=58)
    assert read_metadata(path, limits=LIMITS) == {"format": "np"}
    loaded = load_arrays(path, limits=LIMITS)
    for name, arr in arrays.items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], arr.astype(np.float32))
    assert list(load_arrays(path, limits=LIMITS, names=["scalar"])) == ["scalar"]
    with pytest.raises(InvalidArtifact, match="'nope'"):
        load_arrays(path, limits=LIMITS, names=["nope"])


def test_write_to_file_object_and_refuse_other_dtypes(tmp_path: Path) -> None:
    buf = io.BytesIO()
    write_safetensors(buf, {"x": np.ones(3, dtype=np.float32)})
    path = tmp_path / "w.safetensors"
    path.write_bytes(buf.getvalue())
    np.testing.assert_array_equal(load_arrays(path, limits=LIMITS)["x"], np.ones(3))
    with pytest.raises(TypeError):
        write_safetensors(buf, {"x": np.ones(3, dtype=np.int64)})


def test_readable_by_the_safetensors_library(tmp_path: Path) -> None:
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "h": np.linspace(-1, 1, 7).astype(np.float16),
    }
    ours = tmp_path / "ours.safetensors"
    write_safetensors(ours, arrays, metadata={"k": "v"})
    theirs = load_file(ours)
    assert set(theirs) == set(arrays)
    for name, arr in arrays.items():
        assert theirs[name].dtype == arr.dtype
        np.testing.assert_array_equal(theirs[name], arr)
    # And the other way round: files of the reference writer pass our validation.
    ref = tmp_path / "ref.safetensors"
    save_file(arrays, ref, metadata={"k": "v"})
    assert read_header(ref, limits=LIMITS)["w"].shape == (3, 4)
    np.testing.assert_array_equal(load_arrays(ref, limits=LIMITS)["h"], arrays["h"].astype(np.float32))


def test_bf16_is_widened_exactly(tmp_path: Path) -> None:
    values = np.array([1.0, -2.5, 0.15625, 3.0e38, 0.0], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2")
    path = tmp_path / "w.safetensors"
    path.write_bytes(build({"x": entry(dtype="BF16", shape=(5,), offsets=(0, 10))}, bits.tobytes()))
    out = load_arrays(path, limits=LIMITS)["x"]
    # These values have at most 8 significant bits, so bfloat16 holds them exactly (3e38 gets truncated).
    np.testing.assert_array_equal(out[[0, 1, 2, 4]], values[[0, 1, 2, 4]])
    assert out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.parametrize(
    ("dtype", "raw"),
    [
        ("F32", np.array([1.0, np.nan], dtype="<f4").tobytes()),
        ("F32", np.array([np.inf, 1.0], dtype="<f4").tobytes()),
        ("F16", np.array([1.0, -np.inf, 0.0, 0.0], dtype="<f2").tobytes()),
        ("BF16", np.array([0x3F80, 0x7FC0, 0, 0], dtype="<u2").tobytes()),
    ],
)
def test_non_finite_values_are_refused(tmp_path: Path, dtype: str, raw: bytes) -> None:
    n = len(raw) // (4 if dtype == "F32" else 2)
    path = tmp_path / "w.safetensors"
    path.write_bytes(build({"layer.3.up": entry(dtype=dtype, shape=(n,), offsets=(0, len(raw)))}, raw))
    read_header(path, limits=LIMITS)  # the layout itself is fine
    with pytest.raises(InvalidArtifact, match=r"'layer\.3\.up' has 1 non-finite"):
        load_arrays(path, limits=LIMITS)


def test_zero_size_tensors_may_share_an_offset(tmp_path: Path) -> None:
    header = {
        "z1": entry(shape=(0, 4), offsets=(0, 0)),
        "a": GOOD_ENTRY,
        "z2": entry(shape=(0,), offsets=(8, 8)),
    }
    path = tmp_path / "w.safetensors"
    path.write_bytes(build(header, EIGHT))
    assert load_arrays(path, limits=LIMITS)["z1"].shape == (0, 4)


def test_sniff_format() -> None:
    assert sniff_format(pickle.dumps([1], protocol=2)) == "pickle"
    assert sniff_format(pickle.dumps([1], protocol=5)) == "pickle"
    assert sniff_format(pickle.dumps([1], protocol=0)) == "pickle"
    assert sniff_format(_zip_bytes()[:16]) == "zip"
    assert sniff_format(build({"a": GOOD_ENTRY}, EIGHT)[:16]) is None
    assert sniff_format(b"") is None


def test_header_length_that_looks_like_a_pickle_is_still_safetensors(tmp_path: Path) -> None:
    # A header of 0x280 bytes makes the file start with b"\x80\x02", the pickle protocol 2 marker.
    text = json.dumps({"a": GOOD_ENTRY}).encode()
    text += b" " * (0x280 - len(text))
    content = build(text, EIGHT)
    assert content[:2] == b"\x80\x02"
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    assert read_header(path, limits=LIMITS)["a"].shape == (2,)


def _infos(**shapes: tuple[int, ...]) -> dict[str, TensorInfo]:
    return {n: TensorInfo(name=n, dtype="F32", shape=s, begin=0, end=0) for n, s in shapes.items()}


def test_check_expected() -> None:
    expected = {"down": (32, 16), "up": (16, 32)}
    check_expected(_infos(down=(32, 16), up=(16, 32)), expected)
    with pytest.raises(BackboneMismatch, match=r"tensor 'down' has shape \(32, 8\); expected \(32, 16\)"):
        check_expected(_infos(down=(32, 8), up=(16, 32)), expected)
    with pytest.raises(InvalidArtifact, match="lack tensor 'up'") as missing:
        check_expected(_infos(down=(32, 16)), expected)
    assert type(missing.value) is InvalidArtifact
    with pytest.raises(InvalidArtifact, match="unexpected tensor 'extra'") as extra:
        check_expected(_infos(down=(32, 16), up=(16, 32), extra=(1,)), expected)
    assert type(extra.value) is InvalidArtifact


def test_error_message_uses_real_names(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"encoder.0.ffn.seq.down": np.zeros((32, 8), dtype=np.float32)})
    infos = read_header(path, limits=LIMITS)
    with pytest.raises(BackboneMismatch) as info:
        check_expected(infos, {"encoder.0.ffn.seq.down": (32, 16)})
    assert str(info.value) == "tensor 'encoder.0.ffn.seq.down' has shape (32, 8); expected (32, 16)"

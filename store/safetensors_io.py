"""Torch-free reading, validation and writing of safetensors files with numpy.

Uploaded weights are untrusted: every rule of the format is checked before a byte of tensor data is
interpreted, and each refusal names what to fix (the tensor, the expected and the actual value).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from store.errors import BackboneMismatch, InvalidArtifact, NotSafetensors, PayloadTooLarge

__all__ = [
    "DTYPE_SIZES",
    "SafetensorsLimits",
    "TensorInfo",
    "check_expected",
    "load_arrays",
    "read_header",
    "read_metadata",
    "sniff_format",
    "write_safetensors",
]

DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}

# Little-endian numpy dtypes of the float formats we can turn into float32 (BF16 is handled apart).
_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}
_WRITE_DTYPES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}

_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
# numpy cannot hold more dimensions than this; anything deeper is hostile.
_MAX_RANK = 32
_METADATA = "__metadata__"
# Opcodes a protocol 0/1 pickle (and torch's legacy format) starts with: MARK, GLOBAL, EMPTY_DICT,
# EMPTY_LIST, EMPTY_TUPLE, and the bare INT/STRING/UNICODE/NONE opcodes.
_LEGACY_PICKLE_STARTS = frozenset(b"(c}])ISVNdl")


@dataclass(frozen=True)
class SafetensorsLimits:
    """Size and content limits applied to an untrusted safetensors file."""

    max_header_bytes: int = 1 << 20
    max_tensors: int = 4096
    max_file_bytes: int = 256 << 20
    allowed_dtypes: tuple[str, ...] = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorInfo:
    """One validated header entry; begin and end are byte offsets into the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.begin


@dataclass(frozen=True)
class _Parsed:
    infos: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def _q(name: str) -> str:
    """Quote a tensor name for a message, shortened so hostile names cannot flood a response."""
    return repr(name if len(name) <= 80 else name[:77] + "...")


def _shape(shape: list[int]) -> str:
    """Format a shape for a message, shortened for the same reason as names."""
    text = str(tuple(shape))
    return text if len(text) <= 80 else text[:77] + "..."


def sniff_format(head: bytes) -> str | None:
    """Recognize the formats people upload by mistake: 'pickle', 'zip' (torch .bin), or None."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    # A safetensors file starts with an 8-byte length whose low byte may happen to look like a pickle
    # opcode; its header then begins with '{' at offset 8, which no pickle stream has there.
    if len(head) > 8 and head[8:9] == b"{":
        return None
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head[:1] and head[0] in _LEGACY_PICKLE_STARTS:
        return "pickle"
    return None


def _refuse_format(head: bytes) -> None:
    kind = sniff_format(head)
    if kind == "pickle":
        raise NotSafetensors(
            "weights are a Python pickle (torch.save / .bin), not safetensors; "
            "convert them with safetensors.torch.save_file and upload the .safetensors file",
            format=kind,
        )
    if kind == "zip":
        raise NotSafetensors(
            "weights are a zip archive (torch.save's .bin/.pt format), not safetensors; "
            "convert them with safetensors.torch.save_file and upload the .safetensors file",
            format=kind,
        )


class _HeaderHook:
    """object_pairs_hook that refuses duplicate keys and stops parsing once too many objects appear."""

    def __init__(self, max_tensors: int) -> None:
        # One object per tensor, one for __metadata__, one for the header itself.
        self.budget = max_tensors + 2
        self.max_tensors = max_tensors
        self.seen = 0

    def __call__(self, pairs: list[tuple[str, object]]) -> dict[str, object]:
        self.seen += 1
        if self.seen > self.budget or len(pairs) > self.budget:
            raise PayloadTooLarge(
                f"safetensors header holds more than {self.max_tensors} tensors",
                limit=self.max_tensors,
            )
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise InvalidArtifact(f"safetensors header has the key {_q(key)} more than once")
                seen.add(key)
        return out


def _reject_constant(token: str) -> object:
    raise InvalidArtifact(f"safetensors header contains {token}, which is not valid JSON")


def _parse_entry(name: str, entry: object, limits: SafetensorsLimits, data_len: int) -> TensorInfo:
    if not name:
        raise InvalidArtifact("safetensors header has a tensor with an empty name")
    if not isinstance(entry, dict):
        raise InvalidArtifact(
            f"tensor {_q(name)}: header entry must be an object, got {type(entry).__name__}"
        )
    missing = sorted(_ENTRY_KEYS - entry.keys())
    if missing:
        raise InvalidArtifact(f"tensor {_q(name)}: header entry lacks {', '.join(missing)}")
    extra = sorted(entry.keys() - _ENTRY_KEYS)
    if extra:
        raise InvalidArtifact(f"tensor {_q(name)}: header entry has unknown key {_q(extra[0])}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise InvalidArtifact(f"tensor {_q(name)}: dtype must be a string, got {type(dtype).__name__}")
    if dtype not in DTYPE_SIZES:
        raise InvalidArtifact(f"tensor {_q(name)}: unknown dtype {_q(dtype)}")
    if dtype not in limits.allowed_dtypes:
        raise InvalidArtifact(
            f"tensor {_q(name)} has dtype {dtype}; allowed dtypes are {', '.join(limits.allowed_dtypes)}"
        )
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidArtifact(f"tensor {_q(name)}: shape must be a list of integers, got {shape!r:.80}")
    if len(shape) > _MAX_RANK:
        raise InvalidArtifact(
            f"tensor {_q(name)} has {len(shape)} dimensions; at most {_MAX_RANK} are allowed"
        )
    if any(d < 0 for d in shape):
        raise InvalidArtifact(f"tensor {_q(name)} has a negative dimension in shape {_shape(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise InvalidArtifact(f"tensor {_q(name)}: data_offsets must be two integers, got {offsets!r:.80}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise InvalidArtifact(
            f"tensor {_q(name)}: data_offsets [{begin}, {end}] fall outside the data buffer of {data_len} bytes"
        )
    # Multiply with an early exit: dimensions beyond any allowed file cannot match anyway, and
    # big-integer products over a hostile header would otherwise cost real time.
    bound = max(data_len, limits.max_file_bytes)
    nbytes = 0 if 0 in shape else DTYPE_SIZES[dtype]
    for d in shape if nbytes else ():
        nbytes *= d
        if nbytes > bound:
            break
    if nbytes != end - begin:
        needed = f"more than {bound}" if nbytes > bound else str(nbytes)
        raise InvalidArtifact(
            f"tensor {_q(name)} of dtype {dtype} and shape {_shape(shape)} needs {needed} bytes; "
            f"its data_offsets span {end - begin}"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_tiling(infos: Iterable[TensorInfo], data_len: int) -> None:
    """The tensors must cover the data buffer exactly: no overlap, no hole, nothing after the last one."""
    expected = 0
    previous: TensorInfo | None = None
    for info in sorted(infos, key=lambda i: (i.begin, i.end)):
        if info.begin < expected:
            other = previous.name if previous else "?"
            raise InvalidArtifact(
                f"tensor {_q(info.name)} (bytes {info.begin}..{info.end}) overlaps "
                f"tensor {_q(other)} (ending at byte {expected})"
            )
        if info.begin > expected:
            raise InvalidArtifact(
                f"data buffer has unused bytes {expected}..{info.begin} before tensor {_q(info.name)}"
            )
        expected = info.end
        previous = info
    if expected != data_len:
        raise InvalidArtifact(
            f"data buffer has {data_len - expected} bytes after the last tensor; "
            f"the tensors end at byte {expected} of {data_len}"
        )


def _parse(fh: BinaryIO, size: int, limits: SafetensorsLimits) -> _Parsed:
    head = fh.read(16)
    _refuse_format(head)
    if size > limits.max_file_bytes:
        raise PayloadTooLarge(
            f"weights file is {size} bytes; the limit is {limits.max_file_bytes}", limit=limits.max_file_bytes
        )
    if size < 8:
        raise InvalidArtifact(
            f"weights file is {size} bytes long, too short for a safetensors file (at least 8 bytes)"
        )
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > limits.max_header_bytes:
        raise PayloadTooLarge(
            f"safetensors header is {header_len} bytes; the limit is {limits.max_header_bytes}",
            limit=limits.max_header_bytes,
        )
    if header_len == 0:
        raise InvalidArtifact("safetensors header is empty (length 0)")
    if 8 + header_len > size:
        raise InvalidArtifact(
            f"safetensors header claims {header_len} bytes but the file has only {size - 8} after the length"
        )
    fh.seek(8)
    raw = fh.read(header_len)
    if len(raw) != header_len:
        raise InvalidArtifact("weights file ended inside the safetensors header")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArtifact(f"safetensors header is not valid UTF-8 (byte {exc.start})") from None
    if not text.startswith("{"):
        raise InvalidArtifact("safetensors header must be a JSON object starting with '{'")
    try:
        header = json.loads(
            text, object_pairs_hook=_HeaderHook(limits.max_tensors), parse_constant=_reject_constant
        )
    except RecursionError:
        raise InvalidArtifact("safetensors header is nested too deeply") from None
    except ValueError as exc:
        # JSONDecodeError, and int() refusing absurdly long digit strings.
        raise InvalidArtifact(f"safetensors header is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(header, dict):
        raise InvalidArtifact("safetensors header must be a JSON object")
    metadata = header.pop(_METADATA, {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidArtifact("safetensors __metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        raise PayloadTooLarge(
            f"safetensors file holds {len(header)} tensors; the limit is {limits.max_tensors}",
            limit=limits.max_tensors,
        )
    data_start = 8 + header_len
    data_len = size - data_start
    infos = {name: _parse_entry(name, entry, limits, data_len) for name, entry in header.items()}
    _check_tiling(infos.values(), data_len)
    return _Parsed(infos=infos, metadata=metadata, data_start=data_start)


def _parse_path(path: str | os.PathLike[str], limits: SafetensorsLimits) -> _Parsed:
    with open(path, "rb") as fh:
        return _parse(fh, os.fstat(fh.fileno()).st_size, limits)


def read_header(path: str | os.PathLike[str], *, limits: SafetensorsLimits) -> dict[str, TensorInfo]:
    """Validate a safetensors file's header and layout; return its tensors by name, in header order."""
    return _parse_path(path, limits).infos


def read_metadata(path: str | os.PathLike[str], *, limits: SafetensorsLimits) -> dict[str, str]:
    """Validate a safetensors file like read_header and return its __metadata__ (empty if none)."""
    return _parse_path(path, limits).metadata


def _to_float32(info: TensorInfo, buf: bytes) -> np.ndarray:
    if info.dtype == "BF16":
        # bfloat16 is the top half of a float32: widen the bits and reinterpret.
        bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
        arr = bits.view(np.float32)
    elif info.dtype in _NUMPY_DTYPES:
        arr = np.frombuffer(buf, dtype=_NUMPY_DTYPES[info.dtype]).astype(np.float32)
    else:
        raise InvalidArtifact(
            f"tensor {_q(info.name)} has dtype {info.dtype}, which cannot be read as floats"
        )
    return arr.reshape(info.shape)


def load_arrays(
    path: str | os.PathLike[str],
    *,
    limits: SafetensorsLimits,
    names: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """Validate a safetensors file and read its tensors (or only `names`) as finite float32 arrays."""
    with open(path, "rb") as fh:
        # Parse and read through one handle so the data read is the data validated.
        parsed = _parse(fh, os.fstat(fh.fileno()).st_size, limits)
        wanted = list(parsed.infos) if names is None else list(names)
        out: dict[str, np.ndarray] = {}
        for name in wanted:
            info = parsed.infos.get(name)
            if info is None:
                raise InvalidArtifact(f"weights lack tensor {_q(name)}")
            fh.seek(parsed.data_start + info.begin)
            buf = fh.read(info.nbytes)
            if len(buf) != info.nbytes:
                raise InvalidArtifact(f"tensor {_q(name)}: file ended inside its data")
            arr = _to_float32(info, buf)
            bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise InvalidArtifact(f"tensor {_q(name)} has {bad} non-finite values (NaN or Inf)")
            out[name] = arr
    return out


def check_expected(infos: Mapping[str, TensorInfo], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Require exactly the expected tensor names with exactly the expected shapes."""
    for name, shape in expected.items():
        info = infos.get(name)
        if info is None:
            missing = sum(1 for n in expected if n not in infos)
            more = f" ({missing - 1} more missing)" if missing > 1 else ""
            raise InvalidArtifact(f"weights lack tensor {_q(name)} with shape {tuple(shape)}{more}")
        if info.shape != tuple(shape):
            raise BackboneMismatch(f"tensor {_q(name)} has shape {info.shape}; expected {tuple(shape)}")
    extra = [n for n in infos if n not in expected]
    if extra:
        more = f" ({len(extra) - 1} more)" if len(extra) > 1 else ""
        raise InvalidArtifact(
            f"weights hold unexpected tensor {_q(extra[0])} with shape {infos[extra[0]].shape}{more}; "
            f"the config expects {len(expected)} tensors"
        )


def write_safetensors(
    path_or_fileobj: str | os.PathLike[str] | BinaryIO,
    arrays: Mapping[str, np.ndarray],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write float64/float32/float16 arrays as a safetensors file (names sorted, header padded to 8)."""
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map strings to strings")
        header[_METADATA] = dict(metadata)
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(arrays):
        if name == _METADATA or not name:
            raise ValueError(f"invalid tensor name {_q(name)}")
        arr = np.asarray(arrays[name])
        dtype = _WRITE_DTYPES.get(arr.dtype)
        if dtype is None:
            raise TypeError(f"tensor {_q(name)} has dtype {arr.dtype}; write float64, float32 or float16")
        data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # Pad with spaces like the reference writer, so the data buffer starts 8-byte aligned.
    text += b" " * (-len(text) % 8)
    payload = [struct.pack("<Q", len(text)), text, *chunks]
    if isinstance(path_or_fileobj, (str, os.PathLike)):
        with open(path_or_fileobj, "wb") as fh:
            fh.writelines(payload)
    else:
        for part in payload:
            path_or_fileobj.write(part)

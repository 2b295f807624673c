"""The Open Inference Protocol v2 (KServe / Triton) on the wire: its JSON bodies and its tensor encodings.

Pure data handling, no runtime: the pydantic models of the requests and responses, and the
binary tensor data extension (`Inference-Header-Content-Length`: a JSON header, then each binary
tensor's bytes back to back; a BYTES element is a 4-byte little-endian length and its bytes).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from store.errors import InvalidRequest

__all__ = [
    "Datatype",
    "InferenceRequest",
    "InferenceResponse",
    "ModelMetadata",
    "ModelReady",
    "OutputTensor",
    "RequestInput",
    "RequestOutput",
    "ResponseOutput",
    "ServerLive",
    "ServerMetadata",
    "ServerReady",
    "TensorMetadata",
    "V2Error",
    "binary_flag",
    "bytes_values",
    "encode_response",
    "inline_schema",
    "parse_request",
]

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
]  # fmt: skip

_ELEMENT = struct.Struct("<I")


class _Strict(BaseModel):
    # strict: "5" is not a shape dimension and "true" is not a flag, exactly as the JSON schema says.
    model_config = ConfigDict(extra="forbid", strict=True)


class RequestInput(_Strict):
    """One input tensor: its data inline (`data`, row-major, flat or nested) or as binary data."""

    name: str = Field(min_length=1, max_length=128)
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=8)
    datatype: Datatype
    parameters: dict[str, Any] | None = Field(
        default=None, description="`binary_data_size`: the tensor's bytes follow the JSON header."
    )
    data: list[Any] | None = None


class RequestOutput(_Strict):
    """One output the client asks for, and how."""

    name: str = Field(min_length=1, max_length=128)
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="`binary_data`: bool, send this output as binary data; `classification`: k, "
        "send the top k scores as BYTES `value:index:label`.",
    )


class InferenceRequest(_Strict):
    """`POST /v2/models/{model}/infer`."""

    id: str | None = Field(default=None, max_length=256, description="Echoed in the response.")
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="`binary_data_output`: bool, every output as binary data unless it says otherwise.",
    )
    inputs: list[RequestInput] = Field(min_length=1, max_length=8)
    outputs: list[RequestOutput] | None = Field(default=None, max_length=8)


class ResponseOutput(BaseModel):
    """One output tensor of the answer (`data` absent when it is sent as binary data)."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    """The answer of an infer request."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    """A tensor a model takes or gives; -1 is a dimension of any size."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """`GET /v2/models/{model}`."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(description="`kind` of the task and, for classifiers, its `labels`.")


class ServerMetadata(BaseModel):
    """`GET /v2`."""

    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    """`GET /v2/health/live`."""

    live: bool


class ServerReady(BaseModel):
    """`GET /v2/health/ready`."""

    ready: bool


class ModelReady(BaseModel):
    """`GET /v2/models/{model}/ready`."""

    name: str
    ready: bool


class V2Error(BaseModel):
    """The protocol's error body: `{"error": message}`."""

    error: str


def inline_schema(model: type[BaseModel]) -> dict:
    """`model`'s JSON schema with its `$defs` written in place, to embed in an OpenAPI operation."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


# -- requests ---------------------------------------------------------------------------------


def parse_request(raw: bytes, *, header_length: str | None) -> tuple[InferenceRequest, dict[str, bytes]]:
    """The request's JSON header, and the binary data of each input that sent its data so."""
    if header_length is None:
        head, blob = raw, b""
    else:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(raw):
            raise InvalidRequest(
                f"Inference-Header-Content-Length: {header_length[:20]!r} is not a length within the "
                f"{len(raw)}-byte body"
            )
        head, blob = raw[: int(header_length)], raw[int(header_length) :]
    try:
        body = InferenceRequest.model_validate_json(head)
    except ValidationError as exc:
        # The app's validation handler words it (422, in this protocol's error shape), like a FastAPI body.
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None
    names = [i.name for i in body.inputs]
    if len(set(names)) != len(names):
        raise InvalidRequest("inputs: each tensor name may appear once")
    binary: dict[str, bytes] = {}
    offset = 0
    for inp in body.inputs:
        params = inp.parameters or {}
        if any(k.startswith("shared_memory") for k in params):
            raise InvalidRequest(f"input {inp.name!r}: shared memory is not supported; send the data")
        size = params.get("binary_data_size")
        if size is None:
            if inp.data is None:
                raise InvalidRequest(f"input {inp.name!r}: no data and no binary_data_size")
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidRequest(f"input {inp.name!r}: binary_data_size must be a byte count")
        if inp.data is not None:
            raise InvalidRequest(f"input {inp.name!r}: send data or binary_data_size, not both")
        if header_length is None:
            raise InvalidRequest(
                f"input {inp.name!r}: binary data needs the Inference-Header-Content-Length header"
            )
        binary[inp.name] = blob[offset : offset + size]
        offset += size
    if offset != len(blob):
        raise InvalidRequest(
            f"binary data: the body has {len(blob)} bytes after the JSON header; the inputs declare {offset}"
        )
    return body, binary


def _flatten(data: list) -> list:
    """Row-major elements of nested lists (the protocol allows flat or nested data)."""
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def bytes_values(inp: RequestInput, binary: bytes | None) -> list[str]:
    """The elements of a BYTES input, row-major, as text (UTF-8)."""
    count = math.prod(inp.shape)
    if binary is None:
        items = _flatten(inp.data or [])
        if any(not isinstance(x, str) for x in items):
            raise InvalidRequest(f"input {inp.name!r}: BYTES data in JSON are strings")
        values = items
    else:
        raw: list[bytes] = []
        pos = 0
        while pos < len(binary):
            if pos + _ELEMENT.size > len(binary):
                raise InvalidRequest(f"input {inp.name!r}: binary BYTES data ends inside a length prefix")
            (n,) = _ELEMENT.unpack_from(binary, pos)
            pos += _ELEMENT.size
            if pos + n > len(binary):
                raise InvalidRequest(f"input {inp.name!r}: binary BYTES element runs past its data")
            raw.append(binary[pos : pos + n])
            pos += n
            if len(raw) > count:
                break
        try:
            values = [b.decode("utf-8") for b in raw]
        except UnicodeDecodeError:
            raise InvalidRequest(f"input {inp.name!r}: text must be UTF-8") from None
    if len(values) != count:
        raise InvalidRequest(
            f"input {inp.name!r}: shape {inp.shape} holds {count} elements; got {len(values)}"
        )
    return values


def binary_flag(parameters: dict[str, Any] | None, key: str, *, default: bool) -> bool:
    """A boolean request parameter (`binary_data_output`, `binary_data`)."""
    value = (parameters or {}).get(key, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"parameters: {key} must be true or false")
    return value


# -- responses --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """An answer's tensor: FP32 values as a float32 array, BYTES values as strings, row-major."""

    name: str
    datatype: Literal["FP32", "BYTES"]
    shape: tuple[int, ...]
    values: np.ndarray | list[str]
    binary: bool


def _raw(t: OutputTensor) -> bytes:
    if t.datatype == "BYTES":
        return b"".join(_ELEMENT.pack(len(b)) + b for b in (s.encode() for s in t.values))
    return np.ascontiguousarray(t.values, dtype="<f4").tobytes()


def encode_response(head: dict, tensors: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensor data follows it."""
    outputs = []
    blobs = []
    for t in tensors:
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if t.binary:
            blob = _raw(t)
            blobs.append(blob)
            out["parameters"] = {"binary_data_size": len(blob)}
        else:
            out["data"] = t.values.reshape(-1) if isinstance(t.values, np.ndarray) else t.values
        outputs.append(out)
    json_part = orjson.dumps({**head, "outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return json_part, None
    return json_part + b"".join(blobs), len(json_part)

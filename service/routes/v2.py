"""KServe / Triton Open Inference Protocol v2: health, server and model metadata, and infer.

A model is a task (or the backbone itself, by its name: it embeds with no adapter). Every model
takes `text` (BYTES, shape [-1] or [-1, 1]); classifiers and regressors also take an optional
`text_pair` of the same shape (row i is the pair `text[i]`, `text_pair[i]`). What a model gives
follows its head: `scores` (FP32 [-1, labels], probabilities in the head's label order) and
`label` (BYTES [-1]) for a classifier (a multi-label one gives only `scores`, sigmoids), `value`
(FP32 [-1, 1]) for a regressor, `embedding` (FP32 [-1, hidden]) for an embedding task and
`generated_text` (BYTES [-1]) for a generative one. Only the task's current version serves;
`/versions/{n}` routes answer for n = the current version. Errors are `{"error": message}`.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from starlette.requests import ClientDisconnect

from service.decode import task_kind
from service.engine import Embed
from service.openapi import errors
from service.routes.common import INFERENCE_KEY, counted, service_of
from service.routes.v2_protocol import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    OutputTensor,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TensorMetadata,
    V2Error,
    binary_flag,
    bytes_values,
    encode_response,
    inline_schema,
    parse_request,
)
from service.runtime import Service
from service.settings import Settings
from store.base import is_valid_name
from store.errors import (
    ClientDisconnected,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    VersionConflict,
)

__all__ = ["router"]

router = APIRouter(tags=["kserve-v2"])

EXTENSIONS = ["binary_tensor_data", "classification"]
"""Protocol extensions this server speaks (`GET /v2` lists them)."""

PLATFORM = "adapterserve"

HEADER_LENGTH = "Inference-Header-Content-Length"

# A task name, or the backbone's (which may have capitals, as `all-MiniLM-L6-v2` does). A name of this
# form that names neither is an unknown model (404); one outside it is malformed (400).
MODEL_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$"
_MODEL_RE = re.compile(MODEL_PATTERN)
ModelName = Annotated[
    str,
    Path(
        description="A task, or the backbone's name.",
        json_schema_extra={"pattern": MODEL_PATTERN, "minLength": 1, "maxLength": 64},
    ),
]
ModelVersion = Annotated[
    str,
    Path(
        description="The task's current version (0: the backbone itself).",
        json_schema_extra={"pattern": r"^[0-9]{1,9}$"},
    ),
]

# What each kind of task gives, in the order of the metadata (and of an answer that names no outputs).
_OUTPUTS = {
    "classify": ("scores", "label"),
    "regress": ("value",),
    "embed": ("embedding",),
    "generate": ("generated_text",),
}
_PAIRS = frozenset({"classify", "regress"})


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return errors(*codes, body=V2Error)


_MODEL_ERRORS = _errors(400, 401, 404, 503)
_INFER_ERRORS = _errors(400, 401, 404, 409, 413, 415, 422, 429, 503, 504)
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_schema(InferenceRequest)},
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": f"Binary tensor data: the JSON request ({HEADER_LENGTH} bytes), then "
                    "each binary input's bytes in input order.",
                }
            },
        },
    }
}
_INFER_OK = {
    200: {
        "description": "The outputs; with binary outputs, the JSON answer is the first "
        f"{HEADER_LENGTH} bytes and the tensors' bytes follow.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


# -- server ---------------------------------------------------------------------------------


@router.get("/v2")
async def server_metadata(request: Request) -> ServerMetadata:
    """The server's name, version and protocol extensions."""
    return ServerMetadata(name="adapterserve", version=request.app.version, extensions=EXTENSIONS)


@router.get("/v2/health/live")
async def server_live() -> ServerLive:
    """The process is up."""
    return ServerLive(live=True)


@router.get("/v2/health/ready", responses=_errors(503))
async def server_ready(request: Request) -> ServerReady:
    """200 once warmed up; 503 before that and while draining (as /readyz)."""
    service_of(request).admit()
    return ServerReady(ready=True)


# -- models ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Model:
    """What a model's metadata says: its version and head."""

    name: str
    version: int
    kind: str
    head: str | None
    labels: tuple[str, ...]


def _backbone_kind(svc: Service) -> str:
    # As GET /v1/models names it: an encoder embeds, a decoder-only backbone generates.
    return "embed" if svc.backbone.spec.num_layers else "generate"


async def _lookup(svc: Service, name: str) -> _Model:
    """The model `name`: the backbone, or a task's current version (404 when there is none)."""
    if name == svc.backbone.spec.name:
        kind = _backbone_kind(svc)
        return _Model(name, 0, kind, "embedding" if kind == "embed" else None, ())
    if not is_valid_name(name) and len(name) <= 64 and _MODEL_RE.fullmatch(name):
        raise NotFound(f"no model named {name!r}: GET /v1/models lists them")
    current, head = await svc.registry.head(name)
    if head is None:
        return _Model(name, current, "generate", None, ())
    return _Model(name, current, task_kind(head), head.type, tuple(head.labels))


async def _model(svc: Service, name: str, version: str | None) -> _Model:
    """The model `name` once the service is ready, checked to serve `version` when one is named."""
    svc.admit()
    model = await _lookup(svc, name)
    _check_version(name, version, model.version)
    return model


def _check_version(name: str, asked: str | None, current: int) -> None:
    if asked is None:
        return
    if not (asked.isascii() and asked.isdigit()) or len(asked) > 9:
        raise InvalidRequest(f"version {asked[:20]!r}: a version is a number")
    if int(asked) != current:
        raise NotFound(f"model {name!r} serves version {current} only, not {int(asked)}")


def _metadata(model: _Model, *, hidden: int) -> ModelMetadata:
    text = TensorMetadata(name="text", datatype="BYTES", shape=[-1])
    inputs = [text]
    if model.kind in _PAIRS:
        inputs.append(TensorMetadata(name="text_pair", datatype="BYTES", shape=[-1]))
    shapes = {
        "scores": ("FP32", [-1, len(model.labels)]),
        "label": ("BYTES", [-1]),
        "value": ("FP32", [-1, 1]),
        "embedding": ("FP32", [-1, hidden]),
        "generated_text": ("BYTES", [-1]),
    }
    names = [n for n in _OUTPUTS[model.kind] if not (n == "label" and model.head == "multi_label")]
    outputs = [TensorMetadata(name=n, datatype=shapes[n][0], shape=shapes[n][1]) for n in names]
    parameters: dict[str, Any] = {"kind": model.kind}
    if model.labels:
        parameters["labels"] = list(model.labels)
    return ModelMetadata(
        name=model.name,
        versions=[str(model.version)],
        platform=PLATFORM,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters,
    )


@router.get("/v2/models/{model}", dependencies=INFERENCE_KEY, responses=_MODEL_ERRORS)
async def model_metadata(model: ModelName, request: Request) -> ModelMetadata:
    """The model's inputs and outputs."""
    svc = service_of(request)
    return _metadata(await _model(svc, model, None), hidden=svc.backbone.spec.hidden_size)


@router.get("/v2/models/{model}/versions/{version}", dependencies=INFERENCE_KEY, responses=_MODEL_ERRORS)
async def model_version_metadata(model: ModelName, version: ModelVersion, request: Request) -> ModelMetadata:
    """The model's inputs and outputs, for its current version."""
    svc = service_of(request)
    return _metadata(await _model(svc, model, version), hidden=svc.backbone.spec.hidden_size)


@router.get("/v2/models/{model}/ready", dependencies=INFERENCE_KEY, responses=_MODEL_ERRORS)
async def model_ready(model: ModelName, request: Request) -> ModelReady:
    """200 when the model serves (it is loaded on first use); 404 when it does not exist."""
    await _model(service_of(request), model, None)
    return ModelReady(name=model, ready=True)


@router.get(
    "/v2/models/{model}/versions/{version}/ready", dependencies=INFERENCE_KEY, responses=_MODEL_ERRORS
)
async def model_version_ready(model: ModelName, version: ModelVersion, request: Request) -> ModelReady:
    """200 when the version named is the one serving."""
    await _model(service_of(request), model, version)
    return ModelReady(name=model, ready=True)


# -- infer ----------------------------------------------------------------------------------


@router.post(
    "/v2/models/{model}/infer",
    dependencies=INFERENCE_KEY,
    response_model=InferenceResponse,
    responses={**_INFER_OK, **_INFER_ERRORS},
    openapi_extra=_INFER_BODY,
)
async def infer(model: ModelName, request: Request) -> Response:
    """Run the model over the request's tensors (JSON, or binary tensor data)."""
    return await _infer(request, model, None)


@router.post(
    "/v2/models/{model}/versions/{version}/infer",
    dependencies=INFERENCE_KEY,
    response_model=InferenceResponse,
    responses={**_INFER_OK, **_INFER_ERRORS},
    openapi_extra=_INFER_BODY,
)
async def infer_version(model: ModelName, version: ModelVersion, request: Request) -> Response:
    """Run the model's current version, which must be the one named."""
    return await _infer(request, model, version)


@dataclass(frozen=True, slots=True)
class _Wanted:
    name: str
    binary: bool
    top_k: int = 0
    """`classification` extension: answer the top k scores as BYTES `value:index:label`."""


def _body_limit(s: Settings) -> int:
    # The largest request that could pass predict's own limits, pairs written with \u escapes included.
    return s.max_inputs * (2 * 6 * s.max_input_chars + 64) + (1 << 20)


async def _read_body(request: Request, *, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}", limit=limit)
    chunks = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes", limit=limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected("the client went away while sending the body") from None
    raw = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return raw
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:20]!r}: send gzip, deflate or identity")
    # Bounded: a small compressed body may not expand past the limit.
    inflate = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflate.decompress(raw, limit + 1)
    except zlib.error:
        raise InvalidRequest(f"the body is not valid {encoding} data") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"the decompressed body exceeds the limit of {limit} bytes", limit=limit)
    if not inflate.eof:
        raise InvalidRequest(f"the {encoding} body is truncated")
    return out


def _rows(body: InferenceRequest, binary: dict[str, bytes], kind: str) -> list:
    """The inputs as predict takes them: texts, or [text, text_pair] pairs."""
    by_name = {i.name: i for i in body.inputs}
    allowed = {"text", "text_pair"} if kind in _PAIRS else {"text"}
    for name, inp in by_name.items():
        if name not in allowed:
            raise InvalidRequest(f"input {name!r}: this model takes {' and '.join(sorted(allowed))}")
        if inp.datatype != "BYTES":
            raise InvalidRequest(f"input {name!r}: datatype {inp.datatype}; this model takes BYTES")
    text = by_name.get("text")
    if text is None:
        raise InvalidRequest("input 'text' is missing")
    if not (len(text.shape) == 1 or (len(text.shape) == 2 and text.shape[1] == 1)) or text.shape[0] < 1:
        raise InvalidRequest(f"input 'text': shape {text.shape}; use [N] or [N, 1] with N >= 1")
    texts = bytes_values(text, binary.get("text"))
    pair = by_name.get("text_pair")
    if pair is None:
        return texts
    if pair.shape != text.shape:
        raise InvalidRequest(f"input 'text_pair': shape {pair.shape}; it must be text's shape {text.shape}")
    return [[a, b] for a, b in zip(texts, bytes_values(pair, binary.get("text_pair")), strict=True)]


def _wanted(body: InferenceRequest, kind: str, *, head: str | None) -> list[_Wanted]:
    """The outputs to answer, in order, each in JSON or binary."""
    default = binary_flag(body.parameters, "binary_data_output", default=False)
    names = _OUTPUTS[kind]
    if body.outputs is None:
        return [_Wanted(n, default) for n in names if not (n == "label" and head == "multi_label")]
    out = []
    for o in body.outputs:
        if o.name not in names:
            raise InvalidRequest(f"output {o.name!r}: this model gives {', '.join(names)}")
        if o.name == "label" and head == "multi_label":
            raise InvalidRequest("output 'label': a multi-label task has no single label; ask for 'scores'")
        if any(w.name == o.name for w in out):
            raise InvalidRequest(f"output {o.name!r} is asked for twice")
        top_k = (o.parameters or {}).get("classification", 0)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise InvalidRequest(f"output {o.name!r}: classification is a count of classes")
        if top_k and o.name != "scores":
            raise InvalidRequest("the classification extension applies to the 'scores' output")
        out.append(_Wanted(o.name, binary_flag(o.parameters, "binary_data", default=default), top_k))
    return out


def _answer_kind(output: dict) -> tuple[str, str | None]:
    """The kind (and head type) an answer's outputs show."""
    if "embedding" in output:
        return "embed", "embedding"
    if "value" in output:
        return "regress", "regression"
    if "generated_text" in output:
        return "generate", None
    return "classify", "classification" if "label" in output else "multi_label"


def _tensor(want: _Wanted, outputs: list[dict]) -> OutputTensor:
    n = len(outputs)
    if want.name == "scores":
        labels = list(outputs[0]["scores"])
        scores = np.array([list(o["scores"].values()) for o in outputs], dtype=np.float32).reshape(n, -1)
        if want.top_k:
            k = min(want.top_k, len(labels))
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            # Triton's classification format: value (printf %f), class index, label.
            top = [f"{scores[r, i]:f}:{i}:{labels[i]}" for r in range(n) for i in order[r]]
            return OutputTensor("scores", "BYTES", (n, k), top, want.binary)
        return OutputTensor("scores", "FP32", scores.shape, scores, want.binary)
    if want.name == "label":
        return OutputTensor("label", "BYTES", (n,), [o["label"] for o in outputs], want.binary)
    if want.name == "value":
        values = np.array([[o["value"]] for o in outputs], dtype=np.float32)
        return OutputTensor("value", "FP32", (n, 1), values, want.binary)
    if want.name == "embedding":
        vectors = np.stack([np.asarray(o["embedding"], dtype=np.float32) for o in outputs])
        return OutputTensor("embedding", "FP32", vectors.shape, vectors, want.binary)
    return OutputTensor("generated_text", "BYTES", (n,), [o["generated_text"] for o in outputs], want.binary)


def _max_new_tokens(body: InferenceRequest) -> int | None:
    value = (body.parameters or {}).get("max_new_tokens")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidRequest("parameters: max_new_tokens must be a positive integer")
    return value


async def _infer(request: Request, name: str, version: str | None) -> Response:
    svc = service_of(request)
    raw = await _read_body(request, limit=_body_limit(svc.settings))
    body, binary = parse_request(raw, header_length=request.headers.get(HEADER_LENGTH))
    max_new_tokens = _max_new_tokens(body)
    bare = name == svc.backbone.spec.name

    async def work(svc: Service) -> tuple[int, list[OutputTensor]]:
        model = await _lookup(svc, name)
        _check_version(name, version, model.version)
        # Every check of the request before its rows are queued: a bad one never costs a forward.
        rows = _rows(body, binary, model.kind)
        wanted = _wanted(body, model.kind, head=model.head)
        answer = await svc.predict(
            name,
            rows,
            all_scores=True,
            max_new_tokens=max_new_tokens,
            embed=Embed() if bare and model.kind == "embed" else None,
        )
        # A new version became current between the lookup and predict's lease: fine unless a
        # version was named or its head answers other tensors.
        moved = answer.version != model.version
        if moved and (version is not None or _answer_kind(answer.outputs[0]) != (model.kind, model.head)):
            raise VersionConflict(f"model {name!r} moved to version {answer.version} meanwhile; retry")
        return answer.version, [_tensor(w, answer.outputs) for w in wanted]

    served, tensors = await counted(request, name, work)
    head: dict[str, Any] = {"model_name": name, "model_version": str(served)}
    if body.id is not None:
        head["id"] = body.id
    content, header_length = encode_response(head, tensors)
    headers = {"X-Adapter-Version": str(served)}
    if header_length is None:
        return Response(content, media_type="application/json", headers=headers)
    headers[HEADER_LENGTH] = str(header_length)
    return Response(content, media_type="application/octet-stream", headers=headers)

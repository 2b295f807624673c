"""OpenAI-compatible surface: `POST /v1/embeddings` and `GET /v1/models`, where `model` names a task.

The backbone's own name (as `GET /v1/backbone` gives it) is a model too: it embeds with no adapter,
pooled and normalised as its sentence-transformers config says.
"""

from __future__ import annotations

import base64
import time
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from service.engine import Embed
from service.openapi import errors
from service.routes.common import INFERENCE_KEY, counted, orjson_response, service_of
from store.errors import InvalidRequest, NotFound

__all__ = ["router"]

router = APIRouter(tags=["openai"])

_STARTED = int(time.time())


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request: `input` is a string, strings, token ids, or lists of token ids."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256, description="A task, or the backbone's name.")
    input: str | list[str] | list[int] | list[list[int]] = Field(description="What to embed.")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="`base64`: little-endian float32 bytes, base64-encoded."
    )
    dimensions: int | None = Field(
        default=None, ge=1, description="Only the embedding's own size is served (no truncation)."
    )
    user: str | None = Field(default=None, max_length=256, description="Accepted and ignored.")


class ModelCard(BaseModel):
    """One model of `GET /v1/models`: a task (or the backbone) and what it answers."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adapterserve"
    kind: str | None = Field(description="classify, regress, embed or generate.")


class ModelList(BaseModel):
    """`GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingItem(BaseModel):
    """One input's embedding."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    """Tokens the request read."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    """`POST /v1/embeddings`."""

    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


def _inputs(raw: str | list) -> list:
    if isinstance(raw, str):
        return [raw]
    if not raw:
        raise InvalidRequest("input: send at least one string or token list")
    if isinstance(raw[0], int):
        return [raw]  # one input given as token ids
    if any(isinstance(x, list) and not x for x in raw):
        raise InvalidRequest("input: a token list is empty")
    return list(raw)


@router.post(
    "/v1/embeddings",
    dependencies=INFERENCE_KEY,
    response_model=EmbeddingsResponse,
    responses=errors(400, 401, 404, 413, 422, 429, 503, 504),
)
async def embeddings(body: EmbeddingsRequest, request: Request) -> Response:
    """Embed the inputs with the task's adapter (or the backbone alone)."""
    svc = service_of(request)
    size = svc.backbone.spec.hidden_size
    if body.dimensions is not None and body.dimensions != size:
        raise InvalidRequest(f"dimensions: {body.model!r} embeds in {size} dimensions only")
    inputs = _inputs(body.input)
    answer = await counted(request, body.model, lambda s: s.predict(body.model, inputs, embed=Embed()))
    vectors = [o["embedding"] for o in answer.outputs]
    if body.encoding_format == "base64":
        vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
    return orjson_response(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "model": body.model,
            "usage": {"prompt_tokens": answer.tokens, "total_tokens": answer.tokens},
        }
    )


@router.get("/v1/models", dependencies=INFERENCE_KEY, responses=errors(401, 503))
async def models(request: Request) -> ModelList:
    """The backbone and every task that has a current version."""
    svc = service_of(request)
    svc.admit()
    return ModelList(
        data=[ModelCard(id=name, created=_STARTED, kind=kind) for name, kind in await svc.models()]
    )


@router.get("/v1/models/{model:path}", dependencies=INFERENCE_KEY, responses=errors(400, 401, 404, 503))
async def model(model: str, request: Request) -> ModelCard:
    """One model: the backbone or a task."""
    if not model or len(model) > 256:
        raise InvalidRequest("model: a name of 1 to 256 characters")
    svc = service_of(request)
    svc.admit()
    for name, kind in await svc.models():
        if name == model:
            return ModelCard(id=name, created=_STARTED, kind=kind)
    raise NotFound(f"no model named {model!r}; GET /v1/models lists them")

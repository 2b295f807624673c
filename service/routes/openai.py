"""OpenAI-compatible surface: `POST /v1/completions`, `POST /v1/embeddings` and `GET /v1/models`.

`model` names a task (the convention of vLLM and LoRAX). Completions decode in the continuous batch
of every generating task; `stream: true` answers server-sent events, `data: {chunk}` per piece of
text and `data: [DONE]` at the end, as OpenAI's clients parse them.

The backbone's own name (as `GET /v1/backbone` gives it) is a model too: it embeds with no adapter,
pooled and normalised as its sentence-transformers config says.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Literal

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from adapters.generate import Sampling
from service.engine import Embed
from service.openapi import errors
from service.routes.common import INFERENCE_KEY, counted, orjson_response, service_of
from store.errors import AdapterServeError, InvalidRequest, NotFound

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


class StreamOptions(BaseModel):
    """OpenAI's `stream_options`."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(default=False, description="Send a last chunk with the usage.")


class CompletionRequest(BaseModel):
    """OpenAI's completions request; `top_k` is an extension (as vLLM has it)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256, description="A generating task, or the backbone's name.")
    prompt: str | list[str] = Field(description="One prompt or several (each one choice).")
    max_tokens: int = Field(default=16, ge=1, description="Tokens to generate at most per prompt.")
    temperature: float = Field(default=1.0, ge=0, le=2, description="0: greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, description="Keep the k most likely tokens (0: all).")
    seed: int | None = Field(default=None, description="Same seed, same output, whatever shares the batch.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 strings that end the text.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(default=1, description="One choice per prompt.")
    echo: Literal[False] = False
    logprobs: None = None
    presence_penalty: float = Field(default=0.0, ge=0, le=0, description="Only 0 is served.")
    frequency_penalty: float = Field(default=0.0, ge=0, le=0, description="Only 0 is served.")
    user: str | None = Field(default=None, max_length=256, description="Accepted and ignored.")


def _stops(raw: str | list[str] | None) -> tuple[str, ...]:
    stops = [raw] if isinstance(raw, str) else list(raw or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise InvalidRequest("stop: up to 4 non-empty strings")
    return tuple(stops)


def _sse(body: dict | str) -> bytes:
    data = body if isinstance(body, str) else orjson.dumps(body).decode()
    return f"data: {data}\n\n".encode()


@router.post(
    "/v1/completions",
    dependencies=INFERENCE_KEY,
    responses=errors(400, 401, 404, 413, 422, 429, 503, 504),
)
async def completions(body: CompletionRequest, request: Request) -> Response:
    """Complete the prompts with the task's adapter; `stream: true` for server-sent events."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise InvalidRequest("prompt: send at least one string")
    sampling = Sampling(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed)
    stop = _stops(body.stop)

    async def admit(svc):
        return await svc.complete(
            body.model, prompts, max_tokens=body.max_tokens, sampling=sampling, stop=stop
        )

    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
    head["model"] = body.model
    if not body.stream:

        async def whole(svc):
            completion = await admit(svc)
            try:
                return completion, await completion.collect()
            finally:
                completion.close()

        completion, results = await counted(request, body.model, whole)
        choices = [
            {"text": text, "index": i, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(results)
        ]
        return orjson_response({**head, "choices": choices, "usage": _usage(completion)})

    svc = service_of(request)
    completion = await counted(request, body.model, admit)
    try:
        svc.enter()  # a drain waits for the stream to end
    except AdapterServeError:
        completion.close()
        raise
    usage = body.stream_options is not None and body.stream_options.include_usage

    async def chunks():
        try:
            async for e in completion.events():
                choice = {
                    "text": e.text,
                    "index": e.index,
                    "logprobs": None,
                    "finish_reason": e.finish_reason,
                }
                yield _sse({**head, "choices": [choice]})
            if usage:
                yield _sse({**head, "choices": [], "usage": _usage(completion)})
        except AdapterServeError as exc:
            # Headers are gone: the failure travels as an OpenAI error event.
            yield _sse(
                {"error": {"message": exc.message, "type": type(exc).__name__, "param": None, "code": None}}
            )
        finally:
            completion.close()
            svc.leave()
        yield _sse("[DONE]")

    return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _usage(completion) -> dict:
    prompt, generated = completion.prompt_tokens, completion.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


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

"""text-embeddings-inference surface: `/embed`, `/predict`, `/rerank`, `/tokenize`, `/decode`, `/info`.

Bodies are TEI's, plus a `model` field: TEI serves one model, we serve many. `model` names a task or
the backbone itself (its name in `GET /v1/backbone`). Left out, `/embed`, `/rerank`, `/tokenize` and
`/decode` use the backbone alone (no adapter); `/predict` needs it, since the backbone has no head.
Errors are TEI's `{"error": message, "error_type": ...}` (service/errors.py shapes them by path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from service.engine import Embed
from service.openapi import errors
from service.routes.common import INFERENCE_KEY, counted, orjson_response, service_of
from service.runtime import Service
from store.errors import InvalidRequest, NotFound, PayloadTooLarge

__all__ = ["router"]

router = APIRouter(tags=["text-embeddings-inference"])


def _integral(value: object) -> object:
    # JSON Schema counts 7.0 as an integer; true and "7" stay refused (pydantic's lax int takes both).
    return int(value) if isinstance(value, float) and value.is_integer() else value


# TEI reads token ids as u32; which of them the backbone knows is the runtime's to say.
TokenId = Annotated[StrictInt, Field(ge=0, le=2**32 - 1), BeforeValidator(_integral)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Sequence = Annotated[list[str], Field(min_length=1, max_length=2, description="[text] or [text_a, text_b].")]
ModelName = Annotated[str, Field(min_length=1, max_length=256)]

REGRESSION_LABEL = "LABEL_0"
"""The label of a regression head's one score: the name transformers gives a one-output head."""

# Labels that name the "related" class of a pair classifier, in order of preference; without one the
# last label ranks (transformers' binary convention: label 1 is the positive one).
_POSITIVE = ("entailment", "equivalent", "duplicate", "paraphrase", "relevant", "positive", "similar", "yes")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeiError(BaseModel):
    """text-embeddings-inference's error body."""

    error: str
    error_type: Literal["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty"]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {**spec, "model": TeiError} for code, spec in errors(*codes).items()}


_INFER_ERRORS = _errors(400, 401, 404, 413, 422, 429, 503, 504)
_TOKENIZER_ERRORS = _errors(400, 401, 404, 413, 422, 503)


class EmbedRequest(_Request):
    """TEI's `/embed`: one input or a batch, each a string or token ids."""

    model: ModelName | None = Field(default=None, description="A task or the backbone; default the backbone.")
    inputs: str | TokenIds | Annotated[list[str | TokenIds], Field(min_length=1)] = Field(
        description="A string, token ids, or a batch of them."
    )
    normalize: bool = Field(default=True, description="L2-normalise each vector.")
    truncate: bool = Field(default=False, description="Cut over-long inputs instead of refusing them (413).")
    truncation_direction: Literal["right"] = Field(default="right", description="Only right is served.")


class PredictRequest(_Request):
    """TEI's `/predict`: a text, a [text_a, text_b] pair, or a batch of `[text]` and pairs."""

    model: ModelName = Field(description="A classification or regression task.")
    inputs: str | Sequence | Annotated[list[Sequence], Field(min_length=1)] = Field(
        description="A string, a pair [text_a, text_b], or a batch of [text] and [text_a, text_b]."
    )
    raw_scores: bool = Field(default=False, description="Logits instead of probabilities.")
    truncate: bool = Field(default=False, description="Cut over-long inputs instead of refusing them (413).")
    truncation_direction: Literal["right"] = Field(default="right", description="Only right is served.")


class Prediction(BaseModel):
    """One label's score."""

    score: float
    label: str


class RerankRequest(_Request):
    """TEI's `/rerank`: texts ranked by relevance to the query."""

    model: ModelName | None = Field(
        default=None,
        description="A pair classification or regression task, or an embedding task (cosine similarity); "
        "default the backbone (cosine).",
    )
    query: str
    texts: Annotated[list[str], Field(min_length=1)]
    raw_scores: bool = Field(
        default=False, description="A pair classifier's logit instead of its probability."
    )
    return_text: bool = Field(default=False, description="Echo each text beside its score.")
    truncate: bool = Field(default=False, description="Cut over-long inputs instead of refusing them (413).")
    truncation_direction: Literal["right"] = Field(default="right", description="Only right is served.")
    label: Annotated[str, Field(min_length=1, max_length=128)] | None = Field(
        default=None,
        description="The classifier label whose score ranks; default the first of entailment, equivalent, "
        "duplicate, paraphrase, relevant, positive, similar, yes that the task has, else its last label.",
    )


class Rank(BaseModel):
    """One text's place: its index in `texts`, its score, and (with `return_text`) the text."""

    index: int
    text: str | None = None
    score: float


class TokenizeRequest(_Request):
    """TEI's `/tokenize`."""

    model: ModelName | None = Field(default=None, description="Every task shares the backbone's tokenizer.")
    inputs: str | Annotated[list[str], Field(min_length=1)]
    add_special_tokens: bool = True


class SimpleToken(BaseModel):
    """A token: its id, its text, whether it is special, and its character span (none for special ones)."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class DecodeRequest(_Request):
    """TEI's `/decode`."""

    model: ModelName | None = Field(default=None, description="Every task shares the backbone's tokenizer.")
    ids: TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    skip_special_tokens: bool = True


class Info(BaseModel):
    """TEI's `/info`, of the backbone."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: dict[str, dict[str, str]]
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None = None
    docker_label: str | None = None


# -- helpers --------------------------------------------------------------------------------------


def _model(request: Request, model: str | None) -> str:
    return model or service_of(request).backbone.spec.name


async def _kind(svc: Service, model: str) -> str | None:
    """classify, regress, embed or generate (None: unknown until its config is read)."""
    _known(svc, model)
    if model == svc.backbone.spec.name:
        return "embed"
    _, kind = await svc.registry.describe(model)
    return kind


def _known(svc: Service, model: str) -> None:
    # Any name that is neither the backbone nor a task is simply no model here: 404, malformed or not.
    if not svc.knows(model):
        raise NotFound(f"no model named {model!r}; GET /v1/models lists them")


def _predictions(out: dict, *, raw: bool) -> list[dict]:
    """One input's label scores, best first, as TEI sorts them."""
    if "value" in out:  # regression: the value is the raw score and the only one
        return [{"score": out["value"], "label": REGRESSION_LABEL}]
    scores = out.get("logits" if raw else "scores")
    if scores is None:
        raise InvalidRequest("the model answers no label scores; /predict needs a classification task")
    return sorted(({"score": s, "label": k} for k, s in scores.items()), key=lambda p: -p["score"])


def _positive(labels: list[str]) -> str:
    lower = {lab.lower(): lab for lab in labels}
    return next((lower[name] for name in _POSITIVE if name in lower), labels[-1])


def _relevance(out: dict, *, label: str | None, raw: bool) -> float:
    """A pair's score: a regressor's value, else the probability (or logit) of the ranking label."""
    if "value" in out:
        return out["value"]
    scores = out.get("logits" if raw else "scores")
    if not scores:
        raise InvalidRequest("the model answers no label scores; rerank needs a pair classifier")
    name = label or _positive(list(scores))
    if name not in scores:
        raise InvalidRequest(f"label: {name!r} is not one of the task's labels {list(scores)}")
    return scores[name]


def _check_texts(svc: Service, texts: list[str]) -> None:
    s = svc.settings
    if len(texts) > s.max_inputs:
        raise PayloadTooLarge(f"batch size {len(texts)} > maximum allowed batch size {s.max_inputs}")
    if any(len(t) > s.max_input_chars for t in texts):
        raise PayloadTooLarge(f"an input is longer than {s.max_input_chars} characters")


def _tokens(texts: list[str], *, add_special_tokens: bool) -> Callable[[Any], list[list[dict]]]:
    """What runs on the tokenizer's thread: each text's tokens with character offsets, as TEI gives them."""

    def run(tokenizer) -> list[list[dict]]:
        enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        if enc.encodings is None:
            raise InvalidRequest("the backbone's tokenizer is not a fast tokenizer; it gives no offsets")
        out = []
        for text, e in zip(texts, enc.encodings, strict=True):
            tokens = []
            for tid, tok, (start, stop), special in zip(
                e.ids, e.tokens, e.offsets, e.special_tokens_mask, strict=True
            ):
                if special:
                    tokens.append({"id": tid, "text": tok, "special": True, "start": None, "stop": None})
                else:
                    piece = text[start:stop]
                    tokens.append({"id": tid, "text": piece, "special": False, "start": start, "stop": stop})
            out.append(tokens)
        return out

    return run


# -- routes ---------------------------------------------------------------------------------------


@router.post("/embed", dependencies=INFERENCE_KEY, response_model=list[list[float]], responses=_INFER_ERRORS)
async def embed(body: EmbedRequest, request: Request) -> Response:
    """Sentence vectors with the model's adapter (the backbone alone when `model` is left out)."""
    model = _model(request, body.model)
    raw = body.inputs
    inputs = [raw] if isinstance(raw, str) or isinstance(raw[0], int) else list(raw)

    async def work(svc: Service):
        _known(svc, model)
        return await svc.predict(
            model, inputs, embed=Embed(), normalize=body.normalize, truncate=body.truncate
        )

    answer = await counted(request, model, work)
    return orjson_response([o["embedding"] for o in answer.outputs])


@router.post(
    "/predict",
    dependencies=INFERENCE_KEY,
    response_model=list[Prediction] | list[list[Prediction]],
    responses=_INFER_ERRORS,
)
async def predict(body: PredictRequest, request: Request) -> Response:
    """Every label's score per input, best first; one input answers one list, a batch a list of lists."""
    raw = body.inputs
    batch = not isinstance(raw, str) and not isinstance(raw[0], str)
    items = raw if batch else [[raw] if isinstance(raw, str) else raw]
    inputs = [x[0] if len(x) == 1 else x for x in items]

    async def work(svc: Service):
        kind = await _kind(svc, body.model)
        if kind in ("embed", "generate"):
            what = "embeds (ask /embed)" if kind == "embed" else "generates text"
            raise InvalidRequest(f"{body.model!r} {what}; /predict needs a classification or regression task")
        return await svc.predict(
            body.model, inputs, all_scores=True, raw_scores=body.raw_scores, truncate=body.truncate
        )

    answer = await counted(request, body.model, work)
    predictions = [_predictions(o, raw=body.raw_scores) for o in answer.outputs]
    return orjson_response(predictions if batch else predictions[0])


@router.post("/rerank", dependencies=INFERENCE_KEY, response_model=list[Rank], responses=_INFER_ERRORS)
async def rerank(body: RerankRequest, request: Request) -> Response:
    """The texts by relevance to the query, best first: a pair task's score, or cosine similarity."""
    model = _model(request, body.model)

    async def work(svc: Service) -> list[float]:
        kind = await _kind(svc, model)
        if kind == "generate":
            raise InvalidRequest(f"{model!r} generates text; rerank needs a pair classifier or an embedding")
        if kind == "embed":
            answer = await svc.predict(
                model, [body.query, *body.texts], embed=Embed(), normalize=True, truncate=body.truncate
            )
            vectors = np.stack([o["embedding"] for o in answer.outputs])
            return (vectors[1:] @ vectors[0]).tolist()  # unit vectors: the dot product is the cosine
        pairs = [[body.query, t] for t in body.texts]
        answer = await svc.predict(
            model, pairs, all_scores=True, raw_scores=body.raw_scores, truncate=body.truncate
        )
        return [_relevance(o, label=body.label, raw=body.raw_scores) for o in answer.outputs]

    scores = await counted(request, model, work)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks = [
        {"index": i, "text": body.texts[i], "score": scores[i]}
        if body.return_text
        else {"index": i, "score": scores[i]}
        for i in order
    ]
    return orjson_response(ranks)


@router.post(
    "/tokenize",
    dependencies=INFERENCE_KEY,
    response_model=list[list[SimpleToken]],
    responses=_TOKENIZER_ERRORS,
)
async def tokenize(body: TokenizeRequest, request: Request) -> Response:
    """Each input's tokens, with their text and character offsets; special tokens have no offsets."""
    model = _model(request, body.model)
    texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)

    async def work(svc: Service) -> list[list[dict]]:
        _known(svc, model)
        _check_texts(svc, texts)
        return await svc.engine.with_tokenizer(_tokens(texts, add_special_tokens=body.add_special_tokens))

    return orjson_response(await counted(request, model, work))


@router.post(
    "/decode",
    dependencies=INFERENCE_KEY,
    response_model=list[str],
    # 400: a body that is not JSON, as on every route with a JSON body
    responses=_errors(400, 401, 404, 413, 422, 503),
)
async def decode(body: DecodeRequest, request: Request) -> Response:
    """The text of each list of token ids."""
    model = _model(request, body.model)
    lists = [body.ids] if isinstance(body.ids[0], int) else body.ids

    async def work(svc: Service) -> list[str]:
        _known(svc, model)
        s = svc.settings
        if len(lists) > s.max_inputs:
            raise PayloadTooLarge(f"batch size {len(lists)} > maximum allowed batch size {s.max_inputs}")
        if any(len(ids) > s.max_input_chars for ids in lists):
            raise PayloadTooLarge(f"a list has more than {s.max_input_chars} ids")
        # Ids the tokenizer does not know decode to nothing, as TEI's tokenizer treats them.
        return await svc.engine.with_tokenizer(
            lambda tok: tok.batch_decode(lists, skip_special_tokens=body.skip_special_tokens)
        )

    return orjson_response(await counted(request, model, work))


@router.get("/info", dependencies=INFERENCE_KEY, responses=_errors(401, 503))
async def info(request: Request) -> Info:
    """The backbone and the limits every model here shares."""
    svc = service_of(request)
    svc.admit()
    s, spec = svc.settings, svc.backbone.spec
    return Info(
        model_id=spec.name,
        model_sha=None,
        model_dtype=str(svc.backbone.dtype).removeprefix("torch."),
        model_type={"embedding": {"pooling": svc.backbone.pooling.mode}},
        max_concurrent_requests=s.max_queue,
        max_input_length=min(
            svc.backbone.pooling.max_tokens or svc.engine.max_input_tokens, svc.engine.max_input_tokens
        ),
        max_batch_tokens=s.max_batch_tokens,
        max_batch_requests=s.max_batch_size,
        max_client_batch_size=s.max_inputs,
        auto_truncate=False,
        tokenization_workers=1,
        version=request.app.version,
    )

"""The text-embeddings-inference routes on a tiny BERT, against references the product did not compute.

Vectors and logits come from a fresh copy of the same random BERT with LoRA merged into its weights
by hand (W + alpha/r B A), pooled, normalised and put through the head in plain torch; softmax,
cosine similarity and rankings are worked out here; token ids and offsets are the tokenizer's own.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from api_support import (
    API,
    VOCAB,
    admin,
    artifact_config,
    multipart,
    random_arrays,
    tiny_bert,
    tiny_tokenizer,
    write_artifact,
)

pytestmark = pytest.mark.asyncio

TEXTS = ["a fun film", "boring plot and bad acting", "great"]
QUERY = "the movie was fun"
DOCS = ["a fun movie", "the plot was boring", "great music and a great story", "it was awful"]
_PROJ = {"q": "attention.self.query", "v": "attention.self.value"}
LORA_SCALE = 2.0  # api_support's LoRA: r=4, alpha=8


def _merged(arrays: dict | None):
    """Tiny BERT with the LoRA arrays merged into its weights."""
    model = tiny_bert()
    with torch.no_grad():
        for name, a in (arrays or {}).items():
            if name.endswith("lora.A"):
                _, i, site, _, _ = name.split(".")
                b = torch.from_numpy(arrays[name[: -len("A")] + "B"])
                lin = model.encoder.layer[int(i)].get_submodule(_PROJ[site])
                lin.weight += LORA_SCALE * b @ torch.from_numpy(a)
    return model


def _pooled(inputs, *, arrays=None, pooling="mean") -> torch.Tensor:
    """Each input alone (a string or a pair) through merged BERT, pooled, not normalised."""
    model, tok = _merged(arrays), tiny_tokenizer()
    out = []
    with torch.no_grad():
        for x in inputs:
            enc = tok(x, return_tensors="pt") if isinstance(x, str) else tok(*x, return_tensors="pt")
            h = model(**enc).last_hidden_state[0]
            out.append(h.mean(0) if pooling == "mean" else h[0])
    return torch.stack(out)


def _logits(inputs, arrays) -> list[list[float]]:
    """A linear head on CLS: W h + b."""
    h = _pooled(inputs, arrays=arrays, pooling="cls")
    w, b = torch.from_numpy(arrays["head.out.weight"]), torch.from_numpy(arrays["head.out.bias"])
    return (h @ w.T + b).tolist()


def _softmax(z: list[float]) -> list[float]:
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def _cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


async def _task(client, artifacts, spec, name: str, head: dict, *, seed: int) -> dict:
    """Upload a LoRA task with `head`; its arrays."""
    config = artifact_config("lora", spec.fingerprint)
    config["head"] = head
    arrays = random_arrays(config, spec, seed=seed)
    directory = write_artifact(artifacts / name, config, arrays)
    r = await client.post(f"/v1/adapters/{name}", files=multipart(directory), headers=admin())
    assert r.status_code == 201, r.text
    return arrays


# -- /embed ---------------------------------------------------------------------------------------


async def test_embed_defaults_to_the_backbone_pooled_and_normalised(running):
    async with running() as (app, client):
        r = await client.post("/embed", json={"inputs": TEXTS})
        assert r.status_code == 200, r.text
        want = F.normalize(_pooled(TEXTS), dim=-1).numpy()
        np.testing.assert_allclose(np.array(r.json()), want, atol=1e-5)
        # one input still answers a list of one vector; normalize: false leaves the mean as it is
        one = await client.post("/embed", json={"inputs": TEXTS[1], "normalize": False})
        np.testing.assert_allclose(np.array(one.json()), _pooled(TEXTS[1:2]).numpy(), atol=1e-5)
        # token ids in place of the text: the same vector
        ids = tiny_tokenizer()(TEXTS[1])["input_ids"]
        by_ids = await client.post("/embed", json={"inputs": ids})
        np.testing.assert_allclose(np.array(by_ids.json()), want[1:2], atol=1e-5)
        named = await client.post(
            "/embed", json={"inputs": TEXTS, "model": app.state.service.backbone.spec.name}
        )
        np.testing.assert_allclose(np.array(named.json()), want, atol=1e-6)


async def test_embed_with_a_task_uses_its_adapter(running, artifacts):
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        emb = await _task(client, artifacts, spec, "emb", {"type": "embedding"}, seed=1)
        cls = await _task(client, artifacts, spec, "cls", {"type": "regression"}, seed=2)
        r = await client.post("/embed", json={"model": "emb", "inputs": TEXTS})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(
            np.array(r.json()), F.normalize(_pooled(TEXTS, arrays=emb), dim=-1).numpy(), atol=1e-5
        )
        raw = await client.post("/embed", json={"model": "emb", "inputs": TEXTS, "normalize": False})
        np.testing.assert_allclose(np.array(raw.json()), _pooled(TEXTS, arrays=emb).numpy(), atol=1e-5)
        # a task with a head embeds as its head pools (CLS)
        r = await client.post("/embed", json={"model": "cls", "inputs": TEXTS, "normalize": False})
        want = _pooled(TEXTS, arrays=cls, pooling="cls").numpy()
        np.testing.assert_allclose(np.array(r.json()), want, atol=1e-5)


async def test_truncate_false_refuses_an_overlong_input_and_true_cuts_it(running):
    async with running(max_input_tokens=8) as (_app, client):
        long = " ".join(["the"] * 20)
        r = await client.post("/embed", json={"inputs": [TEXTS[0], long]})
        assert r.status_code == 413 and r.json()["error_type"] == "Validation"
        assert "22 tokens" in r.json()["error"]
        r = await client.post("/embed", json={"inputs": long, "truncate": True})
        assert r.status_code == 200
        cut = tiny_tokenizer()(long, truncation=True, max_length=8)["input_ids"]
        by_ids = await client.post("/embed", json={"inputs": cut})
        np.testing.assert_allclose(r.json(), by_ids.json(), atol=1e-6)


# -- /predict -------------------------------------------------------------------------------------


async def test_predict_gives_every_label_by_softmax_best_first(running, artifacts):
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        labels = ["a", "b", "c"]
        arrays = await _task(
            client, artifacts, spec, "three", {"type": "classification", "labels": labels}, seed=3
        )
        pair = ["a fun film", "the plot was boring"]
        z_single, z_pair = _logits([TEXTS[1], tuple(pair)], arrays)

        def ranked(z, probs=True):
            s = _softmax(z) if probs else z
            return sorted(
                ({"label": k, "score": v} for k, v in zip(labels, s, strict=True)), key=lambda p: -p["score"]
            )

        def close(got, want):
            assert [p["label"] for p in got] == [p["label"] for p in want]
            np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in want], atol=1e-5)

        r = await client.post("/predict", json={"model": "three", "inputs": TEXTS[1]})
        assert r.status_code == 200, r.text
        close(r.json(), ranked(z_single))
        assert sum(p["score"] for p in r.json()) == pytest.approx(1.0, abs=1e-6)
        # a top-level pair is one input; a batch of [text] and pairs answers one list each
        close((await client.post("/predict", json={"model": "three", "inputs": pair})).json(), ranked(z_pair))
        batch = await client.post("/predict", json={"model": "three", "inputs": [[TEXTS[1]], pair]})
        got = batch.json()
        assert len(got) == 2
        close(got[0], ranked(z_single))
        close(got[1], ranked(z_pair))
        raw = await client.post("/predict", json={"model": "three", "inputs": pair, "raw_scores": True})
        close(raw.json(), ranked(z_pair, probs=False))


async def test_predict_on_a_regression_task_gives_its_value(running, artifacts):
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        arrays = await _task(client, artifacts, spec, "sts", {"type": "regression"}, seed=4)
        pair = ["a fun film", "a great movie"]
        r = await client.post("/predict", json={"model": "sts", "inputs": pair})
        assert r.status_code == 200, r.text
        (only,) = r.json()
        assert only["label"] == "LABEL_0"
        assert only["score"] == pytest.approx(_logits([tuple(pair)], arrays)[0][0], abs=1e-4)


# -- /rerank --------------------------------------------------------------------------------------


async def test_rerank_by_the_pair_classifiers_entailment_probability(running, artifacts):
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        labels = ["contradiction", "entailment", "neutral"]
        head = {"type": "classification", "labels": labels}
        arrays = await _task(client, artifacts, spec, "nli", head, seed=5)
        logits = _logits([(QUERY, d) for d in DOCS], arrays)
        entail = [_softmax(z)[1] for z in logits]
        r = await client.post(
            "/rerank", json={"model": "nli", "query": QUERY, "texts": DOCS, "return_text": True}
        )
        assert r.status_code == 200, r.text
        ranks = r.json()
        want_order = sorted(range(len(DOCS)), key=lambda i: -entail[i])
        assert [x["index"] for x in ranks] == want_order
        assert [x["text"] for x in ranks] == [DOCS[i] for i in want_order]
        np.testing.assert_allclose([x["score"] for x in ranks], [entail[i] for i in want_order], atol=1e-5)
        # raw scores: the entailment logit; `label` picks another label; no text unless asked
        raw = (
            await client.post(
                "/rerank", json={"model": "nli", "query": QUERY, "texts": DOCS, "raw_scores": True}
            )
        ).json()
        assert all(set(x) == {"index", "score"} for x in raw)
        np.testing.assert_allclose(
            [x["score"] for x in raw], sorted((z[1] for z in logits), reverse=True), atol=1e-4
        )
        neutral = (
            await client.post(
                "/rerank", json={"model": "nli", "query": QUERY, "texts": DOCS, "label": "neutral"}
            )
        ).json()
        want = sorted(((_softmax(z)[2], i) for i, z in enumerate(logits)), reverse=True)
        assert [x["index"] for x in neutral] == [i for _, i in want]


async def test_rerank_by_cosine_with_the_backbone_or_an_embedding_task(running, artifacts):
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        emb = await _task(client, artifacts, spec, "emb", {"type": "embedding"}, seed=6)
        for model, arrays in ((None, None), ("emb", emb)):
            vectors = _pooled([QUERY, *DOCS], arrays=arrays).numpy()
            cos = [_cosine(vectors[0], v) for v in vectors[1:]]
            body = {"query": QUERY, "texts": DOCS} | ({"model": model} if model else {})
            r = await client.post("/rerank", json=body)
            assert r.status_code == 200, r.text
            ranks = r.json()
            assert [x["index"] for x in ranks] == sorted(range(len(DOCS)), key=lambda i: -cos[i])
            np.testing.assert_allclose([x["score"] for x in ranks], sorted(cos, reverse=True), atol=1e-5)


async def test_rerank_by_a_regression_tasks_value(running, artifacts):
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        arrays = await _task(client, artifacts, spec, "sts", {"type": "regression"}, seed=7)
        values = [z[0] for z in _logits([(QUERY, d) for d in DOCS], arrays)]
        ranks = (await client.post("/rerank", json={"model": "sts", "query": QUERY, "texts": DOCS})).json()
        assert [x["index"] for x in ranks] == sorted(range(len(DOCS)), key=lambda i: -values[i])
        np.testing.assert_allclose([x["score"] for x in ranks], sorted(values, reverse=True), atol=1e-4)


# -- /tokenize and /decode -------------------------------------------------------------------------


async def test_tokenize_gives_the_tokenizers_ids_and_character_offsets(running):
    async with running() as (_app, client):
        text = "The movie was zebra fun"
        r = await client.post("/tokenize", json={"inputs": text})
        assert r.status_code == 200, r.text
        (tokens,) = r.json()
        # by hand: the tiny vocabulary lower-cases, "zebra" is unknown
        v = VOCAB.index
        assert tokens == [
            {"id": v("[CLS]"), "text": "[CLS]", "special": True, "start": None, "stop": None},
            {"id": v("the"), "text": "The", "special": False, "start": 0, "stop": 3},
            {"id": v("movie"), "text": "movie", "special": False, "start": 4, "stop": 9},
            {"id": v("was"), "text": "was", "special": False, "start": 10, "stop": 13},
            {"id": v("[UNK]"), "text": "zebra", "special": False, "start": 14, "stop": 19},
            {"id": v("fun"), "text": "fun", "special": False, "start": 20, "stop": 23},
            {"id": v("[SEP]"), "text": "[SEP]", "special": True, "start": None, "stop": None},
        ]
        # a batch, without special tokens: the tokenizer's own ids and offsets
        batch = await client.post("/tokenize", json={"inputs": TEXTS, "add_special_tokens": False})
        tok = tiny_tokenizer()
        for text, got in zip(TEXTS, batch.json(), strict=True):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            assert [t["id"] for t in got] == enc["input_ids"]
            assert [(t["start"], t["stop"]) for t in got] == [tuple(o) for o in enc["offset_mapping"]]
            assert [t["text"] for t in got] == [text[a:b] for a, b in enc["offset_mapping"]]


async def test_decode_turns_ids_back_into_text(running):
    async with running() as (_app, client):
        ids = tiny_tokenizer()("the plot was boring")["input_ids"]
        r = await client.post("/decode", json={"ids": ids})
        assert r.status_code == 200 and r.json() == ["the plot was boring"]
        r = await client.post("/decode", json={"ids": [ids, ids[1:3]], "skip_special_tokens": False})
        assert r.json() == ["[CLS] the plot was boring [SEP]", "the plot"]
        # ids the tokenizer does not know decode to nothing, as in TEI
        r = await client.post("/decode", json={"ids": [ids[1], len(VOCAB), 2**32 - 1, ids[2]]})
        assert r.status_code == 200 and r.json() == ["the plot"]


async def test_info_describes_the_backbone(running):
    async with running(max_inputs=32) as (_app, client):
        info = (await client.get("/info")).json()
        assert info["model_id"] == "tiny-bert"
        assert info["model_type"] == {"embedding": {"pooling": "mean"}}
        assert info["max_client_batch_size"] == 32 and info["max_input_length"] == 64


# -- errors, metrics, auth ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/embed", {"inputs": "x", "model": "nope"}, 404),
        ("/embed", {"inputs": []}, 422),
        ("/embed", {"inputs": [[]]}, 422),
        ("/embed", {"inputs": [10_000]}, 400),
        ("/embed", {"inputs": [True]}, 422),
        ("/embed", {"inputs": "x", "prompt_name": "query"}, 422),
        ("/embed", {"inputs": "x", "truncation_direction": "left"}, 422),
        ("/embed", {"inputs": ["x"] * 9}, 413),
        ("/predict", {"inputs": "x"}, 422),
        ("/predict", {"inputs": "x", "model": "{backbone}"}, 400),
        ("/predict", {"inputs": "x", "model": "emb"}, 400),
        ("/predict", {"inputs": ["a", "b", "c"], "model": "cls"}, 422),
        ("/predict", {"inputs": [["a", "b", "c"]], "model": "cls"}, 422),
        ("/predict", {"inputs": "x", "model": "nope"}, 404),
        ("/predict", {"inputs": "x", "model": "Bad Name"}, 404),
        ("/embed", {"inputs": "x", "model": "Bad Name"}, 404),
        ("/rerank", {"query": "x", "texts": ["y"], "model": "Bad Name"}, 404),
        ("/rerank", {"query": "x", "texts": []}, 422),
        ("/rerank", {"query": "x", "texts": ["y"], "model": "cls", "label": "nope"}, 400),
        ("/rerank", {"query": "x", "texts": ["y"] * 8}, 413),
        ("/tokenize", {"inputs": "x", "model": "nope"}, 404),
        ("/tokenize", {"inputs": ["x"] * 9}, 413),
        ("/tokenize", {"inputs": "x" * 201}, 413),
        ("/decode", {"ids": [2**32]}, 422),
        ("/embed", {"inputs": [2**32]}, 422),
        ("/decode", {"ids": [-1]}, 422),
    ],
)
async def test_bad_requests_get_tei_errors_and_change_nothing(running, artifacts, path, body, status):
    async with running(max_inputs=8, max_input_chars=200) as (app, client):
        spec = app.state.service.backbone.spec
        await _task(client, artifacts, spec, "emb", {"type": "embedding"}, seed=1)
        await _task(client, artifacts, spec, "cls", {"type": "classification", "labels": ["x", "y"]}, seed=2)
        before = (await client.get("/v1/adapters", headers=admin())).json()
        if body.get("model") == "{backbone}":
            body = {**body, "model": spec.name}
        r = await client.post(path, json=body)
        assert r.status_code == status, r.text
        err = r.json()
        assert set(err) == {"error", "error_type"} and err["error"]
        assert err["error_type"] == "Validation"
        assert (await client.get("/v1/adapters", headers=admin())).json() == before


async def test_wrong_method_is_a_tei_error(running):
    async with running() as (_app, client):
        r = await client.get("/embed")
        assert r.status_code == 405 and set(r.json()) == {"error", "error_type"}
        assert r.headers["allow"] == "POST"


async def test_every_route_needs_a_key_when_keys_are_set_and_counts_under_its_model(running, artifacts):
    async with running(api_keys=[API]) as (app, client):
        spec = app.state.service.backbone.spec
        await _task(client, artifacts, spec, "cls", {"type": "classification", "labels": ["x", "y"]}, seed=2)
        calls = [
            ("/embed", {"inputs": "x"}, spec.name),
            ("/predict", {"inputs": "x", "model": "cls"}, "cls"),
            ("/rerank", {"query": "x", "texts": ["y"], "model": "cls"}, "cls"),
            ("/tokenize", {"inputs": "x"}, spec.name),
            ("/decode", {"ids": [5]}, spec.name),
        ]
        requests = app.state.service.metrics.requests
        for path, body, label in calls:
            r = await client.post(path, json=body)
            assert r.status_code == 401 and set(r.json()) == {"error", "error_type"}, path
            assert r.headers["www-authenticate"] == "Bearer"
            before = requests.labels(task=label, status="200")._value.get()
            ok = await client.post(path, json=body, headers=admin(API))
            assert ok.status_code == 200, (path, ok.text)
            assert requests.labels(task=label, status="200")._value.get() == before + 1, path
        assert (await client.get("/info")).status_code == 401
        assert (await client.get("/info", headers=admin(API))).status_code == 200
        # an unknown model is counted as 404 under the bounded label
        await client.post("/predict", json={"inputs": "x", "model": "nope"}, headers=admin(API))
        assert requests.labels(task="other", status="404")._value.get() == 1


async def test_the_schema_documents_the_tei_error_body_on_every_tei_route(running):
    async with running() as (_app, client):
        paths = (await client.get("/openapi.json")).json()["paths"]
        for path in ("/embed", "/predict", "/rerank", "/tokenize", "/decode", "/info"):
            (op,) = paths[path].values()
            assert "401" in op["responses"] and "503" in op["responses"], path
            for code, response in op["responses"].items():
                if code.startswith(("4", "5")):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/TeiError"), (path, code)

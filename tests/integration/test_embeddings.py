"""OpenAI embeddings and /v1/models on a tiny BERT, against plain-torch references.

References are computed on a fresh copy of the same random BERT, with LoRA merged into its
weights by hand (W + alpha/r B A), then pooled and normalised in plain torch: no product code.
"""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from api_support import admin, artifact_config, random_arrays, tiny_bert, tiny_tokenizer, write_artifact

pytestmark = pytest.mark.asyncio

TEXTS = ["a fun film", "boring plot and bad acting", "great"]
_PROJ = {"q": "attention.self.query", "v": "attention.self.value"}


def _reference(texts, *, arrays=None, alpha_over_r=2.0, pooling="mean", normalize=True) -> np.ndarray:
    """Sentence vectors of texts one at a time on tiny BERT, LoRA arrays merged into the weights."""
    model = tiny_bert()
    with torch.no_grad():
        for name, a in (arrays or {}).items():
            if not name.endswith("lora.A"):
                continue
            _, i, site, _, _ = name.split(".")
            b = torch.from_numpy(arrays[name[: -len("A")] + "B"])
            lin = model.encoder.layer[int(i)].get_submodule(_PROJ[site])
            lin.weight += alpha_over_r * b @ torch.from_numpy(a)
    tok = tiny_tokenizer()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            h = model(**enc).last_hidden_state[0]
            v = h.mean(0) if pooling == "mean" else h[0]
            out.append(F.normalize(v, dim=-1) if normalize else v)
    return torch.stack(out).numpy()


def _lora(artifacts, name, spec, *, head, seed):
    config = artifact_config("lora", spec.fingerprint, head="regression")
    config["head"] = head
    arrays = random_arrays(config, spec, seed=seed)
    return write_artifact(artifacts / name, config, arrays), arrays


async def _upload(client, directory, name):
    files = {
        "config": (
            "adapter_config.json",
            (directory / "adapter_config.json").read_bytes(),
            "application/json",
        ),
        "weights": ("adapter.safetensors", (directory / "adapter.safetensors").read_bytes(), "application/x"),
    }
    r = await client.post(f"/v1/adapters/{name}", files=files, headers=admin())
    assert r.status_code == 201, r.text


def _vectors(body) -> np.ndarray:
    return np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])


async def test_backbone_embeds_like_plain_mean_pooling(running):
    async with running() as (app, client):
        name = app.state.service.backbone.spec.name
        r = await client.post("/v1/embeddings", json={"model": name, "input": TEXTS})
        assert r.status_code == 200, r.text
        body = r.json()
        np.testing.assert_allclose(_vectors(body), _reference(TEXTS), atol=1e-5)
        assert body["object"] == "list" and body["model"] == name
        tokens = sum(len(tiny_tokenizer()(t)["input_ids"]) for t in TEXTS)
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
        # base64: little-endian float32 bytes of the same vectors
        r = await client.post(
            "/v1/embeddings", json={"model": name, "input": TEXTS, "encoding_format": "base64"}
        )
        got = np.stack(
            [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]
        )
        np.testing.assert_allclose(got, _reference(TEXTS), atol=1e-5)
        # one string, and token ids in place of the text, give the same vector
        ids = tiny_tokenizer()(TEXTS[1])["input_ids"]
        one = (await client.post("/v1/embeddings", json={"model": name, "input": TEXTS[1]})).json()
        by_ids = (await client.post("/v1/embeddings", json={"model": name, "input": ids})).json()
        np.testing.assert_allclose(_vectors(one), _reference(TEXTS[1:2]), atol=1e-5)
        np.testing.assert_allclose(_vectors(by_ids), _vectors(one), atol=1e-6)


async def test_tasks_embed_with_their_adapter_mixed_in_one_batch(running, artifacts):
    async with running(max_wait_ms=200.0) as (app, client):
        spec = app.state.service.backbone.spec
        emb, emb_arrays = _lora(artifacts, "emb", spec, head={"type": "embedding"}, seed=1)
        raw, raw_arrays = _lora(
            artifacts, "raw", spec, head={"type": "embedding", "pooling": "cls", "normalize": False}, seed=2
        )
        cls, cls_arrays = _lora(artifacts, "cls", spec, head={"type": "regression"}, seed=3)
        for d in (emb, raw, cls):
            await _upload(client, d, d.name)
        # lora r=4, alpha=8 -> scale 2
        calls = [
            client.post("/v1/embeddings", json={"model": m, "input": TEXTS})
            for m in ("emb", "raw", "cls", spec.name)
        ]
        calls.append(client.post("/v1/tasks/cls/predict", json={"inputs": TEXTS}))
        r_emb, r_raw, r_cls, r_base, r_pred = await asyncio.gather(*calls)
        for r in (r_emb, r_raw, r_cls, r_base, r_pred):
            assert r.status_code == 200, r.text
        np.testing.assert_allclose(_vectors(r_emb.json()), _reference(TEXTS, arrays=emb_arrays), atol=1e-5)
        want_raw = _reference(TEXTS, arrays=raw_arrays, pooling="cls", normalize=False)
        np.testing.assert_allclose(_vectors(r_raw.json()), want_raw, atol=1e-5)
        # a task with a head embeds as its head pools (cls), normalised
        want_cls = _reference(TEXTS, arrays=cls_arrays, pooling="cls")
        np.testing.assert_allclose(_vectors(r_cls.json()), want_cls, atol=1e-5)
        np.testing.assert_allclose(_vectors(r_base.json()), _reference(TEXTS), atol=1e-5)
        # the same rows went through at most a few forwards: mixed, not one per request
        assert app.state.service.metrics.batch_size._sum.get() >= 12
        # the regression head's value still comes from its own adapter
        w = torch.from_numpy(cls_arrays["head.out.weight"])
        b = torch.from_numpy(cls_arrays["head.out.bias"])
        unnormed = torch.from_numpy(_reference(TEXTS, arrays=cls_arrays, pooling="cls", normalize=False))
        want_values = (unnormed @ w.T + b)[:, 0].tolist()
        got_values = [o["value"] for o in r_pred.json()["outputs"]]
        np.testing.assert_allclose(got_values, want_values, atol=1e-4)
        # an embedding task answers predict with its vector too
        r = await client.post("/v1/tasks/emb/predict", json={"inputs": TEXTS[:1]})
        np.testing.assert_allclose(
            r.json()["outputs"][0]["embedding"], _reference(TEXTS[:1], arrays=emb_arrays)[0], atol=1e-5
        )


async def test_models_lists_backbone_and_tasks_with_their_kind(running, artifacts):
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        emb, _ = _lora(artifacts, "emb", spec, head={"type": "embedding"}, seed=1)
        reg, _ = _lora(artifacts, "reg", spec, head={"type": "regression"}, seed=2)
        cls, _ = _lora(artifacts, "cls", spec, head={"type": "classification", "labels": ["x", "y"]}, seed=3)
        for d in (emb, reg, cls):
            await _upload(client, d, d.name)
        body = (await client.get("/v1/models")).json()
        kinds = {m["id"]: m["kind"] for m in body["data"]}
        assert kinds == {spec.name: "embed", "emb": "embed", "reg": "regress", "cls": "classify"}
        assert all(m["object"] == "model" and isinstance(m["created"], int) for m in body["data"])
        one = await client.get("/v1/models/reg")
        assert one.status_code == 200 and one.json()["kind"] == "regress"
        missing = await client.get("/v1/models/nope")
        assert missing.status_code == 404 and set(missing.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "nope", "input": "x"}, 404),
        ({"model": "{backbone}", "input": []}, 400),
        ({"model": "{backbone}", "input": [[]]}, 400),
        ({"model": "{backbone}", "input": "x", "dimensions": 7}, 400),
        ({"model": "{backbone}", "input": [10_000]}, 400),
        ({"model": "{backbone}", "input": "x", "encoding_format": "int8"}, 422),
        ({"model": "{backbone}", "input": "x", "extra": 1}, 422),
        ({"input": "x"}, 422),
    ],
)
async def test_bad_embedding_requests_get_openai_errors(running, body, status):
    async with running() as (app, client):
        name = app.state.service.backbone.spec.name
        body = json.loads(json.dumps(body).replace("{backbone}", name))
        r = await client.post("/v1/embeddings", json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


async def test_embeddings_need_an_api_key_when_keys_are_set(running):
    async with running(api_keys=["k" * 24]) as (app, client):
        name = app.state.service.backbone.spec.name
        r = await client.post("/v1/embeddings", json={"model": name, "input": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        ok = await client.post(
            "/v1/embeddings",
            json={"model": name, "input": "x"},
            headers={"Authorization": "Bearer " + "k" * 24},
        )
        assert ok.status_code == 200

"""The KServe / Triton v2 surface on a tiny BERT, against plain-torch references and bytes built by hand.

References are computed on a fresh copy of the same random BERT with LoRA merged into its weights
by hand (W + alpha/r B A), pooled and put through the head's linear layer in plain torch. Binary
tensor bodies are written and read here with `struct`, as the protocol's extension defines them.
"""

from __future__ import annotations

import gzip
import json
import struct
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from api_support import (
    API,
    admin,
    artifact_config,
    multipart,
    random_arrays,
    reference_generation,
    tiny_bert,
    tiny_gpt2_backbone,
    tiny_tokenizer,
    write_artifact,
)

pytestmark = pytest.mark.asyncio

TEXTS = ["a fun film", "boring plot and bad acting", "great", "the story was not very good"]
PAIRS = ["i loved it", "the music", "awful ending", "that actor"]
LABELS = ["a", "b", "c"]
HEADER = "Inference-Header-Content-Length"
_PROJ = {"q": "attention.self.query", "v": "attention.self.value"}
ALPHA_OVER_R = 2.0  # the LoRA fixtures' r=4, alpha=8


def _pooled(inputs, arrays, *, pooling: str) -> torch.Tensor:
    """Pooled last hidden states of each input alone on tiny BERT, with the LoRA arrays merged by hand."""
    model = tiny_bert()
    with torch.no_grad():
        for name, a in arrays.items():
            if name.endswith("lora.A"):
                _, i, site, _, _ = name.split(".")
                b = torch.from_numpy(arrays[name[: -len("A")] + "B"])
                model.encoder.layer[int(i)].get_submodule(_PROJ[site]).weight += (
                    ALPHA_OVER_R * b @ torch.from_numpy(a)
                )
        tok = tiny_tokenizer()
        out = []
        for x in inputs:
            enc = tok(*([x] if isinstance(x, str) else x), return_tensors="pt")
            h = model(**enc).last_hidden_state[0]
            out.append(h.mean(0) if pooling == "mean" else h[0])
    return torch.stack(out)


def _head(arrays, pooled: torch.Tensor) -> np.ndarray:
    w, b = (torch.from_numpy(arrays[f"head.out.{k}"]) for k in ("weight", "bias"))
    return (pooled @ w.T + b).numpy()


async def _task(client, artifacts, spec, name: str, *, head: dict, seed: int) -> dict:
    """Upload a random LoRA task with `head`; its arrays."""
    config = artifact_config("lora", spec.fingerprint) | {"head": head}
    arrays = random_arrays(config, spec, seed=seed)
    directory = write_artifact(artifacts / name, config, arrays)
    r = await client.post(f"/v1/adapters/{name}", files=multipart(directory), headers=admin())
    assert r.status_code == 201, r.text
    return arrays


def _text(values, name: str = "text") -> dict:
    return {"name": name, "shape": [len(values)], "datatype": "BYTES", "data": list(values)}


def _serialized(values) -> bytes:
    """A BYTES tensor in the binary extension: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in (v.encode() for v in values))


def _deserialized(blob: bytes) -> list[str]:
    out, pos = [], 0
    while pos < len(blob):
        (n,) = struct.unpack_from("<I", blob, pos)
        out.append(blob[pos + 4 : pos + 4 + n].decode())
        pos += 4 + n
    return out


def _split(response) -> tuple[dict, dict[str, bytes]]:
    """A binary answer's JSON header and each binary output's bytes, by name."""
    length = int(response.headers[HEADER])
    head, rest = json.loads(response.content[:length]), response.content[length:]
    blobs, pos = {}, 0
    for o in head["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            blobs[o["name"]] = rest[pos : pos + size]
            pos += size
    assert pos == len(rest)
    return head, blobs


def _forwards(app) -> float:
    """Rows that went through a forward so far."""
    return app.state.service.metrics.batch_size._sum.get()


# -- server -------------------------------------------------------------------------------------


async def test_server_metadata_and_health_follow_readiness(running, monkeypatch):
    gate = threading.Event()
    from service.engine import Engine

    original = Engine.warm_up

    def slow_warm_up(self) -> None:
        gate.wait(30)
        original(self)

    monkeypatch.setattr(Engine, "warm_up", slow_warm_up)
    async with running(wait_ready=False, api_keys=[API]) as (app, client):
        # health and server metadata need no key, as /livez and /readyz
        assert (await client.get("/v2/health/live")).json() == {"live": True}
        starting = await client.get("/v2/health/ready")
        assert starting.status_code == 503 and isinstance(starting.json()["error"], str)
        assert starting.headers["Retry-After"] == "1"
        assert (await client.get("/readyz")).status_code == 503
        gate.set()
        await app.state.service.ready.wait()
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}
        meta = (await client.get("/v2")).json()
        assert meta == {
            "name": "adapterserve",
            "version": app.version,
            "extensions": ["binary_tensor_data", "classification"],
        }
        app.state.service.begin_drain()
        draining = await client.get("/v2/health/ready")
        assert draining.status_code == 503 and "shutting down" in draining.json()["error"]
        assert (await client.get("/v2/health/live")).status_code == 200


async def test_unknown_routes_and_methods_answer_in_the_protocols_shape(running):
    async with running(api_keys=[API]) as (_, client):
        for method, path, status in [
            ("GET", "/v2/nothing", 404),
            ("GET", "/v2/models/x/nothing", 404),
            ("PUT", "/v2/health/live", 405),
            ("GET", "/v2/models/x/infer", 405),
            ("GET", "/v2/models/x", 401),
            ("POST", "/v2/models/x/infer", 401),
        ]:
            r = await client.request(method, path)
            assert r.status_code == status, (method, path, r.text)
            assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str), r.text
        r = await client.get("/v2/models/nope", headers={"Authorization": f"Bearer {API}"})
        assert r.status_code == 404 and "nope" in r.json()["error"]


# -- models -------------------------------------------------------------------------------------


async def test_model_metadata_describes_each_head(running, artifacts):
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        await _task(client, artifacts, spec, "cls", head={"type": "classification", "labels": LABELS}, seed=1)
        await _task(client, artifacts, spec, "ml", head={"type": "multi_label", "labels": ["x", "y"]}, seed=2)
        await _task(client, artifacts, spec, "reg", head={"type": "regression"}, seed=3)
        await _task(client, artifacts, spec, "emb", head={"type": "embedding"}, seed=4)
        text = {"name": "text", "datatype": "BYTES", "shape": [-1]}
        pair = {"name": "text_pair", "datatype": "BYTES", "shape": [-1]}
        want = {
            "cls": (
                [text, pair],
                [
                    {"name": "scores", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]},
                ],
                {"kind": "classify", "labels": LABELS},
            ),
            "ml": (
                [text, pair],
                [{"name": "scores", "datatype": "FP32", "shape": [-1, 2]}],
                {"kind": "classify", "labels": ["x", "y"]},
            ),
            "reg": (
                [text, pair],
                [{"name": "value", "datatype": "FP32", "shape": [-1, 1]}],
                {"kind": "regress"},
            ),
            "emb": (
                [text],
                [{"name": "embedding", "datatype": "FP32", "shape": [-1, 32]}],
                {"kind": "embed"},
            ),
            spec.name: (
                [text],
                [{"name": "embedding", "datatype": "FP32", "shape": [-1, 32]}],
                {"kind": "embed"},
            ),
        }
        for name, (inputs, outputs, parameters) in want.items():
            r = await client.get(f"/v2/models/{name}")
            assert r.status_code == 200, r.text
            version = "0" if name == spec.name else "1"
            assert r.json() == {
                "name": name,
                "versions": [version],
                "platform": "adapterserve",
                "inputs": inputs,
                "outputs": outputs,
                "parameters": parameters,
            }
            assert (await client.get(f"/v2/models/{name}/versions/{version}")).json() == r.json()
            assert (await client.get(f"/v2/models/{name}/ready")).json() == {"name": name, "ready": True}
            ready = await client.get(f"/v2/models/{name}/versions/{version}/ready")
            assert ready.json() == {"name": name, "ready": True}
        # a second version: only the current one serves
        await _task(
            client, artifacts, spec, "cls", head={"type": "classification", "labels": ["p", "q"]}, seed=5
        )
        r = await client.get("/v2/models/cls")
        assert r.json()["versions"] == ["2"] and r.json()["parameters"]["labels"] == ["p", "q"]
        for path, status in [
            ("/v2/models/cls/versions/1", 404),
            ("/v2/models/cls/versions/1/ready", 404),
            ("/v2/models/cls/versions/x", 400),
            ("/v2/models/cls/versions/%C2%B2", 400),
            ("/v2/models/nope/ready", 404),
            ("/v2/models/Bad..Name", 400),
            # the documented model pattern admits capitals (backbone names have them): unknown, not malformed
            ("/v2/models/Nope", 404),
        ]:
            r = await client.get(path)
            assert r.status_code == status, (path, r.text)
            assert isinstance(r.json()["error"], str)


# -- infer --------------------------------------------------------------------------------------


async def test_classify_infer_equals_plain_torch_and_the_native_route(running, artifacts):
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        arrays = await _task(
            client, artifacts, spec, "cls", head={"type": "classification", "labels": LABELS}, seed=1
        )
        want = F.softmax(torch.from_numpy(_head(arrays, _pooled(TEXTS, arrays, pooling="cls"))), -1).numpy()
        r = await client.post("/v2/models/cls/infer", json={"id": "req-7", "inputs": [_text(TEXTS)]})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json" and HEADER not in r.headers
        body = r.json()
        assert (body["model_name"], body["model_version"], body["id"]) == ("cls", "1", "req-7")
        scores, label = body["outputs"]
        assert (scores["name"], scores["datatype"], scores["shape"]) == ("scores", "FP32", [4, 3])
        np.testing.assert_allclose(np.reshape(scores["data"], (4, 3)), want, atol=1e-5)
        assert label == {
            "name": "label",
            "datatype": "BYTES",
            "shape": [4],
            "data": [LABELS[i] for i in want.argmax(1)],
        }
        native = (await client.post("/v1/tasks/cls/predict", json={"inputs": TEXTS})).json()["outputs"]
        assert [o["label"] for o in native] == label["data"]

        # sentence pairs: text_pair row i goes with text row i; [N, 1] shapes are taken too
        rows = [[t] for t in TEXTS]
        pair_body = {
            "inputs": [
                {"name": "text", "shape": [4, 1], "datatype": "BYTES", "data": rows},
                {"name": "text_pair", "shape": [4, 1], "datatype": "BYTES", "data": [[p] for p in PAIRS]},
            ],
            "outputs": [{"name": "scores"}],
        }
        r = await client.post("/v2/models/cls/infer", json=pair_body)
        assert r.status_code == 200, r.text
        [scores] = r.json()["outputs"]
        pairs = list(zip(TEXTS, PAIRS, strict=True))
        want_pairs = F.softmax(
            torch.from_numpy(_head(arrays, _pooled(pairs, arrays, pooling="cls"))), -1
        ).numpy()
        np.testing.assert_allclose(np.reshape(scores["data"], (4, 3)), want_pairs, atol=1e-5)
        assert np.abs(want_pairs - want).max() > 1e-3  # the pair really changed the answer

        # binary in and out, the outputs in the order asked, one of them in JSON
        blob = _serialized(TEXTS)
        header = json.dumps(
            {
                "inputs": [{**_text(TEXTS), "data": None, "parameters": {"binary_data_size": len(blob)}}],
                "outputs": [{"name": "label", "parameters": {"binary_data": False}}, {"name": "scores"}],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        r = await client.post(
            "/v2/models/cls/infer",
            content=header + blob,
            headers={HEADER: str(len(header)), "Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/octet-stream"
        head, blobs = _split(r)
        assert [o["name"] for o in head["outputs"]] == ["label", "scores"]
        assert head["outputs"][0]["data"] == label["data"]
        assert head["outputs"][1]["shape"] == [4, 3] and "data" not in head["outputs"][1]
        np.testing.assert_allclose(np.frombuffer(blobs["scores"], "<f4").reshape(4, 3), want, atol=1e-5)

        # the classification extension: the top k scores as "value:index:label", best first
        r = await client.post(
            "/v2/models/cls/infer",
            json={
                "inputs": [_text(TEXTS)],
                "outputs": [{"name": "scores", "parameters": {"classification": 2, "binary_data": True}}],
            },
        )
        head, blobs = _split(r)
        assert head["outputs"][0]["datatype"] == "BYTES" and head["outputs"][0]["shape"] == [4, 2]
        top = np.array(_deserialized(blobs["scores"])).reshape(4, 2)
        for row, probs in zip(top, want, strict=True):
            best = np.argsort(-probs)[:2]
            assert [e.split(":")[1:] for e in row] == [[str(i), LABELS[i]] for i in best]
            np.testing.assert_allclose([float(e.split(":")[0]) for e in row], probs[best], atol=1e-5)


async def test_regression_multi_label_and_embeddings_equal_plain_torch(running, artifacts):
    async with running(max_wait_ms=100.0) as (app, client):
        spec = app.state.service.backbone.spec
        reg = await _task(client, artifacts, spec, "reg", head={"type": "regression"}, seed=3)
        ml = await _task(
            client, artifacts, spec, "ml", head={"type": "multi_label", "labels": ["x", "y"]}, seed=2
        )
        emb = await _task(client, artifacts, spec, "emb", head={"type": "embedding"}, seed=4)
        r = await client.post("/v2/models/reg/infer", json={"inputs": [_text(TEXTS)]})
        [value] = r.json()["outputs"]
        assert value["shape"] == [4, 1]
        np.testing.assert_allclose(
            np.reshape(value["data"], (4, 1)), _head(reg, _pooled(TEXTS, reg, pooling="cls")), atol=1e-4
        )
        r = await client.post("/v2/models/ml/infer", json={"inputs": [_text(TEXTS)]})
        [scores] = r.json()["outputs"]
        want = torch.sigmoid(torch.from_numpy(_head(ml, _pooled(TEXTS, ml, pooling="cls")))).numpy()
        np.testing.assert_allclose(np.reshape(scores["data"], (4, 2)), want, atol=1e-5)
        # embeddings: the task's adapter, mean-pooled and normalised; the backbone's name: no adapter
        for name, arrays in (("emb", emb), (spec.name, {})):
            r = await client.post(
                f"/v2/models/{name}/infer",
                json={"inputs": [_text(TEXTS)], "parameters": {"binary_data_output": True}},
            )
            head, blobs = _split(r)
            assert head["outputs"][0]["shape"] == [4, 32] and head["model_version"] == (
                "0" if arrays == {} else "1"
            )
            want = F.normalize(_pooled(TEXTS, arrays, pooling="mean"), dim=-1).numpy()
            np.testing.assert_allclose(
                np.frombuffer(blobs["embedding"], "<f4").reshape(4, 32), want, atol=1e-5
            )


async def test_generative_tasks_answer_generated_text(running, artifacts):
    async with running(backbone=tiny_gpt2_backbone(), max_new_tokens=6) as (app, client):
        spec = app.state.service.backbone.spec
        config = {"method": "lora", "r": 4, "targets": ["qkv"], "backbone_fingerprint": spec.fingerprint}
        d = write_artifact(artifacts / "gen", config, random_arrays(config, spec, seed=7, scale=2.0))
        assert (await client.post("/v1/adapters/gen", files=multipart(d), headers=admin())).status_code == 201
        meta = (await client.get("/v2/models/gen")).json()
        assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        assert meta["outputs"] == [{"name": "generated_text", "datatype": "BYTES", "shape": [-1]}]
        prompts = ["the movie was", "i loved it and"]
        r = await client.post(
            "/v2/models/gen/infer", json={"inputs": [_text(prompts)], "parameters": {"max_new_tokens": 4}}
        )
        assert r.status_code == 200, r.text
        [out] = r.json()["outputs"]
        assert out["shape"] == [2] and out["data"] == reference_generation(d, prompts, max_new_tokens=4)
        pair = await client.post(
            "/v2/models/gen/infer", json={"inputs": [_text(prompts), _text(prompts, "text_pair")]}
        )
        assert pair.status_code == 400 and "'text_pair'" in pair.json()["error"]
        bad = await client.post(
            "/v2/models/gen/infer", json={"inputs": [_text(prompts)], "parameters": {"max_new_tokens": 0}}
        )
        assert bad.status_code == 400 and "max_new_tokens" in bad.json()["error"]


async def test_gzip_bodies_and_pinned_versions(running, artifacts):
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        await _task(client, artifacts, spec, "cls", head={"type": "classification", "labels": LABELS}, seed=1)
        body = json.dumps({"inputs": [_text(TEXTS[:2])]}).encode()
        plain = await client.post("/v2/models/cls/versions/1/infer", content=body)
        zipped = await client.post(
            "/v2/models/cls/infer", content=gzip.compress(body), headers={"Content-Encoding": "gzip"}
        )
        assert plain.status_code == zipped.status_code == 200, zipped.text
        assert plain.json()["outputs"] == zipped.json()["outputs"]
        stale = await client.post("/v2/models/cls/versions/2/infer", content=body)
        assert stale.status_code == 404 and "version 1" in stale.json()["error"]


def _bad(texts=TEXTS, **changes) -> dict:
    return {"inputs": [_text(texts)], **changes}


BAD = [
    pytest.param("cls", _bad(inputs=[_text(TEXTS, "sentence")]), 400, "'sentence'", id="unknown-input"),
    pytest.param(
        "cls",
        _bad(inputs=[{"name": "text", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]),
        400,
        "BYTES",
        id="datatype",
    ),
    pytest.param(
        "cls",
        _bad(inputs=[{**_text(TEXTS), "shape": [3]}]),
        400,
        "holds 3 elements",
        id="shape-count",
    ),
    pytest.param(
        "cls",
        _bad(inputs=[{**_text(TEXTS), "shape": [2, 2]}]),
        400,
        "[N, 1]",
        id="shape-rank",
    ),
    pytest.param(
        "cls",
        _bad(inputs=[{**_text(TEXTS), "shape": [0], "data": []}]),
        400,
        "N >= 1",
        id="empty",
    ),
    pytest.param(
        "cls",
        _bad(inputs=[_text(TEXTS), _text(TEXTS[:2], "text_pair")]),
        400,
        "text's shape",
        id="pair-shape",
    ),
    pytest.param(
        "emb", _bad(inputs=[_text(TEXTS), _text(PAIRS, "text_pair")]), 400, "'text_pair'", id="emb-pair"
    ),
    pytest.param("cls", _bad(inputs=[_text(TEXTS, "text_pair")]), 400, "'text' is missing", id="no-text"),
    pytest.param("cls", _bad(inputs=[_text(TEXTS), _text(TEXTS)]), 400, "once", id="twice"),
    pytest.param("cls", _bad(inputs=[{**_text(TEXTS), "data": [1, 2, 3, 4]}]), 400, "strings", id="not-text"),
    pytest.param("cls", _bad(outputs=[{"name": "value"}]), 400, "'value'", id="unknown-output"),
    pytest.param("ml", _bad(outputs=[{"name": "label"}]), 400, "multi-label", id="multi-label-label"),
    pytest.param(
        "cls",
        _bad(outputs=[{"name": "label", "parameters": {"classification": 2}}]),
        400,
        "'scores'",
        id="classification-on-label",
    ),
    pytest.param("cls", _bad(parameters={"binary_data_output": "yes"}), 400, "true or false", id="flag"),
    pytest.param(
        "cls",
        _bad(inputs=[{**_text(TEXTS), "data": None, "parameters": {"binary_data_size": 8}}]),
        400,
        HEADER,
        id="binary-without-header",
    ),
    pytest.param(
        "cls",
        _bad(inputs=[{**_text(TEXTS), "parameters": {"shared_memory_region": "r"}}]),
        400,
        "shared memory",
        id="shared-memory",
    ),
    pytest.param("cls", _bad(inputs=[{**_text(TEXTS), "shape": ["4"]}]), 422, "shape", id="shape-string"),
    pytest.param(
        "cls", _bad(inputs=[{**_text(TEXTS), "datatype": "STRING"}]), 422, "datatype", id="no-such-type"
    ),
    pytest.param("cls", _bad(extra=1), 422, "extra", id="extra-field"),
    pytest.param("cls", {"inputs": []}, 422, "inputs", id="no-inputs"),
    pytest.param("nope", _bad(), 404, "'nope'", id="unknown-model"),
]


async def test_bad_infer_requests_are_refused_before_any_forward(running, artifacts):
    # One app for every case: each is one request, and none may change what the next one sees.
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        await _task(client, artifacts, spec, "cls", head={"type": "classification", "labels": LABELS}, seed=1)
        await _task(client, artifacts, spec, "ml", head={"type": "multi_label", "labels": ["x", "y"]}, seed=2)
        await _task(client, artifacts, spec, "emb", head={"type": "embedding"}, seed=4)
        for case in BAD:
            model, body, status, says = case.values
            r = await client.post(f"/v2/models/{model}/infer", json=body)
            assert r.status_code == status, (case.id, r.text)
            assert set(r.json()) == {"error"} and says in r.json()["error"], (case.id, r.text)
        assert _forwards(app) == 0
        assert (await client.post("/v2/models/cls/infer", json=_bad())).status_code == 200
        assert _forwards(app) == len(TEXTS)


@pytest.mark.parametrize(
    ("content", "headers", "says"),
    [
        (b"{", {}, "JSON"),
        (b'{"inputs": []}', {HEADER: "99"}, "within"),
        (b'{"inputs": []}', {HEADER: "-1"}, "within"),
        (
            b'{"inputs": []}',
            {HEADER: "\u00b2".encode("latin-1")},
            "within",
        ),  # a digit to str.isdigit, not to int()
        (b"not gzip", {"Content-Encoding": "gzip"}, "gzip"),
        (b"{}", {"Content-Encoding": "br"}, "Content-Encoding"),
    ],
)
async def test_malformed_bodies_answer_4xx_in_the_protocols_shape(running, artifacts, content, headers, says):
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        await _task(client, artifacts, spec, "cls", head={"type": "classification", "labels": LABELS}, seed=1)
        r = await client.post("/v2/models/cls/infer", content=content, headers=headers)
        assert 400 <= r.status_code < 500 and says in r.json()["error"], r.text


async def test_binary_lengths_that_disagree_are_refused(running, artifacts):
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        await _task(client, artifacts, spec, "cls", head={"type": "classification", "labels": LABELS}, seed=1)
        blob = _serialized(TEXTS)

        async def send(size: int, data: bytes):
            header = json.dumps(
                {"inputs": [{**_text(TEXTS), "data": None, "parameters": {"binary_data_size": size}}]}
            ).encode()
            return await client.post(
                "/v2/models/cls/infer", content=header + data, headers={HEADER: str(len(header))}
            )

        assert (await send(len(blob), blob)).status_code == 200
        too_long = await send(len(blob) - 1, blob)
        assert too_long.status_code == 400 and "declare" in too_long.json()["error"]
        cut = await send(len(blob) - 1, blob[:-1])
        assert cut.status_code == 400 and "runs past" in cut.json()["error"]
        bad_utf8 = await send(5, struct.pack("<I", 1) + b"\xff")
        assert bad_utf8.status_code == 400 and "UTF-8" in bad_utf8.json()["error"]


async def test_v2_requests_are_counted_and_need_a_key(running, artifacts):
    async with running(api_keys=[API]) as (app, client):
        spec = app.state.service.backbone.spec
        await _task(client, artifacts, spec, "cls", head={"type": "classification", "labels": LABELS}, seed=1)
        key = {"Authorization": f"Bearer {API}"}
        assert (await client.post("/v2/models/cls/infer", json=_bad())).status_code == 401
        assert (await client.post("/v2/models/cls/infer", json=_bad(), headers=key)).status_code == 200
        bad = await client.post("/v2/models/cls/infer", json=_bad(outputs=[{"name": "value"}]), headers=key)
        assert bad.status_code == 400
        metrics = (await client.get("/metrics")).text
        assert 'adapterserve_requests_total{status="200",task="cls"} 1.0' in metrics
        assert 'adapterserve_requests_total{status="400",task="cls"} 1.0' in metrics
        assert 'adapterserve_tokens_total{task="cls"}' in metrics


async def test_a_client_gone_mid_body_is_no_server_error(running, artifacts, caplog):
    async with running() as (app, client):
        spec = app.state.service.backbone.spec
        await _task(client, artifacts, spec, "cls", head={"type": "classification", "labels": LABELS}, seed=1)
        messages = iter([{"type": "http.request", "body": b'{"inputs": [', "more_body": True}])
        sent = []

        async def receive():
            return next(messages, {"type": "http.disconnect"})

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v2/models/cls/infer",
            "raw_path": b"/v2/models/cls/infer",
            "query_string": b"",
            "headers": [(b"host", b"test")],
            "client": ("127.0.0.1", 1),
            "server": ("test", 80),
            "app": app,
        }
        await app(scope, receive, send)
        assert sent[0]["status"] == 499
        assert not [r for r in caplog.records if r.levelname == "ERROR"]

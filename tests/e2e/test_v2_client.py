"""Triton's own HTTP client (`tritonclient.http`) against a real server on a tiny BERT.

Expected answers come from plain torch on the same saved model, with the task's LoRA merged into
its weights by hand (W + alpha/r B A), pooled and put through the head: no product code.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from e2e_support import ADMIN, API, write_random_artifact
from safetensors.numpy import load_file
from transformers import BertModel, BertTokenizerFast

from adapters.backbone import load_backbone

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is part of the test extra")
from tritonclient.utils import InferenceServerException  # noqa: E402 - after the importorskip

pytestmark = pytest.mark.e2e

TEXTS = ["the movie was good", "bad plot and boring ending", "i loved it"]
PAIRS = ["a great story", "the music", "it was awful"]
LABELS = ["negative", "neutral", "positive"]
LORA = {"method": "lora", "r": 4, "alpha": 8.0}
_PROJ = {"q": "attention.self.query", "v": "attention.self.value"}


def _key() -> dict[str, str]:
    """A fresh header dict per call: tritonclient writes its own headers into the dict it is given."""
    return {"Authorization": f"Bearer {API}"}


def _upload(url: str, root: Path, name: str, spec, *, head: dict, seed: int) -> dict[str, np.ndarray]:
    """Store a random LoRA task on the server through the native upload route; its tensors."""
    config = {**LORA, "backbone_fingerprint": spec.fingerprint, "head": head}
    directory = write_random_artifact(root / name, config, spec, seed=seed)
    files = {p: (p, (directory / f).read_bytes()) for p, f in (("config", "adapter_config.json"),)}
    files["weights"] = ("adapter.safetensors", (directory / "adapter.safetensors").read_bytes())
    r = httpx.post(f"{url}/v1/adapters/{name}", files=files, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    return load_file(directory / "adapter.safetensors")


def _pooled(model_dir: Path, arrays: dict, inputs: list, *, pooling: str) -> torch.Tensor:
    """Each input alone through the saved BERT with the LoRA merged by hand, pooled."""
    model = BertModel.from_pretrained(model_dir).eval()
    tok = BertTokenizerFast.from_pretrained(model_dir)
    with torch.no_grad():
        for name, a in arrays.items():
            if name.endswith("lora.A"):
                _, i, site, _, _ = name.split(".")
                b = torch.from_numpy(arrays[name[: -len("A")] + "B"])
                lin = model.encoder.layer[int(i)].get_submodule(_PROJ[site])
                lin.weight += (LORA["alpha"] / LORA["r"]) * b @ torch.from_numpy(a)
        rows = []
        for x in inputs:
            h = model(**tok(*([x] if isinstance(x, str) else x), return_tensors="pt")).last_hidden_state[0]
            rows.append(h.mean(0) if pooling == "mean" else h[0])
    return torch.stack(rows)


def _probabilities(model_dir: Path, arrays: dict, inputs: list) -> np.ndarray:
    pooled = _pooled(model_dir, arrays, inputs, pooling="cls")
    w, b = (torch.from_numpy(arrays[f"head.out.{k}"]) for k in ("weight", "bias"))
    return F.softmax(pooled @ w.T + b, dim=-1).numpy()


def _text(values: list[str], name: str = "text", *, binary: bool = True):
    """A BYTES input as Triton users write it: a numpy object array of bytes."""
    tensor = httpclient.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=np.object_), binary_data=binary)
    return tensor


def test_tritonclient_speaks_to_the_v2_surface(start_server, tiny_model_dir, tmp_path):
    server = start_server(backbone=tiny_model_dir, api_keys=API)
    spec = load_backbone(tiny_model_dir, device="cpu").spec
    cls = _upload(
        server.url, tmp_path, "cls", spec, head={"type": "classification", "labels": LABELS}, seed=1
    )
    emb = _upload(server.url, tmp_path, "emb", spec, head={"type": "embedding"}, seed=2)
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.get_server_metadata()["extensions"] == ["binary_tensor_data", "classification"]
        assert client.is_model_ready("cls", headers=_key()) and client.is_model_ready("emb", headers=_key())
        assert not client.is_model_ready("nope", headers=_key())
        meta = client.get_model_metadata("cls", headers=_key())
        assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [
            ("text", "BYTES"),
            ("text_pair", "BYTES"),
        ]
        assert [(t["name"], t["shape"]) for t in meta["outputs"]] == [("scores", [-1, 3]), ("label", [-1])]
        assert client.get_model_metadata("emb", headers=_key())["outputs"] == [
            {"name": "embedding", "datatype": "FP32", "shape": [-1, 32]}
        ]

        # no outputs named: the client asks for every output as binary data
        want = _probabilities(tiny_model_dir, cls, TEXTS)
        result = client.infer("cls", [_text(TEXTS)], headers=_key(), request_id="r1")
        assert result.get_response()["id"] == "r1" and result.get_response()["model_version"] == "1"
        np.testing.assert_allclose(result.as_numpy("scores"), want, atol=1e-5)
        assert result.as_numpy("label").tolist() == [LABELS[i].encode() for i in want.argmax(1)]

        # JSON inputs and outputs, sentence pairs
        outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("label", "scores")]
        pair_inputs = [_text(TEXTS, binary=False), _text(PAIRS, "text_pair", binary=False)]
        result = client.infer("cls", pair_inputs, outputs=outputs, headers=_key())
        want_pairs = _probabilities(tiny_model_dir, cls, list(zip(TEXTS, PAIRS, strict=True)))
        np.testing.assert_allclose(result.as_numpy("scores"), want_pairs, atol=1e-5)
        assert [o["name"] for o in result.get_response()["outputs"]] == ["label", "scores"]

        # the classification extension: top-k "value:index:label"
        top = client.infer(
            "cls",
            [_text(TEXTS)],
            outputs=[httpclient.InferRequestedOutput("scores", class_count=2)],
            headers=_key(),
        ).as_numpy("scores")
        assert top.shape == (3, 2)
        for row, probs in zip(top, want, strict=True):
            value, index, label = row[0].decode().split(":")
            assert (int(index), label) == (int(probs.argmax()), LABELS[probs.argmax()])
            assert abs(float(value) - probs.max()) < 1e-5

        # an embedding task: mean-pooled with its adapter and normalised
        result = client.infer("emb", [_text(TEXTS)], headers=_key())
        want_emb = F.normalize(_pooled(tiny_model_dir, emb, TEXTS, pooling="mean"), dim=-1).numpy()
        np.testing.assert_allclose(result.as_numpy("embedding"), want_emb, atol=1e-5)
        as_json = client.infer(
            "emb",
            [_text(TEXTS, binary=False)],
            outputs=[httpclient.InferRequestedOutput("embedding", binary_data=False)],
            headers=_key(),
        )
        np.testing.assert_allclose(as_json.as_numpy("embedding"), want_emb, atol=1e-5)

        for call, status, says in [
            (lambda: client.infer("nope", [_text(TEXTS)], headers=_key()), "404", "nope"),
            (lambda: client.infer("cls", [_text(TEXTS, "sentence")], headers=_key()), "400", "sentence"),
            (
                lambda: client.infer("emb", [_text(TEXTS), _text(PAIRS, "text_pair")], headers=_key()),
                "400",
                "text",
            ),
            (
                lambda: client.infer("cls", [_text(TEXTS)], model_version="2", headers=_key()),
                "404",
                "version 1",
            ),
            (lambda: client.get_model_metadata("nope", headers=_key()), "404", "nope"),
            (lambda: client.infer("cls", [_text(TEXTS)]), "401", "key"),
        ]:
            with pytest.raises(InferenceServerException) as err:
                call()
            assert err.value.status() == status and says in err.value.message(), (status, err.value)
    finally:
        client.close()

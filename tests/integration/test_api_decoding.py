"""Predictions through the API decoded from logits the test fixes, checked against plain arithmetic.

Each task's head has zero output weights and a chosen bias, and its LoRA factors are zero, so every
input's logits are exactly that bias whatever the backbone computes. The expected label, scores,
multi-label set and regression value are then plain arithmetic on numbers the test wrote, not
outputs of the product's model or decoder.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from api_support import admin, artifact_config, multipart, random_arrays, write_artifact

pytestmark = pytest.mark.asyncio

TEXTS = ["the movie was good", "bad plot", "i loved it", "this film is not very fun and the ending long"]
SINGLE = {"labels": ["low", "mid", "high", "none"], "bias": [0.3, 2.1, -1.0, 1.9]}
# just above and just below zero logit sit on either side of the 0.5 threshold
MULTI = {"labels": ["action", "drama", "comedy", "horror", "music"], "bias": [1.5, -0.7, 0.05, 2.2, -0.05]}
REGRESSION = {"bias": [1.25]}


def _artifact(directory, spec, *, head: dict, bias: list[float]):
    config = artifact_config("lora", spec.fingerprint, head="classification") | {"head": head}
    arrays = {k: np.zeros_like(v) for k, v in random_arrays(config, spec, seed=0).items()}
    arrays["head.out.bias"] = np.asarray(bias, dtype=np.float32)
    return write_artifact(directory, config, arrays)


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


async def test_single_multi_label_and_regression_outputs_follow_the_logits(running, artifacts):
    async with running(max_wait_ms=20.0) as (app, client):
        spec = app.state.service.backbone.spec
        heads = {
            "single": ({"type": "classification", "labels": SINGLE["labels"]}, SINGLE["bias"]),
            "multi": ({"type": "multi_label", "labels": MULTI["labels"]}, MULTI["bias"]),
            "reg": ({"type": "regression"}, REGRESSION["bias"]),
        }
        for task, (head, bias) in heads.items():
            d = _artifact(artifacts / task, spec, head=head, bias=bias)
            r = await client.post(f"/v1/adapters/{task}", files=multipart(d), headers=admin())
            assert r.status_code == 201, r.text

        async def ask(task: str, **parameters) -> list[dict]:
            r = await client.post(
                f"/v1/tasks/{task}/predict", json={"inputs": TEXTS, "parameters": parameters}
            )
            assert r.status_code == 200, r.text
            return r.json()["outputs"]

        # one gather: the three heads' rows share forwards
        single, single_all, multi, reg = await asyncio.gather(
            ask("single"), ask("single", return_all_scores=True), ask("multi"), ask("reg")
        )
    probs = _softmax(SINGLE["bias"])
    for row in single:
        assert set(row) == {"label", "score"}
        assert row["label"] == "mid"  # index 1: the largest logit, neither first nor last
        assert row["score"] == pytest.approx(probs[1], abs=1e-6)
    for row in single_all:
        assert row["label"] == "mid"
        assert list(row["scores"]) == SINGLE["labels"]
        assert list(row["scores"].values()) == pytest.approx(probs, abs=1e-6)
    sigmoid = [1 / (1 + math.exp(-v)) for v in MULTI["bias"]]
    for row in multi:
        assert row["labels"] == ["action", "comedy", "horror"]
        assert list(row["scores"]) == MULTI["labels"]
        assert list(row["scores"].values()) == pytest.approx(sigmoid, abs=1e-6)
    for row in reg:
        assert row == {"value": 1.25}

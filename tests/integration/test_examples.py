"""The committed demo tasks (`examples/`, made by `make demo-artifacts`) on the real bundled MiniLM-L6.

Each artifact must validate against the bundled backbone, and a server seeded from `examples/`
(as `make serve` is at first start) must answer with sensible labels.
"""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import numpy as np
import pytest
from api_support import ADMIN, admin

from service.app import create_app
from service.settings import Settings
from store.artifact import expected_tensors, parse_config
from store.safetensors_io import SafetensorsLimits, check_expected, load_arrays, read_header

pytestmark = pytest.mark.minilm

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEMO = {
    "sst2": ("compacter", ["negative", "positive"]),
    "sst2-tiny": ("tiny_attention", ["negative", "positive"]),
    "mrpc": ("lora", ["not_equivalent", "equivalent"]),
    "cola": ("parallel", ["unacceptable", "acceptable"]),
    "stsb": ("prefix", []),
}
"""Every demo task: its method and its head's labels (none: regression)."""


@pytest.fixture(scope="module")
def minilm():
    """The bundled MiniLM-L6 on the CPU, loaded once for the module."""
    from adapters.backbone import load_backbone

    return load_backbone(device="cpu", dtype="float32")


def test_every_demo_task_is_committed() -> None:
    """examples/ holds every demo task the README and `make demo-artifacts` name, and stays small."""
    found = {p.parent.name for p in EXAMPLES.glob("*/adapter_config.json")}
    assert found >= set(DEMO)
    total = sum(f.stat().st_size for f in EXAMPLES.rglob("*") if f.is_file())
    assert total < 5 * 2**20


@pytest.mark.parametrize("task", sorted(DEMO))
def test_demo_artifact_validates_against_minilm(task: str, minilm) -> None:
    """Schema, backbone fingerprint, tensor names and shapes, finite values, and the dev metric recorded."""
    directory = EXAMPLES / task
    config = parse_config((directory / "adapter_config.json").read_bytes())
    method, labels = DEMO[task]
    assert config.method == method and list(config.head.labels) == labels
    expected = expected_tensors(config, minilm.spec)  # raises on a fingerprint mismatch
    limits = SafetensorsLimits()
    check_expected(read_header(directory / "adapter.safetensors", limits=limits), expected)
    arrays = load_arrays(directory / "adapter.safetensors", limits=limits)
    assert all(np.isfinite(a).all() for a in arrays.values())
    meta = config.metadata
    assert meta["seed"] == 0 and math.isfinite(meta["dev_score"])
    # each task beats its trivial baseline, recorded beside the score by the trainer
    assert meta["dev_score"] > meta["baseline_score"]


@pytest.mark.asyncio
async def test_a_server_seeded_from_examples_serves_the_demo_tasks(tmp_path: Path, minilm) -> None:
    """A fresh store seeded from examples/: every task listed, obvious inputs get the obvious answers."""
    settings = Settings(store=tmp_path / "store", admin_keys=[ADMIN], seed_dir=EXAMPLES, max_wait_ms=1.0)
    app = create_app(settings, backbone=minilm)
    async with app.router.lifespan_context(app):
        await app.state.service.ready.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60.0) as client:
            listed = (await client.get("/v1/adapters", headers=admin())).json()

            async def predict(task: str, inputs: list) -> list[dict]:
                resp = await client.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs})
                assert resp.status_code == 200, resp.text
                return resp.json()["outputs"]

            reviews = ["a gripping, beautifully acted and wonderful film", "a dull, lifeless and boring mess"]
            sst2 = await predict("sst2", reviews)
            tiny = await predict("sst2-tiny", reviews)
            same = ["The cat sat on the mat.", "A cat was sitting on the mat."]
            other = ["The cat sat on the mat.", "Stock markets fell sharply in Tokyo on Monday."]
            stsb = await predict("stsb", [same, other])
            mrpc = await predict("mrpc", [same])
    assert {a["task"] for a in listed["adapters"]} >= set(DEMO)
    assert [o["label"] for o in sst2] == ["positive", "negative"]
    assert [o["label"] for o in tiny] == ["positive", "negative"]
    assert stsb[0]["value"] > stsb[1]["value"] + 1.0
    assert mrpc[0]["label"] in DEMO["mrpc"][1] and 0.5 <= mrpc[0]["score"] <= 1.0

"""The synchronous client against a real server: hypernetwork directories uploaded with versions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from e2e_support import ADMIN, write_random_artifact

from adapters.backbone import load_backbone
from service.client import Client, ConflictError
from store.artifact import hypernetwork_tensors, parse_config
from store.safetensors_io import write_safetensors

TEXTS = ["the movie was good", "bad plot and boring ending"]


def write_hypernetwork(directory: Path, spec, *, seed: int) -> Path:
    """A small Hyperformer++ laid out as `train-hyper` writes it."""
    config = {
        "method": "hypernetwork",
        "backbone_fingerprint": spec.fingerprint,
        "bottleneck_dim": 8,
        "task_embedding_dim": 8,
        "layer_embedding_dim": 6,
        "site_embedding_dim": 4,
        "hidden_dim": 16,
        "projected_dim": 12,
    }
    rng = np.random.default_rng(seed)
    shapes = hypernetwork_tensors(parse_config(config), spec)
    arrays = {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in shapes.items()}
    directory.mkdir(parents=True)
    (directory / "hypernetwork_config.json").write_text(json.dumps(config))
    write_safetensors(directory / "hypernetwork.safetensors", arrays)
    return directory


def test_the_sync_client_uploads_hypernetwork_versions(tiny_model_dir, start_server, tmp_path):
    server = start_server(backbone=tiny_model_dir)
    spec = load_backbone(tiny_model_dir, device="cpu").spec
    first = write_hypernetwork(tmp_path / "h1", spec, seed=1)
    second = write_hypernetwork(tmp_path / "h2", spec, seed=2)
    with Client(server.url, key=ADMIN) as admin:
        up = admin.upload_hypernetwork("shared", first, version=4)
        assert (up.task, up.version, up.current, up.method) == ("shared", 4, True, "hypernetwork")
        assert up.sha256 == hashlib.sha256((first / "hypernetwork.safetensors").read_bytes()).hexdigest()
        with pytest.raises(ConflictError) as err:
            admin.upload_hypernetwork("shared", second, version=4)
        assert (err.value.status, err.value.kind) == (409, "version_conflict")
        up = admin.upload_hypernetwork("shared", second, activate=False)
        assert (up.version, up.current) == (5, False)
        [summary] = admin.hypernetworks()
        assert (summary.current_version, summary.versions) == (4, [4, 5])

        # A task of it serves from the current version.
        config = {
            "method": "hyperformer",
            "hypernetwork": "shared",
            "task_embedding_dim": 8,
            "backbone_fingerprint": spec.fingerprint,
            "head": {"type": "classification", "labels": ["negative", "positive"]},
        }
        task = write_random_artifact(tmp_path / "ta", config, spec, seed=3)
        assert admin.upload("ta", task).method == "hyperformer"
        answer = admin.predict("ta", TEXTS)
        assert answer.version == 1 and len(answer.outputs) == len(TEXTS)
        assert {o.label for o in answer.outputs} <= {"negative", "positive"}

        # Deleting: the unused version goes; the hypernetwork stays while task `ta` names it.
        admin.delete_hypernetwork("shared", version=5)
        assert admin.hypernetworks()[0].versions == [4]
        with pytest.raises(ConflictError) as err:
            admin.delete_hypernetwork("shared")
        assert (err.value.status, err.value.kind) == (409, "in_use")
        admin.delete("ta")
        admin.delete_hypernetwork("shared")
        assert admin.hypernetworks() == []

"""`adapterserve train --upload URL` against a real server: what it uploads serves the trainer's predictions.

The trainer runs through its command-line entry on the tiny saved BERT the server loads; a refused
upload exits non-zero with the server's reason and stores nothing.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import httpx
import torch
from e2e_support import ADMIN, REPO, assert_close

from adapters.backbone import load_backbone
from adapters.model import BankConfig, MultiTaskModel
from adapters.training.cli import main
from adapters.training.data import Example, tokenize
from adapters.training.trainer import predict
from store.artifact import parse_config
from store.safetensors_io import SafetensorsLimits, load_arrays

POSITIVE = ["good", "great", "fun", "loved"]
NEGATIVE = ["bad", "awful", "boring", "hated"]
FILLER = ["the", "a", "movie", "film", "plot", "actor", "is", "was", "very", "and", "story", "music", "it"]
# A few hundred steps on a 2-core machine would be slow; this is enough to move off the baseline.
TRAIN = ["--method", "lora", "--rank", "4", "--steps", "40", "--lr", "1e-2", "--batch-size", "16"]
TRAIN += ["--max-length", "16", "--threads", "1", "--no-progress", "--label-names", "negative,positive"]


def sentences(n: int, *, seed: int) -> list[Example]:
    """Fillers around one sentiment word, which decides the label."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = [rng.choice(FILLER) for _ in range(rng.randint(1, 4))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
        out.append(Example(text=" ".join(words), label="1" if positive else "0"))
    return out


def write_csv(path: Path, examples: list[Example]) -> Path:
    """A CSV with a header row `text,label`."""
    path.write_text("text,label\n" + "".join(f"{e.text},{e.label}\n" for e in examples), encoding="utf-8")
    return path


def trainer_outputs(backbone_dir: Path, artifact: Path, texts: list[str]) -> list[dict]:
    """The trainer's own predictions (`adapters.training.trainer.predict`) with the written artifact."""
    config = parse_config((artifact / "adapter_config.json").read_bytes())
    arrays = load_arrays(artifact / "adapter.safetensors", limits=SafetensorsLimits())
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    model = MultiTaskModel(load_backbone(backbone_dir, device="cpu"), banks=BankConfig(slots=2))
    examples = [Example(text=t, label="negative") for t in texts]
    data = tokenize(
        model.backbone.tokenizer,
        examples,
        max_length=64,
        kind=config.head.type,
        labels=list(config.head.labels),
    )
    return predict(model, config, tensors, data)


def test_train_uploads_what_it_trained_and_the_server_serves_its_predictions(
    tiny_model_dir, start_server, tmp_path, capsys
):
    server = start_server(backbone=tiny_model_dir)
    train_csv = write_csv(tmp_path / "train.csv", sentences(160, seed=1))
    dev_csv = write_csv(tmp_path / "dev.csv", sentences(32, seed=4))
    out = tmp_path / "out"
    argv = ["--train-file", str(train_csv), "--dev-file", str(dev_csv), *TRAIN]
    argv += ["--backbone", str(tiny_model_dir), "--out", str(out)]
    argv += ["--task", "reviews", "--upload", server.url, "--key", ADMIN]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    up = report["upload"]
    assert (up["task"], up["version"], up["current"], up["method"]) == ("reviews", 1, True, "lora")
    assert report["artifact"] == str(out)
    assert (tmp_path / f"store-{server.port}" / "tasks" / "reviews").is_dir()

    texts = [e.text for e in sentences(24, seed=2)]
    want = trainer_outputs(tiny_model_dir, out, texts)
    assert {w["label"] for w in want} == {"negative", "positive"}  # the adapter is not a constant
    headers = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(f"{server.url}/v1/tasks/reviews/predict", json={"inputs": texts}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1
    assert_close(r.json()["outputs"], want)


def test_a_refused_train_upload_exits_non_zero_with_the_reason_and_stores_nothing(
    tiny_model_dir, start_server, tmp_path
):
    server = start_server(backbone=tiny_model_dir)
    train_csv = write_csv(tmp_path / "train.csv", sentences(64, seed=3))
    out = tmp_path / "out"
    argv = ["--train-file", str(train_csv), "--dev-file", str(train_csv), *TRAIN, "--steps", "4"]
    argv += ["--backbone", str(tiny_model_dir)]
    argv += ["--out", str(out), "--task", "reviews", "--upload", server.url, "--key", "not-the-admin-key"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERSERVE_")} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "adapters.training.cli", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    # the server's own reason, as it answers that key on any management route
    refusal = httpx.get(f"{server.url}/v1/adapters", headers={"Authorization": "Bearer not-the-admin-key"})
    reason = refusal.json()["error"]["message"]
    assert refusal.status_code == 401 and f"401 unauthorized: {reason}" in done.stderr, done.stderr
    assert f"{server.url}/v1/adapters/reviews" in done.stderr
    # the artifact stays on disk for a later `adapterserve upload`, and the message says where
    assert (out / "adapter.safetensors").is_file() and str(out) in done.stderr
    headers = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.get(f"{server.url}/v1/adapters", headers=headers).json() == {"adapters": []}
    assert httpx.get(f"{server.url}/v1/adapters/reviews", headers=headers).status_code == 404
    assert not (tmp_path / f"store-{server.port}" / "tasks" / "reviews").exists()

"""Embedding-task training on a tiny BERT: the cosine loss learns, and what is served is what was scored.

The served side is the real app's `/v1/embeddings` (ASGI) on the written artifact; the cosines
and the correlations are recomputed from the returned vectors with numpy and scipy.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from integration.api_support import serving
from scipy.stats import pearsonr, spearmanr
from test_train import FILLER, NEGATIVE, POSITIVE, backbone

from adapters.model import BankConfig, MultiTaskModel
from adapters.training.data import Example, TaskData
from adapters.training.embedding import PairData, cosine_loss
from adapters.training.export import write_artifact
from adapters.training.trainer import TrainOptions, train


def _side(rng: random.Random, word: str) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(1, 3))]
    words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def pairs(n: int, *, seed: int) -> list[Example]:
    """Two sentences, one sentiment word each: 5 for the same word, 3 the same polarity, 0 opposite."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(POSITIVE + NEGATIVE), rng.choice(POSITIVE + NEGATIVE)
        same = (a in POSITIVE) == (b in POSITIVE)
        score = 5.0 if a == b else 3.0 if same else 0.0
        out.append(Example(text=_side(rng, a), text_pair=_side(rng, b), label=f"{score:.1f}"))
    return out


def task() -> TaskData:
    """256 training and 64 dev pairs."""
    return TaskData("sim", pairs(256, seed=1), pairs(64, seed=2), "embedding", [], ("pearson", "spearman"))


async def _served(tmp_path: Path, result, texts: list[str]) -> np.ndarray:
    art = write_artifact(tmp_path / "artifact", result.config, result.tensors)
    async with serving(tmp_path, art, task="sim", backbone=backbone()) as client:
        resp = await client.post("/v1/embeddings", json={"model": "sim", "input": texts})
    assert resp.status_code == 200, resp.text
    return np.array([d["embedding"] for d in resp.json()["data"]])


@pytest.mark.asyncio
async def test_cosine_training_learns_and_the_served_vectors_score_what_the_trainer_reported(
    tmp_path,
) -> None:
    """LoRA with an embedding head: dev Spearman above the plain backbone's, equal to the served one."""
    data = task()
    opts = TrainOptions(steps=60, batch_size=16, max_length=16, lr=1e-2, progress=False, eval_every=20)
    result = train(backbone(), data, method="lora", hyper={"r": 4}, options=opts)
    assert result.config.head.type == "embedding" and result.config.head.pooling == "mean"
    assert not any(k.startswith("head.") for k in result.tensors)
    assert result.dev["spearman"] > result.baseline["spearman"] + 0.1, (result.dev, result.baseline)

    n = len(data.dev)
    vec = await _served(tmp_path, result, [e.text for e in data.dev] + [e.text_pair for e in data.dev])
    assert np.allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    cos = (vec[:n] * vec[n:]).sum(1)
    gold = [float(e.label) for e in data.dev]
    assert result.dev["spearman"] == pytest.approx(spearmanr(cos, gold).statistic, abs=1e-4)
    assert result.dev["pearson"] == pytest.approx(pearsonr(cos, gold).statistic, abs=1e-4)
    assert (
        result.config.metadata["similarity_high"] == 5.0 and result.config.metadata["similarity_low"] == 0.0
    )


def test_the_loss_is_sentence_transformers_cosine_similarity_loss() -> None:
    """MSE of cos(u, v) against score / 5, with u, v mean-pooled and normalised by hand."""
    bb = backbone()
    model = MultiTaskModel(bb, banks=BankConfig(slots=2))
    examples = pairs(8, seed=3)
    data = PairData(bb.tokenizer, examples, max_length=16, batch_size=8, pad_id=0)
    head = type("Head", (), {"pooling": "mean", "normalize": True})()
    idx = list(range(8))
    bb.model.eval()
    with torch.no_grad():
        got = cosine_loss(model, data, idx, head=head, low=0.0, high=5.0)
        cos = []
        for e in examples:  # one sentence at a time: no padding to get wrong
            u, v = (
                bb.model(**bb.tokenizer(s, return_tensors="pt")).last_hidden_state[0].mean(0)
                for s in (e.text, e.text_pair)
            )
            cos.append(F.cosine_similarity(u, v, dim=0))
        want = torch.mean((torch.stack(cos) - torch.tensor([float(e.label) / 5 for e in examples])) ** 2)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)

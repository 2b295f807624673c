"""Prefix tuning's MLP reparameterisation folds into plain prefixes: serving the artifact changes nothing.

The training-time forward (prefixes = start + MLP(embedding), gradients into the MLP) and the
served forward of the written artifact (plain key/value prefixes loaded into a slot of a fresh
model) must give the same head outputs; the folded prefixes must equal the MLP worked out by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import backbone, sentiment_task, tokenizer

from adapters.model import BankConfig, MultiTaskModel
from adapters.training.data import Batches, tokenize
from adapters.training.export import write_artifact
from adapters.training.prefix import PrefixMLP
from adapters.training.trainer import TrainOptions, build_config, init_tensors, train
from store.artifact import parse_config
from store.safetensors_io import SafetensorsLimits, load_arrays


@pytest.mark.parametrize("method", ["prefix", "mam"])
def test_the_served_artifact_gives_the_outputs_of_the_model_with_its_mlp(tmp_path: Path, method: str) -> None:
    """Logits through bind(start + MLP(E)) equal logits of the artifact served from slot 2 of a new model."""
    bb = backbone()
    task = sentiment_task(32)
    config = build_config(method, bb, kind="classification", labels=task.labels, hyper={"prefix_length": 4})
    banks = BankConfig(
        slots=2,
        prefix_max_len=4,
        head_max_outputs=2,
        bottleneck_max_dim=config.bottleneck_dim if method == "mam" else 0,
    )
    model = MultiTaskModel(bb, banks=banks)
    g = torch.Generator().manual_seed(3)
    tensors = init_tensors(config, model, generator=g, options=TrainOptions())
    start = {k: v for k, v in tensors.items() if ".prefix." in k}
    mlp = PrefixMLP(start=start, hidden=32, mid=16, generator=g)
    # it starts exactly where direct training starts (real tokens' keys and values)
    assert all(torch.equal(mlp()[k], v) for k, v in start.items())
    with torch.no_grad():  # a trained MLP is far from its near-zero start: make the fold matter
        for p in mlp.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    rest = {k: v for k, v in tensors.items() if ".prefix." not in k}

    data = tokenize(tokenizer(), task.dev[:24], max_length=16, kind=task.kind, labels=task.labels)
    batch = Batches(data, batch_size=24, pad_id=0)
    ids, mask, _ = batch.collate(list(range(24)))
    extra = batch.extra(list(range(24)))
    bb.model.eval()
    model.bind(config, rest | mlp())
    with torch.no_grad():
        trained = model.train_forward(ids, mask, **extra).logits[:, :2]

    art = write_artifact(tmp_path / "a", config, rest | mlp.collapse())
    served_config = parse_config((art / "adapter_config.json").read_bytes())
    arrays = load_arrays(art / "adapter.safetensors", limits=SafetensorsLimits())
    assert not any("mlp" in k or "embedding" in k for k in arrays)  # nothing of the MLP is shipped
    server = MultiTaskModel(
        backbone(), banks=BankConfig(slots=4, prefix_max_len=8, head_max_outputs=4, bottleneck_max_dim=64)
    )
    server.load(2, served_config, {k: torch.from_numpy(v) for k, v in arrays.items()})
    served = server.classify(ids, mask, [2] * 24, **extra).logits[:, :2]
    assert torch.allclose(served, trained, atol=1e-5), (served - trained).abs().max()
    model.bind(config, rest | start)
    with torch.no_grad():  # and the MLP's part matters: a fold that dropped it would be caught
        assert not torch.allclose(model.train_forward(ids, mask, **extra).logits[:, :2], served, atol=1e-3)

    # the fold, by hand: start + W2 tanh(W1 E + b1) + b2, split into [length, inner] per tensor
    w1, b1 = mlp.mlp[0].weight.detach(), mlp.mlp[0].bias.detach()
    w2, b2 = mlp.mlp[2].weight.detach(), mlp.mlp[2].bias.detach()
    flat = mlp.start + torch.tanh(mlp.embedding.detach() @ w1.T + b1) @ w2.T + b2
    for i, name in enumerate(sorted(mlp.names)):
        assert torch.allclose(torch.from_numpy(arrays[name]), flat[:, i * 32 : (i + 1) * 32], atol=1e-6), name


def test_a_trained_runs_served_score_is_its_best_evaluated_one() -> None:
    """Trained through the MLP, evaluated folded: the artifact's dev score is the best evaluation's."""
    task = sentiment_task(128)
    opts = TrainOptions(
        steps=24, batch_size=16, max_length=16, lr=3e-3, eval_every=8, progress=False, prefix_mlp=32
    )
    result = train(backbone(), task, method="prefix", hyper={"prefix_length": 4}, options=opts)
    assert result.dev["score"] == pytest.approx(max(h["score"] for h in result.history))
    assert not any("reparam" in k for k in result.tensors)

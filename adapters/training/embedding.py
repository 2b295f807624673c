"""Embedding tasks: an adapter trained so that the cosine of two sentence vectors is their similarity.

The loss is sentence-transformers' `CosineSimilarityLoss`: each side of a pair is embedded on its
own (pooled as the task's embedding head pools, L2-normalised), and the mean squared error between
their cosine and the gold score scaled to [0, 1] (STS-B: 0 to 5) is minimised. Evaluation is the
task's correlation metrics (Pearson, Spearman) of the cosine against the gold scores, as the STS
benchmarks score sentence embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from adapters.heads import pool
from adapters.model import MultiTaskModel
from adapters.training.data import Batches, Example, compute_metrics, tokenize

__all__ = ["PairData", "cosine_loss", "embed", "evaluate_pairs", "score_range"]


def score_range(examples: Sequence[Example]) -> tuple[float, float]:
    """The lowest and highest gold score of the examples: the range scaled to [0, 1]."""
    values = [float(e.label) for e in examples]
    low, high = min(values), max(values)
    if high <= low:
        raise ValueError("an embedding task needs pairs with different similarity scores")
    return low, high


class PairData:
    """Both sides of sentence pairs, tokenized apart (each side is embedded on its own)."""

    def __init__(
        self, tokenizer, examples: Sequence[Example], *, max_length: int, batch_size: int, pad_id: int
    ):
        for e in examples:
            if e.text_pair is None:
                raise e.error("an embedding task trains on sentence pairs; this example has one text")
        enc = {"max_length": max_length, "kind": "regression", "labels": []}
        first = tokenize(tokenizer, [Example(e.text, e.label) for e in examples], **enc)
        second = tokenize(tokenizer, [Example(e.text_pair or "", e.label) for e in examples], **enc)
        self.first = Batches(first, batch_size=batch_size, pad_id=pad_id)
        self.second = Batches(second, batch_size=batch_size, pad_id=pad_id)

    def __len__(self) -> int:
        return len(self.first.data)


def embed(model: MultiTaskModel, batches: Batches, idx: list[int], *, head, slot: int = 1) -> torch.Tensor:
    """Sentence vectors of some examples through `slot` (1: the adapter being trained; 0: none)."""
    device = model.backbone.device
    ids, mask, _ = batches.collate(idx)
    ids, mask = ids.to(device), mask.to(device)
    extra = {k: v.to(device) for k, v in batches.extra(idx).items()}
    slots = torch.full((len(idx),), slot, dtype=torch.long, device=device)
    with model.router.route(slots, attention_mask=mask):
        hidden = model.backbone.core(input_ids=ids, attention_mask=mask, **extra).last_hidden_state
    vec = pool(hidden, mask, mode=head.pooling, pooler=model.pooler()).float()
    return F.normalize(vec, p=2, dim=-1) if head.normalize else vec


def cosine_loss(
    model: MultiTaskModel, pairs: PairData, idx: list[int], *, head, low: float, high: float
) -> torch.Tensor:
    """MSE between the pairs' cosine similarity and their gold scores scaled to [0, 1]."""
    u, v = embed(model, pairs.first, idx, head=head), embed(model, pairs.second, idx, head=head)
    target = (pairs.first.data.targets[idx].to(u.device) - low) / (high - low)
    return F.mse_loss(F.cosine_similarity(u, v, dim=-1), target)


@torch.no_grad()
def evaluate_pairs(
    model: MultiTaskModel, config, tensors: dict[str, torch.Tensor] | None, pairs: PairData, *, metrics
) -> dict[str, float]:
    """The metrics of the pairs' cosine against their gold scores; `tensors` None: the plain backbone."""
    was = model.backbone.model.training
    model.backbone.model.eval()
    try:
        slot = 0
        if tensors is not None:
            model.bind(config, tensors)
            slot = 1
        cos = np.zeros(len(pairs))
        for idx in pairs.first.ordered():
            u = embed(model, pairs.first, idx, head=config.head, slot=slot)
            v = embed(model, pairs.second, idx, head=config.head, slot=slot)
            cos[idx] = F.cosine_similarity(u, v, dim=-1).cpu().numpy()
        return compute_metrics(cos, pairs.first.data.targets.numpy(), metrics=metrics)
    finally:
        model.backbone.model.train(was)

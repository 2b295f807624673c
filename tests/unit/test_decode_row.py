"""decode_row against plain arithmetic on the logits (math, not torch): argmax, softmax, sigmoid threshold."""

from __future__ import annotations

import math
import random

import pytest
import torch

from adapters.heads import decode_row

LABELS = ["alpha", "beta", "gamma", "delta", "eps"]
PAD = 32
"""A head's logits arrive padded with zeros to the bank's width; only the first len(labels) count."""


def _padded(values: list[float]) -> torch.Tensor:
    return torch.nn.functional.pad(torch.tensor(values, dtype=torch.float32), (0, PAD - len(values)))


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _rows(seed: int, n: int = 50) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.uniform(-4.0, 4.0) for _ in LABELS] for _ in range(n)]


@pytest.mark.parametrize("values", _rows(0), ids=lambda v: f"{v[0]:+.2f}")
def test_single_label_is_the_most_likely_label_with_its_softmax_probability(values: list[float]) -> None:
    """label = argmax of the logits; score and scores = softmax over the head's own labels only."""
    out = decode_row(_padded(values), kind="classification", labels=LABELS, all_scores=True)
    probs = _softmax(values)
    best = max(range(len(values)), key=values.__getitem__)
    assert out["label"] == LABELS[best]
    assert out["score"] == pytest.approx(probs[best], abs=1e-6)
    assert list(out["scores"]) == LABELS  # the head's label order
    assert list(out["scores"].values()) == pytest.approx(probs, abs=1e-6)


def test_scores_only_when_asked() -> None:
    """Without all_scores a single-label row is exactly label and score."""
    assert set(decode_row(_padded([0.1, 0.9]), kind="classification", labels=["n", "p"])) == {
        "label",
        "score",
    }


@pytest.mark.parametrize("values", _rows(1), ids=lambda v: f"{v[0]:+.2f}")
def test_multi_label_is_every_label_whose_sigmoid_reaches_one_half(values: list[float]) -> None:
    """labels = those with sigmoid(logit) >= 0.5 (logit >= 0), in label order; scores = each sigmoid."""
    out = decode_row(_padded(values), kind="multi_label", labels=LABELS)
    assert out["labels"] == [lab for lab, v in zip(LABELS, values, strict=True) if v >= 0]
    assert list(out["scores"]) == LABELS
    assert list(out["scores"].values()) == pytest.approx([_sigmoid(v) for v in values], abs=1e-6)


def test_multi_label_threshold_sits_at_zero_logit() -> None:
    """Just above and just below zero fall on either side of the threshold; none and all are possible."""
    out = decode_row(_padded([0.01, -0.01, 3.0]), kind="multi_label", labels=["a", "b", "c"])
    assert out["labels"] == ["a", "c"]
    assert decode_row(_padded([-1.0, -2.0]), kind="multi_label", labels=["a", "b"])["labels"] == []
    assert decode_row(_padded([1.0, 2.0]), kind="multi_label", labels=["a", "b"])["labels"] == ["a", "b"]


@pytest.mark.parametrize("value", [-3.75, 0.0, 1.25, 1e3])
def test_regression_is_the_first_logit_itself(value: float) -> None:
    """A regression head's output is its single logit, untransformed."""
    assert decode_row(_padded([value]), kind="regression", labels=[]) == {"value": value}

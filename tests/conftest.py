"""Shared test set-up: offline Hugging Face, quiet logs, and tiny in-process backbones."""

from __future__ import annotations

import os

# Set before transformers is imported anywhere: tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from transformers.utils import logging as hf_logging

from adapters.model import BankConfig, MultiTaskModel

hf_logging.set_verbosity_error()
# Tiny models: one intra-op thread is faster than two and does not fight parallel test runs.
torch.set_num_threads(1)


@pytest.fixture
def tiny_model():
    """Factory: a MultiTaskModel over a fresh tiny backbone of a family (`tiny_model("bert")`)."""
    from helpers import wrap

    def make(family: str, *, seed: int = 0, banks: BankConfig | None = None) -> MultiTaskModel:
        return wrap(family, seed=seed, banks=banks)

    return make


@pytest.fixture
def every_core():
    """Intra-op threads on every core (up to 4) for one test that trains a real backbone, then one again."""
    torch.set_num_threads(min(os.cpu_count() or 1, 4))
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)

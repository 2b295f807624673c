"""Names and defaults the training command lines need before any model code is imported.

`adapterserve upload`, `serve` and `--help` build the same parser as `train`; keeping these here
(no torch, no transformers) lets those commands start in a fraction of a second.
"""

from __future__ import annotations

__all__ = ["EMBEDDING", "FULL", "GENERATION", "HYPER_DEFAULTS", "HYPER_LR", "TRAINABLE_METHODS"]

FULL = "full"
EMBEDDING = "embedding"
"""The task kind of sentence-pair similarity trained by cosine (`adapters.training.embedding`)."""
GENERATION = "generation"
"""The task kind of text-to-text and continuation tasks on generative backbones (`adapters.training.generative`)."""

TRAINABLE_METHODS = (
    "bottleneck",
    "compacter",
    "ia3",
    "layernorm",
    "lora",
    "mam",
    "mh_parallel",
    "parallel",
    "prefix",
    "tiny_attention",
)
"""The adapter methods `adapterserve train --method` takes: every method `adapters.methods` serves."""

HYPER_DEFAULTS: dict = {"variant": "hyperformer++", "bottleneck_dim": 24, "sites": ["attn", "ffn"]}
"""Hypernetwork hyperparameters unless overridden (the other widths: the schema's defaults)."""

HYPER_LR = 3e-4
"""Peak learning rate of multi-task hypernetwork training at `projected_dim` 64 (the Hyperformer
papers' rate and width); other widths get `HYPER_LR * 64 / projected_dim` (see `default_lr`)."""

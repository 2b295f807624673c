"""Prefix tuning's training-time reparameterisation (Li & Liang; PEFT's `prefix_projection`).

Prefixes trained directly are unstable (the prefix-tuning paper, §4.3); training them as
`MLP(embedding)` is not. The MLP exists only while training: `PrefixMLP.collapse` folds it into
the plain per-layer key/value prefixes the artifact stores, so serving is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters.methods.prefix import collapse_prefix_mlp

__all__ = ["PrefixMLP"]


class PrefixMLP(nn.Module):
    """Li & Liang's reparameterisation: prefixes = MLP(embedding), collapsed away after training."""

    def __init__(self, *, length: int, hidden: int, mid: int, layers: int, inner: int, generator) -> None:
        super().__init__()
        self.layers, self.inner = layers, inner
        self.embedding = nn.Parameter(torch.randn(length, hidden, generator=generator))
        self.mlp = nn.Sequential(nn.Linear(hidden, mid), nn.Tanh(), nn.Linear(mid, layers * 2 * inner))
        for lin in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02, generator=generator)
            nn.init.zeros_(lin.bias)

    def forward(self) -> dict[str, torch.Tensor]:
        """Per-layer prefix tensors under their artifact names."""
        flat = self.mlp(self.embedding).view(self.embedding.shape[0], self.layers, 2, self.inner)
        return {
            f"encoder.{i}.attn.prefix.{kv}": flat[:, i, j]
            for i in range(self.layers)
            for j, kv in enumerate(("key", "value"))
        }

    def collapse(self) -> dict[str, torch.Tensor]:
        """The prefixes the MLP computes, once (serving needs nothing else)."""
        flat = collapse_prefix_mlp(self.embedding, self.mlp, num_layers=self.layers, inner=self.inner)
        return {f"encoder.{k.replace('.', '.attn.prefix.', 1)}": v.clone() for k, v in flat.items()}

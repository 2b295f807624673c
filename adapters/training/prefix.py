"""Prefix tuning's training-time reparameterisation (Li & Liang; PEFT's `prefix_projection`).

Prefixes trained directly are unstable (the prefix-tuning paper, §4.3); training them through an
MLP over a prefix embedding is not. The MLP exists only while training: `PrefixMLP.collapse`
folds it into the plain per-layer key/value prefixes the artifact stores, so serving is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PrefixMLP"]


class PrefixMLP(nn.Module):
    """prefixes = start + MLP(embedding); `collapse` computes them once, and the MLP is dropped."""

    def __init__(
        self, *, start: dict[str, torch.Tensor], hidden: int, mid: int, generator: torch.Generator
    ) -> None:
        super().__init__()
        # every prefix tensor of the adapter, in one fixed order: [length, inner] each
        self.names = sorted(start)
        length, inner = start[self.names[0]].shape
        self.length, self.inner = length, inner
        self.embedding = nn.Parameter(torch.randn(length, hidden, generator=generator))
        self.mlp = nn.Sequential(nn.Linear(hidden, mid), nn.Tanh(), nn.Linear(mid, len(self.names) * inner))
        nn.init.normal_(self.mlp[0].weight, std=0.02, generator=generator)
        nn.init.zeros_(self.mlp[0].bias)
        # The run starts exactly where direct training would (the trainer's start is real tokens' keys
        # and values, Li & Liang's best initialisation): the output layer starts at zero, as LoRA's B
        # does, and the MLP learns the change.
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        flat = torch.stack([start[n].float() for n in self.names], dim=1).reshape(length, -1)
        self.register_buffer("start", flat)

    def forward(self) -> dict[str, torch.Tensor]:
        """Every prefix tensor under its artifact name, with gradients to the embedding and the MLP."""
        flat = (self.start + self.mlp(self.embedding)).view(self.length, len(self.names), self.inner)
        return {n: flat[:, i] for i, n in enumerate(self.names)}

    def collapse(self) -> dict[str, torch.Tensor]:
        """The prefixes the MLP computes, once: plain key/value prefixes, all serving needs."""
        with torch.no_grad():
            return {k: v.detach().clone() for k, v in self.forward().items()}

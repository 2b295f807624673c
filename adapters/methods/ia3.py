"""IA3: learned rescaling of projection outputs (or inputs, for feedforward targets)."""

from __future__ import annotations

import torch

from adapters.methods.base import Entry, Method


class IA3(Method):
    """`l * (W x)`, or `W (l * x)` for the targets listed as feedforward."""

    name = "ia3"

    def entries(self, config, tensors, spec, *, banks=None):
        """One IA3-bank entry per adapted projection."""
        out = []
        for name, vec in tensors.items():
            if not name.endswith(".ia3"):
                continue
            key = name[: -len(".ia3")]
            target = key.split(".", 2)[2]
            out.append(Entry(key, "ia3", {"vector": vec, "on_input": target in config.feedforward}))
        return out

    def identity(self, shapes):
        """All-ones vectors rescale nothing."""
        return {k: torch.ones(s) if k.endswith(".ia3") else torch.zeros(s) for k, s in shapes.items()}

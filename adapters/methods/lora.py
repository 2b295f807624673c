"""LoRA on any projection: `W x + (alpha / r) B A x`, rsLoRA `alpha / sqrt(r)`."""

from __future__ import annotations

import torch

from adapters.banks import lora_scaling
from adapters.methods.base import Entry, Method, kaiming_uniform


class LoRA(Method):
    """Low-rank updates, PEFT layout (A: [r, in], B: [out, r]), per-site rank and alpha."""

    name = "lora"

    def entries(self, config, tensors, spec, *, banks=None):
        """One LoRA-bank entry per adapted projection."""
        out = []
        for name, a in tensors.items():
            if not name.endswith(".lora.A"):
                continue
            key = name[: -len(".lora.A")]
            target = key.split(".", 2)[2]
            r = a.shape[0]
            scaling = lora_scaling(alpha=config.alpha_at(key, target), r=r, rslora=config.use_rslora)
            out.append(Entry(key, "lora", {"A": a, "B": tensors[f"{key}.lora.B"], "scaling": scaling}))
        return out

    def identity(self, shapes):
        """Random A, zero B: the update is exactly zero (PEFT's own initialisation)."""
        g = torch.Generator().manual_seed(0)
        return {
            k: torch.randn(s, generator=g) if k.endswith(".A") else torch.zeros(s) for k, s in shapes.items()
        }

    def init(self, shapes, *, generator):
        """PEFT's initialisation: A kaiming-uniform (a=sqrt(5)), B zero, so the update starts at 0."""
        out = {k: kaiming_uniform(s, generator=generator) for k, s in shapes.items() if k.endswith(".lora.A")}
        out |= {k: torch.zeros(s) for k, s in shapes.items() if k.endswith(".lora.B")}
        return out | super().init({k: s for k, s in shapes.items() if k not in out}, generator=generator)

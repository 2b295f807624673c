"""Tiny-attention adapter: `a + out(MHA_E(in(LN(a))))` at the attention output, E tiny."""

from __future__ import annotations

import torch

from adapters.methods.base import Entry, Method, xavier_uniform

_PARTS = ("ln.weight", "ln.bias", "in.weight", "in.bias", "qkv.weight", "qkv.bias", "o.weight", "o.bias")
_PARTS += ("out.weight", "out.bias")


def average_heads(layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The deployment transform: average the K trained heads' weights into one head."""
    out = dict(layer)
    for name in ("qkv.weight", "qkv.bias", "o.weight", "o.bias"):
        out[name] = layer[name].mean(0, keepdim=True)
    return out


class TinyAttention(Method):
    """Per-row tiny attention over the row's own tokens (padding masked; causal in decoders)."""

    name = "tiny_attention"

    def entries(self, config, tensors, spec, *, banks=None):
        """One tiny-attention entry per adapted layer; heads averaged unless deploy='multihead'."""
        out = []
        for stack in config.stacks_on(spec):
            for i in range(spec.stacks[stack]):
                key = f"{stack}.{i}.attn"
                layer = {part: tensors[f"{key}.tiny.{part}"] for part in _PARTS}
                if config.deploy == "average":
                    layer = average_heads(layer)
                out.append(Entry(key, "tiny", {"tensors": layer}))
        return out

    def identity(self, shapes):
        """Zero output projection: the adapter adds nothing (LN weight 1 keeps it well defined)."""
        return {k: torch.ones(s) if k.endswith("ln.weight") else torch.zeros(s) for k, s in shapes.items()}

    def init(self, shapes, *, generator):
        """Glorot-uniform input, attention and head-output weights; the output projection zero (a no-op)."""
        out = {}
        for k, s in shapes.items():
            part = k.split(".tiny.")[-1]
            if part in ("in.weight", "qkv.weight", "o.weight"):
                out[k] = xavier_uniform(s, generator=generator)
        return out | super().init({k: s for k, s in shapes.items() if k not in out}, generator=generator)

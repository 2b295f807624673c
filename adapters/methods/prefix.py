"""Prefix tuning: per-layer key/value prefixes, already projected, prepended in self-attention."""

from __future__ import annotations

import torch

from adapters.methods.base import Entry, Method, normal

PREFIX_STD = 0.02
"""Standard deviation of randomly initialised prefixes (the trainer prefers real tokens' keys/values)."""


def prefix_entries(tensors, spec) -> list[Entry]:
    """One prefix-bank entry per self-attention layer."""
    out = []
    for stack, n in spec.stacks.items():
        for i in range(n):
            key = f"{stack}.{i}.attn"
            out.append(
                Entry(
                    key,
                    "prefix",
                    {"key": tensors[f"{key}.prefix.key"], "value": tensors[f"{key}.prefix.value"]},
                )
            )
    return out


def collapse_prefix_mlp(
    embedding: torch.Tensor, mlp: torch.nn.Module, *, num_layers: int, inner: int
) -> dict[str, torch.Tensor]:
    """Run the training-time reparameterisation once: embedding [L, d] -> per-layer key/value [L, inner].

    The MLP maps each prefix position to `num_layers * 2 * inner` numbers (keys then values per
    layer, AdapterHub/PEFT order); serving needs only its output, so it is computed here once.
    """
    with torch.no_grad():
        flat = mlp(embedding).view(embedding.shape[0], num_layers, 2, inner)
    return {f"{i}.{kv}": flat[:, i, j] for i in range(num_layers) for j, kv in enumerate(("key", "value"))}


def prefix_init(shapes: dict[str, tuple[int, ...]], *, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The prefix tensors among `shapes`, small normal (near-zero keys: attention to them starts flat)."""
    return {
        k: normal(s, std=PREFIX_STD, generator=generator)
        for k, s in shapes.items()
        if k.endswith((".prefix.key", ".prefix.value"))
    }


class Prefix(Method):
    """Keys and values prepended per row; rows with other lengths (or none) are masked."""

    name = "prefix"

    def entries(self, config, tensors, spec, *, banks=None):
        """Prefix entries for every self-attention."""
        return prefix_entries(tensors, spec)

    def init(self, shapes, *, generator):
        """Small normal prefixes."""
        out = prefix_init(shapes, generator=generator)
        return out | super().init({k: s for k, s in shapes.items() if k not in out}, generator=generator)

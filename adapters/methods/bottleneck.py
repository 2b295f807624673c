"""Sequential bottleneck adapters on sublayer outputs (Houlsby: attention + FFN; Pfeiffer: FFN)."""

from __future__ import annotations

import torch

from adapters.methods.base import Entry, Method, layer_keys, normal

DOWN_STD = 1e-2
"""Standard deviation of a bottleneck's initial down projection (Houlsby et al.: near-identity)."""


def bottleneck_kwargs(tensors, prefix: str, *, activation: str, scale) -> dict:
    """Bank kwargs for one bottleneck stored under `prefix` (down/up weight and bias)."""
    return {
        "down_w": tensors[f"{prefix}.down.weight"],
        "down_b": tensors[f"{prefix}.down.bias"],
        "up_w": tensors[f"{prefix}.up.weight"],
        "up_b": tensors[f"{prefix}.up.bias"],
        "activation": activation,
        "scale": scale,
    }


def bottleneck_init(
    shapes: dict[str, tuple[int, ...]], *, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The bottleneck tensors among `shapes`: down small normal, up and biases zero, learned scales 1.

    Up at zero makes the adapter a no-op at step 0 while every tensor still gets a gradient.
    """
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith(".down.weight"):
            out[name] = normal(shape, std=DOWN_STD, generator=generator)
        elif name.endswith((".up.weight", ".down.bias", ".up.bias")):
            out[name] = torch.zeros(shape)
        elif name.endswith(".scale"):
            out[name] = torch.ones(shape)
    return out


class Bottleneck(Method):
    """`h + s * up(f(down(h)))` at each configured sublayer output."""

    name = "bottleneck"

    def entries(self, config, tensors, spec, *, banks=None):
        """One sequential-bank entry per adapted sublayer (the post-norm bank for `post_norm`)."""
        kind = "seq_post" if config.placement == "post_norm" else "seq"
        return [
            Entry(
                key,
                kind,
                bottleneck_kwargs(tensors, f"{key}.seq", activation=config.activation, scale=config.scaling),
            )
            for key, _ in layer_keys(spec, config.sites)
        ]

    def init(self, shapes, *, generator):
        """Down small normal, up zero: training starts from the plain backbone."""
        out = bottleneck_init(shapes, generator=generator)
        return out | super().init({k: s for k, s in shapes.items() if k not in out}, generator=generator)

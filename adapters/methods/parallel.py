"""Parallel and scaled parallel adapters (He et al.): `h + F(x) + s * up(f(down(x)))`."""

from __future__ import annotations

import torch

from adapters.methods.base import Entry, Method, layer_keys
from adapters.methods.bottleneck import bottleneck_init, bottleneck_kwargs


class Parallel(Method):
    """A bottleneck that reads the sublayer input and adds to its output; s fixed or learned."""

    name = "parallel"

    def entries(self, config, tensors, spec, *, banks=None):
        """One parallel-bank entry per adapted sublayer."""
        out = []
        for key, _ in layer_keys(spec, config.sites):
            scale = tensors[f"{key}.par.scale"] if config.learned_scaling else config.scaling
            out.append(
                Entry(
                    key,
                    "par",
                    bottleneck_kwargs(tensors, f"{key}.par", activation=config.activation, scale=scale),
                )
            )
        return out

    def identity(self, shapes):
        """Zero weights; a learned scale starts at 1 as in AdapterHub."""
        return {k: torch.ones(s) if k.endswith(".scale") else torch.zeros(s) for k, s in shapes.items()}

    def init(self, shapes, *, generator):
        """Down small normal, up zero, learned scale 1: training starts from the plain backbone."""
        out = bottleneck_init(shapes, generator=generator)
        return out | super().init({k: s for k, s in shapes.items() if k not in out}, generator=generator)

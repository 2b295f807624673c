"""Sequential bottleneck adapters on sublayer outputs (Houlsby: attention + FFN; Pfeiffer: FFN)."""

from __future__ import annotations

from adapters.methods.base import Entry, Method, layer_keys


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


class Bottleneck(Method):
    """`h + s * up(f(down(h)))` at each configured sublayer output."""

    name = "bottleneck"

    def entries(self, config, tensors, spec, *, banks=None):
        """One sequential-bank entry per adapted sublayer."""
        return [
            Entry(
                key,
                "seq",
                bottleneck_kwargs(tensors, f"{key}.seq", activation=config.activation, scale=config.scaling),
            )
            for key, _ in layer_keys(spec, config.sites)
        ]

"""The one interface every adapter method implements: config + tensors -> bank entries."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from store.spec import BackboneSpec

__all__ = [
    "Entry",
    "Method",
    "common_entries",
    "is_norm_tensor",
    "kaiming_uniform",
    "layer_keys",
    "normal",
    "xavier_uniform",
]


@dataclass
class Entry:
    """One bank write: the bank at `key` of kind `kind` gets `load(slot, **kwargs)`."""

    key: str
    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)


class Method:
    """An adapter method: turns an artifact's config and tensors into bank entries.

    Subclasses set `name` and implement `entries`. `identity` gives tensors that make the
    adapter a no-op (used to prove that an all-zero adapter equals the plain backbone); `init`
    gives the tensors training starts from.
    """

    name: ClassVar[str]

    def entries(
        self, config, tensors: dict[str, torch.Tensor], spec: BackboneSpec, *, banks=None
    ) -> list[Entry]:
        """Bank entries for this adapter (heads and LayerNorm overrides are added by the model)."""
        raise NotImplementedError

    def identity(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """Tensors that make the adapter itself a no-op: zeros unless the method says otherwise."""
        return {k: torch.zeros(s) for k, s in shapes.items()}

    def init(
        self, shapes: dict[str, tuple[int, ...]], *, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Tensors training starts from: the method's no-op; LayerNorm overrides start at weight 1, bias 0.

        The trainer replaces LayerNorm overrides with the backbone's own norm parameters, which it
        alone knows; methods with random factors override this.
        """
        out = self.identity({k: s for k, s in shapes.items() if not is_norm_tensor(k)})
        for k, s in shapes.items():
            if is_norm_tensor(k):
                out[k] = torch.ones(s) if k.endswith(".weight") else torch.zeros(s)
        return out


def is_norm_tensor(name: str) -> bool:
    """Whether an artifact tensor is a per-task LayerNorm override ('encoder.0.attn_ln.weight')."""
    parts = name.split(".")
    return len(parts) == 4 and parts[2] in ("attn_ln", "ffn_ln", "cross_ln")


def normal(shape: tuple[int, ...], *, std: float, generator: torch.Generator) -> torch.Tensor:
    """Zero-mean normal values with standard deviation `std`."""
    return torch.randn(shape, generator=generator) * std


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    # nn.Linear layout [out, in]; leading dims (heads, Kronecker summands) are separate matrices.
    return shape[-1], shape[-2]


def xavier_uniform(shape: tuple[int, ...], *, gain: float = 1.0, generator: torch.Generator) -> torch.Tensor:
    """Glorot-uniform values, per matrix of the last two dims."""
    fan_in, fan_out = _fans(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def kaiming_uniform(shape: tuple[int, ...], *, generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's default (kaiming-uniform with a=sqrt(5)): uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(_fans(shape)[0])
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def layer_keys(spec: BackboneSpec, sites: list[str]) -> list[tuple[str, str]]:
    """(site key prefix 'stack.layer.site', site) for each sublayer site present in this backbone."""
    out = []
    for stack, n in spec.stacks.items():
        for i in range(n):
            for site in sites:
                if site == "cross" and not (stack == "decoder" and spec.num_layers):
                    continue
                out.append((f"{stack}.{i}.{site}", site))
    return out


def common_entries(config, tensors: dict[str, torch.Tensor], spec: BackboneSpec) -> list[Entry]:
    """Entries every method may carry: per-task LayerNorm overrides and the task head."""
    out: list[Entry] = []
    if config.layernorm:
        for stack, n in spec.stacks.items():
            for i in range(n):
                for site in ("attn_ln", "ffn_ln", "cross_ln"):
                    key = f"{stack}.{i}.{site}"
                    if f"{key}.weight" in tensors:
                        out.append(
                            Entry(
                                key,
                                "ln",
                                {"weight": tensors[f"{key}.weight"], "bias": tensors.get(f"{key}.bias")},
                            )
                        )
    head = config.head
    # An embedding head has no weights: the engine pools the encoder output itself.
    if head is not None and head.type != "embedding":
        dense = None
        if head.layers == 2:
            dense = (tensors["head.dense.weight"], tensors["head.dense.bias"])
        out.append(
            Entry(
                "head",
                "head",
                {
                    "kind": head.type,
                    "pooling": head.pooling,
                    "out_w": tensors["head.out.weight"],
                    "out_b": tensors["head.out.bias"],
                    "dense": dense,
                },
            )
        )
    return out

"""The one interface every adapter method implements: config + tensors -> bank entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from store.spec import BackboneSpec

__all__ = ["Entry", "Method", "common_entries", "layer_keys"]


@dataclass
class Entry:
    """One bank write: the bank at `key` of kind `kind` gets `load(slot, **kwargs)`."""

    key: str
    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)


class Method:
    """An adapter method: turns an artifact's config and tensors into bank entries.

    Subclasses set `name` and implement `entries`. `identity` gives tensors that make the
    adapter a no-op (used to prove that an all-zero adapter equals the plain backbone).
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
    if head is not None:
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

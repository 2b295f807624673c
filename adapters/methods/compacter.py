"""Compacter, Compacter++ and PHM adapters: bottleneck weights as sums of Kronecker products.

`W = sum_i A_i ⊗ B_i` with `A_i` ([n, n]) shared by every layer of one adapter and `B_i`
either low-rank `s_i t_iᵀ` (Compacter) or full (PHM); `y = x W + b` with W of shape [in, out].
By default the products are materialized once at load into the ordinary bottleneck bank, so a
forward costs exactly what a dense bottleneck costs; the factored bank keeps only the factors
resident and expands them per batch, for when memory matters more than compute.
"""

from __future__ import annotations

import math

import torch

from adapters.methods.base import Entry, Method, layer_keys, normal, xavier_uniform

RULE_STD = 0.01
"""Standard deviation of the shared rule matrices A_i (the Compacter reference's `phm_init_range`)."""


def kron_sum(rule: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`sum_i kron(rule[i], b[i])` for rule [n, n, n] and b [n, p, q] -> [n*p, n*q]."""
    _, p, q = b.shape
    return torch.einsum("iac,ibd->abcd", rule, b).reshape(rule.shape[1] * p, rule.shape[2] * q)


def phm_factor(tensors, prefix: str, variant: str) -> torch.Tensor:
    """The per-layer B_i of one PHM layer: full (phm) or s_i t_iᵀ (compacter)."""
    if variant == "phm":
        return tensors[f"{prefix}.W"]
    return torch.bmm(tensors[f"{prefix}.s"], tensors[f"{prefix}.t"])


class Compacter(Method):
    """Sequential bottleneck whose down/up weights are PHM layers."""

    name = "compacter"

    def entries(self, config, tensors, spec, *, banks=None):
        """Materialize each PHM layer into a dense sequential entry, or keep it factored."""
        rule = tensors["phm_rule"]
        out = []
        for key, _ in layer_keys(spec, config.sites):
            p = f"{key}.seq"
            # adapters placed after the norm live in the dense post-norm bank, never factored
            post = config.placement == "post_norm"
            if banks is not None and banks.compacter_factored and not post:
                kw = {
                    "rule": rule,
                    "down_f": phm_factor(tensors, f"{p}.down", config.variant),
                    "up_f": phm_factor(tensors, f"{p}.up", config.variant),
                    "down_b": tensors[f"{p}.down.bias"],
                    "up_b": tensors[f"{p}.up.bias"],
                    "activation": config.activation,
                    "scale": config.scaling,
                }
                out.append(Entry(key, "phm", kw))
                continue
            down = kron_sum(rule, phm_factor(tensors, f"{p}.down", config.variant))  # [in, r]
            up = kron_sum(rule, phm_factor(tensors, f"{p}.up", config.variant))  # [r, out]
            kw = {
                "down_w": down.t(),
                "down_b": tensors[f"{p}.down.bias"],
                "up_w": up.t(),
                "up_b": tensors[f"{p}.up.bias"],
                "activation": config.activation,
                "scale": config.scaling,
            }
            out.append(Entry(key, "seq_post" if post else "seq", kw))
        return out

    def init(self, shapes, *, generator):
        """As the Compacter reference: rule ~ N(0, 0.01²), factors Glorot-uniform (gain √2), biases 0."""
        out = {}
        for k, s in shapes.items():
            if k == "phm_rule":
                out[k] = normal(s, std=RULE_STD, generator=generator)
            elif k.endswith((".s", ".t", ".W")):
                out[k] = xavier_uniform(s, gain=math.sqrt(2.0), generator=generator)
            elif k.endswith(".bias"):
                out[k] = torch.zeros(s)
        return out | super().init({k: s for k, s in shapes.items() if k not in out}, generator=generator)

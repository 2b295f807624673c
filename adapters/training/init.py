"""A training run's starting point: banks sized for one adapter, and its initial tensors.

Prefixes start as the keys and values the backbone computes for real tokens (Li & Liang's best
initialisation), LayerNorm overrides as the backbone's own, heads small and random (a regression
head's bias at the mean target); everything else as its method's `init` says.
"""

from __future__ import annotations

import dataclasses

import torch

from adapters.backbone import Backbone
from adapters.methods import get_method
from adapters.methods.base import is_norm_tensor
from adapters.model import BankConfig, MultiTaskModel
from store.artifact import expected_tensors

__all__ = ["bank_config", "init_tensors"]


def bank_config(config) -> BankConfig:
    """Two slots, each bank exactly as large as this adapter (padding would only cost time)."""
    m = config.method
    kw: dict = {
        "slots": 2,
        "lora_max_rank": 0,
        "ia3": m == "ia3",
        "bottleneck_max_dim": 0,
        "prefix_max_len": 0,
        "layernorm": bool(config.layernorm),
        "mh_parallel_max_dim": 0,
        "tiny_max_dim": 0,
        "head_max_outputs": max(config.head.num_outputs, 1) if config.head is not None else 0,
        "head_two_layer": config.head is not None and config.head.layers == 2,
        "bottleneck_post_norm": getattr(config, "placement", "output") == "post_norm",
    }
    if m == "lora":
        kw["lora_max_rank"] = max([config.r, *config.rank_pattern.values()])
        kw["lora_targets"] = tuple(config.targets)
    if m in ("bottleneck", "parallel", "mam", "compacter"):
        kw["bottleneck_max_dim"] = config.bottleneck_dim
    if m in ("prefix", "mam"):
        kw["prefix_max_len"] = config.prefix_length
    if m == "mh_parallel":
        kw["mh_parallel_max_dim"] = config.bottleneck_dim
    if m == "tiny_attention":
        kw["tiny_max_dim"], kw["tiny_max_heads"] = config.attention_dim, config.num_heads
    known = {f.name for f in dataclasses.fields(BankConfig)}
    return BankConfig(**{k: v for k, v in kw.items() if k in known})


def _base_norms(backbone: Backbone, names: list[str]) -> dict[str, torch.Tensor]:
    """The backbone's own LayerNorm parameters under their artifact names."""
    arch, core = backbone.arch, backbone.core
    out = {}
    for name in names:
        stack, layer, site, param = name.split(".")
        module = core.get_submodule(f"{arch.stacks[stack]}.{layer}.{arch.layer[stack][site]}")
        module = getattr(module, "base", module)
        out[name] = getattr(module, param).detach().float().cpu().clone()
    return out


@torch.no_grad()
def _token_prefixes(
    model: MultiTaskModel, length: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Keys and values the backbone computes for `length` random vocabulary tokens, per layer."""
    bb = model.backbone
    arch, core, spec = bb.arch, bb.core, bb.spec
    # skip the low ids (special and unused tokens in BERT-style vocabularies) where there is room
    low = 1000 if spec.vocab_size > 2000 else 0
    ids = torch.randint(low, spec.vocab_size, (1, length), generator=generator)
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for stack, path in arch.stacks.items():
        if stack != "encoder":
            continue
        for i, layer in enumerate(core.get_submodule(path)):
            for proj in ("k", "v"):
                name = f"encoder.{i}.attn.prefix.{'key' if proj == 'k' else 'value'}"

                def hook(_m, _inp, out, name=name):
                    captured[name] = out[0].detach().float().cpu().clone()

                hooks.append(layer.get_submodule(arch.layer[stack][proj]).register_forward_hook(hook))
    try:
        # the encoder alone: a seq2seq model's full forward would also want decoder inputs
        model._encode(ids.to(bb.device), torch.ones_like(ids, device=bb.device))
    finally:
        for h in hooks:
            h.remove()
    return captured


def init_tensors(
    config,
    model: MultiTaskModel,
    *,
    generator: torch.Generator,
    options,
    target_mean: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Starting tensors: the method's `init`, the backbone's own norms, a small random head.

    `options` is the run's `TrainOptions` (its `prefix_init` chooses how prefixes start).
    """
    shapes = expected_tensors(config, model.spec)
    head = {k: s for k, s in shapes.items() if k.startswith("head.")}
    adapter = {k: s for k, s in shapes.items() if k not in head}
    out = get_method(config.method).init(adapter, generator=generator)
    out |= _base_norms(model.backbone, [k for k in adapter if is_norm_tensor(k)])
    if config.method in ("prefix", "mam") and options.prefix_init == "tokens" and model.spec.num_layers:
        out |= {k: v for k, v in _token_prefixes(model, config.prefix_length, generator).items() if k in out}
    for k, s in head.items():
        out[k] = torch.randn(s, generator=generator) * 0.02 if k.endswith("weight") else torch.zeros(s)
    if config.head is not None and config.head.type == "regression":
        out["head.out.bias"] = torch.full(head["head.out.bias"], target_mean)
    return {k: v.float() for k, v in out.items()}

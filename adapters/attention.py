"""Prefix banks and the attention hook that prepends each row's prefix to keys and values.

The hook is registered as a Hugging Face attention implementation named `adapterserve`. It
extends keys, values, the mask (and T5's position bias) with the rows' prefixes, then calls
the implementation the model used before (sdpa or eager), so the attention math stays the
library's own. Rows with shorter prefixes (or none) have their missing positions masked out.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from adapters.banks import _Bank
from adapters.router import Router

__all__ = ["IMPLEMENTATION", "PrefixBank", "install_attention_hook"]

IMPLEMENTATION = "adapterserve"
_INNER_IMPL = "sdpa"


class PrefixBank(_Bank):
    """Per-task key/value prefixes for one self-attention, already projected: pooled rows `[inner]`.

    A prefix of length L owns L rows of `key` and of `value`, so lengths 5 and 512 share the bank
    without either reserving the other's room.
    """

    _meta = ("length",)

    def __init__(
        self, *, max_len: int | None = None, inner: int, num_heads: int, slots: int, router: Router, **factory
    ):
        super().__init__(slots=slots, router=router)
        self.max_len = max_len
        self.num_heads = num_heads
        self.pool = self._pool(
            ranked=True, buffers={"key": ((inner,), 0.0), "value": ((inner,), 0.0)}, **factory
        )
        self.length = np.zeros(slots, dtype=np.int64)

    def layout(self, *, key: torch.Tensor, value: torch.Tensor):
        """A task's prefixes, [L, inner] each."""
        n = key.shape[0]
        if self.max_len is not None and n > self.max_len:
            raise ValueError(f"prefix length {n} exceeds the bank's maximum {self.max_len}")
        return {"key": key, "value": value}, {"length": n}

    def extend(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        mask,
        position_bias,
        *,
        causal: bool,
        queries: int | None = None,
    ):
        """Prepend the rows' prefixes to head-split keys/values `[B, nh, T, d]`; extend mask and bias.

        `queries` is the query length; without a mask it tells a cached decoding step (fewer queries than
        keys) from a full forward.
        """
        rt = self.router
        lens = self.length[rt.slots_np]
        n = int(lens.max())
        b, nh, tk, d = key.shape
        single = rt.single
        if single is not None:
            pk = self.pool.span("key", single).expand(b, n, -1)
            pv = self.pool.span("value", single).expand(b, n, -1)
        else:
            ix = self.pool.index(rt.slots_np, n)
            pk = self.pool.take("key", ix, b, n)
            pv = self.pool.take("value", ix, b, n)
        pk = pk.reshape(b, n, nh, d).transpose(1, 2).to(key.dtype)
        pv = pv.reshape(b, n, nh, d).transpose(1, 2).to(value.dtype)
        key = torch.cat([pk, key], dim=2)
        value = torch.cat([pv, value], dim=2)
        valid = torch.as_tensor(np.arange(n)[None, :] < lens[:, None], device=key.device)  # [B, n]
        tq = mask.shape[-2] if mask is not None and mask.dim() == 4 else queries
        mask = _extend_mask(mask, valid, tk=tk, causal=causal, tq=tq)
        if position_bias is not None:
            pad = position_bias.new_zeros(*position_bias.shape[:-1], n)
            position_bias = torch.cat([pad, position_bias], dim=-1)
        return key, value, mask, position_bias


def _extend_mask(mask, valid: torch.Tensor, *, tk: int, causal: bool, tq: int | None):
    """Prepend prefix columns to a bool or additive mask (or build one when the model passed none)."""
    b, n = valid.shape
    if mask is None:
        # The model relied on is_causal or on "no padding"; materialize that explicitly.
        q = tq or tk
        if causal and q > 1:
            rows = torch.arange(q, device=valid.device)[:, None] + (tk - q)
            base = (torch.arange(tk, device=valid.device)[None, :] <= rows).expand(b, 1, q, tk)
        else:
            base = torch.ones(b, 1, q, tk, dtype=torch.bool, device=valid.device)
        mask = base
    q = mask.shape[-2]
    cols = valid[:, None, None, :].expand(b, 1, q, n)
    if mask.dtype == torch.bool:
        return torch.cat([cols, mask.expand(b, *mask.shape[1:])], dim=-1)
    neg = torch.finfo(mask.dtype).min
    add = torch.where(cols, torch.zeros((), dtype=mask.dtype, device=mask.device), neg)
    return torch.cat([add, mask.expand(b, *mask.shape[1:])], dim=-1)


def _inner(module: nn.Module):
    impl = getattr(module, "_adapterserve_inner", _INNER_IMPL)
    if impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def _attention(module, query, key, value, attention_mask, **kwargs):
    """The registered attention: prepend prefixes when any row has one, then delegate."""
    bank: PrefixBank | None = getattr(module, "adapterserve_prefix", None)
    if bank is not None and bank.active():
        pb = kwargs.pop("position_bias", None)
        causal = bool(getattr(module, "is_causal", False)) and kwargs.get("is_causal", True) is not False
        key, value, attention_mask, pb = bank.extend(
            key, value, attention_mask, pb, causal=causal, queries=query.shape[-2]
        )
        if pb is not None:
            kwargs["position_bias"] = pb
        kwargs["is_causal"] = False
    return _inner(module)(module, query, key, value, attention_mask, **kwargs)


def install_attention_hook(model: nn.Module) -> None:
    """Make the model's attention go through the prefix hook (the math is still sdpa's)."""
    AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS[_INNER_IMPL])
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = IMPLEMENTATION

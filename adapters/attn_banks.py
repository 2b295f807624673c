"""Banks that act around attention: multi-head parallel adapters and tiny-attention adapters."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from adapters.banks import ACTIVATION_CODES, _Bank, activate, activate_rows
from adapters.router import Router

__all__ = ["FactoredPHMBank", "MHParallelBank", "TinyAttentionBank"]


class MHParallelBank(_Bank):
    """A parallel bottleneck per attention head (He et al.), added to the heads' outputs before O.

    Head h reads the attention input x: `o_h + s * up_h(f(down_h(x)))`; the bank keeps
    down as [S, H, heads, r] and up as [S, heads, r, d] so ranks pad per head.
    """

    def __init__(
        self, *, hidden: int, heads: int, head_dim: int, max_dim: int, slots: int, router: Router, **fac
    ):
        super().__init__(slots=slots, router=router)
        self.heads, self.head_dim, self.max_dim = heads, head_dim, max_dim
        self.register_buffer("down", torch.zeros(slots, hidden, heads, max_dim, **fac), persistent=False)
        self.register_buffer("down_b", torch.zeros(slots, heads, max_dim, **fac), persistent=False)
        self.register_buffer("up", torch.zeros(slots, heads, max_dim, head_dim, **fac), persistent=False)
        self.register_buffer("up_b", torch.zeros(slots, heads * head_dim, **fac), persistent=False)
        self.register_buffer("scale", torch.zeros(slots, **fac), persistent=False)
        self.rank = np.zeros(slots, dtype=np.int64)
        self.act = np.zeros(slots, dtype=np.int64)

    @torch.no_grad()
    def load(self, slot, *, down_w, down_b, up_w, up_b, activation: str, scale: float) -> None:
        """Copy weights (down: [heads*r, H] head-major, up: [heads, d, r]) into a slot."""
        self._check_slot(slot)
        r = down_w.shape[0] // self.heads
        if r > self.max_dim:
            raise ValueError(f"per-head bottleneck {r} exceeds the bank's maximum {self.max_dim}")
        self.evict(slot)
        self.down[slot, :, :, :r].copy_(down_w.t().reshape(-1, self.heads, r))
        self.down_b[slot, :, :r].copy_(down_b.view(self.heads, r))
        self.up[slot, :, :r].copy_(up_w.transpose(1, 2))
        self.up_b[slot].copy_(up_b)
        self.scale[slot] = float(scale)
        self.rank[slot] = r
        self.act[slot] = ACTIVATION_CODES[activation]
        self.occupied[slot] = True

    @torch.no_grad()
    def evict(self, slot: int) -> None:
        """Zero a slot."""
        for t in (self.down, self.down_b, self.up, self.up_b, self.scale):
            t[slot].zero_()
        self.rank[slot] = self.act[slot] = 0
        self.occupied[slot] = False

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row head-output update [B, T, heads*d] for attention input x [B, T, H]."""
        rt = self.router
        r = int(self.rank[rt.unique].max())
        b, t, h = x.shape
        single = rt.single
        if single is not None:
            z = x @ self.down[single, :, :, :r].reshape(h, -1) + self.down_b[single, :, :r].reshape(-1)
            z = activate(z, int(self.act[single])).view(b, t, self.heads, r)
            y = torch.einsum("btnr,nrd->btnd", z, self.up[single, :, :r]).reshape(b, t, -1)
            return (y + self.up_b[single]) * self.scale[single]
        s = rt.slots
        down = self.down[s, :, :, :r].reshape(b, h, -1)
        z = torch.baddbmm(self.down_b[s, :, :r].reshape(b, 1, -1), x, down)
        z = activate_rows(z, self.act, rt).view(b, t, self.heads, r)
        y = torch.einsum("btnr,bnrd->btnd", z, self.up[s, :, :r]).reshape(b, t, -1)
        return (y + self.up_b[s].unsqueeze(1)) * self.scale[s].view(-1, 1, 1)


class TinyAttentionBank(_Bank):
    """Tiny-attention adapters at the attention output: `a + out(MHA_E(in(LN(a))))`.

    Each of K heads has width E; head outputs are averaged. The averaging (1/K) is folded into
    the heads' output weights and the 1/sqrt(E) score scale into the query weights at load, so
    rows with different E or K share the bank exactly through zero padding.
    """

    def __init__(self, *, hidden: int, max_dim: int, max_heads: int, slots: int, router: Router, **fac):
        super().__init__(slots=slots, router=router)
        e, k = max_dim, max_heads
        self.max_dim, self.max_heads = e, k
        self.register_buffer("ln_w", torch.zeros(slots, hidden, **fac), persistent=False)
        self.register_buffer("ln_b", torch.zeros(slots, hidden, **fac), persistent=False)
        self.register_buffer("in_w", torch.zeros(slots, hidden, e, **fac), persistent=False)
        self.register_buffer("in_b", torch.zeros(slots, e, **fac), persistent=False)
        self.register_buffer("qkv_w", torch.zeros(slots, k, e, 3 * e, **fac), persistent=False)
        self.register_buffer("qkv_b", torch.zeros(slots, k, 3 * e, **fac), persistent=False)
        self.register_buffer("o_w", torch.zeros(slots, k, e, e, **fac), persistent=False)
        self.register_buffer("o_b", torch.zeros(slots, e, **fac), persistent=False)
        self.register_buffer("out_w", torch.zeros(slots, e, hidden, **fac), persistent=False)
        self.register_buffer("out_b", torch.zeros(slots, hidden, **fac), persistent=False)

    @torch.no_grad()
    def load(self, slot: int, *, tensors: dict[str, torch.Tensor]) -> None:
        """Copy one layer's tiny attention (artifact layout, K heads of width E) into a slot."""
        self._check_slot(slot)
        k, _, e = tensors["qkv.weight"].shape
        if e > self.max_dim or k > self.max_heads:
            raise ValueError(f"tiny attention E={e}, heads={k} exceeds the bank's maximum")
        self.evict(slot)
        self.ln_w[slot].copy_(tensors["ln.weight"])
        self.ln_b[slot].copy_(tensors["ln.bias"])
        self.in_w[slot, :, :e].copy_(tensors["in.weight"].t())
        self.in_b[slot, :e].copy_(tensors["in.bias"])
        qkv_w = tensors["qkv.weight"].transpose(1, 2).clone()  # [K, E, 3E]
        qkv_b = tensors["qkv.bias"].clone()
        qkv_w[:, :, :e] /= math.sqrt(e)
        qkv_b[:, :e] /= math.sqrt(e)
        for part in range(3):
            self.qkv_w[slot, :k, :e, part * self.max_dim : part * self.max_dim + e].copy_(
                qkv_w[:, :, part * e : (part + 1) * e]
            )
            self.qkv_b[slot, :k, part * self.max_dim : part * self.max_dim + e].copy_(
                qkv_b[:, part * e : (part + 1) * e]
            )
        self.o_w[slot, :k, :e, :e].copy_(tensors["o.weight"].transpose(1, 2) / k)
        self.o_b[slot, :e].copy_(tensors["o.bias"].mean(0))
        self.out_w[slot, :e].copy_(tensors["out.weight"].t())
        self.out_b[slot].copy_(tensors["out.bias"])
        self.occupied[slot] = True

    @torch.no_grad()
    def evict(self, slot: int) -> None:
        """Zero a slot."""
        for t in (self.ln_w, self.ln_b, self.in_w, self.in_b, self.qkv_w, self.qkv_b, self.o_w, self.o_b):
            t[slot].zero_()
        self.out_w[slot].zero_()
        self.out_b[slot].zero_()
        self.occupied[slot] = False

    def delta(self, a: torch.Tensor) -> torch.Tensor:
        """Per-row tiny-attention output [B, T, H] for attention outputs a [B, T, H]."""
        rt = self.router
        s = rt.slots
        t = a.shape[1]
        e = self.max_dim
        u = F.layer_norm(a, a.shape[-1:]) * self.ln_w[s].unsqueeze(1) + self.ln_b[s].unsqueeze(1)
        u = torch.baddbmm(self.in_b[s].unsqueeze(1), u, self.in_w[s])  # [B, T, E]
        qkv = torch.einsum("bte,bkef->bktf", u, self.qkv_w[s]) + self.qkv_b[s].unsqueeze(2)
        q, k, v = qkv.split(e, dim=-1)  # [B, K, T, E]
        mask = rt.attention_mask
        attn_mask = None if mask is None else mask[:, None, None, :t].to(torch.bool)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
        o = torch.einsum("bkte,bkef->btf", ctx, self.o_w[s]) + self.o_b[s].unsqueeze(1)
        return torch.baddbmm(self.out_b[s].unsqueeze(1), o, self.out_w[s])


class FactoredPHMBank(_Bank):
    """Compacter/PHM adapters kept as factors and expanded per batch, for the slots in use only.

    Holds the shared rule A [S, n, n, n] and the per-layer B_i of down and up; a forward expands
    `sum_i A_i ⊗ B_i` for the batch's distinct slots. Narrower adapters pad q = r/n up to the
    bank's maximum inside each Kronecker block, which keeps the expansion exact.
    """

    def __init__(self, *, hidden: int, n: int, max_dim: int, slots: int, router: Router, **fac):
        super().__init__(slots=slots, router=router)
        if hidden % n or max_dim % n:
            raise ValueError(f"phm dimension {n} must divide hidden {hidden} and max width {max_dim}")
        self.n, self.p, self.qmax = n, hidden // n, max_dim // n
        self.register_buffer("rule", torch.zeros(slots, n, n, n, **fac), persistent=False)
        self.register_buffer("down_f", torch.zeros(slots, n, self.p, self.qmax, **fac), persistent=False)
        self.register_buffer("up_f", torch.zeros(slots, n, self.qmax, self.p, **fac), persistent=False)
        self.register_buffer("down_b", torch.zeros(slots, n, self.qmax, **fac), persistent=False)
        self.register_buffer("up_b", torch.zeros(slots, hidden, **fac), persistent=False)
        self.register_buffer("scale", torch.zeros(slots, **fac), persistent=False)
        self.q = np.zeros(slots, dtype=np.int64)
        self.act = np.zeros(slots, dtype=np.int64)

    @torch.no_grad()
    def load(self, slot, *, rule, down_f, up_f, down_b, up_b, activation: str, scale: float) -> None:
        """Copy factors (rule [n,n,n], down B_i [n, in/n, r/n], up B_i [n, r/n, out/n]) into a slot."""
        self._check_slot(slot)
        n, _, q = down_f.shape
        if n != self.n or q > self.qmax:
            raise ValueError(f"factored PHM bank holds n={self.n}, width <= {self.qmax * self.n}")
        self.evict(slot)
        self.rule[slot].copy_(rule)
        self.down_f[slot, :, :, :q].copy_(down_f)
        self.up_f[slot, :, :q].copy_(up_f)
        self.down_b[slot, :, :q].copy_(down_b.view(n, q))
        self.up_b[slot].copy_(up_b)
        self.scale[slot] = float(scale)
        self.q[slot] = q
        self.act[slot] = ACTIVATION_CODES[activation]
        self.occupied[slot] = True

    @torch.no_grad()
    def evict(self, slot: int) -> None:
        """Zero a slot."""
        for t in (self.rule, self.down_f, self.up_f, self.down_b, self.up_b, self.scale):
            t[slot].zero_()
        self.q[slot] = self.act[slot] = 0
        self.occupied[slot] = False

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Expand the batch's slots' weights, then run each row's bottleneck."""
        rt = self.router
        u = torch.as_tensor(rt.unique, device=x.device)
        q = int(self.q[rt.unique].max())
        n, p = self.n, self.p
        rule = self.rule[u]
        down = torch.einsum("uiac,uibd->uabcd", rule, self.down_f[u, :, :, :q]).reshape(len(u), n * p, n * q)
        up = torch.einsum("uiac,uibd->uabcd", rule, self.up_f[u, :, :q]).reshape(len(u), n * q, n * p)
        inv = torch.as_tensor(np.searchsorted(rt.unique, rt.slots_np), device=x.device)
        s = rt.slots
        z = torch.baddbmm(self.down_b[s, :, :q].reshape(len(s), 1, -1), x, down[inv])
        z = activate_rows(z, self.act, rt)
        y = torch.baddbmm(self.up_b[s].unsqueeze(1), z, up[inv])
        return y * self.scale[s].view(-1, 1, 1)

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

    _meta = ("rank", "act")

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

    def layout(self, *, down_w, down_b, up_w, up_b, activation: str, scale):
        """Weights (down: [heads*r, H] head-major, up: [heads, d, r]) -> per-head bank layout."""
        r = down_w.shape[0] // self.heads
        if r > self.max_dim:
            raise ValueError(f"per-head bottleneck {r} exceeds the bank's maximum {self.max_dim}")
        tensors = {
            "down": down_w.t().reshape(-1, self.heads, r),
            "down_b": down_b.view(self.heads, r),
            "up": up_w.transpose(1, 2),
            "up_b": up_b,
            "scale": torch.as_tensor(scale, dtype=down_w.dtype).reshape(()),
        }
        return tensors, {"rank": r, "act": ACTIVATION_CODES[activation]}

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

    def layout(self, *, tensors: dict[str, torch.Tensor]):
        """One layer's tiny attention (artifact layout, K heads of width E) in bank layout."""
        k, _, e = tensors["qkv.weight"].shape
        if e > self.max_dim or k > self.max_heads:
            raise ValueError(f"tiny attention E={e}, heads={k} exceeds the bank's maximum")
        em = self.max_dim
        # q, k and v sit at offsets 0, E_max and 2 E_max so a forward can split at E_max
        qkv_w = tensors["qkv.weight"].transpose(1, 2)  # [K, E, 3E]
        qkv_b = tensors["qkv.bias"]
        scale = torch.ones(3 * e, dtype=qkv_w.dtype, device=qkv_w.device)
        scale[:e] = 1.0 / math.sqrt(e)
        qkv_w, qkv_b = qkv_w * scale, qkv_b * scale
        zeros_w = qkv_w.new_zeros(k, e, em - e)
        zeros_b = qkv_b.new_zeros(k, em - e)
        parts_w, parts_b = [], []
        for part in range(3):
            parts_w += [qkv_w[:, :, part * e : (part + 1) * e], zeros_w]
            parts_b += [qkv_b[:, part * e : (part + 1) * e], zeros_b]
        out = {
            "ln_w": tensors["ln.weight"],
            "ln_b": tensors["ln.bias"],
            "in_w": tensors["in.weight"].t(),
            "in_b": tensors["in.bias"],
            "qkv_w": torch.cat(parts_w, dim=-1),
            "qkv_b": torch.cat(parts_b, dim=-1),
            "o_w": tensors["o.weight"].transpose(1, 2) / k,
            "o_b": tensors["o.bias"].mean(0),
            "out_w": tensors["out.weight"].t(),
            "out_b": tensors["out.bias"],
        }
        return out, {}

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

    _meta = ("q", "act")

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

    def layout(self, *, rule, down_f, up_f, down_b, up_b, activation: str, scale):
        """Factors (rule [n,n,n], down B_i [n, in/n, r/n], up B_i [n, r/n, out/n]) and biases."""
        n, _, q = down_f.shape
        if n != self.n or q > self.qmax:
            raise ValueError(f"factored PHM bank holds n={self.n}, width <= {self.qmax * self.n}")
        tensors = {
            "rule": rule,
            "down_f": down_f,
            "up_f": up_f,
            "down_b": down_b.view(n, q),
            "up_b": up_b,
            "scale": torch.as_tensor(scale, dtype=rule.dtype).reshape(()),
        }
        return tensors, {"q": q, "act": ACTIVATION_CODES[activation]}

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

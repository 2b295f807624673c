"""Banks that act around attention: multi-head parallel adapters and tiny-attention adapters."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from adapters.banks import ACTIVATION_CODES, _Bank, activate, activate_rows
from adapters.router import Router

__all__ = ["FactoredPHMBank", "MHParallelBank", "TinyAttentionBank", "TinyCache"]


class MHParallelBank(_Bank):
    """A parallel bottleneck per attention head (He et al.), added to the heads' outputs before O.

    Head h reads the attention input x: `o_h + s * up_h(f(down_h(x)))`. The per-head width r is
    the pooled (rank) dimension: down rows are [H, heads], up rows [heads, d], so widths pad per
    head with the zero row.
    """

    _meta = ("rank", "act")

    def __init__(
        self,
        *,
        hidden: int,
        heads: int,
        head_dim: int,
        max_dim: int | None = None,
        slots: int,
        router: Router,
        **fac,
    ):
        super().__init__(slots=slots, router=router)
        self.heads, self.head_dim, self.max_dim = heads, head_dim, max_dim
        self.pool = self._pool(
            ranked=True,
            buffers={
                "down": ((hidden, heads), 0.0),
                "down_b": ((heads,), 0.0),
                "up": ((heads, head_dim), 0.0),
            },
            **fac,
        )
        self.pool_one = self._pool(
            ranked=False, buffers={"up_b": ((heads * head_dim,), 0.0), "scale": ((), 0.0)}, **fac
        )
        self.rank = np.zeros(slots, dtype=np.int64)
        self.act = np.zeros(slots, dtype=np.int64)

    def layout(self, *, down_w, down_b, up_w, up_b, activation: str, scale):
        """Weights (down: [heads*r, H] head-major, up: [heads, d, r]) -> rank-major rows."""
        r = down_w.shape[0] // self.heads
        if self.max_dim is not None and r > self.max_dim:
            raise ValueError(f"per-head bottleneck {r} exceeds the bank's maximum {self.max_dim}")
        tensors = {
            "down": down_w.t().reshape(-1, self.heads, r).permute(2, 0, 1),  # [r, H, heads]
            "down_b": down_b.view(self.heads, r).t(),  # [r, heads]
            "up": up_w.permute(2, 0, 1),  # [r, heads, d]
            "up_b": up_b,
            "scale": torch.as_tensor(scale, dtype=down_w.dtype).reshape(()),
        }
        return tensors, {"rank": r, "act": ACTIVATION_CODES[activation]}

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row head-output update [B, T, heads*d] for attention input x [B, T, H]."""
        rt = self.router
        pool, one = self.pool, self.pool_one
        b, t, h = x.shape
        single = rt.single
        if single is not None:
            r = int(self.rank[single])
            down = pool.span("down", single).permute(1, 2, 0).reshape(h, -1)
            z = x @ down + pool.span("down_b", single).t().reshape(-1)
            z = activate(z, int(self.act[single])).view(b, t, self.heads, r)
            y = torch.einsum("btnr,rnd->btnd", z, pool.span("up", single)).reshape(b, t, -1)
            return (y + one.span("up_b", single)) * one.span("scale", single)
        s_np = rt.slots_np
        r = int(self.rank[s_np].max())
        ix, i1 = pool.index(s_np, r), one.index(s_np)
        down = pool.take("down", ix, b, r).permute(0, 2, 3, 1).reshape(b, h, -1)
        down_b = pool.take("down_b", ix, b, r).transpose(1, 2).reshape(b, 1, -1)
        z = torch.baddbmm(down_b, x, down)
        z = activate_rows(z, self.act, rt).view(b, t, self.heads, r)
        y = torch.einsum("btnr,brnd->btnd", z, pool.take("up", ix, b, r)).reshape(b, t, -1)
        return (y + one.take("up_b", i1, b).unsqueeze(1)) * one.take("scale", i1, b).view(-1, 1, 1)


def _fit(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`x` zero-padded or cut along `dim` to `size`: the pool's widths may change between decoding steps."""
    n = x.shape[dim]
    if n > size:
        return x.narrow(dim, 0, size)
    if n < size:
        return F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, size - n])
    return x


def _left(x: torch.Tensor, width: int) -> torch.Tensor:
    """Keys or values `[B, K, T, E]` padded on the left to `width` columns (the newest stay last)."""
    t = x.shape[2]
    return F.pad(x, (0, 0, width - t, 0)) if t < width else x[:, :, t - width :]


def _rows(pair, n: int, shape: tuple[int, int, int], *, like: torch.Tensor):
    """Keys and values of `n` rows fitted to (K, W, E); zeros for rows whose forward never ran the bank."""
    heads, width, dim = shape
    if pair is None:
        z = like.new_zeros(n, heads, width, dim)
        return z, z
    return tuple(_left(_fit(_fit(x, 1, heads), 3, dim), width) for x in pair)


class TinyCache:
    """Tiny attention's keys and values in a decoder's layers, for the rows of one decoding batch.

    Columns follow the batch's self-attention mask, right-aligned with it: the newest token is the
    last column. A layer whose bank did not run in some step (no row used it) lacks those columns;
    they are padded on the left when needed, and they belong only to rows that never use that layer's
    adapter, whose entries nothing reads (a row's adapter is served at every step the row is in).
    """

    def __init__(self) -> None:
        self.layers: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mask: torch.Tensor | None = None
        """[B, W] self-attention mask of the forward in progress: history and new tokens (1: real)."""

    def extend(self, bank, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank's keys and values with this forward's new columns appended: `[B, K, W, E]` each."""
        old = self.layers.get(bank)
        if old is not None:
            ck, cv = (_fit(_fit(x, 1, k.shape[1]), 3, k.shape[3]) for x in old)
            k, v = torch.cat([ck, k], 2), torch.cat([cv, v], 2)
        w = self.mask.shape[1]
        k, v = _left(k, w), _left(v, w)
        self.layers[bank] = (k, v)
        return k, v

    def join(self, other: TinyCache, *, rows: int, other_rows: int, width: int) -> None:
        """Append `other`'s rows (newly prefilled) below these, both padded on the left to `width`."""
        for bank in self.layers.keys() | other.layers.keys():
            mine, theirs = self.layers.get(bank), other.layers.get(bank)
            present = [p[0] for p in (mine, theirs) if p is not None]
            shape = (max(x.shape[1] for x in present), width, max(x.shape[3] for x in present))
            a = _rows(mine, rows, shape, like=present[0])
            b = _rows(theirs, other_rows, shape, like=present[0])
            self.layers[bank] = (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))

    def select(self, idx: torch.Tensor, *, columns: int) -> None:
        """Keep the rows `idx` and the last `columns` columns (the batch trimmed what no row needs)."""
        for bank, (k, v) in self.layers.items():
            self.layers[bank] = (
                _left(k.index_select(0, idx), columns),
                _left(v.index_select(0, idx), columns),
            )


class TinyAttentionBank(_Bank):
    """Tiny-attention adapters at the attention output: `a + out(MHA_E(in(LN(a))))`.

    Each of K heads has width E; head outputs are averaged. The averaging (1/K) is folded into
    the heads' output weights and the 1/sqrt(E) score scale into the query weights at load, so
    rows with different E or K share the bank exactly through zero padding. One pooled row per
    slot, as wide as the widest adapter loaded (E and K are a few units).
    """

    def __init__(
        self,
        *,
        hidden: int,
        max_dim: int | None = None,
        max_heads: int | None = None,
        slots: int,
        router: Router,
        causal: bool = False,
        masked: bool = True,
        **fac,
    ):
        super().__init__(slots=slots, router=router)
        self.max_dim, self.max_heads = max_dim, max_heads
        # decoder layers: a token attends to itself and the tokens before it; `masked` says whether
        # the router's mask is this stack's (not in a seq2seq decoder, where it is the encoder's)
        self.causal, self.masked = causal, masked
        z = 0.0
        self.pool = self._pool(
            ranked=False,
            buffers={
                "ln_w": ((hidden,), z),
                "ln_b": ((hidden,), z),
                "in_w": ((hidden, 0), z),
                "in_b": ((0,), z),
                "qkv_w": ((0, 0, 3, 0), z),
                "qkv_b": ((0, 3, 0), z),
                "o_w": ((0, 0, 0), z),
                "o_b": ((0,), z),
                "out_w": ((0, hidden), z),
                "out_b": ((hidden,), z),
            },
            **fac,
        )

    def layout(self, *, tensors: dict[str, torch.Tensor]):
        """One layer's tiny attention (artifact layout, K heads of width E) in bank layout."""
        k, _, e = tensors["qkv.weight"].shape
        if (self.max_dim is not None and e > self.max_dim) or (
            self.max_heads is not None and k > self.max_heads
        ):
            raise ValueError(f"tiny attention E={e}, heads={k} exceeds the bank's maximum")
        # [K, 3E, E] (outputs, inputs) -> [K, E_in, 3, E_out]: q, k and v stay apart when E is padded
        qkv_w = tensors["qkv.weight"].transpose(1, 2).reshape(k, e, 3, e)
        qkv_b = tensors["qkv.bias"].reshape(k, 3, e)
        scale = torch.ones(3, 1, dtype=qkv_w.dtype, device=qkv_w.device)
        scale[0] = 1.0 / math.sqrt(e)
        out = {
            "ln_w": tensors["ln.weight"],
            "ln_b": tensors["ln.bias"],
            "in_w": tensors["in.weight"].t(),
            "in_b": tensors["in.bias"],
            "qkv_w": qkv_w * scale,
            "qkv_b": qkv_b * scale,
            "o_w": tensors["o.weight"].transpose(1, 2) / k,
            "o_b": tensors["o.bias"].mean(0),
            "out_w": tensors["out.weight"].t(),
            "out_b": tensors["out.bias"],
        }
        return out, {}

    def delta(self, a: torch.Tensor) -> torch.Tensor:
        """Per-row tiny-attention output [B, T, H] for attention outputs a [B, T, H]."""
        rt = self.router
        pool = self.pool
        b, t = a.shape[:2]
        ix = pool.index(rt.slots_np)

        def g(name: str) -> torch.Tensor:
            return pool.take(name, ix, b)

        u = F.layer_norm(a, a.shape[-1:]) * g("ln_w").unsqueeze(1) + g("ln_b").unsqueeze(1)
        u = torch.baddbmm(g("in_b").unsqueeze(1), u, g("in_w"))  # [B, T, E]
        qkv = torch.einsum("bte,bkegf->bkgtf", u, g("qkv_w")) + g("qkv_b").unsqueeze(3)
        q, k, v = qkv.unbind(2)  # [B, K, T, E]
        if self.causal:
            ctx = self._causal(q, k, v)
        else:
            mask = rt.attention_mask
            attn_mask = None if mask is None else mask[:, None, None, :t].to(torch.bool)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
        o = torch.einsum("bkte,bkef->btf", ctx, g("o_w")) + g("o_b").unsqueeze(1)
        return torch.baddbmm(g("out_b").unsqueeze(1), o, g("out_w"))

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal tiny attention of the t new tokens over the row's tokens so far (cached while decoding)."""
        rt = self.router
        t = q.shape[2]
        cache = rt.decode
        if cache is not None:
            mask = cache.mask
            k, v = cache.extend(self, k, v)
        else:
            mask = rt.attention_mask if self.masked else None
            if mask is not None and mask.shape[1] > t:
                # the keys of earlier tokens would be in a cache this forward was not given
                raise RuntimeError("tiny attention in a decoder decodes step by step only with its own cache")
            if mask is not None and mask.shape[1] < t:
                # generation without a cache appends tokens the prompt's mask has no column for
                mask = F.pad(mask, (0, t - mask.shape[1]), value=1)
        w = k.shape[2]
        cols = torch.arange(w, device=q.device)
        new = cols[w - t :, None]
        allowed = cols[None, :] <= new  # [t, W]
        if mask is not None:
            # a padding query keeps its own key, so no row of the softmax is empty
            allowed = (allowed & mask[:, None, None, :].to(torch.bool)) | (cols[None, :] == new)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0)


class FactoredPHMBank(_Bank):
    """Compacter/PHM adapters kept as factors and expanded per batch, for the slots in use only.

    Holds the shared rule A [n, n, n] and the per-layer B_i of down and up; a forward expands
    `sum_i A_i ⊗ B_i` for the batch's distinct slots. Narrower adapters pad q = r/n up to the
    widest loaded inside each Kronecker block, which keeps the expansion exact.
    """

    _meta = ("q", "act")

    def __init__(self, *, hidden: int, n: int, max_dim: int | None = None, slots: int, router: Router, **fac):
        super().__init__(slots=slots, router=router)
        if hidden % n or (max_dim is not None and max_dim % n):
            raise ValueError(f"phm dimension {n} must divide hidden {hidden} and max width {max_dim}")
        self.n, self.p = n, hidden // n
        self.qmax = None if max_dim is None else max_dim // n
        self.pool = self._pool(
            ranked=False,
            buffers={
                "rule": ((n, n, n), 0.0),
                "down_f": ((n, self.p, 0), 0.0),
                "up_f": ((n, 0, self.p), 0.0),
                "down_b": ((n, 0), 0.0),
                "up_b": ((hidden,), 0.0),
                "scale": ((), 0.0),
            },
            **fac,
        )
        self.q = np.zeros(slots, dtype=np.int64)
        self.act = np.zeros(slots, dtype=np.int64)

    def layout(self, *, rule, down_f, up_f, down_b, up_b, activation: str, scale):
        """Factors (rule [n,n,n], down B_i [n, in/n, r/n], up B_i [n, r/n, out/n]) and biases."""
        n, _, q = down_f.shape
        if n != self.n or (self.qmax is not None and q > self.qmax):
            raise ValueError(
                f"factored PHM bank holds n={self.n}, width <= {self.qmax and self.qmax * self.n}"
            )
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
        pool = self.pool
        uniq = rt.unique
        q = int(self.q[uniq].max())
        n, p = self.n, self.p
        iu = pool.index(uniq)
        nu = len(uniq)
        rule = pool.take("rule", iu, nu)
        down_f = pool.take("down_f", iu, nu)[..., :q]
        up_f = pool.take("up_f", iu, nu)[:, :, :q]
        down = torch.einsum("uiac,uibd->uabcd", rule, down_f).reshape(nu, n * p, n * q)
        up = torch.einsum("uiac,uibd->uabcd", rule, up_f).reshape(nu, n * q, n * p)
        inv = torch.as_tensor(np.searchsorted(uniq, rt.slots_np), device=x.device)
        b = len(rt.slots_np)
        ix = pool.index(rt.slots_np)
        z = torch.baddbmm(pool.take("down_b", ix, b)[:, :, :q].reshape(b, 1, -1), x, down[inv])
        z = activate_rows(z, self.act, rt)
        y = torch.baddbmm(pool.take("up_b", ix, b).unsqueeze(1), z, up[inv])
        return y * pool.take("scale", ix, b).view(-1, 1, 1)

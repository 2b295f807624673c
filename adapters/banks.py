"""Device-resident slot banks and the banked modules that route each row to its slot.

Every bank preallocates `[S, ...]` tensors once. Loading an adapter copies its weights into a
slot (`load`), evicting zeroes it (`evict`); neither reallocates nor touches the module tree.
Slot 0 is never loaded, so it is the identity. Mixed ranks share a bank by zero padding, and a
forward only computes up to the largest rank used by the rows at hand.
"""

from __future__ import annotations

import math
import threading
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters.pools import Pool
from adapters.router import Router

__all__ = [
    "ACTIVATION_CODES",
    "BankedLinear",
    "BankedNorm",
    "BottleneckBank",
    "IA3Bank",
    "LoRABank",
    "SublayerBanks",
    "activate",
]

ACTIVATION_CODES = {"identity": 0, "relu": 1, "gelu": 2, "gelu_new": 3, "swish": 4, "silu": 4, "tanh": 5}


def activate(x: torch.Tensor, code: int) -> torch.Tensor:
    """Apply the activation with the given code."""
    if code == 0:
        return x
    if code == 1:
        return F.relu(x)
    if code == 2:
        return F.gelu(x)
    if code == 3:
        return F.gelu(x, approximate="tanh")
    if code == 4:
        return F.silu(x)
    if code == 5:
        return torch.tanh(x)
    raise ValueError(f"unknown activation code {code}")


def activate_rows(
    z: torch.Tensor, codes: np.ndarray, router: Router, *, slots_np: np.ndarray | None = None
) -> torch.Tensor:
    """Apply each row's own activation (rows' slots: `slots_np`, default the router's); one pass when they agree."""
    slots_np = router.slots_np if slots_np is None else slots_np
    used = np.unique(codes[slots_np])
    if len(used) == 1:
        return activate(z, int(used[0]))
    per_row = torch.as_tensor(codes[slots_np], device=z.device)
    out = z
    for code in used:
        mask = (per_row == int(code)).view(-1, *([1] * (z.dim() - 1)))
        out = torch.where(mask, activate(z, int(code)), out)
    return out


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """View a per-row tensor `[B, ...]` so it broadcasts over `n` extra middle dims."""
    return t.view(t.shape[0], *([1] * n), *t.shape[1:])


class _Bank(nn.Module):
    """Common slot bookkeeping: generic load/evict/bind driven by each bank's `layout`.

    A bank's device memory is one or more row pools (adapters/pools.py), sized to what is loaded:
    no slot reserves room for the largest adapter. `layout(**kwargs)` turns an adapter's tensors
    into this bank's rows (by buffer name; unpadded, differentiable) plus host-side metadata.
    `load` copies them into the slot's rows; `bind` makes slot 1 read the tensors themselves, so
    gradients flow (training).
    """

    # host-side per-slot metadata arrays, reset to 0 on evict
    _meta: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, slots: int, router: Router) -> None:
        super().__init__()
        self.num_slots = slots
        self.router = router
        self.occupied = np.zeros(slots, dtype=bool)
        self._pools: list[Pool] = []
        self._pool_of: dict[str, Pool] = {}

    def _pool(
        self, *, ranked: bool, buffers: dict[str, tuple[tuple[int, ...], float | torch.Tensor]], **factory
    ) -> Pool:
        pool = Pool(self, buffers=buffers, slots=self.num_slots, ranked=ranked, **factory)
        self._pools.append(pool)
        self._pool_of |= dict.fromkeys(buffers, pool)
        return pool

    def active(self) -> bool:
        """Whether any row of the current batch uses this bank."""
        return self.router.slots is not None and self.router.any_in(self.occupied)

    def _users(self) -> tuple[torch.Tensor | None, torch.Tensor, np.ndarray]:
        """The rows that use this bank: (their indices or None for all rows, their slots on device and host).

        In a batch that mixes methods, a bank then computes only its own rows instead of every row
        with zero weights for the others.
        """
        rt = self.router
        used = self.occupied[rt.slots_np]
        if used.all():
            return None, rt.slots, rt.slots_np
        rows = np.flatnonzero(used)
        idx = torch.as_tensor(rows, device=rt.slots.device)
        return idx, rt.slots.index_select(0, idx), rt.slots_np[rows]

    def _check_slot(self, slot: int) -> None:
        if not 0 < slot < self.num_slots:
            raise IndexError(f"slot {slot} is outside 1..{self.num_slots - 1}")

    def layout(self, **kwargs) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Per-slot tensors (by buffer name) and metadata for one adapter."""
        raise NotImplementedError

    def _by_pool(self, tensors: dict[str, torch.Tensor]) -> dict[int, tuple[Pool, dict[str, torch.Tensor]]]:
        out: dict[int, tuple[Pool, dict[str, torch.Tensor]]] = {}
        for name, v in tensors.items():
            pool = self._pool_of[name]
            out.setdefault(id(pool), (pool, {}))[1][name] = v
        return out

    def fits(self, name: str, value: torch.Tensor) -> bool:
        """Whether one slot's value of buffer `name` (from `layout`) can be written into its pool."""
        return self._pool_of[name].fits(name, value)

    def slot_bytes(self, slot: int) -> int:
        """Device bytes the slot's rows take in this bank."""
        return sum(p.slot_bytes(slot) for p in self._pools)

    def layout_bytes(self, **kwargs) -> int:
        """Device bytes an adapter would take in this bank (its rows, at the pools' row widths)."""
        tensors, _ = self.layout(**kwargs)
        total = 0
        for pool, values in self._by_pool(tensors).values():
            n = next(iter(values.values()))
            total += (n.shape[0] if pool.ranked else 1) * pool.row_bytes()
        return total

    def allocated_bytes(self) -> int:
        """Device bytes of every pool of this bank (free and dead rows included)."""
        return sum(p.allocated_bytes() for p in self._pools)

    @torch.no_grad()
    def load(self, slot: int, **kwargs) -> None:
        """Copy one adapter into rows of this bank's pools, sized to the adapter."""
        self._check_slot(slot)
        tensors, meta = self.layout(**kwargs)
        self._clear(slot)
        for pool, values in self._by_pool(tensors).values():
            pool.write(slot, values)
        for name, v in meta.items():
            getattr(self, name)[slot] = v
        self.occupied[slot] = True

    @torch.no_grad()
    def evict(self, slot: int) -> None:
        """Return a slot to its empty state (its rows become free)."""
        self._clear(slot)

    def _clear(self, slot: int) -> None:
        for pool in self._pools:
            pool.free(slot)
        for name in self._meta:
            getattr(self, name)[slot] = 0
        self.occupied[slot] = False

    def bind(self, **kwargs) -> None:
        """Make slot 1 of a two-slot bank compute with these (trainable) tensors directly."""
        if self.num_slots != 2:
            raise ValueError("bind needs a bank with exactly two slots (identity + the trained adapter)")
        tensors, meta = self.layout(**kwargs)
        for pool, values in self._by_pool(tensors).values():
            pool.bind(1, values)
        for name, v in meta.items():
            getattr(self, name)[1] = v
        self.occupied[1] = True


class LoRABank(_Bank):
    """LoRA factors for one linear: `delta = (x Aᵀ) B`, B pre-multiplied by the scaling.

    Both factors are pooled rank-major (`A [rows, in]`, `B [rows, out]`): a slot of rank r owns r
    contiguous rows, so one slot's factors are views and a mixed batch gathers every row's
    factors with one `index_select` (padding positions read the zero row 0).
    """

    _meta = ("rank",)

    def __init__(
        self, *, d_in: int, d_out: int, max_rank: int | None = None, slots: int, router: Router, **factory
    ) -> None:
        super().__init__(slots=slots, router=router)
        self.max_rank = max_rank
        self.pool = self._pool(ranked=True, buffers={"A": ((d_in,), 0.0), "B": ((d_out,), 0.0)}, **factory)
        self.rank = np.zeros(slots, dtype=np.int64)

    def layout(self, *, A: torch.Tensor, B: torch.Tensor, scaling: float):
        """PEFT-layout factors (A: [r, in], B: [out, r]) -> A [r, in], scaled B [r, out]."""
        r = A.shape[0]
        if self.max_rank is not None and r > self.max_rank:
            raise ValueError(f"LoRA rank {r} exceeds the bank's maximum {self.max_rank}")
        return {"A": A, "B": B.t() * scaling}, {"rank": r}

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row LoRA update for input `x` of shape [B, T, in]."""
        rt = self.router
        single = rt.single
        pool = self.pool
        if single is not None:
            return F.linear(x, pool.span("A", single)) @ pool.span("B", single)
        idx, _, s_np = self._users()
        r = int(self.rank[s_np].max())
        ix = pool.index(s_np, r)
        a = pool.take("A", ix, len(s_np), r)
        b = pool.take("B", ix, len(s_np), r)
        if idx is None:
            return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b)
        sub = torch.bmm(torch.bmm(x.index_select(0, idx), a.transpose(1, 2)), b)
        return x.new_zeros(*x.shape[:-1], sub.shape[-1]).index_copy_(0, idx, sub)


class IA3Bank(_Bank):
    """IA3 rescaling vectors for one linear, on its input and on its output (one pooled row each)."""

    _meta = ("occ_in", "occ_out")

    def __init__(self, *, d_in: int, d_out: int, slots: int, router: Router, **factory) -> None:
        super().__init__(slots=slots, router=router)
        self.pool_in = self._pool(ranked=False, buffers={"scale_in": ((d_in,), 1.0)}, **factory)
        self.pool_out = self._pool(ranked=False, buffers={"scale_out": ((d_out,), 1.0)}, **factory)
        self.occ_in = np.zeros(slots, dtype=bool)
        self.occ_out = np.zeros(slots, dtype=bool)

    def layout(self, *, vector: torch.Tensor, on_input: bool):
        """A rescaling vector for the projection's input or output."""
        if on_input:
            return {"scale_in": vector}, {"occ_in": True}
        return {"scale_out": vector}, {"occ_out": True}

    def rows(self, which: str) -> torch.Tensor | None:
        """Per-row scale vectors [B, 1, d] for 'in' or 'out', or None when no row uses them."""
        occ = self.occ_in if which == "in" else self.occ_out
        if not self.router.any_in(occ):
            return None
        pool, name = (self.pool_in, "scale_in") if which == "in" else (self.pool_out, "scale_out")
        single = self.router.single
        if single is not None:
            return pool.span(name, single)
        slots_np = self.router.slots_np
        return pool.take(name, pool.index(slots_np), len(slots_np)).unsqueeze(1)


class BottleneckBank(_Bank):
    """Bottleneck adapters `s * up(f(down(x)))`, optionally followed by a per-task LayerNorm.

    Weights are pooled width-major (`down [rows, in]`, `up [rows, out]`), for the reason given
    in LoRABank; biases, the scale and the optional norm are one pooled row per slot.
    """

    _meta = ("rank", "act", "post_ln")

    def __init__(
        self, *, d_in: int, d_out: int, max_dim: int | None = None, slots: int, router: Router, **factory
    ) -> None:
        super().__init__(slots=slots, router=router)
        self.max_dim = max_dim
        self.pool = self._pool(
            ranked=True,
            buffers={"down": ((d_in,), 0.0), "down_b": ((), 0.0), "up": ((d_out,), 0.0)},
            **factory,
        )
        self.pool_one = self._pool(
            ranked=False, buffers={"up_b": ((d_out,), 0.0), "scale": ((), 0.0)}, **factory
        )
        self.pool_ln = self._pool(
            ranked=False, buffers={"ln_w": ((d_out,), 1.0), "ln_b": ((d_out,), 0.0)}, **factory
        )
        self.rank = np.zeros(slots, dtype=np.int64)
        self.act = np.zeros(slots, dtype=np.int64)
        self.post_ln = np.zeros(slots, dtype=bool)

    def layout(
        self,
        *,
        down_w: torch.Tensor,
        down_b: torch.Tensor,
        up_w: torch.Tensor,
        up_b: torch.Tensor,
        activation: str,
        scale: float | torch.Tensor = 1.0,
        ln: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """nn.Linear-layout weights (down: [r, in], up: [out, r]) -> bank layout (down as is, up transposed)."""
        r = down_w.shape[0]
        if self.max_dim is not None and r > self.max_dim:
            raise ValueError(f"bottleneck width {r} exceeds the bank's maximum {self.max_dim}")
        if isinstance(scale, torch.Tensor):
            scale = scale.reshape(())
        else:
            scale = torch.tensor(float(scale), dtype=down_w.dtype, device=down_w.device)
        tensors = {"down": down_w, "down_b": down_b, "up": up_w.t(), "up_b": up_b, "scale": scale}
        meta = {"rank": r, "act": ACTIVATION_CODES[activation], "post_ln": ln is not None}
        if ln is not None:
            tensors |= {"ln_w": ln[0], "ln_b": ln[1]}
        return tensors, meta

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row adapter output for input `x` of shape [B, T, in]."""
        rt = self.router
        single = rt.single
        pool, one, lnp = self.pool, self.pool_one, self.pool_ln
        if single is not None:
            z = F.linear(x.reshape(-1, x.shape[-1]), pool.span("down", single), pool.span("down_b", single))
            z = activate(z, int(self.act[single]))
            y = torch.addmm(one.span("up_b", single), z, pool.span("up", single)).view(*x.shape[:-1], -1)
            if self.post_ln[single]:
                y = F.layer_norm(y, y.shape[-1:], lnp.span("ln_w", single), lnp.span("ln_b", single))
            return y * one.span("scale", single)
        idx, _, s_np = self._users()
        n = len(s_np)
        r = int(self.rank[s_np].max())
        xs = x if idx is None else x.index_select(0, idx)
        ix = pool.index(s_np, r)
        i1 = one.index(s_np)
        down = pool.take("down", ix, n, r)
        z = torch.baddbmm(pool.take("down_b", ix, n, r).unsqueeze(1), xs, down.transpose(1, 2))
        z = activate_rows(z, self.act, rt, slots_np=s_np)
        y = torch.baddbmm(one.take("up_b", i1, n).unsqueeze(1), z, pool.take("up", ix, n, r))
        if self.post_ln[s_np].any():
            il = lnp.index(s_np)
            normed = F.layer_norm(y, y.shape[-1:]) * lnp.take("ln_w", il, n).unsqueeze(1)
            normed = normed + lnp.take("ln_b", il, n).unsqueeze(1)
            flag = torch.as_tensor(self.post_ln[s_np], device=y.device).view(-1, 1, 1)
            y = torch.where(flag, normed, y)
        y = y * one.take("scale", i1, n).view(-1, 1, 1)
        if idx is None:
            return y
        return x.new_zeros(*x.shape[:-1], y.shape[-1]).index_copy_(0, idx, y)


class SublayerBanks(nn.Module):
    """The adapters that act on one sublayer's output (attention, cross-attention or FFN).

    `x_in` is the sublayer's input, stashed by the sublayer's first projection, which parallel
    adapters read. Extra banks (prefix, multi-head parallel, tiny attention) attach by name.
    """

    def __init__(self, *, router: Router) -> None:
        super().__init__()
        self.router = router
        self.seq: BottleneckBank | None = None
        self.par: BottleneckBank | None = None
        self.mhpa: nn.Module | None = None
        self.tiny: nn.Module | None = None
        self.phm: nn.Module | None = None
        # Per thread, like the router's state: forwards on several threads share these banks.
        object.__setattr__(self, "_stash", threading.local())

    @property
    def x_in(self) -> torch.Tensor | None:
        """The sublayer input this thread's forward stashed (None outside a forward)."""
        return getattr(self._stash, "x", None)

    @x_in.setter
    def x_in(self, value: torch.Tensor | None) -> None:
        self._stash.x = value

    def pre_output(self, x: torch.Tensor) -> torch.Tensor:
        """Adjust the input of the sublayer's output projection (multi-head parallel adapters)."""
        if self.mhpa is not None and self.mhpa.active():
            return x + self.mhpa.delta(self.x_in)
        return x

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """Apply every active adapter to the sublayer output `y` (before residual and norm)."""
        x_in, self.x_in = self.x_in, None
        if self.par is not None and self.par.active():
            y = y + self.par.delta(x_in)
        if self.tiny is not None and self.tiny.active():
            y = y + self.tiny.delta(y)
        if self.seq is not None and self.seq.active():
            y = y + self.seq.delta(y)
        if self.phm is not None and self.phm.active():
            y = y + self.phm.delta(y)
        return y


class BankedLinear(nn.Module):
    """A frozen projection plus its LoRA and IA3 banks, and optionally a sublayer's adapters.

    Input projections (q, qkv, ffn_in) stash their input for the sublayer's parallel adapters;
    output projections (o, ffn_out) apply the sublayer's adapters to what they produce.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        router: Router,
        lora: LoRABank | None = None,
        ia3: IA3Bank | None = None,
        stash: SublayerBanks | None = None,
        sublayer: SublayerBanks | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.router = router
        self.lora = lora
        self.ia3 = ia3
        # stash is a plain attribute: the sublayer banks are registered on the output projection.
        object.__setattr__(self, "stash", stash)
        self.sublayer = sublayer

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (some model code reads it directly)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base projection plus each row's own adapters."""
        if self.stash is not None:
            self.stash.x_in = x
        if self.router.slots is None:
            return self.base(x)
        if self.sublayer is not None:
            x = self.sublayer.pre_output(x)
        scale_in = scale_out = None
        if self.ia3 is not None and self.ia3.active():
            scale_in, scale_out = self.ia3.rows("in"), self.ia3.rows("out")
        y = self.base(x if scale_in is None else x * scale_in)
        if self.lora is not None and self.lora.active():
            y = y + self.lora.delta(x)
        if scale_out is not None:
            y = y * scale_out
        if self.sublayer is not None:
            y = self.sublayer.apply(y)
        return y


class BankedNorm(_Bank):
    """A LayerNorm (or T5 RMSNorm) whose affine parameters can be overridden per task.

    On post-LN backbones it may also hold the sequential adapters placed after the norm
    (`post`): with z = y + x, it returns `LN(z + a(LN(z)))` instead of `LN(z)`.
    """

    def __init__(
        self, base: nn.Module, *, slots: int, router: Router, post: BottleneckBank | None = None
    ) -> None:
        super().__init__(slots=slots, router=router)
        self.base = base
        self.post = post
        self.rms = not isinstance(base, nn.LayerNorm)
        self.eps = float(getattr(base, "eps", getattr(base, "variance_epsilon", 1e-6)))
        w = base.weight.detach()
        fac = {"device": w.device, "dtype": w.dtype}
        # an empty slot (row 0) holds the base norm's own parameters
        buffers = {"w": (tuple(w.shape), w)}
        b = getattr(base, "bias", None)
        self.has_bias = b is not None
        if b is not None:
            buffers["b"] = (tuple(b.shape), b.detach())
        self.pool = self._pool(ranked=False, buffers=buffers, **fac)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight."""
        return self.base.weight

    def layout(self, *, weight: torch.Tensor, bias: torch.Tensor | None):
        """A task's norm parameters."""
        tensors = {"w": weight}
        if self.has_bias and bias is not None:
            tensors["b"] = bias
        return tensors, {}

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            return F.layer_norm(x, x.shape[-1:], eps=self.eps)
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(var + self.eps)).to(self.base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The norm; rows with an adapter placed after it get `LN(x + a(LN(x)))`."""
        y = self._norm(x)
        if self.post is not None and self.post.active():
            # rows without such an adapter get a zero delta, so their output is unchanged
            y = self._norm(x + self.post.delta(y))
        return y

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """Base norm, or each row's own affine parameters when any row overrides them."""
        if not self.active():
            return self.base(x)
        n = self._normalize(x)
        slots_np = self.router.slots_np
        ix = self.pool.index(slots_np)
        extra = x.dim() - 2
        y = n * _rows(self.pool.take("w", ix, len(slots_np)), extra)
        if self.has_bias:
            y = y + _rows(self.pool.take("b", ix, len(slots_np)), extra)
        return y


def lora_scaling(*, alpha: float, r: int, rslora: bool) -> float:
    """LoRA's output scaling: alpha/r, or alpha/sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r

"""Slot banks against hand-written plain-torch references: bind for training, RMS norm overrides,
mixed rows of bottleneck adapters (each row its own width, activation and post-LayerNorm)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapters.banks import BankedNorm, BottleneckBank, LoRABank
from adapters.router import Router

D = 6


def test_bind_routes_slot_one_to_a_trainable_adapter_and_keeps_its_gradient() -> None:
    router = Router()
    bank = LoRABank(d_in=4, d_out=3, max_rank=4, slots=2, router=router)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 4, generator=g, requires_grad=True)
    B = torch.randn(3, 2, generator=g, requires_grad=True)
    bank.bind(A=A, B=B, scaling=0.5)
    # the zero row 0, then the adapter's own two rows: nothing is padded to the rank limit
    assert bank.A.shape == (3, 4) and bank.B.shape == (3, 3)
    torch.testing.assert_close(bank.pool.span("A", 1), A.detach(), rtol=0, atol=0)
    torch.testing.assert_close(bank.pool.span("B", 1), B.detach().t() * 0.5, rtol=0, atol=0)
    assert not bank.A[0].any() and not bank.B[0].any()
    assert int(bank.rank[1]) == 2 and bool(bank.occupied[1])
    x = torch.randn(1, 5, 4, generator=g)
    with router.route(torch.tensor([1])):
        out = bank.delta(x)
    ref = (x @ A.t()) @ (B.t() * 0.5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    out.sum().backward()
    assert A.grad is not None and B.grad is not None and A.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="exactly two slots"):
        LoRABank(d_in=4, d_out=3, max_rank=4, slots=3, router=router).bind(A=A, B=B, scaling=1.0)


class RMSNorm(nn.Module):
    """T5's norm, written out: no mean subtraction, no bias."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_rms_norm_override_equals_the_reference_per_row_and_free_slots_keep_the_base() -> None:
    router = Router()
    base = RMSNorm(D, eps=1e-3)
    bank = BankedNorm(base, slots=3, router=router)
    assert bank.rms and bank.eps == 1e-3 and not bank.has_bias
    w = torch.linspace(2.0, -1.0, D)
    bank.load(1, weight=w, bias=torch.ones(D))  # an RMS norm has no bias: it is ignored
    x = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad(), router.route(torch.tensor([1, 0, 1])):
        out = bank(x)
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3)
    torch.testing.assert_close(out[0], (w * rms)[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[2], (w * rms)[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], base(x)[1].detach(), rtol=0, atol=1e-6)
    bank.evict(1)
    torch.testing.assert_close(bank.pool.span("w", 1), base.weight.detach(), rtol=0, atol=0)
    bank.load(2, weight=w, bias=None)  # slot 2 keeps a norm override, so the bank stays active
    with torch.no_grad(), router.route(torch.tensor([1, 2, 1])):
        out = bank(x)
    torch.testing.assert_close(out[0], base(x)[0].detach(), rtol=0, atol=1e-6)


def test_layernorm_override_takes_the_bias_and_eviction_restores_the_base() -> None:
    router = Router()
    base = nn.LayerNorm(D, eps=1e-5)
    with torch.no_grad():
        base.weight.copy_(torch.linspace(0.5, 1.5, D))
        base.bias.copy_(torch.linspace(-0.2, 0.2, D))
    bank = BankedNorm(base, slots=2, router=router)
    w, b = torch.linspace(2.0, -1.0, D), torch.linspace(1.0, 2.0, D)
    bank.load(1, weight=w, bias=b)
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), router.route(torch.tensor([1, 0])):
        out = bank(x)
    torch.testing.assert_close(out[0], F.layer_norm(x[0], (D,), w, b, 1e-5), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], base(x[1]).detach(), rtol=0, atol=1e-6)
    bank.evict(1)
    torch.testing.assert_close(bank.pool.span("b", 1), base.bias.detach(), rtol=0, atol=0)


def _bottleneck(width: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "down_w": torch.randn(width, D, generator=g),
        "down_b": torch.randn(width, generator=g),
        "up_w": torch.randn(D, width, generator=g),
        "up_b": torch.randn(D, generator=g),
    }


def _reference(x: torch.Tensor, w: dict[str, torch.Tensor], act, scale: float, ln=None) -> torch.Tensor:
    y = act(x @ w["down_w"].t() + w["down_b"]) @ w["up_w"].t() + w["up_b"]
    if ln is not None:
        y = F.layer_norm(y, (D,), ln[0], ln[1])
    return y * scale


def test_mixed_bottleneck_rows_each_get_their_own_width_activation_and_post_norm() -> None:
    router = Router()
    bank = BottleneckBank(d_in=D, d_out=D, max_dim=5, slots=4, router=router)
    w1, w2 = _bottleneck(3, seed=3), _bottleneck(5, seed=4)
    ln = (torch.linspace(0.5, 2.0, D), torch.linspace(-1.0, 1.0, D))
    bank.load(1, **w1, activation="relu", scale=0.5)
    bank.load(2, **w2, activation="tanh", scale=2.0, ln=ln)
    x = torch.randn(4, 3, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), router.route(torch.tensor([1, 2, 0, 1])):
        out = bank.delta(x)
    torch.testing.assert_close(out[0], _reference(x[0], w1, F.relu, 0.5), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], _reference(x[1], w2, torch.tanh, 2.0, ln), rtol=0, atol=1e-5)
    assert not out[2].any()  # slot 0: the identity, no delta
    torch.testing.assert_close(out[3], _reference(x[3], w1, F.relu, 0.5), rtol=0, atol=1e-5)
    # one slot for every row takes the single-slot path: the same numbers
    with torch.no_grad(), router.route(torch.tensor([2, 2])):
        single = bank.delta(x[:2])
    torch.testing.assert_close(single[0], _reference(x[0], w2, torch.tanh, 2.0, ln), rtol=0, atol=1e-5)
    # reloading slot 2 without a norm and narrower leaves nothing of the old adapter behind
    w3 = _bottleneck(2, seed=6)
    bank.load(2, **w3, activation="identity", scale=1.0)
    with torch.no_grad(), router.route(torch.tensor([2, 1])):
        again = bank.delta(x[:2])
    torch.testing.assert_close(again[0], _reference(x[0], w3, lambda z: z, 1.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(again[1], _reference(x[1], w1, F.relu, 0.5), rtol=0, atol=1e-5)


def test_a_bottleneck_without_a_scale_is_unscaled_and_gelu_new_is_the_tanh_approximation() -> None:
    router = Router()
    bank = BottleneckBank(d_in=D, d_out=D, max_dim=4, slots=2, router=router)
    w = _bottleneck(4, seed=8)
    bank.load(1, **w, activation="gelu_new")  # no scale given: 1
    x = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(9)) * 4
    with torch.no_grad(), router.route(torch.tensor([1])):
        out = bank.delta(x)

    def gelu_tanh(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z**3)))

    torch.testing.assert_close(out[0], _reference(x[0], w, gelu_tanh, 1.0), rtol=0, atol=1e-5)

"""Each method equals its paper's formula, computed independently of the banks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from adapters.attention import PrefixBank, _attention
from adapters.attn_banks import MHParallelBank, TinyAttentionBank
from adapters.backbone import Backbone
from adapters.methods.compacter import kron_sum
from adapters.methods.tiny_attention import average_heads
from adapters.model import BankConfig, MultiTaskModel
from adapters.router import Router
from store.artifact import expected_tensors, parse_config

HIDDEN, HEADS, LAYERS = 32, 4, 2


def _tiny_bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=64,
        vocab_size=100,
        attn_implementation="sdpa",
    )
    return BertModel(cfg).eval()


@pytest.fixture(scope="module")
def model() -> MultiTaskModel:
    return MultiTaskModel(
        Backbone.from_model(_tiny_bert()), banks=BankConfig(slots=8, compacter_factored=True)
    )


def _random(cfg, spec, *, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in expected_tensors(cfg, spec).items()}


def _cfg(spec, **kw):
    return parse_config({**kw, "backbone_fingerprint": spec.fingerprint})


def _batch(n: int = 3, t: int = 9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


def test_kron_sum_equals_explicit_kronecker_products():
    g = torch.Generator().manual_seed(0)
    rule, b = torch.randn(4, 4, 4, generator=g), torch.randn(4, 8, 2, generator=g)
    explicit = sum(torch.kron(rule[i], b[i]) for i in range(4))
    torch.testing.assert_close(kron_sum(rule, b), explicit, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["compacter", "compacter++", "phm"])
def test_compacter_equals_dense_bottleneck_built_from_the_formula(model, variant):
    spec = model.spec
    cfg = _cfg(spec, method="compacter", variant=variant, bottleneck_dim=8, phm_dim=4, activation="gelu")
    t = _random(cfg, spec, seed=3)
    dense_cfg = _cfg(spec, method="bottleneck", sites=cfg.sites, bottleneck_dim=8, activation="gelu")
    dense = {}
    rule = t["phm_rule"]
    for name in expected_tensors(dense_cfg, spec):
        prefix, part, kind = name.rsplit(".", 2)
        if kind == "bias":
            dense[name] = t[f"{prefix}.{part}.bias"]
            continue
        base = f"{prefix}.{part}"
        b = t[f"{base}.W"] if variant == "phm" else t[f"{base}.s"] @ t[f"{base}.t"]
        w = sum(torch.kron(rule[i], b[i]) for i in range(4))  # [in, out]: y = x W + b
        dense[name] = w.t()
    ids, mask = _batch()
    model.load(1, cfg, t)
    model.load(2, dense_cfg, dense)
    ours = model.hidden(ids, mask, [1, 1, 1])
    ref = model.hidden(ids, mask, [2, 2, 2])
    assert (ours - ref).abs().max() <= 1e-5
    assert (ours - model.hidden(ids, mask, [0, 0, 0])).abs().max() > 1e-3


def test_factored_compacter_equals_materialized():
    backbone = Backbone.from_model(_tiny_bert())
    dense = MultiTaskModel(backbone, banks=BankConfig(slots=6))
    factored_bb = Backbone.from_model(_tiny_bert())
    factored = MultiTaskModel(factored_bb, banks=BankConfig(slots=6, compacter_factored=True))
    spec = backbone.spec
    cfgs = [
        _cfg(spec, method="compacter", bottleneck_dim=8, phm_dim=4),
        _cfg(spec, method="compacter", variant="phm", bottleneck_dim=16, phm_dim=4, activation="relu"),
        _cfg(spec, method="lora", r=4),
    ]
    for slot, cfg in enumerate(cfgs, start=1):
        t = _random(cfg, spec, seed=slot)
        dense.load(slot, cfg, t)
        factored.load(slot, cfg, t)
    assert factored.banks[("encoder.0.ffn", "phm")].occupied[1]
    assert not factored.banks[("encoder.0.ffn", "seq")].occupied[1]
    ids, mask = _batch(n=4)
    slots = [1, 2, 3, 0]
    assert (dense.hidden(ids, mask, slots) - factored.hidden(ids, mask, slots)).abs().max() <= 1e-5


class _Attn(nn.Module):
    is_causal = False


def test_prefix_equals_gated_form():
    """Attention over [P; K] equals (1 - λ) Attn(q, K, V) + λ Attn(q, Pk, Pv) (He et al., eq. 7)."""
    router = Router()
    nh, d, t, n = 2, 4, 5, 3
    bank = PrefixBank(max_len=8, inner=nh * d, num_heads=nh, slots=4, router=router)
    g = torch.Generator().manual_seed(0)
    pk, pv = torch.randn(n, nh * d, generator=g), torch.randn(n, nh * d, generator=g)
    bank.load(1, key=pk, value=pv)
    module = _Attn()
    module.adapterserve_prefix = bank
    q, k, v = (torch.randn(1, nh, t, d, generator=g) for _ in range(3))
    scaling = d**-0.5
    with router.route(torch.tensor([1])):
        out, _ = _attention(module, q, k, v, None, scaling=scaling, dropout=0.0)  # [1, t, nh, d]
    for h in range(nh):
        qh, kh, vh = q[0, h], k[0, h], v[0, h]
        ph_k, ph_v = pk.view(n, nh, d)[:, h], pv.view(n, nh, d)[:, h]
        s_x = torch.exp(qh @ kh.t() * scaling).sum(-1, keepdim=True)
        s_p = torch.exp(qh @ ph_k.t() * scaling).sum(-1, keepdim=True)
        lam = s_p / (s_p + s_x)
        attn_x = F.softmax(qh @ kh.t() * scaling, -1) @ vh
        attn_p = F.softmax(qh @ ph_k.t() * scaling, -1) @ ph_v
        gated = (1 - lam) * attn_x + lam * attn_p
        torch.testing.assert_close(out[0, :, h], gated, rtol=0, atol=1e-5)


def _tiny_layer(*, e: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "ln.weight": (HIDDEN,),
        "ln.bias": (HIDDEN,),
        "in.weight": (e, HIDDEN),
        "in.bias": (e,),
        "qkv.weight": (k, 3 * e, e),
        "qkv.bias": (k, 3 * e),
        "o.weight": (k, e, e),
        "o.bias": (k, e),
        "out.weight": (HIDDEN, e),
        "out.bias": (HIDDEN,),
    }
    return {name: torch.randn(s, generator=g) * 0.5 for name, s in shapes.items()}


def _mha_reference(a: torch.Tensor, mask: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """`out(mean_k MHA_k(in(LN(a))))` with one nn.MultiheadAttention per trained head."""
    k, _, e = w["qkv.weight"].shape
    u = F.layer_norm(a, (HIDDEN,), w["ln.weight"], w["ln.bias"]) @ w["in.weight"].t() + w["in.bias"]
    heads = []
    for i in range(k):
        mha = nn.MultiheadAttention(e, num_heads=1, batch_first=True)
        with torch.no_grad():
            mha.in_proj_weight.copy_(w["qkv.weight"][i])
            mha.in_proj_bias.copy_(w["qkv.bias"][i])
            mha.out_proj.weight.copy_(w["o.weight"][i])
            mha.out_proj.bias.copy_(w["o.bias"][i])
        heads.append(mha(u, u, u, key_padding_mask=~mask.bool(), need_weights=False)[0])
    return torch.stack(heads).mean(0) @ w["out.weight"].t() + w["out.bias"]


@pytest.mark.parametrize(("e", "k"), [(1, 1), (4, 1), (4, 3), (8, 2)])
def test_tiny_attention_equals_multihead_attention_reference(e, k):
    router = Router()
    bank = TinyAttentionBank(hidden=HIDDEN, max_dim=8, max_heads=4, slots=4, router=router)
    w1, w2 = _tiny_layer(e=e, k=k, seed=1), _tiny_layer(e=2, k=1, seed=2)
    bank.load(1, tensors=w1)
    bank.load(2, tensors=w2)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 6, HIDDEN, generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    with torch.no_grad(), router.route(torch.tensor([1, 2, 1]), attention_mask=mask):
        out = bank.delta(a)
    with torch.no_grad():
        for row, w in ((0, w1), (1, w2), (2, w1)):
            ref = _mha_reference(a[row : row + 1], mask[row : row + 1], w)
            valid = int(mask[row].sum())
            torch.testing.assert_close(out[row, :valid], ref[0, :valid], rtol=0, atol=1e-5)


def test_averaged_heads_equal_one_head_built_from_averaged_weights(model):
    spec = model.spec
    multi = _cfg(spec, method="tiny_attention", attention_dim=4, num_heads=3, deploy="average")
    t = _random(multi, spec, seed=7)
    single = _cfg(spec, method="tiny_attention", attention_dim=4, num_heads=1, deploy="multihead")
    avg = {}
    for layer in range(LAYERS):
        p = f"encoder.{layer}.attn.tiny."
        layer_t = {k[len(p) :]: v for k, v in t.items() if k.startswith(p)}
        avg |= {p + k: v for k, v in average_heads(layer_t).items()}
    assert avg["encoder.0.attn.tiny.qkv.weight"].shape[0] == 1
    torch.testing.assert_close(
        avg["encoder.0.attn.tiny.o.weight"][0], t["encoder.0.attn.tiny.o.weight"].mean(0), rtol=0, atol=0
    )
    ids, mask = _batch()
    model.load(3, multi, t)
    model.load(4, single, avg)
    assert (model.hidden(ids, mask, [3, 3, 3]) - model.hidden(ids, mask, [4, 4, 4])).abs().max() <= 1e-6


def test_multi_head_parallel_equals_per_head_formula():
    router = Router()
    hidden, nh, d, r = 16, 4, 4, 3
    bank = MHParallelBank(hidden=hidden, heads=nh, head_dim=d, max_dim=5, slots=3, router=router)
    g = torch.Generator().manual_seed(0)
    down_w, down_b = torch.randn(nh * r, hidden, generator=g), torch.randn(nh * r, generator=g)
    up_w, up_b = torch.randn(nh, d, r, generator=g), torch.randn(nh * d, generator=g)
    bank.load(1, down_w=down_w, down_b=down_b, up_w=up_w, up_b=up_b, activation="tanh", scale=2.0)
    x = torch.randn(2, 5, hidden, generator=g)
    with router.route(torch.tensor([1, 0])):
        out = bank.delta(x)
    for h in range(nh):
        z = torch.tanh(x[0] @ down_w[h * r : (h + 1) * r].t() + down_b[h * r : (h + 1) * r])
        ref = 2.0 * (z @ up_w[h].t() + up_b[h * d : (h + 1) * d])
        torch.testing.assert_close(out[0, :, h * d : (h + 1) * d], ref, rtol=0, atol=1e-5)
    assert out[1].abs().max() == 0


def test_scaled_parallel_equals_formula():
    """`h + FFN(h) + s * up(f(down(h)))` at the FFN of a one-layer BERT, computed by hand."""
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=HEADS,
            intermediate_size=64,
            vocab_size=50,
        )
    ).eval()
    layer = bert.encoder.layer[0]
    ids = torch.randint(1, 50, (1, 7))
    with torch.no_grad():
        emb = bert.embeddings(input_ids=ids)
        attn_out = layer.attention(emb)[0]
        inter = layer.intermediate(attn_out)
    mt = MultiTaskModel(Backbone.from_model(bert), banks=BankConfig(slots=3))
    cfg = _cfg(mt.spec, method="parallel", bottleneck_dim=8, scaling=4.0, activation="relu")
    t = _random(cfg, mt.spec, seed=0)
    mt.load(1, cfg, t)
    p = "encoder.0.ffn.par"
    with torch.no_grad():
        adapter = F.relu(attn_out @ t[f"{p}.down.weight"].t() + t[f"{p}.down.bias"])
        adapter = 4.0 * (adapter @ t[f"{p}.up.weight"].t() + t[f"{p}.up.bias"])
        ffn = inter @ layer.output.dense.base.weight.t() + layer.output.dense.base.bias
        ref = layer.output.LayerNorm.base(attn_out + ffn + adapter)
    ours = mt.hidden(ids, torch.ones_like(ids), [1])
    assert math.isclose(float((ours - ref).abs().max()), 0.0, abs_tol=1e-5)

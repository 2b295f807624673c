"""Hypernetwork-generated adapters equal a direct computation and serve like uploaded ones."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

from adapters.backbone import Backbone
from adapters.hypernet import Hypernetwork
from adapters.model import BankConfig, MultiTaskModel
from store.artifact import expected_tensors, hypernetwork_tensors, parse_config

R = 8


def _bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    return BertModel(cfg).eval()


def _t5():
    torch.manual_seed(0)
    cfg = T5Config(
        d_model=32, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2, d_ff=64, vocab_size=100
    )
    return T5ForConditionalGeneration(cfg).eval()


def _hyper(spec, *, variant: str, seed: int = 0):
    cfg = parse_config(
        {
            "method": "hypernetwork",
            "variant": variant,
            "backbone_fingerprint": spec.fingerprint,
            "bottleneck_dim": R,
            "task_embedding_dim": 8,
            "layer_embedding_dim": 6,
            "site_embedding_dim": 4,
            "hidden_dim": 16,
            "projected_dim": 12,
        }
    )
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in hypernetwork_tensors(cfg, spec).items():
        t = torch.randn(shape, generator=g) * 0.3
        if name.endswith("ln.weight") or "ln_gamma.bias" in name:
            t = t + 1.0
        tensors[name] = t
    return cfg, tensors, Hypernetwork.from_tensors(cfg, tensors, spec)


def _task(spec, *, seed: int, labels=("a", "b")):
    cfg = parse_config(
        {
            "method": "hyperformer",
            "hypernetwork": "shared",
            "task_embedding_dim": 8,
            "backbone_fingerprint": spec.fingerprint,
            "head": {"type": "classification", "labels": list(labels)},
        }
    )
    g = torch.Generator().manual_seed(100 + seed)
    return cfg, {k: torch.randn(s, generator=g) for k, s in expected_tensors(cfg, spec).items()}


def _reference(tensors, spec, *, variant: str, z: torch.Tensor, stack: str, layer: int, site: str, sites):
    """The generator written out for one (task, layer, site)."""
    parts = [z, tensors[f"{stack}.layer_embedding"][layer]]
    if variant == "hyperformer++":
        parts.append(tensors[f"{stack}.site_embedding"][sites.index(site)])
    x = torch.cat(parts)
    x = torch.relu(tensors[f"{stack}.mlp.0.weight"] @ x + tensors[f"{stack}.mlp.0.bias"])
    x = tensors[f"{stack}.mlp.2.weight"] @ x + tensors[f"{stack}.mlp.2.bias"]
    e = F.layer_norm(x, x.shape, tensors[f"{stack}.ln.weight"], tensors[f"{stack}.ln.bias"])
    group = "" if variant == "hyperformer++" else f"{site}."
    return {
        part: tensors[f"{stack}.{group}gen.{part}.weight"] @ e + tensors[f"{stack}.{group}gen.{part}.bias"]
        for part in ("down_w", "down_b", "up_w", "up_b", "ln_gamma", "ln_beta")
    }


@pytest.mark.parametrize("variant", ["hyperformer++", "hyperformer"])
@pytest.mark.parametrize("family", ["bert", "t5"])
def test_generated_weights_equal_reference(variant, family):
    backbone = Backbone.from_model(_bert() if family == "bert" else _t5())
    spec = backbone.spec
    _, tensors, net = _hyper(spec, variant=variant)
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    generated = net.generate(z)
    h = spec.hidden_size
    for t in range(3):
        for stack, n in spec.stacks.items():
            sites = ["attn", "ffn"]
            for i in range(n):
                for site in sites:
                    ref = _reference(
                        tensors, spec, variant=variant, z=z[t], stack=stack, layer=i, site=site, sites=sites
                    )
                    got = generated[t]
                    key = f"{stack}.{i}.{site}"
                    torch.testing.assert_close(
                        got[f"{key}.down_w"], ref["down_w"].view(R, h), rtol=0, atol=1e-5
                    )
                    torch.testing.assert_close(got[f"{key}.up_w"], ref["up_w"].view(h, R), rtol=0, atol=1e-5)
                    for part in ("down_b", "up_b", "ln_gamma", "ln_beta"):
                        torch.testing.assert_close(got[f"{key}.{part}"], ref[part], rtol=0, atol=1e-5)


def _assert_generates_reference(net, tensors, spec, *, variant: str, z: torch.Tensor) -> None:
    generated = net.generate(z)
    for t, got in enumerate(generated):
        for stack, n in spec.stacks.items():
            for i in range(n):
                for site in ("attn", "ffn"):
                    ref = _reference(
                        tensors,
                        spec,
                        variant=variant,
                        z=z[t],
                        stack=stack,
                        layer=i,
                        site=site,
                        sites=["attn", "ffn"],
                    )
                    for part, value in ref.items():
                        torch.testing.assert_close(
                            got[f"{stack}.{i}.{site}.{part}"].flatten(), value, rtol=0, atol=1e-5
                        )


@pytest.mark.parametrize("variant", ["hyperformer++", "hyperformer"])
def test_batched_generation_equals_single(variant):
    spec = Backbone.from_model(_bert()).spec
    _, _, net = _hyper(spec, variant=variant)
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    batched = net.generate(z)
    for t in (0, 7, 15):
        single = net.generate(z[t : t + 1])[0]
        assert single.keys() == batched[t].keys()
        for name, value in single.items():
            torch.testing.assert_close(batched[t][name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["hyperformer++", "hyperformer"])
def test_generation_follows_weights_changed_in_place(variant):
    """What serving derives from the weights (first-layer constants, fused generators) is rebuilt."""
    spec = Backbone.from_model(_bert()).spec
    _, tensors, net = _hyper(spec, variant=variant)
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        net.generate(z)
        _, changed, _ = _hyper(spec, variant=variant, seed=1)
        for name in ("encoder.layer_embedding", "encoder.mlp.0.weight", "encoder.mlp.0.bias"):
            net.p(name).copy_(changed[name])
            tensors[name] = changed[name]
        group = "" if variant == "hyperformer++" else "ffn."
        if variant == "hyperformer++":
            net.p("encoder.site_embedding").copy_(changed["encoder.site_embedding"])
            tensors["encoder.site_embedding"] = changed["encoder.site_embedding"]
        for name in (f"encoder.{group}gen.up_w.weight", f"encoder.{group}gen.ln_beta.bias"):
            net.p(name).copy_(changed[name])
            tensors[name] = changed[name]
        _assert_generates_reference(net, tensors, spec, variant=variant, z=z)


@pytest.mark.parametrize("variant", ["hyperformer++", "hyperformer"])
def test_gradients_of_generation_equal_the_reference(variant):
    """Training: gradients reach the hypernetwork's weights and the task embedding as in the formula."""
    spec = Backbone.from_model(_bert()).spec
    _, tensors, net = _hyper(spec, variant=variant)
    net.requires_grad_(True)
    with torch.no_grad():
        net.generate(torch.zeros(1, 8))  # what serving keeps must not leak into training
    z = torch.randn(1, 8, generator=torch.Generator().manual_seed(5), requires_grad=True)
    probe = torch.randn(spec.hidden_size, generator=torch.Generator().manual_seed(6))
    got = net.generate(z)[0]
    loss = sum(
        (got[f"encoder.{i}.{s}.up_w"] @ probe[:R]).square().sum() for i in range(2) for s in ("attn", "ffn")
    )
    loss = loss + sum(got[f"encoder.{i}.ffn.ln_gamma"].sum() for i in range(2))
    loss.backward()
    ref_tensors = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
    ref_z = z.detach().clone().requires_grad_(True)
    ref_loss = 0
    h = spec.hidden_size
    for i in range(2):
        for s in ("attn", "ffn"):
            ref = _reference(
                ref_tensors,
                spec,
                variant=variant,
                z=ref_z[0],
                stack="encoder",
                layer=i,
                site=s,
                sites=["attn", "ffn"],
            )
            ref_loss = ref_loss + (ref["up_w"].view(h, R) @ probe[:R]).square().sum()
            if s == "ffn":
                ref_loss = ref_loss + ref["ln_gamma"].sum()
    ref_loss.backward()
    torch.testing.assert_close(z.grad, ref_z.grad, rtol=1e-4, atol=1e-5)
    group = "" if variant == "hyperformer++" else "attn."
    for name in ("encoder.layer_embedding", "encoder.mlp.0.weight", f"encoder.{group}gen.up_w.weight"):
        assert ref_tensors[name].grad.abs().max() > 1e-2
        torch.testing.assert_close(net.p(name).grad, ref_tensors[name].grad, rtol=1e-4, atol=1e-4)


def test_entries_are_cast_to_the_requested_dtype():
    spec = Backbone.from_model(_bert()).spec
    _, _, net = _hyper(spec, variant="hyperformer++")
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(7))
    full = net.generate(z)
    for t, entries in enumerate(net.entries(z, dtype=torch.bfloat16)):
        assert len(entries) == 4
        for e in entries:
            assert e.kind == "seq"
            for part in ("down_w", "down_b", "up_w", "up_b"):
                assert e.kwargs[part].dtype == torch.bfloat16
                assert torch.equal(e.kwargs[part], full[t][f"{e.key}.{part}"].to(torch.bfloat16))
            gamma, beta = e.kwargs["ln"]
            assert torch.equal(gamma, full[t][f"{e.key}.ln_gamma"].to(torch.bfloat16))
            assert torch.equal(beta, full[t][f"{e.key}.ln_beta"].to(torch.bfloat16))


def test_generated_adapter_equals_its_formula_in_the_model():
    bert = _bert()
    plain = copy.deepcopy(bert)
    model = MultiTaskModel(Backbone.from_model(bert), banks=BankConfig(slots=4))
    spec = model.spec
    _, _, net = _hyper(spec, variant="hyperformer++")
    cfg, task = _task(spec, seed=0)
    model.load(1, cfg, task, hypernetwork=net)
    weights = net.generate(task["task_embedding"][None])[0]
    ids = torch.randint(1, 100, (1, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)

    def adapter(key):
        def hook(module, args, out):
            w = {
                p: weights[f"{key}.{p}"] for p in ("down_w", "down_b", "up_w", "up_b", "ln_gamma", "ln_beta")
            }
            z = F.relu(out @ w["down_w"].t() + w["down_b"]) @ w["up_w"].t() + w["up_b"]
            return out + F.layer_norm(z, z.shape[-1:], w["ln_gamma"], w["ln_beta"])

        return hook

    for i, layer in enumerate(plain.encoder.layer):
        layer.attention.output.dense.register_forward_hook(adapter(f"encoder.{i}.attn"))
        layer.output.dense.register_forward_hook(adapter(f"encoder.{i}.ffn"))
    with torch.no_grad():
        ref = plain(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = model.hidden(ids, mask, [1])
    assert (ours - ref).abs().max() <= 1e-5
    assert (ours - model.hidden(ids, mask, [0])).abs().max() > 1e-3


def test_mixed_generated_and_uploaded_equal_per_task_and_regeneration_is_identical():
    model = MultiTaskModel(Backbone.from_model(_bert()), banks=BankConfig(slots=8))
    spec = model.spec
    _, _, net = _hyper(spec, variant="hyperformer++")
    tasks = [_task(spec, seed=s) for s in range(3)]
    model.load_generated([(slot, cfg, t) for slot, (cfg, t) in enumerate(tasks, start=1)], net)
    lora = parse_config(
        {
            "method": "lora",
            "r": 4,
            "backbone_fingerprint": spec.fingerprint,
            "head": {"type": "classification", "labels": ["x", "y"]},
        }
    )
    g = torch.Generator().manual_seed(9)
    model.load(
        4, lora, {k: torch.randn(s, generator=g) * 0.2 for k, s in expected_tensors(lora, spec).items()}
    )
    ids = torch.randint(1, 100, (5, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    slots = [1, 2, 3, 4, 0]
    mixed = model.classify(ids, mask, slots).logits
    for row, slot in enumerate(slots):
        n = int(mask[row].sum())
        alone = model.classify(ids[row : row + 1, :n], mask[row : row + 1, :n], [slot]).logits
        assert (alone[0] - mixed[row]).abs().max() <= 1e-5
    before = model.classify(ids, mask, slots).logits
    model.evict(2)
    model.load(2, *tasks[1], hypernetwork=net)
    assert torch.equal(model.classify(ids, mask, slots).logits, before)
    # a batch-generated task equals the same task generated alone
    model.load(5, *tasks[0], hypernetwork=net)
    assert (
        model.classify(ids, mask, [5] * 5).logits - model.classify(ids, mask, [1] * 5).logits
    ).abs().max() <= 1e-6

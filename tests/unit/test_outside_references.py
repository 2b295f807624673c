"""T5, BART, DistilBERT, GPT-2 and Llama adapters against references the product did not compute.

Where PEFT has the method (LoRA on every projection, IA3), the adapter is made with the real
`peft` library on a tiny random model, imported through `import_peft`, and our forward must equal
PEFT's own (encoder hidden states, and LM logits for the seq2seq families); the Llama family's
PEFT cases live in `test_import_peft_llama.py`. Where no library has the method on these families
(bottleneck, parallel, Compacter, tiny attention; prefix tuning on DistilBERT, whose attention takes
no cache), the reference is the plain Hugging Face model with forward hooks that compute the method's
formula in plain torch.

The module path of every site is written out here, in the test, independently of
`adapters/arch/`: a wrong entry in the product's site tables then shows up as a difference.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import build_hf, config_for, make_batch, max_diff, random_tensors
from peft import IA3Config, LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
from safetensors.torch import load_file
from torch import nn

from adapters.backbone import Backbone
from adapters.formats import import_peft
from adapters.model import BankConfig, MultiTaskModel
from store.errors import InvalidArtifact

TOL = 1e-5
"""Largest absolute difference to the outside reference (fp32)."""
MOVED = 1e-3
"""The reference with the adapter differs from the plain backbone by more than this."""
LAYERS = 2
LENGTHS = [7, 5, 3]


@dataclass(frozen=True)
class Family:
    """Where each site lives in the plain Hugging Face model: `{stack: (layer path, {site: module})}`."""

    stacks: dict[str, tuple[str, dict[str, str]]]
    seq2seq: bool


_T5_SELF = {
    "q": "layer.0.SelfAttention.q",
    "k": "layer.0.SelfAttention.k",
    "v": "layer.0.SelfAttention.v",
    "o": "layer.0.SelfAttention.o",
    "attn_ln": "layer.0.layer_norm",
}
_BART = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.out_proj",
    "ffn_in": "fc1",
    "ffn_out": "fc2",
    "attn_ln": "self_attn_layer_norm",
    "ffn_ln": "final_layer_norm",
}
FAMILIES = {
    "t5": Family(
        stacks={
            "encoder": (
                "encoder.block",
                {**_T5_SELF, "ffn_in": "layer.1.DenseReluDense.wi", "ffn_out": "layer.1.DenseReluDense.wo"},
            ),
            "decoder": (
                "decoder.block",
                {
                    **_T5_SELF,
                    "cross_q": "layer.1.EncDecAttention.q",
                    "cross_k": "layer.1.EncDecAttention.k",
                    "cross_v": "layer.1.EncDecAttention.v",
                    "cross_o": "layer.1.EncDecAttention.o",
                    "ffn_in": "layer.2.DenseReluDense.wi",
                    "ffn_out": "layer.2.DenseReluDense.wo",
                },
            ),
        },
        seq2seq=True,
    ),
    "bart": Family(
        stacks={
            "encoder": ("model.encoder.layers", _BART),
            "decoder": (
                "model.decoder.layers",
                {
                    **_BART,
                    "cross_q": "encoder_attn.q_proj",
                    "cross_k": "encoder_attn.k_proj",
                    "cross_v": "encoder_attn.v_proj",
                    "cross_o": "encoder_attn.out_proj",
                    "cross_ln": "encoder_attn_layer_norm",
                },
            ),
        },
        seq2seq=True,
    ),
    "distilbert": Family(
        stacks={
            "encoder": (
                "transformer.layer",
                {
                    "q": "attention.q_lin",
                    "k": "attention.k_lin",
                    "v": "attention.v_lin",
                    "o": "attention.out_lin",
                    "ffn_in": "ffn.lin1",
                    "ffn_out": "ffn.lin2",
                    "attn_ln": "sa_layer_norm",
                    "ffn_ln": "output_layer_norm",
                    "attention": "attention",  # the self-attention module (the prefix hook replaces it)
                },
            )
        },
        seq2seq=False,
    ),
    # decoder-only; GPT-2's fused c_attn reads the attention sublayer's input, as a q projection does
    "gpt2": Family(
        stacks={
            "decoder": (
                "transformer.h",
                {"q": "attn.c_attn", "o": "attn.c_proj", "ffn_in": "mlp.c_fc", "ffn_out": "mlp.c_proj"},
            )
        },
        seq2seq=False,
    ),
    # pre-RMSNorm, gated MLP `down(act(gate(x)) * up(x))`: up_proj and gate_proj both read the FFN input
    "llama": Family(
        stacks={
            "decoder": (
                "model.layers",
                {
                    "q": "self_attn.q_proj",
                    "k": "self_attn.k_proj",
                    "v": "self_attn.v_proj",
                    "o": "self_attn.o_proj",
                    "ffn_in": "mlp.up_proj",
                    "ffn_out": "mlp.down_proj",
                },
            )
        },
        seq2seq=False,
    ),
}
DECODER_ONLY = ("gpt2", "llama")
# A sublayer's output projection, and the projection whose input is the sublayer's input.
OUTPUT_OF = {"attn": "o", "ffn": "ffn_out", "cross": "cross_o"}
INPUT_OF = {"attn": "q", "ffn": "ffn_in", "cross": "cross_q"}


def _sites(family: str, site: str) -> list[tuple[str, int, str]]:
    """(stack, layer, module path in the HF model) of one site in every layer that has it."""
    out = []
    for stack, (base, table) in FAMILIES[family].stacks.items():
        if site in table:
            out += [(stack, i, f"{base}.{i}.{table[site]}") for i in range(LAYERS)]
    return out


def _outputs(family: str, hf: nn.Module, batch) -> dict[str, torch.Tensor]:
    """Encoder hidden states (and LM logits for seq2seq) of a plain HF model, hooks included."""
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        if family in DECODER_ONLY:
            out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            return {"hidden": out.hidden_states[-1], "lm": out.logits}
        if not FAMILIES[family].seq2seq:
            return {"hidden": hf(input_ids=ids, attention_mask=mask).last_hidden_state}
        return {
            "hidden": hf.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state,
            "lm": hf(input_ids=ids, attention_mask=mask, decoder_input_ids=batch.decoder_input_ids).logits,
        }


def _ours(family: str, model: MultiTaskModel, batch, slot: int) -> dict[str, torch.Tensor]:
    slots = [slot] * len(batch.lengths)
    out = {"hidden": model.hidden(batch.input_ids, batch.attention_mask, slots)}
    if family in DECODER_ONLY:
        out["lm"] = model.logits(batch.input_ids, batch.attention_mask, slots)
    if FAMILIES[family].seq2seq:
        out["lm"] = model.logits(
            batch.input_ids, batch.attention_mask, slots, decoder_input_ids=batch.decoder_input_ids
        )
    return out


def _assert_equal_on_real_tokens(ours: dict, want: dict, mask: torch.Tensor, *, base: dict) -> None:
    """Equal to the reference within TOL (encoder rows: real tokens only); the reference moved."""
    real = mask.bool()
    assert max_diff(ours["hidden"][real], want["hidden"][real]) <= TOL
    moved = max_diff(want["hidden"][real], base["hidden"][real])
    if "lm" in want:
        assert max_diff(ours["lm"], want["lm"]) <= TOL
        moved = max(moved, max_diff(want["lm"], base["lm"]))
    assert moved > MOVED  # the adapter matters, so equality is not trivial


# -- PEFT ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeftCase:
    """One PEFT config on one family; `sites` are the native sites it adapts."""

    id: str
    family: str
    make: Callable[[], object]
    sites: tuple[str, ...]
    method: str


_PROJ = ("q", "k", "v", "o", "ffn_in", "ffn_out")
_CROSS = ("cross_q", "cross_k", "cross_v", "cross_o")
PEFT_CASES = [
    PeftCase(
        "t5_lora_every_projection",
        "t5",
        lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "v", "o", "wi", "wo"]),
        _PROJ + _CROSS,
        "lora",
    ),
    PeftCase(
        "t5_lora_self_query_only",
        "t5",
        lambda: LoraConfig(r=4, lora_alpha=8, target_modules=r".*SelfAttention\.q"),
        ("q",),
        "lora",
    ),
    PeftCase(
        "t5_ia3",
        "t5",
        lambda: IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]),
        ("k", "v", "ffn_out", "cross_k", "cross_v"),
        "ia3",
    ),
    PeftCase(
        "bart_lora_every_projection",
        "bart",
        lambda: LoraConfig(
            r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
        ),
        _PROJ + _CROSS,
        "lora",
    ),
    PeftCase(
        "bart_ia3",
        "bart",
        lambda: IA3Config(target_modules=["q_proj", "k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"]),
        ("q", "k", "v", "ffn_out", "cross_q", "cross_k", "cross_v"),
        "ia3",
    ),
    PeftCase(
        "distilbert_lora_every_projection",
        "distilbert",
        lambda: LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
        ),
        _PROJ,
        "lora",
    ),
    PeftCase(
        "distilbert_ia3",
        "distilbert",
        lambda: IA3Config(target_modules=["k_lin", "v_lin", "lin2"], feedforward_modules=["lin2"]),
        ("k", "v", "ffn_out"),
        "ia3",
    ),
]


def _randomize(model: nn.Module, seed: int) -> None:
    """Non-zero values for every trainable parameter (PEFT starts LoRA B at 0 and IA3 at 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1.0 + noise if "ia3_l" in name else 0.3 * noise)


def _expected_native(case: PeftCase, peft_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's saved tensors under the native names, by this file's own site table."""
    out = {}
    for site in case.sites:
        for stack, i, path in _sites(case.family, site):
            key = f"{stack}.{i}.{site}"
            prefix = f"base_model.model.{path}"
            if case.method == "lora":
                out[f"{key}.lora.A"] = peft_weights[f"{prefix}.lora_A.weight"]
                out[f"{key}.lora.B"] = peft_weights[f"{prefix}.lora_B.weight"]
            else:
                out[f"{key}.ia3"] = peft_weights[f"{prefix}.ia3_l"].reshape(-1)
    return out


@pytest.fixture(scope="module")
def peft_world(tmp_path_factory) -> dict:
    """Per family: one model holding every imported case (slot per case) and each PEFT reference."""
    world = {}
    for family in FAMILIES:
        cases = [c for c in PEFT_CASES if c.family == family]
        backbone = Backbone.from_model(build_hf(family, 0))
        model = MultiTaskModel(backbone, banks=BankConfig(slots=len(cases) + 1))
        batch = make_batch(LENGTHS, family=family, seed=1)
        entry = {"model": model, "batch": batch, "base": _outputs(family, build_hf(family, 0), batch)}
        for slot, case in enumerate(cases, start=1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PEFT's notes about fan-in and task types
                peft_model = get_peft_model(build_hf(family, 0), case.make()).eval()
            _randomize(peft_model, seed=slot)
            src = tmp_path_factory.mktemp(case.id)
            peft_model.save_pretrained(src)
            cfg = import_peft(src, src / "native", spec=backbone.spec)
            tensors = load_file(str(src / "native" / "adapter.safetensors"))
            model.load(slot, cfg, tensors)
            entry[case.id] = {
                "slot": slot,
                "cfg": cfg,
                "tensors": tensors,
                "peft_weights": load_file(str(src / "adapter_model.safetensors")),
                "want": _outputs(family, peft_model.base_model.model, batch),
            }
        world[family] = entry
    return world


@pytest.mark.parametrize("case", PEFT_CASES, ids=[c.id for c in PEFT_CASES])
def test_imported_peft_adapter_equals_peft_forward(peft_world, case: PeftCase) -> None:
    """Our forward with the imported adapter equals PEFT's own forward within 1e-5."""
    w = peft_world[case.family]
    c = w[case.id]
    assert c["cfg"].method == case.method
    ours = _ours(case.family, w["model"], w["batch"], c["slot"])
    _assert_equal_on_real_tokens(ours, c["want"], w["batch"].attention_mask, base=w["base"])


@pytest.mark.parametrize("case", PEFT_CASES, ids=[c.id for c in PEFT_CASES])
def test_imported_tensors_land_on_the_sites_peft_trained(peft_world, case: PeftCase) -> None:
    """Each PEFT module's tensors become the native tensors of that module's site, nothing else."""
    c = peft_world[case.family][case.id]
    want = _expected_native(case, c["peft_weights"])
    got = {k: v for k, v in c["tensors"].items() if k in want}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # sites PEFT did not touch in some layer hold exact no-ops (zero LoRA, unit IA3), never weights
    for name in set(c["tensors"]) - set(want):
        t = c["tensors"][name]
        assert torch.equal(t, torch.ones_like(t) if case.method == "ia3" else torch.zeros_like(t)), name


@pytest.mark.parametrize("case", PEFT_CASES, ids=[c.id for c in PEFT_CASES])
def test_native_artifact_named_by_site_equals_peft_forward(peft_world, case: PeftCase) -> None:
    """PEFT's tensors placed by this file's site table (not the importer's) give PEFT's forward."""
    w = peft_world[case.family]
    c = w[case.id]
    tensors = dict(c["tensors"]) | _expected_native(case, c["peft_weights"])
    model = MultiTaskModel(Backbone.from_model(build_hf(case.family, 0)), banks=BankConfig(slots=2))
    model.load(1, c["cfg"], tensors)
    ours = _ours(case.family, model, w["batch"], 1)
    _assert_equal_on_real_tokens(ours, c["want"], w["batch"].attention_mask, base=w["base"])


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_peft_prefix_tuning_on_encoder_decoder_is_refused(tmp_path: Path, family: str) -> None:
    """PEFT's seq2seq prefixes go to the decoder's self- and cross-attention caches, which the native
    prefix (self-attention of every stack) cannot express: the import refuses, writing nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            build_hf(family, 0), PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=3)
        )
    peft_model.save_pretrained(tmp_path / "peft")
    spec = Backbone.from_model(build_hf(family, 0)).spec
    with pytest.raises(InvalidArtifact, match="encoder-only and decoder-only"):
        import_peft(tmp_path / "peft", tmp_path / "out", spec=spec)
    assert not (tmp_path / "out").exists()


# -- hand-written references --------------------------------------------------------------------


def _act(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh}[name]


def _bottleneck(t: dict, prefix: str, x: torch.Tensor, act: str) -> torch.Tensor:
    """`up(f(down(x)))` from nn.Linear-layout weights."""
    z = _act(act)(x @ t[f"{prefix}.down.weight"].T + t[f"{prefix}.down.bias"])
    return z @ t[f"{prefix}.up.weight"].T + t[f"{prefix}.up.bias"]


def _compacter_weights(t: dict, prefix: str, part: str, variant: str) -> torch.Tensor:
    """`W = sum_i A_i ⊗ B_i` ([in, out]) with explicit Kronecker products; B_i = s_i t_iᵀ unless PHM."""
    rule = t["phm_rule"]
    if variant == "phm":
        factors = t[f"{prefix}.{part}.W"]
    else:
        factors = [s @ u for s, u in zip(t[f"{prefix}.{part}.s"], t[f"{prefix}.{part}.t"], strict=True)]
    return sum(torch.kron(rule[i], factors[i]) for i in range(rule.shape[0]))


def _tiny_attention(
    t: dict, prefix: str, a: torch.Tensor, mask: torch.Tensor, *, causal=False
) -> torch.Tensor:
    """`out(mean_k O_k(softmax(Q_k K_kᵀ / sqrt(E)) V_k))` over `in(LN(a))`, padding keys masked.

    Causal (decoders): token i sees keys j <= i only; a padding token sees itself, so no row is empty.
    """
    n = a.shape[1]
    allowed = mask.bool()[:, None, :n].expand(-1, n, -1)
    if causal:
        allowed = (allowed & torch.ones(n, n, dtype=torch.bool).tril()) | torch.eye(n, dtype=torch.bool)
    u = F.layer_norm(a, a.shape[-1:], t[f"{prefix}.ln.weight"], t[f"{prefix}.ln.bias"])
    u = u @ t[f"{prefix}.in.weight"].T + t[f"{prefix}.in.bias"]
    heads, e = t[f"{prefix}.qkv.weight"].shape[0], u.shape[-1]
    outs = []
    for k in range(heads):
        qkv = u @ t[f"{prefix}.qkv.weight"][k].T + t[f"{prefix}.qkv.bias"][k]
        q, key, v = qkv[..., :e], qkv[..., e : 2 * e], qkv[..., 2 * e :]
        scores = q @ key.transpose(1, 2) / math.sqrt(e)
        scores = scores.masked_fill(~allowed, float("-inf"))
        ctx = scores.softmax(-1) @ v
        outs.append(ctx @ t[f"{prefix}.o.weight"][k].T + t[f"{prefix}.o.bias"][k])
    return torch.stack(outs).mean(0) @ t[f"{prefix}.out.weight"].T + t[f"{prefix}.out.bias"]


def _add_output(hf: nn.Module, path: str, delta: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Hook: the module's output y becomes `y + delta(x, y)` (x: the module's input)."""
    hf.get_submodule(path).register_forward_hook(lambda _m, args, y: y + delta(args[0], y))


def _stash_input(hf: nn.Module, path: str, store: dict, key: str) -> None:
    def hook(_m, args):
        store[key] = args[0]

    hf.get_submodule(path).register_forward_pre_hook(hook)


def _hook_sequential(hf, family, cfg, t, batch) -> None:
    """`y + s * a(y)` on the output projection of each adapted sublayer (Houlsby placement)."""
    for site in cfg.sites:
        for stack, i, path in _sites(family, OUTPUT_OF[site]):
            p = f"{stack}.{i}.{site}.seq"
            compacter = cfg.method == "compacter"
            delta = _compacter_delta(t, p, cfg) if compacter else _bottleneck_delta(t, p, cfg)
            _add_output(hf, path, delta)


def _bottleneck_delta(t, p, cfg):
    return lambda _x, y: cfg.scaling * _bottleneck(t, p, y, cfg.activation)


def _compacter_delta(t, p, cfg):
    down = _compacter_weights(t, p, "down", cfg.variant)
    up = _compacter_weights(t, p, "up", cfg.variant)

    def delta(_x, y):
        z = _act(cfg.activation)(y @ down + t[f"{p}.down.bias"])
        return cfg.scaling * (z @ up + t[f"{p}.up.bias"])

    return delta


def _hook_post_norm(hf, family, cfg, t, batch) -> None:
    """AdapterHub's placement after the norm: the norm's output n becomes `LN(z + a(n))` for input z."""
    for site in cfg.sites:
        for stack, i, path in _sites(family, f"{site}_ln"):
            norm = hf.get_submodule(path)
            p = f"{stack}.{i}.{site}.seq"

            def hook(m, args, n, p=p):
                z = args[0]
                return F.layer_norm(
                    z + _bottleneck(t, p, n, cfg.activation), z.shape[-1:], m.weight, m.bias, m.eps
                )

            norm.register_forward_hook(hook)


def _hook_parallel(hf, family, cfg, t, batch) -> None:
    """`F(x) + s * a(x)`: the adapter reads the sublayer's input, adds to its output projection."""
    for site in cfg.sites:
        inputs = _sites(family, INPUT_OF[site])
        outputs = _sites(family, OUTPUT_OF[site])
        for (stack, i, in_path), (_, _, out_path) in zip(inputs, outputs, strict=True):
            seen: dict[str, torch.Tensor] = {}
            _stash_input(hf, in_path, seen, "x")
            p = f"{stack}.{i}.{site}.par"
            _add_output(
                hf,
                out_path,
                lambda _x, _y, p=p, seen=seen: cfg.scaling * _bottleneck(t, p, seen["x"], cfg.activation),
            )


def _hook_tiny(hf, family, cfg, t, batch) -> None:
    """`a + tiny(a)` on the adapted stacks' attention outputs: the encoder's, or causal ones in decoders.

    The stacks are the config's own list, else the encoder where there is one.
    """
    stacks = cfg.stacks or (["encoder"] if "encoder" in FAMILIES[family].stacks else ["decoder"])
    for stack, i, path in _sites(family, "o"):
        if stack not in stacks:
            continue
        p = f"{stack}.{i}.attn.tiny"
        if stack == "encoder" or not FAMILIES[family].seq2seq:
            # the input's padding mask: the encoder's, or a decoder-only model's own tokens
            _add_output(
                hf,
                path,
                lambda _x, y, p=p, c=stack == "decoder": _tiny_attention(
                    t, p, y, batch.attention_mask, causal=c
                ),
            )
        else:
            # a seq2seq decoder's inputs have no padding here
            _add_output(
                hf, path, lambda _x, y, p=p: _tiny_attention(t, p, y, torch.ones(y.shape[:2]), causal=True)
            )


def _prefix_attention(att: nn.Module, heads: int, key, value, x: torch.Tensor, mask) -> torch.Tensor:
    """Self-attention whose keys and values start with the prefix's (always visible); padding keys masked."""
    b, n, d = x.shape
    dh = d // heads
    k = torch.cat([key.expand(b, -1, -1), att.k_lin(x)], dim=1)
    v = torch.cat([value.expand(b, -1, -1), att.v_lin(x)], dim=1)

    def split(z):
        return z.reshape(b, z.shape[1], heads, dh).transpose(1, 2)

    scores = split(att.q_lin(x)) @ split(k).transpose(-1, -2) / math.sqrt(dh)
    allowed = torch.cat([torch.ones(b, key.shape[0], dtype=torch.bool), mask.bool()], dim=1)
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    ctx = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)
    return att.out_lin(ctx)


def _hook_prefix(hf, family, cfg, t, batch) -> None:
    """Each layer's self-attention recomputed with the layer's prefix keys/values prepended."""
    heads = hf.config.n_heads
    for stack, i, path in _sites(family, "attention"):
        p = f"{stack}.{i}.attn.prefix"

        def hook(m, args, kwargs, out, p=p):
            x = args[0] if args else kwargs["hidden_states"]
            ours = _prefix_attention(m, heads, t[f"{p}.key"], t[f"{p}.value"], x, batch.attention_mask)
            return (ours, *out[1:])

        hf.get_submodule(path).register_forward_hook(hook, with_kwargs=True)


@dataclass(frozen=True)
class FormulaCase:
    """A native method config, the families it runs on, and the hooks that compute its reference."""

    id: str
    config: dict
    families: tuple[str, ...]
    hook: Callable


FORMULA_CASES = [
    FormulaCase(
        "bottleneck_houlsby",
        {"method": "bottleneck", "bottleneck_dim": 8, "sites": ["attn", "ffn"], "activation": "relu"},
        ("t5", "bart", "distilbert", "gpt2", "llama"),
        _hook_sequential,
    ),
    FormulaCase(
        "bottleneck_cross_attention_scaled",
        {
            "method": "bottleneck",
            "bottleneck_dim": 4,
            "sites": ["cross"],
            "activation": "tanh",
            "scaling": 0.5,
        },
        ("t5", "bart"),
        _hook_sequential,
    ),
    FormulaCase(
        "bottleneck_after_the_norm",
        {
            "method": "bottleneck",
            "bottleneck_dim": 8,
            "sites": ["attn", "ffn"],
            "activation": "relu",
            "placement": "post_norm",
        },
        ("bart", "distilbert"),
        _hook_post_norm,
    ),
    FormulaCase(
        "parallel_scaled",
        {
            "method": "parallel",
            "bottleneck_dim": 8,
            "sites": ["attn", "ffn"],
            "activation": "relu",
            "scaling": 4.0,
        },
        ("t5", "bart", "distilbert", "gpt2", "llama"),
        _hook_parallel,
    ),
    FormulaCase(
        "compacter",
        {
            "method": "compacter",
            "variant": "compacter",
            "bottleneck_dim": 8,
            "phm_dim": 4,
            "activation": "gelu",
        },
        ("t5", "bart", "distilbert", "llama"),
        _hook_sequential,
    ),
    FormulaCase(
        "phm",
        {"method": "compacter", "variant": "phm", "bottleneck_dim": 8, "phm_dim": 4, "activation": "relu"},
        ("t5", "distilbert"),
        _hook_sequential,
    ),
    FormulaCase(
        "tiny_attention_two_heads",
        {"method": "tiny_attention", "attention_dim": 4, "num_heads": 2, "deploy": "multihead"},
        ("t5", "bart", "distilbert"),
        _hook_tiny,
    ),
    FormulaCase(
        "tiny_attention_causal_in_decoders",
        {
            "method": "tiny_attention",
            "attention_dim": 4,
            "num_heads": 2,
            "deploy": "multihead",
            "stacks": ["decoder"],
        },
        ("t5", "bart", "gpt2", "llama"),
        _hook_tiny,
    ),
    FormulaCase(
        "tiny_attention_both_stacks",
        {
            "method": "tiny_attention",
            "attention_dim": 3,
            "num_heads": 3,
            "deploy": "multihead",
            "stacks": ["encoder", "decoder"],
        },
        ("t5", "bart"),
        _hook_tiny,
    ),
    # T5/BART prefixes are checked against their own single-task forwards only (relative position
    # bias and PEFT's seq2seq layout leave no outside reference); BERT and Llama have PEFT's
    FormulaCase("prefix", {"method": "prefix", "prefix_length": 3}, ("distilbert",), _hook_prefix),
]
FORMULA_PARAMS = [
    pytest.param(case, family, id=f"{case.id}-{family}") for case in FORMULA_CASES for family in case.families
]


@pytest.fixture(scope="module")
def formula_models() -> dict[str, MultiTaskModel]:
    """One served model per family; each test loads its adapter into slot 1."""
    return {
        f: MultiTaskModel(Backbone.from_model(build_hf(f, 0)), banks=BankConfig(slots=2)) for f in FAMILIES
    }


def _left_padded(batch):
    """The batch with each row's tokens moved to the right end (padding first)."""
    ids, mask = torch.zeros_like(batch.input_ids), torch.zeros_like(batch.attention_mask)
    width = ids.shape[1]
    for i, n in enumerate(batch.lengths):
        ids[i, width - n :] = batch.input_ids[i, :n]
        mask[i, width - n :] = 1
    return replace(batch, input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize(("case", "family"), FORMULA_PARAMS)
def test_method_equals_hand_written_reference(formula_models, case: FormulaCase, family: str) -> None:
    """Our forward equals the plain HF model with the formula hooked in, within 1e-5."""
    model = formula_models[family]
    cfg = config_for(case.config, model.spec)
    t = random_tensors(cfg, model.spec, seed=7)
    model.load(1, cfg, t)
    batch = make_batch(LENGTHS, family=family, seed=2)
    if family in DECODER_ONLY:
        batch = _left_padded(batch)  # as decoding pads prompts: the causal mask must skip the padding
    base = _outputs(family, build_hf(family, 0), batch)
    hf = build_hf(family, 0)
    case.hook(hf, family, cfg, t, batch)
    want = _outputs(family, hf, batch)
    _assert_equal_on_real_tokens(_ours(family, model, batch, 1), want, batch.attention_mask, base=base)

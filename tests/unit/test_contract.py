"""The contract every adapter method passes on every architecture family it applies to.

One table lists each method configuration once, with the families it runs on; every row gets
every check of `ContractMixin`: artifact round trip, no-op adapter equals the backbone, a real
adapter changes outputs, mixed-task batches equal per-task batches, and evict/reload isolation.
A new method is one more row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from helpers import (
    ENCODER_FAMILIES,
    FAMILIES,
    LLAMA_FAMILIES,
    Batch,
    build_hf,
    config_for,
    head_logits,
    identity_tensors,
    make_batch,
    max_diff,
    model_outputs,
    random_tensors,
    reference_outputs,
    wrap,
)
from safetensors.torch import load_file, save_file

from adapters.model import BankConfig, MultiTaskModel
from store.artifact import parse_config

# Mistral and Qwen2 share Llama's module names; they run the rows that differ for them (grouped-query
# prefixes, Qwen2's q/k/v biases), Llama runs every row.
ALL = (*(f for f in FAMILIES if f not in LLAMA_FAMILIES), "llama")
WITH_VARIANTS = (*ALL, "mistral", "qwen2")
SEQ2SEQ = ("t5", "bart")
SEPARATE_QKV = (*ENCODER_FAMILIES, "llama")
"""Families whose q, k and v are separate projections (GPT-2 fuses them)."""

EXACT = 1e-6
"""Same weights, same batch: outputs agree to float rounding at most."""
CLOSE = 1e-5
"""Different batch shapes or code paths (single slot vs gathered): float32 rounding only."""
CHANGED = 1e-4
"""A real adapter moves some output by more than this."""

DEFAULT_HEAD = {"type": "classification", "labels": ["neg", "neu", "pos"]}


@dataclass(frozen=True)
class Case:
    """One method configuration (no fingerprint) and the families it applies to."""

    id: str
    config: dict
    families: tuple[str, ...]
    head: dict = field(default_factory=lambda: DEFAULT_HEAD)
    no_op: bool = True
    """Whether some tensors make the adapter exactly a no-op (prefix tuning has none)."""
    banks: dict = field(default_factory=dict)
    """BankConfig overrides the case needs."""


def _bn(**kw) -> dict:
    return {"method": "bottleneck", "bottleneck_dim": 8, **kw}


def _par(**kw) -> dict:
    return {"method": "parallel", "bottleneck_dim": 8, **kw}


def _lora(**kw) -> dict:
    return {"method": "lora", "r": 4, "alpha": 8, **kw}


CASES = [
    Case("bottleneck_houlsby_relu", _bn(sites=["attn", "ffn"], activation="relu"), ALL),
    Case("bottleneck_pfeiffer_gelu_new", _bn(sites=["ffn"], activation="gelu_new"), ALL),
    Case("bottleneck_tanh_scaled", _bn(bottleneck_dim=4, activation="tanh", scaling=0.5), ("bert", "gpt2")),
    Case(
        "bottleneck_swish",
        _bn(activation="swish"),
        ("distilbert", "t5"),
        head={"type": "regression", "pooling": "mean"},
    ),
    Case("bottleneck_cross", _bn(sites=["attn", "ffn", "cross"], activation="gelu"), SEQ2SEQ),
    Case("parallel", _par(), ALL, head={"type": "multi_label", "labels": ["a", "b", "c", "d"], "layers": 2}),
    Case("parallel_scaled", _par(sites=["attn", "ffn"], scaling=4.0, bottleneck_dim=16), ALL),
    Case("parallel_learned_scaling", _par(learned_scaling=True, activation="gelu_new"), ALL),
    Case("parallel_cross", _par(sites=["cross"], activation="tanh"), SEQ2SEQ),
    Case("lora_qv", _lora(), SEPARATE_QKV),
    Case(
        "lora_qv_pooler_head", _lora(r=2), ("bert",), head={**DEFAULT_HEAD, "pooling": "pooler", "layers": 2}
    ),
    Case(
        "lora_all_projections_rank_pattern",
        _lora(
            targets=["q", "k", "v", "o", "ffn_in", "ffn_out"],
            rank_pattern={"v": 8, "encoder.1.ffn_in": 2},
            alpha_pattern={"o": 4, "encoder.0.q": 12},
        ),
        SEPARATE_QKV,
    ),
    Case(
        "lora_gated_mlp_every_projection",
        _lora(
            targets=["q", "k", "v", "o", "ffn_in", "ffn_gate", "ffn_out"],
            rank_pattern={"k": 2, "decoder.1.ffn_gate": 8},
            alpha_pattern={"ffn_gate": 4},
        ),
        LLAMA_FAMILIES,
    ),
    Case("lora_rslora", _lora(r=8, alpha=4, use_rslora=True, targets=["q", "v", "ffn_out"]), ("bert", "t5")),
    Case("lora_cross", _lora(targets=["q", "v", "cross_q", "cross_k", "cross_v", "cross_o"]), SEQ2SEQ),
    Case(
        "lora_gpt2_fused_qkv",
        _lora(targets=["qkv", "o", "ffn_in", "ffn_out"], rank_pattern={"qkv": 8}, use_rslora=True),
        ("gpt2",),
    ),
    Case("ia3", {"method": "ia3"}, (*SEPARATE_QKV, "qwen2")),
    Case("ia3_gated_mlp", {"method": "ia3", "targets": ["k", "v", "ffn_gate", "ffn_out"]}, LLAMA_FAMILIES),
    Case("ia3_gpt2_fused_qkv", {"method": "ia3", "targets": ["qkv", "ffn_out"]}, ("gpt2",)),
    Case("ia3_cross", {"method": "ia3", "targets": ["k", "v", "cross_k", "cross_v", "ffn_out"]}, SEQ2SEQ),
    Case("layernorm", {"method": "layernorm"}, ALL, head={"type": "regression"}),
    Case("lora_with_layernorm", _lora(targets=["o", "ffn_out"], layernorm=True), ALL),
    Case("prefix_5", {"method": "prefix", "prefix_length": 5}, WITH_VARIANTS, no_op=False),
    Case("prefix_30", {"method": "prefix", "prefix_length": 30}, ALL, no_op=False),
    Case(
        "mam",
        {"method": "mam", "prefix_length": 8, "bottleneck_dim": 16},
        WITH_VARIANTS,
        no_op=False,
    ),
    Case("mh_parallel", {"method": "mh_parallel", "bottleneck_dim": 4, "activation": "gelu"}, ALL),
    Case("compacter", {"method": "compacter", "bottleneck_dim": 8}, ALL),
    Case(
        "compacter_pp", {"method": "compacter", "variant": "compacter++", "bottleneck_dim": 8}, SEPARATE_QKV
    ),
    Case("phm", {"method": "compacter", "variant": "phm", "bottleneck_dim": 8, "activation": "relu"}, ALL),
    Case(
        "compacter_factored",
        {"method": "compacter", "bottleneck_dim": 8, "phm_rank": 2},
        ALL,
        banks={"compacter_factored": True, "phm_dim": 4},
    ),
    # by default the encoder where there is one, else the decoder (causal: GPT-2 and Llama)
    Case("tiny_attention_average", {"method": "tiny_attention", "attention_dim": 4, "num_heads": 2}, ALL),
    Case(
        "tiny_attention_multihead",
        {"method": "tiny_attention", "attention_dim": 4, "num_heads": 3, "deploy": "multihead"},
        ALL,
    ),
    Case(
        "tiny_attention_both_stacks",
        {"method": "tiny_attention", "attention_dim": 3, "num_heads": 2, "stacks": ["encoder", "decoder"]},
        SEQ2SEQ,
    ),
]


def raw_config(case: Case, family: str) -> dict:
    """The case's config dict with its head where the family has an encoder to put it on."""
    if family in ENCODER_FAMILIES:
        return {**case.config, "head": case.head}
    return dict(case.config)


def companions(family: str) -> list[dict]:
    """Three tasks of three different methods that share a mixed batch with the case under test."""
    gpt2 = family == "gpt2"
    heads = [
        {"type": "regression", "pooling": "mean"},
        {"type": "multi_label", "labels": ["x", "y"], "layers": 2},
        {"type": "classification", "labels": [f"c{i}" for i in range(5)]},
    ]
    raws = [
        _lora(r=2, alpha=4, targets=["qkv", "ffn_out"] if gpt2 else ["q", "v", "ffn_out"]),
        _bn(bottleneck_dim=16, sites=["attn", "ffn"], activation="gelu"),
        {"method": "ia3", "targets": ["qkv", "ffn_out"]} if gpt2 else {"method": "ia3"},
    ]
    if family in ENCODER_FAMILIES:
        raws = [{**r, "head": h} for r, h in zip(raws, heads, strict=True)]
    return raws


def load_raw(model: MultiTaskModel, slot: int, raw: dict, *, seed: int) -> None:
    """Parse a config dict for this backbone, draw random tensors, load them into a slot."""
    cfg = config_for(raw, model.spec)
    model.load(slot, cfg, random_tensors(cfg, model.spec, seed=seed))


# The widths a wider variant of a case doubles, and the largest the contract's banks hold.
_WIDTHS = {"r": 16, "bottleneck_dim": 16, "prefix_length": 32}


def wider(case: Case, family: str) -> dict:
    """The case's method with its widths doubled (within the banks): its load covers more of each buffer."""
    raw = raw_config(case, family)
    return {k: min(2 * v, _WIDTHS[k]) if k in _WIDTHS and isinstance(v, int) else v for k, v in raw.items()}


def rows_alone(model: MultiTaskModel, batch: Batch, slots: list[int]) -> list[dict[str, torch.Tensor]]:
    """Each row run on its own, unpadded."""
    return [model_outputs(model, batch.row(i), [s]) for i, s in enumerate(slots)]


def assert_rows_match(mixed: dict, alone: list[dict], batch: Batch, *, tol: float) -> None:
    """Row i of a padded mixed batch equals row i run alone (its real positions only)."""
    for i, single in enumerate(alone):
        n = batch.lengths[i]
        for name, value in single.items():
            got = mixed[name][i : i + 1]
            if name == "hidden" or (name == "lm" and got.shape[1] == batch.input_ids.shape[1]):
                # Sequence outputs of the padded input: compare the row's real positions.
                got = got[:, :n]
            diff = max_diff(got, value)
            assert diff <= tol, f"row {i} ({name}): mixed batch differs from the row alone by {diff:.3g}"


def assert_same(a: dict, b: dict, *, tol: float = 0.0, what: str = "outputs") -> None:
    """Two output dicts agree within `tol` on every output."""
    assert a.keys() == b.keys()
    for name in a:
        diff = max_diff(a[name], b[name])
        assert diff <= tol, f"{what}: {name} differs by {diff:.3g}"


class _Fixtures:
    """The model, batch and parsed config of one (method config, family) row."""

    lengths = (6, 3, 7, 5)

    @pytest.fixture
    def model(self, case: Case, family: str) -> MultiTaskModel:
        """A MultiTaskModel over a fresh tiny backbone."""
        return wrap(family, banks=BankConfig(**{"slots": 8, "prefix_max_len": 32, **case.banks}))

    @pytest.fixture
    def batch(self, family: str) -> Batch:
        """A right-padded batch of different lengths."""
        return make_batch(list(self.lengths), family=family, seed=1)

    @pytest.fixture
    def cfg(self, case: Case, family: str, model: MultiTaskModel):
        """The case's parsed config for this backbone."""
        return config_for(raw_config(case, family), model.spec)


class NoOpMixin(_Fixtures):
    """The check of methods that have a no-op form (prefix tuning and MAM have none: any prefix attends)."""

    def test_no_op_adapter_equals_backbone(self, case, family, model, batch, cfg):
        """The method's identity tensors (base norms, zero updates) give the plain backbone's outputs."""
        ref = reference_outputs(build_hf(family), family, batch)
        tensors = identity_tensors(cfg, model.backbone, seed=4)
        model.load(1, cfg, tensors)
        for slots in ([1, 1, 1, 1], [1, 0, 1, 0]):
            out = model_outputs(model, batch, slots)
            for name in ("hidden", "lm"):
                if name in out:
                    diff = max_diff(out[name], ref[name])
                    assert diff <= CLOSE, f"{name} with slots {slots}: no-op adapter differs by {diff:.3g}"
            if "head" in out:
                want = head_logits(cfg.head, tensors, ref, batch.attention_mask, out["head"].shape[1])
                rows = [i for i, s in enumerate(slots) if s == 1]
                diff = max_diff(out["head"][rows], want[rows])
                assert diff <= CLOSE, f"head logits differ from the hand-computed head by {diff:.3g}"


class ContractMixin(_Fixtures):
    """Checks every (method config, family) row must pass; the subclass supplies the rows."""

    def test_round_trip(self, case, family, model, batch, cfg, tmp_path):
        """Tensors and config written to disk and read back load to identical outputs."""
        tensors = random_tensors(cfg, model.spec, seed=3)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "adapter.safetensors"))
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg.model_dump()))

        back_cfg = parse_config((tmp_path / "adapter_config.json").read_bytes())
        back = load_file(str(tmp_path / "adapter.safetensors"))
        assert back_cfg == cfg
        assert back.keys() == tensors.keys()

        model.load(1, cfg, tensors)
        model.load(2, back_cfg, back)
        n = len(self.lengths)
        assert_same(model_outputs(model, batch, [1] * n), model_outputs(model, batch, [2] * n), tol=EXACT)
        # Slots 1 and 2 hold the same adapter, so swapping them in a mixed batch changes nothing.
        mixed = model_outputs(model, batch, [1, 2, 2, 1])
        assert_same(mixed, model_outputs(model, batch, [2, 1, 1, 2]), tol=EXACT, what="swapped slots")

    def test_adapter_changes_outputs(self, case, family, model, batch, cfg):
        """A random adapter moves the backbone's outputs (so the equality checks can fail)."""
        ref = reference_outputs(build_hf(family), family, batch)
        model.load(1, cfg, random_tensors(cfg, model.spec, seed=5))
        out = model_outputs(model, batch, [1, 0, 1, 0])
        moved = max(max_diff(out[n][[0, 2]], ref[n][[0, 2]]) for n in ("hidden", "lm") if n in out)
        assert moved > CHANGED, f"adapter moved outputs by only {moved:.3g}"
        for name in ("hidden", "lm"):
            if name in out:
                diff = max_diff(out[name][[1, 3]], ref[name][[1, 3]])
                assert diff <= CLOSE, f"slot-0 rows ({name}) differ from the backbone by {diff:.3g}"

    def test_mixed_batch_equals_per_task(self, case, family, model, cfg):
        """Four tasks of at least three methods plus backbone rows, padded together, equal each row alone."""
        model.load(1, cfg, random_tensors(cfg, model.spec, seed=6))
        for slot, raw in enumerate(companions(family), start=2):
            load_raw(model, slot, raw, seed=10 + slot)
        slots = [1, 0, 2, 3, 1, 4, 2]
        batch = make_batch([5, 7, 3, 6, 2, 4, 7], family=family, seed=2)
        mixed = model_outputs(model, batch, slots)
        assert_rows_match(mixed, rows_alone(model, batch, slots), batch, tol=CLOSE)

    def test_evict_reload_isolation(self, case, family, model, batch, cfg):
        """Reloading reproduces outputs exactly; other slots' loads and evictions never leak in."""
        n = len(self.lengths)
        ones = [1] * n
        tensors = random_tensors(cfg, model.spec, seed=7)
        model.load(1, cfg, tensors)
        first = model_outputs(model, batch, ones)

        other_a, other_b, _ = companions(family)
        load_raw(model, 2, other_a, seed=20)
        load_raw(model, 3, other_b, seed=21)
        assert_same(first, model_outputs(model, batch, ones), what="after loading other slots")
        model.evict(2)
        assert_same(first, model_outputs(model, batch, ones), what="after evicting another slot")
        load_raw(model, 2, raw_config(case, family), seed=22)  # same method, other weights
        assert_same(first, model_outputs(model, batch, ones), what="after reusing another slot")

        model.evict(1)
        plain = model_outputs(model, batch, ones)
        base = model_outputs(model, batch, [0] * n)
        for name in ("hidden", "lm"):
            if name in plain:
                assert max_diff(plain[name], base[name]) <= EXACT, f"evicted slot still changes {name}"
        if "head" in plain:
            assert not plain["head"].any(), "evicted slot still has a head"
        # Slot 2 holds the same method, so its banks are active: slot 1's old state must not leak.
        beside = model_outputs(model, batch, [1, 2, 1, 2])
        for name in ("hidden", "lm"):
            if name in beside:
                diff = max_diff(beside[name][[0, 2]], base[name][[0, 2]])
                assert diff <= CLOSE, f"evicted slot next to a loaded one: {name} differs by {diff:.3g}"

        model.load(1, cfg, tensors)
        assert_same(first, model_outputs(model, batch, ones), what="after evict and reload")

    def test_load_over_an_occupied_slot(self, case, family, model, batch, cfg):
        """Loading into a slot that still holds another adapter, with no evict between, leaves no trace of it."""
        ones = [1] * len(self.lengths)
        tensors = random_tensors(cfg, model.spec, seed=7)
        model.load(1, cfg, tensors)
        first = model_outputs(model, batch, ones)
        for i, raw in enumerate([wider(case, family), *companions(family)]):
            load_raw(model, 1, raw, seed=30 + i)
            model.load(1, cfg, tensors)
            assert_same(first, model_outputs(model, batch, ones), what=f"after loading over {raw['method']}")


@pytest.mark.parametrize(
    ("case", "family"),
    [pytest.param(c, f, id=f"{c.id}-{f}") for c in CASES for f in c.families],
)
class TestContract(ContractMixin):
    """Every row of CASES, on every family it lists."""


@pytest.mark.parametrize(
    ("case", "family"),
    [pytest.param(c, f, id=f"{c.id}-{f}") for c in CASES if c.no_op for f in c.families],
)
class TestNoOp(NoOpMixin):
    """Every row of CASES whose method has a no-op form."""


@pytest.mark.parametrize("family", ALL)
def test_mixed_prefix_lengths(family):
    """Prefixes of lengths 5 and 30 (and rows without one) share a batch exactly."""
    model = wrap(family, banks=BankConfig(slots=8, prefix_max_len=32))
    heads = {"head": DEFAULT_HEAD} if family in ENCODER_FAMILIES else {}
    load_raw(model, 1, {"method": "prefix", "prefix_length": 5, **heads}, seed=1)
    load_raw(model, 2, {"method": "prefix", "prefix_length": 30, **heads}, seed=2)
    load_raw(model, 3, companions(family)[0], seed=3)
    slots = [2, 1, 0, 2, 3, 1]
    batch = make_batch([4, 7, 5, 7, 3, 2], family=family, seed=3)
    mixed = model_outputs(model, batch, slots)
    assert_rows_match(mixed, rows_alone(model, batch, slots), batch, tol=CLOSE)
    # Each prefix matters: dropping it (slot 0) changes that row.
    base = model_outputs(model, batch, [0] * len(slots))
    assert max_diff(mixed["hidden"][[0, 1]], base["hidden"][[0, 1]]) > CHANGED


def test_table_covers_every_registered_method():
    """Every registered method has at least one contract row."""
    from adapters.methods import METHODS

    covered = {c.config["method"] for c in CASES}
    assert set(METHODS) <= covered, f"methods without a contract row: {sorted(set(METHODS) - covered)}"

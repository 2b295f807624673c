"""PEFT import on the Llama family: LoRA, IA3 and prefix checkpoints made by `peft` serve PEFT's outputs.

Each case builds a PEFT model on a tiny random Llama, Mistral or Qwen2 (grouped-query attention: 4
query heads, 2 key/value heads), gives its adapter random weights, saves it, imports the directory and
compares with PEFT's own model: LM logits within 1e-4, and for LoRA and IA3 the greedy tokens of PEFT's
`generate` for each prompt alone equal those of our mixed-task decoding loop with every prompt (and
a bare-backbone row) in one batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import LLAMA_FAMILIES, build_hf, make_batch, max_diff
from peft import IA3Config, LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
from test_import_peft import MOVED, TOL, _randomize, store_validate

from adapters.backbone import Backbone
from adapters.formats import import_peft
from adapters.generate import DecodeBatch, Prompt
from adapters.model import BankConfig, MultiTaskModel

PREFIX = 5
NEW = 6
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [30, 31, 32, 33]]
_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Case:
    """One PEFT configuration for a causal LM, and the native method and targets it imports to."""

    id: str
    make: Callable[[], object]
    method: str
    targets: tuple[str, ...] = ()
    family_targets: dict[str, tuple[str, ...]] | None = None
    """Targets where PEFT's defaults differ by model type."""


CASES = [
    Case(
        "lora_every_projection",
        lambda: LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=_ALL),
        "lora",
        ("q", "k", "v", "o", "ffn_in", "ffn_gate", "ffn_out"),
    ),
    # PEFT's own defaults for Llama-family causal LMs: LoRA r=8 on q_proj and v_proj; IA3 on k_proj
    # (Qwen2: q_proj), v_proj and down_proj, down_proj scaling its input.
    Case("lora_peft_default", lambda: LoraConfig(task_type=TaskType.CAUSAL_LM), "lora", ("q", "v")),
    Case(
        "ia3_peft_default",
        lambda: IA3Config(task_type=TaskType.CAUSAL_LM),
        "ia3",
        ("k", "v", "ffn_out"),
        {"qwen2": ("q", "v", "ffn_out")},
    ),
    Case(
        "prefix",
        lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=PREFIX),
        "prefix",
    ),
]


def _peft(case: Case, family: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about task types and fan-in
        model = get_peft_model(build_hf(family), case.make()).eval()
    _randomize(model, seed=3)
    return model


def _imported(case: Case, family: str, tmp_path) -> tuple[MultiTaskModel, object, object]:
    peft_model = _peft(case, family)
    peft_model.save_pretrained(tmp_path / "peft")
    backbone = Backbone.from_model(build_hf(family))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prefix position note, checked below
        cfg = import_peft(tmp_path / "peft", tmp_path / "native", spec=backbone.spec)
    model = MultiTaskModel(backbone, banks=BankConfig(slots=3))
    model.load(1, cfg, store_validate(tmp_path / "native", backbone.spec))
    return model, cfg, peft_model


@pytest.mark.parametrize("family", LLAMA_FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_logits_match_peft(case: Case, family: str, tmp_path) -> None:
    """Our model with the imported adapter gives PEFT's LM logits (prefix: positions from 0, as served)."""
    model, cfg, peft_model = _imported(case, family, tmp_path)
    assert cfg.method == case.method
    if case.targets:
        assert tuple(cfg.targets) == (case.family_targets or {}).get(family, case.targets)
    if case.method == "ia3":
        assert cfg.feedforward == ["ffn_out"]
    batch = make_batch([7, 5, 3], family=family, seed=1)
    ids, mask = batch.input_ids, batch.attention_mask
    real = mask.bool()
    with torch.no_grad():
        if case.method == "prefix":
            # PEFT starts the real tokens at position PREFIX; served prefixes start them at 0 (as
            # AdapterHub does), so the reference is PEFT's own prefix cache with positions from 0.
            want = peft_model.base_model(
                input_ids=ids,
                attention_mask=torch.cat([torch.ones(len(ids), PREFIX, dtype=mask.dtype), mask], dim=1),
                cache=peft_model.get_prompt(len(ids)),
                position_ids=torch.arange(ids.shape[1]).unsqueeze(0),
            ).logits
        else:
            want = peft_model(input_ids=ids, attention_mask=mask).logits
    got = model.logits(ids, mask, [1] * len(ids))
    assert max_diff(got[real], want[real]) <= TOL
    assert max_diff(model.logits(ids, mask, [0] * len(ids))[real], want[real]) > MOVED


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefix_differs_from_peft_only_by_its_position_offset(family: str, tmp_path) -> None:
    """PEFT's own prefix forward equals ours given PEFT's shifted positions; the import says so."""
    peft_model = _peft(CASES[-1], family)
    peft_model.save_pretrained(tmp_path / "peft")
    backbone = Backbone.from_model(build_hf(family))
    with pytest.warns(UserWarning, match="rotary"):
        cfg = import_peft(tmp_path / "peft", tmp_path / "native", spec=backbone.spec)
    model = MultiTaskModel(backbone, banks=BankConfig(slots=2))
    model.load(1, cfg, store_validate(tmp_path / "native", backbone.spec))
    ids = torch.tensor([PROMPTS[0]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
    shifted = torch.arange(PREFIX, PREFIX + ids.shape[1]).unsqueeze(0)
    assert max_diff(model.logits(ids, mask, [1], position_ids=shifted), want) <= TOL
    # on rotary positions the offset matters: without it the logits differ
    assert max_diff(model.logits(ids, mask, [1]), want) > MOVED


def _peft_generate(peft_model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            eos_token_id=None,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", LLAMA_FAMILIES)
@pytest.mark.parametrize("case", [c for c in CASES if c.method != "prefix"], ids=lambda c: c.id)
def test_mixed_decode_equals_peft_generate(case: Case, family: str, tmp_path) -> None:
    """Every prompt decoded together (with a bare-backbone row) gives PEFT's greedy tokens for it alone."""
    model, _, peft_model = _imported(case, family, tmp_path)
    want = [_peft_generate(peft_model, p) for p in PROMPTS]
    with peft_model.disable_adapter():
        bare = _peft_generate(peft_model, PROMPTS[0])
    assert bare != want[0]  # the adapter changes the text
    batch = DecodeBatch(model)
    slots = [1, 1, 1, 0]
    first = batch.add([Prompt(ids=p) for p in [*PROMPTS, PROMPTS[0]]], slots=slots)
    got = [[t] for _, t in first]
    for _ in range(NEW - 1):
        for row, t in zip(got, batch.step(slots=slots), strict=True):
            row.append(t)
    assert got[:3] == want
    assert got[3] == bare

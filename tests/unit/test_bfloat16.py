"""bfloat16 serving on CPU: a mixed-task batch in bf16 agrees with the same batch in fp32.

bf16 keeps 8 bits of mantissa (relative spacing 2^-8 ≈ 0.4%), and a forward rounds at every layer,
so the stated bound is relative to the output's scale: max |bf16 - fp32| <= 3% of max |fp32|. The
adapters move the outputs far more than that, so a bf16 path that drops or misroutes them fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import Batch, build_hf, config_for, make_batch, max_diff, random_tensors

from adapters.backbone import Backbone, default_backbone_path, load_backbone
from adapters.model import BankConfig, MultiTaskModel
from service.settings import Settings

REL_TOL = 0.03
"""Largest bf16 - fp32 difference, as a fraction of the largest fp32 output."""
HEAD = {"type": "classification", "labels": ["a", "b", "c"]}
ADAPTERS = [
    {"method": "lora", "r": 4, "alpha": 8, "targets": ["q", "v", "ffn_out"]},
    {"method": "bottleneck", "bottleneck_dim": 8},
    {"method": "ia3"},
    {"method": "prefix", "prefix_length": 4},
]
LENGTHS = [7, 5, 3, 6, 4, 7, 2, 5, 6, 3]
SLOTS = [0, 1, 2, 3, 4, 1, 2, 3, 4, 0]
"""Every adapter twice and the plain backbone twice, interleaved in one batch."""
REPO = Path(__file__).resolve().parents[2]


def _pair(backbone32: Backbone, backbone16: Backbone, *, head: bool) -> tuple[MultiTaskModel, MultiTaskModel]:
    """The same adapters (fp32 tensors) loaded into an fp32 and a bf16 model, slot by slot."""
    models = tuple(
        MultiTaskModel(b, banks=BankConfig(slots=len(ADAPTERS) + 1)) for b in (backbone32, backbone16)
    )
    for slot, raw in enumerate(ADAPTERS, start=1):
        raw = {**raw, "head": HEAD} if head else raw
        tensors = random_tensors(config_for(raw, models[0].spec), models[0].spec, seed=slot)
        for m in models:
            m.load(slot, config_for(raw, m.spec), tensors)
    return models


def _outputs(model: MultiTaskModel, batch, slots: list[int], *, head: bool) -> torch.Tensor:
    if head:
        return model.classify(batch.input_ids, batch.attention_mask, slots).logits[:, : len(HEAD["labels"])]
    real = batch.attention_mask.bool()
    return model.logits(batch.input_ids, batch.attention_mask, slots)[real]


def _check(m32: MultiTaskModel, m16: MultiTaskModel, batch, *, head: bool) -> None:
    assert m16.backbone.dtype == torch.bfloat16
    got = _outputs(m16, batch, SLOTS, head=head)
    assert got.dtype == torch.bfloat16
    want = _outputs(m32, batch, SLOTS, head=head)
    tol = REL_TOL * float(want.abs().max())
    assert max_diff(got, want) <= tol
    plain = _outputs(m32, batch, [0] * len(SLOTS), head=head)
    assert max_diff(want, plain) > 5 * tol  # the adapters matter far beyond the bf16 rounding


@pytest.mark.parametrize("family", ["bert", "distilbert", "t5", "bart", "gpt2"])
def test_mixed_batch_in_bfloat16_agrees_with_float32(family: str) -> None:
    """Four methods and the plain backbone in one bf16 forward, against the fp32 forward."""
    head = family != "gpt2"
    m32, m16 = _pair(
        Backbone.from_model(build_hf(family, 0)),
        Backbone.from_model(build_hf(family, 0).to(torch.bfloat16)),
        head=head,
    )
    _check(m32, m16, make_batch(LENGTHS, family=family, seed=1), head=head)


@pytest.mark.minilm
def test_gpu_compose_dtype_serves_minilm_within_the_bound() -> None:
    """The dtype docker-compose.gpu.yml sets, through Settings and load_backbone, on the real MiniLM."""
    env = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())["services"]["adapterserve"][
        "environment"
    ]
    dtype = Settings(dtype=env["ADAPTERSERVE_DTYPE"], seed_dir=None).dtype
    assert dtype == "bfloat16"
    path = default_backbone_path()
    m32, m16 = _pair(
        load_backbone(path, device="cpu", dtype="float32"),
        load_backbone(path, device="cpu", dtype=dtype),
        head=True,
    )
    tok = m32.backbone.tokenizer
    texts = ["a quietly moving film", "the plot makes no sense at all", "fine", "loved it"] * 3 + ["ok", "no"]
    enc = tok(texts[: len(SLOTS)], padding=True, return_tensors="pt")
    lengths = enc["attention_mask"].sum(1).tolist()
    _check(m32, m16, Batch(enc["input_ids"], enc["attention_mask"], lengths), head=True)

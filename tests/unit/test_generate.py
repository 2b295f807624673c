"""Mixed-task decoding: every row of a continuously batched decode equals decoding its task alone.

Rows of the method under test and three companion tasks (and the bare backbone) join and leave at
different steps. Each row's tokens must equal Hugging Face's own greedy `generate` of that row alone,
and each step's logits must equal a full forward (no cache, no padding) over the row's prompt and the
tokens so far, routed to its adapter alone.
"""

from __future__ import annotations

import pytest
import torch
from helpers import config_for, random_tensors, wrap
from test_contract import CASES, companions, raw_config

from adapters.generate import DecodeBatch, Prompt, Sampling, filtered_logits, pick
from adapters.model import BankConfig, MultiTaskModel

GENERATIVE = ("gpt2", "t5", "bart", "llama", "mistral", "qwen2")
TOL = 1e-4
"""Cached, padded, mixed-batch logits vs a full forward of the row alone: float32 rounding."""
NEW = 5


def _model(case, family: str) -> MultiTaskModel:
    model = wrap(family, banks=BankConfig(**{"slots": 8, "prefix_max_len": 32, **case.banks}))
    for slot, (raw, seed) in enumerate(
        [(raw_config(case, family), 1)] + [(c, 10 + k) for k, c in enumerate(companions(family))], start=1
    ):
        cfg = config_for(raw, model.spec)
        model.load(slot, cfg, random_tensors(cfg, model.spec, seed=seed))
    return model


def _alone_generate(model: MultiTaskModel, prompt: list[int], slot: int, n: int, *, cache: bool) -> list[int]:
    """Hugging Face's greedy generate of one row (without its cache: every step a full forward)."""
    ids = torch.tensor([prompt])
    hf = model.backbone.model
    with (
        torch.inference_mode(),
        model.router.route(torch.tensor([slot]), attention_mask=torch.ones_like(ids)),
    ):
        out = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            forced_eos_token_id=None,
            use_cache=cache,
        )[0].tolist()
    return out[len(prompt) :] if not hf.config.is_encoder_decoder else out[1 : 1 + n]


def _alone_logits(model: MultiTaskModel, prompt: list[int], slot: int, tokens: list[int]) -> torch.Tensor:
    """The next-token logits after `tokens`, from one uncached forward of the row alone."""
    hf = model.backbone.model
    ids = torch.tensor([prompt])
    with (
        torch.inference_mode(),
        model.router.route(torch.tensor([slot]), attention_mask=torch.ones_like(ids)),
    ):
        if hf.config.is_encoder_decoder:
            dec = torch.tensor([[hf.config.decoder_start_token_id, *tokens]])
            return hf(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits[0, -1]
        full = torch.tensor([prompt + tokens])
        return hf(input_ids=full, attention_mask=torch.ones_like(full)).logits[0, -1]


# (prompt, slot, step at which it joins, tokens it decodes): rows join while others decode and
# leave before them; the last one joins after the longest prompt has left.
ROWS = [
    ([5, 6, 7, 8, 9, 10, 11], 1, 0, NEW),
    ([12, 13], 2, 0, 2),
    ([20, 21, 22, 23], 0, 1, NEW),
    ([30, 31, 32, 33, 34, 35, 36, 37, 38], 3, 2, 3),
    ([40, 41, 42], 1, 3, NEW),
    ([50, 51, 52, 53, 54], 4, 6, 3),
]


def _decode(model: MultiTaskModel) -> tuple[dict[int, list[int]], dict[int, list[torch.Tensor]]]:
    batch = DecodeBatch(model)
    tokens: dict[int, list[int]] = {}
    logits: dict[int, list[torch.Tensor]] = {}
    which: dict[int, int] = {}
    step = 0
    while step < 20 and (len(batch) or any(r[2] >= step for r in ROWS)):
        if len(batch):
            got = batch.step(slots=[ROWS[which[r]][1] for r in batch.ids])
            for j, (r, t) in enumerate(zip(batch.ids, got, strict=True)):
                tokens[which[r]].append(t)
                logits[which[r]].append(batch.logits[j].clone())
        joining = [i for i, r in enumerate(ROWS) if r[2] == step]
        if joining:
            first = batch.add([Prompt(ids=ROWS[i][0]) for i in joining], slots=[ROWS[i][1] for i in joining])
            for j, (i, (rid, t)) in enumerate(zip(joining, first, strict=True)):
                which[rid] = i
                tokens[i], logits[i] = [t], [batch.logits[j].clone()]
        batch.remove([r for r in batch.ids if len(tokens[which[r]]) >= ROWS[which[r]][3]])
        step += 1
    assert not len(batch)
    return tokens, logits


@pytest.mark.parametrize(
    "case,family",
    [pytest.param(c, f, id=f"{c.id}-{f}") for c in CASES for f in c.families if f in GENERATIVE],
)
def test_each_row_equals_its_task_alone(case, family):
    model = _model(case, family)
    tokens, logits = _decode(model)
    # Hugging Face's cache has no place for a decoder's tiny-attention keys
    cache = not (case.config["method"] == "tiny_attention" and model.spec.num_decoder_layers)
    for i, (prompt, slot, _, n) in enumerate(ROWS):
        assert tokens[i] == _alone_generate(model, prompt, slot, n, cache=cache), f"row {i} (slot {slot})"
        for k in range(n):
            ref = _alone_logits(model, prompt, slot, tokens[i][:k])
            diff = float((logits[i][k] - ref).abs().max())
            assert diff <= TOL, f"row {i} (slot {slot}) step {k}: logits differ by {diff:.3g}"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adapters_change_the_decode(family):
    """The equality above is not vacuous: the case's adapter moves the logits away from the backbone's."""
    model = _model(CASES[0], family)
    a = _alone_logits(model, ROWS[0][0], 1, [])
    b = _alone_logits(model, ROWS[0][0], 0, [])
    assert float((a - b).abs().max()) > 1e-2


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_tiny_attention_cache_follows_a_wider_adapter_loaded_mid_decode(family):
    """A decoder tiny-attention row keeps its tokens when a wider one (more heads, larger E) joins later.

    The second adapter is loaded between steps, so the bank's rows widen under the cached keys; the
    first row then leaves and the cache is trimmed to what the later row needs.
    """
    model = wrap(family, banks=BankConfig(slots=4))
    raws = [
        {"method": "tiny_attention", "attention_dim": 2, "num_heads": 1, "stacks": ["decoder"]},
        {
            "method": "tiny_attention",
            "attention_dim": 6,
            "num_heads": 3,
            "deploy": "multihead",
            "stacks": ["decoder"],
        },
    ]
    cfgs = [config_for(r, model.spec) for r in raws]
    model.load(1, cfgs[0], random_tensors(cfgs[0], model.spec, seed=3))
    batch = DecodeBatch(model)
    prompts = {1: [5, 6, 7, 8, 9, 10], 2: [40, 41]}
    tokens: dict[int, list[int]] = {}
    logits: dict[int, list[torch.Tensor]] = {}
    slot_of: dict[int, int] = {}

    def join(slot: int) -> int:
        (row, first), *_ = batch.add([Prompt(ids=prompts[slot])], slots=[slot])
        slot_of[row], tokens[row], logits[row] = slot, [first], [batch.logits[0].clone()]
        return row

    def step() -> None:
        for j, (r, t) in enumerate(
            zip(batch.ids, batch.step(slots=[slot_of[r] for r in batch.ids]), strict=True)
        ):
            tokens[r].append(t)
            logits[r].append(batch.logits[j].clone())

    a = join(1)
    for _ in range(3):
        step()
    model.load(2, cfgs[1], random_tensors(cfgs[1], model.spec, seed=4))
    b = join(2)
    for _ in range(2):
        step()
    batch.remove([a])
    for _ in range(3):
        step()
    for row in (a, b):
        slot = slot_of[row]
        assert tokens[row] == _alone_generate(model, prompts[slot], slot, 6, cache=False)
        for k, got in enumerate(logits[row]):
            ref = _alone_logits(model, prompts[slot], slot, tokens[row][:k])
            assert float((got - ref).abs().max()) <= TOL, f"slot {slot} step {k}"
    moved = _alone_logits(model, prompts[2], 2, tokens[b]) - _alone_logits(model, prompts[2], 0, tokens[b])
    assert float(moved.abs().max()) > 1e-2  # the adapter matters


def test_seed_gives_the_same_tokens_whatever_else_is_in_the_batch():
    model = wrap("gpt2", banks=BankConfig(slots=4))
    s = Sampling(temperature=1.5, top_p=0.95, seed=7)

    def run(prompts: list[list[int]]) -> list[int]:
        batch = DecodeBatch(model)
        samplings = [s] + [Sampling(temperature=1.0, seed=100 + k) for k in range(len(prompts) - 1)]
        first = batch.add(
            [Prompt(ids=p, sampling=q) for p, q in zip(prompts, samplings, strict=True)],
            slots=[0] * len(prompts),
        )
        out = [first[0][1]]
        for _ in range(7):
            out.append(batch.step(slots=[0] * len(batch))[0])
        return out

    alone = run([[5, 6, 7]])
    assert run([[5, 6, 7], [9, 9, 9, 9, 9], [3]]) == alone
    assert len(set(alone)) > 1  # sampled, not greedy
    other = Sampling(temperature=1.5, top_p=0.95, seed=8)
    batch = DecodeBatch(model)
    first = batch.add([Prompt(ids=[5, 6, 7], sampling=other)], slots=[0])
    assert [first[0][1]] + [batch.step(slots=[0])[0] for _ in range(7)] != alone


def test_filters_by_hand():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    # temperature 2: logits halved
    assert torch.allclose(filtered_logits(logits, Sampling(temperature=2.0)), logits / 2)
    # top-k 2 keeps the two largest
    x = filtered_logits(logits, Sampling(temperature=1.0, top_k=2))
    assert torch.isinf(x).tolist() == [False, False, True, True]
    # softmax of [2,1,0,-1] is about [0.644, 0.237, 0.087, 0.032]: top-p 0.7 keeps two, 0.6 keeps one
    p = torch.softmax(logits, -1)
    assert abs(float(p[0]) - 0.6439) < 1e-3
    assert torch.isinf(filtered_logits(logits, Sampling(temperature=1.0, top_p=0.7))).tolist() == [
        False,
        False,
        True,
        True,
    ]
    assert torch.isinf(filtered_logits(logits, Sampling(temperature=1.0, top_p=0.6))).tolist() == [
        False,
        True,
        True,
        True,
    ]
    assert torch.isinf(filtered_logits(logits, Sampling(temperature=1.0, top_p=0.9))).tolist() == [
        False,
        False,
        False,
        True,
    ]


def test_sampling_frequencies_follow_the_filtered_softmax():
    logits = torch.tensor([[1.0, 0.5, 0.0, -3.0]])
    s = Sampling(temperature=0.5, top_k=3, seed=0)
    g = torch.Generator().manual_seed(0)
    draws = [pick(logits, [s], [g])[0] for _ in range(4000)]
    # by hand: exp([2, 1, 0]) / sum = [0.665, 0.245, 0.090]; token 3 is cut by top-k
    want = [0.665, 0.245, 0.090, 0.0]
    for t, w in enumerate(want):
        assert abs(draws.count(t) / len(draws) - w) < 0.03
    assert pick(logits, [Sampling()], [g]) == [0]

"""Generation-task training on tiny T5, BART, GPT-2 and Llama models with a word-level tokenizer.

The loss is checked against the Hugging Face model's own `labels` loss (its shift, its ignored
positions), the learned outputs against the gold targets as the real app's predict route serves
them, and every method's written artifact against the trainer's own forward.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import load_artifact_dir
from integration.api_support import serving, word_tokenizer
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from adapters.backbone import Backbone
from adapters.model import MultiTaskModel
from adapters.training.cli import main as train_main
from adapters.training.data import Example, TaskData
from adapters.training.export import write_artifact
from adapters.training.generative import GENERATION_METRICS, TextPairs, lm_loss
from adapters.training.init import bank_config, init_tensors
from adapters.training.names import GENERATION, TRAINABLE_METHODS
from adapters.training.trainer import TrainOptions, build_config, train

WORDS = ["<pad>", "<unk>", "<eos>", *[f"w{i}" for i in range(40)]]
PAD, EOS = 0, 2


def tokenizer():
    """Whitespace words, no special tokens added: every id in a test is countable by hand."""
    return word_tokenizer(WORDS)


def model_of(family: str) -> torch.nn.Module:
    """A tiny random model of the family, initialised wide enough for greedy outputs to differ."""
    torch.manual_seed(0)
    common = {"vocab_size": len(WORDS), "pad_token_id": PAD, "eos_token_id": EOS}
    if family == "t5":
        cfg = T5Config(
            d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64, decoder_start_token_id=PAD, **common
        )
        return T5ForConditionalGeneration(cfg).eval()
    if family == "bart":
        cfg = BartConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            decoder_start_token_id=EOS,
            bos_token_id=EOS,
            forced_eos_token_id=None,
            **common,
        )
        return BartForConditionalGeneration(cfg).eval()
    if family == "gpt2":
        cfg = GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=EOS, initializer_range=0.3, **common
        )
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        bos_token_id=EOS,
        initializer_range=0.3,
        **common,
    )
    return LlamaForCausalLM(cfg).eval()


def backbone(family: str) -> Backbone:
    """The tiny model of `family` with the word tokenizer, as the trainer and the service load it."""
    return Backbone.from_model(model_of(family), tokenizer=tokenizer(), name=f"tiny-{family}")


def ids(text: str) -> list[int]:
    """Token ids of a text of `WORDS`, counted by hand (no special tokens)."""
    return [WORDS.index(w) for w in text.split()]


EXAMPLES = [
    Example("w1 w2 w3", "w3 w2 w1"),
    Example("w4 w5", "w5 w4"),
    Example("w6 w7 w8 w9", "w10"),
    Example("w11", "w12 w13"),
]


def task(examples=EXAMPLES) -> TaskData:
    """A generation task whose dev set is its training set (so memorising it is the goal)."""
    return TaskData("gen", list(examples), list(examples), GENERATION, [], GENERATION_METRICS)


def _padded(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


@pytest.mark.parametrize("family", ["t5", "bart", "gpt2", "llama"])
def test_the_loss_is_the_models_own_labels_loss(family: str) -> None:
    """With a zero adapter, our target loss equals the plain model's `labels=` loss on hand-built labels."""
    bb = backbone(family)
    config = build_config("lora", bb, kind=GENERATION, labels=[])
    model = MultiTaskModel(bb, banks=bank_config(config))
    tensors = init_tensors(config, model, generator=torch.Generator().manual_seed(0), options=TrainOptions())
    assert all(not v.any() for k, v in tensors.items() if k.endswith(".lora.B"))  # a zero adapter
    model.bind(config, tensors)
    data = TextPairs(tokenizer(), EXAMPLES, max_length=16, max_target_length=8, decoder_only=bb.decoder_only)
    with torch.no_grad():
        ours = lm_loss(model, data, range(len(EXAMPLES)))
    # the reference, from the examples' words alone: targets end with the end token; a decoder-only
    # row is prompt + target, with the prompt outside the loss
    prompts = [ids(e.text) for e in EXAMPLES]
    targets = [[*ids(e.label), EOS] for e in EXAMPLES]
    hf = model_of(family)
    if bb.decoder_only:
        rows = [p + t for p, t in zip(prompts, targets, strict=True)]
        labels = [[-100] * len(p) + t for p, t in zip(prompts, targets, strict=True)]
        inputs = _padded(rows, PAD)
        mask = _padded([[1] * len(r) for r in rows], 0)
    else:
        inputs, mask = _padded(prompts, PAD), _padded([[1] * len(p) for p in prompts], 0)
        labels = targets
    with torch.no_grad():
        ref = hf(input_ids=inputs, attention_mask=mask, labels=_padded(labels, -100)).loss
    assert torch.allclose(ours, ref, atol=1e-5), (float(ours), float(ref))


async def _served(
    tmp_path: Path, bb: Backbone, result, prompts: list[str], *, max_new_tokens: int
) -> list[str]:
    art = write_artifact(tmp_path / "artifact", result.config, result.tensors)
    async with serving(tmp_path, art, task="gen", backbone=bb) as client:
        body = {"inputs": prompts, "parameters": {"max_new_tokens": max_new_tokens}}
        resp = await client.post("/v1/tasks/gen/predict", json=body)
    assert resp.status_code == 200, resp.text
    return [o["generated_text"] for o in resp.json()["outputs"]]


@pytest.mark.asyncio
@pytest.mark.parametrize("family", ["t5", "gpt2"])
async def test_a_memorised_task_is_served_word_for_word(tmp_path: Path, family: str) -> None:
    """Trained until it has learned four mappings, the artifact's predict answers are the gold targets."""
    opts = TrainOptions(steps=50, batch_size=4, lr=1e-2, progress=False, eval_every=10**6)
    result = train(backbone(family), task(), method="parallel", options=opts)
    assert result.baseline["exact_match"] == 0.0
    assert result.dev["exact_match"] == 1.0 and result.dev["token_accuracy"] == 1.0, result.dev
    assert result.dev["loss"] < result.baseline["loss"]
    assert result.config.head is None  # the backbone's own LM head answers
    got = await _served(tmp_path, backbone(family), result, [e.text for e in EXAMPLES], max_new_tokens=6)
    assert got == [e.label for e in EXAMPLES]


@pytest.mark.parametrize("family", ["t5", "gpt2"])
@pytest.mark.parametrize("method", sorted(TRAINABLE_METHODS))
def test_every_method_trains_and_its_artifact_serves_the_trained_forward(
    tmp_path: Path, family: str, method: str
) -> None:
    """A few steps move the loss, and the written artifact gives the logits the trainer's tensors give."""
    opts = TrainOptions(steps=3, batch_size=4, lr=1e-2, progress=False)
    result = train(backbone(family), task(), method=method, options=opts)
    assert result.dev["loss"] != pytest.approx(result.baseline["loss"], abs=1e-6)
    art = write_artifact(tmp_path / method, result.config, result.tensors)
    served = MultiTaskModel(backbone(family))
    slot = 1
    load_artifact_dir(served, art, slot=slot)
    trained = MultiTaskModel(backbone(family), banks=bank_config(result.config))
    trained.bind(result.config, result.tensors)
    data = TextPairs(
        tokenizer(), EXAMPLES, max_length=16, max_target_length=8, decoder_only=served.backbone.decoder_only
    )
    batch = data.teacher_forced(range(len(EXAMPLES)))
    kw = {}
    if not served.backbone.decoder_only:
        kw["decoder_input_ids"] = served.backbone.model.prepare_decoder_input_ids_from_labels(
            labels=batch["labels"]
        )
    with torch.no_grad():
        want = trained.lm_forward(batch["input_ids"], batch["attention_mask"], **kw)
    got = served.logits(batch["input_ids"], batch["attention_mask"], [slot] * len(EXAMPLES), **kw)
    assert torch.allclose(got, want, atol=1e-5)


def test_a_generation_task_needs_a_generative_backbone() -> None:
    """A BERT encoder has no language-model head to write targets with."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS[3:]]
    bert = BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
        )
    )
    bb = Backbone.from_model(
        bert.eval(), tokenizer=BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}), name="bert"
    )
    with pytest.raises(ValueError, match="needs a generative backbone"):
        train(bb, task(), method="lora", options=TrainOptions(steps=1, progress=False))


def _saved(path: Path, family: str) -> Path:
    model_of(family).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def test_the_command_line_trains_a_generation_task_from_a_tsv(tmp_path: Path, capsys) -> None:
    """`adapterserve train --task-type generation` reads input and target columns and writes the artifact."""
    import json

    rows = "input\ttarget\n" + "".join(f"{e.text}\t{e.label}\n" for e in EXAMPLES)
    (tmp_path / "train.tsv").write_text(rows, encoding="utf-8")
    model_dir = _saved(tmp_path / "t5", "t5")
    out = tmp_path / "out"
    code = train_main(
        [
            "--train-file", str(tmp_path / "train.tsv"),
            "--dev-file", str(tmp_path / "train.tsv"),
            "--text-column", "input",
            "--label-column", "target",
            "--task-type", "generation",
            "--method", "lora",
            "--steps", "2",
            "--backbone", str(model_dir),
            "--out", str(out),
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["dev"]) >= {"exact_match", "token_accuracy", "loss", "score"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["method"] == "lora" and config.get("head") is None
    assert config["metadata"]["dev_metric"] == "exact_match+token_accuracy"


def test_an_empty_target_is_refused_with_its_file_and_line(tmp_path: Path, capsys) -> None:
    """A row with no target text stops the run before any step, naming where it is."""
    (tmp_path / "train.tsv").write_text("input\ttarget\nw1 w2\tw2\nw3\t \n", encoding="utf-8")
    model_dir = _saved(tmp_path / "gpt2", "gpt2")
    code = train_main(
        [
            "--train-file", str(tmp_path / "train.tsv"),
            "--text-column", "input",
            "--label-column", "target",
            "--task-type", "generation",
            "--method", "lora",
            "--backbone", str(model_dir),
            "--out", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "train.tsv, line 3" in err and "target" in err, err
    assert not (tmp_path / "out" / "adapter_config.json").exists()

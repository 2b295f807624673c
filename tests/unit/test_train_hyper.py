"""Hypernetwork training on a tiny BERT: multi-task learning, artifacts, and new-task-only training."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from adapters.backbone import Backbone, load_backbone
from adapters.model import BankConfig, MultiTaskModel
from adapters.training.data import Example, TaskData, glue_dir, load_glue
from adapters.training.hyper import (
    load_hypernetwork,
    train_hyper,
    train_task_embedding,
    write_hyper_artifacts,
)
from adapters.training.trainer import TrainOptions
from store.artifact import expected_tensors, parse_config
from store.safetensors_io import SafetensorsLimits, load_arrays

WORDS = ["the", "movie", "plot", "actor", "good", "bad", "not", "very", "fun", "long", "music", "it", "was"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
HYPER = {
    "bottleneck_dim": 8,
    "task_embedding_dim": 8,
    "layer_embedding_dim": 8,
    "site_embedding_dim": 4,
    "hidden_dim": 32,
    "projected_dim": 16,
}


def _backbone() -> Backbone:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)})
    return Backbone.from_model(BertModel(cfg).eval(), tokenizer=tok, name="tiny-bert")


def _task(name: str, word: str, *, seed: int, n: int = 320) -> TaskData:
    """A synthetic task: is `word` in the sentence? (Balanced; learnable from any token.)"""
    rng = random.Random(seed)
    others = [w for w in WORDS if w != word]

    def example(i: int) -> Example:
        words = rng.choices(others, k=rng.randint(3, 7))
        if i % 2:
            words.insert(rng.randrange(len(words) + 1), word)
        return Example(" ".join(words), "yes" if i % 2 else "no")

    data = [example(i) for i in range(n)]
    return TaskData(name, data[: n - 64], data[n - 64 :], "classification", ["no", "yes"], ("accuracy",))


def _regression(seed: int, n: int = 256) -> TaskData:
    """A synthetic regression: the number of times 'very' occurs."""
    rng = random.Random(seed)
    data = []
    for _ in range(n):
        k = rng.randint(0, 3)
        words = rng.choices(WORDS[:5], k=4) + ["very"] * k
        rng.shuffle(words)
        data.append(Example(" ".join(words), str(float(k))))
    return TaskData("count", data[: n - 64], data[n - 64 :], "regression", [], ("pearson", "spearman"))


OPTS = TrainOptions(
    steps=240, batch_size=16, lr=3e-3, eval_every=80, max_length=16, dropout=False, progress=False, seed=0
)


@pytest.fixture(scope="module")
def trained():
    backbone = _backbone()
    tasks = [_task("good", "good", seed=1), _task("fun", "fun", seed=2), _regression(seed=3)]
    result = train_hyper(backbone, tasks, name="tiny", hyper=HYPER, options=OPTS, temperature=2.0)
    return backbone, tasks, result


def test_multi_task_training_learns_every_task(trained):
    _, _, result = trained
    history = result.history
    assert [h["step"] for h in history] == [80, 160, 240]
    # mean training loss per evaluation window, all tasks mixed
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    dev = {t.name: t.dev for t in result.tasks}
    assert dev["good"]["accuracy"] >= 0.9 and dev["fun"]["accuracy"] >= 0.9
    assert dev["count"]["pearson"] >= 0.8
    # the mean over tasks of the kept checkpoint is the best one seen
    assert result.mean_score == pytest.approx(max(h["score"] for h in history), abs=1e-6)


def test_artifacts_round_trip_and_serve_what_was_evaluated(trained, tmp_path, monkeypatch):
    backbone, tasks, result = trained
    root = write_hyper_artifacts(tmp_path / "out", result, name="tiny")
    assert sorted(p.name for p in root.iterdir()) == ["count", "fun", "good", "hypernetworks"]
    name, net = load_hypernetwork(root / "hypernetworks" / "tiny", backbone=backbone)
    assert name == "tiny" and net.config.variant == "hyperformer++"
    # by name: the current version in the local store
    from store.local import LocalStore

    hdir = root / "hypernetworks" / "tiny"
    LocalStore(tmp_path / "store").put_version(
        "hypernetworks",
        "tiny",
        config_bytes=(hdir / "hypernetwork_config.json").read_bytes(),
        weights_src=hdir / "hypernetwork.safetensors",
    )
    monkeypatch.setenv("ADAPTERSERVE_STORE", str(tmp_path / "store"))
    _, by_name = load_hypernetwork("tiny", backbone=backbone)
    for k, v in net.state_tensors().items():
        assert torch.equal(by_name.state_tensors()[k], v)
    with pytest.raises(FileNotFoundError):
        load_hypernetwork("nope", backbone=backbone)
    # a task artifact in a hypernetwork's place
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "hypernetwork_config.json").write_bytes((root / "good" / "adapter_config.json").read_bytes())
    with pytest.raises(ValueError, match="not a hypernetwork"):
        load_hypernetwork(fake, backbone=backbone)
    cfg = parse_config((root / "good" / "adapter_config.json").read_bytes())
    assert cfg.method == "hyperformer" and cfg.hypernetwork == "tiny"
    arrays = load_arrays(root / "good" / "adapter.safetensors", limits=SafetensorsLimits())
    assert {k: tuple(v.shape) for k, v in arrays.items()} == expected_tensors(cfg, backbone.spec)
    meta = json.loads((root / "good" / "adapter_config.json").read_text())["metadata"]
    assert meta["dev_accuracy"] >= 0.9 and meta["dev_examples"] == len(tasks[0].dev)
    assert meta["baseline_accuracy"] == pytest.approx(0.5, abs=0.05)  # balanced synthetic task
    # the served model (slot banks, generated on load) answers as the trainer evaluated
    model = MultiTaskModel(_backbone(), banks=BankConfig(slots=4))
    model.load(1, cfg, {k: torch.from_numpy(v) for k, v in arrays.items()}, hypernetwork=net)
    tok = model.backbone.tokenizer
    dev = tasks[0].dev
    enc = tok([e.text for e in dev], padding=True, return_tensors="pt")
    logits = model.classify(enc["input_ids"], enc["attention_mask"], [1] * len(dev)).logits[:, :2]
    acc = sum(int(p) == (e.label == "yes") for p, e in zip(logits.argmax(-1), dev, strict=True)) / len(dev)
    assert acc == pytest.approx(result.tasks[0].dev["accuracy"], abs=1 / len(dev))


def test_new_task_trains_only_its_embedding_and_head(trained):
    _, _, result = trained
    backbone = _backbone()  # each run wraps its own backbone
    _, net = load_hypernetwork_from(result, backbone)
    frozen = {k: v.clone() for k, v in net.state_tensors().items()}
    # wrapping renames the backbone's parameters, so they are tracked by identity
    base = {id(p): p.detach().clone() for p in backbone.model.parameters()}
    new = _task("bad", "bad", seed=4)
    opts = TrainOptions(steps=120, batch_size=16, lr=3e-2, eval_every=60, max_length=16, progress=False)
    task = train_task_embedding(backbone, new, hypernetwork=net, name="tiny", options=opts)
    assert set(task.tensors) == {"task_embedding", "head.out.weight", "head.out.bias"}
    assert task.tensors["task_embedding"].shape == (HYPER["task_embedding_dim"],)
    for k, v in net.state_tensors().items():
        assert torch.equal(v, frozen[k]), k
    after = list(backbone.model.parameters())
    assert {id(p) for p in after} == set(base)
    assert all(torch.equal(p, base[id(p)]) and p.grad is None for p in after)
    assert task.config.hypernetwork == "tiny"
    assert task.dev["accuracy"] >= 0.85


def load_hypernetwork_from(result, backbone):
    """The trained hypernetwork as serving builds it (frozen, from its artifact tensors)."""
    from adapters.hypernet import Hypernetwork

    return "tiny", Hypernetwork.from_tensors(result.config, result.tensors, backbone.spec)


def test_command_line_registers_both_entry_points():
    from service.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(
        ["train-hyper", "--glue", "SST-2,MRPC", "--out", "o", "--temperature", "2", "--steps", "5"]
    )
    assert args.func.__name__ == "run_train_hyper" and args.temperature == 2.0
    args = parser.parse_args(
        [
            "train-hyper",
            "--glue",
            "SST-2",
            "--out",
            "o",
            "--label-names",
            "SST-2=neg,pos",
            "--label-names",
            "x=y",
        ]
    )
    assert args.label_names == ["SST-2=neg,pos", "x=y"]
    args = parser.parse_args(["train", "--hypernetwork", "glue", "--glue", "RTE", "--out", "o"])
    assert args.hypernetwork == "glue" and args.method is None


def test_the_default_learning_rate_scales_with_the_conditioning_width():
    """Generated weights move about lr * projected_dim per step, so the default keeps that product."""
    from adapters.training.hyper import HYPER_LR, default_lr

    def config(width: int):
        return parse_config({"method": "hypernetwork", "backbone_fingerprint": "x", "projected_dim": width})

    assert default_lr(config(64)) == pytest.approx(HYPER_LR) == pytest.approx(3e-4)
    assert default_lr(config(16)) == pytest.approx(4 * HYPER_LR)
    # a run without --lr records the rate it used
    opts = TrainOptions(steps=2, batch_size=8, max_length=16, progress=False, seed=0)
    result = train_hyper(_backbone(), [_task("good", "good", seed=1)], name="tiny", hyper=HYPER, options=opts)
    assert result.config.metadata["learning_rate"] == pytest.approx(HYPER_LR * 64 / HYPER["projected_dim"])


@pytest.mark.minilm
@pytest.mark.skipif(
    not (glue_dir() / "SST-2").is_dir(),
    reason=f"GLUE data not found at {glue_dir()} (set ADAPTERSERVE_GLUE_DIR)",
)
def test_default_hypernetwork_learns_a_regression_and_a_classification_task_jointly(every_core):
    """SST-2 + STS-B on MiniLM at the default widths and learning rate: both tasks learn.

    At the former default rate (1e-3) the shared generator overshot within 20 steps and both
    tasks ended near chance after these 80 steps (SST-2 accuracy 0.53, STS-B Pearson 0.22); at
    3e-4 they reach 0.625 and 0.79 (the majority class is 0.51 on these 200 dev examples), with
    one intra-op thread or two alike.
    """
    opts = TrainOptions(
        steps=80,
        max_train_examples=500,
        max_dev_examples=200,
        max_length=64,
        eval_every=80,
        dropout=False,
        progress=False,
        seed=0,
    )
    tasks = [load_glue("SST-2"), load_glue("STS-B")]
    result = train_hyper(load_backbone(device="cpu", dtype="float32"), tasks, name="glue", options=opts)
    dev = {t.name: t.dev for t in result.tasks}
    assert dev["sst-2"]["accuracy"] >= 0.6, dev
    assert dev["sts-b"]["pearson"] >= 0.6, dev


@pytest.mark.skipif(
    not (glue_dir() / "SST-2").is_dir(),
    reason=f"GLUE data not found at {glue_dir()} (set ADAPTERSERVE_GLUE_DIR)",
)
@pytest.mark.parametrize(
    ("flag", "says"),
    [
        ("MRPC=a,b", "one of the --glue tasks"),
        ("SST-2", "TASK=NAMES"),
        ("SST-2=a,a", "distinct, non-empty names"),
        ("STS-B=a,b", "regression"),
    ],
)
def test_train_hyper_refuses_bad_label_names_before_loading_a_backbone(flag, says, tmp_path, capsys):
    from service.cli import build_parser

    args = build_parser().parse_args(
        ["train-hyper", "--glue", "SST-2,STS-B", "--out", str(tmp_path / "o"), "--label-names", flag]
    )
    assert args.func(args) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

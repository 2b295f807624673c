"""The trainer on tiny in-process backbones: it learns, it is deterministic, and what it writes serves.

Every run trains through the serving banks of a fresh tiny BERT (hidden 32, 2 layers) with a
word-level tokenizer, on synthetic tasks a sentiment word decides.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import identity_tensors, tiny_bert
from integration.api_support import app_client
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef
from transformers import BertTokenizerFast

from adapters.backbone import Backbone, load_backbone
from adapters.methods import METHODS
from adapters.model import BankConfig, MultiTaskModel
from adapters.training.cli import main
from adapters.training.data import (
    GLUE_TASKS,
    Batches,
    Example,
    TaskData,
    compute_metrics,
    glue_dir,
    infer_task,
    load_glue,
    read_examples,
    tokenize,
)
from adapters.training.export import write_artifact
from adapters.training.trainer import TrainOptions, predict, train
from service.settings import Settings
from store.artifact import parse_config
from store.local import LocalStore
from store.safetensors_io import SafetensorsLimits, load_arrays

POSITIVE = ["good", "great"]
NEGATIVE = ["bad", "awful"]
FILLER = [
    "the",
    "a",
    "movie",
    "film",
    "plot",
    "was",
    "is",
    "it",
    "this",
    "story",
    "and",
    "very",
    "so",
    "music",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + FILLER + POSITIVE + NEGATIVE
ADMIN = "admin-key-0123456789abcdef"


def tokenizer() -> BertTokenizerFast:
    """A word-level BERT tokenizer over the synthetic vocabulary."""
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)})


def backbone(seed: int = 0) -> Backbone:
    """A fresh tiny BERT (training wraps its projections, so one per run)."""
    return Backbone.from_model(tiny_bert(seed), tokenizer=tokenizer(), name="tiny-bert")


def _sentence(rng: random.Random, words: list[str]) -> str:
    out = [rng.choice(FILLER) for _ in range(rng.randint(1, 4))]
    for w in words:
        out.insert(rng.randint(0, len(out)), w)
    return " ".join(out)


def sentiment(n: int, *, seed: int) -> list[Example]:
    """Sentences with one sentiment word among fillers; the word decides the label."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pos = rng.random() < 0.5
        word = rng.choice(POSITIVE if pos else NEGATIVE)
        out.append(Example(text=_sentence(rng, [word]), label="positive" if pos else "negative"))
    return out


def similarity(n: int, *, seed: int) -> list[Example]:
    """Sentence pairs whose target (a float) is the number of positive words in both."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k_a, k_b = rng.randint(0, 2), rng.randint(0, 2)
        a = _sentence(rng, [rng.choice(POSITIVE) for _ in range(k_a)])
        b = _sentence(rng, [rng.choice(POSITIVE) for _ in range(k_b)])
        out.append(Example(text=a, text_pair=b, label=f"{float(k_a + k_b):.1f}"))
    return out


def sentiment_task(n_train: int = 512) -> TaskData:
    """The binary sentiment task (512 training and 128 dev sentences by default)."""
    return TaskData(
        "synthetic",
        sentiment(n_train, seed=1),
        sentiment(128, seed=2),
        "classification",
        ["negative", "positive"],
        ("accuracy",),
    )


FAST = {"batch_size": 32, "max_length": 16, "progress": False}
# Tiny random backbones need steps larger than MiniLM's defaults to converge in a few hundred steps.
LR = dict.fromkeys(("bottleneck", "compacter", "ia3", "layernorm", "mh_parallel", "prefix"), 3e-2)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_learns_a_separable_task(method: str) -> None:
    """Loss falls, dev accuracy reaches 95% within 80 steps, and the adapter itself changes outputs."""
    bb = backbone()
    opts = TrainOptions(steps=80, eval_every=40, lr=LR.get(method, 1e-2), seed=0, **FAST)
    result = train(bb, sentiment_task(256), method=method, options=opts)
    losses = [h["loss"] for h in result.history]
    # from chance (ln 2 = 0.69 for two balanced classes) to well below it
    assert losses[-1] < losses[0] and losses[-1] < 0.4, losses
    assert result.dev["accuracy"] >= 0.95, result.history
    assert result.steps == 80 and result.config.metadata["dev_accuracy"] == pytest.approx(
        result.dev["accuracy"]
    )
    # the head alone does not explain the accuracy: with the adapter replaced by its identity the
    # same head gives different logits
    model = MultiTaskModel(backbone(), banks=BankConfig(slots=2))
    data = tokenize(
        tokenizer(),
        sentiment(32, seed=3),
        max_length=16,
        kind="classification",
        labels=["negative", "positive"],
    )
    ids, mask, _ = Batches(data, batch_size=32, pad_id=0).collate(range(32))
    heads = {k: v for k, v in result.tensors.items() if k.startswith("head.")}
    model.load(1, result.config, result.tensors)
    trained = model.classify(ids, mask, [1] * 32).logits
    model.load(1, result.config, identity_tensors(result.config, model.backbone) | heads)
    plain = model.classify(ids, mask, [1] * 32).logits
    assert (trained - plain).abs().max() > 1e-2


def test_full_fine_tuning_learns_and_writes_no_artifact() -> None:
    """`full` trains the whole backbone as a baseline: it learns, reports 100%+ parameters, serves nothing."""
    bb = backbone()
    result = train(bb, sentiment_task(), method="full", options=TrainOptions(steps=80, lr=3e-3, **FAST))
    assert result.dev["accuracy"] >= 0.95
    assert result.config is None and result.tensors is None
    assert result.trainable_percent > 100.0
    assert not any(p.requires_grad for p in bb.model.parameters())


def test_regression_target() -> None:
    """Float targets train a regression head: Pearson on dev > 0.9, and values come back as `value`."""
    train_ex, dev_ex = similarity(512, seed=4), similarity(128, seed=5)
    kind, labels = infer_task([e.label for e in train_ex])
    assert (kind, labels) == ("regression", [])
    task = TaskData("pairs", train_ex, dev_ex, kind, labels, ("pearson", "spearman"))
    result = train(backbone(), task, method="lora", options=TrainOptions(steps=100, lr=1e-2, **FAST))
    assert result.config.head.type == "regression"
    assert result.dev["pearson"] > 0.9, result.history
    assert result.baseline["pearson"] == 0.0  # a constant prediction has no correlation
    out = predict(
        MultiTaskModel(backbone(), banks=BankConfig(slots=2)),
        result.config,
        result.tensors,
        tokenize(tokenizer(), dev_ex[:4], max_length=16, kind=kind, labels=labels),
    )
    assert all(set(o) == {"value"} for o in out)


def test_seed_makes_runs_identical() -> None:
    """Two runs with one seed give bit-identical tensors (dropout on); another seed does not."""

    def run(seed: int) -> dict[str, torch.Tensor]:
        opts = TrainOptions(steps=12, seed=seed, **FAST)
        return train(backbone(), sentiment_task(128), method="prefix", options=opts).tensors

    a, b, c = run(7), run(7), run(8)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_early_stopping_ends_the_run_when_dev_stops_improving() -> None:
    """With a learning rate too small to change anything, the second evaluation is stale: stop there."""
    opts = TrainOptions(steps=50, eval_every=2, patience=1, lr=1e-12, **FAST)
    result = train(backbone(), sentiment_task(64), method="lora", options=opts)
    assert result.steps == 4 and [h["step"] for h in result.history] == [2, 4]


def test_layernorm_overrides_train_with_the_adapter() -> None:
    """--train-layernorm adds per-task norms to the artifact, starting from the backbone's and moving."""
    bb = backbone()
    base = {n: p.detach().clone() for n, p in bb.model.named_parameters() if "LayerNorm" in n}
    opts = TrainOptions(steps=10, lr=1e-2, train_layernorm=True, **FAST)
    result = train(bb, sentiment_task(64), method="lora", options=opts)
    norms = {k: v for k, v in result.tensors.items() if k.endswith(("_ln.weight", "_ln.bias"))}
    assert result.config.layernorm and len(norms) == 2 * 2 * 2  # 2 layers x (attn, ffn) x (weight, bias)
    assert not any(
        torch.equal(norms[k], b) for k in norms for b in base.values() if b.shape == norms[k].shape
    )
    # the backbone's own norms (wrapped by the banks, hence `.base.`) are left as they were
    after = {n.replace(".base.", "."): p for n, p in bb.model.named_parameters() if "LayerNorm" in n}
    assert after.keys() == base.keys() and all(torch.equal(after[n], base[n]) for n in base)


def test_a_backbone_trains_once() -> None:
    """Training wraps the backbone's projections; a second run on it is refused, not silently wrong."""
    bb = backbone()
    train(bb, sentiment_task(64), method="lora", options=TrainOptions(steps=1, **FAST))
    with pytest.raises(ValueError, match="fresh"):
        train(bb, sentiment_task(64), method="lora", options=TrainOptions(steps=1, **FAST))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("method", "hyper", "pairs"),
    [
        ("tiny_attention", {"num_heads": 2}, False),
        ("compacter", {}, True),
        ("prefix", {"prefix_length": 4}, True),
    ],
)
async def test_artifact_round_trips_and_serves_the_trainers_predictions(
    tmp_path: Path, method: str, hyper: dict, pairs: bool
) -> None:
    """Written, stored in a LocalStore, decoded and served through the ASGI app: the trainer's own outputs."""
    if pairs:
        examples = similarity(256, seed=6)
        task = TaskData("pairs", examples, similarity(64, seed=7), "regression", [], ("pearson",))
    else:
        task = sentiment_task(256)
    result = train(
        backbone(), task, method=method, hyper=hyper, options=TrainOptions(steps=40, lr=5e-3, **FAST)
    )
    art = write_artifact(tmp_path / "artifact", result.config, result.tensors)
    assert parse_config((art / "adapter_config.json").read_bytes()) == result.config
    arrays = load_arrays(art / "adapter.safetensors", limits=SafetensorsLimits())
    assert all(np.array_equal(arrays[k], v.numpy()) for k, v in result.tensors.items())

    store = LocalStore(tmp_path / "store")
    store.put_version(
        "tasks",
        "demo",
        config_bytes=(art / "adapter_config.json").read_bytes(),
        weights_src=art / "adapter.safetensors",
    )
    inputs = [[e.text, e.text_pair] for e in task.dev[:16]] if pairs else [e.text for e in task.dev[:16]]
    data = tokenize(tokenizer(), task.dev[:16], max_length=64, kind=task.kind, labels=task.labels)
    want = predict(MultiTaskModel(backbone(), banks=BankConfig(slots=2)), result.config, result.tensors, data)

    settings = Settings(store=tmp_path / "store", admin_keys=[ADMIN], seed_dir=None, max_wait_ms=1.0, slots=4)
    async with app_client(settings, backbone=backbone()) as client:
        resp = await client.post("/v1/tasks/demo/predict", json={"inputs": inputs})
    assert resp.status_code == 200, resp.text
    got = resp.json()["outputs"]
    for g, w in zip(got, want, strict=True):
        assert g.get("label") == w.get("label")
        for field in ("score", "value"):
            if field in w:
                assert g[field] == pytest.approx(w[field], abs=1e-4)


# -- the command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny BERT and its tokenizer saved as a Hugging Face model directory."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert(0).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def _write_csv(path: Path, examples: list[Example]) -> Path:
    rows = ["review,sentiment"] + [f'"{e.text}",{e.label}' for e in examples]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_cli_trains_from_csv(tmp_path: Path, model_dir: Path, capsys) -> None:
    """`adapterserve train` on CSV files writes a valid artifact whose metadata holds the dev metric."""
    train_csv = _write_csv(tmp_path / "train.csv", sentiment(256, seed=1))
    dev_csv = _write_csv(tmp_path / "dev.csv", sentiment(64, seed=2))
    out = tmp_path / "out"
    argv = ["--train-file", str(train_csv), "--dev-file", str(dev_csv), "--text-column", "review"]
    argv += ["--label-column", "sentiment", "--method", "lora", "--rank", "4"]
    argv += ["--steps", "80", "--lr", "1e-2", "--batch-size", "32"]
    argv += ["--backbone", str(model_dir), "--out", str(out), "--no-progress", "--task", "reviews"]
    argv += ["--label-names", "neg,pos"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    config = parse_config((out / "adapter_config.json").read_bytes())
    # the CSV's labels sort to negative, positive; --label-names renames them in that order
    assert config.r == 4 and list(config.head.labels) == ["neg", "pos"]
    assert config.metadata["baseline_accuracy"] < 0.7
    assert config.backbone_fingerprint == load_backbone(model_dir, device="cpu").spec.fingerprint
    assert config.metadata["task"] == "reviews" and config.metadata["dev_metric"] == "accuracy+f1+matthews"
    assert report["dev"]["accuracy"] == pytest.approx(config.metadata["dev_accuracy"], abs=1e-6)
    assert report["dev"]["accuracy"] > 0.9


def test_cli_trains_regression_pairs_from_jsonl(tmp_path: Path, model_dir: Path, capsys) -> None:
    """A JSONL file with pairs and float targets trains a regression head."""
    path = tmp_path / "pairs.jsonl"
    lines = [
        json.dumps({"a": e.text, "b": e.text_pair, "y": float(e.label)}) for e in similarity(128, seed=8)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = [
        "--train-file",
        str(path),
        "--dev-file",
        str(path),
        "--text-column",
        "a",
        "--text-pair-column",
        "b",
    ]
    argv += ["--label-column", "y", "--method", "bottleneck", "--bottleneck-dim", "8", "--steps", "10"]
    argv += ["--backbone", str(model_dir), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    config = parse_config((out / "adapter_config.json").read_bytes())
    assert config.head.type == "regression" and config.bottleneck_dim == 8
    assert set(report["dev"]) == {"pearson", "spearman", "score"}


def test_cli_refuses_bad_label_names(tmp_path: Path, model_dir: Path, capsys) -> None:
    """--label-names must name every label of the file."""
    train_csv = _write_csv(tmp_path / "train.csv", sentiment(8, seed=1))
    argv = ["--train-file", str(train_csv), "--text-column", "review", "--label-column", "sentiment"]
    argv += [
        "--method",
        "lora",
        "--backbone",
        str(model_dir),
        "--out",
        str(tmp_path / "o"),
        "--label-names",
        "negative,neutral",
    ]
    assert main(argv) == 2
    assert "column 'sentiment': label 'positive' is not one of --label-names" in capsys.readouterr().err


def test_cli_trains_without_a_dev_file(tmp_path: Path, model_dir: Path, capsys) -> None:
    """No --dev-file: training runs to the last step and the artifact is written, with no dev scores."""
    train_csv = _write_csv(tmp_path / "train.csv", sentiment(32, seed=1))
    out = tmp_path / "out"
    argv = ["--train-file", str(train_csv), "--text-column", "review", "--label-column", "sentiment"]
    argv += ["--method", "lora", "--rank", "2", "--steps", "3", "--backbone", str(model_dir)]
    argv += ["--out", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dev"] == {} and report["steps"] == 3
    config = parse_config((out / "adapter_config.json").read_bytes())
    assert config.r == 2 and "dev_accuracy" not in config.metadata


def test_cli_refuses_a_run_without_output(tmp_path: Path, model_dir: Path, capsys) -> None:
    """An adapter run with neither --out nor --upload would be lost: exit 2 before training."""
    train_csv = _write_csv(tmp_path / "train.csv", sentiment(8, seed=1))
    assert main(["--train-file", str(train_csv), "--method", "lora", "--backbone", str(model_dir)]) == 2
    assert "--out" in capsys.readouterr().err


# -- data: readers and metrics --------------------------------------------------------------------


def test_readers_and_label_inference(tmp_path: Path) -> None:
    """CSV with quotes, TSV with quoting off, JSONL with numbers; labels as strings or numbers."""
    csv_path = tmp_path / "x.csv"
    csv_path.write_text('text,label\n"a, quoted ""one""",pos\nplain,neg\n', encoding="utf-8")
    ex = read_examples(csv_path, text_column="text", label_column="label")
    assert ex == [Example('a, quoted "one"', "pos"), Example("plain", "neg")]
    tsv_path = tmp_path / "x.tsv"
    tsv_path.write_text('s\t"odd quote\t2\nt\tx\t10\n', encoding="utf-8")
    ex = read_examples(tsv_path, text_column="0", text_pair_column="1", label_column="2", header=False)
    assert ex[0] == Example("s", "2", text_pair='"odd quote')
    assert infer_task([e.label for e in ex]) == ("classification", ["2", "10"])
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"t": "a", "y": 1}\n{"t": "b", "y": true}\n{"t": "c", "y": 0}\n\n', encoding="utf-8")
    assert [e.label for e in read_examples(jsonl, text_column="t", label_column="y")] == ["1", "1", "0"]
    assert infer_task(["1", "0"]) == ("classification", ["0", "1"])
    assert infer_task(["3.8", "4"]) == ("regression", [])
    with pytest.raises(ValueError, match=r"line 1, column .missing.: missing from this JSON object"):
        read_examples(jsonl, text_column="missing", label_column="y")
    with pytest.raises(ValueError, match="two distinct"):
        infer_task(["a", "a"])


def test_metrics_match_the_reference_implementations() -> None:
    """Accuracy, F1, Matthews, Pearson and Spearman (with ties) agree with scikit-learn and SciPy."""
    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    pred[:120] = gold[:120]
    m = compute_metrics(pred, gold, metrics=("accuracy", "f1", "matthews"))
    assert m["accuracy"] == pytest.approx((pred == gold).mean())
    assert m["f1"] == pytest.approx(f1_score(gold, pred))
    assert m["matthews"] == pytest.approx(matthews_corrcoef(gold, pred))
    assert m["score"] == pytest.approx((m["accuracy"] + m["f1"] + m["matthews"]) / 3)
    x, y = rng.integers(0, 5, 100).astype(float), rng.normal(size=100)
    r = compute_metrics(x, y + x, metrics=("pearson", "spearman"))
    assert r["pearson"] == pytest.approx(pearsonr(x, y + x)[0])
    assert r["spearman"] == pytest.approx(spearmanr(x, y + x)[0])


# -- GLUE ------------------------------------------------------------------------------------------

GLUE_SIZES = {
    "SST-2": (67349, 872),
    "MRPC": (3668, 408),
    "CoLA": (8551, 1043),
    "RTE": (2490, 277),
    "STS-B": (5749, 1500),
}


@pytest.mark.skipif(
    not (glue_dir() / "SST-2").is_dir(),
    reason=f"GLUE data not found at {glue_dir()} (set ADAPTERSERVE_GLUE_DIR)",
)
@pytest.mark.parametrize("name", sorted(GLUE_TASKS))
def test_glue_tasks_load(name: str) -> None:
    """Every GLUE task reads completely, with the right kind, labels and pairs, and tokenizes."""
    task = load_glue(name.lower())
    assert (len(task.train), len(task.dev)) == GLUE_SIZES[name]
    spec = GLUE_TASKS[name]
    assert (task.kind == "regression") == spec.regression
    assert all((e.text_pair is not None) == (spec.pair is not None) for e in task.dev)
    if task.kind == "regression":
        assert all(0.0 <= float(e.label) <= 5.0 for e in task.dev)
    else:
        assert {e.label for e in task.train} == set(task.labels)
    data = tokenize(tokenizer(), task.dev[:8], max_length=32, kind=task.kind, labels=task.labels)
    assert len(data) == 8
    # the second text of a pair is segment 1, as the service encodes it
    assert any(1 in t for t in data.types) == (spec.pair is not None)

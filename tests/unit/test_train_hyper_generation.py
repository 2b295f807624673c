"""Hypernetwork training of generation tasks: one shared generator writes every task's adapters.

Two tasks read the same prompts and must write different answers (the words reversed, the first
word), so only the task embedding tells them apart. The answers are checked against the gold
targets as the real app serves the written seed directory, on T5 (encoder and decoder generators)
and GPT-2 (decoder only).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from integration.api_support import app_client
from test_train_generation import EXAMPLES, _saved, backbone

from adapters.training.data import Example, TaskData
from adapters.training.generative import GENERATION_METRICS
from adapters.training.hyper import (
    load_hypernetwork,
    train_hyper,
    train_task_embedding,
    write_hyper_artifacts,
)
from adapters.training.names import GENERATION
from adapters.training.trainer import TrainOptions
from service.cli import main as cli_main

STEPS = 300


def _task(name: str, answer) -> TaskData:
    examples = [Example(e.text, answer(e.text.split())) for e in EXAMPLES]
    return TaskData(name, examples, examples, GENERATION, [], GENERATION_METRICS)


def tasks() -> list[TaskData]:
    """The same four prompts, two answers: the words reversed, and the first word."""
    return [_task("rev", lambda w: " ".join(reversed(w))), _task("first", lambda w: w[0])]


@pytest.fixture(scope="module", params=["t5", "gpt2"])
def trained(request):
    family = request.param
    opts = TrainOptions(steps=STEPS, batch_size=4, lr=1e-2, progress=False, eval_every=STEPS // 4)
    return family, train_hyper(backbone(family), tasks(), name="gen", options=opts)


def test_one_hypernetwork_learns_two_generation_tasks_over_the_same_prompts(trained) -> None:
    """Both tasks are memorised, so the generated adapters differ by task; the plain backbone knows neither."""
    _, result = trained
    for t in result.tasks:
        assert t.dev["exact_match"] == 1.0, (t.name, t.dev)
        assert t.config.method == "hyperformer" and t.config.head is None
        meta = t.config.metadata
        assert meta["baseline_exact_match"] == 0.0 and meta["dev_exact_match"] == 1.0


def _seeded(tmp_path: Path, seed: Path, bb):
    """The real app (ASGI, in process) seeded from a directory laid out by `write_hyper_artifacts`."""
    from service.settings import Settings

    return app_client(
        Settings(store=tmp_path / "store", seed_dir=seed, max_wait_ms=1.0, slots=4), backbone=bb
    )


@pytest.mark.asyncio
async def test_the_seed_directory_serves_each_task_word_for_word(trained, tmp_path: Path) -> None:
    """Written out and seeded into a fresh server, each task answers its own gold targets."""
    family, result = trained
    root = write_hyper_artifacts(tmp_path / "out", result, name="gen")
    prompts = [e.text for e in EXAMPLES]
    async with _seeded(tmp_path, root, backbone(family)) as client:
        for t in tasks():
            body = {"inputs": prompts, "parameters": {"max_new_tokens": 6}}
            resp = await client.post(f"/v1/tasks/{t.name}/predict", json=body)
            assert resp.status_code == 200, resp.text
            assert [o["generated_text"] for o in resp.json()["outputs"]] == [e.label for e in t.dev]


def test_a_new_generation_task_learns_its_embedding_on_the_frozen_hypernetwork(trained, tmp_path) -> None:
    """Only the new task's embedding trains; its target loss falls below the plain backbone's."""
    family, result = trained
    root = write_hyper_artifacts(tmp_path / "out", result, name="gen")
    bb = backbone(family)
    name, net = load_hypernetwork(root / "hypernetworks" / "gen", backbone=bb)
    before = {k: v.clone() for k, v in net.state_tensors().items()}
    new = _task("last", lambda w: w[-1])
    opts = TrainOptions(steps=40, batch_size=4, lr=5e-2, progress=False, eval_every=40)
    got = train_task_embedding(bb, new, hypernetwork=net, name=name, options=opts)
    assert set(got.tensors) == {"task_embedding"}  # no head: the backbone's LM head writes
    assert got.dev["loss"] < got.config.metadata["baseline_loss"]
    assert all((net.state_tensors()[k] == v).all() for k, v in before.items())


def test_train_hyper_reads_generation_tasks_from_files(tmp_path: Path, capsys) -> None:
    """`train-hyper --task NAME=TRAIN,DEV --task-type generation` writes the seed layout it reports."""
    files = []
    for t in tasks():
        path = tmp_path / f"{t.name}.tsv"
        path.write_text(
            "input\ttarget\n" + "".join(f"{e.text}\t{e.label}\n" for e in t.train), encoding="utf-8"
        )
        files += ["--task", f"{t.name}={path},{path}"]
    out = tmp_path / "out"
    code = cli_main(
        [
            "train-hyper", *files,
            "--text-column", "input",
            "--label-column", "target",
            "--task-type", "generation",
            "--steps", "2",
            "--backbone", str(_saved(tmp_path / "t5", "t5")),
            "--out", str(out),
            "--name", "gen",
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["tasks"]) == {"rev", "first"}
    assert all(set(d) >= set(GENERATION_METRICS) for d in report["tasks"].values())
    assert sorted(p.name for p in out.iterdir()) == ["first", "hypernetworks", "rev"]
    config = json.loads((out / "rev" / "adapter_config.json").read_text())
    assert (
        config["method"] == "hyperformer" and config["hypernetwork"] == "gen" and config.get("head") is None
    )


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        ([], "give --glue TASKS or --task"),
        (["--task", "rev"], "expected NAME=TRAIN"),
    ],
)
def test_train_hyper_refuses_missing_or_malformed_tasks(flags, says, tmp_path: Path, capsys) -> None:
    """Refused before any backbone is loaded, with the reason."""
    assert cli_main(["train-hyper", *flags, "--out", str(tmp_path / "out")]) == 2
    assert says in capsys.readouterr().err

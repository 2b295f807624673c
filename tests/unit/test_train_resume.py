"""Resumable training: a run interrupted after N steps and resumed ends with the uninterrupted run's weights.

Both runs use the same seed on fresh tiny BERTs; dropout stays on, so the resumed run must also
restore the random generators (data order and dropout masks), the AdamW moments and the schedule.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_train import backbone, sentiment_task

from adapters.training.checkpoint import CHECKPOINT_DIR
from adapters.training.progress import METRICS_FILE
from adapters.training.trainer import TrainOptions, train

# 16 examples a batch over 96: 6 steps an epoch, so the interruption falls inside the second epoch
OPTS = TrainOptions(steps=14, batch_size=16, max_length=16, lr=5e-3, eval_every=4, progress=False)


class Interrupted(Exception):
    """Stands for the Ctrl-C (or the lost machine) that ends a run early."""


def _stop_at(n: int):
    def hook(step: int) -> None:
        if step == n:
            raise Interrupted

    return hook


@pytest.mark.parametrize(("method", "hyper"), [("lora", {"r": 4}), ("prefix", {"prefix_length": 4})])
def test_an_interrupted_run_resumed_ends_with_the_uninterrupted_runs_weights(tmp_path: Path, method, hyper):
    """Interrupt after 10 steps (last checkpoint: step 8), resume: the final tensors are identical.

    No dev set, so the result is the last step's weights (with one, it would be the best
    evaluation's, which may come from before the interruption and prove nothing).
    """
    task = dataclasses.replace(sentiment_task(96), dev=[])
    opts = OPTS if method == "lora" else dataclasses.replace(OPTS, prefix_mlp=16)
    whole = train(backbone(), task, method=method, hyper=hyper, options=opts, workdir=tmp_path / "whole")
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        train(backbone(), task, method=method, hyper=hyper, options=opts, workdir=cut, on_step=_stop_at(10))
    state = json.loads((cut / CHECKPOINT_DIR / "state.json").read_text())
    assert state["step"] == 8
    steps: list[int] = []
    resumed = train(
        backbone(),
        task,
        method=method,
        hyper=hyper,
        options=opts,
        workdir=cut,
        resume=True,
        on_step=steps.append,
    )
    assert steps == list(range(9, 15))  # it went on from the checkpoint, not from the start
    assert resumed.steps == whole.steps == 14
    assert resumed.tensors.keys() == whole.tensors.keys()
    for k, v in whole.tensors.items():
        assert torch.equal(resumed.tensors[k], v), k
    assert not (cut / CHECKPOINT_DIR).exists()  # finished: nothing left to resume


def test_a_resumed_run_keeps_its_evaluations_and_best_checkpoint(tmp_path: Path) -> None:
    """With a dev set: the metrics file lists every evaluation once, and the result is the same."""
    task = sentiment_task(96)
    whole = train(backbone(), task, method="lora", hyper={"r": 4}, options=OPTS, workdir=tmp_path / "whole")
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        train(
            backbone(), task, method="lora", hyper={"r": 4}, options=OPTS, workdir=cut, on_step=_stop_at(10)
        )
    resumed = train(backbone(), task, method="lora", hyper={"r": 4}, options=OPTS, workdir=cut, resume=True)
    assert resumed.dev == whole.dev and [h["score"] for h in resumed.history] == [
        h["score"] for h in whole.history
    ]
    lines = [json.loads(x) for x in (cut / METRICS_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines if x["event"] == "eval"] == [4, 8, 12, 14]
    assert lines[-1]["event"] == "done" and lines[-1]["served"] == whole.dev


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    """Resuming with other settings (here the learning rate) would not continue that run: refused."""
    task = sentiment_task(96)
    with pytest.raises(Interrupted):
        train(
            backbone(),
            task,
            method="lora",
            hyper={"r": 4},
            options=OPTS,
            workdir=tmp_path,
            on_step=_stop_at(5),
        )
    other = dataclasses.replace(OPTS, lr=1e-3)
    with pytest.raises(ValueError, match=r"different run \(it differs in: lr\)"):
        train(backbone(), task, method="lora", hyper={"r": 4}, options=other, workdir=tmp_path, resume=True)


def test_resume_without_a_checkpoint_says_so(tmp_path: Path) -> None:
    """Nothing to resume: a FileNotFoundError that names the directory."""
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(backbone(), sentiment_task(32), method="lora", options=OPTS, workdir=tmp_path, resume=True)


def test_progress_lines_show_steps_loss_dev_and_time_left(tmp_path: Path, capsys) -> None:
    """With progress on, each evaluation prints step/total, loss, dev score and the time left."""
    opts = dataclasses.replace(OPTS, progress=True, steps=8)
    train(backbone(), sentiment_task(64), method="lora", hyper={"r": 4}, options=opts, workdir=tmp_path)
    err = capsys.readouterr().err
    assert "step 4/8  loss " in err and " dev " in err and " left" in err
    first = json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[0])
    assert first["step"] == 4 and {"loss", "score", "accuracy", "elapsed_s", "left_s"} <= first.keys()


def test_the_head_learns_at_its_own_rate() -> None:
    """head_lr=0 keeps the head at its seeded start whatever the adapter's rate; the adapter still moves."""
    task = dataclasses.replace(sentiment_task(64), dev=[])
    frozen = dataclasses.replace(OPTS, steps=4, head_lr=0.0)
    a = train(backbone(), task, method="lora", hyper={"r": 4}, options=frozen)
    b = train(backbone(), task, method="lora", hyper={"r": 4}, options=dataclasses.replace(frozen, lr=5e-2))
    heads = [k for k in a.tensors if k.startswith("head.")]
    assert heads and all(torch.equal(a.tensors[k], b.tensors[k]) for k in heads)
    lora = [k for k in a.tensors if k.endswith(".lora.B")]
    assert lora and not all(torch.equal(a.tensors[k], b.tensors[k]) for k in lora)
    moved = train(
        backbone(), task, method="lora", hyper={"r": 4}, options=dataclasses.replace(frozen, head_lr=5e-2)
    )
    assert not all(torch.equal(a.tensors[k], moved.tensors[k]) for k in heads)

"""A training run's resumable state: tensors in safetensors, everything else in JSON (never pickle).

`save` writes the whole state of the loop (trainable tensors, AdamW moments, scheduler position, the
data order still to come, both random generators, the best checkpoint so far) into a fresh
directory and swaps it in whole, so an interruption at any moment leaves the previous checkpoint
intact. `load` gives it back; a resumed run then takes exactly the steps the interrupted one would
have taken.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["CHECKPOINT_DIR", "Checkpoint", "load", "save"]

CHECKPOINT_DIR = "checkpoint"
"""Subdirectory of a run's output directory that holds its last checkpoint."""
_TENSORS, _STATE = "state.safetensors", "state.json"


@dataclass
class Checkpoint:
    """The loop's state at the end of a step."""

    run: dict
    """What the run was started with (method, options, data size): a resume must match it."""
    step: int
    params: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    pending: list[list[int]]
    """The current epoch's batches not yet trained on."""
    generator: torch.Tensor
    rng: torch.Tensor
    loop: dict = field(default_factory=dict)
    """best, stale, ema, history: the early-stopping and progress bookkeeping."""
    best_tensors: dict[str, torch.Tensor] | None = None


def _optimizer_split(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, per in state["state"].items():
        for key, value in per.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save(directory: str | Path, ckpt: Checkpoint) -> Path:
    """Write the checkpoint to `directory` atomically (a new directory renamed over the old one)."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    optim_tensors, optim_rest = _optimizer_split(ckpt.optimizer)
    tensors = {f"param.{k}": v for k, v in ckpt.params.items()} | optim_tensors
    tensors |= {f"best.{k}": v for k, v in (ckpt.best_tensors or {}).items()}
    tensors |= {"rng.generator": ckpt.generator, "rng.torch": ckpt.rng}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / _TENSORS))
    state = {
        "run": ckpt.run,
        "step": ckpt.step,
        "optimizer": optim_rest,
        "scheduler": ckpt.scheduler,
        "pending": ckpt.pending,
        "loop": ckpt.loop,
        "has_best": ckpt.best_tensors is not None,
    }
    (tmp / _STATE).write_text(json.dumps(state), encoding="utf-8")
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load(directory: str | Path) -> Checkpoint:
    """Read a checkpoint `save` wrote; FileNotFoundError when there is none."""
    d = Path(directory)
    if not (d / _STATE).is_file() or not (d / _TENSORS).is_file():
        raise FileNotFoundError(f"no checkpoint in {d} (nothing to resume)")
    state = json.loads((d / _STATE).read_text(encoding="utf-8"))
    tensors = load_file(str(d / _TENSORS))

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    per: dict[int, dict] = {}
    for key, value in part("optim.").items():
        index, name = key.split(".", 1)
        per.setdefault(int(index), {})[name] = value
    for key, value in state["optimizer"]["scalars"].items():
        index, name = key.split(".", 1)
        per.setdefault(int(index), {})[name] = value
    return Checkpoint(
        run=state["run"],
        step=state["step"],
        params=part("param."),
        optimizer={"state": per, "param_groups": state["optimizer"]["param_groups"]},
        scheduler=state["scheduler"],
        pending=state["pending"],
        generator=tensors["rng.generator"],
        rng=tensors["rng.torch"],
        loop=state["loop"],
        best_tensors=part("best.") if state["has_best"] else None,
    )

"""Command line of hypernetwork training: `adapterserve train-hyper` and `adapterserve train --hypernetwork`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from adapters.train import write_artifact
from adapters.train_cli import add_budget_arguments, options_from_args
from adapters.train_hyper import (
    HYPER_DEFAULTS,
    HYPER_LR,
    load_hypernetwork,
    train_hyper,
    train_task_embedding,
    write_hyper_artifacts,
)

__all__ = ["add_hypernetwork_option", "add_train_hyper_parser", "run_train_hyper", "run_train_task"]


# -- command line ----------------------------------------------------------------------------------


def _budget_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("budget")
    add_budget_arguments(
        t,
        lr_help=f"default {HYPER_LR} x 64 / projected dim",
        epochs_help="passes over all tasks' examples",
        each="per task: ",
    )
    t.add_argument("--pooling", choices=("cls", "mean", "pooler"), default="mean", help="head pooling")
    t.add_argument("--backbone", help="backbone directory (default: $ADAPTERSERVE_BACKBONE or MiniLM-L6)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--glue-dir", type=Path, help="GLUE directory (default: $ADAPTERSERVE_GLUE_DIR)")
    t.add_argument("--no-progress", action="store_true")


def add_train_hyper_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `train-hyper` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "train-hyper",
        help="train a Hyperformer hypernetwork, task embeddings and heads over several GLUE tasks",
        description="Multi-task training of a shared hypernetwork; writes a seed-directory layout: "
        "OUT/hypernetworks/NAME/ and OUT/<task>/ per task.",
    )
    p.add_argument("--glue", required=True, help="comma-separated GLUE tasks, e.g. SST-2,MRPC,CoLA,STS-B")
    p.add_argument("--out", type=Path, required=True, help="output directory (a seed directory layout)")
    p.add_argument("--name", default="glue", help="hypernetwork name (tasks refer to it)")
    p.add_argument("--temperature", type=float, default=1.0, help="task sampling ~ size ** (1 / T)")
    p.add_argument(
        "--label-names",
        action="append",
        default=[],
        metavar="TASK=NAMES",
        help="names a task's head gives its labels, in their order, e.g. SST-2=negative,positive (repeatable)",
    )
    h = p.add_argument_group("hypernetwork")
    h.add_argument("--variant", choices=("hyperformer++", "hyperformer"), default="hyperformer++")
    h.add_argument("--bottleneck-dim", type=int, default=HYPER_DEFAULTS["bottleneck_dim"])
    h.add_argument("--sites", nargs="+", default=HYPER_DEFAULTS["sites"], help="sublayers adapted")
    for opt in (
        "task-embedding-dim",
        "layer-embedding-dim",
        "site-embedding-dim",
        "hidden-dim",
        "projected-dim",
    ):
        h.add_argument(f"--{opt}", type=int, help="(default: the schema's)")
    _budget_args(p)
    p.set_defaults(func=run_train_hyper)
    return p


def add_hypernetwork_option(parser: argparse.ArgumentParser) -> None:
    """`train --hypernetwork NAME_OR_DIR`: learn only a new task's embedding and head."""
    parser.add_argument(
        "--hypernetwork",
        metavar="NAME_OR_DIR",
        help="train only a task embedding (+ head) for this frozen hypernetwork (a directory, or a name "
        "in $ADAPTERSERVE_STORE or examples/hypernetworks/); --method is then not needed",
    )


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def run_train_hyper(args: argparse.Namespace) -> int:
    """Entry of `adapterserve train-hyper`."""
    import os

    from adapters.backbone import load_backbone
    from adapters.data import load_glue
    from adapters.train_cli import renamed

    _threads(args)
    try:
        tasks = [load_glue(n.strip(), root=args.glue_dir) for n in args.glue.split(",") if n.strip()]
        known = {t.name.lower() for t in tasks}
        names = {}
        for item in args.label_names:
            task, sep, labels = item.partition("=")
            if not sep or task.lower() not in known:
                raise ValueError(f"--label-names {item!r}: expected TASK=NAMES for one of the --glue tasks")
            names[task.lower()] = labels
        tasks = [renamed(t, names.get(t.name.lower())) for t in tasks]
    except (OSError, ValueError) as exc:
        print(f"adapterserve train-hyper: {exc}", file=sys.stderr)
        return 2
    hyper = {"variant": args.variant, "bottleneck_dim": args.bottleneck_dim, "sites": args.sites}
    for key in (
        "task_embedding_dim",
        "layer_embedding_dim",
        "site_embedding_dim",
        "hidden_dim",
        "projected_dim",
    ):
        if getattr(args, key) is not None:
            hyper[key] = getattr(args, key)
    backbone = load_backbone(args.backbone or os.environ.get("ADAPTERSERVE_BACKBONE"), device=args.device)
    result = train_hyper(
        backbone,
        tasks,
        name=args.name,
        hyper=hyper,
        options=options_from_args(args),
        temperature=args.temperature,
    )
    write_hyper_artifacts(args.out, result, name=args.name)
    report = {
        "hypernetwork": args.name,
        "tasks": {t.name: t.dev for t in result.tasks},
        "mean_score": result.mean_score,
        "hypernetwork_params": sum(v.numel() for v in result.tensors.values()),
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "artifacts": str(args.out),
    }
    print(json.dumps(report, indent=2))
    return 0


def run_train_task(args: argparse.Namespace) -> int:
    """Entry of `adapterserve train --hypernetwork ...`: a new task's embedding and head only."""
    import os

    from adapters.backbone import load_backbone
    from adapters.train_cli import task_data

    _threads(args)
    if not args.out:
        print("adapterserve train: give --out DIR for the task artifact", file=sys.stderr)
        return 2
    try:
        task = task_data(args)
    except (OSError, ValueError) as exc:
        print(f"adapterserve train: {exc}", file=sys.stderr)
        return 2
    backbone = load_backbone(args.backbone or os.environ.get("ADAPTERSERVE_BACKBONE"), device=args.device)
    try:
        name, net = load_hypernetwork(args.hypernetwork, backbone=backbone)
    except (OSError, ValueError) as exc:
        print(f"adapterserve train: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = train_task_embedding(
        backbone, task, hypernetwork=net, name=name, options=options_from_args(args)
    )
    write_artifact(args.out, result.config, result.tensors)
    report = {
        "task": task.name,
        "method": "hyperformer",
        "hypernetwork": name,
        "dev": result.dev,
        "trainable_params": sum(v.numel() for v in result.tensors.values()),
        "seconds": round(time.perf_counter() - started, 1),
        "artifact": str(args.out),
    }
    print(json.dumps(report, indent=2))
    return 0

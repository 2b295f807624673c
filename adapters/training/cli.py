"""The training command lines: `adapterserve train` (one adapter, or a new task of a hypernetwork)
and `adapterserve train-hyper` (a hypernetwork over several tasks).

adapterserve train --glue SST-2 --method lora --out out/sst2 [--upload URL]
adapterserve train-hyper --glue SST-2,MRPC --out out/glue
adapterserve train-hyper --task sum=sum.tsv,sum_dev.tsv --task qa=qa.tsv --task-type generation --out out/t5
python -m adapters.training.cli ...        # `adapterserve train ...`, without the service's CLI
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

# Only light imports here: `adapterserve upload`/`serve`/`--help` build this parser too, and must not
# pay for torch; every command below imports the model code it runs.
from adapters.training.names import EMBEDDING, FULL, GENERATION, HYPER_DEFAULTS, HYPER_LR, TRAINABLE_METHODS
from adapters.training.progress import METRICS_FILE

if TYPE_CHECKING:
    from adapters.training.data import TaskData
    from adapters.training.trainer import TrainOptions

__all__ = [
    "add_budget_arguments",
    "add_train_hyper_parser",
    "add_train_parser",
    "main",
    "options_from_args",
    "run_train",
    "run_train_hyper",
    "run_train_task",
    "task_data",
]


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _hyper(args: argparse.Namespace) -> dict:
    hyper = {}
    for item in args.hp or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--hp expects KEY=VALUE, got {item!r}")
        hyper[key.strip()] = _value(value)
    shortcuts = {
        "r": args.rank,
        "alpha": args.alpha,
        "bottleneck_dim": args.bottleneck_dim,
        "prefix_length": args.prefix_length,
        "targets": args.targets,
        "sites": args.sites,
    }
    hyper |= {k: v for k, v in shortcuts.items() if v is not None}
    return hyper


def add_budget_arguments(
    group, *, lr_help: str, epochs_help: str = "passes over the examples", each: str = ""
) -> None:
    """The training-budget flags `train` and `train-hyper` share (`options_from_args` reads them)."""
    group.add_argument("--epochs", type=float, default=2.0, help=epochs_help)
    group.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument("--lr", type=float, help=f"peak learning rate ({lr_help})")
    group.add_argument("--warmup", type=float, default=0.06, help="warm-up fraction of the steps")
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--max-train-examples", type=int, help=f"{each}train on a seeded random subset")
    group.add_argument("--max-dev-examples", type=int, help=f"{each}evaluate on a seeded random subset")
    group.add_argument("--max-length", type=int, default=128, help="tokens per input")
    group.add_argument("--eval-every", type=int, help="evaluate every N steps (default: every epoch)")
    group.add_argument("--no-dropout", action="store_true", help="train with the backbone's dropout off")
    group.add_argument("--threads", type=int, help="torch CPU threads")


def _file_arguments(group, *, kinds: tuple[str, ...], embedding_help: str = "") -> None:
    """How examples are read from CSV/TSV/JSONL files, and what kind of task they are."""
    group.add_argument("--text-column", default="text", help="column (or 0-based index) of the text")
    group.add_argument("--text-pair-column", help="column of the second text of a pair")
    group.add_argument("--label-column", default="label", help="column of the label or target")
    group.add_argument("--no-header", action="store_true", help="the CSV/TSV files have no header row")
    group.add_argument(
        "--task-type",
        choices=kinds,
        default="auto",
        help=f"auto: regression when the targets are floats{embedding_help}; generation: the label column "
        "is the text to write (T5, BART, GPT-2, Llama backbones; served as generated_text)",
    )
    group.add_argument(
        "--max-target-length",
        type=int,
        default=64,
        help="generation: tokens per target, its end-of-sequence token included",
    )


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `train` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "train",
        help="train one adapter (any method, with its head) on the frozen backbone",
        description="Train one adapter on the frozen backbone from a CSV/TSV/JSONL file or a GLUE task; "
        "write a native artifact and optionally upload it.",
    )
    data = p.add_argument_group("data")
    src = data.add_mutually_exclusive_group(required=True)
    src.add_argument("--glue", metavar="TASK", help="a GLUE task by name (SST-2, MRPC, CoLA, RTE, STS-B)")
    src.add_argument("--train-file", type=Path, help="training examples (.csv, .tsv or .jsonl)")
    data.add_argument("--dev-file", type=Path, help="dev examples, for evaluation and early stopping")
    data.add_argument("--glue-dir", type=Path, help="GLUE directory (default: $ADAPTERSERVE_GLUE_DIR)")
    data.add_argument(
        "--label-names",
        metavar="NAME,...",
        help="names the head gives the task's labels, in their order (e.g. negative,positive for SST-2's 0,1)",
    )
    _file_arguments(
        data,
        kinds=("auto", "classification", "regression", "embedding", "generation"),
        embedding_help="; embedding: sentence pairs with similarity scores, trained by cosine (an embedding "
        "task, served on /v1/embeddings)",
    )
    m = p.add_argument_group("method")
    m.add_argument(
        "--method", choices=[*TRAINABLE_METHODS, FULL], help="adapter method, or 'full' (required)"
    )
    m.add_argument(
        "--hypernetwork",
        metavar="NAME_OR_DIR",
        help="train only a task embedding (+ head) for this frozen hypernetwork (a directory, or a name "
        "in $ADAPTERSERVE_STORE or examples/hypernetworks/); --method is then not needed",
    )
    m.add_argument("--hp", action="append", metavar="KEY=VALUE", help="a method hyperparameter (JSON value)")
    m.add_argument("--rank", type=int, help="LoRA rank r")
    m.add_argument("--alpha", type=float, help="LoRA alpha")
    m.add_argument("--bottleneck-dim", type=int, help="bottleneck width (adapters, Compacter)")
    m.add_argument("--prefix-length", type=int, help="prefix length (prefix, MAM)")
    m.add_argument("--targets", nargs="+", help="LoRA/IA3 target projections")
    m.add_argument("--sites", nargs="+", help="sublayers of bottleneck/parallel adapters")
    m.add_argument("--train-layernorm", action="store_true", help="also train per-task LayerNorm overrides")
    m.add_argument("--pooling", choices=("cls", "mean", "pooler"), default="mean", help="head pooling")
    m.add_argument("--head-layers", type=int, choices=(1, 2), default=1)
    m.add_argument(
        "--prefix-mlp",
        type=int,
        help="prefix MLP reparameterisation width while training (default 512; 0: off)",
    )
    t = p.add_argument_group("budget")
    add_budget_arguments(t, lr_help="default: per method")
    t.add_argument("--patience", type=int, help="early stopping: evaluations without improvement")
    t.add_argument("--head-lr", type=float, help="peak learning rate of the head (default: --lr)")
    t.add_argument("--prefix-lr", type=float, help="peak learning rate of the prefix MLP (default 3e-4)")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from the last checkpoint in --out (same flags as the first run)",
    )
    t.add_argument(
        "--checkpoint-every", type=int, help="keep a checkpoint every N steps (default: each eval)"
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, help="artifact directory to write")
    o.add_argument("--task", help="task name (metadata; the upload's task)")
    o.add_argument("--upload", metavar="URL", help="upload the artifact to this server")
    o.add_argument("--key", help="admin key for --upload (default: $ADAPTERSERVE_KEY)")
    o.add_argument("--backbone", help="backbone directory (default: $ADAPTERSERVE_BACKBONE or MiniLM-L6)")
    o.add_argument("--device", default="cpu")
    o.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)
    return p


def task_data(args: argparse.Namespace) -> TaskData:
    """The training (and dev) examples the data flags name: a GLUE task or CSV/TSV/JSONL files."""
    from adapters.training.data import (
        TaskData,
        check_targets,
        infer_task,
        load_glue,
        read_examples,
        rename_labels,
    )

    embedding = getattr(args, "task_type", None) == EMBEDDING
    if args.glue:
        task = load_glue(args.glue, root=args.glue_dir)
        if embedding:
            if task.kind != "regression" or not task.train or task.train[0].text_pair is None:
                raise ValueError(
                    f"--task-type embedding needs a task of scored sentence pairs (STS-B), not {task.name}"
                )
            return dataclasses.replace(task, kind=EMBEDDING)
        return rename_labels(task, getattr(args, "label_names", None))
    cols = {
        "text_column": args.text_column,
        "text_pair_column": args.text_pair_column,
        "label_column": args.label_column,
        "header": not args.no_header,
    }
    train_ex = read_examples(args.train_file, **cols)
    dev_ex = read_examples(args.dev_file, **cols) if args.dev_file else []
    column = args.label_column
    if args.task_type == GENERATION:
        from adapters.training.generative import GENERATION_METRICS

        # the targets are free text: the reader has already refused empty ones
        name = args.task or args.train_file.stem
        return TaskData(name, train_ex, dev_ex, GENERATION, [], GENERATION_METRICS, column)
    if args.task_type in ("regression", EMBEDDING):
        check_targets(train_ex, kind="regression", labels=[], column=column)
    kind, labels = infer_task([e.label for e in train_ex], kind="regression" if embedding else args.task_type)
    if embedding:
        if args.text_pair_column is None:
            raise ValueError("--task-type embedding trains on sentence pairs: give --text-pair-column")
        kind = EMBEDDING
    names = getattr(args, "label_names", None)
    if not names or kind != "classification":
        # with --label-names, the names (not the training file) say which dev labels are known
        check_targets(dev_ex, kind="regression" if embedding else kind, labels=labels, column=column)
    metrics = ("pearson", "spearman") if kind in ("regression", EMBEDDING) else ("accuracy",)
    if kind != "regression" and len(labels) == 2:
        metrics = ("accuracy", "f1", "matthews")
    name = args.task or args.train_file.stem
    return rename_labels(TaskData(name, train_ex, dev_ex, kind, labels, metrics, column), names)


# TrainOptions fields that a command's flag of the same name sets directly.
_OPTION_FLAGS = (
    "epochs",
    "steps",
    "batch_size",
    "lr",
    "warmup",
    "weight_decay",
    "seed",
    "max_train_examples",
    "max_dev_examples",
    "max_length",
    "max_target_length",
    "eval_every",
    "patience",
    "checkpoint_every",
    "head_lr",
    "prefix_lr",
    "train_layernorm",
    "pooling",
    "head_layers",
    "prefix_mlp",
)


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """TrainOptions from the flags a train command registered; options it has no flag for keep their defaults."""
    from adapters.training.trainer import TrainOptions

    kw = {name: getattr(args, name) for name in _OPTION_FLAGS if hasattr(args, name)}
    if hasattr(args, "no_dropout"):
        kw["dropout"] = not args.no_dropout
    if hasattr(args, "no_progress"):
        kw["progress"] = not args.no_progress
    return TrainOptions(**kw)


def run_train(args: argparse.Namespace) -> int:
    """Entry of `adapterserve train`: train, report, write the artifact, optionally upload it."""
    import os

    from adapters.backbone import load_backbone
    from adapters.training.export import upload, write_artifact
    from adapters.training.trainer import train

    if getattr(args, "hypernetwork", None):
        return run_train_task(args)
    if args.method is None:
        print("adapterserve train: give --method (or --hypernetwork NAME_OR_DIR)", file=sys.stderr)
        return 2
    _threads(args)
    if args.method != FULL and not args.out and not args.upload:
        print("adapterserve train: give --out DIR (and/or --upload URL) for the artifact", file=sys.stderr)
        return 2
    try:
        task = task_data(args)
    except (OSError, ValueError) as exc:
        print(f"adapterserve train: {exc}", file=sys.stderr)
        return 2
    if args.resume and not args.out:
        print("adapterserve train: --resume needs the interrupted run's --out DIR", file=sys.stderr)
        return 2
    out = args.out
    if out is None and args.method != FULL:
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="adapterserve-train-"))
    backbone = load_backbone(args.backbone or os.environ.get("ADAPTERSERVE_BACKBONE"), device=args.device)
    opts = options_from_args(args)
    try:
        result = train(
            backbone,
            task,
            method=args.method,
            hyper=_hyper(args),
            options=opts,
            workdir=out,
            resume=args.resume,
        )
    except KeyboardInterrupt:
        print(
            f"adapterserve train: interrupted; the last checkpoint is in {out}/checkpoint "
            "(the same command with --resume continues from it)",
            file=sys.stderr,
        )
        return 130
    except (FileNotFoundError, ValueError) as exc:
        if not args.resume:
            raise
        print(f"adapterserve train: {exc}", file=sys.stderr)
        return 2
    report = {
        "task": task.name,
        "method": args.method,
        "dev": result.dev,
        "baseline": result.baseline,
        "trainable_params": result.trainable_params,
        "trainable_percent": round(result.trainable_percent, 4),
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
    }
    if out is not None:
        report["metrics"] = str(Path(out) / METRICS_FILE)
    if result.config is not None:
        write_artifact(out, result.config, result.tensors)
        report["artifact"] = str(out)
        if args.upload:
            name = args.task or task.name.lower().replace("_", "-")
            report["upload"] = upload(
                out, url=args.upload, task=name, key=args.key or os.environ.get("ADAPTERSERVE_KEY")
            )
    print(json.dumps(report, indent=2))
    return 0


# -- hypernetworks ----------------------------------------------------------------------------------


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
        help="train a Hyperformer hypernetwork, task embeddings and heads over several tasks (GLUE or files)",
        description="Multi-task training of a shared hypernetwork; writes a seed-directory layout: "
        "OUT/hypernetworks/NAME/ and OUT/<task>/ per task.",
    )
    p.add_argument("--glue", help="comma-separated GLUE tasks, e.g. SST-2,MRPC,CoLA,STS-B")
    p.add_argument(
        "--task",
        action="append",
        default=[],
        dest="file_tasks",
        metavar="NAME=TRAIN[,DEV]",
        help="a task from CSV/TSV/JSONL files (repeatable; read as the file flags below say)",
    )
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
    _file_arguments(
        p.add_argument_group("--task files"), kinds=("auto", "classification", "regression", "generation")
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


def _threads(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _file_task(args: argparse.Namespace, item: str) -> TaskData:
    """One `--task NAME=TRAIN[,DEV]` of train-hyper, read like `train --train-file`."""
    name, sep, files = item.partition("=")
    train_file, _, dev_file = files.partition(",")
    if not sep or not name or not train_file:
        raise ValueError(f"--task {item!r}: expected NAME=TRAIN[,DEV]")
    ns = argparse.Namespace(**vars(args))
    ns.glue, ns.task, ns.label_names = None, name, None
    ns.train_file, ns.dev_file = Path(train_file), Path(dev_file) if dev_file else None
    return task_data(ns)


def run_train_hyper(args: argparse.Namespace) -> int:
    """Entry of `adapterserve train-hyper`."""
    import os

    from adapters.backbone import load_backbone
    from adapters.training.data import load_glue, rename_labels
    from adapters.training.hyper import train_hyper, write_hyper_artifacts

    _threads(args)
    try:
        if not args.glue and not args.file_tasks:
            raise ValueError("give --glue TASKS or --task NAME=TRAIN[,DEV] (or both)")
        glue = [n.strip() for n in (args.glue or "").split(",") if n.strip()]
        tasks = [load_glue(n, root=args.glue_dir) for n in glue]
        known = {t.name.lower() for t in tasks}
        names = {}
        for item in args.label_names:
            task, sep, labels = item.partition("=")
            if not sep or task.lower() not in known:
                raise ValueError(f"--label-names {item!r}: expected TASK=NAMES for one of the --glue tasks")
            names[task.lower()] = labels
        tasks = [rename_labels(t, names.get(t.name.lower())) for t in tasks]
        tasks += [_file_task(args, item) for item in args.file_tasks]
        if len({t.name.lower() for t in tasks}) < len(tasks):
            raise ValueError("two tasks have one name")
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
    from adapters.training.export import write_artifact
    from adapters.training.hyper import load_hypernetwork, train_task_embedding

    _threads(args)
    if not args.out:
        print("adapterserve train: give --out DIR for the task artifact", file=sys.stderr)
        return 2
    try:
        task = task_data(args)
        if task.kind == EMBEDDING:
            raise ValueError(
                "a hypernetwork generates adapters for heads, not embedding tasks: give --method"
            )
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


def main(argv: list[str] | None = None) -> int:
    """`python -m adapters.training.cli ...`: the same as `adapterserve train ...`."""
    parser = argparse.ArgumentParser(prog="adapterserve")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

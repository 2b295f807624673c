"""Train a Hyperformer / Hyperformer++ hypernetwork over several tasks, or a new task's embedding alone.

    result = train_hyper(backbone, [load_glue("SST-2"), load_glue("MRPC")], options=TrainOptions(steps=2000))
    write_hyper_artifacts("out", result, name="glue")      # out/hypernetworks/glue/ + out/<task>/

Multi-task training learns the hypernetwork, one task embedding and one head per task jointly:
each step draws one task, with probability proportional to `n_task ** (1 / temperature)`
(temperature 1: proportional to size; larger flattens towards uniform), generates that task's
adapters with gradients and binds them to slot 1 of the serving model (as `adapters.training.trainer`
does), so training runs the exact serving forward. `train_task_embedding` keeps a trained
hypernetwork frozen and learns only a new task's embedding (and head).

The output directory is laid out like a seed directory (`ADAPTERSERVE_SEED_DIR`):
`hypernetworks/<name>/hypernetwork_{config.json,.safetensors}` and one `<task>/` per task.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from adapters.backbone import Backbone
from adapters.banks import BankedLinear
from adapters.hypernet import Hypernetwork
from adapters.methods.base import common_entries
from adapters.model import BankConfig, MultiTaskModel
from adapters.training.data import (
    Batches,
    Dataset,
    TaskData,
    baseline_metrics,
    compute_metrics,
    subset,
    tokenize,
)
from adapters.training.export import write_artifact
from adapters.training.generative import TextPairs, evaluate_generation, lm_loss, text_pairs
from adapters.training.names import GENERATION, HYPER_DEFAULTS, HYPER_LR
from adapters.training.trainer import TrainOptions
from store.artifact import HypernetworkConfig, expected_tensors, hypernetwork_tensors, parse_config
from store.base import is_valid_name
from store.safetensors_io import SafetensorsLimits, load_arrays, write_safetensors

__all__ = [
    "HYPER_DEFAULTS",
    "TASK_LR_SCALE",
    "HyperResult",
    "TaskResult",
    "default_lr",
    "init_hypernetwork",
    "load_hypernetwork",
    "task_name",
    "train_hyper",
    "train_task_embedding",
    "write_hyper_artifacts",
    "write_hypernetwork",
]

TASK_LR_SCALE = 10.0
"""Task embeddings and heads learn this many times faster than the shared generator (new heads start
from nothing; the generator is shared by every task)."""
EMBEDDING_LR = 1e-2
"""Peak learning rate when only a task embedding and its head are trained."""
CONFIG_FILE = "hypernetwork_config.json"
WEIGHTS_FILE = "hypernetwork.safetensors"


@dataclass
class TaskResult:
    """One task of a run: its artifact (hyperformer config + embedding + head) and dev scores."""

    name: str
    config: object
    tensors: dict[str, torch.Tensor]
    dev: dict[str, float]
    train_examples: int


@dataclass
class HyperResult:
    """A multi-task run: the hypernetwork artifact and one task artifact per task."""

    config: object
    tensors: dict[str, torch.Tensor]
    tasks: list[TaskResult]
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    @property
    def mean_score(self) -> float:
        """Mean of the tasks' dev scores."""
        scores = [t.dev["score"] for t in self.tasks if "score" in t.dev]
        return sum(scores) / len(scores) if scores else float("nan")


def default_lr(config: HypernetworkConfig) -> float:
    """The generator's default peak learning rate: `HYPER_LR` scaled to the conditioning width.

    Adam moves every entry of a generator matrix by about the learning rate per step, and each
    generated weight sums `projected_dim` such entries, so generated adapters move about
    `lr * projected_dim` per step whatever the rate of directly trained ones. At 1e-3 with width
    64 the shared generator overshot within 20 steps and every task's pooled features collapsed
    (SST-2 + STS-B, or SST-2 + MRPC over 80 steps, stayed at chance); keeping `lr * projected_dim`
    at 0.0192 trains both pairs at width 64 and at 16 (docs/hypernetworks.md).
    """
    return HYPER_LR * 64 / config.projected_dim


def task_name(task: TaskData) -> str:
    """The served name of a task ('SST-2' -> 'sst-2')."""
    return task.name.lower().replace("_", "-")


# -- initialisation ----------------------------------------------------------------------------


def init_hypernetwork(config, spec, *, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Starting weights: generated adapters start near zero (LN gain ~0), so training starts at the backbone.

    Down/up generators give roughly nn.Linear-scaled weights (the adapter's LayerNorm normalises
    its output, so their scale only sets the conditioning); the gain generator starts small, the
    bias generators at zero.
    """
    h, r = spec.hidden_size, config.bottleneck_dim
    out: dict[str, torch.Tensor] = {}
    for name, shape in hypernetwork_tensors(config, spec).items():
        fan = shape[-1] if len(shape) > 1 else 1
        if name.endswith(("layer_embedding", "site_embedding")):
            t = torch.randn(shape, generator=generator)
        elif ".mlp." in name and name.endswith("weight"):
            t = (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(fan)
        elif name.endswith(".ln.weight"):
            t = torch.ones(shape)
        elif ".gen.down_w.weight" in name:
            t = torch.randn(shape, generator=generator) / math.sqrt(h * fan)
        elif ".gen.up_w.weight" in name:
            t = torch.randn(shape, generator=generator) / math.sqrt(r * fan)
        elif ".gen.ln_gamma.weight" in name:
            t = torch.randn(shape, generator=generator) * (1e-2 / math.sqrt(fan))
        else:
            t = torch.zeros(shape)
        out[name] = t
    return out


def _task_config(task: TaskData, backbone: Backbone, *, hypernetwork: str, dim: int, opts: TrainOptions):
    head = {
        "type": task.kind,
        "labels": task.labels if task.kind != "regression" else [],
        "pooling": opts.pooling,
    }
    if task.kind == GENERATION:
        # the backbone's own language-model head writes the answer
        head = None
    return parse_config(
        {
            "method": "hyperformer",
            "hypernetwork": hypernetwork,
            "task_embedding_dim": dim,
            "backbone_fingerprint": backbone.spec.fingerprint,
            "head": head,
        }
    )


def _head_init(config, spec, *, generator: torch.Generator, target_mean: float) -> dict[str, torch.Tensor]:
    if config.head is None:
        return {}
    shapes = {k: s for k, s in expected_tensors(config, spec).items() if k.startswith("head.")}
    out = {
        k: torch.randn(s, generator=generator) * 0.02 if k.endswith("weight") else torch.zeros(s)
        for k, s in shapes.items()
    }
    if config.head.type == "regression":
        out["head.out.bias"] = torch.full(shapes["head.out.bias"], target_mean)
    return out


def _check_fresh(backbone: Backbone) -> None:
    if any(isinstance(m, BankedLinear) for m in backbone.model.modules()):
        raise ValueError("this backbone is already wrapped by a MultiTaskModel; load a fresh one per run")


def _bank_config(config, outputs: int) -> BankConfig:
    """Two slots and only the banks a generated adapter and its head use."""
    return BankConfig(
        slots=2,
        lora_max_rank=0,
        ia3=False,
        bottleneck_max_dim=config.bottleneck_dim,
        bottleneck_post_norm=False,
        prefix_max_len=0,
        layernorm=False,
        mh_parallel_max_dim=0,
        tiny_max_dim=0,
        head_max_outputs=max(outputs, 1),
        head_two_layer=False,
    )


# -- one task's state ----------------------------------------------------------------------------


@dataclass
class _Task:
    data: TaskData
    config: object
    embedding: nn.Parameter
    head: dict[str, nn.Parameter]
    train: Dataset
    dev: Dataset
    batches: Batches
    dev_batches: Batches
    texts: TextPairs | None = None
    """A generation task's inputs and targets (`train` is then their bucketing lengths)."""
    dev_texts: TextPairs | None = None

    @property
    def outputs(self) -> int:
        """Head outputs (0 for a generation task, which has no head)."""
        return self.config.head.num_outputs if self.config.head is not None else 0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"task_embedding": self.embedding, **self.head}

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in self.tensors().items()}


def _prepare(task: TaskData, backbone: Backbone, *, hypernetwork: str, dim: int, opts: TrainOptions, g):

    tok = backbone.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_ex = subset(task.train, opts.max_train_examples, g)
    dev_ex = subset(task.dev, opts.max_dev_examples, g)
    texts = dev_texts = None
    if task.kind == GENERATION:
        lengths = {"max_length": opts.max_length, "max_target_length": opts.max_target_length}
        texts, dev_texts = text_pairs(backbone, task.name, train_ex, dev_ex, **lengths)
        train, dev = texts.data, dev_texts.data
        pad = texts.pad_id
    else:
        enc = {"max_length": opts.max_length, "kind": task.kind, "labels": task.labels}
        train, dev = tokenize(tok, train_ex, **enc), tokenize(tok, dev_ex, **enc)
    config = _task_config(task, backbone, hypernetwork=hypernetwork, dim=dim, opts=opts)
    mean = float(train.targets.float().mean()) if task.kind == "regression" else 0.0
    dev_ = {"device": backbone.device, "dtype": backbone.dtype}
    head = {
        k: nn.Parameter(v.to(**dev_))
        for k, v in _head_init(config, backbone.spec, generator=g, target_mean=mean).items()
    }
    z = nn.Parameter((torch.randn(dim, generator=g) * 0.5).to(**dev_))
    return _Task(
        data=task,
        config=config,
        embedding=z,
        head=head,
        train=train,
        dev=dev,
        batches=Batches(train, batch_size=opts.batch_size, pad_id=pad),
        dev_batches=Batches(dev, batch_size=64, pad_id=pad),
        texts=texts,
        dev_texts=dev_texts,
    )


def _bind(model: MultiTaskModel, net: Hypernetwork, task: _Task, tensors=None) -> None:
    """Make slot 1 compute with the task's generated adapters and its head (differentiably)."""
    tensors = tensors or task.tensors()
    entries = net.entries(tensors["task_embedding"][None])[0]
    entries += common_entries(task.config, tensors, model.spec)
    for e in entries:
        model.banks[(e.key, e.kind)].bind(**e.kwargs)


def _loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "regression":
        return F.mse_loss(logits[:, 0].float(), y.float())
    return F.cross_entropy(logits.float(), y)


@torch.no_grad()
def _evaluate(model: MultiTaskModel, net: Hypernetwork, task: _Task) -> dict[str, float]:
    if not len(task.dev):
        return {}
    if task.dev_texts is not None:
        _bind(model, net, task)
        return evaluate_generation(model, task.config, None, task.dev_texts, bound=True)
    was = model.backbone.model.training
    model.backbone.model.eval()
    try:
        _bind(model, net, task)
        width = task.config.head.num_outputs
        logits = torch.zeros(len(task.dev), width)
        for idx in task.dev_batches.ordered():
            ids, mask, _ = task.dev_batches.collate(idx)
            dev = model.backbone.device
            extra = {k: v.to(dev) for k, v in task.dev_batches.extra(idx).items()}
            out = model.train_forward(ids.to(dev), mask.to(dev), **extra)
            logits[idx] = out.logits[:, :width].float().cpu()
        preds = logits[:, 0] if task.data.kind == "regression" else logits.argmax(-1)
        return compute_metrics(preds.numpy(), task.dev.targets.numpy(), metrics=task.data.metrics)
    finally:
        model.backbone.model.train(was)


def _sampling(tasks: list[_Task], temperature: float, weights: list[float] | None = None) -> torch.Tensor:
    """Task probabilities proportional to size ** (1 / temperature), or to explicit weights."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if weights is not None:
        if len(weights) != len(tasks) or min(weights) <= 0:
            raise ValueError("weights: one positive number per task")
        w = torch.tensor([float(x) for x in weights])
        return w / w.sum()
    sizes = torch.tensor([float(len(t.train)) for t in tasks])
    p = sizes ** (1.0 / temperature)
    return p / p.sum()


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _fit(
    model: MultiTaskModel,
    net: Hypernetwork,
    tasks: list[_Task],
    groups: list[dict],
    *,
    opts: TrainOptions,
    lr: float,
    temperature: float,
    g: torch.Generator,
    desc: str,
    snapshot,
    weights: list[float] | None = None,
) -> tuple[list[dict], int, dict | None]:
    """The training loop shared by both modes; returns (history, steps, best snapshot)."""
    probs = _sampling(tasks, temperature, weights)
    expected = sum(len(t.batches) * float(p) for t, p in zip(tasks, probs, strict=True))
    per_epoch = max(1, round(sum(len(t.batches) for t in tasks) if len(tasks) > 1 else expected))
    total = opts.steps or max(1, math.ceil(opts.epochs * per_epoch))
    params = [p for group in groups for p in group["params"]]
    optim = torch.optim.AdamW(
        [{"params": gr["params"], "lr": lr * gr.get("scale", 1.0)} for gr in groups],
        lr=lr,
        weight_decay=opts.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(total, max(1, int(opts.warmup * total))))
    eval_every = opts.eval_every or per_epoch
    queues: list[list[list[int]]] = [[] for _ in tasks]
    history: list[dict] = []
    best: dict | None = None
    best_score = -math.inf
    ema = None
    window: list[float] = []
    dev_ = model.backbone.device
    model.backbone.model.train(opts.dropout)
    bar = tqdm(total=total, desc=desc, unit="step", disable=not opts.progress, leave=False)
    try:
        for step in range(1, total + 1):
            i = int(torch.multinomial(probs, 1, generator=g)) if len(tasks) > 1 else 0
            if not queues[i]:
                queues[i] = tasks[i].batches.epoch(g)
            idx = queues[i].pop()
            _bind(model, net, tasks[i])
            if tasks[i].texts is not None:
                loss = lm_loss(model, tasks[i].texts, idx)
            else:
                ids, mask, y = tasks[i].batches.collate(idx)
                extra = {k: v.to(dev_) for k, v in tasks[i].batches.extra(idx).items()}
                out = model.train_forward(ids.to(dev_), mask.to(dev_), **extra)
                loss = _loss(out.logits[:, : tasks[i].outputs], y.to(dev_), tasks[i].data.kind)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if opts.max_grad_norm:
                nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
            optim.step()
            sched.step()
            value = loss.item()
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            window.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}", task=tasks[i].data.name)
            if step % eval_every == 0 or step == total:
                scores = {t.data.name: _evaluate(model, net, t) for t in tasks}
                mean = [s["score"] for s in scores.values() if "score" in s]
                score = sum(mean) / len(mean) if mean else -float(ema)
                # the mean training loss since the last evaluation: a smoother curve than the EMA
                loss_mean = sum(window) / len(window)
                window.clear()
                history.append({"step": step, "loss": loss_mean, "score": score, "tasks": scores})
                if score > best_score:
                    best_score, best = score, snapshot()
                bar.set_description(f"{desc} dev {score:.4f}")
    finally:
        bar.close()
        model.backbone.model.eval()
    return history, total, best


# -- multi-task training ---------------------------------------------------------------------------


def train_hyper(
    backbone: Backbone,
    tasks: list[TaskData],
    *,
    name: str = "glue",
    hyper: dict | None = None,
    options: TrainOptions | None = None,
    temperature: float = 1.0,
    task_lr_scale: float = TASK_LR_SCALE,
    weights: list[float] | None = None,
) -> HyperResult:
    """Train a hypernetwork, the task embeddings and heads jointly; keep the best mean-dev checkpoint.

    `weights` (one per task) replaces the size-based sampling, e.g. to give each task the share of
    the steps its single-task run would take.
    """
    opts = options or TrainOptions()
    _check_fresh(backbone)
    started = time.perf_counter()
    torch.manual_seed(opts.seed)
    g = torch.Generator().manual_seed(opts.seed)
    raw = dict(HYPER_DEFAULTS) | (hyper or {})
    raw |= {"method": "hypernetwork", "backbone_fingerprint": backbone.spec.fingerprint}
    config = parse_config(raw)
    dev_ = {"device": backbone.device, "dtype": backbone.dtype}
    net = Hypernetwork.from_tensors(
        config, init_hypernetwork(config, backbone.spec, generator=g), backbone.spec
    )
    net = net.to(**dev_).train().requires_grad_(True)
    prepared = [
        _prepare(t, backbone, hypernetwork=name, dim=config.task_embedding_dim, opts=opts, g=g) for t in tasks
    ]
    width = max(t.outputs for t in prepared)
    model = MultiTaskModel(backbone, banks=_bank_config(config, width))
    groups = [
        {"params": list(net.parameters())},
        {"params": [p for t in prepared for p in (t.embedding, *t.head.values())], "scale": task_lr_scale},
    ]

    def snapshot() -> dict:
        return {"net": {k: v.float().cpu().clone() for k, v in net.state_tensors().items()}} | {
            t.data.name: t.snapshot() for t in prepared
        }

    history, steps, best = _fit(
        model,
        net,
        prepared,
        groups,
        opts=opts,
        lr=opts.lr or default_lr(config),
        temperature=temperature,
        g=g,
        desc=f"hyper {'+'.join(t.name for t in tasks)}",
        snapshot=snapshot,
        weights=weights,
    )
    best = best or snapshot()
    with torch.no_grad():
        for k, v in best["net"].items():
            net.p(k).copy_(v)
    net.eval().requires_grad_(False)
    results = []
    for t in prepared:
        with torch.no_grad():
            t.embedding.copy_(best[t.data.name]["task_embedding"])
            for k, p in t.head.items():
                p.copy_(best[t.data.name][k])
        dev = _evaluate(model, net, t)
        meta = _metadata(t, model, opts=opts, steps=steps, dev=dev, trained_with="adapterserve train-hyper")
        results.append(
            TaskResult(
                task_name(t.data),
                t.config.model_copy(update={"metadata": meta}),
                t.snapshot(),
                dev,
                len(t.train),
            )
        )
    hmeta = {
        "tasks": ",".join(t.name for t in tasks),
        "trained_with": "adapterserve train-hyper",
        "steps": steps,
        "temperature": temperature,
        "learning_rate": opts.lr or default_lr(config),
        "seed": opts.seed,
    }
    return HyperResult(
        config=config.model_copy(update={"metadata": hmeta}),
        tensors=best["net"],
        tasks=results,
        history=history,
        steps=steps,
        seconds=time.perf_counter() - started,
    )


def _metadata(
    t: _Task, model: MultiTaskModel, *, opts: TrainOptions, steps: int, dev: dict, trained_with: str
) -> dict:
    meta: dict = {
        "task": t.data.name,
        "trained_with": trained_with,
        "train_examples": len(t.train),
        "steps": steps,
        "batch_size": opts.batch_size,
        "max_length": opts.max_length,
        "seed": opts.seed,
    }
    if dev:
        meta["dev_metric"] = "+".join(t.data.metrics)
        meta["dev_examples"] = len(t.dev)
        meta |= {f"dev_{k}": round(v, 6) for k, v in dev.items()}
        # the majority-class (or mean-target) score on the same dev examples, as `train` records it;
        # for a generation task, the plain backbone's own outputs (slot 0)
        if t.dev_texts is not None:
            base = evaluate_generation(model, t.config, None, t.dev_texts)
        else:
            base = baseline_metrics(t.train, t.dev, kind=t.data.kind, metrics=t.data.metrics)
        meta |= {f"baseline_{k}": round(v, 6) for k, v in base.items()}
    return meta


# -- a new task on a frozen hypernetwork -----------------------------------------------------------


def load_hypernetwork(source: str | Path, *, backbone: Backbone) -> tuple[str, Hypernetwork]:
    """A hypernetwork by directory, or by name (the local store's current version, then examples/)."""
    path = Path(source)
    if not (path / CONFIG_FILE).is_file():
        import os

        from store.local import LocalStore

        name = str(source)
        default = Path.home() / ".local" / "share" / "adapterserve" / "store"  # Settings.store's default
        store = Path(os.environ.get("ADAPTERSERVE_STORE", default)).expanduser()
        path = Path(__file__).resolve().parents[1] / "examples" / "hypernetworks" / name
        if is_valid_name(name) and (store / "hypernetworks" / name).is_dir():
            art = LocalStore(store).get("hypernetworks", name)
            config_bytes, weights = art.config_bytes, art.weights_path
            return name, _build(config_bytes, weights, backbone)
        if not is_valid_name(name) or not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"no hypernetwork {name!r}: not a directory, not in {store}, not in examples/"
            )
    return path.name, _build((path / CONFIG_FILE).read_bytes(), path / WEIGHTS_FILE, backbone)


def _build(config_bytes: bytes, weights: Path, backbone: Backbone) -> Hypernetwork:
    config = parse_config(config_bytes)
    if not isinstance(config, HypernetworkConfig):
        raise ValueError(f"{CONFIG_FILE} describes a {config.method!r} adapter, not a hypernetwork")
    expected = expected_tensors(config, backbone.spec)
    arrays = load_arrays(weights, limits=SafetensorsLimits(), names=list(expected))
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return Hypernetwork.from_tensors(config, tensors, backbone.spec).to(backbone.device)


def train_task_embedding(
    backbone: Backbone,
    task: TaskData,
    *,
    hypernetwork: Hypernetwork,
    name: str,
    options: TrainOptions | None = None,
) -> TaskResult:
    """Learn only a new task's embedding and head; the hypernetwork and the backbone stay frozen."""
    opts = options or TrainOptions()
    _check_fresh(backbone)
    torch.manual_seed(opts.seed)
    g = torch.Generator().manual_seed(opts.seed)
    net = hypernetwork.eval().requires_grad_(False)
    t = _prepare(task, backbone, hypernetwork=name, dim=net.config.task_embedding_dim, opts=opts, g=g)
    model = MultiTaskModel(backbone, banks=_bank_config(net.config, t.outputs))
    groups = [{"params": [t.embedding, *t.head.values()]}]
    _, steps, best = _fit(
        model,
        net,
        [t],
        groups,
        opts=opts,
        lr=opts.lr or EMBEDDING_LR,
        temperature=1.0,
        g=g,
        desc=f"{task.name} task embedding",
        snapshot=t.snapshot,
    )
    if best is not None:
        with torch.no_grad():
            t.embedding.copy_(best["task_embedding"])
            for k, p in t.head.items():
                p.copy_(best[k])
    dev = _evaluate(model, net, t)
    meta = _metadata(
        t, model, opts=opts, steps=steps, dev=dev, trained_with="adapterserve train --hypernetwork"
    )
    return TaskResult(
        task_name(task), t.config.model_copy(update={"metadata": meta}), t.snapshot(), dev, len(t.train)
    )


# -- artifacts -------------------------------------------------------------------------------------


def write_hypernetwork(directory: str | Path, config, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `hypernetwork_config.json` and `hypernetwork.safetensors` (float32) into a directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.detach().float().cpu().contiguous().numpy() for k, v in tensors.items()}
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    write_safetensors(tmp, arrays)
    tmp.replace(out / WEIGHTS_FILE)
    tmp = out / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / CONFIG_FILE)
    return out


def write_hyper_artifacts(directory: str | Path, result: HyperResult, *, name: str) -> Path:
    """Lay a run out as a seed directory: `hypernetworks/<name>/` and one `<task>/` per task."""
    root = Path(directory)
    write_hypernetwork(root / "hypernetworks" / name, result.config, result.tensors)
    for t in result.tasks:
        write_artifact(root / t.name, t.config, t.tensors)
    return root

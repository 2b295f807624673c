"""Train one adapter (any method, with its head) on the frozen backbone, through the serving banks.

    backbone = load_backbone(device="cpu")
    result = train(backbone, load_glue("SST-2"), method="lora", options=TrainOptions(epochs=2))
    write_artifact("out/sst2", result.config, result.tensors)      # adapters.training.export

The model is a two-slot MultiTaskModel: every step binds the trainable tensors to slot 1
(`MultiTaskModel.bind`), so training runs the exact forward that serving runs and the written
artifact needs no conversion. `method="full"` fine-tunes the whole backbone instead: a baseline to
measure against, which writes no artifact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adapters.backbone import Backbone
from adapters.banks import BankedLinear
from adapters.heads import decode_row
from adapters.methods import get_method
from adapters.model import MultiTaskModel
from adapters.training import checkpoint
from adapters.training.checkpoint import CHECKPOINT_DIR
from adapters.training.data import (
    Batches,
    Dataset,
    TaskData,
    baseline_metrics,
    compute_metrics,
    subset,
    tokenize,
)
from adapters.training.embedding import PairData, cosine_loss, evaluate_pairs, score_range
from adapters.training.generative import evaluate_generation, lm_loss, text_pairs
from adapters.training.init import bank_config, init_tensors
from adapters.training.names import EMBEDDING, FULL, GENERATION
from adapters.training.prefix import PrefixMLP
from adapters.training.progress import METRICS_FILE, Progress
from store.artifact import parse_config

__all__ = [
    "DEFAULT_LR",
    "METHOD_DEFAULTS",
    "TrainOptions",
    "TrainResult",
    "build_config",
    "evaluate",
    "init_tensors",
    "predict",
    "train",
]

METHOD_DEFAULTS: dict[str, dict] = {
    "bottleneck": {"bottleneck_dim": 32, "sites": ["attn", "ffn"], "activation": "relu"},
    "parallel": {"bottleneck_dim": 64, "sites": ["ffn"], "scaling": 4.0},
    "lora": {"r": 8, "alpha": 16.0, "targets": ["q", "v"]},
    "ia3": {},
    "layernorm": {},
    "prefix": {"prefix_length": 16},
    "mam": {"prefix_length": 16, "bottleneck_dim": 16, "scaling": 4.0},
    "mh_parallel": {"bottleneck_dim": 4},
    "compacter": {"bottleneck_dim": 48, "phm_dim": 4},
    "tiny_attention": {"attention_dim": 8, "num_heads": 1},
}
"""Hyperparameters each method trains with unless overridden: Houlsby, scaled parallel (s=4), ..."""

DEFAULT_LR: dict[str, float] = {
    "full": 5e-5,
    "bottleneck": 3e-3,
    "parallel": 1e-3,
    "lora": 3e-3,
    "ia3": 1.5e-2,
    "layernorm": 3e-3,
    "prefix": 3e-3,
    "mam": 1e-3,
    "mh_parallel": 3e-3,
    "compacter": 3e-3,
    "tiny_attention": 1e-3,
}
"""Peak learning rate per method (adapters tolerate far larger steps than full fine-tuning): the best
mean over CoLA and MRPC of x1, x3 and x10 the earlier rate (docs/results.md, "Learning rates behind
the defaults"); where each value came from: docs/training.md, "Defaults and where they came from"."""


PREFIX_MLP = 512
"""Width of the prefix MLP while training prefix tuning and MAM (Li & Liang's 512; folded away at export)."""

PREFIX_MLP_LR = 3e-4
"""Peak learning rate of the prefix MLP: the best of 1e-4, 3e-4, 1e-3 and 1e-2 on SST-2 and STS-B
(docs/results.md, "Sweep behind the defaults"); the head keeps the method's rate (prefix: 3e-3)."""


@dataclass(frozen=True)
class TrainOptions:
    """Budget and optimisation settings of one training run."""

    epochs: float = 2.0
    """Passes over the training examples (ignored when `steps` is set)."""
    steps: int | None = None
    """Optimizer steps in all, instead of epochs."""
    batch_size: int = 32
    lr: float | None = None
    """Peak learning rate; None: the method's `DEFAULT_LR`."""
    head_lr: float | None = None
    """Peak learning rate of the task head; None: the same as `lr`."""
    prefix_lr: float | None = None
    """Peak learning rate of the prefix MLP (prefix tuning, MAM); None: `PREFIX_MLP_LR`."""
    warmup: float = 0.06
    """Fraction of the steps with a linear warm-up; the rest decays linearly to 0."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    max_train_examples: int | None = None
    """Train on a seeded random subset of at most this many examples."""
    max_dev_examples: int | None = None
    max_length: int = 128
    """Tokens per input (pairs truncated longest-first)."""
    max_target_length: int = 64
    """Generation tasks: tokens per target, its end-of-sequence token included."""
    eval_every: int | None = None
    """Evaluate on dev every this many steps; None: after every epoch."""
    patience: int | None = None
    """Stop after this many evaluations without a better dev score; None: never stop early."""
    dropout: bool = True
    """Keep the backbone's dropout active while training (as PEFT and AdapterHub do)."""
    train_layernorm: bool = False
    """Also train per-task LayerNorm overrides (as the reference Compacter/Hyperformer runs do)."""
    pooling: str = "mean"
    head_layers: int = 1
    prefix_init: str = "tokens"
    """Prefix start: 'tokens' (keys/values of real tokens, Li & Liang) or 'random' (small normal)."""
    prefix_mlp: int | None = None
    """Hidden width of the prefix MLP reparameterisation (None: `PREFIX_MLP`; 0: train the prefixes directly)."""
    progress: bool = True
    """Show a progress bar and a line per evaluation (stderr)."""
    checkpoint_every: int | None = None
    """With a run directory: keep a resumable checkpoint every this many steps; None: at each evaluation."""


@dataclass
class TrainResult:
    """What a run produced: the artifact (config + tensors; None for `full`) and its numbers."""

    method: str
    config: object | None
    tensors: dict[str, torch.Tensor] | None
    dev: dict[str, float]
    baseline: dict[str, float]
    history: list[dict] = field(default_factory=list)
    trainable_params: int = 0
    backbone_params: int = 0
    steps: int = 0
    train_examples: int = 0
    seconds: float = 0.0

    @property
    def trainable_percent(self) -> float:
        """Trained parameters (adapter + head) as a percentage of the backbone's."""
        return 100.0 * self.trainable_params / max(self.backbone_params, 1)


def build_config(
    method: str,
    backbone: Backbone,
    *,
    kind: str,
    labels: list[str],
    hyper: dict | None = None,
    options: TrainOptions | None = None,
    metadata: dict | None = None,
):
    """The artifact config of a method: its defaults, then `hyper`, then head and LayerNorm settings."""
    opts = options or TrainOptions()
    if kind == GENERATION:
        # the backbone's own language-model head writes the answer
        head = None
    elif kind == EMBEDDING:
        # no weights: the task's answer is its pooled, normalised sentence vector
        head = {"type": "embedding", "pooling": opts.pooling}
    else:
        head = {"type": kind, "labels": labels if kind != "regression" else [], "pooling": opts.pooling}
        head["layers"] = opts.head_layers
    raw = (
        {"method": "layernorm", "layernorm": False}
        if method == FULL
        else _served_defaults(METHOD_DEFAULTS[method], backbone)
    )
    if method == "tiny_attention" and kind == GENERATION and backbone.spec.num_layers:
        # the decoder writes the answer: a text-to-text task adapts both stacks
        raw["stacks"] = ["encoder", "decoder"]
    if method != FULL:
        raw |= {"method": method, **(hyper or {}), "layernorm": opts.train_layernorm or method == "layernorm"}
    raw |= {"head": head, "backbone_fingerprint": backbone.spec.fingerprint, "metadata": metadata or {}}
    return parse_config(raw)


def _served_defaults(defaults: dict, backbone: Backbone) -> dict:
    """A method's defaults with target projections this backbone has: q, k, v become GPT-2's fused qkv."""
    have = {site for sites in backbone.arch.layer.values() for site in sites}
    out = dict(defaults)
    for key in ("targets", "feedforward"):
        if key not in out:
            continue
        kept: list[str] = []
        for t in out[key]:
            t = "qkv" if t in ("q", "k", "v") and t not in have and "qkv" in have else t
            if t in have and t not in kept:
                kept.append(t)
        out[key] = kept or out[key]
    return out


def _head_logits(out, config) -> torch.Tensor:
    return out.logits[:, : config.head.num_outputs]


def _loss(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "regression":
        return F.mse_loss(logits[:, 0], targets)
    return F.cross_entropy(logits, targets)


@torch.no_grad()
def _logits(
    model: MultiTaskModel, config, tensors: dict[str, torch.Tensor], batches: Batches
) -> torch.Tensor:
    """Eval-mode head logits of every example, in dataset order."""
    was = model.backbone.model.training
    model.backbone.model.eval()
    try:
        model.bind(config, tensors)
        out = torch.zeros(len(batches.data), config.head.num_outputs)
        for idx in batches.ordered():
            ids, mask, _ = batches.collate(idx)
            dev = model.backbone.device
            extra = {k: v.to(dev) for k, v in batches.extra(idx).items()}
            res = model.train_forward(ids.to(dev), mask.to(dev), **extra)
            out[idx] = _head_logits(res, config).float().cpu()
        return out
    finally:
        model.backbone.model.train(was)


def evaluate(
    model: MultiTaskModel, config, tensors: dict[str, torch.Tensor], dev: Batches, *, metrics
) -> dict[str, float]:
    """Dev metrics of an adapter (the task's metrics plus `score`, their mean)."""
    logits = _logits(model, config, tensors, dev)
    preds = logits[:, 0] if config.head.type == "regression" else logits.argmax(-1)
    return compute_metrics(preds.numpy(), dev.data.targets.numpy(), metrics=metrics)


def predict(
    model: MultiTaskModel, config, tensors: dict[str, torch.Tensor], data: Dataset, *, batch_size: int = 32
) -> list[dict]:
    """The trainer's own predictions, decoded as the API decodes them (label + score, or value)."""
    pad = model.backbone.tokenizer.pad_token_id if model.backbone.tokenizer is not None else 0
    logits = _logits(model, config, tensors, Batches(data, batch_size=batch_size, pad_id=pad))
    return [decode_row(row, kind=config.head.type, labels=config.head.labels) for row in logits]


def _schedule(step: int, *, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train(
    backbone: Backbone,
    task: TaskData,
    *,
    method: str,
    hyper: dict | None = None,
    options: TrainOptions | None = None,
    workdir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train one adapter (or, for `full`, the whole backbone) and return the best dev checkpoint.

    With `workdir` (the artifact's directory) the run writes `metrics.jsonl` there and keeps its
    last checkpoint in `workdir/checkpoint/` (removed once the run ends); `resume` continues from
    that checkpoint and takes exactly the steps the interrupted run would have taken. `on_step` is
    called after every step with the step count.
    """
    opts = options or TrainOptions()
    if method != FULL:
        get_method(method)
    if any(isinstance(m, BankedLinear) for m in backbone.model.modules()):
        # a second MultiTaskModel would wrap the wrapped projections again: one backbone per run
        raise ValueError("this backbone is already wrapped by a MultiTaskModel; load a fresh one per run")
    started = time.perf_counter()
    torch.manual_seed(opts.seed)
    g = torch.Generator().manual_seed(opts.seed)
    tok = backbone.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_ex = subset(task.train, opts.max_train_examples, g)
    dev_ex = subset(task.dev, opts.max_dev_examples, g)
    embedding = task.kind == EMBEDDING
    generation = task.kind == GENERATION
    if embedding:
        low, high = score_range(train_ex)
        pair_kw = {"max_length": opts.max_length, "pad_id": pad}
        pairs = PairData(tok, train_ex, batch_size=opts.batch_size, **pair_kw)
        dev_pairs = PairData(tok, dev_ex, batch_size=64, **pair_kw)
        train_data, dev_data = pairs.first.data, dev_pairs.first.data
    elif generation:
        lengths = {"max_length": opts.max_length, "max_target_length": opts.max_target_length}
        texts, dev_texts = text_pairs(backbone, task.name, train_ex, dev_ex, **lengths)
        train_data, dev_data = texts.data, dev_texts.data
    else:
        enc = {"max_length": opts.max_length, "kind": task.kind, "labels": task.labels}
        train_data, dev_data = tokenize(tok, train_ex, **enc), tokenize(tok, dev_ex, **enc)
    target_mean = float(train_data.targets.float().mean()) if task.kind == "regression" else 0.0
    config = build_config(method, backbone, kind=task.kind, labels=task.labels, hyper=hyper, options=opts)
    # tiny attention trains its heads apart; `deploy` decides how they are served (and evaluated)
    fit_config = config
    if config.method == "tiny_attention":
        fit_config = config.model_copy(update={"deploy": "multihead"})
    model = MultiTaskModel(backbone, banks=bank_config(fit_config))
    tensors = {
        k: nn.Parameter(v.to(backbone.device, backbone.dtype))
        for k, v in init_tensors(config, model, generator=g, options=opts, target_mean=target_mean).items()
    }
    if method != FULL and not any(not k.startswith("head.") for k in tensors):
        raise ValueError(f"{method} has no site to adapt on this backbone ({backbone.spec.family})")
    named: dict[str, nn.Parameter] = dict(tensors)
    reparam = None
    mid = PREFIX_MLP if opts.prefix_mlp is None else opts.prefix_mlp
    if mid and config.method in ("prefix", "mam"):
        reparam = PrefixMLP(
            start={k: v.detach().float().cpu() for k, v in tensors.items() if ".prefix." in k},
            hidden=backbone.spec.hidden_size,
            mid=mid,
            generator=g,
        ).to(backbone.device, backbone.dtype)
        for k in list(tensors):
            if ".prefix." in k:
                del tensors[k]
        named = dict(tensors) | {f"reparam.{k}": v for k, v in reparam.named_parameters()}
    if method == FULL:
        for p in backbone.model.parameters():
            p.requires_grad_(True)
        named |= {f"backbone.{k}": v for k, v in backbone.model.named_parameters()}
    params = list(named.values())
    lr = opts.lr or DEFAULT_LR[method]
    decay = opts.weight_decay if opts.weight_decay else (0.01 if method == FULL else 0.0)
    head_lr = lr if opts.head_lr is None else opts.head_lr
    prefix_lr = PREFIX_MLP_LR if opts.prefix_lr is None else opts.prefix_lr
    # three rates: the adapter's own tensors, the prefix MLP (each of its weights moves every prefix
    # entry, so it needs a far smaller step than the prefixes themselves), and the head
    part = {"head": [], "reparam": [], "rest": []}
    for k, v in named.items():
        part["head" if k.startswith("head.") else "reparam" if k.startswith("reparam.") else "rest"].append(v)
    rates = {"rest": lr, "reparam": prefix_lr, "head": head_lr}
    groups = [{"params": part[g], "lr": rates[g]} for g in ("rest", "reparam", "head") if part[g]]
    optim = torch.optim.AdamW(groups, lr=lr, weight_decay=decay)
    batches = Batches(train_data, batch_size=opts.batch_size, pad_id=pad)
    dev = Batches(dev_data, batch_size=64, pad_id=pad)
    total = opts.steps or max(1, math.ceil(opts.epochs * len(batches)))
    warmup = max(1, int(opts.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _schedule(s, total=total, warmup=warmup))
    eval_every = opts.eval_every or len(batches)
    keep_every = opts.checkpoint_every or eval_every

    def current() -> dict[str, torch.Tensor]:
        return tensors | reparam() if reparam is not None else tensors

    def snapshot() -> dict[str, torch.Tensor]:
        final = dict(tensors) | (reparam.collapse() if reparam is not None else {})
        return {k: v.detach().float().cpu().clone() for k, v in final.items()}

    run = _run_identity(method, hyper, opts, n_train=len(train_data), n_dev=len(dev_data))
    ckpt_dir = Path(workdir) / CHECKPOINT_DIR if workdir is not None else None
    loop = {"best": None, "stale": 0, "ema": None, "history": [], "total": total, "elapsed": 0.0}
    best_tensors: dict[str, torch.Tensor] | None = None
    step, pending = 0, []
    if resume:
        if ckpt_dir is None:
            raise ValueError("resume needs the run's output directory (where its checkpoint is)")
        state = checkpoint.load(ckpt_dir)
        _check_same_run(state.run, run, where=ckpt_dir)
        with torch.no_grad():
            for k, v in named.items():
                v.copy_(state.params[k])
        optim.load_state_dict(state.optimizer)
        sched.load_state_dict(state.scheduler)
        g.set_state(state.generator)
        torch.set_rng_state(state.rng)
        step, pending, loop, best_tensors = state.step, state.pending, state.loop, state.best_tensors
        total = loop["total"]

    def keep() -> None:
        ckpt = checkpoint.Checkpoint(
            run=run,
            step=step,
            params={k: v.detach() for k, v in named.items()},
            optimizer=optim.state_dict(),
            scheduler=sched.state_dict(),
            pending=pending,
            generator=g.get_state(),
            rng=torch.get_rng_state(),
            loop=loop | {"total": total, "elapsed": loop["elapsed"] + time.perf_counter() - session},
            best_tensors=best_tensors,
        )
        checkpoint.save(ckpt_dir, ckpt)

    metrics = Path(workdir) / METRICS_FILE if workdir is not None else None
    shown = Progress(
        desc=f"{task.name} {method}",
        total=total,
        start=step,
        enabled=opts.progress,
        metrics=metrics,
        history=loop["history"],
    )

    def score(cfg, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        if generation:
            return evaluate_generation(model, cfg, weights, dev_texts)
        if embedding:
            return evaluate_pairs(model, cfg, weights, dev_pairs, metrics=task.metrics)
        return evaluate(model, cfg, weights, dev, metrics=task.metrics)

    if embedding:
        # the baseline of an embedding task is the plain backbone's own sentence vectors (slot 0)
        base = evaluate_pairs(model, config, None, dev_pairs, metrics=task.metrics) if len(dev_data) else {}
    if generation:
        # and of a generation task, the plain backbone's own outputs
        base = evaluate_generation(model, config, None, dev_texts)
    session = time.perf_counter()
    backbone.model.train(opts.dropout)
    try:
        while step < total:
            if not pending:
                pending = batches.epoch(g)
            idx = pending.pop(0)
            model.bind(fit_config, current())
            if embedding:
                loss = cosine_loss(model, pairs, idx, head=config.head, low=low, high=high)
            elif generation:
                loss = lm_loss(model, texts, idx)
            else:
                ids, mask, y = batches.collate(idx)
                dev_ = backbone.device
                extra = {k: v.to(dev_) for k, v in batches.extra(idx).items()}
                logits = _head_logits(model.train_forward(ids.to(dev_), mask.to(dev_), **extra), config)
                loss = _loss(logits.float(), y.to(dev_), task.kind)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if opts.max_grad_norm:
                nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
            optim.step()
            sched.step()
            step += 1
            value = loss.item()
            loop["ema"] = value if loop["ema"] is None else 0.9 * loop["ema"] + 0.1 * value
            shown.step(loss=loop["ema"], lr=sched.get_last_lr()[0])
            if len(dev_data) and (step % eval_every == 0 or step == total):
                scores = score(fit_config, current())
                elapsed = loop["elapsed"] + time.perf_counter() - session
                record = {
                    "event": "eval",
                    "step": step,
                    "loss": loop["ema"],
                    **scores,
                    "elapsed_s": round(elapsed, 1),
                }
                loop["history"].append(record)
                if loop["best"] is None or scores["score"] > loop["best"]["score"]:
                    loop["best"], loop["stale"] = scores, 0
                    best_tensors = snapshot() if method != FULL else None
                else:
                    loop["stale"] += 1
                shown.evaluated(record, best=loop["best"]["score"])
                if opts.patience is not None and loop["stale"] >= opts.patience:
                    total = step  # early stop: the best checkpoint so far is the result
            if ckpt_dir is not None and step < total and step % keep_every == 0:
                keep()
            if on_step is not None:
                on_step(step)
    finally:
        shown.close()
        backbone.model.eval()
        if method == FULL:
            for p in backbone.model.parameters():
                p.requires_grad_(False)
    best = loop["best"]
    history = loop["history"]
    if not embedding and not generation:
        base = (
            baseline_metrics(train_data, dev_data, kind=task.kind, metrics=task.metrics)
            if len(dev_data)
            else {}
        )
    n_backbone = sum(p.numel() for p in backbone.model.parameters())
    result = TrainResult(
        method=method,
        config=None,
        tensors=None,
        dev=best or {},
        baseline=base,
        history=history,
        backbone_params=n_backbone,
        steps=step,
        train_examples=len(train_data),
    )
    if method == FULL:
        head = sum(v.numel() for v in tensors.values())
        result.trainable_params = n_backbone + head
    else:
        final = best_tensors if best_tensors is not None else snapshot()
        if best_tensors is not None and fit_config is config and reparam is None:
            served = dict(best)  # the best checkpoint was evaluated with exactly the served forward
        else:
            served = score(config, final) if len(dev_data) else {}
        meta = _metadata(task, method=method, opts=opts, lr=lr, steps=step, n=len(train_data), dev=served)
        meta |= {f"baseline_{k}": round(v, 6) for k, v in base.items()}
        if embedding:
            # the gold scores' range the cosine was trained to match, scaled to [0, 1]
            meta |= {"similarity_low": low, "similarity_high": high}
        result.config = config.model_copy(update={"metadata": meta})
        result.tensors = final
        result.dev = served
        result.trainable_params = sum(v.numel() for v in final.values())
    result.seconds = time.perf_counter() - started
    shown.write({"event": "done", "steps": step, "best": best or {}, "served": result.dev, "baseline": base})
    if ckpt_dir is not None:
        # the run is complete: nothing left to resume
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return result


# TrainOptions fields that change neither the steps taken nor their order (a resume may change them).
_FREE = ("progress", "checkpoint_every")


def _run_identity(method: str, hyper: dict | None, opts: TrainOptions, *, n_train: int, n_dev: int) -> dict:
    """What a checkpoint must agree with to be resumed by this run."""
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k not in _FREE}
    return {"method": method, "hyper": hyper or {}, "options": options, "train": n_train, "dev": n_dev}


def _check_same_run(saved: dict, now: dict, *, where: Path) -> None:
    """Refuse to resume a checkpoint written by a run with other settings or data."""
    now = json.loads(json.dumps(now))  # the saved side went through JSON (tuples became lists)

    def flat(run: dict) -> dict:
        return {k: v for k, v in run.items() if k != "options"} | run.get("options", {})

    a, b = flat(saved), flat(now)
    if a != b:
        differ = [k for k in sorted({*a, *b}) if a.get(k) != b.get(k)]
        raise ValueError(
            f"the checkpoint in {where} is from a different run (it differs in: {', '.join(differ)})"
        )


def _metadata(task: TaskData, *, method: str, opts: TrainOptions, lr: float, steps: int, n: int, dev: dict):
    meta: dict = {
        "task": task.name,
        "trained_with": "adapterserve train",
        "train_examples": n,
        "steps": steps,
        "batch_size": opts.batch_size,
        "learning_rate": lr,
        "max_length": opts.max_length,
        "seed": opts.seed,
    }
    if dev:
        meta["dev_metric"] = "+".join(task.metrics)
        meta |= {f"dev_{k}": round(v, 6) for k, v in dev.items()}
    return meta

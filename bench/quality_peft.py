"""The quality table's peer row: PEFT's own LoRA trained at the same budget as our rows.

The same seeded training subset, tokenization, length-bucketed batch order, mean-pooled linear
head, AdamW with the same warm-up and decay, gradient clipping, dropout and per-epoch best dev
score as `adapters.training.trainer.train`, so the row differs from ours only in who implements
LoRA: PEFT's `LoraConfig` on the Hugging Face model, trained and evaluated through PEFT's forward.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

__all__ = ["PEFT_TARGETS", "train_peft_lora"]

PEFT_TARGETS = {"q": "query", "k": "key", "v": "value", "o": "attention.output.dense"}
"""Our projection names as PEFT's `target_modules` spell them on the BERT family."""


def _pooled(model, ids, mask, types) -> torch.Tensor:
    kw = {"token_type_ids": types} if types is not None else {}
    hidden = model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
    m = mask[..., None].to(hidden.dtype)
    # the masked mean, as our `mean` pooling and sentence-transformers compute it
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def train_peft_lora(task, *, options, lr: float, r: int = 8, alpha: float = 16.0, targets=("q", "v")):
    """Train PEFT LoRA plus a head on the bundled MiniLM: a `TrainResult` with no artifact, its best dev scores."""
    from peft import LoraConfig, get_peft_model

    from adapters.backbone import load_backbone
    from adapters.training.data import Batches, baseline_metrics, compute_metrics, subset, tokenize
    from adapters.training.trainer import TrainResult, _loss, _schedule

    started = time.perf_counter()
    opts = options
    torch.manual_seed(opts.seed)
    g = torch.Generator().manual_seed(opts.seed)
    backbone = load_backbone(device="cpu", dtype="float32")
    tok = backbone.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_ex = subset(task.train, opts.max_train_examples, g)
    dev_ex = subset(task.dev, opts.max_dev_examples, g)
    enc = {"max_length": opts.max_length, "kind": task.kind, "labels": task.labels}
    train_data, dev_data = tokenize(tok, train_ex, **enc), tokenize(tok, dev_ex, **enc)
    base = backbone.model
    n_backbone = sum(p.numel() for p in base.parameters())
    lora = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=[PEFT_TARGETS[t] for t in targets]
    )
    model = get_peft_model(base, lora)
    n_out = 1 if task.kind == "regression" else len(task.labels)
    head = nn.Linear(backbone.spec.hidden_size, n_out)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.02)
        target_mean = float(train_data.targets.float().mean()) if task.kind == "regression" else 0.0
        head.bias.fill_(target_mean)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=opts.weight_decay)
    batches = Batches(train_data, batch_size=opts.batch_size, pad_id=pad)
    dev = Batches(dev_data, batch_size=64, pad_id=pad)
    total = opts.steps or max(1, math.ceil(opts.epochs * len(batches)))
    warmup = max(1, int(opts.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _schedule(s, total=total, warmup=warmup))
    eval_every = opts.eval_every or len(batches)

    def types_of(b: Batches, idx):
        return b.extra(idx).get("token_type_ids")

    @torch.no_grad()
    def score() -> dict[str, float]:
        model.eval()
        out = torch.zeros(len(dev_data), n_out)
        for idx in dev.ordered():
            ids, mask, _ = dev.collate(idx)
            out[idx] = head(_pooled(model, ids, mask, types_of(dev, idx)))
        model.train(opts.dropout)
        preds = out[:, 0] if task.kind == "regression" else out.argmax(-1)
        return compute_metrics(preds.numpy(), dev_data.targets.numpy(), metrics=task.metrics)

    best, history, step, pending = None, [], 0, []
    model.train(opts.dropout)
    while step < total:
        if not pending:
            pending = batches.epoch(g)
        idx = pending.pop(0)
        ids, mask, y = batches.collate(idx)
        logits = head(_pooled(model, ids, mask, types_of(batches, idx)))
        loss = _loss(logits.float(), y, task.kind)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if opts.max_grad_norm:
            nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
        optim.step()
        sched.step()
        step += 1
        if len(dev_data) and (step % eval_every == 0 or step == total):
            scores = score()
            history.append({"event": "eval", "step": step, "loss": float(loss), **scores})
            if best is None or scores["score"] > best["score"]:
                best = scores
    return TrainResult(
        method="peft_lora",
        config=None,
        tensors=None,
        dev=best or {},
        baseline=baseline_metrics(train_data, dev_data, kind=task.kind, metrics=task.metrics),
        history=history,
        trainable_params=sum(p.numel() for p in params),
        backbone_params=n_backbone,
        steps=step,
        train_examples=len(train_data),
        seconds=time.perf_counter() - started,
    )

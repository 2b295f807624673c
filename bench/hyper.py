"""Hypernetwork-generated adapters on MiniLM: generation time per task, and mixed batches vs the backbone.

    python -m bench.hyper [--reps N] [--threads T] [--quick]

Prints one JSON object:

- `ms_per_task_single`: generating one task's adapters (the hypernetwork forward up to the bank
  entries, every layer and site), median over tasks and repetitions.
- `ms_per_task_batched`: 16 tasks generated in one batched hypernetwork forward, divided by 16.
- `load_ms_per_task_single` / `load_ms_per_task_batched`: the same plus writing the slots
  (`MultiTaskModel.load` with the hypernetwork, i.e. what a device-slot miss costs, and
  `MultiTaskModel.load_generated` for 16 tasks at once).
- `mixed`: 32 rows x 128 tokens over 16 tasks (8 generated, 8 uploaded bottleneck adapters of the
  same width, rows interleaved) against the plain unwrapped backbone; `ratio_vs_backbone` is the
  mixed forward's throughput over the plain backbone's (1.0 = free).

The hypernetwork is the schema's default Hyperformer++ (task embedding 64, bottleneck 24) with
random weights: cost depends on shapes only. Ratios matter, absolute times only on a quiet machine.
On cores other jobs keep busy, use `--threads 1`: with more threads every parallel region waits
for a thread the scheduler has put aside, and a generation takes whole scheduler slices (~16 ms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # As a script, this directory is sys.path[0], where bench/http.py would shadow the standard `http`.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from bench.common import build_inputs, emit, environment, interleaved, log, random_adapter, setup, summarize

TASKS = 16
BATCH, SEQ_LEN = 32, 128
THREADS = 2


def _hypernetwork(spec):
    from adapters.hypernet import Hypernetwork
    from adapters.training.hyper import init_hypernetwork
    from store.artifact import parse_config

    cfg = parse_config({"method": "hypernetwork", "backbone_fingerprint": spec.fingerprint})
    tensors = init_hypernetwork(cfg, spec, generator=torch.Generator().manual_seed(0))
    # a trained generator's gains are not ~0: make the generated adapters do real work
    for k in tensors:
        if ".gen.ln_gamma.bias" in k:
            tensors[k] = torch.ones_like(tensors[k])
    return cfg, Hypernetwork.from_tensors(cfg, tensors, spec)


def _task(spec, cfg, *, seed: int):
    from store.artifact import parse_config

    task = parse_config(
        {
            "method": "hyperformer",
            "hypernetwork": "bench",
            "task_embedding_dim": cfg.task_embedding_dim,
            "backbone_fingerprint": spec.fingerprint,
            "head": {"type": "classification", "labels": ["a", "b"]},
        }
    )
    g = torch.Generator().manual_seed(seed)
    tensors = random_adapter(task, spec, seed=seed)
    tensors["task_embedding"] = torch.randn(cfg.task_embedding_dim, generator=g)
    return task, tensors


def _median_ms(samples: list[float]) -> float:
    return round(1000 * statistics.median(samples), 4)


def measure(*, reps: int, warmup: int) -> dict:
    """Every number of the module docstring, one run."""
    from adapters.backbone import load_backbone
    from adapters.model import BankConfig, MultiTaskModel
    from store.artifact import parse_config

    log("loading MiniLM twice (wrapped + plain)")
    backbone = load_backbone(device="cpu", dtype="float32")
    plain = load_backbone(device="cpu", dtype="float32")
    spec = backbone.spec
    hcfg, net = _hypernetwork(spec)
    model = MultiTaskModel(
        backbone,
        banks=BankConfig(slots=2 * TASKS + 1, bottleneck_max_dim=hcfg.bottleneck_dim, lora_max_rank=0),
    )
    tasks = [_task(spec, hcfg, seed=i) for i in range(TASKS)]

    # -- generation ------------------------------------------------------------------------------
    log("timing generation")
    single: list[float] = []
    batched: list[float] = []
    gen_single: list[float] = []
    gen_batched: list[float] = []
    z_all = torch.stack([t["task_embedding"] for _, t in tasks])
    for rep in range(warmup + reps):
        times = []
        for i, (cfg, t) in enumerate(tasks):
            t0 = time.perf_counter()
            model.load(1 + i, cfg, t, hypernetwork=net)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.load_generated([(1 + i, cfg, t) for i, (cfg, t) in enumerate(tasks)], net)
        batch_s = time.perf_counter() - t0
        g_times = []
        with torch.no_grad():
            for i in range(TASKS):
                t0 = time.perf_counter()
                net.entries(z_all[i : i + 1])
                g_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            net.entries(z_all)
            g_batch = time.perf_counter() - t0
        if rep >= warmup:
            single += times
            batched.append(batch_s / TASKS)
            gen_single += g_times
            gen_batched.append(g_batch / TASKS)

    # -- mixed batch -----------------------------------------------------------------------------
    log("timing the mixed batch")
    half = TASKS // 2
    uploaded = parse_config(
        {
            "method": "bottleneck",
            "bottleneck_dim": hcfg.bottleneck_dim,
            "backbone_fingerprint": spec.fingerprint,
            "head": {"type": "classification", "labels": ["a", "b"]},
        }
    )
    for j in range(half):
        model.load(1 + TASKS + j, uploaded, random_adapter(uploaded, spec, seed=100 + j))
    # rows alternate: generated task k, uploaded task k, ...
    slot_of_task = [1 + k for k in range(half)] + [1 + TASKS + k for k in range(half)]
    order = [slot_of_task[(r % 2) * half + (r // 2) % half] for r in range(BATCH)]
    slots = torch.tensor(order)
    ids, mask, source = build_inputs(plain.tokenizer, batch=BATCH, seq_len=SEQ_LEN, seed=0)
    g = torch.Generator().manual_seed(1)
    head_w, head_b = torch.randn(spec.hidden_size, 2, generator=g) * 0.02, torch.zeros(2)

    def plain_forward():
        with torch.inference_mode():
            h = plain.model(input_ids=ids, attention_mask=mask).last_hidden_state
            return torch.addmm(head_b, h[:, 0], head_w)

    def mixed_forward():
        return model.classify(ids, mask, slots)

    def generated_only():
        return model.classify(ids, mask, torch.tensor([1 + (r % TASKS) for r in range(BATCH)]))

    stats = {
        k: summarize(v)
        for k, v in interleaved(
            {"plain": plain_forward, "mixed": mixed_forward, "generated_only": generated_only},
            reps=reps,
            warmup=warmup,
        ).items()
    }
    tokens = BATCH * SEQ_LEN
    plain_tps = tokens / stats["plain"]["median_s"]
    runs = {}
    for name in ("mixed", "generated_only"):
        tps = tokens / stats[name]["median_s"]
        runs[name] = {
            "tokens_per_s": round(tps, 1),
            "median_ms": round(1000 * stats[name]["median_s"], 2),
            "ratio_vs_backbone": round(tps / plain_tps, 4),
        }
    return {
        "benchmark": "hyper",
        "env": environment(),
        "backbone": spec.name,
        "hypernetwork": {
            "variant": hcfg.variant,
            "task_embedding_dim": hcfg.task_embedding_dim,
            "bottleneck_dim": hcfg.bottleneck_dim,
            "parameters": sum(p.numel() for p in net.parameters()),
        },
        "tasks": TASKS,
        "reps": reps,
        "ms_per_task_single": _median_ms(gen_single),
        "ms_per_task_batched": _median_ms(gen_batched),
        "load_ms_per_task_single": _median_ms(single),
        "load_ms_per_task_batched": _median_ms(batched),
        "mixed": {
            "rows": BATCH,
            "seq_len": SEQ_LEN,
            "inputs": source,
            "tasks": f"{half} generated + {half} uploaded bottleneck (width {hcfg.bottleneck_dim})",
            "plain_backbone_tokens_per_s": round(plain_tps, 1),
            "plain_backbone_median_ms": round(1000 * stats["plain"]["median_s"], 2),
            **runs["mixed"],
            "generated_only": runs["generated_only"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--quick", action="store_true", help="3 reps, 1 warm-up")
    args = p.parse_args(argv)
    setup(threads=args.threads)
    reps, warmup = (3, 1) if args.quick else (args.reps, args.warmup)
    emit(measure(reps=reps, warmup=warmup))
    return 0


if __name__ == "__main__":
    sys.exit(main())

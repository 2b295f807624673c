"""Thousands of tasks over a device budget: Zipf(1.1) popularity, one-sentence requests.

    python bench/tasks.py [--tasks 1000] [--batches 40] [--budgets 0.05,0.1,0.25,0.5,1] [--plot PNG]

1,000 tasks on the bundled MiniLM, a mix of methods and sizes (LoRA r=4/8/16 on q,v; Compacter
n=4 width 48; Pfeiffer bottleneck width 16 and 64; IA3), all decoded in host memory. Each batch is
32 one-sentence requests whose tasks are drawn from Zipf(1.1) over the tasks; a batch runs as the
engine's device worker runs one: `DeviceSlots.assign` (loads the misses into bank rows, evicting
by the device tier's size-aware policy) then one mixed-task `classify`. For each device budget (a
fraction of the bytes of all 1,000 tasks; 1 = every task resident) one JSON line:

    {"budget_fraction", "budget_bytes", "rows_per_s", "ratio_vs_all_resident", "hit_rate",
     "cold_load_ms_p50", "cold_load_ms_p99", "resident", "evictions",
     "device_bytes_per_task_vs_artifact", "pool_bytes_vs_resident"}

Each budget first runs `--batches` batches untimed (warm-up: the tier reaches steady state), then
`--batches` fresh ones timed. `cold_load_ms` is the time to copy one task that missed into its slot (its first request's extra
latency on the device); the artifact size is its decoded tensors' bytes. Keep runs short on
shared machines (`nice -n 10`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from adapters.backbone import load_backbone
from adapters.model import BankConfig, MultiTaskModel
from service.cache import Adapter, DeviceSlots
from service.metrics import Metrics
from store.artifact import expected_tensors, parse_config

ROWS = 32
ZIPF = 1.1
HEAD = {"type": "classification", "labels": ["neg", "pos"]}
MIX = [
    {"method": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]},
    {"method": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"]},
    {"method": "lora", "r": 16, "alpha": 16, "targets": ["q", "v"]},
    {"method": "compacter", "variant": "compacter", "bottleneck_dim": 48, "phm_dim": 4},
    {"method": "bottleneck", "sites": ["ffn"], "bottleneck_dim": 16},
    {"method": "bottleneck", "sites": ["ffn"], "bottleneck_dim": 64},
    {"method": "ia3", "targets": ["k", "v", "ffn_out"], "feedforward": ["ffn_out"]},
]
SENTENCES = [
    "the film was a delight from start to finish",
    "a tedious plot and wooden acting",
    "service was quick and the staff friendly",
    "the battery died after two days",
]


def build_tasks(model: MultiTaskModel, n: int, seed: int) -> list[Adapter]:
    """n decoded adapters, methods cycling through MIX, random small weights."""
    spec = model.spec
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        raw = {**MIX[i % len(MIX)], "backbone_fingerprint": spec.fingerprint, "head": HEAD}
        cfg = parse_config(raw)
        tensors = {k: torch.randn(s, generator=g) * 0.02 for k, s in expected_tensors(cfg, spec).items()}
        for k, t in tensors.items():
            if k.endswith(".ia3") or k.endswith("ln.weight"):
                tensors[k] = 1 + t
        nbytes = model.footprint(model.entries(cfg, tensors))
        host = sum(t.numel() * t.element_size() for t in tensors.values())
        out.append(
            Adapter(
                task=f"task{i}",
                uid=i,
                version=1,
                config=cfg,
                tensors=tensors,
                nbytes=nbytes,
                host_nbytes=host,
                num_parameters=sum(t.numel() for t in tensors.values()),
                sha256="",
            )
        )
    return out


def run_budget(model, tasks, batches, fraction: float, enc, seed: int) -> dict:
    """One budget: the same Zipf request stream, timed end to end."""
    total = sum(a.nbytes for a in tasks)
    budget = max(int(total * fraction), max(a.nbytes for a in tasks) * ROWS)
    m = Metrics(max_tasks=1)
    device = DeviceSlots(model=model, budget_bytes=budget, metrics=m)
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(tasks) + 1) ** ZIPF
    p /= p.sum()
    order = rng.permutation(len(tasks))  # popularity rank -> task, so methods mix at every rank
    loads: list[float] = []
    if fraction >= 1:
        for start in range(0, len(tasks), ROWS):
            device.assign(tasks[start : start + ROWS])
    stream = [rng.choice(len(tasks), size=ROWS, p=p) for _ in range(batches)]
    # Warm up on the same stream (untimed), so the timed pass sees steady-state misses, not the
    # first request of every task the all-resident run preloaded.
    for draw in stream:
        picks = [tasks[order[k]] for k in draw]
        slots = device.assign(list({a.key: a for a in picks}.values()))
    hits0 = m.tier_hits.labels(tier="device")._value.get()
    miss0 = m.tier_misses.labels(tier="device")._value.get()
    ev0 = m.tier_evictions.labels(tier="device")._value.get()
    stream = [rng.choice(len(tasks), size=ROWS, p=p) for _ in range(batches)]
    started = time.perf_counter()
    for draw in stream:
        picks = [tasks[order[k]] for k in draw]
        distinct = list({a.key: a for a in picks}.values())
        before = {k for k in device.resident_keys()}
        t0 = time.perf_counter()
        slots = device.assign(distinct)
        cold = [a for a in distinct if a.key not in before]
        if cold:
            loads.extend([(time.perf_counter() - t0) / len(cold)] * len(cold))
        model.classify(enc["input_ids"], enc["attention_mask"], [slots[a.key] for a in picks])
    elapsed = time.perf_counter() - started
    hits = m.tier_hits.labels(tier="device")._value.get() - hits0
    misses = m.tier_misses.labels(tier="device")._value.get() - miss0
    resident = device.resident_keys()
    by_key = {a.key: a for a in tasks}
    dev = sum(by_key[k].nbytes for k in resident)
    art = sum(by_key[k].host_bytes for k in resident)
    out = {
        "budget_fraction": fraction,
        "budget_bytes": budget,
        "rows_per_s": ROWS * batches / elapsed,
        "hit_rate": hits / max(hits + misses, 1),
        "cold_load_ms_p50": float(np.percentile(loads, 50) * 1e3) if loads else 0.0,
        "cold_load_ms_p99": float(np.percentile(loads, 99) * 1e3) if loads else 0.0,
        "resident": len(resident),
        "evictions": int(m.tier_evictions.labels(tier="device")._value.get() - ev0),
        "device_bytes_per_task_vs_artifact": dev / max(art, 1),
        "pool_bytes_vs_resident": model.allocated_bytes() / max(dev, 1),
    }
    for key in resident:
        device.evict(key)
    return out


def plot(results: list[dict], path: Path) -> None:
    """Throughput (vs all resident) and hit rate against the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["budget_fraction"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(x, [r["ratio_vs_all_resident"] for r in results], "o-", label="throughput / all resident")
    ax.plot(x, [r["hit_rate"] for r in results], "s--", label="device hit rate")
    ax.set_xscale("log")
    ax.set_xlabel("device budget (fraction of all 1,000 tasks' bytes)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("1,000 tasks, Zipf(1.1), MiniLM on CPU, 32 rows per batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    """Run every budget and print one JSON line each."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--budgets", default="0.05,0.1,0.25,0.5,1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backbone = load_backbone(None, device="cpu", dtype="float32")
    model = MultiTaskModel(backbone, banks=BankConfig(slots=args.tasks + 1))
    tasks = build_tasks(model, args.tasks, seed=0)
    enc = backbone.tokenizer(
        [SENTENCES[i % len(SENTENCES)] for i in range(ROWS)], padding=True, return_tensors="pt"
    )
    fractions = sorted(float(f) for f in args.budgets.split(","))
    results = [run_budget(model, tasks, args.batches, f, enc, seed=1) for f in fractions]
    full = next((r for r in results if r["budget_fraction"] >= 1), results[-1])
    for r in results:
        r["ratio_vs_all_resident"] = r["rows_per_s"] / full["rows_per_s"]
        print(json.dumps(r), flush=True)
    if args.plot is not None:
        plot(results, args.plot)


if __name__ == "__main__":
    main()

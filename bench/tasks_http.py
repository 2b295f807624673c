"""bench/tasks.py through HTTP: 1,000 tasks, Zipf(1.1) popularity, one-sentence requests to a real server.

    python bench/tasks_http.py [--tasks 1000] [--budgets 1,0.25,0.1] [--connections 64] [--duration 20]

The same 1,000 tasks as bench/tasks.py (LoRA r=4/8/16, Compacter, Pfeiffer width 16 and 64, IA3 on
the bundled MiniLM), uploaded through the API to one `adapterserve serve` per device budget (a
fraction of the device bytes of all tasks, `ADAPTERSERVE_CACHE_BYTES`; 1 = every task resident; the
host tier holds them all, so only the device tier is under test). The load is closed-loop (`wrk`
when installed, Python clients otherwise): each request one sentence to a task drawn from Zipf(1.1),
the same draw for every budget; budgets run in the order given (the first server of a run has been
seen slower, so put the all-resident one first, or repeat it last). After an untimed warm-up of the
same length, one measured run; the device tier's hits, misses and evictions come from the server's
/metrics over that run. One JSON line per budget:

    {"budget_fraction", "cache_bytes", "requests_per_s", "ratio_vs_all_resident", "p50_ms", "p99_ms",
     "hit_rate", "device_loads", "evictions", "cpu_ms_per_request", "statuses", "client"}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.common import log
from bench.http import Server
from bench.load import Load, run_load, wrk_available
from bench.tasks import HEAD, MIX, SENTENCES, ZIPF

PORT = 8791


def write_tasks(root: Path, n: int, spec) -> tuple[list[Path], list[int]]:
    """n artifact directories cycling through MIX, and each one's device bytes once loaded."""
    import torch

    from store.artifact import expected_tensors, parse_config
    from store.safetensors_io import write_safetensors

    dirs, nbytes = [], []
    rng = np.random.default_rng(0)
    for i in range(n):
        raw = {**MIX[i % len(MIX)], "backbone_fingerprint": spec.fingerprint, "head": HEAD}
        cfg = parse_config(raw)
        arrays = {
            k: (rng.standard_normal(s) * 0.02).astype(np.float32)
            for k, s in expected_tensors(cfg, spec).items()
        }
        for k in arrays:
            if k.endswith(".ia3") or k.endswith("ln.weight"):
                arrays[k] += 1
        d = root / f"task{i}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(json.dumps(raw))
        write_safetensors(d / "adapter.safetensors", arrays)
        dirs.append(d)
        nbytes.append((cfg, {k: torch.from_numpy(v) for k, v in arrays.items()}))
    return dirs, nbytes


def device_bytes(items) -> list[int]:
    """Device bytes of each task's bank rows, as the server's budget counts them."""
    from adapters.backbone import load_backbone
    from adapters.model import BankConfig, MultiTaskModel

    model = MultiTaskModel(load_backbone(None, device="cpu", dtype="float32"), banks=BankConfig(slots=2))
    return [model.footprint(model.entries(cfg, tensors)) for cfg, tensors in items]


def tier(metrics: str) -> dict[str, float]:
    """The device tier's hit, miss, load and eviction counters from a /metrics scrape."""
    out = {"hits": 0.0, "misses": 0.0, "loads": 0.0, "evictions": 0.0}
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.labels.get("tier") != "device" or not s.name.endswith("_total"):
                continue
            for key, name in (
                ("hits", "tier_hits"),
                ("misses", "tier_misses"),
                ("loads", "tier_loads"),
                ("evictions", "tier_evictions"),
            ):
                if s.name == f"adapterserve_{name}_total":
                    out[key] += s.value
    return out


def run_budget(
    root: Path, dirs: list[Path], *, fraction: float, total: int, largest: int, load: Load, args
) -> dict:
    """One server at one device budget: upload every task, warm up, one measured run."""
    budget = max(int(total * fraction), largest * 32)
    root = root / f"budget-{fraction}"  # a store of its own: no task of an earlier budget is left in it
    root.mkdir()
    server = Server(
        root,
        port=PORT,
        threads=args.threads,
        slots=len(dirs) + 1,
        cache_bytes=budget,
        host_cache_bytes=4 * total,
        max_batch_size=32,
        max_queue=4096,
    )
    try:
        server.wait_ready()
        measured = upload_and_measure(
            server, dirs, load=load, args=args, workdir=root, label=f"budget {fraction}"
        )
    finally:
        server.stop()
    return {"budget_fraction": fraction, "cache_bytes": budget, **measured}


def upload_and_measure(
    server: Server,
    dirs: list[Path],
    *,
    load: Load,
    args,
    workdir: Path,
    label: str,
    settle_s: float = 0.0,
    scrape_delay_s: float = 0.0,
) -> dict:
    """Upload every task through the API, wait `settle_s`, warm up, then one measured run's summary.

    `scrape_delay_s` waits before the closing /metrics scrape (metrics that arrive after a delay).
    """
    log(f"{label}: uploading {len(dirs)} tasks ...")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda d: server.upload(d.name, d), dirs))
    time.sleep(settle_s)
    common = {"connections": args.connections, "warmup": 0, "server_pid": server.proc.pid}
    common |= {"workdir": workdir, "use_wrk": args.wrk}
    run_load(server.url, load, duration=args.duration, **common)
    before = tier(httpx.get(f"{server.url}/metrics").text)
    result = run_load(server.url, load, duration=args.duration, **common)
    time.sleep(scrape_delay_s)
    after = tier(httpx.get(f"{server.url}/metrics").text)
    return summary(result, before, after)


def zipf_load(n: int) -> Load:
    """One-sentence requests to n tasks (`task{i}`) drawn from Zipf(ZIPF), the same draw on every call."""
    rng = np.random.default_rng(1)
    p = 1.0 / np.arange(1, n + 1) ** ZIPF
    order = rng.permutation(n)  # popularity rank -> task, so methods mix at every rank
    # The load picks a path uniformly: a long Zipf draw of paths makes its picks Zipf-distributed.
    draw = rng.choice(n, size=8192, p=p / p.sum())
    return Load(
        paths=[f"/v1/tasks/task{order[k]}/predict" for k in draw],
        bodies=[json.dumps({"inputs": [s]}) for s in SENTENCES],
        seed=1,
    )


def summary(result: dict, before: dict[str, float], after: dict[str, float]) -> dict:
    """A measured run's figures: throughput, latency, the device tier over the run, CPU per request."""
    d = {k: after[k] - before[k] for k in after}
    cpu = result["cpu_ms_per_request"]
    return {
        "requests_per_s": round(result["ok_per_s"], 2),
        "p50_ms": round(result["p50_ms"], 2),
        "p99_ms": round(result["p99_ms"], 2),
        "hit_rate": round(d["hits"] / max(d["hits"] + d["misses"], 1), 4),
        "device_loads": int(d["loads"]),
        "evictions": int(d["evictions"]),
        "cpu_ms_per_request": None if cpu is None else round(cpu, 3),
        "statuses": result["statuses"],
        "client": result["client"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run every budget and print one JSON line each."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--budgets", default="1,0.25,0.1")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--python-client", dest="wrk", action="store_false", help="Python clients even if wrk is installed"
    )
    args = ap.parse_args(argv)
    args.wrk = args.wrk and wrk_available()
    from adapters.backbone import load_backbone

    spec = load_backbone(None, device="cpu", dtype="float32").spec
    with tempfile.TemporaryDirectory(prefix="adapterserve-tasks-http-") as tmp:
        root = Path(tmp)
        dirs, items = write_tasks(root / "artifacts", args.tasks, spec)
        sizes = device_bytes(items)
        load = zipf_load(args.tasks)
        results = [
            run_budget(root, dirs, fraction=f, total=sum(sizes), largest=max(sizes), load=load, args=args)
            for f in (float(x) for x in args.budgets.split(","))  # in the order given: order effects show
        ]
    full = next((r for r in results if r["budget_fraction"] >= 1), results[-1])
    for r in results:
        r["ratio_vs_all_resident"] = round(r["requests_per_s"] / max(full["requests_per_s"], 1e-9), 3)
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

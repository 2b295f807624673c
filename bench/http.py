"""The HTTP service against the in-process model: requests/s and latency under concurrent clients.

    python bench/http.py [--tasks 16] [--clients 64] [--duration 20] [--runs mixed,per_task,unbatched,in_process]

A real `adapterserve serve` process on 127.0.0.1 serves the bundled MiniLM-L6 with `--tasks` LoRA
adapters (r=8 on q,v, random weights, 2-way heads). `--clients` concurrent HTTP clients (one asyncio
process, one keep-alive connection each) send one SST-2 dev sentence per request, each to the next
task in turn, for `--duration` seconds after a warm-up. Runs, each on a fresh server:

- `mixed`: the default batcher (rows of many tasks in one forward);
- `per_task`: one task per forward, round-robin;
- `unbatched`: `max_batch_size=1`;
- `in_process`: the same model and adapters in this process, no HTTP: tokenize, route and classify
  batches of `--batch` inputs of mixed tasks back to back, split by length as the service splits them
  (the ceiling the service is measured against).

One JSON object on stdout:

    {"config": {...}, "runs": [{"name": ..., "requests_per_s": r, "p50_ms": a, "p99_ms": b, ...}, ...],
     "ratios": {"mixed_vs_in_process": ..., "mixed_vs_unbatched": ...}}

The clients share the machine with the server, so on a small machine they take part of its CPU;
the ratios are what to compare.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, this file's directory comes first on sys.path, where it would shadow the
    # standard library's `http` package for everything imported below.
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time

import httpx
import numpy as np
import torch

from bench.common import SST2_DEV, emit, environment, log, setup, wait_ready

REPO = Path(__file__).resolve().parents[1]
ADMIN = "bench-admin-key-0123456789"
HEAD = {"type": "classification", "labels": ["negative", "positive"]}
LORA = {"method": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"], "head": HEAD}
SERVER_RUNS = {
    "mixed": {"batching": "mixed"},
    "per_task": {"batching": "per_task"},
    "unbatched": {"batching": "mixed", "max_batch_size": 1},
}


def sentences(limit: int | None = None) -> list[str]:
    """SST-2 dev sentences (synthetic ones when the data set is absent)."""
    if SST2_DEV.is_file():
        lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[1:]
        out = [ln.split("\t")[0].strip() for ln in lines if ln.strip()]
    else:
        words = [
            "the",
            "film",
            "was",
            "good",
            "bad",
            "great",
            "awful",
            "boring",
            "fun",
            "and",
            "but",
            "not",
            "very",
            "story",
            "music",
            "ending",
        ]
        rng = np.random.default_rng(0)
        out = [" ".join(rng.choice(words, size=int(rng.integers(5, 25)))) for _ in range(872)]
    return out[:limit] if limit else out


def write_adapters(root: Path, *, tasks: int, spec) -> list[Path]:
    """One artifact directory per task, random LoRA weights of the shapes the config implies."""
    from store.artifact import expected_tensors, parse_config
    from store.safetensors_io import write_safetensors

    dirs = []
    for i in range(tasks):
        raw = {**LORA, "backbone_fingerprint": spec.fingerprint}
        cfg = parse_config(raw)
        rng = np.random.default_rng(i)
        arrays = {
            k: (rng.standard_normal(s) * 0.05).astype(np.float32)
            for k, s in expected_tensors(cfg, spec).items()
        }
        d = root / f"task{i:02d}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(cfg.model_dump_json())
        write_safetensors(d / "adapter.safetensors", arrays)
        dirs.append(d)
    return dirs


class Server:
    """An `adapterserve serve` subprocess with its own store, configured by ADAPTERSERVE_* variables."""

    def __init__(self, root: Path, *, port: int, threads: int, **settings: object) -> None:
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERSERVE_")}
        env |= {
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": str(threads),
            "ADAPTERSERVE_STORE": str(root / f"store-{port}"),
            "ADAPTERSERVE_ADMIN_KEYS": ADMIN,
            "ADAPTERSERVE_SEED_DIR": "",
            "ADAPTERSERVE_LOG_LEVEL": "warning",
            "ADAPTERSERVE_MAX_QUEUE": "100000",
        }
        env |= {f"ADAPTERSERVE_{k.upper()}": str(v) for k, v in settings.items()}
        self.log = open(root / f"server-{port}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll /readyz until 200."""
        wait_ready(self.proc, url=self.url, log=lambda: "", timeout=timeout, interval=0.2)

    def upload(self, task: str, directory: Path) -> None:
        """Upload one artifact directory as the task's first version."""
        files = {
            "config": (
                "adapter_config.json",
                (directory / "adapter_config.json").read_bytes(),
                "application/json",
            ),
            "weights": (
                "adapter.safetensors",
                (directory / "adapter.safetensors").read_bytes(),
                "application/octet-stream",
            ),
        }
        r = httpx.post(
            f"{self.url}/v1/adapters/{task}",
            files=files,
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=120,
        )
        r.raise_for_status()

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


async def load(url: str, *, tasks: list[str], texts: list[str], clients: int, duration: float, warmup: float):
    """`clients` concurrent request loops; latencies (s) and status counts of the measured window."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(10**12))
    start = time.monotonic()
    measure_from = start + warmup
    stop_at = measure_from + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:

        async def one_client() -> None:
            while True:
                n = next(counter)
                t0 = time.monotonic()
                if t0 >= stop_at:
                    return
                task = tasks[n % len(tasks)]
                r = await http.post(f"/v1/tasks/{task}/predict", json={"inputs": [texts[n % len(texts)]]})
                t1 = time.monotonic()
                if t0 >= measure_from and t1 <= stop_at:
                    latencies.append(t1 - t0)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies, statuses


def summarize(
    name: str, latencies: list[float], *, seconds: float, statuses: dict[int, int] | None = None
) -> dict:
    """requests/s and latency percentiles of one run."""
    xs = sorted(latencies)
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) >= 2 else [xs[0]] * 99
    out = {
        "name": name,
        "requests_per_s": round(len(xs) / seconds, 2),
        "p50_ms": round(statistics.median(xs) * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2),
        "requests": len(xs),
    }
    if statuses is not None:
        out["statuses"] = {str(k): v for k, v in sorted(statuses.items())}
    return out


def in_process(dirs: list[Path], *, texts: list[str], batch: int, duration: float, warmup: float) -> dict:
    """Tokenize + route + classify + decode batches of mixed tasks back to back, in this process."""
    from adapters.backbone import load_backbone
    from adapters.heads import decode_row
    from adapters.model import BankConfig, MultiTaskModel
    from service.engine import DEFAULT_SPLIT_COST, length_splits
    from store.artifact import parse_config
    from store.safetensors_io import SafetensorsLimits, load_arrays

    backbone = load_backbone(device="cpu", dtype="float32")
    model = MultiTaskModel(backbone, banks=BankConfig(slots=len(dirs) + 1, lora_max_rank=16))
    for slot, d in enumerate(dirs, start=1):
        cfg = parse_config((d / "adapter_config.json").read_bytes())
        arrays = load_arrays(d / "adapter.safetensors", limits=SafetensorsLimits())
        model.load(slot, cfg, {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    tok = backbone.tokenizer
    latencies: list[float] = []
    n = 0
    start = time.monotonic()
    measure_from = start + warmup
    stop_at = measure_from + duration
    with torch.inference_mode():
        while time.monotonic() < stop_at:
            idx = [(n + i) for i in range(batch)]
            rows = [texts[i % len(texts)] for i in idx]
            slots = [1 + (i % len(dirs)) for i in idx]
            t0 = time.monotonic()
            enc = tok(rows, truncation=True, max_length=128)
            # the service's own policy: rows of very different lengths run as separate forwards
            lengths = [len(ids) for ids in enc["input_ids"]]
            for run in length_splits(lengths, forward_cost=DEFAULT_SPLIT_COST["cpu"]):
                part = tok.pad({k: [enc[k][i] for i in run] for k in enc}, return_tensors="pt")
                extra = {"token_type_ids": part["token_type_ids"]} if "token_type_ids" in part else {}
                out = model.classify(
                    part["input_ids"], part["attention_mask"], [slots[i] for i in run], **extra
                )
                logits = out.logits.float()
                for r in range(len(run)):
                    decode_row(logits[r], kind="classification", labels=HEAD["labels"])
            t1 = time.monotonic()
            if t0 >= measure_from:
                # every input of the batch waited for the whole batch
                latencies.extend([t1 - t0] * batch)
            n += batch
    return summarize("in_process", latencies, seconds=duration)


def main() -> None:
    """Run every requested variant and print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each run")
    p.add_argument("--batch", type=int, default=32, help="max batch size (server) and in-process batch")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server and in-process model")
    p.add_argument("--runs", default=",".join([*SERVER_RUNS, "in_process"]))
    p.add_argument("--port", type=int, default=18431)
    args = p.parse_args()
    setup(threads=args.threads)
    from adapters.backbone import load_backbone

    spec = load_backbone(device="cpu", dtype="float32").spec
    texts = sentences()
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    runs = []
    with tempfile.TemporaryDirectory(prefix="adapterserve-bench-") as tmp:
        root = Path(tmp)
        dirs = write_adapters(root / "artifacts", tasks=args.tasks, spec=spec)
        tasks = [d.name for d in dirs]
        for i, name in enumerate(names):
            if name == "in_process":
                log("in_process ...")
                runs.append(
                    in_process(
                        dirs, texts=texts, batch=args.batch, duration=args.duration, warmup=args.warmup
                    )
                )
                continue
            settings = {"max_batch_size": args.batch, **SERVER_RUNS[name]}
            log(f"{name}: starting a server with {settings} ...")
            server = Server(root, port=args.port + i, threads=args.threads, **settings)
            try:
                server.wait_ready()
                for t, d in zip(tasks, dirs, strict=True):
                    server.upload(t, d)
                lat, statuses = asyncio.run(
                    load(
                        server.url,
                        tasks=tasks,
                        texts=texts,
                        clients=args.clients,
                        duration=args.duration,
                        warmup=args.warmup,
                    )
                )
            finally:
                server.stop()
            runs.append(summarize(name, lat, seconds=args.duration, statuses=statuses))
            log(f"  {runs[-1]}")
    by = {r["name"]: r["requests_per_s"] for r in runs}
    ratios = {}
    if "mixed" in by and "in_process" in by:
        ratios["mixed_vs_in_process"] = round(by["mixed"] / by["in_process"], 3)
    if "mixed" in by and "unbatched" in by:
        ratios["mixed_vs_unbatched"] = round(by["mixed"] / by["unbatched"], 3)
    if "mixed" in by and "per_task" in by:
        ratios["mixed_vs_per_task"] = round(by["mixed"] / by["per_task"], 3)
    config = {
        "backbone": "minilm-l6",
        "tasks": args.tasks,
        "clients": args.clients,
        "duration_s": args.duration,
        "batch": args.batch,
        "adapter": "lora r=8 q,v",
        "inputs": "sst2 dev" if SST2_DEV.is_file() else "synthetic",
        **environment(),
    }
    emit({"config": config, "runs": runs, "ratios": ratios})


if __name__ == "__main__":
    main()

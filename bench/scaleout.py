"""Scale-out on Ray Serve against the plain server: the cost of the Ray hop and task-affine routing.

    python bench/scaleout.py [--tasks 1000] [--slots 64] [--connections 64] [--duration 20]

Every configuration is a real server process on 127.0.0.1 with a store of its own, the tasks uploaded
through its API (through the Ray ingress for the Ray runs, so uploads reach every replica through the
shared store), driven by the same closed-loop load (`wrk` when installed, Python clients otherwise),
after an untimed warm-up of the same length. Adapters are those of bench/tasks.py (LoRA r=4/8/16,
Compacter, Pfeiffer, IA3 on the bundled MiniLM); each request is one SST-2 sentence.

- `hop`: 16 tasks, each request to one of them uniformly, every task resident: `plain` (`adapterserve
  serve`, 2 torch threads), `ray1` (`serve --ray --replicas 1`, 2 CPUs for the replica) and `ray2`
  (2 replicas, 1 CPU each). On a 2-core machine two replicas share the cores one server had, so
  little gain is expected; the ratio `ray1 / plain` is the cost of the Ray hop (ingress actor, handle
  call, a second process), and the hit rate says whether routing kept each task where it was loaded.
- `zipf`: `--tasks` tasks with Zipf(1.1) popularity over 2 replicas of `--slots` device slots each
  (Ray's multiplexed limit one less), routed by task affinity (a home replica per task,
  service/ray_router.py) and by Ray Serve's default multiplexed routing, against the same 2 replicas
  with a slot for every task (`all_resident`).

The device tier's hits and misses come from the ingress's merged /metrics (every replica's counters)
over the measured run; CPU is the server's whole process tree (Ray's raylet and workers included).
One JSON line per run:

    {"run", "config", "replicas", "routing", "slots", "tasks", "requests_per_s", "ratio", "p50_ms", "p99_ms",
     "hit_rate", "device_loads", "evictions", "cpu_ms_per_request", "statuses", "client"}

`ratio` is against `plain` for the hop runs and against `all_resident` for the zipf ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])


from bench.http import Server
from bench.load import Load, wrk_available
from bench.tasks import SENTENCES
from bench.tasks_http import upload_and_measure, write_tasks, zipf_load

PORT = 8793


def _ray_stop() -> None:
    """End any Ray processes a previous run left behind, so each run starts on an empty cluster."""
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray, "stop", "--force"], capture_output=True, check=False)


def run_one(
    root: Path,
    dirs: list[Path],
    load: Load,
    *,
    name: str,
    replicas: int,
    slots: int,
    args,
    routing: str = "affinity",
) -> dict:
    """One server (plain when replicas is 0): upload every task, warm up, one measured run."""
    store = root / name
    store.mkdir()
    settings: dict[str, object] = {"slots": slots, "max_batch_size": 32, "max_queue": 4096}
    command = None
    if replicas:
        _ray_stop()
        command = [sys.executable, "-m", "service.cli", "serve", "--ray", "--replicas", str(replicas)]
        command += ["--port", str(PORT)]
        settings |= {"ray_cpus_per_replica": max(args.threads // replicas, 1), "store_poll_s": 1}
        settings |= {"ray_routing": routing}
    server = Server(store, port=PORT, threads=args.threads, command=command, **settings)
    try:
        server.wait_ready(timeout=300)
        measured = upload_and_measure(
            server,
            dirs,
            load=load,
            args=args,
            workdir=store,
            label=name,
            # every replica follows the store's pointers within ADAPTERSERVE_STORE_POLL_S, and pushes
            # its metrics to the ingress every second
            settle_s=3 if replicas else 0,
            scrape_delay_s=1.5 if replicas else 0,
        )
    finally:
        server.stop()
        if replicas:
            _ray_stop()
    config = {"config": name, "replicas": replicas, "slots": slots, "tasks": len(dirs)}
    config |= {"routing": routing if replicas else None}
    return {**config, **measured}


def with_ratios(rows: list[dict], *, run: str) -> list[dict]:
    """Each row labelled with its run and its throughput against the first row's."""
    first = max(rows[0]["requests_per_s"], 1e-9) if rows else 1.0
    return [{**r, "run": run, "ratio": round(r["requests_per_s"] / first, 3)} for r in rows]


def main(argv: list[str] | None = None) -> int:
    """Run the hop and zipf configurations and print one JSON line each."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--hop-tasks", type=int, default=16)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="hop,zipf", help="which of hop,zipf to run")
    ap.add_argument(
        "--zipf-configs", default="all_resident,affinity,ray", help="which zipf runs (ratios: to the first)"
    )
    ap.add_argument(
        "--python-client", dest="wrk", action="store_false", help="Python clients even if wrk is installed"
    )
    args = ap.parse_args(argv)
    args.wrk = args.wrk and wrk_available()
    from adapters.backbone import load_backbone

    spec = load_backbone(None, device="cpu", dtype="float32").spec
    bodies = [json.dumps({"inputs": [s]}) for s in SENTENCES]
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="adapterserve-scaleout-") as tmp:
        root = Path(tmp)
        dirs, _ = write_tasks(root / "artifacts", max(args.tasks, args.hop_tasks), spec)
        runs = set(args.runs.split(","))
        if "hop" in runs:
            few = dirs[: args.hop_tasks]
            load = Load(paths=[f"/v1/tasks/{d.name}/predict" for d in few], bodies=bodies, seed=1)
            hop = [
                run_one(root, few, load, name=name, replicas=n, slots=len(few) + 1, args=args)
                for name, n in (("plain", 0), ("ray1", 1), ("ray2", 2))
            ]
            results += with_ratios(hop, run="hop")
        if "zipf" in runs:
            many = dirs[: args.tasks]
            configs = {
                "all_resident": ("all_resident", len(many) + 1, "affinity"),
                "affinity": (f"slots{args.slots}", args.slots, "affinity"),
                "ray": (f"slots{args.slots}_ray_routing", args.slots, "ray"),
            }
            load = zipf_load(len(many))
            zipf = [
                run_one(root, many, load, name=name, replicas=2, slots=slots, routing=routing, args=args)
                for key, (name, slots, routing) in configs.items()
                if key in args.zipf_configs.split(",")
            ]
            results += with_ratios(zipf, run="zipf")
    for r in results:
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

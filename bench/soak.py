"""Soak and overload: a real server under many clients for minutes, then 3x its capacity.

    python bench/soak.py [--clients 64] [--tasks 8] [--duration 120] [--overload-duration 60]

A real `adapterserve serve` process (the bundled MiniLM-L6 unless `--backbone`) serves `--tasks`
LoRA adapters. Three phases, one after the other:

1. soak: `--clients` closed-loop clients (one keep-alive connection each) send one SST-2 sentence per
   request, round-robin over the tasks, for `--duration` seconds. Reported: the status histogram,
   connection errors, p50/p99 of the 200s, the served rate (the capacity used below) and the
   server's resident memory, sampled every few seconds (growth from the end of the warm-up).
2. overload: an open-loop generator fires requests at `--overload-factor` x the soak's rate for
   `--overload-duration` seconds, whatever the answers, while a prober calls /livez every 0.25 s
   (until the end of the recovery). Reported: statuses, /livez answers and their worst latency.
3. recovery: the soak's closed-loop load again for `--recovery` seconds, starting while the
   overload's backlog is still pending, in one-second windows: how long until the p50 of every
   window from then on is back within `--tolerance` of the soak's p50.

One JSON object on stdout with the figures and a `checks` block: only 200/429/503 answers, no other
5xx, no connection errors, resident memory growth under 10 %, /livez always 200 during overload,
latency back to baseline within 10 s. Not part of CI: it runs for minutes.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # As a script this directory would come first on sys.path and shadow the standard `http` package.
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import argparse
import asyncio
import contextlib
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import httpx

from bench.common import SST2_DEV, emit, environment, log, setup
from bench.http import Server, sentences, write_adapters

RSS_EVERY_S = 2.0
LIVEZ_EVERY_S = 0.25
ALLOWED = {200, 429, 503}


@dataclass
class Tally:
    """Answers of one phase: status counts, latencies of the 200s, client-side errors by type."""

    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, status: int, seconds: float) -> None:
        """Count one answer."""
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.latencies.append(seconds)

    def error(self, exc: Exception) -> None:
        """Count one request that got no answer."""
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1

    def summary(self, seconds: float) -> dict:
        """Counts, rate and latency percentiles."""
        xs = sorted(self.latencies)
        out = {
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "connection_errors": dict(sorted(self.errors.items())),
            "ok_per_s": round(len(xs) / seconds, 2),
        }
        if xs:
            q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) >= 2 else [xs[0]] * 99
            out |= {"p50_ms": round(statistics.median(xs) * 1000, 2), "p99_ms": round(q[98] * 1000, 2)}
        return out


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _predict(
    http: httpx.AsyncClient, n: int, tasks: list[str], texts: list[str]
) -> tuple[int | Exception, float]:
    """One single-input request to the n-th task in turn: its status (or error) and its latency."""
    t0 = time.monotonic()
    try:
        task, text = tasks[n % len(tasks)], texts[n % len(texts)]
        r = await http.post(f"/v1/tasks/{task}/predict", json={"inputs": [text]})
    except httpx.HTTPError as exc:
        return exc, time.monotonic() - t0
    return r.status_code, time.monotonic() - t0


def _count(tally: Tally, outcome: int | Exception, seconds: float) -> None:
    if isinstance(outcome, Exception):
        tally.error(outcome)
    else:
        tally.add(outcome, seconds)


async def closed_loop(
    http: httpx.AsyncClient,
    *,
    clients: int,
    seconds: float,
    tasks: list[str],
    texts: list[str],
    window: float,
) -> list[Tally]:
    """`clients` request loops for `seconds`; one Tally per `window` seconds, by when answers came."""
    start = time.monotonic()
    windows = [Tally() for _ in range(max(1, round(seconds / window)))]
    counter = iter(range(10**12))

    async def one() -> None:
        while time.monotonic() < start + seconds:
            outcome, took = await _predict(http, next(counter), tasks, texts)
            slot = min(int((time.monotonic() - start) / window), len(windows) - 1)
            _count(windows[slot], outcome, took)

    await asyncio.gather(*(one() for _ in range(clients)))
    return windows


def merge(tallies: list[Tally]) -> Tally:
    """One Tally of many."""
    out = Tally()
    for t in tallies:
        for k, v in t.statuses.items():
            out.statuses[k] = out.statuses.get(k, 0) + v
        out.latencies += t.latencies
        for k, v in t.errors.items():
            out.errors[k] = out.errors.get(k, 0) + v
    return out


async def sample_rss(pid: int, samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    """Record the server's RSS every RSS_EVERY_S seconds until `stop`."""
    start = time.monotonic()
    while not stop.is_set():
        samples.append((round(time.monotonic() - start, 1), rss_bytes(pid)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RSS_EVERY_S)


async def open_loop(
    http: httpx.AsyncClient, *, rate: float, seconds: float, tasks: list[str], texts: list[str]
) -> tuple[Tally, set[asyncio.Task[None]]]:
    """Fire requests at `rate` per second for `seconds`, whatever the answers.

    Returns at the end of the window with the requests still pending: the backlog they form is what
    the recovery phase has to get through.
    """
    tally = Tally()
    pending: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) < start + seconds:
        due = int((now - start) * rate) + 1
        while n < due:
            task = asyncio.create_task(_predict(http, n, tasks, texts))
            task.add_done_callback(lambda t: _count(tally, *t.result()))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
        await asyncio.sleep(min(1.0 / rate, 0.01))
    return tally, set(pending)


async def probe_livez(url: str, stop: asyncio.Event) -> dict:
    """/livez every LIVEZ_EVERY_S on its own connection until `stop`: statuses and worst latency."""
    statuses: dict[str, int] = {}
    worst = 0.0
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                key = str((await http.get("/livez")).status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            worst = max(worst, time.monotonic() - t0)
            statuses[key] = statuses.get(key, 0) + 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LIVEZ_EVERY_S)
    return {"statuses": statuses, "worst_ms": round(worst * 1000, 2)}


async def run(args: argparse.Namespace, server: Server, tasks: list[str], texts: list[str]) -> dict:
    """The three phases against a ready server with its tasks uploaded."""
    # The closed loops get exactly one connection per client: a spare keep-alive connection idling past
    # the server's keep-alive timeout would be closed under a client reusing it (a client-side reset).
    steady = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    # The overload gets far more connections than the server queues rows, so the server's queue, not
    # the client's pool, is where requests wait (and past which they get 429).
    burst = httpx.Limits(max_connections=args.max_connections, max_keepalive_connections=args.max_connections)
    async with (
        httpx.AsyncClient(base_url=server.url, limits=steady, timeout=args.timeout) as http,
        httpx.AsyncClient(base_url=server.url, limits=burst, timeout=args.timeout) as flood,
    ):
        log(f"warm-up {args.warmup} s ...")
        await closed_loop(
            http, clients=args.clients, seconds=args.warmup, tasks=tasks, texts=texts, window=args.warmup
        )
        rss: list[tuple[float, int]] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(server.proc.pid, rss, stop))
        log(f"soak: {args.clients} clients x {args.duration} s x {len(tasks)} tasks ...")
        soak = merge(
            await closed_loop(
                http,
                clients=args.clients,
                seconds=args.duration,
                tasks=tasks,
                texts=texts,
                window=args.duration,
            )
        )
        stop.set()
        await sampler
        soak_summary = soak.summary(args.duration)
        capacity = max(soak_summary["ok_per_s"], 1.0)
        rate = args.overload_factor * capacity
        log(f"overload: {rate:.1f}/s ({args.overload_factor}x {capacity}) for {args.overload_duration} s ...")
        stop = asyncio.Event()
        prober = asyncio.create_task(probe_livez(server.url, stop))
        overload, backlog = await open_loop(
            flood, rate=rate, seconds=args.overload_duration, tasks=tasks, texts=texts
        )
        log(f"recovery: {args.recovery} s, {len(backlog)} overload requests still pending ...")
        windows = await closed_loop(
            http, clients=args.clients, seconds=args.recovery, tasks=tasks, texts=texts, window=1.0
        )
        if backlog:
            await asyncio.gather(*backlog)
        stop.set()
        livez = await prober
    baseline = soak_summary.get("p50_ms")
    per_window = [round(statistics.median(w.latencies) * 1000, 2) if w.latencies else None for w in windows]
    # Recovered at the first window from which every window that answered anything is back near the baseline.
    recovered_after = None
    for i in range(len(per_window)):
        rest = [p for p in per_window[i:] if p is not None]
        if baseline and rest and all(p <= baseline * args.tolerance for p in rest):
            recovered_after = float(i)
            break
    first_rss = next((b for t, b in rss if t >= args.rss_settle), rss[0][1])
    growth = (rss[-1][1] - first_rss) / first_rss
    every_status = {int(k) for phase in (soak, overload, merge(windows)) for k in phase.statuses}
    other_5xx = sorted(s for s in every_status if s >= 500 and s not in ALLOWED)
    errors = sum(soak.errors.values()) + sum(merge(windows).errors.values())
    return {
        "soak": {
            **soak_summary,
            "rss_mb": [(t, round(b / 2**20, 1)) for t, b in rss],
            "rss_growth": round(growth, 4),
        },
        "overload": {
            "rate_per_s": round(rate, 2),
            "pending_at_end": len(backlog),
            **overload.summary(args.overload_duration),
            "livez": livez,
        },
        "recovery": {
            "window_p50_ms": per_window,
            "baseline_p50_ms": baseline,
            "recovered_after_s": recovered_after,
        },
        "checks": {
            "only_200_429_503": every_status <= ALLOWED,
            "no_other_5xx": not other_5xx,
            "no_connection_errors_under_soak": errors == 0,
            "rss_growth_under_10pct": growth < 0.10,
            "livez_always_200": set(livez["statuses"]) == {"200"},
            "latency_back_within_10s": recovered_after is not None and recovered_after <= 10.0,
        },
    }


def main() -> None:
    """Start a server, upload the tasks, run the phases, print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--duration", type=float, default=120.0, help="soak seconds")
    p.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before the soak")
    p.add_argument("--overload-duration", type=float, default=60.0)
    p.add_argument("--overload-factor", type=float, default=3.0, help="x the soak's served rate")
    p.add_argument("--recovery", type=float, default=15.0, help="seconds of normal load after the overload")
    p.add_argument("--tolerance", type=float, default=1.25, help="a p50 within this factor is 'back'")
    p.add_argument("--rss-settle", type=float, default=10.0, help="RSS growth is measured from this second")
    p.add_argument("--max-queue", type=int, default=256, help="server queue (rows); past it 429")
    p.add_argument("--max-connections", type=int, default=2048, help="client connections in overload")
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request (s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    p.add_argument("--backbone", default=None, help="model directory (default: the bundled MiniLM-L6)")
    p.add_argument("--port", type=int, default=18531)
    args = p.parse_args()
    setup(threads=1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Every overload connection is a file descriptor, in this process and in the server.
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    from adapters.backbone import load_backbone

    spec = load_backbone(args.backbone, device="cpu", dtype="float32").spec
    texts = sentences()
    settings: dict[str, object] = {"max_queue": args.max_queue}
    if args.backbone:
        settings["backbone"] = args.backbone
    with tempfile.TemporaryDirectory(prefix="adapterserve-soak-") as tmp:
        root = Path(tmp)
        dirs = write_adapters(root / "artifacts", tasks=args.tasks, spec=spec)
        tasks = [d.name for d in dirs]
        server = Server(root, port=args.port, threads=args.threads, **settings)
        try:
            server.wait_ready()
            for t, d in zip(tasks, dirs, strict=True):
                server.upload(t, d)
            result = asyncio.run(run(args, server, tasks, texts))
        finally:
            server.stop()
        result["exit_code"] = server.proc.returncode
    config = {
        "backbone": args.backbone or "minilm-l6",
        "tasks": args.tasks,
        "clients": args.clients,
        "duration_s": args.duration,
        "overload_factor": args.overload_factor,
        "overload_duration_s": args.overload_duration,
        "max_queue": args.max_queue,
        "adapter": "lora r=8 q,v",
        "inputs": "sst2 dev" if SST2_DEV.is_file() else "synthetic",
        **environment(),
    }
    emit({"config": config, **result})


if __name__ == "__main__":
    main()

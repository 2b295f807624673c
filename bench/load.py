"""HTTP load for the benchmarks: `wrk` driven by a generated Lua script, or Python clients without it.

`wrk` (Debian's package) keeps many connections busy from one thread at a fraction of the CPU of
Python clients, so on a small machine the server, not the client, takes the cores. Each run is
closed-loop: every connection sends its next request as soon as the last one is answered.

CPU accounting reads `/proc/<pid>/stat` (user + system time of every thread) of the server process
and of its children, so a server that hands work to other processes (LitServe) is charged in full.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["Load", "cpu_seconds", "python_load", "run_load", "wrk_available"]

_TICK = os.sysconf("SC_CLK_TCK")

# Statuses the Lua side counts one by one; anything else lands in "other".
_CODES = (200, 400, 404, 413, 422, 429, 500, 503, 504)

_LUA = """
local paths = {%(paths)s}
local bodies = {%(bodies)s}
local threads = {}
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(%(seed)d + id)
  counts = {}
  for _, c in ipairs({%(codes)s}) do counts[c] = 0 end
  other = 0
  retry_after_missing = 0
end

request = function()
  return wrk.format(nil, paths[math.random(#paths)], nil, bodies[math.random(#bodies)])
end

response = function(status, headers, body)
  if counts[status] ~= nil then counts[status] = counts[status] + 1 else other = other + 1 end
  if status == 429 and headers["retry-after"] == nil and headers["Retry-After"] == nil then
    retry_after_missing = retry_after_missing + 1
  end
end

done = function(summary, latency, requests)
  local statuses, rest, missing = {}, 0, 0
  for _, t in ipairs(threads) do
    local c = t:get("counts")
    for _, code in ipairs({%(codes)s}) do
      statuses[code] = (statuses[code] or 0) + c[code]
    end
    rest = rest + t:get("other")
    missing = missing + t:get("retry_after_missing")
  end
  local parts = {}
  for _, code in ipairs({%(codes)s}) do
    if statuses[code] > 0 then table.insert(parts, string.format('"%%d": %%d', code, statuses[code])) end
  end
  if rest > 0 then table.insert(parts, string.format('"other": %%d', rest)) end
  local e = summary.errors
  io.write(string.format(
    'WRK-JSON {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, "max_us": %%d, ' ..
    '"timeouts": %%d, "socket_errors": %%d, "retry_after_missing": %%d, "statuses": {%%s}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.timeout, e.connect + e.read + e.write, missing, table.concat(parts, ", ")))
end
"""


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@dataclass(frozen=True)
class Load:
    """What the clients send: request paths and JSON bodies, each request picking one of each at random."""

    paths: Sequence[str]
    bodies: Sequence[str]
    seed: int = 0

    @classmethod
    def predict(cls, *, tasks: Sequence[str], texts: Sequence[str], inputs: int, seed: int = 0) -> Load:
        """Our predict route: a random task, `inputs` random sentences per request."""
        rng = random.Random(seed)
        bodies = [json.dumps({"inputs": rng.sample(list(texts), inputs)}) for _ in range(512)]
        return cls(paths=[f"/v1/tasks/{t}/predict" for t in tasks], bodies=bodies, seed=seed)

    @classmethod
    def embeddings(cls, *, models: Sequence[str], texts: Sequence[str], seed: int = 0) -> Load:
        """OpenAI's embeddings route: a random task (the body's `model`) and one random sentence."""
        rng = random.Random(seed)
        bodies = [json.dumps({"model": rng.choice(models), "input": rng.choice(texts)}) for _ in range(512)]
        return cls(paths=["/v1/embeddings"], bodies=bodies, seed=seed)

    def lua(self) -> str:
        """The wrk script that sends this load and prints one `WRK-JSON {...}` line when done."""
        return _LUA % {
            "paths": ", ".join(_lua_string(p) for p in self.paths),
            "bodies": ", ".join(_lua_string(b) for b in self.bodies),
            "codes": ", ".join(str(c) for c in _CODES),
            "seed": self.seed,
        }


def wrk_available() -> bool:
    """Whether the `wrk` load generator is on PATH."""
    return shutil.which("wrk") is not None


def _pids_under(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pid: int, *, children: bool = True) -> float:
    """User + system CPU seconds of a process (every thread), and of its live descendants."""
    total = 0
    for p in _pids_under(pid) if children else [pid]:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended in between
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / _TICK


def _wrk(url: str, load: Load, *, connections: int, duration: float, timeout_s: float, script: Path) -> dict:
    script.write_text(load.lua())
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(round(duration), 1)}s",
        f"--timeout={int(timeout_s)}s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("WRK-JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    raw = json.loads(line.removeprefix("WRK-JSON "))
    seconds = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "seconds": seconds,
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "timeouts": raw["timeouts"],
        "socket_errors": raw["socket_errors"],
        "statuses": raw["statuses"],
        "retry_after_missing": raw["retry_after_missing"],
    }


async def _python(url: str, load: Load, *, connections: int, duration: float, timeout_s: float) -> dict:
    rng = random.Random(load.seed)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    counts = {"timeouts": 0, "socket_errors": 0, "retry_after_missing": 0}
    stop_at = time.monotonic() + duration
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s) as http:

        async def client() -> None:
            while time.monotonic() < stop_at:
                path, body = rng.choice(load.paths), rng.choice(load.bodies)
                t0 = time.monotonic()
                try:
                    r = await http.post(path, content=body, headers=headers)
                except httpx.TimeoutException:
                    counts["timeouts"] += 1
                    continue
                except httpx.TransportError:
                    counts["socket_errors"] += 1
                    continue
                latencies.append(time.monotonic() - t0)
                statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
                if r.status_code == 429 and "retry-after" not in r.headers:
                    counts["retry_after_missing"] += 1

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(connections)))
        seconds = time.monotonic() - started
    xs = sorted(latencies) or [0.0]
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) >= 2 else [xs[0]] * 99
    return {
        "requests": len(latencies),
        "seconds": seconds,
        "p50_ms": statistics.median(xs) * 1000,
        "p99_ms": q[98] * 1000,
        "max_ms": xs[-1] * 1000,
        "statuses": statuses,
        **counts,
    }


def python_load(url: str, load: Load, *, connections: int, duration: float, timeout_s: float = 60.0) -> dict:
    """The same closed-loop load from Python clients (one asyncio process): costs far more CPU than wrk."""
    return asyncio.run(_python(url, load, connections=connections, duration=duration, timeout_s=timeout_s))


def run_load(
    url: str,
    load: Load,
    *,
    connections: int,
    duration: float,
    warmup: float,
    server_pid: int,
    workdir: Path,
    use_wrk: bool,
    timeout_s: float = 60.0,
) -> dict:
    """Warm up, then one measured run: requests/s, latency, statuses and the server's CPU per request."""
    script = workdir / "load.lua"

    def once(seconds: float) -> dict:
        if use_wrk:
            return _wrk(
                url, load, connections=connections, duration=seconds, timeout_s=timeout_s, script=script
            )
        return python_load(url, load, connections=connections, duration=seconds, timeout_s=timeout_s)

    if warmup > 0:
        once(warmup)
    cpu0 = cpu_seconds(server_pid)
    result = once(duration)
    cpu = cpu_seconds(server_pid) - cpu0
    ok = int(result["statuses"].get("200", 0))
    result["ok_per_s"] = ok / result["seconds"]
    result["cpu_cores"] = cpu / result["seconds"]
    result["cpu_ms_per_request"] = 1000 * cpu / ok if ok else None
    result["client"] = "wrk" if use_wrk else "python"
    return result

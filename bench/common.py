"""Shared benchmark helpers: environment, inputs, random adapters, interleaved timing, JSON output.

Every benchmark times all of its variants in the same process and round-robin: each repetition
runs every variant once (in a rotating order), so slow drift of a shared machine (frequency,
neighbours, thermal) hits all variants alike. Results are medians; ratios between variants are
the numbers to compare, absolute times only on dedicated hardware.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx
import torch

__all__ = [
    "SST2_DEV",
    "build_inputs",
    "emit",
    "environment",
    "interleaved",
    "log",
    "random_adapter",
    "registered_methods",
    "setup",
    "summarize",
    "wait_ready",
]

SST2_DEV = Path(
    os.environ.get("ADAPTERSERVE_BENCH_SST2")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "SST-2" / "dev.tsv"
)
"""Sentences used as realistic input ids when present (random ids otherwise)."""


def setup(*, threads: int, seed: int = 0) -> None:
    """Offline model loading, a fixed thread count and seeds; call before loading anything."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def environment(*, device: str = "cpu", dtype: str = "float32") -> dict:
    """The fields every benchmark reports about where it ran."""
    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device,
        "dtype": dtype,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def log(msg: str) -> None:
    """Progress on stderr, so stdout stays pure JSON."""
    print(msg, file=sys.stderr, flush=True)


def emit(obj: dict) -> None:
    """Print one result object as a single JSON line on stdout."""
    print(json.dumps(obj, sort_keys=False), flush=True)


# -- inputs ----------------------------------------------------------------------------------------


def _sst2_sentences(path: Path) -> list[str]:
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [ln.split("\t")[0].strip() for ln in lines if ln.strip()]


def build_inputs(
    tokenizer, *, batch: int, seq_len: int, seed: int = 0, data: Path | None = SST2_DEV
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`[batch, seq_len]` input ids with a full attention mask, and where the ids came from.

    With the SST-2 dev set at hand, each row packs consecutive sentences (`[CLS] s1 [SEP] s2 ...`)
    up to the length, so no row needs padding and the full mask is truthful; otherwise the ids are
    random (cost does not depend on the ids, only on the shape).
    """
    g = torch.Generator().manual_seed(seed)
    sentences = _sst2_sentences(data) if data is not None else []
    cls_id = getattr(tokenizer, "cls_token_id", None) if tokenizer is not None else None
    sep_id = getattr(tokenizer, "sep_token_id", None) if tokenizer is not None else None
    if sentences and cls_id is not None and sep_id is not None:
        encoded = tokenizer(sentences, add_special_tokens=False)["input_ids"]
        encoded = [e for e in encoded if e]
        pos = int(torch.randint(len(encoded), (1,), generator=g))
        rows = []
        for _ in range(batch):
            row = [cls_id]
            while len(row) < seq_len:
                row += [*encoded[pos % len(encoded)], sep_id]
                pos += 1
            rows.append(row[:seq_len])
        ids = torch.tensor(rows, dtype=torch.long)
        source = f"sst2:{data.name}"
    else:
        vocab = int(getattr(tokenizer, "vocab_size", 30522) or 30522)
        low = 1000 if vocab > 2000 else 0
        ids = torch.randint(low, vocab, (batch, seq_len), generator=g)
        source = "random"
    return ids, torch.ones(batch, seq_len, dtype=torch.long), source


# -- adapters --------------------------------------------------------------------------------------


def registered_methods() -> set[str]:
    """Adapter methods the model side can load today."""
    from adapters.methods import METHODS

    return set(METHODS)


def random_adapter(config, spec, *, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random non-zero tensors of every shape the artifact config implies (heads included)."""
    from store.artifact import expected_tensors

    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * std for k, s in expected_tensors(config, spec).items()}


# -- timing ----------------------------------------------------------------------------------------


def interleaved(
    runs: Mapping[str, Callable[[], object]],
    *,
    reps: int,
    warmup: int = 1,
    inner: int = 1,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Seconds per call of every run, `reps` samples each, taken round-robin.

    Each repetition calls every run `inner` times back to back and records the mean; the starting
    run rotates from one repetition to the next so no run always follows the same neighbour. The
    garbage collector is paused while a sample is taken.
    """
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    was_enabled = gc.isenabled()
    t_start = time.perf_counter()
    try:
        for rep in range(reps):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                fn = runs[name]
                gc.collect()
                gc.disable()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                dt = time.perf_counter() - t0
                if was_enabled:
                    gc.enable()
                samples[name].append(dt / inner)
            if progress:
                log(f"  rep {rep + 1}/{reps} ({time.perf_counter() - t_start:.0f}s)")
    finally:
        if was_enabled:
            gc.enable()
    return samples


def summarize(samples: list[float]) -> dict:
    """Median and quartiles of a list of per-call seconds."""
    xs = sorted(samples)
    if len(xs) >= 2:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        p25, p75 = q[0], q[2]
    else:
        p25 = p75 = xs[0]
    return {"median_s": statistics.median(xs), "p25_s": p25, "p75_s": p75, "n": len(xs)}


def wait_ready(
    proc: subprocess.Popen,
    *,
    url: str,
    log: Callable[[], str],
    timeout: float,
    interval: float,
    path: str = "/readyz",
) -> None:
    """Poll `url``path` every `interval` s until 200; raise with the server's `log()` if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log()}")
        try:
            if httpx.get(f"{url}{path}", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"server not ready after {timeout} s:\n{log()}")

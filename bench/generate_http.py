"""Generation through HTTP: time to first token and tokens/s under load, against the same loop in process.

    python bench/generate_http.py [--concurrency 1,8,32] [--requests 3] [--new-tokens 16]

The random GPT-2 of bench/generate.py (6 layers, hidden 384, vocabulary 8192), saved as a directory
with a word-level tokenizer (token i is the word `w<i>`, so one word is one token), serves 16 LoRA
tasks (r=8 on the fused qkv) from a real `adapterserve serve` subprocess. For each concurrency C,
C clients of the official `openai` client stream `POST /v1/completions` back to back (prompts of 32
tokens, `max_tokens` new ones, greedy; client i asks for task i % 16), `--requests` each after one
warm-up request. One JSON object on stdout:

    {"config": {...}, "runs": [{"concurrency": C, "http_tokens_per_s": x,
      "in_process_tokens_per_s": y, "ratio_vs_in_process": x / y,
      "ttft_ms": {"p50": .., "p99": ..}, "ttft_vs_alone": p50 / p50 at C=1, ...}, ...]}

The ceiling is the same decoding loop in this process (adapters/generate.py's DecodeBatch, the loop
the server runs) over a batch of C rows of the same tasks and prompt lengths: tokens/s of the whole
generation, and its prefill as the in-process time to a first token. Tokens are counted from the
streamed text (words), so a row that ends early at EOS counts what it produced.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    # As a script, this directory is sys.path[0], where bench/http.py would shadow the standard `http`.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from bench.common import emit, environment, interleaved, log, random_adapter, setup, summarize

TASKS = 16
PROMPT_LEN = 32
NEW_TOKENS = 16
CONCURRENCY = (1, 8, 32)
REQUESTS = 3
LORA = {"method": "lora", "r": 8, "alpha": 16, "targets": ["qkv"]}
ADAPTER_STD = 0.05


def save_backbone(path: Path) -> Path:
    """bench/generate.py's random GPT-2 with a word-level tokenizer, as a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bench.generate import MODEL, _gpt2

    words = ["<pad>", "<unk>", "<eos>", *(f"w{i}" for i in range(3, MODEL["vocab_size"]))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    model = _gpt2()
    model.config.eos_token_id = 2
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_tasks(root: Path, spec) -> list[Path]:
    """One LoRA artifact directory per task (random weights, seeded by the task's index)."""
    from store.artifact import parse_config
    from store.safetensors_io import write_safetensors

    cfg = parse_config({**LORA, "backbone_fingerprint": spec.fingerprint})
    dirs = []
    for t in range(TASKS):
        d = root / f"gen{t:02d}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(cfg.model_dump_json())
        tensors = random_adapter(cfg, spec, seed=t, std=ADAPTER_STD)
        write_safetensors(d / "adapter.safetensors", {k: v.numpy() for k, v in tensors.items()})
        dirs.append(d)
    return dirs


def prompts(n: int) -> list[str]:
    """`n` prompts of PROMPT_LEN words (tokens), seeded."""
    rng = np.random.default_rng(0)
    return [" ".join(f"w{i}" for i in rng.integers(3, 8192, PROMPT_LEN)) for _ in range(n)]


# -- in process ------------------------------------------------------------------------------------


def in_process(model_dir: Path, dirs: list[Path], *, concurrency: list[int], new: int, reps: int) -> dict:
    """tokens/s and prefill time of the server's decoding loop over C rows, per concurrency C."""
    from safetensors.torch import load_file

    from adapters.backbone import load_backbone
    from adapters.generate import DecodeBatch, Prompt
    from adapters.model import BankConfig, MultiTaskModel
    from store.artifact import parse_config

    backbone = load_backbone(model_dir, device="cpu", dtype="float32")
    tok = backbone.tokenizer
    mt = MultiTaskModel(backbone, banks=BankConfig(slots=TASKS + 1))
    for slot, d in enumerate(dirs, start=1):
        cfg = parse_config(json.loads((d / "adapter_config.json").read_text()))
        mt.load(slot, cfg, load_file(d / "adapter.safetensors"))
    texts = prompts(max(concurrency))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    def prefill(c: int):
        batch = DecodeBatch(mt)
        slots = [1 + i % TASKS for i in range(c)]
        batch.add([Prompt(ids=ids[i]) for i in range(c)], slots=slots)
        return batch, slots

    def whole(c: int) -> None:
        batch, slots = prefill(c)
        for _ in range(new - 1):
            batch.step(slots=slots)

    runs = {}
    for c in concurrency:
        fns = {"prefill": lambda c=c: prefill(c), "whole": lambda c=c: whole(c)}
        with torch.inference_mode():
            st = {k: summarize(v) for k, v in interleaved(fns, reps=reps, warmup=1, progress=False).items()}
        runs[c] = {
            "tokens_per_s": c * new / st["whole"]["median_s"],
            "prefill_ms": 1000 * st["prefill"]["median_s"],
        }
    return runs


# -- through HTTP ----------------------------------------------------------------------------------


async def drive(url: str, *, key: str, concurrency: int, requests: int, new: int) -> dict:
    """C streaming clients, each `requests` completions after one warm-up; TTFT and tokens/s."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
    texts = prompts(concurrency)
    ttfts: list[float] = []
    tokens = 0

    async def one(i: int) -> tuple[float | None, int]:
        start = time.perf_counter()
        first, text = None, []
        stream = await client.completions.create(
            model=f"gen{i % TASKS:02d}", prompt=texts[i], max_tokens=new, temperature=0, stream=True
        )
        async for chunk in stream:
            piece = chunk.choices[0].text
            if piece and first is None:
                first = time.perf_counter() - start
            text.append(piece)
        return first, len("".join(text).split())

    async def user(i: int) -> list[tuple[float | None, int]]:
        return [await one(i) for _ in range(requests)]

    # Warm-up, one request per client: every task's adapter resident, every connection open.
    await asyncio.gather(*(one(i) for i in range(concurrency)))
    t0 = time.perf_counter()
    per_user = await asyncio.gather(*(user(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - t0
    results = [r for rs in per_user for r in rs]
    await client.close()
    for first, n in results:
        tokens += n
        if first is not None:
            ttfts.append(first)
    ms = np.array(ttfts) * 1000
    return {
        "requests": len(results),
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "ttft_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--concurrency", default=",".join(map(str, CONCURRENCY)), help="comma-separated client counts"
    )
    p.add_argument("--requests", type=int, default=REQUESTS, help="measured requests per client")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="max_tokens of each completion")
    p.add_argument("--reps", type=int, default=3, help="in-process repetitions per concurrency")
    p.add_argument("--threads", type=int, default=2, help="torch threads, here and in the server")
    args = p.parse_args(argv)
    from bench.http import ADMIN, Server

    setup(threads=args.threads)
    levels = [int(x) for x in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="adapterserve-genhttp-") as tmp:
        root = Path(tmp)
        model_dir = save_backbone(root / "gpt2")
        from adapters.backbone import load_backbone

        spec = load_backbone(model_dir, device="cpu", dtype="float32").spec
        dirs = write_tasks(root / "tasks", spec)
        log("in process: the decoding loop over C rows")
        ceiling = in_process(model_dir, dirs, concurrency=levels, new=args.new_tokens, reps=args.reps)
        server = Server(
            root,
            port=free_port(),
            threads=args.threads,
            backbone=model_dir,
            max_new_tokens=max(args.new_tokens, 16),
            device="cpu",
        )
        runs = []
        try:
            server.wait_ready()
            for t, d in enumerate(dirs):
                server.upload(f"gen{t:02d}", d)
            for c in levels:
                log(f"HTTP: {c} streaming clients")
                r = asyncio.run(
                    drive(server.url, key=ADMIN, concurrency=c, requests=args.requests, new=args.new_tokens)
                )
                runs.append({"concurrency": c, **r})
        finally:
            server.stop()
    alone = runs[0]["ttft_ms"]["p50"] if runs and runs[0]["concurrency"] == 1 else None
    out = []
    for r in runs:
        c = r["concurrency"]
        out.append(
            {
                "concurrency": c,
                "http_tokens_per_s": round(r["tokens_per_s"], 1),
                "in_process_tokens_per_s": round(ceiling[c]["tokens_per_s"], 1),
                "ratio_vs_in_process": round(r["tokens_per_s"] / ceiling[c]["tokens_per_s"], 4),
                "ttft_ms": {k: round(v, 1) for k, v in r["ttft_ms"].items()},
                "in_process_prefill_ms": round(ceiling[c]["prefill_ms"], 1),
                "ttft_vs_alone": round(r["ttft_ms"]["p50"] / alone, 3) if alone else None,
                "requests": r["requests"],
                "tokens": r["tokens"],
            }
        )
    config = {
        "tasks": TASKS,
        "prompt_tokens": PROMPT_LEN,
        "new_tokens": args.new_tokens,
        "requests_per_client": args.requests,
        "adapter": LORA,
        "client": "openai AsyncOpenAI, stream=True",
        **environment(device="cpu", dtype="float32"),
    }
    emit({"config": config, "runs": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Mixed-task generation throughput: the decoding loop against the plain backbone and PEFT over tasks.

    python bench/generate.py [--batches 1,8,32] [--reps N] [--new-tokens 16] [--quick]

A GPT-2 with random weights (6 layers, hidden 384, 6 heads, vocabulary 8192: small enough for a CPU,
the vocabulary kept small so that the LM head does not hide the layers' cost) decodes greedy, fixed
length (no EOS), prompts of 32 tokens for 16 new tokens. 16 tasks; row i belongs to task i % 16, so
a batch of 8 holds 8 tasks and one of 32 holds every task twice. All variants run in one process,
round-robin per repetition (bench/common.py); one JSON object per batch size on stdout:

    {"config": {...}, "plain_backbone_tokens_per_s": x,
     "runs": [{"name": "lora", "tokens_per_s": y, "ratio_vs_backbone": y / x, ...}, ...]}

Variants (tokens/s counts generated tokens):
- plain_backbone: an unwrapped copy of the model, a plain forward loop (prefill, then one cached
  forward per token, argmax): the floor any server pays.
- plain_generate: the same copy through transformers' own `generate` (greedy), for reference.
- lora / mix4: our `DecodeBatch` (adapters/generate.py, the loop the server runs) with 16 LoRA tasks
  (r=8 on the fused qkv), or 16 tasks cycling LoRA, Houlsby bottleneck, scaled parallel and prefix
  (l=30); every row routed to its own task.
- peft_loop_lora: one PeftModel holding the 16 LoRA adapters (the same weights as ours), for each task
  of the batch `set_adapter` then `generate` over that task's rows: serving tasks one after another.
- peft_mixed_lora: the same PeftModel, one `generate` with `adapter_names` per row (PEFT's mixed
  LoRA batches).

Checks: every row of `lora` gives exactly PEFT's greedy tokens for its task, and the adapters change
the tokens of some row against the plain backbone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # As a script, this directory is sys.path[0], where bench/http.py would shadow the standard `http`.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from bench.common import emit, environment, interleaved, log, random_adapter, setup, summarize

THREADS = 2
TASKS = 16
PROMPT_LEN = 32
NEW_TOKENS = 16
BATCHES = (1, 8, 32)
DEFAULT_REPS = 3
QUICK_REPS = 2
MODEL = {"n_layer": 6, "n_embd": 384, "n_head": 6, "vocab_size": 8192, "n_positions": 512}
ADAPTER_STD = 0.05
"""Scale of the random adapter weights: large enough to change some greedy tokens."""

ADAPTERS: dict[str, dict] = {
    "lora": {"method": "lora", "r": 8, "alpha": 16, "targets": ["qkv"]},
    "houlsby": {"method": "bottleneck", "sites": ["attn", "ffn"], "bottleneck_dim": 48},
    "scaled_parallel": {"method": "parallel", "sites": ["ffn"], "bottleneck_dim": 48, "scaling": 4.0},
    "prefix": {"method": "prefix", "prefix_length": 30},
}
RUNS = {"lora": ("lora",), "mix4": ("lora", "houlsby", "scaled_parallel", "prefix")}
PLAIN = "plain_backbone"


def _gpt2():
    """A fresh random GPT-2 (same seed, same weights) with its own config object."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(**MODEL, pad_token_id=0, attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Bench:
    """The plain copy, our multi-task model with every task loaded, PEFT with the LoRA tasks."""

    def __init__(self, *, new_tokens: int = NEW_TOKENS) -> None:
        from adapters.backbone import Backbone
        from adapters.model import BankConfig, MultiTaskModel
        from store.artifact import parse_config

        self.new = new_tokens
        self.plain = _gpt2()
        backbone = Backbone.from_model(_gpt2(), name="random-gpt2-6x384")
        self.spec = backbone.spec
        banks = BankConfig(
            slots=1 + TASKS * len(ADAPTERS), lora_max_rank=16, bottleneck_max_dim=64, prefix_max_len=32
        )
        self.mt = MultiTaskModel(backbone, banks=banks)
        self.slot: dict[tuple[str, int], int] = {}
        self.tensors: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        slot = 1
        for a_i, name in enumerate(ADAPTERS):
            cfg = parse_config({**ADAPTERS[name], "backbone_fingerprint": self.spec.fingerprint})
            for t in range(TASKS):
                tensors = random_adapter(cfg, self.spec, seed=1000 * a_i + t, std=ADAPTER_STD)
                self.mt.load(slot, cfg, tensors)
                self.slot[(name, t)], self.tensors[(name, t)] = slot, tensors
                slot += 1
        self.peft = self._peft()
        g = torch.Generator().manual_seed(0)
        self.prompts = torch.randint(1, MODEL["vocab_size"], (max(BATCHES), PROMPT_LEN), generator=g)

    def _peft(self):
        from peft import LoraConfig, get_peft_model

        a = ADAPTERS["lora"]
        lcfg = LoraConfig(
            r=a["r"], lora_alpha=a["alpha"], lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True
        )
        pm = get_peft_model(_gpt2(), lcfg, adapter_name="task0")
        for t in range(1, TASKS):
            pm.add_adapter(f"task{t}", lcfg)
        pm.eval()
        with torch.no_grad():
            for name, mod in pm.named_modules():
                if not name.endswith("attn.c_attn") or not hasattr(mod, "lora_A"):
                    continue
                layer = int(name.split(".h.")[1].split(".")[0])
                for t in range(TASKS):
                    ours = self.tensors[("lora", t)]
                    mod.lora_A[f"task{t}"].weight.copy_(ours[f"decoder.{layer}.qkv.lora.A"])
                    mod.lora_B[f"task{t}"].weight.copy_(ours[f"decoder.{layer}.qkv.lora.B"])
        return pm

    # -- what is timed -----------------------------------------------------------------------------

    def plain_loop(self, ids: torch.Tensor) -> torch.Tensor:
        """Prefill, then one cached forward per new token; argmax."""
        from transformers.cache_utils import DynamicCache

        with torch.inference_mode():
            out = self.plain(input_ids=ids, cache=DynamicCache(), use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            toks = [tok]
            for _ in range(self.new - 1):
                out = self.plain(input_ids=tok, cache=out.cache, use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(tok)
        return torch.cat(toks, dim=1)

    def _generate(self, model, ids: torch.Tensor, **kw) -> torch.Tensor:
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.new,
                min_new_tokens=self.new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                **kw,
            )
        return out[:, ids.shape[1] :]

    def ours(self, ids: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """Every row through the mixed-task decoding loop, each on its task's slot."""
        from adapters.generate import DecodeBatch, Prompt

        batch = DecodeBatch(self.mt)
        first = batch.add([Prompt(ids=row) for row in ids.tolist()], slots=slots)
        toks = [[t for _, t in first]]
        for _ in range(self.new - 1):
            toks.append(batch.step(slots=slots))
        return torch.tensor(toks).T

    def peft_loop(self, ids: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        """One task after another: set_adapter, then generate over that task's rows."""
        out = torch.zeros(len(tasks), self.new, dtype=torch.long)
        for t in sorted(set(tasks)):
            rows = torch.tensor([i for i, x in enumerate(tasks) if x == t])
            self.peft.set_adapter(f"task{t}")
            out[rows] = self._generate(self.peft, ids[rows])
        return out

    def callables(self, b: int) -> dict:
        ids = self.prompts[:b]
        tasks = [i % TASKS for i in range(b)]
        fns = {
            PLAIN: lambda: self.plain_loop(ids),
            "plain_generate": lambda: self._generate(self.plain, ids),
        }
        for name, sets in RUNS.items():
            slots = [self.slot[(sets[t % len(sets)], t)] for t in tasks]
            fns[name] = lambda slots=slots: self.ours(ids, slots)
        fns["peft_loop_lora"] = lambda: self.peft_loop(ids, tasks)
        names = [f"task{t}" for t in tasks]
        fns["peft_mixed_lora"] = lambda: self._generate(self.peft, ids, adapter_names=names)
        return fns

    def checks(self, b: int) -> dict:
        """Our LoRA rows equal PEFT's per-task greedy tokens; the adapters change some row's tokens."""
        ids = self.prompts[:b]
        tasks = [i % TASKS for i in range(b)]
        ours = self.ours(ids, [self.slot[("lora", t)] for t in tasks])
        peft = self.peft_loop(ids, tasks)
        plain = self.plain_loop(ids)
        return {
            "lora_rows_equal_peft": float((ours == peft).all(1).float().mean()),
            "lora_rows_changed_vs_backbone": float((ours != plain).any(1).float().mean()),
            "plain_loop_equals_plain_generate": bool(torch.equal(plain, self._generate(self.plain, ids))),
        }


def measure(bench: Bench, b: int, *, reps: int, warmup: int) -> dict:
    """Time every variant at one batch size and return the JSON object."""
    checks = bench.checks(b)
    log(f"batch {b}: timing, {reps} reps")
    samples = interleaved(bench.callables(b), reps=reps, warmup=warmup)
    stats = {name: summarize(xs) for name, xs in samples.items()}
    tokens = b * bench.new
    plain_tps = tokens / stats[PLAIN]["median_s"]
    runs = []
    for name, st in stats.items():
        if name == PLAIN:
            continue
        tps = tokens / st["median_s"]
        row = {
            "name": name,
            "tokens_per_s": round(tps, 1),
            "ratio_vs_backbone": round(tps / plain_tps, 4),
            "median_ms": round(1000 * st["median_s"], 1),
            "iqr_ms": [round(1000 * st["p25_s"], 1), round(1000 * st["p75_s"], 1)],
        }
        if name in RUNS:
            row["ratio_vs_peft_loop"] = round(stats["peft_loop_lora"]["median_s"] / st["median_s"], 4)
            row["ratio_vs_peft_mixed"] = round(stats["peft_mixed_lora"]["median_s"] / st["median_s"], 4)
        runs.append(row)
    config = {
        "batch": b,
        "tasks_in_batch": min(b, TASKS),
        "tasks_loaded": TASKS,
        "prompt_tokens": PROMPT_LEN,
        "new_tokens": bench.new,
        "model": {"family": "gpt2", **MODEL, "weights": "random"},
        "reps": reps,
        "warmup": warmup,
        **environment(device="cpu", dtype="float32"),
    }
    return {
        "config": config,
        "plain_backbone_tokens_per_s": round(plain_tps, 1),
        "plain_backbone_median_ms": round(1000 * stats[PLAIN]["median_s"], 1),
        "runs": runs,
        "checks": checks,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    p.add_argument("--reps", type=int, default=DEFAULT_REPS, help="repetitions per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_REPS} reps: a fast sanity run")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens generated per row")
    p.add_argument("--threads", type=int, default=THREADS)
    args = p.parse_args(argv)
    batches = [int(x) for x in args.batches.split(",") if x]
    if any(not 1 <= b <= max(BATCHES) for b in batches):
        p.error(f"batch sizes must be in 1..{max(BATCHES)}")
    setup(threads=args.threads)
    log("building the models and 64 adapters")
    bench = Bench(new_tokens=args.new_tokens)
    reps = QUICK_REPS if args.quick else args.reps
    for b in batches:
        emit(measure(bench, b, reps=reps, warmup=args.warmup))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

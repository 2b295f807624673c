"""Mixed-task forward throughput against the plain backbone, PEFT and a per-task loop.

    python bench/mixed.py [--shape a|b|both] [--reps N] [--quick] [--runs lora,mix3] [--profile lora]

Shapes: (a) 32 rows x 128 tokens, 16 tasks (2 rows each); (b) 32 rows x 32 tokens, 32 tasks
(one row each). Row i belongs to task i % tasks, so every batch interleaves its tasks. All
variants run in one process, round-robin per repetition; one JSON object per shape on stdout:

    {"config": {...}, "plain_backbone_tokens_per_s": x,
     "runs": [{"name": "lora", "tokens_per_s": y, "ratio_vs_backbone": y / x, ...}, ...]}

Variants:
- plain backbone: a separately loaded, unwrapped copy of the model (encoder forward, BERT pooler
  included as the wrapped model computes it too) plus CLS pooling and one linear 2-way head.
- ours (one entry of RUNS per adapter set): `MultiTaskModel.classify` on the whole batch, each
  row routed to its task's slot; per-task heads.
- peft_mixed_lora: PEFT on another unwrapped copy, one LoRA adapter per task (same weights as
  ours), forward with `adapter_names` per row, plus the same pooling and head as the plain run.
- naive_loop_lora: our model, one forward per task over that task's rows (swap-per-task serving
  with every adapter already resident, i.e. without the swap copies themselves).

A run whose adapter method is not registered in `adapters.methods.METHODS` (or whose adapters
fail to load) is reported with a `skipped` note instead of numbers. Adding a method is one line
in ADAPTERS (its config) and one in RUNS.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # As a script, this directory is sys.path[0], where bench/http.py would shadow the standard `http`.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from bench.common import (
    build_inputs,
    emit,
    environment,
    interleaved,
    log,
    random_adapter,
    registered_methods,
    setup,
    summarize,
)

THREADS = 2
BATCH = 32
SHAPES = {"a": {"seq_len": 128, "tasks": 16}, "b": {"seq_len": 32, "tasks": 32}}
DEFAULT_REPS = {"a": 12, "b": 20}
QUICK_REPS = 3

# Bank sizes of the serving model (slot count is raised to fit every task of every adapter set).
BANKS = {"bottleneck_max_dim": 64, "lora_max_rank": 16, "prefix_max_len": 32}
HEAD = {"type": "classification", "labels": ["neg", "pos"]}

# Adapter sets: one artifact config per name (fingerprint and head are added per task).
ADAPTERS: dict[str, dict] = {
    "lora": {"method": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"]},
    "houlsby": {"method": "bottleneck", "sites": ["attn", "ffn"], "bottleneck_dim": 48},
    "scaled_parallel": {"method": "parallel", "sites": ["ffn"], "bottleneck_dim": 48, "scaling": 4.0},
    "compacter": {"method": "compacter", "variant": "compacter", "bottleneck_dim": 48, "phm_dim": 4},
    "prefix": {"method": "prefix", "prefix_length": 30},
    "tiny_attention": {"method": "tiny_attention", "attention_dim": 1, "num_heads": 1},
}


@dataclass(frozen=True)
class Run:
    """One measured variant: `ours` (mixed forward), `peft` (adapter_names) or `loop` (per task).

    `adapters` names ADAPTERS entries; with several, task t uses adapters[t % len(adapters)].
    """

    name: str
    adapters: tuple[str, ...]
    kind: str = "ours"


RUNS: list[Run] = [
    Run("lora", ("lora",)),
    Run("houlsby", ("houlsby",)),
    Run("scaled_parallel", ("scaled_parallel",)),
    Run("compacter", ("compacter",)),
    Run("prefix", ("prefix",)),
    Run("tiny_attention", ("tiny_attention",)),
    Run("mix3", ("lora", "houlsby", "scaled_parallel")),
    Run("mix4", ("lora", "houlsby", "scaled_parallel", "prefix")),
    Run("peft_mixed_lora", ("lora",), kind="peft"),
    Run("naive_loop_lora", ("lora",), kind="loop"),
]

PLAIN = "plain_backbone"


# -- setup -----------------------------------------------------------------------------------------


def _head_params(hidden: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(hidden, len(HEAD["labels"]), generator=g) * 0.02, torch.zeros(len(HEAD["labels"]))


class Bench:
    """Models, adapters and inputs of one shape; `callables()` gives what is timed."""

    def __init__(self, shape: str, runs: list[Run]) -> None:
        from adapters.backbone import load_backbone

        self.shape = shape
        self.seq_len = SHAPES[shape]["seq_len"]
        self.tasks = SHAPES[shape]["tasks"]
        self.notes: dict[str, str] = {}
        self.runs: list[Run] = []
        methods = registered_methods()
        for run in runs:
            missing = [ADAPTERS[a]["method"] for a in run.adapters if ADAPTERS[a]["method"] not in methods]
            if missing:
                self.notes[run.name] = (
                    f"method {missing[0]!r} is not registered in adapters.methods.METHODS yet"
                )
            else:
                self.runs.append(run)

        self.plain = load_backbone(device="cpu", dtype="float32")
        self.spec = self.plain.spec
        self.ids, self.mask, self.source = build_inputs(
            self.plain.tokenizer, batch=BATCH, seq_len=self.seq_len, seed=0
        )
        self.head_w, self.head_b = _head_params(self.spec.hidden_size)
        self.task_of_row = [i % self.tasks for i in range(BATCH)]

        self.adapter_sets = sorted({a for r in self.runs if r.kind != "peft" for a in r.adapters})
        self.tensors: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self.mt = None
        self.slot: dict[tuple[str, int], int] = {}
        if any(r.kind in ("ours", "loop") for r in self.runs):
            self._build_ours()
        self.peft = None
        if any(r.kind == "peft" for r in self.runs):
            self._build_peft()

    def _config(self, name: str):
        from store.artifact import parse_config

        return parse_config({**ADAPTERS[name], "backbone_fingerprint": self.spec.fingerprint, "head": HEAD})

    def _build_ours(self) -> None:
        from adapters.backbone import load_backbone
        from adapters.model import BankConfig, MultiTaskModel

        bb = load_backbone(device="cpu", dtype="float32")
        slots = max(40, 1 + self.tasks * len(self.adapter_sets))
        self.bank_config = BankConfig(slots=slots, **BANKS)
        self.mt = MultiTaskModel(bb, banks=self.bank_config)
        next_slot = 1
        failed: dict[str, str] = {}
        for a_i, name in enumerate(self.adapter_sets):
            try:
                cfg = self._config(name)
                for t in range(self.tasks):
                    tensors = random_adapter(cfg, self.spec, seed=1000 * a_i + t)
                    self.mt.load(next_slot, cfg, tensors)
                    self.tensors[(name, t)] = tensors
                    self.slot[(name, t)] = next_slot
                    next_slot += 1
            except Exception as exc:  # a method registered but not loadable here: report, go on
                failed[name] = f"{type(exc).__name__}: {exc}"
        for run in list(self.runs):
            bad = [a for a in run.adapters if a in failed]
            if bad and run.kind != "peft":
                self.notes[run.name] = f"adapters {bad[0]!r} failed to load: {failed[bad[0]]}"
                self.runs.remove(run)

    def _build_peft(self) -> None:
        from peft import LoraConfig, get_peft_model

        from adapters.backbone import load_backbone

        a = ADAPTERS["lora"]
        bb = load_backbone(device="cpu", dtype="float32")
        names = {"q": "query", "k": "key", "v": "value"}
        lcfg = LoraConfig(
            r=a["r"],
            lora_alpha=a["alpha"],
            lora_dropout=0.0,
            target_modules=[names[t] for t in a["targets"]],
        )
        pm = get_peft_model(bb.model, lcfg, adapter_name="task0")
        for t in range(1, self.tasks):
            pm.add_adapter(f"task{t}", lcfg)
        pm.eval()
        # Same weights as our lora tasks when we have them (so outputs can be compared), else random.
        with torch.no_grad():
            for t in range(self.tasks):
                ours = self.tensors.get(("lora", t))
                g = torch.Generator().manual_seed(50_000 + t)
                for mod_name, mod in pm.named_modules():
                    if not hasattr(mod, "lora_A") or f"task{t}" not in mod.lora_A:
                        continue
                    layer = int(mod_name.split("layer.")[1].split(".")[0])
                    target = next(k for k, v in names.items() if mod_name.endswith(v))
                    A, B = mod.lora_A[f"task{t}"].weight, mod.lora_B[f"task{t}"].weight
                    if ours is not None:
                        A.copy_(ours[f"encoder.{layer}.{target}.lora.A"])
                        B.copy_(ours[f"encoder.{layer}.{target}.lora.B"])
                    else:
                        A.copy_(torch.randn(A.shape, generator=g) * 0.02)
                        B.copy_(torch.randn(B.shape, generator=g) * 0.02)
        self.peft = pm
        self.peft_names = [f"task{t}" for t in self.task_of_row]

    # -- what is timed -----------------------------------------------------------------------------

    def _slots(self, run: Run) -> torch.Tensor:
        k = len(run.adapters)
        return torch.tensor([self.slot[(run.adapters[t % k], t)] for t in self.task_of_row])

    def plain_forward(self) -> torch.Tensor:
        with torch.inference_mode():
            h = self.plain.model(input_ids=self.ids, attention_mask=self.mask).last_hidden_state
            return torch.addmm(self.head_b, h[:, 0], self.head_w)

    def callables(self) -> dict:
        fns = {PLAIN: self.plain_forward}
        for run in self.runs:
            fns[run.name] = self._callable(run)
        return fns

    def _callable(self, run: Run):
        ids, mask, mt = self.ids, self.mask, self.mt
        if run.kind == "ours":
            slots = self._slots(run)
            return lambda: mt.classify(ids, mask, slots).logits
        if run.kind == "loop":
            slots = self._slots(run)
            groups = []
            for s in torch.unique(slots).tolist():
                idx = torch.nonzero(slots == s).flatten()
                groups.append((idx, torch.full((len(idx),), s, dtype=torch.long)))

            def loop():
                return [mt.classify(ids[idx], mask[idx], sl).logits for idx, sl in groups]

            return loop
        if run.kind == "peft":
            pm, names, w, b = self.peft, self.peft_names, self.head_w, self.head_b

            def peft_forward():
                with torch.inference_mode():
                    h = pm(input_ids=ids, attention_mask=mask, adapter_names=names).last_hidden_state
                    return torch.addmm(b, h[:, 0], w)

            return peft_forward
        raise ValueError(f"unknown run kind {run.kind!r}")

    # -- sanity ------------------------------------------------------------------------------------

    def checks(self) -> dict:
        """Adapters really change the output, and our LoRA equals PEFT's on the same weights."""
        out: dict = {}
        with torch.inference_mode():
            base = self.plain.model(input_ids=self.ids, attention_mask=self.mask).last_hidden_state
            for run in self.runs:
                if run.kind != "ours":
                    continue
                h = self.mt.hidden(self.ids, self.mask, self._slots(run))
                out[f"{run.name}_max_abs_change_vs_backbone"] = float((h - base).abs().max())
            lora = next((r for r in self.runs if r.kind == "ours" and r.adapters == ("lora",)), None)
            if self.peft is not None and lora is not None:
                hp = self.peft(
                    input_ids=self.ids, attention_mask=self.mask, adapter_names=self.peft_names
                ).last_hidden_state
                h = self.mt.hidden(self.ids, self.mask, self._slots(lora))
                out["lora_vs_peft_max_abs_diff"] = float((h - hp).abs().max())
        return out


# -- main ------------------------------------------------------------------------------------------


def measure(shape: str, *, reps: int, warmup: int, runs: list[Run], profile: list[str]) -> dict:
    """Build everything for one shape, time it round-robin and return the JSON object."""
    log(f"shape {shape}: loading models and adapters")
    bench = Bench(shape, runs)
    checks = bench.checks()
    fns = bench.callables()
    tokens = BATCH * bench.seq_len
    log(f"shape {shape}: timing {len(fns)} variants, {reps} reps")
    samples = interleaved(fns, reps=reps, warmup=warmup)
    stats = {name: summarize(xs) for name, xs in samples.items()}
    plain_tps = tokens / stats[PLAIN]["median_s"]

    results = []
    for run in runs:
        if run.name in bench.notes:
            results.append({"name": run.name, "skipped": bench.notes[run.name]})
            continue
        st = stats[run.name]
        tps = tokens / st["median_s"]
        row = {
            "name": run.name,
            "kind": run.kind,
            "tokens_per_s": round(tps, 1),
            "ratio_vs_backbone": round(tps / plain_tps, 4),
            "median_ms": round(1000 * st["median_s"], 2),
            "iqr_ms": [round(1000 * st["p25_s"], 2), round(1000 * st["p75_s"], 2)],
        }
        if run.kind == "ours" and "peft_mixed_lora" in stats and run.adapters == ("lora",):
            row["ratio_vs_peft"] = round(stats["peft_mixed_lora"]["median_s"] / st["median_s"], 4)
        results.append(row)

    for name in profile:
        if name in fns:
            _profile(name, fns[name], fns[PLAIN])

    config = {
        "shape": shape,
        "batch": BATCH,
        "seq_len": bench.seq_len,
        "tasks": bench.tasks,
        "rows_per_task": BATCH // bench.tasks,
        "reps": reps,
        "warmup": warmup,
        **environment(device="cpu", dtype="float32"),
        "inputs": bench.source,
        "attention_mask": "full",
        "slots": bench.bank_config.slots if bench.mt is not None else None,
        "plain_backbone": "unwrapped model forward (encoder + pooler) + CLS linear head",
    }
    plain_st = stats[PLAIN]
    return {
        "config": config,
        "plain_backbone_tokens_per_s": round(plain_tps, 1),
        "plain_backbone_median_ms": round(1000 * plain_st["median_s"], 2),
        "plain_backbone_iqr_ms": [round(1000 * plain_st["p25_s"], 2), round(1000 * plain_st["p75_s"], 2)],
        "runs": results,
        "checks": {k: float(f"{v:.3g}") for k, v in checks.items()},
    }


def _profile(name: str, fn, plain) -> None:
    """torch.profiler operator table of one run and of the plain backbone, on stderr."""
    from torch.profiler import ProfilerActivity, profile

    for label, f in ((PLAIN, plain), (name, fn)):
        f()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                f()
        log(f"== profile: {label} (3 calls) ==")
        log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["a", "b", "both"], default="both")
    p.add_argument("--reps", type=int, default=None, help="repetitions per variant (default: per shape)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_REPS} reps, 1 warm-up: a fast sanity run")
    p.add_argument("--runs", default=None, help="comma-separated run names (default: all)")
    p.add_argument("--profile", default="", help="comma-separated run names to profile (stderr)")
    p.add_argument("--threads", type=int, default=THREADS)
    args = p.parse_args(argv)

    setup(threads=args.threads)
    runs = RUNS
    if args.runs:
        wanted = set(args.runs.split(","))
        unknown = wanted - {r.name for r in RUNS}
        if unknown:
            p.error(f"unknown runs: {', '.join(sorted(unknown))}")
        runs = [r for r in RUNS if r.name in wanted]
    profile = [x for x in args.profile.split(",") if x]
    for shape in ("a", "b") if args.shape == "both" else (args.shape,):
        reps = args.reps or (QUICK_REPS if args.quick else DEFAULT_REPS[shape])
        warmup = 1 if args.quick else args.warmup
        emit(measure(shape, reps=reps, warmup=warmup, runs=runs, profile=profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The model side of serving: one worker thread per device runs every forward pass and slot load.

The event loop never blocks on torch or tokenization: tokenization runs on a thread of its own
(fast tokenizers are not safe to share across threads), and forwards, slot loads and evictions
run on the device's single worker thread, one at a time, so slot state needs no further locking.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from adapters.heads import decode_row, pool
from service.batcher import Row
from service.cache import Adapter, DeviceSlots
from service.metrics import Metrics
from store.errors import InvalidRequest, PayloadTooLarge

__all__ = ["Embed", "Encoded", "Engine", "Work", "balance", "length_splits"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Text = str | tuple[str, str] | list[str]


DEFAULT_SPLIT_COST = {"cpu": 128, "cuda": 2048}
"""Padded tokens one more forward costs, by device type: a CPU's work grows with the padded tokens,
a GPU's barely does at serving batch sizes while each forward launches a fixed set of kernels."""


def length_splits(lengths: Sequence[int], *, forward_cost: int) -> list[list[int]]:
    """Row indices in runs of similar length that minimise padded tokens plus `forward_cost` per run.

    One batch pads every row to its longest; sorted by length and cut where it pays, short rows stop
    paying for the long ones. Exact dynamic programme over the distinct lengths (at most the
    backbone's positions), so it stays cheap for any batch size.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    # A cut saves at most the batch's padding and costs a forward: when the padding is smaller, no
    # split pays (the common case on a GPU, and for batches of like lengths), so skip the search.
    if len(order) < 2 or len(order) * lengths[order[-1]] - sum(lengths) <= forward_cost:
        return [order]
    # runs of equal length are never worth cutting: group them first
    values: list[int] = []
    ends: list[int] = []  # rows up to and including each distinct length
    for k, i in enumerate(order):
        if values and lengths[i] == values[-1]:
            ends[-1] = k + 1
        else:
            values.append(lengths[i])
            ends.append(k + 1)
    n = len(values)
    best = [0] + [0] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        top, rows_to_j = values[j - 1], ends[j - 1]
        best[j], cut[j] = min(
            (best[i] + (rows_to_j - (ends[i - 1] if i else 0)) * top + forward_cost, i) for i in range(j)
        )
    runs: list[list[int]] = []
    j = n
    while j > 0:
        i = cut[j]
        runs.append(order[(ends[i - 1] if i else 0) : ends[j - 1]])
        j = i
    return runs[::-1]


def balance(runs: list[list[int]], lengths: Sequence[int], *, parts: int) -> list[list[int]]:
    """Cut runs (rows sorted by length) further until the largest costs about a `parts`-th of the work.

    A run costs its rows times its longest row. Several threads each take a piece, so the batch ends
    when its largest piece does: the largest one is halved (at the row that best evens the halves'
    costs) until it is within a quarter of an even share, or a single row. Pieces come back largest
    first, the order for threads to take them in.
    """

    def cost(run: list[int]) -> int:
        return len(run) * lengths[run[-1]]

    pieces = [r for r in runs if r]
    if parts > 1:
        share = sum(cost(r) for r in pieces) / parts
        while len(pieces) < 4 * parts:
            big = max(range(len(pieces)), key=lambda k: cost(pieces[k]))
            run = pieces[big]
            if len(run) < 2 or cost(run) <= 1.25 * share:
                break
            cut = min(
                range(1, len(run)),
                key=lambda k: max(k * lengths[run[k - 1]], (len(run) - k) * lengths[run[-1]]),
            )
            pieces[big : big + 1] = [run[:cut], run[cut:]]
    return sorted(pieces, key=cost, reverse=True)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized input."""

    ids: list[int]
    types: list[int] | None


@dataclass(frozen=True, slots=True)
class Embed:
    """An embedding row: how its sentence vector is pooled, and whether it is L2-normalised."""

    pooling: str = "mean"
    normalize: bool = True


@dataclass(frozen=True, slots=True)
class Work:
    """A row's payload: its tokens, the adapter version it runs with, and its output options."""

    adapter: Adapter | None
    """None: the backbone alone (slot 0)."""
    encoded: Encoded
    all_scores: bool = False
    raw_scores: bool = False
    """Set: a classifier row also answers its head's raw logits, by label (`logits`)."""
    embed: Embed | None = None
    """Set: the row's answer is its sentence vector, not its head's output."""

    @property
    def key(self):
        """The adapter's cache key (None for the backbone alone)."""
        return None if self.adapter is None else self.adapter.key


class Engine:
    """Runs batches of rows on the device's worker thread and splits the outputs per row."""

    def __init__(
        self,
        *,
        model,
        device: DeviceSlots,
        metrics: Metrics,
        max_input_tokens: int,
        split_cost_tokens: int | None = None,
        compute_threads: int | None = None,
        prefetch: bool = True,
    ) -> None:
        self.model = model
        self.backbone = model.backbone
        self.tokenizer = model.backbone.tokenizer
        if self.tokenizer is None:
            raise ValueError("the backbone has no tokenizer; the service needs one")
        self.device = device
        self.m = metrics
        self.max_input_tokens = min(max_input_tokens, model.spec.max_positions)
        self.decoder_only = self.backbone.generative and model.spec.num_layers == 0
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.use_types = "token_type_ids" in getattr(self.tokenizer, "model_input_names", ())
        name = self.backbone.device.type
        self.split_cost = (
            split_cost_tokens if split_cost_tokens is not None else DEFAULT_SPLIT_COST.get(name, 2048)
        )
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"adapterserve-{name}")
        # On a CPU the parts of a batch run on several single-threaded teams at once: torch's own
        # intra-op threads stall whenever one of them loses its core to the event loop or the tokenizer,
        # where independent teams lose only that core's share. A GPU runs each part as one launch.
        threads = compute_threads if compute_threads is not None else (_usable_cpus() if name == "cpu" else 1)
        self.compute_threads = max(1, threads)
        # Two pieces per thread: a thread that finishes early takes the other's second piece, and
        # shorter runs of length-sorted rows pad less. bench/http.py at 64 connections, alternating
        # runs: 143-159 requests/s at two per thread, 116-129 at one, 135-144 at four.
        self._pieces = 2 * self.compute_threads if self.compute_threads > 1 else 1
        self._compute = (
            ThreadPoolExecutor(
                max_workers=self.compute_threads,
                thread_name_prefix="adapterserve-compute",
                initializer=torch.set_num_threads,
                initargs=(1,),
            )
            if self.compute_threads > 1
            else None
        )
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterserve-tokenize")
        self._prefetch_pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterserve-prefetch")
            if prefetch
            else None
        )

    # -- threads --------------------------------------------------------------------------------

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the device's worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def tokenize(
        self, inputs: Sequence[Text], *, max_tokens: int | None = None, truncate: bool = True
    ) -> list[Encoded]:
        """Tokenize strings and [text_a, text_b] pairs off the event loop, truncated to the limit.

        With `truncate=False` an input longer than the limit is refused (413) instead of cut.
        """
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool, self._tokenize, inputs, max_tokens, truncate
        )

    async def with_tokenizer(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(tokenizer)` on the tokenizer's own thread (offsets, decoding: what tokenize omits)."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, self.tokenizer)

    async def tokenize_all(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of whole prompts (no truncation: the caller checks the limits) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool, lambda: [list(x) for x in self.tokenizer(list(texts))["input_ids"]]
        )

    async def detokenize(self, tokens: Sequence[Sequence[int]]) -> list[str]:
        """Decode token lists to text (special tokens dropped) on the tokenizer's thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool,
            lambda: self.tokenizer.batch_decode([list(t) for t in tokens], skip_special_tokens=True),
        )

    def prefetch(self, adapter: Adapter) -> None:
        """Start preparing a cold adapter's bank entries off the worker thread, ahead of its batch.

        The worker thread runs loads and forwards one at a time, so a load on it leaves the compute
        threads idle; what a load computes before its copy (Kronecker products, the transfer to the
        device) is done here instead, while earlier batches run. A generated adapter is left alone:
        its batch generates every cold task of its hypernetwork in one forward.
        """
        if self._prefetch_pool is None or adapter.hypernetwork is not None or adapter.prepared is not None:
            return
        if self.device.resident(adapter.key):
            return
        adapter.prepared = self._prefetch_pool.submit(self.model.entries, adapter.config, adapter.tensors)

    async def run_batch(self, rows: list[Row]) -> list[Any]:
        """The batcher's hook: each row's output dict, or the exception that row failed with."""
        return await self.call(self._run, rows)

    def close(self) -> None:
        """Stop the threads once their queued work is done."""
        self._tokenize_pool.shutdown(wait=True, cancel_futures=True)
        if self._prefetch_pool is not None:
            self._prefetch_pool.shutdown(wait=True, cancel_futures=True)
        self._worker.shutdown(wait=True)
        if self._compute is not None:
            self._compute.shutdown(wait=True)

    # -- tokenization ---------------------------------------------------------------------------

    def _tokenize(
        self, inputs: Sequence[Text], max_tokens: int | None = None, truncate: bool = True
    ) -> list[Encoded]:
        singles = [i for i, x in enumerate(inputs) if isinstance(x, str)]
        pairs = [i for i, x in enumerate(inputs) if not isinstance(x, str)]
        out: list[Encoded | None] = [None] * len(inputs)
        limit = min(max_tokens or self.max_input_tokens, self.max_input_tokens)
        opts = {"truncation": True, "max_length": limit} if truncate else {"truncation": False}
        if singles:
            enc = self.tokenizer([inputs[i] for i in singles], **opts)
            self._collect(enc, singles, out)
        if pairs:
            enc = self.tokenizer([inputs[i][0] for i in pairs], [inputs[i][1] for i in pairs], **opts)
            self._collect(enc, pairs, out)
        for e in out:
            if not e.ids:
                raise InvalidRequest("an input is empty after tokenization; send some text")
            if len(e.ids) > limit:
                raise PayloadTooLarge(
                    f"an input has {len(e.ids)} tokens, more than {limit}; send truncate: true to cut it"
                )
        return out  # type: ignore[return-value]

    def _collect(self, enc, where: list[int], out: list[Encoded | None]) -> None:
        types = enc.get("token_type_ids") if self.use_types else None
        for j, i in enumerate(where):
            out[i] = Encoded(
                ids=list(enc["input_ids"][j]), types=list(types[j]) if types is not None else None
            )

    # -- batches (worker thread) ----------------------------------------------------------------

    def _run(self, rows: list[Row]) -> list[Any]:
        works: list[Work] = [r.payload for r in rows]
        results: list[Any] = [None] * len(rows)
        if not works:
            return results
        adapters = list({w.key: w.adapter for w in works if w.adapter}.values())
        # Rows of the backbone alone (slot 0) ride along with the first group.
        bare = [i for i, w in enumerate(works) if w.adapter is None]
        for n, group in enumerate(self.device.plan(adapters) or [[]]):
            keys = {a.key for a in group}
            part = (bare if n == 0 else []) + [i for i, w in enumerate(works) if w.key in keys]
            try:
                slots = self.device.assign(group) if group else {}
                slots[None] = 0
                sub = [works[i] for i in part]
                outs = self._classify(sub, slots)
            except Exception as exc:
                # One task's failure (a load, a bad input) must not fail the other tasks' rows.
                log.warning("batch part of %d rows failed: %s", len(part), exc)
                outs = [exc] * len(part)
            for i, o in zip(part, outs, strict=True):
                results[i] = o
        return results

    def _pad(self, works: list[Work], *, left: bool) -> dict[str, torch.Tensor]:
        longest = max(len(w.encoded.ids) for w in works)
        n = len(works)
        ids = torch.full((n, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        types = torch.zeros((n, longest), dtype=torch.long) if self.use_types else None
        for j, w in enumerate(works):
            k = len(w.encoded.ids)
            span = slice(longest - k, longest) if left else slice(0, k)
            ids[j, span] = torch.tensor(w.encoded.ids)
            mask[j, span] = 1
            if types is not None and w.encoded.types is not None:
                types[j, span] = torch.tensor(w.encoded.types)
        dev = self.backbone.device
        out = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
        if types is not None:
            out["token_type_ids"] = types.to(dev)
        return out

    def _observe(self, works: list[Work], started: float) -> None:
        self.m.forward_duration.observe(time.perf_counter() - started)
        self.m.batch_size.observe(len(works))
        self.m.batch_tasks.observe(len({w.key for w in works}))

    def _classify(self, works: list[Work], slots: dict) -> list[dict]:
        lengths = [len(w.encoded.ids) for w in works]
        runs = balance(length_splits(lengths, forward_cost=self.split_cost), lengths, parts=self._pieces)
        if len(runs) == 1:
            return self._classify_run(works, slots)
        parts: list[Any]
        if self._compute is None:
            parts = [self._classify_run([works[i] for i in run], slots) for run in runs]
        else:
            # Every part is waited for before any error is raised: slots stay put until all are done.
            futures = [
                self._compute.submit(self._classify_run, [works[i] for i in run], slots) for run in runs
            ]
            wait(futures)
            parts = [f.result() for f in futures]
        out: list[dict | None] = [None] * len(works)
        for run, part in zip(runs, parts, strict=True):
            for i, result in zip(run, part, strict=True):
                out[i] = result
        return out  # type: ignore[return-value]

    def _classify_run(self, works: list[Work], slots: dict) -> list[dict]:
        batch = self._pad(works, left=False)
        slot_ids = [slots[w.key] for w in works]
        started = time.perf_counter()
        extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out: list[dict | None] = [None] * len(works)
        if all(w.embed is not None for w in works):
            hidden = self.model.hidden(ids, mask, slot_ids, **extra)
        else:
            res = self.model.classify(ids, mask, slot_ids, **extra)
            hidden = res.hidden
            logits = res.logits.float().cpu()
            for j, w in enumerate(works):
                if w.embed is None:
                    head = w.adapter.head
                    out[j] = decode_row(
                        logits[j], kind=head.type, labels=list(head.labels), all_scores=w.all_scores
                    )
                    if w.raw_scores and head.labels:
                        raw = logits[j, : len(head.labels)].tolist()
                        out[j]["logits"] = dict(zip(head.labels, raw, strict=True))
        self._embed(works, hidden, mask, out)
        self._observe(works, started)
        return out  # type: ignore[return-value]

    def _embed(self, works: list[Work], hidden: torch.Tensor, mask: torch.Tensor, out: list) -> None:
        """Each embedding row's sentence vector (float32), pooled the way its row asks."""
        ways: dict[Embed, list[int]] = {}
        for j, w in enumerate(works):
            if w.embed is not None:
                ways.setdefault(w.embed, []).append(j)
        for way, rows in ways.items():
            idx = torch.as_tensor(rows, device=hidden.device)
            with torch.inference_mode():
                vec = pool(hidden[idx], mask[idx], mode=way.pooling, pooler=self.model.pooler()).float()
                if way.normalize:
                    vec = F.normalize(vec, p=2, dim=-1)
            arr = vec.cpu().numpy()
            for k, j in enumerate(rows):
                out[j] = {"embedding": arr[k]}

    def warm_up(self) -> None:
        """One backbone-only forward (slot 0), so the first request does not pay for lazy set-up."""
        enc = self._tokenize(["warm up"])
        batch = self._pad([Work(adapter=None, encoded=enc[0])], left=self.decoder_only)  # type: ignore[arg-type]
        with torch.inference_mode():
            if ("head", "head") in self.model.banks:
                extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
                self.model.classify(batch["input_ids"], batch["attention_mask"], [0], **extra)
            else:
                self.model.generate(batch["input_ids"], batch["attention_mask"], [0], max_new_tokens=1)

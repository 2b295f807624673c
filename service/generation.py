"""Iteration-level (continuous) batching of generation: one decoding loop for every task's rows.

Each loop turn runs one call on the device's worker thread: rows that finished or whose client went
away leave, waiting rows join (prefilled together) while the batch has room, and every other row
decodes one token. Between turns the new tokens are detokenized on the tokenizer's thread, checked
for stop strings, EOS and the token limit, and handed to their requests. So a new request joins at the
next step, and a long generation never holds a short one back.

Slots are asked for at every turn (`DeviceSlots.assign`): a classification batch between two steps
may move an adapter, and the cache holds no slot state, so the next step simply uses its new slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from adapters.generate import DecodeBatch, Prompt, Sampling
from service.cache import Adapter
from store.errors import QueueFull

__all__ = ["Event", "Generation", "Generations"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Event:
    """What a generation reports: new text, and at the end its finish reason (or the error it hit)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class Generation:
    """One prompt being generated: its tokens so far and where its events go."""

    index: int
    adapter: Adapter | None
    ids: list[int]
    sampling: Sampling
    max_tokens: int
    stop: tuple[str, ...]
    events: asyncio.Queue[Event]
    task_label: str = "other"
    tokens: list[int] = field(default_factory=list)
    sent: int = 0
    """Characters of text already reported."""
    finish_reason: str | None = None
    cancelled: bool = False
    row: int | None = None
    released: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def budget(self) -> int:
        """Tokens it may hold at most: its prompt and its generation."""
        return len(self.ids) + self.max_tokens

    @property
    def key(self):
        """The adapter's cache key (None: the backbone alone)."""
        return None if self.adapter is None else self.adapter.key

    def cancel(self) -> None:
        """Stop generating (the client went away); the row leaves at the next step."""
        self.cancelled = True


class Generations:
    """The decoding loop of one model, with its admission limits."""

    def __init__(
        self, *, engine, device, metrics, max_rows: int, max_tokens_in_flight: int, eos_token_id: int | None
    ) -> None:
        self.engine = engine
        self.device = device
        self.m = metrics
        self.max_rows = max_rows
        self.max_tokens_in_flight = max_tokens_in_flight
        self.eos = eos_token_id
        self.batch = DecodeBatch(engine.model)
        self.tokens_in_flight = 0
        self._waiting: list[Generation] = []
        self._active: dict[int, Generation] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def rows(self) -> int:
        """Rows decoding now."""
        return len(self._active)

    def start(self) -> None:
        """Start the loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="adapterserve-decode")

    async def stop(self) -> None:
        """Stop the loop; unfinished generations get an error event."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def submit(self, gens: list[Generation]) -> None:
        """Queue generations to join the batch at the next step, or refuse them all (QueueFull: 429)."""
        need = sum(g.budget for g in gens)
        if self.tokens_in_flight + need > self.max_tokens_in_flight:
            self.m.rejected.labels(reason="tokens_in_flight").inc()
            raise QueueFull(
                f"{self.tokens_in_flight} of {self.max_tokens_in_flight} tokens are in flight and this "
                f"request needs {need}; retry shortly",
                retry_after=1,
            )
        self.tokens_in_flight += need
        self._waiting += gens
        self._wake.set()

    # -- the loop -------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if not self._active and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            for g in [g for g in self._waiting if g.cancelled]:
                self._waiting.remove(g)
                self._finish(g, "cancelled")
            leaving = [g for g in self._active.values() if g.cancelled or g.finish_reason]
            joining = self._admit()
            if not joining and len(leaving) == len(self._active):
                for g in leaving:
                    self._release(g)
                if self._active:
                    self.batch.remove(list(self._active))
                    self._active.clear()
                continue
            try:
                stepped, joined = await self.engine.call(self._turn, leaving, joining)
            except Exception as exc:
                log.warning("decoding step failed: %s", exc)
                for g in [*self._active.values(), *joining]:
                    if not (g.cancelled or g.finish_reason):
                        g.events.put_nowait(Event(index=g.index, error=exc))
                    self._release(g)
                self._active.clear()
                self.batch = DecodeBatch(self.engine.model)
                continue
            for g in leaving:
                self._active.pop(g.row, None)
                self._release(g)
            now = time.perf_counter()
            for g, (row, _) in zip(joining, joined, strict=True):
                g.row = row
                g.first_token_at = now
                self._active[row] = g
                self.m.time_to_first_token.observe(now - g.submitted)
            fresh = [(self._active[r], t) for r, t in stepped] + [
                (g, t) for g, (_, t) in zip(joining, joined, strict=True)
            ]
            self.m.generation_rows.set(len(self._active))
            await self._emit(fresh)

    def _admit(self) -> list[Generation]:
        room = self.max_rows - len(self._active)
        joining: list[Generation] = []
        keys = {g.key for g in self._active.values() if g.key is not None}
        for g in list(self._waiting):
            if len(joining) >= room:
                break
            trial = keys | ({g.key} if g.key is not None else set())
            if len(trial) > self.device.capacity:
                continue  # waits until a row of another task leaves
            keys = trial
            joining.append(g)
            self._waiting.remove(g)
        return joining

    def _turn(self, leaving: list[Generation], joining: list[Generation]):
        """Worker thread: rows leave, the others step, newcomers join; (row, token) pairs of both."""
        self.batch.remove([g.row for g in leaving])
        remaining = [self._active[r] for r in self.batch.ids]
        adapters = list({g.key: g.adapter for g in [*remaining, *joining] if g.adapter is not None}.values())
        slots = self.device.assign(adapters) if adapters else {}
        slots[None] = 0
        started = time.perf_counter()
        stepped = list(
            zip(self.batch.ids, self.batch.step(slots=[slots[g.key] for g in remaining]), strict=True)
        )
        joined = self.batch.add(
            [Prompt(ids=g.ids, sampling=g.sampling) for g in joining], slots=[slots[g.key] for g in joining]
        )
        rows = len(remaining) + len(joining)
        self.m.forward_duration.observe(time.perf_counter() - started)
        self.m.batch_size.observe(rows)
        return stepped, joined

    async def _emit(self, fresh: list[tuple[Generation, int]]) -> None:
        live = []
        for g, tok in fresh:
            if g.cancelled or g.finish_reason:
                continue
            if self.eos is not None and tok == self.eos:
                g.finish_reason = "stop"
            else:
                g.tokens.append(tok)
                self.m.generated_tokens.labels(task=g.task_label).inc()
                if len(g.tokens) >= g.max_tokens:
                    g.finish_reason = "length"
            live.append(g)
        if not live:
            return
        texts = await self.engine.detokenize([g.tokens for g in live])
        for g, text in zip(live, texts, strict=True):
            cut = _stop_at(text, g.stop, start=max(g.sent - max((len(s) for s in g.stop), default=0), 0))
            if cut is not None:
                text, g.finish_reason = text[:cut], "stop"
            # hold back what may still become a stop string, and a character not yet complete
            end = len(text) if g.finish_reason else _safe_end(text, g.stop)
            if end > g.sent:
                g.events.put_nowait(Event(index=g.index, text=text[g.sent : end]))
                g.sent = end
            if g.finish_reason:
                self._finish(g, g.finish_reason)

    def _finish(self, g: Generation, reason: str) -> None:
        g.finish_reason = reason
        if reason != "cancelled":
            g.events.put_nowait(Event(index=g.index, finish_reason=reason))
            if g.first_token_at is not None and len(g.tokens) > 1:
                per = (time.perf_counter() - g.first_token_at) / (len(g.tokens) - 1)
                self.m.time_per_output_token.observe(per)
        if g.row is None:
            self._release(g)

    def _release(self, g: Generation) -> None:
        if not g.released:
            g.released = True
            self.tokens_in_flight -= g.budget


def _stop_at(text: str, stops: tuple[str, ...], *, start: int) -> int | None:
    """Where the earliest stop string begins in `text` (searching from `start`), or None."""
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be sent: not a trailing partial stop string, nor an incomplete character."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = 0
    for s in stops:
        held = max([held] + [k for k in range(1, min(len(s), end + 1)) if text[:end].endswith(s[:k])])
    return end - held

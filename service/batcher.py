"""Request batcher: queues rows of many tasks and forms batches for a single worker; pure asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from store.errors import DeadlineExceeded, Draining, PayloadTooLarge, QueueFull

__all__ = ["BatchObserver", "BatchPolicy", "BatchResultMismatch", "Batcher", "Row"]

log = logging.getLogger(__name__)

# Weight of the newest batch in the throughput estimate behind Retry-After.
_RATE_ALPHA = 0.2
# Past a minute a Retry-After stops being a useful hint; clients should back off on their own.
_MAX_RETRY_AFTER_S = 60


@dataclass(frozen=True, slots=True)
class Row:
    """One unit of model work: one input of one task, served by one adapter version."""

    task: str
    version: int
    length: int  # tokens; the batch pads every row to its longest
    payload: Any

    def __post_init__(self) -> None:
        if self.length < 0:
            raise ValueError(f"row length must be >= 0, got {self.length}")


class BatchPolicy(enum.StrEnum):
    """How rows of different tasks may share a batch."""

    MIXED = "mixed"
    PER_TASK = "per_task"


class BatchResultMismatch(RuntimeError):
    """run_batch returned a different number of results than the rows it was given."""


class BatchObserver:
    """Hooks for metrics; subclass and override what you need, every method defaults to a no-op."""

    def on_batch(self, rows: list[Row], queue_waits: list[float]) -> None:
        """Called when a batch is formed, with each row's time in the queue (seconds)."""

    def on_reject(self, reason: str) -> None:
        """Called when a request is refused or dropped: "queue_full", "deadline" or "cancelled"."""

    def on_queue_depth(self, depth: int) -> None:
        """Called whenever the number of queued rows changes."""


class _Request:
    """One submit() call: its rows, where their results go, and what is still queued."""

    __slots__ = ("deadline", "finished", "future", "pending", "queued", "results", "started", "timer")

    def __init__(self, *, size: int, future: asyncio.Future[list[Any]], deadline: float | None) -> None:
        self.future = future
        self.deadline = deadline
        self.results: list[Any] = [None] * size
        self.pending = size
        self.queued: set[int] = set()
        self.started = False
        self.finished = False
        self.timer: asyncio.TimerHandle | None = None


@dataclass(slots=True, eq=False)
class _Item:
    """A queued row with its place in its request."""

    seq: int
    index: int
    row: Row
    request: _Request
    enqueued_at: float  # injected clock: deadlines and reported queue waits
    arrived: float  # event-loop clock: the batching window, so a frozen test clock cannot stall the loop


class Batcher:
    """Collects rows from concurrent requests and runs them in batches, one batch at a time."""

    def __init__(
        self,
        *,
        run_batch: Callable[[list[Row]], Awaitable[Sequence[Any]]],
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: float,
        max_queue: int,
        policy: BatchPolicy | str = BatchPolicy.MIXED,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_batch_tokens = max_batch_tokens
        self._max_wait_s = max_wait_ms / 1000.0
        self._max_queue = max_queue
        self._policy = BatchPolicy(policy)
        self._observer = observer if observer is not None else BatchObserver()
        self._clock = clock
        # Packing looks at a bounded prefix of the queue so forming a batch stays cheap under backlog.
        self._scan_limit = max(8 * max_batch_size, 64)
        # Both maps keep insertion order: _items is global FIFO, _by_task's key order is the round-robin.
        self._items: dict[int, _Item] = {}
        self._by_task: dict[str, dict[int, _Item]] = {}
        self._deadlined: set[_Request] = set()
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._reserved = 0
        self._in_flight: list[_Item] = []
        self._rows_per_s: float | None = None

    # ------------------------------------------------------------------ public surface

    @property
    def policy(self) -> BatchPolicy:
        """The grouping policy in force."""
        return self._policy

    @property
    def queue_depth(self) -> int:
        """Rows waiting for a batch (not counting the running one)."""
        return len(self._items)

    @property
    def reserved(self) -> int:
        """Rows admitted by reserve() that are still being prepared (not yet queued)."""
        return self._reserved

    @property
    def in_flight(self) -> int:
        """Rows in the batch that is running now."""
        return len(self._in_flight)

    @property
    def running(self) -> bool:
        """True while the batching loop is started and accepting work."""
        return self._task is not None and not self._task.done() and not self._stopping

    def start(self) -> None:
        """Start the background loop on the running event loop (idempotent)."""
        if self._stopping:
            raise Draining("the batcher is shutting down")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="adapterserve-batcher")

    def reserve(self, rows: int) -> None:
        """Hold queue room for `rows` still being prepared (tokenized); QueueFull when there is none.

        Without it, requests waiting to be tokenized would form an unbounded queue in front of this one.
        Pass `reserved=True` to the submit() of those rows, or give the room back with unreserve().
        """
        if self._stopping:
            raise Draining("the service is shutting down and takes no new work")
        self._check_room(rows)
        self._reserved += rows

    def unreserve(self, rows: int) -> None:
        """Give back room reserved for rows that will not be submitted."""
        self._reserved -= rows

    def _check_room(self, rows: int) -> None:
        if len(self._items) + self._reserved + rows > self._max_queue:
            retry_after = self._retry_after(rows)
            self._notify("on_reject", "queue_full")
            raise QueueFull(
                f"the queue is full ({len(self._items) + self._reserved} of {self._max_queue} rows); "
                f"retry in {retry_after} s",
                retry_after=retry_after,
                queue_depth=len(self._items),
                max_queue=self._max_queue,
            )

    async def submit(
        self, rows: Sequence[Row], *, deadline: float | None, reserved: bool = False
    ) -> list[Any]:
        """Queue one request's rows and return their results in row order.

        `deadline` is an absolute time on the batcher's clock; if it passes before any row started, the
        request fails with DeadlineExceeded and its rows never run. With `reserved`, the rows take the
        room reserve() held for them (given back whatever happens next).
        """
        rows = list(rows)
        if reserved:
            self._reserved -= len(rows)
        if self._stopping:
            raise Draining("the service is shutting down and takes no new work")
        if not rows:
            return []
        if len(rows) > self._max_queue:
            raise PayloadTooLarge(
                f"request has {len(rows)} inputs; at most {self._max_queue} can be queued",
                rows=len(rows),
                max_queue=self._max_queue,
            )
        now = self._clock()
        if deadline is not None and now >= deadline:
            self._notify("on_reject", "deadline")
            raise DeadlineExceeded("the request deadline passed before it was queued", deadline=deadline)
        if not reserved:
            self._check_room(len(rows))
        if self._task is None:
            self.start()
        loop = asyncio.get_running_loop()
        request = _Request(size=len(rows), future=loop.create_future(), deadline=deadline)
        arrived = loop.time()
        for index, row in enumerate(rows):
            item = _Item(
                seq=next(self._seq), index=index, row=row, request=request, enqueued_at=now, arrived=arrived
            )
            self._items[item.seq] = item
            self._by_task.setdefault(row.task, {})[item.seq] = item
            request.queued.add(item.seq)
        if deadline is not None:
            # The timer answers the client at its deadline even while the worker is busy.
            self._deadlined.add(request)
            request.timer = loop.call_later(deadline - now, self._on_deadline, request)
        self._notify("on_queue_depth", len(self._items))
        self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            # The client went away: rows that have not started would only waste the device.
            if not request.finished:
                self._notify("on_reject", "cancelled")
                self._finish(request, cancelled=True)
                self._notify("on_queue_depth", len(self._items))
            raise

    async def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking work; with drain, finish queued and running rows first (up to timeout seconds)."""
        self._stopping = True
        if not drain:
            self._fail_queued(Draining("the service is shutting down; the request was not run"))
        self._wakeup.set()
        task = self._task
        if task is None:
            self._fail_queued(Draining("the service is shutting down; the request was not run"))
            return
        done, _ = await asyncio.wait([task], timeout=timeout)
        if not done:
            self._fail_queued(Draining("the service shut down before the request ran"))
            task.cancel()
            await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            log.error("the batcher loop ended with an error (logged when it happened)")

    # ------------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        try:
            while True:
                batch = await self._next_batch()
                if batch is None:
                    return
                await self._run(batch)
        except Exception:
            log.exception("the batcher loop failed")
            raise
        finally:
            # Nothing runs queued rows any more: refuse new work and release every waiter.
            self._stopping = True
            self._fail_queued(Draining("the batcher stopped before the request ran"))

    async def _next_batch(self) -> list[_Item] | None:
        loop = asyncio.get_running_loop()
        while True:
            self._expire_due()
            if not self._items:
                if self._stopping:
                    return None
                await self._wait(None)
                continue
            batch, full = self._select()
            # While stopping no more rows will come, so waiting for company is pointless.
            if full or self._stopping:
                break
            # The window runs from the oldest queued row, so under PER_TASK a row of a task that just
            # got its turn does not hold back rows of other tasks that have waited long enough.
            oldest = next(iter(self._items.values()))
            remaining = oldest.arrived + self._max_wait_s - loop.time()
            if remaining <= 0:
                break
            await self._wait(remaining)
        self._take(batch)
        return batch

    async def _wait(self, timeout: float | None) -> None:
        self._wakeup.clear()
        if timeout is None:
            await self._wakeup.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()

    async def _run(self, batch: list[_Item]) -> None:
        rows = [item.row for item in batch]
        now = self._clock()
        self._notify("on_batch", list(rows), [now - item.enqueued_at for item in batch])
        self._notify("on_queue_depth", len(self._items))
        loop = asyncio.get_running_loop()
        self._in_flight = batch
        started = loop.time()
        try:
            results = await self._run_batch(rows)
        except Exception as exc:
            self._fail_batch(batch, exc)
            return
        except BaseException:
            # Cancelled by stop() past its timeout (or the process is exiting): release the waiters.
            self._fail_batch(batch, Draining("the service shut down while the request was running"))
            raise
        finally:
            self._in_flight = []
        self._record_rate(len(batch), loop.time() - started)
        try:
            count: int | None = len(results)
        except TypeError:
            count = None
        if count != len(batch):
            # Any pairing of a short or long list with the rows could hand one client another's result.
            error = BatchResultMismatch(
                f"run_batch returned {count} results for a batch of {len(batch)} rows"
            )
            self._fail_batch(batch, error)
            return
        for item, result in zip(batch, results, strict=True):
            request = item.request
            if request.finished:
                continue
            request.results[item.index] = result
            request.pending -= 1
            if request.pending == 0:
                self._finish(request, result=request.results)

    # ------------------------------------------------------------------ batch formation

    def _select(self) -> tuple[list[_Item], bool]:
        """The batch that would run now, and whether waiting could not make it any bigger."""
        if self._policy is BatchPolicy.PER_TASK:
            # The first key is the task whose turn it is; _take rotates it to the back.
            bucket = next(iter(self._by_task.values()))
            anchor = next(iter(bucket.values()))
            candidates: Iterable[_Item] = itertools.islice(bucket.values(), 1, self._scan_limit)
        else:
            # The oldest row always goes first, so nothing starves; the rest are picked by closeness in
            # length to it (less padding), preferring rows that arrived within its wait window over
            # newer ones so that packing never lets fresh rows overtake a whole window of older ones.
            queued = iter(self._items.values())
            anchor = next(queued)
            scanned = list(itertools.islice(queued, self._scan_limit))
            window_end = anchor.arrived + self._max_wait_s

            def closeness(item: _Item) -> tuple[int, int]:
                return abs(item.row.length - anchor.row.length), item.seq

            inside = sorted((i for i in scanned if i.arrived <= window_end), key=closeness)
            outside = sorted((i for i in scanned if i.arrived > window_end), key=closeness)
            candidates = itertools.chain(inside, outside)
        return self._fill(anchor, candidates)

    def _fill(self, anchor: _Item, candidates: Iterable[_Item]) -> tuple[list[_Item], bool]:
        batch = [anchor]
        # One batch serves each task with one adapter version, so a slot is never asked for two.
        versions = {anchor.row.task: anchor.row.version}
        longest = anchor.row.length
        budget = self._max_batch_tokens
        for item in candidates:
            if len(batch) >= self._max_batch_size or (len(batch) + 1) * longest > budget:
                break
            row = item.row
            if versions.get(row.task, row.version) != row.version:
                continue
            padded = max(longest, row.length)
            if (len(batch) + 1) * padded > budget:
                continue
            batch.append(item)
            versions[row.task] = row.version
            longest = padded
        full = len(batch) >= self._max_batch_size or (len(batch) + 1) * longest > budget
        return batch, full

    def _take(self, batch: list[_Item]) -> None:
        for item in batch:
            self._remove(item)
            request = item.request
            request.queued.discard(item.seq)
            if not request.started:
                request.started = True
                self._deadlined.discard(request)
                if request.timer is not None:
                    request.timer.cancel()
                    request.timer = None
        if self._policy is BatchPolicy.PER_TASK:
            task = batch[0].row.task
            bucket = self._by_task.pop(task, None)
            if bucket:
                self._by_task[task] = bucket

    def _remove(self, item: _Item) -> None:
        del self._items[item.seq]
        bucket = self._by_task[item.row.task]
        del bucket[item.seq]
        if not bucket:
            del self._by_task[item.row.task]

    # ------------------------------------------------------------------ completion and failure

    def _finish(
        self,
        request: _Request,
        *,
        result: list[Any] | None = None,
        error: BaseException | None = None,
        cancelled: bool = False,
    ) -> None:
        """Settle a request once: drop its queued rows and hand its waiter the outcome."""
        if request.finished:
            return
        request.finished = True
        for seq in request.queued:
            self._remove(self._items[seq])
        request.queued.clear()
        self._deadlined.discard(request)
        if request.timer is not None:
            request.timer.cancel()
            request.timer = None
        if cancelled or request.future.done():
            return
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result if result is not None else [])

    def _fail_batch(self, batch: list[_Item], error: BaseException) -> None:
        depth = len(self._items)
        for request in dict.fromkeys(item.request for item in batch):
            self._finish(request, error=error)
        if len(self._items) != depth:
            self._notify("on_queue_depth", len(self._items))

    def _fail_queued(self, error: BaseException) -> None:
        if not self._items:
            return
        for request in dict.fromkeys(item.request for item in self._items.values()):
            self._finish(request, error=error)
        self._notify("on_queue_depth", len(self._items))

    def _on_deadline(self, request: _Request) -> None:
        request.timer = None
        if request.finished or request.started or request.deadline is None:
            return
        remaining = request.deadline - self._clock()
        if remaining > 0:
            # The injected clock may run slower than the event loop's; look again when it should be due.
            request.timer = asyncio.get_running_loop().call_later(remaining, self._on_deadline, request)
            return
        self._expire(request)

    def _expire_due(self) -> None:
        if not self._deadlined:
            return
        now = self._clock()
        for request in [r for r in self._deadlined if r.deadline is not None and r.deadline <= now]:
            self._expire(request)

    def _expire(self, request: _Request) -> None:
        self._notify("on_reject", "deadline")
        self._finish(
            request,
            error=DeadlineExceeded(
                "the request deadline passed while it was queued", deadline=request.deadline
            ),
        )
        self._notify("on_queue_depth", len(self._items))

    # ------------------------------------------------------------------ estimates and hooks

    def _record_rate(self, rows: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = rows / seconds
        self._rows_per_s = (
            rate if self._rows_per_s is None else (_RATE_ALPHA * rate + (1 - _RATE_ALPHA) * self._rows_per_s)
        )

    def _retry_after(self, rows: int) -> int:
        """Whole seconds until enough queued rows should have run for this request to fit."""
        excess = len(self._items) + self._reserved + rows - self._max_queue
        if not self._rows_per_s:
            return 1
        return int(min(max(math.ceil(excess / self._rows_per_s), 1), _MAX_RETRY_AFTER_S))

    def _notify(self, hook: str, *args: Any) -> None:
        method = getattr(self._observer, hook, None)
        if method is None:
            return
        try:
            method(*args)
        except Exception:
            # Metrics must never take the serving path down with them.
            log.exception("batch observer hook %s failed", hook)

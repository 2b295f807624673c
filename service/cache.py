"""The two adapter tiers: decoded adapters in host memory, and adapters resident in device slots.

The host tier lives on the event loop: an LRU under a byte budget whose misses load once however
many requests wait (single flight), in a thread, so other tasks keep running. An entry that is no
longer fresh (a generated task whose hypernetwork has a new live version) is never cached, and a
load that is stale when it lands is done again, so a swap during a load cannot leave the old
generator cached behind it.

The device tier is changed only on the device's worker thread: slots under a slot count and a byte
budget, with pinning; a lock guards it for readers on other threads. Its eviction is size-aware
(GreedyDual-Size): each resident adapter has a priority `clock + reload_seconds / bytes`, refreshed
on every use; the lowest goes first and the clock rises to it. Recently used adapters, and those
that cost most to load again per byte they free (small ones: a load has a fixed part), stay;
among adapters of one size it is exactly LRU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from service.metrics import Metrics
from store.errors import SlotsExhausted

__all__ = ["Adapter", "DeviceSlots", "HostCache", "Key"]

log = logging.getLogger(__name__)

# (task, incarnation, version): a task deleted and created again never reuses a cached entry.
Key = tuple[str, int, int]

# Loads done again when the result is stale on arrival; past that (swaps faster than loads) the
# waiters get the last result, which is still never cached.
_STALE_RELOADS = 3
# Reload cost of a device slot before its own load was timed: a fixed part (one copy per bank)
# plus the bytes at host-to-device copy speed.
_LOAD_OVERHEAD_S = 2e-4
_COPY_BYTES_PER_S = 2e9


@dataclass(eq=False)
class Adapter:
    """One decoded adapter version, ready to be copied into a device slot."""

    task: str
    uid: int
    version: int
    config: object
    tensors: dict[str, torch.Tensor]
    nbytes: int
    num_parameters: int
    sha256: str
    hypernetwork: object | None = field(default=None, repr=False)
    """The generator of a `hyperformer` task: its slot is generated from it, not copied."""
    refs: int = field(default=0, repr=False)
    host_nbytes: int | None = None
    """Bytes of the decoded tensors in host memory (None: `nbytes`, what its device slot takes)."""
    prepared: Future | None = field(default=None, repr=False, compare=False)
    """Its bank entries being prepared ahead of its device load (`Engine.prefetch`); the load takes them."""

    @property
    def host_bytes(self) -> int:
        """What this adapter costs the host tier."""
        return self.nbytes if self.host_nbytes is None else self.host_nbytes

    @property
    def key(self) -> Key:
        """The cache key of this version."""
        return (self.task, self.uid, self.version)

    @property
    def method(self) -> str:
        """The adapter method of the config."""
        return self.config.method

    @property
    def source(self) -> str:
        """Where a slot's weights come from: `store` (copied) or `hypernetwork` (generated)."""
        return "store" if self.hypernetwork is None else "hypernetwork"

    @property
    def head(self):
        """The task head's config, or None for generation."""
        return self.config.head


def _take_prepared(adapter: Adapter) -> list | None:
    """The bank entries a prefetch prepared for this adapter (waiting for one still running), once."""
    future, adapter.prepared = adapter.prepared, None
    if future is None:
        return None
    try:
        return future.result()
    except Exception:
        # the load prepares them again and fails with the reason where the batch sees it
        return None


class HostCache:
    """Decoded adapters in host memory; held entries are never evicted (event-loop thread only)."""

    def __init__(
        self, *, budget_bytes: int, metrics: Metrics, fresh: Callable[[Adapter], bool] = lambda _: True
    ) -> None:
        self.budget = budget_bytes
        self.m = metrics
        self.fresh = fresh
        """Whether a decoded adapter may still be served to new requests (checked on the event loop)."""
        self._entries: OrderedDict[Key, Adapter] = OrderedDict()
        self._loading: dict[Key, asyncio.Future[Adapter]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pinned: set[Key] = set()
        self.bytes = 0
        self._hits = metrics.tier_hits.labels(tier="host")
        self._misses = metrics.tier_misses.labels(tier="host")
        self.m.tier_budget_bytes.labels(tier="host").set(budget_bytes)

    def set_pinned(self, keys: Iterable[Key]) -> None:
        """Make exactly these keys the ones never evicted (pinned tasks' current versions)."""
        self._pinned = set(keys)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def versions(self, task: str, uid: int) -> list[int]:
        """Versions of a task that are decoded in memory."""
        return sorted(k[2] for k in self._entries if k[:2] == (task, uid))

    def loading(self, task: str, uid: int) -> list[asyncio.Future[Adapter]]:
        """Loads in progress for a task."""
        return [f for k, f in self._loading.items() if k[:2] == (task, uid)]

    def hold(self, adapter: Adapter) -> Adapter:
        """Insert (or re-insert) an adapter and take a reference on it; a stale one is only referenced."""
        key = adapter.key
        if key not in self._entries and self.fresh(adapter):
            self._entries[key] = adapter
            self.bytes += adapter.host_bytes
        if key in self._entries:
            self._entries.move_to_end(key)
        adapter.refs += 1
        self._shrink()
        return adapter

    def release(self, adapter: Adapter) -> None:
        """Drop a reference; unreferenced entries become evictable."""
        adapter.refs = max(adapter.refs - 1, 0)
        self._shrink()

    def acquire(self, key: Key, loader: Callable[[], Adapter]) -> asyncio.Future[Adapter]:
        """A future of the held adapter; a miss starts one load, shared by every waiter.

        The load starts before this returns, so callers may await the future later.
        """
        loop = asyncio.get_running_loop()
        out: asyncio.Future[Adapter] = loop.create_future()
        entry = self._entries.get(key)
        if entry is not None and not self.fresh(entry):
            self.drop([key])
            entry = None
        if entry is not None:
            self._hits.inc()
            out.set_result(self.hold(entry))
            return out
        self._misses.inc()
        shared = self._loading.get(key)
        if shared is None:
            shared = loop.create_future()
            self._loading[key] = shared
            task = loop.create_task(self._load(key, loader, shared), name=f"adapterserve-load-{key[0]}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        def settle(done: asyncio.Future[Adapter]) -> None:
            if out.cancelled():
                return
            if done.exception() is not None:
                out.set_exception(done.exception())
            else:
                out.set_result(self.hold(done.result()))

        shared.add_done_callback(settle)
        return out

    async def _load(self, key: Key, loader: Callable[[], Adapter], shared: asyncio.Future[Adapter]) -> None:
        started = time.perf_counter()
        try:
            adapter = await asyncio.to_thread(loader)
            for _ in range(_STALE_RELOADS):
                if self.fresh(adapter):
                    break
                # Its generator was replaced while it loaded: every waiter should get the new one.
                log.info("adapter %s v%d went stale while it loaded; loading it again", key[0], key[2])
                adapter = await asyncio.to_thread(loader)
        except BaseException as exc:
            self.m.adapter_loads.labels(source="store", result="error").inc()
            shared.set_exception(exc)
            shared.exception()  # retrieved here, so a load nobody awaits any more logs no warning
            if not isinstance(exc, Exception):
                raise
        else:
            self.m.adapter_loads.labels(source="store", result="ok").inc()
            self.m.tier_loads.labels(tier="host").inc()
            self.m.adapter_load_duration.labels(source="store").observe(time.perf_counter() - started)
            shared.set_result(adapter)
        finally:
            self._loading.pop(key, None)

    def drop_where(self, predicate: Callable[[Adapter], bool]) -> None:
        """Forget every entry the predicate selects (holders keep their references)."""
        self.drop([k for k, a in self._entries.items() if predicate(a)])

    def drop(self, keys: Iterable[Key]) -> None:
        """Forget entries (deleted versions); holders keep their references."""
        for key in list(keys):
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.bytes -= entry.host_bytes
        self._publish()

    def keys_of(self, task: str, uid: int) -> list[Key]:
        """Cached keys of a task."""
        return [k for k in self._entries if k[:2] == (task, uid)]

    def _shrink(self) -> None:
        """Evict least recently used entries until the budget holds; never a held or pinned one."""
        if self.bytes > self.budget:
            for key in [k for k, a in self._entries.items() if a.refs == 0 and k not in self._pinned]:
                if self.bytes <= self.budget:
                    break
                self.bytes -= self._entries.pop(key).host_bytes
                self.m.tier_evictions.labels(tier="host").inc()
        self._publish()

    def _publish(self) -> None:
        self.m.host_cache_bytes.set(self.bytes)
        self.m.tier_bytes.labels(tier="host").set(self.bytes)
        self.m.tier_adapters.labels(tier="host").set(len(self._entries))


class DeviceSlots:
    """Which adapter version sits in which device slot; mutated only on the device's worker thread."""

    def __init__(self, *, model, budget_bytes: int, metrics: Metrics) -> None:
        self.model = model
        self.capacity = model.num_slots
        self.budget = budget_bytes
        self.m = metrics
        self._lock = threading.Lock()
        self._slots: OrderedDict[Key, int] = OrderedDict()
        self._bytes: dict[Key, int] = {}
        # The generator each resident generated adapter came from: a new one makes the slot stale.
        self._nets: dict[Key, object] = {}
        self._free = list(range(self.capacity, 0, -1))
        self._pinned: set[Key] = set()
        self.bytes = 0
        # GreedyDual-Size: per key, its priority; the clock is the last victim's priority
        self._priority: dict[Key, float] = {}
        self._clock = 0.0
        # Loads and evictions since the gauges were last published.
        self._changed = False
        # Label children bound once: a `labels()` lookup per row of every batch adds up.
        self._hits = metrics.tier_hits.labels(tier="device")
        self._misses = metrics.tier_misses.labels(tier="device")
        self.m.tier_budget_bytes.labels(tier="device").set(budget_bytes)

    # -- readers (any thread) -----------------------------------------------------------------

    def versions(self, task: str, uid: int) -> list[int]:
        """Versions of a task resident on the device."""
        with self._lock:
            return sorted(k[2] for k in self._slots if k[:2] == (task, uid))

    def set_pinned(self, keys: Iterable[Key]) -> None:
        """Make exactly these keys the ones never evicted."""
        with self._lock:
            self._pinned = set(keys)

    def resident(self, key: Key) -> bool:
        """Whether a version sits in a device slot now."""
        with self._lock:
            return key in self._slots

    # -- worker thread ------------------------------------------------------------------------

    def plan(self, adapters: list[Adapter]) -> list[list[Adapter]]:
        """Split the adapters of one batch into groups that fit the device at once.

        A group may use every slot and byte except those held by pinned adapters outside it.
        """
        with self._lock:
            pinned = {k: self._bytes[k] for k in self._pinned if k in self._slots}
        groups: list[list[Adapter]] = []
        group: list[Adapter] = []
        keys: set[Key] = set()
        for a in adapters:
            trial = keys | {a.key}
            outside = [b for k, b in pinned.items() if k not in trial]
            used = sum(x.nbytes for x in group) + a.nbytes + sum(outside)
            if group and (len(trial) + len(outside) > self.capacity or used > self.budget):
                groups.append(group)
                group, trial = [], {a.key}
            group.append(a)
            keys = trial
        groups.append(group)
        return groups

    def assign(self, adapters: list[Adapter]) -> dict[Key, int]:
        """Make every adapter resident (evicting least recently used ones) and return their slots."""
        try:
            return self._assign(adapters)
        finally:
            # Once per batch, not per load or eviction: the pool-bytes gauge walks every bank's buffers.
            if self._changed:
                self._publish()

    def _assign(self, adapters: list[Adapter]) -> dict[Key, int]:
        needed = {a.key for a in adapters}
        out: dict[Key, int] = {}
        misses: list[Adapter] = []
        for a in adapters:
            with self._lock:
                slot = self._slots.get(a.key)
                if slot is not None:
                    self._slots.move_to_end(a.key)
            if slot is not None and self._nets.get(a.key) is not a.hypernetwork:
                self.evict(a.key, publish=False)
                slot = None
            if slot is not None:
                a.prepared = None  # resident after all: what a prefetch prepared is not needed
                self.m.cache_hits.inc()
                self._hits.inc()
                self._touch(a.key, a.nbytes)
                out[a.key] = slot
                continue
            self.m.cache_misses.inc()
            self._misses.inc()
            misses.append(a)
        # Generated misses of one hypernetwork are generated together: one batched forward.
        groups: dict[int, list[Adapter]] = {}
        for a in misses:
            groups.setdefault(id(a.hypernetwork) if a.hypernetwork is not None else id(a), []).append(a)
        for group in groups.values():
            out |= self._load(group, needed)
        return out

    def _take_slot(self, adapter: Adapter, needed: set[Key], *, reserved: int) -> int:
        """A free slot with room for the adapter (beyond `reserved` bytes), evicting LRU ones."""
        if adapter.nbytes > self.budget:
            raise SlotsExhausted(
                f"adapter {adapter.task!r} needs {adapter.nbytes} bytes; the device cache holds {self.budget}"
            )
        while not self._free or self.bytes + reserved + adapter.nbytes > self.budget:
            with self._lock:
                candidates = [k for k in self._slots if k not in needed and k not in self._pinned]
            if not candidates:
                raise SlotsExhausted(
                    "every device slot holds a pinned adapter or one the running batch needs; "
                    "raise ADAPTERSERVE_CACHE_BYTES (or ADAPTERSERVE_SLOTS), or unpin a task"
                )
            # min() keeps the first of equal priorities: least recently used among them
            victim = min(candidates, key=lambda k: self._priority.get(k, 0.0))
            self._clock = max(self._clock, self._priority.get(victim, 0.0))
            self.evict(victim, publish=False)
        return self._free.pop()

    def _touch(self, key: Key, nbytes: int) -> None:
        """Refresh a resident key's priority: the clock plus its reload cost per byte it holds.

        The cost is modelled (a fixed part plus the bytes at copy speed), not timed: a timed cost
        would make equal adapters' order depend on noise, where it must be exactly LRU.
        """
        cost = _LOAD_OVERHEAD_S + nbytes / _COPY_BYTES_PER_S
        self._priority[key] = self._clock + cost / max(nbytes, 1)

    def _load(self, group: list[Adapter], needed: set[Key]) -> dict[Key, int]:
        """Load adapters into free slots: copied, or generated (several at once from one hypernetwork)."""
        slots: list[int] = []
        net = group[0].hypernetwork
        started = time.perf_counter()
        try:
            for a in group:
                slots.append(self._take_slot(a, needed, reserved=sum(b.nbytes for b in group[: len(slots)])))
            if len(group) > 1:
                self.model.load_generated(
                    [(s, a.config, a.tensors) for s, a in zip(slots, group, strict=True)], net
                )
            else:
                a = group[0]
                self.model.load(slots[0], a.config, a.tensors, hypernetwork=net, entries=_take_prepared(a))
        except BaseException:
            for slot in slots:
                self.model.evict(slot)
                self._free.append(slot)
            if net is not None:
                self.m.adapter_loads.labels(source="hypernetwork", result="error").inc(len(group))
            raise
        if net is not None:
            per_task = (time.perf_counter() - started) / len(group)
            for _ in group:
                self.m.adapter_loads.labels(source="hypernetwork", result="ok").inc()
                self.m.adapter_load_duration.labels(source="hypernetwork").observe(per_task)
        with self._lock:
            for slot, a in zip(slots, group, strict=True):
                self._slots[a.key] = slot
                self._bytes[a.key] = a.nbytes
                self._nets[a.key] = a.hypernetwork
                self.bytes += a.nbytes
        for a in group:
            self._touch(a.key, a.nbytes)
        self.m.tier_loads.labels(tier="device").inc(len(group))
        self._changed = True
        return {a.key: slot for slot, a in zip(slots, group, strict=True)}

    def evict(self, key: Key, *, publish: bool = True) -> bool:
        """Free the slot of a key; False when it was not resident (`publish`: update the gauges now)."""
        with self._lock:
            slot = self._slots.pop(key, None)
            if slot is None:
                return False
            self.bytes -= self._bytes.pop(key)
            self._nets.pop(key, None)
            self._priority.pop(key, None)
        self.model.evict(slot)
        self._free.append(slot)
        self.m.evictions.inc()
        self.m.tier_evictions.labels(tier="device").inc()
        self._changed = True
        if publish:
            self._publish()
        return True

    def evict_generated(self, live: Callable[[object], bool]) -> list[Key]:
        """Evict every slot generated by a hypernetwork that `live` rejects; returns their keys."""
        with self._lock:
            generated = [(k, net) for k, net in self._nets.items() if net is not None]
        stale = [k for k, net in generated if not live(net)]
        self.evict_where(stale)
        return stale

    def evict_where(self, keys: Iterable[Key]) -> None:
        """Evict every resident key among `keys`, then publish the gauges once."""
        for key in list(keys):
            with contextlib.suppress(KeyError):
                self.evict(key, publish=False)
        if self._changed:
            self._publish()

    def resident_keys(self) -> list[Key]:
        """Every resident key, least recently used first."""
        with self._lock:
            return list(self._slots)

    def _publish(self) -> None:
        self._changed = False
        self.m.resident.set(len(self._slots))
        self.m.cache_bytes.set(self.bytes)
        self.m.tier_adapters.labels(tier="device").set(len(self._slots))
        self.m.tier_bytes.labels(tier="device").set(self.bytes)
        allocated = getattr(self.model, "allocated_bytes", None)
        if allocated is not None:
            self.m.pool_bytes.set(allocated())

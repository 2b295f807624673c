"""The host cache's single-flight loads and the device slots' LRU, pins, slot count and byte budget.

The device tier runs over a fake model that records what each slot holds, so every eviction and
refusal is visible without a backbone.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest

from service.cache import Adapter, DeviceSlots, HostCache
from service.metrics import Metrics
from store.errors import SlotsExhausted


def adapter(task: str, *, nbytes: int = 10, version: int = 1) -> Adapter:
    return Adapter(
        task=task,
        uid=0,
        version=version,
        config=None,
        tensors={},
        nbytes=nbytes,
        num_parameters=0,
        sha256="0" * 64,
    )


class FakeModel:
    """Slot contents by task name; load and evict are all DeviceSlots may do to it."""

    def __init__(self, slots: int) -> None:
        self.num_slots = slots
        self.held: dict[int, str] = {}
        self.given: list[object] = []

    def load(self, slot, config, tensors, *, hypernetwork=None, entries=None) -> None:  # type: ignore[no-untyped-def]
        assert slot not in self.held, f"slot {slot} loaded while still holding {self.held[slot]}"
        self.held[slot] = config
        self.given.append(entries)

    def evict(self, slot: int) -> None:
        self.held.pop(slot, None)


def slots(*, capacity: int, budget: int) -> tuple[DeviceSlots, FakeModel]:
    model = FakeModel(capacity)
    return DeviceSlots(model=model, budget_bytes=budget, metrics=Metrics(max_tasks=8)), model


def resident(device: DeviceSlots) -> list[str]:
    return sorted(k[0] for k in device.resident_keys())


def named(task: str, *, nbytes: int = 10) -> Adapter:
    a = adapter(task, nbytes=nbytes)
    a.config = task  # the fake model records the config as the slot's content
    return a


# -- host tier ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_concurrent_misses_of_one_key_share_one_load() -> None:
    """Eight waiters on a missing key: the loader runs once and every waiter gets its one result."""
    cache = HostCache(budget_bytes=1000, metrics=Metrics(max_tasks=8))
    release, calls = threading.Event(), []

    def loader() -> Adapter:
        calls.append(1)
        release.wait(timeout=30)  # held until every waiter has asked
        return adapter("t")

    futures = [cache.acquire(("t", 0, 1), loader) for _ in range(8)]
    release.set()
    got = await asyncio.gather(*futures)
    assert len(calls) == 1
    assert all(a is got[0] for a in got) and got[0].refs == 8
    # and a later request is a hit: no second load
    again = await cache.acquire(("t", 0, 1), loader)
    assert again is got[0] and len(calls) == 1


@pytest.mark.asyncio
async def test_a_failed_load_reaches_every_waiter_and_the_next_miss_loads_again() -> None:
    """A load error is every waiter's error; nothing is cached, so the next request tries again."""
    cache = HostCache(budget_bytes=1000, metrics=Metrics(max_tasks=8))
    release, calls = threading.Event(), []

    def failing() -> Adapter:
        calls.append(1)
        release.wait(timeout=30)
        raise OSError("disk gone")

    futures = [cache.acquire(("t", 0, 1), failing) for _ in range(3)]
    release.set()
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert len(calls) == 1 and all(isinstance(r, OSError) for r in results)
    assert ("t", 0, 1) not in cache
    assert (await cache.acquire(("t", 0, 1), lambda: adapter("t"))).task == "t"


@pytest.mark.asyncio
async def test_host_budget_evicts_only_unreferenced_entries() -> None:
    """Past the byte budget the least recently used unheld entries go; held ones stay."""
    cache = HostCache(budget_bytes=25, metrics=Metrics(max_tasks=8))
    a = await cache.acquire(("a", 0, 1), lambda: adapter("a"))
    b = await cache.acquire(("b", 0, 1), lambda: adapter("b"))
    cache.release(b)
    await cache.acquire(("c", 0, 1), lambda: adapter("c"))  # 30 bytes > 25: b is the only evictable
    assert ("a", 0, 1) in cache and ("b", 0, 1) not in cache and ("c", 0, 1) in cache
    assert cache.bytes == 20 and a.refs == 1


# -- device tier -------------------------------------------------------------------------------


def test_slot_count_evicts_the_least_recently_used() -> None:
    """Three slots, a fourth adapter: the least recently used one leaves, the others keep their slots."""
    device, model = slots(capacity=3, budget=10_000)
    a, b, c, d = (named(t) for t in "abcd")
    device.assign([a])
    device.assign([b])
    device.assign([c])
    device.assign([a])  # a is now the most recent
    device.assign([d])
    assert resident(device) == ["a", "c", "d"]
    assert sorted(model.held.values()) == ["a", "c", "d"]


def test_byte_budget_evicts_before_the_slots_run_out() -> None:
    """Free slots remain, but a 40-byte adapter on top of 80 of a 100-byte budget evicts the LRU one."""
    device, model = slots(capacity=8, budget=100)
    device.assign([named("a", nbytes=40)])
    device.assign([named("b", nbytes=40)])
    device.assign([named("c", nbytes=40)])
    assert resident(device) == ["b", "c"]
    assert device.bytes == 80 and sorted(model.held.values()) == ["b", "c"]


def test_adapter_larger_than_the_budget_is_refused_and_evicts_nothing() -> None:
    """SlotsExhausted names the sizes; what was resident stays."""
    device, model = slots(capacity=4, budget=100)
    device.assign([named("a", nbytes=60)])
    with pytest.raises(SlotsExhausted, match="needs 101 bytes; the device cache holds 100"):
        device.assign([named("big", nbytes=101)])
    assert resident(device) == ["a"] and list(model.held.values()) == ["a"]


def test_pinned_adapter_survives_pressure_until_unpinned() -> None:
    """A pinned key is never the victim; unpinned, it is the LRU one again."""
    device, _ = slots(capacity=2, budget=10_000)
    a = named("a")
    device.assign([a])
    device.set_pinned([a.key])
    for t in "bcdef":
        device.assign([named(t)])
        assert "a" in resident(device)
    device.set_pinned([])
    device.assign([named("g")])
    device.assign([named("h")])
    assert resident(device) == ["g", "h"]


def test_every_slot_pinned_or_needed_is_slots_exhausted() -> None:
    """With the only free slot pinned, another adapter cannot load: a typed error, the pin intact."""
    device, model = slots(capacity=1, budget=10_000)
    a = named("a")
    device.assign([a])
    device.set_pinned([a.key])
    with pytest.raises(SlotsExhausted, match="unpin a task"):
        device.assign([named("b")])
    assert resident(device) == ["a"] and list(model.held.values()) == ["a"]
    # rows of one batch need their adapters at once: two in one slot cannot both be resident
    device.set_pinned([])
    with pytest.raises(SlotsExhausted):
        device.assign([named("b"), named("c")])


def test_plan_splits_a_batch_whose_adapters_exceed_the_budget() -> None:
    """plan() groups a batch's adapters so each group fits slots and bytes beside the pinned ones."""
    device, _ = slots(capacity=3, budget=100)
    pinned = named("p", nbytes=30)
    device.assign([pinned])
    device.set_pinned([pinned.key])
    groups = device.plan([named(t, nbytes=30) for t in "abcd"])
    assert [[a.task for a in g] for g in groups] == [["a", "b"], ["c", "d"]]


def test_eviction_is_size_aware_a_large_adapter_leaves_before_a_small_older_one() -> None:
    """GreedyDual-Size: per byte freed, a small adapter costs more to load again, so it stays longer."""
    device, _ = slots(capacity=8, budget=100)
    device.assign([named("small", nbytes=10)])
    device.assign([named("large", nbytes=60)])  # more recent, but frees 6x the bytes per reload
    device.assign([named("new", nbytes=40)])
    assert resident(device) == ["new", "small"]
    # recency still counts: a small adapter left unused while others come and go ages out
    for i in range(12):
        device.assign([named(f"n{i}", nbytes=10)])
    assert "small" not in resident(device) and "n11" in resident(device)


# -- prepared entries (prefetch) -----------------------------------------------------------------


def _future(*, result=None, error: Exception | None = None) -> Future:
    f: Future = Future()
    if error is not None:
        f.set_exception(error)
    else:
        f.set_result(result)
    return f


def test_a_load_takes_the_prepared_entries_once() -> None:
    """Entries a prefetch prepared go to the model's load, and the adapter lets go of them."""
    device, model = slots(capacity=3, budget=100)
    a = named("a")
    a.prepared = _future(result=["entries of a"])
    device.assign([a])
    assert model.given == [["entries of a"]] and a.prepared is None


def test_a_failed_preparation_leaves_the_load_to_prepare_them_itself() -> None:
    """A prefetch that raised hands nothing over: the load computes (and reports) the entries itself."""
    device, model = slots(capacity=3, budget=100)
    a = named("a")
    a.prepared = _future(error=ValueError("bad tensor"))
    device.assign([a])
    assert model.given == [None] and a.prepared is None


def test_a_hit_drops_what_a_prefetch_prepared() -> None:
    """Resident after all: the prepared entries are dropped, not kept in memory until a later load."""
    device, model = slots(capacity=3, budget=100)
    a = named("a")
    device.assign([a])
    a.prepared = _future(result=["stale"])
    device.assign([a])
    assert model.given == [None] and a.prepared is None

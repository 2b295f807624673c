"""The cache tiers' bookkeeping: load metrics, bytes and return values of evictions, plan() at its edges.

Reuses the fake model of test_cache_tiers; every expected number is worked out by hand in the test.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from test_cache_tiers import adapter, named, resident, slots

from service.cache import DeviceSlots, HostCache
from service.metrics import Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value("adapterserve_" + name, labels or None)


@pytest.mark.asyncio
async def test_host_loads_count_by_outcome_and_time_only_the_load() -> None:
    metrics = Metrics(max_tasks=8)
    cache = HostCache(budget_bytes=1000, metrics=metrics)
    before = time.perf_counter()
    await cache.acquire(("a", 0, 1), lambda: adapter("a"))
    elapsed = time.perf_counter() - before
    assert sample(metrics, "adapter_loads_total", source="store", result="ok") == 1
    assert sample(metrics, "adapter_load_duration_seconds_count", source="store") == 1
    assert 0 <= sample(metrics, "adapter_load_duration_seconds_sum", source="store") <= elapsed

    def broken():
        raise OSError("disk gone")

    with pytest.raises(OSError):
        await cache.acquire(("b", 0, 1), broken)
    assert sample(metrics, "adapter_loads_total", source="store", result="error") == 1
    assert sample(metrics, "adapter_loads_total", source="store", result="ok") == 1
    assert cache.loading("b", 0) == []


@pytest.mark.asyncio
async def test_a_cached_entry_gone_stale_is_loaded_again() -> None:
    stale: set[str] = set()
    cache = HostCache(budget_bytes=1000, metrics=Metrics(max_tasks=8), fresh=lambda a: a.sha256 not in stale)
    first = await cache.acquire(("a", 0, 1), lambda: adapter("a"))
    cache.release(first)
    stale.add(first.sha256)
    fresh = adapter("a")
    fresh.sha256 = "1" * 64
    again = await cache.acquire(("a", 0, 1), lambda: fresh)
    assert again is fresh and cache.bytes == fresh.nbytes


def test_evict_frees_exactly_the_evicted_bytes_and_says_whether_it_did() -> None:
    device, model = slots(capacity=4, budget=1000)
    a, b = named("a", nbytes=10), named("b", nbytes=20)
    device.assign([a, b])
    assert device.evict(a.key) is True
    assert device.bytes == 20 and resident(device) == ["b"] and list(model.held.values()) == ["b"]
    assert device.evict(a.key) is False
    assert device.bytes == 20


def test_an_evicted_generated_slot_is_not_reported_stale_later() -> None:
    device, _ = slots(capacity=4, budget=1000)
    net = object()
    g = named("g")
    g.hypernetwork = net
    device.assign([g])
    device.evict(g.key)
    assert device.evict_generated(lambda n: False) == []
    h = named("h")
    h.hypernetwork = net
    device.assign([h])
    assert device.evict_generated(lambda n: n is net) == []  # its generator is live
    assert device.evict_generated(lambda n: False) == [h.key] and resident(device) == []


def test_plan_counts_the_pinned_bytes_outside_the_group_up_to_the_budget_exactly() -> None:
    device, _ = slots(capacity=4, budget=100)
    pinned = named("p", nbytes=40)
    device.assign([pinned])
    device.set_pinned([pinned.key])
    # 30 + 30 beside the pinned 40 is exactly 100: one group
    assert [[a.task for a in g] for g in device.plan([named("a", nbytes=30), named("b", nbytes=30)])] == [
        ["a", "b"]
    ]
    # one byte more does not fit beside the pin
    assert [[a.task for a in g] for g in device.plan([named("a", nbytes=30), named("b", nbytes=31)])] == [
        ["a"],
        ["b"],
    ]
    # a group that includes the pinned adapter does not count it twice
    assert [[a.task for a in g] for g in device.plan([pinned, named("a", nbytes=60)])] == [["p", "a"]]


def test_plan_counts_the_pinned_slots_outside_the_group() -> None:
    device, _ = slots(capacity=2, budget=1000)
    pinned = named("p")
    device.assign([pinned])
    device.set_pinned([pinned.key])
    # one slot is pinned: two adapters cannot share the other one
    assert [[a.task for a in g] for g in device.plan([named("a"), named("b")])] == [["a"], ["b"]]
    assert [[a.task for a in g] for g in device.plan([pinned, named("a")])] == [["p", "a"]]


def test_budgets_are_inclusive_on_the_device() -> None:
    device, _ = slots(capacity=4, budget=100)
    device.assign([named("whole", nbytes=100)])  # exactly the budget fits
    assert resident(device) == ["whole"]
    device, _ = slots(capacity=4, budget=100)
    device.assign([named("a", nbytes=60)])
    device.assign([named("b", nbytes=40)])  # 60 + 40 = 100: nothing is evicted
    assert resident(device) == ["a", "b"] and device.bytes == 100
    device.assign([named("c", nbytes=1)])  # one byte over: the least recently used goes
    assert resident(device) == ["b", "c"]


@pytest.mark.asyncio
async def test_host_budget_is_inclusive_and_evicts_only_as_much_as_needed() -> None:
    cache = HostCache(budget_bytes=30, metrics=Metrics(max_tasks=8))
    for t in "abc":
        cache.release(await cache.acquire((t, 0, 1), lambda t=t: adapter(t)))  # 10 bytes each
    assert cache.bytes == 30 and cache.versions("a", 0) == [1]  # exactly the budget: all stay
    cache.release(await cache.acquire(("d", 0, 1), lambda: adapter("d")))
    assert ("a", 0, 1) not in cache and all((t, 0, 1) in cache for t in "bcd") and cache.bytes == 30


@pytest.mark.asyncio
async def test_each_release_gives_back_one_reference() -> None:
    cache = HostCache(budget_bytes=10, metrics=Metrics(max_tasks=8))
    a = await cache.acquire(("a", 0, 1), lambda: adapter("a"))
    assert await cache.acquire(("a", 0, 1), lambda: adapter("never")) is a
    assert a.refs == 2
    cache.release(a)
    assert a.refs == 1
    cache.release(await cache.acquire(("b", 0, 1), lambda: adapter("b")))  # over budget: a is held
    assert ("a", 0, 1) in cache
    cache.release(a)
    cache.release(a)  # never below zero
    assert a.refs == 0


@pytest.mark.asyncio
async def test_loading_lists_only_that_tasks_loads() -> None:
    cache = HostCache(budget_bytes=1000, metrics=Metrics(max_tasks=8))
    gate = threading.Event()

    def slow(task: str):
        def load():
            gate.wait(10)
            return adapter(task)

        return load

    a = cache.acquire(("a", 0, 1), slow("a"))
    b = cache.acquire(("b", 0, 2), slow("b"))
    assert len(cache.loading("a", 0)) == 1 and len(cache.loading("b", 0)) == 1
    assert cache.loading("a", 1) == [] and cache.loading("c", 0) == []
    gate.set()
    await asyncio.gather(a, b)
    assert cache.loading("a", 0) == []


class RefusingModel:
    """Fails to load one named adapter; records evictions."""

    def __init__(self, slots: int, refuse: str) -> None:
        self.num_slots = slots
        self.refuse = refuse
        self.held: dict[int, str] = {}
        self.evicted: list[int] = []

    def load(self, slot, config, tensors, *, hypernetwork=None, entries=None) -> None:  # type: ignore[no-untyped-def]
        if config == self.refuse:
            raise RuntimeError("copy failed")
        self.held[slot] = config

    def evict(self, slot: int) -> None:
        self.evicted.append(slot)
        self.held.pop(slot, None)


def test_a_failed_load_returns_its_slot_and_counts_nothing() -> None:
    model = RefusingModel(2, refuse="bad")
    device = DeviceSlots(model=model, budget_bytes=1000, metrics=Metrics(max_tasks=8))
    with pytest.raises(RuntimeError):
        device.assign([named("bad")])
    assert model.evicted == [1] and resident(device) == [] and device.bytes == 0
    # both slots are still there to use
    device.assign([named("a"), named("b")])
    assert sorted(model.held.values()) == ["a", "b"]


def test_a_resident_slot_from_an_old_generator_is_generated_again() -> None:
    device, model = slots(capacity=4, budget=1000)
    old, new = object(), object()
    g = named("g")
    g.hypernetwork = old
    first = device.assign([g])[g.key]
    again = named("g")
    again.hypernetwork = old
    assert device.assign([again]) == {g.key: first}  # same generator: a hit, nothing reloaded
    fresh = named("g")
    fresh.hypernetwork = new
    slot = device.assign([fresh])[g.key]
    assert resident(device) == ["g"] and model.held[slot] == "g" and device.bytes == 10
    assert device.evict_generated(lambda n: n is new) == []
    assert device.evict_generated(lambda n: n is old) == [g.key]


def test_holding_a_cached_entry_again_counts_its_bytes_once() -> None:
    """A second hold of the same adapter takes a reference, not a second copy of its bytes."""
    cache = HostCache(budget_bytes=1000, metrics=Metrics(max_tasks=8))
    a = adapter("a")
    cache.hold(a)
    cache.hold(a)
    assert a.refs == 2 and cache.bytes == a.nbytes == a.host_bytes
    assert cache.versions("a", 0) == [a.version]


def test_a_stale_adapter_is_referenced_but_never_cached() -> None:
    """An adapter from a replaced generator serves its holder and takes no room in the tier."""
    cache = HostCache(budget_bytes=1000, metrics=Metrics(max_tasks=8), fresh=lambda a: False)
    a = adapter("a")
    cache.hold(a)
    assert a.refs == 1 and cache.bytes == 0 and a.key not in cache
    cache.release(a)
    assert a.refs == 0 and cache.bytes == 0


def test_the_host_bytes_gauges_follow_an_eviction() -> None:
    """After the tier evicts to fit, its gauges say what is left, not what was there."""
    metrics = Metrics(max_tasks=8)
    a, c, b = adapter("a", nbytes=10), adapter("c", nbytes=20), adapter("b", nbytes=5)
    cache = HostCache(budget_bytes=34, metrics=metrics)
    for evictable in (a, c):
        cache.hold(evictable)
        cache.release(evictable)
    cache.hold(b)  # 35 bytes: the oldest evictable entry (a) goes, and c fits again
    assert a.key not in cache and c.key in cache and b.key in cache
    assert sample(metrics, "adapter_host_cache_bytes") == 25
    assert sample(metrics, "tier_bytes", tier="host") == 25
    assert sample(metrics, "tier_adapters", tier="host") == 2
    assert sample(metrics, "tier_evictions_total", tier="host") == 1

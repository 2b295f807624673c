"""The registry over a real filesystem store, a stub decoder and device slots on a fake model.

Covers what the API tests leave out: a version whose activation fails is removed again (and a new
name with it), pins as the registry reports them, the method of a task read lazily after a restart,
and a delete the store refuses leaving the task serving.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_cache_tiers import FakeModel

from service.cache import Adapter, DeviceSlots
from service.decode import Decoder
from service.metrics import Metrics
from service.registry import Registry
from store.errors import NotFound, StoreUnavailable
from store.local import LocalStore

pytestmark = pytest.mark.asyncio


class StubDecoder(Decoder):
    """Decodes the JSON config only: {"method": ..., "nbytes": ...}; Decoder's config readers as they are."""

    hypernetworks = None

    def __init__(self) -> None:  # no model: nothing here touches the banks
        pass

    def decode(self, *, task, uid, version, config_bytes, weights_path, sha256) -> Adapter:
        cfg = json.loads(config_bytes)
        return Adapter(
            task=task,
            uid=uid,
            version=version,
            config=SimpleNamespace(method=cfg["method"], head=None, fail=cfg.get("fail", False)),
            tensors={},
            nbytes=cfg.get("nbytes", 10),
            num_parameters=0,
            sha256=sha256,
        )


class FailingModel(FakeModel):
    """Refuses to load an adapter whose config says so (a device error during activation)."""

    def load(self, slot, config, tensors, *, hypernetwork=None, entries=None) -> None:  # type: ignore[no-untyped-def]
        if config.fail:
            raise RuntimeError("device refused the adapter")
        super().load(slot, config, tensors, hypernetwork=hypernetwork)


async def run_here(fn, *args):
    return fn(*args)


def registry(root: Path, **kwargs) -> Registry:
    metrics = Metrics(max_tasks=8)
    return Registry(
        store=LocalStore(root),
        decoder=StubDecoder(),
        device=DeviceSlots(model=FailingModel(4), budget_bytes=1000, metrics=metrics),
        metrics=metrics,
        host_cache_bytes=1000,
        run_on_device=run_here,
        **kwargs,
    )


async def upload(reg: Registry, tmp_path: Path, task: str, **config) -> int:
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"w" * 16)
    info, _, _ = await reg.upload(
        task, config_bytes=json.dumps(config).encode(), weights_path=weights, activate=True
    )
    return info.version


async def test_a_new_name_whose_activation_fails_leaves_nothing_behind(tmp_path: Path) -> None:
    reg = registry(tmp_path / "store")
    await reg.start()
    with pytest.raises(RuntimeError, match="device refused"):
        await upload(reg, tmp_path, "t", method="lora", fail=True)
    assert reg.names() == [] and not reg.is_registered("t")
    assert reg.store.list_names("tasks") == []
    with pytest.raises(NotFound):
        reg.lease("t")


async def test_a_new_version_whose_activation_fails_is_removed_and_the_old_one_serves(tmp_path: Path) -> None:
    reg = registry(tmp_path / "store")
    await reg.start()
    assert await upload(reg, tmp_path, "t", method="lora") == 1
    with pytest.raises(RuntimeError, match="device refused"):
        await upload(reg, tmp_path, "t", method="ia3", fail=True)
    assert [i.version for i in reg.store.list_versions("tasks", "t")] == [1]
    assert reg.store.current_version("tasks", "t") == 1
    lease = reg.lease("t")
    adapter = await reg.ready(lease)
    assert (adapter.version, adapter.method) == (1, "lora")
    reg.release(lease)
    assert reg.state("t").current == 1 and reg.leases_total() == 0
    # the failed version's number is not reused
    assert await upload(reg, tmp_path, "t", method="lora") == 3


async def test_pins_are_reported_as_set(tmp_path: Path) -> None:
    reg = registry(tmp_path / "store")
    await reg.start()
    await upload(reg, tmp_path, "t", method="lora")
    assert reg.is_pinned("t") is False
    await reg.set_pinned("t", True)
    assert reg.is_pinned("t") is True and (await reg.detail("t"))["residency"]["pinned"] is True
    await reg.set_pinned("t", False)
    assert reg.is_pinned("t") is False


async def test_after_a_restart_the_method_is_read_from_the_store_when_asked(tmp_path: Path) -> None:
    first = registry(tmp_path / "store")
    await first.start()
    await upload(first, tmp_path, "t", method="compacter")
    again = registry(tmp_path / "store")
    await again.start()
    [row] = again.summary()
    assert (row["task"], row["current_version"], row["method"]) == ("t", 1, None)
    detail = await again.detail("t")
    assert detail["method"] == "compacter" and detail["current_version"] == 1
    assert [v["version"] for v in detail["versions"]] == [1]
    assert detail["residency"] == {"device": [], "host": [], "pinned": False}
    assert detail["in_flight"] == 0
    assert again.summary()[0]["method"] == "compacter"


async def test_a_delete_the_store_refuses_leaves_the_task_serving(tmp_path: Path, monkeypatch) -> None:
    reg = registry(tmp_path / "store")
    await reg.start()
    await upload(reg, tmp_path, "t", method="lora")

    def refuse(kind, name):
        raise StoreUnavailable("the store failed while deleting: EIO")

    monkeypatch.setattr(reg.store, "delete", refuse)
    with pytest.raises(StoreUnavailable):
        await reg.delete("t")
    assert reg.names() == ["t"] and not reg.state("t").deleted
    lease = reg.lease("t")
    assert (await reg.ready(lease)).version == 1
    reg.release(lease)
    monkeypatch.undo()
    await reg.delete("t")
    assert reg.names() == [] and reg.store.list_names("tasks") == []


async def test_deleting_a_version_that_is_current_is_refused_and_another_one_goes(tmp_path: Path) -> None:
    reg = registry(tmp_path / "store")
    await reg.start()
    await upload(reg, tmp_path, "t", method="lora")
    await upload(reg, tmp_path, "t", method="ia3")
    with pytest.raises(Exception, match="version 2 of 't' is current"):
        await reg.delete_version("t", 2)
    await reg.delete_version("t", 1)
    assert [i.version for i in reg.store.list_versions("tasks", "t")] == [2]
    assert (await reg.detail("t"))["method"] == "ia3"


# -- leases, deletes under load, pins ------------------------------------------------------------


async def test_leases_are_counted_one_per_request_and_a_second_release_changes_nothing(
    tmp_path: Path,
) -> None:
    """Three requests in flight hold three references; each release gives back exactly one."""
    reg = registry(tmp_path / "store")
    await reg.start()
    await upload(reg, tmp_path, "t", method="lora")
    leases = [reg.lease("t") for _ in range(3)]
    adapters = [await reg.ready(lease) for lease in leases]
    assert adapters[0] is adapters[1] is adapters[2]
    assert adapters[0].refs == 3
    assert reg.leases_total() == 3 and (await reg.detail("t"))["in_flight"] == 3
    reg.release(leases[0])
    reg.release(leases[0])  # a second release of the same lease is a no-op
    assert reg.leases_total() == 2 and adapters[0].refs == 2
    reg.release(leases[1])
    assert reg.leases_total() == 1 and adapters[0].refs == 1
    reg.release(leases[2])
    assert reg.leases_total() == 0 and adapters[0].refs == 0
    assert dict(reg.state("t").leases) == {}


async def test_a_lease_released_before_its_load_ends_cancels_only_its_own_wait(tmp_path: Path) -> None:
    """A request that gives up while the version decodes holds nothing; the other waiter gets it."""
    reg = registry(tmp_path / "store")
    await reg.start()
    await upload(reg, tmp_path, "t", method="lora")
    reg.host.drop(reg.host.keys_of("t", reg.state("t").uid))  # cold: the next lease decodes again
    gate = threading.Event()
    decode = reg.decoder.decode

    def slow(**kw):
        gate.wait(10)
        return decode(**kw)

    reg.decoder.decode = slow  # type: ignore[method-assign]
    early, late = reg.lease("t"), reg.lease("t")
    assert reg.leases_total() == 2
    reg.release(early)  # before its version is decoded
    assert early.future.cancelled() and reg.leases_total() == 1
    gate.set()
    adapter = await reg.ready(late)
    assert adapter.refs == 1  # only the waiting request holds it
    reg.release(late)
    assert adapter.refs == 0 and reg.leases_total() == 0


async def test_a_delete_waits_for_the_loads_admitted_requests_started(tmp_path: Path) -> None:
    """A request admitted before the delete still reads its files; the task's files go after."""
    reg = registry(tmp_path / "store")
    await reg.start()
    await upload(reg, tmp_path, "t", method="lora")
    reg.host.drop(reg.host.keys_of("t", reg.state("t").uid))
    entered, gate = threading.Event(), threading.Event()
    decode = reg.decoder.decode

    def slow(**kw):
        entered.set()
        gate.wait(10)
        # as the real decoder does, the weights file is read here, after the store found the version
        Path(kw["weights_path"]).read_bytes()
        return decode(**kw)

    reg.decoder.decode = slow  # type: ignore[method-assign]
    lease = reg.lease("t")
    await asyncio.to_thread(entered.wait, 10)
    deleting = asyncio.ensure_future(reg.delete("t"))
    await asyncio.sleep(0)  # the delete runs up to its wait for the load
    with pytest.raises(NotFound):
        reg.lease("t")  # new requests are refused at once
    await asyncio.sleep(0.05)  # time a delete that did not wait would take to remove the files
    gate.set()
    adapter = await reg.ready(lease)
    await deleting
    assert adapter.version == 1
    assert reg.store.list_names("tasks") == []
    reg.release(lease)


async def test_a_deleted_task_keeps_its_memory_until_its_last_request_ends(tmp_path: Path) -> None:
    """Both tiers keep a deleted version while a request holds it, and free it with the last release."""
    reg = registry(tmp_path / "store")
    await reg.start()
    await upload(reg, tmp_path, "t", method="lora")
    uid = reg.state("t").uid
    first, second = reg.lease("t"), reg.lease("t")
    await reg.ready(first)
    await reg.ready(second)
    assert reg.device.versions("t", uid) == [1] and reg.host.versions("t", uid) == [1]
    await reg.delete("t")
    reg.release(first)
    await _background(reg)
    assert reg.device.versions("t", uid) == [1] and reg.host.versions("t", uid) == [1]
    reg.release(second)
    await _background(reg)
    assert reg.device.versions("t", uid) == [] and reg.host.versions("t", uid) == []


async def test_a_deleted_version_goes_from_memory_when_its_requests_end(tmp_path: Path) -> None:
    """`delete_version` of a version a request holds frees it at that request's release, not before."""
    reg = registry(tmp_path / "store")
    await reg.start()
    await upload(reg, tmp_path, "t", method="lora")
    old = reg.lease("t")
    await reg.ready(old)
    await upload(reg, tmp_path, "t", method="ia3")
    uid = reg.state("t").uid
    await reg.delete_version("t", 1)
    await _background(reg)
    assert 1 in reg.host.versions("t", uid) and 1 in reg.device.versions("t", uid)
    reg.release(old)
    await _background(reg)
    assert reg.host.versions("t", uid) == [2] and reg.device.versions("t", uid) == [2]


async def test_pinning_loads_the_current_version_onto_the_device(tmp_path: Path) -> None:
    """A pin puts the current version in a slot at once and keeps it there while other tasks come."""
    reg = registry(tmp_path / "store")
    await reg.start()
    await upload(reg, tmp_path, "t", method="lora")
    state = reg.state("t")
    reg.device.evict(state.key(1))
    reg.host.drop([state.key(1)])
    assert reg.device.versions("t", state.uid) == []
    await reg.set_pinned("t", True)
    assert reg.device.versions("t", state.uid) == [1]
    assert reg.host.versions("t", state.uid) == [1]  # the pinned version stays decoded too
    for other in ("a", "b", "c", "d"):  # more tasks than the other slots hold
        await upload(reg, tmp_path, other, method="lora")
    assert reg.device.versions("t", state.uid) == [1]
    await reg.set_pinned("t", False)
    for other in ("e", "f", "g"):
        await upload(reg, tmp_path, other, method="lora")
    assert reg.device.versions("t", state.uid) == []  # unpinned, it was evicted like any other


async def _background(reg: Registry) -> None:
    """Let the registry's device evictions (run as background tasks) finish."""
    await asyncio.gather(*list(reg._background))

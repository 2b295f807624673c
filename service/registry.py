"""Task -> current artifact version -> device slot: versions, leases, hot swap, pinning, deletion.

A request takes a lease on the task's current version when it is admitted and keeps it until it
answers, so it finishes on that version whatever happens meanwhile. A new version is decoded and
loaded before it becomes current; if that fails the previous one keeps serving. A deleted task
answers 404 at once, while leases already taken finish on the decoded copy they hold.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.cache import Adapter, DeviceSlots, HostCache, Key
from service.decode import Decoder, task_kind
from service.hypernets import TASKS, named_hypernetwork
from service.metrics import Metrics
from store.artifact import HeadConfig, parse_config
from store.base import ArtifactStore, VersionInfo, validate_name
from store.errors import AdapterServeError, NotFound, SlotsExhausted, VersionConflict

__all__ = ["Lease", "Registry", "TaskState"]

log = logging.getLogger(__name__)

KIND = TASKS
_uids = itertools.count(1)


@dataclass(eq=False)
class TaskState:
    """What the registry knows of one task in this process."""

    name: str
    current: int | None
    method: str | None = None
    kind: str | None = None
    """What the current version answers: classify, regress, embed or generate (once known)."""
    head: tuple[int, HeadConfig | None] | None = None
    """A version and its head, as `Registry.head` last read them."""
    uid: int = field(default_factory=lambda: next(_uids))
    deleted: bool = False
    leases: Counter[int] = field(default_factory=Counter)
    gone: set[int] = field(default_factory=set)

    def key(self, version: int) -> Key:
        """The cache key of one version."""
        return (self.name, self.uid, version)


@dataclass(eq=False)
class Lease:
    """A request's hold on one version of a task; `adapter` is set once it is decoded."""

    state: TaskState
    version: int
    future: asyncio.Future[Adapter]
    adapter: Adapter | None = None
    released: bool = False

    @property
    def task(self) -> str:
        """The task's name."""
        return self.state.name


class Registry:
    """The versions every task serves, and the two cache tiers below them."""

    def __init__(
        self,
        *,
        store: ArtifactStore,
        decoder: Decoder,
        device: DeviceSlots,
        metrics: Metrics,
        host_cache_bytes: int,
        run_on_device: Callable[..., Awaitable[Any]],
        pinned: list[str] = (),
    ) -> None:
        self.store = store
        self.decoder = decoder
        self.device = device
        self.m = metrics
        self.host = HostCache(budget_bytes=host_cache_bytes, metrics=metrics, fresh=self._fresh)
        self._run_on_device = run_on_device
        self._tasks: dict[str, TaskState] = {}
        self._pinned: set[str] = set(pinned)
        self._background: set[asyncio.Task[None]] = set()
        # Per name, not per state: an upload racing a delete or another upload of a new name waits.
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, task: str) -> asyncio.Lock:
        return self._locks.setdefault(task, asyncio.Lock())

    # -- start ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Read every task and its current version from the store."""
        names = await asyncio.to_thread(self.store.list_names, KIND)
        for name in names:
            current = await asyncio.to_thread(self.store.current_version, KIND, name)
            self._tasks[name] = TaskState(name=name, current=current)
        self._sync_pins()
        log.info("registry: %d tasks in the store", len(names))

    async def refresh(self) -> int:
        """Follow what other servers sharing the store changed: new tasks, moved pointers, deletions.

        Requests already admitted finish on the version they hold; new ones lease the new current
        version. Returns how many tasks changed.
        """
        found = await asyncio.to_thread(self.store.current_versions, KIND)
        changed = 0
        for name in sorted(set(found) | set(self._tasks)):
            async with self._lock(name):
                state = self._tasks.get(name)
                if name not in found:
                    if state is None:
                        continue
                    try:
                        # Re-read under the lock: an upload of this name here may have just finished.
                        await asyncio.to_thread(self.store.current_version, KIND, name)
                        continue
                    except NotFound:
                        pass
                    state.deleted = True
                    self._tasks.pop(name, None)
                    self._cleanup(state)
                elif state is None:
                    self._tasks[name] = TaskState(name=name, current=found[name])
                elif state.current != found[name]:
                    log.info("task %s: version %s is current (changed in the store)", name, found[name])
                    state.current, state.method, state.kind = found[name], None, None
                else:
                    continue
                changed += 1
        if changed:
            self._sync_pins()
        return changed

    def names(self) -> list[str]:
        """Tasks that exist now, sorted."""
        return sorted(self._tasks)

    def is_registered(self, task: str) -> bool:
        """Whether a task exists (used to bound metric labels)."""
        return task in self._tasks

    def state(self, task: str) -> TaskState:
        """The state of an existing task, else NotFound."""
        validate_name(task)
        state = self._tasks.get(task)
        if state is None:
            raise NotFound(f"no task named {task!r}; upload one with POST /v1/adapters/{task}")
        return state

    # -- serving --------------------------------------------------------------------------------

    def lease(self, task: str) -> Lease:
        """Admit a request: hold the task's current version and start decoding it if needed."""
        state = self.state(task)
        if state.current is None:
            raise NotFound(f"task {task!r} has no current version; PUT /v1/adapters/{task}/current first")
        version = state.current
        state.leases[version] += 1
        future = self.host.acquire(state.key(version), lambda: self._read(state, version))
        return Lease(state=state, version=version, future=future)

    async def ready(self, lease: Lease) -> Adapter:
        """Wait until the lease's version is decoded in host memory."""
        try:
            lease.adapter = await lease.future
        except asyncio.CancelledError:
            # The result may have landed after the cancel: give its reference back.
            if lease.future.done() and not lease.future.cancelled() and lease.future.exception() is None:
                lease.adapter = lease.future.result()
            raise
        return lease.adapter

    def release(self, lease: Lease) -> None:
        """End a request's hold; the last hold on a deleted version frees its memory."""
        if lease.released:
            return
        lease.released = True
        if lease.adapter is not None:
            self.host.release(lease.adapter)
        elif not lease.future.done():
            lease.future.cancel()
        state = lease.state
        state.leases[lease.version] -= 1
        if state.leases[lease.version] <= 0:
            del state.leases[lease.version]
        self._cleanup(state)

    def _read(self, state: TaskState, version: int) -> Adapter:
        art = self.store.get(KIND, state.name, version)
        adapter = self.decoder.decode(
            task=state.name,
            uid=state.uid,
            version=version,
            config_bytes=art.config_bytes,
            weights_path=art.weights_path,
            sha256=art.info.sha256,
        )
        if version == state.current:
            state.method, state.kind = adapter.method, task_kind(adapter.head)
        return adapter

    # -- management -----------------------------------------------------------------------------

    async def upload(
        self,
        task: str,
        *,
        config_bytes: bytes,
        weights_path: Path,
        activate: bool,
        version: int | None = None,
    ) -> tuple[VersionInfo, Adapter, bool]:
        """Validate and store a new version (`version`: that number or 409); unless activate=False, make it current."""
        validate_name(task)
        async with self._lock(task):
            state = self._tasks.get(task) or TaskState(name=task, current=None)
            holder: dict[str, Adapter] = {}

            def validate(cfg: bytes, path: Path) -> None:
                holder["adapter"] = self.decoder.decode(
                    task=task, uid=state.uid, version=0, config_bytes=cfg, weights_path=path, sha256=""
                )

            # Held from before the name is resolved until the version is stored: a concurrent delete
            # of the hypernetwork either sees the stored version or this hold (service/hypernets.py).
            hypernetworks = self.decoder.hypernetworks
            named = named_hypernetwork(config_bytes) if hypernetworks is not None else None
            if named is not None:
                hypernetworks.hold(named)
            try:
                info = await asyncio.to_thread(
                    self.store.put_version,
                    KIND,
                    task,
                    config_bytes=config_bytes,
                    weights_src=weights_path,
                    version=version,
                    activate=False,
                    validate=validate,
                )
            finally:
                if named is not None:
                    hypernetworks.release(named)
            adapter = holder.get("adapter") or await asyncio.to_thread(self._read, state, info.version)
            adapter.version, adapter.sha256 = info.version, info.sha256
            self._tasks.setdefault(task, state)
            if not activate:
                return info, adapter, False
            try:
                await self._activate(state, adapter)
            except BaseException:
                await self._forget_version(state, info.version)
                raise
            return info, adapter, True

    async def set_current(self, task: str, version: int) -> VersionInfo:
        """Roll forward or back: load `version`, then make it current."""
        validate_name(task)
        async with self._lock(task):
            state = self.state(task)
            infos = {i.version: i for i in await asyncio.to_thread(self.store.list_versions, KIND, task)}
            if version not in infos:
                raise NotFound(f"task {task!r} has no version {version}; it has {sorted(infos)}")
            if version == state.current:
                return infos[version]
            adapter = await self.host.acquire(state.key(version), lambda: self._read(state, version))
            try:
                await self._activate(state, adapter, held=True)
            finally:
                self.host.release(adapter)
            return infos[version]

    async def _activate(self, state: TaskState, adapter: Adapter, *, held: bool = False) -> None:
        """Load into host memory and a device slot, then switch the store's and our pointer."""
        if not held:
            self.host.hold(adapter)
        try:
            try:
                await self._run_on_device(self.device.assign, [adapter])
            except SlotsExhausted as exc:
                # Loading on demand may still succeed once the pinned or busy slots move.
                log.warning("task %s v%d not preloaded: %s", state.name, adapter.version, exc.message)
            await asyncio.to_thread(
                self.store.set_current, KIND, state.name, adapter.version, expected=state.current
            )
        finally:
            if not held:
                self.host.release(adapter)
        old = state.current
        state.current, state.method, state.kind = adapter.version, adapter.method, task_kind(adapter.head)
        self._sync_pins()
        if old is not None:
            log.info("task %s: version %d replaces %d", state.name, adapter.version, old)

    async def _forget_version(self, state: TaskState, version: int) -> None:
        """Remove a version that could not be activated, so a failed upload leaves nothing behind."""
        try:
            await asyncio.to_thread(self.store.delete_version, KIND, state.name, version)
        except AdapterServeError as exc:
            log.warning("could not remove failed version %d of %s: %s", version, state.name, exc.message)
        self._drop_keys(state, [version])
        if state.current is None:
            try:
                await asyncio.to_thread(self.store.list_versions, KIND, state.name)
            except NotFound:
                self._tasks.pop(state.name, None)

    async def delete(self, task: str) -> None:
        """Remove a task: new requests get 404 now, admitted ones finish on what they hold."""
        validate_name(task)
        async with self._lock(task):
            state = self.state(task)
            state.deleted = True
            self._tasks.pop(task, None)
            # Loads already started belong to admitted requests: let them read the files first.
            pending = self.host.loading(task, state.uid)
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            try:
                await asyncio.to_thread(self.store.delete, KIND, task)
            except BaseException:
                state.deleted = False
                self._tasks.setdefault(task, state)
                raise
            self._sync_pins()
            self._cleanup(state)

    async def delete_version(self, task: str, version: int) -> None:
        """Remove one version that is not current; requests on it finish first."""
        validate_name(task)
        async with self._lock(task):
            state = self.state(task)
            if version == state.current:
                raise VersionConflict(
                    f"version {version} of {task!r} is current; make another version current "
                    f"(PUT /v1/adapters/{task}/current) or delete the task"
                )
            pending = self.host.loading(task, state.uid)
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            await asyncio.to_thread(self.store.delete_version, KIND, task, version)
            state.gone.add(version)
            self._cleanup(state)

    async def set_pinned(self, task: str, pinned: bool) -> None:
        """Pin (or unpin) a task's current version on the device."""
        state = self.state(task)
        if pinned:
            self._pinned.add(task)
        else:
            self._pinned.discard(task)
        self._sync_pins()
        if pinned and state.current is not None:
            adapter = await self.host.acquire(
                state.key(state.current), lambda: self._read(state, state.current)
            )
            try:
                await self._run_on_device(self.device.assign, [adapter])
            finally:
                self.host.release(adapter)

    def is_pinned(self, task: str) -> bool:
        """Whether a task is pinned."""
        return task in self._pinned

    def _sync_pins(self) -> None:
        keys = [
            s.key(s.current) for n, s in self._tasks.items() if n in self._pinned and s.current is not None
        ]
        self.device.set_pinned(keys)
        # Pinned versions stay decoded too: the host tier never evicts them to make room.
        self.host.set_pinned(keys)

    # -- cleanup --------------------------------------------------------------------------------

    def _cleanup(self, state: TaskState) -> None:
        """Free memory of deleted versions nobody holds any more."""
        if state.deleted:
            versions = [k[2] for k in self.host.keys_of(state.name, state.uid)]
            versions += self.device.versions(state.name, state.uid)
            if sum(state.leases.values()) == 0:
                self._drop_keys(state, set(versions))
            return
        done = [v for v in state.gone if state.leases[v] <= 0]
        if done:
            state.gone.difference_update(done)
            self._drop_keys(state, done)

    def _drop_keys(self, state: TaskState, versions) -> None:
        keys = [state.key(v) for v in versions]
        if not keys:
            return
        self.host.drop(keys)
        task = asyncio.get_running_loop().create_task(self._run_on_device(self.device.evict_where, keys))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _fresh(self, adapter: Adapter) -> bool:
        """Whether a decoded adapter may serve new requests (a generated one: from the live generator)."""
        if adapter.hypernetwork is None:
            return True
        hypernetworks = self.decoder.hypernetworks
        return hypernetworks is not None and hypernetworks.is_current(
            adapter.config.hypernetwork, adapter.hypernetwork
        )

    async def drop_generated(self, hypernetwork: str) -> None:
        """Forget tasks generated by a hypernetwork whose current version changed, in both tiers.

        Their next load resolves the new version; loads in flight that land stale are done again
        (HostCache), and a slot an in-flight request regenerates from the old version is replaced
        on its next use with the new one (DeviceSlots compares the generator).
        """
        self.host.drop_where(
            lambda a: (
                a.hypernetwork is not None
                and getattr(a.config, "hypernetwork", None) == hypernetwork
                and not self._fresh(a)
            )
        )
        hypernetworks = self.decoder.hypernetworks
        if hypernetworks is not None:
            await self._run_on_device(self.device.evict_generated, hypernetworks.is_live)

    # -- views ----------------------------------------------------------------------------------

    async def detail(self, task: str) -> dict:
        """Versions, current version, method and residency of a task."""
        state = self.state(task)
        infos = await asyncio.to_thread(self.store.list_versions, KIND, task)
        await self.describe(task)
        return {
            "task": task,
            "current_version": state.current,
            "method": state.method,
            "versions": [
                {
                    "version": i.version,
                    "sha256": i.sha256,
                    "size_bytes": i.size_bytes,
                    "created_at": i.created_at,
                }
                for i in infos
            ],
            "residency": {
                "device": self.device.versions(task, state.uid),
                "host": self.host.versions(task, state.uid),
                "pinned": task in self._pinned,
            },
            "in_flight": sum(state.leases.values()),
        }

    async def describe(self, task: str) -> tuple[str | None, str | None]:
        """The current version's method and kind (read from its stored config the first time)."""
        state = self.state(task)
        if state.current is not None and (state.method is None or state.kind is None):
            version = state.current
            found = await asyncio.to_thread(self._describe, task, version)
            if state.current == version:
                state.method, state.kind = found
        return state.method, state.kind

    def _describe(self, task: str, version: int) -> tuple[str | None, str | None]:
        try:
            raw = self.store.get(KIND, task, version).config_bytes
        except AdapterServeError:
            return None, None
        return self.decoder.method_of(raw), self.decoder.kind_of(raw)

    async def head(self, task: str) -> tuple[int, HeadConfig | None]:
        """The current version and its head (None: a generative task), read from its stored config once."""
        state = self.state(task)
        version = state.current
        if version is None:
            raise NotFound(f"task {task!r} has no current version; PUT /v1/adapters/{task}/current first")
        # A stored version never changes, so its head is read once; a new current version reads again.
        cached = state.head
        if cached is None or cached[0] != version:
            raw = await asyncio.to_thread(self.store.get_config, KIND, task, version)
            cached = state.head = (version, parse_config(raw).head)
        return cached

    def summary(self) -> list[dict]:
        """Every task with its current version and (when known) method."""
        return [
            {"task": n, "current_version": s.current, "method": s.method}
            for n, s in sorted(self._tasks.items())
        ]

    def leases_total(self) -> int:
        """Requests holding a version now."""
        return sum(sum(s.leases.values()) for s in self._tasks.values())

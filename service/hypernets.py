"""Shared hypernetworks: validated, versioned uploads, and their decoded generators on the device.

A hypernetwork is stored like any artifact (kind `hypernetworks`). Tasks of method `hyperformer`
name one; when such a task's adapter is decoded, it resolves the hypernetwork's current version
here, and on a device-slot miss the slot is generated from it instead of read. Each version is
decoded once (float32 on the model's device) and kept; a new current version replaces it, and the
listeners drop the generated adapters built from the old one. `is_current` tells a decoded task
whether the generator it holds is still the live one, so a task decoded across a swap is decoded
again instead of cached.

A hypernetwork can be deleted only while no stored version of any task names it: a task rolled
back to such a version would have nothing to generate from. Task uploads that name it `hold` it
from before their config is resolved until their version is stored, so a delete either sees the
stored version, sees the hold (and refuses), or makes the upload fail to resolve the name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch

from adapters.heads import HeadBank
from adapters.hypernet import Hypernetwork
from store.artifact import HypernetworkConfig, expected_tensors, parse_config
from store.base import ArtifactStore, VersionInfo, is_valid_name, validate_name
from store.errors import ArtifactCorrupt, InUse, InvalidArtifact, NotFound, PayloadTooLarge, VersionConflict
from store.safetensors_io import SafetensorsLimits, check_expected, load_arrays, read_header

__all__ = ["KIND", "TASKS", "Hypernetworks", "named_hypernetwork"]

log = logging.getLogger(__name__)

KIND = "hypernetworks"
TASKS = "tasks"
"""The store kind of the tasks whose configs may name a hypernetwork."""


def named_hypernetwork(config_bytes: bytes) -> str | None:
    """The hypernetwork a task config names, if it is a well-formed `hyperformer` config (else None)."""
    try:
        raw = json.loads(config_bytes)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict) or raw.get("method") != "hyperformer":
        return None
    name = raw.get("hypernetwork")
    return name if is_valid_name(name) else None


class Hypernetworks:
    """The hypernetworks a server knows: upload, list, and resolve by name to a decoded generator."""

    def __init__(self, *, store: ArtifactStore, model, limits: SafetensorsLimits) -> None:
        self.store = store
        self.model = model
        self.spec = model.spec
        self.limits = limits
        self._decoded: dict[str, tuple[int, Hypernetwork]] = {}
        # Bumped (under the guard) whenever an upload makes a version current: a decode that started
        # before a swap must not install the generator it read over the new one.
        self._swaps = 0
        self._guard = threading.Lock()
        self._locks: dict[str, asyncio.Lock] = {}
        # Task uploads in flight that name a hypernetwork, and the names being deleted (both under the guard).
        self._holds: Counter[str] = Counter()
        self._deleting: set[str] = set()
        self.listeners: list[Callable[[str], Awaitable[None]]] = []
        """Awaited with a hypernetwork's name after its current version changed."""

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, config_bytes: bytes, weights_path: Path) -> tuple[HypernetworkConfig, Hypernetwork]:
        """Validate a hypernetwork artifact fully (schema, fingerprint, tensors, bank fit) and build it."""
        config = parse_config(config_bytes)
        if not isinstance(config, HypernetworkConfig):
            raise InvalidArtifact(
                f"adapter_config.json: method: a hypernetwork upload needs method 'hypernetwork', "
                f"not {config.method!r} (tasks are uploaded with POST /v1/adapters/{{task}})"
            )
        expected = expected_tensors(config, self.spec)
        check_expected(read_header(weights_path, limits=self.limits), expected)
        arrays = load_arrays(weights_path, limits=self.limits, names=list(expected))
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
        # float32 whatever the backbone's dtype: generated weights are cast once, when written.
        net = Hypernetwork.from_tensors(config, tensors, self.spec).to(self.model.backbone.device)
        self._dry_run(net)
        return config, net

    def _dry_run(self, net: Hypernetwork) -> None:
        """Check that the adapters this hypernetwork generates fit the server's banks."""
        z = torch.zeros(1, net.config.task_embedding_dim, device=self.model.backbone.device)
        with torch.no_grad():
            entries = net.entries(z)[0]
        for entry in entries:
            bank = self.model.banks.get((entry.key, entry.kind))
            if bank is None or isinstance(bank, HeadBank):
                raise InvalidArtifact(
                    f"this server has no {entry.kind} bank at {entry.key}; check its bank settings"
                )
            try:
                parts, _ = bank.layout(**entry.kwargs)
            except ValueError as exc:
                raise PayloadTooLarge(
                    f"the generated adapters exceed this server's slot size: {exc} "
                    "(ADAPTERSERVE_BOTTLENECK_MAX_DIM)"
                ) from None
            for name, value in parts.items():
                if not bank.fits(name, value):
                    raise PayloadTooLarge(
                        f"the generated adapters do not fit this server's {entry.kind} bank at {entry.key}: "
                        f"{tuple(value.shape)} vs rows of {tuple(getattr(bank, name).shape[1:])}"
                    )

    def resolve(self, name: str) -> tuple[int, Hypernetwork]:
        """The current version of a hypernetwork and its decoded generator (any thread)."""
        validate_name(name)
        while True:
            with self._guard:
                swaps = self._swaps
            try:
                version = self.store.current_version(KIND, name)
            except NotFound:
                version = None
            if version is None:
                raise InvalidArtifact(
                    f"hypernetwork {name!r} does not exist; "
                    f"upload it first with POST /v1/hypernetworks/{name}"
                )
            with self._guard:
                held = self._decoded.get(name)
                if held is not None and held[0] == version:
                    return held
            art = self.store.get(KIND, name, version)
            _, net = self.decode(art.config_bytes, art.weights_path)
            with self._guard:
                if self._swaps != swaps:
                    # A version went live while this one was read: it may be older; look again.
                    continue
                held = self._decoded.get(name)
                # Another thread may have decoded the same version meanwhile: keep one object per version.
                if held is not None and held[0] == version:
                    return held
                self._decoded[name] = (version, net)
                return version, net

    def is_current(self, name: str, net: object) -> bool:
        """Whether `net` is the generator of the hypernetwork's live version (any thread)."""
        with self._guard:
            held = self._decoded.get(name)
        return held is not None and held[1] is net

    def is_live(self, net: object) -> bool:
        """Whether `net` is the live generator of any hypernetwork (any thread)."""
        with self._guard:
            return any(held[1] is net for held in self._decoded.values())

    # -- management -----------------------------------------------------------------------------

    async def upload(
        self,
        name: str,
        *,
        config_bytes: bytes,
        weights_path: Path,
        activate: bool,
        version: int | None = None,
    ) -> tuple[VersionInfo, HypernetworkConfig, int, bool]:
        """Store a validated version (`version`: that number or 409): (info, config, parameters, current)."""
        validate_name(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            held: dict[str, tuple[HypernetworkConfig, Hypernetwork]] = {}

            def validate(cfg: bytes, path: Path) -> None:
                held["net"] = self.decode(cfg, path)

            info = await asyncio.to_thread(
                self.store.put_version,
                KIND,
                name,
                config_bytes=config_bytes,
                weights_src=weights_path,
                version=version,
                activate=activate,
                validate=validate,
            )
            config, net = held["net"]
            params = sum(p.numel() for p in net.parameters())
            if activate:
                with self._guard:
                    self._decoded[name] = (info.version, net)
                    self._swaps += 1
                for listener in self.listeners:
                    try:
                        await listener(name)
                    except Exception:
                        # The version is stored and live; stale copies are still caught on their next use.
                        log.exception("hypernetwork %s: dropping the old version's adapters failed", name)
            current = await asyncio.to_thread(self.store.current_version, KIND, name)
            return info, config, params, current == info.version

    # -- references and deletion ----------------------------------------------------------------

    def hold(self, name: str) -> None:
        """Keep `name` from being deleted until `release` (any thread); refused while a delete runs."""
        with self._guard:
            if name in self._deleting:
                raise InUse(f"hypernetwork {name!r} is being deleted; upload the task again once it is gone")
            self._holds[name] += 1

    def release(self, name: str) -> None:
        """End a `hold` (any thread)."""
        with self._guard:
            self._holds[name] -= 1
            if self._holds[name] <= 0:
                del self._holds[name]

    def users(self, name: str) -> list[str]:
        """`task vN` for every stored task version whose config names this hypernetwork (reads the store)."""
        out = []
        for task in self.store.list_names(TASKS):
            try:
                versions = self.store.list_versions(TASKS, task)
            except NotFound:
                continue  # deleted while we looked
            for info in versions:
                try:
                    config_bytes = self.store.get_config(TASKS, task, info.version)
                except NotFound:
                    continue
                except ArtifactCorrupt:
                    # it may name this one and be restored from a backup: refuse rather than guess
                    out.append(f"{task} v{info.version} (unreadable)")
                    continue
                if named_hypernetwork(config_bytes) == name:
                    out.append(f"{task} v{info.version}")
        return out

    async def delete(self, name: str) -> None:
        """Remove a hypernetwork and all its versions; 409 while any stored task version names it."""
        validate_name(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            await asyncio.to_thread(self.store.list_versions, KIND, name)  # 404 before any 409
            with self._guard:
                if self._holds[name] > 0:
                    raise InUse(f"a task naming hypernetwork {name!r} is being uploaded; try again")
                self._deleting.add(name)
            try:
                users = await asyncio.to_thread(self.users, name)
                if users:
                    shown = ", ".join(users[:10]) + (
                        f" and {len(users) - 10} more" if len(users) > 10 else ""
                    )
                    raise InUse(
                        f"hypernetwork {name!r} is named by stored task versions ({shown}); "
                        "delete those versions or tasks first"
                    )
                await asyncio.to_thread(self.store.delete, KIND, name)
                with self._guard:
                    self._decoded.pop(name, None)
                    # a decode that read the store before the delete must not install its copy
                    self._swaps += 1
            finally:
                with self._guard:
                    self._deleting.discard(name)
        log.info("hypernetwork %s deleted", name)

    async def delete_version(self, name: str, version: int) -> None:
        """Remove one version that is not current (tasks always generate from the current one)."""
        validate_name(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            current = await asyncio.to_thread(self.store.current_version, KIND, name)
            if version == current:
                raise VersionConflict(
                    f"version {version} of hypernetwork {name!r} is current; upload or activate another "
                    "version first, or delete the hypernetwork"
                )
            await asyncio.to_thread(self.store.delete_version, KIND, name, version)

    def summary(self) -> list[dict]:
        """Every hypernetwork with its current version and shape (reads the store)."""
        out = []
        for name in self.store.list_names(KIND):
            version = self.store.current_version(KIND, name)
            entry: dict = {"name": name, "current_version": version, "versions": []}
            entry["versions"] = [i.version for i in self.store.list_versions(KIND, name)]
            if version is not None:
                config = parse_config(self.store.get(KIND, name, version).config_bytes)
                entry |= {
                    "variant": config.variant,
                    "sites": list(config.sites),
                    "bottleneck_dim": config.bottleneck_dim,
                    "task_embedding_dim": config.task_embedding_dim,
                }
            out.append(entry)
        return out

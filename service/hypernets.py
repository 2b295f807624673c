"""Shared hypernetworks: validated, versioned uploads, and their decoded generators on the device.

A hypernetwork is stored like any artifact (kind `hypernetworks`). Tasks of method `hyperformer`
name one; when such a task's adapter is decoded, it resolves the hypernetwork's current version
here, and on a device-slot miss the slot is generated from it instead of read. Each version is
decoded once (float32 on the model's device) and kept; a new current version replaces it, and the
listeners drop the generated adapters built from the old one. `is_current` tells a decoded task
whether the generator it holds is still the live one, so a task decoded across a swap is decoded
again instead of cached.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch

from adapters.heads import HeadBank
from adapters.hypernet import Hypernetwork
from store.artifact import HypernetworkConfig, expected_tensors, parse_config
from store.base import ArtifactStore, VersionInfo, validate_name
from store.errors import InvalidArtifact, NotFound, PayloadTooLarge
from store.safetensors_io import SafetensorsLimits, check_expected, load_arrays, read_header

__all__ = ["KIND", "Hypernetworks"]

log = logging.getLogger(__name__)

KIND = "hypernetworks"


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
                room = getattr(bank, name).shape[1:]
                if value.dim() != len(room) or any(a > b for a, b in zip(value.shape, room, strict=True)):
                    raise PayloadTooLarge(
                        f"the generated adapters do not fit this server's {entry.kind} bank at {entry.key}: "
                        f"{tuple(value.shape)} vs {tuple(room)} (ADAPTERSERVE_BOTTLENECK_MAX_DIM)"
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

"""Turn a stored or uploaded artifact into a decoded Adapter, validating it fully on the way.

Torch-free validation first (config schema, backbone fingerprint, safetensors header, tensor names
and shapes, dtype allow-list, finite values), then a dry run against this server's slot banks, so a
version that passes here loads. Weights are read with numpy from safetensors only, never unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adapters.heads import HeadBank
from service.cache import Adapter
from store.artifact import expected_tensors, parse_config
from store.errors import InvalidArtifact, NotImplementedYet, PayloadTooLarge
from store.safetensors_io import SafetensorsLimits, check_expected, load_arrays, read_header

__all__ = ["Decoder", "task_kind"]


class Decoder:
    """Validates and decodes artifacts for one model (its spec, banks, device and dtype)."""

    def __init__(
        self,
        *,
        model,
        limits: SafetensorsLimits,
        pin_memory: bool = False,
        hypernetworks=None,
        device_bytes: int | None = None,
        host_bytes: int | None = None,
    ) -> None:
        self.model = model
        self.device_bytes = device_bytes
        """The device tier's byte budget: an adapter whose slot would not fit even alone is refused (413)."""
        self.host_bytes = host_bytes
        """The host tier's byte budget: an adapter whose decoded tensors would not fit alone is refused (413)."""
        self.hypernetworks = hypernetworks
        self.spec = model.spec
        self.limits = limits
        self.pin_memory = pin_memory
        self.has_head = ("head", "head") in model.banks
        self.generative = model.backbone.generative

    def decode(
        self, *, task: str, uid: int, version: int, config_bytes: bytes, weights_path: Path, sha256: str
    ) -> Adapter:
        """Validate an artifact and return its tensors in the model's dtype (pinned on GPU hosts)."""
        config = parse_config(config_bytes)
        net = None
        if config.method == "hypernetwork":
            raise InvalidArtifact(
                "adapter_config.json: method: a hypernetwork is uploaded with POST /v1/hypernetworks/{name}"
            )
        if config.method == "hyperformer":
            if self.hypernetworks is None:
                raise NotImplementedYet("hypernetwork-generated adapters are not served by this server")
            _, net = self.hypernetworks.resolve(config.hypernetwork)
        self._check_task_shape(config)
        expected = expected_tensors(config, self.spec)
        check_expected(read_header(weights_path, limits=self.limits), expected)
        arrays = load_arrays(weights_path, limits=self.limits, names=list(expected))
        dtype = self.model.backbone.dtype
        tensors = {}
        for name, arr in arrays.items():
            t = torch.from_numpy(arr).to(dtype)
            tensors[name] = t.pin_memory() if self.pin_memory else t
        entries = self._dry_run(config, tensors, hypernetwork=net)
        host = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.host_bytes is not None and host > self.host_bytes:
            raise PayloadTooLarge(
                f"the decoded adapter takes {host} bytes of host memory; the host cache holds "
                f"{self.host_bytes} (ADAPTERSERVE_HOST_CACHE_BYTES)"
            )
        # What its slot takes on the device (the bank rows sized to it; a generated task's
        # generated weights), which is what the device budget counts.
        nbytes = self.model.footprint(entries)
        if self.device_bytes is not None and nbytes > self.device_bytes:
            raise PayloadTooLarge(
                f"the adapter takes {nbytes} bytes in device slots; the device cache holds "
                f"{self.device_bytes} (ADAPTERSERVE_CACHE_BYTES)"
            )
        return Adapter(
            task=task,
            uid=uid,
            version=version,
            config=config,
            tensors=tensors,
            nbytes=nbytes,
            host_nbytes=host,
            num_parameters=sum(t.numel() for t in tensors.values()),
            sha256=sha256,
            hypernetwork=net,
        )

    @staticmethod
    def method_of(config_bytes: bytes) -> str | None:
        """The `method` of a stored config, without validating the rest."""
        try:
            method = json.loads(config_bytes).get("method")
        except (ValueError, AttributeError):
            return None
        return method if isinstance(method, str) else None

    @staticmethod
    def kind_of(config_bytes: bytes) -> str | None:
        """The kind of a stored config's task (see `task_kind`), without validating the rest."""
        try:
            head = json.loads(config_bytes).get("head")
        except (ValueError, AttributeError):
            return None
        if head is not None and not isinstance(head, dict):
            return None
        return _KINDS.get(None if head is None else head.get("type"))

    def _check_task_shape(self, config) -> None:
        head = config.head
        if head is None and not self.generative:
            raise InvalidArtifact(
                "adapter_config.json: head: an encoder backbone needs a task head (classification, "
                "multi_label, regression or embedding)"
            )
        if head is not None and not self.has_head:
            raise InvalidArtifact("adapter_config.json: head: this backbone has no encoder to put a head on")
        limit = self.model.config.head_max_outputs
        if head is not None and limit is not None and head.num_outputs > limit:
            raise InvalidArtifact(
                f"the head has {head.num_outputs} outputs; this server allows at most "
                f"{limit} (ADAPTERSERVE_HEAD_MAX_OUTPUTS)"
            )

    def _dry_run(self, config, tensors: dict[str, torch.Tensor], *, hypernetwork=None) -> list:
        """Check that every bank write of this adapter fits this server's banks, writing nothing."""
        try:
            entries = self.model.entries(config, tensors, hypernetwork=hypernetwork)
        except KeyError:
            raise InvalidArtifact(f"method {config.method!r} is not supported by this server yet") from None
        except ValueError as exc:
            raise InvalidArtifact(f"the adapter does not fit this server: {exc}") from None
        for entry in entries:
            bank = self.model.banks.get((entry.key, entry.kind))
            if bank is None:
                raise InvalidArtifact(
                    f"this server has no {entry.kind} bank at {entry.key}; check its bank settings"
                )
            if isinstance(bank, HeadBank):
                if entry.kwargs.get("dense") is not None and not bank.two_layer_ok:
                    raise InvalidArtifact("two-layer heads are disabled on this server")
                continue
            try:
                parts, _ = bank.layout(**entry.kwargs)
            except ValueError as exc:
                raise PayloadTooLarge(f"the adapter exceeds this server's slot size: {exc}") from None
            for name, value in parts.items():
                if not bank.fits(name, value):
                    raise InvalidArtifact(
                        f"the adapter does not fit this server's {entry.kind} bank at {entry.key}: "
                        f"{tuple(value.shape)} vs rows of {tuple(getattr(bank, name).shape[1:])}"
                    )
        return entries


_KINDS = {
    None: "generate",
    "classification": "classify",
    "multi_label": "classify",
    "regression": "regress",
    "embedding": "embed",
}


def task_kind(head) -> str:
    """What a task with this head answers: classify, regress, embed, or generate (no head)."""
    return _KINDS[None if head is None else head.type]

"""Shared pieces of the importers: reading foreign weights, site lookup, writing native artifacts."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from adapters.arch import ArchMap, get_arch
from store.artifact import expected_tensors, parse_config
from store.errors import InvalidArtifact
from store.spec import BackboneSpec

__all__ = [
    "PROJECTIONS",
    "SiteMap",
    "UnsupportedCheckpoint",
    "activation_name",
    "read_json",
    "read_weights",
    "write_artifact",
]

PROJECTIONS = ("q", "k", "v", "qkv", "o", "ffn_in", "ffn_gate", "ffn_out", *(f"cross_{p}" for p in "qkvo"))
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"

# Foreign activation names (transformers' ACT2FN keys) -> the native ones they compute.
_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",
    "swish": "swish",
    "silu": "silu",
    "tanh": "tanh",
    "linear": "identity",
    "identity": "identity",
}


class UnsupportedCheckpoint(InvalidArtifact):
    """A foreign checkpoint uses a feature the native format cannot express exactly."""


def activation_name(name: str | None) -> str:
    """The native activation for a foreign activation name; refuses ones the banks do not compute."""
    key = (name or "linear").lower()
    if key not in _ACTIVATIONS:
        raise UnsupportedCheckpoint(
            f"activation {name!r} is not supported; use one of {sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[key]


def read_json(path: Path) -> dict:
    """A JSON object from a checkpoint directory, with a clear error when it is missing or broken."""
    if not path.is_file():
        raise InvalidArtifact(f"{path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArtifact(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArtifact(f"{path} must hold a JSON object")
    return data


def read_weights(
    directory: Path, *, safetensors_name: str, pickle_name: str, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: the safetensors file, or its pickle `.bin` only when allowed."""
    from safetensors.torch import load_file

    safe = directory / safetensors_name
    if safe.is_file():
        return load_file(str(safe))
    pickled = directory / pickle_name
    if pickled.is_file():
        if not allow_pickle:
            raise InvalidArtifact(
                f"{pickled.name} is a pickle; convert it once with `adapterserve import ... --allow-pickle` "
                "(only for files you trust), which writes safetensors"
            )
        warnings.warn(
            f"reading pickle {pickled}: only do this for files you trust (weights_only loading)",
            stacklevel=2,
        )
        try:
            data = torch.load(pickled, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            # weights_only refuses any object but tensors and plain containers: never run its code
            raise InvalidArtifact(
                f"{pickled.name} cannot be loaded weights-only (it holds more than tensors): "
                f"{str(exc).splitlines()[0][:200]}"
            ) from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise InvalidArtifact(f"{pickled.name} does not hold a flat dict of tensors")
        return data
    raise InvalidArtifact(f"{directory} has neither {safetensors_name} nor {pickle_name}")


class SiteMap:
    """Finds the native site ('stack', layer, site) of a foreign module path, for one backbone."""

    def __init__(self, spec: BackboneSpec) -> None:
        self.spec = spec
        self.arch: ArchMap = get_arch(spec.model_type)
        self._paths: dict[str, tuple[str, int, str]] = {}
        for stack, n in spec.stacks.items():
            base = self.arch.stacks[stack]
            for i in range(n):
                for site, rel in self.arch.layer[stack].items():
                    self._paths[f"{base}.{i}.{rel}"] = (stack, i, site)
        self._layer = {
            stack: re.compile(rf"(?:^|\.){re.escape(self.arch.stacks[stack])}\.(\d+)\.(.+)$")
            for stack in spec.stacks
        }

    def site(self, module: str) -> tuple[str, int, str] | None:
        """The site of a module path, matched on its tail (model-class prefixes like 'bert.' vary)."""
        parts = module.split(".")
        for k in range(len(parts)):
            hit = self._paths.get(".".join(parts[k:]))
            if hit is not None:
                return hit
        return None

    def layer(self, module: str) -> tuple[str, int, str] | None:
        """(stack, layer, path inside the layer) of any module path under a layer of the backbone."""
        for stack, pattern in self._layer.items():
            m = pattern.search(module)
            if m is not None and int(m.group(1)) < self.spec.stacks[stack]:
                return stack, int(m.group(1)), m.group(2)
        return None

    def path(self, stack: str, site: str) -> str | None:
        """The module path of a site inside a layer of `stack`, if the family has that site."""
        return self.arch.layer[stack].get(site)

    def layers(self) -> Iterable[tuple[str, int]]:
        """Every (stack, layer) of the backbone."""
        for stack, n in self.spec.stacks.items():
            for i in range(n):
                yield stack, i


def write_artifact(
    out: str | Path,
    config: dict,
    tensors: dict[str, torch.Tensor],
    *,
    spec: BackboneSpec,
    overwrite: bool = False,
):
    """Validate a native config and tensors against the backbone and write them as an artifact directory."""
    from safetensors.torch import save_file

    cfg = parse_config({**config, "backbone_fingerprint": spec.fingerprint})
    shapes = expected_tensors(cfg, spec)
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise InvalidArtifact(f"internal conversion error: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise InvalidArtifact(f"tensor {name!r} has shape {tuple(tensors[name].shape)}; expected {shape}")
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if bad:
        raise InvalidArtifact(f"tensor {bad[0]!r} holds non-finite values")
    target = Path(out)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty (pass overwrite to replace)")
    target.mkdir(parents=True, exist_ok=True)
    text = json.dumps(cfg.model_dump(mode="json", exclude_defaults=False), indent=2, sort_keys=True) + "\n"
    save_file(weights, str(target / WEIGHTS_NAME))
    (target / CONFIG_NAME).write_text(text, encoding="utf-8")
    return cfg

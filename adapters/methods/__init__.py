"""Adapter methods, one file each, all behind `Method`; `METHODS` maps config names to them."""

from __future__ import annotations

from adapters.methods.base import Entry, Method, common_entries
from adapters.methods.bottleneck import Bottleneck
from adapters.methods.ia3 import IA3
from adapters.methods.layernorm import LayerNormOnly
from adapters.methods.lora import LoRA
from adapters.methods.parallel import Parallel

__all__ = ["METHODS", "Entry", "Method", "common_entries", "get_method"]

METHODS: dict[str, Method] = {m.name: m for m in (Bottleneck(), Parallel(), LoRA(), IA3(), LayerNormOnly())}


def get_method(name: str) -> Method:
    """The method registered under `name`."""
    if name not in METHODS:
        raise KeyError(f"no adapter method named {name!r}")
    return METHODS[name]

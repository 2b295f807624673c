"""Adapter methods, one file each, all behind `Method`; `METHODS` maps config names to them."""

from __future__ import annotations

from adapters.methods.base import Entry, Method, common_entries
from adapters.methods.bottleneck import Bottleneck
from adapters.methods.compacter import Compacter
from adapters.methods.ia3 import IA3
from adapters.methods.layernorm import LayerNormOnly
from adapters.methods.lora import LoRA
from adapters.methods.mam import MAM
from adapters.methods.mh_parallel import MHParallel
from adapters.methods.parallel import Parallel
from adapters.methods.prefix import Prefix
from adapters.methods.tiny_attention import TinyAttention

__all__ = ["METHODS", "Entry", "Method", "common_entries", "get_method"]

_ALL = (Bottleneck(), Parallel(), LoRA(), IA3(), LayerNormOnly(), Prefix(), MAM(), MHParallel(), Compacter())
METHODS: dict[str, Method] = {m.name: m for m in (*_ALL, TinyAttention())}


def get_method(name: str) -> Method:
    """The method registered under `name`."""
    if name not in METHODS:
        raise KeyError(f"no adapter method named {name!r}")
    return METHODS[name]

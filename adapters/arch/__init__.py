"""Where each adapter site lives, per architecture family: one small table per family."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ArchMap", "get_arch"]


@dataclass(frozen=True)
class ArchMap:
    """Module paths of every site, relative to the backbone's base model and to each layer."""

    family: str
    model_types: tuple[str, ...]
    stacks: dict[str, str]
    layer: dict[str, dict[str, str]]
    attention: dict[str, str]
    pooler: str | None = None
    # which projection stashes the sublayer input that parallel adapters read
    inputs: dict[str, str] = field(default_factory=lambda: {"attn": "q", "ffn": "ffn_in", "cross": "cross_q"})
    outputs: dict[str, str] = field(
        default_factory=lambda: {"attn": "o", "ffn": "ffn_out", "cross": "cross_o"}
    )


def get_arch(model_type: str) -> ArchMap:
    """The site map for a Hugging Face `model_type`; raises KeyError for unsupported ones."""
    from adapters.arch import bart, bert, distilbert, gpt2, llama, t5

    for mod in (bert, distilbert, t5, bart, gpt2, llama):
        if model_type in mod.ARCH.model_types:
            return mod.ARCH
    raise KeyError(f"unsupported architecture {model_type!r}")

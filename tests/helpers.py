"""Tiny deterministic backbones, adapter tensors and one-at-a-time expected outputs shared by the tests.

Every builder seeds torch before creating the model, so two calls give bit-identical weights:
one copy can be wrapped in a MultiTaskModel while the other stays a plain Hugging Face model
to compare against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from adapters.backbone import Backbone
from adapters.heads import decode_row
from adapters.methods import get_method
from adapters.model import BankConfig, MultiTaskModel
from store.artifact import expected_tensors, parse_config
from store.safetensors_io import SafetensorsLimits, load_arrays
from store.spec import BackboneSpec

__all__ = [
    "ENCODER_FAMILIES",
    "FAMILIES",
    "GENERATIVE_FAMILIES",
    "LLAMA_FAMILIES",
    "REQUIRED_METRICS",
    "VOCAB",
    "Batch",
    "base_norm_tensors",
    "build_hf",
    "classify_each",
    "config_for",
    "head_logits",
    "identity_tensors",
    "load_artifact_dir",
    "make_batch",
    "max_diff",
    "model_outputs",
    "random_tensors",
    "reference_outputs",
    "tiny_bart",
    "tiny_bert",
    "tiny_distilbert",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_t5",
    "wrap",
]

VOCAB = 100
HIDDEN = 32
HEADS = 4
LAYERS = 2
FFN = 64
MAX_POSITIONS = 64


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build()
    return model.eval()


def tiny_bert(seed: int = 0) -> BertModel:
    """BERT with a pooler: hidden 32, 2 layers, 4 heads, FFN 64, vocabulary 100."""
    cfg = BertConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS,
        attn_implementation="sdpa",
    )
    return _seeded(lambda: BertModel(cfg, add_pooling_layer=True), seed)


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    """T5 encoder-decoder: d_model 32, d_kv 8, 4 heads, 2+2 layers, d_ff 64."""
    cfg = T5Config(
        d_model=HIDDEN,
        d_kv=HIDDEN // HEADS,
        num_heads=HEADS,
        num_layers=LAYERS,
        num_decoder_layers=LAYERS,
        d_ff=FFN,
        vocab_size=VOCAB,
        decoder_start_token_id=0,
        attn_implementation="sdpa",
    )
    return _seeded(lambda: T5ForConditionalGeneration(cfg), seed)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 decoder-only with an LM head: n_embd 32, 2 layers, 4 heads."""
    cfg = GPT2Config(
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        vocab_size=VOCAB,
        n_positions=MAX_POSITIONS,
        attn_implementation="sdpa",
    )
    return _seeded(lambda: GPT2LMHeadModel(cfg), seed)


def tiny_distilbert(seed: int = 0) -> DistilBertModel:
    """DistilBERT: dim 32, 2 layers, 4 heads, hidden_dim 64."""
    cfg = DistilBertConfig(
        dim=HIDDEN,
        n_layers=LAYERS,
        n_heads=HEADS,
        hidden_dim=FFN,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS,
        attn_implementation="sdpa",
    )
    return _seeded(lambda: DistilBertModel(cfg), seed)


def tiny_bart(seed: int = 0) -> BartForConditionalGeneration:
    """BART encoder-decoder: d_model 32, 2+2 layers, 4 heads, FFN 64."""
    cfg = BartConfig(
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS,
        attn_implementation="sdpa",
    )
    return _seeded(lambda: BartForConditionalGeneration(cfg), seed)


KV_HEADS = 2
"""Key/value heads of the tiny Llama-family models: grouped-query attention, two queries per key."""

_LLAMA_LIKE = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_llama(seed: int = 0, *, model_type: str = "llama") -> nn.Module:
    """A Llama-family causal LM (llama, mistral or qwen2): hidden 32, 2 layers, 4 query and 2 key/value heads.

    Qwen2 has biases on q, k and v; Mistral a sliding window (longer than any test input). Weights are
    drawn wider than the library's default init (std 0.02) so that rows and adapters give logits far
    enough apart for greedy decoding to be a real test.
    """
    config_cls, model_cls = _LLAMA_LIKE[model_type]
    cfg = config_cls(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=FFN,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.2,
        attn_implementation="sdpa",
    )
    return _seeded(lambda: model_cls(cfg), seed)


FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "bert": tiny_bert,
    "distilbert": tiny_distilbert,
    "t5": tiny_t5,
    "bart": tiny_bart,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "mistral": lambda seed=0: tiny_llama(seed, model_type="mistral"),
    "qwen2": lambda seed=0: tiny_llama(seed, model_type="qwen2"),
}
ENCODER_FAMILIES = ("bert", "distilbert", "t5", "bart")
"""Families with an encoder, hence task heads (`classify`)."""
LLAMA_FAMILIES = tuple(_LLAMA_LIKE)
"""Llama, Mistral and Qwen2: one architecture family (`llama`), three model types."""
GENERATIVE_FAMILIES = ("t5", "bart", "gpt2", "llama")
"""Families with LM logits (`logits`), as `arch.family` names them."""


def build_hf(family: str, seed: int = 0) -> nn.Module:
    """A fresh tiny Hugging Face model of one family (same seed, same weights)."""
    return FAMILIES[family](seed)


def wrap(family: str, *, seed: int = 0, banks: BankConfig | None = None) -> MultiTaskModel:
    """A MultiTaskModel over a fresh tiny backbone of one family."""
    return MultiTaskModel(Backbone.from_model(build_hf(family, seed)), banks=banks or BankConfig(slots=8))


def config_for(raw: dict, spec: BackboneSpec):
    """Parse a method config dict (without fingerprint) for this backbone."""
    return parse_config({**raw, "backbone_fingerprint": spec.fingerprint})


# -- tensors -----------------------------------------------------------------------------------


def _is_norm(name: str) -> bool:
    return any(f".{site}." in name for site in ("attn_ln", "ffn_ln", "cross_ln"))


def random_tensors(cfg, spec: BackboneSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for every expected name, large enough to move outputs well past 1e-3.

    Multiplicative parameters (IA3 vectors, norm weights, learned scales) are drawn around 1 so
    the adapter perturbs the backbone rather than zeroing it.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_tensors(cfg, spec).items():
        noise = torch.randn(shape, generator=g)
        if name.endswith((".ia3", ".scale", ".ln.weight")) or (_is_norm(name) and name.endswith(".weight")):
            out[name] = 1.0 + 0.5 * noise
        elif name.endswith((".prefix.key", ".prefix.value")):
            out[name] = noise
        else:
            out[name] = 0.3 * noise
    return out


def base_norm_tensors(backbone: Backbone, names: list[str]) -> dict[str, torch.Tensor]:
    """The backbone's own norm parameters under their artifact names ('encoder.0.attn_ln.weight')."""
    arch, core = backbone.arch, backbone.core
    out = {}
    for name in names:
        stack, layer, site, param = name.split(".")
        module = core.get_submodule(f"{arch.stacks[stack]}.{layer}.{arch.layer[stack][site]}")
        module = getattr(module, "base", module)  # a BankedNorm wraps the original norm
        out[name] = getattr(module, param).detach().clone()
    return out


def identity_tensors(cfg, backbone: Backbone, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors whose adapter is a no-op: the method's identity, the base norms, a random head."""
    shapes = expected_tensors(cfg, backbone.spec)
    head = {k: s for k, s in shapes.items() if k.startswith("head.")}
    adapter = {k: s for k, s in shapes.items() if k not in head}
    out = get_method(cfg.method).identity(adapter)
    out |= base_norm_tensors(backbone, [k for k in adapter if _is_norm(k)])
    g = torch.Generator().manual_seed(seed)
    out |= {k: 0.3 * torch.randn(s, generator=g) for k, s in head.items()}
    return out


# -- batches and outputs -----------------------------------------------------------------------


@dataclass
class Batch:
    """Right-padded token ids with their mask and, for seq2seq models, decoder inputs."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]
    decoder_input_ids: torch.Tensor | None = None

    def row(self, i: int) -> Batch:
        """Row `i` alone, without its padding."""
        n = self.lengths[i]
        dec = None if self.decoder_input_ids is None else self.decoder_input_ids[i : i + 1]
        return Batch(self.input_ids[i : i + 1, :n], self.attention_mask[i : i + 1, :n], [n], dec)


def make_batch(lengths: list[int], *, family: str, seed: int = 0, decoder_length: int = 4) -> Batch:
    """Random token ids of the given lengths, right-padded with id 0 and masked."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask
    dec = None
    if family in ("t5", "bart"):
        dec = torch.randint(1, VOCAB, (len(lengths), decoder_length), generator=g)
    return Batch(ids, mask, list(lengths), dec)


def model_outputs(model: MultiTaskModel, batch: Batch, slots: list[int]) -> dict[str, torch.Tensor]:
    """Everything a family exposes: encoder (or decoder) hidden states, head logits, LM logits."""
    family = model.backbone.arch.family
    out = {"hidden": model.hidden(batch.input_ids, batch.attention_mask, slots)}
    if family in ENCODER_FAMILIES:
        out["head"] = model.classify(batch.input_ids, batch.attention_mask, slots).logits
    if family in GENERATIVE_FAMILIES:
        kwargs = {} if batch.decoder_input_ids is None else {"decoder_input_ids": batch.decoder_input_ids}
        out["lm"] = model.logits(batch.input_ids, batch.attention_mask, slots, **kwargs)
    return out


@torch.no_grad()
def reference_outputs(hf: nn.Module, family: str, batch: Batch) -> dict[str, torch.Tensor]:
    """The plain Hugging Face model's hidden states (+ pooler output) and LM logits."""
    ids, mask = batch.input_ids, batch.attention_mask
    out = {}
    if family in ("bert", "distilbert"):
        res = hf(input_ids=ids, attention_mask=mask)
        out["hidden"] = res.last_hidden_state
        if getattr(res, "pooler_output", None) is not None:
            out["pooler"] = res.pooler_output
    elif family == "gpt2" or family in LLAMA_FAMILIES:
        out["hidden"] = hf.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        out["lm"] = hf(input_ids=ids, attention_mask=mask).logits
    else:
        out["hidden"] = hf.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        out["lm"] = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=batch.decoder_input_ids).logits
    return out


def head_logits(head_cfg, tensors: dict[str, torch.Tensor], ref: dict, mask: torch.Tensor, width: int):
    """A head's logits computed by hand from reference hidden states, padded to the bank width."""
    hidden = ref["hidden"]
    if head_cfg.pooling == "cls":
        x = hidden[:, 0]
    elif head_cfg.pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        x = (hidden * m).sum(1) / m.sum(1)
    else:
        x = ref["pooler"]
    if head_cfg.layers == 2:
        x = torch.tanh(x @ tensors["head.dense.weight"].T + tensors["head.dense.bias"])
    y = x @ tensors["head.out.weight"].T + tensors["head.out.bias"]
    return torch.nn.functional.pad(y, (0, width - y.shape[1]))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute elementwise difference."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


# -- artifact directories ----------------------------------------------------------------------


def load_artifact_dir(model: MultiTaskModel, directory: Path, *, slot: int = 1):
    """Load the artifact in `directory` (adapter_config.json + adapter.safetensors) into `slot`; its config."""
    config = parse_config((directory / "adapter_config.json").read_bytes())
    arrays = load_arrays(directory / "adapter.safetensors", limits=SafetensorsLimits())
    model.load(slot, config, {k: torch.from_numpy(v) for k, v in arrays.items()})
    return config


def classify_each(
    model: MultiTaskModel,
    directory: Path,
    inputs: list,
    *,
    all_scores: bool = False,
    max_len: int | None = None,
) -> list[dict]:
    """Decoded outputs of `inputs` (texts or pairs) one at a time, unbatched, with the artifact in `directory`."""
    config = load_artifact_dir(model, directory)
    tok = model.backbone.tokenizer
    limit = {} if max_len is None else {"truncation": True, "max_length": max_len}
    out = []
    for x in inputs:
        enc = tok(*([x] if isinstance(x, str) else x), return_tensors="pt", **limit)
        extra = {"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {}
        head = model.classify(enc["input_ids"], enc["attention_mask"], [1], **extra)
        out.append(
            decode_row(
                head.logits[0], kind=config.head.type, labels=list(config.head.labels), all_scores=all_scores
            )
        )
    return out


# The metric families DESIGN.md requires on /metrics, with their Prometheus types (names without `_total`).
REQUIRED_METRICS = {
    "adapterserve_requests": "counter",
    "adapterserve_request_duration_seconds": "histogram",
    "adapterserve_queue_wait_seconds": "histogram",
    "adapterserve_forward_duration_seconds": "histogram",
    "adapterserve_batch_size": "histogram",
    "adapterserve_batch_tasks": "histogram",
    "adapterserve_queue_depth": "gauge",
    "adapterserve_rejected": "counter",
    "adapterserve_adapter_loads": "counter",
    "adapterserve_adapter_load_duration_seconds": "histogram",
    "adapterserve_adapter_cache_hits": "counter",
    "adapterserve_adapter_cache_misses": "counter",
    "adapterserve_adapter_evictions": "counter",
    "adapterserve_adapters_resident": "gauge",
    "adapterserve_adapter_cache_bytes": "gauge",
    "adapterserve_tokens": "counter",
    "adapterserve_uploads": "counter",
}

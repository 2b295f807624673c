"""Import PEFT checkpoints (`adapter_config.json` + `adapter_model.safetensors`) as native artifacts.

Supported: LoRA (alpha/r, rsLoRA, rank_pattern, alpha_pattern, fan_in_fan_out), IA3 (output and
feedforward input scaling), prefix tuning (the saved, already projected prefixes), and the
`modules_to_save` classifier of `*ForSequenceClassification` models (BERT: pooler + linear;
RoBERTa/XLM-R: dense + tanh + linear on the first token). Anything that would change the backbone
itself (trained biases, DoRA, PiSSA-style initialisations, other saved modules) is refused.

A target list that reaches BERT's pooler (`target_modules=["dense", ...]` matches `bert.pooler.dense`,
as PEFT applies it) adapts a layer that only the classifier reads: its LoRA (or IA3) is merged into
the pooler's own weights, and the head becomes dense + tanh + linear over the first token, which is
exactly the pooler followed by the classifier. That needs the backbone's pooler (`base`).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch

from adapters.arch import get_arch
from adapters.formats.common import (
    PROJECTIONS,
    SiteMap,
    UnsupportedCheckpoint,
    read_json,
    read_weights,
    write_artifact,
)
from store.spec import BackboneSpec

__all__ = ["import_peft"]

# Families whose sequence classifier is pooler + linear (BERT) or dense + tanh + linear on token 0.
_POOLER_HEADS = ("bert",)
_DENSE_TANH_HEADS = ("roberta", "xlm-roberta", "camembert")
_BASE_INITS = ("pissa", "olora", "corda", "loftq")


def import_peft(
    src: str | Path,
    out: str | Path,
    *,
    spec: BackboneSpec,
    labels: list[str] | None = None,
    base: torch.nn.Module | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
):
    """Convert a PEFT adapter directory into a native artifact at `out`; returns the native config.

    `base` is the backbone's base model (its pooler is read when the checkpoint adapts the pooler).
    """
    src = Path(src)
    meta = read_json(src / "adapter_config.json")
    weights = read_weights(
        src,
        safetensors_name="adapter_model.safetensors",
        pickle_name="adapter_model.bin",
        allow_pickle=allow_pickle,
    )
    sites = SiteMap(spec)
    peft_type = str(meta.get("peft_type", "")).upper()
    weights = {_strip(k): v for k, v in weights.items()}
    head_tensors = {k: v for k, v in weights.items() if not _adapter_key(k, peft_type)}
    adapter = {k: v for k, v in weights.items() if _adapter_key(k, peft_type)}
    pooler = {k: v for k, v in adapter.items() if _on_pooler(k, spec)}
    adapter = {k: v for k, v in adapter.items() if k not in pooler}
    if pooler and not head_tensors:
        raise UnsupportedCheckpoint(
            "the checkpoint adapts the pooler but saves no classifier that reads it (modules_to_save)"
        )
    if peft_type == "LORA":
        config, tensors = _lora(meta, adapter, sites)
    elif peft_type == "IA3":
        config, tensors = _ia3(meta, adapter, sites)
    elif peft_type == "PREFIX_TUNING":
        config, tensors = _prefix(meta, adapter, spec)
    else:
        raise UnsupportedCheckpoint(
            f"PEFT type {meta.get('peft_type')!r} is not supported (LORA, IA3, PREFIX_TUNING)"
        )
    if head_tensors:
        head, head_weights = _head(head_tensors, spec, labels=labels)
        if pooler:
            head, head_weights = _merge_pooler(meta, pooler, head, head_weights, base=base, spec=spec)
        config["head"] = head
        tensors |= head_weights

    config["metadata"] = {
        "source": "peft",
        "peft_type": peft_type,
        "peft_version": str(meta.get("peft_version") or ""),
        "base_model": str(meta.get("base_model_name_or_path") or ""),
    }
    return write_artifact(out, config, tensors, spec=spec, overwrite=overwrite)


def _strip(key: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _adapter_key(key: str, peft_type: str) -> bool:
    if peft_type == "PREFIX_TUNING":
        return key == "prompt_embeddings"
    return ".lora_" in key or key.endswith(".ia3_l") or ".lora_magnitude_vector" in key


def _pattern_key(patterns: dict, module: str) -> str | None:
    """PEFT's own rule: the first pattern that matches the module name's tail."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _site_of(sites: SiteMap, module: str) -> tuple[str, int, str]:
    hit = sites.site(module)
    if hit is None or hit[2] not in PROJECTIONS:
        raise UnsupportedCheckpoint(f"module {module!r} is not a projection this backbone serves adapters on")
    return hit


def _lora(meta: dict, adapter: dict[str, torch.Tensor], sites: SiteMap):
    for flag in ("use_dora", "lora_bias", "use_qalora", "use_bdlora"):
        if meta.get(flag):
            raise UnsupportedCheckpoint(f"LoRA with {flag}=true is not supported")
    if meta.get("bias", "none") != "none":
        raise UnsupportedCheckpoint(
            "LoRA that also trained backbone biases (bias != 'none') is not supported"
        )
    if meta.get("layer_replication"):
        raise UnsupportedCheckpoint("LoRA with layer_replication is not supported")
    init = meta.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_INITS):
        raise UnsupportedCheckpoint(f"init_lora_weights={init!r} changes the base weights; not supported")
    r, alpha = int(meta["r"]), float(meta.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = meta.get("rank_pattern") or {}, meta.get("alpha_pattern") or {}
    found: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}
    for key, value in adapter.items():
        m = re.fullmatch(r"(.+)\.lora_(A|B)(?:\.default)?\.weight", key)
        if m is None:
            raise UnsupportedCheckpoint(f"unexpected LoRA tensor {key!r} (embedding or conv LoRA?)")
        module, part = m.groups()
        site = _site_of(sites, module)
        found.setdefault(site, {"module": module})[part] = value
    if not found:
        raise UnsupportedCheckpoint("the checkpoint holds no LoRA weights")
    targets = [t for t in PROJECTIONS if any(s[2] == t for s in found)]
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for stack, i in sites.layers():
        for t in targets:
            if sites.path(stack, t) is None:
                continue
            key = f"{stack}.{i}.{t}"
            entry = found.get((stack, i, t))
            if entry is None:  # not adapted in this layer: an exact zero update of rank 1
                d_in, d_out = _dims(sites.spec, t)
                tensors[f"{key}.lora.A"] = torch.zeros(1, d_in)
                tensors[f"{key}.lora.B"] = torch.zeros(d_out, 1)
                ranks[key] = 1
                continue
            a, b = entry["A"], entry["B"]
            tensors[f"{key}.lora.A"], tensors[f"{key}.lora.B"] = a, b
            if a.shape[0] != r:
                ranks[key] = int(a.shape[0])
            pk = _pattern_key(alpha_pattern, entry["module"])
            site_alpha = float(alpha_pattern[pk]) if pk is not None else alpha
            if site_alpha != alpha:
                alphas[key] = site_alpha
            rk = _pattern_key(rank_pattern, entry["module"])
            if rk is not None and int(rank_pattern[rk]) != a.shape[0]:
                raise UnsupportedCheckpoint(
                    f"{entry['module']}: rank_pattern says {rank_pattern[rk]}, weights {a.shape[0]}"
                )
    config = {
        "method": "lora",
        "r": r,
        "alpha": alpha,
        "use_rslora": bool(meta.get("use_rslora", False)),
        "targets": targets,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
    }
    return config, tensors


def _dims(spec: BackboneSpec, target: str) -> tuple[int, int]:
    if target == "qkv":
        return spec.hidden_size, 3 * spec.inner_dim
    return spec.site_dims(target)


def _ia3(meta: dict, adapter: dict[str, torch.Tensor], sites: SiteMap):
    found: dict[tuple[str, int, str], tuple[torch.Tensor, bool]] = {}
    for key, value in adapter.items():
        m = re.fullmatch(r"(.+)\.ia3_l(?:\.default)?", key)
        if m is None:
            raise UnsupportedCheckpoint(f"unexpected IA3 tensor {key!r}")
        stack, i, t = _site_of(sites, m.group(1))
        d_in, d_out = _dims(sites.spec, t)
        # PEFT keeps feedforward vectors as [1, in] (input scaling), the others as [out, 1]
        if tuple(value.shape) == (1, d_in):
            on_input = True
        elif tuple(value.shape) == (d_out, 1):
            on_input = False
        else:
            raise UnsupportedCheckpoint(f"IA3 vector {key!r} has shape {tuple(value.shape)}")
        found[(stack, i, t)] = (value.reshape(-1), on_input)
    if not found:
        raise UnsupportedCheckpoint("the checkpoint holds no IA3 vectors")
    targets = [t for t in PROJECTIONS if any(s[2] == t for s in found)]
    feedforward = sorted({s[2] for s, (_, ff) in found.items() if ff}, key=PROJECTIONS.index)
    for (_, _, t), (_, ff) in found.items():
        if ff != (t in feedforward):
            raise UnsupportedCheckpoint(f"IA3 scales the input of {t} in some layers only; not supported")
    tensors: dict[str, torch.Tensor] = {}
    for stack, i in sites.layers():
        for t in targets:
            if sites.path(stack, t) is None:
                continue
            d_in, d_out = _dims(sites.spec, t)
            vec, _ = found.get((stack, i, t), (torch.ones(d_in if t in feedforward else d_out), False))
            tensors[f"{stack}.{i}.{t}.ia3"] = vec
    return {"method": "ia3", "targets": targets, "feedforward": feedforward}, tensors


def _prefix(meta: dict, adapter: dict[str, torch.Tensor], spec: BackboneSpec):
    if len(spec.stacks) != 1 or int(meta.get("num_transformer_submodules") or 1) != 1:
        raise UnsupportedCheckpoint(
            "PEFT prefix tuning is supported on encoder-only and decoder-only backbones"
        )
    ((stack, layers),) = spec.stacks.items()
    emb = adapter.get("prompt_embeddings")
    if emb is None:
        raise UnsupportedCheckpoint("prefix checkpoint without prompt_embeddings")
    n = int(meta.get("num_virtual_tokens", emb.shape[0]))
    # PEFT sizes the prefix by the key/value heads (grouped-query attention: fewer than the queries')
    inner = spec.kv_dim
    if tuple(emb.shape) != (n, layers * 2 * inner):
        raise UnsupportedCheckpoint(
            f"prompt_embeddings has shape {tuple(emb.shape)}; expected {(n, layers * 2 * inner)} "
            "(a checkpoint saved in training mode with prefix_projection keeps only the MLP input)"
        )
    warnings.warn(
        "PEFT prefix tuning offsets the real tokens' positions by num_virtual_tokens (the absolute "
        "positions of BERT and GPT-2; on Llama, the rotary angle between the queries and the unrotated "
        "prefix keys); the served prefix does not, as in AdapterHub",
        stacklevel=3,
    )
    flat = emb.view(n, layers, 2, inner)
    tensors = {}
    for i in range(layers):
        tensors[f"{stack}.{i}.attn.prefix.key"] = flat[:, i, 0]
        tensors[f"{stack}.{i}.attn.prefix.value"] = flat[:, i, 1]
    return {"method": "prefix", "prefix_length": n}, tensors


def _on_pooler(key: str, spec: BackboneSpec) -> bool:
    """Whether an adapter tensor belongs to the backbone's pooler dense (BERT's `bert.pooler.dense`)."""
    pooler = get_arch(spec.model_type).pooler
    return pooler is not None and re.search(rf"(?:^|\.){pooler}\.dense\.(lora_|ia3_l)", key) is not None


def _merge_pooler(
    meta: dict,
    adapter: dict[str, torch.Tensor],
    head: dict,
    weights: dict[str, torch.Tensor],
    *,
    base: torch.nn.Module | None,
    spec: BackboneSpec,
):
    """Fold the pooler's adapter into its weights: the head becomes the adapted pooler + the classifier."""
    if head.get("pooling") != "pooler":
        raise UnsupportedCheckpoint("the pooler is adapted, but the saved classifier does not read it")
    dense = getattr(getattr(base, get_arch(spec.model_type).pooler, None), "dense", None)
    if dense is None:
        raise UnsupportedCheckpoint(
            "the checkpoint adapts the pooler: pass the backbone's base model (base=...) to merge it"
        )
    w, b = dense.weight.detach().float().cpu(), dense.bias.detach().float().cpu()
    parts = {
        re.sub(r".*\.dense\.", "", k).removesuffix(".weight").removesuffix(".default"): v
        for k, v in adapter.items()
    }
    peft_type = str(meta.get("peft_type", "")).upper()
    if peft_type == "LORA":
        a, bb = parts["lora_A"].float(), parts["lora_B"].float()
        module = next(iter(adapter)).split(".lora_")[0]
        pk = _pattern_key(meta.get("alpha_pattern") or {}, module)
        alpha = (
            float((meta.get("alpha_pattern") or {})[pk])
            if pk is not None
            else float(meta.get("lora_alpha", 8))
        )
        r = a.shape[0]
        scaling = alpha / math.sqrt(r) if meta.get("use_rslora") else alpha / r
        w = w + scaling * (bb @ a)
    else:  # IA3: output scaling rescales weight and bias, input scaling the weight's columns
        vec = parts["ia3_l"].float()
        if tuple(vec.shape) == (1, w.shape[1]):
            w = w * vec
        else:
            w, b = w * vec, b * vec.reshape(-1)
    head = {**head, "pooling": "cls", "layers": 2}
    return head, weights | {"head.dense.weight": w, "head.dense.bias": b}


def _head(tensors: dict[str, torch.Tensor], spec: BackboneSpec, *, labels: list[str] | None):
    """The sequence classifier saved through modules_to_save, as a native head."""
    names = set(tensors)
    mt = spec.model_type
    if names == {"classifier.weight", "classifier.bias"} and mt in _POOLER_HEADS:
        out_w, out_b = tensors["classifier.weight"], tensors["classifier.bias"]
        head = {"pooling": "pooler", "layers": 1}
        weights = {}
    elif names == {f"classifier.{p}.{w}" for p in ("dense", "out_proj") for w in ("weight", "bias")} and (
        mt in _DENSE_TANH_HEADS
    ):
        out_w, out_b = tensors["classifier.out_proj.weight"], tensors["classifier.out_proj.bias"]
        head = {"pooling": "cls", "layers": 2}
        weights = {
            "head.dense.weight": tensors["classifier.dense.weight"],
            "head.dense.bias": tensors["classifier.dense.bias"],
        }
    else:
        raise UnsupportedCheckpoint(
            f"saved modules {sorted(names)[:4]} are not a supported {mt} sequence classifier "
            "(BERT: classifier; RoBERTa/XLM-R: classifier.dense + classifier.out_proj)"
        )
    c = out_w.shape[0]
    if c == 1:
        head |= {"type": "regression", "labels": []}
    else:
        names_ = labels or [f"LABEL_{k}" for k in range(c)]
        if len(names_) != c:
            raise UnsupportedCheckpoint(f"{len(names_)} labels given for a classifier with {c} outputs")
        head |= {"type": "classification", "labels": list(names_)}
    return head, weights | {"head.out.weight": out_w, "head.out.bias": out_b}

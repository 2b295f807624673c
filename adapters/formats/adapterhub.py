"""Import AdapterHub checkpoints (`adapter_config.json` + `adapter.safetensors`, optional head) natively.

Supported on BERT-family backbones: seq_bn (Pfeiffer: placed after the sublayer's LayerNorm, which
is applied again), double_seq_bn (Houlsby), par_bn and scaled_par_bn (learned scale), Compacter and
Compacter++ (PHM layers; per-layer rules are materialized into dense bottlenecks), prefix tuning
(flat, or the MLP form run once at import), LoRA (alpha ignored by `adapters` < 1.1.0, as that
library's own loader honours), (IA)^3, MAM, and classification / multi-label / regression heads.
Layers left out (`leave_out`) get exact no-op weights; per-layer bottleneck widths are zero-padded.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from adapters.formats.common import (
    PROJECTIONS,
    SiteMap,
    UnsupportedCheckpoint,
    activation_name,
    read_json,
    read_weights,
    write_artifact,
)
from adapters.methods.compacter import kron_sum
from store.errors import BackboneMismatch
from store.spec import BackboneSpec

__all__ = ["import_adapterhub"]

_SITES = ("attn", "ffn")


def import_adapterhub(
    src: str | Path,
    out: str | Path,
    *,
    spec: BackboneSpec,
    allow_pickle: bool = False,
    with_head: bool = True,
    overwrite: bool = False,
):
    """Convert an AdapterHub adapter directory (and its head, if saved) into a native artifact at `out`."""
    src = Path(src)
    meta = read_json(src / "adapter_config.json")
    if spec.family != "bert":
        raise UnsupportedCheckpoint(
            f"AdapterHub import supports BERT-family backbones; this one is {spec.family}"
        )
    mt = meta.get("model_type")
    if mt is not None and mt != spec.model_type:
        raise BackboneMismatch(f"the adapter was made for a {mt} model; this backbone is {spec.model_type}")
    if meta.get("hidden_size") not in (None, spec.hidden_size):
        raise BackboneMismatch(
            f"the adapter has hidden size {meta['hidden_size']}; the backbone {spec.hidden_size}"
        )
    raw = read_weights(
        src,
        safetensors_name="adapter.safetensors",
        pickle_name="pytorch_adapter.bin",
        allow_pickle=allow_pickle,
    )
    conv = _Converter(meta, raw, spec)
    config, tensors = conv.convert()
    if with_head and (src / "head_config.json").is_file():
        head_meta = read_json(src / "head_config.json")
        head_raw = read_weights(
            src,
            safetensors_name="model_head.safetensors",
            pickle_name="pytorch_model_head.bin",
            allow_pickle=allow_pickle,
        )
        head, head_tensors = _head(head_meta, head_raw, spec)
        config["head"] = head
        tensors |= head_tensors
    config["metadata"] = {
        "source": "adapterhub",
        "name": str(meta.get("name") or ""),
        "version": str(meta.get("version") or ""),
        "model_name": str(meta.get("model_name") or ""),
    }
    return write_artifact(out, config, tensors, spec=spec, overwrite=overwrite)


def _version(text: str) -> tuple[int, ...] | None:
    """The `adapters` library version a checkpoint was written with ('adapters.1.0.1'), if it says so."""
    m = re.fullmatch(r"adapters\.(\d+)\.(\d+)(?:\.(\d+))?.*", text or "")
    return tuple(int(g or 0) for g in m.groups()) if m else None


class _Converter:
    """Turns one AdapterHub adapter's config and tensors into a native config and tensors."""

    def __init__(self, meta: dict, raw: dict[str, torch.Tensor], spec: BackboneSpec) -> None:
        self.meta = meta
        self.name = str(meta.get("name", ""))
        self.raw = raw
        self.spec = spec
        self.sites = SiteMap(spec)
        cfg = meta.get("config")
        if not isinstance(cfg, dict):
            raise UnsupportedCheckpoint("adapter_config.json has no 'config' object")
        self.config = cfg

    def convert(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The native (config, tensors)."""
        cfg = self.config
        arch = cfg.get("architecture")
        if arch in (None, "bottleneck"):
            return self._bottleneck(cfg)
        if arch == "prefix_tuning":
            tensors, length = self._prefix(cfg)
            return {"method": "prefix", "prefix_length": length}, tensors
        if arch == "lora":
            return self._lora(cfg)
        if arch == "union":
            return self._union(cfg)
        raise UnsupportedCheckpoint(f"AdapterHub architecture {arch!r} is not supported")

    # -- bottleneck adapters --------------------------------------------------------------------

    def _locations(self) -> dict[str, str]:
        """Module path prefix inside a layer -> native site, for this family's adapter locations."""
        out = {}
        for site, proj in (("attn", "o"), ("ffn", "ffn_out")):
            path = self.sites.path("encoder", proj)
            if path is not None:
                out[path.rpartition(".")[0]] = site
        return out

    def _bottleneck_parts(self) -> dict[tuple[str, int, str], dict[str, torch.Tensor]]:
        """Per (stack, layer, site): the adapter's tensors by their name inside the adapter module."""
        locations = self._locations()
        found: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}
        marker = f".adapters.{self.name}."
        for key, value in self.raw.items():
            if marker not in key:
                continue
            where = self.sites.layer(key)
            if where is None:
                raise UnsupportedCheckpoint(f"adapter tensor {key!r} is outside the encoder layers")
            stack, i, rest = where
            loc, _, part = rest.partition(marker)
            if loc not in locations:
                raise UnsupportedCheckpoint(f"adapter location {loc!r} is not supported")
            found.setdefault((stack, i, locations[loc]), {})[part] = value
        return found

    def _check_bn(self, cfg: dict) -> None:
        for flag in ("ln_before", "ln_after", "use_gating"):
            if cfg.get(flag):
                raise UnsupportedCheckpoint(f"bottleneck adapters with {flag}=true are not supported")
        if not cfg.get("original_ln_after", True):
            raise UnsupportedCheckpoint("bottleneck adapters with original_ln_after=false are not supported")
        if any(".invertible_adapters." in k for k in self.raw):
            raise UnsupportedCheckpoint(
                "invertible adapters (seq_bn_inv, double_seq_bn_inv) are not supported"
            )

    def _placement(self, cfg: dict) -> str:
        if not cfg.get("original_ln_before", False):
            return "output"
        if cfg.get("residual_before_ln", True) is True:
            return "post_norm"
        raise UnsupportedCheckpoint(
            f"original_ln_before with residual_before_ln={cfg.get('residual_before_ln')!r} is not supported"
        )

    def _dense(self, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(down_w [r, in], down_b, up_w [out, r], up_b) of one adapter, PHM layers expanded."""
        if "adapter_down.0.weight" in parts:
            return (
                parts["adapter_down.0.weight"],
                parts["adapter_down.0.bias"],
                parts["adapter_up.weight"],
                parts["adapter_up.bias"],
            )
        down = kron_sum(self._rule(parts, "adapter_down.0."), self._phm_w(parts, "down")).t()
        up = kron_sum(self._rule(parts, "adapter_up."), self._phm_w(parts, "up")).t()
        return (
            down,
            self._phm_b(parts, "adapter_down.0.", down.shape[0]),
            up,
            self._phm_b(parts, "adapter_up.", up.shape[0]),
        )

    def _shared(self, what: str) -> torch.Tensor | None:
        suffix = f"shared_parameters.{self.name}.{what}"
        return next((v for k, v in self.raw.items() if k.endswith(suffix)), None)

    def _rule(self, parts: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        """A PHM layer's rule [n, n, n]: its own, or the adapter's shared one (possibly factorized)."""
        if f"{prefix}phm_rule" in parts:
            return parts[f"{prefix}phm_rule"]
        if f"{prefix}phm_rule_left" in parts:
            return torch.bmm(parts[f"{prefix}phm_rule_left"], parts[f"{prefix}phm_rule_right"])
        shared = self._shared("phm_rule")
        if shared is not None:
            return shared
        left, right = self._shared("phm_rule_left"), self._shared("phm_rule_right")
        if left is None or right is None:
            raise UnsupportedCheckpoint("PHM adapter without a phm_rule")
        return torch.bmm(left, right)

    def _phm_factors(self, parts, which: str) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """The layer's W_i: (left, right) when factorized, else the full tensor."""
        prefix = "adapter_down.0." if which == "down" else "adapter_up."
        if f"{prefix}W_left" in parts:
            return parts[f"{prefix}W_left"], parts[f"{prefix}W_right"]
        if f"{prefix}W" in parts:
            return parts[f"{prefix}W"]
        left, right = self._shared(f"W_{which}_left"), self._shared(f"W_{which}_right")
        if left is not None and right is not None:
            return left, right
        full = self._shared(f"W_{which}")
        if full is None:
            raise UnsupportedCheckpoint(f"PHM adapter without {which} weights")
        return full

    def _phm_w(self, parts, which: str) -> torch.Tensor:
        f = self._phm_factors(parts, which)
        return torch.bmm(*f) if isinstance(f, tuple) else f

    @staticmethod
    def _phm_b(parts, prefix: str, width: int) -> torch.Tensor:
        return parts.get(f"{prefix}b", torch.zeros(width))

    def _scale(self, parts: dict[str, torch.Tensor], cfg: dict) -> torch.Tensor | float:
        scaling = cfg.get("scaling", 1.0)
        if isinstance(scaling, int | float):
            return float(scaling)
        if scaling in ("learned", "channel"):
            return parts["scaling"].reshape(-1)
        raise UnsupportedCheckpoint(f"scaling {scaling!r} is not supported")

    def _layout(self, found) -> tuple[list[str], list[tuple[str, int, str]]]:
        sites = [s for s in _SITES if any(k[2] == s for k in found)]
        if not sites:
            raise UnsupportedCheckpoint(f"no adapter tensors named {self.name!r} in the checkpoint")
        return sites, [(stack, i, s) for stack, i in self.sites.layers() for s in sites]

    def _bottleneck(self, cfg: dict, *, mam: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
        self._check_bn(cfg)
        found = self._bottleneck_parts()
        sites, keys = self._layout(found)
        act = activation_name(cfg.get("non_linearity"))
        parallel = bool(cfg.get("is_parallel", False))
        placement = "output" if parallel else self._placement(cfg)
        if mam and (not parallel or sites != ["ffn"]):
            raise UnsupportedCheckpoint("a union other than prefix tuning + a parallel FFN adapter (MAM)")
        phm = bool(cfg.get("phm_layer", False)) and any(
            "adapter_up.W" in k for p in found.values() for k in p
        )
        scales = {k: self._scale(p, cfg) for k, p in found.items()}
        fixed = {s for s in scales.values() if isinstance(s, float)}
        if phm and not parallel and len(fixed) == 1 and self._shared_rule():
            return self._compacter(cfg, found, sites, keys, act, placement, fixed.pop())
        learned = parallel and not mam and cfg.get("scaling") == "learned"
        dense: dict[tuple[str, int, str], tuple[torch.Tensor, ...]] = {}
        for k, parts in found.items():
            down_w, down_b, up_w, up_b = self._dense(parts)
            s = scales[k]
            if isinstance(s, torch.Tensor) and not learned:  # fold a learned or per-channel scale into up
                up_w, up_b = up_w * s.reshape(-1, 1), up_b * s
            dense[k] = (down_w, down_b, up_w, up_b)
        r = max(v[0].shape[0] for v in dense.values())
        h = self.spec.hidden_size
        tensors: dict[str, torch.Tensor] = {}
        tag = "par" if parallel else "seq"
        for key in keys:
            down_w, down_b, up_w, up_b = dense.get(
                key, (torch.zeros(r, h), torch.zeros(r), torch.zeros(h, r), torch.zeros(h))
            )
            pad = r - down_w.shape[0]  # zero units contribute nothing: exact
            p = f"{key[0]}.{key[1]}.{key[2]}.{tag}"
            tensors[f"{p}.down.weight"] = nn.functional.pad(down_w, (0, 0, 0, pad))
            tensors[f"{p}.down.bias"] = nn.functional.pad(down_b, (0, pad))
            tensors[f"{p}.up.weight"] = nn.functional.pad(up_w, (0, pad))
            tensors[f"{p}.up.bias"] = up_b
            if learned:
                s = scales.get(key)
                tensors[f"{p}.scale"] = s.reshape(1) if isinstance(s, torch.Tensor) else torch.ones(1)
        const = next(iter(fixed)) if len(fixed) == 1 else 1.0
        base = {"bottleneck_dim": r, "activation": act}
        if mam:
            return {**base, "scaling": const}, tensors
        if parallel:
            return {
                "method": "parallel",
                "sites": sites,
                **base,
                "scaling": const,
                "learned_scaling": learned,
            }, tensors
        return {
            "method": "bottleneck",
            "sites": sites,
            **base,
            "scaling": const,
            "placement": placement,
        }, tensors

    def _shared_rule(self) -> bool:
        return self._shared("phm_rule") is not None or self._shared("phm_rule_left") is not None

    def _compacter(self, cfg, found, sites, keys, act, placement, scaling):
        """Compacter / Compacter++ / PHM with one shared rule, kept factored."""
        n = int(cfg.get("phm_dim", 4))
        sample = next(iter(found.values()))
        factors = self._phm_factors(sample, "down")
        factorized = isinstance(factors, tuple)
        rank = int(factors[0].shape[-1]) if factorized else 1
        variant = ("compacter++" if sites == ["ffn"] else "compacter") if factorized else "phm"
        native_sites = ["ffn"] if variant == "compacter++" else ["attn", "ffn"]
        h = self.spec.hidden_size
        r = n * int((factors[1] if factorized else factors).shape[-1])
        tensors: dict[str, torch.Tensor] = {"phm_rule": self._rule({}, "")}  # the shared rule
        for stack, i in self.sites.layers():
            for site in native_sites:
                parts = found.get((stack, i, site))
                p = f"{stack}.{i}.{site}.seq"
                for which, prefix, (a, b), width in (
                    ("down", "adapter_down.0.", (h // n, r // n), r),
                    ("up", "adapter_up.", (r // n, h // n), h),
                ):
                    if parts is None:  # no adapter here: zero factors, an exact no-op
                        f = (
                            (torch.zeros(n, a, rank), torch.zeros(n, rank, b))
                            if factorized
                            else torch.zeros(n, a, b)
                        )
                        bias = torch.zeros(width)
                    else:
                        f, bias = self._phm_factors(parts, which), self._phm_b(parts, prefix, width)
                    if factorized:
                        tensors[f"{p}.{which}.s"], tensors[f"{p}.{which}.t"] = f
                    else:
                        tensors[f"{p}.{which}.W"] = f
                    tensors[f"{p}.{which}.bias"] = bias
        config = {
            "method": "compacter",
            "variant": variant,
            "bottleneck_dim": r,
            "phm_dim": n,
            "phm_rank": rank,
            "activation": act,
            "scaling": scaling,
            "placement": placement,
        }
        return config, tensors

    # -- prefix tuning ----------------------------------------------------------------------------

    def _prefix(self, cfg: dict) -> tuple[dict[str, torch.Tensor], int]:
        if cfg.get("use_gating"):
            raise UnsupportedCheckpoint("prefix tuning with use_gating=true is not supported")
        if cfg.get("leave_out"):
            raise UnsupportedCheckpoint(
                "prefix tuning with leave_out is not supported (every layer needs a prefix)"
            )
        marker = f"prefix_tunings.{self.name}."
        params: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in self.raw.items():
            if marker in key:
                location, _, param = key.split(marker, 1)[1].partition(".")
                params.setdefault(location, {})[param] = value
        if set(params) != {"self_prefix"}:
            raise UnsupportedCheckpoint(
                f"prefix locations {sorted(params)} are not supported (self_prefix only)"
            )
        p = params["self_prefix"]
        ((stack, layers),) = self.spec.stacks.items()
        inner, length = self.spec.inner_dim, int(cfg.get("prefix_length", 30))
        if "control_trans" in p:  # flat: the prefixes themselves
            flat = p["control_trans"].reshape(length, layers, 2, inner)
        else:  # the training-time MLP over a position embedding, run once here
            act = activation_name(cfg.get("non_linearity", "tanh"))
            with torch.no_grad():
                z = nn.functional.linear(
                    p["wte.weight"], p["control_trans.0.weight"], p["control_trans.0.bias"]
                )
                z = _activate(z, act)
                y = nn.functional.linear(z, p["control_trans.2.weight"], p["control_trans.2.bias"])
            length = p["wte.weight"].shape[0]
            flat = y.reshape(length, layers, 2, inner)
        tensors = {}
        for i in range(layers):
            tensors[f"{stack}.{i}.attn.prefix.key"] = flat[:, i, 0]
            tensors[f"{stack}.{i}.attn.prefix.value"] = flat[:, i, 1]
        return tensors, length

    # -- LoRA and (IA)^3 --------------------------------------------------------------------------

    def _alpha(self, cfg: dict) -> float:
        """alpha as trained: `adapters` before 1.1.0 applied no scaling, which equals alpha = r."""
        version = _version(str(self.meta.get("version", "")))
        if version is not None and version < (1, 1, 0):
            return float(cfg.get("r", 8))
        return float(cfg.get("alpha", 8))

    def _lora(self, cfg: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        for flag in ("use_gating", "use_dora"):
            if cfg.get(flag):
                raise UnsupportedCheckpoint(f"LoRA with {flag}=true is not supported")
        if cfg.get("vera_d") is not None or cfg.get("vera_b") is not None:
            raise UnsupportedCheckpoint("VeRA is not supported")
        mode = cfg.get("composition_mode", "add")
        marker = f".loras.{self.name}."
        found: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}
        for key, value in self.raw.items():
            if marker not in key:
                continue
            module, _, part = key.partition(marker)
            site = self.sites.site(module)
            if site is None or site[2] not in PROJECTIONS:
                raise UnsupportedCheckpoint(f"LoRA on {module!r} is not supported")
            found.setdefault(site, {})[part] = value
        if not found:
            raise UnsupportedCheckpoint(f"no LoRA tensors named {self.name!r} in the checkpoint")
        targets = [t for t in PROJECTIONS if any(k[2] == t for k in found)]
        alpha = self._alpha(cfg)
        tensors: dict[str, torch.Tensor] = {}
        if mode == "scale":
            for stack, i in self.sites.layers():
                for t in targets:
                    parts = found.get((stack, i, t))
                    d_out = self.spec.site_dims(t)[1]
                    vec = parts["lora_B"].reshape(-1) * alpha if parts else torch.ones(d_out)
                    tensors[f"{stack}.{i}.{t}.ia3"] = vec
            return {"method": "ia3", "targets": targets, "feedforward": []}, tensors
        if mode != "add":
            raise UnsupportedCheckpoint(f"composition_mode {mode!r} is not supported")
        r = int(cfg.get("r", 8))
        ranks = {}
        for stack, i in self.sites.layers():
            for t in targets:
                key = f"{stack}.{i}.{t}"
                parts = found.get((stack, i, t))
                if parts is None:
                    d_in, d_out = self.spec.site_dims(t)
                    parts = {"lora_A": torch.zeros(1, d_in), "lora_B": torch.zeros(d_out, 1)}
                tensors[f"{key}.lora.A"], tensors[f"{key}.lora.B"] = parts["lora_A"], parts["lora_B"]
                if parts["lora_A"].shape[0] != r:
                    ranks[key] = int(parts["lora_A"].shape[0])
        return {"method": "lora", "r": r, "alpha": alpha, "targets": targets, "rank_pattern": ranks}, tensors

    # -- MAM --------------------------------------------------------------------------------------

    def _union(self, cfg: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        configs = cfg.get("configs") or []
        prefix = [c for c in configs if c.get("architecture") == "prefix_tuning"]
        bn = [c for c in configs if c.get("architecture") in (None, "bottleneck")]
        if len(configs) != 2 or len(prefix) != 1 or len(bn) != 1:
            raise UnsupportedCheckpoint("only the MAM union (prefix tuning + parallel adapter) is supported")
        prefix_tensors, length = self._prefix(prefix[0])
        base, tensors = self._bottleneck(bn[0], mam=True)
        return {"method": "mam", "prefix_length": length, **base}, tensors | prefix_tensors


def _activate(x: torch.Tensor, name: str) -> torch.Tensor:
    from adapters.banks import ACTIVATION_CODES, activate

    return activate(x, ACTIVATION_CODES[name])


def _head(
    meta: dict, raw: dict[str, torch.Tensor], spec: BackboneSpec
) -> tuple[dict, dict[str, torch.Tensor]]:
    """An AdapterHub classification head (dropout/linear[/activation] layers) as a native head."""
    cfg = meta.get("config") or {}
    kind = cfg.get("head_type")
    if kind not in ("classification", "multilabel_classification"):
        raise UnsupportedCheckpoint(f"head type {kind!r} is not supported (classification, multi-label)")
    name = str(meta.get("name", ""))
    linears: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        m = re.fullmatch(rf"heads\.{re.escape(name)}\.(\d+)\.(weight|bias)", key)
        if m is None:
            raise UnsupportedCheckpoint(f"unexpected head tensor {key!r}")
        linears.setdefault(int(m.group(1)), {})[m.group(2)] = value
    layers = [linears[k] for k in sorted(linears)]
    if len(layers) != int(cfg.get("layers", 2)) or len(layers) not in (1, 2):
        raise UnsupportedCheckpoint(f"heads with {cfg.get('layers')} layers are not supported (1 or 2)")
    if len(layers) == 2 and str(cfg.get("activation_function", "tanh")).lower() != "tanh":
        raise UnsupportedCheckpoint("two-layer heads must use tanh (AdapterHub's default)")
    out = layers[-1]
    c = out["weight"].shape[0]
    tensors = {"head.out.weight": out["weight"], "head.out.bias": out.get("bias", torch.zeros(c))}
    if len(layers) == 2:
        h = spec.hidden_size
        tensors |= {
            "head.dense.weight": layers[0]["weight"],
            "head.dense.bias": layers[0].get("bias", torch.zeros(h)),
        }
    label2id = cfg.get("label2id") or {}
    labels = [lab for lab, _ in sorted(label2id.items(), key=lambda kv: kv[1])] or [
        f"LABEL_{k}" for k in range(c)
    ]
    head = {"pooling": "pooler" if cfg.get("use_pooler") else "cls", "layers": len(layers)}
    if kind == "classification" and c == 1:
        head |= {"type": "regression", "labels": []}
    else:
        if len(labels) != c:
            raise UnsupportedCheckpoint(f"the head has {c} outputs but {len(labels)} labels")
        head |= {"type": "classification" if kind == "classification" else "multi_label", "labels": labels}
    return head, tensors

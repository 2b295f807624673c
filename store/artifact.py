"""The native artifact schema: a strict config per method and the tensors it implies.

A config never names a module, a path or a URL; unknown keys are rejected. `expected_tensors`
gives every tensor name and shape an artifact of that config must hold for a given backbone,
so the store can validate uploads without torch.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from store.errors import BackboneMismatch, InvalidArtifact
from store.spec import BackboneSpec

__all__ = [
    "ACTIVATIONS",
    "FORMAT_VERSION",
    "AdapterConfig",
    "BottleneckConfig",
    "CompacterConfig",
    "HeadConfig",
    "HyperformerConfig",
    "HypernetworkConfig",
    "IA3Config",
    "LayerNormConfig",
    "LoRAConfig",
    "MAMConfig",
    "MHParallelConfig",
    "ParallelConfig",
    "PrefixConfig",
    "TinyAttentionConfig",
    "expected_tensors",
    "parse_config",
    "post_norm_backbone",
]

FORMAT_VERSION = 1
ACTIVATIONS = ("relu", "gelu", "gelu_new", "swish", "silu", "tanh", "identity")
Activation = Literal["relu", "gelu", "gelu_new", "swish", "silu", "tanh", "identity"]
SublayerSite = Literal["attn", "ffn", "cross"]
ProjectionSite = Literal[
    "q", "k", "v", "o", "qkv", "ffn_in", "ffn_gate", "ffn_out", "cross_q", "cross_k", "cross_v", "cross_o"
]
MetaValue = str | int | float | bool | None
Placement = Literal["output", "post_norm"]
_PLACEMENT_DOC = (
    "Where a sequential adapter sits. output: on the sublayer output y, before the residual add "
    "and the norm: LN(y + a(y) + x) (Houlsby). post_norm: reads the normed output h = LN(y + x) and "
    "the norm is applied again: LN(y + a(h) + x) (AdapterHub's seq_bn; post-LN backbones only)."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeadConfig(_Strict):
    """A task head: what the pooled hidden state is mapped to (or, for `embedding`, the pooled state itself)."""

    type: Literal["classification", "multi_label", "regression", "embedding"] = Field(
        description="What the head predicts; `embedding` has no weights: the task serves its pooled, "
        "optionally L2-normalised encoder output (retrieval and similarity adapters)."
    )
    labels: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=list, max_length=1024, description="Label names in output order (classification)."
    )
    pooling: Literal["cls", "mean", "pooler"] = Field(
        default="cls",
        description="First token, masked mean, or the backbone's own pooler (BERT); embedding heads "
        "default to mean, as sentence-transformers pools MiniLM.",
    )
    layers: Literal[1, 2] = Field(default=1, description="1: linear; 2: dense + tanh + linear (AdapterHub).")
    normalize: bool = Field(default=True, description="Embedding heads: L2-normalise the pooled vector.")

    @model_validator(mode="before")
    @classmethod
    def _embedding_pooling(cls, data):
        # An embedding head pools by mean unless it says otherwise (the other heads keep `cls`).
        if isinstance(data, dict) and data.get("type") == "embedding" and "pooling" not in data:
            data = {**data, "pooling": "mean"}
        return data

    @property
    def num_outputs(self) -> int:
        """Width of the head's output layer (0: an embedding head has none)."""
        return {"regression": 1, "embedding": 0}.get(self.type, len(self.labels))

    @model_validator(mode="after")
    def _check_labels(self) -> HeadConfig:
        if self.type == "embedding":
            if self.labels:
                raise ValueError("an embedding head has no labels")
            if self.layers != 1:
                raise ValueError("an embedding head has no layers to stack")
        elif self.type != "regression" and len(self.labels) < 1:
            raise ValueError("a classification head needs at least one label")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        if not self.normalize and self.type != "embedding":
            raise ValueError("normalize applies to embedding heads only")
        return self


class _Base(_Strict):
    format_version: Literal[1] = Field(default=FORMAT_VERSION, description="Artifact format version.")
    backbone_fingerprint: str = Field(
        min_length=1, max_length=128, description="Fingerprint of the backbone the adapter was trained for."
    )
    head: HeadConfig | None = Field(default=None, description="The task head, if the task has one.")
    layernorm: bool = Field(default=False, description="Whether per-task LayerNorm overrides are included.")
    metadata: dict[Annotated[str, Field(max_length=128)], MetaValue] = Field(
        default_factory=dict, max_length=64, description="Free-form training metadata (dataset, metric, ...)."
    )


class BottleneckConfig(_Base):
    """Sequential bottleneck adapter: `h + s * up(f(down(h)))` on sublayer outputs (Houlsby, Pfeiffer)."""

    method: Literal["bottleneck"]
    sites: list[SublayerSite] = Field(default=["attn", "ffn"], min_length=1, description="Sublayers adapted.")
    bottleneck_dim: int = Field(ge=1, le=4096, description="Width of the bottleneck.")
    activation: Activation = Field(default="relu", description="Non-linearity between down and up.")
    scaling: float = Field(default=1.0, description="Fixed multiplier on the adapter's output.")
    placement: Placement = Field(default="output", description=_PLACEMENT_DOC)


class ParallelConfig(_Base):
    """Parallel adapter on a sublayer: `h + F(x) + s * up(f(down(x)))` (He et al.); s=4 is 'scaled'."""

    method: Literal["parallel"]
    sites: list[SublayerSite] = Field(default=["ffn"], min_length=1, description="Sublayers adapted.")
    bottleneck_dim: int = Field(ge=1, le=4096, description="Width of the bottleneck.")
    activation: Activation = Field(default="relu", description="Non-linearity between down and up.")
    scaling: float = Field(default=1.0, description="Fixed output scale; ignored when learned_scaling.")
    learned_scaling: bool = Field(default=False, description="A learned scalar scale per site (AdapterHub).")


class LoRAConfig(_Base):
    """LoRA on linear projections: `W x + (alpha / r) B A x` (rsLoRA: alpha / sqrt(r))."""

    method: Literal["lora"]
    r: int = Field(ge=1, le=1024, description="Default rank.")
    alpha: float = Field(default=8.0, gt=0, description="Default scaling numerator.")
    use_rslora: bool = Field(default=False, description="Scale by alpha/sqrt(r) instead of alpha/r.")
    targets: list[ProjectionSite] = Field(
        default=["q", "v"], min_length=1, description="Projections adapted."
    )
    rank_pattern: dict[str, Annotated[int, Field(ge=1, le=1024)]] = Field(
        default_factory=dict, description="Rank per site key ('{stack}.{layer}.{target}') or per target."
    )
    alpha_pattern: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Alpha per site key or per target."
    )

    def rank_at(self, key: str, target: str) -> int:
        """The rank used at one site."""
        return self.rank_pattern.get(key, self.rank_pattern.get(target, self.r))

    def alpha_at(self, key: str, target: str) -> float:
        """The alpha used at one site."""
        return self.alpha_pattern.get(key, self.alpha_pattern.get(target, self.alpha))


class IA3Config(_Base):
    """IA3: learned rescaling vectors, `l * (W x)`, or `W (l * x)` for feedforward targets."""

    method: Literal["ia3"]
    targets: list[ProjectionSite] = Field(default=["k", "v", "ffn_out"], min_length=1)
    feedforward: list[ProjectionSite] = Field(
        default=["ffn_out"], description="Targets whose input (not output) is rescaled."
    )


class LayerNormConfig(_Base):
    """Only per-task LayerNorm overrides (LN tuning)."""

    method: Literal["layernorm"]
    layernorm: bool = Field(default=True, description="Always true for this method.")


class PrefixConfig(_Base):
    """Prefix tuning: per-layer key/value prefixes, already projected, prepended in self-attention."""

    method: Literal["prefix"]
    prefix_length: int = Field(ge=1, le=512, description="Number of prefix positions.")


class MAMConfig(_Base):
    """MAM adapter: prefix tuning on attention plus a scaled parallel adapter on the FFN (He et al.)."""

    method: Literal["mam"]
    prefix_length: int = Field(default=30, ge=1, le=512)
    bottleneck_dim: int = Field(default=512, ge=1, le=4096)
    activation: Activation = Field(default="relu")
    scaling: float = Field(default=4.0)


class MHParallelConfig(_Base):
    """Multi-head parallel adapter: a bottleneck per attention head, added to the heads' outputs."""

    method: Literal["mh_parallel"]
    bottleneck_dim: int = Field(ge=1, le=1024, description="Bottleneck width per head.")
    activation: Activation = Field(default="relu")
    scaling: float = Field(default=1.0)


class CompacterConfig(_Base):
    """Compacter / Compacter++ / PHM adapter: bottleneck weights as sums of Kronecker products."""

    method: Literal["compacter"]
    variant: Literal["compacter", "compacter++", "phm"] = Field(default="compacter")
    bottleneck_dim: int = Field(ge=1, le=4096)
    phm_dim: int = Field(default=4, ge=1, le=64, description="n: number of Kronecker summands.")
    phm_rank: int = Field(default=1, ge=1, le=64, description="Rank of the low-rank B_i (compacter).")
    activation: Activation = Field(default="gelu")
    scaling: float = Field(default=1.0)
    placement: Placement = Field(default="output", description=_PLACEMENT_DOC)

    @property
    def sites(self) -> list[str]:
        """Sublayers adapted: attention and FFN, or FFN only for Compacter++."""
        return ["ffn"] if self.variant == "compacter++" else ["attn", "ffn"]


class TinyAttentionConfig(_Base):
    """Tiny-attention adapter at the attention output: `a + out(MHA_E(in(LN(a))))`."""

    method: Literal["tiny_attention"]
    attention_dim: int = Field(default=1, ge=1, le=256, description="E: width of the tiny attention.")
    num_heads: int = Field(default=1, ge=1, le=64, description="Heads, each of width E.")
    deploy: Literal["average", "multihead"] = Field(
        default="average", description="Serve the averaged single head, or the exact multi-head form."
    )
    stacks: list[Literal["encoder", "decoder"]] | None = Field(
        default=None,
        min_length=1,
        description=(
            "Stacks adapted (decoder layers attend causally, over the tokens so far). "
            "None: the encoder where the backbone has one, else the decoder."
        ),
    )

    def stacks_on(self, spec) -> list[str]:
        """The stacks this adapter adapts on a backbone, in the backbone's order."""
        if self.stacks is None:
            return ["encoder"] if spec.num_layers else ["decoder"]
        return [s for s in spec.stacks if s in self.stacks]


class HyperformerConfig(_Base):
    """A task served by a shared hypernetwork: weights hold only its task embedding (and head)."""

    method: Literal["hyperformer"]
    hypernetwork: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$", description="Name of the hypernetwork.")
    task_embedding_dim: int = Field(default=64, ge=1, le=1024)


class HypernetworkConfig(_Strict):
    """A shared hypernetwork (Hyperformer / Hyperformer++) that generates bottleneck adapters.

    Hyperformer++: one generator per stack maps `LN(MLP([z_task; e_layer; e_site]))` to the
    adapter's down/up weights and biases and its LayerNorm gamma/beta. Hyperformer: no site
    embedding, one generator per stack and site.
    """

    format_version: Literal[1] = Field(default=FORMAT_VERSION, description="Artifact format version.")
    method: Literal["hypernetwork"]
    variant: Literal["hyperformer++", "hyperformer"] = Field(default="hyperformer++")
    backbone_fingerprint: str = Field(min_length=1, max_length=128)
    sites: list[SublayerSite] = Field(default=["attn", "ffn"], min_length=1, description="Sublayers adapted.")
    bottleneck_dim: int = Field(default=24, ge=1, le=1024, description="Width of generated adapters.")
    activation: Activation = Field(default="relu")
    task_embedding_dim: int = Field(default=64, ge=1, le=1024, description="z: one task's embedding.")
    layer_embedding_dim: int = Field(default=64, ge=1, le=1024)
    site_embedding_dim: int = Field(default=64, ge=1, le=1024, description="Hyperformer++ only.")
    hidden_dim: int = Field(default=128, ge=1, le=4096, description="Width of the conditioning MLP.")
    projected_dim: int = Field(default=64, ge=1, le=1024, description="Width of the conditioning vector e.")
    metadata: dict[Annotated[str, Field(max_length=128)], MetaValue] = Field(
        default_factory=dict, max_length=64
    )


AdapterConfig = Annotated[
    BottleneckConfig
    | ParallelConfig
    | LoRAConfig
    | IA3Config
    | LayerNormConfig
    | PrefixConfig
    | MAMConfig
    | MHParallelConfig
    | CompacterConfig
    | TinyAttentionConfig
    | HyperformerConfig
    | HypernetworkConfig,
    Field(discriminator="method"),
]


class _Envelope(_Strict):
    config: AdapterConfig


def parse_config(raw: bytes | str | dict):
    """Parse and validate an `adapter_config.json`; raises InvalidArtifact with the first problem."""
    try:
        data = json.loads(raw) if isinstance(raw, bytes | str) else raw
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArtifact(
            f"adapter_config.json is not valid JSON: {exc.msg if hasattr(exc, 'msg') else exc}"
        ) from None
    if not isinstance(data, dict):
        raise InvalidArtifact("adapter_config.json must be a JSON object")
    try:
        return _Envelope(config=data).config
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"][1:]) or "config"
        raise InvalidArtifact(f"adapter_config.json: {where}: {err['msg']}") from None


def _layers(spec: BackboneSpec, *, sites: list[str]) -> list[tuple[str, int, str]]:
    """(stack, layer, site) for every sublayer site that exists in this backbone."""
    out = []
    for stack, n in spec.stacks.items():
        for i in range(n):
            for site in sites:
                if site == "cross" and not (stack == "decoder" and spec.num_layers):
                    continue
                out.append((stack, i, site))
    return out


# Families whose norms are RMSNorms: a weight and no bias.
_RMS_NORM_FAMILIES = ("t5", "llama")


def post_norm_backbone(spec: BackboneSpec) -> bool:
    """Whether each sublayer's norm follows its residual add (post-LN), so `post_norm` placement exists."""
    return spec.family in ("bert", "distilbert", "bart") and spec.model_type != "mbart"


def _projection_ok(spec: BackboneSpec, stack: str, target: str) -> bool:
    if target == "qkv":
        return spec.family == "gpt2"
    if target in ("q", "k", "v") and spec.family == "gpt2":
        return False
    if target == "ffn_gate":
        # only gated MLPs have a gate projection
        return spec.family == "llama"
    if target.startswith("cross_"):
        return stack == "decoder" and spec.num_layers > 0
    return True


def _proj_dims(spec: BackboneSpec, target: str) -> tuple[int, int]:
    if target == "qkv":
        return spec.hidden_size, 3 * spec.inner_dim
    return spec.site_dims(target)


def _bottleneck(prefix: str, d_in: int, r: int, d_out: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.down.weight": (r, d_in),
        f"{prefix}.down.bias": (r,),
        f"{prefix}.up.weight": (d_out, r),
        f"{prefix}.up.bias": (d_out,),
    }


def expected_tensors(config, spec: BackboneSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape an artifact with this config must hold for this backbone."""
    if config.backbone_fingerprint != spec.fingerprint:
        raise BackboneMismatch(
            f"adapter was trained for backbone {config.backbone_fingerprint[:16]}, "
            f"this server runs {spec.fingerprint[:16]}"
        )
    h = spec.hidden_size
    out: dict[str, tuple[int, ...]] = {}
    m = config.method
    if getattr(config, "placement", "output") == "post_norm" and not post_norm_backbone(spec):
        raise BackboneMismatch(f"placement 'post_norm' needs a post-LN backbone; {spec.model_type} is pre-LN")
    if m == "hypernetwork":
        return hypernetwork_tensors(config, spec)
    if m == "bottleneck":
        for stack, i, site in _layers(spec, sites=config.sites):
            out |= _bottleneck(f"{stack}.{i}.{site}.seq", h, config.bottleneck_dim, h)
    elif m in ("parallel", "mam"):
        sites = config.sites if m == "parallel" else ["ffn"]
        for stack, i, site in _layers(spec, sites=sites):
            out |= _bottleneck(f"{stack}.{i}.{site}.par", h, config.bottleneck_dim, h)
            if m == "parallel" and config.learned_scaling:
                out[f"{stack}.{i}.{site}.par.scale"] = (1,)
    elif m == "lora":
        for stack, n in spec.stacks.items():
            for i in range(n):
                for t in config.targets:
                    if not _projection_ok(spec, stack, t):
                        continue
                    d_in, d_out = _proj_dims(spec, t)
                    r = config.rank_at(f"{stack}.{i}.{t}", t)
                    out[f"{stack}.{i}.{t}.lora.A"] = (r, d_in)
                    out[f"{stack}.{i}.{t}.lora.B"] = (d_out, r)
    elif m == "ia3":
        for stack, n in spec.stacks.items():
            for i in range(n):
                for t in config.targets:
                    if not _projection_ok(spec, stack, t):
                        continue
                    d_in, d_out = _proj_dims(spec, t)
                    out[f"{stack}.{i}.{t}.ia3"] = (d_in if t in config.feedforward else d_out,)
    elif m == "compacter":
        n = config.phm_dim
        r = config.bottleneck_dim
        if h % n or r % n:
            raise BackboneMismatch(f"phm_dim {n} must divide hidden size {h} and bottleneck_dim {r}")
        out["phm_rule"] = (n, n, n)
        for stack, i, site in _layers(spec, sites=config.sites):
            p = f"{stack}.{i}.{site}.seq"
            for part, (a, b) in (("down", (h // n, r // n)), ("up", (r // n, h // n))):
                if config.variant == "phm":
                    out[f"{p}.{part}.W"] = (n, a, b)
                else:
                    out[f"{p}.{part}.s"] = (n, a, config.phm_rank)
                    out[f"{p}.{part}.t"] = (n, config.phm_rank, b)
            out[f"{p}.down.bias"] = (r,)
            out[f"{p}.up.bias"] = (h,)
    if m in ("prefix", "mam"):
        for stack, n in spec.stacks.items():
            for i in range(n):
                # prefixes are projected keys and values: as wide as k and v (grouped-query: fewer heads)
                out[f"{stack}.{i}.attn.prefix.key"] = (config.prefix_length, spec.kv_dim)
                out[f"{stack}.{i}.attn.prefix.value"] = (config.prefix_length, spec.kv_dim)
    if m == "mh_parallel":
        r, nh, d = config.bottleneck_dim, spec.num_heads, spec.head_dim
        for stack, i, _ in _layers(spec, sites=["attn"]):
            p = f"{stack}.{i}.attn.mhpa"
            out[f"{p}.down.weight"] = (nh * r, h)
            out[f"{p}.down.bias"] = (nh * r,)
            out[f"{p}.up.weight"] = (nh, d, r)
            out[f"{p}.up.bias"] = (spec.inner_dim,)
    if m == "tiny_attention":
        e, k = config.attention_dim, config.num_heads
        missing = [st for st in config.stacks or () if st not in spec.stacks]
        if missing:
            raise BackboneMismatch(f"tiny attention on the {missing[0]} stack: {spec.family} has none")
        stacks = config.stacks_on(spec)
        for stack, i, _ in _layers(spec, sites=["attn"]):
            if stack not in stacks:
                continue
            p = f"{stack}.{i}.attn.tiny"
            out |= {
                f"{p}.ln.weight": (h,),
                f"{p}.ln.bias": (h,),
                f"{p}.in.weight": (e, h),
                f"{p}.in.bias": (e,),
                f"{p}.qkv.weight": (k, 3 * e, e),
                f"{p}.qkv.bias": (k, 3 * e),
                f"{p}.o.weight": (k, e, e),
                f"{p}.o.bias": (k, e),
                f"{p}.out.weight": (h, e),
                f"{p}.out.bias": (h,),
            }
    if m == "hyperformer":
        out["task_embedding"] = (config.task_embedding_dim,)
    if config.layernorm:
        for stack, n in spec.stacks.items():
            for i in range(n):
                sites = ["attn_ln", "ffn_ln"] + (
                    ["cross_ln"] if stack == "decoder" and spec.num_layers else []
                )
                for site in sites:
                    out[f"{stack}.{i}.{site}.weight"] = (h,)
                    if spec.family not in _RMS_NORM_FAMILIES:
                        out[f"{stack}.{i}.{site}.bias"] = (h,)
    if config.head is not None:
        c = config.head.num_outputs
        if config.head.pooling == "pooler" and spec.family not in ("bert",):
            raise BackboneMismatch(f"pooling 'pooler' needs a backbone with a pooler; {spec.family} has none")
        if config.head.type == "embedding":
            return out
        if config.head.layers == 2:
            out["head.dense.weight"] = (h, h)
            out["head.dense.bias"] = (h,)
        out["head.out.weight"] = (c, h)
        out["head.out.bias"] = (c,)
    return out


def hypernetwork_tensors(config: HypernetworkConfig, spec: BackboneSpec) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a hypernetwork artifact."""
    h, r, e = spec.hidden_size, config.bottleneck_dim, config.projected_dim
    plus = config.variant == "hyperformer++"
    d_in = config.task_embedding_dim + config.layer_embedding_dim + (config.site_embedding_dim if plus else 0)
    gens = {"down_w": r * h, "down_b": r, "up_w": h * r, "up_b": h, "ln_gamma": h, "ln_beta": h}
    out: dict[str, tuple[int, ...]] = {}
    for stack, n in spec.stacks.items():
        sites = [s for s in config.sites if s != "cross" or (stack == "decoder" and spec.num_layers)]
        out[f"{stack}.layer_embedding"] = (n, config.layer_embedding_dim)
        if plus:
            out[f"{stack}.site_embedding"] = (len(sites), config.site_embedding_dim)
        out |= {
            f"{stack}.mlp.0.weight": (config.hidden_dim, d_in),
            f"{stack}.mlp.0.bias": (config.hidden_dim,),
            f"{stack}.mlp.2.weight": (e, config.hidden_dim),
            f"{stack}.mlp.2.bias": (e,),
            f"{stack}.ln.weight": (e,),
            f"{stack}.ln.bias": (e,),
        }
        for group in [""] if plus else [f"{s}." for s in sites]:
            for name, width in gens.items():
                out[f"{stack}.{group}gen.{name}.weight"] = (width, e)
                out[f"{stack}.{group}gen.{name}.bias"] = (width,)
    return out

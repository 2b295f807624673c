"""MultiTaskModel: a frozen backbone whose sites hold slot banks, routed per row.

    model = MultiTaskModel(backbone, banks=BankConfig(slots=16))
    model.load(1, config, tensors)          # copy an adapter (+ head) into slot 1
    out = model.classify(input_ids, attention_mask, slot_ids)   # rows may use any slots

The module tree is changed once, here, at construction; loading and evicting only copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapters.attention import PrefixBank, install_attention_hook
from adapters.attn_banks import FactoredPHMBank, MHParallelBank, TinyAttentionBank
from adapters.backbone import Backbone
from adapters.banks import BankedLinear, BankedNorm, BottleneckBank, IA3Bank, LoRABank, SublayerBanks
from adapters.heads import HeadBank, HeadOutput
from adapters.methods import common_entries, get_method
from adapters.router import Router, SharedLock
from store.artifact import expected_tensors, post_norm_backbone

__all__ = ["BankConfig", "MultiTaskModel"]

_PROJECTIONS = ("q", "k", "v", "qkv", "o", "ffn_in", "ffn_gate", "ffn_out", *(f"cross_{p}" for p in "qkvo"))


@dataclass(frozen=True)
class BankConfig:
    """Which banks the backbone gets, how many slot ids they route, and optional per-adapter limits.

    Banks hold no room for adapters that are not loaded: each slot's rows are sized to its own
    adapter (adapters/pools.py), so device memory is what is resident, and the byte budget of the
    device tier (service/cache.py) bounds it. A limit of None accepts any size; 0 disables a bank.
    """

    slots: int = 16
    """Slot ids per bank, slot 0 (the identity) included; at most slots-1 adapters are resident.

    A slot id costs a few host-side integers per bank, no device memory."""
    lora_max_rank: int | None = None
    """Largest LoRA rank accepted (None: any; 0 disables LoRA banks)."""
    lora_targets: tuple[str, ...] = _PROJECTIONS
    """Projections that get LoRA banks."""
    ia3: bool = True
    """Whether projections get IA3 banks."""
    bottleneck_max_dim: int | None = None
    """Largest bottleneck width of sequential and parallel adapters (None: any; 0 disables them)."""
    bottleneck_post_norm: bool = True
    """Whether post-LN backbones get banks for sequential adapters placed after the norm (AdapterHub)."""
    prefix_max_len: int | None = None
    """Longest prefix accepted (None: any; 0 disables prefix banks)."""
    layernorm: bool = True
    """Whether norms get per-task override banks."""
    mh_parallel_max_dim: int | None = None
    """Largest per-head bottleneck of multi-head parallel adapters (None: any; 0 disables them)."""
    tiny_max_dim: int | None = None
    """Largest width E of tiny-attention adapters (None: any; 0 disables them)."""
    tiny_max_heads: int | None = None
    """Most heads of a tiny-attention adapter served in multi-head form (None: any)."""
    compacter_factored: bool = False
    """Keep Compacter/PHM factors resident and expand them per batch (less memory, more compute)."""
    phm_dim: int = 4
    """The Kronecker dimension n the factored Compacter banks hold."""
    head_max_outputs: int | None = 32
    """Most labels a task head may have, and the width of the logits a forward returns (None: any;
    logits are then as wide as the widest head loaded). Memory is per head, one row per label."""
    head_two_layer: bool = True
    """Whether two-layer (dense + tanh + linear) heads are supported."""


def _on(limit: int | None) -> bool:
    """Whether a bank with this limit exists (0 disables it; None is no limit)."""
    return limit is None or limit > 0


class MultiTaskModel(nn.Module):
    """A frozen backbone serving many adapters at once; each row picks its slot."""

    def __init__(self, backbone: Backbone, *, banks: BankConfig | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = banks or BankConfig()
        self.spec = backbone.spec
        self.router = Router()
        # Forwards hold it shared (several threads may run parts of a batch at once), slot writes alone.
        self.lock = SharedLock()
        self.banks: dict[tuple[str, str], nn.Module] = {}
        self._bank_modules = nn.ModuleDict()
        # decoder tiny-attention banks: they decode step by step only with a decoding batch's cache
        self._decoder_tiny: list[nn.Module] = []
        self._slot_banks: dict[int, list[nn.Module]] = {}
        self._install()

    # -- construction -------------------------------------------------------------------------

    def _factory(self) -> dict:
        return {"device": self.backbone.device, "dtype": self.backbone.dtype}

    def _register(self, key: str, kind: str, bank: nn.Module) -> None:
        self.banks[(key, kind)] = bank
        self._bank_modules[f"{key}:{kind}".replace(".", "_")] = bank

    def _install(self) -> None:
        cfg, spec, arch = self.config, self.spec, self.backbone.arch
        core = self.backbone.core
        fac, rt, s = self._factory(), self.router, cfg.slots
        h = spec.hidden_size
        post_norm = bool(
            _on(cfg.bottleneck_max_dim) and cfg.bottleneck_post_norm and post_norm_backbone(spec)
        )
        install_attention_hook(self.backbone.model)
        seq2seq = bool(getattr(self.backbone.model.config, "is_encoder_decoder", False))
        for stack, path in arch.stacks.items():
            for i, layer in enumerate(core.get_submodule(path)):
                paths = arch.layer[stack]
                sublayers: dict[str, SublayerBanks] = {}
                for site in ("attn", "ffn", "cross"):
                    if arch.outputs[site] not in paths:
                        continue
                    sb = SublayerBanks(router=rt)
                    if _on(cfg.bottleneck_max_dim):
                        for kind in ("seq", "par"):
                            bank = BottleneckBank(
                                d_in=h, d_out=h, max_dim=cfg.bottleneck_max_dim, slots=s, router=rt, **fac
                            )
                            setattr(sb, kind, bank)
                            self._register(f"{stack}.{i}.{site}", kind, bank)
                    if site == "attn" and _on(cfg.mh_parallel_max_dim):
                        sb.mhpa = MHParallelBank(
                            hidden=h,
                            heads=spec.num_heads,
                            head_dim=spec.head_dim,
                            max_dim=cfg.mh_parallel_max_dim,
                            slots=s,
                            router=rt,
                            **fac,
                        )
                        self._register(f"{stack}.{i}.{site}", "mhpa", sb.mhpa)
                    if site == "attn" and _on(cfg.tiny_max_dim):
                        sb.tiny = TinyAttentionBank(
                            hidden=h,
                            max_dim=cfg.tiny_max_dim,
                            max_heads=cfg.tiny_max_heads,
                            slots=s,
                            router=rt,
                            causal=stack == "decoder",
                            masked=not (stack == "decoder" and seq2seq),
                            **fac,
                        )
                        if stack == "decoder":
                            self._decoder_tiny.append(sb.tiny)
                        self._register(f"{stack}.{i}.{site}", "tiny", sb.tiny)
                    if cfg.compacter_factored and _on(cfg.bottleneck_max_dim):
                        sb.phm = FactoredPHMBank(
                            hidden=h, n=cfg.phm_dim, max_dim=cfg.bottleneck_max_dim, slots=s, router=rt, **fac
                        )
                        self._register(f"{stack}.{i}.{site}", "phm", sb.phm)
                    sublayers[site] = sb
                for proj in _PROJECTIONS:
                    if proj not in paths:
                        continue
                    key = f"{stack}.{i}.{proj}"
                    d_in, d_out = (h, 3 * spec.inner_dim) if proj == "qkv" else spec.site_dims(proj)
                    lora = ia3 = None
                    if _on(cfg.lora_max_rank) and proj in cfg.lora_targets:
                        lora = LoRABank(
                            d_in=d_in, d_out=d_out, max_rank=cfg.lora_max_rank, slots=s, router=rt, **fac
                        )
                        self._register(key, "lora", lora)
                    if cfg.ia3:
                        ia3 = IA3Bank(d_in=d_in, d_out=d_out, slots=s, router=rt, **fac)
                        self._register(key, "ia3", ia3)
                    stash = next(
                        (sublayers[st] for st, p in arch.inputs.items() if p == proj and st in sublayers),
                        None,
                    )
                    out = next(
                        (sublayers[st] for st, p in arch.outputs.items() if p == proj and st in sublayers),
                        None,
                    )
                    wrapped = BankedLinear(
                        layer.get_submodule(paths[proj]),
                        router=rt,
                        lora=lora,
                        ia3=ia3,
                        stash=stash,
                        sublayer=out,
                    )
                    _replace(layer, paths[proj], wrapped)
                for norm in ("attn_ln", "ffn_ln", "cross_ln"):
                    site = norm.removesuffix("_ln")
                    post = None
                    if post_norm and site in sublayers and norm in paths:
                        post = BottleneckBank(
                            d_in=h, d_out=h, max_dim=cfg.bottleneck_max_dim, slots=s, router=rt, **fac
                        )
                        self._register(f"{stack}.{i}.{site}", "seq_post", post)
                    if norm in paths and (cfg.layernorm or post is not None):
                        bank = BankedNorm(layer.get_submodule(paths[norm]), slots=s, router=rt, post=post)
                        _replace(layer, paths[norm], bank)
                        if cfg.layernorm:
                            self._register(f"{stack}.{i}.{norm}", "ln", bank)
                if _on(cfg.prefix_max_len) and stack in arch.attention:
                    attn = layer.get_submodule(arch.attention[stack])
                    bank = PrefixBank(
                        max_len=cfg.prefix_max_len,
                        # prefixes join the keys and values as projected (grouped-query: fewer heads)
                        inner=spec.kv_dim,
                        num_heads=spec.num_kv_heads or spec.num_heads,
                        slots=s,
                        router=rt,
                        **fac,
                    )
                    attn.adapterserve_prefix = bank
                    self._register(f"{stack}.{i}.attn", "prefix", bank)
        if not self.backbone.generative or spec.num_layers:
            head = HeadBank(
                hidden=h,
                max_outputs=cfg.head_max_outputs,
                two_layer=cfg.head_two_layer,
                slots=s,
                router=rt,
                **fac,
            )
            self._register("head", "head", head)

    # -- slots --------------------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        """Usable slots (slot 0 is the identity)."""
        return self.config.slots - 1

    def entries(self, config, tensors: dict[str, torch.Tensor], *, hypernetwork=None) -> list:
        """Validate an adapter against this backbone and turn it into bank entries."""
        shapes = expected_tensors(config, self.spec)
        for name, shape in shapes.items():
            if name not in tensors:
                raise ValueError(f"missing tensor {name!r}")
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}; expected {shape}")
        extra = set(tensors) - set(shapes)
        if extra:
            raise ValueError(f"unexpected tensor {sorted(extra)[0]!r}")
        dev = {"device": self.backbone.device, "dtype": self.backbone.dtype}
        tensors = {k: v.to(**dev) for k, v in tensors.items()}
        if config.method == "hyperformer":
            entries = self._generated(config, [tensors], hypernetwork)[0]
        else:
            entries = get_method(config.method).entries(config, tensors, self.spec, banks=self.config)
        return entries + common_entries(config, tensors, self.spec)

    def _generated(self, config, tensors_list: list[dict[str, torch.Tensor]], hypernetwork) -> list[list]:
        if hypernetwork is None:
            raise ValueError(f"task needs hypernetwork {config.hypernetwork!r}, which was not given")
        if hypernetwork.config.task_embedding_dim != config.task_embedding_dim:
            raise ValueError("task embedding width does not match the hypernetwork")
        z = torch.stack([t["task_embedding"] for t in tensors_list]).to(self.backbone.device)
        with torch.no_grad():
            return hypernetwork.entries(z, dtype=self.backbone.dtype)

    def footprint(self, entries: list) -> int:
        """Device bytes these bank entries take once loaded (the rows sized to them, in every bank)."""
        return sum(self.banks[(e.key, e.kind)].layout_bytes(**e.kwargs) for e in self._checked(entries))

    def slot_bytes(self, slot: int) -> int:
        """Device bytes a loaded slot takes across every bank."""
        return sum(bank.slot_bytes(slot) for bank in self._slot_banks.get(slot, []))

    def allocated_bytes(self) -> int:
        """Device bytes of every bank's pools: resident rows plus free and dead ones."""
        return sum(bank.allocated_bytes() for bank in self._bank_modules.values())

    def load(
        self,
        slot: int,
        config,
        tensors: dict[str, torch.Tensor],
        *,
        hypernetwork=None,
        entries: list | None = None,
    ) -> None:
        """Copy an adapter (and its head) into a slot; the slot is left empty if anything fails.

        `entries`: what `entries(config, tensors)` returned for it earlier (prepared ahead of time).
        """
        self._check(slot)
        if entries is None:
            entries = self.entries(config, tensors, hypernetwork=hypernetwork)
        self._write(slot, self._checked(entries))

    def load_generated(self, items: list[tuple[int, object, dict[str, torch.Tensor]]], hypernetwork) -> None:
        """Generate several hypernetwork tasks in one batched forward and load each into its slot."""
        if not items:
            return
        for slot, _, _ in items:
            self._check(slot)
        config = items[0][1]
        for _, cfg, tensors in items:
            expected = expected_tensors(cfg, self.spec)
            if set(expected) != set(tensors) or any(
                tuple(tensors[k].shape) != v for k, v in expected.items()
            ):
                raise ValueError("task tensors do not match their config")
        generated = self._generated(config, [t for _, _, t in items], hypernetwork)
        for (slot, cfg, tensors), entries in zip(items, generated, strict=True):
            dev = {"device": self.backbone.device, "dtype": self.backbone.dtype}
            tensors = {k: v.to(**dev) for k, v in tensors.items()}
            self._write(slot, self._checked(entries + common_entries(cfg, tensors, self.spec)))

    def _check(self, slot: int) -> None:
        if not 0 < slot < self.config.slots:
            raise IndexError(f"slot {slot} is outside 1..{self.num_slots}")

    def _checked(self, entries: list) -> list:
        for e in entries:
            if (e.key, e.kind) not in self.banks:
                raise ValueError(f"this server has no {e.kind} bank at {e.key}; check its bank settings")
        return entries

    def _write(self, slot: int, entries: list) -> None:
        with self.lock.exclusive():
            old = self._slot_banks.pop(slot, [])
            targets = [self.banks[(e.key, e.kind)] for e in entries]
            # A bank the new adapter loads again clears the old one's leftovers itself (only what it
            # does not overwrite); the others are freed here.
            reloaded = {id(b) for b in targets}
            for bank in old:
                if id(bank) not in reloaded:
                    bank.evict(slot)
            used: list[nn.Module] = []
            self._slot_banks[slot] = used
            try:
                for e, bank in zip(entries, targets, strict=True):
                    bank.load(slot, **e.kwargs)
                    used.append(bank)
            except Exception:
                # the failing bank, and any not reached yet, may still hold the old adapter
                for bank in {id(b): b for b in (*old, *targets)}.values():
                    bank.evict(slot)
                self._slot_banks.pop(slot, None)
                raise

    def evict(self, slot: int) -> None:
        """Free a slot in every bank that holds it."""
        with self.lock.exclusive():
            for bank in self._slot_banks.pop(slot, []):
                bank.evict(slot)

    def bind(self, config, tensors: dict[str, torch.Tensor]) -> None:
        """Route slot 1 to trainable tensors (training; needs BankConfig(slots=2)); gradients flow."""
        for e in self._checked(self.entries(config, tensors)):
            self.banks[(e.key, e.kind)].bind(**e.kwargs)

    def train_forward(self, input_ids, attention_mask, **kwargs) -> HeadOutput | torch.Tensor:
        """A differentiable forward with every row on slot 1: head outputs, or LM logits."""
        head = self.banks.get(("head", "head"))
        if head is None or "decoder_input_ids" in kwargs or "labels" in kwargs:
            return self.lm_forward(input_ids, attention_mask, **kwargs)
        slots = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        with self.router.route(slots, attention_mask=attention_mask):
            hidden = self._encode(input_ids, attention_mask, **kwargs)
            return head(hidden, attention_mask, self._pooler())

    def lm_forward(self, input_ids, attention_mask, *, slot: int = 1, **kwargs) -> torch.Tensor:
        """Differentiable language-model logits with every row on one slot (1: the adapter in training)."""
        slots = torch.full((input_ids.shape[0],), slot, dtype=torch.long, device=input_ids.device)
        with self.router.route(slots, attention_mask=attention_mask):
            return self.backbone.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits

    def pooler(self) -> nn.Module | None:
        """The backbone's own pooler (BERT's dense + tanh over the first token), if it has one."""
        return self._pooler()

    def _pooler(self) -> nn.Module | None:
        name = self.backbone.arch.pooler
        return getattr(self.backbone.core, name, None) if name else None

    # -- forward ------------------------------------------------------------------------------

    def _slot_tensor(self, slot_ids, batch: int) -> torch.Tensor:
        t = torch.as_tensor(slot_ids, dtype=torch.long, device=self.backbone.device)
        if t.shape != (batch,):
            raise ValueError(f"slot_ids must have one entry per row ({batch}), got shape {tuple(t.shape)}")
        if int(t.min()) < 0 or int(t.max()) >= self.config.slots:
            raise IndexError("slot id out of range")
        return t

    @torch.inference_mode()
    def hidden(self, input_ids, attention_mask, slot_ids, **kwargs) -> torch.Tensor:
        """Last hidden states of the encoder (or of the decoder for decoder-only models)."""
        with (
            self.lock.shared(),
            self.router.route(self._slot_tensor(slot_ids, input_ids.shape[0]), attention_mask=attention_mask),
        ):
            return self._encode(input_ids, attention_mask, **kwargs)

    def _encode(self, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        core = self.backbone.core
        if self.backbone.arch.family in ("t5", "bart"):
            enc = core.get_encoder() if hasattr(core, "get_encoder") else core.encoder
            return enc(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return core(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state

    @torch.inference_mode()
    def classify(self, input_ids, attention_mask, slot_ids, **kwargs) -> HeadOutput:
        """Each row's own head output over the encoder's hidden states."""
        head = self.banks.get(("head", "head"))
        if head is None:
            raise ValueError("this backbone has no encoder to put task heads on")
        with (
            self.lock.shared(),
            self.router.route(self._slot_tensor(slot_ids, input_ids.shape[0]), attention_mask=attention_mask),
        ):
            hidden = self._encode(input_ids, attention_mask, **kwargs)
            pooler = (
                getattr(self.backbone.core, self.backbone.arch.pooler, None)
                if self.backbone.arch.pooler
                else None
            )
            return head(hidden, attention_mask, pooler)

    @torch.inference_mode()
    def logits(self, input_ids, attention_mask, slot_ids, **kwargs) -> torch.Tensor:
        """Language-model logits of a generative backbone (decoder side for seq2seq)."""
        with (
            self.lock.shared(),
            self.router.route(self._slot_tensor(slot_ids, input_ids.shape[0]), attention_mask=attention_mask),
        ):
            return self.backbone.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits

    @torch.inference_mode()
    def generate(self, input_ids, attention_mask, slot_ids, *, max_new_tokens: int = 32) -> torch.Tensor:
        """Greedy generation with each row's adapter; returns only the new tokens."""
        with (
            self.lock.shared(),
            self.router.route(self._slot_tensor(slot_ids, input_ids.shape[0]), attention_mask=attention_mask),
        ):
            out = self.backbone.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                # Hugging Face's cache has no place for tiny attention's keys: recompute every step
                use_cache=not any(bank.active() for bank in self._decoder_tiny),
            )
        if self.backbone.decoder_only:
            return out[:, input_ids.shape[1] :]
        return out


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)

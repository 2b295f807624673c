"""Mixed-task decoding: rows of different tasks in one loop, each with its own KV cache, joining and leaving.

    batch = DecodeBatch(model)
    first = batch.add([Prompt(ids=[...], sampling=Sampling())], slots=[1])   # prefill; first tokens
    nxt = batch.step(slots=[1])                  # one token for every row, in `batch.ids` order
    batch.remove([row_id])                       # a finished row leaves at once

The cache is one Hugging Face cache whose rows are left-padded to a common length: every row keeps
its own positions (GPT-2's and BART's absolute positions are passed per row, T5's relative bias does
not see the padding) and its own mask, so a row's tokens equal those of decoding it alone. A row that
joins is prefilled apart (with the other newcomers) and then padded into the running cache; a row
that leaves is cut out, and columns no row needs any more are trimmed. Slots are given per call:
the cache holds no adapter state (prefix keys and values are prepended by the attention hook at every
step), so an adapter may move to another slot between steps. Tiny attention in decoder layers keeps its
own keys and values per row (`TinyCache`), joined, cut and trimmed with the cache's rows and columns.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from adapters.attn_banks import TinyCache

__all__ = ["DecodeBatch", "Prompt", "Sampling", "pick"]


@dataclass(frozen=True, slots=True)
class Sampling:
    """How a row picks its next token: greedy at temperature 0, else sampled from the filtered softmax."""

    temperature: float = 0.0
    """0: greedy (argmax); otherwise logits are divided by it before the softmax."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p (1: all)."""
    seed: int | None = None
    """Seed of the row's own generator: the same seed gives the same tokens whatever else is in the batch."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        """Whether the row always takes the most likely token."""
        return self.temperature == 0 or self.top_k == 1


@dataclass(slots=True)
class Prompt:
    """A row to decode: its prompt's token ids and how it samples."""

    ids: list[int]
    sampling: Sampling = field(default_factory=Sampling)


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def filtered_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """One row's float32 logits `[V]` after temperature, top-k and top-p (removed tokens at -inf)."""
    x = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < x.shape[-1]:
        kth = torch.topk(x, sampling.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # A token stays while the probability of the tokens before it is still short of top_p,
        # so the most likely token always stays.
        before = probs.cumsum(-1) - probs
        drop = before >= sampling.top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


def pick(
    logits: torch.Tensor, samplings: Sequence[Sampling], generators: Sequence[torch.Generator]
) -> list[int]:
    """The next token of every row of `logits` `[B, V]`: argmax for greedy rows, a draw from its own generator else."""
    out = logits.argmax(-1).tolist()
    sampled = [j for j, s in enumerate(samplings) if not s.greedy]
    if sampled:
        rows = logits[sampled].float().cpu()
        for k, j in enumerate(sampled):
            probs = filtered_logits(rows[k], samplings[j]).softmax(-1)
            out[j] = int(torch.multinomial(probs, 1, generator=generators[j]))
    return out


def _pad_left(x: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(x, (0, 0, width - x.shape[-2], 0)) if x.shape[-2] < width else x


def _pad_right(x: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, width - x.shape[-2])) if x.shape[-2] < width else x


class _Positions:
    """Per-row absolute positions for a BART-style decoder, whose own positions come from the cache length."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.value: torch.Tensor | None = None
        module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        # The module's own per-row path broadcasts `position_ids` over a new leading axis; look the
        # rows' positions up directly instead, with the same offset.
        if self.value is None:
            return None
        return F.embedding(self.value + module.offset, module.weight)


class DecodeBatch:
    """The rows decoding together on one model, their shared cache, masks and positions."""

    def __init__(self, model) -> None:
        self.model = model
        self.hf = model.backbone.model
        self.device = model.backbone.device
        self.family = model.backbone.arch.family
        self.seq2seq = self.hf.config.is_encoder_decoder
        self.ids: list[int] = []
        """Row ids in batch order; `step` answers one token per row in this order."""
        self._next_id = itertools.count(1)
        self._samplings: list[Sampling] = []
        self._generators: list[torch.Generator] = []
        self._cache = None
        self._tiny = TinyCache()
        self._mask: torch.Tensor | None = None  # [B, T] self-attention history (1: a real token)
        self._pos: torch.Tensor | None = None  # [B] the position the row's next token takes
        self._last: torch.Tensor | None = None  # [B] the token each row feeds in next
        self._enc_mask: torch.Tensor | None = None  # [B, S] seq2seq only
        # [B, S, H] encoder states: cross-attention reads its cached keys and values, but the decoder
        # still takes the states (for the cross mask's shape)
        self._enc: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        """The last forward's next-token logits `[rows, V]` (of the rows it ran), before sampling."""
        self._positions = None
        if self.seq2seq and self.family == "bart":
            # one hook per module, kept on it: every batch over this model shares it
            embed = self.hf.get_decoder().embed_positions
            if not isinstance(getattr(embed, "adapterserve_positions", None), _Positions):
                embed.adapterserve_positions = _Positions(embed)
            self._positions = embed.adapterserve_positions

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def cache_tokens(self) -> int:
        """Columns of the self-attention cache (every row is padded to them)."""
        return 0 if self._mask is None else int(self._mask.shape[1])

    # -- forwards -------------------------------------------------------------------------------

    def _route(self, slots: Sequence[int], mask: torch.Tensor | None, tiny: TinyCache | None = None):
        t = self.model._slot_tensor(list(slots), len(slots))
        return self.model.router.route(t, attention_mask=mask, decode=tiny)

    def _forward(self, slots, *, positions: torch.Tensor, tiny: TinyCache, **kwargs):
        with self.model.lock.shared(), self._route(slots, kwargs.get("attention_mask"), tiny):
            if self._positions is not None:
                self._positions.value = positions
            try:
                return self.hf(use_cache=True, **kwargs)
            finally:
                if self._positions is not None:
                    self._positions.value = None

    @torch.inference_mode()
    def add(self, prompts: Sequence[Prompt], *, slots: Sequence[int]) -> list[tuple[int, int]]:
        """Prefill new rows (with their adapters' slots) and join them to the batch: (row id, first token) each."""
        if not prompts:
            return []
        if any(not p.ids for p in prompts):
            raise ValueError("a prompt has no tokens")
        dev = self.device
        n = len(prompts)
        lengths = [len(p.ids) for p in prompts]
        width = max(lengths)
        ids = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        for j, p in enumerate(prompts):
            # decoder-only prompts are left-padded so every row's last token is the last column
            span = slice(width - len(p.ids), width) if not self.seq2seq else slice(0, len(p.ids))
            ids[j, span] = torch.tensor(p.ids)
            mask[j, span] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        tiny = TinyCache()  # the newcomers' own, joined to the batch's below
        if self.seq2seq:
            with self.model.lock.shared(), self._route(slots, mask):
                enc = self.hf.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            start = self.hf.config.decoder_start_token_id
            dec = torch.full((n, 1), start, dtype=torch.long, device=dev)
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            tiny.mask = torch.ones(n, 1, dtype=torch.long, device=dev)
            out = self._forward(
                slots,
                tiny=tiny,
                positions=torch.zeros(n, 1, dtype=torch.long, device=dev),
                encoder_outputs=BaseModelOutput(last_hidden_state=enc),
                attention_mask=mask,
                decoder_input_ids=dec,
                decoder_attention_mask=torch.ones(n, 1, dtype=torch.long, device=dev),
                cache=cache,
            )
            new = {"mask": torch.ones(n, 1, dtype=torch.long, device=dev), "enc_mask": mask, "enc": enc}
            new["pos"] = torch.ones(n, dtype=torch.long, device=dev)
        else:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            tiny.mask = mask
            out = self._forward(
                slots,
                tiny=tiny,
                positions=positions,
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=DynamicCache(),
            )
            new = {"mask": mask, "pos": torch.tensor(lengths, dtype=torch.long, device=dev)}
        samplings = [p.sampling for p in prompts]
        generators = [_generator(p.sampling.seed) for p in prompts]
        self.logits = out.logits[:, -1]
        tokens = pick(self.logits, samplings, generators)
        new["last"] = torch.tensor(tokens, dtype=torch.long, device=dev)
        row_ids = [next(self._next_id) for _ in prompts]
        self._join(out.cache, new, tiny)
        self.ids += row_ids
        self._samplings += samplings
        self._generators += generators
        return list(zip(row_ids, tokens, strict=True))

    @torch.inference_mode()
    def step(self, *, slots: Sequence[int]) -> list[int]:
        """One decoding step for every row (slots in `ids` order); each row's next token."""
        if not self.ids:
            return []
        if len(slots) != len(self.ids):
            raise ValueError(f"{len(slots)} slots for {len(self.ids)} rows")
        n = len(self.ids)
        dev = self.device
        mask = torch.cat([self._mask, torch.ones(n, 1, dtype=torch.long, device=dev)], dim=1)
        positions = self._pos[:, None]
        tokens = self._last[:, None]
        self._tiny.mask = mask
        if self.seq2seq:
            out = self._forward(
                slots,
                tiny=self._tiny,
                positions=positions,
                encoder_outputs=BaseModelOutput(last_hidden_state=self._enc),
                attention_mask=self._enc_mask,
                decoder_input_ids=tokens,
                decoder_attention_mask=mask,
                cache=self._cache,
            )
        else:
            out = self._forward(
                slots,
                tiny=self._tiny,
                positions=positions,
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                cache=self._cache,
            )
        self._cache = out.cache
        self.logits = out.logits[:, -1]
        nxt = pick(self.logits, self._samplings, self._generators)
        self._mask = mask
        self._pos = self._pos + 1
        self._last = torch.tensor(nxt, dtype=torch.long, device=dev)
        return nxt

    # -- membership -----------------------------------------------------------------------------

    def _layers(self, cache) -> list:
        if isinstance(cache, EncoderDecoderCache):
            return list(cache.self_attention_cache.layers)
        return list(cache.layers)

    def _join(self, cache, new: dict, tiny: TinyCache) -> None:
        if self._cache is None:
            self._cache, self._mask, self._pos, self._last = cache, new["mask"], new["pos"], new["last"]
            self._enc_mask, self._enc = new.get("enc_mask"), new.get("enc")
            self._tiny = tiny
            return
        width = max(self._mask.shape[1], new["mask"].shape[1])
        self._tiny.join(tiny, rows=len(self.ids), other_rows=new["mask"].shape[0], width=width)
        for old, add in zip(self._layers(self._cache), self._layers(cache), strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(add.keys, width)])
            old.values = torch.cat([_pad_left(old.values, width), _pad_left(add.values, width)])
        self._mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in (self._mask, new["mask"])])
        if self.seq2seq:
            s = max(self._enc_mask.shape[1], new["enc_mask"].shape[1])
            cross_old = self._cache.cross_attention_cache.layers
            cross_new = cache.cross_attention_cache.layers
            for old, add in zip(cross_old, cross_new, strict=True):
                old.keys = torch.cat([_pad_right(old.keys, s), _pad_right(add.keys, s)])
                old.values = torch.cat([_pad_right(old.values, s), _pad_right(add.values, s)])
            self._enc_mask = torch.cat(
                [F.pad(m, (0, s - m.shape[1])) for m in (self._enc_mask, new["enc_mask"])]
            )
            self._enc = torch.cat([_pad_right(e, s) for e in (self._enc, new["enc"])])
        self._pos = torch.cat([self._pos, new["pos"]])
        self._last = torch.cat([self._last, new["last"]])

    def remove(self, row_ids) -> None:
        """Take rows out of the batch at once; the cache keeps only what the others still need."""
        gone = set(row_ids)
        keep = [j for j, r in enumerate(self.ids) if r not in gone]
        if len(keep) == len(self.ids):
            return
        if not keep:
            self.ids, self._samplings, self._generators = [], [], []
            self._cache = self._mask = self._pos = self._last = self._enc_mask = self._enc = None
            self._tiny = TinyCache()
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask.index_select(0, idx)
        # Columns every remaining row pads can go: the longer rows that needed them have left.
        first = int(mask.any(0).nonzero()[0])
        for layer in self._layers(self._cache):
            layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
            layer.values = layer.values.index_select(0, idx)[:, :, first:]
        self._mask = mask[:, first:]
        self._tiny.select(idx, columns=self._mask.shape[1])
        if self.seq2seq:
            enc = self._enc_mask.index_select(0, idx)
            s = int(enc.any(0).nonzero()[-1]) + 1
            for layer in self._cache.cross_attention_cache.layers:
                layer.keys = layer.keys.index_select(0, idx)[:, :, :s]
                layer.values = layer.values.index_select(0, idx)[:, :, :s]
            self._enc_mask = enc[:, :s]
            self._enc = self._enc.index_select(0, idx)[:, :s]
        self._pos = self._pos.index_select(0, idx)
        self._last = self._last.index_select(0, idx)
        self.ids = [self.ids[j] for j in keep]
        self._samplings = [self._samplings[j] for j in keep]
        self._generators = [self._generators[j] for j in keep]

"""Row pools: the device memory of a bank, sized to what is loaded, shared by its slots.

A pool is one or more buffers with the same leading (row) dimension. Slot s owns the rows
`[offset[s], offset[s] + count[s])` of every buffer of the pool: a LoRA of rank 8 owns 8 rows of
`A` and of `B`, one of rank 64 owns 64, side by side (S-LoRA's unified paging, with one row per
rank unit). Per-slot vectors (biases, scales, norms) are pools of one row per slot. Row 0 always
holds the buffer's fill value, the identity: an empty slot reads it, and so do the padding
positions of a gather over rows of different ranks (zero rows contribute 0, exactly).

Allocation takes the smallest freed range that fits (an evicted adapter's rows, usually taken
again by one of the same size: eviction churn then moves nothing), else bumps a top pointer.
When the pool runs out of room, live ranges are compacted to the front (one gather per buffer)
and, when less than an eighth would be left free, the pool grows to 1.25x what it needs.
Compaction and growth copy on the thread that loads, under the model's exclusive lock, so
forwards never see a half-moved pool.

Forwards read a slot's rows as a view (`span`) when every row uses one slot, and otherwise gather
every row's rows by one `index_select` with indices computed on the host (`index`), so deciding
what to read needs no device sync.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Pool"]

# Room left after a compaction below which the pool grows instead (a fraction of its capacity),
# so compactions stay rare: at most one per eighth of the pool loaded.
_MIN_FREE = 1 / 8
_GROWTH = 1.25


class Pool:
    """Rows of buffers registered on `owner`, handed out to slots in contiguous ranges.

    `buffers` maps a buffer name to its row shape and fill (a scalar, or a tensor of the row
    shape). `ranked`: each slot owns as many rows as its adapter's rank (or length); otherwise one.
    """

    def __init__(
        self,
        owner: nn.Module,
        *,
        buffers: dict[str, tuple[tuple[int, ...], float | torch.Tensor]],
        slots: int,
        ranked: bool,
        **factory,
    ) -> None:
        self.owner = owner
        self.ranked = ranked
        self.names = tuple(buffers)
        self.fill = {name: fill for name, (_, fill) in buffers.items()}
        for name, (shape, fill) in buffers.items():
            owner.register_buffer(name, self._fill_rows(1, shape, fill, **factory), persistent=False)
        self.offset = np.zeros(slots, dtype=np.int64)
        self.count = np.zeros(slots, dtype=np.int64)
        self.top = 1
        # (offset, rows) of freed ranges below `top`, reused before the pool compacts
        self._dead: list[tuple[int, int]] = []

    # -- bookkeeping ------------------------------------------------------------------------------

    def buffer(self, name: str) -> torch.Tensor:
        """One of the pool's buffers, `[rows, *row_shape]`."""
        # the module's own buffer dict: nn.Module.__getattr__ costs several lookups per call, and the
        # loading thread and every forward call this thousands of times per batch
        return self.owner._buffers[name]

    @property
    def capacity(self) -> int:
        """Rows allocated, row 0 included."""
        return self.buffer(self.names[0]).shape[0]

    def row_bytes(self) -> int:
        """Bytes of one row across every buffer of the pool."""
        total = 0
        for name in self.names:
            b = self.buffer(name)
            total += (b.numel() // max(b.shape[0], 1) if b.shape[0] else 0) * b.element_size()
        return total

    def slot_bytes(self, slot: int) -> int:
        """Bytes the slot's rows take."""
        return int(self.count[slot]) * self.row_bytes()

    def allocated_bytes(self) -> int:
        """Bytes of every buffer of the pool, free and dead rows included."""
        return sum(self.buffer(n).numel() * self.buffer(n).element_size() for n in self.names)

    @staticmethod
    def _fill_rows(n: int, shape: tuple[int, ...], fill, **factory) -> torch.Tensor:
        if isinstance(fill, torch.Tensor):
            return fill.detach().to(**factory).reshape(1, *shape).repeat(n, *([1] * len(shape)))
        return torch.full((n, *shape), float(fill), **factory)

    def fits(self, name: str, value: torch.Tensor) -> bool:
        """Whether a tensor (one slot's value of buffer `name`) can be written: its row shape fits or may widen."""
        row = tuple(value.shape[1:] if self.ranked else value.shape)
        room = tuple(self.buffer(name).shape[1:])
        if len(row) != len(room):
            return False
        if row == room:
            return True
        # zero-filled rows pad narrower values and widen for wider ones; others must match exactly
        fill = self.fill[name]
        return not isinstance(fill, torch.Tensor) and fill == 0

    # -- allocation (the loading thread, under the model's exclusive lock) -----------------------

    def free(self, slot: int) -> None:
        """Give a slot's rows back: a later write of as many rows or fewer may take them."""
        if self.count[slot]:
            self._dead.append((int(self.offset[slot]), int(self.count[slot])))
        self.offset[slot] = 0
        self.count[slot] = 0

    def write(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Give the slot rows for these tensors (`[n, ...]` each when ranked) and copy them in.

        Buffers of the pool not among `tensors` get their fill. A tensor wider than the pool's row
        in some dimension widens every row (zero padded, exact for the banks that allow it).
        """
        self.free(slot)
        values = {k: (v if self.ranked else v.unsqueeze(0)) for k, v in tensors.items()}
        n = {v.shape[0] for v in values.values()}
        if len(n) != 1:
            raise ValueError(f"tensors of one pool disagree on their rank: {sorted(n)}")
        (n,) = n
        if n == 0:
            return
        for name, v in values.items():
            self._widen(name, tuple(v.shape[1:]))
        off = self._reuse(n)
        if off is None:
            self._room(n)
            off = self.top
            self.top += n
        self.offset[slot], self.count[slot] = off, n
        for name in self.names:
            rows = self.buffer(name)[off : off + n]
            v = values.get(name)
            if v is not None and tuple(v.shape[1:]) == tuple(rows.shape[1:]):
                rows.copy_(v)
                continue
            rows.copy_(self.buffer(name)[:1].expand_as(rows))
            if v is not None:
                rows[tuple(slice(0, d) for d in v.shape)].copy_(v)

    def _widen(self, name: str, shape: tuple[int, ...]) -> None:
        buf = self.buffer(name)
        room = tuple(buf.shape[1:])
        if len(shape) != len(room):
            raise ValueError(f"{name}: rows of shape {shape} do not fit rows of shape {room}")
        if all(a <= b for a, b in zip(shape, room, strict=True)):
            return
        if isinstance(self.fill[name], torch.Tensor) or self.fill[name] != 0:
            raise ValueError(f"{name}: rows of shape {shape} do not fit rows of shape {room}")
        wider = tuple(max(a, b) for a, b in zip(shape, room, strict=True))
        pad: list[int] = []
        for d in reversed(range(len(wider))):
            pad += [0, wider[d] - room[d]]
        setattr(self.owner, name, F.pad(buf, pad))

    def _reuse(self, n: int) -> int | None:
        """The start of the smallest dead range of at least n rows (its rest stays dead), or None."""
        fits = [(rows, i) for i, (_, rows) in enumerate(self._dead) if rows >= n]
        if not fits:
            return None
        off, rows = self._dead.pop(min(fits)[1])
        if rows > n:
            self._dead.append((off + n, rows - n))
        return off

    def _room(self, n: int) -> None:
        cap = self.capacity
        if self.top + n <= cap:
            return
        self.compact()
        if cap - self.top < max(n, int(cap * _MIN_FREE)):
            self._resize(int((self.top + n) * _GROWTH) + 1)

    def compact(self) -> None:
        """Move every live range to the front, in offset order."""
        self._dead = []  # every dead row is reclaimed below
        live = np.flatnonzero(self.count)
        live = live[np.argsort(self.offset[live])]
        if len(live) == 0:
            self.top = 1
            return
        parts = [np.arange(self.offset[s], self.offset[s] + self.count[s]) for s in live]
        idx = np.concatenate(parts)
        total = len(idx)
        if total + 1 == self.top:
            return
        dev = self.buffer(self.names[0]).device
        src = torch.as_tensor(idx, device=dev)
        for name in self.names:
            buf = self.buffer(name)
            buf[1 : 1 + total] = buf.index_select(0, src)
        starts = 1 + np.concatenate([[0], np.cumsum(self.count[live])[:-1]])
        self.offset[live] = starts
        self.top = 1 + total

    def _resize(self, rows: int) -> None:
        for name in self.names:
            buf = self.buffer(name)
            new = buf.new_empty(rows, *buf.shape[1:])
            new[: self.top] = buf[: self.top]
            setattr(self.owner, name, new)

    def bind(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Make `slot` (the only one) read these tensors themselves, so gradients reach them (training)."""
        values = {k: (v if self.ranked else v.unsqueeze(0)) for k, v in tensors.items()}
        n = next(iter(values.values())).shape[0]
        for name in self.names:
            buf = self.buffer(name)
            v = values.get(name)
            if v is None:
                v = buf[:1].detach().expand(n, *buf.shape[1:])
            row0 = self._fill_rows(1, tuple(v.shape[1:]), self.fill[name], device=buf.device, dtype=buf.dtype)
            if isinstance(self.fill[name], torch.Tensor):
                row0 = buf[:1].detach()
            setattr(self.owner, name, torch.cat([row0, v.to(buf.dtype)]))
        self.offset[:] = 0
        self.count[:] = 0
        self.offset[slot], self.count[slot] = 1, n
        self.top = 1 + n
        self._dead = []

    # -- reads (forwards) -------------------------------------------------------------------------

    def span(self, name: str, slot: int) -> torch.Tensor:
        """The slot's rows of one buffer as a view: `[n, ...]` when ranked, else the one row."""
        off = int(self.offset[slot])
        if self.ranked:
            return self.buffer(name)[off : off + int(self.count[slot])]
        return self.buffer(name)[off]

    def index(self, slots_np: np.ndarray, r: int = 1) -> torch.Tensor:
        """Row indices of each slot's first `r` rows, flattened (`[B * r]`; 0 past a slot's own rows)."""
        off = self.offset[slots_np]
        if self.ranked:
            ar = np.arange(r)
            idx = np.where(ar < self.count[slots_np][:, None], off[:, None] + ar, 0).reshape(-1)
        else:
            idx = off
        t = torch.from_numpy(np.ascontiguousarray(idx))  # zero-copy: as_tensor costs ~10x more per call
        dev = self.buffer(self.names[0]).device
        return t if dev.type == "cpu" else t.to(dev, non_blocking=True)

    def take(self, name: str, idx: torch.Tensor, rows: int, r: int | None = None) -> torch.Tensor:
        """Gathered rows of one buffer: `[rows, r, ...]` for an index from `index(..., r)`, else `[rows, ...]`."""
        buf = self.buffer(name)
        out = buf.index_select(0, idx)
        return out.view(rows, r, *buf.shape[1:]) if r is not None else out

"""Per-forward routing state shared by every banked site: which slot each row uses."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["Router", "SharedLock"]


class Router(threading.local):
    """Holds the rows' slot ids for the forward pass in progress.

    Every banked module keeps a reference to one Router; the model sets the slots before the
    backbone runs and clears them after. Keeping the ids both on the device and on the host
    lets banks decide cheaply (no device sync) whether any row uses them. The state is the
    calling thread's own, so forwards on several threads (parts of one batch on several CPU
    cores) share one model without seeing each other's rows.
    """

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None
        self.slots_np: np.ndarray | None = None
        self.unique: np.ndarray | None = None
        self.attention_mask: torch.Tensor | None = None
        # a decoding batch's per-row state that banks keep across steps (tiny attention's cache)
        self.decode = None
        self.bound: int | None = None

    @contextmanager
    def route(self, slot_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, decode=None):
        """Route the rows of one forward pass to their slots (`decode`: the decoding batch's bank cache)."""
        self.slots_np = slot_ids.detach().cpu().numpy().astype(np.int64, copy=False)
        self.unique = np.unique(self.slots_np)
        self.slots = slot_ids
        self.attention_mask = attention_mask
        self.decode = decode
        try:
            yield self
        finally:
            self.slots = self.slots_np = self.unique = self.attention_mask = self.decode = None

    @property
    def single(self) -> int | None:
        """The one slot every row uses, or None when the batch mixes slots."""
        if self.unique is not None and len(self.unique) == 1:
            return int(self.unique[0])
        return None

    def any_in(self, occupied: np.ndarray) -> bool:
        """Whether any row of the batch uses one of the slots marked in `occupied`."""
        if self.unique is None:
            return False
        return bool(occupied[self.unique].any())


class SharedLock:
    """Many holders in shared mode (forwards) or one in exclusive mode (slot writes); reentrant.

    The thread holding it exclusively may take it again in either mode; shared holders never wait
    for each other, so forwards on several threads run at once while a slot write waits for them.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._owner: int | None = None
        self._depth = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the lock alongside other shared holders."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                mine = True
            else:
                while self._owner is not None:
                    self._cond.wait()
                self._shared += 1
                mine = False
        try:
            yield
        finally:
            with self._cond:
                if mine:
                    self._depth -= 1
                else:
                    self._shared -= 1
                    if self._shared == 0:
                        self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the lock alone: waits until no other thread holds it in any mode."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
            else:
                while self._owner is not None or self._shared:
                    self._cond.wait()
                self._owner, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None
                    self._cond.notify_all()

"""Per-forward routing state shared by every banked site: which slot each row uses."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["Router"]


class Router:
    """Holds the rows' slot ids for the forward pass in progress.

    Every banked module keeps a reference to one Router; the model sets the slots before the
    backbone runs and clears them after. Keeping the ids both on the device and on the host
    lets banks decide cheaply (no device sync) whether any row uses them.
    """

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None
        self.slots_np: np.ndarray | None = None
        self.unique: np.ndarray | None = None
        self.attention_mask: torch.Tensor | None = None
        self.bound: int | None = None

    @contextmanager
    def route(self, slot_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None):
        """Route the rows of one forward pass to their slots."""
        self.slots_np = slot_ids.detach().cpu().numpy().astype(np.int64, copy=False)
        self.unique = np.unique(self.slots_np)
        self.slots = slot_ids
        self.attention_mask = attention_mask
        try:
            yield self
        finally:
            self.slots = self.slots_np = self.unique = self.attention_mask = None

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

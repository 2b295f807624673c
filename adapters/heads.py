"""Per-task heads in slot banks: each row of a mixed batch gets its own head's output."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from adapters.banks import _Bank
from adapters.router import Router

__all__ = ["HeadBank", "HeadOutput", "decode_row", "pool"]

POOLING = {"cls": 0, "mean": 1, "pooler": 2}
KINDS = {"classification": 0, "multi_label": 1, "regression": 2}


@dataclass
class HeadOutput:
    """Raw head outputs of a batch: logits padded to the bank's width, and each row's width."""

    logits: torch.Tensor
    num_outputs: np.ndarray
    kinds: np.ndarray
    hidden: torch.Tensor | None = None
    """The last hidden states the heads read (embedding rows of the batch pool them)."""


class HeadBank(_Bank):
    """Linear (or dense + tanh + linear) heads over CLS, mean or pooler outputs, one per slot.

    The output layer is pooled one row per label (a 2-way head takes 2 rows, a 300-way one 300);
    the optional dense layer is one `[H, H]` row, taken only by two-layer heads.
    """

    _meta = ("num_outputs", "pooling", "layers", "kind")

    def __init__(
        self,
        *,
        hidden: int,
        max_outputs: int | None = None,
        two_layer: bool,
        slots: int,
        router: Router,
        **factory,
    ):
        super().__init__(slots=slots, router=router)
        self.max_outputs = max_outputs
        self.out = self._pool(ranked=True, buffers={"out_w": ((hidden,), 0.0), "out_b": ((), 0.0)}, **factory)
        self.dense = self._pool(
            ranked=False, buffers={"dense_w": ((hidden, hidden), 0.0), "dense_b": ((hidden,), 0.0)}, **factory
        )
        self.two_layer_ok = two_layer
        self.num_outputs = np.zeros(slots, dtype=np.int64)
        self.pooling = np.zeros(slots, dtype=np.int64)
        self.layers = np.zeros(slots, dtype=np.int64)
        self.kind = np.zeros(slots, dtype=np.int64)

    def layout(
        self,
        *,
        kind: str,
        pooling: str,
        out_w: torch.Tensor,
        out_b: torch.Tensor,
        dense: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """A head in nn.Linear layout (out_w [C, H]): one row per output, the dense layer transposed."""
        c = out_w.shape[0]
        if self.max_outputs is not None and c > self.max_outputs:
            raise ValueError(f"head with {c} outputs exceeds the bank's maximum {self.max_outputs}")
        if dense is not None and not self.two_layer_ok:
            raise ValueError("two-layer heads are disabled in this bank configuration")
        tensors = {"out_w": out_w, "out_b": out_b}
        if dense is not None:
            tensors |= {"dense_w": dense[0].t(), "dense_b": dense[1]}
        meta = {
            "num_outputs": c,
            "pooling": POOLING[pooling],
            "layers": 2 if dense is not None else 1,
            "kind": KINDS[kind],
        }
        return tensors, meta

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, pooler: torch.nn.Module | None
    ) -> HeadOutput:
        """Pool each row as its head wants, then apply that head; rows are grouped by slot.

        Logits are `max_outputs` wide (or, without that limit, as wide as the widest head loaded);
        each row's own width is `num_outputs`.
        """
        rt = self.router
        slots_np = rt.slots_np
        codes = self.pooling[slots_np]
        cls = hidden[:, 0]
        pooled = cls
        if (codes == POOLING["mean"]).any():
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            pooled = torch.where(torch.as_tensor(codes == 1, device=hidden.device)[:, None], mean, pooled)
        if (codes == POOLING["pooler"]).any():
            if pooler is None:
                raise ValueError("a head asks for the pooler, but this backbone has none")
            pooled = torch.where(
                torch.as_tensor(codes == 2, device=hidden.device)[:, None], pooler(hidden), pooled
            )
        width = self.max_outputs or max(int(self.num_outputs.max()), 1)
        logits = hidden.new_zeros(hidden.shape[0], width)
        for slot in rt.unique:
            c = int(self.num_outputs[slot])
            if c == 0:
                continue
            rows = np.nonzero(slots_np == slot)[0]
            idx = torch.as_tensor(rows, device=hidden.device)
            whole = len(rows) == len(slots_np)
            x = pooled if whole else pooled.index_select(0, idx)
            if self.layers[slot] == 2:
                x = torch.tanh(
                    torch.addmm(self.dense.span("dense_b", slot), x, self.dense.span("dense_w", slot))
                )
            y = torch.addmm(self.out.span("out_b", slot), x, self.out.span("out_w", slot).t())
            if whole and c == width:
                logits = y
            elif whole:
                logits[:, :c] = y
            else:
                logits[:, :c].index_copy_(0, idx, y)
        return HeadOutput(
            logits=logits, num_outputs=self.num_outputs[slots_np], kinds=self.kind[slots_np], hidden=hidden
        )


def pool(
    hidden: torch.Tensor, attention_mask: torch.Tensor, *, mode: str, pooler: torch.nn.Module | None = None
) -> torch.Tensor:
    """Sentence vectors of a batch: first token, masked mean (as sentence-transformers), or the pooler."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "pooler":
        if pooler is None:
            raise ValueError("pooling 'pooler' asks for the backbone's pooler, and it has none")
        return pooler(hidden)
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def decode_row(logits: torch.Tensor, *, kind: str, labels: list[str], all_scores: bool = False) -> dict:
    """Turn one row's logits into the API's output: label + score (+ scores), or value."""
    if kind == "regression":
        return {"value": float(logits[0])}
    c = len(labels)
    z = logits[:c].float()
    if kind == "multi_label":
        probs = torch.sigmoid(z)
        out = {"labels": [lab for lab, p in zip(labels, probs.tolist(), strict=True) if p >= 0.5]}
        out["scores"] = dict(zip(labels, probs.tolist(), strict=True))
        return out
    probs = F.softmax(z, dim=-1)
    best = int(probs.argmax())
    out = {"label": labels[best], "score": float(probs[best])}
    if all_scores:
        out["scores"] = dict(zip(labels, probs.tolist(), strict=True))
    return out

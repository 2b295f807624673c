"""Generation tasks: an adapter trained to write a target text for an input, on T5/BART or GPT-2/Llama.

Seq2seq backbones read the input with the encoder and learn the target with teacher forcing (the
decoder sees the target shifted right, as the model's own `labels` loss does). Decoder-only
backbones learn the continuation: each example is the prompt as the service tokenizes it, then the
target and the end-of-sequence token, and only the target's tokens (and the end) are in the loss.
Evaluation reports the teacher-forced token accuracy and the exact match of greedy generation
through `MultiTaskModel.generate`, the same call the service's predict route makes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from adapters.model import MultiTaskModel
from adapters.training.data import Batches, Dataset, Example

__all__ = ["GENERATION_METRICS", "TextPairs", "evaluate_generation", "lm_loss", "pad_rows", "text_pairs"]

GENERATION_METRICS = ("exact_match", "token_accuracy")
"""What a generation task is scored by: greedy outputs equal to the target (whitespace-normalised),
and next-token accuracy on the target under teacher forcing; `score` is their mean."""

IGNORE = -100
"""Label of a position outside the loss (prompt tokens, padding), as Hugging Face's losses use it."""


def _normalized(text: str) -> str:
    return " ".join(text.split())


def pad_rows(rows: list[list[int]], value: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded with `value` to the longest (on the left for decoder-only prompts), and their mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[j, span] = torch.tensor(r, dtype=torch.long)
        mask[j, span] = 1
    return ids, mask


class TextPairs:
    """Tokenized inputs and targets of a generation task, and their teacher-forcing batches."""

    def __init__(
        self,
        tokenizer,
        examples: Sequence[Example],
        *,
        max_length: int,
        max_target_length: int,
        decoder_only: bool,
    ) -> None:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("a generation task needs a tokenizer with an end-of-sequence token")
        self.decoder_only = decoder_only
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self.golds = [e.label for e in examples]
        self.prompts: list[list[int]] = []
        self.targets: list[list[int]] = []
        for e in examples:
            if not e.label.strip():
                raise e.error("a generation target is empty")
            # the prompt exactly as the service tokenizes a predict input
            prompt = tokenizer(e.text, truncation=True, max_length=max_length)["input_ids"]
            # decoder-only: the target continues the prompt, so no special tokens (a BOS) inside it
            target = tokenizer(
                e.label, truncation=True, max_length=max_target_length, add_special_tokens=not decoder_only
            )["input_ids"]
            if not target or target[-1] != eos:
                target = [*target[: max_target_length - 1], eos]
            self.prompts.append(list(prompt))
            self.targets.append(target)
        # what the batches bucket by: the whole sequence a row costs
        lengths = [p + t if decoder_only else p for p, t in zip(self.prompts, self.targets, strict=True)]
        self.data = Dataset(ids=lengths, targets=torch.zeros(len(lengths)))

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def longest_target(self) -> int:
        """Tokens of the longest target (its end token included)."""
        return max((len(t) for t in self.targets), default=1)

    def teacher_forced(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """The forward's inputs and the aligned labels (`IGNORE` outside the loss) of some examples."""
        if self.decoder_only:
            rows = [self.prompts[i] + self.targets[i] for i in idx]
            labels = [[IGNORE] * len(self.prompts[i]) + self.targets[i] for i in idx]
        else:
            rows, labels = [self.prompts[i] for i in idx], [self.targets[i] for i in idx]
        ids, mask = pad_rows(rows, self.pad_id)
        lab, _ = pad_rows(labels, IGNORE)
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def text_pairs(
    backbone,
    name: str,
    train: Sequence[Example],
    dev: Sequence[Example],
    *,
    max_length: int,
    max_target_length: int,
) -> tuple[TextPairs, TextPairs]:
    """A generation task's train and dev pairs; refused on a backbone that cannot generate."""
    if not backbone.generative:
        raise ValueError(
            f"{name} is a generation task: it needs a generative backbone (T5, BART, GPT-2, Llama); "
            f"{backbone.spec.name} is not"
        )
    kw = {
        "max_length": max_length,
        "max_target_length": max_target_length,
        "decoder_only": backbone.decoder_only,
    }
    return TextPairs(backbone.tokenizer, train, **kw), TextPairs(backbone.tokenizer, dev, **kw)


def _aligned(
    model: MultiTaskModel, batch: dict[str, torch.Tensor], *, slot: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable next-token logits `[N, V]` and their gold labels `[N]` (ignored ones included)."""
    dev = model.backbone.device
    ids, mask, labels = (batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels"))
    hf = model.backbone.model
    if model.backbone.decoder_only:
        logits = model.lm_forward(ids, mask, slot=slot)
        # position t predicts token t + 1
        return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    # the decoder reads the target shifted right behind the start token, as the model's own loss does
    dec = hf.prepare_decoder_input_ids_from_labels(labels=labels)
    logits = model.lm_forward(ids, mask, slot=slot, decoder_input_ids=dec)
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


def lm_loss(model: MultiTaskModel, data: TextPairs, idx: Sequence[int]) -> torch.Tensor:
    """Mean cross-entropy over the targets' tokens of some examples (slot 1: the adapter in training)."""
    logits, labels = _aligned(model, data.teacher_forced(idx))
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)


@torch.no_grad()
def evaluate_generation(
    model: MultiTaskModel, config, tensors: dict[str, torch.Tensor] | None, data: TextPairs, *, bound=False
) -> dict[str, float]:
    """Exact match, token accuracy, mean target loss and `score` on `data`.

    `tensors` None: the plain backbone, unless `bound` says slot 1 already computes with the adapter
    (a hypernetwork's generated one).
    """
    if not len(data):
        return {}
    was = model.backbone.model.training
    model.backbone.model.eval()
    slot = 1 if bound else 0
    try:
        if tensors is not None:
            model.bind(config, tensors)
            slot = 1
        tok = model.backbone.tokenizer
        right = wrong = 0
        loss_sum, counted, exact = 0.0, 0, 0
        for idx in Batches(data.data, batch_size=32, pad_id=data.pad_id).ordered():
            batch = data.teacher_forced(idx)
            logits, labels = _aligned(model, batch, slot=slot)
            keep = labels != IGNORE
            hits = int((logits.argmax(-1)[keep] == labels[keep]).sum())
            right += hits
            wrong += int(keep.sum()) - hits
            loss_sum += float(F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum"))
            counted += int(keep.sum())
            # greedy outputs as the predict route makes them: decoder-only prompts padded on the left
            ids, mask = pad_rows([data.prompts[i] for i in idx], data.pad_id, left=data.decoder_only)
            dev = model.backbone.device
            new = model.generate(
                ids.to(dev), mask.to(dev), [slot] * len(idx), max_new_tokens=data.longest_target
            )
            skip = 0 if data.decoder_only else 1  # seq2seq output starts with the decoder start token
            for j, i in enumerate(idx):
                text = tok.decode(new[j, skip:].tolist(), skip_special_tokens=True)
                exact += _normalized(text) == _normalized(data.golds[i])
        em = exact / len(data)
        acc = right / max(right + wrong, 1)
        return {
            "exact_match": em,
            "token_accuracy": acc,
            "loss": loss_sum / max(counted, 1),
            "score": (em + acc) / 2,
        }
    finally:
        model.backbone.model.train(was)

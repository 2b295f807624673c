"""Training data: CSV/TSV/JSONL readers, the GLUE tasks by name, tokenized batches and GLUE metrics.

Torch appears only in `Batches`; readers and metrics are plain Python and numpy.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "GLUE_TASKS",
    "Batches",
    "DataError",
    "Dataset",
    "Example",
    "GlueTask",
    "TaskData",
    "baseline_metrics",
    "check_targets",
    "compute_metrics",
    "glue_dir",
    "infer_task",
    "load_glue",
    "read_examples",
    "rename_labels",
    "subset",
    "tokenize",
]

_REPO = Path(__file__).resolve().parents[2]


class DataError(ValueError):
    """A training file the trainer cannot use: names the file, the line and the column at fault."""

    def __init__(self, message: str, *, file: str, line: int | None = None, column: str | int | None = None):
        where = file if line is None else f"{file}, line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")
        self.file, self.line, self.column = file, line, column


@dataclass(frozen=True)
class Example:
    """One input (a text or a pair) and its gold label (a string; the float as text for regression)."""

    text: str
    label: str
    text_pair: str | None = None
    source: str | None = field(default=None, compare=False)
    """The file name the example was read from (None: built in code)."""
    line: int | None = field(default=None, compare=False)
    """Its line in that file (1-based, the header counted)."""

    def error(self, message: str, *, column: str | int | None = None) -> ValueError:
        """An error about this example, naming its file, line and column where it has them."""
        if self.source is None:
            return ValueError(message)
        return DataError(message, file=self.source, line=self.line, column=column)


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task's columns are, what it predicts and how GLUE scores it."""

    name: str
    text: str | int
    label: str | int
    pair: str | int | None = None
    header: bool = True
    regression: bool = False
    metrics: tuple[str, ...] = ("accuracy",)
    labels: tuple[str, ...] = ("0", "1")


GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("SST-2", text="sentence", label="label"),
        GlueTask("MRPC", text="#1 String", pair="#2 String", label="Quality", metrics=("accuracy", "f1")),
        # CoLA's files have no header: source, label, original mark, sentence.
        GlueTask("CoLA", text=3, label=1, header=False, metrics=("matthews",)),
        GlueTask(
            "RTE",
            text="sentence1",
            pair="sentence2",
            label="label",
            labels=("entailment", "not_entailment"),
        ),
        GlueTask(
            "STS-B",
            text="sentence1",
            pair="sentence2",
            label="score",
            regression=True,
            metrics=("pearson", "spearman"),
            labels=(),
        ),
    )
}


def glue_dir() -> Path:
    """The GLUE data directory: `ADAPTERSERVE_GLUE_DIR`, else `../shared/data/glue` beside the repository."""
    env = os.environ.get("ADAPTERSERVE_GLUE_DIR")
    return Path(env) if env else (_REPO.parent / "shared" / "data" / "glue").resolve()


def _column(col: str | int, header: bool) -> str | int:
    if not header and isinstance(col, str):
        if not col.isdigit():
            raise ValueError(f"a file without a header names columns by 0-based index, not {col!r}")
        return int(col)
    return col


def _rows(fh, *, suffix: str, name: str, header: bool) -> tuple[list[str] | None, Iterator[tuple[int, list]]]:
    """The header (None: no header, or JSONL) and (line number, fields or object) of every row."""
    if suffix == ".jsonl":

        def objects():
            for n, text in enumerate(fh, 1):
                try:
                    row = json.loads(text) if text.strip() else None
                except json.JSONDecodeError as exc:
                    raise DataError(f"not JSON ({exc.msg})", file=name, line=n) from None
                if row is not None and not isinstance(row, dict):
                    raise DataError(f"expected a JSON object, got {type(row).__name__}", file=name, line=n)
                yield n, row

        return None, objects()
    reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv" else csv.reader(fh)

    def lines():
        for r in reader:
            yield reader.line_num, r

    if not header:
        return None, lines()
    names = next(reader, None)
    if not names or not any(x.strip() for x in names):
        raise DataError("the header row is empty (use --no-header for a file without one)", file=name, line=1)
    return names, lines()


def _checked_rows(rows: Iterator[tuple[int, object]], *, name: str) -> Iterator[tuple[int, object]]:
    """The rows, refusing an empty one in the middle (blank lines at the end of a file are fine)."""
    blank: int | None = None
    for n, row in rows:
        empty = row is None or (isinstance(row, list) and not any(str(x).strip() for x in row))
        if empty:
            blank = n if blank is None else blank
            continue
        if blank is not None:
            raise DataError("empty row (every row needs a text and a label)", file=name, line=blank)
        yield n, row


def _value(row: list | dict, col: str | int, *, names: list[str] | None, name: str, n: int) -> object:
    """One cell, with an error naming file, line and column when the row lacks it or it is empty."""
    if isinstance(row, dict):
        if col not in row:
            raise DataError("missing from this JSON object", file=name, line=n, column=col)
        value = row[col]
    else:
        index = names.index(col) if names is not None else col
        if index >= len(row):
            width = f"the header has {len(names)}" if names is not None else f"column {col} was asked for"
            raise DataError(f"missing: the row has {len(row)} fields, {width}", file=name, line=n, column=col)
        value = row[index]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError("empty", file=name, line=n, column=col)
    if isinstance(value, (dict, list)):
        raise DataError(
            f"expected a text or a number, got {type(value).__name__}", file=name, line=n, column=col
        )
    return value


def read_examples(
    path: str | Path,
    *,
    text_column: str | int,
    label_column: str | int,
    text_pair_column: str | int | None = None,
    header: bool = True,
) -> list[Example]:
    """Read a .csv, .tsv (quoting off, as GLUE's files need) or .jsonl file into examples.

    Every row is checked before any is used: a column the header lacks, a row too short for a
    column, an empty cell and an empty row in the middle of the file each raise `DataError` with
    the file, line and column.
    """
    path = Path(path)
    suffix, name = path.suffix.lower(), path.name
    if suffix not in (".tsv", ".csv", ".jsonl"):
        raise ValueError(f"{name}: unsupported file type {suffix!r}; use .csv, .tsv or .jsonl")
    header = header or suffix == ".jsonl"
    cols = [_column(c, header) for c in (text_column, label_column)]
    pair = None if text_pair_column is None else _column(text_pair_column, header)
    out = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        names, rows = _rows(fh, suffix=suffix, name=name, header=header)
        for col in [*cols, pair] if names is not None else ():
            if col is not None and col not in names:
                have = ", ".join(repr(x) for x in names)
                raise DataError(f"not in the header (it has {have})", file=name, line=1, column=col)
        for n, row in _checked_rows(rows, name=name):
            text, label = (_value(row, c, names=names, name=name, n=n) for c in cols)
            second = None if pair is None else str(_value(row, pair, names=names, name=name, n=n))
            out.append(
                Example(text=str(text), label=_label_text(label), text_pair=second, source=name, line=n)
            )
    if not out:
        raise DataError("no examples", file=name)
    return out


def _label_text(value: object) -> str:
    # JSON numbers keep their spelling: 1 is a class, 1.0 and 0.5 are regression targets
    return str(int(value)) if isinstance(value, bool) else str(value)


def _as_float(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def infer_task(labels: Sequence[str], *, kind: str = "auto") -> tuple[str, list[str]]:
    """('regression', []) when the targets are floats, else ('classification', sorted label names).

    Integer labels sort numerically ("2" before "10"); a regression target is a number with a
    fractional part or a decimal point ("3.8", "4.0").
    """
    distinct = sorted(set(labels))
    floats = [_as_float(x) for x in distinct]
    numeric = all(f is not None for f in floats)
    if kind == "regression" or (
        kind == "auto" and numeric and any("." in x or "e" in x.lower() for x in distinct)
    ):
        if not numeric:
            bad = next(x for x, f in zip(distinct, floats, strict=True) if f is None)
            raise ValueError(f"regression needs numeric targets; got {bad!r}")
        return "regression", []
    if numeric and all(float(x).is_integer() for x in distinct):
        distinct.sort(key=float)
    if len(distinct) < 2:
        raise ValueError(f"classification needs at least two distinct labels; got {distinct}")
    return "classification", distinct


@dataclass
class TaskData:
    """A task's train and dev examples, its kind, labels and the metrics it is scored by."""

    name: str
    train: list[Example]
    dev: list[Example]
    kind: str
    labels: list[str]
    metrics: tuple[str, ...]
    label_column: str | int = "label"
    """Where the labels were read from (errors about a label name it)."""


def check_targets(
    examples: Sequence[Example], *, kind: str, labels: Sequence[str], column: str | int
) -> None:
    """Every example's label is a finite number (regression) or one of `labels`; else a `DataError`."""
    known = set(labels)
    for e in examples:
        if kind == "regression":
            if _as_float(e.label) is None:
                raise e.error(f"regression needs a finite number, got {e.label!r}", column=column)
        elif e.label not in known:
            raise e.error(
                f"label {e.label!r} is not one of the task's labels ({', '.join(labels)})", column=column
            )


def rename_labels(task: TaskData, names: str | None) -> TaskData:
    """The task with the head's label names from `--label-names` (comma-separated, in head order).

    Integer labels (GLUE's 0, 1) index the names. Other labels must be among the names, whose
    order becomes the head's; or, when no name is a label and there is one per label, the names
    rename the labels in their sorted order. A label that fits none raises a `DataError` at its line.
    """
    if not names:
        return task
    new = [n.strip() for n in names.split(",")]
    if task.kind == "regression":
        raise ValueError("--label-names is for classification; this task is a regression")
    if len(new) < 2 or len(set(new)) != len(new) or not all(new):
        raise ValueError(f"--label-names needs at least two distinct, non-empty names; got {names!r}")
    if all(lab.isdigit() for lab in task.labels):
        rename = {lab: new[int(lab)] for lab in task.labels if int(lab) < len(new)}
        what = f"an index into --label-names (0 to {len(new) - 1}: {', '.join(new)})"
    elif not set(task.labels) & set(new) and len(new) == len(task.labels):
        # all-new names, one per label: a renaming, in the labels' sorted order
        rename = dict(zip(task.labels, new, strict=True))
        what = ""
    else:
        rename = {n: n for n in new}
        what = f"one of --label-names ({', '.join(new)})"
    for e in (*task.train, *task.dev):
        if e.label not in rename:
            raise e.error(f"label {e.label!r} is not {what}", column=task.label_column)

    def move(examples: list[Example]) -> list[Example]:
        return [dataclasses.replace(e, label=rename[e.label]) for e in examples]

    return dataclasses.replace(task, train=move(task.train), dev=move(task.dev), labels=new)


def load_glue(name: str, *, root: Path | None = None) -> TaskData:
    """A GLUE task's train and dev sets from `<root>/<TASK>/{train,dev}.tsv` (root: `glue_dir()`)."""
    key = {k.lower(): k for k in GLUE_TASKS}.get(name.lower())
    if key is None:
        raise ValueError(f"unknown GLUE task {name!r}; known: {', '.join(GLUE_TASKS)}")
    task = GLUE_TASKS[key]
    base = (root or glue_dir()) / key
    if not base.is_dir():
        raise FileNotFoundError(f"GLUE task directory {base} not found (set ADAPTERSERVE_GLUE_DIR)")
    split = {}
    for part in ("train", "dev"):
        split[part] = read_examples(
            base / f"{part}.tsv",
            text_column=task.text,
            text_pair_column=task.pair,
            label_column=task.label,
            header=task.header,
        )
    kind = "regression" if task.regression else "classification"
    data = TaskData(key, split["train"], split["dev"], kind, list(task.labels), task.metrics, task.label)
    for part in (data.train, data.dev):
        check_targets(part, kind=kind, labels=data.labels, column=task.label)
    return data


def subset(examples: list, limit: int | None, generator: torch.Generator) -> list:
    """A seeded random subset of at most `limit` examples, in their original order."""
    if limit is None or limit >= len(examples):
        return examples
    idx = torch.randperm(len(examples), generator=generator)[:limit].sort().values.tolist()
    return [examples[i] for i in idx]


# -- tokenization and batches ------------------------------------------------------------------


@dataclass
class Dataset:
    """Token ids per example (no padding), targets (class indices, or floats), and segment ids.

    `types` holds the tokenizer's token type ids where it makes them (BERT-style pairs): the
    service passes them too, so training must see the same inputs serving does.
    """

    ids: list[list[int]]
    targets: torch.Tensor
    types: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def tokenize(
    tokenizer, examples: Sequence[Example], *, max_length: int, kind: str, labels: Sequence[str]
) -> Dataset:
    """Tokenize once (pairs truncated longest-first) and map labels to targets."""
    if not examples:
        # tokenizers fail on an empty batch; no dev file is a valid, empty dev set
        dtype = torch.float32 if kind == "regression" else torch.long
        return Dataset(ids=[], targets=torch.zeros(0, dtype=dtype), types=None)
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    has_pair = any(p is not None for p in pairs)
    enc = tokenizer(
        texts,
        [p or "" for p in pairs] if has_pair else None,
        truncation=True,
        max_length=max_length,
        padding=False,
    )
    if kind == "regression":
        targets = torch.tensor([float(e.label) for e in examples], dtype=torch.float32)
    else:
        index = {lab: i for i, lab in enumerate(labels)}
        missing = next((e.label for e in examples if e.label not in index), None)
        if missing is not None:
            raise ValueError(f"label {missing!r} is not one of the task's labels {list(labels)}")
        targets = torch.tensor([index[e.label] for e in examples], dtype=torch.long)
    uses_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    types = list(enc["token_type_ids"]) if uses_types and "token_type_ids" in enc else None
    return Dataset(ids=list(enc["input_ids"]), targets=targets, types=types)


class Batches:
    """Seeded, length-bucketed mini-batches with dynamic padding.

    Each epoch shuffles the examples, sorts them by length within windows of `bucket` batches
    (so a batch pads little) and shuffles the batch order; all randomness comes from `generator`.
    """

    def __init__(self, data: Dataset, *, batch_size: int, pad_id: int, bucket: int = 50) -> None:
        self.data, self.batch_size, self.pad_id, self.bucket = data, batch_size, pad_id, bucket

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def collate(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids, their mask and the targets of the given examples."""
        rows = [self.data.ids[i] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        return ids, mask, self.data.targets[list(idx)]

    def extra(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """The forward's extra inputs for these examples: right-padded token type ids, when there are any."""
        if self.data.types is None:
            return {}
        rows = [self.data.types[i] for i in idx]
        types = torch.zeros((len(rows), max(len(r) for r in rows)), dtype=torch.long)
        for j, r in enumerate(rows):
            types[j, : len(r)] = torch.tensor(r)
        return {"token_type_ids": types}

    def epoch(self, generator: torch.Generator) -> list[list[int]]:
        """One epoch's batches (lists of example indices)."""
        order = torch.randperm(len(self.data), generator=generator).tolist()
        window = self.batch_size * self.bucket
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(self.data.ids[i]))
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        perm = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in perm]

    def ordered(self) -> list[list[int]]:
        """Batches for evaluation: sorted by length (less padding), every example once."""
        order = sorted(range(len(self.data)), key=lambda i: len(self.data.ids[i]))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]


# -- metrics -----------------------------------------------------------------------------------


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    # ptp, not std: the std of a constant float array can come out as a tiny nonzero number
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        # a constant prediction has no correlation; GLUE would give NaN, 0 keeps tables sortable
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as scipy.stats.rankdata."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def compute_metrics(preds: np.ndarray, golds: np.ndarray, *, metrics: Sequence[str]) -> dict[str, float]:
    """GLUE's metrics (accuracy, binary F1 of class 1, Matthews, Pearson, Spearman) plus `score`.

    `score` is the task's one number, as the GLUE leaderboard averages it: the mean of the
    task's metrics (MRPC: accuracy and F1; STS-B: Pearson and Spearman). Values are fractions.
    """
    preds, golds = np.asarray(preds), np.asarray(golds)
    out: dict[str, float] = {}
    for m in metrics:
        if m == "accuracy":
            out[m] = float((preds == golds).mean())
        elif m == "f1":
            tp = float(((preds == 1) & (golds == 1)).sum())
            fp = float(((preds == 1) & (golds != 1)).sum())
            fn = float(((preds != 1) & (golds == 1)).sum())
            out[m] = 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
        elif m == "matthews":
            tp = float(((preds == 1) & (golds == 1)).sum())
            tn = float(((preds == 0) & (golds == 0)).sum())
            fp = float(((preds == 1) & (golds == 0)).sum())
            fn = float(((preds == 0) & (golds == 1)).sum())
            den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            out[m] = 0.0 if den == 0 else (tp * tn - fp * fn) / den
        elif m == "pearson":
            out[m] = _pearson(preds.astype(np.float64), golds.astype(np.float64))
        elif m == "spearman":
            out[m] = _pearson(_ranks(preds.astype(np.float64)), _ranks(golds.astype(np.float64)))
        else:
            raise ValueError(f"unknown metric {m!r}")
    out["score"] = float(np.mean([out[m] for m in metrics]))
    return out


def baseline_metrics(train: Dataset, dev: Dataset, *, kind: str, metrics: Sequence[str]) -> dict[str, float]:
    """The majority-class (classification) or mean-prediction (regression) baseline on dev."""
    if kind == "regression":
        preds = np.full(len(dev), float(train.targets.mean()))
    else:
        counts = np.bincount(train.targets.numpy())
        preds = np.full(len(dev), int(counts.argmax()))
    return compute_metrics(preds, dev.targets.numpy(), metrics=metrics)

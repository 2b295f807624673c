"""Bad training files: each refusal names the file, the line and the column, before any training step.

The expected lines are counted by hand from the small files written here (the header is line 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import adapters.backbone
import adapters.training.cli as cli
import adapters.training.trainer
from adapters.training.data import DataError, read_examples


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def no_training(monkeypatch):
    """Loading a backbone or training fails the test: a bad file must be refused before either."""

    def refuse(*_a, **_k):
        raise AssertionError("reached the backbone or the training loop")

    # the command imports both where it runs them, so patching their modules reaches it
    monkeypatch.setattr(adapters.training.trainer, "train", refuse)
    monkeypatch.setattr(adapters.backbone, "load_backbone", refuse)


def _run(tmp_path: Path, train: Path, *extra: str) -> int:
    argv = ["--train-file", str(train), "--method", "lora", "--out", str(tmp_path / "out"), *extra]
    return cli.main(argv)


CASES = [
    (
        "train.csv",
        "text,target\ngood film,1\nbad film,0\n",
        (),
        "train.csv, line 1, column 'label': not in the header (it has 'text', 'target')",
    ),
    (
        "train.tsv",
        "text\tlabel\ngood film\t1\nbad film\n",
        (),
        "train.tsv, line 3, column 'label': missing: the row has 1 fields, the header has 2",
    ),
    ("train.csv", "text,label\ngood film,1\n,0\n", (), "train.csv, line 3, column 'text': empty"),
    ("train.csv", "text,label\ngood film,1\n  ,0\n", (), "train.csv, line 3, column 'text': empty"),
    ("train.csv", "text,label\ngood film,1\nbad film,\n", (), "train.csv, line 3, column 'label': empty"),
    ("train.csv", "text,label\ngood film,1\n\nbad film,0\n", (), "train.csv, line 3: empty row"),
    ("train.csv", "text,label\ngood film,1\n,\nbad film,0\n", (), "train.csv, line 3: empty row"),
    (
        "train.tsv",
        "good film\t1\nbad film\n",
        ("--no-header", "--text-column", "0", "--label-column", "1"),
        "train.tsv, line 2, column 1: missing",
    ),
    (
        "train.jsonl",
        '{"text": "good", "label": 1}\n{"text": "bad"}\n',
        (),
        "train.jsonl, line 2, column 'label': missing from this JSON object",
    ),
    ("train.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", \n', (), "train.jsonl, line 2: not JSON"),
    (
        "train.jsonl",
        '{"text": "good", "label": 1}\n[1, 2]\n',
        (),
        "train.jsonl, line 2: expected a JSON object",
    ),
    (
        "train.csv",
        "text,label\ngood film,pos\nbad film,neg\nso so,meh\n",
        ("--label-names", "neg,pos"),
        "train.csv, line 4, column 'label': label 'meh' is not one of --label-names (neg, pos)",
    ),
    (
        "train.csv",
        "text,label\ngood film,1\nbad film,0\nso so,2\n",
        ("--label-names", "negative,positive"),
        "train.csv, line 4, column 'label': label '2' is not an index into --label-names (0 to 1",
    ),
    (
        "train.csv",
        "text,label\ngood film,3.5\nbad film,n/a\n",
        ("--task-type", "regression"),
        "train.csv, line 3, column 'label': regression needs a finite number, got 'n/a'",
    ),
]


@pytest.mark.parametrize(("name", "text", "extra", "says"), CASES, ids=[c[3][:48] for c in CASES])
def test_a_bad_training_file_is_refused_with_file_line_and_column(
    name, text, extra, says, tmp_path, capsys, no_training
) -> None:
    """Missing columns, empty cells and rows, unknown labels: exit 2, the place named, nothing trained."""
    assert _run(tmp_path, _write(tmp_path / name, text), *extra) == 2
    err = capsys.readouterr().err
    assert says in err, err
    assert not (tmp_path / "out").exists()


def test_a_dev_label_the_training_file_never_has_is_refused_at_its_line(
    tmp_path, capsys, no_training
) -> None:
    """The dev file is checked against the training file's labels, before any step."""
    train = _write(tmp_path / "train.csv", "text,label\ngood,pos\nbad,neg\n")
    dev = _write(tmp_path / "dev.csv", "text,label\nfine,pos\nmeh,neutral\n")
    assert _run(tmp_path, train, "--dev-file", str(dev)) == 2
    assert "dev.csv, line 3, column 'label': label 'neutral' is not one of the task's labels (neg, pos)" in (
        capsys.readouterr().err
    )


def test_trailing_blank_lines_and_a_good_file_read_fine(tmp_path) -> None:
    """Blank lines at the end of a file are not rows; each example remembers its file and line."""
    path = _write(tmp_path / "ok.csv", 'text,label\ngood,1\n"bad, really",0\n\n\n')
    examples = read_examples(path, text_column="text", label_column="label")
    assert [(e.text, e.label, e.source, e.line) for e in examples] == [
        ("good", "1", "ok.csv", 2),
        ("bad, really", "0", "ok.csv", 3),
    ]


def test_a_quoted_field_spanning_lines_is_counted_where_the_row_ends(tmp_path) -> None:
    """csv's own line counter: a row's line is where the reader finished it."""
    path = _write(tmp_path / "multi.csv", 'text,label\n"two\nlines",1\nshort,\n')
    with pytest.raises(DataError) as info:
        read_examples(path, text_column="text", label_column="label")
    assert (info.value.file, info.value.line, info.value.column) == ("multi.csv", 4, "label")

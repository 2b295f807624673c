"""The `adapterserve` command line: every subcommand is registered and every benchmark starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import BENCHMARKS, build_parser, main

REPO = Path(__file__).resolve().parents[2]


def test_every_subcommand_is_registered():
    """The commands DESIGN.md lists are all there."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"serve", "upload", "train", "train-hyper", "import", "bench"} <= set(sub.choices)


def test_the_parser_and_upload_import_no_model_code():
    """`adapterserve upload` and `--help` start without torch: building every subcommand is light."""
    probe = (
        "import sys; from service.cli import build_parser, _upload; build_parser(); "
        "import service.client; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'adapters.model') if m in sys.modules); "
        "print(heavy)"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_train_offers_every_method_the_core_serves():
    """The parser's light method list is the registry's, so no method is missing from `train --method`."""
    from adapters.methods import METHODS
    from adapters.training.names import TRAINABLE_METHODS

    assert list(TRAINABLE_METHODS) == sorted(METHODS)
    action = next(a for a in _train_parser()._actions if a.dest == "method")
    assert set(action.choices) == {*METHODS, "full"}


def _train_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["train"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_benchmark_script_starts(name, capfd):
    """`adapterserve bench NAME --help` runs the script (its imports resolve, bench/http.py shadows nothing)."""
    assert main(["bench", name, "--help"]) == 0
    assert "usage:" in capfd.readouterr().out

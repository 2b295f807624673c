"""The `adapterserve` command line: every subcommand is registered and every benchmark starts."""

from __future__ import annotations

import pytest

from service.cli import BENCHMARKS, build_parser, main


def test_every_subcommand_is_registered():
    """The commands DESIGN.md lists are all there."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"serve", "upload", "train", "train-hyper", "import", "bench"} <= set(sub.choices)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_benchmark_script_starts(name, capfd):
    """`adapterserve bench NAME --help` runs the script (its imports resolve, bench/http.py shadows nothing)."""
    assert main(["bench", name, "--help"]) == 0
    assert "usage:" in capfd.readouterr().out

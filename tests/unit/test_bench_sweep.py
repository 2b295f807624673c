"""bench/sweep.py: rows found by their rate, the best mean rate chosen over every task, gaps named."""

from __future__ import annotations

import json

import pytest

from bench.quality import RATES_BEFORE_SWEEP
from bench.sweep import choose, collect, main, render


def _run(path, rows: list[tuple[str, str, float, float | None]]) -> None:
    """A quality --json file: (task, method, score, rate or None: a row that predates recorded rates) per row."""
    config = {"command": "python bench/quality.py", "train_examples": 2000, "epochs": 3.0}
    out = []
    for task, method, score, lr in rows:
        budget = {"train_examples": 2000, "epochs": 3.0} | ({"lr": lr} if lr is not None else {})
        out.append({"task": task, "method": method, "dev": {"score": score}, "budget": budget})
    path.write_text(json.dumps({"config": config, "rows": out}), encoding="utf-8")


def test_the_best_rate_is_the_best_mean_over_the_tasks_and_incomplete_rates_do_not_compete(tmp_path):
    """LoRA: 1e-3 means 0.45, 3e-3 means 0.50 (best), 1e-2 is best on CoLA but lacks MRPC, so it is not chosen."""
    _run(tmp_path / "table.json", [("CoLA", "lora", 0.10, None), ("MRPC", "lora", 0.80, None)])
    _run(tmp_path / "x3.json", [("CoLA", "lora", 0.20, 0.003), ("MRPC", "lora", 0.80, 0.003)])
    _run(tmp_path / "x10.json", [("CoLA", "lora", 0.40, 0.01)])
    rows = collect(sorted(tmp_path.glob("*.json")), methods=["lora"], tasks=["CoLA", "MRPC"])
    assert RATES_BEFORE_SWEEP["lora"] == 1e-3  # a row without a rate ran at the rate before the sweep
    assert set(rows) == {
        ("CoLA", "lora", 0.001),
        ("MRPC", "lora", 0.001),
        ("CoLA", "lora", 0.003),
        ("MRPC", "lora", 0.003),
        ("CoLA", "lora", 0.01),
    }
    best, means = choose(rows, method="lora", tasks=["CoLA", "MRPC"], rates=[0.001, 0.003, 0.01])
    assert best == 0.003
    assert means == pytest.approx({0.001: 0.45, 0.003: 0.50})

    text = render(rows, methods=["lora"], tasks=["CoLA", "MRPC"], factors=[1, 3, 10], around="before")
    assert "| LoRA (r=8, q+v) | 0.003 | 20.0 | 80.0 | **50.0** |" in text
    assert "| LoRA (r=8, q+v) | 0.01 | 40.0 | — | — |" in text
    assert "| LoRA (r=8, q+v) | 0.001 | 0.003 | 45.0 | 50.0 |" in text  # x3 beats x1 by 5 points
    assert "Not measured: MRPC lora at 0.01." in text


def test_a_rate_within_half_a_point_of_the_start_rate_does_not_replace_it(tmp_path):
    """x3 beats x1 by 0.4 points of mean: noise at one seed, so x1 stays; by 0.6 points it wins."""
    _run(tmp_path / "a.json", [("CoLA", "lora", 0.100, None), ("CoLA", "lora", 0.104, 0.003)])
    rows = collect([tmp_path / "a.json"], methods=["lora"], tasks=["CoLA"])
    best, means = choose(rows, method="lora", tasks=["CoLA"], rates=[0.001, 0.003])
    assert best == 0.001 and means[0.003] > means[0.001]
    _run(tmp_path / "a.json", [("CoLA", "lora", 0.100, None), ("CoLA", "lora", 0.106, 0.003)])
    rows = collect([tmp_path / "a.json"], methods=["lora"], tasks=["CoLA"])
    assert choose(rows, method="lora", tasks=["CoLA"], rates=[0.001, 0.003])[0] == 0.003


def test_variants_sweep_around_their_methods_rate(tmp_path):
    """Compacter++ has no rate of its own: its rows without a rate ran at Compacter's."""
    _run(tmp_path / "a.json", [("CoLA", "compacter_pp", 0.3, None), ("CoLA", "compacter_pp", 0.4, 0.009)])
    rows = collect([tmp_path / "a.json"], methods=["compacter_pp"], tasks=["CoLA"])
    assert set(rows) == {("CoLA", "compacter_pp", 0.003), ("CoLA", "compacter_pp", 0.009)}
    best, _ = choose(rows, method="compacter_pp", tasks=["CoLA"], rates=[0.003, 0.009])
    assert best == 0.009


def test_full_fine_tuning_is_not_swept(tmp_path):
    """The sweep is over adapter defaults; asking for `full` stops before any training."""
    with pytest.raises(SystemExit, match="cannot sweep \\['full'\\]"):
        main(["--methods", "full,lora", "--dir", str(tmp_path), "--no-train"])

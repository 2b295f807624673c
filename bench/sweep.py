"""The learning-rate sweep behind the trainer's defaults: each method at multiples of its default rate.

    python bench/sweep.py --tasks CoLA,MRPC --methods bottleneck,parallel,lora --factors 1,3,10 \
        --dir sweep/ [--resume table.json] [--out sweep.md] -- [bench/quality.py budget flags]

Each (task, factor, method) is one `bench/quality.py` row trained at factor x the method's
`DEFAULT_LR` (`--around before`: x its rate before the recorded sweep; factor 1 is that rate itself,
so rows of an earlier quality table at the same budget are reused through `--resume`), written to
`DIR/TASK-xFACTOR-METHOD.json`. A rerun reuses what every file there holds, so an interrupted sweep
continues, and sweeps over different tasks or methods can share a directory. The report shows each
method's score per rate and task, and the rate with the best mean over the tasks: the value the
defaults table cites.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # run as a script: import from the repository root, not bench/ (whose http.py would shadow the stdlib's)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import log
from bench.quality import (
    HYPER_METHODS,
    PEER_ROWS,
    RATES_BEFORE_SWEEP,
    ROW_NAMES,
    _names,
    _previous_rows,
    base_method,
)

__all__ = ["choose", "collect", "main", "render", "start_rate"]

SWEPT = ("bottleneck", "parallel", "mh_parallel", "lora", "ia3", "mam", "compacter", "tiny_attention")
"""One row per key of `DEFAULT_LR` (the variants share their method's rate; prefix has its own sweep)."""


def start_rate(method: str, *, around: str = "current") -> float:
    """The rate a row's factors multiply: its method's `DEFAULT_LR` now, or before the recorded sweep."""
    from adapters.training.trainer import DEFAULT_LR

    table = RATES_BEFORE_SWEEP if around == "before" else DEFAULT_LR
    return table[base_method(method)]


def _rate(lr: float) -> float:
    """A rate as rows are keyed by it: three significant digits (3 x 1e-3 and 0.003 are one rate)."""
    return float(f"{lr:.3g}")


def _run_file(directory: Path, task: str, factor: float, method: str) -> Path:
    return directory / f"{task}-x{factor:g}-{method}.json"


def collect(paths: list[Path], *, methods: list[str], tasks: list[str]) -> dict[tuple[str, str, float], dict]:
    """Rows of quality runs by (task, method, rate); rows that predate recorded rates count at the rate they ran at."""
    rows, _ = _previous_rows([p for p in paths if p.exists()])
    return {
        (task, method, _rate(row["budget"]["lr"])): row
        for (task, method, _), row in rows.items()
        if task in tasks and method in methods
    }


MARGIN = 0.005
"""A rate replaces the start rate (the first one) only when its mean is better by more than this
(0.5 points): below it, one seed on these dev sets cannot tell the two apart."""


def choose(
    rows: dict[tuple[str, str, float], dict], *, method: str, tasks: list[str], rates: list[float]
) -> tuple[float | None, dict[float, float]]:
    """Mean dev score per rate over the tasks every such rate was measured on, and the rate chosen:
    the best mean, unless it beats the start rate (`rates[0]`) by no more than `MARGIN`."""
    means = {}
    for lr in rates:
        scores = [rows[(t, method, lr)]["dev"]["score"] for t in tasks if (t, method, lr) in rows]
        if len(scores) == len(tasks):
            means[lr] = sum(scores) / len(scores)
    if not means:
        return None, means
    best = max(means, key=means.get)
    start = rates[0]
    if start in means and means[best] - means[start] <= MARGIN:
        best = start
    return best, means


def render(
    rows: dict[tuple[str, str, float], dict],
    *,
    methods: list[str],
    tasks: list[str],
    factors: list[float],
    around: str = "current",
) -> str:
    """The sweep as markdown: score per method, rate and task; the best mean rate in bold."""
    lines = [
        "| method | rate | " + " | ".join(tasks) + " | mean |",
        "|---|---:|" + "---:|" * (len(tasks) + 1),
    ]
    summary = [
        "| method | start rate (x1) | chosen rate | mean at x1 | mean at chosen |",
        "|---|---:|---:|---:|---:|",
    ]
    missing = []
    for method in methods:
        base = _rate(start_rate(method, around=around))
        # the start rate first: it is what every other rate must beat
        rates = [base, *(r for r in (_rate(base * f) for f in factors) if r != base)]
        best, means = choose(rows, method=method, tasks=tasks, rates=rates)
        for lr in rates:
            cells = []
            for task in tasks:
                row = rows.get((task, method, lr))
                cells.append(f"{100 * row['dev']['score']:.1f}" if row else "—")
                if row is None:
                    missing.append(f"{task} {method} at {lr:g}")
            mean = f"{100 * means[lr]:.1f}" if lr in means else "—"
            if lr == best:
                mean = f"**{mean}**"  # the rate chosen
            lines.append(f"| {ROW_NAMES[method]} | {lr:g} | " + " | ".join(cells) + f" | {mean} |")
        if best is not None:
            at_default = f"{100 * means[base]:.1f}" if base in means else "—"
            summary.append(
                f"| {ROW_NAMES[method]} | {base:g} | {best:g} | {at_default} | {100 * means[best]:.1f} |"
            )
        else:
            summary.append(f"| {ROW_NAMES[method]} | {base:g} | not measured | | |")
    out = [
        *lines,
        "",
        "Rate chosen over "
        + ", ".join(tasks)
        + " (the best mean of the rates with every task measured; the x1 rate unless beaten by more than"
        + f" {100 * MARGIN:g} points):",
        "",
        *summary,
    ]
    if missing:
        out += ["", "Not measured: " + ", ".join(missing) + "."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Train the (task, factor, method) rows not yet measured, then write the sweep's report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passed: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, passed = argv[:at], argv[at + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Arguments after -- go to bench/quality.py: the budget (--train-examples, --epochs-for, ...).",
    )
    p.add_argument("--tasks", default="CoLA,MRPC")
    p.add_argument("--methods", default=",".join(SWEPT))
    p.add_argument("--factors", default="1,3,10", help="multiples of each method's default rate (comma list)")
    p.add_argument(
        "--around",
        choices=("current", "before"),
        default="current",
        help="what the factors multiply: each method's DEFAULT_LR, or its rate before the recorded sweep",
    )
    p.add_argument(
        "--dir", type=Path, required=True, help="one quality JSON per (task, factor, method) is kept here"
    )
    p.add_argument(
        "--resume", type=Path, action="append", default=[], help="earlier quality runs' --json files to reuse"
    )
    p.add_argument("--out", type=Path, help="write the report here (default: DIR/sweep.md)")
    p.add_argument("--no-train", action="store_true", help="only write the report from what was measured")
    args = p.parse_args(argv)
    tasks, methods = _names(args.tasks), _names(args.methods)
    factors = [float(f) for f in _names(args.factors)]
    unknown = [m for m in methods if m not in ROW_NAMES or m == "full" or m in (*PEER_ROWS, *HYPER_METHODS)]
    if unknown:
        raise SystemExit(f"cannot sweep {unknown}: the sweep is over adapter methods with a default rate")
    args.dir.mkdir(parents=True, exist_ok=True)
    if not args.no_train:
        from bench import quality

        for factor in factors:
            for task in tasks:
                for method in methods:
                    # one file per row: runs over other methods or tasks never overwrite it
                    path = _run_file(args.dir, task, factor, method)
                    lr = start_rate(method, around=args.around) * factor
                    resume = [p for p in [*args.resume, *_measured(args.dir)] if p.exists()]
                    quality.main(
                        [
                            *passed,
                            f"--tasks={task}",
                            f"--methods={method}",
                            f"--lr-for={method}={lr:.3g}",
                            *[f"--resume={r}" for r in resume],
                            f"--json={path}",
                            f"--out={path.with_suffix('.md')}",
                        ]
                    )
                    _write(args, tasks=tasks, methods=methods, factors=factors)
    _write(args, tasks=tasks, methods=methods, factors=factors)
    return 0


def _measured(directory: Path) -> list[Path]:
    return sorted(directory.glob("*-x*.json"))


def _write(args, *, tasks: list[str], methods: list[str], factors: list[float]) -> None:
    paths = [*args.resume, *_measured(args.dir)]
    rows = collect(paths, methods=methods, tasks=tasks)
    text = render(rows, methods=methods, tasks=tasks, factors=factors, around=args.around)
    out = args.out or args.dir / "sweep.md"
    out.write_text(text, encoding="utf-8")
    log(f"sweep report: {out} ({len(rows)} rows from {len(paths)} files)")


if __name__ == "__main__":
    raise SystemExit(main())

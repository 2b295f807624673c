"""Mutation testing of the modules that hold the product's promises, each against its own tests.

Every module runs in its own scratch copy of the project under `.mutation/<module>/` (a snapshot of
the working tree, or of a commit with `--ref`), so mutmut's `mutants/` tree, its caches and the
mutated sources never touch the checkout, and edits made while it runs do not leak into a run.

    python scripts/mutation.py                     # every module
    python scripts/mutation.py store/local.py      # one module
    python scripts/mutation.py --ref HEAD --jobs 1 --minutes 20

It prints killed/total per module and lists every mutant that was not killed; `--show` prints each
one's diff. Needs the `mutation` extra (`pip install -e .[mutation]`). Not part of CI: too slow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".mutation"
# What a scratch copy needs: the packages (the module under test imports its neighbours) and the tests.
COPIED = ("adapters", "store", "service", "tests", "pyproject.toml")


@dataclass(frozen=True)
class Target:
    """One module, the test selection (pytest arguments) meant to kill its mutants, a per-test limit."""

    module: str
    tests: tuple[str, ...]
    # Seconds one test may take before pytest-timeout fails it: many mutants make a test wait forever,
    # and this turns the hang into a kill within a bounded time. Generous next to each file's slowest test.
    test_timeout_s: int = 15


STORE_TESTS = (
    "tests/unit/test_store_durable.py",
    "tests/unit/test_store_usage.py",
    "tests/unit/test_store_recovery.py",
    "tests/unit/test_store_local.py",
    "tests/unit/test_store_contract.py",
    "tests/unit/test_store_power_loss.py",
    "tests/unit/test_artifact_rules.py",
)

TARGETS = (
    Target("store/local.py", STORE_TESTS, test_timeout_s=20),
    Target("store/durable.py", STORE_TESTS, test_timeout_s=20),
    Target(
        "service/cache.py",
        (
            "tests/unit/test_cache_tiers.py",
            "tests/unit/test_cache_accounting.py",
            "tests/integration/test_api_residency.py",
            "tests/integration/test_hypernet_api.py",
        ),
        test_timeout_s=8,
    ),
    # Its slowest test takes 0.02 s.
    Target(
        "service/batcher.py",
        (
            "tests/unit/test_batcher.py",
            "tests/unit/test_batcher_admission.py",
            "tests/unit/test_batcher_accounting.py",
        ),
        test_timeout_s=3,
    ),
    Target(
        "service/registry.py",
        (
            "tests/unit/test_registry.py",
            "tests/integration/test_api.py",
            "tests/integration/test_api_residency.py",
            "tests/integration/test_hypernet_api.py",
        ),
    ),
    Target(
        "service/decode.py",
        (
            "tests/unit/test_decoder.py",
            "tests/unit/test_no_pickle.py",
            "tests/integration/test_api.py",
            "tests/integration/test_battery_uploads.py",
            "tests/integration/test_hypernet_api.py",
        ),
    ),
    Target(
        "adapters/banks.py",
        (
            "tests/unit/test_formulas.py",
            "tests/unit/test_concurrent_forwards.py",
            "tests/unit/test_outside_references.py",
            "tests/unit/test_banks.py",
            # The contract table on the BERT family only: every method, every bank, a tenth of the time.
            "tests/unit/test_contract.py",
            "-k",
            "not test_contract.py or bert",
        ),
    ),
)
BY_MODULE = {t.module: t for t in TARGETS}


def snapshot(dest: Path, ref: str | None) -> None:
    """Copy the packages and tests of the working tree (or of commit `ref`) into `dest`."""
    dest.mkdir(parents=True)
    if ref is None:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, dest / name, ignore=ignore)
            else:
                shutil.copy2(src, dest / name)
        return
    with tempfile.TemporaryFile() as fh:
        subprocess.run(["git", "archive", "--format=tar", ref, *COPIED], cwd=ROOT, stdout=fh, check=True)
        fh.seek(0)
        with tarfile.open(fileobj=fh) as tar:
            tar.extractall(dest, filter="data")


def configure(dest: Path, target: Target) -> None:
    """Append the [tool.mutmut] section for one module to the scratch copy's pyproject.toml."""
    tests = [t for t in target.tests if t.startswith("-") or (dest / t.split("::")[0]).exists()]
    for i, t in enumerate(target.tests):
        # A `-k` expression belongs to the option before it.
        if i and target.tests[i - 1] == "-k" and t not in tests:
            tests.append(t)
    section = {
        "source_paths": ["adapters", "store", "service"],
        "only_mutate": [target.module],
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-p", "no:cacheprovider", f"--timeout={target.test_timeout_s}"],
        # mutmut's own limit (a multiple of the covering tests' measured time) stays as a backstop.
        "timeout_multiplier": 3.0,
        "use_git_change_detection": False,
        "use_setproctitle": False,
    }
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in section.items()]
    with open(dest / "pyproject.toml", "a") as fh:
        fh.write("\n".join(lines) + "\n")


def statuses(dest: Path, module: str) -> dict[str, str]:
    """Mutant name -> mutmut's status, read from the run's meta file."""
    from mutmut.stats import status_by_exit_code

    meta = dest / "mutants" / (module + ".meta")
    if not meta.exists():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: status_by_exit_code[code] for name, code in sorted(codes.items())}


def stop(proc: subprocess.Popen) -> None:
    """End a mutmut run and its workers (its own process group)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_one(target: Target, *, ref: str | None, jobs: int, minutes: float, show: bool) -> dict:
    """Mutation-test one module in a fresh scratch copy; return its counts and the mutants not killed."""
    dest = SCRATCH / target.module.replace("/", "_").removesuffix(".py")
    if dest.exists():
        shutil.rmtree(dest)
    snapshot(dest, ref)
    configure(dest, target)
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"
    )
    log_path = dest / "mutmut.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)],
            cwd=dest,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=minutes * 60)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            # The whole process group, mutmut's forked workers with it (also on Ctrl-C).
            if proc.poll() is None:
                stop(proc)
    found = statuses(dest, target.module)
    counts: dict[str, int] = {}
    for status in found.values():
        counts[status] = counts.get(status, 0) + 1
    not_killed = {name: status for name, status in found.items() if status != "killed"}
    result = {
        "module": target.module,
        "killed": counts.get("killed", 0),
        "total": len(found),
        "counts": counts,
        "not_killed": not_killed,
        "minutes": round((time.monotonic() - start) / 60, 1),
        "timed_out": rc is None,
        "exit_code": rc,
        "log": str(log_path.relative_to(ROOT)),
    }
    if show:
        diffs = {}
        for name in not_killed:
            out = subprocess.run(
                [sys.executable, "-m", "mutmut", "show", name],
                cwd=dest,
                env=env,
                capture_output=True,
                text=True,
            )
            diffs[name] = out.stdout
        result["diffs"] = diffs
    return result


_DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
names = json.loads(sys.argv[1])
print(json.dumps({n: get_diff_for_mutant(n, path=sys.argv[2]) for n in names}))
"""


def changed_lines(dest: Path, module: str, names: list[str]) -> dict[str, list[str]]:
    """The removed and added lines of each named mutant of a finished run (one process for all)."""
    if not names:
        return {}
    out = subprocess.run(
        [sys.executable, "-c", _DIFFS, json.dumps(names), module],
        cwd=dest,
        capture_output=True,
        text=True,
        check=True,
    )
    diffs = json.loads(out.stdout)
    return {
        n: [ln for ln in d.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
        for n, d in diffs.items()
    }


def report(targets: list[Target]) -> str:
    """Markdown: every mutant of the last runs that survived or had no test, with its changed lines."""
    parts = []
    for target in targets:
        dest = SCRATCH / target.module.replace("/", "_").removesuffix(".py")
        found = statuses(dest, target.module)
        if not found:
            continue
        counts: dict[str, int] = {}
        for status in found.values():
            counts[status] = counts.get(status, 0) + 1
        # Killed and timed-out mutants were detected; not-checked ones were never run: only counted.
        left = {n: s for n, s in found.items() if s not in ("killed", "timeout", "not checked")}
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        parts.append(f"## {target.module}: {counts.get('killed', 0)}/{len(found)} killed ({summary})\n")
        lines = changed_lines(dest, target.module, list(left))
        for name, status in left.items():
            short = name.removeprefix(target.module.removesuffix(".py").replace("/", ".") + ".")
            parts.append(f"- `{short}` ({status})")
            parts.extend(f"  `{ln.strip()[:150]}`" for ln in lines.get(name, []))
        parts.append("")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the selected modules (all by default) and print the score of each."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "modules", nargs="*", help=f"modules to test (default: all of {', '.join(BY_MODULE)})"
    )
    parser.add_argument("--ref", help="test this commit instead of the working tree")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested in parallel (default 2)")
    parser.add_argument("--minutes", type=float, default=20.0, help="time limit per module (default 20)")
    parser.add_argument("--show", action="store_true", help="print the diff of every mutant not killed")
    parser.add_argument(
        "--report",
        metavar="FILE",
        help="run nothing: write the mutants the last runs left alive, as markdown",
    )
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in BY_MODULE]
    if unknown:
        parser.error(f"not a mutation-tested module: {', '.join(unknown)}")
    targets = [BY_MODULE[m] for m in args.modules] if args.modules else list(TARGETS)
    if args.report:
        Path(args.report).write_text(report(targets))
        return 0
    SCRATCH.mkdir(exist_ok=True)
    results = []
    for target in targets:
        print(f"== {target.module}: mutating, tests {' '.join(target.tests)}", flush=True)
        result = run_one(target, ref=args.ref, jobs=args.jobs, minutes=args.minutes, show=args.show)
        results.append(result)
        score = 100 * result["killed"] / result["total"] if result["total"] else 0.0
        note = " (time limit reached: the rest not checked)" if result["timed_out"] else ""
        print(
            f"   {result['killed']}/{result['total']} killed ({score:.1f}%) in {result['minutes']} min{note}; "
            f"{result['counts']}; log {result['log']}"
        )
        for name, status in result["not_killed"].items():
            print(f"   {status:>12}  {name}")
            if args.show:
                print("".join("      " + line + "\n" for line in result["diffs"][name].splitlines()))
        (SCRATCH / "summary.json").write_text(json.dumps(results, indent=2))
        (SCRATCH / (target.module.replace("/", "_").removesuffix(".py") + ".json")).write_text(
            json.dumps(result, indent=2)
        )
    print("\nmodule                 killed/total  score")
    for r in results:
        score = 100 * r["killed"] / r["total"] if r["total"] else 0.0
        print(f"{r['module']:<22} {r['killed']:>5}/{r['total']:<6}  {score:5.1f}%")
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

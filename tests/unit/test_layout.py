"""The training package stands apart: the serving core never imports it, and it has no import circle.

Two checks: a static one over every module's imports (lazy ones inside functions included), and a
real one that builds the app and runs a forward in a fresh interpreter where importing
`adapters.training` fails.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAINING = "adapters.training"
# The command line registers `train` and `train-hyper`: the one serving-side module allowed to.
ALLOWED = {REPO / "service" / "cli.py"}


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _serving_files() -> list[Path]:
    files = [p for pkg in ("adapters", "service", "store") for p in sorted((REPO / pkg).rglob("*.py"))]
    return [p for p in files if "training" not in p.relative_to(REPO).parts and p not in ALLOWED]


def test_no_serving_module_imports_training() -> None:
    """adapters/ (outside training/), service/ and store/ never name the training package."""
    offenders = {
        str(p.relative_to(REPO)): sorted(
            m for m in _imports(p) if m == TRAINING or m.startswith(TRAINING + ".")
        )
        for p in _serving_files()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_training_modules_import_each_other_without_a_circle() -> None:
    """The import graph inside adapters/training/ is acyclic (data <- export, prefix <- trainer <- hyper <- cli)."""
    files = sorted((REPO / "adapters" / "training").glob("*.py"))
    names = {_module(p) for p in files}
    graph = {_module(p): {m for m in _imports(p) if m in names and m != _module(p)} for p in files}
    graph[TRAINING] = set()  # the package's __init__ only documents it
    seen: dict[str, int] = {}

    def visit(node: str, path: tuple[str, ...]) -> None:
        if seen.get(node) == 1:
            raise AssertionError(f"import circle: {' -> '.join((*path, node))}")
        if seen.get(node) == 2:
            return
        seen[node] = 1
        for dep in sorted(graph[node]):
            visit(dep, (*path, node))
        seen[node] = 2

    for node in sorted(graph):
        visit(node, ())
    assert graph.get("adapters.training.cli")


BLOCKED = f"""
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == {TRAINING!r} or name.startswith({TRAINING!r} + "."):
            raise ImportError("training is blocked: " + name)
        return None

sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(REPO / "tests")!r})

import torch
from helpers import tiny_bert
from adapters.backbone import Backbone
from adapters.model import BankConfig, MultiTaskModel
from service.app import create_app
from service.settings import Settings
import service.engine, service.registry, service.runtime, service.routes, adapters.formats, adapters.hypernet

model = MultiTaskModel(Backbone.from_model(tiny_bert(0), tokenizer=None, name="tiny"), banks=BankConfig(slots=2))
ids = torch.tensor([[2, 5, 6, 3]])
model.hidden(ids, torch.ones_like(ids), torch.tensor([0]))
create_app(Settings(store={{store!r}}, seed_dir=None))
assert not any(m.startswith({TRAINING!r}) for m in sys.modules), sorted(sys.modules)
print("served without training")
"""


def test_the_serving_path_runs_with_training_unimportable(tmp_path: Path) -> None:
    """A fresh interpreter where importing adapters.training raises builds the app and runs a forward."""
    code = BLOCKED.replace("{store!r}", repr(str(tmp_path / "store")))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "served without training" in done.stdout

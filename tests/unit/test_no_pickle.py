"""Static check: nothing on an upload or serving path can unpickle (torch.load, pickle and friends).

The one exception is the offline importer (`adapterserve import ... --allow-pickle`) in
adapters/formats, which may call torch.load only with weights_only=True and only behind that flag.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "store", "adapters")
OFFLINE_IMPORTER = REPO / "adapters" / "formats"
# Modules whose load functions run arbitrary code from the bytes they read.
UNSAFE_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
    "pickletools",
}
UNSAFE_CALLS = {
    ("torch", "load"),
    ("torch.serialization", "load"),
    ("torch.jit", "load"),
    ("torch", "package"),
    ("numpy", "load"),
    ("np", "load"),
}


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 30, "the packages were not found"
    return files


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def findings(path: Path) -> list[tuple[int, str]]:
    """(line, what) of every unpickling construct in one source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, f"import {a.name}")
                for a in node.names
                if a.name.split(".")[0] in UNSAFE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            if root in UNSAFE_MODULES:
                found.append((node.lineno, f"from {node.module} import ..."))
            for alias in node.names:
                if (node.module, alias.name) in UNSAFE_CALLS:
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func) or ""
            module, _, attr = name.rpartition(".")
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if (module, attr) in UNSAFE_CALLS:
                if attr == "load" and module in ("numpy", "np"):
                    flag = keywords.get("allow_pickle")
                    if not (isinstance(flag, ast.Constant) and flag.value is True):
                        continue
                found.append((node.lineno, f"{name}(...)"))
            weights_only = keywords.get("weights_only")
            if weights_only is not None and not (
                isinstance(weights_only, ast.Constant) and weights_only.value is True
            ):
                found.append((node.lineno, "weights_only not literally True"))
            if "pickle_module" in keywords:
                found.append((node.lineno, "pickle_module="))
    return found


def test_no_unpickling_on_upload_or_serving_paths() -> None:
    bad = [
        f"{path.relative_to(REPO)}:{line}: {what}"
        for path in _sources()
        if not path.is_relative_to(OFFLINE_IMPORTER)
        for line, what in findings(path)
    ]
    assert bad == [], "unpickling on a serving or upload path:\n" + "\n".join(bad)


def test_the_offline_importer_loads_pickles_only_weights_only_and_behind_the_flag() -> None:
    for path in sorted(OFFLINE_IMPORTER.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            loads = [
                n
                for n in ast.walk(func)
                if isinstance(n, ast.Call) and (_dotted(n.func) or "").endswith("torch.load")
            ]
            if not loads:
                continue
            assert "allow_pickle" in [a.arg for a in func.args.args + func.args.kwonlyargs], (path, func.name)
            for call in loads:
                flag = {k.arg: k.value for k in call.keywords}.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, (path, call.lineno)
        # Only torch.load calls with weights_only=True: nothing else unpickles there either; `pickle`
        # itself may be imported for its exception type.
        uses = {
            n.attr
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "pickle"
        }
        assert uses <= {"UnpicklingError"}, (path, uses)
        rest = [f for f in findings(path) if not f[1].startswith("torch.load") and f[1] != "import pickle"]
        assert rest == [], (path, rest)


def test_the_server_never_imports_the_offline_importer() -> None:
    for path in sorted((REPO / "service").rglob("*.py")):
        if path.name == "cli.py":
            continue  # registers the `import` subcommand; it runs offline, never in the server
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("adapters.formats"), (path, node.lineno)


@pytest.mark.parametrize(
    "source",
    [
        "import pickle\npickle.loads(b'')",
        "from torch import load",
        "import torch\ntorch.load('x', weights_only=False)",
        "import torch\ntorch.load('x')",
        "import numpy as np\nnp.load('x', allow_pickle=True)",
        "import dill",
        "from joblib import load",
        "import torch\ntorch.jit.load('x')",
    ],
)
def test_the_check_finds_what_it_looks_for(tmp_path: Path, source: str) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    assert findings(path), source

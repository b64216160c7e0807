"""`pip install onnxcompress` (no extras) must be enough to import the package and run the demo.

CI installs the extras too, so a module-level import of an extra (torch, matplotlib, scikit-learn)
or of an undeclared package would pass there and break the README's first command. This test reads
every module's top-level imports and checks them against the declared core dependencies.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"yaml": "pyyaml", "onnx_ir": "onnx-ir", "onnx_graphsurgeon": "onnx-graphsurgeon"}
#: Packages that may import an extra at module level: nothing imports them at import time (distill
#: imports torch_graph inside its run), and their __init__ turns the missing extra into a one-line
#: error before any of their modules imports it (tests/test_distill.py checks that error).
EXTRA_PACKAGES = {"torch_graph": "torch"}


def _core_dependencies() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set()
    for spec in project["dependencies"]:
        name = spec.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        names.add(name.strip().lower())
    return names


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (not inside functions: those are the lazy, optional ones)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_module_level_imports_are_core_dependencies():
    declared = _core_dependencies()
    missing = {}
    for path in sorted((ROOT / "onnxcompress").rglob("*.py")):
        for module in _top_level_imports(path):
            if module in sys.stdlib_module_names or module in ("onnxcompress", "__future__"):
                continue
            if EXTRA_PACKAGES.get(path.relative_to(ROOT / "onnxcompress").parts[0]) == module:
                continue
            if DISTRIBUTIONS.get(module, module).lower() not in declared:
                missing.setdefault(module, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"imported at module level but not a core dependency: {missing}"

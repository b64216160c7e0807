"""ARCHITECTURE.md stays true: its Python examples run, and every module and symbol it maps exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcompress.analysis.channel_rules import RULES
from onnxcompress.pipeline import Pass
from tests.graphs import conv_bn_relu_gemm

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "ARCHITECTURE.md"
TABLE_HEADING = "## Where each concept lives"


def _text() -> str:
    return DOC.read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _text(), flags=re.S)


def _section(heading: str) -> str:
    text = _text()
    start = text.index(heading) + len(heading)
    end = text.find("\n## ", start)
    return text[start:] if end < 0 else text[start:end]


def _concept_rows() -> list[tuple[str, str, list[str]]]:
    """(concept, module path, symbols) for every row of the concept table."""
    rows = []
    for line in _section(TABLE_HEADING).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("Concept", "") or set(cells[0]) <= {"-"}:
            continue
        paths = re.findall(r"`([^`]+\.py)`", cells[1])
        assert len(paths) == 1, f"row '{cells[0]}': one module path expected, got {cells[1]!r}"
        rows.append((cells[0], paths[0], re.findall(r"`([^`]+)`", cells[2])))
    return rows


def _module_name(path: str) -> str:
    parts = list(Path(path).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_python_examples_run(tmp_path, monkeypatch):
    onnx.save(conv_bn_relu_gemm(), tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    registry, rules = dict(Pass.registry), dict(RULES)
    blocks = _blocks("python")
    assert len(blocks) >= 2  # how to add a pass, how to add a channel rule
    try:
        for code in blocks:
            # as a script runs it: no `from __future__` flags inherited from this module
            exec(compile(code, str(DOC), "exec", dont_inherit=True), {"__name__": "__main__"})
    finally:  # the examples register a pass and a rule: leave the tables as they were
        Pass.registry.clear()
        Pass.registry.update(registry)
        RULES.clear()
        RULES.update(rules)


def test_concept_table_names_real_modules_and_symbols():
    rows = _concept_rows()
    assert len(rows) >= 30
    missing = []
    for concept, path, symbols in rows:
        assert (ROOT / path).is_file(), f"{concept}: {path} does not exist"
        assert symbols, f"{concept}: no symbols named"
        module = importlib.import_module(_module_name(path))
        for symbol in symbols:
            target = module
            for part in symbol.split("."):
                target = getattr(target, part, None)
                if target is None:
                    missing.append(f"{path}: {symbol}")
                    break
    assert not missing, "ARCHITECTURE.md names symbols that do not exist: " + ", ".join(missing)


def test_every_path_named_exists():
    named = set(re.findall(r"\b((?:onnxcompress|tests|benchmarks)/[\w/]+\.(?:py|md|yaml|json))\b", _text()))
    assert named
    assert not [p for p in sorted(named) if not (ROOT / p).exists()]
    # short forms: `passes/prune.py`, `analysis/cost.py` (inside the package) and bare `model.py`
    inner = set(re.findall(r"(?<![\w/])((?:analysis|passes)/\w+\.py)\b", _text()))
    assert not [p for p in sorted(inner) if not (ROOT / "onnxcompress" / p).is_file()]
    files = {p.name for d in ("onnxcompress", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")}
    bare = set(re.findall(r"(?<![\w/.])(\w+\.py)\b", _text()))
    assert not sorted(bare - files)


def test_docstrings_cite_sections_that_exist():
    headings = {h.strip() for h in re.findall(r"^#+ (.+)$", _text(), flags=re.M)}
    cited = []
    for source in sorted((ROOT / "onnxcompress").rglob("*.py")):
        text = source.read_text()
        assert "DESIGN.md" not in text, f"{source.relative_to(ROOT)} cites DESIGN.md, which is not in the repository"
        cited += [(source.relative_to(ROOT), name) for name in re.findall(r'ARCHITECTURE\.md, "([^"]+)"', text)]
    assert cited
    assert not [f"{path}: {name}" for path, name in cited if name not in headings]


@pytest.mark.parametrize("name", ["Measuring", "Recovery", "Known debts", "How to add a pass", "How to add a channel rule"])
def test_sections_present(name):
    assert re.search(rf"^#+ {re.escape(name)}$", _text(), flags=re.M)

"""The README's Python examples and recipe run as written (in a folder holding a model.onnx)."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import yaml

from onnxcompress.pipeline import Pipeline
from tests.graphs import conv_bn_relu_gemm

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_examples_run(tmp_path, monkeypatch):
    onnx.save(conv_bn_relu_gemm(), tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert blocks
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
    onnx.checker.check_model(str(tmp_path / "model.clean.onnx"), full_check=True)


def test_yaml_recipe_examples_are_valid():
    pipelines = [Pipeline.from_recipe(yaml.safe_load(block)) for block in _blocks("yaml")]
    assert [[p.name for p in pipe.passes] for pipe in pipelines] == [["prune-blocks"],
                                                                     ["fold-constants", "fold-batchnorm"]]

"""The README's Python examples and recipe run as written (in a folder holding a model.onnx)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import yaml

from onnxcompress.pipeline import Pipeline
from tests.graphs import conv_bn_relu_gemm

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_examples_run(tmp_path, monkeypatch):
    onnx.save(conv_bn_relu_gemm(), tmp_path / "model.onnx")
    rng = np.random.default_rng(0)  # the files the examples read: calibration and labelled validation data
    np.save(tmp_path / "calib.npy", rng.standard_normal((32, 3, 8, 8)).astype(np.float32))
    np.save(tmp_path / "val_images.npy", rng.standard_normal((1, 3, 8, 8)).astype(np.float32))
    np.save(tmp_path / "val_labels.npy", rng.integers(0, 5, size=1))
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert blocks
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
    for name in ("model.clean.onnx", "model.opt.onnx"):
        onnx.checker.check_model(str(tmp_path / name), full_check=True)


def test_yaml_recipe_examples_are_valid():
    pipelines = [Pipeline.from_recipe(yaml.safe_load(block)) for block in _blocks("yaml")]
    assert [[p.name for p in pipe.passes] for pipe in pipelines] == [["prune-blocks"],
                                                                     ["fold-constants", "fold-batchnorm"]]


def test_the_pass_table_lists_every_registered_pass():
    from onnxcompress.pipeline import Pass

    listed = set(re.findall(r"^\| `([a-z0-9-]+)` \|", README.read_text(), flags=re.M))
    registered = {name for name, cls in Pass.registry.items() if cls.__module__.startswith("onnxcompress.")}
    assert len(registered) >= 13  # the built-in passes are registered on import
    assert registered <= listed, f"passes missing from the README table: {sorted(registered - listed)}"

"""`onnxcompress demo` (the README's first command) runs end to end on the bundled model."""

from __future__ import annotations

import json

import onnx

from onnxcompress.cli import main
from onnxcompress.demo_data import demo_model_path


def test_demo_json(tmp_path, capsys):
    before = demo_model_path().read_bytes()
    code = main(["demo", "--output-dir", str(tmp_path), "--runs", "20", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    out = tmp_path / "digits_cnn.compressed.onnx"
    assert data["output"] == str(out)
    onnx.checker.check_model(str(out), full_check=True)
    assert data["test_samples"] == 360
    assert data["accuracy_before"] > 0.99  # the bundled model's documented accuracy is 99.72%
    assert data["report"]["after"]["macs"] < data["report"]["before"]["macs"]
    assert {r["batch"] for r in data["bench"]["rows"]} == {1, 16}
    assert demo_model_path().read_bytes() == before  # the bundled model is never modified

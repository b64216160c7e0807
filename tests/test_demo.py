"""`onnxcompress demo` (the README's first command) runs end to end on the bundled model."""

from __future__ import annotations

import json

import numpy as np
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


#: The demo's accuracy drop (pruning half of every channel group, then int8 with learned weight
#: rounding) on the 360 held-out digits, on this CPU and on an emulated AVX2 CPU without VNNI:
#: measured 0.28 pt on both (one digit; nearest rounding lost two). The issue's bound is 0.5 pt.
DEMO_MAX_DROP = 0.005


def test_demo_model_keeps_its_accuracy_on_avx2(tmp_path, capsys, avx2):
    from onnxcompress.demo_data import load_test_set

    code = main(["demo", "--output-dir", str(tmp_path), "--runs", "20", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    quantize = next(p for p in data["report"]["passes"] if p["name"] == "quantize-int8")
    assert quantize["details"]["kernels"] == "any" and quantize["details"]["kernel_check"]["ok"]
    images, labels = load_test_set()
    logits = [o[0] for o in avx2(tmp_path / "digits_cnn.compressed.onnx", [{"image": images[i : i + 120]} for i in range(0, 360, 120)])]
    on_avx2 = float((np.concatenate(logits).argmax(1) == labels).mean())
    assert on_avx2 == data["accuracy_after"]  # the same codes, the same kernels' results
    assert data["accuracy_before"] - on_avx2 <= DEMO_MAX_DROP

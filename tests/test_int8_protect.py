"""Mixed precision where it pays (passes/int8_protect.py): the layers that dominate the int8 noise
stay in float within a MAC budget, only when that measures better, and really run in float in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.analysis.fusion import fusion_check
from onnxcompress.calibration import Calibration
from onnxcompress.model import load
from onnxcompress.passes.int8_protect import MIN_GAIN_DB, choose
from onnxcompress.passes.quantize import QuantizeQDQ
from onnxcompress.pipeline import PassContext
from onnxcompress.verify import compare, outputs

#: The stem's channel 0 is this many times larger than the others: per-tensor uint8 codes of the stem
#: output then leave the other channels a few levels, and the stem pair dominates the int8 noise.
OUTLIER = 60.0
CALIB, HELD = 48, 16
WIDE, DEPTH, SIZE = 48, 8, 12


def _outlier_stem_net() -> onnx.ModelProto:
    """stem 3->8 (channel 0 OUTLIER x) -> depthwise 8 (channel 0 scaled back) -> 8->WIDE -> DEPTH x WIDE->WIDE."""
    rng = np.random.default_rng(0)
    stem = rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32)
    stem[0] *= OUTLIER
    dw = rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32)
    dw[0] /= OUTLIER
    inits = {"stem": stem, "dw": dw, "expand": rng.normal(0, 0.35, (WIDE, 8, 1, 1)).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "stem"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["sr"], name="stem_relu"),
        helper.make_node("Conv", ["sr", "dw"], ["d"], name="depthwise", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Relu", ["d"], ["dr"], name="dw_relu"),
        helper.make_node("Conv", ["dr", "expand"], ["h0"], name="expand"),
    ]
    for k in range(DEPTH):
        inits[f"w{k}"] = rng.normal(0, 1.4 / np.sqrt(WIDE), (WIDE, WIDE, 1, 1)).astype(np.float32)
        nodes += [helper.make_node("Relu", [f"h{k}"], [f"r{k}"], name=f"relu{k}"),
                  helper.make_node("Conv", [f"r{k}", f"w{k}"], [f"h{k + 1}"], name=f"pw{k}")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(f"h{DEPTH}", TensorProto.FLOAT, ["n", WIDE, SIZE, SIZE])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _quantize(**options):
    proto = _outlier_stem_net()
    data = np.random.default_rng(1).normal(0, 1, (CALIB + HELD, 3, SIZE, SIZE)).astype(np.float32)
    model = load(proto)
    calib = Calibration.from_arrays(model, {"x": data[:CALIB]})
    result = QuantizeQDQ(outliers="off", **options).run(load(model), PassContext(calibration=calib, model=model))
    feeds = [{"x": data[i:i + 4]} for i in range(CALIB, CALIB + HELD, 4)]
    sqnr = compare(outputs(model, feeds, "float"), outputs(result.model, feeds, "int8"), "held out").sqnr_db
    return result, sqnr


@pytest.fixture(scope="module")
def protected():
    return _quantize()


def test_dominant_stem_pair_stays_float_and_pays(protected):
    result, sqnr = protected
    record = result.record.details["mixed_precision"]
    assert record["outcome"] == "kept"
    assert {k["node"] for k in record["kept_float"]} == {"stem", "depthwise"}
    assert record["macs_share"] <= QuantizeQDQ().float_budget
    assert record["sqnr_after"] >= record["sqnr_before"] + MIN_GAIN_DB
    _, plain = _quantize(float_budget=0.0)
    assert sqnr >= plain + MIN_GAIN_DB, (sqnr, plain)
    # the two float layers run as float convs in ORT, everything else in int8 kernels
    report = fusion_check(result.model)
    assert sum(report.float_compute.values()) == 2 and report.int8.get("QLinearConv") == DEPTH + 1, report.summary()
    assert any(s.startswith("stem: kept in float") for s in result.record.skipped)


def test_budget_zero_keeps_everything_int8():
    result, _ = _quantize(float_budget=0.0)
    assert result.record.details["mixed_precision"] is None
    assert fusion_check(result.model).float_compute == {}


def test_choose_takes_dominant_layers_by_noise_per_mac_within_budget():
    # 20 layers; a and b dominate (noise shares 28% and 22%, over 4x the mean 5%)
    sqnr = {"a": 20.0, "b": 21.0, **{f"l{k}": 30.0 for k in range(18)}}
    macs = {"a": 10, "b": 5, **{f"l{k}": 100 for k in range(18)}}
    assert choose(sqnr, macs, 0.03) == ["b", "a"]  # b has more noise per MAC
    assert choose(sqnr, macs, 0.005) == ["b"]  # a no longer fits the budget
    assert choose(sqnr, {**macs, "b": 0}, 0.03) == ["a"]  # unknown cost never qualifies
    # five equal layers: each makes 20% of the noise, none dominates
    assert choose({f"l{k}": 25.0 for k in range(5)}, {f"l{k}": 1 for k in range(5)}, 0.9) == []
    assert choose({"a": float("inf"), "b": float("inf")}, {"a": 1, "b": 1}, 0.5) == []

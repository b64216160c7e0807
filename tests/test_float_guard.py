"""A layer kept in float between int8 layers stays in float when ONNX Runtime optimizes the model.

Without the guard (passes/float_guard.py), ORT's WeightBiasQuantization gives such a layer
per-tensor int8 weights of its own, and a depthwise conv whose channels differ in range by 100x
loses most of its precision in the fused model while the simulated graph looks fine."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.calibration import Calibration
from onnxcompress.model import load, to_proto
from onnxcompress.passes.float_guard import guard_float_layers
from onnxcompress.passes.quantize import QuantizeQDQ
from onnxcompress.pipeline import PassContext
from onnxcompress.verify import compare

#: The kept-float depthwise conv's channels: weights scaled from 1 to this (ranges 100x apart).
CHANNEL_SPREAD = 100.0
#: Fused kernels and the float simulation of the same QDQ graph agree within this (dB of output SQNR
#: against float): both only differ by int32 requantization rounding once the float layer is float.
FUSED_VS_SIMULATED_DB = 0.5
CALIB, HELD = 48, 16


def _int8_float_int8() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = 8
    w1 = rng.normal(0, 0.3, (c, 3, 3, 3)).astype(np.float32)
    dw = rng.normal(0, 1, (c, 1, 3, 3)).astype(np.float32) * np.geomspace(1, CHANNEL_SPREAD, c, dtype=np.float32)[:, None, None, None]
    w3 = rng.normal(0, 0.3, (c, c, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (dw, "dw"), (w3, "w3"))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
        helper.make_node("Conv", ["ar", "dw"], ["b"], name="depthwise", pads=[1, 1, 1, 1], group=c),
        helper.make_node("Relu", ["b"], ["br"], name="relu2"),
        helper.make_node("Conv", ["br", "w3"], ["y"], name="conv3"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", c, 12, 12])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _session(proto: onnx.ModelProto, optimized: bool, path: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if path:
        so.optimized_model_filepath = path
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _kept_float(tmp_path) -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray]:
    original = _int8_float_int8()
    data = np.random.default_rng(1).normal(0, 1, (CALIB + HELD, 3, 12, 12)).astype(np.float32)
    model = load(original)
    calib = Calibration.from_arrays(model, {"x": data[:CALIB]})
    result = QuantizeQDQ(skip_nodes=("depthwise",)).run(load(model), PassContext(calibration=calib, model=model))
    return original, to_proto(result.model, with_data=True), data[CALIB:]


def _optimized_ops(proto: onnx.ModelProto, tmp_path) -> list[str]:
    """The op types of the graph ORT runs (it renames nodes, so names cannot be followed)."""
    path = str(tmp_path / "optimized.onnx")
    _session(proto, True, path)
    return [n.op_type for n in onnx.load(path).graph.node]


def _sqnr(reference: onnx.ModelProto, candidate: onnx.ModelProto, x: np.ndarray, optimized: bool) -> float:
    ref = _session(reference, False).run(None, {"x": x})
    got = _session(candidate, optimized).run(None, {"x": x})
    return compare([ref], [got], "held out").sqnr_db


def test_kept_float_layer_runs_in_float_and_fused_matches_simulation(tmp_path):
    original, quantized, held = _kept_float(tmp_path)
    assert "depthwise" in {n.name for n in quantized.graph.node}
    optimized = _optimized_ops(quantized, tmp_path)
    # conv1 and conv3 fuse into int8 kernels; the depthwise conv stays a float Conv
    assert optimized.count("QLinearConv") == 2 and optimized.count("Conv") == 1, optimized
    assert sum(n.op_type == "DequantizeLinear" and n.input[0] == "ar_quantized" for n in quantized.graph.node) == 1
    fused, simulated = _sqnr(original, quantized, held, True), _sqnr(original, quantized, held, False)
    assert abs(fused - simulated) <= FUSED_VS_SIMULATED_DB, (fused, simulated)


def test_without_the_guard_ort_quantizes_the_float_layer(tmp_path):
    """The counterfactual that makes the guard necessary on this ORT: route the float conv back to
    the shared per-tensor DequantizeLinear and ORT fuses it into an int8 kernel with its own weights."""
    original, quantized, held = _kept_float(tmp_path)
    nodes = {n.name: n for n in quantized.graph.node}
    guard = next(n for n in quantized.graph.node if n.output[0] == nodes["depthwise"].input[0])
    del guard.attribute[:]  # per-tensor again: the same values, the form ORT rewrites
    for k, name in enumerate(guard.input[1:], 1):
        init = next(t for t in quantized.graph.initializer if t.name == name)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:1].reshape(()), name))
    assert _optimized_ops(quantized, tmp_path).count("QLinearConv") == 3
    assert _sqnr(original, quantized, held, True) < _sqnr(original, quantized, held, False) - FUSED_VS_SIMULATED_DB


def test_guard_leaves_int8_layers_and_values_alone():
    model = load(_int8_float_int8())
    assert guard_float_layers(model) == []  # no DequantizeLinear anywhere: nothing to guard
    x = np.random.default_rng(2).normal(0, 1, (2, 3, 12, 12)).astype(np.float32)
    before = _session(_int8_float_int8(), False).run(None, {"x": x})[0]
    np.testing.assert_array_equal(_session(to_proto(model), False).run(None, {"x": x})[0], before)

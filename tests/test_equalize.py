"""Equalize (cross-layer equalization): exact in float, equal per-channel ranges, better per-tensor int8."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.calibration import Calibration
from onnxcompress.errors import RecipeError
from onnxcompress.model import load
from onnxcompress.passes.equalize import (
    Equalize,
    consumer_ranges,
    find_pairs,
    producer_ranges,
)
from onnxcompress.passes.quantize import QuantizeQDQ
from onnxcompress.pipeline import PassContext, Pipeline, build_pass
from onnxcompress.verify import compare, outputs

#: max |equalized - original| / max |original| per output: float32 rounding of rescaled weights.
EXACT_RTOL = 1e-5
#: |log(r1_i / r2_i)| after equalizing a lone pair: one step is exact up to float32 weight rounding.
PAIR_LOG_TOL = 1e-6
#: The same for every pair of a two-pair chain (1x1 -> depthwise -> 1x1) after enough sweeps to
#: converge (measured: 0.72 after 1 sweep, 0.045 after 3, 3e-6 after 10, 0 after 20).
CHAIN_LOG_TOL = 1e-6
CHAIN_ITERATIONS = 20
#: int8 SQNR (dB) CLE must add on a model whose channel ranges differ by 100x (measured: +33 dB
#: per-tensor, +31 dB per-channel: the activation between the pair is per-tensor either way).
IMBALANCED_MIN_GAIN_DB = 25.0
IMBALANCE = 100.0
CALIB, HELD_OUT = 64, 32


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _model(nodes, inits, x_shape, y_shape, inputs=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape]), *inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *y_shape])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv_relu_conv(seed: int = 0, imbalance: float = 1.0, activation: str | None = "Relu") -> onnx.ModelProto:
    """Conv(3->16, 3x3) -> Relu -> Conv(16->16, 3x3). With `imbalance` != 1, every other filter of
    conv1 (and its bias) is scaled up by it and the matching input columns of conv2 down by it: the
    same function (Relu is positively homogeneous) with badly spread per-channel weight ranges."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(0, 0.3, (16, 3, 3, 3)), rng.normal(0, 0.1, 16)
    w2, b2 = rng.normal(0, 0.1, (16, 16, 3, 3)), rng.normal(0, 0.1, 16)
    scale = np.where(np.arange(16) % 2 == 0, imbalance, 1.0)
    w1, b1, w2 = w1 * scale[:, None, None, None], b1 * scale, w2 / scale[None, :, None, None]
    mid = "c1" if activation is None else "r1"
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4)]
    if activation is not None:
        nodes.append(helper.make_node(activation, ["c1"], ["r1"], name="act1"))
    nodes.append(helper.make_node("Conv", [mid, "w2", "b2"], ["y"], name="conv2", pads=[1] * 4))
    inits = [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", b2)]
    return _model(nodes, inits, (3, 16, 16), (16, 16, 16))


def _inverted_bottleneck(seed: int = 0) -> onnx.ModelProto:
    """MobileNet's chain: 1x1 expand -> Relu -> 3x3 depthwise -> Relu -> 1x1 project (no bias)."""
    rng = np.random.default_rng(seed)
    # Per-channel magnitudes that differ a lot, as folded BatchNorm leaves them.
    gain = rng.uniform(0.05, 5.0, 24)
    inits = [
        _init("wa", rng.normal(0, 0.3, (24, 8, 1, 1)) * gain[:, None, None, None]), _init("ba", rng.normal(0, 0.1, 24)),
        _init("wd", rng.normal(0, 0.3, (24, 1, 3, 3)) / gain[:, None, None, None]), _init("bd", rng.normal(0, 0.1, 24)),
        _init("wc", rng.normal(0, 0.2, (8, 24, 1, 1))),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="expand"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "wd", "bd"], ["d"], name="depthwise", group=24, pads=[1] * 4),
        helper.make_node("Relu", ["d"], ["rd"], name="relu_d"),
        helper.make_node("Conv", ["rd", "wc"], ["y"], name="project"),
    ]
    return _model(nodes, inits, (8, 8, 8), (8, 8, 8))


def _gemm_relu_matmul(seed: int = 0) -> onnx.ModelProto:
    """Gemm(transB, 12 -> 20) -> Relu -> MatMul(20 -> 6): the dense pair."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", rng.normal(0, 0.3, (20, 12)) * rng.uniform(0.1, 3.0, (20, 1))),
             _init("b1", rng.normal(0, 0.1, 20)), _init("w2", rng.normal(0, 0.3, (20, 6)))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g"], name="fc1", transB=1),
             helper.make_node("Relu", ["g"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return _model(nodes, inits, (12,), (6,))


def _data(shape: tuple[int, ...], n: int = CALIB + HELD_OUT, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype(np.float32)


def _equalize(model, **options):
    model = load(model)
    return Equalize(**options).run(model, PassContext(model=model))


def _assert_exact(original, equalized, feeds) -> None:
    ref, got = outputs(load(original), feeds, "original"), outputs(equalized, feeds, "equalized")
    for r_sample, g_sample in zip(ref, got):
        for r, g in zip(r_sample, g_sample):
            assert np.max(np.abs(g - r)) <= EXACT_RTOL * np.max(np.abs(r))


def _log_imbalance(model) -> list[float]:
    """max_i |log(r1_i / r2_i)| of every pair the model holds."""
    return [float(np.max(np.abs(np.log(producer_ranges(p) / consumer_ranges(p))))) for p in find_pairs(model)[0]]


def test_conv_relu_conv_is_exact_and_equalized():
    proto = _conv_relu_conv(imbalance=IMBALANCE)
    result = _equalize(proto)
    _assert_exact(proto, result.model, [{"x": _data((3, 16, 16), n=4)}])
    (pair,) = result.record.details["pairs"]
    assert (pair["producer"], pair["consumer"], pair["activation"]) == ("conv1", "conv2", "Relu")
    assert pair["equalized_channels"] == 16
    assert max(_log_imbalance(result.model)) <= PAIR_LOG_TOL
    assert pair["max_log_imbalance"] <= PAIR_LOG_TOL
    assert _log_imbalance(load(proto))[0] > np.log(IMBALANCE) / 2  # the check above is not vacuous
    assert pair["producer_spread"][1] < pair["producer_spread"][0] / 10


@pytest.mark.parametrize("activation", [None, "LeakyRelu"])
def test_direct_and_leaky_relu_pairs_are_exact(activation):
    proto = _conv_relu_conv(imbalance=IMBALANCE, activation=activation)
    result = _equalize(proto)
    _assert_exact(proto, result.model, [{"x": _data((3, 16, 16), n=4)}])
    assert result.record.details["pairs"][0]["activation"] == activation
    assert max(_log_imbalance(result.model)) <= PAIR_LOG_TOL


def test_depthwise_chain_is_exact_and_converges():
    proto = _inverted_bottleneck()
    feeds = [{"x": _data((8, 8, 8), n=4)}]
    few, many = _equalize(proto, iterations=1), _equalize(proto, iterations=CHAIN_ITERATIONS)
    for result in (few, many):
        _assert_exact(proto, result.model, feeds)
        pairs = result.record.details["pairs"]
        assert [(p["producer"], p["consumer"]) for p in pairs] == [("expand", "depthwise"), ("depthwise", "project")]
    # The last pair swept is exact after any sweep; the first one converges as sweeps repeat.
    assert _log_imbalance(few.model)[1] <= PAIR_LOG_TOL
    assert max(_log_imbalance(many.model)) <= CHAIN_LOG_TOL < _log_imbalance(few.model)[0]


def test_dense_gemm_matmul_pair_is_exact_and_equalized():
    proto = _gemm_relu_matmul()
    result = _equalize(proto)
    _assert_exact(proto, result.model, [{"x": _data((12,), n=8)}])
    assert [(p["producer"], p["consumer"]) for p in result.record.details["pairs"]] == [("fc1", "fc2")]
    assert max(_log_imbalance(result.model)) <= PAIR_LOG_TOL


def test_zoo_mobilenet_v2_is_exact(tmp_path_factory):
    pytest.importorskip("torch")
    from tests import zoo

    path = zoo.exported(tmp_path_factory, "mobilenet_v2", dynamo=False)
    cleaned = Pipeline.from_recipe("cleanup").run(path).model
    result = _equalize(cleaned)
    feeds = [zoo.numpy_inputs("mobilenet_v2")]
    _assert_exact(cleaned, result.model, feeds)
    assert result.record.details["pairs"], "the 1x1 -> 1x1 pair between blocks is equalized"
    assert max(_log_imbalance(result.model)) <= PAIR_LOG_TOL
    # ReLU6 (Clip) blocks every pair around it, and says so.
    assert any("Clip in between" in s for s in result.record.skipped)


def _sqnr_after_int8(proto, *, cle: bool, per_channel: bool) -> float:
    data = _data((3, 16, 16))
    model = _equalize(proto).model if cle else load(proto)
    calib = Calibration.from_arrays(model, {"x": data[:CALIB]})
    q = QuantizeQDQ(per_channel=per_channel).run(load(model), PassContext(calibration=calib, model=model)).model
    feeds = [{"x": data[i : i + 8]} for i in range(CALIB, len(data), 8)]
    return compare(outputs(load(proto), feeds, "float"), outputs(q, feeds, "int8"), "held out").sqnr_db


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_cle_raises_int8_sqnr_on_imbalanced_ranges(per_channel):
    proto = _conv_relu_conv(imbalance=IMBALANCE)
    without = _sqnr_after_int8(proto, cle=False, per_channel=per_channel)
    with_cle = _sqnr_after_int8(proto, cle=True, per_channel=per_channel)
    assert with_cle >= without + IMBALANCED_MIN_GAIN_DB, (without, with_cle)


# ---------------------------------------------------------------------------- skipped pairs


def _skip_reasons(proto) -> tuple[dict, list[str]]:
    result = _equalize(proto)
    return result.record.details, list(result.record.skipped)


def test_unsupported_activation_is_skipped_with_reason():
    details, skipped = _skip_reasons(_conv_relu_conv(activation="Sigmoid"))
    assert details["pairs"] == []
    reason = "Sigmoid in between (only Relu, LeakyRelu or nothing keeps the rescaling exact: f(x / s) = f(x) / s)"
    assert skipped == [f"conv1 -> Sigmoid -> conv2: {reason}"]


def test_other_consumers_are_skipped_with_reason():
    proto = _conv_relu_conv()
    proto.graph.output.append(helper.make_tensor_value_info("r1", TensorProto.FLOAT, None))
    details, skipped = _skip_reasons(proto)
    assert details["pairs"] == [] and skipped == ["conv1 -> conv2: conv1 output has other consumers"]


def test_shared_weight_is_skipped_with_reason():
    proto = _conv_relu_conv()
    # conv3 reads conv2's weight too: rescaling it for the pair would change conv3.
    proto.graph.node.append(helper.make_node("Conv", ["y", "w2"], ["z"], name="conv3", pads=[1] * 4))
    proto.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    details, skipped = _skip_reasons(proto)
    assert details["pairs"] == []
    assert "conv1 -> conv2: conv2 weight is shared with other nodes" in skipped


def test_non_constant_weight_is_skipped_with_reason():
    proto = _conv_relu_conv()
    w2 = next(t for t in proto.graph.initializer if t.name == "w2")
    proto.graph.initializer.remove(w2)
    proto.graph.input.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [16, 16, 3, 3]))
    details, skipped = _skip_reasons(proto)
    assert details["pairs"] == [] and skipped == ["conv1 -> conv2: conv2 weight is not a constant"]


def test_dead_channels_are_left_alone():
    proto = _conv_relu_conv()
    w1 = next(t for t in proto.graph.initializer if t.name == "w1")
    array = numpy_helper.to_array(w1).copy()
    array[3] = 0.0  # a dead filter: no finite scale equalizes it
    w1.CopyFrom(_init("w1", array))
    result = _equalize(proto)
    _assert_exact(proto, result.model, [{"x": _data((3, 16, 16), n=4)}])
    assert result.record.details["pairs"][0]["equalized_channels"] == 15
    assert np.all(np.isfinite(numpy_helper.to_array(_initializer(result.model, "w2"))))


def _initializer(model, name: str) -> onnx.TensorProto:
    from onnxcompress.model import to_proto

    return next(t for t in to_proto(model).graph.initializer if t.name == name)


def test_bad_options_are_one_line_errors():
    with pytest.raises(RecipeError, match="iterations"):
        build_pass({"type": "equalize", "iterations": 0})
    with pytest.raises(RecipeError, match="min_range"):
        build_pass({"type": "equalize", "min_range": -1.0})

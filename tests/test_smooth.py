"""SmoothQuant: exact in float on every absorb route, balanced ranges, and better int8 on outliers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.analysis.activations import collect
from onnxcompress.calibration import Calibration
from onnxcompress.errors import OnnxCompressError
from onnxcompress.model import load
from onnxcompress.passes.quantize import QuantizeQDQ
from onnxcompress.passes.smooth import SmoothQuant, smoothing_factors
from onnxcompress.pipeline import PassContext, Pipeline, build_pass
from onnxcompress.verify import compare, outputs

D, HIDDEN, SEQ = 16, 32, 6
#: Float exactness: the pipeline itself fails an exact pass beyond VerifyOptions.rtol (1e-4); the
#: rescaling only adds float32 rounding, which stays far below that.
EXACT_RTOL = 1e-5
#: Injected outlier channels: LayerNorm scale multiplied by this on OUTLIER_CHANNELS (the size of
#: the systematic outliers in BERT/LLM LayerNorm outputs).
OUTLIER_FACTOR = 50.0
OUTLIER_CHANNELS = [3, 17, 29]
#: int8 output SQNR gain from smooth_alpha=0.5 on the zoo BERT with outliers (measured: +6.1 dB).
SMOOTH_MIN_GAIN_DB = 4.0
#: The same on the hand-built pre-norm block with two outlier channels (measured: +5.1 dB).
BLOCK_MIN_GAIN_DB = 3.0
CALIB, HELD_OUT = 64, 32


def _encoder_block(post_norm: bool, seed: int = 0, outliers: bool = True) -> onnx.ModelProto:
    """x[N, S, D] -> LayerNorm -> MatMul+Add -> Relu -> Gemm-like MatMul+Add (+ residual).

    pre-norm: LN feeds only the first MatMul and the second MatMul feeds a MatMul -> Add head
    (every producer can absorb the scale); post-norm: the LN output also feeds the residual Add,
    so a Mul must be inserted."""
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 1.5, D)
    if outliers:
        gamma[[3, 11]] *= OUTLIER_FACTOR
    arrays = {
        "gamma": gamma, "beta": rng.normal(0, 0.1, D),
        "w1": rng.normal(0, 0.3, (D, HIDDEN)), "b1": rng.normal(0, 0.1, HIDDEN),
        "w2": rng.normal(0, 0.2, (HIDDEN, D)), "b2": rng.normal(0, 0.1, D),
        "w3": rng.normal(0, 0.3, (D, 4)),
    }
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["m"], name="fc2"),
        helper.make_node("Add", ["m", "b2"], ["mb"], name="fc2_bias"),
    ]
    if post_norm:
        nodes.append(helper.make_node("Add", ["ln", "mb"], ["res"], name="residual"))
        nodes.append(helper.make_node("MatMul", ["res", "w3"], ["y"], name="head"))
    else:
        nodes.append(helper.make_node("MatMul", ["mb", "w3"], ["y"], name="head"))
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SEQ, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", SEQ, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gemm_chain(seed: int = 0) -> onnx.ModelProto:
    """x[N, D] -> Gemm(transB) -> Gemm -> y, the first Gemm's bias [D]: a Gemm producer absorbs the scale;
    the graph input feeding the first Gemm gets a Mul."""
    rng = np.random.default_rng(seed)
    arrays = {"w1": rng.normal(0, 0.3, (HIDDEN, D)), "c1": rng.normal(0, 0.1, HIDDEN),
              "w2": rng.normal(0, 0.3, (HIDDEN, 4)), "c2": rng.normal(0, 0.1, 4)}
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    nodes = [helper.make_node("Gemm", ["x", "w1", "c1"], ["h"], name="g1", transB=1),
             helper.make_node("Gemm", ["h", "w2", "c2"], ["y"], name="g2")]
    graph = helper.make_graph(nodes, "gemms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _x(shape: tuple[int, ...], n: int = CALIB + HELD_OUT, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype(np.float32)


def _smooth_in_pipeline(proto: onnx.ModelProto, data: np.ndarray, shape: tuple[int, ...], **options):
    """Runs through Pipeline, which fails an exact pass whose outputs move beyond rtol 1e-4."""
    return Pipeline([SmoothQuant(**options)]).run(proto, calibration={"x": data}, input_shapes={"x": (1, *shape)})


@pytest.mark.parametrize("post_norm", [False, True], ids=["pre-norm", "post-norm"])
@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_encoder_block_smoothing_is_exact_in_float(post_norm, alpha):
    proto, data = _encoder_block(post_norm), _x((SEQ, D))
    result = _smooth_in_pipeline(proto, data, (SEQ, D), alpha=alpha)
    record = result.report.passes[0]
    assert record.fidelity.max_rel_error <= EXACT_RTOL
    wheres = {r["input"]: r["where"] for r in record.details["inputs"]}
    assert set(wheres) == {"ln", "r", "mb" if not post_norm else "res"}
    if post_norm:  # the LN output also feeds the residual: a Mul on the MatMul branch only
        assert wheres["ln"].startswith("per-channel Mul inserted")
        assert wheres["res"].startswith("per-channel Mul inserted")
    else:
        assert wheres["ln"] == "folded into LayerNormalization ln"
        assert wheres["mb"] == "folded into MatMul fc2 and its bias Add fc2_bias"
    assert wheres["r"].startswith("per-channel Mul inserted")  # Relu is not linear
    ops = [n.op_type for n in result.model.graph]
    original_ops = [n.op_type for n in proto.graph.node]
    inserted = sum(w.startswith("per-channel Mul") for w in wheres.values())
    assert ops.count("Mul") == original_ops.count("Mul") + inserted
    assert len(ops) == len(original_ops) + inserted


def test_gemm_producer_and_graph_input():
    proto, data = _gemm_chain(), _x((D,))
    result = _smooth_in_pipeline(proto, data, (D,))
    record = result.report.passes[0]
    assert record.fidelity.max_rel_error <= EXACT_RTOL
    wheres = {r["input"]: r["where"] for r in record.details["inputs"]}
    assert wheres == {"x": "per-channel Mul inserted (the input is a graph input)", "h": "folded into Gemm g1"}


def test_insert_mul_off_leaves_unabsorbable_inputs_alone():
    proto, data = _encoder_block(post_norm=True), _x((SEQ, D))
    result = _smooth_in_pipeline(proto, data, (SEQ, D), insert_mul=False)
    record = result.report.passes[0]
    assert record.details["inputs"] == [] and not record.modified
    assert sum("cannot absorb" in s for s in record.skipped) == 3
    assert [n.op_type for n in result.model.graph] == [n.op_type for n in proto.graph.node]


def test_alpha_half_balances_activation_and_weight_ranges():
    """With alpha = 0.5 the smoothed activation's channel range equals the smoothed weight's row range
    (both become sqrt(max|X_j| max|W_j|)), measured on the rewritten model."""
    proto, data = _encoder_block(post_norm=False), _x((SEQ, D))
    model = load(proto)
    calib = Calibration.from_arrays(model, {"x": data})
    result = SmoothQuant(alpha=0.5).run(load(model), PassContext(calibration=calib, model=model))
    smoothed = result.model
    x_range = collect(smoothed, {"ln": -1}, calib).values["ln"]
    x_max = np.maximum(np.abs(x_range.minimum), np.abs(x_range.maximum))
    fc1 = next(n for n in smoothed.graph if n.name == "fc1")
    w_max = np.abs(fc1.inputs[1].const_value.numpy()).max(axis=1)
    np.testing.assert_allclose(x_max, w_max, rtol=1e-4)


def test_smoothing_factors_formula_and_dead_channels():
    x, w = np.array([4.0, 1.0, 0.0, 9.0]), np.array([1.0, 4.0, 2.0, 0.0])
    s = smoothing_factors(x, w, 0.5)
    np.testing.assert_allclose(s, [2.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(smoothing_factors(x, w, 1.0)[:2], [4.0, 1.0])


def test_needs_calibration_and_valid_alpha():
    model = load(_gemm_chain())
    with pytest.raises(OnnxCompressError, match="needs calibration data") as info:
        SmoothQuant().run(model, PassContext(model=model))
    assert "\n" not in str(info.value)
    with pytest.raises(OnnxCompressError, match="alpha"):
        build_pass({"type": "smooth-quant", "alpha": 1.5})
    assert build_pass({"type": "smooth-quant", "alpha": 0.6}).alpha == 0.6


def _held_sqnr(model, quantized, data, key) -> float:
    feeds = [{key: data[i : i + 8]} for i in range(CALIB, len(data), 8)]
    return compare(outputs(model, feeds, "float"), outputs(quantized, feeds, "int8"), "held out").sqnr_db


def test_smoothing_raises_int8_sqnr_on_outlier_block():
    proto, data = _encoder_block(post_norm=False), _x((SEQ, D))
    model = load(proto)
    calib = Calibration.from_arrays(model, {"x": data[:CALIB]})
    plain = QuantizeQDQ().run(load(model), PassContext(calibration=calib, model=model)).model
    smooth = QuantizeQDQ(smooth_alpha=0.5).run(load(model), PassContext(calibration=calib, model=model))
    assert smooth.record.details["smoothing"]["inputs"]
    assert _held_sqnr(model, smooth.model, data, "x") >= _held_sqnr(model, plain, data, "x") + BLOCK_MIN_GAIN_DB


def test_zoo_bert_with_outlier_channels_gains_from_smoothing(tmp_path_factory):
    """The zoo BERT (TorchScript export) with OUTLIER_CHANNELS of every LayerNorm scaled up: int8 SQNR
    rises by at least SMOOTH_MIN_GAIN_DB with smooth_alpha=0.5, on held-out token ids."""
    pytest.importorskip("torch")
    from tests import zoo

    proto = onnx.load(zoo.exported(tmp_path_factory, "bert", dynamo=False, dynamic_batch=True))
    scales = {n.input[1] for n in proto.graph.node if n.op_type == "LayerNormalization"}
    for t in proto.graph.initializer:
        if t.name in scales:
            a = numpy_helper.to_array(t).copy()
            a[OUTLIER_CHANNELS] *= OUTLIER_FACTOR
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    (key,) = zoo.input_names("bert")
    data = np.random.default_rng(3).integers(0, zoo.BERT_VOCAB, (CALIB + HELD_OUT, zoo.BERT_EXAMPLE_SEQ)).astype(np.int64)
    model = load(proto)
    calib = Calibration.from_arrays(model, {key: data[:CALIB]})
    # outliers="off": the plain int8 the fixed alpha is compared with (the default smooths BERT itself)
    plain = QuantizeQDQ(outliers="off").run(load(model), PassContext(calibration=calib, model=model)).model
    smooth = QuantizeQDQ(smooth_alpha=0.5).run(load(model), PassContext(calibration=calib, model=model)).model
    plain_db, smooth_db = _held_sqnr(model, plain, data, key), _held_sqnr(model, smooth, data, key)
    print(f"bert with outliers: int8 {plain_db:.2f} dB, smoothed int8 {smooth_db:.2f} dB")
    assert smooth_db >= plain_db + SMOOTH_MIN_GAIN_DB

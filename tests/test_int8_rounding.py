"""Learned weight rounding (passes/int8_rounding.py): codes within one step of nearest and inside
their kernels' limits, never a worse layer reconstruction, and a model at least as good as nearest."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxcompress.analysis.int8_kernels import overflowing_rows, reduction_rows
from onnxcompress.calibration import Calibration
from onnxcompress.model import load
from onnxcompress.passes.int8_rounding import (
    Gram,
    conv_geometry,
    conv_patches,
    learn_codes,
    output_errors,
)
from onnxcompress.passes.int8_weights import encode_weight
from onnxcompress.passes.quantize import QuantizeQDQ
from onnxcompress.pipeline import PassContext
from onnxcompress.verify import compare, outputs

CALIB, HELD_OUT = 64, 32
#: im2col rows times the weight rows reproduce the float Conv (float32 sums of ~100 products).
CONV_ATOL = 1e-4


def _conv_node(groups: int = 1, **attrs) -> onnx.NodeProto:
    return helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=groups, **attrs)


def _ir(node: onnx.NodeProto) -> ir.Node:
    """The Conv `node` as the onnx_ir node the rounding code reads (attributes only)."""
    return ir.node(node.op_type, [], {a.name: helper.get_attribute_value(a) for a in node.attribute})


def _gram(node: onnx.NodeProto, w: np.ndarray, x: np.ndarray) -> Gram:
    """Every im2col row of x [N, C, H, W] for the Conv `node`."""
    groups = int(next((a.i for a in node.attribute if a.name == "group"), 1))
    geometry = conv_geometry(_ir(node), w.shape[2:], x.shape[2], x.shape[3])
    positions = np.arange(geometry["out"][0] * geometry["out"][1])
    rows = np.concatenate([conv_patches(xi, geometry, groups, positions) for xi in x], axis=1)
    gram = Gram.empty(rows.shape[0], rows.shape[2])
    gram.add(rows)
    return gram


@pytest.mark.parametrize("groups, attrs", [
    (1, {"pads": [1, 0, 2, 1], "strides": [2, 1]}),
    (2, {"pads": [1, 1, 1, 1], "dilations": [2, 1]}),
    (6, {"pads": [2, 2, 2, 2], "strides": [2, 2]}),  # depthwise
])
def test_conv_rows_are_the_kernel_order(groups, attrs):
    """Row m of reduction_rows(W) dotted with im2col rows of its group is the Conv output."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (6, 6 // groups, 3, 3)).astype(np.float32)
    x = rng.normal(0, 1, (1, 6, 7, 9)).astype(np.float32)
    node = _conv_node(groups, kernel_shape=[3, 3], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    y = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])).run(None, {"x": x})[0]
    geometry = conv_geometry(_ir(node), (3, 3), 7, 9)
    assert geometry["out"] == y.shape[2:]
    rows = conv_patches(x[0], geometry, groups, np.arange(y.shape[2] * y.shape[3]))  # [G, P, K]
    w_rows = reduction_rows("Conv", w).reshape(groups, 6 // groups, -1)
    got = np.matmul(w_rows, rows.transpose(0, 2, 1)).reshape(6, *y.shape[2:])
    np.testing.assert_allclose(got, y[0], atol=CONV_ATOL)


def _layer(seed: int, *, large_pairs: bool):
    """A 3x3 Conv [16, 8] whose inputs are correlated (as real activations are); `large_pairs`
    puts big same-sign neighbours in the kernel order, so its s8 codes need the pair limit."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.1, (16, 8, 3, 3)).astype(np.float32)
    if large_pairs:  # a kernel pair (channels 0 and 1 at one tap) of codes ~64.4: just over the limit
        w[:, 0:2, 1, 1] = np.abs(w).reshape(16, -1).max(axis=1)[:, None] * 64.4 / 127
    mix = rng.normal(0, 1, (8, 8))
    x = np.einsum("nchw,cd->ndhw", rng.normal(0, 1, (12, 8, 10, 10)), mix).astype(np.float32)
    return w, np.maximum(x, 0.0), _conv_node(kernel_shape=[3, 3], pads=[1, 1, 1, 1])


@pytest.mark.parametrize("large_pairs", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_codes_stay_in_their_limits_and_reconstruct_better(seed, large_pairs):
    w, x, node = _layer(seed, large_pairs=large_pairs)
    enc = encode_weight("Conv", w, 0, kernels="any")
    if large_pairs:
        assert enc.form == "s8-safe"  # the codes are limited by the pair sums: the clamp is exercised
    gram = _gram(node, w, x)
    learned, gain, _ = learn_codes("Conv", enc, w, gram, kernels="any", centered=False)
    step = np.abs(learned.codes.astype(np.int16) - enc.codes.astype(np.int16))
    assert step.max() <= 1 and step.any()
    assert np.abs(learned.codes.astype(np.int16)).max() <= 127
    assert not overflowing_rows(reduction_rows("Conv", learned.codes.astype(np.float64))).any()
    assert np.array_equal(learned.scales, enc.scales) and learned.form == enc.form
    h = gram.matrix(False)
    rows = lambda e: reduction_rows("Conv", e.dequantized() - w)[None].astype(np.float64)  # noqa: E731
    before, after = output_errors(rows(enc), h), output_errors(rows(learned), h)
    assert np.all(after <= before * (1 + 1e-9))  # per channel, on the calibration rows
    assert gain > 0


def test_u8_and_depthwise_codes_have_no_pair_limit_but_keep_the_range():
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32)
    node = _conv_node(8, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    x = np.maximum(rng.normal(0, 1, (12, 8, 9, 9)), 0).astype(np.float32)
    enc = encode_weight("Conv", w, 0, depthwise=True, kernels="any")
    learned, gain, _ = learn_codes("Conv", enc, w, _gram(node, w, x), depthwise=True)
    codes = learned.codes.astype(np.int16)
    assert np.abs(codes - enc.codes).max() <= 1 and np.abs(codes).max() <= 127 and gain >= 0


def _model(seed: int = 0) -> onnx.ModelProto:
    """x -> Conv 3x3 -> Relu -> depthwise 3x3 -> Relu -> Conv 1x1 -> y: the MobileNet/EfficientNet block shape."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w1", rng.normal(0, 0.3, (16, 3, 3, 3))), ("b1", rng.normal(0, 0.1, 16)),
        ("w2", rng.normal(0, 0.4, (16, 1, 3, 3))), ("b2", rng.normal(0, 0.1, 16)),
        ("w3", rng.normal(0, 0.2, (8, 16, 1, 1))), ("b3", rng.normal(0, 0.1, 8))]]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="dw", pads=[1] * 4, group=16),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="conv3"),
    ]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 12, 12])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_learned_model_beats_nearest_on_held_out_data_and_its_kernels_are_exact():
    rng = np.random.default_rng(1)
    mix = rng.normal(0, 1, (3, 3))
    data = np.einsum("nchw,cd->ndhw", rng.normal(0, 1, (CALIB + HELD_OUT, 3, 12, 12)), mix).astype(np.float32)
    model = load(_model())
    feeds = [{"x": data[i: i + 8]} for i in range(CALIB, len(data), 8)]
    reference = outputs(model, feeds, "float")
    sqnr = {}
    for rounding in ("nearest", "learned"):
        calib = Calibration.from_arrays(model, {"x": data[:CALIB]})
        result = QuantizeQDQ(weight_rounding=rounding).run(load(model), PassContext(calibration=calib, model=model))
        details = result.record.details
        assert details["kernel_check"]["ok"]
        sqnr[rounding] = compare(reference, outputs(result.model, feeds, rounding), "held out").sqnr_db
        if rounding == "learned":
            assert details["learned_rounding"]["layers"] == 3
            assert any(c.startswith("learned rounding on 3 layers") for c in result.record.changes)
    assert sqnr["learned"] >= sqnr["nearest"]


def test_weight_rounding_is_validated():
    with pytest.raises(ValueError, match="weight_rounding"):
        QuantizeQDQ(weight_rounding="adaround")

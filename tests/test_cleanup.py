"""Cleanup passes are exact: outputs equal the original's to float rounding, on hand-built graphs and the zoo."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import model as M
from onnxcompress.passes import EliminateNoOps, FoldBatchNorm, FoldConstants, FusePadIntoConv
from onnxcompress.pipeline import PassContext, Pipeline
from onnxcompress.verify import outputs, random_feeds
from tests.graphs import OPSET, conv_bn_relu_gemm

# Folding reorders float32 arithmetic (w*s summed vs summed then scaled): a few ulps of the output scale.
FOLD_RTOL = 1e-5
# The pipeline's own exactness check for the light zoo (their weights are constants, so errors are tiny).
ZOO_MAX_REL_ERROR = 1e-5


def _ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def _max_rel_error(original, transformed, count: int = 3) -> float:
    shapes = M.resolve_input_shapes(original)
    feeds = random_feeds(original, shapes, count=count, seed=1)
    ref, got = outputs(original, feeds, "original"), outputs(transformed, feeds, "transformed")
    worst = 0.0
    for r_sample, g_sample in zip(ref, got):
        for r, g in zip(r_sample, g_sample):
            worst = max(worst, float(np.max(np.abs(r - g)) / np.max(np.abs(r))))
    return worst


def _run(p, model):
    return p.run(model, PassContext(model=model))


def test_fold_batchnorm_and_channel_affine_into_conv():
    original = M.load(conv_bn_relu_gemm())
    result = _run(FoldBatchNorm(), M.load(original))
    ops = _ops(result.model)
    assert "BatchNormalization" not in ops and "Mul" not in ops and "Add" not in ops
    assert len(result.record.changes) == 4  # bn1, bn2, mul2, add2
    assert _max_rel_error(original, result.model) < FOLD_RTOL


def test_fold_batchnorm_creates_a_bias_when_the_conv_has_none():
    original = M.load(conv_bn_relu_gemm(bn_bias=False))
    result = _run(FoldBatchNorm(), M.load(original))
    conv1 = next(n for n in result.model.graph if n.name == "conv1")
    assert len(conv1.inputs) == 3 and conv1.inputs[2].const_value is not None
    assert _max_rel_error(original, result.model) < FOLD_RTOL


def _single_layer_bn(op: str, **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    if op == "Gemm":
        trans_b = attrs.get("transB", 0)
        w = rng.normal(size=(6, 4) if trans_b else (4, 6)).astype(np.float32)
        x_shape, y_shape, c = [2, 4], [2, 6], 6
        inputs = ["x", "w", "b"]
        extra = [numpy_helper.from_array(rng.normal(size=(1, 6)).astype(np.float32), "b")]
    else:  # ConvTranspose with groups: weight [C_in, C_out/group, k, k]
        group = attrs.get("group", 1)
        w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
        x_shape, c = [1, 4, 5, 5], 3 * group
        y_shape = [1, c, 7, 7]
        inputs, extra = ["x", "w"], []
    inits = [numpy_helper.from_array(w, "w"), *extra] + [
        numpy_helper.from_array(a.astype(np.float32), n)
        for n, a in (("g", rng.uniform(0.5, 2, c)), ("be", rng.normal(size=c)), ("mu", rng.normal(size=c)),
                     ("var", rng.uniform(0.5, 2, c)))
    ]
    nodes = [helper.make_node(op, inputs, ["h"], name="layer", **attrs),
             helper.make_node("BatchNormalization", ["h", "g", "be", "mu", "var"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


@pytest.mark.parametrize("op, attrs", [
    ("Gemm", {"transB": 0}), ("Gemm", {"transB": 1, "beta": 0.5}), ("ConvTranspose", {"group": 1}),
    ("ConvTranspose", {"group": 2}),
])
def test_fold_batchnorm_into_gemm_and_conv_transpose(op, attrs):
    original = M.load(_single_layer_bn(op, **attrs))
    result = _run(FoldBatchNorm(), M.load(original))
    assert _ops(result.model) == Counter({op: 1})
    assert [v.name for v in result.model.graph.outputs] == ["y"]  # the graph output keeps its name
    assert _max_rel_error(original, result.model) < FOLD_RTOL


def test_fold_batchnorm_skips_shared_conv_output_with_reason():
    proto = conv_bn_relu_gemm()
    # A second consumer of conv1's output: folding BN into the conv would change what it sees.
    proto.graph.node.append(helper.make_node("Relu", ["c1"], ["side"], name="side"))
    proto.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    original = M.load(proto)
    result = _run(FoldBatchNorm(), M.load(original))
    assert any("bn1" in s and "other consumers" in s for s in result.record.skipped)
    assert "BatchNormalization" in _ops(result.model)
    assert _max_rel_error(original, result.model) < FOLD_RTOL


def test_division_by_a_constant_with_zeros_is_not_folded(recwarn):
    """x / 0 is inf or nan, not a per-channel scale (a real sentence encoder's export divides by a
    masked zero): the Div stays, and no numpy warning leaks to the user."""
    rng = np.random.default_rng(0)
    divisor = np.array([2.0, 0.0, 4.0], np.float32).reshape(1, 3, 1, 1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), helper.make_node("Div", ["h", "d"], ["y"], name="div")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 2])],
                              [numpy_helper.from_array(rng.normal(size=(3, 2, 3, 3)).astype(np.float32), "w"),
                               numpy_helper.from_array(divisor, "d")])
    model = M.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))
    result = _run(FoldBatchNorm(), model)
    assert _ops(result.model) == Counter({"Conv": 1, "Div": 1}) and not result.record.changes
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_eliminate_noops_removes_identity_and_inference_dropout():
    proto = conv_bn_relu_gemm()
    proto.graph.node.insert(3, helper.make_node("Dropout", ["r1"], ["r1d"], name="drop"))
    next(n for n in proto.graph.node if n.name == "conv2").input[0] = "r1d"
    original = M.load(proto)
    result = _run(EliminateNoOps(), M.load(original))
    assert "Identity" not in _ops(result.model) and "Dropout" not in _ops(result.model)
    assert _max_rel_error(original, result.model) == 0.0


def test_fold_constants_turns_constant_nodes_into_initializers(light_model_paths):
    original = M.load(light_model_paths["squeezenet"])
    assert _ops(original)["ConstantOfShape"] > 0
    result = _run(FoldConstants(), M.load(original))
    assert "ConstantOfShape" not in _ops(result.model)
    assert result.model.ir_version >= 4
    assert len(result.model.graph.initializers) > 0


@pytest.mark.parametrize("name", ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
                                  "shufflenet", "squeezenet", "vgg19", "zfnet512"])
def test_cleanup_recipe_on_light_zoo(light_model_paths, name):
    """Every light zoo model: the pipeline checks (full checker), loads in ORT and compares after each pass."""
    pipeline = Pipeline.from_recipe("cleanup")
    pipeline.verify = type(pipeline.verify)(rtol=ZOO_MAX_REL_ERROR, samples=1)
    result = pipeline.run(light_model_paths[name])
    assert result.report.verified and len(result.report.passes) == 3
    assert result.report.fidelity.max_rel_error <= ZOO_MAX_REL_ERROR
    assert "ConstantOfShape" not in _ops(result.model)
    assert "BatchNormalization" not in _ops(result.model) or name == "densenet121"  # BN after Concat stays
    assert result.report.after.params > result.report.before.params  # weights became initializers


def test_dropout_before_graph_output_keeps_the_output_declaration():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Dropout", ["r"], ["y"], name="drop")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = M.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))
    result = _run(EliminateNoOps(), model)
    assert [n.op_type for n in result.model.graph] == ["Relu"]
    (output,) = result.model.graph.outputs
    assert output.name == "y" and output.type is not None and list(output.shape.dims) == [1, 4]
    onnx.checker.check_model(M.to_proto(result.model), full_check=True)


def _same_padded_convs(pad_value: float = 0.0) -> onnx.ModelProto:
    """TF-style "same" padding as exported: Pad (asymmetric, constant) -> Conv, twice, then ReLU."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads"),
        numpy_helper.from_array(np.array(pad_value, np.float32), "pad_value"),
        numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(8, 1, 3, 3)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Pad", ["x", "pads", "pad_value"], ["p1"], name="pad1", mode="constant"),
        helper.make_node("Conv", ["p1", "w1"], ["c1"], name="conv1", strides=[2, 2]),
        helper.make_node("Pad", ["c1", "pads", "pad_value"], ["p2"], name="pad2"),
        helper.make_node("Conv", ["p2", "w2"], ["c2"], name="conv2", group=8, pads=[1, 1, 0, 0]),
        helper.make_node("Relu", ["c2"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "same_pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def test_fuse_pad_folds_zero_padding_into_conv_exactly():
    original = M.load(_same_padded_convs())
    result = _run(FusePadIntoConv(), M.load(original))
    assert "Pad" not in _ops(result.model) and len(result.record.changes) == 1
    conv2 = next(n for n in result.model.graph if n.name == "conv2")
    assert list(conv2.attributes["pads"].as_ints()) == [1, 1, 1, 1]  # its own pads plus the Pad's
    assert _max_rel_error(original, result.model) < FOLD_RTOL


def test_fuse_pad_leaves_nonzero_padding():
    result = _run(FusePadIntoConv(), M.load(_same_padded_convs(pad_value=1.0)))
    assert _ops(result.model)["Pad"] == 2 and not result.record.changes

"""Cost analysis: single layers against hand formulas, real architectures against published totals."""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxcompress.analysis.cost import CostReport, analyze_cost, mac_ratio
from onnxcompress.errors import InputShapeError
from onnxcompress.model import load, to_proto
from onnxcompress.report import ModelStats

HAS_TORCH = importlib.util.find_spec("torch") is not None  # an optional extra
if HAS_TORCH:
    from torch.overrides import TorchFunctionMode

    from tests import zoo

    #: Families that between them hold every layer kind with MACs: plain, grouped and depthwise
    #: Conv, ConvTranspose, Linear, attention MatMuls; with Resize, split/shuffle, embeddings.
    ZOO_FAMILIES = ("mobilenet_v2", "grouped_conv", "shufflenet_v2", "unet_convtranspose", "unet_resize", "vit", "bert")
    ZOO_CASES = [(f, d) for f, d in zoo.export_cases() if f in ZOO_FAMILIES]
else:
    TorchFunctionMode = object
    ZOO_CASES = [pytest.param(None, None, marks=pytest.mark.skip(reason="torch is not installed"))]

#: Published figures (torchvision / the VGG and ResNet papers) at 1x3x224x224.
RESNET50_MACS, RESNET50_PARAMS = 4.1e9, 25.6e6
VGG19_MACS, VGG19_PARAMS = 19.6e9, 143.7e6
#: torchvision's exact parameter counts (its model docs), for the same architectures.
RESNET50_EXACT_PARAMS, VGG19_EXACT_PARAMS = 25_557_032, 143_667_240
#: Published MACs are rounded to two or three digits; parameter counts are exact up to BN statistics.
PUBLISHED_MACS_RTOL = 0.03
PUBLISHED_PARAMS_RTOL = 0.01

F32 = 4  # bytes per float32 element


def make_model(nodes, inputs, outputs, initializers=(), opset=17, domains=()) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return load(helper.make_model(graph, opset_imports=opsets))


def tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(array, name)


def f32(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def out(name: str = "y") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def zeros(*shape) -> np.ndarray:
    return np.zeros(shape, np.float32)


def single(report: CostReport, op_type: str):
    [node] = [n for n in report.nodes if n.op_type == op_type]
    return node


def conv_out(size: int, k: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


# ---------------------------------------------------------------- convolutions


@pytest.mark.parametrize(
    "cin, cout, group, k, stride, pad, dilation, bias, h, w",
    [
        (3, 8, 1, 3, 1, 1, 1, True, 10, 10),  # plain
        (4, 6, 1, 3, 2, 2, 2, False, 15, 13),  # strided, dilated, padded
        (8, 12, 4, 3, 1, 1, 1, True, 9, 9),  # grouped
        (6, 6, 6, 3, 2, 1, 1, True, 12, 12),  # depthwise
        (4, 8, 4, 5, 1, 2, 1, False, 7, 11),  # depthwise with channel multiplier 2
    ],
)
def test_conv_matches_hand_formula(cin, cout, group, k, stride, pad, dilation, bias, h, w):
    n = 2
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    weights = [tensor("w", zeros(cout, cin // group, k, k)), tensor("b", zeros(cout))][: len(inputs) - 1]
    model = make_model(
        [
            helper.make_node(
                "Conv", inputs, ["y"], group=group, kernel_shape=[k, k], strides=[stride] * 2,
                pads=[pad] * 4, dilations=[dilation] * 2,
            )
        ],
        [f32("x", [n, cin, h, w])],
        [out()],
        weights,
    )
    ho, wo = conv_out(h, k, stride, pad, dilation), conv_out(w, k, stride, pad, dilation)
    outputs = n * cout * ho * wo
    macs = outputs * (cin // group) * k * k
    params = cout * (cin // group) * k * k + (cout if bias else 0)

    report = analyze_cost(model)
    conv = single(report, "Conv")
    assert conv.known
    assert conv.macs == report.stats.macs == macs
    assert conv.flops == 2 * macs + (outputs if bias else 0)
    assert conv.params == report.stats.params == params
    assert conv.activation_bytes == outputs * F32
    assert conv.weight_bytes == report.stats.weight_bytes == params * F32


def test_conv_transpose_matches_hand_formula():
    n, cin, cout, group, k, stride, pad, h, w = 1, 4, 6, 2, 3, 2, 1, 5, 7
    model = make_model(
        [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], group=group, strides=[stride] * 2, pads=[pad] * 4)],
        [f32("x", [n, cin, h, w])],
        [out()],
        [tensor("w", zeros(cin, cout // group, k, k)), tensor("b", zeros(cout))],
    )
    ho, wo = (h - 1) * stride - 2 * pad + k, (w - 1) * stride - 2 * pad + k
    macs = n * cin * h * w * (cout // group) * k * k  # each input element scatters to cout/group * k*k outputs
    report = analyze_cost(model)
    node = single(report, "ConvTranspose")
    assert node.macs == macs
    assert node.flops == 2 * macs + n * cout * ho * wo
    assert node.params == cin * (cout // group) * k * k + cout


# ---------------------------------------------------------------- Gemm and MatMul


@pytest.mark.parametrize("trans_a, trans_b", [(0, 1), (1, 0), (0, 0)])
def test_gemm_matches_hand_formula(trans_a, trans_b):
    m, k, n = 3, 20, 7
    a_shape = [k, m] if trans_a else [m, k]
    b_shape = (n, k) if trans_b else (k, n)
    model = make_model(
        [helper.make_node("Gemm", ["a", "b", "c"], ["y"], transA=trans_a, transB=trans_b)],
        [f32("a", a_shape)],
        [out()],
        [tensor("b", zeros(*b_shape)), tensor("c", zeros(n))],
    )
    node = single(analyze_cost(model), "Gemm")
    assert node.macs == m * n * k
    assert node.flops == 2 * m * n * k + m * n  # bias add: one per output
    assert node.params == k * n + n


@pytest.mark.parametrize(
    "a_shape, b_shape, out_shape, depth",
    [
        ((4, 3, 8), (8, 5), (4, 3, 5), 8),  # batched activations x weight
        ((2, 1, 3, 4), (5, 4, 6), (2, 5, 3, 6), 4),  # broadcast batch dims
        ((8,), (8, 5), (5,), 8),  # vector x matrix
        ((6, 4, 8), (8,), (6, 4), 8),  # matrix x vector
    ],
)
def test_matmul_with_weight_matches_hand_formula(a_shape, b_shape, out_shape, depth):
    model = make_model(
        [helper.make_node("MatMul", ["a", "b"], ["y"])], [f32("a", a_shape)], [out()], [tensor("b", zeros(*b_shape))]
    )
    node = single(analyze_cost(model), "MatMul")
    assert node.macs == math.prod(out_shape) * depth
    assert node.flops == 2 * node.macs
    assert node.params == math.prod(b_shape)
    assert node.activation_bytes == math.prod(out_shape) * F32


def test_attention_matmul_between_two_activations():
    batch, heads, seq, head_dim = 2, 4, 9, 16
    model = make_model(
        [helper.make_node("MatMul", ["q", "kt"], ["y"])],
        [f32("q", [batch, heads, seq, head_dim]), f32("kt", [batch, heads, head_dim, seq])],
        [out()],
    )
    node = single(analyze_cost(model), "MatMul")
    assert node.macs == batch * heads * seq * seq * head_dim
    assert node.params == 0


@pytest.mark.parametrize(
    "equation, shapes, macs, flops",
    [
        ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)], 2 * 3 * 4 * 5, 2 * 2 * 3 * 4 * 5),
        ("bhqd,bhkd->bhqk", [(1, 2, 5, 8), (1, 2, 6, 8)], 1 * 2 * 5 * 6 * 8, 2 * 1 * 2 * 5 * 6 * 8),
        ("...ij,jk->...ik", [(2, 3, 4, 5), (5, 6)], 2 * 3 * 4 * 5 * 6, 2 * 2 * 3 * 4 * 5 * 6),
        ("ij,jk", [(3, 4), (4, 5)], 3 * 4 * 5, 2 * 3 * 4 * 5),  # implicit output
        ("ij->i", [(3, 4)], 0, 3 * 4),  # a reduction: one add per input element
        ("ij->ji", [(3, 4)], 0, 0),  # a transpose
    ],
)
def test_einsum_matches_hand_formula(equation, shapes, macs, flops):
    names = [f"x{i}" for i in range(len(shapes))]
    model = make_model(
        [helper.make_node("Einsum", names, ["y"], equation=equation)],
        [f32(n, s) for n, s in zip(names, shapes)],
        [out()],
    )
    node = single(analyze_cost(model), "Einsum")
    assert node.known, node.reason
    assert (node.macs, node.flops) == (macs, flops)


# ---------------------------------------------------------------- quantized layers


def test_qlinear_conv_matches_float_conv_and_excludes_scales_from_params():
    n, cin, cout, k, h = 1, 4, 6, 3, 8
    scalar = lambda name, v, dt: tensor(name, np.array(v, dt))  # noqa: E731
    model = make_model(
        [helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [n, cin, h, h])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
        [
            scalar("xs", 0.1, np.float32), scalar("xz", 128, np.uint8),
            tensor("w", np.zeros((cout, cin, k, k), np.int8)),
            tensor("ws", np.full(cout, 0.05, np.float32)), tensor("wz", np.zeros(cout, np.int8)),
            scalar("ys", 0.2, np.float32), scalar("yz", 128, np.uint8),
            tensor("b", np.zeros(cout, np.int32)),
        ],
    )  # fmt: skip
    outputs = n * cout * (h - k + 1) ** 2
    macs = outputs * cin * k * k
    node = single(analyze_cost(model), "QLinearConv")
    assert node.macs == macs
    assert node.flops == 2 * macs + outputs + 3 * outputs  # bias add, requantization
    assert node.params == cout * cin * k * k + cout
    assert node.activation_bytes == outputs  # uint8


def test_integer_matmul_and_conv_count_like_float():
    model = make_model(
        [
            helper.make_node("MatMulInteger", ["a", "b"], ["m"]),
            helper.make_node("ConvInteger", ["x", "w"], ["c"]),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [3, 8]),
            helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 2, 5, 5]),
        ],
        [helper.make_tensor_value_info(name, TensorProto.INT32, None) for name in ("m", "c")],
        [tensor("b", np.zeros((8, 4), np.int8)), tensor("w", np.zeros((3, 2, 3, 3), np.int8))],
    )
    report = analyze_cost(model)
    assert single(report, "MatMulInteger").macs == 3 * 4 * 8
    assert single(report, "ConvInteger").macs == 1 * 3 * 3 * 3 * 2 * 3 * 3
    assert report.stats.params == 8 * 4 + 3 * 2 * 3 * 3


def _conv_model(qdq: bool) -> ir.Model:
    """x -> Conv(w, b), in float, or in the QDQ form ORT fuses (quantized input, int8 weight, int32 bias)."""
    cout, cin, k = 5, 3, 3
    x_info = f32("x", [1, cin, 6, 6])
    if not qdq:
        return make_model(
            [helper.make_node("Conv", ["x", "w", "b"], ["y"])], [x_info], [out()],
            [tensor("w", zeros(cout, cin, k, k)), tensor("b", zeros(cout))],
        )  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=0),
        helper.make_node("DequantizeLinear", ["bq", "bs"], ["bd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["y"]),
    ]
    weights = [
        tensor("xs", np.array(0.1, np.float32)), tensor("xz", np.array(128, np.uint8)),
        tensor("wq", np.zeros((cout, cin, k, k), np.int8)), tensor("ws", np.full(cout, 0.02, np.float32)),
        tensor("bq", np.zeros(cout, np.int32)), tensor("bs", np.full(cout, 0.002, np.float32)),
    ]  # fmt: skip
    return make_model(nodes, [x_info], [out()], weights)


def test_qdq_model_keeps_macs_and_params_and_adds_elementwise_qdq_flops():
    plain, quantized = analyze_cost(_conv_model(qdq=False)), analyze_cost(_conv_model(qdq=True))
    assert quantized.stats.macs == plain.stats.macs > 0
    assert quantized.stats.params == plain.stats.params == 5 * 3 * 3 * 3 + 5
    x_elements, w_elements, b_elements = 3 * 6 * 6, 5 * 3 * 3 * 3, 5
    qdq_flops = 3 * x_elements + 2 * x_elements + 2 * w_elements + 2 * b_elements  # Q: 3 per element, DQ: 2
    assert quantized.stats.flops == plain.stats.flops + qdq_flops
    assert quantized.unknown_ops == {}


# ---------------------------------------------------------------- pooling, normalization, elementwise


def _one_node(op: str, shape, attrs=None, weights=(), extra_inputs=(), opset=17) -> CostReport:
    node = helper.make_node(op, ["x", *extra_inputs], ["y"], **(attrs or {}))
    return analyze_cost(make_model([node], [f32("x", shape)], [out()], weights, opset=opset))


def test_pooling_counts_kernel_ops_per_output():
    report = _one_node("MaxPool", [1, 4, 9, 9], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1] * 4})
    ho = (9 + 2 - 3) // 2 + 1
    assert single(report, "MaxPool").flops == 1 * 4 * ho * ho * 3 * 3
    report = _one_node("AveragePool", [1, 4, 8, 8], {"kernel_shape": [2, 2], "strides": [2, 2]})
    assert single(report, "AveragePool").flops == 4 * 4 * 4 * 2 * 2
    report = _one_node("LpPool", [1, 2, 6, 6], {"kernel_shape": [3, 3]})
    assert single(report, "LpPool").flops == 2 * (2 * 4 * 4) * 3 * 3
    report = _one_node("GlobalAveragePool", [2, 8, 7, 7])
    assert single(report, "GlobalAveragePool").flops == 2 * 8 * 7 * 7
    assert report.stats.macs == 0


def test_normalizations_count_per_element_ops_and_their_params():
    shape, c = [2, 6, 5, 5], 6
    elements = math.prod(shape)
    bn = _one_node(
        "BatchNormalization", shape,
        weights=[tensor(n, zeros(c)) for n in ("s", "b", "m", "v")], extra_inputs=["s", "b", "m", "v"],
    )  # fmt: skip
    assert (bn.stats.flops, bn.stats.params) == (2 * elements, 4 * c)
    inorm = _one_node(
        "InstanceNormalization", shape, weights=[tensor("s", zeros(c)), tensor("b", zeros(c))], extra_inputs=["s", "b"]
    )
    assert (inorm.stats.flops, inorm.stats.params) == (8 * elements, 2 * c)
    ln = _one_node(
        "LayerNormalization", [2, 7, 16], {"axis": -1},
        weights=[tensor("s", zeros(16)), tensor("b", zeros(16))], extra_inputs=["s", "b"],
    )  # fmt: skip
    assert (ln.stats.flops, ln.stats.params) == (8 * 2 * 7 * 16, 2 * 16)
    lrn = _one_node("LRN", shape, {"size": 5})
    assert lrn.stats.flops == (2 * 5 + 3) * elements


@pytest.mark.parametrize("op", ["Relu", "Sigmoid", "Tanh", "Erf", "Sqrt", "Exp", "HardSwish", "Gelu", "LeakyRelu"])
def test_unary_elementwise_is_one_flop_per_element(op):
    report = _one_node(op, [3, 4, 5], opset=20)  # Gelu is new in opset 20
    node = single(report, op)
    assert (node.macs, node.flops, node.known) == (0, 60, True)


def test_binary_and_variadic_elementwise_count_output_elements():
    model = make_model(
        [
            helper.make_node("Add", ["x", "bias"], ["a"]),  # broadcast [3, 4, 5] + [5]
            helper.make_node("Mul", ["a", "half"], ["m"]),  # a one-element factor is not a parameter
            helper.make_node("Sum", ["x", "a", "m"], ["s"]),  # 3 inputs: 2 adds per element
            helper.make_node("PRelu", ["s", "slope"], ["p"]),  # a learned single slope is a parameter
            helper.make_node("Softmax", ["p"], ["y"], axis=-1),
        ],
        [f32("x", [3, 4, 5])],
        [out()],
        [tensor("bias", zeros(5)), tensor("half", np.array(0.5, np.float32)), tensor("slope", zeros(1))],
    )
    report = analyze_cost(model)
    flops = {n.op_type: n.flops for n in report.nodes}
    assert flops == {"Add": 60, "Mul": 60, "Sum": 2 * 60, "PRelu": 60, "Softmax": 5 * 60}
    assert report.stats.params == 5 + 1
    assert report.stats.op_counts == {"Add": 1, "Mul": 1, "Sum": 1, "PRelu": 1, "Softmax": 1}


def test_resize_counts_interpolation_weights_per_output():
    scales = tensor("scales", np.array([1, 1, 2, 2], np.float32))
    linear = _one_node("Resize", [1, 2, 4, 4], {"mode": "linear"}, [scales], ["", "scales"])
    assert single(linear, "Resize").flops == 2 * 2**2 * (1 * 2 * 8 * 8)  # 4 multiply-adds per output
    nearest = _one_node("Resize", [1, 2, 4, 4], {"mode": "nearest"}, [scales], ["", "scales"])
    assert single(nearest, "Resize").flops == 0
    assert linear.stats.params == 0  # scales are not weights


def test_shape_ops_are_free_and_their_index_constants_are_not_params():
    model = make_model(
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0]),
            helper.make_node("Slice", ["t", "starts", "ends"], ["y"]),
        ],
        [f32("x", [2, 3, 4])],
        [out()],
        [
            tensor("shape", np.array([6, 4], np.int64)),
            tensor("starts", np.array([0], np.int64)),
            tensor("ends", np.array([2], np.int64)),
        ],
    )
    report = analyze_cost(model)
    assert all(n.known and n.macs == 0 and n.flops == 0 for n in report.nodes)
    assert report.stats.params == 0
    assert report.stats.weight_bytes == 4 * 8  # int64 constants are stored bytes all the same
    assert report.stats.activation_bytes == (24 + 24 + 2 * 6) * F32


# ---------------------------------------------------------------- parameters and bookkeeping


def test_shared_and_constant_node_weights_are_counted_once():
    model = make_model(
        [
            helper.make_node("Constant", [], ["w2"], value=tensor("w2", zeros(8, 3))),
            helper.make_node("MatMul", ["x", "w"], ["a"]),
            helper.make_node("MatMul", ["a", "w"], ["b"]),  # the same initializer again
            helper.make_node("MatMul", ["b", "w2"], ["y"]),
        ],
        [f32("x", [2, 8])],
        [out()],
        [tensor("w", zeros(8, 8))],
    )
    report = analyze_cost(model)
    assert report.stats.params == 8 * 8 + 8 * 3
    assert report.stats.weight_bytes == (8 * 8 + 8 * 3) * F32
    assert [n.params for n in report.nodes] == [0, 64, 0, 24]
    assert report.stats.activation_bytes == (2 * 8 + 2 * 8 + 2 * 3) * F32  # Constant output is a weight
    assert report.stats.macs == 2 * 8 * 8 * 2 + 2 * 3 * 8


def test_per_node_costs_add_up_to_the_totals(load_folded_light):
    report = analyze_cost(load_folded_light("inception_v1"))
    for field in ("macs", "flops", "params", "activation_bytes"):
        assert sum(getattr(n, field) for n in report.nodes) == getattr(report.stats, field)
    assert sum(n.weight_bytes for n in report.nodes) <= report.stats.weight_bytes
    assert report.stats.flops >= 2 * report.stats.macs
    assert report.stats.op_counts == dict(
        (op, sum(n.op_type == op for n in report.nodes)) for op in {n.op_type for n in report.nodes}
    )


def test_top_lists_nodes_by_macs():
    model = make_model(
        [helper.make_node("MatMul", ["x", "small"], ["a"]), helper.make_node("MatMul", ["a", "big"], ["y"])],
        [f32("x", [4, 2])],
        [out()],
        [tensor("small", zeros(2, 16)), tensor("big", zeros(16, 32))],
    )
    report = analyze_cost(model)
    assert [n.macs for n in report.top(2)] == [4 * 32 * 16, 4 * 16 * 2]
    assert len(report.top(1)) == 1


def test_mac_ratio_is_the_theoretical_speedup():
    before = ModelStats(params=0, macs=300, flops=0, weight_bytes=0, activation_bytes=0)
    after = ModelStats(params=0, macs=120, flops=0, weight_bytes=0, activation_bytes=0)
    empty = ModelStats(params=0, macs=0, flops=0, weight_bytes=0, activation_bytes=0)
    assert mac_ratio(before, after) == 2.5
    assert mac_ratio(before, empty) == math.inf
    assert mac_ratio(empty, empty) == 1.0


def test_analysis_does_not_modify_the_model(load_folded_light):
    model = load_folded_light("squeezenet")
    before = to_proto(model).SerializeToString()
    analyze_cost(model)
    assert to_proto(model).SerializeToString() == before


# ---------------------------------------------------------------- unknown ops and shapes


def test_unknown_custom_op_costs_nothing_and_is_listed():
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Mystery", ["c"], ["m"], domain="com.example"),
            helper.make_node("Relu", ["m"], ["y"]),  # its input shape is unknown now
        ],
        [f32("x", [1, 2, 5, 5])],
        [out()],
        [tensor("w", zeros(4, 2, 3, 3))],
        domains=["com.example"],
    )
    report = analyze_cost(model)
    assert report.stats.macs == 1 * 4 * 3 * 3 * 2 * 3 * 3  # the Conv still counts
    assert report.unknown_ops == {"com.example::Mystery": 1, "Relu": 1}
    mystery, relu = report.nodes[1], report.nodes[2]
    assert (mystery.known, mystery.macs, mystery.flops) == (False, 0, 0)
    assert "no cost rule" in mystery.reason
    assert not relu.known and "unknown" in relu.reason
    assert report.stats.op_counts["com.example::Mystery"] == 1


# ---------------------------------------------------------------- transformer with dynamic inputs


def _attention_model(dim: int, heads: int) -> ir.Model:
    """Self-attention over x [batch, seq, dim], split into heads with Reshape (0 = keep the dim)."""
    head_dim = dim // heads
    nodes, weights = [], []
    for name in ("q", "k", "v"):
        weights.append(tensor(f"w{name}", zeros(dim, dim)))
        nodes += [
            helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}_flat"]),
            helper.make_node("Reshape", [f"{name}_flat", "heads_shape"], [f"{name}_split"]),
        ]
    nodes += [
        helper.make_node("Transpose", ["q_split"], ["qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_split"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v_split"], ["vh"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qh", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vh"], ["context"]),
        helper.make_node("Transpose", ["context"], ["merged"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["merged", "model_shape"], ["joined"]),
        helper.make_node("MatMul", ["joined", "wo"], ["y"]),
    ]
    weights += [
        tensor("wo", zeros(dim, dim)),
        tensor("heads_shape", np.array([0, 0, heads, head_dim], np.int64)),
        tensor("model_shape", np.array([0, 0, dim], np.int64)),
    ]
    return make_model(nodes, [f32("x", ["batch", "seq", dim])], [out()], weights)


def test_transformer_costs_at_given_sequence_length():
    dim, heads, batch, seq = 32, 4, 2, 10
    report = analyze_cost(_attention_model(dim, heads), {"x": (batch, seq, dim)})
    projections = 4 * batch * seq * dim * dim
    attention = 2 * batch * heads * seq * seq * (dim // heads)  # scores and context
    assert report.unknown_ops == {}
    assert report.stats.macs == projections + attention
    assert report.stats.flops == 2 * (projections + attention) + 5 * batch * heads * seq * seq
    assert report.stats.params == 4 * dim * dim


def test_transformer_without_sequence_length_raises():
    with pytest.raises(InputShapeError, match="x"):
        analyze_cost(_attention_model(32, 4))


# ---------------------------------------------------------------- torch exporters


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_torch_exported_model_matches_hand_count(tmp_path, dynamo):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
            self.fc = nn.Linear(8 * 4 * 4, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.depthwise(torch.relu(self.conv(x))), 1))

    module = Tiny().eval()
    path = tmp_path / "tiny.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation and progress notices
        torch.onnx.export(module, (torch.randn(1, 3, 8, 8),), str(path), dynamo=dynamo, input_names=["x"])
    report = analyze_cost(load(path))
    macs = (8 * 8 * 8) * 3 * 3 * 3 + (8 * 4 * 4) * 1 * 3 * 3 + 10 * 8 * 4 * 4
    assert report.stats.macs == macs
    assert report.stats.params == sum(p.numel() for p in module.parameters())
    assert report.unknown_ops == {}


# ---------------------------------------------------------------- torch-built zoo: an independent count


class TorchMacCounter(TorchFunctionMode):
    """MACs of the convolutions, linear layers and matmuls torch runs in a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in ("conv1d", "conv2d", "conv3d"):  # weight [out, in/groups, k...]
            self.macs += result.numel() * math.prod(args[1].shape[1:])
        elif name.startswith("conv_transpose"):  # weight [in, out/groups, k...]
            self.macs += args[0].numel() * math.prod(args[1].shape[1:])
        elif name == "linear":
            self.macs += result.numel() * args[1].shape[1]
        elif name in ("matmul", "__matmul__", "mm", "bmm"):
            self.macs += result.numel() * args[0].shape[-1]
        return result


@functools.lru_cache(maxsize=None)
def torch_reference(family: str) -> tuple[int, int, dict[str, tuple[int, ...]]]:
    """(MACs torch runs, parameters + BatchNorm statistics, input shapes) of a zoo family."""
    import torch

    module, inputs = zoo.FAMILIES[family]()
    counter = TorchMacCounter()
    with torch.no_grad(), counter:
        module(*inputs)
    stored = sum(p.numel() for p in module.parameters()) + sum(
        b.numel() for name, b in module.named_buffers() if name.endswith(("running_mean", "running_var"))
    )
    return counter.macs, stored, dict(zip(zoo.input_names(family), (tuple(t.shape) for t in inputs)))


@pytest.mark.parametrize("family, dynamo", ZOO_CASES)
def test_zoo_costs_match_torch(tmp_path_factory, family, dynamo):
    """MACs equal torch's own count; params equal torch's parameters plus BatchNorm statistics."""
    macs, stored, shapes = torch_reference(family)
    report = analyze_cost(load(zoo.exported(tmp_path_factory, family, dynamo=dynamo, dynamic_batch=True)), shapes)
    assert report.unknown_ops == {}
    assert report.stats.macs == macs
    assert report.stats.params == stored


# ---------------------------------------------------------------- model zoo


@pytest.fixture(scope="module")
def zoo_reports(light_model_paths, load_folded_light) -> dict[str, CostReport]:
    return {name: analyze_cost(load_folded_light(name)) for name in light_model_paths}


def test_resnet50_matches_published_totals(zoo_reports, load_folded_light):
    stats = zoo_reports["resnet50"].stats
    assert stats.macs == pytest.approx(RESNET50_MACS, rel=PUBLISHED_MACS_RTOL)
    assert stats.params == pytest.approx(RESNET50_PARAMS, rel=PUBLISHED_PARAMS_RTOL)
    # Exactly torchvision's count, plus the BatchNorm running statistics torch keeps as buffers.
    model = load_folded_light("resnet50")
    bn_statistics = sum(
        node.inputs[i].const_value.size for node in model.graph if node.op_type == "BatchNormalization" for i in (3, 4)
    )
    assert stats.params == RESNET50_EXACT_PARAMS + bn_statistics


def test_vgg19_matches_published_totals(zoo_reports):
    stats = zoo_reports["vgg19"].stats
    assert stats.macs == pytest.approx(VGG19_MACS, rel=PUBLISHED_MACS_RTOL)
    assert stats.params == pytest.approx(VGG19_PARAMS, rel=PUBLISHED_PARAMS_RTOL)
    assert stats.params == VGG19_EXACT_PARAMS  # no BatchNorm: nothing to add


def test_every_light_zoo_model_is_fully_costed(zoo_reports):
    for name, report in zoo_reports.items():
        assert report.unknown_ops == {}, name
        assert all(n.known for n in report.nodes), name
        assert report.stats.macs > 0 and report.stats.params > 0, name

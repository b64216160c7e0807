"""MACs and FLOPs of one node from its inferred shapes: one rule per op family (`RULES`).

Used by `analysis/cost.py`, which sums the nodes into model totals and handles subgraphs.

- **MAC**: one multiply-accumulate of a Conv, ConvTranspose, Gemm, MatMul, Einsum contraction or
  one of their integer forms (ConvInteger, QLinearConv, MatMulInteger, QLinearMatMul, and
  com.microsoft MatMulNBits: K x N per input row, whatever the weight's bit width).
  Bias additions are not MACs. Every other op has 0 MACs.
- **FLOPs** = 2 x MACs, plus for the same layers one add per output element when a bias is
  present (and 3 per output element to requantize for QLinearConv/QLinearMatMul), plus for
  every other op the counts below, per element:
  - elementwise unary and binary ops (Add, Mul, Relu, Sigmoid, Erf, Gelu, Where, ...): 1 per
    output element; a transcendental function counts as one. Sum/Max/Min of k inputs: k-1;
    Mean of k inputs: k.
  - QuantizeLinear: 3 per element (scale, round, zero point); DequantizeLinear: 2
    (zero point, scale); DynamicQuantizeLinear: 5 (min and max, then quantize).
  - BatchNormalization (inference): 2 per element (scale and shift).
    InstanceNormalization/LayerNormalization/GroupNormalization: 8 per element (mean 1,
    variance 3, normalize 2, scale and shift 2); MeanVarianceNormalization: 6;
    RMSNormalization: 4; LpNormalization: 3.
  - Softmax/LogSoftmax: 5 per element (max, subtract, exp, sum, divide or log); Hardmax: 1.
  - MaxPool/AveragePool: kernel size per output element; LpPool: twice that.
    GlobalMax/GlobalAveragePool: 1 per input element; GlobalLpPool: 2.
  - LRN: 2 x size + 3 per element (sum of squares over `size` channels, scale, power, divide).
  - Resize/Upsample: nearest 0 (a copy); linear 2 x 2^r and cubic 2 x 4^r per output element,
    r = number of axes whose size changes (the multiply-adds of the interpolation weights).
  - ReduceSum/Mean/Max/Min/Prod/L1/LogSum, ArgMax/ArgMin, CumSum: 1 per input element;
    ReduceSumSquare/L2/LogSumExp: 2.
  - Shape and data-movement ops (Reshape, Transpose, Concat, Split, Slice, Gather, Pad,
    Expand, Cast, Identity, Dropout, Constant, ...): 0, and known.

A node whose op has no rule, or whose rule needs a shape that could not be inferred, has an unknown
cost: `op_cost` says why.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from .shapes import ShapeInfo

MS = "com.microsoft"


def op_name(node: ir.Node) -> str:
    """The op type, qualified as `domain::op_type` outside the default ONNX domain: the keys of RULES."""
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return f"{domain}::{node.op_type}" if domain else node.op_type


class UnknownCost(Exception):
    """The node's cost cannot be computed; the message says why."""


@dataclass(frozen=True)
class Op:
    """A node with its inferred shapes: what the cost rules read."""

    node: ir.Node
    shapes: Mapping[str, ShapeInfo]

    def has_input(self, i: int) -> bool:
        return i < len(self.node.inputs) and self.node.inputs[i] is not None

    def input_shape(self, i: int) -> tuple[int, ...]:
        if not self.has_input(i):
            raise UnknownCost(f"input {i} is missing")
        return self._shape(self.node.inputs[i], f"input {i}")

    def output_shape(self, i: int = 0) -> tuple[int, ...]:
        return self._shape(self.node.outputs[i], f"output {i}")

    def input_numel(self, i: int = 0) -> int:
        return math.prod(self.input_shape(i))

    def output_numel(self, i: int = 0) -> int:
        return math.prod(self.output_shape(i))

    def present_inputs(self) -> int:
        return sum(v is not None for v in self.node.inputs)

    def attr(self, name: str, default=None):
        attr = self.node.attributes.get(name)
        return default if attr is None else attr.value

    def _shape(self, value: ir.Value, what: str) -> tuple[int, ...]:
        info = self.shapes.get(value.name)
        if info is None or info.shape is None:
            raise UnknownCost(f"shape of {what} '{value.name}' is unknown")
        return info.shape


def op_cost(node: ir.Node, shapes: Mapping[str, ShapeInfo]) -> tuple[int, int, str | None]:
    """(MACs, FLOPs, None) of `node`, or (0, 0, why) when its cost is unknown."""
    name = op_name(node)
    rule = RULES.get(name)
    if rule is None:
        return 0, 0, f"no cost rule for {name}"
    try:
        macs, flops = rule(Op(node, shapes))
    except UnknownCost as exc:
        return 0, 0, str(exc)
    except Exception as exc:  # malformed node (wrong rank, missing attribute): uncosted, not fatal
        return 0, 0, f"cannot cost {name}: {type(exc).__name__}: {exc}"
    return int(macs), int(flops), None


# ---------------------------------------------------------------- rules: (macs, flops) per op family

Cost = tuple[int, int]
Rule = Callable[[Op], Cost]


def _conv(op: Op, weight: int = 1, bias: int | None = 2, requantize: int = 0) -> Cost:
    # weight [M, C/group, k...]: each output element takes C/group * prod(k) multiply-adds
    kernel = op.input_shape(weight)
    out = op.output_numel()
    macs = out * math.prod(kernel[1:])
    return macs, 2 * macs + _bias_flops(op, bias, out) + requantize * out


def _conv_transpose(op: Op) -> Cost:
    # weight [C, M/group, k...]: each input element is scattered to M/group * prod(k) outputs
    kernel = op.input_shape(1)
    macs = op.input_numel(0) * math.prod(kernel[1:])
    return macs, 2 * macs + _bias_flops(op, 2, op.output_numel())


def _gemm(op: Op) -> Cost:
    a = op.input_shape(0)
    depth = a[0] if op.attr("transA", 0) else a[1]
    out = op.output_numel()
    macs = out * depth
    return macs, 2 * macs + _bias_flops(op, 2, out)


def _matmul(op: Op, requantize: int = 0) -> Cost:
    # numpy matmul semantics, batched and broadcast: one dot product of length K per output element
    depth = op.input_shape(0)[-1]
    out = op.output_numel()
    macs = out * depth
    return macs, 2 * macs + requantize * out


def _matmul_nbits(op: Op) -> Cost:
    # A [..., K] times a block-quantized B [K, N]: K multiply-adds per output element (and a bias)
    depth = int(op.attr("K", 0)) or op.input_shape(0)[-1]
    out = op.output_numel()
    macs = out * depth
    return macs, 2 * macs + _bias_flops(op, 5, out)


def _bias_flops(op: Op, slot: int | None, out: int) -> int:
    return out if slot is not None and op.has_input(slot) else 0


def _einsum(op: Op) -> Cost:
    equation = str(op.attr("equation", "")).replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != op.present_inputs():
        raise UnknownCost(f"Einsum equation '{equation}' does not match its {op.present_inputs()} inputs")
    sizes: dict[object, int] = {}
    labels_per_term = []
    for i, term in enumerate(terms):
        shape = op.input_shape(i)
        labels = _einsum_labels(term, len(shape))
        if len(labels) != len(shape):
            raise UnknownCost(f"Einsum term '{term}' does not match input rank {len(shape)}")
        labels_per_term.append(labels)
        for label, dim in zip(labels, shape):
            sizes[label] = max(sizes.get(label, 1), dim)  # size-1 dims broadcast
    if len(terms) == 2:
        macs = math.prod(sizes.values())  # one multiply-add per combination of all labels
        return macs, 2 * macs
    if len(terms) == 1:
        kept = set(_einsum_labels(rhs, len(op.output_shape()))) if arrow else _implicit_output(labels_per_term)
        reduces = any(label not in kept for label in labels_per_term[0])
        return 0, op.input_numel(0) if reduces else 0
    raise UnknownCost(f"Einsum with {len(terms)} operands has no cost rule")


def _einsum_labels(term: str, rank: int) -> list[object]:
    """Labels of one term; the dims under '...' get labels aligned from the right across terms."""
    if "..." not in term:
        return list(term)
    before, _, after = term.partition("...")
    hidden = rank - len(before) - len(after)
    return [*before, *(("...", hidden - 1 - p) for p in range(max(hidden, 0))), *after]


def _implicit_output(labels_per_term: Sequence[Sequence[object]]) -> set[object]:
    counts = Counter(label for labels in labels_per_term for label in labels)
    return {label for label, n in counts.items() if n == 1 or isinstance(label, tuple)}


def _per_output(flops_per_element: int) -> Rule:
    return lambda op: (0, flops_per_element * op.output_numel())


def _per_input(flops_per_element: int) -> Rule:
    return lambda op: (0, flops_per_element * op.input_numel(0))


def _variadic(extra: int) -> Rule:
    """Sum/Max/Min (extra=0): k-1 ops per output element for k inputs; Mean (extra=1): k."""
    return lambda op: (0, (op.present_inputs() - 1 + extra) * op.output_numel())


def _pool(per_kernel_element: int) -> Rule:
    def rule(op: Op) -> Cost:
        kernel = op.attr("kernel_shape")
        if not kernel:
            raise UnknownCost("pooling without kernel_shape")
        return 0, per_kernel_element * math.prod(kernel) * op.output_numel()

    return rule


def _lrn(op: Op) -> Cost:
    return 0, (2 * int(op.attr("size", 1)) + 3) * op.input_numel(0)


def _resize(op: Op) -> Cost:
    mode = op.attr("mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode == "nearest":
        return 0, 0
    points = {"linear": 2, "bilinear": 2, "cubic": 4}.get(mode)
    if points is None:
        raise UnknownCost(f"Resize mode '{mode}' has no cost rule")
    before, after = op.input_shape(0), op.output_shape()
    resized_axes = sum(a != b for a, b in zip(before, after))
    return 0, 2 * points**resized_axes * op.output_numel() if resized_axes else 0


def _free(op: Op) -> Cost:
    return 0, 0


_ELEMENTWISE_FLOPS: dict[str, int] = {
    op: 1
    for op in (
        # unary
        "Abs", "Neg", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sqrt", "Exp", "Log", "Relu",
        "Sigmoid", "Tanh", "Erf", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh",
        "Acosh", "Atanh", "Softplus", "Softsign", "Elu", "Selu", "Celu", "LeakyRelu", "ThresholdedRelu",
        "HardSigmoid", "HardSwish", "Gelu", "Mish", "Swish", "Not", "IsNaN", "IsInf", "Clip", "Shrink",
        "BitwiseNot",
        # binary and ternary
        "Add", "Sub", "Mul", "Div", "Pow", "Mod", "PRelu", "And", "Or", "Xor", "Equal", "Less",
        "LessOrEqual", "Greater", "GreaterOrEqual", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
        "Where",
    )
}  # fmt: skip

ELEMENTWISE_OPS = frozenset({*_ELEMENTWISE_FLOPS, "Sum", "Max", "Min", "Mean"})

_SHAPE_OPS = (
    "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND",
    "Flatten", "Squeeze", "Unsqueeze", "Shape", "Size", "Cast", "CastLike", "Identity", "Dropout",
    "Constant", "ConstantOfShape", "Pad", "Expand", "Tile", "Range", "DepthToSpace", "SpaceToDepth",
    "ScatterND", "ScatterElements", "OneHot", "EyeLike", "Trilu", "ReverseSequence", "Compress",
    "NonZero", "SplitToSequence", "ConcatFromSequence", "SequenceAt", "SequenceConstruct",
    "SequenceLength", "Optional", "OptionalGetElement", "OptionalHasElement",
)  # fmt: skip

RULES: dict[str, Rule] = {
    # layers with MACs
    "Conv": _conv,
    "ConvInteger": lambda op: _conv(op, weight=1, bias=None),
    "QLinearConv": lambda op: _conv(op, weight=3, bias=8, requantize=3),
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "MatMulInteger": _matmul,
    "QLinearMatMul": lambda op: _matmul(op, requantize=3),
    f"{MS}::MatMulNBits": _matmul_nbits,
    "Einsum": _einsum,
    # quantization
    "QuantizeLinear": _per_output(3),
    "DequantizeLinear": _per_output(2),
    "DynamicQuantizeLinear": _per_input(5),
    # pooling
    "MaxPool": _pool(1),
    "AveragePool": _pool(1),
    "LpPool": _pool(2),
    "GlobalMaxPool": _per_input(1),
    "GlobalAveragePool": _per_input(1),
    "GlobalLpPool": _per_input(2),
    # normalization
    "BatchNormalization": _per_input(2),
    "InstanceNormalization": _per_input(8),
    "LayerNormalization": _per_input(8),
    "GroupNormalization": _per_input(8),
    "MeanVarianceNormalization": _per_input(6),
    "RMSNormalization": _per_input(4),
    "LpNormalization": _per_input(3),
    "LRN": _lrn,
    # softmax family
    "Softmax": _per_input(5),
    "LogSoftmax": _per_input(5),
    "Hardmax": _per_input(1),
    # resampling
    "Resize": _resize,
    "Upsample": _resize,
    # reductions
    **{op: _per_input(1) for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                                    "ReduceL1", "ReduceLogSum", "ArgMax", "ArgMin", "CumSum")},
    **{op: _per_input(2) for op in ("ReduceSumSquare", "ReduceL2", "ReduceLogSumExp")},
    # elementwise
    **{op: _per_output(n) for op, n in _ELEMENTWISE_FLOPS.items()},
    "Sum": _variadic(0),
    "Max": _variadic(0),
    "Min": _variadic(0),
    "Mean": _variadic(1),
    # shape and data movement
    **{op: _free for op in _SHAPE_OPS},
}  # fmt: skip

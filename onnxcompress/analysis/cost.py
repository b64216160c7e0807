"""Per-node cost of a model at static input shapes: MACs, FLOPs, parameters, bytes.

Conventions
-----------
- **MAC**: one multiply-accumulate of a Conv, ConvTranspose, Gemm, MatMul, Einsum contraction or
  one of their integer forms (ConvInteger, QLinearConv, MatMulInteger, QLinearMatMul).
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
- **params**: elements of the constant inputs (initializers or Constant nodes) that are
  weights, each tensor counted once however many nodes share it, at its first consumer that
  uses it as a weight. Not weights: int64/bool/string tensors, inputs that are shapes,
  indices, axes, pads, scales or zero points (Reshape's shape, Slice's starts, Resize's scales,
  QuantizeLinear's scale and zero point, ...), and one-element operands of elementwise ops
  (epsilons, exponents, constant factors; PRelu's slope is the exception: it is learned).
  Quantizing a model therefore leaves its params unchanged.
- **weight_bytes**: bytes of every initializer and Constant node tensor (per node: those it
  consumes first; the model total also counts unused initializers).
- **activation_bytes**: bytes of node outputs, Constant nodes excluded (their outputs are weights).
- **op_counts**: number of nodes per op type; ops outside the default ONNX domain are named
  `domain::op_type`.

Only the main graph is counted (not the bodies of If/Loop/Scan). A node whose op has no rule,
or whose rule needs a shape that could not be inferred, costs 0, is marked `known=False` with a
reason, and is counted in `CostReport.unknown_ops`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from ..report import ModelStats
from .shapes import ShapeInfo, infer_shapes


@dataclass(frozen=True)
class NodeCost:
    name: str
    op_type: str
    macs: int
    flops: int
    params: int
    weight_bytes: int
    activation_bytes: int  # bytes of the node's outputs
    known: bool
    reason: str = ""  # why the cost is unknown


@dataclass(frozen=True)
class CostReport:
    nodes: tuple[NodeCost, ...]
    stats: ModelStats
    unknown_ops: Mapping[str, int] = field(default_factory=dict)  # op type -> nodes not costed

    def top(self, n: int = 10) -> list[NodeCost]:
        """The n nodes with the most MACs (ties by FLOPs, then graph order)."""
        order = sorted(range(len(self.nodes)), key=lambda i: (-self.nodes[i].macs, -self.nodes[i].flops, i))
        return [self.nodes[i] for i in order[:n]]


def analyze_cost(model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None) -> CostReport:
    """Cost of every main-graph node at static input shapes (see the module docstring)."""
    shapes = infer_shapes(model, input_shapes)
    constants = _constants(model)
    weight_owner = _weight_owners(model, constants)
    byte_owner: dict[str, int] = {}
    nodes: list[NodeCost] = []
    for index, node in enumerate(model.graph):
        nodes.append(_node_cost(index, node, shapes, constants, weight_owner, byte_owner))
    unknown = Counter(c.op_type for c in nodes if not c.known)
    stats = ModelStats(
        params=sum(c.params for c in nodes),
        macs=sum(c.macs for c in nodes),
        flops=sum(c.flops for c in nodes),
        weight_bytes=sum(t.nbytes for t in constants.values()),
        activation_bytes=sum(c.activation_bytes for c in nodes),
        op_counts=dict(Counter(_op_name(n) for n in model.graph)),
    )
    return CostReport(nodes=tuple(nodes), stats=stats, unknown_ops=dict(unknown))


def model_stats(model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None) -> ModelStats:
    return analyze_cost(model, input_shapes).stats


def mac_ratio(before: ModelStats, after: ModelStats) -> float:
    """Theoretical speedup: MACs before / MACs after (inf when everything was removed)."""
    if after.macs == 0:
        return 1.0 if before.macs == 0 else math.inf
    return before.macs / after.macs


# ---------------------------------------------------------------- constants and who owns them


@dataclass(frozen=True)
class _Constant:
    numel: int
    nbytes: int
    dtype: ir.DataType


def _constants(model: ir.Model) -> dict[str, _Constant]:
    """Initializers and Constant node outputs, by value name."""
    found: dict[str, _Constant] = {}
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            found[value.name] = _describe(value.const_value)
    for node in model.graph:
        if _op_name(node) == "Constant" and node.outputs[0].name not in found:
            tensor = ir.convenience.get_const_tensor(node.outputs[0])
            if tensor is not None:
                found[node.outputs[0].name] = _describe(tensor)
    return found


def _describe(tensor: ir.TensorProtocol) -> _Constant:
    return _Constant(numel=tensor.size, nbytes=tensor.nbytes, dtype=tensor.dtype)


#: Input positions that hold shapes, indices, axes, pads, scales or zero points, not weights.
_NON_WEIGHT_INPUTS: dict[str, frozenset[int]] = {
    op: frozenset(slots)
    for op, slots in {
        "Reshape": {1},
        "Expand": {1},
        "Tile": {1},
        "Slice": {1, 2, 3, 4},
        "Gather": {1},
        "GatherElements": {1},
        "GatherND": {1},
        "ScatterND": {1},
        "ScatterElements": {1},
        "Squeeze": {1},
        "Unsqueeze": {1},
        "Split": {1},
        "Pad": {1, 2, 3},
        "Resize": {1, 2, 3},
        "Upsample": {1},
        "ConstantOfShape": {0},
        "TopK": {1},
        "Range": {0, 1, 2},
        "OneHot": {1, 2},
        "CumSum": {1},
        "Trilu": {1},
        "Clip": {1, 2},
        "QuantizeLinear": {1, 2},
        "DequantizeLinear": {1, 2},
        "QLinearConv": {1, 2, 4, 5, 6, 7},
        "QLinearMatMul": {1, 2, 4, 5, 6, 7},
        "MatMulInteger": {2, 3},
        "ConvInteger": {2, 3},
        **{op: {1} for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                              "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")},
    }.items()
}
_NOT_WEIGHT_DTYPES = frozenset({ir.DataType.INT64, ir.DataType.BOOL, ir.DataType.STRING})


def _weight_owners(model: ir.Model, constants: Mapping[str, _Constant]) -> dict[str, int]:
    """Constant name -> index of the first node that uses it as a weight."""
    owners: dict[str, int] = {}
    for index, node in enumerate(model.graph):
        op = _op_name(node)
        for slot, value in enumerate(node.inputs):
            if value is None or value.name in owners or value.name not in constants:
                continue
            if _is_weight(op, slot, constants[value.name]):
                owners[value.name] = index
    return owners


def _is_weight(op: str, slot: int, constant: _Constant) -> bool:
    if constant.dtype in _NOT_WEIGHT_DTYPES or slot in _NON_WEIGHT_INPUTS.get(op, ()):
        return False
    is_hyperparameter = constant.numel == 1 and op in _ELEMENTWISE_OPS and op != "PRelu"
    return not is_hyperparameter


# ---------------------------------------------------------------- per node


class _Unknown(Exception):
    """The node's cost cannot be computed; the message says why."""


@dataclass(frozen=True)
class _Op:
    """A node with its inferred shapes: what the cost rules read."""

    node: ir.Node
    shapes: Mapping[str, ShapeInfo]

    def has_input(self, i: int) -> bool:
        return i < len(self.node.inputs) and self.node.inputs[i] is not None

    def input_shape(self, i: int) -> tuple[int, ...]:
        if not self.has_input(i):
            raise _Unknown(f"input {i} is missing")
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
            raise _Unknown(f"shape of {what} '{value.name}' is unknown")
        return info.shape


def _node_cost(
    index: int,
    node: ir.Node,
    shapes: Mapping[str, ShapeInfo],
    constants: Mapping[str, _Constant],
    weight_owner: Mapping[str, int],
    byte_owner: dict[str, int],
) -> NodeCost:
    op_name = _op_name(node)
    params = weight_bytes = 0
    for value in node.inputs:
        if value is None or value.name not in constants:
            continue
        if weight_owner.get(value.name) == index:
            params += constants[value.name].numel
        if byte_owner.setdefault(value.name, index) == index:
            weight_bytes += constants[value.name].nbytes
    activation_bytes = 0 if op_name == "Constant" else sum(
        shapes[v.name].nbytes or 0 for v in node.outputs if v.name in shapes
    )

    macs = flops = 0
    known, reason = True, ""
    rule = _RULES.get(op_name)
    if rule is None:
        known, reason = False, f"no cost rule for {op_name}"
    else:
        try:
            macs, flops = rule(_Op(node, shapes))
        except _Unknown as exc:
            known, reason = False, str(exc)
        except Exception as exc:  # malformed node (wrong rank, missing attribute): uncosted, not fatal
            known, reason = False, f"cannot cost {op_name}: {type(exc).__name__}: {exc}"
    return NodeCost(
        name=node.name or f"{op_name}_{index}",
        op_type=op_name,
        macs=int(macs),
        flops=int(flops),
        params=params,
        weight_bytes=weight_bytes,
        activation_bytes=activation_bytes,
        known=known,
        reason=reason,
    )


def _op_name(node: ir.Node) -> str:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return f"{domain}::{node.op_type}" if domain else node.op_type


# ---------------------------------------------------------------- rules: (macs, flops) per op family

Cost = tuple[int, int]
Rule = Callable[[_Op], Cost]


def _conv(op: _Op, weight: int = 1, bias: int | None = 2, requantize: int = 0) -> Cost:
    # weight [M, C/group, k...]: each output element takes C/group * prod(k) multiply-adds
    kernel = op.input_shape(weight)
    out = op.output_numel()
    macs = out * math.prod(kernel[1:])
    return macs, 2 * macs + _bias_flops(op, bias, out) + requantize * out


def _conv_transpose(op: _Op) -> Cost:
    # weight [C, M/group, k...]: each input element is scattered to M/group * prod(k) outputs
    kernel = op.input_shape(1)
    macs = op.input_numel(0) * math.prod(kernel[1:])
    return macs, 2 * macs + _bias_flops(op, 2, op.output_numel())


def _gemm(op: _Op) -> Cost:
    a = op.input_shape(0)
    depth = a[0] if op.attr("transA", 0) else a[1]
    out = op.output_numel()
    macs = out * depth
    return macs, 2 * macs + _bias_flops(op, 2, out)


def _matmul(op: _Op, requantize: int = 0) -> Cost:
    # numpy matmul semantics, batched and broadcast: one dot product of length K per output element
    depth = op.input_shape(0)[-1]
    out = op.output_numel()
    macs = out * depth
    return macs, 2 * macs + requantize * out


def _bias_flops(op: _Op, slot: int | None, out: int) -> int:
    return out if slot is not None and op.has_input(slot) else 0


def _einsum(op: _Op) -> Cost:
    equation = str(op.attr("equation", "")).replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != op.present_inputs():
        raise _Unknown(f"Einsum equation '{equation}' does not match its {op.present_inputs()} inputs")
    sizes: dict[object, int] = {}
    labels_per_term = []
    for i, term in enumerate(terms):
        shape = op.input_shape(i)
        labels = _einsum_labels(term, len(shape))
        if len(labels) != len(shape):
            raise _Unknown(f"Einsum term '{term}' does not match input rank {len(shape)}")
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
    raise _Unknown(f"Einsum with {len(terms)} operands has no cost rule")


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
    def rule(op: _Op) -> Cost:
        kernel = op.attr("kernel_shape")
        if not kernel:
            raise _Unknown("pooling without kernel_shape")
        return 0, per_kernel_element * math.prod(kernel) * op.output_numel()

    return rule


def _lrn(op: _Op) -> Cost:
    return 0, (2 * int(op.attr("size", 1)) + 3) * op.input_numel(0)


def _resize(op: _Op) -> Cost:
    mode = op.attr("mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode == "nearest":
        return 0, 0
    points = {"linear": 2, "bilinear": 2, "cubic": 4}.get(mode)
    if points is None:
        raise _Unknown(f"Resize mode '{mode}' has no cost rule")
    before, after = op.input_shape(0), op.output_shape()
    resized_axes = sum(a != b for a, b in zip(before, after))
    return 0, 2 * points**resized_axes * op.output_numel() if resized_axes else 0


def _free(op: _Op) -> Cost:
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

_ELEMENTWISE_OPS = frozenset({*_ELEMENTWISE_FLOPS, "Sum", "Max", "Min", "Mean"})

_SHAPE_OPS = (
    "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND",
    "Flatten", "Squeeze", "Unsqueeze", "Shape", "Size", "Cast", "CastLike", "Identity", "Dropout",
    "Constant", "ConstantOfShape", "Pad", "Expand", "Tile", "Range", "DepthToSpace", "SpaceToDepth",
    "ScatterND", "ScatterElements", "OneHot", "EyeLike", "Trilu", "ReverseSequence", "Compress",
    "NonZero", "SplitToSequence", "ConcatFromSequence", "SequenceAt", "SequenceConstruct",
    "SequenceLength", "Optional", "OptionalGetElement", "OptionalHasElement",
)  # fmt: skip

_RULES: dict[str, Rule] = {
    # layers with MACs
    "Conv": _conv,
    "ConvInteger": lambda op: _conv(op, weight=1, bias=None),
    "QLinearConv": lambda op: _conv(op, weight=3, bias=8, requantize=3),
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "MatMulInteger": _matmul,
    "QLinearMatMul": lambda op: _matmul(op, requantize=3),
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

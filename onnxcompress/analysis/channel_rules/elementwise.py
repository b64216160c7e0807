"""Channel rules for ops that keep channels where they are: unary and n-ary elementwise ops,
pooling, normalizations, softmax, reductions over other axes, Pad, QuantizeLinear/DequantizeLinear."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..channel_tracking import ChannelTracker, Layout
from .common import Rule, attr_int, const_data, normalize_axis


def _passthrough(g: ChannelTracker, node: ir.Node) -> None:
    """Elementwise on the first input (Relu, Sigmoid, Cast, pooling, ...): channels unchanged."""
    layout = g.layout(node.inputs[0]) if node.inputs else None
    if layout is None:
        return
    in_shape, out_shape = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    if in_shape is not None and out_shape is not None and any(in_shape[a] != out_shape[a] for a in layout.axes):
        g.block(layout.atoms, f"{node.op_type} at node {node.name} changes a channel axis")
        return
    g.set(node.outputs[0], layout)


def _spatial(g: ChannelTracker, node: ir.Node) -> None:
    """Pooling-like ops work per channel on axis 1 and keep it; anything else on a channel axis is blocked."""
    layout = g.layout(node.inputs[0])
    if layout is not None and layout.axes != (1,):
        g.block(layout.atoms, f"{node.op_type} at node {node.name} pools over a channel axis")
        return
    _passthrough(g, node)


def _aligned(layout: Layout, rank: int, out_rank: int) -> Layout:
    """An operand's layout on the output's axes under numpy broadcasting (right-aligned)."""
    return layout.moved([a + out_rank - rank for a in layout.axes]) if rank != out_rank else layout


def coupler(g: ChannelTracker, node: ir.Node) -> None:
    """Elementwise ops of several operands (Add, Mul, Where, Sum, ...): position i of every operand is
    one channel; per-channel constants are sliced, broadcast ones kept."""
    out_shape = g.shape(node.outputs[0])
    inputs = [v for v in node.inputs if v is not None]
    tracked = [(v, g.layout(v)) for v in inputs if g.layout(v) is not None]
    if not tracked:
        return
    if out_shape is None or any(g.shape(v) is None for v in inputs):
        for _, lay in tracked:
            g.block(lay.atoms, f"{node.op_type} at node {node.name}: unknown shapes")
        return
    rank = len(out_shape)
    aligned = [_aligned(lay, len(g.shape(v)), rank) for v, lay in tracked]
    base = aligned[0]
    for other in aligned[1:]:
        if other.axes != base.axes or other.atoms.shape != base.atoms.shape:
            for lay in aligned:
                g.block(lay.atoms, f"{node.op_type} at node {node.name} mixes different channel axes")
            return
        g.uf.union_arrays(base.atoms, other.atoms)
    for v in inputs:
        if g.layout(v) is not None:
            continue
        shape = g.shape(v)
        offset = rank - len(shape)
        sizes = [shape[a - offset] if a - offset >= 0 else 1 for a in base.axes]
        if all(s == 1 for s in sizes):
            continue  # broadcast along the channels: no slicing needed
        const = const_data(v)
        if const is None:
            g.block(base.atoms, f"{node.op_type} at node {node.name}: operand '{v.name}' has untracked channels")
            return
        if len(base.axes) != 1:
            g.block(base.atoms, f"{node.op_type} at node {node.name}: constant over several channel axes")
            return
        g.slice(v, base.axes[0] - offset, base.atoms, "param", node)
    g.set(node.outputs[0], base)


def _softmax(g: ChannelTracker, node: ir.Node) -> None:
    layout = g.layout(node.inputs[0])
    shape = g.shape(node.inputs[0])
    if layout is None:
        return
    if shape is None:
        g.block(layout.atoms, f"{node.op_type} at node {node.name}: unknown shape")
        return
    rank = len(shape)
    opset = g.model.opset_imports.get("", 13)
    axis = normalize_axis(attr_int(node, "axis", -1 if opset >= 13 else 1), rank)
    normalized = {axis} if opset >= 13 else set(range(axis, rank))
    if normalized & set(layout.axes):
        g.block(layout.atoms, f"{node.op_type} on channel axis at node {node.name}")
        return
    g.set(node.outputs[0], layout)


def _layernorm(g: ChannelTracker, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        return
    axis = normalize_axis(attr_int(node, "axis", -1), len(shape))
    if any(a >= axis for a in layout.axes):
        g.block(layout.atoms, f"{node.op_type} over the channel axis at node {node.name}")
        return
    g.set(node.outputs[0], layout)


def _batchnorm(g: ChannelTracker, node: ir.Node) -> None:
    layout = g.layout(node.inputs[0])
    if layout is None:
        return
    if layout.axes != (1,):
        g.block(layout.atoms, f"{node.op_type} at node {node.name}: channels not on axis 1")
        return
    for v in node.inputs[1:]:
        if v is None:
            continue
        if const_data(v) is None:
            g.block(layout.atoms, f"{node.op_type} at node {node.name}: parameter '{v.name}' is not constant")
            return
    for v in node.inputs[1:]:
        if v is not None:
            g.slice(v, 0, layout.atoms, "param", node)
    if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
        g.block(layout.atoms, f"{node.op_type} at node {node.name} runs in training mode")
        return
    g.set(node.outputs[0], layout)


def _pad(g: ChannelTracker, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        return
    pads = const_data(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if pads is None:
        attr = node.attributes.get_ints("pads", None)
        pads = np.array(attr) if attr is not None else None
    if pads is None or len(node.inputs) > 3 and node.inputs[3] is not None:
        g.block(layout.atoms, f"Pad at node {node.name}: pads are not constant")
        return
    rank = len(shape)
    if any(pads[a] != 0 or pads[a + rank] != 0 for a in layout.axes):
        g.block(layout.atoms, f"Pad at node {node.name} pads a channel axis")
        return
    g.set(node.outputs[0], layout)


def _reduce(g: ChannelTracker, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        return
    rank = len(shape)
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        const = const_data(node.inputs[1])
        if const is None:
            g.block(layout.atoms, f"{node.op_type} at node {node.name}: axes are not constant")
            return
        axes = const.tolist()
    if axes is None or len(axes) == 0:
        if node.attributes.get_int("noop_with_empty_axes", 0):
            g.set(node.outputs[0], layout)
            return
        axes = list(range(rank))
    axes = sorted(normalize_axis(int(a), rank) for a in axes)
    if set(axes) & set(layout.axes):
        g.block(layout.atoms, f"{node.op_type} over the channel axis at node {node.name}")
        return
    if node.attributes.get_int("keepdims", 1):
        g.set(node.outputs[0], layout)
    else:
        g.set(node.outputs[0], layout.moved([a - sum(1 for r in axes if r < a) for a in layout.axes]))


def _qdq(g: ChannelTracker, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        return
    scale = const_data(node.inputs[1])
    if scale is None:
        g.block(layout.atoms, f"{node.op_type} at node {node.name}: scale is not constant")
        return
    if scale.size > 1:
        axis = normalize_axis(attr_int(node, "axis", 1), len(shape))
        if layout.axes != (axis,):
            g.block(layout.atoms, f"{node.op_type} at node {node.name}: per-axis scale off the channel axis")
            return
        for v in node.inputs[1:]:
            if v is not None:
                g.slice(v, 0, layout.atoms, "param", node)
    g.set(node.outputs[0], layout)


_UNARY = """Abs Acos Acosh Asin Asinh Atan Atanh Cast CastLike Ceil Celu Clip Cos Cosh Dropout Elu Erf Exp Floor Gelu
HardSigmoid HardSwish Identity IsInf IsNaN LeakyRelu Log Mish Neg Not Reciprocal Relu Round Selu Shrink Sigmoid Sign
Sin Sinh Softplus Softsign Sqrt Tan Tanh ThresholdedRelu""".split()
_COUPLERS = "Add And BitShift Div Equal Greater GreaterOrEqual Less LessOrEqual Max Mean Min Mod Mul Or Pow PRelu Sub Sum Where Xor".split()
_SPATIAL = "AveragePool GlobalAveragePool GlobalLpPool GlobalMaxPool LpPool MaxPool MaxRoiPool".split()
_REDUCE = "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare".split()

RULES: dict[str, Rule] = {
    **{op: _passthrough for op in _UNARY},
    **{op: coupler for op in _COUPLERS},
    **{op: _spatial for op in _SPATIAL},
    **{op: _reduce for op in _REDUCE},
    "BatchNormalization": _batchnorm, "InstanceNormalization": _batchnorm,
    "LayerNormalization": _layernorm,
    "Softmax": _softmax, "LogSoftmax": _softmax, "Hardmax": _softmax,
    "Pad": _pad,
    "QuantizeLinear": _qdq, "DequantizeLinear": _qdq,
}

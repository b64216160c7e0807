"""Layers kept in float inside a QDQ model stay in float when ONNX Runtime loads it.

ORT's WeightBiasQuantization graph transformer (on by default) finds every Conv, ConvTranspose and
Gemm whose input comes from a DequantizeLinear with a per-tensor scale and whose weight is a float
initializer, and quantizes that weight itself: symmetric, per-tensor int8. A layer the quantizer
kept in float for accuracy then runs with weights far coarser than the per-channel int8 it was
spared from (a depthwise conv's channels differ in range by 100x). Measured on EfficientNet-Lite1:
one depthwise conv "kept in float" cost 3 dB of output SQNR in ORT while the same graph simulated
without graph optimizations gained 0.3 dB.

The transformer only fires on a per-tensor DequantizeLinear, so a float layer gets its own copy of
that DequantizeLinear with the same scale repeated once per input channel (per-axis): the values
are identical, ORT leaves the weight alone, and the int8 producer still fuses through its Q.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..analysis.channel_rules.common import attr_int
from ..model import add_initializer
from ..names import NameAllocator

#: The ops ORT's WeightBiasQuantization rewrites.
GUARDED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})


def _input_channels(node: ir.Node, weight: ir.TensorProtocol) -> tuple[int, int] | None:
    """(axis of input 0 that holds the channels, their count), or None if the weight does not say."""
    dims = list(weight.shape)
    if node.op_type == "Conv" and len(dims) >= 3:
        return 1, dims[1] * attr_int(node, "group", 1)
    if node.op_type == "ConvTranspose" and len(dims) >= 3:
        return 1, dims[0]
    if node.op_type == "Gemm" and len(dims) == 2:
        return (0 if attr_int(node, "transA", 0) else 1), dims[1 if attr_int(node, "transB", 0) else 0]
    return None


def guard_float_layers(model: ir.Model) -> list[str]:
    """Give every float Conv/ConvTranspose/Gemm of the main graph that reads a per-tensor
    DequantizeLinear its own per-axis copy of it (in place). Returns the names of the guarded nodes."""
    graph = model.graph
    fresh = NameAllocator(model)
    guarded: list[str] = []
    for node in list(graph):
        copy = _guard(graph, node, fresh)
        if copy is not None:
            graph.insert_before(node, copy)
            node.replace_input_with(0, copy.outputs[0])
            guarded.append(node.name)
    if guarded:  # a DequantizeLinear that only fed guarded layers is dead now
        graph.remove([n for n in graph if n.op_type == "DequantizeLinear"
                      and not any(o.uses() or o.is_graph_output() for o in n.outputs)], safe=True)
    return guarded


def _initializer(graph: ir.Graph, value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of `value` when it is an initializer of `graph`."""
    if value is None or graph.initializers.get(value.name) is not value:
        return None
    return value.const_value


def _guard(graph: ir.Graph, node: ir.Node, fresh: NameAllocator) -> ir.Node | None:
    """The per-axis copy of the per-tensor DequantizeLinear that `node` reads, with its scale and zero
    point registered as initializers; None where there is nothing to guard."""
    if node.op_type not in GUARDED_OPS or len(node.inputs) < 2:
        return None
    weight = _initializer(graph, node.inputs[1])
    dq = node.inputs[0].producer() if node.inputs[0] is not None else None
    if weight is None or weight.dtype != ir.DataType.FLOAT or dq is None or dq.op_type != "DequantizeLinear":
        return None
    has_zero = len(dq.inputs) > 2 and dq.inputs[2] is not None
    scale = _initializer(graph, dq.inputs[1])
    zero = _initializer(graph, dq.inputs[2]) if has_zero else None
    channels = _input_channels(node, weight)
    if scale is None or scale.size != 1 or channels is None or (has_zero and zero is None):
        return None
    axis, count = channels
    base = f"{node.inputs[0].name}_float_{node.name or 'layer'}"
    arrays = [np.full(count, scale.numpy().item(), dtype=np.float32)]
    names = [fresh(f"{base}_scale")]
    if zero is not None:
        z = zero.numpy()
        arrays.append(np.full(count, z.item(), dtype=z.dtype))
        names.append(fresh(f"{base}_zero_point"))
    inputs = [dq.inputs[0]]
    inputs += [add_initializer(graph, ir.tensor(array, name=name)) for name, array in zip(names, arrays)]
    return ir.node("DequantizeLinear", inputs, {"axis": axis}, outputs=[ir.Value(name=fresh(base))],
                   name=fresh(f"{base}_DequantizeLinear"))


__all__ = ["GUARDED_OPS", "guard_float_layers"]

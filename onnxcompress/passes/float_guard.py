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
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..names import NameAllocator

#: The ops ORT's WeightBiasQuantization rewrites.
GUARDED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _input_channels(node: onnx.NodeProto, weight: onnx.TensorProto) -> tuple[int, int] | None:
    """(axis of input 0 that holds the channels, their count), or None if the weight does not say."""
    dims = list(weight.dims)
    if node.op_type == "Conv" and len(dims) >= 3:
        return 1, dims[1] * _attr(node, "group", 1)
    if node.op_type == "ConvTranspose" and len(dims) >= 3:
        return 1, dims[0]
    if node.op_type == "Gemm" and len(dims) == 2:
        return (0 if _attr(node, "transA", 0) else 1), dims[1 if _attr(node, "transB", 0) else 0]
    return None


def guard_float_layers(proto: onnx.ModelProto) -> list[str]:
    """Give every float Conv/ConvTranspose/Gemm that reads a per-tensor DequantizeLinear its own
    per-axis copy of it (in place). Returns the names of the guarded nodes."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    fresh = NameAllocator(graph)
    guarded: list[str] = []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        guard = _guard(node, producer, inits, fresh)
        if guard is not None:
            dq, new_inits = guard
            graph.initializer.extend(new_inits)
            nodes.append(dq)
            node.input[0] = dq.output[0]
            guarded.append(node.name)
        nodes.append(node)
    if guarded:  # a DequantizeLinear that only fed guarded layers is dead now
        used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
        del graph.node[:]
        graph.node.extend(n for n in nodes if n.op_type != "DequantizeLinear" or n.output[0] in used)
    return guarded


def _guard(node, producer, inits, fresh) -> tuple[onnx.NodeProto, list[onnx.TensorProto]] | None:
    if node.op_type not in GUARDED_OPS or len(node.input) < 2:
        return None
    weight = inits.get(node.input[1])
    dq = producer.get(node.input[0])
    if weight is None or weight.data_type != TensorProto.FLOAT or dq is None or dq.op_type != "DequantizeLinear":
        return None
    scale = inits.get(dq.input[1])
    zero = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    channels = _input_channels(node, weight)
    if scale is None or int(np.prod(scale.dims)) != 1 or channels is None or (len(dq.input) > 2 and dq.input[2] and zero is None):
        return None
    axis, count = channels
    base = f"{node.input[0]}_float_{node.name or 'layer'}"
    new = [numpy_helper.from_array(np.full(count, numpy_helper.to_array(scale).item(), dtype=np.float32), fresh(f"{base}_scale"))]
    inputs = [dq.input[0], new[0].name]
    if zero is not None:
        z = numpy_helper.to_array(zero)
        new.append(numpy_helper.from_array(np.full(count, z.item(), dtype=z.dtype), fresh(f"{base}_zero_point")))
        inputs.append(new[1].name)
    copy = helper.make_node("DequantizeLinear", inputs, [fresh(base)], name=fresh(f"{base}_DequantizeLinear"), axis=axis)
    return copy, new


__all__ = ["GUARDED_OPS", "guard_float_layers"]

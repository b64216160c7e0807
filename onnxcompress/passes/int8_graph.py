"""The QDQ rewrite of static int8 (QuantizeQDQ, passes/quantize.py): activation quantization
parameters, the weights' int8 encodings, and the copy of the model with QuantizeLinear/
DequantizeLinear pairs on the planned values and int8/int32 weights and biases.

A Relu or Clip folded into its producer's output quantization (passes/int8_placement.py) is dropped
where the uint8 range clamps exactly as it does (zero point 0 for a lower bound of 0, the top code
at or below an upper bound): ORT then runs the pair as one int8 kernel instead of requantizing
around a float Relu/Clip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..names import NameAllocator
from .float_guard import guard_float_layers
from .int8_placement import Plan, ProtoGraph, clamp_bounds, constant_weight_anchors, ensure_node_names, node_attr
from .int8_weights import MIN_SCALE, Kernels, WeightEncoding, encode_weight, quantize_bias


@dataclass(frozen=True)
class QuantParams:
    scale: float
    zero_point: int
    dtype: int  # TensorProto.UINT8 or INT8


def activation_params(lo: float, hi: float, *, symmetric: bool) -> QuantParams:
    """uint8 asymmetric over [lo, hi] (zero exactly representable), or int8 symmetric over max(|lo|, |hi|)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        return QuantParams(max(max(-lo, hi) / 127.0, MIN_SCALE), 0, TensorProto.INT8)
    scale = max((hi - lo) / 255.0, MIN_SCALE)
    zero_point = int(np.clip(round(-lo / scale), 0, 255))
    return QuantParams(scale, zero_point, TensorProto.UINT8)


def quantization_clamps_to(p: QuantParams, lower: float, upper: float) -> bool:
    """Whether Q(x) == Q(clip(x, lower, upper)) for every x: Q is monotone, so it suffices that the
    bounds themselves quantize to the bottom and top codes (float32 divide, round half to even, as ORT)."""
    info = np.iinfo(np.uint8 if p.dtype == TensorProto.UINT8 else np.int8)
    scale = np.float32(p.scale)

    def code(x: float) -> float:
        return float(np.clip(np.rint(np.float32(x) / scale) + p.zero_point, info.min, info.max))

    return (lower == -np.inf or code(lower) == info.min) and (upper == np.inf or code(upper) == info.max)


class FreshNames(NameAllocator):
    """Names not yet used in one graph (base, base_1, base_2, ...), and the initializers added under them."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        super().__init__(graph)
        self.initializers: list[onnx.TensorProto] = []

    def const(self, base: str, array: np.ndarray) -> str:
        """A new initializer holding `array`, kept in `initializers` until the caller adds them."""
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name


def editable_copy(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, ProtoGraph, FreshNames]:
    """A copy of `proto` to rewrite, every node named, with its producer/consumer maps and its fresh names."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    ensure_node_names(out.graph)
    return out, ProtoGraph(out.graph), FreshNames(out.graph)


def _weight_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if node_attr(node, "transB", 0) else 1
    return 1  # MatMul [K, N]: one scale per output column


def weight_encodings(
    proto: onnx.ModelProto, plan: Plan, params: Mapping[str, QuantParams], *, per_channel: bool = True,
    kernels: Kernels = "any", mean_squares: Mapping[str, float] | None = None,
) -> dict[str, WeightEncoding]:
    """{int8 anchor node: its weight's encoding} (passes/int8_weights.py), from the float weight, the
    per-channel axis, the input's scale and E[x^2] (`mean_squares`) and the float bias (so the int32
    bias fits)."""
    mean_squares = mean_squares or {}
    g = ProtoGraph(proto.graph)
    encodings: dict[str, WeightEncoding] = {}
    for node in constant_weight_anchors(g, plan):
        w = numpy_helper.to_array(g.inits[node.input[1]]).astype(np.float32)
        x = params.get(node.input[0])
        b_name = node.input[2] if len(node.input) > 2 else ""
        bias = numpy_helper.to_array(g.inits[b_name]).astype(np.float32) if b_name in g.inits else None
        bias = bias if bias is not None and bias.ndim == 1 else None
        groups = int(node_attr(node, "group", 1))
        depthwise = node.op_type == "Conv" and groups > 1 and w.shape[1] == 1 and w.shape[0] == groups
        encodings[node.name] = encode_weight(
            node.op_type, w, _weight_axis(node) if per_channel else None, trans_b=bool(node_attr(node, "transB", 0)),
            depthwise=depthwise, kernels=kernels, x_scale=None if x is None else x.scale, x_mean_square=mean_squares.get(node.input[0]),
            bias=bias)
    return encodings


def quantize_graph(
    proto: onnx.ModelProto,
    plan: Plan,
    params: Mapping[str, QuantParams],
    *,
    encodings: Mapping[str, WeightEncoding] | None = None,
    per_channel: bool = True,
    drop_relus: bool = True,
) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `proto` with Q/DQ pairs on the planned values and int8/int32 weights and biases
    (`encodings` from weight_encodings; computed here for any kernels when not given)."""
    if encodings is None:
        encodings = weight_encodings(proto, plan, params, per_channel=per_channel)
    out, g, names = editable_copy(proto)
    graph = out.graph
    notes: list[str] = []
    dropped = _dropped_activations(g, plan, params, drop_relus)
    qdq, renamed = _activation_pairs(g, plan, params, dropped, names)
    pre_nodes, saturated = _weight_dequantizers(g, plan, params, encodings, names)
    if saturated:
        notes.append(f"int32 bias saturated in {', '.join(saturated)}")
    nodes, used = _ordered_nodes(graph, plan, pre_nodes, qdq, renamed, dropped)
    graph_inputs = {i.name for i in graph.input}
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name in used or t.name in graph_inputs]
    del graph.initializer[:]
    graph.initializer.extend(kept + names.initializers)
    guarded = guard_float_layers(out)  # else ORT gives the float layers per-tensor int8 weights itself
    if guarded:
        notes.append(f"{len(guarded)} float layers read int8 activations through a per-axis DequantizeLinear, "
                     "so ONNX Runtime keeps their weights in float")
    return out, notes


def _dropped_activations(
    g: ProtoGraph, plan: Plan, params: Mapping[str, QuantParams], drop_relus: bool,
) -> dict[str, str]:
    """{activation output: activation input} of the folded Relu/Clip nodes that the output
    quantization replaces exactly (its clamp is theirs)."""
    dropped: dict[str, str] = {}
    by_name = {n.name: n for n in g.graph.node}
    for act_name in plan.fused_activations:
        act = by_name[act_name]
        p, bounds = params.get(act.output[0]), clamp_bounds(g, act)
        if drop_relus and p is not None and bounds is not None and quantization_clamps_to(p, *bounds):
            dropped[act.output[0]] = act.input[0]
    return dropped


def _activation_pairs(
    g: ProtoGraph, plan: Plan, params: Mapping[str, QuantParams], dropped: Mapping[str, str], names: FreshNames,
) -> tuple[dict[str, list[onnx.NodeProto]], dict[str, str]]:
    """({value: its Q and DQ nodes, to be placed after its producer}, {value: the DQ output its
    consumers read instead})."""
    qdq: dict[str, list[onnx.NodeProto]] = {}
    renamed: dict[str, str] = {}
    for v in plan.values:
        p = params.get(v)
        if p is None:
            continue
        scale = names.const(f"{v}_scale", np.float32(p.scale))
        zp = names.const(f"{v}_zero_point",
                         np.array(p.zero_point, dtype=np.uint8 if p.dtype == TensorProto.UINT8 else np.int8))
        q, dq = names.fresh(f"{v}_quantized"), names.fresh(f"{v}_dequantized")
        source = dropped.get(v, v)
        if v in g.outputs:  # the producer writes a new name; the DQ writes the graph output
            source = names.fresh(f"{v}_float")
            g.producer[v].output[list(g.producer[v].output).index(v)] = source
            dq = v
        else:
            renamed[v] = dq
        qdq[source if v in g.outputs else v] = [
            helper.make_node("QuantizeLinear", [source, scale, zp], [q], name=names.fresh(f"{v}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [q, scale, zp], [dq], name=names.fresh(f"{v}_DequantizeLinear")),
        ]
    return qdq, renamed


def _weight_dequantizers(
    g: ProtoGraph, plan: Plan, params: Mapping[str, QuantParams], encodings: Mapping[str, WeightEncoding],
    names: FreshNames,
) -> tuple[list[onnx.NodeProto], list[str]]:
    """(DequantizeLinear nodes of the int8 weights and int32 biases, the layers whose bias saturated
    int32); each int8 layer is rewired to read them."""
    weight_dq: dict[tuple, str] = {}  # one DQ per distinct encoding of a weight
    pre_nodes: list[onnx.NodeProto] = []
    saturated: list[str] = []
    for node in constant_weight_anchors(g, plan):
        w_name, enc = node.input[1], encodings[node.name]
        x_params = params.get(node.input[0])
        ws = enc.scales
        key = (w_name, enc.axis, enc.codes.dtype.str, ws.tobytes())
        if key not in weight_dq:
            scale = names.const(f"{w_name}_scale", ws)
            zp = names.const(f"{w_name}_zero_point", np.full(ws.shape, enc.zero_point, dtype=enc.codes.dtype))
            weight_dq[key] = names.fresh(f"{w_name}_dequantized")
            attrs = {"axis": enc.axis} if enc.axis is not None else {}
            pre_nodes.append(helper.make_node(
                "DequantizeLinear", [names.const(f"{w_name}_quantized", enc.codes), scale, zp], [weight_dq[key]],
                name=names.fresh(f"{w_name}_DequantizeLinear"), **attrs))
        node.input[1] = weight_dq[key]
        if len(node.input) > 2 and node.input[2] and node.input[2] in g.constants and x_params is not None:
            b = numpy_helper.to_array(g.inits[node.input[2]]).astype(np.float32)
            if b.ndim == 1 and (ws.size == 1 or ws.size == b.size):
                bq, bs, sat = quantize_bias(b, x_params.scale, ws)
                if sat:
                    saturated.append(node.name)
                bscale = names.const(f"{node.input[2]}_scale", bs)
                bzp = names.const(f"{node.input[2]}_zero_point", np.zeros(bs.shape, dtype=np.int32))
                b_out = names.fresh(f"{node.input[2]}_dequantized")
                pre_nodes.append(helper.make_node(
                    "DequantizeLinear", [names.const(f"{node.input[2]}_quantized", bq), bscale, bzp], [b_out],
                    name=names.fresh(f"{node.name}_bias_DequantizeLinear"), axis=0))
                node.input[2] = b_out
    return pre_nodes, saturated


def _ordered_nodes(
    graph: onnx.GraphProto, plan: Plan, pre_nodes: list[onnx.NodeProto], qdq: Mapping[str, list[onnx.NodeProto]],
    renamed: Mapping[str, str], dropped: Mapping[str, str],
) -> tuple[list[onnx.NodeProto], set[str]]:
    """(the new node list, the values it reads): Q/DQ right after each quantized value's producer,
    consumers rewired, dropped activations left out."""
    nodes: list[onnx.NodeProto] = list(pre_nodes)
    graph_inputs = {i.name for i in graph.input}
    for v, pair in qdq.items():
        if v in graph_inputs:
            nodes += pair
    dropped_acts = {n.name for n in graph.node if n.name in plan.fused_activations and n.output[0] in dropped}
    for node in graph.node:
        if node.name in dropped_acts:
            for v in node.output:
                nodes += qdq.get(v, [])
            continue
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
        nodes.append(node)
        for v in node.output:
            nodes += qdq.get(v, [])
    # Producers feeding dropped activations: the Q reads the producer output, placed after the
    # activation's slot, which is after the producer (graph order is topological).
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    bound_inputs = {i for n in graph.node if n.name in dropped_acts for i in n.input[1:]}
    # Constant nodes that only held a dropped Clip's bounds go with it.
    nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output[0] in bound_inputs and n.output[0] not in used)]
    return nodes, used

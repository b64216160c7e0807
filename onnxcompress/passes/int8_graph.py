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
import onnx_ir as ir

from ..model import add_initializer, clone
from ..names import NameAllocator
from .float_guard import guard_float_layers
from .int8_placement import (
    Plan,
    PlanGraph,
    clamp_bounds,
    constant_weight_anchors,
    ensure_node_names,
    input_name,
    node_attr,
)
from .int8_weights import MIN_SCALE, Kernels, WeightEncoding, encode_weight, quantize_bias


@dataclass(frozen=True)
class QuantParams:
    scale: float
    zero_point: int
    dtype: ir.DataType  # UINT8 or INT8


def activation_params(lo: float, hi: float, *, symmetric: bool) -> QuantParams:
    """uint8 asymmetric over [lo, hi] (zero exactly representable), or int8 symmetric over max(|lo|, |hi|)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        return QuantParams(max(max(-lo, hi) / 127.0, MIN_SCALE), 0, ir.DataType.INT8)
    scale = max((hi - lo) / 255.0, MIN_SCALE)
    zero_point = int(np.clip(round(-lo / scale), 0, 255))
    return QuantParams(scale, zero_point, ir.DataType.UINT8)


def quantization_clamps_to(p: QuantParams, lower: float, upper: float) -> bool:
    """Whether Q(x) == Q(clip(x, lower, upper)) for every x: Q is monotone, so it suffices that the
    bounds themselves quantize to the bottom and top codes (float32 divide, round half to even, as ORT)."""
    info = np.iinfo(np.uint8 if p.dtype == ir.DataType.UINT8 else np.int8)
    scale = np.float32(p.scale)

    def code(x: float) -> float:
        return float(np.clip(np.rint(np.float32(x) / scale) + p.zero_point, info.min, info.max))

    return (lower == -np.inf or code(lower) == info.min) and (upper == np.inf or code(upper) == info.max)


class FreshNames(NameAllocator):
    """Names not yet used in one model's main graph (base, base_1, base_2, ...), and new initializers
    registered on it under them."""

    def __init__(self, model: ir.Model) -> None:
        super().__init__(model)
        self.graph = model.graph

    def const(self, base: str, array: np.ndarray) -> ir.Value:
        """A new initializer holding `array`, typed (shape inference declares large weights by their
        value's type and shape: analysis/shapes.py)."""
        return add_initializer(self.graph, ir.tensor(np.asarray(array, order="C"), name=self.fresh(base)))


def editable_copy(model: ir.Model) -> tuple[ir.Model, PlanGraph, FreshNames]:
    """A copy of `model` to rewrite (sharing its weight tensors), every node named, with its
    producer/consumer maps and its fresh names."""
    out = clone(model)
    ensure_node_names(out.graph)
    return out, PlanGraph(out.graph), FreshNames(out)


def _weight_axis(node: ir.Node) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if node_attr(node, "transB", 0) else 1
    return 1  # MatMul [K, N]: one scale per output column


def weight_encodings(
    model: ir.Model, plan: Plan, params: Mapping[str, QuantParams], *, per_channel: bool = True,
    kernels: Kernels = "any", mean_squares: Mapping[str, float] | None = None,
) -> dict[str, WeightEncoding]:
    """{int8 anchor node: its weight's encoding} (passes/int8_weights.py), from the float weight, the
    per-channel axis, the input's scale and E[x^2] (`mean_squares`) and the float bias (so the int32
    bias fits)."""
    mean_squares = mean_squares or {}
    g = PlanGraph(model.graph)
    encodings: dict[str, WeightEncoding] = {}
    for node in constant_weight_anchors(g, plan):
        w = g.array(input_name(node, 1)).astype(np.float32)
        x = params.get(input_name(node, 0))
        b_name = input_name(node, 2)
        bias = g.array(b_name).astype(np.float32) if b_name in g.inits else None
        bias = bias if bias is not None and bias.ndim == 1 else None
        groups = int(node_attr(node, "group", 1))
        depthwise = node.op_type == "Conv" and groups > 1 and w.shape[1] == 1 and w.shape[0] == groups
        encodings[g.name(node)] = encode_weight(
            node.op_type, w, _weight_axis(node) if per_channel else None, trans_b=bool(node_attr(node, "transB", 0)),
            depthwise=depthwise, kernels=kernels, x_scale=None if x is None else x.scale,
            x_mean_square=mean_squares.get(input_name(node, 0)), bias=bias)
    return encodings


def quantize_graph(
    model: ir.Model,
    plan: Plan,
    params: Mapping[str, QuantParams],
    *,
    encodings: Mapping[str, WeightEncoding] | None = None,
    per_channel: bool = True,
    drop_relus: bool = True,
) -> tuple[ir.Model, list[str]]:
    """A copy of `model` (sharing its float weights) with Q/DQ pairs on the planned values and
    int8/int32 weights and biases (`encodings` from weight_encodings; computed here for any kernels
    when not given)."""
    if encodings is None:
        encodings = weight_encodings(model, plan, params, per_channel=per_channel)
    out, g, names = editable_copy(model)
    notes: list[str] = []
    dropped = _dropped_activations(g, plan, params, drop_relus)
    # the weights first: the layers' inputs still have the names their parameters are kept under
    pre_nodes, saturated = _weight_dequantizers(g, plan, params, encodings, names)
    pairs = _activation_pairs(g, plan, params, dropped, names)
    if saturated:
        notes.append(f"int32 bias saturated in {', '.join(saturated)}")
    _place(g, pre_nodes, pairs, dropped)
    _drop_unused_initializers(out.graph)
    guarded = guard_float_layers(out)  # else ORT gives the float layers per-tensor int8 weights itself
    if guarded:
        notes.append(f"{len(guarded)} float layers read int8 activations through a per-axis DequantizeLinear, "
                     "so ONNX Runtime keeps their weights in float")
    return out, notes


def _dropped_activations(
    g: PlanGraph, plan: Plan, params: Mapping[str, QuantParams], drop_relus: bool,
) -> dict[str, str]:
    """{activation output: activation input} of the folded Relu/Clip nodes that the output
    quantization replaces exactly (its clamp is theirs)."""
    dropped: dict[str, str] = {}
    by_name = {g.name(n): n for n in g.nodes}
    for act_name in plan.fused_activations:
        act = by_name[act_name]
        p, bounds = params.get(act.outputs[0].name), clamp_bounds(g, act)
        if drop_relus and p is not None and bounds is not None and quantization_clamps_to(p, *bounds):
            dropped[act.outputs[0].name] = input_name(act, 0)
    return dropped


def _activation_pairs(
    g: PlanGraph, plan: Plan, params: Mapping[str, QuantParams], dropped: Mapping[str, str], names: FreshNames,
) -> dict[str, list[ir.Node]]:
    """{value: its Q and DQ nodes, to be placed after its producer}; the main graph's readers of
    each planned value read its DQ output instead (a graph output keeps its name: its producer
    writes a new one and the DQ writes the output)."""
    pairs: dict[str, list[ir.Node]] = {}
    for v in plan.values:
        p = params.get(v)
        if p is None:
            continue
        scale = names.const(f"{v}_scale", np.float32(p.scale))
        zp = names.const(f"{v}_zero_point",
                         np.array(p.zero_point, dtype=np.uint8 if p.dtype == ir.DataType.UINT8 else np.int8))
        q_name, dq_name = names.fresh(f"{v}_quantized"), names.fresh(f"{v}_dequantized")
        value = g.values[v]
        if v in g.outputs:
            dq_out = ir.Value(name=v, type=value.type, shape=None if value.shape is None else ir.Shape(value.shape))
            value.name = names.fresh(f"{v}_float")
            value.replace_all_uses_with(dq_out, replace_graph_outputs=True)
        else:
            dq_out = ir.Value(name=dq_name)
            for user, k in list(value.uses()):
                if user.graph is g.graph:  # a subgraph body reading it stays in float
                    user.replace_input_with(k, dq_out)
        source = g.values[dropped.get(v, v)]
        q = ir.node("QuantizeLinear", [source, scale, zp], outputs=[ir.Value(name=q_name)],
                    name=names.fresh(f"{v}_QuantizeLinear"))
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp], outputs=[dq_out],
                     name=names.fresh(f"{v}_DequantizeLinear"))
        pairs[source.name if v in g.outputs else v] = [q, dq]
    return pairs


def _weight_dequantizers(
    g: PlanGraph, plan: Plan, params: Mapping[str, QuantParams], encodings: Mapping[str, WeightEncoding],
    names: FreshNames,
) -> tuple[list[ir.Node], list[str]]:
    """(DequantizeLinear nodes of the int8 weights and int32 biases, the layers whose bias saturated
    int32); each int8 layer is rewired to read them."""
    weight_dq: dict[tuple, ir.Value] = {}  # one DQ per distinct encoding of a weight
    pre_nodes: list[ir.Node] = []
    saturated: list[str] = []
    for node in constant_weight_anchors(g, plan):
        w_name, enc = input_name(node, 1), encodings[g.name(node)]
        x_params = params.get(input_name(node, 0))
        ws = enc.scales
        key = (w_name, enc.axis, enc.codes.dtype.str, ws.tobytes())
        if key not in weight_dq:
            scale = names.const(f"{w_name}_scale", ws)
            zp = names.const(f"{w_name}_zero_point", np.full(ws.shape, enc.zero_point, dtype=enc.codes.dtype))
            out = ir.Value(name=names.fresh(f"{w_name}_dequantized"))
            codes = names.const(f"{w_name}_quantized", enc.codes)
            pre_nodes.append(ir.node("DequantizeLinear", [codes, scale, zp], {"axis": enc.axis} if enc.axis is not None
                                     else None, outputs=[out], name=names.fresh(f"{w_name}_DequantizeLinear")))
            weight_dq[key] = out
        node.replace_input_with(1, weight_dq[key])
        b_name = input_name(node, 2)
        if b_name and b_name in g.constants and x_params is not None:
            b = g.array(b_name).astype(np.float32)
            if b.ndim == 1 and (ws.size == 1 or ws.size == b.size):
                bq, bs, sat = quantize_bias(b, x_params.scale, ws)
                if sat:
                    saturated.append(g.name(node))
                bscale = names.const(f"{b_name}_scale", bs)
                bzp = names.const(f"{b_name}_zero_point", np.zeros(bs.shape, dtype=np.int32))
                b_out = ir.Value(name=names.fresh(f"{b_name}_dequantized"))
                codes = names.const(f"{b_name}_quantized", bq)
                pre_nodes.append(ir.node("DequantizeLinear", [codes, bscale, bzp], {"axis": 0}, outputs=[b_out],
                                         name=names.fresh(f"{g.name(node)}_bias_DequantizeLinear")))
                node.replace_input_with(2, b_out)
    return pre_nodes, saturated


def _place(g: PlanGraph, pre_nodes: list[ir.Node], pairs: Mapping[str, list[ir.Node]],
           dropped: Mapping[str, str]) -> None:
    """Insert the weight DQs first, each Q/DQ pair right after its value's producer (graph inputs'
    first), and remove the dropped activations with the Constant nodes that only held their bounds."""
    graph = g.graph
    inputs = {v.name for v in graph.inputs}
    first = [n for v, pair in pairs.items() if v in inputs for n in pair]
    if pre_nodes or first:
        graph.insert_before(g.nodes[0], pre_nodes + first)
    for node in g.nodes:
        after = [n for o in node.outputs for n in pairs.get(o.name, [])]
        if after:
            graph.insert_after(node, after)
    acts = [g.producer[v] for v in dropped]
    bounds = [i for act in acts for i in act.inputs[1:] if i is not None]
    graph.remove(acts, safe=True)
    # Constant nodes that only held a dropped Clip's bounds go with it.
    holders = {i.producer() for i in bounds if not i.uses() and not i.is_graph_output()}
    graph.remove([n for n in holders if n is not None and n.op_type == "Constant"], safe=True)


def _drop_unused_initializers(graph: ir.Graph) -> None:
    """Remove the initializers nothing reads any more (the float weights and biases now in int8)."""
    inputs = {v.name for v in graph.inputs}
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and name not in inputs:
            graph.initializers.pop(name)

"""Where static int8 goes (QuantizeQDQ, passes/quantize.py): which nodes run in int8 and which
activation values get a Q/DQ pair, read from an `onnx.GraphProto`.

Conv/MatMul/Gemm anchor the int8 regions; Add/Mul/Concat/average pooling join only when a neighbour
is int8 (an isolated one would only add Q/DQ work); MaxPool/Reshape/Transpose/Flatten/Squeeze/
Unsqueeze carry int8 through with the scale of their input. A Relu, or a Clip with constant bounds,
right after an anchor or an int8 Add/Mul is folded into that op's output quantization (see
`clamp_bounds`; passes/int8_graph.py drops it where the quantization clamps exactly as it does).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

ANCHORS = frozenset({"Conv", "MatMul", "Gemm"})
# int8 only next to another int8 op; all their inputs must be activations
NEIGHBOURLY = frozenset({"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool"})
# int8 in, int8 out with the input's scale (ORT drops the Q/DQ pair or runs an int8 kernel)
SCALE_PRESERVING = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"})
# int8 ops whose output gets its own quantization, so a following Relu/Clip can fold into it
# (Concat shares its inputs' scale and the scale-preserving ops their input's: nothing to fold into)
FOLDS_ACTIVATION = ANCHORS | frozenset({"Add", "Mul"})


@dataclass
class Plan:
    """Which nodes run in int8 and which activation values get a Q/DQ pair."""

    nodes: list[str] = field(default_factory=list)  # node names (in graph order)
    values: list[str] = field(default_factory=list)  # activation values to quantize
    groups: dict[str, str] = field(default_factory=dict)  # value -> representative of its shared-scale group
    fused_activations: dict[str, str] = field(default_factory=dict)  # Relu/Clip node name -> the int8 op it follows
    skipped: list[str] = field(default_factory=list)


class ProtoGraph:
    """Producer/consumer maps of a GraphProto."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.constants = {t.name for t in graph.initializer}
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)

    def activations(self, node: onnx.NodeProto) -> list[str]:
        return [i for i in node.input if i and i not in self.constants]


def node_attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def constant_weight_anchors(g: ProtoGraph, plan: Plan) -> list[onnx.NodeProto]:
    """int8 anchors with a constant weight (the weights quantize_graph rounds)."""
    chosen = set(plan.nodes)
    return [n for n in g.graph.node if n.name in chosen and n.op_type in ANCHORS and n.input[1] in g.constants]


def _constant_scalar(g: ProtoGraph, name: str) -> float | None:
    """The value of a scalar constant (an initializer or a Constant node's output), else None."""
    if name in g.inits:
        array = numpy_helper.to_array(g.inits[name])
    else:
        node = g.producer.get(name)
        if node is None or node.op_type != "Constant" or len(node.attribute) != 1:
            return None
        attr = node.attribute[0]
        if attr.name == "value":
            array = numpy_helper.to_array(attr.t)
        elif attr.name in ("value_float", "value_int"):
            array = np.asarray(helper.get_attribute_value(attr))
        else:
            return None
    return float(array.reshape(-1)[0]) if array.size == 1 and np.isfinite(array).all() else None


def clamp_bounds(g: ProtoGraph, node: onnx.NodeProto) -> tuple[float, float] | None:
    """(lower, upper) of a Relu or of a Clip whose bounds are constants (absent = unbounded); else None."""
    if node.op_type == "Relu":
        return 0.0, np.inf
    if node.op_type != "Clip":
        return None
    bounds = [-np.inf, np.inf]
    if any(a.name in ("min", "max") for a in node.attribute):  # opset < 11: bounds are attributes
        return float(node_attr(node, "min", -np.inf)), float(node_attr(node, "max", np.inf))
    for k, name in enumerate(node.input[1:3]):
        if name:
            value = _constant_scalar(g, name)
            if value is None:
                return None
            bounds[k] = value
    return bounds[0], bounds[1]


def _anchor_reason(g: ProtoGraph, node: onnx.NodeProto) -> str | None:
    """Why an anchor op cannot run in int8 here (None when it can)."""
    if node.op_type == "Conv":
        return None if node.input[1] in g.constants else "weight is not a constant"
    if node.op_type == "MatMul":
        if node.input[0] in g.constants:
            return "constant left operand"
        if node.input[1] in g.constants and len(g.inits[node.input[1]].dims) != 2:
            return "weight is not 2-D"
        return None
    if node.op_type == "Gemm":
        if node_attr(node, "transA", 0) or node_attr(node, "alpha", 1.0) != 1.0 or node_attr(node, "beta", 1.0) != 1.0:
            return "transA/alpha/beta not supported"
        if node.input[1] not in g.constants:
            return "weight is not a constant"
        if len(node.input) > 2 and node.input[2] and node.input[2] not in g.constants:
            return "bias is not a constant"
        return None
    return "not an int8 op"


class _Regions:
    """The int8 regions of one graph as they grow: the chosen nodes, and where their outputs' quantization
    applies (after a folded Relu/Clip)."""

    def __init__(self, g: ProtoGraph, skip_nodes: set[str], skip_ops: set[str], fold_relu: bool) -> None:
        self.g, self.skip_nodes, self.skip_ops, self.fold_relu = g, skip_nodes, skip_ops, fold_relu
        self.chosen: set[str] = set()

    def skips(self, node: onnx.NodeProto) -> bool:
        return node.name in self.skip_nodes or node.op_type in self.skip_ops

    def fused_output(self, node: onnx.NodeProto) -> str:
        """The value an int8 node's output quantization applies to: after a following Relu/Clip."""
        g, out = self.g, node.output[0]
        users = g.consumers.get(out, [])
        if (self.fold_relu and node.op_type in FOLDS_ACTIVATION and len(users) == 1 and users[0].input[0] == out
                and clamp_bounds(g, users[0]) is not None
                and out not in g.outputs and users[0].output[0] not in g.outputs and not self.skips(users[0])):
            return users[0].output[0]
        return out

    def producer_of(self, value: str) -> onnx.NodeProto | None:
        g = self.g
        node = g.producer.get(value)
        if node is not None and node.op_type in ("Relu", "Clip") and node.input[0] in g.producer:
            prev = g.producer[node.input[0]]
            if prev.name in self.chosen and self.fused_output(prev) == value:
                return prev
        return node

    def output_users(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        return self.g.consumers.get(self.fused_output(node), [])

    def joins(self, node: onnx.NodeProto) -> bool:
        """Whether a neighbourly or scale-preserving node joins the int8 region next to it."""
        g, chosen = self.g, self.chosen
        if node.op_type in NEIGHBOURLY:
            acts = g.activations(node)
            if len(acts) != len([i for i in node.input if i]) or not node.output[0]:
                return False
            return (any((p := self.producer_of(v)) is not None and p.name in chosen for v in acts)
                    or any(u.name in chosen for u in self.output_users(node)))
        if node.op_type in SCALE_PRESERVING:
            p = self.producer_of(node.input[0]) if node.input[0] not in g.constants else None
            return p is not None and p.name in chosen and any(u.name in chosen for u in self.output_users(node))
        return False

    def grow(self, nodes: Iterable[onnx.NodeProto]) -> None:
        """Add joining nodes until nothing more joins (a node that joins can let its neighbours join)."""
        changed = True
        while changed:
            changed = False
            for node in nodes:
                if node.name not in self.chosen and not self.skips(node) and self.joins(node):
                    self.chosen.add(node.name)
                    changed = True


def plan_placement(
    proto: onnx.ModelProto, *, skip_nodes: Iterable[str] = (), skip_ops: Iterable[str] = (), fold_relu: bool = True
) -> Plan:
    """Decide which nodes run in int8 and which activation values get Q/DQ (see the module doc)."""
    g = ProtoGraph(proto.graph)
    regions = _Regions(g, set(skip_nodes), set(skip_ops), fold_relu)
    plan = Plan()
    ensure_node_names(proto.graph)
    for node in proto.graph.node:
        if regions.skips(node):
            if node.op_type in ANCHORS | NEIGHBOURLY | SCALE_PRESERVING:
                plan.skipped.append(f"{node.name}: skipped by request")
            continue
        if node.op_type in ANCHORS:
            reason = _anchor_reason(g, node)
            if reason is None:
                regions.chosen.add(node.name)
            else:
                plan.skipped.append(f"{node.name}: {reason}")
    regions.grow(proto.graph.node)
    _quantized_values(regions, proto.graph.node, plan)
    return plan


def _quantized_values(regions: _Regions, nodes: Iterable[onnx.NodeProto], plan: Plan) -> None:
    """Fill plan.nodes, .values, .groups and .fused_activations from the chosen nodes: the values
    that must share a scale (Concat inputs and output, a scale-preserving op's input and output)
    are united in one group."""
    g, chosen = regions.g, regions.chosen
    values: dict[str, None] = {}
    parent: dict[str, str] = {}

    def find(v: str) -> str:
        while parent.setdefault(v, v) != v:
            v = parent[v]
        return v

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    for node in nodes:
        if node.name not in chosen:
            continue
        plan.nodes.append(node.name)
        inputs = [node.input[0]] if node.op_type in SCALE_PRESERVING else g.activations(node)
        for v in inputs:
            values[v] = None
        out = regions.fused_output(node)
        if out != node.output[0]:
            plan.fused_activations[g.consumers[node.output[0]][0].name] = node.name
        wants_output = node.op_type not in ("MatMul", "Gemm") or any(u.name in chosen for u in g.consumers.get(out, []))
        # A graph output keeps its name and float type: the DQ produces it (see quantize_graph).
        if wants_output and (out not in g.outputs or node.op_type not in SCALE_PRESERVING):
            values[out] = None
            if node.op_type in SCALE_PRESERVING:
                union(out, node.input[0])
        if node.op_type == "Concat" and out not in g.outputs:
            for v in inputs:
                union(v, out)
    plan.values = list(values)
    plan.groups = {v: find(v) for v in plan.values}


def ensure_node_names(graph: onnx.GraphProto) -> set[str]:
    """Give every node a unique name (skip lists and reports refer to nodes by name)."""
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    return used

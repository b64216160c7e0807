"""Where static int8 goes (QuantizeQDQ, passes/quantize.py): which nodes run in int8 and which
activation values get a Q/DQ pair, read from an `onnx_ir` graph.

Conv/MatMul/Gemm anchor the int8 regions; Add/Mul/Concat/average pooling join only when a neighbour
is int8 (an isolated one would only add Q/DQ work); MaxPool/Reshape/Transpose/Flatten/Squeeze/
Unsqueeze carry int8 through with the scale of their input. A Relu, or a Clip with constant bounds,
right after an anchor or an int8 Add/Mul is folded into that op's output quantization (see
`clamp_bounds`; passes/int8_graph.py drops it where the quantization clamps exactly as it does).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

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


class PlanGraph:
    """Producer/consumer maps of an onnx_ir graph by value name (its main graph's nodes only), and
    each node's name: its own, or for an unnamed node the one `ensure_node_names` gives it, so a plan
    made on a model names the same nodes in every copy that gets its names."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.nodes = list(graph)
        self.names = dict(zip(self.nodes, node_names(self.nodes)))
        self.inits = dict(graph.initializers)
        self.constants = set(self.inits)
        self.outputs = {o.name for o in graph.outputs}
        self.values: dict[str, ir.Value] = {v.name: v for v in graph.inputs}
        self.values.update(self.inits)
        self.producer: dict[str, ir.Node] = {}
        self.consumers: dict[str, list[ir.Node]] = {}
        for node in self.nodes:
            for o in node.outputs:
                self.producer[o.name] = node
                self.values[o.name] = o
            for i in node.inputs:
                if i is not None and i.name:
                    self.consumers.setdefault(i.name, []).append(node)

    def name(self, node: ir.Node) -> str:
        return self.names[node]

    def array(self, name: str) -> np.ndarray:
        """The array of the initializer `name`."""
        return self.inits[name].const_value.numpy()

    def activations(self, node: ir.Node) -> list[str]:
        return [i.name for i in node.inputs if i is not None and i.name and i.name not in self.constants]


def input_name(node: ir.Node, k: int) -> str:
    """The name of the node's input `k`, "" when it is absent or empty (as in an ONNX NodeProto)."""
    value = node.inputs[k] if k < len(node.inputs) else None
    return value.name if value is not None and value.name else ""


def node_attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def constant_weight_anchors(g: PlanGraph, plan: Plan) -> list[ir.Node]:
    """int8 anchors with a constant weight (the weights quantize_graph rounds)."""
    chosen = set(plan.nodes)
    return [n for n in g.nodes if g.name(n) in chosen and n.op_type in ANCHORS and input_name(n, 1) in g.constants]


def op_types(graph: ir.Graph) -> dict[str, str]:
    """{node name (see PlanGraph): op type} of the graph's nodes."""
    nodes = list(graph)
    return {name: n.op_type for name, n in zip(node_names(nodes), nodes)}


def _constant_scalar(g: PlanGraph, name: str) -> float | None:
    """The value of a scalar constant (an initializer or a Constant node's output), else None."""
    if name in g.inits:
        array = g.array(name)
    else:
        node = g.producer.get(name)
        if node is None or node.op_type != "Constant" or len(node.attributes) != 1:
            return None
        attr = next(iter(node.attributes.values()))
        if attr.name == "value":
            array = attr.as_tensor().numpy()
        elif attr.name in ("value_float", "value_int"):
            array = np.asarray(attr.value)
        else:
            return None
    return float(array.reshape(-1)[0]) if array.size == 1 and np.isfinite(array).all() else None


def clamp_bounds(g: PlanGraph, node: ir.Node) -> tuple[float, float] | None:
    """(lower, upper) of a Relu or of a Clip whose bounds are constants (absent = unbounded); else None."""
    if node.op_type == "Relu":
        return 0.0, np.inf
    if node.op_type != "Clip":
        return None
    bounds = [-np.inf, np.inf]
    if any(a in node.attributes for a in ("min", "max")):  # opset < 11: bounds are attributes
        return float(node_attr(node, "min", -np.inf)), float(node_attr(node, "max", np.inf))
    for k in (1, 2):
        name = input_name(node, k)
        if name:
            value = _constant_scalar(g, name)
            if value is None:
                return None
            bounds[k - 1] = value
    return bounds[0], bounds[1]


def _anchor_reason(g: PlanGraph, node: ir.Node) -> str | None:
    """Why an anchor op cannot run in int8 here (None when it can)."""
    weight, bias = input_name(node, 1), input_name(node, 2)
    if node.op_type == "Conv":
        return None if weight in g.constants else "weight is not a constant"
    if node.op_type == "MatMul":
        if input_name(node, 0) in g.constants:
            return "constant left operand"
        if weight in g.constants and len(g.inits[weight].const_value.shape) != 2:
            return "weight is not 2-D"
        return None
    if node.op_type == "Gemm":
        if node_attr(node, "transA", 0) or node_attr(node, "alpha", 1.0) != 1.0 or node_attr(node, "beta", 1.0) != 1.0:
            return "transA/alpha/beta not supported"
        if weight not in g.constants:
            return "weight is not a constant"
        if bias and bias not in g.constants:
            return "bias is not a constant"
        return None
    return "not an int8 op"


class _Regions:
    """The int8 regions of one graph as they grow: the chosen nodes, and where their outputs' quantization
    applies (after a folded Relu/Clip)."""

    def __init__(self, g: PlanGraph, skip_nodes: set[str], skip_ops: set[str], fold_relu: bool) -> None:
        self.g, self.skip_nodes, self.skip_ops, self.fold_relu = g, skip_nodes, skip_ops, fold_relu
        self.chosen: set[str] = set()

    def skips(self, node: ir.Node) -> bool:
        return self.g.name(node) in self.skip_nodes or node.op_type in self.skip_ops

    def fused_output(self, node: ir.Node) -> str:
        """The value an int8 node's output quantization applies to: after a following Relu/Clip."""
        g, out = self.g, node.outputs[0].name
        users = g.consumers.get(out, [])
        if (self.fold_relu and node.op_type in FOLDS_ACTIVATION and len(users) == 1 and input_name(users[0], 0) == out
                and clamp_bounds(g, users[0]) is not None
                and out not in g.outputs and users[0].outputs[0].name not in g.outputs and not self.skips(users[0])):
            return users[0].outputs[0].name
        return out

    def producer_of(self, value: str) -> ir.Node | None:
        g = self.g
        node = g.producer.get(value)
        if node is not None and node.op_type in ("Relu", "Clip") and input_name(node, 0) in g.producer:
            prev = g.producer[input_name(node, 0)]
            if g.name(prev) in self.chosen and self.fused_output(prev) == value:
                return prev
        return node

    def output_users(self, node: ir.Node) -> list[ir.Node]:
        return self.g.consumers.get(self.fused_output(node), [])

    def joins(self, node: ir.Node) -> bool:
        """Whether a neighbourly or scale-preserving node joins the int8 region next to it."""
        g, chosen = self.g, self.chosen
        if node.op_type in NEIGHBOURLY:
            acts = g.activations(node)
            if len(acts) != len([i for i in node.inputs if i is not None and i.name]) or not node.outputs[0].name:
                return False
            return (any((p := self.producer_of(v)) is not None and g.name(p) in chosen for v in acts)
                    or any(g.name(u) in chosen for u in self.output_users(node)))
        if node.op_type in SCALE_PRESERVING:
            first = input_name(node, 0)
            p = self.producer_of(first) if first not in g.constants else None
            return p is not None and g.name(p) in chosen and any(g.name(u) in chosen for u in self.output_users(node))
        return False

    def grow(self) -> None:
        """Add joining nodes until nothing more joins (a node that joins can let its neighbours join)."""
        changed = True
        while changed:
            changed = False
            for node in self.g.nodes:
                if self.g.name(node) not in self.chosen and not self.skips(node) and self.joins(node):
                    self.chosen.add(self.g.name(node))
                    changed = True


def plan_placement(
    model: ir.Model, *, skip_nodes: Iterable[str] = (), skip_ops: Iterable[str] = (), fold_relu: bool = True
) -> Plan:
    """Decide which nodes run in int8 and which activation values get Q/DQ (see the module doc).
    Nodes are named as PlanGraph names them; the model is not changed."""
    g = PlanGraph(model.graph)
    regions = _Regions(g, set(skip_nodes), set(skip_ops), fold_relu)
    plan = Plan()
    for node in g.nodes:
        if regions.skips(node):
            if node.op_type in ANCHORS | NEIGHBOURLY | SCALE_PRESERVING:
                plan.skipped.append(f"{g.name(node)}: skipped by request")
            continue
        if node.op_type in ANCHORS:
            reason = _anchor_reason(g, node)
            if reason is None:
                regions.chosen.add(g.name(node))
            else:
                plan.skipped.append(f"{g.name(node)}: {reason}")
    regions.grow()
    _quantized_values(regions, plan)
    return plan


def _quantized_values(regions: _Regions, plan: Plan) -> None:
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

    for node in g.nodes:
        if g.name(node) not in chosen:
            continue
        plan.nodes.append(g.name(node))
        inputs = [input_name(node, 0)] if node.op_type in SCALE_PRESERVING else g.activations(node)
        for v in inputs:
            values[v] = None
        out, own = regions.fused_output(node), node.outputs[0].name
        if out != own:
            plan.fused_activations[g.name(g.consumers[own][0])] = g.name(node)
        users = g.consumers.get(out, [])
        wants_output = node.op_type not in ("MatMul", "Gemm") or any(g.name(u) in chosen for u in users)
        # A graph output keeps its name and float type: the DQ produces it (see quantize_graph).
        if wants_output and (out not in g.outputs or node.op_type not in SCALE_PRESERVING):
            values[out] = None
            if node.op_type in SCALE_PRESERVING:
                union(out, input_name(node, 0))
        if node.op_type == "Concat" and out not in g.outputs:
            for v in inputs:
                union(v, out)
    plan.values = list(values)
    plan.groups = {v: find(v) for v in plan.values}


def node_names(nodes: Sequence[ir.Node]) -> list[str]:
    """Each node's name, and for an unnamed one a unique `{op_type}_{index}` (skip lists and reports
    refer to nodes by name)."""
    used = {n.name for n in nodes if n.name}
    names = []
    for i, node in enumerate(nodes):
        name = node.name
        if not name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            used.add(name)
        names.append(name)
    return names


def ensure_node_names(graph: ir.Graph) -> None:
    """Give every unnamed node of the graph the name `node_names` gives it."""
    nodes = list(graph)
    for node, name in zip(nodes, node_names(nodes)):
        node.name = name

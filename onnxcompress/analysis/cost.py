"""Cost of a model at static input shapes: MACs, FLOPs, parameters, bytes, per node and in total.

Where the counts come from:
- **MACs and FLOPs** per node: one rule per op family, in `analysis/cost_rules.py` (its docstring
  lists what each op counts).
- **params** and **weight_bytes**: which constants are weights and which node each counts for, in
  `analysis/cost_weights.py`.
- **activation_bytes**: bytes of node outputs, Constant nodes excluded (their outputs are weights).
- **op_counts**: number of nodes per op type; ops outside the default ONNX domain are named
  `domain::op_type`.

Subgraphs (the bodies of If, Loop and Scan) are costed node by node with the same rules, outer-scope
values included, and their node counts join `op_counts` and `unknown_ops`. The node that holds them
carries their totals:
- **If**: MACs, FLOPs and activation bytes of its most expensive branch (by MACs, then FLOPs): one
  branch runs per call, and the costliest is the bound a deployment must plan for; params and
  weight bytes of *all* branches, since every branch's weights are in the file and in memory.
- **Loop**: the body once per iteration when the trip count M is a constant (a loop that stops
  early on its condition costs less); otherwise once, and `CostReport.notes` says so.
- **Scan**: the body once per element along the first scan input's axis (known from its shape).
- any other op with a subgraph: each subgraph once, with a note.
`CostReport.nodes` lists the main graph's nodes only, in graph order; `subgraph_nodes` lists the
nodes inside subgraphs with qualified names (`loop/body/matmul`), their MACs and FLOPs per model run
(a Loop/Scan body's multiplied by its trip count; an If branch's for one run of that branch).
`layers()` is both, less the nodes that hold subgraphs: the per-layer list.

A node whose op has no rule, or whose rule needs a shape that could not be inferred, costs 0, is
marked `known=False` with a reason, and is counted in `CostReport.unknown_ops`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import ChainMap, Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..report import ModelStats
from .control_flow import inner_nodes, loop_trips, scan_trips, subgraphs, taken_branches
from .cost_rules import op_cost, op_name
from .cost_weights import ConstantInfo, model_constants, weight_numel, weight_owners
from .shapes import ScopedShapes, ShapeInfo, infer_scoped_shapes


@dataclass(frozen=True)
class NodeCost:
    name: str  # qualified for nodes inside subgraphs: "<node>/<attribute>/<inner node>"
    op_type: str
    macs: int
    flops: int
    params: int
    weight_bytes: int
    activation_bytes: int  # bytes of the node's outputs
    known: bool
    reason: str = ""  # why the cost is unknown
    subgraph_nodes: int = 0  # nodes inside its subgraphs (If/Loop/Scan), whose totals it carries


@dataclass(frozen=True)
class CostReport:
    nodes: tuple[NodeCost, ...]  # the main graph's nodes, in graph order
    stats: ModelStats
    unknown_ops: Mapping[str, int] = field(default_factory=dict)  # op type -> nodes not costed
    subgraph_nodes: tuple[NodeCost, ...] = ()  # nodes inside If/Loop/Scan bodies, qualified names
    op_macs: Mapping[str, int] = field(default_factory=dict)  # op type -> its share of stats.macs
    notes: tuple[str, ...] = ()  # how subgraphs were counted where the count is an estimate

    def layers(self) -> list[NodeCost]:
        """Every node that does work itself: main-graph and subgraph nodes, less the If/Loop/Scan
        nodes whose totals only sum their bodies."""
        return [c for c in (*self.nodes, *self.subgraph_nodes) if not c.subgraph_nodes]

    def top(self, n: int = 10) -> list[NodeCost]:
        """The n layers with the most MACs (ties by FLOPs, then graph order)."""
        layers = self.layers()
        order = sorted(range(len(layers)), key=lambda i: (-layers[i].macs, -layers[i].flops, i))
        return [layers[i] for i in order[:n]]


def analyze_cost(
    model: ir.Model,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_values: Mapping[str, np.ndarray] | None = None,
) -> CostReport:
    """Cost of every node at static input shapes, subgraphs included (see the module docstring).

    `input_values` (input name -> a value broadcast to its shape) settles the If nodes whose condition
    follows from constants and those inputs alone: they count the branch that runs, not the costliest.
    """
    shapes = infer_scoped_shapes(model, input_shapes)
    costing = _Costing(model, shapes, taken_branches(model, shapes.main, input_values or {}))
    nodes, inner, op_macs = costing.graph(model.graph, costing.shapes.main, "")
    every = (*nodes, *inner)
    unknown = Counter(c.op_type for c in every if not c.known)
    stats = ModelStats(
        params=sum(c.params for c in nodes),
        macs=sum(c.macs for c in nodes),
        flops=sum(c.flops for c in nodes),
        weight_bytes=sum(t.nbytes for t in costing.constants.values()),
        activation_bytes=sum(c.activation_bytes for c in nodes),
        op_counts=dict(Counter(c.op_type for c in every)),
    )
    notes = costing.notes
    if costing.if_nodes:
        notes = [f"{costing.if_nodes} If node(s): MACs and FLOPs of the costliest branch, parameters and weights "
                 "of every branch", *notes]
    return CostReport(nodes=tuple(nodes), stats=stats, unknown_ops=dict(unknown), subgraph_nodes=tuple(inner),
                      op_macs=dict(op_macs), notes=tuple(notes))


def model_stats(model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None) -> ModelStats:
    return analyze_cost(model, input_shapes).stats


def mac_ratio(before: ModelStats, after: ModelStats) -> float:
    """Theoretical speedup: MACs before / MACs after (inf when everything was removed)."""
    if after.macs == 0:
        return 1.0 if before.macs == 0 else math.inf
    return before.macs / after.macs


# ---------------------------------------------------------------- graphs and subgraphs


class _Costing:
    """One walk over a model: the graph, then each node's subgraphs right after the node (the order
    that decides which node owns a shared weight)."""

    def __init__(self, model: ir.Model, shapes: ScopedShapes, taken: Mapping[ir.Node, str] | None = None) -> None:
        self.shapes = shapes
        self.taken = dict(taken or {})  # If node -> the branch attribute that runs at the given input values
        self.opset = model.opset_imports.get("", 0)
        self.constants = model_constants(model)
        self.weight_owner = weight_owners(model, self.constants)
        self.byte_owner: dict[ir.Value, ir.Node] = {}
        self.notes: list[str] = []
        self.if_nodes = 0

    def graph(self, graph: ir.Graph, shapes: Mapping[str, ShapeInfo], prefix: str
              ) -> tuple[list[NodeCost], list[NodeCost], Counter]:
        """(costs of the graph's own nodes, costs of the nodes inside their subgraphs, MACs by op type
        as counted in the graph's total)."""
        nodes: list[NodeCost] = []
        inner: list[NodeCost] = []
        op_macs: Counter = Counter()
        for index, node in enumerate(graph):
            name = prefix + (node.name or f"{op_name(node)}_{index}")
            own = _node_cost(name, node, shapes, self.constants, self.weight_owner, self.byte_owner)
            if subgraphs(node):
                own, nested, macs_by_op = self._container(own, node, shapes, name)
                inner.extend(nested)
            else:
                macs_by_op = Counter({own.op_type: own.macs}) if own.macs else Counter()
            nodes.append(own)
            op_macs.update(macs_by_op)
        return nodes, inner, op_macs

    def _container(self, own: NodeCost, node: ir.Node, shapes: Mapping[str, ShapeInfo], name: str
                   ) -> tuple[NodeCost, list[NodeCost], Counter]:
        """An If/Loop/Scan (or any node with subgraphs) carrying its bodies' totals (module docstring)."""
        bodies = []
        for attr_name, graph in subgraphs(node):
            scope = ChainMap(self.shapes.of(graph), shapes)  # outer-scope values resolve outward
            bodies.append(self.graph(graph, scope, f"{name}/{attr_name}/"))
        nested = [c for body_nodes, body_inner, _ in bodies for c in (*body_nodes, *body_inner)]
        params = sum(c.params for body_nodes, _, _ in bodies for c in body_nodes)
        weight_bytes = sum(c.weight_bytes for body_nodes, _, _ in bodies for c in body_nodes)
        op = own.op_type
        if op == "If" and node in self.taken:
            branch = self.taken[node]
            self.notes.append(f"If '{name}': {branch} counted, the branch that runs at the given input values")
            counted, times = [b for (attr, _), b in zip(subgraphs(node), bodies) if attr == branch], 1
        elif op == "If":
            self.if_nodes += 1
            runs = max(bodies, key=lambda b: (sum(c.macs for c in b[0]), sum(c.flops for c in b[0])))
            counted, times = [runs], 1
        else:
            counted, times = bodies, self._trips(node, op, shapes, name)
        macs = times * sum(c.macs for b in counted for c in b[0])
        flops = times * sum(c.flops for b in counted for c in b[0])
        activations = times * sum(c.activation_bytes for b in counted for c in b[0])
        op_macs: Counter = Counter()
        for _, _, body_macs in counted:
            op_macs.update({k: v * times for k, v in body_macs.items()})
        if times != 1:  # per model run: every node of a repeated body runs `times` times
            nested = [_scaled(c, times) for c in nested]
        total = dataclasses.replace(
            own, macs=own.macs + macs, flops=own.flops + flops, params=own.params + params,
            weight_bytes=own.weight_bytes + weight_bytes, activation_bytes=own.activation_bytes + activations,
            known=True, reason="", subgraph_nodes=len(nested),
        )
        return total, nested, op_macs

    def _trips(self, node: ir.Node, op: str, shapes: Mapping[str, ShapeInfo], name: str) -> int:
        """How many times a Loop/Scan body runs: its trip count when known, else 1 (with a note)."""
        if op == "Loop":
            count = loop_trips(node)
            if count is not None:
                return count
            self.notes.append(f"Loop '{name}': the trip count is not a constant; its body is counted once")
            return 1
        if op == "Scan":
            count = scan_trips(node, shapes, self.opset)
            if count is not None:
                return count
            self.notes.append(f"Scan '{name}': the scan length is unknown; its body is counted once")
            return 1
        self.notes.append(f"{op} '{name}': its subgraphs are counted once each (no rule for how often they run)")
        return 1


def _scaled(cost: NodeCost, times: int) -> NodeCost:
    return dataclasses.replace(cost, macs=cost.macs * times, flops=cost.flops * times,
                               activation_bytes=cost.activation_bytes * times)


def _node_cost(
    name: str,
    node: ir.Node,
    shapes: Mapping[str, ShapeInfo],
    constants: Mapping[ir.Value, ConstantInfo],
    weight_owner: Mapping[ir.Value, ir.Node],
    byte_owner: dict[ir.Value, ir.Node],
) -> NodeCost:
    op_type = op_name(node)
    params = weight_bytes = 0
    for value in node.inputs:
        if value is None or value not in constants:
            continue
        if weight_owner.get(value) is node:
            params += weight_numel(op_type, node, value, constants[value])
        if byte_owner.setdefault(value, node) is node:
            weight_bytes += constants[value].nbytes
    activation_bytes = 0 if op_type == "Constant" else sum(
        shapes[v.name].nbytes or 0 for v in node.outputs if v.name in shapes
    )

    macs, flops, reason = op_cost(node, shapes)
    return NodeCost(
        name=name,
        op_type=op_type,
        macs=macs,
        flops=flops,
        params=params,
        weight_bytes=weight_bytes,
        activation_bytes=activation_bytes,
        known=reason is None,
        reason=reason or "",
    )


__all__ = [
    "CostReport", "NodeCost", "analyze_cost", "inner_nodes", "mac_ratio", "model_stats", "subgraphs",
]

"""Per-node cost of a model at static input shapes: MACs, FLOPs, parameters, bytes.

Conventions
-----------
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
- **params**: elements of the constant inputs (initializers or Constant nodes) that are
  weights, each tensor counted once however many nodes share it, at its first consumer that
  uses it as a weight. Not weights: int64/bool/string tensors, inputs that are shapes,
  indices, axes, pads, scales or zero points (Reshape's shape, Slice's starts, Resize's scales,
  QuantizeLinear's scale and zero point, ...), and one-element operands of elementwise ops
  (epsilons, exponents, constant factors; PRelu's slope is the exception: it is learned).
  Quantizing a model therefore leaves its params unchanged (a MatMulNBits weight counts K x N,
  however its codes are packed; its scales and zero points are not weights).
- **weight_bytes**: bytes of every initializer and Constant node tensor (per node: those it
  consumes first; the model total also counts unused initializers).
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..report import ModelStats
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
    costing = _Costing(model, shapes, _taken_branches(model, shapes.main, input_values or {}))
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

#: A Loop trip count at or above this is a "run until the condition says stop" sentinel, not a count.
_SENTINEL_TRIPS = 2**31 - 1


class _Costing:
    """One walk over a model: the graph, then each node's subgraphs right after the node (the order
    that decides which node owns a shared weight)."""

    def __init__(self, model: ir.Model, shapes: ScopedShapes, taken: Mapping[ir.Node, str] | None = None) -> None:
        self.shapes = shapes
        self.taken = dict(taken or {})  # If node -> the branch attribute that runs at the given input values
        self.opset = model.opset_imports.get("", 0)
        self.constants = _constants(model)
        self.weight_owner = _weight_owners(model, self.constants)
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
            name = prefix + (node.name or f"{_op_name(node)}_{index}")
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
            count = _loop_trips(node)
            if count is not None:
                return count
            self.notes.append(f"Loop '{name}': the trip count is not a constant; its body is counted once")
            return 1
        if op == "Scan":
            count = _scan_trips(node, shapes, self.opset)
            if count is not None:
                return count
            self.notes.append(f"Scan '{name}': the scan length is unknown; its body is counted once")
            return 1
        self.notes.append(f"{op} '{name}': its subgraphs are counted once each (no rule for how often they run)")
        return 1


def _scaled(cost: NodeCost, times: int) -> NodeCost:
    return dataclasses.replace(cost, macs=cost.macs * times, flops=cost.flops * times,
                               activation_bytes=cost.activation_bytes * times)


def _taken_branches(model: ir.Model, shapes: Mapping[str, ShapeInfo], values: Mapping[str, np.ndarray]
                    ) -> dict[ir.Node, str]:
    """Main-graph If node -> "then_branch" or "else_branch", for the Ifs whose condition follows from
    constants and the given input values alone (evaluated by onnx's reference evaluator)."""
    ifs = [n for n in model.graph if _op_name(n) == "If" and n.inputs and n.inputs[0] is not None]
    if not ifs or not values:
        return {}
    known = {v for v in model.graph.inputs if v.name in values}
    known.update(v for v in model.graph.initializers.values() if v.const_value is not None)
    for node in model.graph:  # what the constants and the given inputs decide, in graph order
        if not subgraphs(node) and node.domain in ("", "ai.onnx") and all(v is None or v in known for v in node.inputs):
            known.update(node.outputs)
    conditions = {n: n.inputs[0] for n in ifs if n.inputs[0] in known}
    if not conditions:
        return {}
    try:
        results = _evaluate(model, [*dict.fromkeys(conditions.values())], shapes, values)
    except Exception:  # an op the reference evaluator lacks, a bad value: cost as if unknown
        return {}
    return {n: "then_branch" if bool(np.asarray(results[c.name]).reshape(-1)[0]) else "else_branch"
            for n, c in conditions.items() if c.name in results and np.asarray(results[c.name]).size == 1}


def _evaluate(model: ir.Model, targets: Sequence[ir.Value], shapes: Mapping[str, ShapeInfo],
              values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`targets` computed from the given inputs: the nodes they depend on, run by onnx's reference evaluator."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    wanted, nodes = set(targets), []
    for node in reversed(list(model.graph)):
        if wanted.intersection(node.outputs):
            nodes.append(node)
            wanted.update(v for v in node.inputs if v is not None)
    inputs = [v for v in model.graph.inputs if v in wanted and v.name in values]
    inits = [v for v in model.graph.initializers.values() if v in wanted and v.name not in values]
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in reversed(nodes)], "conditions",
        [onnx.helper.make_tensor_value_info(v.name, v.dtype.value, None) for v in inputs],
        [onnx.helper.make_tensor_value_info(v.name, onnx.TensorProto.UNDEFINED, None) for v in targets],
        [ir.serde.serialize_tensor(v.const_value) for v in inits],
    )
    for tensor, value in zip(graph.initializer, inits):
        tensor.name = value.name
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()])
    feeds = {v.name: np.broadcast_to(np.asarray(values[v.name], v.dtype.numpy()), shapes[v.name].shape or ()).copy()
             for v in inputs}
    names = [v.name for v in targets]
    return dict(zip(names, ReferenceEvaluator(proto).run(names, feeds)))


def inner_nodes(model: ir.Model) -> list[tuple[str, ir.Node, ir.Node]]:
    """(qualified name, node, the main-graph node whose subgraph holds it) for every node inside an
    If/Loop/Scan body, nested ones included: what passes that work on the main graph leave alone."""
    found: list[tuple[str, ir.Node, ir.Node]] = []

    def walk(node: ir.Node, prefix: str, top: ir.Node) -> None:
        for attr_name, graph in subgraphs(node):
            for index, inner in enumerate(graph):
                name = f"{prefix}/{attr_name}/{inner.name or f'{_op_name(inner)}_{index}'}"
                found.append((name, inner, top))
                walk(inner, name, top)

    for index, node in enumerate(model.graph):
        walk(node, node.name or f"{_op_name(node)}_{index}", node)
    return found


def subgraphs(node: ir.Node) -> list[tuple[str, ir.Graph]]:
    """(attribute name, graph) for every graph-valued attribute of `node` ("branches[1]" for a list):
    the names qualified layer names are built from."""
    found = []
    for attr_name, attr in node.attributes.items():
        if attr.type == ir.AttributeType.GRAPH:
            found.append((attr_name, attr.value))
        elif attr.type == ir.AttributeType.GRAPHS:
            found.extend((f"{attr_name}[{i}]", g) for i, g in enumerate(attr.value))
    return found


def _loop_trips(node: ir.Node) -> int | None:
    """A Loop's constant trip count M, or None (no M, not a constant, or a run-until sentinel)."""
    trips = node.inputs[0] if node.inputs else None
    tensor = ir.convenience.get_const_tensor(trips) if trips is not None else None
    if tensor is None or tensor.size != 1:
        return None
    count = int(tensor.numpy().reshape(()))
    return count if 0 <= count < _SENTINEL_TRIPS else None


def _scan_trips(node: ir.Node, shapes: Mapping[str, ShapeInfo], opset: int) -> int | None:
    """The length of a Scan's first scan input along its scan axis (opset 9+; 8 scans a batch)."""
    if opset < 9:
        return None
    count = node.attributes.get("num_scan_inputs")
    if count is None or not count.value:
        return None
    first = node.inputs[len(node.inputs) - int(count.value)]
    info = shapes.get(first.name) if first is not None else None
    if info is None or info.shape is None:
        return None
    axes = node.attributes.get("scan_input_axes")
    axis = int(axes.value[0]) if axes is not None and len(axes.value) else 0
    return int(info.shape[axis]) if -len(info.shape) <= axis < len(info.shape) else None


# ---------------------------------------------------------------- constants and who owns them


@dataclass(frozen=True)
class _Constant:
    numel: int
    nbytes: int
    dtype: ir.DataType


def _constants(model: ir.Model) -> dict[ir.Value, _Constant]:
    """Initializers and Constant node outputs of the main graph and every subgraph. Keyed by value
    (not name): sibling If branches may each define a weight of the same name, and a subgraph that
    reads an outer-scope weight holds the same value object."""
    found: dict[ir.Value, _Constant] = {}
    for graph in _all_graphs(model.graph):
        for value in graph.initializers.values():
            if value.const_value is not None:
                found[value] = _describe(value.const_value)
        for node in graph:
            if _op_name(node) == "Constant" and node.outputs[0] not in found:
                tensor = ir.convenience.get_const_tensor(node.outputs[0])
                if tensor is not None:
                    found[node.outputs[0]] = _describe(tensor)
    return found


def _all_graphs(graph: ir.Graph) -> list[ir.Graph]:
    """`graph` and its subgraphs, recursively."""
    graphs = [graph]
    for node in graph:
        for _, sub in subgraphs(node):
            graphs.extend(_all_graphs(sub))
    return graphs


def _describe(tensor: ir.TensorProtocol) -> _Constant:
    return _Constant(numel=tensor.size, nbytes=tensor.nbytes, dtype=tensor.dtype)


_MS = "com.microsoft"
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
        f"{_MS}::MatMulNBits": {2, 3, 4},
        **{op: {1} for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                              "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")},
    }.items()
}
_NOT_WEIGHT_DTYPES = frozenset({ir.DataType.INT64, ir.DataType.BOOL, ir.DataType.STRING})


def _weight_owners(model: ir.Model, constants: Mapping[ir.Value, _Constant]) -> dict[ir.Value, ir.Node]:
    """Constant -> the first node (subgraph nodes right after the node holding them) that uses it as a weight."""
    owners: dict[ir.Value, ir.Node] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        op = _op_name(node)
        for slot, value in enumerate(node.inputs):
            if value is None or value in owners or value not in constants:
                continue
            if _is_weight(op, slot, constants[value]):
                owners[value] = node
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
    name: str,
    node: ir.Node,
    shapes: Mapping[str, ShapeInfo],
    constants: Mapping[ir.Value, _Constant],
    weight_owner: Mapping[ir.Value, ir.Node],
    byte_owner: dict[ir.Value, ir.Node],
) -> NodeCost:
    op_name = _op_name(node)
    params = weight_bytes = 0
    for value in node.inputs:
        if value is None or value not in constants:
            continue
        if weight_owner.get(value) is node:
            params += _weight_numel(op_name, node, value, constants[value])
        if byte_owner.setdefault(value, node) is node:
            weight_bytes += constants[value].nbytes
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
        name=name,
        op_type=op_name,
        macs=int(macs),
        flops=int(flops),
        params=params,
        weight_bytes=weight_bytes,
        activation_bytes=activation_bytes,
        known=known,
        reason=reason,
    )


def _weight_numel(op_name: str, node: ir.Node, value: ir.Value, constant: _Constant) -> int:
    """Weights a constant holds: its elements, or K x N for MatMulNBits' packed B."""
    if op_name == f"{_MS}::MatMulNBits" and len(node.inputs) > 1 and value is node.inputs[1]:
        k, n = node.attributes.get_int("K", 0), node.attributes.get_int("N", 0)
        return k * n if k and n else constant.numel
    return constant.numel


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


def _matmul_nbits(op: _Op) -> Cost:
    # A [..., K] times a block-quantized B [K, N]: K multiply-adds per output element (and a bias)
    depth = int(op.attr("K", 0)) or op.input_shape(0)[-1]
    out = op.output_numel()
    macs = out * depth
    return macs, 2 * macs + _bias_flops(op, 5, out)


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
    f"{_MS}::MatMulNBits": _matmul_nbits,
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

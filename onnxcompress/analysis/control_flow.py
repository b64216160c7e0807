"""If, Loop and Scan: their bodies, how often a body runs, and which If branch constants settle.

What cost counting (`analysis/cost.py`) and the passes that leave subgraphs alone need to know about
control flow, without costing anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from .cost_rules import op_name
from .shapes import ShapeInfo

#: A Loop trip count at or above this is a "run until the condition says stop" sentinel, not a count.
SENTINEL_TRIPS = 2**31 - 1


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


def inner_nodes(model: ir.Model) -> list[tuple[str, ir.Node, ir.Node]]:
    """(qualified name, node, the main-graph node whose subgraph holds it) for every node inside an
    If/Loop/Scan body, nested ones included: what passes that work on the main graph leave alone."""
    found: list[tuple[str, ir.Node, ir.Node]] = []

    def walk(node: ir.Node, prefix: str, top: ir.Node) -> None:
        for attr_name, graph in subgraphs(node):
            for index, inner in enumerate(graph):
                name = f"{prefix}/{attr_name}/{inner.name or f'{op_name(inner)}_{index}'}"
                found.append((name, inner, top))
                walk(inner, name, top)

    for index, node in enumerate(model.graph):
        walk(node, node.name or f"{op_name(node)}_{index}", node)
    return found


def loop_trips(node: ir.Node) -> int | None:
    """A Loop's constant trip count M, or None (no M, not a constant, or a run-until sentinel)."""
    trips = node.inputs[0] if node.inputs else None
    tensor = ir.convenience.get_const_tensor(trips) if trips is not None else None
    if tensor is None or tensor.size != 1:
        return None
    count = int(tensor.numpy().reshape(()))
    return count if 0 <= count < SENTINEL_TRIPS else None


def scan_trips(node: ir.Node, shapes: Mapping[str, ShapeInfo], opset: int) -> int | None:
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


def taken_branches(model: ir.Model, shapes: Mapping[str, ShapeInfo], values: Mapping[str, np.ndarray]
                    ) -> dict[ir.Node, str]:
    """Main-graph If node -> "then_branch" or "else_branch", for the Ifs whose condition follows from
    constants and the given input values alone (evaluated by onnx's reference evaluator)."""
    ifs = [n for n in model.graph if op_name(n) == "If" and n.inputs and n.inputs[0] is not None]
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

"""How the refit runs the two networks: sinks grouped into stages (no sink of a stage upstream of
another), and each network run stage by stage over fixed batches, only the nodes between the values
kept from the previous stage and the current stage's, in an ORT session of that segment alone."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from ... import runtime
from ...model import EXTERNAL_DATA_THRESHOLD, tensor_in_memory
from .layers import Layer


def refit_stages(model: ir.Model, layers: Iterable[Layer]) -> list[list[Layer]]:
    """Group layers so that no layer depends on another of its own stage (or a later one):
    a layer's stage is the largest number of refit layers on any path from the inputs to it."""
    by_name = {l.sink.node: l for l in layers}
    depth: dict[str, int] = {}
    stage_of: dict[str, int] = {}
    deepest = 0
    for node in model.graph:
        captures = any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
        level = deepest if captures else max((depth.get(v.name, 0) for v in node.inputs if v is not None), default=0)
        if node.name in by_name:
            stage_of[node.name] = level
            level += 1
        for v in node.outputs:
            depth[v.name] = level
        deepest = max(deepest, level)
    stages: list[list[Layer]] = [[] for _ in range(max(stage_of.values(), default=-1) + 1)]
    for name, level in stage_of.items():
        stages[level].append(by_name[name])
    return [s for s in stages if s]


class Stream:
    """One network run stage by stage over fixed batches. Between stages it keeps the values that later
    stages still need (up to `budget` bytes), so each node runs about once over the data instead of
    once per stage; over budget, the next stage recomputes from the graph inputs."""

    def __init__(self, batches: list[tuple[str, dict[str, np.ndarray]]], plan: list[list[str]], budget: int):
        self.batches = batches
        self.plan = plan  # per stage: the values it needs
        self.budget = budget
        self.cache: list[dict[str, np.ndarray]] = [{} for _ in batches]
        self.over_budget = 0  # stages whose values for later stages did not fit in the budget
        self.nodes_run = 0  # nodes run per batch, summed over stages (each node once is ideal)

    def stage(self, model: ir.Model, number: int) -> Iterator[dict[str, np.ndarray]]:
        """For every batch, the values stage `number` needs. `model` must not change while iterating; the
        nodes run here are upstream of that stage's layers only, so refitting them afterwards is safe."""
        wanted = self.plan[number]
        feeds_names = set(self.batches[0][1]) if self.batches else set()
        given = {name: a.dtype for name, a in self.cache[0].items()} if self.cache else {}
        nodes, _ = _upstream(model, wanted, set(given) | feeds_names)
        self.nodes_run += len(nodes)
        available = set(given) | {v.name for n in nodes for v in n.outputs}
        later = [name for names in self.plan[number + 1:] for name in names]
        _, keep = _upstream(model, later, available | feeds_names)
        keep -= feeds_names
        computed = sorted((set(wanted) | keep) - set(given) - feeds_names)
        session, inputs = _segment_session(model, nodes, computed, given) if computed else (None, [])
        stored, over = 0, False
        for index, (_, feeds) in enumerate(self.batches):
            known = {**feeds, **self.cache[index]}
            if session is not None:
                known.update(zip(computed, session.run(computed, {name: known[name] for name in inputs})))
            self.cache[index] = {} if over else {name: known[name] for name in keep}
            stored += sum(a.nbytes for a in self.cache[index].values())
            if stored > self.budget and not over:
                over = True
                self.over_budget += 1
                for done in range(index + 1):
                    self.cache[done] = {}
            yield {name: known[name] for name in wanted}


def _upstream(model: ir.Model, names: Iterable[str], stop: set[str]) -> tuple[list[ir.Node], set[str]]:
    """The nodes (in graph order) that compute `names` from the values in `stop` and the initializers,
    and which values of `stop` they read."""
    producer = {v.name: n for n in model.graph for v in n.outputs}
    chosen: set[int] = set()
    reached: set[str] = set()
    seen: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in stop:
            reached.add(name)
            continue
        node = producer.get(name)
        if node is None or id(node) in chosen:
            continue
        chosen.add(id(node))
        stack.extend(_reads(node))
    return [n for n in model.graph if id(n) in chosen], reached


def _reads(node: ir.Node) -> list[str]:
    """Names a node reads, including outer-scope values its subgraphs capture."""
    names = [v.name for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else list(attr.value)
            for graph in graphs:
                for inner in ir.traversal.RecursiveGraphIterator(graph):
                    names.extend(v.name for v in inner.inputs if v is not None)
    return names


def _segment_session(model: ir.Model, nodes: list[ir.Node], outputs_: list[str], given: dict[str, np.dtype]):
    """An ORT session for `nodes` alone: graph inputs plus the `given` values they read in, `outputs_`
    out. Built from serialized nodes so that only the segment's weights are copied."""
    read = {name for n in nodes for name in _reads(n)}
    graph_inputs = [ir.serde.serialize_value(v) for v in model.graph.inputs]
    for name in sorted(set(given) & read):
        graph_inputs.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(given[name]), None))
    # External tensors with their data: the segment is run from bytes, which cannot resolve a location.
    initializers = [ir.serde.serialize_tensor(tensor_in_memory(v.const_value))
                    for name, v in model.graph.initializers.items() if name in read and v.const_value is not None]
    graph = onnx.helper.make_graph([ir.serde.serialize_node(n) for n in nodes], "segment", graph_inputs,
                                   [onnx.ValueInfoProto(name=name) for name in outputs_], initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                         for d, v in model.opset_imports.items()])
    proto.ir_version = model.ir_version
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    # Without spin-waiting: ORT threads that spin between runs starve the numpy work in between.
    options = runtime.session_options(spinning=False)
    if sum(t.ByteSize() for t in initializers) > EXTERNAL_DATA_THRESHOLD:
        session = runtime.session(ir.serde.deserialize_model(proto), options=options)  # saved with external data
    else:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=runtime.provider_chain("cpu"))
    return session, [i.name for i in session.get_inputs()]

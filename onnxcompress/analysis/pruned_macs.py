"""MACs of a model after removing channel classes, without pruning a copy of it.

A MAC target is met by bisection over pruning ratios, and every step needs the MACs of the model a
decision would produce. Pruning a copy and re-running shape inference for each step costs a model
copy, a channel-graph build, the slicing and a shape inference. But pruning changes only the sizes
of the channel axes the channel graph tracks: the pruned size of an axis is the number of its
positions whose class survives (a layout axis spanning several atoms per position, e.g. a head,
survives while any of them does; a sliced weight keeps the positions whose atom survives). So
`PrunedMacs` sets those sizes in the original inferred shapes and applies the same per-node cost
rules (analysis/cost_rules.py) that `analyze_cost` applies to the pruned model.

It covers models whose main graph holds all the MACs: a model with If/Loop/Scan bodies, or whose
channel layouts disagree with the shapes inferred for costing, gets None from `PrunedMacs.of`, and
the caller prunes copies instead. tests/test_prune_macs.py checks it against `analyze_cost` of
really pruned models.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from .channels import ChannelGraph
from .control_flow import subgraphs
from .cost_rules import op_cost
from .shapes import ShapeInfo

#: (axis, atoms with that axis first and the other channel axes flattened): one tracked axis of a value.
TrackedAxis = tuple[int, np.ndarray]


class PrunedMacs:
    """`macs(removed)`: MACs of `graph.model` with the classes `removed` pruned, at `shapes`."""

    def __init__(self, graph: ChannelGraph, shapes: Mapping[str, ShapeInfo],
                 nodes: list[ir.Node], tracked: dict[str, list[TrackedAxis]]) -> None:
        self.graph = graph
        self.shapes = shapes
        self.nodes = nodes  # the nodes with MACs in the unpruned model
        self.tracked = tracked  # value name -> its channel axes, for the values those nodes read or write

    @classmethod
    def of(cls, graph: ChannelGraph, shapes: Mapping[str, ShapeInfo]) -> PrunedMacs | None:
        """An estimator for `graph.model` at `shapes` (what `infer_shapes` gives for the costing input
        shapes), or None where it could disagree with `analyze_cost` of the pruned model."""
        model = graph.model
        if any(subgraphs(node) for node in model.graph):
            return None  # bodies are costed from their own shape inference, with trip counts
        nodes = [node for node in model.graph if op_cost(node, shapes)[0] > 0]
        names = {v.name for node in nodes for v in (*node.inputs, *node.outputs) if v is not None}
        tracked = _tracked_axes(graph, names)
        for name, axes in tracked.items():
            shape = shapes[name].shape if name in shapes else None
            if shape is not None and any(axis >= len(shape) or shape[axis] != len(atoms) for axis, atoms in axes):
                return None  # the channel graph saw other sizes (other input shapes): no safe mapping
        return cls(graph, shapes, nodes, tracked)

    def macs(self, removed: Iterable[int]) -> int:
        """Total MACs once the classes `removed` (class roots) are pruned."""
        gone = self.graph.removed_mask(removed)
        pruned: dict[str, ShapeInfo] = {}
        for name, axes in self.tracked.items():
            info = self.shapes.get(name)
            if info is None or info.shape is None:
                continue
            dims = list(info.shape)
            for axis, atoms in axes:
                dims[axis] = int((~gone[atoms]).any(axis=1).sum())
            pruned[name] = ShapeInfo(tuple(dims), info.dtype)
        view = ChainMap(pruned, self.shapes)
        return sum(op_cost(node, view)[0] for node in self.nodes)


def _tracked_axes(graph: ChannelGraph, names: set[str]) -> dict[str, list[TrackedAxis]]:
    """The channel axes of the values in `names`: an initializer's are the axes it is sliced along
    (the only ones pruning changes), any other value's are its layout's axes."""
    initializers = graph.model.graph.initializers
    tracked: dict[str, list[TrackedAxis]] = {}
    for s in graph.slices:
        name = s.value.name
        if name in names and name in initializers:
            axes = tracked.setdefault(name, [])
            if all(axis != s.axis for axis, _ in axes):  # a shared tensor is sliced once per axis
                axes.append((s.axis, np.asarray(s.atoms, np.int64).reshape(-1, 1)))
    for name, layout in graph.layouts.items():
        if name in names and name not in initializers:
            atoms = np.asarray(layout.atoms, np.int64)
            tracked[name] = [
                (axis, np.moveaxis(atoms, i, 0).reshape(atoms.shape[i], -1)) for i, axis in enumerate(layout.axes)
            ]
    return tracked


__all__ = ["PrunedMacs"]

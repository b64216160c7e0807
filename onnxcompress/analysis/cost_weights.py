"""Which constants are weights, and which node each counts for: the params and weight bytes of cost.

Used by `analysis/cost.py` (MACs and FLOPs come from `analysis/cost_rules.py`).

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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx_ir as ir

from .control_flow import subgraphs
from .cost_rules import ELEMENTWISE_OPS, MS, op_name


@dataclass(frozen=True)
class ConstantInfo:
    """Size and type of one constant tensor (initializer or Constant node output)."""

    numel: int
    nbytes: int
    dtype: ir.DataType


def model_constants(model: ir.Model) -> dict[ir.Value, ConstantInfo]:
    """Initializers and Constant node outputs of the main graph and every subgraph. Keyed by value
    (not name): sibling If branches may each define a weight of the same name, and a subgraph that
    reads an outer-scope weight holds the same value object."""
    found: dict[ir.Value, ConstantInfo] = {}
    for graph in _all_graphs(model.graph):
        for value in graph.initializers.values():
            if value.const_value is not None:
                found[value] = _describe(value.const_value)
        for node in graph:
            if op_name(node) == "Constant" and node.outputs[0] not in found:
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


def _describe(tensor: ir.TensorProtocol) -> ConstantInfo:
    return ConstantInfo(numel=tensor.size, nbytes=tensor.nbytes, dtype=tensor.dtype)


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
        f"{MS}::MatMulNBits": {2, 3, 4},
        **{op: {1} for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                              "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")},
    }.items()
}
_NOT_WEIGHT_DTYPES = frozenset({ir.DataType.INT64, ir.DataType.BOOL, ir.DataType.STRING})


def weight_owners(model: ir.Model, constants: Mapping[ir.Value, ConstantInfo]) -> dict[ir.Value, ir.Node]:
    """Constant -> the first node (subgraph nodes right after the node holding them) that uses it as a weight."""
    owners: dict[ir.Value, ir.Node] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        op = op_name(node)
        for slot, value in enumerate(node.inputs):
            if value is None or value in owners or value not in constants:
                continue
            if _is_weight(op, slot, constants[value]):
                owners[value] = node
    return owners


def _is_weight(op: str, slot: int, constant: ConstantInfo) -> bool:
    if constant.dtype in _NOT_WEIGHT_DTYPES or slot in _NON_WEIGHT_INPUTS.get(op, ()):
        return False
    is_hyperparameter = constant.numel == 1 and op in ELEMENTWISE_OPS and op != "PRelu"
    return not is_hyperparameter


def weight_numel(op: str, node: ir.Node, value: ir.Value, constant: ConstantInfo) -> int:
    """Weights a constant holds: its elements, or K x N for MatMulNBits' packed B."""
    if op == f"{MS}::MatMulNBits" and len(node.inputs) > 1 and value is node.inputs[1]:
        k, n = node.attributes.get_int("K", 0), node.attributes.get_int("N", 0)
        return k * n if k and n else constant.numel
    return constant.numel

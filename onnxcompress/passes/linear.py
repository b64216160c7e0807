"""Where linear layers keep their bias: shared by the passes that rewrite Conv/Gemm/MatMul weights."""

from __future__ import annotations

import onnx_ir as ir


def matmul_bias_add(node: ir.Node, n_out: int) -> tuple[ir.Node, ir.Value] | None:
    """The Add holding a MatMul's bias, as exporters write `x @ W + b`: the MatMul's only consumer,
    adding a constant of shape [..., 1, n_out] that nothing else reads. None otherwise."""
    y = node.outputs[0]
    uses = list(y.uses())
    if len(uses) != 1 or y.is_graph_output():
        return None
    add, index = uses[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    const = add.inputs[1 - index]
    if const is None or const.const_value is None or const.is_graph_input() or len(const.uses()) != 1:
        return None
    shape = tuple(const.const_value.shape)
    if not shape or shape[-1] != n_out or any(d != 1 for d in shape[:-1]):
        return None
    return add, const

"""Writing recovered parameters back: an effective (W, b) stored into the pruned node, keeping dtypes and
weight shapes (a MatMul without a bias gets an Add)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...model import add_initializer
from ...names import fresh_name
from .layers import Layer, attr_int, bias_add


def write_params(model: ir.Model, layer: Layer, mat: np.ndarray | None, bias: np.ndarray) -> None:
    """Store an effective (W, b) into the pruned node, keeping dtypes and weight shapes. W None: bias only."""
    node = layer.node
    weight = node.inputs[1]
    dtype = weight.const_value.numpy().dtype
    if mat is not None:
        if node.op_type == "Conv":
            array = mat.T.reshape(tuple(weight.const_value.shape))
        elif node.op_type == "Gemm":
            array = mat / node.attributes.get_float("alpha", 1.0)
            array = array.T if attr_int(node, "transB", 0) else array
        else:
            array = mat
        _replace(weight, array.astype(dtype))
    bias = bias.astype(dtype)
    if node.op_type == "Conv":
        _set_input(model, node, 2, bias, "bias")
    elif node.op_type == "Gemm":
        _set_input(model, node, 2, bias, "bias")
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)  # the bias now holds beta * C
    else:
        add = bias_add(node)
        if add is not None:
            _replace(add[1], bias.reshape(tuple(add[1].const_value.shape)))
        else:
            _insert_bias_add(model, node, bias)


def _replace(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)


def _set_input(model: ir.Model, node: ir.Node, index: int, array: np.ndarray, suffix: str) -> None:
    """Put `array` in input `index`: in place when that is a private constant of the same size,
    otherwise as a new initializer (the old one is dropped when nothing else reads it)."""
    old = node.inputs[index] if len(node.inputs) > index else None
    if (old is not None and old.const_value is not None and len(old.uses()) == 1 and not old.is_graph_input()
            and old.const_value.size == array.size):
        _replace(old, array.reshape(tuple(old.const_value.shape)))
        return
    value = _new_initializer(model, f"{node.name}_{suffix}", array)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
    if old is not None and not old.uses() and old.name in model.graph.initializers and not old.is_graph_input():
        del model.graph.initializers[old.name]


def _new_initializer(model: ir.Model, base: str, array: np.ndarray) -> ir.Value:
    return add_initializer(model.graph, ir.tensor(np.ascontiguousarray(array), name=fresh_name(model, base)))




def _insert_bias_add(model: ir.Model, node: ir.Node, bias: np.ndarray) -> None:
    """MatMul -> Add(bias); the Add takes over the MatMul's output name, so consumers and graph outputs
    see the same name, now carrying the biased value."""
    y = node.outputs[0]
    name = y.name
    const = _new_initializer(model, f"{node.name}_bias", bias)
    add = ir.node("Add", [y, const], name=fresh_name(model, f"{node.name}_bias_add"))
    out = add.outputs[0]
    out.type, out.shape = y.type, y.shape
    for user, index in list(y.uses()):
        if user is not add:
            user.replace_input_with(index, out)
    for i, value in enumerate(model.graph.outputs):
        if value is y:
            model.graph.outputs[i] = out
    model.graph.insert_after(node, add)
    y.name = fresh_name(model, f"{name}_unbiased")
    out.name = name

"""Rewriting: a layer replaced by its two low-rank nodes in the model, with the record of what changed."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from ... import model as models
from ...names import NameAllocator
from .candidates import Candidate, factors_with_source
from .forms import io_matrix, params_per_rank, unmatrix
from .layers import Layer


Names = NameAllocator  # fresh unique names for new values and nodes: names(base)


def add_initializer(model: ir.Model, names: Names, base: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(np.ascontiguousarray(array, dtype=np.float32), name=names(base))
    return models.add_initializer(model.graph, tensor)


def _drop_if_unused(model: ir.Model, value: ir.Value | None) -> None:
    if value is not None and not list(value.uses()) and value.name in model.graph.initializers and not value.is_graph_output():
        del model.graph.initializers[value.name]


def apply(model: ir.Model, layer: Layer, cand: Candidate, rank: int, names: Names | None = None) -> dict:
    """Rewrite `layer` as two nodes of rank `rank` in `cand.form`; returns the layer's record."""
    a, b, source = factors_with_source(cand, rank)
    new_weight = unmatrix(layer, cand.form, a @ b)
    weight_error = float(np.linalg.norm(layer.weight - new_weight))
    refit = cand.moments is not None and layer.can_refit_bias
    bias = None
    if refit:  # the residual's mean over the calibration data goes into the bias
        shift = cand.moments.mean @ io_matrix(layer.weight - new_weight)
        bias = shift if layer.bias is None else layer.bias + shift
    rewrite(model, layer, cand.form, a, b, bias, names)
    record = _record(layer, cand, rank, layer.weight - new_weight, weight_error, refit)
    record["first_factor"] = source
    return record


def rewrite(model: ir.Model, layer: Layer, form: str, a: np.ndarray, b: np.ndarray, bias: np.ndarray | None = None,
            names: Names | None = None) -> None:
    """Replace `layer`'s node by a first node with factor A and the same node with factor B (its bias
    replaced by `bias` when given, else kept)."""
    names = names or Names(model)
    node, base = layer.node, layer.node.name or layer.node.outputs[0].name
    x = node.inputs[0]
    old_weight = node.inputs[1]
    first_w, second_w, first_attrs, second_attrs = _node_weights(layer, form, a, b)
    op = "MatMul" if layer.kind != "Conv" else "Conv"
    w1 = add_initializer(model, names, f"{base}_lowrank_a", first_w)
    first = ir.node(op, [x, w1], attributes=first_attrs, name=names(f"{base}_lowrank"))
    hidden = first.outputs[0]
    hidden.name = names(f"{node.outputs[0].name}_lowrank")
    hidden.type = ir.TensorType(ir.DataType.FLOAT)
    model.graph.insert_before(node, first)
    node.replace_input_with(0, hidden)
    node.replace_input_with(1, add_initializer(model, names, f"{base}_lowrank_b", second_w))
    for key in ("auto_pad", "transA", "transB", "alpha") if layer.kind != "MatMul" else ():
        node.attributes.pop(key, None)
    for key, val in second_attrs.items():
        node.attributes[key] = ir.Attr(key, ir.AttributeType.INTS, list(val))
    _drop_if_unused(model, old_weight)
    if bias is None:
        return
    if layer.kind == "Gemm":
        _set_bias(model, names, node, 2, bias, base)
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    elif layer.kind == "Conv":
        _set_bias(model, names, node, 2, bias, base)
    else:
        add = layer.bias_add
        slot = 1 if add.inputs[0] is node.outputs[0] else 0
        _set_bias(model, names, add, slot, bias.reshape(add.inputs[slot].const_value.shape), base)


def _set_bias(model: ir.Model, names: Names, node: ir.Node, slot: int, bias: np.ndarray, base: str) -> None:
    old = node.inputs[slot] if len(node.inputs) > slot else None
    value = add_initializer(model, names, f"{base}_bias", bias)
    if len(node.inputs) <= slot:
        node.resize_inputs(slot + 1)
    node.replace_input_with(slot, value)
    _drop_if_unused(model, old)


def _node_weights(layer: Layer, form: str, a: np.ndarray, b: np.ndarray):
    """Weights of the two new nodes and the attributes each needs, from the factors A [in, r], B [r, out]."""
    r = a.shape[1]
    if form == "gemm":
        return a, b, {}, {}
    w = layer.weight
    o, c, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
    dims = len(kernel)
    ones, zeros = (1,) * dims, (0,) * dims
    full = {"kernel_shape": kernel, "strides": layer.strides, "dilations": layer.dilations,
            "pads": layer.pads_begin + layer.pads_end}
    point = {"kernel_shape": ones, "strides": ones, "dilations": ones, "pads": zeros + zeros}
    if form == "channel":
        return a.T.reshape(r, c, *kernel), b.T.reshape(o, r, *ones), full, point
    if form == "squeeze":
        return a.T.reshape(r, c, *ones), np.moveaxis(b.reshape(r, o, *kernel), 0, 1), point, full
    (kh, kw), (sh, sw), (dh, dw) = kernel, layer.strides, layer.dilations
    (bh, bw), (eh, ew) = layer.pads_begin, layer.pads_end
    w1 = a.reshape(c, kh, r).transpose(2, 0, 1)[..., None]
    w2 = b.reshape(r, o, kw).transpose(1, 0, 2)[:, :, None, :]
    vertical = {"kernel_shape": (kh, 1), "strides": (sh, 1), "dilations": (dh, 1), "pads": (bh, 0, eh, 0)}
    horizontal = {"kernel_shape": (1, kw), "strides": (1, sw), "dilations": (1, dw), "pads": (0, bw, 0, ew)}
    return w1, w2, vertical, horizontal


def _record(layer: Layer, cand: Candidate, rank: int, residual: np.ndarray, weight_error: float, refit: bool) -> dict:
    params_before = int(layer.weight.size)
    output_error = None
    if cand.moments is not None:  # relative output error on the calibration data, from the input moments
        base, delta = io_matrix(layer.weight), io_matrix(residual)
        err = float(np.trace(delta.T @ cand.moments.covariance(refit) @ delta))
        ref = float(np.trace(base.T @ cand.moments.covariance(False) @ base))
        output_error = math.sqrt(max(err, 0.0) / ref) if ref > 0 else 0.0
    return {
        "node": layer.node.name,
        "op": layer.kind,
        "form": cand.form,
        "rank": rank,
        "full_rank": cand.full_rank,
        "break_even": round(cand.break_even, 2),
        "macs_before": layer.macs,
        "macs_after": rank * cand.per_rank,
        "params_before": params_before,
        "params_after": rank * params_per_rank(layer, cand.form),
        "weight_error": weight_error,
        "weight_error_rel": weight_error / max(float(np.linalg.norm(layer.weight)), 1e-30),
        "output_error": output_error,
        "data_aware": cand.whitened,
        "bias_refit": refit,
    }

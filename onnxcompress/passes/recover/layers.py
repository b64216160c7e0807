"""Recovery's view of a sink: an affine layer y = x·W + b over rows of its input (im2col rows for
Conv), in the pruned model and in the original, with which input rows and outputs were kept."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ...analysis.channels import Sink
from ..linear import matmul_bias_add


@dataclass
class Layer:
    """One sink seen as an affine layer: weight matrix [inputs, outputs] and bias over input rows."""

    sink: Sink
    node: ir.Node  # in the pruned model
    original: ir.Node  # the same node in the original model
    taps: int  # input rows per channel: kernel positions for Conv, 1 otherwise
    keep_rows: np.ndarray  # bool per input row of the original layer
    keep_out: np.ndarray  # bool per output of the original layer (its own outputs may be pruned too)
    target: str  # the original layer's output value (bias included)
    record: dict = field(default_factory=dict)

    @property
    def inputs(self) -> int:  # kept input rows of the effective matrix (channels x taps)
        return int(self.keep_rows.sum())

    @property
    def outputs(self) -> int:
        return int(self.keep_out.sum())


def affine_layer(original: ir.Model, model: ir.Model, sink: Sink) -> tuple[Layer | None, str]:
    """The affine view of a sink in both models, or None and why it cannot be recovered."""
    node, orig = _node(model, sink.node), _node(original, sink.node)
    if node is None or orig is None:
        return None, "node not found in both models"
    if sink.op_type not in ("Conv", "Gemm", "MatMul") or node.op_type != sink.op_type:
        return None, f"{sink.op_type} layers are not recovered"
    for n in (node, orig):
        w = n.inputs[1] if len(n.inputs) > 1 else None
        if w is None or w.name != sink.weight or w.const_value is None:
            return None, "weight is not the constant the channel analysis named"
    if node.op_type == "Conv" and attr_int(node, "group", 1) != 1:
        return None, "grouped convolution"
    if node.op_type == "Gemm" and (attr_int(node, "transA", 0) or node.attributes.get_float("alpha", 1.0) == 0.0):
        return None, "Gemm with transA or alpha 0"
    if node.op_type == "MatMul" and len(node.inputs[1].const_value.shape) != 2:
        return None, "MatMul weight is not 2-D"
    if node.op_type == "Gemm":
        for n in (node, orig):
            c, outs = _const_input(n, 2), n.inputs[1].const_value.shape[0 if attr_int(n, "transB", 0) else 1]
            if len(n.inputs) > 2 and n.inputs[2] is not None and (c is None or c.size not in (1, outs)):
                return None, "Gemm bias is not a constant per-output vector"
    w_orig, b_orig = effective(orig)
    w_now, b_now = effective(node)
    taps = int(np.prod(node.inputs[1].const_value.shape[2:])) if node.op_type == "Conv" else 1
    keep = np.asarray(sink.keep, bool)
    if len(keep) * taps != len(w_orig) or int(keep.sum()) * taps != len(w_now):
        return None, "weight shapes do not match the kept input channels"
    keep_rows = np.repeat(keep, taps)
    keep_out = _match_columns(np.vstack([w_orig[keep_rows], b_orig]), np.vstack([w_now, b_now]))
    if keep_out is None:
        return None, "cannot tell which of the layer's own outputs were kept"
    target = orig.outputs[0].name
    if node.op_type == "MatMul":
        add = bias_add(orig)
        if add is not None:
            target = add[0].outputs[0].name
    record = {"node": sink.node, "op_type": sink.op_type, "inputs": int(keep.sum()),
              "removed_inputs": int((~keep).sum())}
    return Layer(sink, node, orig, taps, keep_rows, keep_out, target, record), ""


def _node(model: ir.Model, name: str) -> ir.Node | None:
    return next((n for n in model.graph if n.name == name), None)


def attr_int(node: ir.Node, name: str, default: int) -> int:
    return int(node.attributes.get_int(name, default))


def _match_columns(original: np.ndarray, pruned: np.ndarray) -> np.ndarray | None:
    """Which columns of `original` survive in `pruned` (pruning slices, so the kept ones appear in order
    and bit-identical; greedy matching finds them, and equal columns are interchangeable)."""
    keep = np.zeros(original.shape[1], bool)
    j = 0
    for i in range(original.shape[1]):
        if j < pruned.shape[1] and np.array_equal(original[:, i], pruned[:, j]):
            keep[i] = True
            j += 1
    return keep if j == pruned.shape[1] else None


def effective(node: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """(W [input rows, outputs], b [outputs]) in float64 such that the layer computes x·W + b."""
    w = node.inputs[1].const_value.numpy().astype(np.float64)
    if node.op_type == "Conv":
        mat = w.reshape(w.shape[0], -1).T  # rows: channel-major, then kernel positions (im2col order)
        bias = _const_input(node, 2)
        return mat, np.zeros(mat.shape[1]) if bias is None else bias.ravel()
    if node.op_type == "Gemm":
        alpha, beta = node.attributes.get_float("alpha", 1.0), node.attributes.get_float("beta", 1.0)
        mat = alpha * (w.T if attr_int(node, "transB", 0) else w)
        bias = _const_input(node, 2)
        return mat, np.zeros(mat.shape[1]) if bias is None else beta * np.broadcast_to(bias.ravel(), mat.shape[1])
    add = bias_add(node)
    bias = add[1].const_value.numpy().astype(np.float64).ravel() if add is not None else np.zeros(w.shape[1])
    return w, bias


def _const_input(node: ir.Node, index: int) -> np.ndarray | None:
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy().astype(np.float64)


def bias_add(node: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    return matmul_bias_add(node, node.inputs[1].const_value.shape[1])

"""Bias correction for static int8 (QuantizeQDQ, passes/quantize.py).

Nagel et al. 2019 ("Data-Free Quantization", empirical bias correction): rounding the weights
moves each output's expected value by (W_q - W) . E[x]; subtracting that from the bias makes the
int8 layer unbiased. E[x] is the float model's per-channel input mean over the calibration data.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from .int8_graph import FreshNames, QuantParams, editable_copy, weight_encodings
from .int8_placement import Plan, PlanGraph, constant_weight_anchors, input_name, node_attr
from .int8_weights import WeightEncoding, quantize_weight


def _input_axis(node: ir.Node) -> int:
    """The axis of the node's activation input that the weight contracts over."""
    return -1 if node.op_type == "MatMul" else 1  # Conv NCHW channels; Gemm [M, K] (transA=0)


def correction_inputs(model: ir.Model, plan: Plan) -> dict[str, int]:
    """{activation input: channel axis} whose per-channel means bias correction needs."""
    g = PlanGraph(model.graph)
    axes: dict[str, int] = {}
    for node in constant_weight_anchors(g, plan):
        axes.setdefault(input_name(node, 0), _input_axis(node))
    return axes


def weight_rounding_error(w: np.ndarray, axis: int | None) -> np.ndarray:
    """dequantize(quantize(W)) - W for full-range symmetric int8 codes (float32 arithmetic)."""
    q, scale = quantize_weight(w, axis)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    return q.astype(np.float32) * scale.reshape(shape) - w


def bias_shift(node: ir.Node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Per-output change of the expected output, sum over inputs (and kernel taps) of delta * mean.

    Conv: every tap sees the channel mean; zero padding makes border outputs see fewer taps, which
    this ignores (the interior dominates and the shift is an expectation, not a per-pixel term)."""
    mean = mean.astype(np.float64)
    delta = delta.astype(np.float64)
    if node.op_type == "Conv":
        groups = int(node_attr(node, "group", 1))
        per_tap = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(axis=2)  # [M, C/groups]
        group_means = mean.reshape(groups, -1)  # [groups, C/groups]
        group_of_output = np.arange(delta.shape[0]) // (delta.shape[0] // groups)
        return np.einsum("mc,mc->m", per_tap, group_means[group_of_output])
    if node.op_type == "Gemm" and node_attr(node, "transB", 0):
        return delta @ mean  # W [N, K]
    return mean @ delta  # Gemm/MatMul W [K, N]


def correct_biases(
    model: ir.Model,
    plan: Plan,
    params: Mapping[str, QuantParams],
    means: Mapping[str, np.ndarray],
    *,
    encodings: Mapping[str, WeightEncoding] | None = None,
    per_channel: bool = True,
) -> tuple[ir.Model, dict[str, float], list[str]]:
    """A copy of `model` (sharing its weights) whose int8 layers' float biases absorb their
    weight-rounding shift (the rounding of `encodings`, computed for any kernels when not given);
    returns (model, {node: max |shift|}, ["node: why not corrected"])."""
    if encodings is None:
        encodings = weight_encodings(model, plan, params, per_channel=per_channel)
    out, g, names = editable_copy(model)
    shifts: dict[str, float] = {}
    skipped: list[str] = []
    for node in constant_weight_anchors(g, plan):
        name, mean = g.name(node), means.get(input_name(node, 0))
        w = g.array(input_name(node, 1)).astype(np.float32)
        k_in = w.shape[1] * int(node_attr(node, "group", 1)) if node.op_type == "Conv" else (
            w.shape[1] if node.op_type == "Gemm" and node_attr(node, "transB", 0) else w.shape[0])
        if mean is None or mean.size != k_in:
            skipped.append(f"{name}: no input mean")
            continue
        enc = encodings[name]
        shift = bias_shift(node, enc.dequantized() - w, mean)
        x = params.get(input_name(node, 0))
        if node.op_type != "MatMul" and not input_name(node, 2) and not _survives(shift, x, enc.scales):
            continue  # create a bias only when the shift survives int32 rounding (half a bias step)
        reason = _absorb(g, node, shift, names)
        if reason is not None:
            skipped.append(f"{name}: {reason}")
            continue
        shifts[name] = float(np.max(np.abs(shift)))
    return out, shifts, skipped


def _survives(shift: np.ndarray, x: QuantParams | None, w_scales: np.ndarray) -> bool:
    return x is not None and bool(np.any(np.abs(shift) >= 0.5 * x.scale * w_scales.astype(np.float64)))


def _absorb(g: PlanGraph, node: ir.Node, shift: np.ndarray, names: FreshNames) -> str | None:
    """Subtract `shift` from the layer's bias (a new initializer; a new bias where it has none):
    None when done, why not otherwise."""
    bias = input_name(node, 2)
    if node.op_type == "MatMul":  # no bias slot: fold into a following Add of a constant
        users = g.consumers.get(node.outputs[0].name, [])
        add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
        slot = next((k for k in range(len(add.inputs)) if input_name(add, k) != node.outputs[0].name
                     and input_name(add, k) in g.inits), None) if add else None
        if slot is None:
            return "MatMul without a constant bias Add"
        b = g.array(input_name(add, slot)).astype(np.float64)
        if b.ndim > 1 and b.shape[-1] not in (1, shift.size):
            return "bias Add does not broadcast along the output columns"
        add.replace_input_with(slot, names.const(f"{input_name(add, slot)}_corrected", (b - shift).astype(np.float32)))
    elif bias:
        corrected = g.array(bias).astype(np.float64) - shift  # Gemm's C broadcasts over [M, N]: the shift runs along N
        corrected = corrected.reshape(-1) if corrected.size == shift.size else corrected
        node.replace_input_with(2, names.const(f"{bias}_corrected", corrected.astype(np.float32)))
    else:
        node.resize_inputs(3)
        node.replace_input_with(2, names.const(f"{g.name(node)}_bias_corrected", (-shift).astype(np.float32)))
    return None

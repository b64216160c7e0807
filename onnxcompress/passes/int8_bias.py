"""Bias correction for static int8 (QuantizeQDQ, passes/quantize.py).

Nagel et al. 2019 ("Data-Free Quantization", empirical bias correction): rounding the weights
moves each output's expected value by (W_q - W) . E[x]; subtracting that from the bias makes the
int8 layer unbiased. E[x] is the float model's per-channel input mean over the calibration data.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from .int8_graph import QuantParams, editable_copy, weight_encodings
from .int8_placement import Plan, ProtoGraph, constant_weight_anchors, node_attr
from .int8_weights import WeightEncoding, quantize_weight


def _input_axis(node: onnx.NodeProto) -> int:
    """The axis of the node's activation input that the weight contracts over."""
    return -1 if node.op_type == "MatMul" else 1  # Conv NCHW channels; Gemm [M, K] (transA=0)


def correction_inputs(proto: onnx.ModelProto, plan: Plan) -> dict[str, int]:
    """{activation input: channel axis} whose per-channel means bias correction needs."""
    g = ProtoGraph(proto.graph)
    axes: dict[str, int] = {}
    for node in constant_weight_anchors(g, plan):
        axes.setdefault(node.input[0], _input_axis(node))
    return axes


def weight_rounding_error(w: np.ndarray, axis: int | None) -> np.ndarray:
    """dequantize(quantize(W)) - W for full-range symmetric int8 codes (float32 arithmetic)."""
    q, scale = quantize_weight(w, axis)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    return q.astype(np.float32) * scale.reshape(shape) - w


def bias_shift(node: onnx.NodeProto, delta: np.ndarray, mean: np.ndarray) -> np.ndarray:
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
    proto: onnx.ModelProto,
    plan: Plan,
    params: Mapping[str, QuantParams],
    means: Mapping[str, np.ndarray],
    *,
    encodings: Mapping[str, WeightEncoding] | None = None,
    per_channel: bool = True,
) -> tuple[onnx.ModelProto, dict[str, float], list[str]]:
    """A copy of `proto` whose int8 layers' float biases absorb their weight-rounding shift (the
    rounding of `encodings`, computed for any kernels when not given); returns
    (model, {node: max |shift|}, ["node: why not corrected"])."""
    if encodings is None:
        encodings = weight_encodings(proto, plan, params, per_channel=per_channel)
    out, g, names = editable_copy(proto)
    graph = out.graph
    shifts: dict[str, float] = {}
    skipped: list[str] = []

    def new_bias(base: str, array: np.ndarray) -> str:
        name = names.fresh(f"{base}_corrected")
        graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    for node in constant_weight_anchors(g, plan):
        mean = means.get(node.input[0])
        w = numpy_helper.to_array(g.inits[node.input[1]]).astype(np.float32)
        k_in = w.shape[1] * int(node_attr(node, "group", 1)) if node.op_type == "Conv" else (
            w.shape[1] if node.op_type == "Gemm" and node_attr(node, "transB", 0) else w.shape[0])
        if mean is None or mean.size != k_in:
            skipped.append(f"{node.name}: no input mean")
            continue
        enc = encodings[node.name]
        shift = bias_shift(node, enc.dequantized() - w, mean)
        if node.op_type == "MatMul":  # no bias slot: fold into a following Add of a constant
            users = g.consumers.get(node.output[0], [])
            add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
            slot = next((k for k, v in enumerate(add.input) if v != node.output[0] and v in g.inits), None) if add else None
            if slot is None:
                skipped.append(f"{node.name}: MatMul without a constant bias Add")
                continue
            b = numpy_helper.to_array(g.inits[add.input[slot]]).astype(np.float64)
            if b.ndim > 1 and b.shape[-1] not in (1, shift.size):
                skipped.append(f"{node.name}: bias Add does not broadcast along the output columns")
                continue
            add.input[slot] = new_bias(add.input[slot], b - shift)
        elif len(node.input) > 2 and node.input[2]:
            b = numpy_helper.to_array(g.inits[node.input[2]]).astype(np.float64)
            corrected = b - shift  # Gemm's C broadcasts over [M, N]: the shift runs along N
            node.input[2] = new_bias(node.input[2], corrected.reshape(-1) if corrected.size == shift.size else corrected)
        else:
            x = params.get(node.input[0])
            # create a bias only when the shift survives int32 rounding (half a bias step)
            if x is None or not np.any(np.abs(shift) >= 0.5 * x.scale * enc.scales.astype(np.float64)):
                continue
            while len(node.input) < 2:
                node.input.append("")
            node.input.append(new_bias(f"{node.name}_bias", -shift))
        shifts[node.name] = float(np.max(np.abs(shift)))
    return out, shifts, skipped

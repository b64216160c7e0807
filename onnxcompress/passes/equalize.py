"""Equalize: cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization") before int8.

For a producer P (Conv, Gemm, MatMul with constant weight) whose output reaches exactly one
consumer C of the same family (C may be grouped or depthwise), directly or through a Relu or
LeakyRelu, output channel i of P is scaled by 1/s_i and the matching input channel of C by s_i.
Both ops in between satisfy f(x / s) = f(x) / s for s > 0, so the model computes the same
function. With s_i = sqrt(r1_i * r2_i) / r2_i both per-channel weight ranges become
sqrt(r1_i * r2_i), which evens out the ranges a per-tensor int8 scale has to cover.

Chains (1x1 -> depthwise -> 1x1) share weights between consecutive pairs, so pairs are swept
`iterations` times: each sweep moves the chain closer to the joint equilibrium.
Ops in between that are not positively homogeneous (ReLU6 as Clip, Sigmoid, a residual Add, ...)
would change the function: they block the pair, with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from ..pipeline import Pass, PassContext, PassResult, cost_analysis, option

WEIGHTED = frozenset({"Conv", "Gemm", "MatMul"})
DENSE = frozenset({"Gemm", "MatMul"})
# Activations f with f(x / s) = f(x) / s for every s > 0, elementwise.
HOMOGENEOUS = frozenset({"Relu", "LeakyRelu"})


@dataclass
class _Pair:
    producer: ir.Node
    consumer: ir.Node
    activation: ir.Node | None
    weight1: ir.Value
    bias1: ir.Value | None
    weight2: ir.Value

    @property
    def label(self) -> str:
        via = f" -> {self.activation.op_type}" if self.activation is not None else ""
        return f"{_name(self.producer)}{via} -> {_name(self.consumer)}"


@dataclass
class Equalize(Pass):
    """Cross-layer equalization of consecutive Conv/Gemm/MatMul weights (exact in float)."""

    name: ClassVar[str] = "equalize"
    exact: ClassVar[bool] = True

    iterations: int = option(3, "Sweeps over all pairs; chains converge towards the joint equilibrium.")
    min_range: float = option(1e-8, "Channels with a smaller weight range on either side are dead: left alone.")

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if not self.min_range >= 0.0:
            raise ValueError(f"min_range must be >= 0, got {self.min_range}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        pairs, skipped = find_pairs(model)
        before = [_spreads(p, self.min_range) for p in pairs]
        equalized = [np.zeros(0, dtype=bool)] * len(pairs)
        for _ in range(self.iterations):
            for k, pair in enumerate(pairs):
                equalized[k] = _equalize(pair, self.min_range)
        changes, records = [], []
        for pair, spread_before, live in zip(pairs, before, equalized):
            spread_after = _spreads(pair, self.min_range)
            r1, r2 = producer_ranges(pair), consumer_ranges(pair)
            imbalance = float(np.max(np.abs(np.log(r1[live] / r2[live])))) if live.any() else 0.0
            records.append({
                "producer": _name(pair.producer), "consumer": _name(pair.consumer),
                "activation": pair.activation.op_type if pair.activation is not None else None,
                "channels": int(live.size), "equalized_channels": int(live.sum()),
                "producer_spread": [spread_before[0], spread_after[0]],
                "consumer_spread": [spread_before[1], spread_after[1]],
                "max_log_imbalance": imbalance,  # max |log(r1_i / r2_i)| left after the last sweep
            })
            changes.append(
                f"{pair.label}: {int(live.sum())}/{live.size} channels equalized, range spread (max/min) "
                f"{spread_before[0]:.3g} -> {spread_after[0]:.3g} (producer), "
                f"{spread_before[1]:.3g} -> {spread_after[1]:.3g} (consumer)"
            )
        details = {"iterations": self.iterations, "pairs": records}
        return self.result(model, changes=changes, skipped=skipped, details=details,
                           modified=bool(pairs), preserved=frozenset({cost_analysis}))


# ---------------------------------------------------------------------------- finding pairs


def find_pairs(model: ir.Model) -> tuple[list[_Pair], list[str]]:
    """Every producer -> [Relu] -> consumer pair that can be equalized, and why the others cannot."""
    pairs, skipped = [], []
    for node in model.graph:
        if _is_weighted(node):
            found = _pair_from(node)
            if isinstance(found, _Pair):
                pairs.append(found)
            elif found is not None:
                skipped.append(found)
    return pairs, skipped


def _pair_from(producer: ir.Node) -> _Pair | str | None:
    """The pair starting at `producer`; a reason when it feeds a weighted op but cannot be equalized;
    None when it does not feed a weighted op at all (nothing to equalize against)."""
    out = producer.outputs[0]
    activation, value = None, out
    users = [u.node for u in out.uses()]
    if len(users) == 1 and users[0].op_type in HOMOGENEOUS and users[0].domain in ("", "ai.onnx"):
        activation, value = users[0], users[0].outputs[0]
        users = [u.node for u in value.uses()]
    weighted = [n for n in users if _is_weighted(n)]
    if not weighted:
        # One blocking op straight before a weighted op is worth a reason; anything else is not a pair.
        nxt = [u.node for n in users if len(n.outputs) == 1 for u in n.outputs[0].uses()]
        if len(users) == 1 and len(out.uses()) == 1 and any(_is_weighted(n) for n in nxt):
            op = users[0].op_type
            return (f"{_name(producer)} -> {op} -> {_name(nxt[0])}: {op} in between "
                    f"(only Relu, LeakyRelu or nothing keeps the rescaling exact: f(x / s) = f(x) / s)")
        return None
    consumer = weighted[0]
    label = f"{_name(producer)} -> {_name(consumer)}"
    if len(users) > 1 or out.is_graph_output() or value.is_graph_output():
        return f"{label}: {_name(producer)} output has other consumers"
    if consumer.inputs[0] is not value:
        return f"{label}: the activation is not the consumer's data input"
    if (producer.op_type in DENSE) != (consumer.op_type in DENSE):
        return f"{label}: {producer.op_type} -> {consumer.op_type} channel axes do not match"
    for node in (producer, consumer):
        reason = _weight_reason(node)
        if reason:
            return f"{label}: {reason}"
    if consumer.op_type == "Gemm" and consumer.attributes.get_int("transA", 0):
        return f"{label}: {_name(consumer)} transposes its input (transA)"
    weight1, weight2 = producer.inputs[1], consumer.inputs[1]
    bias1 = producer.inputs[2] if len(producer.inputs) > 2 else None
    if bias1 is not None:
        if bias1.const_value is None or bias1.is_graph_input():
            return f"{label}: {_name(producer)} bias is not a constant"
        if len(bias1.uses()) > 1:
            return f"{label}: {_name(producer)} bias is shared with other nodes"
        b = bias1.const_value.numpy()
        if b.ndim == 0 or b.shape[-1] != weight1.const_value.shape[_out_axis(producer)]:
            return f"{label}: {_name(producer)} bias is not a per-output-channel vector"
    pair = _Pair(producer, consumer, activation, weight1, bias1, weight2)
    if producer_ranges(pair).size != consumer_ranges(pair).size:
        return f"{label}: producer output channels and consumer input channels differ"
    return pair


def _is_weighted(node: ir.Node) -> bool:
    return node.op_type in WEIGHTED and node.domain in ("", "ai.onnx") and len(node.inputs) > 1


def _weight_reason(node: ir.Node) -> str | None:
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or weight.is_graph_input():
        return f"{_name(node)} weight is not a constant"
    if len(weight.uses()) > 1:
        return f"{_name(node)} weight is shared with other nodes"
    if not np.issubdtype(weight.const_value.numpy().dtype, np.floating):
        return f"{_name(node)} weight is not floating point"
    if node.op_type == "MatMul" and len(weight.const_value.shape) != 2:
        return f"{_name(node)} weight is not a matrix"
    return None


def _name(node: ir.Node) -> str:
    return node.name or node.op_type


# ---------------------------------------------------------------------------- ranges and scaling


def _out_axis(node: ir.Node) -> int:
    """Axis of the weight that holds the node's output channels."""
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 1 if node.op_type == "MatMul" else 0


def _consumer_view(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """The consumer weight as [groups, out per group, in per group, rest]: input channel g*cin_g + j
    is [g, :, j, :]. Group 1 and depthwise Conv are the two ends; dense weights are one group."""
    if node.op_type == "Conv":
        group = node.attributes.get_int("group", 1)
        return w.reshape(group, w.shape[0] // group, w.shape[1], -1)
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return w.reshape(1, w.shape[0], w.shape[1], 1)  # [N, K]
    return w.T.reshape(1, w.shape[1], w.shape[0], 1)  # [K, N] seen as [N, K]


def producer_ranges(pair: _Pair) -> np.ndarray:
    """r1_i = max |W1| over output channel i of the producer."""
    w = np.abs(pair.weight1.const_value.numpy().astype(np.float64))
    return np.moveaxis(w, _out_axis(pair.producer), 0).reshape(w.shape[_out_axis(pair.producer)], -1).max(axis=1)


def consumer_ranges(pair: _Pair) -> np.ndarray:
    """r2_i = max |W2| over everything input channel i of the consumer touches."""
    view = np.abs(_consumer_view(pair.consumer, pair.weight2.const_value.numpy().astype(np.float64)))
    return view.max(axis=(1, 3)).reshape(-1)


def _equalize(pair: _Pair, min_range: float) -> np.ndarray:
    """One equalization step of `pair`; which channels were live (rescaled)."""
    r1, r2 = producer_ranges(pair), consumer_ranges(pair)
    live = (r1 > min_range) & (r2 > min_range)
    s = np.ones_like(r1)
    s[live] = np.sqrt(r1[live] * r2[live]) / r2[live]

    w1 = pair.weight1.const_value.numpy()
    axis = _out_axis(pair.producer)
    shape = [-1 if i == axis else 1 for i in range(w1.ndim)]
    _set(pair.weight1, w1.astype(np.float64) / s.reshape(shape), w1.dtype)
    if pair.bias1 is not None:
        b = pair.bias1.const_value.numpy()
        _set(pair.bias1, b.astype(np.float64) / s, b.dtype)  # per-channel along the last axis

    w2 = pair.weight2.const_value.numpy()
    view = _consumer_view(pair.consumer, w2.astype(np.float64))
    scaled = view * s.reshape(view.shape[0], 1, view.shape[2], 1)
    consumer = pair.consumer
    if consumer.op_type == "Conv" or (consumer.op_type == "Gemm" and consumer.attributes.get_int("transB", 0)):
        new_w2 = scaled.reshape(w2.shape)
    else:  # [K, N] weights were viewed transposed
        new_w2 = scaled.reshape(w2.shape[1], w2.shape[0]).T
    _set(pair.weight2, new_w2, w2.dtype)
    return live


def _set(value: ir.Value, array: np.ndarray, dtype: np.dtype) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array.astype(dtype)), name=value.name)


def _spread(ranges: np.ndarray, min_range: float) -> float:
    live = ranges[ranges > min_range]
    return float(live.max() / live.min()) if live.size else 1.0


def _spreads(pair: _Pair, min_range: float) -> tuple[float, float]:
    return _spread(producer_ranges(pair), min_range), _spread(consumer_ranges(pair), min_range)

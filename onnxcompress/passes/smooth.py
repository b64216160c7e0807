"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before int8.

A few input channels of a MatMul/Gemm often carry values far larger than the rest (transformer
LayerNorm outputs are the known case); one per-tensor int8 scale then spends its codes on them and
rounds every other channel to a few levels. For an input X consumed by MatMul/Gemm nodes with
constant weights, per input channel j

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(max|X_j| streamed over the calibration data, max|W_j| over the rows of every consumer's weight),
X is divided by s and each consumer's weight row j multiplied by s: X W = (X / s)(s W) exactly.

Where the division goes:
- folded into X's producer when every consumer of X is smoothed and the producer is a
  LayerNormalization (last axis, constant scale/bias), a Gemm, a MatMul with a constant weight, or an
  Add of a constant bias to such a MatMul: its output channels are scaled, nothing is added;
- otherwise (`insert_mul`) a per-channel Mul is inserted in front of the smoothed consumers only
  (post-norm encoders: the LayerNorm output also feeds the residual Add, which must see X unscaled).
  ORT runs that Mul in float before the QuantizeLinear: it costs one elementwise pass over X.

Exact in float (up to rounding): the pipeline verifies it like any exact pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from ..analysis.activations import collect
from ..errors import OnnxCompressError
from ..pipeline import Pass, PassContext, PassResult, cost_analysis

DENSE = frozenset({"MatMul", "Gemm"})
#: Smoothing factors are clamped to [1 / MAX_FACTOR, MAX_FACTOR]: a channel that is (nearly) dead on
#: one side would otherwise blow the other side up by orders of magnitude for no quantization gain.
MAX_FACTOR = 1e4
#: Channels whose activation or weight range is below this are left alone (factor 1).
MIN_RANGE = 1e-8


class SmoothCalibrationError(OnnxCompressError):
    """SmoothQuant needs calibration data for the activation ranges."""


@dataclass
class _Group:
    """One activation X and the MatMul/Gemm nodes that contract over its last axis with constant weights."""

    value: ir.Value
    consumers: list[ir.Node]


@dataclass
class SmoothQuant(Pass):
    """Per-channel activation/weight rebalancing for MatMul/Gemm inputs (exact in float)."""

    name: ClassVar[str] = "smooth-quant"
    exact: ClassVar[bool] = True

    alpha: float = 0.5  # migration strength: 0 keeps the activation as is, 1 moves all its range into W
    samples: int | None = None  # calibration samples for the activation ranges (None: all given)
    insert_mul: bool = True  # where the producer cannot absorb 1/s, insert a per-channel Mul
    # {input value: its own alpha, None = leave it} (int8_patterns.choose_alphas); inputs not named
    # are left alone. None: `alpha` for every input.
    alphas: dict[str, float | None] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if ctx.calibration is None:
            raise SmoothCalibrationError(
                f"{self.name} needs calibration data (--calib FILE.npy/.npz) for the activation ranges"
            )
        groups, skipped = find_groups(model)
        if self.alphas is not None:
            groups = [g for g in groups if self.alphas.get(g.value.name) is not None]
        if not groups:
            return self.result(model, changes=[], skipped=skipped, details={"alpha": self.alpha, "inputs": []},
                               preserved=frozenset({cost_analysis}))
        axes = {g.value.name: -1 for g in groups}
        stats = collect(model, axes, ctx.calibration, limit=self.samples)
        names = _NameSource(model)
        changes, records = [], []
        for group in groups:
            ch = stats.values.get(group.value.name)
            if ch is None or ch.maximum is None:
                skipped.append(f"{group.value.name}: no activation statistics (not computed by ORT)")
                continue
            x_range = np.maximum(np.abs(ch.minimum), np.abs(ch.maximum))
            w_range = np.max([_row_ranges(n) for n in group.consumers], axis=0)
            if x_range.size != w_range.size:
                skipped.append(f"{group.value.name}: {x_range.size} activation channels but {w_range.size} weight rows")
                continue
            alpha = self.alpha if self.alphas is None else self.alphas[group.value.name]
            s = smoothing_factors(x_range, w_range, alpha)
            where = _absorb(model, group, s, names, insert_mul=self.insert_mul)
            if where is None:
                skipped.append(f"{group.value.name}: its producer cannot absorb the scale and insert_mul is off")
                continue
            for node in group.consumers:
                _scale_rows(node, s, names)
            new_x = x_range / s
            records.append({
                "input": group.value.name, "alpha": alpha, "consumers": [_name(n) for n in group.consumers], "where": where,
                "channels": int(s.size), "activation_spread": [_spread(x_range), _spread(new_x)],
                "activation_max": [float(x_range.max()), float(new_x.max())],
                "factor_range": [float(s.min()), float(s.max())],
            })
            changes.append(f"{group.value.name} -> {', '.join(_name(n) for n in group.consumers)}: {where}; "
                           f"activation channel range spread {_spread(x_range):.3g} -> {_spread(new_x):.3g}")
        details = {"alpha": self.alpha, "samples": stats.samples, "inputs": records}
        return self.result(model, changes=changes, skipped=skipped, details=details, modified=bool(records))


def smoothing_factors(x_range: np.ndarray, w_range: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), 1 where either range is (nearly) zero, clamped."""
    x = np.asarray(x_range, dtype=np.float64)
    w = np.asarray(w_range, dtype=np.float64)
    live = (x > MIN_RANGE) & (w > MIN_RANGE)
    s = np.ones_like(x)
    s[live] = x[live] ** alpha / w[live] ** (1.0 - alpha)
    return np.clip(s, 1.0 / MAX_FACTOR, MAX_FACTOR)


# ---------------------------------------------------------------------------- finding inputs


def find_groups(model: ir.Model) -> tuple[list[_Group], list[str]]:
    """Every activation read by MatMul/Gemm nodes with constant 2-D weights, with those nodes."""
    by_value: dict[int, _Group] = {}
    skipped: list[str] = []
    for node in model.graph:
        if node.op_type not in DENSE or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if x is None or w is None or x.const_value is not None:
            continue
        reason = _consumer_reason(node)
        if reason:
            skipped.append(f"{_name(node)}: {reason}")
            continue
        group = by_value.setdefault(id(x), _Group(x, []))
        group.consumers.append(node)
    groups = list(by_value.values())
    kept = []
    for g in groups:
        sizes = {_row_ranges(n).size for n in g.consumers}
        if len(sizes) != 1:
            skipped.append(f"{g.value.name}: its consumers' weights disagree on the input width")
        else:
            kept.append(g)
    return kept, skipped


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input()


def _consumer_reason(node: ir.Node) -> str | None:
    w = node.inputs[1]
    if not _is_constant(w):
        return "weight is not a constant"
    if len(w.const_value.shape) != 2:
        return "weight is not a matrix"
    if not np.issubdtype(w.const_value.numpy().dtype, np.floating):
        return "weight is not floating point"
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return "Gemm transposes its input (transA)"
    return None


def _row_axis(node: ir.Node) -> int:
    """The weight axis indexed by the input channel: rows of MatMul's [K, N], columns of Gemm's transB [N, K]."""
    return 1 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 0


def _row_ranges(node: ir.Node) -> np.ndarray:
    w = np.abs(node.inputs[1].const_value.numpy().astype(np.float64))
    return w.max(axis=1 - _row_axis(node))


# ---------------------------------------------------------------------------- rewriting


class _NameSource:
    """Unique value names for new initializers and the inserted Mul."""

    def __init__(self, model: ir.Model) -> None:
        self.taken = {v.name for n in model.graph for v in (*n.inputs, *n.outputs) if v is not None}
        self.taken |= {v.name for v in model.graph.inputs} | set(model.graph.initializers)
        self.graph = model.graph

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def constant(self, base: str, array: np.ndarray) -> ir.Value:
        name = self.fresh(base)
        value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        self.graph.register_initializer(value)
        return value


def _set_input(node: ir.Node, index: int, array: np.ndarray, names: _NameSource) -> None:
    """Give `node` input `index` the new constant `array`: in place when only this node reads it,
    else as a fresh initializer (other readers keep the old values)."""
    value = node.inputs[index]
    dtype = value.const_value.numpy().dtype
    array = np.ascontiguousarray(array.astype(dtype))
    if len(value.uses()) == 1 and not value.is_graph_output():
        value.const_value = ir.tensor(array, name=value.name)
    else:
        node.replace_input_with(index, names.constant(f"{value.name}_smoothed", array))


def _scale_rows(node: ir.Node, s: np.ndarray, names: _NameSource) -> None:
    w = node.inputs[1].const_value.numpy().astype(np.float64)
    shape = (-1, 1) if _row_axis(node) == 0 else (1, -1)
    _set_input(node, 1, w * s.reshape(shape), names)


def _scale_columns(node: ir.Node, index: int, s: np.ndarray, names: _NameSource, axis: int) -> None:
    """Divide output channel j of a producer's constant input `index` (along `axis`) by s_j."""
    w = node.inputs[index].const_value.numpy().astype(np.float64)
    shape = [1] * w.ndim
    shape[axis] = -1
    _set_input(node, index, w / s.reshape(shape), names)


def _absorb(model: ir.Model, group: _Group, s: np.ndarray, names: _NameSource, *, insert_mul: bool) -> str | None:
    """Divide X by s: inside its producer when it can, else with an inserted Mul; how, or None."""
    x = group.value
    consumers = {id(n) for n in group.consumers}
    only_smoothed = not x.is_graph_output() and all(id(u.node) in consumers for u in x.uses())
    producer = x.producer()
    if only_smoothed and producer is not None:
        how = _fold_into(producer, x, s, names)
        if how:
            return how
    if not insert_mul:
        return None
    inv = names.constant(f"{x.name}_smooth_scale", (1.0 / s).astype(np.float32))
    out = ir.Value(name=names.fresh(f"{x.name}_smoothed"), shape=x.shape, type=x.type)
    mul = ir.node("Mul", [x, inv], outputs=[out], name=names.fresh(f"{x.name}_SmoothMul"))
    order = {id(n): i for i, n in enumerate(model.graph)}
    first = min(group.consumers, key=lambda n: order[id(n)])
    model.graph.insert_before(first, mul)
    for node in group.consumers:
        node.replace_input_with(0, out)
    if producer is None:
        why = "the input is a graph input"
    elif not only_smoothed:
        why = f"{x.name} also feeds other nodes"
    else:
        why = f"{producer.op_type} {_name(producer)} cannot absorb it"
    return f"per-channel Mul inserted ({why})"


def _fold_into(producer: ir.Node, x: ir.Value, s: np.ndarray, names: _NameSource) -> str | None:
    """Scale the producer's output channels by 1/s; a description, or None when it cannot."""
    op = producer.op_type if producer.domain in ("", "ai.onnx") else None
    k = s.size
    if op == "LayerNormalization" and producer.outputs[0] is x:
        axis = producer.attributes.get_int("axis", -1)
        rank = len(x.shape) if x.shape is not None else None
        params = [i for i in (1, 2) if i < len(producer.inputs) and producer.inputs[i] is not None]
        if (axis == -1 or (rank is not None and axis == rank - 1)) and all(
                _is_constant(producer.inputs[i]) and producer.inputs[i].const_value.shape.dims == (k,) for i in params):
            for i in params:
                _scale_columns(producer, i, s, names, axis=0)
            return f"folded into LayerNormalization {_name(producer)}"
        return None
    if op == "Gemm" and _dense_weight_ok(producer, k):
        c = producer.inputs[2] if len(producer.inputs) > 2 else None
        if c is not None and not (_is_constant(c) and c.const_value.shape.dims in ((k,), (1, k))):
            return None  # a bias that broadcasts another way (scalar, [M, N]) would need rewriting
        _scale_columns(producer, 1, s, names, axis=0 if producer.attributes.get_int("transB", 0) else 1)
        if c is not None:
            _scale_columns(producer, 2, s, names, axis=len(c.const_value.shape) - 1)
        return f"folded into Gemm {_name(producer)}"
    if op == "MatMul" and _dense_weight_ok(producer, k):
        _scale_columns(producer, 1, s, names, axis=1)
        return f"folded into MatMul {_name(producer)}"
    if op == "Mul":  # x * c with a constant c (the 0.5 closing a GELU): c becomes c / s per channel
        for c_slot in (0, 1):
            c = producer.inputs[c_slot]
            if _is_constant(c) and c.const_value.shape.dims in ((), (1,), (k,)):
                base = c.const_value.numpy().astype(np.float64).reshape(-1)
                array = (np.broadcast_to(base, (k,)) / s).astype(c.const_value.numpy().dtype)
                # a new value: the old one may be shared, and its declared shape is the scalar's
                producer.replace_input_with(c_slot, names.constant(f"{c.name}_smoothed", array))
                return f"folded into the constant of Mul {_name(producer)}"
        return None
    if op == "Add":
        for bias_slot in (0, 1):
            bias, other = producer.inputs[bias_slot], producer.inputs[1 - bias_slot]
            mm = other.producer() if other is not None else None
            if (_is_constant(bias) and bias.const_value.shape.dims[-1:] == (k,)
                    and all(d == 1 for d in bias.const_value.shape.dims[:-1])
                    and mm is not None and mm.op_type == "MatMul" and mm.domain in ("", "ai.onnx")
                    and len(other.uses()) == 1 and not other.is_graph_output() and _dense_weight_ok(mm, k)):
                _scale_columns(mm, 1, s, names, axis=1)
                _scale_columns(producer, bias_slot, s, names, axis=len(bias.const_value.shape) - 1)
                return f"folded into MatMul {_name(mm)} and its bias Add {_name(producer)}"
    return None


def _dense_weight_ok(node: ir.Node, k: int) -> bool:
    """A MatMul/Gemm producer whose constant 2-D weight has k output channels."""
    if len(node.inputs) < 2 or not _is_constant(node.inputs[1]) or len(node.inputs[1].const_value.shape) != 2:
        return False
    if node.op_type == "MatMul" and (node.inputs[0] is None or node.inputs[0].const_value is not None):
        return False
    dims = node.inputs[1].const_value.shape.dims
    n = dims[0] if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else dims[1]
    return n == k


def _name(node: ir.Node) -> str:
    return node.name or node.op_type


def _spread(ranges: np.ndarray) -> float:
    live = ranges[ranges > MIN_RANGE]
    return float(live.max() / live.min()) if live.size else 1.0


__all__ = ["SmoothCalibrationError", "SmoothQuant", "find_groups", "smoothing_factors"]

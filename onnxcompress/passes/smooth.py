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

Conv inputs (`convs`, or named in `alphas`): the same per channel of axis 1 (NCHW), the consumer's
weight [O, C/g, k...] scaled on input channel j (block j // (C/g), row j % (C/g): for a depthwise
Conv the input channel is the output channel); zero padding stays exact (0 / s = 0). CNNs after
BatchNorm folding have the problem on their own: PP-PicoDet's stem output has channels whose
range is 0.1 next to channels of 30, read by depthwise weights up to 70. `conv_route` picks where
1/s goes, the first that applies:
- a producing Conv (nothing between): its output channels, free;
- through a gating Mul, X = Mul(a, g) [then * or / a constant], a a Conv output: hardswish
  (a * clip(a + 3, 0, 6) / 6) and SiLU (a * sigmoid(a)). (a / s) * g = X / s whatever g is, so a's
  Conv takes 1/s; g's branch must still see a, and gets s * (a / s) from a per-channel 1x1 Conv
  that replaces hardswish's `+ 3` Add (free: the quantizer runs it in int8 and fuses the Clip after
  it; the Add ran in float before) or is inserted before the branch (SiLU). This route also evens
  out a and the gating Mul's output, which int8 quantizes too (layout detector, every hardswish
  input smoothed, 4 evaluation pages: 1.2 dB minimum output SQNR folding 1/s into the `/ 6`,
  11.8 dB through the gate);
- a constant Mul or Div (c becomes c / s or c * s per channel);
- else an inserted per-channel Mul (as above; after a ReLU6 it breaks the int8 chain of Convs).

Exact in float (up to rounding): the pipeline verifies it like any exact pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from ..analysis.activations import collect
from ..errors import OnnxCompressError
from ..names import NameAllocator
from ..pipeline import Pass, PassContext, PassResult, cost_analysis, option

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
    """One activation X and the nodes that contract over its channels with constant weights: MatMul/Gemm
    over its last axis (`rank` None), or Conv over axis 1 (`rank` = the Conv weight's rank = X's)."""

    value: ir.Value
    consumers: list[ir.Node]
    rank: int | None = None

    @property
    def axis(self) -> int:
        return -1 if self.rank is None else 1


@dataclass
class SmoothQuant(Pass):
    """Per-channel activation/weight rebalancing for MatMul/Gemm (and Conv) inputs (exact in float)."""

    name: ClassVar[str] = "smooth-quant"
    exact: ClassVar[bool] = True

    alpha: float = option(0.5, "Migration strength: 0 keeps the activation as is, 1 moves all its range into W.")
    samples: int | None = option(None, "Calibration samples for the activation ranges (None: all given).")
    insert_mul: bool = option(True, "Where the producer cannot absorb 1/s, insert a per-channel Mul.")
    convs: bool = option(False, "With `alpha`, smooth Conv inputs too (named inputs in `alphas` are smoothed whatever reads them).")
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
        elif not self.convs:
            groups = [g for g in groups if g.rank is None]
        if not groups:
            return self.result(model, changes=[], skipped=skipped, details={"alpha": self.alpha, "inputs": []},
                               preserved=frozenset({cost_analysis}))
        axes = {g.value.name: g.axis for g in groups}
        stats = collect(model, axes, ctx.calibration, limit=self.samples, statistics=ctx.statistics)
        names = _NameSource(model)
        changes, records = [], []
        for group in groups:
            ch = stats.values.get(group.value.name)
            if ch is None or ch.maximum is None:
                skipped.append(f"{group.value.name}: no activation statistics (not computed by ORT)")
                continue
            x_range = np.maximum(np.abs(ch.minimum), np.abs(ch.maximum))
            w_range = weight_ranges(group)
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
    """Every activation read by MatMul/Gemm nodes with constant 2-D weights, or by Conv nodes with
    constant weights, with those nodes."""
    by_value: dict[int, _Group] = {}
    skipped: list[str] = []
    for node in model.graph:
        if node.op_type not in DENSE | {"Conv"} or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if x is None or w is None or x.const_value is not None:
            continue
        reason = _consumer_reason(node)
        if reason:
            skipped.append(f"{_name(node)}: {reason}")
            continue
        rank = len(w.const_value.shape) if node.op_type == "Conv" else None
        group = by_value.setdefault(id(x), _Group(x, [], rank))
        if group.rank != rank:
            group.rank = -1  # read by a Conv and by a MatMul/Gemm (or Convs of other ranks)
        group.consumers.append(node)
    kept = []
    for g in by_value.values():
        sizes = {_row_ranges(n).size for n in g.consumers}
        if g.rank == -1:
            skipped.append(f"{g.value.name}: read by consumers that contract over different axes")
        elif len(sizes) != 1:
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
    if node.op_type == "Conv" and len(w.const_value.shape) < 3:
        return "weight has no spatial axes"
    if node.op_type != "Conv" and len(w.const_value.shape) != 2:
        return "weight is not a matrix"
    if not np.issubdtype(w.const_value.numpy().dtype, np.floating):
        return "weight is not floating point"
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return "Gemm transposes its input (transA)"
    return None


def _row_axis(node: ir.Node) -> int:
    """The weight axis indexed by the input channel: rows of MatMul's [K, N], columns of Gemm's transB [N, K]."""
    return 1 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 0


def _conv_blocks(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """A Conv weight [O, C/g, k...] as [g, O/g, C/g, k]: input channel j is block j // (C/g), row j % (C/g)."""
    g = node.attributes.get_int("group", 1)
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1)


def _row_ranges(node: ir.Node) -> np.ndarray:
    """max |W| over everything that multiplies input channel j, per j."""
    w = np.abs(node.inputs[1].const_value.numpy().astype(np.float64))
    if node.op_type == "Conv":
        return _conv_blocks(node, w).max(axis=(1, 3)).reshape(-1)
    return w.max(axis=1 - _row_axis(node))


def weight_ranges(group: _Group) -> np.ndarray:
    """Per input channel of the group's activation, the largest |weight| any consumer applies to it."""
    return np.max([_row_ranges(n) for n in group.consumers], axis=0)


# ---------------------------------------------------------------------------- rewriting


class _NameSource(NameAllocator):
    """Unique value names for new initializers and the inserted Mul."""

    def __init__(self, model: ir.Model) -> None:
        super().__init__(model)
        self.graph = model.graph

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
    if node.op_type == "Conv":
        blocks = _conv_blocks(node, w)
        _set_input(node, 1, (blocks * s.reshape(blocks.shape[0], 1, -1, 1)).reshape(w.shape), names)
        return
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
    if group.rank is not None:
        route = conv_route(model, group, names, insert_mul=insert_mul)
        if route is None:
            return None
        route.apply(s)
        return route.how
    x = group.value
    only_smoothed = _only_smoothed(group)
    producer = x.producer()
    if only_smoothed and producer is not None:
        how = _fold_into(producer, x, s, names)
        if how:
            return how
    if not insert_mul:
        return None
    _insert_mul(model, group, s, names)
    return f"per-channel Mul inserted ({_why_mul(group)})"


def _only_smoothed(group: _Group) -> bool:
    consumers = {id(n) for n in group.consumers}
    return not group.value.is_graph_output() and all(id(u.node) in consumers for u in group.value.uses())


def _why_mul(group: _Group) -> str:
    producer = group.value.producer()
    if producer is None:
        return "the input is a graph input"
    if not _only_smoothed(group):
        return f"{group.value.name} also feeds other nodes"
    return f"{producer.op_type} {_name(producer)} cannot absorb it"


def _channel_shape(k: int, rank: int | None) -> tuple[int, ...]:
    """Shape of a per-channel constant: [k] on the last axis (rank None), else [k, 1, ...] for axis 1 of `rank` axes."""
    return (k,) if rank is None else (k,) + (1,) * (rank - 2)


def _insert_mul(model: ir.Model, group: _Group, s: np.ndarray, names: _NameSource) -> None:
    x = group.value
    inv = names.constant(f"{x.name}_smooth_scale", (1.0 / s).reshape(_channel_shape(s.size, group.rank)).astype(np.float32))
    out = ir.Value(name=names.fresh(f"{x.name}_smoothed"), shape=x.shape, type=x.type)
    mul = ir.node("Mul", [x, inv], outputs=[out], name=names.fresh(f"{x.name}_SmoothMul"))
    order = {id(n): i for i, n in enumerate(model.graph)}
    first = min(group.consumers, key=lambda n: order[id(n)])
    model.graph.insert_before(first, mul)
    for node in group.consumers:
        node.replace_input_with(0, out)


# ---------------------------------------------------------------------------- Conv inputs


@dataclass
class Route:
    """Where a Conv input's 1/s goes, decided before anything changes (int8_patterns models its int8 error)."""

    how: str
    inserts: bool  # adds a node that runs at inference (a float Mul, or a 1x1 Conv that does not replace an Add)
    apply: Callable[[np.ndarray], None]
    # X = gate * g * factor (a gating Mul, then a constant): the Conv output `gate` is divided by s too
    gate: ir.Value | None = None
    factor: np.ndarray | None = None  # per channel


def conv_route(model: ir.Model, group: _Group, names: _NameSource | None = None, *, insert_mul: bool = True) -> Route | None:
    """The first that applies: into a producing Conv; through a gating Mul (hardswish, SiLU) into the
    Conv it gates; into a constant Mul/Div; an inserted per-channel Mul (if `insert_mul`)."""
    names = names or _NameSource(model)
    x, rank = group.value, group.rank
    k = weight_ranges(group).size
    producer = x.producer()
    if _only_smoothed(group) and producer is not None:
        if _op(producer) == "Conv" and producer.outputs[0] is x and _conv_output_ok(producer, k, rank):
            return Route(f"folded into Conv {_name(producer)}", False, lambda s: _scale_conv_outputs(producer, s, names))
        gate = _gate_route(producer, k, rank, names)
        constant = _constant_route(producer, k, rank, names)
        if gate is not None and (not gate.inserts or (insert_mul and constant is None)):
            return gate
        if constant is not None:
            return constant
    if not insert_mul:
        return None
    return Route(f"per-channel Mul inserted ({_why_mul(group)})", True, lambda s: _insert_mul(model, group, s, names))


def _op(node: ir.Node | None) -> str | None:
    return node.op_type if node is not None and node.domain in ("", "ai.onnx") else None


def _per_channel(value: ir.Value | None, k: int, rank: int) -> np.ndarray | None:
    """A constant that broadcasts against [N, k, ...] (rank axes) per channel or as a scalar: as [k] floats."""
    if not _is_constant(value):
        return None
    array = value.const_value.numpy()
    dims = (1,) * (rank - array.ndim) + tuple(array.shape)
    if not np.issubdtype(array.dtype, np.floating) or len(dims) != rank or any(
            d != 1 for i, d in enumerate(dims) if i != 1) or dims[1] not in (1, k):
        return None
    return np.broadcast_to(array.astype(np.float64).reshape(-1), (k,)).copy()


def _conv_output_ok(conv: ir.Node, k: int, rank: int) -> bool:
    """A Conv with constant float weights of k output channels (and `rank` axes) and a [k] bias or none."""
    w = conv.inputs[1] if len(conv.inputs) > 1 else None
    b = conv.inputs[2] if len(conv.inputs) > 2 else None
    return (_is_constant(w) and len(w.const_value.shape) == rank and w.const_value.shape.dims[0] == k
            and np.issubdtype(w.const_value.numpy().dtype, np.floating)
            and (b is None or (_is_constant(b) and b.const_value.shape.dims == (k,))))


def _scale_conv_outputs(conv: ir.Node, s: np.ndarray, names: _NameSource) -> None:
    _scale_columns(conv, 1, s, names, axis=0)
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        _scale_columns(conv, 2, s, names, axis=0)


def _constant_route(producer: ir.Node, k: int, rank: int, names: _NameSource) -> Route | None:
    """X = v * c or v / c with a constant c (hardswish's closing / 6): c becomes c / s or c * s per channel."""
    op = _op(producer)
    slots = (0, 1) if op == "Mul" else (1,) if op == "Div" else ()
    for slot in slots:
        c = _per_channel(producer.inputs[slot], k, rank)
        if c is None or _is_constant(producer.inputs[1 - slot]):
            continue

        def apply(s: np.ndarray, slot: int = slot, c: np.ndarray = c) -> None:
            old = producer.inputs[slot]
            array = (c * s if op == "Div" else c / s).reshape(_channel_shape(k, rank))
            # a new value: the old one may be shared, and its declared shape is the scalar's
            producer.replace_input_with(slot, names.constant(f"{old.name}_smoothed", array.astype(old.const_value.numpy().dtype)))

        return Route(f"folded into the constant of {op} {_name(producer)}", False, apply)
    return None


def _gate_route(producer: ir.Node, k: int, rank: int, names: _NameSource) -> Route | None:
    """X = Mul(a, g) [then * or / a constant], a the output of a Conv: (a / s) * g = X / s whatever g
    is, so a's Conv takes 1/s on its output channels and every other reader of a (g's branch: the
    `+ 3` of a hardswish, the Sigmoid of a SiLU; at most one, not a Conv/MatMul/Gemm) reads s * (a / s)
    from a per-channel 1x1 Conv, which replaces the reader when it is an Add of a constant (a free
    rewrite: the quantizer runs it in int8 and fuses the Clip after it) and is inserted otherwise."""
    node, factor = producer, np.ones(k)
    if _op(node) in ("Mul", "Div"):
        slot = next((i for i in ((0, 1) if _op(node) == "Mul" else (1,)) if _per_channel(node.inputs[i], k, rank) is not None), None)
        if slot is not None:
            c = _per_channel(node.inputs[slot], k, rank)
            factor = 1.0 / c if _op(node) == "Div" else c
            v = node.inputs[1 - slot]
            if v is None or len(v.uses()) != 1 or v.is_graph_output():
                return None
            node = v.producer()
    if _op(node) != "Mul" or len(node.inputs) != 2 or any(i is None or _is_constant(i) for i in node.inputs):
        return None
    for slot in (0, 1):
        a, other = node.inputs[slot], node.inputs[1 - slot]
        conv = a.producer()
        if a is other or a.is_graph_output() or _op(conv) != "Conv" or not _conv_output_ok(conv, k, rank):
            continue
        rest = [u.node for u in a.uses() if u.node is not node]
        if len(rest) > 1 or any(_op(r) in DENSE | {"Conv"} for r in rest):
            continue
        add = rest[0] if rest and _op(rest[0]) == "Add" and not rest[0].outputs[0].is_graph_output() else None
        bias = None
        if add is not None:
            bias = _per_channel(add.inputs[1] if add.inputs[0] is a else add.inputs[0], k, rank)
        how = f"folded into Conv {_name(conv)} through the gating Mul {_name(node)}"
        if rest:
            how += (f"; Add {_name(add)} of its other branch became a per-channel 1x1 Conv" if bias is not None else
                    f"; a per-channel 1x1 Conv inserted before {rest[0].op_type} {_name(rest[0])} of its other branch")

        def apply(s: np.ndarray, conv: ir.Node = conv, a: ir.Value = a, rest: list = rest, add=add, bias=bias) -> None:
            _scale_conv_outputs(conv, s, names)
            if not rest:
                return
            shape = (k, 1) + (1,) * (rank - 2)
            w = names.constant(f"{a.name}_restore_w", s.reshape(shape).astype(np.float32))
            b = names.constant(f"{a.name}_restore_b", (np.zeros(k) if bias is None else bias).astype(np.float32))
            out = ir.Value(name=names.fresh(f"{a.name}_restored"), shape=a.shape, type=a.type)
            restore = ir.node("Conv", [a, w, b], outputs=[out], name=names.fresh(f"{a.name}_RestoreConv"),
                              attributes={"group": k, "kernel_shape": [1] * (rank - 2)})
            conv.graph.insert_after(conv, restore)
            if bias is not None:  # the Add of the constant is now the restoring Conv's bias
                add.outputs[0].replace_all_uses_with(out)
                conv.graph.remove(add, safe=True)
            else:
                for use in list(a.uses()):
                    if use.node is rest[0]:
                        rest[0].replace_input_with(use.idx, out)

        return Route(how, bool(rest) and bias is None, apply, gate=a, factor=factor)
    return None


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


__all__ = ["Route", "SmoothCalibrationError", "SmoothQuant", "conv_route", "find_groups", "smoothing_factors", "weight_ranges"]

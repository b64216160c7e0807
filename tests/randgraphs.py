"""Random but valid ONNX graphs for property tests (hypothesis strategies, onnx.helper, opset 17).

Every structural choice (block kinds, channel counts, kernel sizes, the weight seed) is drawn by
hypothesis under a readable key and recorded, so a failing example shrinks well and prints as a
dict that rebuilds the same model exactly: `build_cnn(choices)` / `build_transformer(choices)`.
Weights come from a numpy generator seeded by a drawn seed. Shapes are tracked while building, so
graphs are valid by construction; each one is still run through the full onnx checker.

Two families:
- CNN: a stem Conv, then blocks (Conv, residual Add, Concat branches, Split/Concat, depthwise and
  grouped Conv, channel shuffle, SE, BatchNorm, per-channel Mul/Add, pooling, Resize, Pad,
  ConvTranspose, LRN), then a head (GAP -> Flatten -> Gemm, Flatten -> Gemm, or a 1x1 Conv).
- transformer: an input projection, layers of multi-head attention and an MLP with residual Adds
  and optional LayerNormalization, and an output projection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
#: Ops the channel analysis must treat as blockers: a class feeding one is never prunable.
BLOCKER_OPS = ("LRN", "LayerNormalization")

CNN_BLOCKS = (
    "conv", "residual", "projection", "concat", "split", "depthwise", "grouped", "shuffle", "se",
    "batchnorm", "affine", "pool", "resize", "pad", "convtranspose", "lrn",
)
CNN_HEADS = ("gap_gemm", "flatten_gemm", "conv")
#: Stands for the batch size in shape constants until the batch is drawn (replaced when built).
_BATCH_PLACEHOLDER = -(2**40)


@dataclass(frozen=True)
class Blocker:
    """A blocker node and the activation it reads (whose channels it must freeze)."""

    op_type: str
    node: str
    input: str


@dataclass
class RandomGraph:
    """A generated model and the choices that rebuild it (printed when a property fails)."""

    family: str
    choices: dict[str, Any]
    model: onnx.ModelProto = field(repr=False)
    input_shapes: dict[str, tuple[int, ...]] = field(repr=False)
    blockers: tuple[Blocker, ...] = field(repr=False)

    def __repr__(self) -> str:
        return f"build_{self.family}({self.choices!r})"

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # hypothesis prints examples with this
        printer.text(repr(self))


# ------------------------------------------------------------------------------ choices


class _Choices:
    """Where structural choices come from: hypothesis draws (recorded) or a recorded dict (replay)."""

    def __init__(self, draw: Callable[[st.SearchStrategy], Any] | None, recorded: Mapping[str, Any] | None = None):
        self.draw = draw
        self.values: dict[str, Any] = dict(recorded or {})
        self.prefix = ""

    def __call__(self, key: str, strategy: st.SearchStrategy) -> Any:
        key = self.prefix + key
        if self.draw is None:
            return self.values[key]
        if key in self.values:
            raise KeyError(f"choice '{key}' drawn twice: replay would be ambiguous")
        value = self.draw(strategy)
        self.values[key] = value
        return value


# ------------------------------------------------------------------------------ graph building


@dataclass
class Tensor:
    """An NCHW activation being built: its name, channels and spatial size."""

    name: str
    c: int
    h: int
    w: int


class _Builder:
    """Accumulates nodes and initializers with unique names; weights from a seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.blockers: list[Blocker] = []
        self._count = 0

    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        name = self.fresh(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, shape: tuple[int, ...], fan_in: int) -> str:
        # Variance-preserving scale keeps activations O(1) through a stack of blocks.
        return self.const("w", self.rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), shape).astype(np.float32))

    def vector(self, prefix: str, shape: tuple[int, ...], low: float = -0.5, high: float = 0.5) -> str:
        return self.const(prefix, self.rng.uniform(low, high, shape).astype(np.float32))

    def ints(self, prefix: str, values) -> str:
        return self.const(prefix, np.asarray(values, dtype=np.int64))

    def node(self, op: str, inputs: list[str], n_outputs: int = 1, **attrs) -> list[str]:
        name = self.fresh(op.lower())
        outputs = [f"{name}_out{k}" if n_outputs > 1 else f"{name}_out" for k in range(n_outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        if op in BLOCKER_OPS:
            self.blockers.append(Blocker(op, name, inputs[0]))
        return outputs

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "random", inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        onnx.checker.check_model(model, full_check=True)  # a generator bug fails loudly, never filtered
        return model


# ------------------------------------------------------------------------------ CNN blocks


def _conv(b: _Builder, t: Tensor, c_out: int, k: int = 1, *, bias: bool = True, group: int = 1,
          stride: int = 1) -> Tensor:
    pad = k // 2
    inputs = [t.name, b.weight((c_out, t.c // group, k, k), t.c // group * k * k)]
    if bias:
        inputs.append(b.vector("b", (c_out,)))
    (out,) = b.node("Conv", inputs, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride], group=group)
    h, w = (t.h + 2 * pad - k) // stride + 1, (t.w + 2 * pad - k) // stride + 1
    return Tensor(out, c_out, h, w)


def _relu(b: _Builder, t: Tensor) -> Tensor:
    return Tensor(b.node("Relu", [t.name])[0], t.c, t.h, t.w)


def _channels(lo: int = 4, hi: int = 16) -> st.SearchStrategy[int]:
    return st.integers(lo, hi)


def _block_conv(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    out = _conv(b, t, pick("c", _channels()), pick("k", st.sampled_from([1, 3])), bias=pick("bias", st.booleans()))
    act = pick("act", st.sampled_from(["relu", "none", "sigmoid", "leakyrelu"]))
    if act == "relu":
        return _relu(b, out)
    if act == "sigmoid":
        return Tensor(b.node("Sigmoid", [out.name])[0], out.c, out.h, out.w)
    if act == "leakyrelu":
        return Tensor(b.node("LeakyRelu", [out.name], alpha=0.1)[0], out.c, out.h, out.w)
    return out


def _block_residual(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    """ResNet basic block with an identity shortcut: x + conv(relu(conv(x)))."""
    y = _conv(b, _relu(b, _conv(b, t, t.c, 3)), t.c, 3, bias=pick("bias", st.booleans()))
    operands = [t.name, y.name] if pick("x_first", st.booleans()) else [y.name, t.name]
    out = Tensor(b.node("Add", operands)[0], t.c, t.h, t.w)
    return _relu(b, out) if pick("relu", st.booleans()) else out


def _block_projection(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    """ResNet block with a 1x1 projection shortcut to a new width."""
    c = pick("c", _channels())
    y = _conv(b, _relu(b, _conv(b, t, c, 3)), c, 3)
    shortcut = _conv(b, t, c, 1, bias=pick("bias", st.booleans()))
    return _relu(b, Tensor(b.node("Add", [y.name, shortcut.name])[0], c, t.h, t.w))


def _block_concat(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    """Inception-style branches concatenated on channels, optionally with the input (DenseNet)."""
    dense = pick("dense", st.booleans())
    n = pick("branches", st.integers(1 if dense else 2, 3))
    parts = [t] if dense else []
    for i in range(n):
        kind = pick(f"branch{i}", st.sampled_from(["1x1", "3x3", "pool_1x1"]))
        c = pick(f"c{i}", st.integers(2, 8))
        src = t
        if kind == "pool_1x1":
            (pooled,) = b.node("MaxPool", [t.name], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
            src = Tensor(pooled, t.c, t.h, t.w)
        parts.append(_relu(b, _conv(b, src, c, 3 if kind == "3x3" else 1)))
    if not dense:
        parts = [parts[i] for i in pick("order", st.permutations(range(n)))]
    (out,) = b.node("Concat", [p.name for p in parts], axis=1)
    return Tensor(out, sum(p.c for p in parts), t.h, t.w)


def _unequal_sizes(total: int, parts: int) -> st.SearchStrategy[list[int]]:
    """Positive sizes summing to `total`, not all equal: the Split offsets matter."""

    def unequal(cuts: list[int]) -> list[int]:
        sizes = np.diff([0, *sorted(cuts), total]).tolist()
        if len(set(sizes)) == 1:  # equal parts are at least 2 wide: move one channel
            sizes[0], sizes[-1] = sizes[0] + 1, sizes[-1] - 1
        return sizes

    cuts = st.lists(st.integers(1, total - 1), min_size=parts - 1, max_size=parts - 1, unique=True)
    return cuts.map(unequal)


def _block_split(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    """YOLO C2f style: Split on channels into unequal parts, per-branch convs, Concat (+ 1x1 fuse)."""
    parts = pick("parts", st.integers(2, 3))
    if t.c < 2 * parts:  # too narrow for unequal parts: widen first
        t = _relu(b, _conv(b, t, pick("widen", st.integers(2 * parts, 12)), 1))
    sizes = pick("sizes", _unequal_sizes(t.c, parts))
    pieces = b.node("Split", [t.name, b.ints("split", sizes)], n_outputs=parts, axis=1)
    branches = []
    for i, (name, size) in enumerate(zip(pieces, sizes)):
        part = Tensor(name, size, t.h, t.w)
        if pick(f"conv{i}", st.booleans()):
            part = _relu(b, _conv(b, part, pick(f"c{i}", st.integers(2, 8)), 3))
        branches.append(part)
    if pick("bottleneck", st.booleans()):  # C2f appends a conv of the last branch
        branches.append(_relu(b, _conv(b, branches[-1], branches[-1].c, 3)))
    (out,) = b.node("Concat", [p.name for p in branches], axis=1)
    out_t = Tensor(out, sum(p.c for p in branches), t.h, t.w)
    if pick("fuse", st.booleans()):
        out_t = _relu(b, _conv(b, out_t, pick("fuse_c", _channels()), 1))
    return out_t


def _block_depthwise(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    """Depthwise Conv (group == channels), channel multiplier 1 or 2, then a pointwise Conv."""
    multiplier = pick("multiplier", st.sampled_from([1, 2])) if t.c <= 12 else 1
    out = _conv(b, t, t.c * multiplier, 3, group=t.c, bias=pick("bias", st.booleans()))
    out = _relu(b, out)
    if pick("pointwise", st.booleans()):
        out = _relu(b, _conv(b, out, pick("c", _channels()), 1))
    return out


def _block_grouped(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    """Grouped Conv, groups 2 or 4, in both regimes: groups >= input channels per group ("wide"),
    groups < input channels per group ("narrow"). A 1x1 Conv first when the width does not fit."""
    groups = pick("groups", st.sampled_from([2, 4]))
    wide = pick("regime", st.sampled_from(["wide", "narrow"])) == "wide"
    per_group = t.c // groups if t.c % groups == 0 else 0
    if per_group < 2 or (groups >= per_group) != wide:
        # narrow with 4 groups needs 5 per group: 20 channels, the one width above 16 here
        lo, hi = (2, groups) if wide else (groups + 1, groups + 1 if groups == 4 else groups + 3)
        per_group = pick("in_per_group", st.integers(lo, hi))
        t = _relu(b, _conv(b, t, groups * per_group, 1))
    out_per_group = pick("out_per_group", st.integers(1, 4))
    k = pick("k", st.sampled_from([1, 3]))
    return _relu(b, _conv(b, t, groups * out_per_group, k, group=groups, bias=pick("bias", st.booleans())))


def _block_shuffle(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    """ShuffleNet channel shuffle: Reshape [N,g,C/g,H,W] -> Transpose(0,2,1,3,4) -> Reshape [N,C,H,W]."""
    groups = pick("groups", st.integers(2, 4))
    if t.c % groups:
        t = _relu(b, _conv(b, t, groups * pick("per_group", st.integers(1, 4)), 1))
    n = pick("batch_entry", st.sampled_from(["n", "-1", "0"]))
    batch = {"n": _BATCH_PLACEHOLDER, "-1": -1, "0": 0}[n]
    (split,) = b.node("Reshape", [t.name, b.ints("shape", [batch, groups, t.c // groups, t.h, t.w])])
    (moved,) = b.node("Transpose", [split], perm=[0, 2, 1, 3, 4])
    (out,) = b.node("Reshape", [moved, b.ints("shape", [batch, t.c, t.h, t.w])])
    return Tensor(out, t.c, t.h, t.w)


def _block_se(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    """Squeeze-and-excitation: x * sigmoid(conv(relu(conv(GAP(x)))))."""
    (pooled,) = b.node("GlobalAveragePool", [t.name])
    squeeze = _relu(b, _conv(b, Tensor(pooled, t.c, 1, 1), pick("reduced", st.integers(2, 8)), 1))
    excite = _conv(b, squeeze, t.c, 1)
    (gate,) = b.node("Sigmoid", [excite.name])
    return Tensor(b.node("Mul", [t.name, gate] if pick("x_first", st.booleans()) else [gate, t.name])[0], t.c, t.h, t.w)


def _block_batchnorm(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    c = t.c
    (out,) = b.node("BatchNormalization", [
        t.name, b.vector("gamma", (c,), 0.5, 2.0), b.vector("beta", (c,)),
        b.vector("mean", (c,)), b.vector("var", (c,), 0.2, 3.0),
    ], epsilon=1e-5)
    return Tensor(out, c, t.h, t.w)


def _block_affine(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    """Per-channel constants ([C,1,1] or [1,C,1,1]) and a scalar, through Mul/Add/Sub/Div."""
    out = t
    for i in range(pick("ops", st.integers(1, 3))):
        op = pick(f"op{i}", st.sampled_from(["Mul", "Add", "Sub", "Div"]))
        layout = pick(f"shape{i}", st.sampled_from(["chw", "nchw", "scalar"]))
        shape = {"chw": (t.c, 1, 1), "nchw": (1, t.c, 1, 1), "scalar": ()}[layout]
        low, high = (0.5, 1.5) if op in ("Mul", "Div") else (-0.5, 0.5)
        const = b.vector(op.lower(), shape, low, high)
        inputs = [out.name, const] if op in ("Sub", "Div") or pick(f"x_first{i}", st.booleans()) else [const, out.name]
        out = Tensor(b.node(op, inputs)[0], t.c, t.h, t.w)
    return out


def _block_pool(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    kinds = ["max3", "avg3"] + (["max2", "avg2"] if min(t.h, t.w) >= 4 else [])
    kind = pick("pool", st.sampled_from(kinds))
    op = "MaxPool" if kind.startswith("max") else "AveragePool"
    if kind.endswith("2"):
        (out,) = b.node(op, [t.name], kernel_shape=[2, 2], strides=[2, 2])
        return Tensor(out, t.c, t.h // 2, t.w // 2)
    extra = {"count_include_pad": int(pick("count_pad", st.booleans()))} if op == "AveragePool" else {}
    (out,) = b.node(op, [t.name], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], **extra)
    return Tensor(out, t.c, t.h, t.w)


def _block_resize(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    """Nearest-neighbour resize by 2 (by 1/2 once the map is larger than 8, to stay small), given as
    scales or as sizes (sizes name the channel count, which pruning must update)."""
    scale = 2.0 if max(t.h, t.w) <= 8 else 0.5
    h, w = int(t.h * scale), int(t.w * scale)
    if pick("by", st.sampled_from(["scales", "sizes"])) == "scales":
        inputs = [t.name, "", b.const("scales", np.array([1, 1, scale, scale], np.float32))]
    else:
        inputs = [t.name, "", "", b.ints("sizes", [_BATCH_PLACEHOLDER, t.c, h, w])]
    (out,) = b.node("Resize", inputs, mode="nearest")
    return Tensor(out, t.c, h, w)


def _block_pad(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    """Pad on the spatial axes only, constant (zero or a value), reflect or edge."""
    nonzero = st.lists(st.integers(0, 1), min_size=4, max_size=4).map(lambda p: p if any(p) else [0, 0, 1, 0])
    spatial = pick("pads", nonzero)
    top, left, bottom, right = spatial
    mode = pick("mode", st.sampled_from(["constant", "reflect", "edge"]))
    inputs = [t.name, b.ints("pads", [0, 0, top, left, 0, 0, bottom, right])]
    if mode == "constant" and pick("value", st.booleans()):
        inputs.append(b.const("pad_value", np.array(b.rng.uniform(-1, 1), np.float32)))
    (out,) = b.node("Pad", inputs, mode=mode)
    return Tensor(out, t.c, t.h + top + bottom, t.w + left + right)


def _block_convtranspose(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    c = pick("c", _channels())
    up = max(t.h, t.w) <= 8 and pick("upsample", st.booleans())
    k, stride, pad = (2, 2, 0) if up else (3, 1, 1)
    inputs = [t.name, b.weight((t.c, c, k, k), t.c * k * k)]
    if pick("bias", st.booleans()):
        inputs.append(b.vector("b", (c,)))
    (out,) = b.node("ConvTranspose", inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
    h, w = (t.h - 1) * stride - 2 * pad + k, (t.w - 1) * stride - 2 * pad + k
    return _relu(b, Tensor(out, c, h, w))


def _block_lrn(pick: _Choices, b: _Builder, t: Tensor) -> Tensor:
    (out,) = b.node("LRN", [t.name], size=pick("size", st.sampled_from([3, 5])), alpha=1e-3, beta=0.75, bias=1.0)
    return Tensor(out, t.c, t.h, t.w)


_CNN_BUILDERS: dict[str, Callable[[_Choices, _Builder, Tensor], Tensor]] = {
    "conv": _block_conv, "residual": _block_residual, "projection": _block_projection,
    "concat": _block_concat, "split": _block_split, "depthwise": _block_depthwise,
    "grouped": _block_grouped, "shuffle": _block_shuffle, "se": _block_se, "batchnorm": _block_batchnorm,
    "affine": _block_affine, "pool": _block_pool, "resize": _block_resize, "pad": _block_pad,
    "convtranspose": _block_convtranspose, "lrn": _block_lrn,
}

def _head(pick: _Choices, b: _Builder, t: Tensor) -> tuple[str, list[int]]:
    classes = pick("classes", st.integers(2, 6))
    kind = pick("head", st.sampled_from(CNN_HEADS))
    if kind == "conv":
        out = _conv(b, t, classes, 1)
        return out.name, [out.c, out.h, out.w]
    if kind == "gap_gemm":
        (pooled,) = b.node("GlobalAveragePool", [t.name])
        features, src = t.c, pooled
    else:
        features, src = t.c * t.h * t.w, t.name
    (flat,) = b.node("Flatten", [src], axis=1)
    trans_b = pick("transB", st.booleans())
    weight = b.weight((classes, features) if trans_b else (features, classes), features)
    inputs = [flat, weight] + ([b.vector("fc_b", (classes,))] if pick("fc_bias", st.booleans()) else [])
    (out,) = b.node("Gemm", inputs, transB=int(trans_b))
    return out, [classes]


def _fill_batch(b: _Builder, batch: int) -> None:
    for i, init in enumerate(b.initializers):
        if init.data_type == TensorProto.INT64:
            array = numpy_helper.to_array(init)
            if (array == _BATCH_PLACEHOLDER).any():
                filled = np.where(array == _BATCH_PLACEHOLDER, batch, array)
                b.initializers[i] = numpy_helper.from_array(filled, init.name)


def _cnn(pick: _Choices, *, max_blocks: int, blocks: tuple[str, ...], with_lrn: bool) -> RandomGraph:
    b = _Builder(pick("seed", st.integers(0, 2**32 - 1)))
    batch = pick("batch", st.integers(1, 2))
    c_in = pick("in_channels", st.integers(1, 3))
    h, w = pick("height", st.integers(4, 8)), pick("width", st.integers(4, 8))
    t = _relu(b, _conv(b, Tensor("x", c_in, h, w), pick("stem", _channels()), 3))
    n_blocks = pick("blocks", st.integers(1, max_blocks))
    lrn_at = pick("lrn_at", st.integers(0, n_blocks)) if with_lrn else None
    for i in range(n_blocks + 1):
        if i == lrn_at:
            pick.prefix = "lrn."
            t = _block_lrn(pick, b, t)
        if i == n_blocks:
            break
        pick.prefix = f"b{i}."
        kind = pick("kind", st.sampled_from(blocks))
        t = _CNN_BUILDERS[kind](pick, b, t)
    pick.prefix = ""
    out, out_dims = _head(pick, b, t)
    _fill_batch(b, batch)
    model = b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c_in, h, w])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, *out_dims])],
    )
    return RandomGraph("cnn", pick.values, model, {"x": (batch, c_in, h, w)}, tuple(b.blockers))


@st.composite
def cnn_graphs(draw, max_blocks: int = 5, blocks: tuple[str, ...] = CNN_BLOCKS, with_lrn: bool = False) -> RandomGraph:
    """Random CNNs: a stem Conv, 1..max_blocks blocks drawn from `blocks`, a head; `with_lrn` puts
    an LRN (a blocker) at a drawn position besides any the blocks bring."""
    return _cnn(_Choices(draw), max_blocks=max_blocks, blocks=blocks, with_lrn=with_lrn)


def build_cnn(choices: Mapping[str, Any]) -> RandomGraph:
    """Rebuild the CNN a `cnn_graphs` example printed (its choices dict)."""
    return _cnn(_Choices(None, choices), max_blocks=0, blocks=(), with_lrn="lrn_at" in choices)


# ------------------------------------------------------------------------------ transformer


def _linear(b: _Builder, x: str, d_in: int, d_out: int, bias: bool = True) -> str:
    """x @ W (+ bias), W constant [d_in, d_out]: a linear layer as exporters write it."""
    (y,) = b.node("MatMul", [x, b.weight((d_in, d_out), d_in)])
    if bias:
        (y,) = b.node("Add", [y, b.vector("bias", (d_out,))])
    return y


def _layernorm(b: _Builder, x: str, d: int) -> str:
    return b.node("LayerNormalization", [x, b.vector("ln_scale", (d,), 0.5, 1.5), b.vector("ln_bias", (d,))],
                  axis=-1, epsilon=1e-5)[0]


def _heads_shape(pick: _Choices, b: _Builder, key: str, dims: list[int]) -> str:
    """A Reshape shape constant whose batch entry is literal, -1 or 0 (copy), as exporters vary."""
    entry = pick(key, st.sampled_from(["n", "-1", "0"]))
    return b.ints("shape", [{"n": _BATCH_PLACEHOLDER, "-1": -1, "0": 0}[entry], *dims])


def _attention(pick: _Choices, b: _Builder, x: str, seq: int, heads: int, head_dim: int) -> str:
    d = heads * head_dim
    projections = {}
    for name in "qkv":
        y = _linear(b, x, d, d, bias=pick(f"{name}_bias", st.booleans()))
        (y,) = b.node("Reshape", [y, _heads_shape(pick, b, f"{name}_shape", [seq, heads, head_dim])])
        projections[name] = y
    (q,) = b.node("Transpose", [projections["q"]], perm=[0, 2, 1, 3])  # [B, H, S, Dh]
    if pick("k_transpose", st.sampled_from(["one", "two"])) == "one":
        (k,) = b.node("Transpose", [projections["k"]], perm=[0, 2, 3, 1])  # [B, H, Dh, S]
    else:
        (k,) = b.node("Transpose", [projections["k"]], perm=[0, 2, 1, 3])
        (k,) = b.node("Transpose", [k], perm=[0, 1, 3, 2])
    (v,) = b.node("Transpose", [projections["v"]], perm=[0, 2, 1, 3])
    (scores,) = b.node("MatMul", [q, k])
    scale_op = pick("scale_op", st.sampled_from(["Mul", "Div"]))
    scale = np.float32(1 / np.sqrt(head_dim) if scale_op == "Mul" else np.sqrt(head_dim))
    (scores,) = b.node(scale_op, [scores, b.const("scale", np.array(scale, np.float32))])
    (probs,) = b.node("Softmax", [scores], axis=-1)
    (ctx,) = b.node("MatMul", [probs, v])  # [B, H, S, Dh]
    (ctx,) = b.node("Transpose", [ctx], perm=[0, 2, 1, 3])
    (ctx,) = b.node("Reshape", [ctx, _heads_shape(pick, b, "out_shape", [seq, d])])
    return _linear(b, ctx, d, d, bias=pick("o_bias", st.booleans()))


def _mlp(pick: _Choices, b: _Builder, x: str, d: int) -> str:
    hidden = pick("hidden", st.integers(4, 16))
    y = _linear(b, x, d, hidden)
    act = pick("act", st.sampled_from(["relu", "tanh", "swish"]))
    if act == "swish":  # x * sigmoid(x): the same channels on both Mul operands
        (s,) = b.node("Sigmoid", [y])
        (y,) = b.node("Mul", [y, s])
    else:
        (y,) = b.node({"relu": "Relu", "tanh": "Tanh"}[act], [y])
    return _linear(b, y, hidden, d)


def _transformer(pick: _Choices, *, max_layers: int, layernorm: bool) -> RandomGraph:
    b = _Builder(pick("seed", st.integers(0, 2**32 - 1)))
    batch, seq = pick("batch", st.integers(1, 2)), pick("seq", st.integers(2, 6))
    d_in = pick("d_in", st.integers(2, 8))
    heads, head_dim = pick("heads", st.integers(1, 4)), pick("head_dim", st.integers(2, 4))
    d = heads * head_dim
    ln = st.booleans() if layernorm else st.just(False)
    h = _linear(b, "x", d_in, d)
    for i in range(pick("layers", st.integers(1, max_layers))):
        pick.prefix = f"l{i}."
        a = _layernorm(b, h, d) if pick("pre_ln_attention", ln) else h
        (h,) = b.node("Add", [h, _attention(pick, b, a, seq, heads, head_dim)])
        m = _layernorm(b, h, d) if pick("pre_ln_mlp", ln) else h
        (h,) = b.node("Add", [h, _mlp(pick, b, m, d)])
        pick.prefix = ""
    if pick("final_ln", ln):
        h = _layernorm(b, h, d)
    outputs = pick("out_features", st.integers(2, 6))
    y = _linear(b, h, d, outputs)
    _fill_batch(b, batch)
    model = b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, d_in])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [batch, seq, outputs])],
    )
    return RandomGraph("transformer", pick.values, model, {"x": (batch, seq, d_in)}, tuple(b.blockers))


@st.composite
def transformer_graphs(draw, max_layers: int = 2, layernorm: bool = True) -> RandomGraph:
    """Random transformer encoders on x[B, S, D_in], LayerNormalization (a blocker) before attention,
    MLP and output each drawn, or never when `layernorm` is false."""
    return _transformer(_Choices(draw), max_layers=max_layers, layernorm=layernorm)


def build_transformer(choices: Mapping[str, Any]) -> RandomGraph:
    """Rebuild the transformer a `transformer_graphs` example printed (its choices dict)."""
    return _transformer(_Choices(None, choices), max_layers=0, layernorm=True)

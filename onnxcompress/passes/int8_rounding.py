"""Learned weight rounding for static int8: GPTQ-style error feedback, one step from nearest at most.

Rounding every weight to its nearest code minimizes each weight's own error, not the layer's
output error: on EfficientNet-Lite the layers' ~40 dB weight noise adds up to a 19 dB network.
Following GPTQ (Frantar et al. 2022, after Optimal Brain Quantization), each layer's codes are
chosen one reduction column at a time, and the rounding error of a column is pushed onto the
columns not yet rounded, weighted by the inverse of H = X^T X, the Gram matrix of the layer's
calibration inputs (im2col rows of a Conv, rows of a MatMul). That minimizes ||(Q - W) X||^2 in
closed form, with no gradient descent: seconds per model in numpy.

The inputs X come from the model quantized with nearest rounding (activation quantization and
bias correction included): what each int8 layer sees at run time, upstream errors included.
With bias correction on, H is centred (E[x x^T] - mu mu^T): the correction removes the mean
output shift afterwards, so the rounding need not spend its freedom on it.

Limits the codes keep (so every kernel stays exact and nothing moves far from nearest):
- each code is its nearest code or one step away from it, within [-127, 127];
- for s8 codes on kernels without VNNI (passes/int8_weights.py, analysis/int8_kernels.py), no
  kernel pair (k, k+1), k even, of same-sign codes sums beyond PAIR_CODE_LIMIT: the second code of
  a pair is clamped against the first, which stays within one step of nearest because nearest
  codes were safe (depthwise convolutions and u8 codes have exact kernels: no pair limit);
- a channel whose learned codes reconstruct its output worse than nearest on the calibration
  inputs keeps its nearest codes, so no channel gets worse on the data it was fitted on.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import runtime
from ..analysis.int8_kernels import PAIR_CODE_LIMIT, overflowing_rows, reduction_rows
from ..calibration import Calibration
from ..model import load
from .int8_weights import U8_ZERO_POINT, WEIGHT_QMAX, Kernels, WeightEncoding

ROUNDINGS: tuple[str, ...] = ("nearest", "learned")
#: Gram rows taken from one calibration sample per layer (random output positions): enough rows to
#: outnumber the widest reduction (~1,300 on EfficientNet-Lite) over a few dozen samples, while
#: early high-resolution layers cost no more than late ones.
ROWS_PER_SAMPLE = 1024
#: GPTQ's dampening: this fraction of the mean diagonal of H is added to its diagonal, so inputs
#: that never vary (dead channels, constant padding) do not make H singular.
DAMPING = 0.01
#: Columns rounded between two matrix updates of the rest (GPTQ's lazy batch update).
BLOCK = 128


@dataclass
class Gram:
    """Running sums of one layer's reduction rows: H = sum x x^T per group, sum x, row count."""

    xx: np.ndarray  # [groups, K, K] float64
    x: np.ndarray  # [groups, K] float64
    rows: int = 0

    def add(self, patches: np.ndarray) -> None:
        p = patches.astype(np.float32)
        self.xx += np.matmul(p.transpose(0, 2, 1), p).astype(np.float64)
        self.x += p.sum(axis=1, dtype=np.float64)
        self.rows += p.shape[1]

    def matrix(self, centered: bool) -> np.ndarray:
        n = max(self.rows, 1)
        h = self.xx / n
        if centered:
            mu = self.x / n
            h = h - mu[:, :, None] * mu[:, None, :]
        return h


@dataclass
class RoundingReport:
    """What learned rounding did, for the pass's changes and details."""

    layers: int = 0
    channels_kept_nearest: int = 0
    gain_db: dict[str, float] = field(default_factory=dict)  # layer: reconstruction error, nearest / learned (dB)
    seconds: float = 0.0

    @property
    def mean_gain_db(self) -> float:
        return float(np.mean(list(self.gain_db.values()))) if self.gain_db else 0.0

    def describe(self) -> str:
        return (f"learned rounding on {self.layers} layers: layer output error {self.mean_gain_db:.1f} dB below "
                f"nearest rounding on average (calibration inputs), {self.channels_kept_nearest} channels kept "
                f"nearest, {self.seconds:.1f} s")

    def to_dict(self) -> dict:
        return {"layers": self.layers, "mean_gain_db": self.mean_gain_db, "gain_db": dict(self.gain_db),
                "channels_kept_nearest": self.channels_kept_nearest, "seconds": self.seconds}


# ---------------------------------------------------------------------------- layer inputs


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def conv_patches(x: np.ndarray, node: onnx.NodeProto, kernel: Sequence[int], groups: int, rows: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Up to `rows` random im2col rows of one sample's Conv input x [C, H, W], per group, in the
    kernel's reduction order (kh, kw, channel fastest): [groups, rows, kh*kw*C/groups]."""
    c, h, w = x.shape
    kh, kw = kernel
    sh, sw = _attr(node, "strides", [1, 1])
    dh, dw = _attr(node, "dilations", [1, 1])
    pads = _attr(node, "pads", [0, 0, 0, 0])
    if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError("auto_pad")  # FoldBatchNorm/onnx export give explicit pads; others are not learned
    xp = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    positions = np.arange(oh * ow)
    if len(positions) > rows:
        positions = np.sort(rng.choice(len(positions), rows, replace=False))
    oy, ox = positions // ow, positions % ow
    ky, kx = np.meshgrid(np.arange(kh) * dh, np.arange(kw) * dw, indexing="ij")
    iy = oy[:, None] * sh + ky.reshape(1, -1)  # [P, T]
    ix = ox[:, None] * sw + kx.reshape(1, -1)
    taps = xp[:, iy, ix]  # [C, P, T]
    taps = taps.reshape(groups, c // groups, len(positions), kh * kw)
    return np.ascontiguousarray(taps.transpose(0, 2, 3, 1)).reshape(groups, len(positions), -1)


def _matmul_patches(x: np.ndarray, k: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    flat = x.reshape(-1, k)
    if len(flat) > rows:
        flat = flat[rng.choice(len(flat), rows, replace=False)]
    return flat[None]


def collect_grams(
    quantized: onnx.ModelProto, nodes: Sequence[str], calibration: Calibration, *, limit: int | None = None,
    seed: int = 0,
) -> dict[str, Gram]:
    """{node: Gram of its input rows} for the named Conv/MatMul/Gemm nodes, from running
    `quantized` (a QDQ model: the nodes' inputs are what the int8 layers see) on the calibration data."""
    proto = onnx.ModelProto()
    proto.CopyFrom(quantized)
    by_name = {n.name: n for n in proto.graph.node}
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    chosen = [by_name[n] for n in nodes if n in by_name]
    inputs = list(dict.fromkeys(n.input[0] for n in chosen))
    existing = {o.name for o in proto.graph.output}
    for v in inputs:
        if v not in existing and v not in {i.name for i in proto.graph.input}:
            proto.graph.output.append(helper.make_value_info(v, helper.make_tensor_type_proto(TensorProto.FLOAT, None)))
    shapes = {n.name: _weight_shape(n, inits, producers) for n in chosen}
    grams: dict[str, Gram] = {}
    rng = np.random.default_rng(seed)
    sess = runtime.session(load(proto), options=runtime.session_options(spinning=False))
    feed_names = {i.name for i in sess.get_inputs()}
    fetched = [v for v in inputs if v not in feed_names]
    for feeds in calibration.batches(1, limit=limit):
        got = dict(zip(fetched, sess.run(fetched, feeds)))
        got.update({v: feeds[v] for v in inputs if v in feed_names})
        for node in chosen:
            patches = _patches(node, shapes[node.name], got[node.input[0]], rng)
            if node.name not in grams:
                g, k = patches.shape[0], patches.shape[2]
                grams[node.name] = Gram(np.zeros((g, k, k)), np.zeros((g, k)))
            grams[node.name].add(patches)
    return grams


def _weight_shape(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto],
                  producers: Mapping[str, onnx.NodeProto]) -> tuple[int, ...]:
    """The float weight's shape: the initializer's, or that of the codes behind a DequantizeLinear."""
    name = node.input[1]
    if name in inits:
        return tuple(inits[name].dims)
    return tuple(inits[producers[name].input[0]].dims)


def _patches(node: onnx.NodeProto, shape: tuple[int, ...], x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One sample's reduction rows of the node's input: [groups, rows, K per group]."""
    if node.op_type == "Conv":
        groups = int(_attr(node, "group", 1))
        return np.concatenate([conv_patches(xi, node, shape[2:], groups, ROWS_PER_SAMPLE, rng) for xi in x], axis=1)
    k = shape[1] if node.op_type == "Gemm" and _attr(node, "transB", 0) else shape[0]
    return _matmul_patches(np.asarray(x), k, ROWS_PER_SAMPLE, rng)


# ---------------------------------------------------------------------------- rounding


def gptq_codes(target: np.ndarray, nearest: np.ndarray, h: np.ndarray, paired: bool) -> np.ndarray:
    """Codes for target [G, R, K] (weights in code units, R rows per group sharing h [G, K, K]),
    each within one step of `nearest`, by GPTQ's column-wise error feedback (see the module doc).
    `paired`: keep every kernel pair (k, k+1), k even, within PAIR_CODE_LIMIT."""
    g, r, k = target.shape
    hinv = _inverse_cholesky(h)  # [G, K, K] upper triangular
    w = target.astype(np.float64).copy()
    q = nearest.astype(np.float64).copy()
    lo = np.where(target < nearest, nearest - 1, nearest).clip(-WEIGHT_QMAX, WEIGHT_QMAX)
    hi = np.where(target > nearest, nearest + 1, nearest).clip(-WEIGHT_QMAX, WEIGHT_QMAX)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        err = np.zeros((g, r, b1 - b0))
        for j in range(b0, b1):
            c = np.clip(np.round(w[..., j]), lo[..., j], hi[..., j])
            if paired and j % 2:
                prev = q[..., j - 1]
                c = np.clip(c, -PAIR_CODE_LIMIT - np.minimum(prev, 0), PAIR_CODE_LIMIT - np.maximum(prev, 0))
            q[..., j] = c
            e = (w[..., j] - c) / hinv[:, None, j, j]
            err[..., j - b0] = e
            w[..., j + 1:b1] -= e[..., None] * hinv[:, None, j, j + 1:b1]
        if b1 < k:
            w[..., b1:] -= np.matmul(err, hinv[:, b0:b1, b1:])
    return q


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of the dampened H^-1, per group (GPTQ's numerically stable form)."""
    h = h.copy()
    k = h.shape[-1]
    diag = np.einsum("gkk->gk", h)
    dead = diag <= 0
    idx = np.arange(k)
    h[:, idx, idx] = np.where(dead, 1.0, diag) + DAMPING * np.maximum(diag.mean(axis=1, keepdims=True), 1e-12)
    inv = np.linalg.inv(h)
    inv = (inv + inv.transpose(0, 2, 1)) / 2
    return np.linalg.cholesky(inv).transpose(0, 2, 1)


def row_errors(delta: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per row of delta [G, R, K]: delta H delta^T, the output error energy on the calibration rows."""
    return np.einsum("grk,grk->gr", np.matmul(delta, h), delta)


def learn_codes(
    op_type: str, enc: WeightEncoding, w: np.ndarray, gram: Gram, *, trans_b: bool = False, depthwise: bool = False,
    kernels: Kernels = "any", centered: bool = True,
) -> tuple[WeightEncoding, float, int]:
    """The encoding with learned codes (same scales and form); returns (encoding, reconstruction
    error of nearest over learned in dB, channels kept nearest)."""
    codes = enc.codes.astype(np.int16) - enc.zero_point  # signed values either form
    rows_w = reduction_rows(op_type, w.astype(np.float64), trans_b=trans_b)
    rows_q = reduction_rows(op_type, codes.astype(np.float64), trans_b=trans_b)
    m, k_all = rows_w.shape
    scales = np.broadcast_to(np.asarray(enc.scales, dtype=np.float64).reshape(-1), (m,)) if enc.axis is not None \
        else np.full(m, float(enc.scales))
    groups = gram.xx.shape[0]
    k = gram.xx.shape[1]
    if k != k_all or m % groups:
        raise ValueError(f"Gram of size {groups}x{k} does not fit a weight of {m}x{k_all}")
    target = (rows_w / scales[:, None]).reshape(groups, m // groups, k)
    nearest = rows_q.reshape(groups, m // groups, k)
    h = gram.matrix(centered)
    paired = kernels == "any" and enc.form != "u8" and not depthwise
    learned = gptq_codes(target, nearest, h, paired)
    before, after = row_errors(nearest - target, h), row_errors(learned - target, h)
    worse = after > before
    learned[worse] = nearest[worse]
    after = np.where(worse, before, after)
    out_rows = learned.reshape(m, k)
    if paired:  # never expected: the clamp keeps pairs safe; the kernels must stay exact regardless
        bad = overflowing_rows(out_rows)
        out_rows[bad] = rows_q[bad]
    gain = float(10 * np.log10(max(before.sum(), 1e-30) / max(after.sum(), 1e-30)))
    new = _from_rows(op_type, out_rows, w.shape, trans_b).astype(np.int16) + enc.zero_point
    dtype = np.uint8 if enc.zero_point == U8_ZERO_POINT else np.int8
    return dataclasses.replace(enc, codes=new.astype(dtype)), gain, int(np.count_nonzero(worse))


def _from_rows(op_type: str, rows: np.ndarray, shape: tuple[int, ...], trans_b: bool) -> np.ndarray:
    """Inverse of reduction_rows."""
    if op_type == "Conv":
        m, cg = shape[0], shape[1]
        return np.ascontiguousarray(np.moveaxis(rows.reshape(m, -1, cg), 2, 1)).reshape(shape)
    if op_type == "Gemm" and trans_b:
        return rows.reshape(shape)
    return np.ascontiguousarray(rows.T)


__all__ = [
    "BLOCK", "DAMPING", "Gram", "ROUNDINGS", "ROWS_PER_SAMPLE", "RoundingReport", "collect_grams", "conv_patches",
    "gptq_codes", "learn_codes", "row_errors",
]

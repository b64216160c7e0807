"""Learned weight rounding for static int8: GPTQ-style error feedback, one step from nearest at most.

Rounding every weight to its nearest code minimizes each weight's own error, not the layer's
output error: on EfficientNet-Lite the layers' ~40 dB weight noise adds up to a 19 dB network.
Following GPTQ (Frantar et al. 2022, after Optimal Brain Quantization), each layer's codes are
chosen one reduction column at a time, and the rounding error of a column is pushed onto the
columns not yet rounded, weighted by the inverse of H = X^T X, the Gram matrix of the layer's
calibration inputs (im2col rows of a Conv, rows of a MatMul). That greedily minimizes
||(Q - W) X||^2 without gradient descent: about a minute on EfficientNet-Lite in numpy, most of it
summing the Gram matrices.

The inputs X come from the model quantized with nearest rounding (activation quantization and
bias correction included): what each int8 layer sees at run time, upstream errors included.
With bias correction on, H is centred (E[x x^T] - mu mu^T): the correction removes the mean
output shift afterwards, so the rounding need not spend its freedom on it. Matching the float
layer on the float model's inputs instead (||Q x - W f||^2, so each layer also absorbs its input's
error) moves the target beyond the one-step window: EfficientNet-Lite1 fell from 25 to 13 dB.

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
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..analysis.int8_kernels import PAIR_CODE_LIMIT, overflowing_rows, reduction_rows
from ..analysis.streaming import stream_values
from ..calibration import Calibration
from .int8_placement import node_attr
from .int8_weights import U8_ZERO_POINT, WEIGHT_QMAX, Kernels, WeightEncoding

ROUNDINGS: tuple[str, ...] = ("nearest", "learned")
#: Gram rows taken from one calibration sample per layer (random output positions): over a few
#: dozen samples they outnumber the widest reduction (~1,400 on EfficientNet-Lite), while early
#: high-resolution layers cost no more than late ones (the Gram sums are most of the time spent).
ROWS_PER_SAMPLE = 256
#: GPTQ's dampening: this fraction of the mean diagonal of H is added to its diagonal, so inputs
#: that never vary (dead channels, constant padding) do not make H singular.
DAMPING = 0.01
#: Columns rounded between two matrix updates of the rest (GPTQ's lazy batch update).
BLOCK = 128


@dataclass
class Gram:
    """Running sums over one layer's reduction rows x (the int8 layer's inputs), per group."""

    xx: np.ndarray  # [groups, K, K] sum x x^T
    x: np.ndarray  # [groups, K] sum x
    rows: int = 0

    @classmethod
    def empty(cls, groups: int, k: int) -> Gram:
        return cls(np.zeros((groups, k, k)), np.zeros((groups, k)))

    def add(self, x: np.ndarray) -> None:
        x = x.astype(np.float32)
        self.xx += np.matmul(x.transpose(0, 2, 1), x)
        self.x += x.sum(axis=1, dtype=np.float64)
        self.rows += x.shape[1]

    def matrix(self, centered: bool) -> np.ndarray:
        """E[x x^T], or the covariance when `centered`."""
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


def conv_geometry(node: ir.Node, kernel: Sequence[int], height: int, width: int) -> dict:
    """Strides, dilations, pads and output size of a 2-D Conv on an input of height x width."""
    (kh, kw), (sh, sw) = kernel, node_attr(node, "strides", [1, 1])
    dh, dw = node_attr(node, "dilations", [1, 1])
    pads = list(node_attr(node, "pads", [0, 0, 0, 0]))
    oh = (height + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (width + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    return {"kernel": (kh, kw), "strides": (sh, sw), "dilations": (dh, dw), "pads": pads, "out": (oh, ow)}


def conv_patches(x: np.ndarray, geometry: dict, groups: int, positions: np.ndarray) -> np.ndarray:
    """im2col rows of one sample's Conv input x [C, H, W] at the given flat output positions, per
    group, in the kernel's reduction order (kh, kw, channel fastest): [groups, P, kh*kw*C/groups]."""
    c = x.shape[0]
    (kh, kw), (sh, sw), (dh, dw), pads = geometry["kernel"], geometry["strides"], geometry["dilations"], geometry["pads"]
    xp = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oy, ox = positions // geometry["out"][1], positions % geometry["out"][1]
    ky, kx = np.meshgrid(np.arange(kh) * dh, np.arange(kw) * dw, indexing="ij")
    iy = oy[:, None] * sh + ky.reshape(1, -1)  # [P, T]
    ix = ox[:, None] * sw + kx.reshape(1, -1)
    taps = xp[:, iy, ix].reshape(groups, c // groups, len(positions), kh * kw)  # [G, C/G, P, T]
    return np.ascontiguousarray(taps.transpose(0, 2, 3, 1)).reshape(groups, len(positions), -1)


def _rows_of(node: ir.Node, shape: tuple[int, ...], x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One sample's reduction rows of the node's input at random positions: [groups, rows, K per group]."""
    if node.op_type == "Conv":
        geometry = conv_geometry(node, shape[2:], x.shape[-2], x.shape[-1])
        total = geometry["out"][0] * geometry["out"][1]
        groups = int(node_attr(node, "group", 1))
        return np.concatenate([conv_patches(xi, geometry, groups, _pick(total, rng)) for xi in x], axis=1)
    k = shape[1] if node.op_type == "Gemm" and node_attr(node, "transB", 0) else shape[0]
    flat = np.asarray(x).reshape(-1, k)
    return flat[_pick(len(flat), rng)][None]


def _pick(total: int, rng: np.random.Generator) -> np.ndarray:
    if total <= ROWS_PER_SAMPLE:
        return np.arange(total)
    return np.sort(rng.choice(total, ROWS_PER_SAMPLE, replace=False))


def collect_grams(
    quantized: ir.Model, nodes: Sequence[str], calibration: Calibration, *, limit: int | None = None,
    batch_size: int = 1, seed: int = 0,
) -> dict[str, Gram]:
    """{node: Gram of its input rows} for the named Conv/MatMul/Gemm nodes of `quantized` (a QDQ
    model: the rows are what the int8 layers see), on the calibration data."""
    by_name = {n.name: n for n in quantized.graph}
    chosen = [by_name[n] for n in nodes if n in by_name]
    shapes = {n.name: _weight_shape(n) for n in chosen}
    readers: dict[str, list[ir.Node]] = {}
    for node in chosen:
        readers.setdefault(node.inputs[0].name, []).append(node)
    # one generator per layer: the rows drawn do not depend on how the runs group the values
    rngs = {n.name: np.random.default_rng([seed, i]) for i, n in enumerate(chosen)}
    grams: dict[str, Gram] = {}
    # small batches: the rows are sampled per item (analysis/streaming.py bounds the memory)
    for _, values, _ in stream_values(quantized, list(readers), calibration, batch_size=batch_size, limit=limit):
        for value, array in values.items():
            for node in readers[value]:
                x = _rows_of(node, shapes[node.name], array, rngs[node.name])
                if node.name not in grams:
                    grams[node.name] = Gram.empty(x.shape[0], x.shape[2])
                grams[node.name].add(x)
    return grams


def _weight_shape(node: ir.Node) -> tuple[int, ...]:
    """The weight's shape: its initializer's, or that of the codes behind its DequantizeLinear."""
    weight = node.inputs[1]
    if weight.const_value is None:
        weight = weight.producer().inputs[0]
    return tuple(weight.const_value.shape)


# ---------------------------------------------------------------------------- rounding


def gptq_codes(target: np.ndarray, nearest: np.ndarray, h: np.ndarray, paired: bool) -> np.ndarray:
    """Codes for target [G, R, K] (weights in code units, R rows per group sharing the dampened
    h [G, K, K]), each within one step of `nearest`, by GPTQ's column-wise error feedback (see the
    module doc). `paired`: keep every kernel pair (k, k+1), k even, within PAIR_CODE_LIMIT."""
    g, r, k = target.shape
    hinv = inverse_cholesky(h)  # [G, K, K] upper triangular
    w = target.astype(np.float64).copy()
    q = nearest.astype(np.float64).copy()
    lo = np.clip(nearest - 1, -WEIGHT_QMAX, WEIGHT_QMAX)
    hi = np.clip(nearest + 1, -WEIGHT_QMAX, WEIGHT_QMAX)
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


def damped(h: np.ndarray) -> np.ndarray:
    """H with DAMPING times its mean diagonal added to the diagonal, and 1 where an input is dead."""
    h = h.copy()
    idx = np.arange(h.shape[-1])
    diag = h[:, idx, idx]
    h[:, idx, idx] = np.where(diag <= 0, 1.0, diag) + DAMPING * np.maximum(diag.mean(axis=1, keepdims=True), 1e-12)
    return h


def inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of h^-1 per group (GPTQ's numerically stable form of the updates)."""
    inv = np.linalg.inv(h)
    inv = (inv + inv.transpose(0, 2, 1)) / 2
    return np.linalg.cholesky(inv).transpose(0, 2, 1)


def output_errors(delta: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per row of delta [G, R, K] (weight units): delta H delta^T, the layer's output error energy
    per calibration row."""
    return np.einsum("grk,grk->gr", np.matmul(delta, h), delta)


def learn_codes(
    op_type: str, enc: WeightEncoding, w: np.ndarray, gram: Gram, *, trans_b: bool = False, depthwise: bool = False,
    kernels: Kernels = "any", centered: bool = True,
) -> tuple[WeightEncoding, float, int]:
    """The encoding with learned codes (same scales and form); returns (encoding, output error of
    nearest over learned in dB on the calibration rows, channels kept nearest)."""
    codes = enc.codes.astype(np.int16) - enc.zero_point  # signed values either form
    rows_w = reduction_rows(op_type, w.astype(np.float64), trans_b=trans_b)
    rows_q = reduction_rows(op_type, codes.astype(np.float64), trans_b=trans_b)
    m, k_all = rows_w.shape
    groups, k = gram.xx.shape[0], gram.xx.shape[1]
    if k != k_all or m % groups:
        raise ValueError(f"Gram of size {groups}x{k} does not fit a weight of {m}x{k_all}")
    s = np.broadcast_to(np.asarray(enc.scales, dtype=np.float64).reshape(-1), (m,)).reshape(groups, m // groups, 1)
    target, nearest = rows_w.reshape(groups, m // groups, k) / s, rows_q.reshape(groups, m // groups, k)
    h = gram.matrix(centered)
    paired = kernels == "any" and enc.form != "u8" and not depthwise
    learned = gptq_codes(target, nearest, damped(h), paired)
    # per row the scale is one constant: compare the errors in code units
    before, after = output_errors(nearest - target, h), output_errors(learned - target, h)
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
    "conv_geometry", "damped", "gptq_codes", "inverse_cholesky", "learn_codes", "output_errors",
]

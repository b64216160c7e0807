"""GPTQ for block-quantized weights (weight-only int4/int8), in numpy.

GPTQ (Frantar et al. 2022) chooses a layer's codes one input row k of W [K, N] at a time and pushes
each row's rounding error onto the rows not yet quantized, weighted by the inverse of
H = 2 X^T X, X the layer's calibration inputs [rows, K]. That greedily minimizes the layer's
output error ||X (Q - W)||^2 instead of each weight's own error. As in the paper:
- **act-order**: rows are quantized in decreasing order of H's diagonal (the inputs with the most
  energy first, while the most rows are left to absorb their error);
- **dampening**: DAMPING (0.1) times the mean of H's diagonal is added to it (the calibration rows
  may be fewer than K; inputs that never vary get H_kk = 1 and a zero weight row is irrelevant);
- **lazy batches**: errors are applied inside a batch of LAZY_BATCH rows at once per row, and to
  the rest of the matrix once per batch.
The block scales (and zero points) are fixed before the rows are visited, from the float weights
("static groups"): with act-order the rows of one block are visited out of order, and a scale
must not change after some of its codes were chosen. Rows beyond a block's range clip.

The inputs come from one ORT run of the float model over the calibration data
(analysis/streaming.py), every target MatMul's input fetched as a graph output; rows that are
padding under an attention mask are left out. Memory is bounded by `budget_bytes`: each distinct
input gets a share in proportion to its width; where its K x K Gram fits the share it is summed
exactly, otherwise a uniform sample of its rows is kept (reservoir sampling) and the Gram is taken
from those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from ..calibration import Calibration
from .int8_rounding import inverse_cholesky
from .weight_blocks import BlockCodes, qrange

DAMPING = 0.1
LAZY_BATCH = 128
#: Bytes of calibration statistics kept for all layers together (Grams or sampled rows).
BUDGET_BYTES = 256 * 2**20


class InputStats:
    """H = 2 X^T X / rows of one input's rows, summed exactly or from a uniform sample of rows."""

    def __init__(self, k: int, share_bytes: int, seed: int = 0) -> None:
        self.k = k
        self.exact = k * k * 8 <= share_bytes
        self.cap = max(1, share_bytes // (4 * k))
        self.gram = np.zeros((k, k)) if self.exact else None
        self.sample = None if self.exact else np.zeros((self.cap, k), np.float32)
        self.rows = 0  # rows seen
        self.rng = np.random.default_rng(seed)

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).reshape(-1, self.k)
        if not len(x):
            return
        if self.exact:
            self.gram += (x.T @ x).astype(np.float64)
        else:
            kept = min(self.rows, self.cap)
            fill = min(self.cap - kept, len(x))
            self.sample[kept:kept + fill] = x[:fill]
            rest = x[fill:]
            if len(rest):  # reservoir: row t replaces a random kept row with probability cap / (t + 1)
                seen = self.rows + fill + np.arange(len(rest))
                slots = (self.rng.random(len(rest)) * (seen + 1)).astype(np.int64)
                take = slots < self.cap
                self.sample[slots[take]] = rest[take]
        self.rows += len(x)

    def hessian(self) -> np.ndarray:
        if self.exact:
            return 2 * self.gram / max(self.rows, 1)
        x = self.sample[: min(self.rows, self.cap)].astype(np.float64)
        return 2 * (x.T @ x) / max(len(x), 1)


def collect_hessians(model: ir.Model, inputs: Mapping[str, int], calibration: Calibration, *,
                     budget_bytes: int = BUDGET_BYTES, mask_names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """{value name: H [K, K]} for the named values (name -> K, their last axis), from one streaming
    run of `model` over the calibration data; positions where a mask input is 0 are left out."""
    from ..analysis.streaming import stream_values

    total = max(sum(inputs.values()), 1)
    stats = {name: InputStats(k, budget_bytes * k // total, seed=i) for i, (name, k) in enumerate(inputs.items())}
    masks = list(mask_names)
    for _, values in stream_values(model, [*masks, *inputs], calibration):
        mask = next((values[m] for m in masks if m in values), None)
        for name, array in values.items():
            if name not in stats:
                continue
            x = np.asarray(array)
            if mask is not None and x.ndim == mask.ndim + 1 and x.shape[:-1] == mask.shape:
                x = x[np.asarray(mask) != 0]
            stats[name].add(x)
    return {name: s.hessian() for name, s in stats.items() if s.rows}


def gptq(w: np.ndarray, h: np.ndarray, start: BlockCodes, *, damping: float = DAMPING, act_order: bool = True
         ) -> BlockCodes:
    """Codes for W [K, N] under `start`'s scales and zero points (its codes are not used), chosen by
    GPTQ on H [K, K] (see the module doc)."""
    k, n = w.shape
    h = np.array(h, dtype=np.float64)
    w = np.array(w, dtype=np.float64)
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(k)] += damping * np.mean(np.diag(h))
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    scales = start.per_row(start.scales).astype(np.float64)[order]
    zps = None if start.zero_points is None else start.per_row(start.zero_points).astype(np.float64)[order]
    lo, hi = qrange(start.bits, zps is None)
    hinv = inverse_cholesky(h[np.ix_(order, order)][None])[0]  # upper triangular
    ww = w[order]
    q = np.zeros_like(ww)
    for b0 in range(0, k, LAZY_BATCH):
        b1 = min(b0 + LAZY_BATCH, k)
        err = np.zeros((b1 - b0, n))
        for j in range(b0, b1):
            code = np.round(ww[j] / scales[j]) + (0 if zps is None else zps[j])
            code = np.clip(code, lo, hi)
            q[j] = code
            deq = (code - (0 if zps is None else zps[j])) * scales[j]
            e = (ww[j] - deq) / hinv[j, j]
            err[j - b0] = e
            ww[j + 1:b1] -= np.outer(hinv[j, j + 1:b1], e)
        if b1 < k:
            ww[b1:] -= hinv[b0:b1, b1:].T @ err
    codes = np.empty_like(q)
    codes[order] = q
    return BlockCodes(codes.astype(np.int16), start.scales, start.zero_points, start.bits, start.block_size)


def output_error(w: np.ndarray, dequantized: np.ndarray, h: np.ndarray) -> float:
    """trace((Wq - W)^T H (Wq - W)): the layer's output error energy on the calibration rows (x2)."""
    d = np.asarray(dequantized, np.float64) - np.asarray(w, np.float64)
    return float(np.einsum("kn,kn->", h @ d, d))


__all__ = ["BUDGET_BYTES", "DAMPING", "InputStats", "LAZY_BATCH", "collect_hessians", "gptq", "output_error"]

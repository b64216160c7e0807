"""int8 weight and int32 bias codes that every CPU kernel computes exactly.

Each int8 layer's weight gets one of three forms, chosen per layer:

- `s8`: per-channel symmetric int8 over the full range [-127, 127]; taken as is when no pair of
  codes can saturate the int16 pair sums of x86 kernels without VNNI (analysis/int8_kernels.py),
  for depthwise convolutions (their kernels are exact), or when the target kernels have VNNI
  (`kernels="vnni"`);
- `s8-safe`: the same, with the scales of the channels that could saturate widened just enough that
  they cannot (7-bit-like precision in those channels only). Chosen when that raises the layer's
  output quantization noise by at most SAFE_WIDENING_MAX_DB: per output channel, weight rounding
  adds s_w^2 K E[x^2] / 12 and input rounding s_x^2 |w|^2 / 12, so where the input's noise
  dominates (the usual case) widening is nearly free;
- `u8`: uint8 codes with zero point 128 (the same [-127, 127] values shifted). ORT runs these with
  u8 x u8 kernels that sum in int32: exact at full precision, about 2x slower per layer.

A channel's scale is also widened where its float bias would not fit the int32 bias codes
(bias / (x_scale * w_scale) beyond BIAS_CODE_LIMIT): a dead channel (all-zero weights) with a
bias is the usual case, whose minimal scale would otherwise saturate the bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..analysis.int8_kernels import overflowing_rows, reduction_rows, safe_scales

Kernels = Literal["any", "vnni"]
KERNELS: tuple[str, ...] = ("any", "vnni")
MIN_SCALE = 1e-12  # an all-zero tensor still needs a positive scale
WEIGHT_QMAX = 127  # symmetric int8 weights use [-127, 127]: the range is symmetric around zero
U8_ZERO_POINT = 128
INT32_MAX = np.iinfo(np.int32).max
#: Largest |int32 bias code|: half the int32 range, leaving the other half to the accumulated
#: products (K * 255 * 127 stays below 2^30 up to K = 33,000).
BIAS_CODE_LIMIT = 2**30
#: Widening scales to make s8 codes safe may raise a layer's output quantization noise by this
#: much (dB, half a bit); beyond it the layer uses u8 codes. End to end the cost is smaller (the
#: digits CNN: 0.8 dB SQNR with every layer widened, each layer's output noise up to +3.2 dB).
SAFE_WIDENING_MAX_DB = 3.0


@dataclass(frozen=True)
class WeightEncoding:
    """The codes, scales and zero point of one weight, and why this form."""

    codes: np.ndarray  # int8 (zero point 0) or uint8 (zero point 128), the weight's shape
    scales: np.ndarray  # float32: one per channel along `axis`, or a 0-d scalar
    axis: int | None
    form: str  # "s8", "s8-safe" or "u8"
    widened_db: float = 0.0  # output noise the widening of s8-safe added, or would have added for u8
    kernel_widened: int = 0  # channels whose scale grew so no int16 pair sum can saturate
    bias_widened: int = 0  # channels whose scale grew so the int32 bias fits

    @property
    def zero_point(self) -> int:
        return U8_ZERO_POINT if self.codes.dtype == np.uint8 else 0

    def dequantized(self) -> np.ndarray:
        return (self.codes.astype(np.float32) - np.float32(self.zero_point)) * self.scales.reshape(self._shape())

    def _shape(self) -> list[int]:
        shape = [1] * self.codes.ndim
        if self.axis is not None:
            shape[self.axis] = -1
        return shape

    def describe(self) -> str:
        if self.form == "s8-safe":
            why = f"{self.kernel_widened} channels widened (+{self.widened_db:.2f} dB output noise) so no int16 pair sum saturates"
        elif self.form == "u8":
            why = f"u8 x u8 kernels: s8 codes could saturate int16 pair sums, and widening them would add " \
                  f"{self.widened_db:.2f} dB output noise (> {SAFE_WIDENING_MAX_DB:g})"
        else:
            why = "full range"
        extra = f"; {self.bias_widened} channels widened to fit the int32 bias" if self.bias_widened else ""
        return f"{self.form}: {why}{extra}"


def quantize_weight(w: np.ndarray, axis: int | None, scales: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 (per channel along `axis`, or per tensor): (int8 values, float32 scales).
    `scales` overrides the full-range scales (they must be at least as wide)."""
    if scales is None:
        if axis is None:
            amax = np.asarray(np.abs(w).max() if w.size else 0.0)
        else:
            amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
        scales = np.maximum(amax / WEIGHT_QMAX, MIN_SCALE).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.round(w / scales.reshape(shape)), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)
    return q, scales


def quantize_bias(b: np.ndarray, x_scale: float, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """int32 bias with scale x_scale * w_scale (what QLinearConv/QGemm add to the int32 accumulator);
    returns (values, scales, saturated)."""
    scale = (np.float32(x_scale) * w_scale.astype(np.float32)).astype(np.float32)
    scale = np.broadcast_to(scale, b.shape) if scale.size == 1 else scale
    raw = np.round(b.astype(np.float64) / scale.astype(np.float64))
    saturated = bool(np.any(np.abs(raw) > INT32_MAX))
    return np.clip(raw, -INT32_MAX, INT32_MAX).astype(np.int32), np.ascontiguousarray(scale), saturated


def encode_weight(
    op_type: str, w: np.ndarray, axis: int | None, *, trans_b: bool = False, depthwise: bool = False,
    kernels: Kernels = "any",
    x_scale: float | None = None, x_mean_square: float | None = None, bias: np.ndarray | None = None,
) -> WeightEncoding:
    """The weight's codes in the form that is exact on `kernels` (see the module doc).

    `axis` is the per-channel axis (None: one scale); the reduction order comes from `op_type`
    (Conv, MatMul, Gemm with `trans_b`; a `depthwise` Conv has exact kernels). With `x_scale` and a
    per-channel `bias`, scales also grow
    until the int32 bias codes fit. `x_scale` and `x_mean_square` (the input's E[x^2]) weigh
    widening against the input's own rounding noise; without them only weight noise counts."""
    w = np.asarray(w, dtype=np.float32)
    _, full = quantize_weight(w, axis)
    scales = full.astype(np.float64)
    bias_widened = 0
    if x_scale is not None and bias is not None and bias.size and (axis is None or bias.size == scales.size):
        need = np.abs(bias.astype(np.float64)) / (float(x_scale) * BIAS_CODE_LIMIT)
        need = need.max() if axis is None else need
        bias_widened = int(np.count_nonzero(need > scales))
        scales = np.maximum(scales, need)
    scales = scales.astype(np.float32)
    rows = reduction_rows(op_type, w, trans_b=trans_b)
    channel_of_row = axis is not None  # rows are the per-channel axis for every supported op
    row_scales = scales if channel_of_row else np.full(rows.shape[0], scales, dtype=np.float32)
    codes, _ = quantize_weight(w, axis, scales)
    unsafe = overflowing_rows(reduction_rows(op_type, codes.astype(np.float64), trans_b=trans_b))
    if kernels == "vnni" or depthwise or not unsafe.any():
        return WeightEncoding(codes, scales, axis, "s8", bias_widened=bias_widened)
    safe = safe_scales(rows, row_scales, WEIGHT_QMAX)
    safe = safe if channel_of_row else np.asarray(safe.max(), dtype=np.float32)
    grown = int(np.count_nonzero(np.atleast_1d(safe) > np.atleast_1d(scales)))
    cost_db = widening_cost_db(rows, row_scales, np.broadcast_to(safe, row_scales.shape), x_scale, x_mean_square)
    if cost_db <= SAFE_WIDENING_MAX_DB:
        codes, _ = quantize_weight(w, axis, safe)
        return WeightEncoding(codes, safe, axis, "s8-safe", cost_db, grown, bias_widened)
    u8 = (codes.astype(np.int16) + U8_ZERO_POINT).astype(np.uint8)
    return WeightEncoding(u8, scales, axis, "u8", cost_db, bias_widened=bias_widened)


def widening_cost_db(
    rows: np.ndarray, scales: np.ndarray, widened: np.ndarray, x_scale: float | None, x_mean_square: float | None
) -> float:
    """How much (dB) the widened weight scales raise the layer's output rounding noise: per output
    channel s_w^2 K E[x^2] / 12 from the weights plus s_x^2 |w|^2 / 12 from the input (the 1/12
    cancels). Without input statistics: the weight noise alone."""
    k = rows.shape[1]
    before, after = (np.asarray(s, dtype=np.float64) ** 2 for s in (scales, widened))
    if x_scale is not None and x_mean_square is not None:
        signal = k * float(x_mean_square)
        floor = float(x_scale) ** 2 * np.sum(np.asarray(rows, dtype=np.float64) ** 2, axis=1)
        before, after = before * signal + floor, after * signal + floor
    total = float(np.sum(before))
    return 0.0 if total <= 0 else float(10 * np.log10(np.sum(after) / total))


__all__ = [
    "BIAS_CODE_LIMIT", "KERNELS", "Kernels", "SAFE_WIDENING_MAX_DB", "WeightEncoding", "encode_weight", "quantize_bias",
    "quantize_weight", "widening_cost_db",
]

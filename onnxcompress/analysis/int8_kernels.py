"""What x86 int8 kernels do with the codes a quantizer writes, so it can prove a layer exact.

ONNX Runtime's x86 u8 x s8 GEMM and convolution kernels (MLAS) multiply without VNNI with
VPMADDUBSW: each *pair* of neighbouring u8 * s8 products along the reduction axis is added into a
saturating int16 before it reaches the int32 accumulator. 255 * 127 * 2 = 64,770 does not fit in
int16 (32,767), so a layer whose weights put two large codes of one sign side by side is silently
wrong on AVX2 CPUs (AMD Zen 2/3, Intel before Cascade Lake) while exact on VNNI CPUs, whose
VPDPBUSD adds straight into int32. The kernel multiplies the raw activation code (0..255), the
zero point is applied later, so the worst case is any code up to 255 whatever the encoding.

A layer is exact when, for every output channel and every pair (k, k+1), k even, of the reduction
order, 255 * (sum of the positive codes) <= 32767 and 255 * (sum of the negative codes) >= -32768.
The order is the kernel's: ORT runs convolutions channels-last (its QLinearConv reorders the weight
to [kh, kw, C/g, M]), so a Conv weight [M, C/g, kh, kw] reduces over (kh, kw, c) within its group;
MatMul [K, N] and Gemm over K, in blocks of even length, so the pairs never shift. The same holds
for the indirect "ConvSym" kernels and for AVX-512 without VNNI. Measured on ORT 1.32 under an
emulated Haswell: 1x1 and 3x3 convolutions with 2 to 16 channels, groups 2 and 3, MatMul with
K = 800; an (even) pair at (127, 1) or (64, 64) stays exact, (127, 2) or (64, 65) saturates.

Exact whatever the codes: depthwise convolutions (their kernels widen to int16 and sum in int32),
u8 x u8 kernels (VPMADDWD on widened operands: the fallback for a layer whose s8 codes cannot be
made safe cheaply), s8 x s8 (but ORT turns s8 activations into u8 on x86, so they pair like u8),
and ARM64, whose int16 paths can only overflow on -128 * -128 twice: symmetric codes never use -128.
"""

from __future__ import annotations

import numpy as np

INT16_MIN, INT16_MAX = -32768, 32767
#: The largest activation code the kernel multiplies (uint8).
ACTIVATION_CODE_MAX = 255
#: The largest same-sign sum of two neighbouring s8 weight codes that cannot saturate:
#: 255 * 128 = 32,640 <= 32,767 and -255 * 128 = -32,640 >= -32,768.
PAIR_CODE_LIMIT = INT16_MAX // ACTIVATION_CODE_MAX


def reduction_rows(op_type: str, w: np.ndarray, *, trans_b: bool = False) -> np.ndarray:
    """The weight as [output channels, reduction] in the order the int8 kernel reduces over.

    Conv [M, C/g, kh, kw] -> [M, kh*kw*C/g] (channels-last im2col: channel fastest);
    MatMul [K, N] -> [N, K]; Gemm [K, N], or [N, K] with transB."""
    if op_type == "Conv":
        return np.ascontiguousarray(np.moveaxis(w.reshape(w.shape[0], w.shape[1], -1), 1, 2)).reshape(w.shape[0], -1)
    if op_type == "Gemm" and trans_b:
        return np.asarray(w)
    return np.asarray(w).T


def pair_sums(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the largest sum of the positive parts and the smallest sum of the negative parts
    of the kernel's pairs (k, k+1), k even (an odd last element pairs with the kernel's zero pad)."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.shape[1] % 2:
        rows = np.pad(rows, ((0, 0), (0, 1)))
    pos, neg = np.maximum(rows, 0.0), np.minimum(rows, 0.0)
    return (pos[:, 0::2] + pos[:, 1::2]).max(axis=1, initial=0.0), (neg[:, 0::2] + neg[:, 1::2]).min(axis=1, initial=0.0)


def overflowing_rows(codes: np.ndarray) -> np.ndarray:
    """Boolean per output channel: some pair of s8 codes can saturate int16."""
    hi, lo = pair_sums(codes)
    return (hi > PAIR_CODE_LIMIT) | (lo < -PAIR_CODE_LIMIT)


def safe_scales(rows: np.ndarray, scales: np.ndarray, qmax: int = 127) -> np.ndarray:
    """Per-channel scales, each at least `scales`, under which round(rows / scale) is safe.

    The float neighbour sums give the scale that puts the worst pair exactly at the limit; rounding
    can add one code, so the scale grows a step at a time until the rounded codes are safe."""
    rows = np.asarray(rows, dtype=np.float64)
    hi, lo = pair_sums(rows)
    worst = np.maximum(hi, -lo)
    out = np.maximum(scales.astype(np.float64), worst / PAIR_CODE_LIMIT)
    for _ in range(64):
        codes = np.clip(np.round(rows / out[:, None]), -qmax, qmax)
        bad = overflowing_rows(codes)
        if not bad.any():
            return out.astype(np.float32)
        out[bad] *= 1.0 + 1.0 / (2 * PAIR_CODE_LIMIT)
    raise AssertionError("safe_scales did not converge")  # each step removes at least a fraction of a code


def saturating_dot(x_codes: np.ndarray, w_codes: np.ndarray) -> np.ndarray:
    """int32 u8 x s8 products summed the way VPMADDUBSW kernels do: pairs (0,1), (2,3), ... of the
    reduction axis saturate to int16, then add into int32. x [N, K] uint8, w [M, K] int8 -> [N, M]."""
    x = np.asarray(x_codes, dtype=np.int64)
    w = np.asarray(w_codes, dtype=np.int64)
    if x.shape[1] % 2:
        x, w = np.pad(x, ((0, 0), (0, 1))), np.pad(w, ((0, 0), (0, 1)))
    products = x[:, None, :] * w[None, :, :]  # [N, M, K]
    pairs = np.clip(products[..., 0::2] + products[..., 1::2], INT16_MIN, INT16_MAX)
    return pairs.sum(axis=-1).astype(np.int32)


#: CPU flags (Linux /proc/cpuinfo names) of x86 int8 dot-product instructions that sum into int32.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def host_has_vnni(cpuinfo: str | None = None) -> bool:
    """Whether this CPU's int8 kernels sum u8 x s8 products straight into int32 (x86 VNNI or AMX).
    False where it cannot tell (not Linux): the safe answer."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool(VNNI_FLAGS & set(line.partition(":")[2].split()))
    return False


__all__ = [
    "ACTIVATION_CODE_MAX", "PAIR_CODE_LIMIT", "VNNI_FLAGS", "host_has_vnni", "overflowing_rows", "pair_sums",
    "reduction_rows", "safe_scales", "saturating_dot",
]

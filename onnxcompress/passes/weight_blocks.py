"""Block quantization of a MatMul weight W [K, N] for weight-only int4/int8, and MatMulNBits packing.

Each column n of W is cut along K into blocks of `block_size` rows; every block has its own scale
(and, asymmetric, zero point), so one outlier weight costs precision only in its block.

- **symmetric** (default): scale s = r * max|w| / (qmax + 1/2), codes round(w / s) clipped to
  [-qmax - 1, qmax] (int4: [-8, 7], int8: [-128, 127]); with r = 1 the largest |w| of a block is
  off by at most s/2 like every other weight; r (CLIP_RATIOS) is chosen per block for the least
  squared weight error. s stays positive (ORT's own packer makes s negative to reach -8 with the
  largest |w|; a positive scale is what every DequantizeLinear consumer accepts);
- **asymmetric**: s = (max - min) / (2^bits - 1) over the block with 0 included, zero point
  round(-min / s), codes in [0, 2^bits - 1].

A dequantized weight is exactly s * (code - zero point) in float32, in both output forms.

MatMulNBits (com.microsoft) stores B as uint8 [N, n_blocks, blob_size] with blob_size =
block_size * bits / 8: column n, block b, the codes of rows b*block_size ... in order, two int4
codes a byte (the first in the low nibble), unsigned (a symmetric code + 2^(bits-1), the op's
default zero point); scales as float [N * n_blocks]; zero points (asymmetric only) uint8, int4
packed two a byte per column, [N * ceil(n_blocks * bits / 8)]. K is padded with zero rows to a
whole number of blocks. tests/test_quantize_weight_only.py checks this layout against ORT's own
packer (`quantize_matmul_4bits`/`quantize_matmul_8bits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS: tuple[int, ...] = (4, 8)
#: Default block size per bit width: int4 needs small blocks to keep its 16 levels close to the
#: weights; int8 has 256 levels and spends fewer bytes on scales with long blocks.
DEFAULT_BLOCK = {4: 32, 8: 128}
MIN_BLOCK = 16
#: Symmetric scales tried per block, as fractions of max|w| / (qmax + 1/2): the one with the least
#: squared weight error wins (1.0 first, so ties keep the unclipped scale).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def check_options(bits: int, block_size: int | None) -> int:
    """The block size to use; ValueError (one line) for bits or block sizes MatMulNBits cannot run."""
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    block = DEFAULT_BLOCK[bits] if block_size is None else block_size
    if isinstance(block, bool) or not isinstance(block, int) or block < MIN_BLOCK or block & (block - 1):
        raise ValueError(f"block_size must be a power of 2 and at least {MIN_BLOCK}, got {block_size!r}")
    return block


@dataclass
class BlockCodes:
    """A weight W [K, N] in blocks along K: codes [K, N] (signed when symmetric, else unsigned),
    scales and zero points [n_blocks, N] (zero points None when symmetric)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[0]

    def per_row(self, array: np.ndarray) -> np.ndarray:
        """A per-block array [n_blocks, N] repeated to one row per weight row [K, N]."""
        return np.repeat(array, self.block_size, axis=0)[: self.codes.shape[0]]

    def dequantized(self) -> np.ndarray:
        codes = self.codes.astype(np.float32)
        if self.zero_points is not None:
            codes = codes - self.per_row(self.zero_points).astype(np.float32)
        return (self.per_row(self.scales) * codes).astype(np.float32)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest code."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """W [K, N] zero-padded and viewed as [n_blocks, block_size, N]."""
    k, n = w.shape
    pad = -k % block_size
    padded = np.pad(w, ((0, pad), (0, 0))) if pad else w
    return padded.reshape(-1, block_size, n)


def block_params(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales [n_blocks, N] (float32) and zero points (uint8, asymmetric only) of W [K, N]."""
    blocks = _blocks(np.asarray(w, np.float32), block_size)
    lo, hi = qrange(bits, symmetric)
    if symmetric:
        scales = np.abs(blocks).max(axis=1) / np.float32(hi + 0.5)
        return _best_clip(blocks, np.where(scales > 0, scales, 1.0).astype(np.float32), lo, hi), None
    wmin, wmax = np.minimum(blocks.min(axis=1), 0), np.maximum(blocks.max(axis=1), 0)
    scales = ((wmax - wmin) / np.float32(hi)).astype(np.float32)
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    zero_points = np.clip(np.round(-wmin / scales), lo, hi).astype(np.uint8)
    return scales, zero_points


def _best_clip(blocks: np.ndarray, scales: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Per block, the scale among CLIP_RATIOS x `scales` whose nearest codes reconstruct the block
    with the least squared error (a slightly smaller step clips the largest weight but serves the
    many small ones better)."""
    best, best_err = scales, None
    for ratio in CLIP_RATIOS:
        s = (scales * np.float32(ratio)).astype(np.float32)
        err = np.sum((np.clip(np.round(blocks / s[:, None]), lo, hi) * s[:, None] - blocks) ** 2, axis=1)
        if best_err is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = np.where(better, s, best), np.where(better, err, best_err)
    return best.astype(np.float32)


def round_to_codes(w: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int) -> np.ndarray:
    """Nearest codes of W [..., N] rows under per-row scales/zero points of the same shape."""
    lo, hi = qrange(bits, zero_points is None)
    q = np.round(w / scales)
    if zero_points is not None:
        q = q + zero_points
    return np.clip(q, lo, hi)


def rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True) -> BlockCodes:
    """Round-to-nearest block codes of W [K, N]."""
    w = np.asarray(w, np.float32)
    scales, zero_points = block_params(w, bits, block_size, symmetric)
    empty = BlockCodes(np.zeros(w.shape, np.int16), scales, zero_points, bits, block_size)
    zp = None if zero_points is None else empty.per_row(zero_points).astype(np.float32)
    codes = round_to_codes(w, empty.per_row(scales), zp, bits)
    empty.codes = codes.astype(np.int16)
    return empty


# ---------------------------------------------------------------------------- MatMulNBits layout


def pack_matmulnbits(codes: BlockCodes) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B uint8 [N, n_blocks, blob_size], scales float32 [N * n_blocks], zero points uint8 or None)."""
    bits, block = codes.bits, codes.block_size
    unsigned = codes.codes.astype(np.int16) + (2 ** (bits - 1) if codes.zero_points is None else 0)
    blocks = _blocks(unsigned, block).astype(np.uint8)  # [n_blocks, block, N]; padding rows are code 0 ...
    if codes.zero_points is None:  # ... which must dequantize to 0: the symmetric zero point
        k = codes.codes.shape[0]
        flat = blocks.reshape(-1, blocks.shape[2])
        flat[k:] = 2 ** (bits - 1)
    per_column = np.ascontiguousarray(blocks.transpose(2, 0, 1))  # [N, n_blocks, block]
    packed = _pack_nibbles(per_column) if bits == 4 else per_column
    scales = np.ascontiguousarray(codes.scales.T).reshape(-1).astype(np.float32)
    zero_points = None
    if codes.zero_points is not None:
        zp = np.ascontiguousarray(codes.zero_points.T)  # [N, n_blocks]
        if bits == 4:
            zp = _pack_nibbles(np.pad(zp, ((0, 0), (0, zp.shape[1] % 2))))
        zero_points = zp.reshape(-1)
    return packed, scales, zero_points


def unpack_matmulnbits(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, bits: int
                       ) -> np.ndarray:
    """The float weight [K, N] a MatMulNBits B/scales/zero points stand for (tests, cross-checks)."""
    n, n_blocks = packed.shape[:2]
    values = _unpack_nibbles(packed) if bits == 4 else packed.astype(np.uint8)  # [N, n_blocks, block]
    if zero_points is None:
        zp = np.full((n, n_blocks), 2 ** (bits - 1), np.float32)
    else:
        zp = zero_points.reshape(n, -1)
        zp = (_unpack_nibbles(zp[:, None, :])[:, 0, :n_blocks] if bits == 4 else zp).astype(np.float32)
    w = (values.astype(np.float32) - zp[..., None]) * scales.reshape(n, n_blocks)[..., None]
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 values < 16 on the last axis (even length), two a byte, the first in the low nibble."""
    v = values.astype(np.uint8)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


__all__ = [
    "BITS", "BlockCodes", "CLIP_RATIOS", "DEFAULT_BLOCK", "MIN_BLOCK", "block_params", "check_options", "pack_matmulnbits", "qrange",
    "round_to_codes", "rtn", "unpack_matmulnbits",
]

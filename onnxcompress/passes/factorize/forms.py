"""The matrix forms of a layer's weight that Factorize splits in two (see the package docstring):
reshapings, their MACs and parameters per unit of rank, and the covariance a form's first factor reads."""

from __future__ import annotations

import numpy as np

from .layers import Layer


def layer_forms(layer: Layer, allowed: tuple[str, ...]) -> list[str]:
    if layer.kind != "Conv":
        return ["gemm"]
    k = int(np.prod(layer.weight.shape[2:]))
    out = ["channel"] if "channel" in allowed else []
    if "squeeze" in allowed and k > 1:
        out.append("squeeze")
    if "spatial" in allowed and layer.weight.ndim == 4 and min(layer.weight.shape[2:]) > 1:
        out.append("spatial")
    return out


def matrix(layer: Layer, form: str) -> np.ndarray:
    """The weight as the matrix this form factorizes (rows: input side)."""
    w = layer.weight
    if form == "gemm":
        return w
    o, c = w.shape[:2]
    if form == "channel":
        return w.reshape(o, -1).T
    if form == "squeeze":
        return np.moveaxis(w, 1, 0).reshape(c, -1)
    return w.transpose(1, 2, 0, 3).reshape(c * w.shape[2], o * w.shape[3])  # spatial


def unmatrix(layer: Layer, form: str, mat: np.ndarray) -> np.ndarray:
    """Inverse of `matrix`: the layer's weight (same layout as Layer.weight) from a form's matrix."""
    shape = layer.weight.shape
    if form == "gemm":
        return mat
    o, c = shape[:2]
    if form == "channel":
        return mat.T.reshape(shape)
    if form == "squeeze":
        return np.moveaxis(mat.reshape(c, o, *shape[2:]), 0, 1)
    return mat.reshape(c, shape[2], o, shape[3]).transpose(2, 0, 1, 3)


def macs_per_rank(layer: Layer, form: str) -> int:
    w = layer.weight
    if form == "gemm":
        return layer.rows * (w.shape[0] + w.shape[1])
    o, c, k = w.shape[0], w.shape[1], int(np.prod(w.shape[2:]))
    if form == "channel":
        return layer.rows * (c * k + o)
    if form == "squeeze":
        return layer.in_positions * c + layer.rows * o * k
    batch = layer.in_positions // int(np.prod(layer.in_size))
    mid = batch * layer.out_size[0] * layer.in_size[1]  # first conv: output height x input width
    return mid * c * w.shape[2] + layer.rows * o * w.shape[3]


def params_per_rank(layer: Layer, form: str) -> int:
    m = matrix(layer, form)
    return m.shape[0] + m.shape[1]


def taps(layer: Layer, form: str) -> int:
    """Kernel taps that share a form's first factor: its matrix rows are (input-side index, tap) pairs of
    the layer's im2col rows, with the taps folded into the columns (the channel form reads whole rows)."""
    if form in ("gemm", "channel"):
        return 1
    kernel = layer.weight.shape[2:]
    return int(np.prod(kernel)) if form == "squeeze" else int(kernel[-1])


def form_covariance(layer: Layer, form: str, covariance: np.ndarray) -> np.ndarray:
    """The covariance of what a form's first factor reads, from that of the im2col rows: the
    diagonal (same-tap) blocks averaged over the taps that share the factor."""
    t = taps(layer, form)
    if t == 1:
        return covariance
    m = covariance.shape[0] // t
    return covariance.reshape(m, t, m, t).diagonal(axis1=1, axis2=3).mean(-1)


def io_matrix(weight: np.ndarray) -> np.ndarray:
    """A weight as the matrix that maps input rows (im2col rows for Conv) to outputs."""
    return weight if weight.ndim == 2 else weight.reshape(weight.shape[0], -1).T

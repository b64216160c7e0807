"""Torch translations of the layer operators: Conv, ConvTranspose, Gemm, MatMul, Einsum, pooling,
normalizations and LRN."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .common import Attrs, Handler, Tensor, normalize_axis, torch_pad_order
from .elementwise import binary
from .errors import UnsupportedGraphError


def _spatial_pads(a: Attrs, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    """(begin, end) padding per spatial dim from `pads` or `auto_pad` (SAME_UPPER/SAME_LOWER/VALID)."""
    nd = len(kernel)
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else large)
            end.append(large if auto == "SAME_UPPER" else small)
        return begin, end
    if auto == "VALID":
        return [0] * nd, [0] * nd
    pads = list(a.get("pads", [0] * (2 * nd)))
    return pads[:nd], pads[nd:]


def _conv(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    inp, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    nd = w.dim() - 2
    if nd not in (1, 2, 3):
        raise UnsupportedGraphError(f"Conv with {nd} spatial dims is not supported by the torch executor")
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    begin, end = _spatial_pads(a, inp.shape[2:], w.shape[2:], strides, dil)
    if begin != end:
        inp, begin = F.pad(inp, torch_pad_order(begin, end)), [0] * nd
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return fn(inp, w, b, strides, begin, dil, int(a.get("group", 1)))


def _conv_transpose(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    inp, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    nd = w.dim() - 2
    if nd not in (1, 2, 3):
        raise UnsupportedGraphError(f"ConvTranspose with {nd} spatial dims is not supported by the torch executor")
    if "output_shape" in a or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedGraphError("ConvTranspose with output_shape or SAME auto_pad is not supported by the torch executor")
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    out_pad = list(a.get("output_padding", [0] * nd))
    pads = [0] * (2 * nd) if a.get("auto_pad", "NOTSET") == "VALID" else list(a.get("pads", [0] * (2 * nd)))
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    full = fn(inp, w, None, strides, 0, 0, int(a.get("group", 1)), dil)
    # Output padding extends the far end (zeros before the bias); pads then crop both ends.
    full = F.pad(full, torch_pad_order([0] * nd, out_pad))
    index = [slice(None), slice(None)]
    for i in range(nd):
        index.append(slice(pads[i], full.shape[2 + i] - pads[nd + i]))
    y = full[tuple(index)]
    return y if b is None else y + b.reshape(1, -1, *([1] * nd))


def _gemm(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    A = x[0].transpose(0, 1) if a.get("transA", 0) else x[0]
    B = x[1].transpose(0, 1) if a.get("transB", 0) else x[1]
    y = A @ B
    alpha = float(a.get("alpha", 1.0))
    if alpha != 1.0:
        y = alpha * y
    if len(x) > 2 and x[2] is not None:
        beta = float(a.get("beta", 1.0))
        y = y + (x[2] if beta == 1.0 else beta * x[2])
    return y


def _pool_args(a: Attrs, inp: Tensor) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    begin, end = _spatial_pads(a, inp.shape[2:], kernel, strides, dil)
    return kernel, strides, dil, begin, end


def _torch_pool_pads_ok(kernel: Sequence[int], dil: Sequence[int], begin: Sequence[int], end: Sequence[int]) -> bool:
    """torch pools pad symmetrically and at most half the (dilated) kernel."""
    return list(begin) == list(end) and all(p <= ((k - 1) * d + 1) // 2 for p, k, d in zip(begin, kernel, dil))


def _maxpool(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    inp = x[0]
    kernel, strides, dil, begin, end = _pool_args(a, inp)
    nd = len(kernel)
    if nd not in (1, 2, 3):
        raise UnsupportedGraphError(f"MaxPool with {nd} spatial dims is not supported by the torch executor")
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    ceil = bool(a.get("ceil_mode", 0))
    if not _torch_pool_pads_ok(kernel, dil, begin, end):
        if ceil:
            raise UnsupportedGraphError("MaxPool with ceil_mode and asymmetric pads is not supported by the torch executor")
        inp, begin = F.pad(inp, torch_pad_order(begin, end), value=-math.inf), [0] * nd
    return fn(inp, kernel, strides, begin, dil, ceil_mode=ceil)


def _avgpool(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    inp = x[0]
    kernel, strides, dil, begin, end = _pool_args(a, inp)
    nd = len(kernel)
    if nd not in (1, 2, 3) or any(d != 1 for d in dil):
        raise UnsupportedGraphError("AveragePool with dilations or more than 3 spatial dims is not supported by the torch executor")
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    ceil = bool(a.get("ceil_mode", 0))
    include = bool(a.get("count_include_pad", 0))
    if _torch_pool_pads_ok(kernel, dil, begin, end):
        return fn(inp, kernel, strides, begin, ceil, include)
    if ceil:
        raise UnsupportedGraphError("AveragePool with ceil_mode and asymmetric pads is not supported by the torch executor")
    order = torch_pad_order(begin, end)
    summed = fn(F.pad(inp, order), kernel, strides, 0, False, True)
    if include:
        return summed
    valid = fn(F.pad(torch.ones_like(inp[:1, :1]), order), kernel, strides, 0, False, True)
    return summed / valid  # mean over the taps inside the input only


def _global_pool(reduce: str) -> Handler:
    def run(a: Attrs, x: list, opset: int, n: int) -> Tensor:
        dims = tuple(range(2, x[0].dim()))
        return x[0].mean(dims, keepdim=True) if reduce == "mean" else x[0].amax(dims, keepdim=True)
    return run


def batchnorm(a: Attrs, x: list, opset: int, n: int, *, training: bool = False) -> Tensor:
    inp, scale, bias, mean, var = x[:5]
    eps = float(a.get("epsilon", 1e-5))
    momentum = 1.0 - float(a.get("momentum", 0.9))  # ONNX keeps `momentum` of the old statistics
    return F.batch_norm(inp, mean, var, scale, bias, training, momentum, eps)


def _layernorm(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    inp, scale = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    axis = normalize_axis(int(a.get("axis", -1)), inp.dim())
    eps = float(a.get("epsilon", 1e-5))
    shape = tuple(inp.shape[axis:])
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return F.layer_norm(inp, shape, scale, bias, eps)
    dims = tuple(range(axis, inp.dim()))
    mean = inp.mean(dims, keepdim=True)
    var = ((inp - mean) ** 2).mean(dims, keepdim=True)
    y = (inp - mean) / torch.sqrt(var + eps) * scale
    return y if bias is None else y + bias


def _instancenorm(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return F.instance_norm(x[0], weight=x[1], bias=x[2], eps=float(a.get("epsilon", 1e-5)))


def _lrn(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    inp = x[0]
    size = int(a["size"])
    alpha, beta, bias = float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)), float(a.get("bias", 1.0))
    square = inp * inp
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2  # window [c - lo, c + hi] as in the ONNX spec
    padded = F.pad(square.unsqueeze(1), (0, 0) * (inp.dim() - 2) + (lo, hi)).squeeze(1)
    channels = inp.shape[1]
    window = sum(padded[:, i:i + channels] for i in range(size))
    return inp / (bias + alpha / size * window) ** beta


def _einsum(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return torch.einsum(a["equation"], *x)


LAYER_OPS: dict[str, Handler] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": binary(torch.matmul),
    "Einsum": _einsum,
    "MaxPool": _maxpool, "AveragePool": _avgpool,
    "GlobalAveragePool": _global_pool("mean"), "GlobalMaxPool": _global_pool("max"),
    "BatchNormalization": batchnorm, "LayerNormalization": _layernorm, "InstanceNormalization": _instancenorm,
    "LRN": _lrn,
}

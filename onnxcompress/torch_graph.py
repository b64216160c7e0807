"""ONNX graphs as trainable torch modules, and trained weights written back into the ONNX graph.

Why not onnx2torch: it imports torchvision unconditionally (for NMS and RoIAlign), which only exists
here as a multi-GB CUDA build, and its modules do not keep the link from a parameter back to the
initializer it came from, which writing weights back needs. This executor is small on purpose: it
evaluates the nodes in graph (topological) order with torch functions that follow the ONNX operator
specification, so autograd reaches every initializer.

Float32 initializers that feed a weight or bias slot (Conv, ConvTranspose, Gemm, MatMul, the
affine parameters of normalizations, PRelu slopes, and the constant operand of an Add right after a
MatMul/Conv/Gemm: a bias kept outside the layer) become `nn.Parameter`s; every other initializer is
a buffer. BatchNormalization uses its stored statistics unless the module was built with
`norm_training=True` and is in training mode (then batch statistics, with the running statistics
updated as torch does). `write_back` changes only initializer values: names, nodes and graph inputs
and outputs stay as they were.

An operator outside the supported set raises UnsupportedGraphError naming it, before anything runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from .errors import OnnxCompressError
from .model import graph_inputs


class TorchUnavailableError(OnnxCompressError):
    """PyTorch is needed (the [torch] extra) and is not installed."""


class UnsupportedGraphError(OnnxCompressError):
    """The graph holds an operator (or form of one) the torch executor does not implement."""


try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # pragma: no cover - exercised only without torch
    raise TorchUnavailableError(
        "training (distillation) needs PyTorch: pip install onnxcompress[torch]"
    ) from None

Tensor = torch.Tensor
Attrs = Mapping[str, Any]
Handler = Callable[[Attrs, list, int, int], "Tensor | list[Tensor]"]  # (attrs, inputs, opset, n_outputs)

#: Input slots of each op that hold learnable weights when fed by a float32 initializer.
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1), "PRelu": (1,),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
}
#: An Add with a constant operand right after one of these is the layer's bias kept outside it.
BIASED_LAYERS = frozenset({"MatMul", "Conv", "Gemm", "ConvTranspose"})
ONNX_DOMAINS = ("", "ai.onnx")


# ------------------------------------------------------------------------------------------ helpers


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _torch_dtype(onnx_type: int) -> torch.dtype:
    try:
        np_dtype = ir.DataType(onnx_type).numpy()
        return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype
    except Exception:
        raise UnsupportedGraphError(f"element type {ir.DataType(onnx_type).name} is not supported by the torch executor") from None


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


def _torch_pad_order(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX (begin..., end...) for trailing dims -> F.pad's (last_begin, last_end, ...)."""
    order: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        order += [b, e]
    return order


def _scores_2d(x: Tensor, axis: int) -> tuple[Tensor, tuple[int, ...]]:
    """Softmax before opset 13 works on the input coerced to 2-D at `axis`."""
    shape = tuple(x.shape)
    axis = _axis(axis, x.dim())
    return x.reshape(math.prod(shape[:axis]), -1), shape


# --------------------------------------------------------------------------------- layer operators


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
        inp, begin = F.pad(inp, _torch_pad_order(begin, end)), [0] * nd
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
    full = F.pad(full, _torch_pad_order([0] * nd, out_pad))
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
        inp, begin = F.pad(inp, _torch_pad_order(begin, end), value=-math.inf), [0] * nd
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
    order = _torch_pad_order(begin, end)
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


def _batchnorm(a: Attrs, x: list, opset: int, n: int, *, training: bool = False) -> Tensor:
    inp, scale, bias, mean, var = x[:5]
    eps = float(a.get("epsilon", 1e-5))
    momentum = 1.0 - float(a.get("momentum", 0.9))  # ONNX keeps `momentum` of the old statistics
    return F.batch_norm(inp, mean, var, scale, bias, training, momentum, eps)


def _layernorm(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    inp, scale = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    axis = _axis(int(a.get("axis", -1)), inp.dim())
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


# ------------------------------------------------------------------------------ elementwise ops


def _unary(fn: Callable[[Tensor], Tensor]) -> Handler:
    return lambda a, x, opset, n: fn(x[0])


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Handler:
    return lambda a, x, opset, n: fn(x[0], x[1])


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Handler:
    def run(a: Attrs, x: list, opset: int, n: int) -> Tensor:
        y = x[0]
        for t in x[1:]:
            y = fn(y, t)
        return y
    return run


def _div(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    if x[0].is_floating_point():
        return x[0] / x[1]
    return torch.div(x[0], x[1], rounding_mode="trunc")  # ONNX integer division truncates


def _pow(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return torch.pow(x[0], x[1]).to(x[0].dtype)


def _mod(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return torch.fmod(x[0], x[1]) if a.get("fmod", 0) else torch.remainder(x[0], x[1])


def _mean(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return _variadic(torch.add)(a, x, opset, n) / len(x)


def _clip(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    if opset < 11:
        lo, hi = a.get("min", -math.inf), a.get("max", math.inf)
        return torch.clamp(x[0], float(lo), float(hi))
    lo = x[1] if len(x) > 1 else None
    hi = x[2] if len(x) > 2 else None
    return torch.clamp(x[0], lo, hi)


def _softmax(fn: Callable[..., Tensor]) -> Handler:
    def run(a: Attrs, x: list, opset: int, n: int) -> Tensor:
        if opset >= 13:
            return fn(x[0], dim=int(a.get("axis", -1)))
        flat, shape = _scores_2d(x[0], int(a.get("axis", 1)))
        return fn(flat, dim=1).reshape(shape)
    return run


def _hardsigmoid(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return torch.clamp(float(a.get("alpha", 0.2)) * x[0] + float(a.get("beta", 0.5)), 0.0, 1.0)


def _prelu(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return torch.where(x[0] < 0, x[0] * x[1], x[0])


def _gelu(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return F.gelu(x[0], approximate=a.get("approximate", "none"))


def _dropout(a: Attrs, x: list, opset: int, n: int) -> list[Tensor]:
    outs = [x[0]]
    if n > 1:
        outs.append(torch.ones_like(x[0], dtype=torch.bool))
    return outs


def _cast(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return x[0].to(_torch_dtype(int(a["to"])))


# --------------------------------------------------------------------------------- shape operators


def _shape(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    dims = list(x[0].shape)
    start, end = a.get("start", 0), a.get("end", None)
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _constant(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    if "value" in a:
        return a["value"]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    raise UnsupportedGraphError(f"Constant with attribute {sorted(a)} is not supported by the torch executor")


def _constant_of_shape(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    value = a.get("value")
    fill = value.reshape(-1)[0] if value is not None else torch.tensor(0.0)
    return torch.full(_ints(x[0]), fill.item(), dtype=fill.dtype)


def _reshape(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    shape = _ints(x[1])
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x[0].reshape(shape)


def _flatten(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    axis = _axis(int(a.get("axis", 1)), x[0].dim())
    return x[0].reshape(math.prod(x[0].shape[:axis]), math.prod(x[0].shape[axis:]))


def _transpose(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    perm = a.get("perm") or list(reversed(range(x[0].dim())))
    return x[0].permute(*perm)


def _axes_of(a: Attrs, x: list, opset: int, since: int) -> list[int] | None:
    """Axes from the attribute (before opset `since`) or the optional second input."""
    if opset < since:
        return list(a["axes"]) if "axes" in a else None
    return _ints(x[1]) if len(x) > 1 else None


def _squeeze(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    axes = _axes_of(a, x, opset, 13)
    if axes is None:
        return x[0].squeeze()
    rank = x[0].dim()
    return x[0].squeeze(tuple(_axis(ax, rank) for ax in axes))


def _unsqueeze(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    axes = _axes_of(a, x, opset, 13)
    rank = x[0].dim() + len(axes)
    y = x[0]
    for ax in sorted(_axis(ax, rank) for ax in axes):
        y = y.unsqueeze(ax)
    return y


def _concat(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return torch.cat([t for t in x if t is not None], dim=int(a["axis"]))


def _split(a: Attrs, x: list, opset: int, n: int) -> list[Tensor]:
    inp = x[0]
    axis = _axis(int(a.get("axis", 0)), inp.dim())
    if opset < 13:
        sizes = list(a["split"]) if "split" in a else None
    else:
        sizes = _ints(x[1]) if len(x) > 1 and x[1] is not None else None
    if sizes is None:
        parts = int(a.get("num_outputs", n))
        sizes = math.ceil(inp.shape[axis] / parts)
    return list(torch.split(inp, sizes, dim=axis))


def _slice(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    inp = x[0]
    if opset < 10:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    y = inp
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, inp.dim())
        dim = inp.shape[axis]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            index = [slice(None)] * inp.dim()
            index[axis] = slice(start, end, step)
            y = y[tuple(index)]
        else:  # torch has no negative-step slicing: gather the indices
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            idx = torch.arange(start, end, step, dtype=torch.int64)
            y = y.index_select(axis, idx)
    return y


def _gather(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    data, idx = x[0], x[1].to(torch.int64)
    axis = _axis(int(a.get("axis", 0)), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    flat = data.index_select(axis, idx.reshape(-1))
    return flat.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1:]))  # () for a scalar


def _gather_elements(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    data, idx = x[0], x[1].to(torch.int64)
    axis = _axis(int(a.get("axis", 0)), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    return torch.gather(data, axis, idx)


def _expand(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    shape = torch.broadcast_shapes(tuple(x[0].shape), tuple(_ints(x[1])))
    return x[0].expand(shape)


def _tile(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return x[0].repeat(*_ints(x[1]))


def _range(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)


def _where(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return torch.where(x[0].to(torch.bool), x[1], x[2])


def _pad(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    inp = x[0]
    rank = inp.dim()
    mode = a.get("mode", "constant")
    if opset < 11:
        pads, value, axes = list(a["pads"]), float(a.get("value", 0.0)), list(range(rank))
    else:
        pads = _ints(x[1])
        value = x[2].item() if len(x) > 2 and x[2] is not None and x[2].numel() else 0.0
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(rank))
    axes = [_axis(ax, rank) for ax in axes]
    begin, end = [0] * rank, [0] * rank
    for i, ax in enumerate(axes):
        begin[ax], end[ax] = pads[i], pads[len(axes) + i]
    first = next((d for d in range(rank) if begin[d] or end[d]), rank)
    order = _torch_pad_order(begin[first:], end[first:])
    if not order:
        return inp
    if mode == "constant":
        return F.pad(inp, order, value=value)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None or first < 2 or rank - first > 3:
        raise UnsupportedGraphError(f"Pad mode '{mode}' on these axes is not supported by the torch executor")
    return F.pad(inp, order, mode=torch_mode)


def _resize(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    inp = x[0]
    if opset < 11:
        scales, sizes = x[1], None
    else:
        scales = x[2] if len(x) > 2 and x[2] is not None and x[2].numel() else None
        sizes = x[3] if len(x) > 3 and x[3] is not None and x[3].numel() else None
    mode = a.get("mode", "nearest")
    coord = a.get("coordinate_transformation_mode", "half_pixel" if opset >= 11 else "asymmetric")
    nearest = a.get("nearest_mode", "round_prefer_floor")
    if a.get("antialias", 0) or a.get("axes") is not None:
        raise UnsupportedGraphError("Resize with antialias or axes is not supported by the torch executor")
    spatial = inp.dim() - 2
    if mode == "nearest" and coord == "asymmetric" and nearest == "floor":
        torch_mode, align = "nearest", None
    elif mode == "nearest" and coord in ("half_pixel", "pytorch_half_pixel") and nearest == "round_prefer_ceil":
        torch_mode, align = "nearest-exact", None
    elif mode == "linear" and coord in ("half_pixel", "pytorch_half_pixel", "align_corners") and 1 <= spatial <= 3:
        torch_mode = ("linear", "bilinear", "trilinear")[spatial - 1]
        align = coord == "align_corners"
    else:
        raise UnsupportedGraphError(
            f"Resize mode '{mode}' with '{coord}' coordinates (nearest_mode '{nearest}') is not supported by the torch executor"
        )
    if sizes is not None:
        target = _ints(sizes)
        if target[:2] != list(inp.shape[:2]):
            raise UnsupportedGraphError("Resize of the batch or channel axis is not supported by the torch executor")
        return F.interpolate(inp, size=target[2:], mode=torch_mode, align_corners=align)
    factors = [float(s) for s in scales.reshape(-1).tolist()]
    if factors[:2] != [1.0, 1.0]:
        raise UnsupportedGraphError("Resize of the batch or channel axis is not supported by the torch executor")
    return F.interpolate(inp, scale_factor=factors[2:], mode=torch_mode, align_corners=align,
                         recompute_scale_factor=False)


def _reduce(kind: str, axes_input_since: int = 18) -> Handler:
    def run(a: Attrs, x: list, opset: int, n: int) -> Tensor:
        inp = x[0]
        axes = _axes_of(a, x, opset, axes_input_since)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return inp
            axes = list(range(inp.dim()))
        dims = tuple(_axis(ax, inp.dim()) for ax in axes)
        if kind == "mean":
            return inp.mean(dims, keepdim=keep)
        if kind == "sum":
            return inp.sum(dims, keepdim=keep)
        if kind == "max":
            return inp.amax(dims, keepdim=keep)
        if kind == "min":
            return inp.amin(dims, keepdim=keep)
        if kind == "l2":
            return torch.sqrt((inp * inp).sum(dims, keepdim=keep))
        if kind == "l1":
            return inp.abs().sum(dims, keepdim=keep)
        if kind == "sumsquare":
            return (inp * inp).sum(dims, keepdim=keep)
        if kind == "logsumexp":
            return torch.logsumexp(inp, dims, keepdim=keep)
        y = inp
        for d in sorted(dims, reverse=True):  # prod
            y = y.prod(d, keepdim=keep)
        return y
    return run


def _arg(fn: Callable[..., Tensor]) -> Handler:
    def run(a: Attrs, x: list, opset: int, n: int) -> Tensor:
        axis, keep = int(a.get("axis", 0)), bool(a.get("keepdims", 1))
        inp = x[0]
        if a.get("select_last_index", 0):
            axis = _axis(axis, inp.dim())
            return inp.shape[axis] - 1 - fn(inp.flip(axis), dim=axis, keepdim=keep)
        return fn(inp, dim=axis, keepdim=keep)
    return run


def _einsum(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return torch.einsum(a["equation"], *x)


OPS: dict[str, Handler] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _binary(torch.matmul),
    "Einsum": _einsum,
    "MaxPool": _maxpool, "AveragePool": _avgpool,
    "GlobalAveragePool": _global_pool("mean"), "GlobalMaxPool": _global_pool("max"),
    "BatchNormalization": _batchnorm, "LayerNormalization": _layernorm, "InstanceNormalization": _instancenorm,
    "LRN": _lrn,
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div, "Pow": _pow,
    "Mod": _mod, "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Mean": _mean,
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt), "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor),
    "Not": _unary(torch.logical_not), "Where": _where,
    "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf), "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt),
    "Abs": _unary(torch.abs), "Neg": _unary(torch.neg), "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil), "Round": _unary(torch.round),
    "Sign": _unary(torch.sign), "Sin": _unary(torch.sin), "Cos": _unary(torch.cos),
    "Softplus": _unary(F.softplus), "Softsign": _unary(F.softsign), "Mish": _unary(F.mish),
    "HardSwish": _unary(F.hardswish), "HardSigmoid": _hardsigmoid, "Gelu": _gelu,
    "LeakyRelu": lambda a, x, o, n: F.leaky_relu(x[0], float(a.get("alpha", 0.01))),
    "Elu": lambda a, x, o, n: F.elu(x[0], float(a.get("alpha", 1.0))),
    "Selu": lambda a, x, o, n: float(a.get("gamma", 1.0507009873554805)) * F.elu(x[0], float(a.get("alpha", 1.6732632423543772))),
    "PRelu": _prelu, "Clip": _clip,
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "Identity": _unary(lambda t: t), "Dropout": _dropout, "Cast": _cast,
    "CastLike": lambda a, x, o, n: x[0].to(x[1].dtype),
    "Shape": _shape, "Size": lambda a, x, o, n: torch.tensor(x[0].numel(), dtype=torch.int64),
    "Constant": _constant, "ConstantOfShape": _constant_of_shape,
    "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze, "Concat": _concat, "Split": _split, "Slice": _slice, "Gather": _gather,
    "GatherElements": _gather_elements, "Expand": _expand, "Tile": _tile, "Range": _range, "Pad": _pad,
    "Resize": _resize, "Upsample": _resize,
    "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum", 13), "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"), "ReduceProd": _reduce("prod"), "ReduceL2": _reduce("l2"),
    "ReduceL1": _reduce("l1"), "ReduceSumSquare": _reduce("sumsquare"), "ReduceLogSumExp": _reduce("logsumexp"),
    "ArgMax": _arg(torch.argmax), "ArgMin": _arg(torch.argmin),
}


# ------------------------------------------------------------------------------------- the module


def _attr_value(attr: ir.Attr) -> Any:
    if attr.type == ir.AttributeType.TENSOR:
        return torch.from_numpy(np.array(attr.value.numpy()))
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        raise UnsupportedGraphError(f"attribute '{attr.name}' holds a subgraph, which the torch executor does not run")
    value = attr.value
    return tuple(value) if isinstance(value, (list, tuple)) else value


def opset_version(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def unsupported_ops(model: ir.Model) -> list[str]:
    """Op types (domain-qualified outside the default domain) the executor cannot run, sorted."""
    missing = set()
    for node in model.graph:
        if node.domain not in ONNX_DOMAINS:
            missing.add(f"{node.domain}::{node.op_type}")
        elif node.op_type not in OPS:
            missing.add(node.op_type)
    return sorted(missing)


def weight_initializers(model: ir.Model) -> list[str]:
    """Names of float32 initializers that feed a weight or bias slot (see the module docstring)."""
    graph = model.graph
    fed = {v.name for v in graph_inputs(model)}
    names: list[str] = []

    def take(value: ir.Value | None) -> None:
        if value is None or value.name in fed or value.name in names:
            return
        init = graph.initializers.get(value.name)
        if init is not None and init.const_value is not None and init.const_value.dtype == ir.DataType.FLOAT:
            names.append(value.name)

    for node in graph:
        if node.domain not in ONNX_DOMAINS:
            continue
        for slot in WEIGHT_SLOTS.get(node.op_type, ()):
            if slot < len(node.inputs):
                take(node.inputs[slot])
        if node.op_type == "Add" and len(node.inputs) == 2:
            for mine, other in ((0, 1), (1, 0)):
                producer = node.inputs[other].producer() if node.inputs[other] is not None else None
                if producer is not None and producer.op_type in BIASED_LAYERS:
                    take(node.inputs[mine])
    return names


@dataclass(frozen=True)
class _Step:
    label: str
    op: str
    handler: Handler
    attrs: Mapping[str, Any]
    inputs: tuple[str, ...]  # "" for an omitted optional input
    outputs: tuple[str, ...]


class GraphModule(nn.Module):
    """An ONNX graph evaluated with torch; `forward(feeds)` returns the graph outputs (and any `extra` values)."""

    def __init__(self, model: ir.Model, *, trainable: bool = True, norm_training: bool = False) -> None:
        super().__init__()
        missing = unsupported_ops(model)
        if missing:
            raise UnsupportedGraphError(f"the torch executor does not support op {', '.join(missing)}")
        graph = model.graph
        self.opset = opset_version(model)
        self.norm_training = norm_training
        self.input_names = [v.name for v in graph_inputs(model)]
        self.output_names = [v.name for v in graph.outputs]
        learnable = set(weight_initializers(model)) if trainable else set()
        self.weights = nn.ParameterList()
        self.weight_names: list[str] = []
        self._slots: list[tuple[str, str]] = []  # (value name, attribute holding its tensor)
        self.norm_stats: list[str] = []
        fed = set(self.input_names)
        for i, (name, value) in enumerate(graph.initializers.items()):
            if name in fed or value.const_value is None:
                continue
            tensor = torch.from_numpy(np.array(value.const_value.numpy()))
            if name in learnable:
                self._slots.append((name, f"weights.{len(self.weight_names)}"))
                self.weights.append(nn.Parameter(tensor))
                self.weight_names.append(name)
            else:
                self.register_buffer(f"const_{i}", tensor, persistent=False)
                self._slots.append((name, f"const_{i}"))
        self._steps: list[_Step] = []
        for k, node in enumerate(graph):
            label = node.name or f"{node.op_type}_{k}"
            attrs = {name: _attr_value(attr) for name, attr in node.attributes.items()}
            handler = OPS[node.op_type]
            if node.op_type == "BatchNormalization" and norm_training:
                handler = self._batchnorm_step
                self.norm_stats += [v.name for v in node.inputs[3:5] if v is not None and v.name in graph.initializers]
            self._steps.append(_Step(
                label, node.op_type, handler, attrs,
                tuple(v.name if v is not None else "" for v in node.inputs),
                tuple(v.name if v is not None else "" for v in node.outputs),
            ))

    def _batchnorm_step(self, a: Attrs, x: list, opset: int, n: int) -> Tensor:
        return _batchnorm(a, x, opset, n, training=self.training)

    def tensors(self) -> dict[str, Tensor]:
        """Initializer name -> its current tensor (parameter or buffer)."""
        return {name: self._tensor(slot) for name, slot in self._slots}

    def _tensor(self, slot: str) -> Tensor:
        return self.weights[int(slot.split(".")[1])] if slot.startswith("weights.") else getattr(self, slot)

    def forward(self, feeds: Mapping[str, Tensor], extra: Sequence[str] = ()) -> list[Tensor]:
        env: dict[str, Tensor | None] = {"": None}
        for name, slot in self._slots:
            env[name] = self._tensor(slot)
        for name in self.input_names:
            env[name] = feeds[name]
        for step in self._steps:
            args = [env[name] for name in step.inputs]
            try:
                result = step.handler(step.attrs, args, self.opset, len(step.outputs))
            except OnnxCompressError:
                raise
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise UnsupportedGraphError(f"torch executor failed at node {step.label} ({step.op}): {first}") from None
            results = result if isinstance(result, (list, tuple)) else [result]
            for name, value in zip(step.outputs, results):
                if name:
                    env[name] = value
        return [env[name] for name in (*self.output_names, *extra)]

    def write_back(self, model: ir.Model) -> list[str]:
        """Copy trained values into `model`'s initializers of the same names; returns the names changed.

        Only values change (each keeps its dtype and shape): names, nodes, inputs and outputs do not.
        """
        tensors = self.tensors()
        changed = []
        for name in (*self.weight_names, *self.norm_stats):
            value = model.graph.initializers[name]
            old = value.const_value.numpy()
            new = tensors[name].detach().cpu().numpy().astype(old.dtype, copy=False)
            if new.shape != old.shape:
                raise OnnxCompressError(f"initializer '{name}' changed shape during training: {old.shape} -> {new.shape}")
            if not np.array_equal(new, old):
                value.const_value = ir.tensor(np.ascontiguousarray(new), name=name)
                changed.append(name)
        return changed


def to_torch(model: ir.Model, *, trainable: bool = True, norm_training: bool = False) -> GraphModule:
    """`model` as a torch module (weights copied: the model is not modified until `write_back`)."""
    return GraphModule(model, trainable=trainable, norm_training=norm_training)


__all__ = [
    "GraphModule", "OPS", "TorchUnavailableError", "UnsupportedGraphError", "to_torch", "unsupported_ops",
    "weight_initializers",
]

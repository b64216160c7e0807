"""Torch translations of shape and data-movement operators: Shape, Constant, Reshape, Transpose,
Squeeze/Unsqueeze, Concat, Split, Slice, Gather, Expand, Tile, Range, Pad, Resize."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import Attrs, Handler, Tensor, axes_of, ints, normalize_axis, torch_pad_order
from .errors import UnsupportedGraphError


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
    return torch.full(ints(x[0]), fill.item(), dtype=fill.dtype)


def _reshape(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    shape = ints(x[1])
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x[0].reshape(shape)


def _flatten(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    axis = normalize_axis(int(a.get("axis", 1)), x[0].dim())
    return x[0].reshape(math.prod(x[0].shape[:axis]), math.prod(x[0].shape[axis:]))


def _transpose(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    perm = a.get("perm") or list(reversed(range(x[0].dim())))
    return x[0].permute(*perm)


def _squeeze(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    axes = axes_of(a, x, opset, 13)
    if axes is None:
        return x[0].squeeze()
    rank = x[0].dim()
    return x[0].squeeze(tuple(normalize_axis(ax, rank) for ax in axes))


def _unsqueeze(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    axes = axes_of(a, x, opset, 13)
    rank = x[0].dim() + len(axes)
    y = x[0]
    for ax in sorted(normalize_axis(ax, rank) for ax in axes):
        y = y.unsqueeze(ax)
    return y


def _concat(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return torch.cat([t for t in x if t is not None], dim=int(a["axis"]))


def _split(a: Attrs, x: list, opset: int, n: int) -> list[Tensor]:
    inp = x[0]
    axis = normalize_axis(int(a.get("axis", 0)), inp.dim())
    if opset < 13:
        sizes = list(a["split"]) if "split" in a else None
    else:
        sizes = ints(x[1]) if len(x) > 1 and x[1] is not None else None
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
        starts, ends = ints(x[1]), ints(x[2])
        axes = ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    y = inp
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = normalize_axis(axis, inp.dim())
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
    axis = normalize_axis(int(a.get("axis", 0)), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    flat = data.index_select(axis, idx.reshape(-1))
    return flat.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1:]))  # () for a scalar


def _gather_elements(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    data, idx = x[0], x[1].to(torch.int64)
    axis = normalize_axis(int(a.get("axis", 0)), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    return torch.gather(data, axis, idx)


def _expand(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    shape = torch.broadcast_shapes(tuple(x[0].shape), tuple(ints(x[1])))
    return x[0].expand(shape)


def _tile(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return x[0].repeat(*ints(x[1]))


def _range(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)


def _pad(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    inp = x[0]
    rank = inp.dim()
    mode = a.get("mode", "constant")
    if opset < 11:
        pads, value, axes = list(a["pads"]), float(a.get("value", 0.0)), list(range(rank))
    else:
        pads = ints(x[1])
        value = x[2].item() if len(x) > 2 and x[2] is not None and x[2].numel() else 0.0
        axes = ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(rank))
    axes = [normalize_axis(ax, rank) for ax in axes]
    begin, end = [0] * rank, [0] * rank
    for i, ax in enumerate(axes):
        begin[ax], end[ax] = pads[i], pads[len(axes) + i]
    first = next((d for d in range(rank) if begin[d] or end[d]), rank)
    order = torch_pad_order(begin[first:], end[first:])
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
        target = ints(sizes)
        if target[:2] != list(inp.shape[:2]):
            raise UnsupportedGraphError("Resize of the batch or channel axis is not supported by the torch executor")
        return F.interpolate(inp, size=target[2:], mode=torch_mode, align_corners=align)
    factors = [float(s) for s in scales.reshape(-1).tolist()]
    if factors[:2] != [1.0, 1.0]:
        raise UnsupportedGraphError("Resize of the batch or channel axis is not supported by the torch executor")
    return F.interpolate(inp, scale_factor=factors[2:], mode=torch_mode, align_corners=align,
                         recompute_scale_factor=False)


DATA_MOVEMENT_OPS: dict[str, Handler] = {
    "Shape": _shape, "Size": lambda a, x, o, n: torch.tensor(x[0].numel(), dtype=torch.int64),
    "Constant": _constant, "ConstantOfShape": _constant_of_shape,
    "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze, "Concat": _concat, "Split": _split, "Slice": _slice, "Gather": _gather,
    "GatherElements": _gather_elements, "Expand": _expand, "Tile": _tile, "Range": _range, "Pad": _pad,
    "Resize": _resize, "Upsample": _resize,
}

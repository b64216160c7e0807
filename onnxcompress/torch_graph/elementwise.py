"""Torch translations of elementwise operators (unary, binary, variadic, comparisons, activations,
Cast, Dropout, Where), softmax and the reductions over axes."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from .common import Attrs, Handler, Tensor, axes_of, normalize_axis
from .errors import UnsupportedGraphError


def _torch_dtype(onnx_type: int) -> torch.dtype:
    try:
        np_dtype = ir.DataType(onnx_type).numpy()
        return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype
    except Exception:
        raise UnsupportedGraphError(f"element type {ir.DataType(onnx_type).name} is not supported by the torch executor") from None


def _scores_2d(x: Tensor, axis: int) -> tuple[Tensor, tuple[int, ...]]:
    """Softmax before opset 13 works on the input coerced to 2-D at `axis`."""
    shape = tuple(x.shape)
    axis = normalize_axis(axis, x.dim())
    return x.reshape(math.prod(shape[:axis]), -1), shape


def _unary(fn: Callable[[Tensor], Tensor]) -> Handler:
    return lambda a, x, opset, n: fn(x[0])


def binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Handler:
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


def _where(a: Attrs, x: list, opset: int, n: int) -> Tensor:
    return torch.where(x[0].to(torch.bool), x[1], x[2])


def _reduce(kind: str, axes_input_since: int = 18) -> Handler:
    def run(a: Attrs, x: list, opset: int, n: int) -> Tensor:
        inp = x[0]
        axes = axes_of(a, x, opset, axes_input_since)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return inp
            axes = list(range(inp.dim()))
        dims = tuple(normalize_axis(ax, inp.dim()) for ax in axes)
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
            axis = normalize_axis(axis, inp.dim())
            return inp.shape[axis] - 1 - fn(inp.flip(axis), dim=axis, keepdim=keep)
        return fn(inp, dim=axis, keepdim=keep)
    return run


ELEMENTWISE_OPS: dict[str, Handler] = {
    "Add": binary(torch.add), "Sub": binary(torch.sub), "Mul": binary(torch.mul), "Div": _div, "Pow": _pow,
    "Mod": _mod, "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Mean": _mean,
    "Equal": binary(torch.eq), "Less": binary(torch.lt), "LessOrEqual": binary(torch.le),
    "Greater": binary(torch.gt), "GreaterOrEqual": binary(torch.ge),
    "And": binary(torch.logical_and), "Or": binary(torch.logical_or), "Xor": binary(torch.logical_xor),
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
    "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum", 13), "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"), "ReduceProd": _reduce("prod"), "ReduceL2": _reduce("l2"),
    "ReduceL1": _reduce("l1"), "ReduceSumSquare": _reduce("sumsquare"), "ReduceLogSumExp": _reduce("logsumexp"),
    "ArgMax": _arg(torch.argmax), "ArgMin": _arg(torch.argmin),
}

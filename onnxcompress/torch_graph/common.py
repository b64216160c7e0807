"""Types and helpers every op translation uses: handler signature, integer lists from tensors, axes,
padding order."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

Tensor = torch.Tensor
Attrs = Mapping[str, Any]
Handler = Callable[[Attrs, list, int, int], "Tensor | list[Tensor]"]  # (attrs, inputs, opset, n_outputs)


def ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def torch_pad_order(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX (begin..., end...) for trailing dims -> F.pad's (last_begin, last_end, ...)."""
    order: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        order += [b, e]
    return order


def axes_of(a: Attrs, x: list, opset: int, since: int) -> list[int] | None:
    """Axes from the attribute (before opset `since`) or the optional second input."""
    if opset < since:
        return list(a["axes"]) if "axes" in a else None
    return ints(x[1]) if len(x) > 1 else None

"""Checks on the input model before any work starts: can ONNX Runtime run it at all, and do the
input shapes fit it and this machine. Each failure is the user's to fix (exit 2), said in one line
that names the op, the domain or the input, instead of a verification failure minutes later."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from .errors import InputShapeError, UnsupportedModelError
from .model import graph_inputs, input_dtype

#: Standard ONNX domains: ORT runs their ops as kernels or expands them as ONNX functions, so an op
#: missing from its kernel list is not unsupported for that alone.
_STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


def unsupported_nodes(model: ir.Model) -> list[ir.Node]:
    """Nodes of a non-standard domain that ONNX Runtime's CPU provider has no kernel for and the
    model does not define as a function: custom ops, which only a custom-op library can run."""
    kernels = _ort_kernels()
    local = {(f.domain, f.name) for f in model.functions.values()}
    found = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        key = (node.domain, node.op_type)
        if node.domain in _STANDARD_DOMAINS or key in local:
            continue
        if (kernels is not None and key not in kernels) or (kernels is None and node.domain not in _KNOWN_DOMAINS):
            found.append(node)
    return found


#: When ORT does not list its kernels: the domains its CPU provider implements.
_KNOWN_DOMAINS = frozenset({"ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc"})


@functools.lru_cache(maxsize=1)
def _ort_kernels() -> frozenset[tuple[str, str]] | None:
    """(domain, op) of every CPU kernel registered in this onnxruntime, or None if it cannot say."""
    try:
        from onnxruntime.capi import _pybind_state

        return frozenset((d.domain, d.op_name) for d in _pybind_state.get_all_opkernel_def()
                         if d.provider == "CPUExecutionProvider")
    except Exception:  # a private API: fall back to the domain list
        return None


def check_runnable(model: ir.Model, what: str = "the input model") -> None:
    """UnsupportedModelError naming the first custom op when ONNX Runtime cannot run `model`."""
    nodes = unsupported_nodes(model)
    if not nodes:
        return
    first = nodes[0]
    others = f" (and {len(nodes) - 1} more such nodes)" if len(nodes) > 1 else ""
    raise UnsupportedModelError(
        f"ONNX Runtime cannot run {what}: node '{first.name}' is op {first.op_type} of the custom domain "
        f"'{first.domain}'{others}, which ONNX Runtime does not implement; `onnxcompress analyze` works on it, "
        "and `optimize --no-verify --bench-runs 0` (without --calib) applies the passes that need no run"
    )


#: Ops whose output dims shrink with their input's (kernel windows): an output dim of 0 there means
#: the input is smaller than the window, not an empty tensor the graph means to carry.
_WINDOW_OPS = frozenset({"Conv", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool", "QLinearAveragePool"})


def check_shapes(model: ir.Model, shapes: Mapping[str, Sequence[int]], given: Mapping[str, Sequence[int]] | None = None,
                 *, calibration=None, memory: bool = True) -> None:
    """InputShapeError when the resolved input `shapes` are too small for the model (a kernel window
    larger than its input) or, with `memory`, one tensor at them would not fit in this machine's
    memory. The message names where each shape came from: `given` (--input-shape) or `calibration`."""
    from .analysis.shapes import node_output_dims

    where = _describe(shapes, given or {}, calibration)
    _check_channels(model, shapes, where)
    outputs = node_output_dims(model, shapes)
    for out in outputs:
        if min(out.dims, default=0) < 0 or (out.op_type in _WINDOW_OPS and 0 in out.dims[1:]):
            raise InputShapeError(f"{where} is too small for this model: node '{out.node}' ({out.op_type}) would "
                                  f"output shape {list(out.dims)}; give a larger input shape{_layout_hint(shapes)}")
    total = physical_memory() if memory else None
    if total is None:
        return
    tensors = [(f"input '{v.name}'", math.prod(shapes[v.name]) * np.dtype(input_dtype(v)).itemsize)
               for v in graph_inputs(model) if v.name in shapes]
    tensors += [(f"the output of node '{o.node}' ({o.op_type})", math.prod(o.dims) * o.dtype.itemsize)
                for o in outputs if o.dtype is not None]
    name, need = max(tensors, key=lambda t: t[1], default=("", 0))
    if need > total:  # numpy would raise MemoryError mid-run, or the machine swap for minutes first
        raise InputShapeError(f"{where} is too large for this machine: {name} alone needs {_gib(need)} of memory, "
                              f"more than its {_gib(total)}; give a smaller input shape")


def _check_channels(model: ir.Model, shapes: Mapping[str, Sequence[int]], where: str) -> None:
    """A Conv fed straight from a graph input fixes that input's channel count (weight dim 1 x group),
    even where the model leaves the dim open; shape inference does not compare them, ORT fails later."""
    for node in model.graph:
        if node.op_type != "Conv" or node.domain not in _STANDARD_DOMAINS or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if x is None or x.name not in shapes or w is None or w.const_value is None or len(shapes[x.name]) < 2:
            continue
        attr = node.attributes.get("group")
        want = int(w.const_value.shape[1]) * (attr.as_int() if attr is not None else 1)
        got = int(shapes[x.name][1])
        if got != want:
            raise InputShapeError(f"{where}: node '{node.name}' (Conv) takes {want} channels on dim 1 of input "
                                  f"'{x.name}', given {got}; wrong channel count{_layout_hint(shapes) or ' or layout'}")


def _layout_hint(shapes: Mapping[str, Sequence[int]]) -> str:
    """A 4-d input whose last dim looks like colour channels and second does not: NHWC given to an NCHW model?"""
    for name, dims in shapes.items():
        if len(dims) == 4 and dims[-1] in (1, 3, 4) and dims[1] not in (1, 3, 4):
            return f" (or is '{name}' channels-last, NHWC, where the model wants NCHW?)"
    return ""


def physical_memory() -> int | None:
    """Bytes of physical memory, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _describe(shapes: Mapping[str, Sequence[int]], given: Mapping[str, Sequence[int]], calibration) -> str:
    """Each input's shape and where it came from: --input-shape, the calibration data, or the model."""
    parts = []
    for name, dims in shapes.items():
        text = "x".join(str(int(d)) for d in dims)
        if name in given:
            parts.append(f"--input-shape {name}={text}")
        elif calibration is not None and name in calibration.arrays:
            parts.append(f"input '{name}' at {text} (from {calibration.source})")
        else:
            parts.append(f"input '{name}' at {text}")
    return ", ".join(parts) or "the model's inputs"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"

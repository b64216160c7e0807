"""The layers Factorize can rewrite: Gemm/MatMul/Conv nodes with a constant float32 weight, as a
`Layer` (effective weight and bias in float64, and the geometry of a Conv)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..linear import matmul_bias_add


@dataclass
class Layer:
    """A factorizable node: its effective weight and bias in float64, and its geometry."""

    node: ir.Node
    kind: str  # "Gemm" | "MatMul" | "Conv"
    weight: np.ndarray  # Gemm/MatMul: [K, N] with y = x·W; Conv: [O, C, *kernel]
    bias: np.ndarray | None  # effective bias ([N] or [O]); Gemm: beta·C
    bias_add: ir.Node | None = None  # MatMul: the Add holding its bias, when it can be refitted
    rows: int = 0  # Gemm/MatMul: rows of x; Conv: output positions
    x_shape: tuple[int, ...] = ()  # the input's static shape
    in_positions: int = 0  # Conv: input spatial positions
    in_size: tuple[int, ...] = ()
    out_size: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads_begin: tuple[int, ...] = ()
    pads_end: tuple[int, ...] = ()

    @property
    def macs(self) -> int:
        return self.rows * int(self.weight.size)

    @property
    def can_refit_bias(self) -> bool:
        return self.kind != "MatMul" or self.bias_add is not None

    def input_features(self) -> int:
        return self.weight.shape[0] if self.kind != "Conv" else int(np.prod(self.weight.shape[1:]))


def subgraph_layers(model: ir.Model) -> list[str]:
    """Layers inside If/Loop/Scan bodies: factorization rewrites the main graph only."""
    from ...analysis.cost import inner_nodes

    return [f"{name}: {node.op_type} inside the {top.op_type} '{top.name}' body: subgraph layers are not factorized"
            for name, node, top in inner_nodes(model) if node.op_type in ("Gemm", "MatMul", "Conv")]


def find_layers(model: ir.Model, shapes: Mapping, *, min_macs: int = 0) -> tuple[list[Layer], list[str]]:
    """The Gemm/MatMul/Conv nodes that can be factorized, and a reason for each one that cannot."""
    layers, skipped = [], []
    for node in model.graph:
        if node.op_type not in ("Gemm", "MatMul", "Conv") or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or node.outputs[0].name
        layer, reason = _layer(node, shapes)
        if layer is None:
            skipped.append(f"{name}: {reason}")
        elif layer.macs < min_macs:
            skipped.append(f"{name}: {layer.macs} MACs, below min_macs {min_macs}")
        else:
            layers.append(layer)
    return layers, skipped


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def _layer(node: ir.Node, shapes: Mapping) -> tuple[Layer | None, str]:
    w = _const(node.inputs[1] if len(node.inputs) > 1 else None)
    if w is None:
        return None, "weight is not a constant"
    if w.dtype != np.float32:
        return None, f"weight is {w.dtype}, not float32"
    x_shape = shapes.get(node.inputs[0].name).shape if node.inputs[0].name in shapes else None
    y_shape = shapes.get(node.outputs[0].name).shape if node.outputs[0].name in shapes else None
    if x_shape is None or y_shape is None:
        return None, "input or output shape unknown"
    w = w.astype(np.float64)
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return None, "Gemm with transA is not handled"
        alpha, beta = node.attributes.get_float("alpha", 1.0), node.attributes.get_float("beta", 1.0)
        mat = alpha * (w.T if node.attributes.get_int("transB", 0) else w)
        c = node.inputs[2] if len(node.inputs) > 2 else None
        bias = None
        if c is not None:
            cv = _const(c)
            if cv is None:
                return None, "Gemm bias is not a constant"
            bias = beta * cv.astype(np.float64)
        return Layer(node, "Gemm", mat, bias, rows=int(x_shape[0]), x_shape=tuple(map(int, x_shape))), ""
    if node.op_type == "MatMul":
        if w.ndim != 2 or len(x_shape) < 1:
            return None, f"MatMul weight of rank {w.ndim} (only 2-D weights are factorized)"
        add = _bias_add(node, w.shape[1])
        bias = add[1].astype(np.float64) if add else None
        rows = int(np.prod(x_shape[:-1], dtype=np.int64))
        return Layer(node, "MatMul", w, bias, bias_add=add[0] if add else None, rows=rows,
                     x_shape=tuple(map(int, x_shape))), ""
    if node.attributes.get_int("group", 1) != 1:
        return None, "grouped Conv is not factorized"
    if len(x_shape) != w.ndim:
        return None, "input rank does not match the kernel"
    dims = w.ndim - 2
    kernel = tuple(w.shape[2:])
    strides = tuple(node.attributes.get_ints("strides", (1,) * dims))
    dilations = tuple(node.attributes.get_ints("dilations", (1,) * dims))
    in_size, out_size = tuple(x_shape[2:]), tuple(y_shape[2:])
    begin, end = _explicit_pads(node, kernel, strides, dilations, in_size, out_size)
    c = node.inputs[2] if len(node.inputs) > 2 else None
    bias = None
    if c is not None:
        cv = _const(c)
        if cv is None:
            return None, "Conv bias is not a constant"
        bias = cv.astype(np.float64)
    rows = int(x_shape[0]) * int(np.prod(out_size, dtype=np.int64))
    return Layer(node, "Conv", w, bias, rows=rows, x_shape=tuple(map(int, x_shape)), in_positions=int(x_shape[0]) * int(np.prod(in_size, dtype=np.int64)),
                 in_size=in_size, out_size=out_size, strides=strides, dilations=dilations,
                 pads_begin=begin, pads_end=end), ""


def _bias_add(node: ir.Node, n_out: int) -> tuple[ir.Node, np.ndarray] | None:
    """The Add holding a MatMul's float32 bias, and the bias as a vector."""
    found = matmul_bias_add(node, n_out)
    if found is None or found[1].const_value.dtype != ir.DataType.FLOAT:
        return None
    return found[0], found[1].const_value.numpy().reshape(-1)


def _explicit_pads(node: ir.Node, kernel, strides, dilations, in_size, out_size) -> tuple[tuple[int, ...], tuple[int, ...]]:
    dims = len(kernel)
    auto = node.attributes.get_string("auto_pad", "NOTSET")
    if auto in ("", "NOTSET"):
        pads = list(node.attributes.get_ints("pads", (0,) * 2 * dims))
        return tuple(pads[:dims]), tuple(pads[dims:])
    if auto == "VALID":
        return (0,) * dims, (0,) * dims
    total = [max(0, (o - 1) * s + (k - 1) * d + 1 - i) for o, s, k, d, i in zip(out_size, strides, kernel, dilations, in_size)]
    begin = tuple(t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total)
    return begin, tuple(t - b for t, b in zip(total, begin))

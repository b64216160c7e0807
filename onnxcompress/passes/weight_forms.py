"""Which MatMul/Gemm weights weight-only quantization takes, and the two graph forms it writes.

- `matmulnbits`: com.microsoft MatMulNBits (A, B packed, scales[, zero points]), the op ONNX
  Runtime's CPU (and CUDA, DirectML, WebGPU) providers run on packed int4/int8 weights;
  `accuracy_level` 4 lets the CPU kernel quantize activations to int8 per block and use integer
  dot products (measured several times faster than level 0 on x86, see the pass);
- `dequantize-linear`: standard ONNX (opset 21) blocked DequantizeLinear of an INT4/INT8 (UINT4/UINT8
  with zero points) [K, N] initializer, `axis` 0 and `block_size`, feeding a plain MatMul: for
  runtimes without the contrib op (TensorRT and other ONNX consumers).

Both compute A @ (s * (code - zero point)) with the same codes and scales. A Gemm becomes
MatMul (+ Add of beta * C): its transB weight is transposed to [K, N] and alpha folded into the
weight before quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..model import add_initializer
from ..names import NameAllocator
from .weight_blocks import BlockCodes, pack_matmulnbits

FORMS: tuple[str, ...] = ("matmulnbits", "dequantize-linear")
#: Weights with fewer input (K) or output (N) features stay float: the scales and a kernel call
#: cost more than the bytes saved.
MIN_FEATURES = 16
MS_DOMAIN = "com.microsoft"
DQ_OPSET = 21


@dataclass
class Target:
    """One MatMul/Gemm to quantize: its node, input, weight shape as [K, N] and Gemm extras. The
    weight is read when asked (`load_weight`), so a model's weights need not all be in memory at once."""

    node: ir.Node
    x: ir.Value
    shape: tuple[int, int]  # [K, N], after a Gemm's transB
    transposed: bool = False  # a Gemm's transB: the stored weight is [N, K]
    alpha: float = 1.0  # a Gemm's alpha, folded into the weight
    bias: np.ndarray | None = None  # beta * C of a Gemm

    @property
    def k(self) -> int:
        return self.shape[0]

    @property
    def n(self) -> int:
        return self.shape[1]

    def load_weight(self) -> np.ndarray:
        """The weight as a float32 [K, N] array of its own (alpha folded in)."""
        w = self.node.inputs[1].const_value.numpy().astype(np.float32)
        w = w.T if self.transposed else w
        if self.alpha != 1.0:
            w = w * np.float32(self.alpha)
        return np.ascontiguousarray(w)

    def release(self) -> None:
        """Unmap a weight read from an external data file (model.release)."""
        from ..model import release

        release(self.node.inputs[1].const_value)


def find_targets(model: ir.Model, skip_nodes: tuple[str, ...] = ()) -> tuple[list[Target], list[str]]:
    """The main graph's MatMul/Gemm nodes whose weight is a 2-D float initializer of at least
    MIN_FEATURES x MIN_FEATURES; a reason for every other one."""
    targets, skipped = [], []
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or node.outputs[0].name
        reason, target = _target(model, node)
        if target is not None and name in skip_nodes:
            reason, target = "kept float by skip_nodes", None
        if target is None:
            skipped.append(f"{name}: {reason}")
        else:
            targets.append(target)
    return targets, skipped


def _target(model: ir.Model, node: ir.Node) -> tuple[str, Target | None]:
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return "no weight input", None
    x, b = node.inputs[0], node.inputs[1]
    if b.name not in model.graph.initializers or b.const_value is None:
        return "the weight is not a constant initializer (two activations, or computed)", None
    tensor = b.const_value
    if tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return f"weight of type {tensor.dtype.name} (float weights only)", None
    if len(tensor.shape) != 2:
        return f"weight of rank {len(tensor.shape)} (2-D weights only)", None
    if x.shape is not None and len(x.shape) < 2:
        return "1-D input", None
    k, n = (int(d) for d in tensor.shape)
    transposed, alpha, bias = False, 1.0, None
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_int("transA", 0):
            return "Gemm with transA", None
        transposed, alpha = bool(attrs.get_int("transB", 0)), attrs.get_float("alpha", 1.0)
        k, n = (n, k) if transposed else (k, n)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            if c.const_value is None:
                return "Gemm bias is not a constant", None
            bias = (c.const_value.numpy().astype(np.float32) * np.float32(attrs.get_float("beta", 1.0)))
    if min(k, n) < MIN_FEATURES:
        return f"weight {k}x{n} is smaller than {MIN_FEATURES} on a side", None
    return "", Target(node, x, (k, n), transposed, alpha, bias)


Names = NameAllocator  # fresh value and node names: names(base)


def _constant(model: ir.Model, names: Names, base: str, array: np.ndarray, dtype: ir.DataType | None = None
              ) -> ir.Value:
    return add_initializer(model.graph, ir.Tensor(np.ascontiguousarray(array), dtype=dtype, name=names(base)))


def rewrite(model: ir.Model, target: Target, codes: BlockCodes, form: str, names: Names, accuracy_level: int) -> None:
    """Replace the target's node by the quantized form, keeping its output value's name."""
    node, base = target.node, target.node.name or target.node.outputs[0].name
    if form == "matmulnbits":
        packed, scales, zero_points = pack_matmulnbits(codes)
        inputs = [target.x, _constant(model, names, f"{base}_B_q{codes.bits}", packed),
                  _constant(model, names, f"{base}_B_scales", scales)]
        if zero_points is not None:
            inputs.append(_constant(model, names, f"{base}_B_zero_points", zero_points))
        attrs = {"K": target.k, "N": target.n, "bits": codes.bits, "block_size": codes.block_size,
                 "accuracy_level": accuracy_level}
        new = [ir.node("MatMulNBits", inputs, attributes=attrs, domain=MS_DOMAIN, name=names(f"{base}_Q{codes.bits}"))]
    else:
        import ml_dtypes  # onnx's own dependency (int4 arrays)

        symmetric = codes.zero_points is None
        signed = {4: ml_dtypes.int4, 8: np.int8} if symmetric else {4: ml_dtypes.uint4, 8: np.uint8}
        dtype = signed[codes.bits]
        inputs = [_constant(model, names, f"{base}_B_q{codes.bits}", codes.codes.astype(np.int16).astype(dtype)),
                  _constant(model, names, f"{base}_B_scales", codes.scales.astype(np.float32))]
        if not symmetric:
            inputs.append(_constant(model, names, f"{base}_B_zero_points", codes.zero_points.astype(dtype)))
        dq = ir.node("DequantizeLinear", inputs, attributes={"axis": 0, "block_size": codes.block_size},
                     name=names(f"{base}_DQ{codes.bits}"))
        dq.outputs[0].name = names(f"{base}_B_dequantized")
        new = [dq, ir.node("MatMul", [target.x, dq.outputs[0]], name=names(f"{base}_MatMul"))]
    if target.bias is not None:
        bias = _constant(model, names, f"{base}_bias", target.bias)
        new.append(ir.node("Add", [new[-1].outputs[0], bias], name=names(f"{base}_bias_add")))
    out, last = node.outputs[0], new[-1].outputs[0]
    last.shape, last.type = out.shape, out.type
    for n in new[:-1]:
        for v in n.outputs:
            if not v.name:
                v.name = names(f"{n.name}_out")
    model.graph.insert_before(node, new)
    name = out.name
    out.replace_all_uses_with(last, replace_graph_outputs=True)
    constants = [v for v in node.inputs[1:] if v is not None]
    model.graph.remove(node, safe=True)
    last.name = name
    for value in constants:  # the float weight (and Gemm bias) unless something else still reads it
        if not list(value.uses()) and value.name in model.graph.initializers and not value.is_graph_output():
            model.graph.initializers.pop(value.name)


__all__ = ["DQ_OPSET", "FORMS", "MIN_FEATURES", "MS_DOMAIN", "Names", "Target", "find_targets", "rewrite"]

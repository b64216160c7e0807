"""Dynamic int8: weights quantized ahead of time, activations quantized at run time.

No calibration data is needed, which makes it the int8 that works on any MatMul-heavy model out of
the box. ONNX Runtime's own `quantize_dynamic` does the rewriting (a well-kept implementation whose
output its kernels are built for: DynamicQuantizeLinear + MatMulInteger, fused by ORT into
DynamicQuantizeMatMul); this pass wraps it in the pipeline contract and reports what it changed.

ORT's int8 weights run with u8 x s8 kernels, which on x86 without VNNI add pairs of products into
a saturating int16 (analysis/int8_kernels.py). Unless the target kernels have VNNI, a weight whose
codes could saturate is shifted to uint8 with zero point + 128: the same values, exact u8 x u8
kernels; scales are untouched.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from ..analysis.cost import subgraphs
from ..analysis.int8_kernels import overflowing_rows, reduction_rows
from ..errors import OnnxCompressError
from ..model import add_initializer, save
from ..pipeline import Pass, PassContext, PassResult, option
from .int8_patterns import OUTLIER_MODES
from .int8_weights import KERNELS, U8_ZERO_POINT, Kernels

#: Ops ORT's dynamic quantizer rewrites to integer kernels.
_INTEGER_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear", "DynamicQuantizeLSTM"}


@dataclass
class QuantizeDynamic(Pass):
    """Int8 weights, activations quantized per batch at run time (no calibration data needed)."""

    name: ClassVar[str] = "quantize-dynamic"
    exact: ClassVar[bool] = False

    op_types: tuple[str, ...] = option(("MatMul", "Gemm"), "Conv is possible but rarely faster on CPU.")
    per_channel: bool = True
    weight_type: Literal["int8", "uint8"] = "int8"
    skip_nodes: tuple[str, ...] = ()
    kernels: Kernels = option("any", "'vnni': keep every int8 weight as ORT wrote it (wrong on AVX2 CPUs).")
    # "auto": with calibration data, on attention models, SmoothQuant each MatMul input with the alpha
    # that measures best for run-time (per-run) activation ranges first (passes/int8_patterns.py)
    outliers: Literal["auto", "off"] = "auto"

    def __post_init__(self) -> None:
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.outliers not in OUTLIER_MODES:
            raise ValueError(f"outliers must be 'auto' or 'off', got {self.outliers!r}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        before = Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))
        has_subgraphs = any(subgraphs(n) for n in model.graph)
        smoothing_changes, smoothing = [], None
        if self.outliers == "auto" and ctx.calibration is not None:
            from .int8_patterns import smooth_outliers

            model, smoothing_changes, smoothing = smooth_outliers(model, ctx.calibration, ctx.input_shapes, "dynamic",
                                                                  statistics=ctx.statistics)
        with tempfile.TemporaryDirectory(prefix="onnxcompress-dynamic-") as tmp:
            source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
            save(model, source)
            try:
                quantize_dynamic(
                    source, target, op_types_to_quantize=list(self.op_types), per_channel=self.per_channel,
                    weight_type=QuantType.QInt8 if self.weight_type == "int8" else QuantType.QUInt8,
                    nodes_to_exclude=list(self.skip_nodes),
                    # If/Loop/Scan bodies hold weights too (a VAD's per-sample-rate branches): off by default in ORT
                    extra_options={"EnableSubgraph": True} if has_subgraphs else None,
                )
            except Exception as exc:  # ORT's quantizer raises assorted types for models it cannot handle
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise OnnxCompressError(f"quantize-dynamic: onnxruntime could not quantize the model ({first})") from None
            # read whole before the folder goes: ORT wrote no external data (use_external_data_format off)
            quantized = ir.load(str(target))
        shifted = [] if self.kernels == "vnni" else shift_unsafe_weights(quantized)
        quantized.meta.update(model.meta)
        after = Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(quantized.graph))
        integer = {op: n for op, n in after.items() if op in _INTEGER_OPS}
        candidates = sum(before[op] for op in self.op_types)
        left = sum(after[op] for op in self.op_types)
        changes = smoothing_changes + ([f"{candidates - left} of {candidates} {'/'.join(self.op_types)} nodes now use "
                                        "int8 weights"] if candidates > left else [])
        if shifted:
            changes.append(f"{len(shifted)} int8 weights shifted to uint8 (exact u8 x u8 kernels): their s8 codes could "
                           "saturate the int16 pair sums of x86 CPUs without VNNI")
        skipped = [f"{left} {'/'.join(self.op_types)} nodes left in float (non-constant weight, or excluded)"] if left else []
        return self.result(quantized, changes=changes, skipped=skipped,
                           details={"integer_ops": integer, "weight_type": self.weight_type, "kernels": self.kernels,
                                    "shifted_to_uint8": shifted, "smoothing": smoothing})


def shift_unsafe_weights(model: ir.Model) -> list[str]:
    """Shift to uint8 (codes and zero points + 128) every constant int8 MatMulInteger weight whose
    codes could saturate int16 pair sums, in the main graph and in If/Loop/Scan bodies (in place);
    returns their names."""
    shifted = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "MatMulInteger":
            continue
        weight, zero = node.inputs[1], node.inputs[3] if len(node.inputs) > 3 else None
        if weight is None or not weight.is_initializer() or weight.name in shifted:
            continue
        w = weight.const_value.numpy()
        if w.dtype != np.int8 or w.ndim != 2:
            continue
        zero = zero if zero is not None and zero.is_initializer() else None
        zp = zero.const_value.numpy() if zero is not None else np.zeros((), np.int8)
        if not overflowing_rows(reduction_rows("MatMul", w.astype(np.float64))).any():
            continue
        users = [*weight.consumers(), *(zero.consumers() if zero is not None else ())]
        if any(n.op_type != "MatMulInteger" for n in users):
            continue  # shared with something that expects int8
        _set_uint8(weight, (w.astype(np.int16) + U8_ZERO_POINT).astype(np.uint8))
        u8_zp = (zp.astype(np.int16) + U8_ZERO_POINT).astype(np.uint8)
        if zero is not None:
            _set_uint8(zero, u8_zp)
        else:
            # beside the weight: visible where it is
            zero = add_initializer(weight.graph, ir.tensor(u8_zp, name=f"{weight.name}_zero_point_u8"))
            node.resize_inputs(4)
            node.replace_input_with(3, zero)
        shifted.append(weight.name)
    return shifted


def _set_uint8(value: ir.Value, array: np.ndarray) -> None:
    """Give the initializer `value` new uint8 contents (a new tensor: the old one may be shared)."""
    value.const_value = ir.tensor(array, name=value.name)
    value.type = ir.TensorType(ir.DataType.UINT8)

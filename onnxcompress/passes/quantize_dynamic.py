"""Dynamic int8: weights quantized ahead of time, activations quantized at run time.

No calibration data is needed, which makes it the int8 that works on any MatMul-heavy model out of
the box. ONNX Runtime's own `quantize_dynamic` does the rewriting (a well-kept implementation whose
output its kernels are built for: DynamicQuantizeLinear + MatMulInteger, fused by ORT into
DynamicQuantizeMatMul); this pass wraps it in the pipeline contract and reports what it changed.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import onnx
import onnx_ir as ir

from ..errors import OnnxCompressError
from ..model import load, save
from ..pipeline import Pass, PassContext, PassResult

#: Ops ORT's dynamic quantizer rewrites to integer kernels.
_INTEGER_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear", "DynamicQuantizeLSTM"}


@dataclass
class QuantizeDynamic(Pass):
    """Int8 weights, activations quantized per batch at run time (no calibration data needed)."""

    name: ClassVar[str] = "quantize-dynamic"
    exact: ClassVar[bool] = False

    op_types: tuple[str, ...] = ("MatMul", "Gemm")  # Conv is possible but rarely faster on CPU
    per_channel: bool = True
    weight_type: Literal["int8", "uint8"] = "int8"
    skip_nodes: tuple[str, ...] = ()

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        before = Counter(n.op_type for n in model.graph)
        with tempfile.TemporaryDirectory(prefix="onnxcompress-dynamic-") as tmp:
            source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
            save(model, source)
            try:
                quantize_dynamic(
                    source, target, op_types_to_quantize=list(self.op_types), per_channel=self.per_channel,
                    weight_type=QuantType.QInt8 if self.weight_type == "int8" else QuantType.QUInt8,
                    nodes_to_exclude=list(self.skip_nodes),
                )
            except Exception as exc:  # ORT's quantizer raises assorted types for models it cannot handle
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise OnnxCompressError(f"quantize-dynamic: onnxruntime could not quantize the model ({first})") from None
            quantized = load(onnx.load(str(target)))  # read fully: the folder goes away with the block
        quantized.meta.update(model.meta)
        after = Counter(n.op_type for n in quantized.graph)
        integer = {op: n for op, n in after.items() if op in _INTEGER_OPS}
        candidates = sum(before[op] for op in self.op_types)
        left = sum(after[op] for op in self.op_types)
        changes = [f"{candidates - left} of {candidates} {'/'.join(self.op_types)} nodes now use int8 weights"] \
            if candidates > left else []
        skipped = [f"{left} {'/'.join(self.op_types)} nodes left in float (non-constant weight, or excluded)"] if left else []
        return self.result(quantized, changes=changes, skipped=skipped,
                           details={"integer_ops": integer, "weight_type": self.weight_type})

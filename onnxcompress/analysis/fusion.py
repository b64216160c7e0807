"""Which ops ONNX Runtime actually runs in int8: load a model with every graph optimization on,
save ORT's optimized graph (`optimized_model_filepath`) and count its int8 kernels against the
float compute ops and the Q/DQ nodes left over.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from .. import runtime
from ..model import temporary_path

#: ORT kernels that compute in int8/uint8 (any domain: ai.onnx, com.microsoft, NHWC variants).
INT8_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger", "QGemm",
    "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere",
    "QLinearConvTranspose", "NhwcQLinearConv", "QAttention", "DynamicQuantizeMatMul",
    "DynamicQuantizeLSTM", "QEmbedLayerNormalization",
})
#: Float ops that do the bulk of the arithmetic (what should have become int8).
FLOAT_COMPUTE = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def op_key(node: onnx.NodeProto) -> str:
    """`QLinearConv`, or `com.microsoft.nchwc.Conv` for ops outside the default domains."""
    return node.op_type if node.domain in ("", "ai.onnx", "com.microsoft") else f"{node.domain}.{node.op_type}"


@dataclass(frozen=True)
class FusionReport:
    op_counts: dict[str, int]  # every op in ORT's optimized graph
    int8: dict[str, int]  # int8 kernels
    float_compute: dict[str, int]  # float Conv/MatMul/Gemm (and their fused forms) left
    qdq: dict[str, int]  # QuantizeLinear/DequantizeLinear left (boundaries between int8 and float)

    @property
    def int8_count(self) -> int:
        return sum(self.int8.values())

    @property
    def float_compute_count(self) -> int:
        return sum(self.float_compute.values())

    @property
    def int8_fraction(self) -> float:
        """Fraction of the compute ops that run as int8 kernels."""
        total = self.int8_count + self.float_compute_count
        return self.int8_count / total if total else 0.0

    def summary(self) -> str:
        int8 = ", ".join(f"{k} {v}" for k, v in sorted(self.int8.items())) or "none"
        flt = ", ".join(f"{k} {v}" for k, v in sorted(self.float_compute.items())) or "none"
        return f"int8 kernels: {int8}; float compute: {flt}; Q/DQ left: {sum(self.qdq.values())}"


def optimized_graph(model: ir.Model | str | os.PathLike, *, provider: str = "cpu") -> onnx.ModelProto:
    """The graph ORT runs after ENABLE_ALL optimizations (layout transforms included)."""
    with tempfile.TemporaryDirectory(prefix="onnxcompress-fusion-") as tmp:
        options = runtime.session_options(spinning=False, optimize=True)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        if isinstance(model, ir.Model):
            with temporary_path(model) as path:
                runtime.session(path, provider=provider, options=options)
        else:
            runtime.session(model, provider=provider, options=options)
        return onnx.load(options.optimized_model_filepath)


def fusion_check(model: ir.Model | str | os.PathLike, *, provider: str = "cpu") -> FusionReport:
    graph = optimized_graph(model, provider=provider).graph
    counts = Counter(op_key(n) for n in graph.node)
    return FusionReport(
        op_counts=dict(counts),
        int8={k: v for k, v in counts.items() if k.rsplit(".", 1)[-1] in INT8_KERNELS},
        float_compute={k: v for k, v in counts.items() if k.rsplit(".", 1)[-1] in FLOAT_COMPUTE},
        qdq={k: v for k, v in counts.items() if k in QDQ_OPS},
    )


__all__ = ["FLOAT_COMPUTE", "INT8_KERNELS", "FusionReport", "fusion_check", "op_key", "optimized_graph"]

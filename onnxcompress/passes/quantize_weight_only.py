"""Weight-only quantization: int4 or int8 MatMul/Gemm weights in blocks, activations stay float.

The standard way to shrink transformer and LLM-class models: their size is in MatMul weights,
and at batch 1 their speed is bound by reading those weights. Each weight W [K, N] is cut along K
into blocks with their own scale (passes/weight_blocks.py); codes are chosen by round-to-nearest
or by GPTQ on calibration inputs (passes/weight_gptq.py); the graph gets MatMulNBits or, for
runtimes without that contrib op, blocked DequantizeLinear + MatMul (passes/weight_forms.py).
Embedding tables (Gather), MatMuls of two activations, weights that are not 2-D float
initializers and small ones stay float, each with its reason in `skipped`.

On x86 CPUs MatMulNBits' `accuracy_level` decides the arithmetic: 0 dequantizes the weights to
float per call, 4 quantizes the activations to int8 per block and uses integer dot products.
Measured on all-mpnet-base-v2 (AMD EPYC, AVX-512 VNNI, 1 thread, batch 1; benchmarks/real/
weight_only.py): int8 weights ran at 0.16x the float model's speed at level 0 and 2.0x at level 4
(int4: 1.5x), so 4 is the default; the report says which level the model carries. Level 4 costs
some fidelity (int8 weights: cosine 0.9994 against 0.9998 at level 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from ..errors import OnnxCompressError
from ..pipeline import Pass, PassContext, PassResult, option
from .weight_blocks import check_options, rtn
from .weight_forms import DQ_OPSET, FORMS, MS_DOMAIN, Names, find_targets, rewrite
from .weight_gptq import BUDGET_BYTES, collect_hessians, gptq, output_error, prepare

METHODS: tuple[str, ...] = ("auto", "rtn", "gptq")
ACCURACY_LEVELS: tuple[int, ...] = (0, 1, 2, 3, 4)
_LEVEL_TEXT = {0: "float compute", 1: "fp32 compute", 2: "fp16 compute", 3: "bf16 compute",
               4: "int8 compute of activations on CPU"}


@dataclass
class QuantizeWeightOnly(Pass):
    """int4/int8 block-quantized MatMul/Gemm weights (RTN or GPTQ), as MatMulNBits or DequantizeLinear."""

    name: ClassVar[str] = "quantize-weight-only"
    exact: ClassVar[bool] = False

    bits: int = 4
    block_size: int | None = option(None, "Weights per block along K (a power of 2, at least 16; default 32 for "
                                          "int4, 128 for int8).")
    method: Literal["auto", "rtn", "gptq"] = option("auto", "Auto: gptq with calibration data, else rtn.")
    # None: asymmetric int4 blocks (zero points; all-mpnet-base-v2 GPTQ cosine 0.992 against 0.988 symmetric),
    # symmetric int8 (0.9994 already)
    symmetric: bool | None = None
    form: Literal["matmulnbits", "dequantize-linear"] = "matmulnbits"
    accuracy_level: int = option(4, "MatMulNBits: 0 float compute, 4 int8 activations (fastest on x86 CPUs).")
    skip_nodes: tuple[str, ...] = ()
    calibration_budget_mb: int = option(BUDGET_BYTES // 2**20, "GPTQ's float32 Grams per streaming run over the data.")

    def __post_init__(self) -> None:
        self.block = check_options(self.bits, self.block_size)
        self.is_symmetric = self.bits == 8 if self.symmetric is None else self.symmetric
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"accuracy_level must be one of 0-4, got {self.accuracy_level!r}")
        if self.calibration_budget_mb < 1:
            raise ValueError(f"calibration_budget_mb must be >= 1, got {self.calibration_budget_mb}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        method = self.method if self.method != "auto" else ("gptq" if ctx.calibration is not None else "rtn")
        if method == "gptq" and ctx.calibration is None:
            raise OnnxCompressError("quantize-weight-only: method gptq needs calibration data (--calib), or use method rtn")
        notes = []
        if self.form == "dequantize-linear":
            model, converted = _ensure_opset(model)
            notes += [converted] if converted else []
            model.ir_version = max(model.ir_version or 0, 10)  # int4 initializers
        targets, skipped = find_targets(model, self.skip_nodes)
        if not targets:
            return self.result(model, skipped=skipped, details=self._details(method, 0, 0, 0, {}, 0.0))
        hessians, seconds = {}, 0.0
        if method == "gptq":
            start = time.perf_counter()
            widths = {t.x.name: t.k for t in targets}
            hessians = collect_hessians(model, widths, ctx.calibration, budget_bytes=self.calibration_budget_mb * 2**20)
        names, gains, before, after, prepared = Names(model), {}, 0, 0, {}
        for target in targets:  # one weight in memory at a time
            weight = target.load_weight()
            codes = rtn(weight, self.bits, self.block, self.is_symmetric)
            h = hessians.get(target.x.name)
            if h is not None:
                if target.x.name not in prepared:  # q, k and v read one input: one inverse
                    prepared[target.x.name] = prepare(h)
                learned = gptq(weight, prepared[target.x.name], codes)
                e_rtn = output_error(weight, codes.dequantized(), h)
                e_gptq = output_error(weight, learned.dequantized(), h)
                if e_gptq < e_rtn:  # never worse than nearest on the data it was fitted on
                    codes = learned
                gains[target.node.name] = float(10 * np.log10(max(e_rtn, 1e-30) / max(min(e_gptq, e_rtn), 1e-30)))
            before += weight.nbytes
            after += _quantized_bytes(target.k, target.n, self.bits, self.block, self.is_symmetric)
            del weight
            target.release()
            rewrite(model, target, codes, self.form, names, self.accuracy_level)
        if method == "gptq":
            seconds = time.perf_counter() - start
        if self.form == "matmulnbits" and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        kernel = (f"MatMulNBits accuracy_level {self.accuracy_level} ({_LEVEL_TEXT[self.accuracy_level]})"
                  if self.form == "matmulnbits" else f"DequantizeLinear (opset {DQ_OPSET}, blocked) + MatMul")
        changes = [*notes,
                   f"{len(targets)} MatMul/Gemm weights to int{self.bits} in blocks of {self.block} along K "
                   f"({'symmetric' if self.is_symmetric else 'asymmetric'}, {method}): {kernel}",
                   f"quantized weights {_size(before)} -> {_size(after)} ({before / max(after, 1):.1f}x smaller)"]
        if gains:
            changes.append(f"GPTQ on {len(gains)} layers: layer output error {np.mean(list(gains.values())):.1f} dB below "
                           f"round-to-nearest on average (calibration inputs), {seconds:.1f} s")
        return self.result(model, changes=changes, skipped=skipped,
                           details=self._details(method, len(targets), before, after, gains, seconds))

    def _details(self, method: str, layers: int, before: int, after: int, gains: dict, seconds: float) -> dict:
        return {"bits": self.bits, "block_size": self.block, "method": method, "symmetric": self.is_symmetric,
                "form": self.form, "accuracy_level": self.accuracy_level if self.form == "matmulnbits" else None,
                "layers": layers, "weight_bytes_before": before, "weight_bytes_after": after,
                "gptq_gain_db": gains, "gptq_seconds": seconds}


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def _quantized_bytes(k: int, n: int, bits: int, block: int, symmetric: bool) -> int:
    """Bytes of one quantized weight: codes, float32 scales and (asymmetric) zero points."""
    blocks = -(-k // block)
    return n * blocks * (block * bits // 8 + 4 + (0 if symmetric else 1))


def _ensure_opset(model: ir.Model) -> tuple[ir.Model, str | None]:
    """Blocked DequantizeLinear and int4 need opset 21: convert older models with onnx.version_converter."""
    from ..model import upgrade_opset

    model, note = upgrade_opset(model, DQ_OPSET, "quantize-weight-only form dequantize-linear")
    return model, note and f"{note} (blocked DequantizeLinear of int4/int8)"


__all__ = ["ACCURACY_LEVELS", "METHODS", "QuantizeWeightOnly"]

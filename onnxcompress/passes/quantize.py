"""QuantizeQDQ: static int8 quantization as QuantizeLinear/DequantizeLinear pairs that ORT fuses.

Placement: Q/DQ go only around ops the target runs in int8. Conv/MatMul/Gemm anchor the int8
regions; Add/Mul/Concat/average pooling join only when a neighbour is int8 (an isolated one would
only add Q/DQ work); MaxPool/Reshape/Transpose/Flatten/Squeeze/Unsqueeze carry int8 through with
the scale of their input. A Relu, or a Clip with constant bounds (ReLU6), right after an anchor or
an int8 Add/Mul (the residual Add -> Relu) is folded into that op's output quantization when the
uint8 range clamps exactly as it does (zero point 0 for a lower bound of 0, the top code at or below
an upper bound): ORT then runs the pair as one int8 kernel instead of requantizing around a float
Relu/Clip, and a pooling op after it sees an int8 producer and joins the region.

Numbers: per-channel symmetric int8 weights, int32 biases with scale x_scale * w_scale, and
activations uint8 asymmetric (preset "cpu": the only form x86 ORT fuses into int8 kernels) or int8
symmetric (preset "tensorrt"). Activation ranges come from streaming histograms
(analysis/histograms.py) through one calibration method chosen for the whole model.

Beyond ORT: learned weight rounding (`weight_rounding: learned`, opt-in: passes/int8_rounding.py),
bias correction (on by default), SmoothQuant on MatMul/Gemm inputs first
(`smooth_alpha`, passes/smooth.py; with `outliers: auto`, per input with a measured alpha on the
MatMul inputs of attention models and on Conv inputs with unequal channels), and a tolerance mode (`max_drop` with `metric`): quantize
everything, measure on calibration samples held out from calibration against the float model this
pass received (earlier lossy passes are not this pass's to undo, and measuring against the
pipeline's input would spend the fallback on their loss), and if outside the tolerance keep the
most sensitive layers in float (passes/int8_tolerance.py). Histograms and means are collected once per
value and reused by every variant the fallback builds (passes/int8_variants.py).

The parts, one job each: placement (passes/int8_placement.py), the QDQ rewrite and weight encodings
(passes/int8_graph.py), bias correction (passes/int8_bias.py), variants with layers kept in float
(passes/int8_variants.py), the tolerance mode (passes/int8_tolerance.py); this module holds the pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from ..analysis.histograms import TensorHistogram, clip_range
from ..analysis.kernel_check import KernelCheck, check_kernels
from ..calibration import Calibration, batch_size_for
from ..errors import OnnxCompressError
from ..model import upgrade_opset
from ..pipeline import Pass, PassContext, PassResult, option
from ..report import Fidelity
from ..tolerance import Tolerance
from ..verify import compare, outputs
from .int8_bias import bias_shift, correct_biases, correction_inputs, weight_rounding_error
from .int8_graph import QuantParams, activation_params, quantization_clamps_to, quantize_graph, weight_encodings
from .int8_patterns import OUTLIER_MODES
from .int8_placement import ANCHORS, NEIGHBOURLY, SCALE_PRESERVING, Plan, clamp_bounds, op_types, plan_placement
from .int8_protect import SENSITIVITY_SAMPLES, protect
from .int8_protect import describe as describe_protection
from .int8_rounding import ROUNDINGS
from .int8_tolerance import (
    TOLERANCE_HOLDOUT,
    TOLERANCE_MAX_HELDOUT,
    fall_back,
    first_samples,
    holdout_split,
    requested_float,
)
from .int8_variants import Quantizer, Variant
from .int8_weights import KERNELS, Kernels, WeightEncoding, quantize_bias, quantize_weight

QDQ_MIN_OPSET = 13  # per-axis DequantizeLinear
#: Held-out samples run (float reference, tolerance, kernel check) this many at a time: larger
#: batches are no faster on a CPU and hold every intermediate of every sample at once.
HELD_BATCH = 4


class CalibrationNeededError(OnnxCompressError):
    """Static quantization needs calibration data."""


@dataclass
class _Outcome:
    """The variant a run settles on, with its mixed-precision and tolerance records and the kernel check."""

    variant: Variant
    fallback: dict[str, Any] | None
    skipped: list[str]
    protection: dict[str, Any] | None
    check: KernelCheck
    kernel_notes: list[str]


@dataclass
class QuantizeQDQ(Pass):
    """Static int8 quantization in QDQ form, calibrated with streaming histograms."""

    name: ClassVar[str] = "quantize-int8"
    exact: ClassVar[bool] = False

    method: Literal["minmax", "percentile", "entropy", "mse"] = option("mse", "Activation ranges: minmax, percentile, "
                                                                               "entropy or mse.")
    percentile: float = 99.99
    preset: Literal["cpu", "tensorrt"] = option("cpu", "int8 form: cpu (uint8 activations) or tensorrt (symmetric int8).")
    # The CPU int8 kernels the model must be exact on: "any" (x86 without VNNI, whose u8 x s8 kernels
    # saturate int16 pair sums, and ARM) or "vnni" (full-range codes; wrong on AVX2 CPUs).
    kernels: Kernels = "any"
    per_channel: bool = True
    skip_nodes: tuple[str, ...] = ()
    skip_ops: tuple[str, ...] = ()
    samples: int | None = option(None, "Calibration samples used (None: all given; --calib-samples cuts the data itself).")
    bins: int = 2048
    bias_correction: bool = option(True, "Fold the weight-rounding shift of each output's mean into its bias.")
    # Weight codes: "nearest", or "learned" (passes/int8_rounding.py: GPTQ-style error feedback on the
    # calibration inputs, each code within one step of nearest and inside its kernel's limits).
    # Not the default: +1.2 dB on EfficientNet-Lite1 but -1.7 dB on PP-OCR cls (measured, 64 photos).
    weight_rounding: Literal["nearest", "learned"] = "nearest"
    smooth_alpha: float | None = option(None, "SmoothQuant before int8 with this alpha (e.g. 0.5): moves activation "
                                              "outliers into MatMul weights.")
    # "auto", without smooth_alpha: SmoothQuant each MatMul input of attention models (a Softmax and a MatMul of two
    # activations), and each Conv input of any model whose channels' ranges differ by more than 16x and break its
    # consumers in int8, with the alpha that measures best on calibration samples, or not at all (passes/int8_patterns.py)
    outliers: Literal["auto", "off"] = "auto"
    # Tolerance mode: keep the most sensitive layers in float until `metric` is within `max_drop`
    # (for sqnr: the minimum output SQNR in dB) on calibration samples held out from calibration.
    max_drop: float | None = None
    metric: Literal["top1", "cosine", "mse", "sqnr"] = "cosine"
    # Mixed precision where it pays (passes/int8_protect.py): layers that alone make a large share of
    # the int8 noise stay in float, within this share of the int8 layers' MACs, if that measures
    # better (EfficientNet-Lite1: stem and first depthwise conv, 2.7% of MACs, +3.3 dB). 0 turns it off.
    float_budget: float = 0.03

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.weight_rounding not in ROUNDINGS:
            raise ValueError(f"weight_rounding must be one of {', '.join(ROUNDINGS)}, got {self.weight_rounding!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if (self.samples is not None and self.samples < 1) or self.bins < 16:
            raise ValueError("samples must be >= 1 and bins >= 16")
        if self.outliers not in OUTLIER_MODES:
            raise ValueError(f"outliers must be 'auto' or 'off', got {self.outliers!r}")
        if not 0.0 <= self.float_budget < 1.0:
            raise ValueError(f"float_budget must be in [0, 1), got {self.float_budget}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        try:
            self.tolerance()
        except OnnxCompressError as exc:
            raise ValueError(f"max_drop/metric: {exc}") from None

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if ctx.calibration is None:
            raise CalibrationNeededError(
                f"{self.name} needs calibration data (--calib FILE.npy/.npz) for static int8 quantization"
            )
        tolerance = self.tolerance()
        # Measured against the float model this pass received, before anything here touches it: the
        # tolerance on calibration samples held out from calibration, the kernel check on the last
        # samples (held out too in tolerance mode).
        calibration, checked = self._held_out(ctx.calibration, tolerance is not None)
        held_feeds = list(checked.batches(batch_size_for(model, HELD_BATCH)))
        reference = outputs(model, held_feeds, f"pass '{self.name}' (float reference)")
        model, changes, smoothing = self._prepare(model, ctx, calibration)
        self._declare(model, ctx, calibration)  # gathered already unless a smoothing made another model state
        quantizer = Quantizer(self, model, calibration, ctx.statistics)
        if smoothing is not None and smoothing.get("applied") and self.method != "minmax":
            from .int8_patterns import pick_range_method

            quantizer, note = pick_range_method(quantizer, held_feeds, reference, checked.source)
            changes.append(note)
        outcome = self._quantize_checked(quantizer, tolerance, held_feeds, reference, checked.source)
        outcome.skipped += subgraph_layers(model)
        return self._result(ctx, quantizer, calibration, outcome, changes, smoothing, held_feeds)

    @staticmethod
    def _held_out(calibration: Calibration, tolerance_mode: bool) -> tuple[Calibration, Calibration]:
        """(calibrate on, check on): the held-out samples in tolerance mode; otherwise all samples
        calibrate and the last ones, not held out, feed the kernel check."""
        if tolerance_mode:
            return holdout_split(calibration)
        # not held out: the check compares kernels with their simulation, not int8 with float
        checked = holdout_split(calibration)[1]
        return calibration, dataclasses.replace(checked, source=f"{calibration.source} (last {checked.num_samples})")

    def _prepare(
        self, model: ir.Model, ctx: PassContext, calibration: Calibration,
    ) -> tuple[ir.Model, list[str], dict[str, Any] | None]:
        """(the float model made ready for int8, its changes, the smoothing record): exact cleanups,
        opset 13, then SmoothQuant with `smooth_alpha` or the measured outlier smoothing."""
        from .cleanup import FoldBatchNorm, FusePadIntoConv

        changes: list[str] = []
        for cleanup in (FoldBatchNorm(), FusePadIntoConv()):  # exact; fewer float ops between int8 ones
            folded = cleanup.run(model, ctx)
            model = folded.model
            changes += folded.record.changes
        model, note = _ensure_opset(model)
        if note:
            changes.append(note)
        smoothing = None
        if self.smooth_alpha is not None:
            from .smooth import SmoothQuant

            sub = PassContext(calibration=calibration, input_shapes=ctx.input_shapes, model=model, statistics=ctx.statistics)
            smoothed = SmoothQuant(alpha=self.smooth_alpha, samples=self.samples).run(model, sub)
            model = smoothed.model
            changes += [f"smooth-quant: {c}" for c in smoothed.record.changes]
            smoothing = {**smoothed.record.details, "skipped": list(smoothed.record.skipped)}
        elif self.outliers == "auto":
            from .int8_patterns import smooth_conv_inputs, smooth_outliers

            self._declare(model, ctx, calibration, outliers=True)
            model, notes, smoothing = smooth_outliers(model, calibration, ctx.input_shapes, "static", samples=self.samples,
                                                      statistics=ctx.statistics)
            changes += notes
            self._declare(model, ctx, calibration)  # nothing new unless smoothing made another model state
            model, notes, conv_smoothing = smooth_conv_inputs(
                model, calibration, ctx.input_shapes, samples=self.samples, kernels=self.kernels, method=self.method,
                percentile=self.percentile, statistics=ctx.statistics)
            changes += notes
            smoothing = {**smoothing, "conv": conv_smoothing}
        return model, changes, smoothing

    def _declare(self, model: ir.Model, ctx: PassContext, calibration: Calibration, outliers: bool = False) -> None:
        """Ask at once for what the quantizer and the checks before it read of this model state: the
        ranges' histograms, the bias-correction means, the Conv-input check's channel ranges and
        (`outliers`) the attention outlier check's rows and ranges; one run for all. A smoothing
        that applies makes a new model state, which is run again."""
        from ..analysis.statistics import Request
        from .int8_patterns import conv_range_request, outlier_requests

        plan = self.plan(model)
        requests = [Request(calibration, histograms=list(plan.values), limit=self.samples, bins=self.bins)]
        if self.bias_correction:
            requests.append(Request(calibration, channels=correction_inputs(model, plan), limit=self.samples))
        conv = conv_range_request(model, calibration, self.samples)
        if conv is not None:
            requests.append(conv)
        if outliers:
            requests += outlier_requests(model, calibration, self.samples)
        ctx.statistics.gather(model, requests)

    def _quantize_checked(
        self, quantizer: Quantizer, tolerance: Tolerance | None, feeds: list[dict[str, np.ndarray]],
        reference: list[list[np.ndarray]], source: str,
    ) -> _Outcome:
        """`_quantize`, then ORT's fused kernels checked against their simulation; codes made for VNNI
        kernels that this CPU's kernels lose are redone as codes exact on any CPU."""
        variant, fallback, skipped, protection = self._quantize(quantizer, tolerance, feeds, reference, source)
        check = check_kernels(variant.model, feeds, reference, source)
        kernel_notes = []
        if not check.ok and quantizer.kernels != "any":
            # This CPU's kernels are not the VNNI ones the codes were made for: redo with safe codes.
            kernel_notes.append(f"{check.describe()} with codes for VNNI kernels; redone with codes exact on any CPU")
            quantizer.kernels = "any"
            variant, fallback, skipped, protection = self._quantize(quantizer, tolerance, feeds, reference, source)
            check = check_kernels(variant.model, feeds, reference, source)
        if not check.ok:
            skipped.append(f"int8 kernels: {check.describe()}")
        return _Outcome(variant, fallback, skipped, protection, check, kernel_notes)

    def _result(
        self, ctx: PassContext, quantizer: Quantizer, calibration: Calibration, outcome: _Outcome,
        changes: list[str], smoothing: dict[str, Any] | None, held_feeds: list[dict[str, np.ndarray]],
    ) -> PassResult:
        """The pass's result: the chosen variant with its changes, skipped layers and details."""
        variant, check, fallback, protection = outcome.variant, outcome.check, outcome.fallback, outcome.protection
        plan = variant.plan
        if self.bias_correction:
            changes.append(f"bias correction on {len(variant.shifts)} layers")
        notes = [f"calibrated on {quantizer.seen} samples of {calibration.source}"]
        if ctx.calibration.is_random:
            notes.append("calibrated on random data: ranges do not reflect real inputs")
        if self.max_drop is not None and ctx.calibration.num_samples < 2:
            notes.append("one calibration sample: the tolerance was measured on it, nothing was held out")
        kind = "uint8 asymmetric" if self.preset == "cpu" else "int8 symmetric"
        changes.append(f"{len(plan.nodes)} nodes run in int8, {len(plan.values)} activations quantized "
                       f"({self.preset}: {kind}, {quantizer.options.method})")
        changes.append(describe_forms(variant.encodings, quantizer.kernels))
        if variant.rounding is not None:
            changes.append(variant.rounding.describe())
        changes += outcome.kernel_notes + [check.describe()]
        if protection is not None:
            changes.append(describe_protection(protection, sum(len(next(iter(f.values()))) for f in held_feeds)))
        if fallback is not None and fallback["kept_float"]:
            changes.append(f"{len(fallback['kept_float'])} sensitive layers kept in float: {fallback['summary']}")
        details = {
            "method": quantizer.options.method, "preset": self.preset, "per_channel": self.per_channel,
            "samples": quantizer.seen, "int8_nodes": plan.nodes, "quantized_values": len(plan.values),
            "fused_activations": sorted(plan.fused_activations), "notes": notes + variant.notes,
            "bias_correction": self.bias_correction, "bias_shift_max_abs": variant.shifts,
            "bias_correction_skipped": variant.uncorrected, "smoothing": smoothing, "tolerance": fallback, "mixed_precision": protection,
            "kernels": quantizer.kernels, "weight_forms": {n: e.describe() for n, e in variant.encodings.items()},
            "kernel_check": check.to_dict(), "weight_rounding": self.weight_rounding,
            "learned_rounding": None if variant.rounding is None else variant.rounding.to_dict(),
        }
        return self.result(variant.model, changes=changes, skipped=outcome.skipped, details=details)

    def tolerance(self) -> Tolerance | None:
        return None if self.max_drop is None else Tolerance(self.metric, self.max_drop)

    def _quantize(
        self, quantizer: Quantizer, tolerance: Tolerance | None, feeds: list[dict[str, np.ndarray]],
        reference: list[list[np.ndarray]], source: str,
    ) -> tuple[Variant, dict[str, Any] | None, list[str], dict[str, Any] | None]:
        """Everything in int8, the layers that dominate its noise back to float where that pays, then
        (tolerance mode) the most sensitive layers back to float until the tolerance holds."""

        few = first_samples(feeds, SENSITIVITY_SAMPLES)

        def measure(variant: Variant, sample: bool = False) -> Fidelity:
            use = few if sample else feeds
            got = outputs(variant.model, use, f"pass '{self.name}' (tolerance)")
            return compare(reference[:len(use)], got, source)

        variant = quantizer.build()
        op_of = op_types(quantizer.model.graph)
        anchors = [n for n in variant.plan.nodes if op_of.get(n) in ANCHORS]
        protected: list[str] = []
        sensitivity: dict[str, float] | None = None
        protection = None
        if self.float_budget > 0 and len(anchors) > 1:
            shapes = {k: v.shape for k, v in feeds[0].items()}
            variant, protected, sensitivity, protection = protect(quantizer, variant, anchors, measure,
                                                                  self.float_budget, shapes)
        skipped = requested_float(variant.plan.skipped, protected, "it alone makes a large share of the int8 noise")
        if tolerance is None:
            return variant, None, skipped, protection
        variant, fallback, skipped = fall_back(quantizer, variant, anchors, protected, sensitivity, tolerance, measure,
                                            skipped)
        fallback.update(heldout_samples=sum(len(next(iter(f.values()))) for f in feeds), heldout=source)
        return variant, fallback, skipped, protection

    def plan(self, model: ir.Model) -> Plan:
        return plan_placement(model, skip_nodes=self.skip_nodes, skip_ops=self.skip_ops, fold_relu=True)

    def ranges(self, plan: Plan, hists: Mapping[str, TensorHistogram]) -> dict[str, QuantParams]:
        """Quantization parameters per value; a shared-scale group merges its members' histograms."""
        merged: dict[str, TensorHistogram] = {}
        for value in plan.values:
            if value not in hists:
                continue
            root = plan.groups.get(value, value)
            merged[root] = merged[root].merge(hists[value]) if root in merged else hists[value]
        symmetric = self.preset == "tensorrt"
        by_root = {}
        for root, hist in merged.items():
            lo, hi = clip_range(hist, self.method, percentile=self.percentile, symmetric=symmetric)
            by_root[root] = activation_params(lo, hi, symmetric=symmetric)
        return {v: by_root[plan.groups.get(v, v)] for v in plan.values if plan.groups.get(v, v) in by_root}


def describe_forms(encodings: Mapping[str, WeightEncoding], kernels: str) -> str:
    """One line: how many layers got each weight form, for which kernels."""
    forms = {f: [e for e in encodings.values() if e.form == f] for f in ("s8", "s8-safe", "u8")}
    parts = [f"{len(es)} {f}" for f, es in forms.items() if es]
    if forms["s8-safe"]:
        parts[-2 if forms["u8"] else -1] += f" (up to +{max(e.widened_db for e in forms['s8-safe']):.2f} dB layer output noise)"
    bias = sum(e.bias_widened for e in encodings.values())
    where = "exact on every CPU (x86 without VNNI included)" if kernels == "any" else "full range for VNNI CPUs only"
    tail = f"; {bias} channels widened so the int32 bias fits" if bias else ""
    return f"int8 weights {where}: {', '.join(parts) or 'none'}{tail}"


def _ensure_opset(model: ir.Model) -> tuple[ir.Model, str | None]:
    """Per-axis QDQ needs opset >= 13: convert older models with onnx.version_converter."""
    model, note = upgrade_opset(model, QDQ_MIN_OPSET, "quantize-int8")
    return model, note and f"{note} (per-channel QDQ needs opset 13)"


def subgraph_layers(model: ir.Model) -> list[str]:
    """Why each Conv/MatMul/Gemm inside an If/Loop/Scan body stays float: Q/DQ placement and
    calibration see the main graph only (activations inside a body cannot be fetched by name)."""
    from ..analysis.cost import inner_nodes

    return [f"{name}: {node.op_type} inside the {top.op_type} '{top.name}' body left in float (static int8 covers "
            "the main graph; quantize-dynamic quantizes subgraph weights)"
            for name, node, top in inner_nodes(model) if node.op_type in ANCHORS]


__all__ = [
    "ANCHORS", "NEIGHBOURLY", "SCALE_PRESERVING", "TOLERANCE_HOLDOUT", "TOLERANCE_MAX_HELDOUT", "CalibrationNeededError",
    "Plan", "QuantParams", "QuantizeQDQ", "activation_params", "bias_shift", "clamp_bounds", "correct_biases",
    "correction_inputs", "describe_forms", "holdout_split", "plan_placement", "quantization_clamps_to", "quantize_bias",
    "quantize_graph", "quantize_weight", "subgraph_layers", "weight_encodings", "weight_rounding_error",
]

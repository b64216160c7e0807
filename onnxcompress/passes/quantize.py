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
most sensitive layers in float (see `_fallback`). Histograms and means are collected once per value
and reused by every variant the fallback builds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from ..analysis.activations import collect
from ..analysis.histograms import TensorHistogram, clip_range, collect_histograms
from ..analysis.kernel_check import check_kernels
from ..calibration import Calibration, batch_size_for
from ..errors import OnnxCompressError
from ..model import load, to_proto
from ..pipeline import Pass, PassContext, PassResult
from ..report import Fidelity
from ..tolerance import Tolerance
from ..verify import compare, outputs
from .float_guard import guard_float_layers
from .int8_patterns import OUTLIER_MODES
from .int8_protect import SENSITIVITY_SAMPLES, alone_sqnr, protect
from .int8_protect import describe as describe_protection
from .int8_rounding import ROUNDINGS, Gram, RoundingReport, collect_grams, learn_codes
from .int8_weights import KERNELS, MIN_SCALE, Kernels, WeightEncoding, encode_weight, quantize_bias, quantize_weight

QDQ_MIN_OPSET = 13  # per-axis DequantizeLinear
ANCHORS = frozenset({"Conv", "MatMul", "Gemm"})
# int8 only next to another int8 op; all their inputs must be activations
NEIGHBOURLY = frozenset({"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool"})
# int8 in, int8 out with the input's scale (ORT drops the Q/DQ pair or runs an int8 kernel)
SCALE_PRESERVING = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"})
# int8 ops whose output gets its own quantization, so a following Relu/Clip can fold into it
# (Concat shares its inputs' scale and the scale-preserving ops their input's: nothing to fold into)
FOLDS_ACTIVATION = ANCHORS | frozenset({"Add", "Mul"})
#: Tolerance mode holds out this fraction of the calibration samples (the last ones, which the
#: pipeline's verification also uses), at most TOLERANCE_MAX_HELDOUT, to measure the metric on.
TOLERANCE_HOLDOUT = 0.25
TOLERANCE_MAX_HELDOUT = 64
#: Held-out samples run (float reference, tolerance, kernel check) this many at a time: larger
#: batches are no faster on a CPU and hold every intermediate of every sample at once.
HELD_BATCH = 4


class CalibrationNeededError(OnnxCompressError):
    """Static quantization needs calibration data."""


@dataclass(frozen=True)
class QuantParams:
    scale: float
    zero_point: int
    dtype: int  # TensorProto.UINT8 or INT8


@dataclass
class Plan:
    """Which nodes run in int8 and which activation values get a Q/DQ pair."""

    nodes: list[str] = field(default_factory=list)  # node names (in graph order)
    values: list[str] = field(default_factory=list)  # activation values to quantize
    groups: dict[str, str] = field(default_factory=dict)  # value -> representative of its shared-scale group
    fused_activations: dict[str, str] = field(default_factory=dict)  # Relu/Clip node name -> the int8 op it follows
    skipped: list[str] = field(default_factory=list)


@dataclass
class QuantizeQDQ(Pass):
    """Static int8 quantization in QDQ form, calibrated with streaming histograms."""

    name: ClassVar[str] = "quantize-int8"
    exact: ClassVar[bool] = False

    method: Literal["minmax", "percentile", "entropy", "mse"] = "mse"
    percentile: float = 99.99
    preset: Literal["cpu", "tensorrt"] = "cpu"
    # The CPU int8 kernels the model must be exact on: "any" (x86 without VNNI, whose u8 x s8 kernels
    # saturate int16 pair sums, and ARM) or "vnni" (full-range codes; wrong on AVX2 CPUs).
    kernels: Kernels = "any"
    per_channel: bool = True
    skip_nodes: tuple[str, ...] = ()
    skip_ops: tuple[str, ...] = ()
    samples: int | None = None  # calibration samples used (None: all given; --calib-samples cuts the data itself)
    bins: int = 2048
    bias_correction: bool = True  # fold the weight-rounding shift of each output's mean into its bias
    # Weight codes: "nearest", or "learned" (passes/int8_rounding.py: GPTQ-style error feedback on the
    # calibration inputs, each code within one step of nearest and inside its kernel's limits).
    # Not the default: +1.2 dB on EfficientNet-Lite1 but -1.7 dB on PP-OCR cls (measured, 64 photos).
    weight_rounding: Literal["nearest", "learned"] = "nearest"
    smooth_alpha: float | None = None  # run SmoothQuant with this alpha on MatMul/Gemm inputs first
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
        from .cleanup import FoldBatchNorm, FusePadIntoConv

        tolerance = self.tolerance()
        # Measured against the float model this pass received, before anything here touches it: the
        # tolerance on calibration samples held out from calibration, the kernel check on the last
        # samples (held out too in tolerance mode).
        calibration, held = holdout_split(ctx.calibration) if tolerance is not None else (ctx.calibration, None)
        if held is not None:
            checked = held
        else:  # not held out: the check compares kernels with their simulation, not int8 with float
            checked = holdout_split(ctx.calibration)[1]
            checked = dataclasses.replace(checked, source=f"{ctx.calibration.source} (last {checked.num_samples})")
        held_feeds = list(checked.batches(batch_size_for(model, HELD_BATCH)))
        reference = outputs(model, held_feeds, f"pass '{self.name}' (float reference)")
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

            sub = PassContext(calibration=calibration, input_shapes=ctx.input_shapes, model=model)
            smoothed = SmoothQuant(alpha=self.smooth_alpha, samples=self.samples).run(model, sub)
            model = smoothed.model
            changes += [f"smooth-quant: {c}" for c in smoothed.record.changes]
            smoothing = {**smoothed.record.details, "skipped": list(smoothed.record.skipped)}
        elif self.outliers == "auto":
            from .int8_patterns import smooth_conv_inputs, smooth_outliers

            model, notes, smoothing = smooth_outliers(model, calibration, ctx.input_shapes, "static", samples=self.samples)
            changes += notes
            model, notes, conv_smoothing = smooth_conv_inputs(
                model, calibration, ctx.input_shapes, samples=self.samples, kernels=self.kernels, method=self.method,
                percentile=self.percentile)
            changes += notes
            smoothing = {**smoothing, "conv": conv_smoothing}
        quantizer = _Quantizer(self, model, calibration)
        if smoothing is not None and smoothing.get("applied") and self.method != "minmax":
            from .int8_patterns import pick_range_method

            quantizer, note = pick_range_method(quantizer, held_feeds, reference, checked.source)
            changes.append(note)
        variant, fallback, skipped, protection = self._quantize(quantizer, tolerance, held_feeds, reference, checked.source)
        check = check_kernels(load(variant.proto), held_feeds, reference, checked.source)
        kernel_notes = []
        if not check.ok and quantizer.kernels != "any":
            # This CPU's kernels are not the VNNI ones the codes were made for: redo with safe codes.
            kernel_notes.append(f"{check.describe()} with codes for VNNI kernels; redone with codes exact on any CPU")
            quantizer.kernels = "any"
            variant, fallback, skipped, protection = self._quantize(quantizer, tolerance, held_feeds, reference, checked.source)
            check = check_kernels(load(variant.proto), held_feeds, reference, checked.source)
        if not check.ok:
            skipped.append(f"int8 kernels: {check.describe()}")
        skipped += subgraph_layers(model)
        plan = variant.plan
        if self.bias_correction:
            changes.append(f"bias correction on {len(variant.shifts)} layers")
        notes = [f"calibrated on {quantizer.seen} samples of {calibration.source}"]
        if ctx.calibration.is_random:
            notes.append("calibrated on random data: ranges do not reflect real inputs")
        if tolerance is not None and ctx.calibration.num_samples < 2:
            notes.append("one calibration sample: the tolerance was measured on it, nothing was held out")
        kind = "uint8 asymmetric" if self.preset == "cpu" else "int8 symmetric"
        changes.append(f"{len(plan.nodes)} nodes run in int8, {len(plan.values)} activations quantized "
                       f"({self.preset}: {kind}, {quantizer.options.method})")
        changes.append(describe_forms(variant.encodings, quantizer.kernels))
        if variant.rounding is not None:
            changes.append(variant.rounding.describe())
        changes += kernel_notes + [check.describe()]
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
        return self.result(load(variant.proto), changes=changes, skipped=skipped, details=details)

    def tolerance(self) -> Tolerance | None:
        return None if self.max_drop is None else Tolerance(self.metric, self.max_drop)

    def _quantize(
        self, quantizer: _Quantizer, tolerance: Tolerance | None, feeds: list[dict[str, np.ndarray]],
        reference: list[list[np.ndarray]], source: str,
    ) -> tuple[_Variant, dict[str, Any] | None, list[str], dict[str, Any] | None]:
        """Everything in int8, the layers that dominate its noise back to float where that pays, then
        (tolerance mode) the most sensitive layers back to float until the tolerance holds."""

        few = _first_samples(feeds, SENSITIVITY_SAMPLES)

        def measure(variant: _Variant, sample: bool = False) -> Fidelity:
            use = few if sample else feeds
            got = outputs(load(variant.proto), use, f"pass '{self.name}' (tolerance)")
            return compare(reference[:len(use)], got, source)

        variant = quantizer.build()
        op_of = {n.name: n.op_type for n in quantizer.proto.graph.node}
        anchors = [n for n in variant.plan.nodes if op_of.get(n) in ANCHORS]
        protected: list[str] = []
        sensitivity: dict[str, float] | None = None
        protection = None
        if self.float_budget > 0 and len(anchors) > 1:
            shapes = {k: v.shape for k, v in feeds[0].items()}
            variant, protected, sensitivity, protection = protect(quantizer, variant, anchors, measure,
                                                                  self.float_budget, shapes)
        skipped = _requested_float(variant.plan.skipped, protected, "it alone makes a large share of the int8 noise")
        if tolerance is None:
            return variant, None, skipped, protection
        variant, fallback, skipped = self._fallback(quantizer, variant, anchors, protected, sensitivity, tolerance,
                                                    measure, skipped)
        fallback.update(heldout_samples=sum(len(next(iter(f.values()))) for f in feeds), heldout=source)
        return variant, fallback, skipped, protection

    # ------------------------------------------------------------------ tolerance mode

    def _fallback(
        self, quantizer: _Quantizer, first: _Variant, anchors: list[str], protected: list[str],
        sensitivity: dict[str, float] | None, tolerance: Tolerance, measure, skipped: list[str],
    ) -> tuple[_Variant, dict[str, Any], list[str]]:
        """Keep the most sensitive int8 layers in float until `tolerance` holds on the held-out feeds.

        Sensitivity of an anchor = output SQNR with only that anchor (and the ops joining it) in int8:
        one ORT run per anchor. Output noise from independent layers roughly adds up, so falling back
        the noisiest first is the cheapest way down; the count is then found by bisection."""
        measured: dict[int, tuple[_Variant, Fidelity]] = {0: (first, measure(first))}
        record: dict[str, Any] = {
            "metric": tolerance.metric, "bound": tolerance.bound, "target": tolerance.describe(),
            "reference": "the float model this pass received", "before": float(tolerance.value(measured[0][1])),
            "kept_float": [], "sensitivity_sqnr_db": {},
        }
        if tolerance.accepts(measured[0][1]):
            record.update(after=record["before"], met=True, evaluations=1, summary="none")
            return first, record, skipped
        op_of = {n.name: n.op_type for n in quantizer.proto.graph.node}
        if sensitivity is None:
            sensitivity = alone_sqnr(quantizer, anchors, lambda v: measure(v, True))
        order = sorted((a for a in anchors if a not in protected), key=lambda a: sensitivity[a])  # noisiest first

        def at(k: int) -> tuple[_Variant, Fidelity]:
            if k not in measured:
                variant = quantizer.build(keep_float=[*protected, *order[:k]])
                measured[k] = (variant, measure(variant))
            return measured[k]

        lo, hi = 0, len(order)
        met = tolerance.accepts(at(hi)[1])
        if met:
            while hi - lo > 1:  # smallest k that passes (lo fails, hi passes)
                mid = (lo + hi) // 2
                if tolerance.accepts(at(mid)[1]):
                    hi = mid
                else:
                    lo = mid
            k = hi
        else:
            k = min(measured, key=lambda j: tolerance.loss(measured[j][1]))
        variant, fidelity = measured[k]
        kept = order[:k]
        record.update(
            after=float(tolerance.value(fidelity)), met=met, evaluations=len(measured) + len(anchors),
            sensitivity_sqnr_db=sensitivity,
            kept_float=[{"node": a, "op": op_of[a], "sqnr_db_alone": sensitivity[a]} for a in kept],
            summary=", ".join(f"{a} ({sensitivity[a]:.1f} dB alone)" for a in kept) or "none",
        )
        skipped = _requested_float(skipped, kept, f"the tolerance ({tolerance.describe()})", sensitivity)
        if not met:
            skipped.append(f"tolerance not reached ({tolerance.describe()}): best found is "
                           f"{tolerance.format_value(fidelity)} with {k} of {len(order)} layers in float")
        return variant, record, skipped

    # ------------------------------------------------------------------ placement

    def plan(self, proto: onnx.ModelProto) -> Plan:
        return plan_placement(proto, skip_nodes=self.skip_nodes, skip_ops=self.skip_ops, fold_relu=True)

    # ------------------------------------------------------------------ ranges

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


def _first_samples(feeds: list[dict[str, np.ndarray]], count: int) -> list[dict[str, np.ndarray]]:
    """The leading feeds (batches) that hold at least `count` samples, or all of them."""
    taken, seen = [], 0
    for feed in feeds:
        if seen >= count:
            break
        taken.append(feed)
        seen += len(next(iter(feed.values())))
    return taken


def _requested_float(
    skipped: Iterable[str], names: Iterable[str], reason: str, sensitivity: Mapping[str, float] | None = None,
) -> list[str]:
    """`skipped` with the layers in `names` kept in float for `reason` instead of "skipped by request"."""
    names = list(names)
    requested = {f"{a}: skipped by request" for a in names}
    alone = (lambda a: f"; alone in int8 the output SQNR is {sensitivity[a]:.1f} dB") if sensitivity else (lambda a: "")
    return [s for s in skipped if s not in requested] + [f"{a}: kept in float for {reason}{alone(a)}" for a in names]


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


def holdout_split(calibration: Calibration) -> tuple[Calibration, Calibration]:
    """(calibrate on, measure on): the last TOLERANCE_HOLDOUT of the samples (at most
    TOLERANCE_MAX_HELDOUT) are held out; a single sample is used for both (nothing to hold out)."""
    n = calibration.num_samples
    if n < 2:
        return calibration, calibration
    hold = min(TOLERANCE_MAX_HELDOUT, max(1, round(n * TOLERANCE_HOLDOUT)))
    return calibration.split(hold / n)


@dataclass
class _Variant:
    """One quantized version of the float model."""

    plan: Plan
    proto: onnx.ModelProto
    shifts: dict[str, float]
    uncorrected: list[str]
    notes: list[str]
    encodings: dict[str, WeightEncoding]
    rounding: RoundingReport | None = None


class _Quantizer:
    """Quantized variants of one float model with chosen layers kept in float; histograms and input
    means are collected once per value and reused by every variant (tolerance mode builds many)."""

    def __init__(self, options: QuantizeQDQ, model: ir.Model, calibration: Calibration) -> None:
        self.options, self.model, self.calibration = options, model, calibration
        self.kernels = options.kernels
        self.proto = to_proto(model, with_data=True)  # weights are read from the proto (numpy_helper)
        self.hists: dict[str, TensorHistogram] = {}
        self.means: dict[str, np.ndarray] = {}
        self.asked: set[str] = set()
        self.asked_means: set[str] = set()
        self.seen = 0
        self.grams: dict[str, Gram] = {}  # layer inputs of the first all-int8 variant, reused by later ones
        self.learned: dict[tuple, tuple[WeightEncoding, float, int]] = {}

    def build(self, keep_float: Iterable[str] = ()) -> _Variant:
        o = self.options
        plan = plan_placement(self.proto, skip_nodes=set(o.skip_nodes) | set(keep_float), skip_ops=o.skip_ops,
                              fold_relu=True)
        missing = [v for v in plan.values if v not in self.asked]
        if missing:
            hists, self.seen = collect_histograms(self.model, missing, self.calibration, bins=o.bins, limit=o.samples)
            self.hists.update(hists)
            self.asked.update(missing)
        params = o.ranges(plan, self.hists)
        mean_squares = {v: h.mean_square() for v, h in self.hists.items()}
        encodings = weight_encodings(self.proto, plan, params, per_channel=o.per_channel, kernels=self.kernels,
                                     mean_squares=mean_squares)
        proto, shifts, uncorrected = self._corrected(plan, params, encodings)
        rounding = None
        if o.weight_rounding == "learned":
            encodings, rounding = self._learn(plan, params, encodings, proto)
            proto, shifts, uncorrected = self._corrected(plan, params, encodings)
        rewritten, notes = quantize_graph(proto, plan, params, encodings=encodings, drop_relus=o.preset == "cpu")
        return _Variant(plan, rewritten, shifts, uncorrected, notes, encodings, rounding)

    def _corrected(
        self, plan: Plan, params: Mapping[str, QuantParams], encodings: Mapping[str, WeightEncoding]
    ) -> tuple[onnx.ModelProto, dict[str, float], list[str]]:
        """The float model with bias correction for these encodings (unchanged without it)."""
        o = self.options
        if not o.bias_correction:
            return self.proto, {}, []
        axes = correction_inputs(self.proto, plan)
        need = {v: a for v, a in axes.items() if v not in self.asked_means}
        if need:
            stats = collect(self.model, need, self.calibration, limit=o.samples)
            self.means.update({v: s.mean for v, s in stats.values.items()})
            self.asked_means.update(need)
        return correct_biases(self.proto, plan, params, self.means, encodings=encodings)

    def _learn(
        self, plan: Plan, params: Mapping[str, QuantParams], encodings: dict[str, WeightEncoding],
        corrected: onnx.ModelProto,
    ) -> tuple[dict[str, WeightEncoding], RoundingReport]:
        """Learned codes for every layer that has calibration inputs (int8_rounding.py); the inputs
        come from this variant's nearest-rounded model, or from an earlier variant's (cached)."""
        start = time.perf_counter()
        g = _Graph(self.proto.graph)
        layers = [n for n in _correctable(g, plan) if _learnable(g, n)]
        missing = [n.name for n in layers if n.name not in self.grams]
        if missing:
            nearest, _ = quantize_graph(corrected, plan, params, encodings=encodings,
                                        drop_relus=self.options.preset == "cpu")
            self.grams.update(collect_grams(nearest, missing, self.calibration, limit=self.options.samples,
                                           batch_size=batch_size_for(self.model, 1)))
        report = RoundingReport()
        out = dict(encodings)
        for node in layers:
            enc = encodings[node.name]
            key = (node.name, enc.form, enc.codes.tobytes(), enc.scales.tobytes())
            if key not in self.learned:
                w = numpy_helper.to_array(g.inits[node.input[1]]).astype(np.float32)
                groups = int(_attr(node, "group", 1))
                self.learned[key] = learn_codes(
                    node.op_type, enc, w, self.grams[node.name], trans_b=bool(_attr(node, "transB", 0)),
                    depthwise=node.op_type == "Conv" and groups > 1 and w.shape[1] == 1 and w.shape[0] == groups,
                    kernels=self.kernels, centered=self.options.bias_correction)
            out[node.name], gain, kept = self.learned[key]
            report.layers += 1
            report.gain_db[node.name] = gain
            report.channels_kept_nearest += kept
        report.seconds = time.perf_counter() - start
        return out, report


def _learnable(g: _Graph, node: onnx.NodeProto) -> bool:
    """Whether learned rounding knows this layer's input rows: 2-D Conv with explicit pads, MatMul, Gemm."""
    if node.op_type != "Conv":
        return True
    return len(g.inits[node.input[1]].dims) == 4 and _attr(node, "auto_pad", "NOTSET") in ("NOTSET", b"NOTSET")


def activation_params(lo: float, hi: float, *, symmetric: bool) -> QuantParams:
    """uint8 asymmetric over [lo, hi] (zero exactly representable), or int8 symmetric over max(|lo|, |hi|)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        return QuantParams(max(max(-lo, hi) / 127.0, MIN_SCALE), 0, TensorProto.INT8)
    scale = max((hi - lo) / 255.0, MIN_SCALE)
    zero_point = int(np.clip(round(-lo / scale), 0, 255))
    return QuantParams(scale, zero_point, TensorProto.UINT8)


# ---------------------------------------------------------------------------- placement


class _Graph:
    """Producer/consumer maps of a GraphProto."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.constants = {t.name for t in graph.initializer}
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)

    def activations(self, node: onnx.NodeProto) -> list[str]:
        return [i for i in node.input if i and i not in self.constants]


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _constant_scalar(g: _Graph, name: str) -> float | None:
    """The value of a scalar constant (an initializer or a Constant node's output), else None."""
    if name in g.inits:
        array = numpy_helper.to_array(g.inits[name])
    else:
        node = g.producer.get(name)
        if node is None or node.op_type != "Constant" or len(node.attribute) != 1:
            return None
        attr = node.attribute[0]
        if attr.name == "value":
            array = numpy_helper.to_array(attr.t)
        elif attr.name in ("value_float", "value_int"):
            array = np.asarray(helper.get_attribute_value(attr))
        else:
            return None
    return float(array.reshape(-1)[0]) if array.size == 1 and np.isfinite(array).all() else None


def clamp_bounds(g: _Graph, node: onnx.NodeProto) -> tuple[float, float] | None:
    """(lower, upper) of a Relu or of a Clip whose bounds are constants (absent = unbounded); else None."""
    if node.op_type == "Relu":
        return 0.0, np.inf
    if node.op_type != "Clip":
        return None
    bounds = [-np.inf, np.inf]
    if any(a.name in ("min", "max") for a in node.attribute):  # opset < 11: bounds are attributes
        return float(_attr(node, "min", -np.inf)), float(_attr(node, "max", np.inf))
    for k, name in enumerate(node.input[1:3]):
        if name:
            value = _constant_scalar(g, name)
            if value is None:
                return None
            bounds[k] = value
    return bounds[0], bounds[1]


def quantization_clamps_to(p: QuantParams, lower: float, upper: float) -> bool:
    """Whether Q(x) == Q(clip(x, lower, upper)) for every x: Q is monotone, so it suffices that the
    bounds themselves quantize to the bottom and top codes (float32 divide, round half to even, as ORT)."""
    info = np.iinfo(np.uint8 if p.dtype == TensorProto.UINT8 else np.int8)
    scale = np.float32(p.scale)

    def code(x: float) -> float:
        return float(np.clip(np.rint(np.float32(x) / scale) + p.zero_point, info.min, info.max))

    return (lower == -np.inf or code(lower) == info.min) and (upper == np.inf or code(upper) == info.max)


def _anchor_reason(g: _Graph, node: onnx.NodeProto) -> str | None:
    """Why an anchor op cannot run in int8 here (None when it can)."""
    if node.op_type == "Conv":
        return None if node.input[1] in g.constants else "weight is not a constant"
    if node.op_type == "MatMul":
        if node.input[0] in g.constants:
            return "constant left operand"
        if node.input[1] in g.constants and len(g.inits[node.input[1]].dims) != 2:
            return "weight is not 2-D"
        return None
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return "transA/alpha/beta not supported"
        if node.input[1] not in g.constants:
            return "weight is not a constant"
        if len(node.input) > 2 and node.input[2] and node.input[2] not in g.constants:
            return "bias is not a constant"
        return None
    return "not an int8 op"


def plan_placement(
    proto: onnx.ModelProto, *, skip_nodes: Iterable[str] = (), skip_ops: Iterable[str] = (), fold_relu: bool = True
) -> Plan:
    """Decide which nodes run in int8 and which activation values get Q/DQ (see the module doc)."""
    g = _Graph(proto.graph)
    skip_nodes, skip_ops = set(skip_nodes), set(skip_ops)
    plan = Plan()
    chosen: set[str] = set()
    names = _ensure_node_names(proto.graph)
    by_name = {n.name: n for n in proto.graph.node}
    for node in proto.graph.node:
        if node.name in skip_nodes or node.op_type in skip_ops:
            if node.op_type in ANCHORS | NEIGHBOURLY | SCALE_PRESERVING:
                plan.skipped.append(f"{node.name}: skipped by request")
            continue
        if node.op_type in ANCHORS:
            reason = _anchor_reason(g, node)
            if reason is None:
                chosen.add(node.name)
            else:
                plan.skipped.append(f"{node.name}: {reason}")
    del names

    def fused_output(node: onnx.NodeProto) -> str:
        """The value an int8 node's output quantization applies to: after a following Relu/Clip."""
        out = node.output[0]
        users = g.consumers.get(out, [])
        if (fold_relu and node.op_type in FOLDS_ACTIVATION and len(users) == 1 and users[0].input[0] == out
                and clamp_bounds(g, users[0]) is not None
                and out not in g.outputs and users[0].output[0] not in g.outputs
                and users[0].name not in skip_nodes and users[0].op_type not in skip_ops):
            return users[0].output[0]
        return out

    def producer_of(value: str) -> onnx.NodeProto | None:
        node = g.producer.get(value)
        if node is not None and node.op_type in ("Relu", "Clip") and node.input[0] in g.producer:
            prev = g.producer[node.input[0]]
            if prev.name in chosen and fused_output(prev) == value:
                return prev
        return node

    def output_users(node: onnx.NodeProto) -> list[onnx.NodeProto]:
        return g.consumers.get(fused_output(node), [])

    changed = True
    while changed:  # grow int8 regions from the anchors until nothing more joins
        changed = False
        for node in proto.graph.node:
            if node.name in chosen or node.name in skip_nodes or node.op_type in skip_ops:
                continue
            if node.op_type in NEIGHBOURLY:
                acts = g.activations(node)
                if len(acts) != len([i for i in node.input if i]) or not node.output[0]:
                    continue
                near = any((p := producer_of(v)) is not None and p.name in chosen for v in acts)
                near = near or any(u.name in chosen for u in output_users(node))
                if near:
                    chosen.add(node.name)
                    changed = True
            elif node.op_type in SCALE_PRESERVING:
                p = producer_of(node.input[0]) if node.input[0] not in g.constants else None
                if p is not None and p.name in chosen and any(u.name in chosen for u in output_users(node)):
                    chosen.add(node.name)
                    changed = True

    values: dict[str, None] = {}
    parent: dict[str, str] = {}

    def find(v: str) -> str:
        while parent.setdefault(v, v) != v:
            v = parent[v]
        return v

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    for node in proto.graph.node:
        if node.name not in chosen:
            continue
        plan.nodes.append(node.name)
        inputs = [node.input[0]] if node.op_type in SCALE_PRESERVING else g.activations(node)
        for v in inputs:
            values[v] = None
        out = fused_output(node)
        if out != node.output[0]:
            plan.fused_activations[g.consumers[node.output[0]][0].name] = node.name
        wants_output = node.op_type not in ("MatMul", "Gemm") or any(u.name in chosen for u in g.consumers.get(out, []))
        # A graph output keeps its name and float type: the DQ produces it (see quantize_graph).
        if wants_output and (out not in g.outputs or node.op_type not in SCALE_PRESERVING):
            values[out] = None
            if node.op_type in SCALE_PRESERVING:
                union(out, node.input[0])
        if node.op_type == "Concat" and out not in g.outputs:
            for v in inputs:
                union(v, out)
    plan.values = list(values)
    plan.groups = {v: find(v) for v in plan.values}
    del by_name
    return plan


def _ensure_node_names(graph: onnx.GraphProto) -> set[str]:
    """Give every node a unique name (skip lists and reports refer to nodes by name)."""
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    return used


# ---------------------------------------------------------------------------- rewriting


def _weight_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return 1  # MatMul [K, N]: one scale per output column


def weight_encodings(
    proto: onnx.ModelProto, plan: Plan, params: Mapping[str, QuantParams], *, per_channel: bool = True,
    kernels: Kernels = "any", mean_squares: Mapping[str, float] | None = None,
) -> dict[str, WeightEncoding]:
    """{int8 anchor node: its weight's encoding} (passes/int8_weights.py), from the float weight, the
    per-channel axis, the input's scale and E[x^2] (`mean_squares`) and the float bias (so the int32
    bias fits)."""
    mean_squares = mean_squares or {}
    g = _Graph(proto.graph)
    encodings: dict[str, WeightEncoding] = {}
    for node in _correctable(g, plan):
        w = numpy_helper.to_array(g.inits[node.input[1]]).astype(np.float32)
        x = params.get(node.input[0])
        b_name = node.input[2] if len(node.input) > 2 else ""
        bias = numpy_helper.to_array(g.inits[b_name]).astype(np.float32) if b_name in g.inits else None
        bias = bias if bias is not None and bias.ndim == 1 else None
        groups = int(_attr(node, "group", 1))
        depthwise = node.op_type == "Conv" and groups > 1 and w.shape[1] == 1 and w.shape[0] == groups
        encodings[node.name] = encode_weight(
            node.op_type, w, _weight_axis(node) if per_channel else None, trans_b=bool(_attr(node, "transB", 0)),
            depthwise=depthwise, kernels=kernels, x_scale=None if x is None else x.scale, x_mean_square=mean_squares.get(node.input[0]),
            bias=bias)
    return encodings


def quantize_graph(
    proto: onnx.ModelProto,
    plan: Plan,
    params: Mapping[str, QuantParams],
    *,
    encodings: Mapping[str, WeightEncoding] | None = None,
    per_channel: bool = True,
    drop_relus: bool = True,
) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `proto` with Q/DQ pairs on the planned values and int8/int32 weights and biases
    (`encodings` from weight_encodings; computed here for any kernels when not given)."""
    if encodings is None:
        encodings = weight_encodings(proto, plan, params, per_channel=per_channel)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    _ensure_node_names(graph)
    g = _Graph(graph)
    notes: list[str] = []
    taken = {v for n in graph.node for v in (*n.input, *n.output)} | set(g.inits) | {i.name for i in graph.input}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    new_inits: list[onnx.TensorProto] = []

    def const(base: str, array: np.ndarray) -> str:
        name = fresh(base)
        new_inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    # Relu/Clip nodes that the output quantization replaces exactly (its clamp is theirs)
    dropped: dict[str, str] = {}  # activation output -> activation input
    by_name = {n.name: n for n in graph.node}
    for act_name in plan.fused_activations:
        act = by_name[act_name]
        p, bounds = params.get(act.output[0]), clamp_bounds(g, act)
        if drop_relus and p is not None and bounds is not None and quantization_clamps_to(p, *bounds):
            dropped[act.output[0]] = act.input[0]

    qdq: dict[str, list[onnx.NodeProto]] = {}  # value -> its Q and DQ nodes, placed after its producer
    renamed: dict[str, str] = {}
    for v in plan.values:
        p = params.get(v)
        if p is None:
            continue
        scale = const(f"{v}_scale", np.float32(p.scale))
        zp = const(f"{v}_zero_point", np.array(p.zero_point, dtype=np.uint8 if p.dtype == TensorProto.UINT8 else np.int8))
        q, dq = fresh(f"{v}_quantized"), fresh(f"{v}_dequantized")
        source = dropped.get(v, v)
        if v in g.outputs:  # the producer writes a new name; the DQ writes the graph output
            source = fresh(f"{v}_float")
            g.producer[v].output[list(g.producer[v].output).index(v)] = source
            dq = v
        else:
            renamed[v] = dq
        qdq[source if v in g.outputs else v] = [
            helper.make_node("QuantizeLinear", [source, scale, zp], [q], name=fresh(f"{v}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [q, scale, zp], [dq], name=fresh(f"{v}_DequantizeLinear")),
        ]

    weight_dq: dict[tuple, str] = {}  # one DQ per distinct encoding of a weight
    pre_nodes: list[onnx.NodeProto] = []
    saturated: list[str] = []
    for node in _correctable(g, plan):
        w_name, enc = node.input[1], encodings[node.name]
        x_params = params.get(node.input[0])
        ws = enc.scales
        key = (w_name, enc.axis, enc.codes.dtype.str, ws.tobytes())
        if key not in weight_dq:
            scale = const(f"{w_name}_scale", ws)
            zp = const(f"{w_name}_zero_point", np.full(ws.shape, enc.zero_point, dtype=enc.codes.dtype))
            weight_dq[key] = fresh(f"{w_name}_dequantized")
            attrs = {"axis": enc.axis} if enc.axis is not None else {}
            pre_nodes.append(helper.make_node("DequantizeLinear", [const(f"{w_name}_quantized", enc.codes), scale, zp],
                                              [weight_dq[key]], name=fresh(f"{w_name}_DequantizeLinear"), **attrs))
        node.input[1] = weight_dq[key]
        if len(node.input) > 2 and node.input[2] and node.input[2] in g.constants and x_params is not None:
            b = numpy_helper.to_array(g.inits[node.input[2]]).astype(np.float32)
            if b.ndim == 1 and (ws.size == 1 or ws.size == b.size):
                bq, bs, sat = quantize_bias(b, x_params.scale, ws)
                if sat:
                    saturated.append(node.name)
                bscale = const(f"{node.input[2]}_scale", bs)
                bzp = const(f"{node.input[2]}_zero_point", np.zeros(bs.shape, dtype=np.int32))
                b_out = fresh(f"{node.input[2]}_dequantized")
                pre_nodes.append(helper.make_node("DequantizeLinear", [const(f"{node.input[2]}_quantized", bq), bscale, bzp],
                                                  [b_out], name=fresh(f"{node.name}_bias_DequantizeLinear"), axis=0))
                node.input[2] = b_out
    if saturated:
        notes.append(f"int32 bias saturated in {', '.join(saturated)}")

    # Rebuild the node list: Q/DQ right after each quantized value's producer, consumers rewired.
    nodes: list[onnx.NodeProto] = list(pre_nodes)
    graph_inputs = {i.name for i in graph.input}
    for v, pair in qdq.items():
        if v in graph_inputs:
            nodes += pair
    dropped_acts = {n.name for n in graph.node if n.name in plan.fused_activations and n.output[0] in dropped}
    for node in graph.node:
        if node.name in dropped_acts:
            for v in node.output:
                nodes += qdq.get(v, [])
            continue
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
        nodes.append(node)
        for v in node.output:
            nodes += qdq.get(v, [])
    # Producers feeding dropped activations: the Q reads the producer output, placed after the
    # activation's slot, which is after the producer (graph order is topological).
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    bound_inputs = {i for n in graph.node if n.name in dropped_acts for i in n.input[1:]}
    # Constant nodes that only held a dropped Clip's bounds go with it.
    nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output[0] in bound_inputs and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name in used or t.name in graph_inputs]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    guarded = guard_float_layers(out)  # else ORT gives the float layers per-tensor int8 weights itself
    if guarded:
        notes.append(f"{len(guarded)} float layers read int8 activations through a per-axis DequantizeLinear, "
                     "so ONNX Runtime keeps their weights in float")
    return out, notes


# ---------------------------------------------------------------------------- bias correction
# Nagel et al. 2019 ("Data-Free Quantization", empirical bias correction): rounding the weights
# moves each output's expected value by (W_q - W) . E[x]; subtracting that from the bias makes the
# int8 layer unbiased. E[x] is the float model's per-channel input mean over the calibration data.


def _input_axis(node: onnx.NodeProto) -> int:
    """The axis of the node's activation input that the weight contracts over."""
    return -1 if node.op_type == "MatMul" else 1  # Conv NCHW channels; Gemm [M, K] (transA=0)


def _correctable(g: _Graph, plan: Plan) -> list[onnx.NodeProto]:
    """int8 anchors with a constant weight (the weights quantize_graph rounds)."""
    chosen = set(plan.nodes)
    return [n for n in g.graph.node if n.name in chosen and n.op_type in ANCHORS and n.input[1] in g.constants]


def correction_inputs(proto: onnx.ModelProto, plan: Plan) -> dict[str, int]:
    """{activation input: channel axis} whose per-channel means bias correction needs."""
    g = _Graph(proto.graph)
    axes: dict[str, int] = {}
    for node in _correctable(g, plan):
        axes.setdefault(node.input[0], _input_axis(node))
    return axes


def weight_rounding_error(w: np.ndarray, axis: int | None) -> np.ndarray:
    """dequantize(quantize(W)) - W for full-range symmetric int8 codes (float32 arithmetic)."""
    q, scale = quantize_weight(w, axis)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    return q.astype(np.float32) * scale.reshape(shape) - w


def bias_shift(node: onnx.NodeProto, delta: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Per-output change of the expected output, sum over inputs (and kernel taps) of delta * mean.

    Conv: every tap sees the channel mean; zero padding makes border outputs see fewer taps, which
    this ignores (the interior dominates and the shift is an expectation, not a per-pixel term)."""
    mean = mean.astype(np.float64)
    delta = delta.astype(np.float64)
    if node.op_type == "Conv":
        groups = int(_attr(node, "group", 1))
        per_tap = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(axis=2)  # [M, C/groups]
        group_means = mean.reshape(groups, -1)  # [groups, C/groups]
        group_of_output = np.arange(delta.shape[0]) // (delta.shape[0] // groups)
        return np.einsum("mc,mc->m", per_tap, group_means[group_of_output])
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return delta @ mean  # W [N, K]
    return mean @ delta  # Gemm/MatMul W [K, N]


def correct_biases(
    proto: onnx.ModelProto,
    plan: Plan,
    params: Mapping[str, QuantParams],
    means: Mapping[str, np.ndarray],
    *,
    encodings: Mapping[str, WeightEncoding] | None = None,
    per_channel: bool = True,
) -> tuple[onnx.ModelProto, dict[str, float], list[str]]:
    """A copy of `proto` whose int8 layers' float biases absorb their weight-rounding shift (the
    rounding of `encodings`, computed for any kernels when not given); returns
    (model, {node: max |shift|}, ["node: why not corrected"])."""
    if encodings is None:
        encodings = weight_encodings(proto, plan, params, per_channel=per_channel)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    _ensure_node_names(graph)
    g = _Graph(graph)
    taken = {v for n in graph.node for v in (*n.input, *n.output)} | set(g.inits) | {i.name for i in graph.input}
    shifts: dict[str, float] = {}
    skipped: list[str] = []

    def new_bias(base: str, array: np.ndarray) -> str:
        name, k = f"{base}_corrected", 0
        while name in taken:
            k += 1
            name = f"{base}_corrected_{k}"
        taken.add(name)
        graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    for node in _correctable(g, plan):
        mean = means.get(node.input[0])
        w = numpy_helper.to_array(g.inits[node.input[1]]).astype(np.float32)
        k_in = w.shape[1] * int(_attr(node, "group", 1)) if node.op_type == "Conv" else (
            w.shape[1] if node.op_type == "Gemm" and _attr(node, "transB", 0) else w.shape[0])
        if mean is None or mean.size != k_in:
            skipped.append(f"{node.name}: no input mean")
            continue
        enc = encodings[node.name]
        shift = bias_shift(node, enc.dequantized() - w, mean)
        if node.op_type == "MatMul":  # no bias slot: fold into a following Add of a constant
            users = g.consumers.get(node.output[0], [])
            add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
            slot = next((k for k, v in enumerate(add.input) if v != node.output[0] and v in g.inits), None) if add else None
            if slot is None:
                skipped.append(f"{node.name}: MatMul without a constant bias Add")
                continue
            b = numpy_helper.to_array(g.inits[add.input[slot]]).astype(np.float64)
            if b.ndim > 1 and b.shape[-1] not in (1, shift.size):
                skipped.append(f"{node.name}: bias Add does not broadcast along the output columns")
                continue
            add.input[slot] = new_bias(add.input[slot], b - shift)
        elif len(node.input) > 2 and node.input[2]:
            b = numpy_helper.to_array(g.inits[node.input[2]]).astype(np.float64)
            corrected = b - shift  # Gemm's C broadcasts over [M, N]: the shift runs along N
            node.input[2] = new_bias(node.input[2], corrected.reshape(-1) if corrected.size == shift.size else corrected)
        else:
            x = params.get(node.input[0])
            # create a bias only when the shift survives int32 rounding (half a bias step)
            if x is None or not np.any(np.abs(shift) >= 0.5 * x.scale * enc.scales.astype(np.float64)):
                continue
            while len(node.input) < 2:
                node.input.append("")
            node.input.append(new_bias(f"{node.name}_bias", -shift))
        shifts[node.name] = float(np.max(np.abs(shift)))
    return out, shifts, skipped


def _ensure_opset(model: ir.Model) -> tuple[ir.Model, str | None]:
    """Per-axis QDQ needs opset >= 13: convert older models with onnx.version_converter."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    if opset >= QDQ_MIN_OPSET:
        return model, None
    from onnx import version_converter

    try:
        # With its data: the converted proto is loaded without the folder its locations are relative to.
        proto = version_converter.convert_version(to_proto(model, with_data=True), QDQ_MIN_OPSET)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise OnnxCompressError(
            f"quantize-int8 needs opset >= {QDQ_MIN_OPSET} and converting from opset {opset} failed ({first})"
        ) from None
    proto.ir_version = max(proto.ir_version, 7)
    return load(proto), f"opset {opset} -> {QDQ_MIN_OPSET} (per-channel QDQ needs opset 13)"


def subgraph_layers(model: ir.Model) -> list[str]:
    """Why each Conv/MatMul/Gemm inside an If/Loop/Scan body stays float: Q/DQ placement and
    calibration see the main graph only (activations inside a body cannot be fetched by name)."""
    from ..analysis.cost import inner_nodes

    return [f"{name}: {node.op_type} inside the {top.op_type} '{top.name}' body left in float (static int8 covers "
            "the main graph; quantize-dynamic quantizes subgraph weights)"
            for name, node, top in inner_nodes(model) if node.op_type in ANCHORS]


__all__ = [
    "CalibrationNeededError", "Plan", "QuantParams", "QuantizeQDQ", "activation_params", "bias_shift", "clamp_bounds",
    "correct_biases", "correction_inputs", "plan_placement", "quantization_clamps_to", "quantize_bias", "quantize_graph",
    "quantize_weight", "subgraph_layers", "weight_encodings", "weight_rounding_error",
]

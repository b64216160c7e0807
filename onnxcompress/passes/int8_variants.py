"""Quantized variants of one float model (QuantizeQDQ, passes/quantize.py): each with chosen layers
kept in float, built from statistics collected once per value and reused by every variant (the
mixed-precision choice and the tolerance mode build many)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ..analysis.activations import collect
from ..analysis.histograms import TensorHistogram, collect_histograms
from ..calibration import Calibration, batch_size_for
from .int8_bias import correct_biases, correction_inputs
from .int8_graph import QuantParams, quantize_graph, weight_encodings
from .int8_placement import Plan, PlanGraph, constant_weight_anchors, input_name, node_attr, plan_placement
from .int8_rounding import Gram, RoundingReport, collect_grams, learn_codes
from .int8_weights import WeightEncoding

if TYPE_CHECKING:
    from ..analysis.statistics import Statistics
    from .quantize import QuantizeQDQ


@dataclass
class Variant:
    """One quantized version of the float model."""

    plan: Plan
    model: ir.Model
    shifts: dict[str, float]
    uncorrected: list[str]
    notes: list[str]
    encodings: dict[str, WeightEncoding]
    rounding: RoundingReport | None = None


class Quantizer:
    """Quantized variants of one float model with chosen layers kept in float; histograms and input
    means are collected once per value and reused by every variant (tolerance mode builds many)."""

    def __init__(self, options: QuantizeQDQ, model: ir.Model, calibration: Calibration,
                 statistics: Statistics | None = None) -> None:
        self.options, self.model, self.calibration = options, model, calibration
        self.statistics = statistics  # where histograms and means of this model state are gathered (or kept)
        self.kernels = options.kernels
        self.hists: dict[str, TensorHistogram] = {}
        self.means: dict[str, np.ndarray] = {}
        self.asked: set[str] = set()
        self.asked_means: set[str] = set()
        self.seen = 0
        self.grams: dict[str, Gram] = {}  # layer inputs of the first all-int8 variant, reused by later ones
        self.learned: dict[tuple, tuple[WeightEncoding, float, int]] = {}

    def build(self, keep_float: Iterable[str] = ()) -> Variant:
        o = self.options
        plan = plan_placement(self.model, skip_nodes=set(o.skip_nodes) | set(keep_float), skip_ops=o.skip_ops,
                              fold_relu=True)
        missing = [v for v in plan.values if v not in self.asked]
        if missing:
            hists, self.seen = collect_histograms(self.model, missing, self.calibration, bins=o.bins, limit=o.samples,
                                                  statistics=self.statistics)
            self.hists.update(hists)
            self.asked.update(missing)
        params = o.ranges(plan, self.hists)
        mean_squares = {v: h.mean_square() for v, h in self.hists.items()}
        encodings = weight_encodings(self.model, plan, params, per_channel=o.per_channel, kernels=self.kernels,
                                     mean_squares=mean_squares)
        corrected, shifts, uncorrected = self._corrected(plan, params, encodings)
        rounding = None
        if o.weight_rounding == "learned":
            encodings, rounding = self._learn(plan, params, encodings, corrected)
            corrected, shifts, uncorrected = self._corrected(plan, params, encodings)
        rewritten, notes = quantize_graph(corrected, plan, params, encodings=encodings, drop_relus=o.preset == "cpu")
        return Variant(plan, rewritten, shifts, uncorrected, notes, encodings, rounding)

    def _corrected(
        self, plan: Plan, params: Mapping[str, QuantParams], encodings: Mapping[str, WeightEncoding]
    ) -> tuple[ir.Model, dict[str, float], list[str]]:
        """The float model with bias correction for these encodings (unchanged without it)."""
        o = self.options
        if not o.bias_correction:
            return self.model, {}, []
        axes = correction_inputs(self.model, plan)
        need = {v: a for v, a in axes.items() if v not in self.asked_means}
        if need:
            stats = collect(self.model, need, self.calibration, limit=o.samples, statistics=self.statistics)
            self.means.update({v: s.mean for v, s in stats.values.items()})
            self.asked_means.update(need)
        return correct_biases(self.model, plan, params, self.means, encodings=encodings)

    def _learn(
        self, plan: Plan, params: Mapping[str, QuantParams], encodings: dict[str, WeightEncoding],
        corrected: ir.Model,
    ) -> tuple[dict[str, WeightEncoding], RoundingReport]:
        """Learned codes for every layer that has calibration inputs (int8_rounding.py); the inputs
        come from this variant's nearest-rounded model, or from an earlier variant's (cached)."""
        start = time.perf_counter()
        g = PlanGraph(self.model.graph)
        layers = [n for n in constant_weight_anchors(g, plan) if _learnable(n)]
        missing = [g.name(n) for n in layers if g.name(n) not in self.grams]
        if missing:
            nearest, _ = quantize_graph(corrected, plan, params, encodings=encodings,
                                        drop_relus=self.options.preset == "cpu")
            self.grams.update(collect_grams(nearest, missing, self.calibration, limit=self.options.samples,
                                           batch_size=batch_size_for(self.model, 1)))
        report = RoundingReport()
        out = dict(encodings)
        for node in layers:
            name = g.name(node)
            enc = encodings[name]
            key = (name, enc.form, enc.codes.tobytes(), enc.scales.tobytes())
            if key not in self.learned:
                w = g.array(input_name(node, 1)).astype(np.float32)
                groups = int(node_attr(node, "group", 1))
                self.learned[key] = learn_codes(
                    node.op_type, enc, w, self.grams[name], trans_b=bool(node_attr(node, "transB", 0)),
                    depthwise=node.op_type == "Conv" and groups > 1 and w.shape[1] == 1 and w.shape[0] == groups,
                    kernels=self.kernels, centered=self.options.bias_correction)
            out[name], gain, kept = self.learned[key]
            report.layers += 1
            report.gain_db[name] = gain
            report.channels_kept_nearest += kept
        report.seconds = time.perf_counter() - start
        return out, report


def _learnable(node: ir.Node) -> bool:
    """Whether learned rounding knows this layer's input rows: 2-D Conv with explicit pads, MatMul, Gemm."""
    if node.op_type != "Conv":
        return True
    return len(node.inputs[1].const_value.shape) == 4 and node_attr(node, "auto_pad", "NOTSET") == "NOTSET"

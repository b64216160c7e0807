"""Factorize: low-rank (SVD) factorization of Gemm, MatMul and Conv layers with constant weights.

Every layer is written as a matrix M (rows: the input side, columns: the output side) whose product
A·B (A: rows x r, B: r x columns) becomes two layers:

- Gemm/MatMul, y = x·W (+ b):        x·A -> h, then h·B (+ b, kept on the second node);
- Conv "channel" (W as [C·k, O]):    r k x k filters, then a 1 x 1 conv to O channels (+ b);
- Conv "spatial" (W as [C·kh, O·kw]): r kh x 1 filters, then O 1 x kw filters (+ b) (2-D only);
- Conv "squeeze" (W as [C, O·k]):    a 1 x 1 conv to r channels, then O k x k filters (+ b).

Each form is a reshaping of the same weight, so at full rank it is exact and plain SVD's weight error
is the norm of the discarded singular values. A layer is factorized only below its break-even rank
(fewer MACs than the original; r < mn/(m+n) for Gemm), with r a multiple of `round_to`, and per layer
the form with the fewest MACs wins.

With calibration data the truncation minimises the layer's output error on that data rather than the
weight error: with Σ the covariance of the layer's input rows (im2col rows for Conv), the error of
W -> W' is tr((W - W')ᵀ Σ (W - W')), and for Gemm/MatMul and the channel form (whose first factor
reads whole input rows) the best rank-r W' is the projection of W onto the top-r eigenvectors of
Wᵀ Σ W (the principal components of the layer's outputs). The spatial and squeeze forms share their
first factor across kernel taps (all taps for squeeze, the horizontal ones for spatial), so that
closed form does not apply: their first factor comes from whitening by the covariance of what it
reads (pixels of C channels; columns of kh rows), averaged over the taps, and the second factor is
then refitted by least squares on the full im2col covariance; the plain-SVD first factor with the
same refit is tried too and the one with the smaller output error kept, so data-aware never loses
to plain SVD on the calibration data. The bias is refitted to absorb the mean of the residual.

Spectra and factors come from eigen-decompositions of the smaller Gram matrix (a few times faster
than LAPACK's SVD, which was most of the pass's time on large layers); only the top-r eigenvectors
of the chosen rank are computed.

Latency-aware mode (`latency_aware=True`) times every chosen layer on the target provider at the
model's input shapes, as a one-layer model against its two-layer replacement (interleaved, medians,
analysis.layer_timing), and keeps a factorization only if it is at least `min_speedup` faster; each
distinct (layer shape, form, rank) is timed once. With a MAC budget, rejected (layer, form) pairs
are excluded and the budget reallocated among the rest.

The parts live in this package, one job each: which layers can be factorized (`layers.py`), the
forms' reshapings (`forms.py`), truncation (`truncation.py`), the input moments (`moments.py`), a
layer's candidates and factors (`candidates.py`), rank choice (`ranks.py`), the rewrite
(`rewrite.py`) and latency-aware timing (`latency.py`); this module holds the pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import onnx_ir as ir

from ... import runtime
from ...analysis.layer_timing import PairTiming, time_pair
from ...analysis.shapes import infer_shapes
from ...pipeline import Pass, PassContext, PassResult, option
from .candidates import Candidate, candidates, factors
from .forms import form_covariance, matrix, taps, unmatrix
from .latency import LATENCY_ROUNDS, LatencyJudge, layer_models
from .layers import Layer, find_layers, subgraph_layers
from .moments import Moments, collect_moments, im2col
from .ranks import allocate_budget, eligible_ranks
from .rewrite import Names, apply, rewrite
from .truncation import WHITEN_FLOOR, output_sq_error, refit_second, spectrum, truncate

ConvForm = Literal["channel", "spatial", "squeeze"]
CONV_FORMS: tuple[ConvForm, ...] = ("channel", "spatial", "squeeze")
#: Energy kept when no rank criterion is given at all.
DEFAULT_ENERGY = 0.95
#: Data-aware factorization needs at least this many calibration rows per input feature.
MIN_ROWS_PER_FEATURE = 2


@dataclass
class Factorize(Pass):
    """Replace Gemm/MatMul/Conv layers by two thinner layers of low rank."""

    name: ClassVar[str] = "factorize"
    exact: ClassVar[bool] = False

    rank_ratio: float | None = option(None, "Low-rank factorize Gemm/MatMul/Conv, keeping this fraction of each rank.")
    energy: float | None = option(None, "Low-rank factorize, keeping this share of the singular values' energy.")
    mac_budget: float | None = option(None, "Low-rank factorize until this fraction of the MACs is left, ranks "
                                            "allocated by least loss per MAC saved (overrides the two above).")
    round_to: int = option(8, "Ranks are multiples of this (ORT's CPU kernels work in blocks).")
    forms: tuple[ConvForm, ...] = option(CONV_FORMS, "Conv forms to consider.")
    data_aware: bool = option(True, "Whiten by the input covariance when calibration data is given.")
    min_macs: int = option(0, "Layers with fewer MACs are left alone.")
    calibration_samples: int = 64
    max_gram_features: int = option(4608, "Larger inputs are factorized without data (their Gram would be big).")
    positions_per_sample: int = option(1024, "Conv: im2col rows sampled per calibration sample.")
    seed: int = 0
    latency_aware: bool = option(False, "Factorize only layers measured faster (on `provider`) at the model's shape.")
    provider: str = option("cpu", "Where latency-aware mode times layers: cpu | cuda | tensorrt.")
    min_speedup: float = option(1.05, "Latency-aware: keep a layer only if measured this much faster.")
    latency_threads: int | None = option(None, "Intra-op threads when timing (default: physical cores, as bench).")

    def __post_init__(self) -> None:
        if self.rank_ratio is not None and not 0.0 < self.rank_ratio <= 1.0:
            raise ValueError(f"rank_ratio must be in (0, 1], got {self.rank_ratio}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.mac_budget is not None and not 0.0 < self.mac_budget <= 1.0:
            raise ValueError(f"mac_budget must be in (0, 1], got {self.mac_budget}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")
        if not self.forms or any(f not in CONV_FORMS for f in self.forms):
            raise ValueError(f"forms must be a non-empty subset of {', '.join(CONV_FORMS)}, got {self.forms}")
        if self.min_speedup <= 0:
            raise ValueError(f"min_speedup must be positive, got {self.min_speedup}")
        if self.latency_threads is not None and self.latency_threads < 1:
            raise ValueError(f"latency_threads must be 1 or more, got {self.latency_threads}")
        if self.latency_aware:
            runtime.provider_chain(self.provider)  # unknown or unavailable provider: a one-line error now

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        shapes = infer_shapes(model, ctx.input_shapes)
        layers, skipped = find_layers(model, shapes, min_macs=self.min_macs)
        skipped += subgraph_layers(model)
        notes: list[str] = []
        stats: dict[str, Moments] = {}
        if ctx.calibration is not None and self.data_aware and layers:
            stats = collect_moments(model, layers, ctx.calibration, samples=self.calibration_samples,
                                    max_features=self.max_gram_features, positions=self.positions_per_sample,
                                    seed=self.seed)
            if ctx.calibration.is_random:
                notes.append("data-aware factorization measured on random data")
            big = [l.node.name for l in layers if l.node.name not in stats]
            if big:
                notes.append(f"{len(big)} layers have more than {self.max_gram_features} input features: factorized without data")
            # With fewer rows than features the covariance is rank-deficient and whitening fits the
            # calibration rows exactly while discarding what they do not show: plain SVD is safer.
            thin = [l for l in layers if l.node.name in stats
                    and stats[l.node.name].count < MIN_ROWS_PER_FEATURE * l.input_features()]
            for layer in thin:
                rows = stats.pop(layer.node.name).count
                notes.append(f"{layer.node.name}: {rows} calibration rows for {layer.input_features()} input features "
                             f"(fewer than {MIN_ROWS_PER_FEATURE} per feature): factorized without data")
        options = {l.node.name: candidates(l, self.forms, stats.get(l.node.name)) for l in layers}
        judge = (LatencyJudge(model, self.provider, self.latency_threads, self.min_speedup, measure_layer)
                 if self.latency_aware else None)
        if self.mac_budget is not None:
            from ...analysis.cost import analyze_cost

            total = analyze_cost(model, ctx.input_shapes).stats.macs
            budget = self.mac_budget * total
            if judge is None:
                chosen, reached = allocate_budget(layers, options, self.round_to, budget, total)
            else:
                chosen, reached = judge.allocate(layers, options, self.round_to, budget, total)
            if not reached:
                notes.append(f"MAC budget {self.mac_budget:g} is out of reach below break-even ranks"
                             + (" with the layers measured faster" if judge else "") + "; factorized as far as possible")
        else:
            chosen = {}
            energy = self.energy if (self.energy is not None or self.rank_ratio is not None) else DEFAULT_ENERGY
            for layer in layers:
                eligible, reason = eligible_ranks(options[layer.node.name], energy, self.rank_ratio, self.round_to)
                if eligible and judge is not None:
                    eligible, reason = judge.fastest(layer, eligible)
                if eligible:
                    chosen[layer.node.name] = eligible[0]
                else:
                    skipped.append(f"{layer.node.name}: {reason}")
        if judge is not None and self.mac_budget is not None:
            skipped += judge.rejections(chosen)
        names = Names(model)
        records, changes = [], []
        for layer in layers:
            if layer.node.name not in chosen:
                continue
            cand, rank = chosen[layer.node.name]
            timing = judge.timing_record(layer, cand, rank) if judge is not None else {}  # before the node changes
            record = apply(model, layer, cand, rank, names)
            record.update(timing)
            records.append(record)
            changes.append(f"{layer.node.name}: {layer.kind} -> {cand.form} rank {rank} (MACs {record['macs_before']} -> {record['macs_after']})")
        details = {"layers": records, "notes": notes, "data_aware": bool(stats)}
        if judge is not None:
            details["latency"] = judge.summary()
            notes.append(f"latency-aware: {judge.timed} distinct layer shapes timed on {self.provider} "
                         f"({judge.seconds:.1f} s), kept if at least {self.min_speedup:g}x faster")
        return self.result(model, changes=changes, skipped=skipped, details=details)


def measure_layer(original: ir.Model, factorized: ir.Model, *, provider: str, threads: int | None) -> PairTiming:
    """Median latency of a layer and of its replacement, timed interleaved (tests replace this)."""
    return time_pair(original, factorized, provider=provider, threads=threads)


__all__ = ["CONV_FORMS", "LATENCY_ROUNDS", "WHITEN_FLOOR", "Candidate", "Factorize", "Layer", "apply", "candidates",
           "collect_moments", "factors", "find_layers", "form_covariance", "im2col", "layer_models", "matrix",
           "measure_layer", "output_sq_error", "refit_second", "rewrite", "spectrum", "taps", "truncate", "unmatrix"]

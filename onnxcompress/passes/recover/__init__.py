"""Training-free accuracy recovery after structured channel pruning.

Every sink (a Conv with group 1, Gemm, or MatMul with a constant 2-D weight that lost input channels)
is treated as an affine layer over rows of its input, y = x·W + b: one row per output position, with
k×k convolutions unfolded (im2col) so that a row holds a whole receptive field. Two steps, fitted on
the calibration samples minus a held-out part that only ever measures:

1. Bias compensation: the removed inputs' mean contribution, measured on the original model, moves
   into the bias. Exact when the removed inputs are constant. For convolutions the zero-padded border
   is ignored: output positions near a border also receive the share of kernel taps that read padding.
2. Refit ("refit" mode): sequential layer-wise ridge least squares (He et al. 2017; AIMET's weight
   reconstruction). Inputs come from the pruned network with the upstream sinks already refit, targets
   from the original network at the layer's output (before any activation). The ridge term pulls
   toward the bias-compensated weights, so its strength runs from "least squares" to "keep them"
   (λ = ∞); it is chosen by error on held-out samples, so no layer gets worse on held-out data.

Cost: sinks are grouped into stages (no sink of a stage is upstream of another). Each stage runs, in
the original and in the pruned network, only the nodes between the activations kept from the previous
stage and its own layers' inputs and outputs, so every node runs about once over the calibration data
(ResNet-50, 53 layers in 49 stages, 256 samples: about 3 minutes on 2 CPU cores). Normal equations
are accumulated over batches of sampled rows: memory grows with the layer widths and the activations
kept between stages (bounded by CACHE_BYTES), not with the number of rows.

The steps live in this package, one job each: the affine view of a sink (`layers.py`), writing
parameters back (`write.py`), bias compensation (`bias.py`), the staged runs of both networks
(`stages.py`) and the ridge refit (`refit.py`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import onnx_ir as ir

from ...analysis.channels import Sink
from ...calibration import Calibration, batch_size_for
from ...pipeline import FITTING_HOLDOUT
from ...report import to_jsonable
from ...verify import compare, outputs
from .bias import compensate
from .layers import affine_layer
from .refit import refit

#: Fraction of the calibration samples held out to choose the ridge strength and report fidelity:
#: the pipeline's verification feeds come from the same part.
HOLDOUT = FITTING_HOLDOUT
#: Below this many samples a refit of wide layers is underdetermined or noisy: warn.
SMALL_CALIBRATION = 64
#: Ridge strengths tried, relative to the mean diagonal of X^T X, from the largest down until the held-out
#: error turns up (λ = ∞, "keep the bias-compensated weights", is always a candidate too).
RIDGE_GRID: tuple[float, ...] = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: Sampled output positions per calibration sample for convolutions and sequence MatMuls.
POSITIONS_PER_SAMPLE = 64
#: Upper bound on the rows each layer's fit accumulates (positions per sample shrink to honor it).
MAX_ROWS = 16384
#: Layers with more inputs than this (after im2col) are only bias-compensated: X^T X would not fit.
MAX_INPUTS = 6144
#: Activations kept between refit stages, per network (original and pruned), beyond which a stage
#: recomputes from the graph inputs instead.
CACHE_BYTES = 2 << 30
BATCH_SIZE = 16


def recover(
    original: ir.Model,
    model: ir.Model,
    sinks: Sequence[Sink],
    calibration: Calibration,
    *,
    mode: str = "refit",
    samples: int | None = 256,
    seed: int = 0,
    holdout: float = HOLDOUT,
    ridge: Sequence[float] = RIDGE_GRID,
    positions_per_sample: int = POSITIONS_PER_SAMPLE,
    max_rows: int = MAX_ROWS,
    max_inputs: int = MAX_INPUTS,
    cache_bytes: int = CACHE_BYTES,
    batch_size: int = BATCH_SIZE,
    statistics=None,
) -> dict:
    """Recover `model` (pruned from `original`, same node and initializer names) in place.

    mode "bias" compensates biases; "refit" then refits every sink's kept weights and bias. Returns a
    JSON-able report: per sink what was done and its held-out error, whole-model fidelity against
    `original` on held-out samples before and after, warnings, and the seconds spent. `statistics`
    (analysis/statistics.Statistics): where the bias means of `original` are gathered or kept.
    """
    if mode not in ("bias", "refit"):
        raise ValueError(f"recovery mode must be 'bias' or 'refit', got {mode!r}")
    start = time.perf_counter()
    calib = _first(calibration, samples)
    n = calib.num_samples
    report: dict = {"mode": mode, "samples": n, "sinks": [], "warnings": []}
    if n < 2:
        report["warnings"].append(f"calibration set has {n} sample: nothing to hold out, recovery skipped")
        report["seconds"] = time.perf_counter() - start
        return report
    fit, held = calib.split(holdout)
    report.update(fit_samples=fit.num_samples, heldout_samples=held.num_samples)
    if n < SMALL_CALIBRATION:
        report["warnings"].append(f"calibration set is small ({n} samples): recovery may overfit")
    if calib.is_random:
        report["warnings"].append(
            "calibration data is random: recovery is fitted to noise and says nothing about real inputs")

    bs = batch_size_for(original, batch_size)
    held_feeds = list(held.batches(bs))
    t0 = time.perf_counter()
    reference = outputs(original, held_feeds, "original model (recovery)")

    def fidelity() -> dict:
        t0 = time.perf_counter()
        measured = compare(reference, outputs(model, held_feeds, "pass 'prune-channels' (recovery)"), held.source)
        report["fidelity_seconds"] += time.perf_counter() - t0
        return to_jsonable(measured)

    report["fidelity_seconds"] = time.perf_counter() - t0
    report["fidelity"] = {"before": fidelity()}
    layers = []
    for sink in sinks:
        layer, reason = affine_layer(original, model, sink)
        if layer is None:
            report["sinks"].append({"node": sink.node, "op_type": sink.op_type, "method": "skipped", "reason": reason})
        else:
            layers.append(layer)
            report["sinks"].append(layer.record)

    t0 = time.perf_counter()
    compensate(original, model, layers, fit, bs, statistics)
    report["bias_seconds"] = time.perf_counter() - t0
    if mode == "refit":
        report["fidelity"]["after_bias"] = fidelity()
        timing = refit(original, model, layers, fit, held, bs, seed=seed, ridge=ridge,
                        positions=max(1, min(positions_per_sample, max_rows // max(fit.num_samples, 1))),
                        max_inputs=max_inputs, cache_bytes=cache_bytes)
        report.update(timing)
    report["fidelity"]["after"] = fidelity()
    report["seconds"] = time.perf_counter() - start
    return report


def fitting_part(calibration: Calibration, samples: int | None, holdout: float = HOLDOUT) -> Calibration | None:
    """The samples recovery fits to (bias means, refit), None when there are too few to hold any out."""
    calib = _first(calibration, samples)
    return calib.split(holdout)[0] if calib.num_samples >= 2 else None


def _first(calibration: Calibration, samples: int | None) -> Calibration:
    if samples is None or samples >= calibration.num_samples:
        return calibration
    return calibration.samples(0, samples)


__all__ = [
    "BATCH_SIZE", "CACHE_BYTES", "HOLDOUT", "MAX_INPUTS", "MAX_ROWS", "POSITIONS_PER_SAMPLE", "RIDGE_GRID",
    "SMALL_CALIBRATION", "fitting_part", "recover",
]

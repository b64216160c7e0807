"""Transformer-aware int8: a SmoothQuant alpha per MatMul input, chosen by measured error.

Sentence encoders (BERT, MPNet) carry a few activation channels far larger than the rest, in the
LayerNorm outputs and above all in the FFN down-projection inputs after GELU, and the size of the
problem differs from layer to layer (all-mpnet-base-v2, static int8, 60 sentences: 6.3 dB output
SQNR with every MatMul in int8; with only one FFN down-projection in int8, 12.5 dB for layer 8's
and 39.3 dB for layer 4's). One alpha for the whole model either leaves the bad layers broken or
moves range into weights that did not need it, so each input gets its own:

for every activation X read by MatMul/Gemm nodes with constant weights (smooth.find_groups), rows of
X are sampled from the calibration data, and for each alpha in ALPHAS (None: no smoothing) the
consumers' outputs are computed with X/s and s*W quantized the way the target quantizes them
(`static`: one uint8 range for the tensor, from the calibration data; `dynamic`: one range per
sample, as ORT's DynamicQuantizeLinear takes it per run) and per-channel int8 weights. The alpha
with the lowest output error wins; None unless smoothing beats it by MIN_GAIN_DB (each smoothed input
that its producer cannot absorb costs a float Mul at run time).

It runs only on models with the attention pattern (a Softmax and a MatMul of two activations): that is where the outlier
channels are known to live, and it keeps CNN/MLP quantization as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from ..analysis.streaming import stream_values
from ..calibration import Calibration
from .smooth import find_groups, smoothing_factors

#: Candidate alphas (None = leave the input as it is). Dense above 0.65, where the outlier inputs
#: land (all-mpnet-base-v2 dynamic int8: cosine 0.9934 with steps of 0.15 there, 0.9946 with 0.05).
ALPHAS: tuple[float | None, ...] = (None, 0.3, 0.5, 0.65, 0.75, 0.8, 0.85, 0.9, 0.95)
#: Smoothing must lower the consumers' output error by this much (dB) to be chosen.
MIN_GAIN_DB = 0.5
#: Rows (token positions) sampled per calibration sample, and samples used.
ROWS_PER_SAMPLE = 16
MAX_SAMPLES = 64
Mode = Literal["static", "dynamic"]
#: The `outliers` option of quantize-int8 and quantize-dynamic.
OUTLIER_MODES = ("auto", "off")


@dataclass
class InputChoice:
    """The measured choice for one MatMul/Gemm input."""

    value: str
    consumers: list[str]
    alpha: float | None
    error_db: dict[str, float]  # alpha (as text, "none") -> output noise relative to signal, dB

    @property
    def gain_db(self) -> float:
        return self.error_db["none"] - self.error_db[_key(self.alpha)]

    def describe(self) -> str:
        if self.alpha is None:
            return f"{self.value}: not smoothed ({self.error_db['none']:.1f} dB output noise, no alpha gains {MIN_GAIN_DB} dB)"
        return (f"{self.value}: alpha {self.alpha:g} ({self.error_db['none']:.1f} -> "
                f"{self.error_db[_key(self.alpha)]:.1f} dB output noise)")


def has_attention(model: ir.Model) -> bool:
    """A Softmax and a MatMul of two activations (attention scores or their weighted sum): the
    attention encoders whose outliers this module handles. A classifier ending in MatMul + Softmax
    (a constant weight) is not one: its calibration and ranges stay those asked for."""
    def constant(value: ir.Value | None) -> bool:
        return value is None or value.const_value is not None or (
            value.producer() is not None and value.producer().op_type == "Constant")

    nodes = list(model.graph)
    return any(n.op_type == "Softmax" for n in nodes) and any(
        n.op_type == "MatMul" and not constant(n.inputs[0]) and not constant(n.inputs[1]) for n in nodes)


def choose_alphas(model: ir.Model, calibration: Calibration, mode: Mode, *, limit: int | None = None) -> list[InputChoice]:
    """One InputChoice per smoothable MatMul/Gemm input, measured on calibration rows."""
    groups, _ = find_groups(model)
    if not groups:
        return []
    rows, ranges = sample_inputs(model, [g.value.name for g in groups], calibration, limit=limit)
    choices = []
    for g in groups:
        x = rows.get(g.value.name)
        if x is None or len(x) == 0:
            continue
        weights = [_weight_kn(n) for n in g.consumers]
        errors = {_key(a): _output_error_db(x, ranges[g.value.name], weights, a, mode) for a in ALPHAS}
        best = min(ALPHAS, key=lambda a: errors[_key(a)])
        if best is not None and errors["none"] - errors[_key(best)] < MIN_GAIN_DB:
            best = None
        choices.append(InputChoice(g.value.name, [n.name or n.op_type for n in g.consumers], best, errors))
    return choices


def sample_inputs(
    model: ir.Model, names: list[str], calibration: Calibration, *, limit: int | None = None, seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """({value: sampled rows [n, C]}, {value: (per-sample per-channel minima and maxima
    [samples, 2, C] over all of the sample's positions, the sample index of each row)}), from one
    ORT run over the calibration data (analysis/streaming.py: bounded memory)."""
    produced = {v.name for n in model.graph for v in n.outputs}
    names = [n for n in names if n in produced]
    # one generator per value: the rows drawn do not depend on how the runs group the values
    rngs = {n: np.random.default_rng([seed, i]) for i, n in enumerate(names)}
    limit = min(limit or MAX_SAMPLES, MAX_SAMPLES)
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    ids: dict[str, list[np.ndarray]] = {n: [] for n in names}
    ranges: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for _, values in stream_values(model, names, calibration, batch_size=8, limit=limit):
        for name, array in values.items():
            array = np.asarray(array, dtype=np.float32)
            per_sample = array.reshape(array.shape[0], -1, array.shape[-1]) if array.ndim >= 2 else array[None, None]
            for sample in per_sample:
                k = len(ranges[name])
                ranges[name].append(np.stack([sample.min(axis=0), sample.max(axis=0)]))
                take = sample if len(sample) <= ROWS_PER_SAMPLE else sample[rngs[name].choice(len(sample), ROWS_PER_SAMPLE, replace=False)]
                rows[name].append(take)
                ids[name].append(np.full(len(take), k))
    out_rows = {n: np.concatenate(rows[n]) for n in names if rows[n]}
    out_ranges = {n: (np.asarray(ranges[n]), np.concatenate(ids[n])) for n in names if rows[n]}
    return out_rows, out_ranges


def _key(alpha: float | None) -> str:
    return "none" if alpha is None else f"{alpha:g}"


def _weight_kn(node: ir.Node) -> np.ndarray:
    """The consumer's weight as [K, N] (input channels first)."""
    w = node.inputs[1].const_value.numpy().astype(np.float64)
    return w.T if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else w


def _fake_quant_u8(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """uint8 asymmetric quantize-dequantize of rows x with a range per row (zero kept exact)."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = np.maximum((hi - lo) / 255.0, 1e-12)
    zp = np.clip(np.round(-lo / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


def _fake_quant_weight(w: np.ndarray) -> np.ndarray:
    """Per-output-channel symmetric int8 of a [K, N] weight."""
    scale = np.maximum(np.abs(w).max(axis=0, keepdims=True) / 127.0, 1e-12)
    return np.clip(np.round(w / scale), -127, 127) * scale


def _output_error_db(x: np.ndarray, ranges: tuple[np.ndarray, np.ndarray], weights: list[np.ndarray],
                     alpha: float | None, mode: Mode) -> float:
    """Quantization noise of the consumers' outputs relative to their signal (dB, lower is better)
    with X and W smoothed by `alpha` and quantized as `mode` does."""
    per_sample, sample_of_row = ranges
    x = x.astype(np.float64)
    w_range = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    # SmoothQuant's own factors come from the whole calibration range of each channel
    x_range = np.maximum(np.abs(per_sample[:, 0]).max(axis=0), np.abs(per_sample[:, 1]).max(axis=0))
    s = np.ones_like(x_range) if alpha is None else smoothing_factors(x_range, w_range, alpha)
    xs = x / s
    lo, hi = (per_sample[:, 0] / s).min(axis=1), (per_sample[:, 1] / s).max(axis=1)  # s > 0: order kept
    if mode == "static":  # one range for the tensor
        lo, hi = np.full_like(lo, lo.min()), np.full_like(hi, hi.max())
    xq = _fake_quant_u8(xs, lo[sample_of_row, None], hi[sample_of_row, None])
    noise = signal = 0.0
    for w in weights:
        ref = x @ w
        got = xq @ _fake_quant_weight(w * s[:, None])
        signal += float(np.sum(ref**2))
        noise += float(np.sum((got - ref) ** 2))
    return 10 * np.log10(max(noise, 1e-30) / max(signal, 1e-30))


def alphas_of(choices: list[InputChoice]) -> Mapping[str, float | None]:
    return {c.value: c.alpha for c in choices}




def smooth_outliers(
    model: ir.Model, calibration: Calibration, input_shapes, mode: Mode, *, samples: int | None = None,
) -> tuple[ir.Model, list[str], dict]:
    """SmoothQuant with the alpha choose_alphas measured for each input; (model, changes, details).
    Models without the attention pattern come back untouched."""
    from ..pipeline import PassContext
    from .smooth import SmoothQuant

    if not has_attention(model):
        return model, [], {"applied": False, "why": "no attention pattern (a Softmax and a MatMul of two activations)"}
    choices = choose_alphas(model, calibration, mode, limit=samples)
    alphas = alphas_of(choices)
    chosen = [c for c in choices if c.alpha is not None]
    details = {"applied": True, "mode": mode, "inputs": [
        {"value": c.value, "consumers": c.consumers, "alpha": c.alpha, "error_db": c.error_db} for c in choices]}
    if not chosen:
        return model, [f"outlier check: none of {len(choices)} MatMul inputs gains from smoothing"], details
    sub = PassContext(calibration=calibration, input_shapes=input_shapes, model=model)
    smoothed = SmoothQuant(alphas=dict(alphas), samples=samples).run(model, sub)
    details["smoothing"] = {**smoothed.record.details, "skipped": list(smoothed.record.skipped)}
    gains = sorted(chosen, key=lambda c: -c.gain_db)
    changes = [f"outlier-aware smoothing ({mode} int8): {len(chosen)} of {len(choices)} MatMul inputs smoothed with "
               f"a measured alpha; largest gains: " + "; ".join(c.describe() for c in gains[:3])]
    inserted = sum("Mul inserted" in c for c in smoothed.record.changes)
    if inserted:
        changes.append(f"{inserted} per-channel float Muls inserted where the producer cannot absorb the scale")
    return smoothed.model, changes, details


def pick_range_method(quantizer, feeds, reference, source: str):
    """(the quantizer whose whole-int8 model measures the higher output SQNR on `feeds`, a note):
    the pass's own range method, or minmax. After smoothing, the few large values left in an
    attention model carry much of its output; clipping them for a finer step (mse, percentile)
    measured worse on all-mpnet-base-v2 (cosine 0.989 vs 0.992). Histograms and means are shared."""
    import dataclasses

    from ..model import load as load_model
    from ..verify import compare, outputs
    from .quantize import _Quantizer

    own = quantizer.options.method
    alt = _Quantizer(dataclasses.replace(quantizer.options, method="minmax"), quantizer.model, quantizer.calibration)
    alt.kernels = quantizer.kernels
    for name in ("hists", "means", "asked", "asked_means"):  # the same data: collect it once
        setattr(alt, name, getattr(quantizer, name))
    sqnr = {}
    for q in (quantizer, alt):
        got = outputs(load_model(q.build().proto), feeds, "quantize-int8 (range method)")
        q.seen = quantizer.seen or q.seen
        sqnr[q.options.method] = float(compare(reference, got, source).sqnr_db)
    best = max(sqnr, key=sqnr.get)
    note = (f"range method {best} for this attention model: whole-int8 output SQNR {sqnr[own]:.1f} dB with {own}, "
            f"{sqnr['minmax']:.1f} dB with minmax on {source}")
    return (alt if best == "minmax" else quantizer), note


__all__ = ["ALPHAS", "InputChoice", "MIN_GAIN_DB", "OUTLIER_MODES", "alphas_of", "choose_alphas", "has_attention", "pick_range_method",
           "sample_inputs", "smooth_outliers"]

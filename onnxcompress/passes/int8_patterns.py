"""Outlier-aware int8: a SmoothQuant alpha per MatMul and Conv input, chosen by measured error.

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

MatMul inputs are measured only on models with the attention pattern (a Softmax and a MatMul of two
activations): that is where the outlier channels are known to live, and it keeps MLP quantization
as it was.

Conv inputs (static int8, every model; choose_conv_alphas): CNNs whose BatchNorm folding left
channels of very different ranges (PP-PicoDet layout detector: stem output channels 0.1 next to 30,
read by depthwise weights up to 70; static int8 -0.2 dB output SQNR) lose the small channels to the
per-tensor scale. An input whose channels' max |x| differ by more than CONV_MIN_SPREAD is measured
on output windows sampled at random positions (zero outside, as the Conv pads), for each alpha in
CONV_ALPHAS: the quantization chain the int8 model runs from the smoothing point on (with a gating
Mul: the gated Conv output, the Mul's output and X, each one uint8 range by the pass's range method;
the weight codes encode_weight gives) against the float consumers. Smoothed only where int8 breaks
the layer (modelled output noise above CONV_MAX_NOISE_DB) and smoothing gains MIN_GAIN_DB, or
INSERT_MIN_GAIN_DB when the 1/s needs a node of its own at inference (smooth.conv_route: an inserted
float Mul, or a 1x1 Conv that replaces no Add). The model leaves out the consumer's own output
quantization and everything downstream: where a layer already quantizes well, its modelled gains
did not reach the model's output (see CONV_MAX_NOISE_DB).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from ..analysis.activations import collect
from ..analysis.histograms import TensorHistogram, clip_range
from ..analysis.streaming import stream_values
from ..calibration import Calibration
from ..model import load
from .int8_weights import Kernels, encode_weight
from .smooth import conv_route, find_groups, smoothing_factors, weight_ranges

#: Candidate alphas (None = leave the input as it is). Dense above 0.65, where the outlier inputs
#: land (all-mpnet-base-v2 dynamic int8: cosine 0.9934 with steps of 0.15 there, 0.9946 with 0.05).
ALPHAS: tuple[float | None, ...] = (None, 0.3, 0.5, 0.65, 0.75, 0.8, 0.85, 0.9, 0.95)
#: Smoothing must lower the consumers' output error by this much (dB) to be chosen.
MIN_GAIN_DB = 0.5
#: Rows (token positions) sampled per calibration sample, and samples used.
ROWS_PER_SAMPLE = 16
MAX_SAMPLES = 64
#: Conv inputs (static int8 only): alphas tried; 1 equalizes the activation's channels outright,
#: which costs a depthwise consumer nothing (its weights are quantized per channel anyway).
CONV_ALPHAS: tuple[float | None, ...] = (None, 0.5, 0.75, 1.0)
#: Conv inputs are measured only when their channels' max |x| differ by more than this factor.
CONV_MIN_SPREAD = 16.0
#: Output windows sampled per Conv input, over all calibration samples used, fewer where they would
#: take more than WINDOW_BUDGET_BYTES for all inputs together.
CONV_ROWS = 1024
WINDOW_BUDGET_BYTES = 128 * 2**20
#: Windows per step of the error model.
ERROR_CHUNK = 128
#: A Conv input whose 1/s needs a node of its own at inference (a float Mul) must gain this much.
INSERT_MIN_GAIN_DB = 6.0
#: Conv inputs are smoothed only where their consumers' modelled int8 output noise without smoothing
#: is above this (a local SQNR under 20 dB: int8 breaks the layer). Below it the modelled gain did not
#: reach the model's output: on PP-OCR rec every input the model chose, smoothed alone, lowered the
#: output SQNR (by 0.05 to 1.35 dB), the two at -20.8 and -21.3 dB modelled noise included; on the
#: layout detector the 8 inputs above it give most of the gain (11.9 dB minimum output SQNR with them,
#: 13.2 dB with all 40 chosen, -0.2 dB with none).
CONV_MAX_NOISE_DB = -20.0
Mode = Literal["static", "dynamic"]
#: The `outliers` option of quantize-int8 and quantize-dynamic.
OUTLIER_MODES = ("auto", "off")


@dataclass
class InputChoice:
    """The measured choice for one MatMul/Gemm or Conv input."""

    value: str
    consumers: list[str]
    alpha: float | None
    error_db: dict[str, float]  # alpha (as text, "none") -> output noise relative to signal, dB
    where: str = ""  # Conv inputs: where the 1/s would go (smooth.conv_route)
    min_gain_db: float = 0.0  # what smoothing had to gain to be chosen
    why: str = ""  # why not smoothed, when it is not for want of gain

    @property
    def gain_db(self) -> float:
        return self.error_db["none"] - self.error_db[_key(self.alpha)]

    def describe(self) -> str:
        if self.alpha is None and self.why:
            return f"{self.value}: not smoothed ({self.why})"
        if self.alpha is None:
            gain = self.min_gain_db or MIN_GAIN_DB
            return f"{self.value}: not smoothed ({self.error_db['none']:.1f} dB output noise, no alpha gains {gain:g} dB)"
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


def choose_alphas(model: ir.Model, calibration: Calibration, mode: Mode, *, limit: int | None = None,
                  statistics=None) -> list[InputChoice]:
    """One InputChoice per smoothable MatMul/Gemm input, measured on calibration rows."""
    groups = [g for g in find_groups(model)[0] if g.rank is None]
    if not groups:
        return []
    rows, ranges = sample_inputs(model, [g.value.name for g in groups], calibration, limit=limit, statistics=statistics)
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


class SampledRows:
    """Up to ROWS_PER_SAMPLE rows (channels last) of each sample of each value, and each sample's
    per-channel minima and maxima (a statistics.Request reducer; every position, as the kernels see it)."""

    def __init__(self, names: Sequence[str], seed: int = 0) -> None:
        # one generator per value: the rows drawn do not depend on how the runs group the values
        self.rngs = {n: np.random.default_rng([seed, i]) for i, n in enumerate(names)}
        self.rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
        self.ids: dict[str, list[np.ndarray]] = {n: [] for n in names}
        self.ranges: dict[str, list[np.ndarray]] = {n: [] for n in names}

    def add(self, count: int, values: Mapping[str, np.ndarray], mask: np.ndarray | None = None) -> None:
        for name, array in values.items():
            if name not in self.rngs:
                continue
            array = np.asarray(array, dtype=np.float32)
            per_sample = array.reshape(array.shape[0], -1, array.shape[-1]) if array.ndim >= 2 else array[None, None]
            for sample in per_sample:
                k = len(self.ranges[name])
                self.ranges[name].append(np.stack([sample.min(axis=0), sample.max(axis=0)]))
                take = sample if len(sample) <= ROWS_PER_SAMPLE else sample[self.rngs[name].choice(len(sample), ROWS_PER_SAMPLE, replace=False)]
                self.rows[name].append(take)
                self.ids[name].append(np.full(len(take), k))

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
        names = [n for n in self.rngs if self.rows[n]]
        return ({n: np.concatenate(self.rows[n]) for n in names},
                {n: (np.asarray(self.ranges[n]), np.concatenate(self.ids[n])) for n in names})


def sample_request(model: ir.Model, names: list[str], calibration: Calibration, *, limit: int | None = None,
                   seed: int = 0):
    """The statistics.Request for `sample_inputs`."""
    from ..analysis.statistics import Request

    produced = {v.name for n in model.graph for v in n.outputs}
    names = [n for n in names if n in produced]
    return Request(calibration, values=names, limit=min(limit or MAX_SAMPLES, MAX_SAMPLES),
                   reducer=functools.partial(SampledRows, names, seed), kind=("sampled rows", seed))


def sample_inputs(
    model: ir.Model, names: list[str], calibration: Calibration, *, limit: int | None = None, seed: int = 0,
    statistics=None,
) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """({value: sampled rows [n, C]}, {value: (per-sample per-channel minima and maxima
    [samples, 2, C] over all of the sample's positions, the sample index of each row)}), from one
    ORT run over the calibration data (analysis/streaming.py: bounded memory), or from `statistics`
    (analysis/statistics.Statistics) where this model state's run already gathered them."""
    from ..analysis.statistics import Statistics

    request = sample_request(model, names, calibration, limit=limit, seed=seed)
    return (statistics or Statistics()).gather(model, [request])[0].custom.result()


def outlier_requests(model: ir.Model, calibration: Calibration, samples: int | None = None) -> list:
    """What smooth_outliers reads of this model state (statistics.Requests): the MatMul inputs'
    sampled rows, and their channel ranges for the smoothing that may follow; none without attention."""
    from ..analysis.statistics import Request

    groups = [g for g in find_groups(model)[0] if g.rank is None]
    if not groups or not has_attention(model):
        return []
    return [sample_request(model, [g.value.name for g in groups], calibration, limit=samples),
            Request(calibration, channels={g.value.name: g.axis for g in groups}, limit=samples)]


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


# ---------------------------------------------------------------------------- Conv inputs


def _conv_groups(model: ir.Model) -> list:
    """(group, route) of each 2-D Conv input that smoothing could equalize."""
    groups = []
    for g in find_groups(model)[0]:
        if g.rank == 4 and len({_kernel(n) for n in g.consumers}) == 1:
            route = conv_route(model, g)
            if route is not None:
                groups.append((g, route))
    return groups


def conv_range_request(model: ir.Model, calibration: Calibration, limit: int | None = None):
    """The channel statistics choose_conv_alphas reads first (a statistics.Request), or None."""
    from ..analysis.statistics import Request

    groups = _conv_groups(model)
    if not groups:
        return None
    return Request(calibration, channels={g.value.name: 1 for g, _ in groups}, limit=min(limit or MAX_SAMPLES, MAX_SAMPLES))


def choose_conv_alphas(
    model: ir.Model, calibration: Calibration, *, limit: int | None = None, kernels: Kernels = "any",
    method: str = "minmax", percentile: float = 99.99, statistics=None,
) -> list[InputChoice]:
    """One InputChoice per 2-D Conv input whose channel ranges differ by more than CONV_MIN_SPREAD,
    measured on output windows sampled from the calibration data (static int8)."""
    groups = _conv_groups(model)
    if not groups:
        return []
    limit = min(limit or MAX_SAMPLES, MAX_SAMPLES)
    # channel ranges first, so that windows are sampled only for the inputs with unequal channels
    stats = collect(model, {g.value.name: 1 for g, _ in groups}, calibration, limit=limit, statistics=statistics)
    wide = []
    for g, route in groups:
        ch = stats.values.get(g.value.name)
        if ch is not None and ch.maximum is not None and _spread(np.stack([ch.minimum, ch.maximum])) >= CONV_MIN_SPREAD:
            wide.append((g, route))
    if not wide:
        return []
    windows, ranges = sample_windows(model, [(g.value.name, r.gate.name if r.gate is not None else None, _kernel(g.consumers[0]))
                                             for g, r in wide], calibration, limit=limit)
    choices = []
    for g, route in wide:
        x = g.value.name
        if x not in windows or (route.gate is not None and route.gate.name not in windows):
            continue
        gate = None if route.gate is None else (windows[route.gate.name], ranges[route.gate.name], route.factor)
        measure = functools.partial(_conv_errors_db, windows[x], ranges[x], g, gate, kernels, method, percentile)
        errors = measure((None,))
        need = INSERT_MIN_GAIN_DB if route.inserts else MIN_GAIN_DB
        best, why = None, f"its consumers' int8 output noise is already below {CONV_MAX_NOISE_DB:g} dB"
        if errors["none"] >= CONV_MAX_NOISE_DB:  # int8 breaks the layer: try the alphas
            errors.update(measure(CONV_ALPHAS[1:]))
            best, why = min(CONV_ALPHAS, key=lambda a: errors[_key(a)]), ""
            if best is not None and errors["none"] - errors[_key(best)] < need:
                best = None
        choices.append(InputChoice(x, [n.name or n.op_type for n in g.consumers], best, errors, route.how, need, why))
    return choices


def _kernel(node: ir.Node) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(kernel shape, dilations) of a Conv."""
    shape = tuple(node.inputs[1].const_value.shape.dims[2:])
    return shape, tuple(node.attributes.get_ints("dilations", [1] * len(shape)))


def _spread(ranges: np.ndarray) -> float:
    """Largest over smallest per-channel max |x| among channels that are not (nearly) zero."""
    peak = np.abs(ranges).max(axis=0)
    live = peak[peak > 1e-8]
    return float(live.max() / live.min()) if live.size else 1.0


def sample_windows(
    model: ir.Model, specs: list[tuple[str, str | None, tuple]], calibration: Calibration, *,
    limit: int | None = None, seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """For each (Conv input, its gated Conv output or None, (kernel, dilations)): windows [n, C, kh * kw]
    at the same random positions of both (zero outside, as the Conv pads), and per-channel minima and
    maxima [2, C] over every position of every sample; one streaming pass (analysis/streaming.py)."""
    limit = min(limit or MAX_SAMPLES, MAX_SAMPLES, calibration.num_samples)
    kernel = {}
    for i, (x, gate, k) in enumerate(specs):
        for name in (x, gate):
            if name is not None:
                kernel.setdefault(name, (i, k))
    produced = {v.name: v for n in model.graph for v in n.outputs} | {v.name: v for v in model.graph.inputs}
    channels = {n: (produced[n].shape[1] if produced[n].shape is not None and isinstance(produced[n].shape[1], int) else 256)
                for n in kernel if n in produced}
    row_bytes = 4 * sum(channels[n] * int(np.prod(kernel[n][1][0])) for n in channels)
    per_sample = max(1, min(-(-CONV_ROWS // limit), WINDOW_BUDGET_BYTES // max(1, row_bytes * limit)))
    windows: dict[str, np.ndarray] = {}  # filled in place: a list of parts and their concatenation would take twice the budget
    ranges: dict[str, np.ndarray] = {}
    done = start = 0
    for count, values, _ in stream_values(model, list(kernel), calibration, batch_size=8, limit=limit):
        if count:
            start, done = done, done + count
        for name, array in values.items():
            array = np.asarray(array, dtype=np.float32)
            if array.ndim != 4:
                continue
            lo, hi = array.min(axis=(0, 2, 3)), array.max(axis=(0, 2, 3))
            old = ranges.get(name)
            ranges[name] = np.stack([lo, hi]) if old is None else np.stack([np.minimum(old[0], lo), np.maximum(old[1], hi)])
            spec, ((kh, kw), (dh, dw)) = kernel[name]
            for b, sample in enumerate(array):
                # positions depend on the spec and the sample only: an input and its gate agree
                rng = np.random.default_rng([seed, spec, start + b])
                py, px = rng.integers(0, sample.shape[1], per_sample), rng.integers(0, sample.shape[2], per_sample)
                padded = np.pad(sample, ((0, 0), ((kh // 2) * dh,) * 2, ((kw // 2) * dw,) * 2))
                ys = py[:, None] + np.arange(kh) * dh
                xs = px[:, None] + np.arange(kw) * dw
                win = padded[:, ys[:, :, None], xs[:, None, :]]  # [C, n, kh, kw]
                if name not in windows:
                    windows[name] = np.zeros((limit * per_sample, len(sample), kh * kw), np.float32)
                k = start + b
                windows[name][k * per_sample:(k + 1) * per_sample] = win.transpose(1, 0, 2, 3).reshape(per_sample, len(sample), kh * kw)
    return {n: w[:done * per_sample] for n, w in windows.items()}, ranges


def _conv_outputs(windows: np.ndarray, node: ir.Node, w: np.ndarray) -> np.ndarray:
    """The Conv's outputs [n, O] at the sampled windows [n, C, kk] (grouped: block b reads channels b*C/g...)."""
    groups = node.attributes.get_int("group", 1)
    n = len(windows)
    x = windows.reshape(n, groups, -1).transpose(1, 0, 2)  # [g, n, C/g * kk]
    wb = w.reshape(groups, w.shape[0] // groups, -1).transpose(0, 2, 1)  # [g, C/g * kk, O/g]
    return np.matmul(x, wb).transpose(1, 0, 2).reshape(n, -1)


def _conv_errors_db(x: np.ndarray, x_ranges: np.ndarray, group, gate, kernels: Kernels, method: str, percentile: float,
                    alphas: tuple[float | None, ...]) -> dict[str, float]:
    """For each of `alphas` (None: no smoothing): noise of the consumers' outputs relative to their signal (dB)
    with the input smoothed by it and every tensor on the way quantized as static int8 does: one
    uint8 range per tensor (by `method`, from the calibration extremes and the windows' centre values:
    with "mse" the clipped range can favour the large channels smoothing just shrank), the weight codes
    encode_weight gives for `kernels`. With a gate (X = a * g * factor, a a Conv output), a / s and the
    gating Mul's output are quantized too, as the int8 model does between the Convs; the gate g itself
    is taken as exact."""
    centre = x.shape[2] // 2  # a window's centre is a uniform sample of the tensor (never padding)
    peak = np.abs(x_ranges).max(axis=0)
    weights = [node.inputs[1].const_value.numpy().astype(np.float32) for node in group.consumers]
    if gate is not None:
        a, a_ranges, factor = gate
        f3 = factor.astype(np.float32)[None, :, None]
        d_ranges = np.sort(np.stack([x_ranges[0] / factor, x_ranges[1] / factor]), axis=0)

    def gated(xs: np.ndarray, as_: np.ndarray) -> np.ndarray:  # the gate g = X / (a * factor), exact
        return np.divide(xs, as_ * f3, out=np.zeros_like(xs), where=np.abs(as_) > 1e-12)

    def tensor_range(centres: np.ndarray, ranges: np.ndarray, s: np.ndarray) -> tuple[np.float32, np.float32]:
        lo, hi = ranges[0] / s, ranges[1] / s
        if method == "minmax":
            return np.float32(lo.min()), np.float32(hi.max())
        hist = TensorHistogram()
        hist.update(centres)
        hist.update(np.concatenate([lo, hi]))  # the calibration extremes, which a sample misses
        return tuple(np.float32(r) for r in clip_range(hist, method, percentile=percentile))

    errors = {}
    for alpha in alphas:
        s = np.ones_like(peak) if alpha is None else smoothing_factors(peak, weight_ranges(group), alpha)
        s3 = s.astype(np.float32)[None, :, None]
        # one range per tensor, from the centre values: every op up to the Conv is elementwise
        xc = x[:, :, centre:centre + 1].astype(np.float32)
        if gate is None:
            r_x = tensor_range(xc / s3, x_ranges, s)
        else:
            ac = a[:, :, centre:centre + 1].astype(np.float32)
            r_a = tensor_range(ac / s3, a_ranges, s)
            dc = _fake_quant_u8(ac / s3, *r_a) * gated(xc, ac)
            r_d = tensor_range(dc, d_ranges, s)
            r_x = tensor_range(_fake_quant_u8(dc, *r_d) * f3, x_ranges, s)
        lo, hi = min(0.0, float((x_ranges[0] / s).min())), max(0.0, float((x_ranges[1] / s).max()))
        codes = []
        for node, w in zip(group.consumers, weights):
            ws = (_conv_blocks_of(node, w) * s.reshape(-1, 1, w.shape[1], 1)).reshape(w.shape)
            # the codes the quantizer will give it: on `kernels="any"`, scales widened where AVX2 pair sums could saturate
            codes.append(encode_weight(
                "Conv", ws, 0, depthwise=node.attributes.get_int("group", 1) == len(peak) and w.shape[1] == 1,
                kernels=kernels, x_scale=(hi - lo) / 255.0, x_mean_square=float(np.mean((xc / s3) ** 2))).dequantized())
        noise = signal = 0.0
        for start in range(0, len(x), ERROR_CHUNK):  # in chunks of rows: the temporaries of one input stay small
            xs = x[start:start + ERROR_CHUNK].astype(np.float32)
            if gate is None:
                xq = _fake_quant_u8(xs / s3, *r_x)
            else:
                as_ = a[start:start + ERROR_CHUNK].astype(np.float32)
                dq = _fake_quant_u8(_fake_quant_u8(as_ / s3, *r_a) * gated(xs, as_), *r_d)
                xq = _fake_quant_u8(dq * f3, *r_x)
            for node, w, wq in zip(group.consumers, weights, codes):
                ref = _conv_outputs(xs, node, w)
                got = _conv_outputs(xq.astype(np.float32), node, wq.astype(np.float32))
                signal += float(np.sum(ref.astype(np.float64) ** 2))
                noise += float(np.sum((got - ref).astype(np.float64) ** 2))
        errors[_key(alpha)] = 10 * np.log10(max(noise, 1e-30) / max(signal, 1e-30))
    return errors


def _conv_blocks_of(node: ir.Node, w: np.ndarray) -> np.ndarray:
    g = node.attributes.get_int("group", 1)
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1)


def alphas_of(choices: list[InputChoice]) -> Mapping[str, float | None]:
    return {c.value: c.alpha for c in choices}




def smooth_outliers(
    model: ir.Model, calibration: Calibration, input_shapes, mode: Mode, *, samples: int | None = None,
    statistics=None,
) -> tuple[ir.Model, list[str], dict]:
    """SmoothQuant with the alpha choose_alphas measured for each input; (model, changes, details).
    Models without the attention pattern come back untouched."""
    from ..pipeline import PassContext
    from .smooth import SmoothQuant

    if not has_attention(model):
        return model, [], {"applied": False, "why": "no attention pattern (a Softmax and a MatMul of two activations)"}
    if statistics is not None:  # the rows and the ranges a smoothing reads: one run of this model state
        statistics.gather(model, outlier_requests(model, calibration, samples))
    choices = choose_alphas(model, calibration, mode, limit=samples, statistics=statistics)
    alphas = alphas_of(choices)
    chosen = [c for c in choices if c.alpha is not None]
    details = {"applied": True, "mode": mode, "inputs": [
        {"value": c.value, "consumers": c.consumers, "alpha": c.alpha, "error_db": c.error_db} for c in choices]}
    if not chosen:
        return model, [f"outlier check: none of {len(choices)} MatMul inputs gains from smoothing"], details
    sub = PassContext(calibration=calibration, input_shapes=input_shapes, model=model)
    if statistics is not None:  # the ranges were gathered with the rows, in this model state's run
        sub.statistics = statistics
    smoothed = SmoothQuant(alphas=dict(alphas), samples=samples).run(model, sub)
    details["smoothing"] = {**smoothed.record.details, "skipped": list(smoothed.record.skipped)}
    gains = sorted(chosen, key=lambda c: -c.gain_db)
    changes = [f"outlier-aware smoothing ({mode} int8): {len(chosen)} of {len(choices)} MatMul inputs smoothed with "
               f"a measured alpha; largest gains: " + "; ".join(c.describe() for c in gains[:3])]
    inserted = sum("Mul inserted" in c for c in smoothed.record.changes)
    if inserted:
        changes.append(f"{inserted} per-channel float Muls inserted where the producer cannot absorb the scale")
    return smoothed.model, changes, details


def smooth_conv_inputs(
    model: ir.Model, calibration: Calibration, input_shapes, *, samples: int | None = None, kernels: Kernels = "any",
    method: str = "minmax", percentile: float = 99.99, statistics=None,
) -> tuple[ir.Model, list[str], dict | None]:
    """SmoothQuant on the Conv inputs choose_conv_alphas picks, each with its measured alpha (static
    int8); (model, changes, details). No Conv input with unequal channels: (model, [], None)."""
    from ..pipeline import PassContext
    from .smooth import SmoothQuant

    choices = choose_conv_alphas(model, calibration, limit=samples, kernels=kernels, method=method, percentile=percentile,
                                 statistics=statistics)
    if not choices:
        return model, [], None
    details: dict = {"inputs": [{"value": c.value, "consumers": c.consumers, "alpha": c.alpha, "error_db": c.error_db,
                                 "where": c.where} for c in choices]}
    chosen = sorted((c for c in choices if c.alpha is not None), key=lambda c: -c.gain_db)
    if not chosen:
        broken = sum(c.error_db["none"] >= CONV_MAX_NOISE_DB for c in choices)
        return model, [f"Conv input check: none of {len(choices)} Conv inputs with unequal channel ranges smoothed (modelled "
                       f"int8 output noise above {CONV_MAX_NOISE_DB:g} dB in {broken} of them, and smoothing gains too little there)"], details
    sub = PassContext(calibration=calibration, input_shapes=input_shapes, model=model)
    if statistics is not None:  # a smoothing statistic of this model state the check already gathered is reused
        sub.statistics = statistics
    smoothed = SmoothQuant(alphas=dict(alphas_of(choices)), samples=samples).run(load(model), sub)
    details["smoothing"] = {**smoothed.record.details, "skipped": list(smoothed.record.skipped)}
    inserted = sum("inserted" in c for c in smoothed.record.changes)
    changes = [f"Conv input smoothing: {len(chosen)} of {len(choices)} Conv inputs with unequal channel ranges smoothed "
               f"with a measured alpha ({inserted} with a node inserted); largest gains: "
               + "; ".join(c.describe() for c in chosen[:3])]
    return smoothed.model, changes, details


def pick_range_method(quantizer, feeds, reference, source: str):
    """(the quantizer whose whole-int8 model measures the higher output SQNR on `feeds`, a note):
    the pass's own range method, or minmax. After smoothing, the few large values left in an
    attention model carry much of its output; clipping them for a finer step (mse, percentile)
    measured worse on all-mpnet-base-v2 (cosine 0.989 vs 0.992). Histograms and means are shared."""
    import dataclasses

    from ..verify import compare, outputs
    from .int8_variants import Quantizer

    own = quantizer.options.method
    alt = Quantizer(dataclasses.replace(quantizer.options, method="minmax"), quantizer.model, quantizer.calibration)
    alt.kernels = quantizer.kernels
    for name in ("hists", "means", "asked", "asked_means"):  # the same data: collect it once
        setattr(alt, name, getattr(quantizer, name))
    sqnr = {}
    for q in (quantizer, alt):
        got = outputs(q.build().model, feeds, "quantize-int8 (range method)")
        q.seen = quantizer.seen or q.seen
        sqnr[q.options.method] = float(compare(reference, got, source).sqnr_db)
    best = max(sqnr, key=sqnr.get)
    note = (f"range method {best} for this attention model: whole-int8 output SQNR {sqnr[own]:.1f} dB with {own}, "
            f"{sqnr['minmax']:.1f} dB with minmax on {source}")
    return (alt if best == "minmax" else quantizer), note


__all__ = ["ALPHAS", "CONV_ALPHAS", "CONV_MAX_NOISE_DB", "CONV_MIN_SPREAD", "INSERT_MIN_GAIN_DB", "InputChoice", "MIN_GAIN_DB", "OUTLIER_MODES",
           "alphas_of", "choose_alphas", "choose_conv_alphas", "has_attention", "pick_range_method",
           "SampledRows", "outlier_requests", "sample_inputs", "sample_request", "sample_windows", "smooth_conv_inputs", "smooth_outliers"]

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
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
import scipy.linalg

from .. import runtime
from ..analysis.layer_timing import PairTiming, time_pair
from ..analysis.shapes import infer_shapes
from ..analysis.streaming import stream_values
from ..calibration import Calibration, batch_size_for
from ..feeds import feed_mask, mask_inputs, token_rows
from ..model import load
from ..pipeline import Pass, PassContext, PassResult
from .linear import matmul_bias_add

ConvForm = Literal["channel", "spatial", "squeeze"]
CONV_FORMS: tuple[ConvForm, ...] = ("channel", "spatial", "squeeze")
#: Energy kept when no rank criterion is given at all.
DEFAULT_ENERGY = 0.95
#: Eigenvalues of the input covariance are floored at this fraction of the largest, so whitening
#: stays well conditioned when calibration inputs do not span every direction.
WHITEN_FLOOR = 1e-10
#: Data-aware factorization needs at least this many calibration rows per input feature.
MIN_ROWS_PER_FEATURE = 2
#: Latency-aware budget allocation: rounds of (allocate, time, exclude the slower) at most.
LATENCY_ROUNDS = 4


@dataclass
class Factorize(Pass):
    """Replace Gemm/MatMul/Conv layers by two thinner layers of low rank."""

    name: ClassVar[str] = "factorize"
    exact: ClassVar[bool] = False

    rank_ratio: float | None = None  # rank = ceil(ratio x full rank)
    energy: float | None = None  # smallest rank keeping this fraction of sum(sigma^2)
    mac_budget: float | None = None  # keep at most this fraction of the model's MACs (overrides the two above)
    round_to: int = 8  # ranks are multiples of this (ORT's CPU kernels work in blocks)
    forms: tuple[ConvForm, ...] = CONV_FORMS  # Conv forms to consider
    data_aware: bool = True  # whiten by the input covariance when calibration data is given
    min_macs: int = 0  # layers with fewer MACs are left alone
    calibration_samples: int = 64
    max_gram_features: int = 4608  # larger inputs are factorized without data (their Gram would be big)
    positions_per_sample: int = 1024  # Conv: im2col rows sampled per calibration sample
    seed: int = 0
    latency_aware: bool = False  # time each factorized layer against the original; keep only the faster
    provider: str = "cpu"  # where latency-aware mode times layers: cpu | cuda | tensorrt
    min_speedup: float = 1.05  # latency-aware: keep a layer only if measured this much faster
    latency_threads: int | None = None  # intra-op threads when timing (default: physical cores, as bench)

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
        skipped += _subgraph_layers(model)
        notes: list[str] = []
        stats: dict[str, _Moments] = {}
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
        judge = _LatencyJudge(model, self.provider, self.latency_threads, self.min_speedup) if self.latency_aware else None
        if self.mac_budget is not None:
            from ..analysis.cost import analyze_cost

            total = analyze_cost(model, ctx.input_shapes).stats.macs
            budget = self.mac_budget * total
            if judge is None:
                chosen, reached = _allocate_budget(layers, options, self.round_to, budget, total)
            else:
                chosen, reached = judge.allocate(layers, options, self.round_to, budget, total)
            if not reached:
                notes.append(f"MAC budget {self.mac_budget:g} is out of reach below break-even ranks"
                             + (" with the layers measured faster" if judge else "") + "; factorized as far as possible")
        else:
            chosen = {}
            energy = self.energy if (self.energy is not None or self.rank_ratio is not None) else DEFAULT_ENERGY
            for layer in layers:
                eligible, reason = _eligible(options[layer.node.name], energy, self.rank_ratio, self.round_to)
                if eligible and judge is not None:
                    eligible, reason = judge.fastest(layer, eligible)
                if eligible:
                    chosen[layer.node.name] = eligible[0]
                else:
                    skipped.append(f"{layer.node.name}: {reason}")
        if judge is not None and self.mac_budget is not None:
            skipped += judge.rejections(chosen)
        names = _Names(model)
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


# ------------------------------------------------------------------------------------ layers


@dataclass
class Layer:
    """A factorizable node: its effective weight and bias in float64, and its geometry."""

    node: ir.Node
    kind: str  # "Gemm" | "MatMul" | "Conv"
    weight: np.ndarray  # Gemm/MatMul: [K, N] with y = x·W; Conv: [O, C, *kernel]
    bias: np.ndarray | None  # effective bias ([N] or [O]); Gemm: beta·C
    bias_add: ir.Node | None = None  # MatMul: the Add holding its bias, when it can be refitted
    rows: int = 0  # Gemm/MatMul: rows of x; Conv: output positions
    x_shape: tuple[int, ...] = ()  # the input's static shape
    in_positions: int = 0  # Conv: input spatial positions
    in_size: tuple[int, ...] = ()
    out_size: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads_begin: tuple[int, ...] = ()
    pads_end: tuple[int, ...] = ()

    @property
    def macs(self) -> int:
        return self.rows * int(self.weight.size)

    @property
    def can_refit_bias(self) -> bool:
        return self.kind != "MatMul" or self.bias_add is not None

    def input_features(self) -> int:
        return self.weight.shape[0] if self.kind != "Conv" else int(np.prod(self.weight.shape[1:]))


def _subgraph_layers(model: ir.Model) -> list[str]:
    """Layers inside If/Loop/Scan bodies: factorization rewrites the main graph only."""
    from ..analysis.cost import inner_nodes

    return [f"{name}: {node.op_type} inside the {top.op_type} '{top.name}' body: subgraph layers are not factorized"
            for name, node, top in inner_nodes(model) if node.op_type in ("Gemm", "MatMul", "Conv")]


def find_layers(model: ir.Model, shapes: Mapping, *, min_macs: int = 0) -> tuple[list[Layer], list[str]]:
    """The Gemm/MatMul/Conv nodes that can be factorized, and a reason for each one that cannot."""
    layers, skipped = [], []
    for node in model.graph:
        if node.op_type not in ("Gemm", "MatMul", "Conv") or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or node.outputs[0].name
        layer, reason = _layer(node, shapes)
        if layer is None:
            skipped.append(f"{name}: {reason}")
        elif layer.macs < min_macs:
            skipped.append(f"{name}: {layer.macs} MACs, below min_macs {min_macs}")
        else:
            layers.append(layer)
    return layers, skipped


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def _layer(node: ir.Node, shapes: Mapping) -> tuple[Layer | None, str]:
    w = _const(node.inputs[1] if len(node.inputs) > 1 else None)
    if w is None:
        return None, "weight is not a constant"
    if w.dtype != np.float32:
        return None, f"weight is {w.dtype}, not float32"
    x_shape = shapes.get(node.inputs[0].name).shape if node.inputs[0].name in shapes else None
    y_shape = shapes.get(node.outputs[0].name).shape if node.outputs[0].name in shapes else None
    if x_shape is None or y_shape is None:
        return None, "input or output shape unknown"
    w = w.astype(np.float64)
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return None, "Gemm with transA is not handled"
        alpha, beta = node.attributes.get_float("alpha", 1.0), node.attributes.get_float("beta", 1.0)
        mat = alpha * (w.T if node.attributes.get_int("transB", 0) else w)
        c = node.inputs[2] if len(node.inputs) > 2 else None
        bias = None
        if c is not None:
            cv = _const(c)
            if cv is None:
                return None, "Gemm bias is not a constant"
            bias = beta * cv.astype(np.float64)
        return Layer(node, "Gemm", mat, bias, rows=int(x_shape[0]), x_shape=tuple(map(int, x_shape))), ""
    if node.op_type == "MatMul":
        if w.ndim != 2 or len(x_shape) < 1:
            return None, f"MatMul weight of rank {w.ndim} (only 2-D weights are factorized)"
        add = _bias_add(node, w.shape[1])
        bias = add[1].astype(np.float64) if add else None
        rows = int(np.prod(x_shape[:-1], dtype=np.int64))
        return Layer(node, "MatMul", w, bias, bias_add=add[0] if add else None, rows=rows,
                     x_shape=tuple(map(int, x_shape))), ""
    if node.attributes.get_int("group", 1) != 1:
        return None, "grouped Conv is not factorized"
    if len(x_shape) != w.ndim:
        return None, "input rank does not match the kernel"
    dims = w.ndim - 2
    kernel = tuple(w.shape[2:])
    strides = tuple(node.attributes.get_ints("strides", (1,) * dims))
    dilations = tuple(node.attributes.get_ints("dilations", (1,) * dims))
    in_size, out_size = tuple(x_shape[2:]), tuple(y_shape[2:])
    begin, end = _explicit_pads(node, kernel, strides, dilations, in_size, out_size)
    c = node.inputs[2] if len(node.inputs) > 2 else None
    bias = None
    if c is not None:
        cv = _const(c)
        if cv is None:
            return None, "Conv bias is not a constant"
        bias = cv.astype(np.float64)
    rows = int(x_shape[0]) * int(np.prod(out_size, dtype=np.int64))
    return Layer(node, "Conv", w, bias, rows=rows, x_shape=tuple(map(int, x_shape)), in_positions=int(x_shape[0]) * int(np.prod(in_size, dtype=np.int64)),
                 in_size=in_size, out_size=out_size, strides=strides, dilations=dilations,
                 pads_begin=begin, pads_end=end), ""


def _bias_add(node: ir.Node, n_out: int) -> tuple[ir.Node, np.ndarray] | None:
    """The Add holding a MatMul's float32 bias, and the bias as a vector."""
    found = matmul_bias_add(node, n_out)
    if found is None or found[1].const_value.dtype != ir.DataType.FLOAT:
        return None
    return found[0], found[1].const_value.numpy().reshape(-1)


def _explicit_pads(node: ir.Node, kernel, strides, dilations, in_size, out_size) -> tuple[tuple[int, ...], tuple[int, ...]]:
    dims = len(kernel)
    auto = node.attributes.get_string("auto_pad", "NOTSET")
    if auto in ("", "NOTSET"):
        pads = list(node.attributes.get_ints("pads", (0,) * 2 * dims))
        return tuple(pads[:dims]), tuple(pads[dims:])
    if auto == "VALID":
        return (0,) * dims, (0,) * dims
    total = [max(0, (o - 1) * s + (k - 1) * d + 1 - i) for o, s, k, d, i in zip(out_size, strides, kernel, dilations, in_size)]
    begin = tuple(t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total)
    return begin, tuple(t - b for t, b in zip(total, begin))


# ------------------------------------------------------------------------------------ forms


def _forms(layer: Layer, allowed: tuple[str, ...]) -> list[str]:
    if layer.kind != "Conv":
        return ["gemm"]
    k = int(np.prod(layer.weight.shape[2:]))
    out = ["channel"] if "channel" in allowed else []
    if "squeeze" in allowed and k > 1:
        out.append("squeeze")
    if "spatial" in allowed and layer.weight.ndim == 4 and min(layer.weight.shape[2:]) > 1:
        out.append("spatial")
    return out


def matrix(layer: Layer, form: str) -> np.ndarray:
    """The weight as the matrix this form factorizes (rows: input side)."""
    w = layer.weight
    if form == "gemm":
        return w
    o, c = w.shape[:2]
    if form == "channel":
        return w.reshape(o, -1).T
    if form == "squeeze":
        return np.moveaxis(w, 1, 0).reshape(c, -1)
    return w.transpose(1, 2, 0, 3).reshape(c * w.shape[2], o * w.shape[3])  # spatial


def unmatrix(layer: Layer, form: str, mat: np.ndarray) -> np.ndarray:
    """Inverse of `matrix`: the layer's weight (same layout as Layer.weight) from a form's matrix."""
    shape = layer.weight.shape
    if form == "gemm":
        return mat
    o, c = shape[:2]
    if form == "channel":
        return mat.T.reshape(shape)
    if form == "squeeze":
        return np.moveaxis(mat.reshape(c, o, *shape[2:]), 0, 1)
    return mat.reshape(c, shape[2], o, shape[3]).transpose(2, 0, 1, 3)


def macs_per_rank(layer: Layer, form: str) -> int:
    w = layer.weight
    if form == "gemm":
        return layer.rows * (w.shape[0] + w.shape[1])
    o, c, k = w.shape[0], w.shape[1], int(np.prod(w.shape[2:]))
    if form == "channel":
        return layer.rows * (c * k + o)
    if form == "squeeze":
        return layer.in_positions * c + layer.rows * o * k
    batch = layer.in_positions // int(np.prod(layer.in_size))
    mid = batch * layer.out_size[0] * layer.in_size[1]  # first conv: output height x input width
    return mid * c * w.shape[2] + layer.rows * o * w.shape[3]


def params_per_rank(layer: Layer, form: str) -> int:
    m = matrix(layer, form)
    return m.shape[0] + m.shape[1]


@dataclass
class Candidate:
    """One form of one layer with its spectrum (in the data's metric when data-aware)."""

    layer: Layer
    form: str
    sigma: np.ndarray
    per_rank: int  # MACs per unit of rank
    moments: _Moments | None  # input statistics, when calibration data was collected
    whitened: bool

    @property
    def full_rank(self) -> int:
        return len(self.sigma)

    @property
    def break_even(self) -> float:
        """Ranks strictly below this save MACs."""
        return min(self.layer.macs / self.per_rank, self.full_rank)

    def loss(self, rank: int) -> float:
        """Discarded energy as a fraction of the total (relative squared weight or output error)."""
        total = float(np.sum(self.sigma**2))
        return float(np.sum(self.sigma[rank:] ** 2)) / total if total > 0 else 0.0


def taps(layer: Layer, form: str) -> int:
    """Kernel taps that share a form's first factor: its matrix rows are (input-side index, tap) pairs of
    the layer's im2col rows, with the taps folded into the columns (the channel form reads whole rows)."""
    if form in ("gemm", "channel"):
        return 1
    kernel = layer.weight.shape[2:]
    return int(np.prod(kernel)) if form == "squeeze" else int(kernel[-1])


def form_covariance(layer: Layer, form: str, covariance: np.ndarray) -> np.ndarray:
    """The covariance of what a form's first factor reads, from that of the im2col rows: the
    diagonal (same-tap) blocks averaged over the taps that share the factor."""
    t = taps(layer, form)
    if t == 1:
        return covariance
    m = covariance.shape[0] // t
    return covariance.reshape(m, t, m, t).diagonal(axis1=1, axis2=3).mean(-1)


def candidates(layer: Layer, allowed: tuple[str, ...], moments: _Moments | None) -> list[Candidate]:
    out = []
    cov = moments.covariance(layer.can_refit_bias) if moments is not None else None
    for form in _forms(layer, allowed):
        metric = form_covariance(layer, form, cov) if cov is not None else None
        sigma = spectrum(matrix(layer, form), metric)
        out.append(Candidate(layer, form, sigma, macs_per_rank(layer, form), moments, moments is not None))
    return out


def _criterion_rank(cand: Candidate, energy: float | None, ratio: float | None) -> int:
    rank = 1
    if energy is not None:
        cum = np.cumsum(cand.sigma**2)
        rank = max(rank, int(np.searchsorted(cum, energy * cum[-1] * (1 - 1e-12))) + 1) if cum[-1] > 0 else rank
    if ratio is not None:
        rank = max(rank, math.ceil(ratio * cand.full_rank - 1e-9))
    return rank


def _eligible(cands: list[Candidate], energy: float | None, ratio: float | None, round_to: int
              ) -> tuple[list[tuple[Candidate, int]], str]:
    """The (form, rank) pairs whose criterion rank, rounded up to `round_to`, stays below break-even,
    fewest MACs first; or none and why."""
    eligible, reasons = [], []
    for cand in cands:
        rank = _criterion_rank(cand, energy, ratio)
        rounded = math.ceil(rank / round_to) * round_to
        if rounded >= cand.break_even:
            reasons.append(f"{cand.form} rank {rank} (rounded to {rounded}) >= break-even {cand.break_even:.1f}")
        else:
            eligible.append((cand, rounded))
    eligible.sort(key=lambda pick: pick[1] * pick[0].per_rank)
    return eligible, ("no saving: " + "; ".join(reasons)) if not eligible else ""


def _allocate_budget(layers: list[Layer], candidates: Mapping[str, list[Candidate]], round_to: int,
                     budget: float, total: int) -> tuple[dict[str, tuple[Candidate, int]], bool]:
    """Greedy on each layer's lower convex hull of (MACs, loss): the step with the least loss per
    MAC saved first, until the model's MACs fit the budget."""
    hulls: dict[str, list[tuple[int, float, Candidate | None, int]]] = {}
    for layer in layers:
        points = [(layer.macs, 0.0, None, 0)]
        for cand in candidates[layer.node.name]:
            for rank in range(round_to, math.ceil(cand.break_even), round_to):
                if rank < cand.break_even:
                    points.append((rank * cand.per_rank, cand.loss(rank), cand, rank))
        hulls[layer.node.name] = _lower_hull(points)
    heap: list[tuple[float, int, str, int]] = []
    for i, (name, hull) in enumerate(hulls.items()):
        if len(hull) > 1:
            heapq.heappush(heap, (_slope(hull[0], hull[1]), i, name, 1))
    chosen: dict[str, tuple[Candidate, int]] = {}
    current = float(total)
    while heap and current > budget:
        _, i, name, step = heapq.heappop(heap)
        hull = hulls[name]
        current -= hull[step - 1][0] - hull[step][0]
        chosen[name] = (hull[step][2], hull[step][3])
        if step + 1 < len(hull):
            heapq.heappush(heap, (_slope(hull[step], hull[step + 1]), i, name, step + 1))
    return chosen, current <= budget


def _slope(a, b) -> float:
    return (b[1] - a[1]) / max(a[0] - b[0], 1)


def _lower_hull(points):
    """From the unfactorized point (most MACs, no loss) toward fewer MACs, the convex chain of least loss."""
    hull: list = []
    for p in sorted(points, key=lambda p: (-p[0], p[1])):
        if hull and p[0] == hull[-1][0]:
            continue  # same MACs, more loss
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-2], p):
            hull.pop()
        hull.append(p)
    return hull


# ------------------------------------------------------------------------------------ calibration


@dataclass
class _Moments:
    """Running first and second moments of a layer's input rows (im2col rows for Conv)."""

    count: int = 0
    total: np.ndarray | None = None
    gram: np.ndarray | None = None

    def update(self, rows: np.ndarray) -> None:
        rows = rows.astype(np.float64, copy=False)
        if self.gram is None:
            self.total, self.gram = np.zeros(rows.shape[1]), np.zeros((rows.shape[1],) * 2)
        self.total += rows.sum(0)
        self.gram += rows.T @ rows
        self.count += len(rows)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    def covariance(self, centered: bool) -> np.ndarray:
        second = self.gram / max(self.count, 1)
        return second - np.outer(self.mean, self.mean) if centered else second


def collect_moments(model: ir.Model, layers: list[Layer], calibration: Calibration, *, samples: int,
                    max_features: int, positions: int, seed: int = 0) -> dict[str, _Moments]:
    """Per layer (by node name): moments of its input rows over the calibration data, streamed
    batch by batch through ORT with the layers' inputs added as outputs."""
    wanted = [l for l in layers if l.input_features() <= max_features]
    if not wanted:
        return {}
    rng = np.random.default_rng(seed)
    moments = {l.node.name: _Moments() for l in wanted}
    masks = mask_inputs(model)  # token rows under an attention mask's padding are left out
    names = list(dict.fromkeys(l.node.inputs[0].name for l in wanted))
    mask = None
    for count, values in stream_values(model, [*names, *masks], calibration, batch_size=batch_size_for(model, 8), limit=samples):
        mask = feed_mask(values, masks) if count else mask  # a batch's later parts carry no inputs
        for layer in wanted:
            x = values.get(layer.node.inputs[0].name)
            if x is not None:
                moments[layer.node.name].update(_input_rows(layer, np.asarray(x), positions, rng, mask))
    return moments


def _input_rows(layer: Layer, x: np.ndarray, positions: int, rng: np.random.Generator,
                mask: np.ndarray | None = None) -> np.ndarray:
    if layer.kind != "Conv":
        return token_rows(x, mask)
    return im2col(x, layer, positions, rng)


def im2col(x: np.ndarray, layer: Layer, positions: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """Conv input patches [rows, C·k] (channel-major, then kernel taps: the order of W.reshape(O, -1)),
    at every output position, or at `positions` random ones per sample."""
    kernel = layer.weight.shape[2:]
    dims = len(kernel)
    xp = np.pad(x, [(0, 0), (0, 0), *zip(layer.pads_begin, layer.pads_end)])
    window = [(k - 1) * d + 1 for k, d in zip(kernel, layer.dilations)]
    view = np.lib.stride_tricks.sliding_window_view(xp, window, axis=tuple(range(2, 2 + dims)))
    index = (slice(None), slice(None), *(slice(None, o * s, s) for o, s in zip(layer.out_size, layer.strides)),
             *(slice(None, None, d) for d in layer.dilations))
    view = view[index]  # [B, C, *out, *kernel]
    view = np.moveaxis(view, 1, 1 + dims)  # [B, *out, C, *kernel]
    flat = view.reshape(x.shape[0], -1, *view.shape[1 + dims:])
    total = flat.shape[1]
    if positions is not None and total > positions:
        pick = np.sort((rng or np.random.default_rng(0)).choice(total, positions, replace=False))
        flat = flat[:, pick]
    return flat.reshape(-1, int(np.prod(view.shape[1 + dims:])))


# ------------------------------------------------------------------------------------ truncation


def _cholesky(cov: np.ndarray) -> np.ndarray:
    """Lower R with R·Rᵀ = cov + a ridge of WHITEN_FLOOR x the mean variance (more if needed), so that
    whitening stays well conditioned when the calibration inputs do not span every direction."""
    n = len(cov)
    ridge = WHITEN_FLOOR * max(float(np.trace(cov)) / n, 1e-30)
    while True:
        try:
            return np.linalg.cholesky(cov + ridge * np.eye(n))
        except np.linalg.LinAlgError:  # rounding made cov slightly indefinite
            ridge *= 100


def _gram(mat: np.ndarray, cov: np.ndarray | None) -> np.ndarray:
    """The smaller Gram matrix of Rᵀ·M (R·Rᵀ = cov; plain: of M): its eigenvalues are the squared
    singular values. Tall M needs no R at all (Mᵀ·cov·M)."""
    m, n = mat.shape
    if n <= m:
        return mat.T @ mat if cov is None else mat.T @ cov @ mat
    w = mat if cov is None else _cholesky(cov).T @ mat
    return w @ w.T


def spectrum(mat: np.ndarray, cov: np.ndarray | None = None) -> np.ndarray:
    """Singular values of M (plain) or of Rᵀ·M with R·Rᵀ = cov (data-aware), largest first."""
    values = scipy.linalg.eigvalsh(_gram(mat, cov))[::-1]
    return np.sqrt(np.clip(values, 0.0, None))


def _top_vectors(gram: np.ndarray, rank: int) -> np.ndarray:
    k = len(gram)
    return scipy.linalg.eigh(gram, subset_by_index=[k - rank, k - 1])[1][:, ::-1]


def truncate(mat: np.ndarray, cov: np.ndarray | None, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with A·B the best rank-`rank` approximation of M in the norm ||Rᵀ·(M - A·B)||_F (plain:
    the Frobenius norm, i.e. the truncated SVD). Tall M: the projection onto the top eigenvectors of
    Mᵀ·cov·M; wide M: truncated in the whitened space Rᵀ·M and mapped back through R⁻ᵀ."""
    m, n = mat.shape
    if n <= m:
        v = _top_vectors(_gram(mat, cov), rank)
        return _balanced(mat @ v, v.T)
    root = _cholesky(cov) if cov is not None else None
    w = mat if root is None else root.T @ mat
    u = _top_vectors(w @ w.T, rank)
    a = u if root is None else scipy.linalg.solve_triangular(root.T, u, lower=False)
    return _balanced(a, u.T @ w)


def _balanced(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same product with each rank-one term's scale split evenly between the factors (U√σ, √σVᵀ)."""
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1)
    scale = np.ones_like(na)
    ok = (na > 0) & (nb > 0)
    scale[ok] = np.sqrt(nb[ok] / na[ok])
    return a * scale, b / scale[:, None]


def refit_second(layer: Layer, form: str, a: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """B minimising the layer's output error tr(ΔᵀΣΔ) on the full im2col covariance Σ for a fixed first
    factor A shared across the form's taps (the im2col weight is (A ⊗ I_taps)·B_io), by least squares."""
    t, (m, r), o = taps(layer, form), a.shape, layer.weight.shape[0]
    left = np.tensordot(a, cov.reshape(m, t, m, t), axes=([0], [0]))  # [r, t, m, t]
    rhs = left.reshape(r * t, m * t) @ _io_matrix(layer.weight)
    gram = np.tensordot(left, a, axes=([2], [0])).transpose(0, 1, 3, 2).reshape(r * t, r * t)
    gram += WHITEN_FLOOR * max(float(np.trace(gram)) / len(gram), 1e-30) * np.eye(len(gram))
    try:
        b_io = scipy.linalg.solve(gram, rhs, assume_a="pos")
    except np.linalg.LinAlgError:
        b_io = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    return b_io.reshape(r, t, o).transpose(0, 2, 1).reshape(r, o * t)


def output_sq_error(layer: Layer, form: str, approx: np.ndarray, cov: np.ndarray) -> float:
    """tr(ΔᵀΣΔ): the layer's summed squared output error per input row for the form's matrix `approx`."""
    delta = _io_matrix(layer.weight - unmatrix(layer, form, approx))
    return float(np.sum(delta * (cov @ delta)))


def factors(cand: Candidate, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with A·B the rank-`rank` approximation of the form's matrix (output-aware when data-aware)."""
    a, b, _ = _factors(cand, rank)
    return a, b


def _factors(cand: Candidate, rank: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The factors and where the first came from: "svd" (plain), "output" (the output-optimal closed
    form), "whitened" or "svd+refit" (spatial/squeeze: whichever gave the smaller output error)."""
    layer, form = cand.layer, cand.form
    mat = matrix(layer, form)
    if not cand.whitened:
        return *truncate(mat, None, rank), "svd"
    cov = cand.moments.covariance(layer.can_refit_bias)
    a, b = truncate(mat, form_covariance(layer, form, cov), rank)
    if taps(layer, form) == 1:
        return a, b, "output"
    best: tuple[float, np.ndarray, np.ndarray, str] | None = None
    for first, source in ((a, "whitened"), (truncate(mat, None, rank)[0], "svd+refit")):
        second = refit_second(layer, form, first, cov)
        error = output_sq_error(layer, form, first @ second, cov)
        if best is None or error < best[0]:
            best = (error, first, second, source)
    return *_balanced(best[1], best[2]), best[3]


# ------------------------------------------------------------------------------------ rewriting


class _Names:
    """Fresh unique names for new values and nodes."""

    def __init__(self, model: ir.Model) -> None:
        self.taken = set(model.graph.initializers) | {v.name for v in model.graph.inputs}
        self.taken |= {v.name for n in model.graph for v in n.outputs} | {n.name for n in model.graph}

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name


def _initializer(model: ir.Model, names: _Names, base: str, array: np.ndarray) -> ir.Value:
    array = np.ascontiguousarray(array, dtype=np.float32)
    name = names(base)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(array, name=name))
    model.graph.register_initializer(value)
    return value


def _drop_if_unused(model: ir.Model, value: ir.Value | None) -> None:
    if value is not None and not list(value.uses()) and value.name in model.graph.initializers and not value.is_graph_output():
        del model.graph.initializers[value.name]


def apply(model: ir.Model, layer: Layer, cand: Candidate, rank: int, names: _Names | None = None) -> dict:
    """Rewrite `layer` as two nodes of rank `rank` in `cand.form`; returns the layer's record."""
    a, b, source = _factors(cand, rank)
    new_weight = unmatrix(layer, cand.form, a @ b)
    weight_error = float(np.linalg.norm(layer.weight - new_weight))
    refit = cand.moments is not None and layer.can_refit_bias
    bias = None
    if refit:  # the residual's mean over the calibration data goes into the bias
        shift = cand.moments.mean @ _io_matrix(layer.weight - new_weight)
        bias = shift if layer.bias is None else layer.bias + shift
    rewrite(model, layer, cand.form, a, b, bias, names)
    record = _record(layer, cand, rank, layer.weight - new_weight, weight_error, refit)
    record["first_factor"] = source
    return record


def rewrite(model: ir.Model, layer: Layer, form: str, a: np.ndarray, b: np.ndarray, bias: np.ndarray | None = None,
            names: _Names | None = None) -> None:
    """Replace `layer`'s node by a first node with factor A and the same node with factor B (its bias
    replaced by `bias` when given, else kept)."""
    names = names or _Names(model)
    node, base = layer.node, layer.node.name or layer.node.outputs[0].name
    x = node.inputs[0]
    old_weight = node.inputs[1]
    first_w, second_w, first_attrs, second_attrs = _node_weights(layer, form, a, b)
    op = "MatMul" if layer.kind != "Conv" else "Conv"
    w1 = _initializer(model, names, f"{base}_lowrank_a", first_w)
    first = ir.node(op, [x, w1], attributes=first_attrs, name=names(f"{base}_lowrank"))
    hidden = first.outputs[0]
    hidden.name = names(f"{node.outputs[0].name}_lowrank")
    hidden.type = ir.TensorType(ir.DataType.FLOAT)
    model.graph.insert_before(node, first)
    node.replace_input_with(0, hidden)
    node.replace_input_with(1, _initializer(model, names, f"{base}_lowrank_b", second_w))
    for key in ("auto_pad", "transA", "transB", "alpha") if layer.kind != "MatMul" else ():
        node.attributes.pop(key, None)
    for key, val in second_attrs.items():
        node.attributes[key] = ir.Attr(key, ir.AttributeType.INTS, list(val))
    _drop_if_unused(model, old_weight)
    if bias is None:
        return
    if layer.kind == "Gemm":
        _set_bias(model, names, node, 2, bias, base)
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    elif layer.kind == "Conv":
        _set_bias(model, names, node, 2, bias, base)
    else:
        add = layer.bias_add
        slot = 1 if add.inputs[0] is node.outputs[0] else 0
        _set_bias(model, names, add, slot, bias.reshape(add.inputs[slot].const_value.shape), base)


def _io_matrix(weight: np.ndarray) -> np.ndarray:
    """A weight as the matrix that maps input rows (im2col rows for Conv) to outputs."""
    return weight if weight.ndim == 2 else weight.reshape(weight.shape[0], -1).T


def _set_bias(model: ir.Model, names: _Names, node: ir.Node, slot: int, bias: np.ndarray, base: str) -> None:
    old = node.inputs[slot] if len(node.inputs) > slot else None
    value = _initializer(model, names, f"{base}_bias", bias)
    if len(node.inputs) <= slot:
        node.resize_inputs(slot + 1)
    node.replace_input_with(slot, value)
    _drop_if_unused(model, old)


def _node_weights(layer: Layer, form: str, a: np.ndarray, b: np.ndarray):
    """Weights of the two new nodes and the attributes each needs, from the factors A [in, r], B [r, out]."""
    r = a.shape[1]
    if form == "gemm":
        return a, b, {}, {}
    w = layer.weight
    o, c, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
    dims = len(kernel)
    ones, zeros = (1,) * dims, (0,) * dims
    full = {"kernel_shape": kernel, "strides": layer.strides, "dilations": layer.dilations,
            "pads": layer.pads_begin + layer.pads_end}
    point = {"kernel_shape": ones, "strides": ones, "dilations": ones, "pads": zeros + zeros}
    if form == "channel":
        return a.T.reshape(r, c, *kernel), b.T.reshape(o, r, *ones), full, point
    if form == "squeeze":
        return a.T.reshape(r, c, *ones), np.moveaxis(b.reshape(r, o, *kernel), 0, 1), point, full
    (kh, kw), (sh, sw), (dh, dw) = kernel, layer.strides, layer.dilations
    (bh, bw), (eh, ew) = layer.pads_begin, layer.pads_end
    w1 = a.reshape(c, kh, r).transpose(2, 0, 1)[..., None]
    w2 = b.reshape(r, o, kw).transpose(1, 0, 2)[:, :, None, :]
    vertical = {"kernel_shape": (kh, 1), "strides": (sh, 1), "dilations": (dh, 1), "pads": (bh, 0, eh, 0)}
    horizontal = {"kernel_shape": (1, kw), "strides": (1, sw), "dilations": (1, dw), "pads": (0, bw, 0, ew)}
    return w1, w2, vertical, horizontal


def _record(layer: Layer, cand: Candidate, rank: int, residual: np.ndarray, weight_error: float, refit: bool) -> dict:
    params_before = int(layer.weight.size)
    output_error = None
    if cand.moments is not None:  # relative output error on the calibration data, from the input moments
        base, delta = _io_matrix(layer.weight), _io_matrix(residual)
        err = float(np.trace(delta.T @ cand.moments.covariance(refit) @ delta))
        ref = float(np.trace(base.T @ cand.moments.covariance(False) @ base))
        output_error = math.sqrt(max(err, 0.0) / ref) if ref > 0 else 0.0
    return {
        "node": layer.node.name,
        "op": layer.kind,
        "form": cand.form,
        "rank": rank,
        "full_rank": cand.full_rank,
        "break_even": round(cand.break_even, 2),
        "macs_before": layer.macs,
        "macs_after": rank * cand.per_rank,
        "params_before": params_before,
        "params_after": rank * params_per_rank(layer, cand.form),
        "weight_error": weight_error,
        "weight_error_rel": weight_error / max(float(np.linalg.norm(layer.weight)), 1e-30),
        "output_error": output_error,
        "data_aware": cand.whitened,
        "bias_refit": refit,
    }


# ------------------------------------------------------------------------------------ latency


def layer_models(layer: Layer, form: str, rank: int, model: ir.Model) -> tuple[ir.Model, ir.Model]:
    """The layer on its own at its input shape (with its bias Add, for MatMul), and the same with its
    rank-`rank` replacement in `form` as `rewrite` writes it. The factors are random: a dense kernel's
    time does not depend on the values."""
    node = layer.node
    x = ir.Value(name="x", shape=ir.Shape(layer.x_shape), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], name="layer", opset_imports=dict(model.opset_imports))
    original = ir.Model(graph, ir_version=model.ir_version)
    names = _Names(original)
    inputs: list[ir.Value | None] = [x]
    for value in node.inputs[1:]:
        inputs.append(None if value is None else _initializer(original, names, "w", value.const_value.numpy()))
    attrs = {a.name: ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()}
    copy = ir.node(node.op_type, inputs, attributes=attrs, name=node.name or "layer")
    graph.append(copy)
    add = None
    if layer.bias_add is not None:
        slot = 1 if layer.bias_add.inputs[0] is node.outputs[0] else 0
        bias = _initializer(original, names, "b", layer.bias_add.inputs[slot].const_value.numpy())
        add = ir.node("Add", [copy.outputs[0], bias] if slot == 1 else [bias, copy.outputs[0]], name="bias")
        graph.append(add)
    out = (add or copy).outputs[0]
    out.name, out.type = "y", ir.TensorType(ir.DataType.FLOAT)
    copy.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(out)
    factored = load(original)
    twin = next(n for n in factored.graph if n.name == copy.name)
    twin_add = next((n for n in factored.graph if n.name == "bias"), None)
    rng = np.random.default_rng(0)
    m, n = matrix(layer, form).shape
    rewrite(factored, replace(layer, node=twin, bias_add=twin_add), form, rng.standard_normal((m, rank)),
            rng.standard_normal((rank, n)))
    return original, factored


def measure_layer(original: ir.Model, factorized: ir.Model, *, provider: str, threads: int | None) -> PairTiming:
    """Median latency of a layer and of its replacement, timed interleaved (tests replace this)."""
    return time_pair(original, factorized, provider=provider, threads=threads)


class _LatencyJudge:
    """Times factorizations against their layers, once per distinct (layer shape, form, rank)."""

    def __init__(self, model: ir.Model, provider: str, threads: int | None, min_speedup: float) -> None:
        self.model, self.provider, self.threads, self.min_speedup = model, provider, threads, min_speedup
        self.cache: dict[tuple, PairTiming] = {}
        self.tried: dict[tuple[str, str, int], PairTiming] = {}  # (node, form, rank) -> timing, in order
        self.seconds = 0.0

    @property
    def timed(self) -> int:
        return len(self.cache)

    def timing(self, layer: Layer, cand: Candidate, rank: int) -> PairTiming:
        key = _shape_key(layer, cand.form, rank)
        if key not in self.cache:
            start = time.perf_counter()
            original, factorized = layer_models(layer, cand.form, rank, self.model)
            self.cache[key] = measure_layer(original, factorized, provider=self.provider, threads=self.threads)
            self.seconds += time.perf_counter() - start
        self.tried[layer.node.name, cand.form, rank] = self.cache[key]
        return self.cache[key]

    def fast(self, layer: Layer, cand: Candidate, rank: int) -> bool:
        return self.timing(layer, cand, rank).speedup >= self.min_speedup

    def fastest(self, layer: Layer, eligible: list[tuple[Candidate, int]]) -> tuple[list[tuple[Candidate, int]], str]:
        """Of a layer's eligible (form, rank) pairs, the measurably fastest (if fast enough)."""
        timed = sorted(eligible, key=lambda pick: -self.timing(layer, *pick).speedup)
        if self.fast(layer, *timed[0]):
            return timed[:1], ""
        return [], "measured slower: " + "; ".join(
            f"{c.form} rank {r} {self.timing(layer, c, r).speedup:.2f}x" for c, r in timed
        ) + f" (< min_speedup {self.min_speedup:g})"

    def allocate(self, layers: list[Layer], options: Mapping[str, list[Candidate]], round_to: int, budget: float,
                 total: int) -> tuple[dict[str, tuple[Candidate, int]], bool]:
        """The budget allocation with every chosen layer measurably faster: (layer, form) pairs measured
        slower are excluded and the budget reallocated, LATENCY_ROUNDS times at most; then the slower dropped."""
        by_name = {layer.node.name: layer for layer in layers}
        excluded: set[tuple[str, str]] = set()
        for _ in range(LATENCY_ROUNDS):
            allowed = {name: [c for c in cands if (name, c.form) not in excluded] for name, cands in options.items()}
            chosen, _ = _allocate_budget(layers, allowed, round_to, budget, total)
            slow = {(name, cand.form) for name, (cand, rank) in chosen.items() if not self.fast(by_name[name], cand, rank)}
            if not slow:
                break
            excluded |= slow
        chosen = {name: pick for name, pick in chosen.items() if self.fast(by_name[name], *pick)}
        macs = total - sum(by_name[name].macs - rank * cand.per_rank for name, (cand, rank) in chosen.items())
        return chosen, macs <= budget

    def rejections(self, chosen: Mapping[str, tuple[Candidate, int]]) -> list[str]:
        """Skip reasons for the layers a budget allocation timed but left whole."""
        out = []
        for name in dict.fromkeys(node for node, _, _ in self.tried):
            if name in chosen:
                continue
            slow = [(form, rank, t) for (node, form, rank), t in self.tried.items() if node == name]
            if all(t.speedup < self.min_speedup for _, _, t in slow):
                out.append(f"{name}: measured slower: " + "; ".join(f"{f} rank {r} {t.speedup:.2f}x" for f, r, t in slow)
                           + f" (< min_speedup {self.min_speedup:g})")
        return out

    def timing_record(self, layer: Layer, cand: Candidate, rank: int) -> dict:
        t = self.timing(layer, cand, rank)
        return {"time_ms_before": t.baseline_ms, "time_ms_after": t.candidate_ms, "measured_speedup": t.speedup}

    def summary(self) -> list[dict]:
        return [{"node": node, "form": form, "rank": rank, "time_ms_before": t.baseline_ms,
                 "time_ms_after": t.candidate_ms, "measured_speedup": t.speedup, "runs": t.runs,
                 "fast_enough": t.speedup >= self.min_speedup}
                for (node, form, rank), t in self.tried.items()]


def _shape_key(layer: Layer, form: str, rank: int) -> tuple:
    """What a layer's time depends on: op, shapes, attributes, bias, form and rank (not the values)."""
    node = layer.node
    attrs = tuple(sorted((a.name, repr(a.value)) for a in node.attributes.values()))
    consts = tuple(None if v is None else tuple(v.const_value.shape) for v in node.inputs[1:])
    return (layer.kind, layer.x_shape, attrs, consts, layer.bias_add is not None, form, rank)


__all__ = ["Candidate", "Factorize", "Layer", "apply", "candidates", "collect_moments", "factors", "find_layers",
           "form_covariance", "im2col", "layer_models", "matrix", "measure_layer", "refit_second", "rewrite", "spectrum",
           "taps", "truncate", "unmatrix"]

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
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from .. import runtime
from ..analysis.activations import collect
from ..analysis.channels import Sink
from ..calibration import Calibration, batch_size_for
from ..feeds import feed_mask, mask_inputs, token_rows
from ..model import EXTERNAL_DATA_THRESHOLD, tensor_in_memory
from ..report import to_jsonable
from ..verify import compare, outputs
from .linear import matmul_bias_add

try:  # optional (comes with scikit-learn): lets the ridge solves run on one BLAS thread, see _one_blas_thread
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - BLAS keeps its default threads
    threadpool_limits = None

#: Fraction of the calibration samples held out to choose the ridge strength and report fidelity.
HOLDOUT = 0.2  # pipeline.FITTING_HOLDOUT: verification feeds come from this part
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
#: Rows gathered before they are added to X^T X: few large products instead of many small ones.
CHUNK_ROWS = 2048


@dataclass
class _Normal:
    """Running normal equations of one layer over rows [x, 1] -> y (rows buffered into large products)."""

    gram: np.ndarray  # [d+1, d+1]
    cross: np.ndarray  # [d+1, O]
    target_energy: float = 0.0  # sum of y**2
    rows: int = 0
    pending: list = field(default_factory=list)

    @classmethod
    def empty(cls, inputs: int, outputs: int) -> _Normal:
        return cls(np.zeros((inputs + 1, inputs + 1)), np.zeros((inputs + 1, outputs)))

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.pending.append((x, y))
        self.rows += len(x)
        if sum(len(p[0]) for p in self.pending) >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        x = np.concatenate([p[0] for p in self.pending])
        y = np.concatenate([p[1] for p in self.pending]).astype(np.float64)
        self.pending = []
        xa = np.empty((len(x), x.shape[1] + 1))
        xa[:, :-1] = x
        xa[:, -1] = 1.0
        self.gram += xa.T @ xa
        self.cross += xa.T @ y
        self.target_energy += float(np.sum(y * y))

    def error(self, w: np.ndarray) -> float:
        """Sum of squared errors of [x, 1]·w against y over the accumulated rows."""
        self.flush()
        return float(np.sum(w * (self.gram @ w)) - 2.0 * np.sum(w * self.cross) + self.target_energy)


@dataclass
class _Layer:
    """One sink seen as an affine layer: weight matrix [inputs, outputs] and bias over input rows."""

    sink: Sink
    node: ir.Node  # in the pruned model
    original: ir.Node  # the same node in the original model
    taps: int  # input rows per channel: kernel positions for Conv, 1 otherwise
    keep_rows: np.ndarray  # bool per input row of the original layer
    keep_out: np.ndarray  # bool per output of the original layer (its own outputs may be pruned too)
    target: str  # the original layer's output value (bias included)
    record: dict = field(default_factory=dict)

    @property
    def inputs(self) -> int:  # kept input rows of the effective matrix (channels x taps)
        return int(self.keep_rows.sum())

    @property
    def outputs(self) -> int:
        return int(self.keep_out.sum())


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
) -> dict:
    """Recover `model` (pruned from `original`, same node and initializer names) in place.

    mode "bias" compensates biases; "refit" then refits every sink's kept weights and bias. Returns a
    JSON-able report: per sink what was done and its held-out error, whole-model fidelity against
    `original` on held-out samples before and after, warnings, and the seconds spent.
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
        layer, reason = _layer(original, model, sink)
        if layer is None:
            report["sinks"].append({"node": sink.node, "op_type": sink.op_type, "method": "skipped", "reason": reason})
        else:
            layers.append(layer)
            report["sinks"].append(layer.record)

    t0 = time.perf_counter()
    _compensate(original, model, layers, fit, bs)
    report["bias_seconds"] = time.perf_counter() - t0
    if mode == "refit":
        report["fidelity"]["after_bias"] = fidelity()
        timing = _refit(original, model, layers, fit, held, bs, seed=seed, ridge=ridge,
                        positions=max(1, min(positions_per_sample, max_rows // max(fit.num_samples, 1))),
                        max_inputs=max_inputs, cache_bytes=cache_bytes)
        report.update(timing)
    report["fidelity"]["after"] = fidelity()
    report["seconds"] = time.perf_counter() - start
    return report


def _first(calibration: Calibration, samples: int | None) -> Calibration:
    if samples is None or samples >= calibration.num_samples:
        return calibration
    return calibration.samples(0, samples)


# ------------------------------------------------------------------------------ layers


def _layer(original: ir.Model, model: ir.Model, sink: Sink) -> tuple[_Layer | None, str]:
    """The affine view of a sink in both models, or None and why it cannot be recovered."""
    node, orig = _node(model, sink.node), _node(original, sink.node)
    if node is None or orig is None:
        return None, "node not found in both models"
    if sink.op_type not in ("Conv", "Gemm", "MatMul") or node.op_type != sink.op_type:
        return None, f"{sink.op_type} layers are not recovered"
    for n in (node, orig):
        w = n.inputs[1] if len(n.inputs) > 1 else None
        if w is None or w.name != sink.weight or w.const_value is None:
            return None, "weight is not the constant the channel analysis named"
    if node.op_type == "Conv" and _attr_int(node, "group", 1) != 1:
        return None, "grouped convolution"
    if node.op_type == "Gemm" and (_attr_int(node, "transA", 0) or node.attributes.get_float("alpha", 1.0) == 0.0):
        return None, "Gemm with transA or alpha 0"
    if node.op_type == "MatMul" and len(node.inputs[1].const_value.shape) != 2:
        return None, "MatMul weight is not 2-D"
    if node.op_type == "Gemm":
        for n in (node, orig):
            c, outs = _const_input(n, 2), n.inputs[1].const_value.shape[0 if _attr_int(n, "transB", 0) else 1]
            if len(n.inputs) > 2 and n.inputs[2] is not None and (c is None or c.size not in (1, outs)):
                return None, "Gemm bias is not a constant per-output vector"
    w_orig, b_orig = _effective(orig)
    w_now, b_now = _effective(node)
    taps = int(np.prod(node.inputs[1].const_value.shape[2:])) if node.op_type == "Conv" else 1
    keep = np.asarray(sink.keep, bool)
    if len(keep) * taps != len(w_orig) or int(keep.sum()) * taps != len(w_now):
        return None, "weight shapes do not match the kept input channels"
    keep_rows = np.repeat(keep, taps)
    keep_out = _match_columns(np.vstack([w_orig[keep_rows], b_orig]), np.vstack([w_now, b_now]))
    if keep_out is None:
        return None, "cannot tell which of the layer's own outputs were kept"
    target = orig.outputs[0].name
    if node.op_type == "MatMul":
        add = _bias_add(orig)
        if add is not None:
            target = add[0].outputs[0].name
    record = {"node": sink.node, "op_type": sink.op_type, "inputs": int(keep.sum()),
              "removed_inputs": int((~keep).sum())}
    return _Layer(sink, node, orig, taps, keep_rows, keep_out, target, record), ""


def _node(model: ir.Model, name: str) -> ir.Node | None:
    return next((n for n in model.graph if n.name == name), None)


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    return int(node.attributes.get_int(name, default))


def _match_columns(original: np.ndarray, pruned: np.ndarray) -> np.ndarray | None:
    """Which columns of `original` survive in `pruned` (pruning slices, so the kept ones appear in order
    and bit-identical; greedy matching finds them, and equal columns are interchangeable)."""
    keep = np.zeros(original.shape[1], bool)
    j = 0
    for i in range(original.shape[1]):
        if j < pruned.shape[1] and np.array_equal(original[:, i], pruned[:, j]):
            keep[i] = True
            j += 1
    return keep if j == pruned.shape[1] else None


def _effective(node: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """(W [input rows, outputs], b [outputs]) in float64 such that the layer computes x·W + b."""
    w = node.inputs[1].const_value.numpy().astype(np.float64)
    if node.op_type == "Conv":
        mat = w.reshape(w.shape[0], -1).T  # rows: channel-major, then kernel positions (im2col order)
        bias = _const_input(node, 2)
        return mat, np.zeros(mat.shape[1]) if bias is None else bias.ravel()
    if node.op_type == "Gemm":
        alpha, beta = node.attributes.get_float("alpha", 1.0), node.attributes.get_float("beta", 1.0)
        mat = alpha * (w.T if _attr_int(node, "transB", 0) else w)
        bias = _const_input(node, 2)
        return mat, np.zeros(mat.shape[1]) if bias is None else beta * np.broadcast_to(bias.ravel(), mat.shape[1])
    add = _bias_add(node)
    bias = add[1].const_value.numpy().astype(np.float64).ravel() if add is not None else np.zeros(w.shape[1])
    return w, bias


def _const_input(node: ir.Node, index: int) -> np.ndarray | None:
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy().astype(np.float64)


def _bias_add(node: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    return matmul_bias_add(node, node.inputs[1].const_value.shape[1])


# ------------------------------------------------------------------------------ writing parameters


def _write(model: ir.Model, layer: _Layer, mat: np.ndarray | None, bias: np.ndarray) -> None:
    """Store an effective (W, b) into the pruned node, keeping dtypes and weight shapes. W None: bias only."""
    node = layer.node
    weight = node.inputs[1]
    dtype = weight.const_value.numpy().dtype
    if mat is not None:
        if node.op_type == "Conv":
            array = mat.T.reshape(tuple(weight.const_value.shape))
        elif node.op_type == "Gemm":
            array = mat / node.attributes.get_float("alpha", 1.0)
            array = array.T if _attr_int(node, "transB", 0) else array
        else:
            array = mat
        _replace(weight, array.astype(dtype))
    bias = bias.astype(dtype)
    if node.op_type == "Conv":
        _set_input(model, node, 2, bias, "bias")
    elif node.op_type == "Gemm":
        _set_input(model, node, 2, bias, "bias")
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)  # the bias now holds beta * C
    else:
        add = _bias_add(node)
        if add is not None:
            _replace(add[1], bias.reshape(tuple(add[1].const_value.shape)))
        else:
            _insert_bias_add(model, node, bias)


def _replace(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)


def _set_input(model: ir.Model, node: ir.Node, index: int, array: np.ndarray, suffix: str) -> None:
    """Put `array` in input `index`: in place when that is a private constant of the same size,
    otherwise as a new initializer (the old one is dropped when nothing else reads it)."""
    old = node.inputs[index] if len(node.inputs) > index else None
    if (old is not None and old.const_value is not None and len(old.uses()) == 1 and not old.is_graph_input()
            and old.const_value.size == array.size):
        _replace(old, array.reshape(tuple(old.const_value.shape)))
        return
    value = _new_initializer(model, f"{node.name}_{suffix}", array)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
    if old is not None and not old.uses() and old.name in model.graph.initializers and not old.is_graph_input():
        del model.graph.initializers[old.name]


def _new_initializer(model: ir.Model, base: str, array: np.ndarray) -> ir.Value:
    name = _unique_name(model, base)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    model.graph.register_initializer(value)
    return value


def _unique_name(model: ir.Model, base: str) -> str:
    taken = set(model.graph.initializers) | {v.name for v in model.graph.inputs}
    taken |= {v.name for n in model.graph for v in n.outputs}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _insert_bias_add(model: ir.Model, node: ir.Node, bias: np.ndarray) -> None:
    """MatMul -> Add(bias); the Add takes over the MatMul's output name, so consumers and graph outputs
    see the same name, now carrying the biased value."""
    y = node.outputs[0]
    name = y.name
    const = _new_initializer(model, f"{node.name}_bias", bias)
    add = ir.node("Add", [y, const], name=_unique_name(model, f"{node.name}_bias_add"))
    out = add.outputs[0]
    out.type, out.shape = y.type, y.shape
    for user, index in list(y.uses()):
        if user is not add:
            user.replace_input_with(index, out)
    for i, value in enumerate(model.graph.outputs):
        if value is y:
            model.graph.outputs[i] = out
    model.graph.insert_after(node, add)
    y.name = _unique_name(model, f"{name}_unbiased")
    out.name = name


# ------------------------------------------------------------------------------ bias compensation


def _compensate(original: ir.Model, model: ir.Model, layers: list[_Layer], fit: Calibration, batch: int) -> None:
    """b += mean(removed inputs) · W_removed, with the means measured on the original model."""
    if not layers:
        return
    stats = collect(original, {l.sink.input: l.sink.input_axis for l in layers}, fit, batch_size=batch)
    for layer in layers:
        channel = stats.values.get(layer.sink.input)
        w_orig, _ = _effective(layer.original)
        _, bias = _effective(layer.node)
        if channel is None or len(channel.mean) * layer.taps != len(w_orig):
            layer.record.update(method="skipped", reason="no activation statistics for its input")
            continue
        removed = ~layer.keep_rows
        delta = np.repeat(channel.mean, layer.taps)[removed] @ w_orig[removed][:, layer.keep_out]
        _write(model, layer, None, bias + delta)
        layer.record.update(method="bias", bias_shift=float(np.linalg.norm(delta)))


# ------------------------------------------------------------------------------ refit


def _refit(original: ir.Model, model: ir.Model, layers: list[_Layer], fit: Calibration, held: Calibration,
           batch: int, *, seed: int, ridge: Sequence[float], positions: int, max_inputs: int,
           cache_bytes: int) -> dict:
    """Sequential ridge refit, stage by stage; returns the timing summary."""
    todo = []
    for layer in layers:
        if layer.record.get("method") != "bias":
            continue
        if layer.inputs > max_inputs:
            layer.record["refit_skipped"] = f"{layer.inputs} inputs exceed the refit limit {max_inputs}"
            continue
        if len(layer.node.inputs[1].uses()) > 1:
            layer.record["refit_skipped"] = "weight is shared with other nodes"
            continue
        todo.append(layer)
    stages = _stages(model, todo)
    batches = [("fit", f) for f in fit.batches(batch)] + [("held", f) for f in held.batches(batch)]
    masks = mask_inputs(model)  # token rows under an attention mask's padding are left out
    pruned = _Stream(batches, [sorted({l.sink.input for l in st}) for st in stages], cache_bytes)
    targets = _Stream(batches, [sorted({l.target for l in st}) for st in stages], cache_bytes)
    forward = accumulate = solve = 0.0
    rng = np.random.default_rng(seed)
    for number, stage in enumerate(stages):
        normals = {(split, l.sink.node): _Normal.empty(l.inputs, l.outputs) for split in ("fit", "held") for l in stage}
        t0 = time.perf_counter()
        inputs, outputs_ = pruned.stage(model, number), targets.stage(original, number)
        for split, feeds in batches:
            xs, ys = next(inputs), next(outputs_)
            t1 = time.perf_counter()
            forward += t1 - t0
            mask = feed_mask(feeds, masks)
            for l in stage:
                x, y = _rows(l, xs[l.sink.input], ys[l.target], rng, positions, mask)
                normals[split, l.sink.node].add(x, y)
            t0 = time.perf_counter()
            accumulate += t0 - t1
        forward += time.perf_counter() - t0
        for l in stage:
            t0 = time.perf_counter()
            _solve(model, l, normals["fit", l.sink.node], normals["held", l.sink.node], ridge)
            l.record["stage"] = number
            l.record["solve_seconds"] = time.perf_counter() - t0
            solve += l.record["solve_seconds"]
    return {"stages": len(stages), "refit_layers": len(todo), "forward_seconds": forward,
            "accumulate_seconds": accumulate, "solve_seconds": solve,
            "stages_over_cache_budget": pruned.over_budget + targets.over_budget,
            "nodes_run": pruned.nodes_run + targets.nodes_run}


def _stages(model: ir.Model, layers: Iterable[_Layer]) -> list[list[_Layer]]:
    """Group layers so that no layer depends on another of its own stage (or a later one):
    a layer's stage is the largest number of refit layers on any path from the inputs to it."""
    by_name = {l.sink.node: l for l in layers}
    depth: dict[str, int] = {}
    stage_of: dict[str, int] = {}
    deepest = 0
    for node in model.graph:
        captures = any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
        level = deepest if captures else max((depth.get(v.name, 0) for v in node.inputs if v is not None), default=0)
        if node.name in by_name:
            stage_of[node.name] = level
            level += 1
        for v in node.outputs:
            depth[v.name] = level
        deepest = max(deepest, level)
    stages: list[list[_Layer]] = [[] for _ in range(max(stage_of.values(), default=-1) + 1)]
    for name, level in stage_of.items():
        stages[level].append(by_name[name])
    return [s for s in stages if s]


class _Stream:
    """One network run stage by stage over fixed batches. Between stages it keeps the values that later
    stages still need (up to `budget` bytes), so each node runs about once over the data instead of
    once per stage; over budget, the next stage recomputes from the graph inputs."""

    def __init__(self, batches: list[tuple[str, dict[str, np.ndarray]]], plan: list[list[str]], budget: int):
        self.batches = batches
        self.plan = plan  # per stage: the values it needs
        self.budget = budget
        self.cache: list[dict[str, np.ndarray]] = [{} for _ in batches]
        self.over_budget = 0  # stages whose values for later stages did not fit in the budget
        self.nodes_run = 0  # nodes run per batch, summed over stages (each node once is ideal)

    def stage(self, model: ir.Model, number: int) -> Iterator[dict[str, np.ndarray]]:
        """For every batch, the values stage `number` needs. `model` must not change while iterating; the
        nodes run here are upstream of that stage's layers only, so refitting them afterwards is safe."""
        wanted = self.plan[number]
        feeds_names = set(self.batches[0][1]) if self.batches else set()
        given = {name: a.dtype for name, a in self.cache[0].items()} if self.cache else {}
        nodes, _ = _upstream(model, wanted, set(given) | feeds_names)
        self.nodes_run += len(nodes)
        available = set(given) | {v.name for n in nodes for v in n.outputs}
        later = [name for names in self.plan[number + 1:] for name in names]
        _, keep = _upstream(model, later, available | feeds_names)
        keep -= feeds_names
        computed = sorted((set(wanted) | keep) - set(given) - feeds_names)
        session, inputs = _segment_session(model, nodes, computed, given) if computed else (None, [])
        stored, over = 0, False
        for index, (_, feeds) in enumerate(self.batches):
            known = {**feeds, **self.cache[index]}
            if session is not None:
                known.update(zip(computed, session.run(computed, {name: known[name] for name in inputs})))
            self.cache[index] = {} if over else {name: known[name] for name in keep}
            stored += sum(a.nbytes for a in self.cache[index].values())
            if stored > self.budget and not over:
                over = True
                self.over_budget += 1
                for done in range(index + 1):
                    self.cache[done] = {}
            yield {name: known[name] for name in wanted}


def _upstream(model: ir.Model, names: Iterable[str], stop: set[str]) -> tuple[list[ir.Node], set[str]]:
    """The nodes (in graph order) that compute `names` from the values in `stop` and the initializers,
    and which values of `stop` they read."""
    producer = {v.name: n for n in model.graph for v in n.outputs}
    chosen: set[int] = set()
    reached: set[str] = set()
    seen: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in stop:
            reached.add(name)
            continue
        node = producer.get(name)
        if node is None or id(node) in chosen:
            continue
        chosen.add(id(node))
        stack.extend(_reads(node))
    return [n for n in model.graph if id(n) in chosen], reached


def _reads(node: ir.Node) -> list[str]:
    """Names a node reads, including outer-scope values its subgraphs capture."""
    names = [v.name for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else list(attr.value)
            for graph in graphs:
                for inner in ir.traversal.RecursiveGraphIterator(graph):
                    names.extend(v.name for v in inner.inputs if v is not None)
    return names


def _segment_session(model: ir.Model, nodes: list[ir.Node], outputs_: list[str], given: dict[str, np.dtype]):
    """An ORT session for `nodes` alone: graph inputs plus the `given` values they read in, `outputs_`
    out. Built from serialized nodes so that only the segment's weights are copied."""
    read = {name for n in nodes for name in _reads(n)}
    graph_inputs = [ir.serde.serialize_value(v) for v in model.graph.inputs]
    for name in sorted(set(given) & read):
        graph_inputs.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(given[name]), None))
    # External tensors with their data: the segment is run from bytes, which cannot resolve a location.
    initializers = [ir.serde.serialize_tensor(tensor_in_memory(v.const_value))
                    for name, v in model.graph.initializers.items() if name in read and v.const_value is not None]
    graph = onnx.helper.make_graph([ir.serde.serialize_node(n) for n in nodes], "segment", graph_inputs,
                                   [onnx.ValueInfoProto(name=name) for name in outputs_], initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                         for d, v in model.opset_imports.items()])
    proto.ir_version = model.ir_version
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    # Without spin-waiting: ORT threads that spin between runs starve the numpy work in between.
    options = runtime.session_options(spinning=False)
    if sum(t.ByteSize() for t in initializers) > EXTERNAL_DATA_THRESHOLD:
        session = runtime.session(ir.serde.deserialize_model(proto), options=options)  # saved with external data
    else:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=runtime.provider_chain("cpu"))
    return session, [i.name for i in session.get_inputs()]


def _rows(layer: _Layer, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, positions: int,
          mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Matching rows of the pruned layer's input (im2col for Conv) and the original layer's kept outputs,
    at up to `positions` randomly chosen output positions per sample (token positions under an
    attention `mask`'s padding left out)."""
    if layer.node.op_type == "Conv":
        return _conv_rows(layer.node, x, y[:, layer.keep_out], rng, positions)
    x2 = token_rows(x, mask)
    y2 = token_rows(y, mask)[:, layer.keep_out]
    if x.ndim > 2 and len(x2) > positions * len(x):  # [batch, positions..., features]: sample positions
        pick = np.sort(rng.choice(len(x2), positions * len(x), replace=False))
        x2, y2 = x2[pick], y2[pick]
    return x2, y2


def _conv_rows(node: ir.Node, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, positions: int
               ) -> tuple[np.ndarray, np.ndarray]:
    batch, channels, in_size = x.shape[0], x.shape[1], x.shape[2:]
    out_size = y.shape[2:]
    kernel = tuple(node.inputs[1].const_value.shape[2:])
    dims = len(kernel)
    strides = tuple(node.attributes.get_ints("strides", (1,) * dims))
    dilations = tuple(node.attributes.get_ints("dilations", (1,) * dims))
    begin = _pads_begin(node, kernel, strides, dilations, in_size, out_size)
    # Zero padding at the start as the op does; at the end as much as the sampled windows reach.
    reach = [(o - 1) * s + (k - 1) * d + 1 for o, s, k, d in zip(out_size, strides, kernel, dilations)]
    end = [max(0, r - i - b) for r, i, b in zip(reach, in_size, begin)]
    xp = np.pad(x, [(0, 0), (0, 0), *zip(begin, end)])
    total = int(np.prod(out_size))
    per = min(positions, total)
    flat = np.argsort(rng.random((batch, total)), axis=1)[:, :per].ravel()
    sample = np.repeat(np.arange(batch), per)
    out = np.unravel_index(flat, out_size)
    taps = np.stack(np.meshgrid(*[np.arange(k) * d for k, d in zip(kernel, dilations)], indexing="ij"), -1)
    taps = taps.reshape(-1, dims)
    where = [out[j][:, None] * strides[j] + taps[None, :, j] for j in range(dims)]  # [rows, taps]
    patches = xp[(sample[:, None], slice(None), *where)]  # advanced dims first: [rows, taps, channels]
    rows = patches.transpose(0, 2, 1).reshape(len(flat), channels * len(taps))
    return rows, y[(sample, slice(None), *out)]


def _pads_begin(node: ir.Node, kernel, strides, dilations, in_size, out_size) -> list[int]:
    auto = node.attributes.get_string("auto_pad", "NOTSET")
    dims = len(kernel)
    if auto in ("", "NOTSET"):
        return list(node.attributes.get_ints("pads", (0,) * 2 * dims))[:dims]
    if auto == "VALID":
        return [0] * dims
    total = [max(0, (o - 1) * s + (k - 1) * d + 1 - i)
             for o, s, k, d, i in zip(out_size, strides, kernel, dilations, in_size)]
    return [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]


def _solve(model: ir.Model, layer: _Layer, fit: _Normal, held: _Normal, ridge: Sequence[float]) -> None:
    """Ridge least squares toward the current (bias-compensated) weights W0:
    min |[x,1]W - y|^2 + λ|W - W0|^2, λ = r · trace(X^T X)/d for r in `ridge`, or λ = ∞ (W = W0),
    whichever has the smallest held-out error (the search stops where weaker ridges start to overfit)."""
    fit.flush()
    held.flush()
    w_now, b_now = _effective(layer.node)
    start = np.vstack([w_now, b_now])
    w_orig, b_orig = _effective(layer.original)
    sliced = np.vstack([w_orig[layer.keep_rows][:, layer.keep_out], b_orig[layer.keep_out]])  # no compensation
    energy = max(held.target_energy, np.finfo(float).tiny)
    best, best_error, best_ridge = start, held.error(start), None
    before = previous = best_error
    scale = float(np.trace(fit.gram)) / len(fit.gram)
    for r in sorted(ridge, reverse=True):  # from strong to weak: stop once held-out error turns up
        with _one_blas_thread():
            candidate = _ridge_solution(fit, start, r * scale)
        if candidate is None:
            continue
        error = held.error(candidate)
        if error < best_error:
            best, best_error, best_ridge = candidate, error, r
        if error > previous:
            break
        previous = error
    layer.record.update(
        method="refit" if best_ridge is not None else "bias",
        ridge=best_ridge,
        rows=fit.rows,
        heldout_rows=held.rows,
        error_pruned=held.error(sliced) / energy,
        error_before=before / energy,
        error_after=best_error / energy,
    )
    if best_ridge is not None:
        _write(model, layer, best[:-1], best[-1])


def _ridge_solution(fit: _Normal, start: np.ndarray, lam: float) -> np.ndarray | None:
    gram = fit.gram + lam * np.eye(len(fit.gram))
    rhs = fit.cross + lam * start
    try:
        solution = np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        if lam > 0:
            return None
        solution = np.linalg.lstsq(gram, rhs, rcond=None)[0]  # singular: the minimum-norm least squares
    return solution if np.all(np.isfinite(solution)) else None


def _one_blas_thread():
    """Multi-threaded OpenBLAS factorizations measured 6x (d = 3241) to 200x (d = 289) slower than
    single-threaded ones on the 2 busy cores here; the products that fill X^T X keep all threads."""
    return threadpool_limits(1) if threadpool_limits is not None else contextlib.nullcontext()

"""Per-group pruning ratios from measured sensitivity: allocation "sensitivity" of prune-channels.

A uniform ratio takes as much from a layer the output hardly notices as from one it depends on.
Here each group's least important channels are switched off alone, at a few ratios, and the model's
output error on calibration samples is measured; the MACs to remove are then taken where they cost
the least error per MAC (greedy on the measured curves, linear between the measured ratios), as
NNCF and AIMET allocate per-layer ratios.

Measuring is cheap: one copy of the model gets a gate (a per-channel multiplier fed as an input) in
front of every layer that reads prunable channels, so a single ONNX Runtime session measures every
candidate; a zero gate is exactly what pruning the channel without recovery does to that reader.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..analysis.channels import ChannelGraph, Sink
from ..calibration import Calibration, model_batches
from ..model import load
from .. import runtime

#: Ratios of each group's prunable channels measured (0 is the unpruned model, error 0).
MEASURED_RATIOS = (0.25, 0.5, 0.75)
#: Calibration samples the curves are measured on (the first ones).
SAMPLES = 32
GATE_PREFIX = "__prune_gate__"


@dataclass(frozen=True)
class Curve:
    """One group's removal order (least important first), the MACs each removal saves, and the
    measured output error after removing the first `counts[i]` of them."""

    order: tuple[int, ...]
    macs: tuple[float, ...]  # per class in `order`
    counts: tuple[int, ...]  # 0 first
    errors: tuple[float, ...]  # relative output error (noise / signal power), 0 first

    def error_at(self, k: int) -> float:
        return float(np.interp(k, self.counts, self.errors))


def measure_curves(model: ir.Model, graph: ChannelGraph, candidates: Mapping[int, Sequence[int]],
                   calibration: Calibration, *, limits: Mapping[int, int], macs: Mapping[int, float],
                   round_to: int, samples: int = SAMPLES) -> dict[int, Curve]:
    """Per prunable group id: its Curve, measured with one gated session over `samples` samples.
    `candidates`: each group's prunable classes, least important first (PruneChannels._rank);
    `limits`: the most classes a group may lose; `macs`: MACs saved per class."""
    from .prune import _round_removal

    plans: dict[int, tuple[list[int], list[int]]] = {}
    for g in graph.groups:
        order = list(candidates[g.id])
        counts = sorted({min(_round_removal(len(g.classes), int(math.floor(r * len(g.classes))), round_to),
                             limits[g.id], len(order)) for r in MEASURED_RATIOS} - {0})
        if order and counts:
            plans[g.id] = (order, counts)
    if not plans:
        return {}
    every = {c for order, counts in plans.values() for c in order[:max(counts)]}
    sinks = graph.sinks(every)
    values = {v.name: v for n in model.graph for v in n.inputs if v is not None}
    gated, gates = _gated_copy(model, sinks, {s.input: len(graph.shape(values[s.input])) for s in sinks})
    session = runtime.session(gated)
    data = calibration.samples(0, min(samples, calibration.num_samples))
    feeds = model_batches(model, data)
    open_gates = {name: np.ones(shape, dtype) for name, (shape, dtype) in gates.items()}
    reference = [session.run(None, {**f, **open_gates}) for f in feeds]
    curves = {}
    for gid, (order, counts) in plans.items():
        errors = [0.0]
        for k in counts:
            closed = dict(open_gates)
            for sink in graph.sinks(order[:k]):
                name = GATE_PREFIX + sink.node
                closed[name] = sink.keep.astype(gates[name][1]).reshape(gates[name][0])
            got = [session.run(None, {**f, **closed}) for f in feeds]
            errors.append(_relative_error(reference, got))
        curves[gid] = Curve(tuple(order), tuple(float(macs.get(c, 0.0)) for c in order), (0, *counts), tuple(errors))
    return curves


def allocate(curves: Mapping[int, Curve], saving: float, step: int) -> dict[int, int]:
    """Classes to remove per group: `step` classes at a time from the group whose next step costs
    the least measured error per MAC saved, until `saving` MACs are saved or nothing is left."""
    taken = {gid: 0 for gid in curves}
    saved = 0.0
    while saved < saving:
        best, best_cost = None, math.inf
        for gid, curve in curves.items():
            k = taken[gid]
            nxt = min(k + step, curve.counts[-1])
            if nxt <= k:
                continue
            gain = sum(curve.macs[k:nxt])
            cost = (curve.error_at(nxt) - curve.error_at(k)) / max(gain, 1e-12)
            if cost < best_cost:
                best, best_cost = gid, cost
        if best is None:
            break
        k = taken[best]
        nxt = min(k + step, curves[best].counts[-1])
        saved += sum(curves[best].macs[k:nxt])
        taken[best] = nxt
    return taken


def class_macs(graph: ChannelGraph, node_macs: Mapping[str, int]) -> dict[int, float]:
    """MACs one class's removal saves, approximately: for every weight slice it appears in, the
    layer's MACs divided by the positions along the sliced axis (activation contractions left out)."""
    saved: dict[int, float] = {}
    for s in graph.slices:
        if s.role not in ("in", "out") or not node_macs.get(s.node):
            continue
        share = node_macs[s.node] / len(s.atoms)
        for root in graph.class_of(s.atoms).ravel().tolist():
            saved[int(root)] = saved.get(int(root), 0.0) + share
    return saved


def _gated_copy(model: ir.Model, sinks: Sequence[Sink], ranks: Mapping[str, int]
                ) -> tuple[ir.Model, dict[str, tuple[tuple[int, ...], np.dtype]]]:
    """A copy of `model` whose sink layers read their input through Mul(input, gate), each gate a
    new graph input shaped to broadcast along the input's channel axis; gate name -> (shape, dtype)."""
    gated = load(model)
    nodes = {n.name: n for n in gated.graph}
    gates: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for sink in sinks:
        node = nodes[sink.node]
        index = next(i for i, v in enumerate(node.inputs) if v is not None and v.name == sink.input)
        value = node.inputs[index]
        rank = ranks[sink.input]
        shape = (len(sink.keep),) + (1,) * (rank - 1 - sink.input_axis)
        elem = value.dtype or gated.graph.initializers[sink.weight].dtype  # a layer's input is its weight's type
        dtype = elem.numpy()
        gate = ir.Value(name=GATE_PREFIX + sink.node, type=ir.TensorType(elem), shape=ir.Shape(shape))
        gated.graph.inputs.append(gate)
        mul = ir.node("Mul", [value, gate], name=f"{GATE_PREFIX}{sink.node}/Mul")
        mul.outputs[0].name = f"{GATE_PREFIX}{sink.node}/out"
        mul.outputs[0].dtype = elem
        gated.graph.insert_before(node, mul)
        node.replace_input_with(index, mul.outputs[0])
        gates[gate.name] = (shape, dtype)
    return gated, gates


def _relative_error(reference: Sequence[Sequence[np.ndarray]], got: Sequence[Sequence[np.ndarray]]) -> float:
    """Noise power over signal power, summed over samples, averaged over the float outputs."""
    errors = []
    for k in range(len(reference[0])):
        if not np.issubdtype(np.asarray(reference[0][k]).dtype, np.floating):
            continue
        ref = [np.asarray(r[k], np.float64) for r in reference]
        signal = sum(float(np.sum(r * r)) for r in ref)
        noise = sum(float(np.sum((np.asarray(g[k], np.float64) - r) ** 2)) for r, g in zip(ref, got))
        errors.append(noise / signal if signal > 0 else (0.0 if noise == 0 else math.inf))
    return float(np.mean(errors)) if errors else 0.0

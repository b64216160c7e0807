"""Latency-aware factorization: each chosen layer timed on the target provider as a one-layer model
against its two-layer replacement, once per distinct (layer shape, form, rank)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np
import onnx_ir as ir

from ...analysis.layer_timing import PairTiming
from ...model import load
from .candidates import Candidate
from .forms import matrix
from .layers import Layer
from .ranks import allocate_budget
from .rewrite import Names, add_initializer, rewrite

#: Latency-aware budget allocation: rounds of (allocate, time, exclude the slower) at most.
LATENCY_ROUNDS = 4
#: measure(original, factorized, provider=, threads=) -> PairTiming (Factorize passes its measure_layer).
Measure = Callable[..., PairTiming]


def layer_models(layer: Layer, form: str, rank: int, model: ir.Model) -> tuple[ir.Model, ir.Model]:
    """The layer on its own at its input shape (with its bias Add, for MatMul), and the same with its
    rank-`rank` replacement in `form` as `rewrite` writes it. The factors are random: a dense kernel's
    time does not depend on the values."""
    node = layer.node
    x = ir.Value(name="x", shape=ir.Shape(layer.x_shape), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], name="layer", opset_imports=dict(model.opset_imports))
    original = ir.Model(graph, ir_version=model.ir_version)
    names = Names(original)
    inputs: list[ir.Value | None] = [x]
    for value in node.inputs[1:]:
        inputs.append(None if value is None else add_initializer(original, names, "w", value.const_value.numpy()))
    attrs = {a.name: ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()}
    copy = ir.node(node.op_type, inputs, attributes=attrs, name=node.name or "layer")
    graph.append(copy)
    add = None
    if layer.bias_add is not None:
        slot = 1 if layer.bias_add.inputs[0] is node.outputs[0] else 0
        bias = add_initializer(original, names, "b", layer.bias_add.inputs[slot].const_value.numpy())
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


class LatencyJudge:
    """Times factorizations against their layers, once per distinct (layer shape, form, rank)."""

    def __init__(
        self, model: ir.Model, provider: str, threads: int | None, min_speedup: float, measure: Measure,
    ) -> None:
        self.model, self.provider, self.threads, self.min_speedup = model, provider, threads, min_speedup
        self.measure = measure  # the pass's measure_layer, looked up when the pass runs (tests replace it)
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
            self.cache[key] = self.measure(original, factorized, provider=self.provider, threads=self.threads)
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
            chosen, _ = allocate_budget(layers, allowed, round_to, budget, total)
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

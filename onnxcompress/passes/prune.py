"""PruneChannels: structured channel (filter) pruning over coupled channel groups.

The channel graph (analysis/channels.py) says which channels must go together; this pass ranks the
prunable units of every group, decides how many to remove (uniform ratio, global ranking, or a MAC
target), and slices them out physically. Removed channel indices are recorded per group so anyone
can check the result against the original with those channels masked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from ..analysis.channels import ChannelGraph, prepare
from ..errors import OnnxCompressError
from ..model import load
from ..pipeline import Pass, PassContext, PassResult, option


@dataclass
class PruneChannels(Pass):
    """Remove the least important channels of every prunable group."""

    name: ClassVar[str] = "prune-channels"
    exact: ClassVar[bool] = False

    ratio: float = option(0.3, "Prune this fraction of every channel group (of all channels with allocation: global).")
    allocation: Literal["uniform", "global", "sensitivity"] = option(
        "uniform", "How the channels to remove are spread over the groups: uniform (the ratio of every group), global "
                   "(one ranking across groups) or sensitivity (the MACs the uniform ratio removes, taken where the "
                   "output error measured on calibration data per MAC saved is least; needs calibration data).")
    importance: Literal["l2", "l1", "bn", "activation", "output", "apoz", "random"] = option(
        "l2", "Channel importance: l2, l1, bn, activation, output (rms activation x the reading weights), apoz "
              "(the last three need calibration data) or random.")
    target_macs: float | None = None  # keep this fraction of the MACs; overrides `ratio`
    max_group_ratio: float = 0.8  # never remove more than this fraction of one group
    round_to: int = option(8, "Kept channel counts are multiples of this (ORT CPU kernels pad to blocks).")
    protect: tuple[str, ...] = ()  # node names whose output channels are never pruned
    seed: int = 0  # for importance "random"
    calibration_samples: int = 256  # samples used for activation statistics and recovery
    # Training-free recovery when calibration data is given: "bias" compensates each consumer's bias
    # with the removed channels' mean activation; "refit" also refits the consumers' weights by ridge
    # least squares to the original model's outputs (held-out samples choose the ridge strength).
    recover: Literal["none", "bias", "refit"] = "refit"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.target_macs is not None and not 0.0 < self.target_macs <= 1.0:
            raise ValueError(f"target_macs must be in (0, 1], got {self.target_macs}")
        if not 0.0 < self.max_group_ratio < 1.0:
            raise ValueError(f"max_group_ratio must be in (0, 1), got {self.max_group_ratio}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        prepare(model)
        graph = ChannelGraph.build(model, ctx.input_shapes)
        notes: list[str] = []
        stats = None
        if self.importance in ("activation", "output", "apoz"):
            if ctx.calibration is None:
                raise OnnxCompressError(f"importance '{self.importance}' needs calibration data (--calib)")
            stats = ctx.statistics.gather(model, self.requests(model, graph, ctx.calibration))[0].channels
            if ctx.calibration.is_random:
                notes.append("activation importance measured on random data")
        scores = self._scores(graph, stats)
        if self.importance == "bn" and not _bn_scores(graph):
            notes.append("importance 'bn': no BatchNormalization left (fold-batchnorm folds them); used l2")
        protected = self._protected(graph)
        self._curves = None
        if self.allocation == "sensitivity":
            self._curves = self._sensitivity(model, graph, self._rank(graph, scores, protected).candidates, ctx)
        if self.target_macs is not None:
            ratio, removed = self._search_target(model, graph, scores, protected, ctx)
        else:
            ratio, removed = self.ratio, self._decide(graph, scores, protected, self.ratio)
        records = _group_records(graph, removed)
        blocked = sum(len(g.frozen) for g in graph.groups)
        total = sum(len(g.classes) for g in graph.groups)
        details = {
            "ratio": ratio,
            "importance": self.importance,
            "allocation": self.allocation,
            "channels": total,
            "blocked_channels": blocked,
            "blocked_fraction": blocked / total if total else 0.0,
            "removed_units": len(removed),
            "groups": records,
            "blocked_reasons": sorted({g.frozen[c] for g in graph.groups for c in g.frozen}),
            "notes": notes,
        }
        if self._curves:  # what the allocation rested on: measured output error per group and count
            details["sensitivity"] = [{"group": gid, "counts": list(c.counts), "errors": list(c.errors)}
                                      for gid, c in self._curves.items()]
        recovery_inputs = None
        if removed and self.recover != "none" and ctx.calibration is not None:
            recovery_inputs = (load(model), graph.sinks(removed))  # the unpruned weights, before slicing
        if removed:
            graph.prune(removed)
        if recovery_inputs is not None:
            from .recover import recover

            original, sinks = recovery_inputs
            details["recovery"] = recover(original, model, sinks, ctx.calibration, mode=self.recover,
                                          samples=self.calibration_samples, seed=self.seed, statistics=ctx.statistics)
        changes = [f"group {r['id']} ({', '.join(r['sources'][:3])}): {r['channels']} -> {r['kept']} channels"
                   for r in records if r["removed"]]
        skipped = [f"group {r['id']} ({', '.join(r['sources'][:3])}): {r['frozen_reason']}"
                   for r in records if r["frozen_reason"] and not r["removed"]]
        skipped += _subgraph_layers(model)
        return self.result(model, changes=changes, skipped=skipped, details=details, modified=bool(removed))

    def requests(self, model: ir.Model, graph: ChannelGraph, calibration) -> list:
        """The activation statistics this pass reads of `model`, asked at once (one run): the sinks'
        inputs for importance and, for recovery, the same inputs' means on the samples it fits to."""
        from ..analysis.statistics import Request
        from .recover import BATCH_SIZE, fitting_part

        axes = graph.sink_inputs()
        requests = [Request(calibration, channels=axes, limit=self.calibration_samples)]
        fit = fitting_part(calibration, self.calibration_samples) if self.recover != "none" else None
        if fit is not None:
            requests.append(Request(fit, channels=axes, batch_size=BATCH_SIZE))
        return requests

    def requests_ahead(self, model: ir.Model, input_shapes, calibration) -> list:
        """What `run` will ask of this model state, for a run of the state that comes first (a search's
        int8 step on a candidate it prunes next); none when preparing the model changes its state."""
        from ..analysis.statistics import model_state

        if self.importance not in ("activation", "output", "apoz"):
            return []
        prepared = prepare(load(model))
        if model_state(prepared) != model_state(model):
            return []
        return self.requests(prepared, ChannelGraph.build(prepared, input_shapes), calibration)

    # ------------------------------------------------------------------ ranking and allocation

    def _scores(self, graph: ChannelGraph, stats=None) -> dict[int, float]:
        if stats is not None:
            return graph.activation_importance(stats, {"activation": "mean_abs"}.get(self.importance, self.importance))
        if self.importance == "random":
            rng = np.random.default_rng(self.seed)
            return {c: float(rng.random()) for g in graph.groups for c in g.classes}
        if self.importance == "bn":
            scores = _bn_scores(graph)
            if scores:
                return scores
        return graph.importance("l1" if self.importance == "l1" else "l2")

    def _protected(self, graph: ChannelGraph) -> set[int]:
        if not self.protect:
            return set()
        names = set(self.protect)
        return {c for g in graph.groups if names & set(g.sources) for c in g.classes}

    def _decide(self, graph: ChannelGraph, scores: Mapping[int, float], protected: set[int], ratio: float,
                ranking: _Ranking | None = None) -> set[int]:
        """Classes to remove: per group, the `ratio` least important (uniform), or the least important
        across all groups after normalizing each group's scores by its mean (global). `ranking` is
        `_rank`'s result for the same arguments, passed when deciding for many ratios."""
        ranking = ranking or self._rank(graph, scores, protected)
        candidates = ranking.candidates
        quota: dict[int, int] = {}
        if self.allocation == "sensitivity":
            return keep_every_value_nonempty(graph, self._allocated(graph, candidates, ratio), scores)
        if self.allocation == "uniform":
            for g in graph.groups:
                quota[g.id] = int(math.floor(ratio * len(g.classes)))
        else:
            budget = int(math.floor(ratio * sum(len(g.classes) for g in graph.groups)))
            counts: dict[int, int] = {g.id: 0 for g in graph.groups}
            limit = self._limits(graph)
            for _, gid in ranking.across_groups:
                if budget <= 0:
                    break
                if counts[gid] < limit[gid]:
                    counts[gid] += 1
                    budget -= 1
            quota = counts
        removed: set[int] = set()
        for g in graph.groups:
            removed.update(candidates[g.id][:self._removal_count(g, quota.get(g.id, 0), candidates[g.id])])
        return keep_every_value_nonempty(graph, removed, scores)

    def _limits(self, graph: ChannelGraph) -> dict[int, int]:
        """The most classes each group may lose (`max_group_ratio`)."""
        return {g.id: int(self.max_group_ratio * len(g.classes)) for g in graph.groups}

    def _removal_count(self, group, quota: int, candidates: Sequence[int]) -> int:
        """How many of a group's candidates go for a quota: capped by `max_group_ratio` and the
        candidates, then rounded so the kept count is a multiple of `round_to`."""
        n = len(group.classes)
        return _round_removal(n, min(quota, int(self.max_group_ratio * n), len(candidates)), self.round_to)

    def _sensitivity(self, model, graph, candidates, ctx):
        """Measured error curves per group (prune_sensitivity), with the MACs each class saves."""
        if ctx.calibration is None:
            raise OnnxCompressError("allocation 'sensitivity' needs calibration data (--calib)")
        from ..analysis.cost import analyze_cost
        from .prune_sensitivity import class_macs, measure_curves

        node_macs = {n.name: n.macs for n in analyze_cost(model, ctx.input_shapes).nodes}
        return measure_curves(model, graph, candidates, ctx.calibration, limits=self._limits(graph),
                              macs=class_macs(graph, node_macs), round_to=self.round_to)

    def _allocated(self, graph: ChannelGraph, candidates: Mapping[int, list[int]], ratio: float) -> set[int]:
        """The classes the sensitivity curves remove for the MACs a uniform `ratio` would save."""
        from .prune_sensitivity import allocate

        curves = self._curves or {}
        groups = {g.id: g for g in graph.groups}
        saving = sum(sum(curve.macs[:self._removal_count(groups[gid], int(math.floor(ratio * len(groups[gid].classes))),
                                                         candidates[gid])])
                     for gid, curve in curves.items())
        taken = allocate(curves, saving, max(1, self.round_to))
        return {c for gid, k in taken.items()
                for c in curves[gid].order[:_round_removal(len(groups[gid].classes), k, self.round_to)]}

    def _rank(self, graph: ChannelGraph, scores: Mapping[int, float], protected: set[int]) -> _Ranking:
        """Each group's prunable classes, least important first, and (global allocation) all of them
        ranked by score relative to their group's mean: the part of a decision no ratio changes."""
        candidates = {g.id: sorted((c for c in g.prunable if c not in protected), key=lambda c: scores.get(c, 0.0))
                      for g in graph.groups}
        ranked = []
        if self.allocation == "global":
            for g in graph.groups:
                values = [scores.get(c, 0.0) for c in g.classes]
                mean = float(np.mean(values)) if values and np.mean(values) > 0 else 1.0
                ranked += [(scores.get(c, 0.0) / mean, g.id) for c in candidates[g.id]]
            ranked.sort()
        return _Ranking(candidates, ranked)

    def _search_target(self, model, graph, scores, protected, ctx) -> tuple[float, set[int]]:
        """The smallest uniform/global ratio whose pruned model keeps at most `target_macs` of the MACs,
        by bisection (class ids are deterministic for the same model)."""
        estimate = _pruned_macs(graph, ctx.input_shapes)
        if estimate is not None:
            base = estimate.macs(())
            macs_of = estimate.macs
        else:
            base, macs_of = _trial_macs(model, ctx.input_shapes)
        ranking = self._rank(graph, scores, protected)
        cache: dict[float, tuple[float, set[int]]] = {}

        def macs_at(ratio: float) -> tuple[float, set[int]]:
            if ratio not in cache:
                removed = self._decide(graph, scores, protected, ratio, ranking)
                cache[ratio] = (macs_of(removed) / base, removed)
            return cache[ratio]

        lo, hi = 0.0, self.max_group_ratio - 1e-9
        if macs_at(hi)[0] > self.target_macs:
            return hi, macs_at(hi)[1]  # the target is out of reach; prune as far as allowed
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            if macs_at(mid)[0] <= self.target_macs:
                hi = mid
            else:
                lo = mid
        return hi, macs_at(hi)[1]


@dataclass(frozen=True)
class _Ranking:
    candidates: dict[int, list[int]]  # group id -> its prunable, unprotected classes, least important first
    across_groups: list[tuple[float, int]]  # (relative score, group id) of every candidate, ascending; global only


#: Halvings of the ratio interval when searching for a MAC target (the last step moves it by 0.8 / 4096).
BISECTION_STEPS = 12


def _pruned_macs(graph: ChannelGraph, input_shapes):
    """MACs of decisions computed from the channel graph (analysis/pruned_macs.py), at the input
    shapes the costing uses; None where only pruning a copy gives them exactly."""
    from ..analysis.pruned_macs import PrunedMacs
    from ..analysis.shapes import infer_shapes

    wanted = {name: tuple(shape) for name, shape in (input_shapes or {}).items()}
    shapes = graph.shapes if graph.shapes_at == wanted else infer_shapes(graph.model, input_shapes)
    return PrunedMacs.of(graph, shapes)


def _trial_macs(model: ir.Model, input_shapes):
    """(MACs of `model`, MACs of a decision): the decision applied to a copy, which is then costed."""
    from ..analysis.cost import analyze_cost

    def macs_of(removed: set[int]) -> int:
        trial = load(model)
        ChannelGraph.build(trial, input_shapes).prune(removed)
        return analyze_cost(trial, input_shapes).stats.macs

    return analyze_cost(model, input_shapes).stats.macs, macs_of


def keep_every_value_nonempty(graph: ChannelGraph, removed: set[int], scores: Mapping[int, float]) -> set[int]:
    """Give back, for each value that would lose all its channels, its most important class (a split
    branch or a concat input can be emptied while its group keeps channels elsewhere)."""
    removed = set(removed)
    while True:
        emptied = graph.emptied(removed)
        if not emptied:
            return removed
        for name in emptied:
            roots = set(graph.class_of(graph.layouts[name].atoms).ravel().tolist()) & removed
            if roots:
                removed.discard(max(roots, key=lambda c: scores.get(c, 0.0)))


def _round_removal(n: int, k: int, round_to: int) -> int:
    """Adjust a removal count so the kept count is a multiple of `round_to` (never below round_to)."""
    if round_to <= 1 or k <= 0 or n <= round_to:
        return max(k, 0)
    kept = n - k
    kept = max(round_to, int(math.ceil(kept / round_to)) * round_to)
    return max(0, n - kept)


def _bn_scores(graph: ChannelGraph) -> dict[int, float]:
    """|gamma| of BatchNormalization layers, summed per class (empty when the model has no BN)."""
    gammas = {n.inputs[1].name for n in graph.model.graph if n.op_type == "BatchNormalization"}
    scores: dict[int, float] = {}
    for s in graph.slices:
        if s.value.name in gammas and s.value.const_value is not None:
            for root, value in zip(graph.class_of(s.atoms), np.abs(s.value.const_value.numpy()).ravel()):
                scores[int(root)] = scores.get(int(root), 0.0) + float(value)
    return scores


def _group_records(graph: ChannelGraph, removed: set[int]) -> list[dict]:
    """Per group: its sources, channel counts, the removed channel indices of its first source."""
    records = []
    first_atoms = {}
    for name, atoms in graph.sources:
        first_atoms.setdefault(name, atoms)
    for g in graph.groups:
        atoms = first_atoms[g.sources[0]]
        roots = graph.class_of(atoms)
        gone = np.flatnonzero(np.isin(roots, list(removed))) if removed else np.array([], int)
        records.append({
            "id": g.id,
            "sources": g.sources,
            "channels": g.channels,
            "kept": g.channels - len(gone),
            "units": len(g.classes),
            "prunable_units": len(g.prunable),
            "frozen_units": len(g.frozen),
            "removed": [int(i) for i in gone],
            "frozen_reason": next(iter(g.frozen.values()), None) if len(g.frozen) == len(g.classes) else None,
        })
    return records


def _subgraph_layers(model: ir.Model) -> list[str]:
    """Layers inside If/Loop/Scan bodies: the channel graph covers the main graph only (and blocks the
    channels a body reads from it)."""
    from ..analysis.cost import inner_nodes

    return [f"{name}: {node.op_type} inside the {top.op_type} '{top.name}' body: subgraph layers are not pruned"
            for name, node, top in inner_nodes(model) if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]

"""Tolerance-driven search: the most compressed model whose outputs stay within a tolerance.

Adaptive pruning under an error bound, done iteratively: the model is pruned a step at a time
(each step from the last accepted model, with least-squares recovery), every candidate is finished
by the same closing passes (int8) and measured on calibration samples that no pass ever fitted
to. The search steps down a grid of MAC levels until a candidate falls outside the tolerance or the
target is reached, then bisects between the last accepted and the first rejected level. The model
returned is always one that was measured and accepted: a point on the reported curve.

Activation importance ranks the channels of every group on the calibration data and recovery
refits each consumer; the search decides how far that can go. When even the unpruned int8 model is
outside the tolerance, int8 first keeps its most sensitive layers in float (its tolerance mode,
where available), and failing that is dropped, so the exact cleaned model is the floor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from .analysis.statistics import Statistics
from .calibration import SAMPLE_SOURCE_KEY, Calibration, fed_sources, model_batches
from .errors import OnnxCompressError
from .interval import accepted, bootstrap_interval
from .model import ModelLike, load, resolve_input_shapes
from .pipeline import Pipeline, build_pass
from .report import Fidelity, ModelStats, PassRecord, RunReport
from .tolerance import Tolerance
from .verify import VerifyOptions, compare, outputs, reference_outputs

#: Fractions of the cleaned model's MACs the pruning steps aim to keep, in order.
DEFAULT_LEVELS: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)
#: Calibration samples held out from every fitting pass; the search measures candidates on them.
HOLDOUT = 0.25
#: Bisection steps between the last accepted and the first rejected level.
REFINE_STEPS = 3
#: A pruning step that removes less than this share of the MACs means pruning cannot go further.
MIN_PROGRESS = 0.005

Evaluate = Callable[[ir.Model], float]  # user metric, higher is better (e.g. accuracy on labelled data)


@dataclass(frozen=True)
class SearchPoint:
    """One measured candidate: how compressed it is and how far its outputs moved."""

    level: float  # fraction of the cleaned model's MACs the pruning aimed to keep (1.0: no pruning)
    macs_ratio: float  # candidate MACs / original MACs
    params_ratio: float
    value: float  # the tolerance metric (a drop, or SQNR in dB) or, with `evaluate`, the score's drop
    accepted: bool
    fidelity: Fidelity
    speedup: float | None = None  # measured ORT latency ratio original / candidate, when asked for
    note: str = ""
    # bootstrap interval of `value` over the judging samples (interval.py); accepted needs its
    # pessimistic end within the tolerance too. None with a user metric or a single sample.
    interval: tuple[float, float] | None = None


@dataclass(frozen=True)
class SearchResult:
    model: ir.Model
    report: RunReport
    points: tuple[SearchPoint, ...]
    chosen: int  # index of the returned model's point in `points`
    met: bool  # the returned model is within the tolerance on the held-out samples
    target_met: bool | None  # None when no target was given

    @property
    def chosen_point(self) -> SearchPoint:
        return self.points[self.chosen]


@dataclass
class SearchOptions:
    tolerance: Tolerance = field(default_factory=Tolerance)
    prune: Mapping[str, Any] = field(default_factory=dict)  # prune-channels options (target_macs is the search's)
    cleanup: Sequence[str] = ("fold-constants", "fold-batchnorm", "eliminate-noops")
    finish: Sequence[Mapping[str, Any]] = ()  # passes applied to every candidate, e.g. [{"type": "quantize-int8"}]
    # recovery passes (distill), run once on the pruned frontier candidate with the input model as
    # teacher, and judged by what they recover; never dropped with the closing passes
    recover: Sequence[Mapping[str, Any]] = ()
    target_macs: float | None = None  # stop once the candidate keeps at most this fraction of the MACs
    target_speedup: float | None = None  # stop once the candidate is measured this much faster on ORT CPU
    levels: Sequence[float] = DEFAULT_LEVELS
    refine_steps: int = REFINE_STEPS
    holdout: float = HOLDOUT
    bench_runs: int = 30  # timed runs per model when target_speedup or finish_must_be_faster asks for measurements
    finish_must_be_faster: bool = False  # time the closing passes on ORT CPU and drop them if they slow the model
    # without a target, choose among the accepted candidates (int8 alone and the most pruned few)
    # the one measured fastest on ORT CPU, not the one with the fewest MACs
    rank_by_speed: bool = False
    threads: int | None = None  # intra-op threads for every timing (None: the physical cores)
    timing_shapes: Mapping[str, Sequence[int]] | None = None  # input shapes timings run at (None: the search's)
    # checker + ORT load + exactness after every pass of every candidate (--no-verify: off; the
    # candidates are still judged on held-out samples)
    verify: bool = True

    def __post_init__(self) -> None:
        check_targets(self.target_macs, self.target_speedup)
        if not 0.0 < self.holdout < 1.0:
            raise OnnxCompressError(f"holdout must be a fraction in (0, 1), got {self.holdout}")


def check_targets(target_macs: float | None, target_speedup: float | None) -> None:
    """The targets are meaningful: a MAC fraction in (0, 1], a finite speedup > 0."""
    if target_macs is not None and not 0.0 < target_macs <= 1.0:
        raise OnnxCompressError(f"target MACs must be a fraction in (0, 1], got {target_macs}")
    if target_speedup is not None and not 0 < target_speedup < math.inf:
        raise OnnxCompressError(f"target speedup must be a finite number > 0, got {target_speedup}")


def search(
    model: ModelLike,
    calibration: Calibration | Mapping[str, np.ndarray],
    options: SearchOptions | None = None,
    *,
    evaluate: Evaluate | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    on_step: Callable[[str], None] | None = None,
    on_point: Callable[[SearchPoint, ir.Model], None] | None = None,
    validation: Calibration | Mapping[str, np.ndarray] | None = None,
) -> SearchResult:
    """The most compressed model within `options.tolerance` (or within `tolerance.bound` of
    `evaluate(original)` when a user metric is given), measured on held-out calibration samples, or
    on `validation` (the user's own evaluation data: then every calibration sample is for fitting).
    `on_point(point, model)` sees every measured candidate."""
    run = _Search(model, calibration, options or SearchOptions(), evaluate, input_shapes, on_step, on_point, validation)
    first = run.settle_closing_passes()
    if first.accepted and not run.reached(first):
        rejected = run.step_down()
        run.refine(rejected)
    recovery = run.recover() if run.options.recover else None
    return run.result(recovery)


def _judging_data(original: ir.Model, calibration, validation, holdout: float) -> tuple[Calibration, Calibration, Calibration, str]:
    """(all calibration data, the samples passes fit to, the samples candidates are judged on, a note
    saying which those are)."""
    if not isinstance(calibration, Calibration):
        calibration = Calibration.from_arrays(original, calibration)
    if validation is not None and not isinstance(validation, Calibration):
        validation = Calibration.from_arrays(original, validation, source="evaluation data")
    if validation is None:
        fit, held = calibration.split(holdout)
        return calibration, fit, held, (f"candidates measured on {held.num_samples} held-out calibration samples that "
                                        "no pass fitted to" + _source_note(calibration, held))
    # held-out crops of the calibration sources overstate fidelity on other data: the user's own set judges
    return calibration, calibration, validation, (
        f"candidates measured on {validation.num_samples} samples of the evaluation data ({validation.source}); "
        f"all {calibration.num_samples} calibration samples were for fitting")


def _data_notes(calibration: Calibration, held: Calibration, tolerance: Tolerance, evaluate: Evaluate | None) -> list[str]:
    """Caveats about the judging data: a top-1 drop coarser than the bound, random calibration data."""
    notes = []
    if tolerance.metric == "top1" and evaluate is None:
        step_size = 1 / held.num_samples
        notes.append(f"top-1 drop on {held.num_samples} judging samples moves in steps of {step_size:.3g}"
                     + (f", coarser than the bound {tolerance.bound:g}: only candidates that change no held-out "
                        "prediction pass, and accuracy on new data can still drop; give more calibration data, or "
                        "use cosine" if step_size > tolerance.bound else ""))
    if calibration.is_random:
        notes.append("calibration data is random: the fidelity says nothing about real inputs")
    return notes


def _pass_names(specs: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(str(s.get("type")) for s in specs)


class _Search:
    """One search: the cleaned model, the judge, every measured candidate, and the accepted frontier
    (the last accepted float model, its level and the pass records that made it)."""

    def __init__(self, model: ModelLike, calibration, options: SearchOptions, evaluate: Evaluate | None,
                 input_shapes, on_step, on_point, validation) -> None:
        self.options, self.evaluate, self.on_point = options, evaluate, on_point
        self.input_name = str(model) if isinstance(model, str) else type(model).__name__
        self.original = load(model)
        self.shapes = resolve_input_shapes(self.original, input_shapes)
        calibration, self.fit, self.held, judged_on = _judging_data(self.original, calibration, validation, options.holdout)
        self.judge = _Judge(self.original, self.held, options.tolerance, evaluate)
        self.step = on_step or (lambda _: None)
        self.notes = [judged_on, *_data_notes(calibration, self.held, options.tolerance, evaluate)]

        self.step("cleanup")
        self.checks = VerifyOptions(enabled=options.verify)
        self.statistics = Statistics()  # every candidate's calibration statistics: one run per model state
        pruning = build_pass(_prune_spec(options.prune, 1.0))
        # the int8 step's run on a candidate also serves the prune that may follow it
        self.statistics.ahead.append(lambda m: pruning.requests_ahead(m, self.shapes, self.fit))
        self.cleaned = Pipeline([build_pass(name) for name in options.cleanup], verify=self.checks).run(
            self.original, calibration=self.fit, input_shapes=self.shapes, statistics=self.statistics)
        self.base_macs = max(self.cleaned.report.after.macs, 1)
        self.original_stats = self.cleaned.report.before
        self.finish = [dict(spec) for spec in options.finish]  # the closing passes as currently decided
        self.closing: dict[str, Any] = {}

        self.points: list[SearchPoint] = []
        self.models: list[tuple[ir.Model, list[PassRecord], ModelStats]] = []  # per point: final model, its records, stats
        self.floats: list[tuple[ir.Model, list[PassRecord]]] = []  # per point: the float model before the closing passes, its chain
        self.accepted_float, self.accepted_level, self.accepted_chain = self.cleaned.model, 1.0, []

    # ------------------------------------------------------------------ measuring candidates

    def finished(self, float_model: ir.Model) -> tuple[ir.Model, list[PassRecord]]:
        if not self.finish:
            return float_model, []
        run = Pipeline([build_pass(spec) for spec in self.finish], verify=self.checks).run(
            float_model, calibration=self.fit, input_shapes=self.shapes,
            on_pass=lambda name: self.step(f"{name} on the candidate"), statistics=self.statistics)
        return run.model, list(run.report.passes)

    def timed(self, baseline: ir.Model, candidate: ir.Model) -> float:
        o = self.options
        return _speedup(baseline, candidate, o.timing_shapes or self.shapes, o.bench_runs, o.threads)

    def measure(self, float_model: ir.Model, level: float, chain: list[PassRecord], note: str = "") -> SearchPoint:
        final, records = self.finished(float_model)
        records = [*self.cleaned.report.passes, *chain, *records]
        stats = records[-1].after if records else self.cleaned.report.after  # every pass record has the stats after it
        fidelity, value, accepted, interval = self.judge(final)
        point = SearchPoint(
            level=level, macs_ratio=stats.macs / max(self.original_stats.macs, 1),
            params_ratio=stats.params / max(self.original_stats.params, 1), value=value, accepted=accepted,
            fidelity=fidelity, note=note, interval=interval,
        )
        if accepted and self.options.target_speedup is not None:
            point = dataclasses.replace(point, speedup=self.timed(self.original, final))
        self.points.append(point)
        self.models.append((final, records, stats))
        self.floats.append((float_model, chain))
        shown = f"metric value {value:.4g}" if self.evaluate is not None else self.options.tolerance.format_value(fidelity)
        self.step(f"level {level:.3f}: {'accepted' if accepted else 'rejected'} ({shown})")
        if self.on_point:  # e.g. a benchmark scoring every candidate on labelled data
            self.on_point(point, final)
        return point

    def reached(self, point: SearchPoint) -> bool:
        if self.options.target_speedup is not None:
            return point.speedup is not None and point.speedup >= self.options.target_speedup
        if self.options.target_macs is not None:
            return point.macs_ratio <= self.options.target_macs * (1 + 1e-6)
        return False

    # ------------------------------------------------------------------ level 1: the closing passes alone

    def settle_closing_passes(self) -> SearchPoint:
        """Measure level 1 (no pruning). If the closing passes alone break the tolerance, soften them,
        then drop them; with finish_must_be_faster, drop them where they measure slower than float.
        Returns the level-1 point that stands."""
        first = self.measure(self.cleaned.model, 1.0, [])
        self.closing = {"passes": [str(s.get("type")) for s in self.finish], "outcome": "kept" if self.finish else "none",
                        "value": first.value if self.finish else None, "speedup_over_float": None}
        if not first.accepted and self.finish:
            first = self._soften_or_drop_closing(first)
        if first.accepted and self.finish and self.options.finish_must_be_faster:
            first = self._drop_closing_if_slower(first)
        if first.accepted and self.finish:
            # Pruned candidates keep the layers int8 kept in float at level 1 rather than measuring every
            # layer's sensitivity again (the same network, thinner): one decision, a fraction of the time.
            self.finish = _fixed_mixed_precision(self.finish, self.models[-1][1])
        return first

    def _soften_or_drop_closing(self, first: SearchPoint) -> SearchPoint:
        softened = _with_fallback(self.finish, self.options.tolerance) if self.evaluate is None else None
        if softened is not None:
            self.finish = softened
            first = self.measure(self.cleaned.model, 1.0, [], note="int8 keeps its most sensitive layers in float")
            self.closing["outcome"], self.closing["softened_value"] = "softened", first.value
        if not first.accepted:
            self.closing["outcome"] = "dropped: outside the tolerance"
            self.finish = []
            first = self.measure(self.cleaned.model, 1.0, [], note="closing passes dropped: they alone exceed the tolerance")
            self.notes.append(f"the closing passes ({_pass_names(self.options.finish)}) alone exceed the tolerance and were dropped")
        return first

    def _drop_closing_if_slower(self, first: SearchPoint) -> SearchPoint:
        # int8 pays only where ORT's int8 kernels beat float at this shape (small MatMuls at batch 1 may not).
        final, _, _ = self.models[-1]
        gain = self.timed(self.cleaned.model, final)
        self.closing["speedup_over_float"] = gain
        if gain is None or gain >= 1.0:
            return first
        names = _pass_names(self.finish)
        for_size = sorted({str(s.get("type")) for s in self.finish} & SIZE_PASSES)
        if for_size:  # their purpose is a smaller model, not a faster one
            self.closing["outcome"] = "kept: measured slower than float, but it is there for size"
            self.notes.append(f"the closing passes ({names}) measured {1 / gain:.2f}x slower than float on ORT CPU at "
                              f"this shape; kept: {', '.join(for_size)} is there for size")
            return first
        self.closing["outcome"] = "dropped: measured slower than float"
        self.notes.append(f"the closing passes ({names}) measured {1 / gain:.2f}x slower than float on ORT CPU at "
                          "this shape, so they were dropped")
        self.finish = []
        return self.measure(self.cleaned.model, 1.0, [], note="closing passes dropped: measured slower than float")

    # ------------------------------------------------------------------ pruning levels

    def _prune_towards(self, level: float) -> tuple[ir.Model, float, PassRecord] | None:
        o = self.options
        return _prune_step(self.accepted_float, self.accepted_level, level, o.prune, self.fit, self.shapes,
                           self.base_macs, o.verify, self.statistics)

    def _try(self, pruned: ir.Model, achieved: float, record: PassRecord) -> SearchPoint:
        """Measure a pruned candidate; an accepted one becomes the frontier the next step prunes from."""
        chain = [*self.accepted_chain, record]
        point = self.measure(pruned, achieved, chain)
        if point.accepted:
            self.accepted_float, self.accepted_level, self.accepted_chain = pruned, achieved, chain
        return point

    def step_down(self) -> float | None:
        """Step down the grid of levels, each step pruning the last accepted model, until a candidate
        is rejected (its level is returned) or the target is reached."""
        o = self.options
        floor = o.target_macs if o.target_speedup is None and o.target_macs is not None else 0.0
        levels = sorted({lv for lv in o.levels if floor < lv < 1.0} | ({floor} if floor > 0 else set()), reverse=True)
        stalled = False
        for level in levels:
            if level >= self.accepted_level:  # an earlier step overshot past this level
                continue
            self.step(f"pruning to {level:.3f} of the MACs")
            outcome = self._prune_towards(level)
            if outcome is None:  # too small a step for the channel granularity: try the next level
                stalled = True
                continue
            stalled = False
            point = self._try(*outcome)
            if not point.accepted:
                return point.level
            if self.reached(point):
                break
        if stalled:
            self.notes.append(f"pruning could not go below {self.accepted_level:.3f} of the MACs "
                              "(the remaining channels are blocked, protected or at max_group_ratio)")
        return None

    def refine(self, rejected: float | None) -> None:
        """Bisect between the last accepted level and the first rejected one."""
        lo = rejected
        for _ in range(self.options.refine_steps if lo is not None else 0):
            mid = (self.accepted_level + lo) / 2
            if self.accepted_level - mid < MIN_PROGRESS:
                break
            self.step(f"pruning to {mid:.3f} of the MACs")
            outcome = self._prune_towards(mid)
            if outcome is None:
                break
            if outcome[1] <= lo + MIN_PROGRESS:  # channel granularity: no level between the two exists
                break
            point = self._try(*outcome)
            if point.accepted and self.reached(point):
                break
            if not point.accepted:
                lo = point.level

    # ------------------------------------------------------------------ recovery and the result

    def recover(self) -> dict[str, Any] | None:
        """Run the recovery passes once on the pruned frontier candidate, the input model as teacher,
        and measure what they recover; the outcome for the report (None when nothing was pruned)."""
        names = _pass_names(self.options.recover)
        target = _recovery_target(self.points, self.reached)
        if target is None:
            self.notes.append(f"recovery ({names}) did not run: no pruned candidate to recover")
            return None
        float_model, chain = self.floats[target]
        before = self.points[target]
        self.step(f"recovering level {before.level:.3f} with {names}")
        try:
            run = Pipeline([build_pass(spec) for spec in self.options.recover], verify=self.checks).run(
                float_model, calibration=self.fit, input_shapes=self.shapes, teacher=self.cleaned.model,
                statistics=self.statistics, on_pass=lambda name: self.step(f"{name} on level {before.level:.3f}"))
        except OnnxCompressError as exc:  # recovery failing leaves every other stage as decided
            self.notes.append(f"recovery ({names}) at level {before.level:.3f} failed and was left out: {exc}")
            return {"level": before.level, "before": before.value, "error": str(exc)}
        after = self.measure(run.model, before.level, [*chain, *run.report.passes], note=f"recovered by {names}")
        self.notes.append(f"recovery ({names}) at level {before.level:.3f}: metric value {before.value:.4g} -> "
                          f"{after.value:.4g}" + (" (now within the tolerance)" if after.accepted and not before.accepted else ""))
        return {"level": before.level, "before": before.value, "after": after.value,
                "accepted_before": before.accepted, "accepted_after": after.accepted}

    def result(self, recovery: dict[str, Any] | None) -> SearchResult:
        """The chosen candidate (by MACs and the target, or by measured speed) and the run report."""
        o = self.options
        loss = (lambda p: -p.value) if o.tolerance.metric == "sqnr" and self.evaluate is None else (lambda p: p.value)
        chosen = _choose(self.points, self.reached, loss)
        if o.rank_by_speed and o.target_macs is None and o.target_speedup is None:
            chosen = _fastest(self.points, self.models, chosen, lambda candidate: self.timed(self.original, candidate),
                              self.step, self.notes, loss)
        final, records, stats = self.models[chosen]
        point = self.points[chosen]
        target_met = None if o.target_macs is None and o.target_speedup is None else self.reached(point)
        report = RunReport(
            input=self.input_name, output=None, before=self.original_stats, after=stats, passes=tuple(records),
            fidelity=point.fidelity, verified=o.verify, notes=tuple(self.notes),
            search=self._details(chosen, target_met, recovery),
        )
        return SearchResult(final, report, tuple(self.points), chosen, point.accepted, target_met)

    def _details(self, chosen: int, target_met: bool | None, recovery: dict[str, Any] | None) -> dict[str, Any]:
        o = self.options
        return {
            "tolerance": {"metric": "custom" if self.evaluate else o.tolerance.metric, "bound": o.tolerance.bound,
                          "description": _describe(o.tolerance, self.evaluate)},
            "heldout_samples": self.held.num_samples,
            "judged_on": self.judge.source,  # where every verdict was measured: held-out calibration samples or --eval data
            "baseline_score": self.judge.baseline,
            "target_macs": o.target_macs,
            "target_speedup": o.target_speedup,
            "points": [dataclasses.asdict(p) for p in self.points],
            "chosen": chosen,
            "met": self.points[chosen].accepted,
            "target_met": target_met,
            "recovery": recovery,
            # the closing passes (int8) on the unpruned model, judged on their own: kept, softened
            # (sensitive layers in float) or dropped, with their metric value and measured speedup
            "closing": self.closing,
        }


def _source_note(calibration: Calibration, held: Calibration) -> str:
    """Where the held-out samples come from: other sources than the fitted ones, or not known to be."""
    if (calibration.source_count or 0) >= 2:
        return f", from {held.source_count} of the {calibration.source_count} sources (the others fitted)"
    return (": crops or sentences of the sources the passes fitted to, which overstate fidelity on other data "
            f"(label each sample's source with a '{SAMPLE_SOURCE_KEY}' array in the .npz, or give --eval DATA)")


def _choose(points: Sequence[SearchPoint], reached: Callable[[SearchPoint], bool],
            loss: Callable[[SearchPoint], float] = lambda p: p.value) -> int:
    """The least-MAC accepted point; with a target, the least compressed accepted point that reaches
    it. Between points of the same MACs (a recovered one and its source), the lower loss."""
    accepted = [i for i, p in enumerate(points) if p.accepted]
    if not accepted:  # cannot happen unless `evaluate` is erratic: return the least changed model
        return min(range(len(points)), key=lambda i: (points[i].macs_ratio < 1.0, -points[i].macs_ratio))
    reaching = [i for i in accepted if reached(points[i])]
    if reaching:
        return max(reaching, key=lambda i: (points[i].macs_ratio, -loss(points[i])))
    return min(accepted, key=lambda i: (points[i].macs_ratio, loss(points[i])))


def _recovery_target(points: Sequence[SearchPoint], reached: Callable[[SearchPoint], bool]) -> int | None:
    """The pruned candidate recovery works on: the first rejected one beyond the accepted frontier
    (recovery may carry the search one level further), else the most pruned accepted one (recovery
    may improve its fidelity). None when nothing was pruned."""
    pruned = [i for i, p in enumerate(points) if p.level < 1.0]
    if not pruned:
        return None
    target_met = any(points[i].accepted and reached(points[i]) for i in pruned)
    rejected = [i for i in pruned if not points[i].accepted]
    if rejected and not target_met:
        return max(rejected, key=lambda i: points[i].macs_ratio)
    accepted = [i for i in pruned if points[i].accepted]
    return min(accepted, key=lambda i: points[i].macs_ratio) if accepted else None


#: How many of the most pruned accepted candidates are timed against int8 (or float) alone.
SPEED_CANDIDATES = 3
#: Measured speedups closer than this count as a tie, broken by the better fidelity: removing
#: channels that do not make the model faster only costs accuracy.
SPEED_TIE = 0.03
#: A pruned candidate must remove at least this share of the unpruned one's MACs and run at least
#: this much faster than it (int8 alone) to be chosen: pruning costs fidelity that a few held-out
#: calibration samples may not show (on
#: EfficientNet-Lite1 calibrated on 5 photos, a prune to 0.976 of the MACs measured 23 dB on held-out
#: crops and 10 dB on other photos), so it must buy a speedup that timing noise cannot fake.
PRUNE_MIN_GAIN = 0.10


#: Closing passes whose purpose is a smaller model: never dropped for measuring slower than float.
SIZE_PASSES = frozenset({"quantize-weight-only"})


def _fastest(points: list[SearchPoint], models: list, chosen: int, speedup: Callable[[ir.Model], float],
             step: Callable[[str], None], notes: list[str], loss: Callable[[SearchPoint], float]) -> int:
    """Among the unpruned accepted candidate and the SPEED_CANDIDATES most pruned accepted ones, the
    one measured fastest on ORT CPU at the search's shapes (fewer MACs do not always run faster). A
    pruned one must beat the unpruned one by PRUNE_MIN_GAIN; speedups within SPEED_TIE of the
    fastest tie, and the most faithful of those wins."""
    accepted = [i for i, p in enumerate(points) if p.accepted]
    unpruned = [i for i in accepted if points[i].level >= 1.0]
    pruned = sorted((i for i in accepted if points[i].level < 1.0), key=lambda i: points[i].macs_ratio)
    pool = sorted({*unpruned[-1:], *pruned[:SPEED_CANDIDATES], chosen})
    if unpruned:  # a speedup beyond the MACs removed is timing noise: such candidates are not timed
        base_macs = points[unpruned[-1]].macs_ratio
        small = [i for i in pool if points[i].level < 1.0 and base_macs < points[i].macs_ratio * (1 + PRUNE_MIN_GAIN)]
        if small:
            notes.append(f"pruning left out where it removed less than {PRUNE_MIN_GAIN:.0%} of the unpruned model's MACs: "
                         + ", ".join(f"level {points[i].level:.3f}" for i in small))
            pool = [i for i in pool if i not in small]
            chosen = chosen if chosen in pool else unpruned[-1]
    if len(pool) < 2:
        return chosen
    for i in pool:
        if points[i].speedup is None:
            step(f"timing level {points[i].level:.3f}")
            points[i] = dataclasses.replace(points[i], speedup=speedup(models[i][0]))
    base = unpruned[-1] if unpruned else None
    if base is not None:  # pruning that does not pay PRUNE_MIN_GAIN over the unpruned model is left out
        floor = points[base].speedup * (1 + PRUNE_MIN_GAIN)
        unpaid = [i for i in pool if i != base and points[i].speedup < floor]
        if unpaid:
            notes.append(f"pruning left out where it ran less than {PRUNE_MIN_GAIN:.0%} faster than the unpruned model "
                         f"({points[base].speedup:.2f}x): " + ", ".join(f"level {points[i].level:.3f} {points[i].speedup:.2f}x"
                                                                    for i in unpaid))
        pool = [i for i in pool if i not in unpaid]
    best = max(pool, key=lambda i: points[i].speedup)
    ties = [i for i in pool if points[i].speedup >= points[best].speedup * (1 - SPEED_TIE)]
    pick = min(ties, key=lambda i: (loss(points[i]), points[i].macs_ratio))
    if pick != chosen:
        notes.append(f"chosen by measured speed: level {points[pick].level:.3f}, {points[pick].speedup:.2f}x faster than "
                     f"the input (the fewest MACs, level {points[chosen].level:.3f}: {points[chosen].speedup:.2f}x)")
    return pick


def _prune_step(model: ir.Model, current: float, level: float, prune: Mapping[str, Any], fit: Calibration,
                shapes: Mapping[str, Sequence[int]], base_macs: int, verify: bool = True,
                statistics: Statistics | None = None) -> tuple[ir.Model, float, PassRecord] | None:
    """Prune `model` (at `current` of the base MACs) towards `level`; None if it barely moves."""
    spec = _prune_spec(prune, min(1.0, level / current))
    run = Pipeline([build_pass(spec)], verify=VerifyOptions(enabled=verify, samples=2)).run(
        model, calibration=fit, input_shapes=shapes, statistics=statistics)
    achieved = run.report.after.macs / base_macs
    if current - achieved < MIN_PROGRESS:
        return None
    return run.model, achieved, run.report.passes[0]


def _prune_spec(prune: Mapping[str, Any], target_macs: float) -> dict[str, Any]:
    return {"importance": "activation", "recover": "refit", **prune, "type": "prune-channels", "target_macs": target_macs}


def _fixed_mixed_precision(finish: list[dict[str, Any]], records: list[PassRecord]) -> list[dict[str, Any]]:
    """The closing passes with quantize-int8's mixed-precision choice of `records` fixed: the layers it
    kept in float are skipped by name, and the measurement is switched off."""
    chosen = next((r.details.get("mixed_precision") for r in records if r.name == "quantize-int8"), None)
    if not any(s.get("type") == "quantize-int8" for s in finish) or chosen is None:
        return finish
    kept = [k["node"] for k in chosen.get("kept_float", [])]
    return [{**s, "float_budget": 0.0, "skip_nodes": [*s.get("skip_nodes", ()), *kept]}
            if s.get("type") == "quantize-int8" else s for s in finish]


def _with_fallback(finish: list[dict[str, Any]], tolerance: Tolerance) -> list[dict[str, Any]] | None:
    """The closing passes with int8's own tolerance mode switched on, if the pass has one."""
    from .passes.quantize import QuantizeQDQ

    names = {f.name for f in dataclasses.fields(QuantizeQDQ)}
    if not {"max_drop", "metric"} <= names or not any(s.get("type") == "quantize-int8" for s in finish):
        return None
    return [{**s, "max_drop": tolerance.bound, "metric": tolerance.metric} if s.get("type") == "quantize-int8" else s
            for s in finish]


class _Judge:
    """Measures candidates against the original on the held-out samples."""

    def __init__(self, original: ir.Model, held: Calibration, tolerance: Tolerance, evaluate: Evaluate | None):
        self.feeds = model_batches(original, held)
        self.source = f"{held.source}, {held.num_samples} samples"
        self.reference = reference_outputs(original, self.feeds, held.source)
        self.tolerance, self.evaluate = tolerance, evaluate
        self.baseline = float(evaluate(load(original))) if evaluate else None
        self.sources = fed_sources(held, self.feeds)  # the interval resamples whole sources

    def __call__(self, model: ir.Model) -> tuple[Fidelity, float, bool, tuple[float, float] | None]:
        got = outputs(model, self.feeds, "search candidate")
        fidelity = compare(self.reference, got, self.source)
        if self.evaluate is not None:
            drop = self.baseline - float(self.evaluate(load(model)))
            return fidelity, drop, drop <= self.tolerance.bound, None
        # the verdict rests on the interval's pessimistic end: a few samples can flatter a candidate
        interval = bootstrap_interval(self.tolerance, self.reference, got, sources=self.sources)
        return fidelity, self.tolerance.value(fidelity), accepted(self.tolerance, fidelity, interval), interval


def _speedup(original: ir.Model, candidate: ir.Model, shapes: Mapping[str, Sequence[int]], runs: int,
             threads: int | None = None) -> float:
    """Measured ORT CPU speedup of `candidate` over `original` at `shapes` (interleaved medians)."""
    from .analysis.layer_timing import time_pair
    from .verify import random_feeds

    return time_pair(original, candidate, feeds=random_feeds(original, shapes)[0], min_runs=runs, threads=threads).speedup


def _describe(tolerance: Tolerance, evaluate: Evaluate | None) -> str:
    if evaluate is not None:
        return f"user metric drop <= {tolerance.bound:g}"
    return tolerance.describe()

"""`optimize`: one call from a model to a compressed model, a report and a verdict.

Three ways in, chosen by what the user gave:
- a recipe (a name, a file, or pass options such as a fixed pruning ratio): run it as written;
- calibration data and no recipe: the tolerance search (search.py) prunes as far as the tolerance
  allows and closes with the int8 form that suits the target;
- neither: exact cleanup, plus dynamic int8 where MatMul/Gemm carry most of the MACs, and a note on
  what calibration data would add.
Whatever ran, the report says whether the result meets the tolerance and the target, so a
deployment pipeline can act on the exit code alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from .calibration import Calibration
from .estimate import MIN_SPLIT_SAMPLES, Estimate, basis_of, measure, split_for_estimate
from .interval import accepted
from .errors import OnnxCompressError
from .model import ModelLike, load, resolve_input_shapes
from .pipeline import Pipeline, build_pass
from .report import RunReport
from .tolerance import Tolerance, default_tolerance
from .verify import VerifyOptions

Target = Literal["cpu", "vnni", "host", "cuda", "tensorrt"]
TARGETS: tuple[str, ...] = ("cpu", "vnni", "host", "cuda", "tensorrt")
#: Targets that run on ORT's CPU provider: any CPU (x86 with AVX2 and up, ARM), x86 with VNNI only,
#: or this machine's CPU (VNNI when it has it).
CPU_TARGETS = frozenset({"cpu", "vnni", "host"})
#: The tolerance when calibration data is given and none was asked for is tolerance.default_tolerance:
#: by output kind, a cosine drop int8 alone meets on a good model. Cosine rather than top-1: on the
#: few samples a search holds out, top-1 agreement cannot see small accuracy drops
#: (benchmarks/search_digits.py measures both against real test accuracy).
#: Dynamic int8 only pays where MatMul/Gemm carry at least this share of the MACs (ConvInteger is slow on CPU).
DYNAMIC_INT8_MIN_SHARE = 0.5
CLEANUP = ("fold-constants", "fold-batchnorm", "eliminate-noops")
#: Passes that recover a pruned model's fidelity (the search runs them on its frontier candidate).
RECOVERY = ("distill",)


@dataclass
class OptimizeOptions:
    recipe: str | Path | Mapping | Sequence | None = None  # None: chosen from the data and the target
    target: Target = "cpu"
    tolerance: Tolerance | None = None  # None: tolerance.default_tolerance when the search runs
    target_macs: float | None = None
    target_speedup: float | None = None
    passes: Sequence[Mapping[str, Any]] = ()  # pass specs that override or extend the recipe ({"type": ...})
    prune: Mapping[str, Any] = field(default_factory=dict)  # prune-channels options for whatever prunes (search, target_macs, the recipe)
    verify: bool = True
    bench_runs: int = 20  # timed runs for the before/after latency; 0 skips the measurement
    # every timing (the search's choice by speed, the before/after latency) at the deployed setting:
    threads: int | None = None  # ORT intra-op threads (None: the physical cores)
    batch: int | None = None  # the batch size (None: the analysed shapes' batch, usually 1)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise OnnxCompressError(f"unknown target '{self.target}' (choose: {', '.join(TARGETS)})")
        from .search import check_targets

        check_targets(self.target_macs, self.target_speedup)
        for name in ("threads", "batch"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 4096:
                raise OnnxCompressError(f"--{name} must be a whole number from 1 to 4096, got {value}")


@dataclass(frozen=True)
class OptimizeResult:
    model: ir.Model
    report: RunReport
    mode: str  # "recipe", "search" or "no-calibration"

    @property
    def meets_tolerance(self) -> bool | None:
        return None if self.report.tolerance is None else bool(self.report.tolerance["met"])

    @property
    def meets_target(self) -> bool | None:
        return None if self.report.search is None else self.report.search.get("target_met")


def optimize(
    model: ModelLike,
    *,
    calibration: Calibration | Mapping[str, np.ndarray] | None = None,
    options: OptimizeOptions | None = None,
    evaluate: Callable[[ir.Model], float] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    on_step: Callable[[str], None] | None = None,
    input_values: Mapping[str, Any] | None = None,
    validation: Calibration | Mapping[str, np.ndarray] | None = None,
) -> OptimizeResult:
    """Compress `model` as `options` ask; see the module docstring for how the plan is chosen.
    `input_values` fixes inputs of the synthetic feeds (verification without calibration data, latency).
    `validation` (`--eval`): the user's own evaluation data, from other sources than the calibration
    data; the search judges candidates on it, a recipe's tolerance is judged on it."""
    from .feeds import check_input_values

    options = options or OptimizeOptions()
    source = load(model)
    values = check_input_values(source, input_values)
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = Calibration.from_arrays(source, calibration)
    if validation is not None and not isinstance(validation, Calibration):
        validation = Calibration.from_arrays(source, validation, source="evaluation data")
    if validation is not None and calibration is None:
        raise OnnxCompressError("--eval judges what calibration data fits: give --calib DATA too")
    shapes = resolve_input_shapes(source, {**(calibration.sample_shapes(source) if calibration else {}), **(input_shapes or {})})
    _preflight(source, shapes, input_shapes, calibration, options)
    if validation is not None:
        from .preflight import check_shapes

        check_shapes(source, shapes, input_shapes, calibration=validation)
    # A recipe or a fixed pruning ratio is run as written; so are explicit pass flags unless a
    # tolerance or a target asks for the search.
    asked = options.tolerance is not None or options.target_macs is not None or options.target_speedup is not None
    fixed = (options.recipe is not None or any(p.get("type") == "prune-channels" for p in options.passes)
             or (bool(options.passes) and not asked))
    if evaluate is not None and (calibration is None or fixed):
        raise OnnxCompressError("an evaluation function drives the tolerance search: give calibration data and no recipe")
    tolerance = options.tolerance
    if tolerance is None and calibration is not None and not fixed:
        tolerance = default_tolerance(_first_outputs(source, calibration, shapes, values))
    elif tolerance is not None and tolerance.metric == "auto":
        tolerance = tolerance.resolved(_first_outputs(source, calibration, shapes, values))
    options = dataclasses.replace(options, tolerance=tolerance)
    if calibration is not None and not fixed:
        result = _search(source, calibration, options, evaluate, shapes, on_step, timing_shapes(source, shapes, options.batch),
                         validation)
        mode = "search"
    else:
        if options.target_speedup is not None:
            raise OnnxCompressError("--target-speedup needs calibration data (it drives the tolerance search)")
        result = _recipe(source, calibration, options, shapes, on_step, values, validation)
        mode = "recipe" if calibration is not None or options.recipe is not None or options.passes else "no-calibration"
    report = result.report
    if options.bench_runs:
        bench = _latency(source, result.model, timing_shapes(source, shapes, options.batch), options, values)
        report = dataclasses.replace(report, bench=bench, notes=(*report.notes, *_slower_note(bench, [p.name for p in report.passes if p.modified])))
    return OptimizeResult(result.model, report, mode)


def _preflight(source: ir.Model, shapes, given, calibration, options: OptimizeOptions) -> None:
    """Input problems found before any pass runs: a model ORT cannot run (where something needs to
    run it), inputs too small or too large for it."""
    from .preflight import check_runnable, check_shapes

    if options.verify or options.bench_runs or calibration is not None or options.tolerance is not None:
        check_runnable(source)
    check_shapes(source, shapes, given, calibration=calibration)


#: Measured speedups below this call the result slower than its input (medians of interleaved
#: runs move by a few percent between repeats on a quiet machine).
SLOWER_BELOW = 0.97


def _slower_note(bench: Mapping[str, Any], changed: Sequence[str]) -> list[str]:
    """A note when the result measured slower than the input: it is not an optimization here."""
    speedup = bench.get("measured_speedup")
    if speedup is None or speedup >= SLOWER_BELOW:
        return []
    lossy = ", ".join(changed) or "no pass"
    return [f"slower than the input: measured {1 / speedup:.2f}x slower on ORT CPU at batch {bench['batch']} "
            f"({lossy}); keep the input model for speed on this CPU"]


def timing_shapes(model: ir.Model, shapes: Mapping[str, Sequence[int]], batch: int | None) -> dict[str, tuple[int, ...]]:
    """The analysed input shapes with `batch` on axis 0 of every input that has a batch axis."""
    from .model import graph_inputs

    if batch is None:
        return {k: tuple(v) for k, v in shapes.items()}
    out = {}
    for value in graph_inputs(model):
        shape = tuple(shapes[value.name])
        fixed = value.shape.dims[0] if value.shape is not None and len(value.shape) else None
        if shape and isinstance(fixed, int) and fixed != batch:
            raise OnnxCompressError(f"--batch {batch}: input '{value.name}' has a fixed batch of {fixed}")
        out[value.name] = (batch, *shape[1:]) if shape else shape
    return out


def _search(source, calibration, options, evaluate, shapes, on_step, timing=None, validation=None):
    from .search import SearchOptions, search

    tolerance = options.tolerance
    # Recovery (distill) is judged by what it recovers on a pruned candidate; the closing passes
    # (number formats) by their own fidelity and speed: one never goes down with the other.
    recover = [spec for spec in options.passes if spec.get("type") in RECOVERY]
    finish = [spec for spec in options.passes if spec.get("type") not in ("prune-channels", *RECOVERY)]
    if not any(s.get("type", "").startswith("quantize") for s in finish):
        finish += _int8_for(options.target)
    on_cpu = options.target in CPU_TARGETS and options.bench_runs > 0
    found = search(
        source, calibration,
        SearchOptions(tolerance=tolerance, prune=dict(options.prune), cleanup=CLEANUP, finish=_ordered(finish),
                      recover=_ordered(recover), target_macs=options.target_macs, target_speedup=options.target_speedup,
                      finish_must_be_faster=on_cpu, rank_by_speed=on_cpu, verify=options.verify,
                      threads=options.threads, timing_shapes=timing),
        evaluate=evaluate, input_shapes=shapes, on_step=on_step, validation=validation,
    )
    chosen = found.chosen_point
    verdict = {"description": found.report.search["tolerance"]["description"], "value": chosen.value,
               "met": found.met, "measured_on": chosen.fidelity.inputs}
    fitted, judged = (None, validation) if validation is not None else calibration.split(SearchOptions.holdout)
    estimate = None
    if evaluate is None:  # a user metric has no interval and is the user's own estimate
        estimate = Estimate.of(tolerance, chosen.value, chosen.interval, judged, basis_of(judged, fitted))
    return dataclasses.replace(found, report=dataclasses.replace(found.report, tolerance=verdict, estimate=estimate))


def _recipe(source, calibration, options, shapes, on_step, values=None, validation=None):
    notes: list[str] = []
    if options.recipe is not None:
        pipeline = Pipeline.from_recipe(options.recipe)
    else:
        pipeline = Pipeline([build_pass(name) for name in CLEANUP])
        if calibration is None and not options.passes:
            notes.extend(_no_calibration_plan(pipeline, source, shapes, options.target))
    for spec in _ordered(options.passes):
        _set_pass(pipeline, spec)
    if options.target_macs is not None:
        _set_pass(pipeline, {"type": "prune-channels", "target_macs": options.target_macs, **options.prune})
    elif options.prune and "prune-channels" in [p.name for p in pipeline.passes]:  # the recipe's pruning
        _set_pass(pipeline, {"type": "prune-channels", **options.prune})
    names = [p.name for p in pipeline.passes]
    if options.tolerance is not None and "quantize-int8" in names:
        q = pipeline.passes[names.index("quantize-int8")]
        if getattr(q, "max_drop", None) is None:  # int8 may keep its most sensitive layers in float
            _set_pass(pipeline, {"type": "quantize-int8", "max_drop": options.tolerance.bound,
                                 "metric": options.tolerance.metric})
    if not options.verify:
        pipeline.verify = VerifyOptions(enabled=False)
    fit, held = (calibration, validation) if calibration is None or validation is not None else split_for_estimate(calibration)
    result = pipeline.run(source, calibration=fit, input_shapes=shapes, on_pass=on_step, input_values=values)
    report = result.report
    if report.fidelity is None:
        if options.tolerance is not None:
            raise OnnxCompressError("a tolerance needs verification: drop --no-verify")
        return dataclasses.replace(result, report=dataclasses.replace(report, notes=(*report.notes, *notes)))
    fidelity, estimate = report.fidelity, None
    if held is not None:  # the user's evaluation data, or calibration samples no pass fitted to
        fidelity, estimate = measure(source, result.model, held, options.tolerance,
                                     basis_of(held, None if held is validation else fit))
        if held is not validation:
            notes.append(f"estimate on {held.num_samples} calibration samples held out from the passes "
                         f"(they fitted the other {fit.num_samples})")
    elif calibration is not None:
        why = "random data" if calibration.is_random else f"fewer than {MIN_SPLIT_SAMPLES} calibration samples"
        notes.append(f"fidelity measured on samples the passes fitted ({why}, none held out): not an estimate for other data")
    report = dataclasses.replace(report, fidelity=fidelity, estimate=estimate, notes=(*report.notes, *notes))
    if options.tolerance is not None:
        met = accepted(options.tolerance, fidelity, estimate and estimate.interval)
        report = dataclasses.replace(report, tolerance={
            "description": options.tolerance.describe(), "value": options.tolerance.value(fidelity),
            "met": met, "measured_on": fidelity.inputs,
            **({"interval": estimate.interval, "pessimistic": estimate.pessimistic} if estimate and estimate.interval else {}),
        })
    return dataclasses.replace(result, report=report)


def _no_calibration_plan(pipeline: Pipeline, model: ir.Model, shapes, target: str) -> list[str]:
    """Cleanup, plus dynamic int8 when MatMul/Gemm dominate (CPU); says what calibration would add."""
    from .analysis.cost import analyze_cost

    cost = analyze_cost(model, shapes)
    total = cost.stats.macs  # op_macs: subgraph layers too (If/Loop/Scan bodies), as the total counts them
    share = sum(cost.op_macs.get(op, 0) for op in ("MatMul", "Gemm")) / total if total else 0.0
    notes = []
    if target in CPU_TARGETS and share >= DYNAMIC_INT8_MIN_SHARE:
        pipeline.passes.append(build_pass("quantize-dynamic"))
        notes.append(f"no calibration data: exact cleanup, then dynamic int8 (MatMul/Gemm carry {share:.0%} of the MACs)")
    else:
        notes.append("no calibration data: exact cleanup only (dynamic int8 does not pay on Conv-heavy models)")
    notes.append("with --calib DATA, optimize prunes channels as far as a fidelity tolerance allows (--max-drop) "
                 "and quantizes to static int8, measured on held-out samples of that data")
    return notes


def _int8_for(target: str) -> list[dict[str, Any]]:
    """The closing int8 step that runs fast on `target` (none for CUDA: ORT's CUDA EP runs few int8 kernels)."""
    if target == "cuda":
        return []
    if target == "tensorrt":
        return [{"type": "quantize-int8", "preset": "tensorrt"}]
    return [{"type": "quantize-int8", "preset": "cpu", "kernels": int8_kernels(target)}]


def int8_kernels(target: str) -> str:
    """The CPU int8 kernels a target runs on: "vnni" only where the user said so or this CPU has
    VNNI (`host`); "any" otherwise, exact on x86 without VNNI and on ARM."""
    from .analysis.int8_kernels import host_has_vnni

    return "vnni" if target == "vnni" or (target == "host" and host_has_vnni()) else "any"


def provider_for(target: str) -> str:
    """The ORT provider a target runs on."""
    return "cpu" if target in CPU_TARGETS else target


#: Where each pass belongs in a pipeline: structure first, then weights, then number formats.
ORDER = ("fold-constants", "fold-batchnorm", "eliminate-noops", "prune-blocks", "prune-channels", "factorize",
         "distill", "equalize", "smooth-quant", "quantize-int8", "quantize-dynamic", "quantize-weight-only",
         "weight-share")


def _ordered(specs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted((dict(s) for s in specs), key=lambda s: rank.get(s.get("type"), len(ORDER)))


def _set_pass(pipeline: Pipeline, spec: Mapping[str, Any]) -> None:
    """Merge `spec`'s options into the recipe's pass of that type, or insert the pass where ORDER puts it."""
    name = spec["type"]
    names = [p.name for p in pipeline.passes]
    if name in names:
        i = names.index(name)
        pipeline.passes[i] = build_pass({**pipeline.passes[i].options(), **spec}, where=f"{name} options")
        return
    rank = {n: i for i, n in enumerate(ORDER)}
    mine = rank.get(name, len(ORDER))
    at = next((i for i, p in enumerate(pipeline.passes) if rank.get(p.name, len(ORDER)) > mine), len(pipeline.passes))
    pipeline.passes.insert(at, build_pass(dict(spec), where=f"{name} options"))


def _first_outputs(model: ir.Model, calibration: Calibration | None, shapes, values=None) -> list[list[np.ndarray]]:
    """The model's outputs on one input batch (what the default or "auto" tolerance is read from)."""
    from .calibration import batch_size_for
    from .verify import random_feeds, reference_outputs

    if calibration is not None:
        feeds, source = [next(iter(calibration.batches(batch_size_for(model, 1))))], calibration.source
    else:
        feeds, source = random_feeds(model, shapes, values=values), "random"
    return reference_outputs(model, feeds, source)


def _latency(original: ir.Model, optimized: ir.Model, shapes, options: OptimizeOptions, values=None) -> dict[str, Any]:
    """Median ORT CPU latency before and after, interleaved, at the model's batch size."""
    from .bench import MIN_RUNS, BenchOptions, benchmark

    batch = next((int(shape[0]) for shape in shapes.values() if len(shape)), 1)  # a scalar input has no batch
    bench_options = BenchOptions(batch_sizes=(batch,), runs=max(options.bench_runs, MIN_RUNS), warmup=3, input_shapes=dict(shapes),
                                 input_values=values, threads=options.threads)
    report = benchmark([("original", original), ("optimized", optimized)], bench_options)
    before, after = report.row("original", batch), report.row("optimized", batch)
    return {
        "provider": "cpu", "batch": batch, "runs": bench_options.runs, "threads": report.environment.threads,
        "original_ms": before.timing.median_ms if before.timing else None,
        "optimized_ms": after.timing.median_ms if after.timing else None,
        "measured_speedup": after.measured_speedup, "theoretical_speedup": after.theoretical_speedup,
        "note": None if options.target in CPU_TARGETS else f"measured on ORT CPU, not on the {options.target} target",
    }

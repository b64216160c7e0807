"""Latency on ONNX Runtime, compared with a baseline: measured speedup against theoretical (MAC) speedup.

Protocol (ARCHITECTURE.md, "Measuring"): one ORT session per model with fixed intra-op threads, one
inter-op thread, ORT_ENABLE_ALL and intra-op spinning off; every model warmed up, then timed runs
interleaved A B A B ... in one process so drifting clocks and caches hit every model alike. Per
model and batch: median, p90, mean, min, max, stdev (ms). Against the first model (the baseline):
theoretical speedup = baseline MACs / model MACs (analysis.cost at that batch's shapes), measured
speedup = baseline median / model median, realization = measured / theoretical. With `profile`,
ORT's per-node profile is mapped back to the model's nodes and their MACs.

`benchmark()` returns a `BenchReport` (data). Rendering is separate: `render_table`,
`render_layers`, `render_environment`, and `plots.plot_speedups`. JSON keys are the dataclass field
names: the report has `baseline, models, options, environment, rows, notes`; each row has
`model, batch, supported, reason, input_shapes, batch_rewritten, providers, timing, macs,
theoretical_speedup, measured_speedup, realization, cost_note, layers`.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from .errors import OnnxCompressError
from .model import (
    SOURCE_KEY,
    ModelLike,
    graph_inputs,
    load,
    needs_file,
    resolve_input_shapes,
    temporary_path,
    to_proto,
)
from .report import human, to_jsonable
from .runtime import PROVIDERS

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

#: Fewer timed runs give medians and p90s too noisy to compare models by.
MIN_RUNS = 20
#: CPU features that decide which int8/fp32 kernels ORT can use.
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
#: Integer inputs the graph says nothing about are drawn from {0, 1}: valid indices and flags for any
#: table size (feeds.py reads ids, masks and compared values from the graph first).
INT_INPUT_HIGH = 2
#: Name given to a static batch dimension rewritten as symbolic.
BATCH_DIM = "batch"
#: How far upstream a renamed ORT kernel is followed to find the model node it was built from.
FUSION_DEPTH = 8
#: Longest reason or note kept (ORT error messages can run to kilobytes).
MAX_REASON = 300

SPINNING_NOTE = (
    "session.intra_op.allow_spinning=0: interleaved sessions with spinning intra-op threads "
    "starve each other on small machines"
)
GPU_COPY_NOTE = "GPU timings include copying inputs to and outputs from the device (session.run with numpy arrays)"
GPU_PROFILE_NOTE = "per-layer GPU times are ORT's host-side kernel times, not device execution times"


# ----------------------------------------------------------------------------------------- options


@dataclass
class BenchOptions:
    """How to benchmark. The CLI's `bench` options map one to one onto these fields."""

    provider: str = "cpu"  # cpu | cuda | tensorrt
    batch_sizes: tuple[int, ...] = (1,)
    runs: int = 50  # timed runs per model and batch, at least MIN_RUNS
    warmup: int = 5  # untimed runs per model before timing (at least one is always done)
    threads: int | None = None  # intra-op threads; None: the physical cores this process may use
    input_shapes: Mapping[str, Sequence[int]] | None = None  # leading dim is replaced by each batch size
    profile: bool = False  # per-layer times from ORT's profiler
    profile_runs: int = 10  # profiled runs per model and batch (after `warmup`), when profiling
    seed: int = 0  # random inputs
    input_values: Mapping[str, Any] | None = None  # input name -> a fixed value for it (`--input sr=16000`)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Normalise and check every field; bad values raise a one-line OnnxCompressError."""
        self.provider = str(self.provider).lower()
        if self.provider not in PROVIDERS:
            raise OnnxCompressError(f"unknown provider '{self.provider}'; choose one of: {', '.join(PROVIDERS)}")
        try:
            sizes = tuple(int(b) for b in self.batch_sizes)
        except (TypeError, ValueError):
            raise OnnxCompressError(f"batch sizes must be positive integers, got {self.batch_sizes!r}") from None
        if not sizes or any(b <= 0 for b in sizes):
            raise OnnxCompressError(f"batch sizes must be positive integers, got {self.batch_sizes!r}")
        self.batch_sizes = tuple(dict.fromkeys(sizes))
        if self.runs < MIN_RUNS:
            raise OnnxCompressError(
                f"runs must be at least {MIN_RUNS} (got {self.runs}): fewer timed runs give noisy medians"
            )
        if self.warmup < 0:
            raise OnnxCompressError(f"warmup must be 0 or more, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise OnnxCompressError(f"threads must be 1 or more, got {self.threads}")
        if self.profile_runs < 1:
            raise OnnxCompressError(f"profile runs must be 1 or more, got {self.profile_runs}")


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """`"1,8"` -> (1, 8), with a one-line error for anything else."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise OnnxCompressError(f"bad batch sizes '{text}': expected positive integers such as 1,8")
    return tuple(int(p) for p in parts)


# ------------------------------------------------------------------------------------ report data


@dataclass(frozen=True)
class Timing:
    """Latency statistics of one model at one batch size, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    stdev_ms: float
    runs: int

    @classmethod
    def from_seconds(cls, samples: Sequence[float]) -> Timing:
        ms = np.asarray(samples, dtype=np.float64) * 1e3
        return cls(
            median_ms=float(np.median(ms)),
            p90_ms=float(np.percentile(ms, 90)),
            mean_ms=float(ms.mean()),
            min_ms=float(ms.min()),
            max_ms=float(ms.max()),
            stdev_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,  # sample standard deviation
            runs=len(ms),
        )


@dataclass(frozen=True)
class LayerTime:
    """One ORT kernel from the profile, with the model nodes it computes and their MACs.

    match: "exact" (kernel named like a model node), "renamed" (ORT renamed or fused it; found
    through the value or node name ORT derived the kernel's name from), "unmatched" (no model
    node: layout reorders, inserted casts), "absorbed" (a model node with MACs but no kernel of
    its own: fused into another kernel or removed by ORT; time is None).
    """

    kernel: str | None
    op_name: str
    nodes: tuple[str, ...]
    match: str
    time_ms: float | None  # median over profiled runs
    macs: int | None
    gmacs_per_s: float | None
    provider: str | None
    # Against the kernel of the same name in the baseline at the same batch, when there is one.
    theoretical_speedup: float | None = None
    measured_speedup: float | None = None
    realization: float | None = None


@dataclass(frozen=True)
class BenchRow:
    """One model at one batch size."""

    model: str
    batch: int
    supported: bool
    reason: str | None  # why the row is unsupported (one line)
    input_shapes: Mapping[str, tuple[int, ...]]
    batch_rewritten: bool  # a static batch dim was made symbolic to run at this batch
    providers: tuple[str, ...]  # what the session really uses (sess.get_providers())
    timing: Timing | None
    macs: int | None
    theoretical_speedup: float | None  # baseline MACs / model MACs
    measured_speedup: float | None  # baseline median / model median
    realization: float | None  # measured / theoretical
    cost_note: str | None = None  # e.g. ops whose cost is unknown
    layers: tuple[LayerTime, ...] = ()


@dataclass(frozen=True)
class BenchEnvironment:
    """Where the numbers were measured."""

    onnxruntime: str
    provider: str
    requested_providers: tuple[str, ...]
    threads: int
    inter_op_threads: int
    allow_spinning: str
    graph_optimization: str
    cpu: str
    cpu_flags: Mapping[str, bool]  # empty where the platform does not expose them
    physical_cores: int
    logical_cores: int
    platform: str
    python: str
    numpy: str
    onnx: str


@dataclass(frozen=True)
class BenchReport:
    """Every row of a benchmark, the environment and the options it ran with."""

    baseline: str
    models: tuple[str, ...]
    options: BenchOptions
    environment: BenchEnvironment
    rows: tuple[BenchRow, ...]
    notes: tuple[str, ...] = ()

    def row(self, model: str, batch: int) -> BenchRow:
        for row in self.rows:
            if row.model == model and row.batch == batch:
                return row
        raise KeyError(f"no row for model '{model}' at batch {batch}")

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True)


@dataclass(frozen=True)
class BenchProgress:
    """Sent to the progress callback after every timed run."""

    model: str
    batch: int
    run: int  # 1-based, this model at this batch
    done: int  # timed runs so far, all models and batches
    total: int  # timed runs planned (shrinks when a model cannot run at a batch)


ProgressCallback = Callable[[BenchProgress], None]


# ------------------------------------------------------------------------------------ environment


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if allowed is not None:
        cores = set()
        for cpu in allowed:
            topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            try:
                cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
            except OSError:
                return len(allowed)
        return len(cores)
    return os.cpu_count() or 1


def logical_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_description() -> tuple[str, dict[str, bool]]:
    """CPU model name and the flags of interest (from /proc/cpuinfo on Linux; name only elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine() or "unknown", {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    name = fields.get("model name") or fields.get("Hardware") or platform.processor() or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return name or "unknown", {flag: flag in flags for flag in CPU_FLAGS_OF_INTEREST} if flags else {}


def environment(provider: str, requested: Sequence[str], threads: int) -> BenchEnvironment:
    import onnx
    import onnxruntime as ort

    cpu, flags = cpu_description()
    return BenchEnvironment(
        onnxruntime=ort.__version__,
        provider=provider,
        requested_providers=tuple(requested),
        threads=threads,
        inter_op_threads=1,
        allow_spinning="0",
        graph_optimization="ORT_ENABLE_ALL",
        cpu=cpu,
        cpu_flags=flags,
        physical_cores=physical_cores(),
        logical_cores=logical_cores(),
        platform=platform.platform(),
        python=platform.python_version(),
        numpy=np.__version__,
        onnx=onnx.__version__,
    )


def session_providers(provider: str) -> tuple[str, ...]:
    """The ORT provider list for `provider`, or ProviderUnavailableError saying what there is."""
    from .runtime import provider_chain

    return tuple(provider_chain(provider))


# --------------------------------------------------------------------------------------- benchmark


def benchmark(
    models: Sequence[ModelLike | tuple[str, ModelLike]],
    options: BenchOptions | None = None,
    progress: ProgressCallback | None = None,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> BenchReport:
    """Time `models` (the first is the baseline) at every batch size in `options`.

    Each item is a model (path, ModelProto, ir.Model, graphsurgeon Graph) or a (label, model)
    pair. A model that cannot run at a batch size gets an unsupported row with the reason; bad
    options, unknown input names and unavailable providers raise a one-line OnnxCompressError.
    `clock` times each run (seconds; called exactly twice per timed run).
    """
    options = options or BenchOptions()
    options.validate()
    if not models:
        raise OnnxCompressError("benchmark needs at least one model")
    requested = session_providers(options.provider)
    threads = options.threads or physical_cores()
    labelled = _labelled(models)
    _check_any_runnable(labelled)
    tracker = _Tracker(progress, len(options.batch_sizes) * len(labelled) * options.runs)
    rows: list[BenchRow] = []
    notes: list[str] = [SPINNING_NOTE]
    if options.provider != "cpu":
        notes.append(GPU_COPY_NOTE)
        if options.profile:
            notes.append(GPU_PROFILE_NOTE)
    for batch in options.batch_sizes:
        rows.extend(_bench_batch(labelled, batch, options, requested, threads, tracker, clock, notes))
    return BenchReport(
        baseline=labelled[0][0],
        models=tuple(label for label, _ in labelled),
        options=options,
        environment=environment(options.provider, requested, threads),
        rows=tuple(rows),
        notes=tuple(notes),
    )


def _check_any_runnable(labelled: Sequence[tuple[str, ir.Model]]) -> None:
    """Fail before timing when no model can run at all (custom ops); one that cannot gets its rows
    marked unsupported while the others are timed."""
    from .preflight import check_runnable, unsupported_nodes

    if all(unsupported_nodes(model) for _, model in labelled):
        label, model = labelled[0]
        check_runnable(model, f"'{label}'")


def _labelled(models: Sequence[Any]) -> list[tuple[str, ir.Model]]:
    """(label, our own copy with every node named) per model; labels made unique."""
    from onnx_ir.passes.common import NameFixPass

    out: list[tuple[str, ir.Model]] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(models):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            label, source = item
        else:
            label, source = None, item
        model = load(source)
        NameFixPass()(model)  # ORT's profile names kernels after nodes: every node needs a unique name
        label = label or _default_label(source, model, index)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}#{seen[label]}"
        out.append((label, model))
    return out


def _default_label(source: Any, model: ir.Model, index: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return Path(source).stem
    if model.meta.get(SOURCE_KEY):
        return Path(model.meta[SOURCE_KEY]).stem
    return model.graph.name or f"model{index}"


class _Tracker:
    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def ran(self, label: str, batch: int, run: int) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(BenchProgress(label, batch, run, self.done, self.total))

    def dropped(self, runs: int) -> None:
        self.total -= runs


class _Unsupported(Exception):
    """A model cannot run at a batch size: recorded in its row, never raised to the caller."""


@dataclass
class _Candidate:
    """One model prepared for one batch size."""

    label: str
    model: ir.Model  # the variant ORT runs (batch dim rewritten when needed)
    shapes: dict[str, tuple[int, ...]]
    rewritten: bool
    batched_outputs: frozenset[str] = frozenset()
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    source: bytes | str = b""
    session: Any = None
    providers: tuple[str, ...] = ()
    macs: int | None = None
    node_macs: dict[str, int] = field(default_factory=dict)
    macs_complete: bool = True  # False: some nodes' cost is unknown, so MAC ratios would mislead
    cost_note: str | None = None
    failure: str | None = None
    samples: list[float] = field(default_factory=list)
    layers: tuple[LayerTime, ...] = ()


def _bench_batch(
    labelled: Sequence[tuple[str, ir.Model]],
    batch: int,
    options: BenchOptions,
    requested: Sequence[str],
    threads: int,
    tracker: _Tracker,
    clock: Callable[[], float],
    notes: list[str],
) -> list[BenchRow]:
    with contextlib.ExitStack() as stack:
        candidates = [_prepare(label, model, batch, options, stack) for label, model in labelled]
        for cand in candidates:
            _start(cand, requested, threads, options.warmup, batch)
        active = [c for c in candidates if c.failure is None]
        tracker.dropped(options.runs * (len(candidates) - len(active)))
        _time_interleaved(active, options.runs, batch, clock, tracker)
        for cand in candidates:
            cand.session = None  # free each session before the next batch builds its own
        if options.profile:
            for cand in candidates:
                if cand.failure is None:
                    _profile(cand, batch, options, requested, threads, notes)
    return _rows(candidates, batch)


def _prepare(label: str, model: ir.Model, batch: int, options: BenchOptions, stack: contextlib.ExitStack) -> _Candidate:
    shapes, to_rewrite = _batch_shapes(model, batch, options.input_shapes)  # InputShapeError: the user's to fix
    cand = _Candidate(label, model, shapes, rewritten=bool(to_rewrite))
    try:
        if to_rewrite:
            cand.model, cand.batched_outputs = _with_symbolic_batch(model, to_rewrite)
        cand.feeds = _random_feeds(cand.model, shapes, options.seed, batch, options.input_values)
        cand.source = _ort_source(cand.model, stack)
    except _Unsupported as exc:
        cand.failure = str(exc)
        return cand
    _add_costs(cand)
    return cand


def _batch_shapes(
    model: ir.Model, batch: int, given: Mapping[str, Sequence[int]] | None
) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Feed shapes at `batch`, and the inputs whose static batch dim differs from it.

    An input carries the batch when its leading dim is symbolic, or static and equal to the
    first input's (so side inputs such as a [3] scale vector keep their shape).
    """
    base = resolve_input_shapes(model, given, default_batch=1)
    inputs = graph_inputs(model)
    first = _leading_dim(inputs[0]) if inputs else None
    shapes: dict[str, tuple[int, ...]] = {}
    to_rewrite: list[str] = []
    for value in inputs:
        shape = base[value.name]
        lead = _leading_dim(value)
        if not shape or (isinstance(lead, int) and lead != first):
            shapes[value.name] = shape
            continue
        shapes[value.name] = (batch, *shape[1:])
        if isinstance(lead, int) and lead != batch:
            to_rewrite.append(value.name)
    return shapes, to_rewrite


def _leading_dim(value: ir.Value) -> int | str | None:
    """The model's leading dim of `value`: an int when static, a str when symbolic, None when rank 0 or unknown."""
    if value.shape is None or len(value.shape) == 0:
        return None
    dim = value.shape[0]
    return dim if isinstance(dim, int) else str(dim.value or "?")


def _with_symbolic_batch(model: ir.Model, names: Sequence[str]) -> tuple[ir.Model, frozenset[str]]:
    """A copy whose batched inputs (and outputs with the same static leading dim) have a symbolic batch.

    Intermediate shapes are dropped: they hold the old batch and ORT infers them again. Returns
    the outputs that must come back with the new batch as their leading dim.
    """
    copy = model.clone()  # shares the weight tensors: cheap, and external data stays where it is
    by_name = {v.name: v for v in graph_inputs(copy)}
    old_batch = _leading_dim(by_name[names[0]])
    for name in names:
        value = by_name[name]
        value.shape = ir.Shape([BATCH_DIM, *list(value.shape.dims)[1:]])
    batched_outputs = set()
    for value in copy.graph.outputs:
        if _leading_dim(value) == old_batch:
            value.shape = ir.Shape([BATCH_DIM, *list(value.shape.dims)[1:]])
            batched_outputs.add(value.name)
    for node in ir.traversal.RecursiveGraphIterator(copy.graph):
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None
    return copy, frozenset(batched_outputs)


def _random_feeds(
    model: ir.Model, shapes: Mapping[str, tuple[int, ...]], seed: int, batch: int,
    values: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded synthetic inputs (feeds.py): the same for every model with the same inputs at the same batch."""
    from .feeds import NonNumericInputError, check_input_values, synthetic_feeds

    fixed = check_input_values(model, values)  # InputValueError: the user's to fix, not a row's failure
    try:
        return synthetic_feeds(model, shapes, np.random.default_rng([seed, batch]), fixed)
    except NonNumericInputError as exc:
        raise _Unsupported(str(exc)) from None


def _ort_source(model: ir.Model, stack: contextlib.ExitStack) -> bytes | str:
    """Serialized bytes, or a temporary file when the model has external or over-2-GiB weights."""
    try:
        if needs_file(model):
            return str(stack.enter_context(temporary_path(model, external_data=True)))
        return to_proto(model).SerializeToString()
    except Exception as exc:  # serialization of a malformed graph
        raise _Unsupported(f"cannot serialize for ORT: {_one_line(exc)}") from None


def _add_costs(cand: _Candidate) -> None:
    from .analysis.cost import analyze_cost  # its own module; imported when first needed

    try:
        cost = analyze_cost(cand.model, cand.shapes)
    except OnnxCompressError as exc:
        cand.cost_note = f"no MACs: {_one_line(exc)}"
        return
    cand.macs = int(cost.stats.macs)
    cand.node_macs = {node.name: int(node.macs) for node in cost.nodes}
    unknown = sorted({node.op_type for node in cost.nodes if not node.known})
    if unknown:
        cand.macs_complete = False
        cand.cost_note = f"MACs leave out ops of unknown cost ({', '.join(unknown)}): no theoretical speedup"


def _session(source: bytes | str, providers: Sequence[str], threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    from .runtime import session_options

    # Failures come back as exceptions and become row reasons: no stderr logs (level 4).
    so = session_options(threads=threads, spinning=False, profile_prefix=profile_prefix, log_level=4)
    return ort.InferenceSession(source, so, providers=list(providers))


def _start(cand: _Candidate, providers: Sequence[str], threads: int, warmup: int, batch: int) -> None:
    """Create the session and warm it up; the first run also checks the outputs carry the batch."""
    if cand.failure is not None:
        return
    try:
        cand.session = _session(cand.source, providers, threads)
        cand.providers = tuple(cand.session.get_providers())
        outputs = cand.session.run(None, cand.feeds)
        _check_batched_outputs(cand, outputs, batch)
        for _ in range(warmup - 1):
            cand.session.run(None, cand.feeds)
    except _Unsupported as exc:
        cand.failure, cand.session = str(exc), None
    except Exception as exc:  # any ORT load or run failure makes only this row unsupported
        cand.failure, cand.session = f"ORT failed at batch {batch}: {_one_line(exc)}", None


def _check_batched_outputs(cand: _Candidate, outputs: Sequence[Any], batch: int) -> None:
    """A graph with a hard-coded batch (Reshape to [1, -1]) can run at another batch and compute nonsense."""
    names = [o.name for o in cand.session.get_outputs()]
    for name, value in zip(names, outputs, strict=True):
        shape = getattr(value, "shape", None)
        if name in cand.batched_outputs and shape is not None and (len(shape) == 0 or shape[0] != batch):
            raise _Unsupported(
                f"output '{name}' has shape {list(shape)} at batch {batch}: the graph hard-codes its batch size"
            )


def _time_interleaved(
    cands: Sequence[_Candidate], runs: int, batch: int, clock: Callable[[], float], tracker: _Tracker
) -> None:
    """Timed runs A B A B ...; a model that fails mid-way drops out with the reason."""
    gc_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed run would be charged to whichever model ran then
    try:
        for run in range(1, runs + 1):
            for cand in cands:
                if cand.failure is not None:
                    continue
                start = clock()
                try:
                    cand.session.run(None, cand.feeds)
                except Exception as exc:
                    cand.failure = f"ORT failed at batch {batch} during timing: {_one_line(exc)}"
                    tracker.dropped(runs - run + 1)
                    continue
                cand.samples.append(clock() - start)
                tracker.ran(cand.label, batch, run)
    finally:
        if gc_enabled:
            gc.enable()


def _rows(cands: Sequence[_Candidate], batch: int) -> list[BenchRow]:
    base = cands[0]
    base_timing = Timing.from_seconds(base.samples) if base.failure is None else None
    base_layers = {layer.kernel: layer for layer in base.layers if layer.kernel is not None}
    rows = []
    for cand in cands:
        timing = Timing.from_seconds(cand.samples) if cand.failure is None else None
        costed = base_timing is not None and timing is not None and base.macs_complete and cand.macs_complete
        theoretical = _ratio(base.macs, cand.macs) if costed else None
        measured = _ratio(base_timing.median_ms if base_timing else None, timing.median_ms if timing else None)
        rows.append(
            BenchRow(
                model=cand.label,
                batch=batch,
                supported=cand.failure is None,
                reason=cand.failure,
                input_shapes=cand.shapes,
                batch_rewritten=cand.rewritten,
                providers=cand.providers,
                timing=timing,
                macs=cand.macs,
                theoretical_speedup=theoretical,
                measured_speedup=measured,
                realization=_ratio(measured, theoretical),
                cost_note=cand.cost_note,
                layers=cand.layers if cand is base else _against_baseline(cand.layers, base_layers),
            )
        )
    return rows


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return float(num) / float(den)


def _against_baseline(layers: Sequence[LayerTime], base: Mapping[str, LayerTime]) -> tuple[LayerTime, ...]:
    """Per-layer speedups against the baseline's kernel of the same name (pruning keeps node names).

    A layer that became several (factorization writes `<name>_lowrank` before `<name>`) is compared
    as a whole: the kernels named after one baseline kernel are summed, time and MACs."""

    def origin(kernel: str | None) -> str | None:
        if kernel is None:
            return None
        if kernel in base:
            return kernel
        stem = kernel.split("_lowrank")[0]
        return stem if stem != kernel and stem in base else None

    totals: dict[str, list[float | None]] = {}
    for layer in layers:
        key = origin(layer.kernel)
        if key is not None:
            total = totals.setdefault(key, [0.0, 0])
            for i, part in enumerate((layer.time_ms, layer.macs)):  # an unknown part makes the total unknown
                total[i] = None if part is None or total[i] is None else total[i] + part
    out = []
    for layer in layers:
        key = origin(layer.kernel)
        if key is None:
            out.append(layer)
            continue
        match, (time_ms, macs) = base[key], totals[key]
        theoretical = _ratio(match.macs, macs)
        measured = _ratio(match.time_ms, time_ms)
        realization = _ratio(measured, theoretical)
        out.append(replace(layer, theoretical_speedup=theoretical, measured_speedup=measured, realization=realization))
    return tuple(out)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    for pattern in _ORT_ERROR_NOISE:
        text = pattern.sub("", text)
    return text[:MAX_REASON]


#: Parts of ORT's error text that say nothing to a user: status code, source file, C++ signature.
_ORT_ERROR_NOISE = (
    re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : "),
    re.compile(r"\S*onnxruntime_src/\S+:\d+\s*"),
    re.compile(r"onnxruntime::[\w:<>]+\([^()]*\)\s*"),
)


# --------------------------------------------------------------------------------------- profiling


@dataclass
class KernelTime:
    """One kernel (ORT node) of a profile: its durations in each profiled run, in microseconds."""

    name: str
    op_name: str
    provider: str | None
    per_run_us: list[float]


_KERNEL_SUFFIX = "_kernel_time"
#: Pieces ORT adds when it renames a node it fused or transformed: "fused fc/MatMulAddFusion",
#: "<output value>_nchwc", "<name>_token_3".
_ORT_NAME_PARTS = tuple(re.compile(p) for p in (r"^fused\s+", r"/\w*Fusion$", r"_nchwc$", r"_token_\d+$"))
#: Kernel op names that are a model op with a prefix or suffix (FusedConv, QLinearMatMul, MatMulInteger).
_KERNEL_OP_PREFIXES = ("NhwcFused", "Nhwc", "Fused", "QLinear", "DynamicQuantize")
_KERNEL_OP_SUFFIXES = ("Integer", "NBits")


def _profile(
    cand: _Candidate, batch: int, options: BenchOptions, providers: Sequence[str], threads: int, notes: list[str]
) -> None:
    """Per-layer times from a separate profiled session (profiling slows runs, so never the timed ones)."""
    try:
        with tempfile.TemporaryDirectory(prefix="onnxcompress-profile-") as tmp:
            session = _session(cand.source, providers, threads, profile_prefix=os.path.join(tmp, "profile"))
            for _ in range(max(1, options.warmup) + options.profile_runs):
                session.run(None, cand.feeds)
            trace = Path(session.end_profiling())
            events = json.loads(trace.read_text())
            del session
    except Exception as exc:
        notes.append(f"{cand.label} at batch {batch}: profiling failed: {_one_line(exc)}")
        return
    kernels = kernel_times(events, options.profile_runs)
    cand.layers = map_layers(kernels, cand.model, cand.node_macs if cand.macs is not None else None)


def kernel_times(events: Sequence[Mapping[str, Any]], runs: int) -> list[KernelTime]:
    """Per-kernel durations (us) in each of the last `runs` model runs of an ORT profile, in execution order."""
    model_runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )[-runs:]
    starts = [e["ts"] for e in model_runs]
    kernels: dict[str, KernelTime] = {}
    for event in sorted((e for e in events if e.get("cat") == "Node"), key=lambda e: e["ts"]):
        name = str(event.get("name", ""))
        if not name.endswith(_KERNEL_SUFFIX):
            continue
        index = bisect.bisect_right(starts, event["ts"]) - 1
        if index < 0 or event["ts"] > starts[index] + model_runs[index]["dur"]:
            continue  # a warm-up run
        name = name[: -len(_KERNEL_SUFFIX)]
        args = event.get("args", {})
        if name not in kernels:
            op_name, provider = str(args.get("op_name", "?")), args.get("provider")
            kernels[name] = KernelTime(name, op_name, provider, [0.0] * len(model_runs))
        kernel = kernels[name]
        kernel.per_run_us[index] += float(event["dur"])  # a kernel can run several times per run (loops)
    return list(kernels.values())


def map_layers(
    kernels: Sequence[KernelTime], model: ir.Model, node_macs: Mapping[str, int] | None
) -> tuple[LayerTime, ...]:
    """Match profiled kernels to model nodes: by name, then through ORT's renamings; list what is left.

    Claims go from the surest to the least sure, and a node is claimed once: exact names; then
    renamed kernels whose name leads straight to a node of the kernel's op; then renamed kernels
    that must be traced upstream through fused nodes (Conv <- BatchNorm <- Add <- Relu).
    """
    nodes = {node.name: node for node in ir.traversal.RecursiveGraphIterator(model.graph)}
    producers = {out.name: node for node in nodes.values() for out in node.outputs}
    claimed: set[str] = set()
    groups: dict[str, tuple[tuple[str, ...], str]] = {}
    anchors: dict[str, ir.Node | None] = {}
    for kernel in kernels:
        if kernel.name in nodes:
            groups[kernel.name] = ((kernel.name,), "exact")
            claimed.add(kernel.name)
        else:
            anchors[kernel.name] = _renamed_anchor(kernel.name, nodes, producers)
    direct = [k for k in kernels if k.name in anchors and _is_op(anchors[k.name], k.op_name)]
    traced = [k for k in kernels if k.name in anchors and not _is_op(anchors[k.name], k.op_name)]
    for kernel in direct + traced:
        anchor = anchors[kernel.name]
        members = _fused_path(anchor, _base_op(kernel.op_name), claimed) if anchor is not None else ()
        groups[kernel.name] = (members, "renamed" if members else "unmatched")
        claimed.update(members)

    layers = []
    for kernel in kernels:
        members, match = groups[kernel.name]
        time_ms = float(np.median(kernel.per_run_us)) / 1e3
        macs = sum(node_macs.get(n, 0) for n in members) if node_macs is not None and members else None
        gmacs = macs / (time_ms * 1e-3) / 1e9 if macs and time_ms > 0 else None
        layers.append(LayerTime(kernel.name, kernel.op_name, members, match, time_ms, macs, gmacs, kernel.provider))
    for name, node in nodes.items():
        if name not in claimed and node_macs is not None and node_macs.get(name, 0) > 0:
            layers.append(LayerTime(None, node.op_type, (name,), "absorbed", None, node_macs[name], None, None))
    return tuple(layers)


def _renamed_anchor(kernel_name: str, nodes: Mapping[str, ir.Node], producers: Mapping[str, ir.Node]) -> ir.Node | None:
    """The node an ORT-made kernel name comes from: ORT names fused kernels after a node or after the
    output value of the last fused node ("r_nchwc" for Conv+Relu writing "r")."""
    name = kernel_name
    for pattern in _ORT_NAME_PARTS:
        name = pattern.sub("", name)
    return nodes.get(name) or producers.get(name)


def _fused_path(anchor: ir.Node, base_op: str, claimed: set[str]) -> tuple[str, ...]:
    """Nodes from the nearest unclaimed upstream node of `base_op` down to `anchor` (breadth first, so
    a residual Add reaches its own Conv before the skip branch's); just the anchor if there is none."""
    if anchor.name in claimed:
        return ()
    if anchor.op_type == base_op:
        return (anchor.name,)
    parent: dict[ir.Node, ir.Node] = {}
    frontier = [anchor]
    for _ in range(FUSION_DEPTH):
        next_frontier = []
        for node in frontier:
            for value in node.inputs:
                producer = value.producer() if value is not None else None
                if producer is None or producer in parent or producer is anchor:
                    continue
                if producer.op_type == "Constant" or producer.name in claimed:
                    continue
                parent[producer] = node
                if producer.op_type == base_op:
                    path = [producer]
                    while path[-1] is not anchor:
                        path.append(parent[path[-1]])
                    return tuple(n.name for n in path)
                next_frontier.append(producer)
        frontier = next_frontier
    return (anchor.name,)


def _is_op(node: ir.Node | None, kernel_op: str) -> bool:
    return node is not None and node.op_type == _base_op(kernel_op)


def _base_op(op_name: str) -> str:
    for prefix in _KERNEL_OP_PREFIXES:
        if op_name.startswith(prefix) and len(op_name) > len(prefix):
            op_name = op_name[len(prefix) :]
            break
    for suffix in _KERNEL_OP_SUFFIXES:
        if op_name.endswith(suffix) and len(op_name) > len(suffix):
            op_name = op_name[: -len(suffix)]
            break
    return op_name


# --------------------------------------------------------------------------------------- rendering


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_table(report: BenchReport) -> Table:
    """Model, batch, median/p90 ms, MACs, theoretical/measured speedup and realization per row."""
    from rich.table import Table

    env = report.environment
    table = Table(
        title=f"Latency on {env.provider} ({env.threads} threads, ORT {env.onnxruntime}); baseline: {report.baseline}"
    )
    for column in ("model", "batch", "median ms", "p90 ms", "MACs", "theoretical x", "measured x", "realization"):
        table.add_column(column, justify="left" if column == "model" else "right")
    notes = [_row_note(row, env.requested_providers) for row in report.rows]
    if any(notes):
        table.add_column("note")
    for row, note in zip(report.rows, notes, strict=True):
        cells = [
            row.model,
            str(row.batch),
            _ms(row.timing.median_ms if row.timing else None),
            _ms(row.timing.p90_ms if row.timing else None),
            human(row.macs),
            _speedup(row.theoretical_speedup),
            _speedup(row.measured_speedup),
            "-" if row.realization is None else f"{row.realization:.0%}",
        ]
        table.add_row(*cells, *([note or ""] if any(notes) else []))
    return table


def _row_note(row: BenchRow, requested: Sequence[str]) -> str | None:
    parts = []
    if not row.supported:
        parts.append(f"unsupported: {row.reason}")
    if row.providers and requested and row.providers[0] != requested[0]:
        parts.append(f"runs on {', '.join(row.providers)}")  # the GPU provider fell back to CPU
    if row.batch_rewritten and row.supported:
        parts.append("batch dim made symbolic")
    if row.cost_note:
        parts.append(row.cost_note)
    return "; ".join(parts) or None


def render_layers(report: BenchReport, top: int = 15) -> list[Table]:
    """Per row with a profile: the `top` slowest kernels with their MACs and GMAC/s."""
    from rich.table import Table

    tables = []
    for row in report.rows:
        timed = sorted((layer for layer in row.layers if layer.time_ms is not None), key=lambda layer: -layer.time_ms)
        if not timed:
            continue
        total = sum(layer.time_ms for layer in timed)
        shown = min(top, len(timed))
        table = Table(title=f"Layers: {row.model} at batch {row.batch} (top {shown} of {len(timed)} kernels)")
        for column in ("kernel", "op", "model nodes", "match", "ms", "share", "MACs", "GMAC/s", "realization"):
            table.add_column(column, justify="left" if column in ("kernel", "op", "model nodes", "match") else "right")
        for layer in timed[:top]:
            table.add_row(
                layer.kernel or "",
                layer.op_name,
                ", ".join(layer.nodes) or "-",
                layer.match,
                _ms(layer.time_ms),
                f"{layer.time_ms / total:.0%}" if total else "-",
                human(layer.macs),
                "-" if layer.gmacs_per_s is None else f"{layer.gmacs_per_s:.1f}",
                "-" if layer.realization is None else f"{layer.realization:.0%}",
            )
        tables.append(table)
    return tables


def render_environment(report: BenchReport) -> Table:
    from rich.table import Table

    env = report.environment
    flags = ", ".join(f for f, present in env.cpu_flags.items() if present) or "none of interest"
    table = Table(title="Environment", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in (
        ("CPU", f"{env.cpu} ({env.physical_cores} physical / {env.logical_cores} logical cores)"),
        ("CPU flags", flags if env.cpu_flags else "not available on this platform"),
        ("onnxruntime", f"{env.onnxruntime}; providers {', '.join(env.requested_providers)}"),
        ("threads", f"intra-op {env.threads}, inter-op {env.inter_op_threads}, allow_spinning={env.allow_spinning}"),
        ("versions", f"python {env.python}, numpy {env.numpy}, onnx {env.onnx}"),
        ("runs", f"{report.options.runs} timed, {report.options.warmup} warm-up, interleaved"),
    ):
        table.add_row(key, value)
    for note in report.notes:
        table.add_row("note", note)
    return table


def render(report: BenchReport, layers: int = 15) -> list[Table]:
    """Everything the CLI prints: environment, the latency table, then per-layer tables when profiled."""
    return [render_environment(report), render_table(report), *render_layers(report, top=layers)]


@contextlib.contextmanager
def progress_bar(console: Console | None = None) -> Iterator[ProgressCallback]:
    """Progress over the timed runs (see progress.py); yields the callback to pass to `benchmark`."""
    from .progress import progress

    with progress("timing", console) as reporter:

        def update(event: BenchProgress) -> None:
            reporter.update(f"{event.model} @ batch {event.batch}", completed=event.done, total=event.total)

        yield update


__all__ = [
    "MIN_RUNS",
    "BenchEnvironment",
    "BenchOptions",
    "BenchProgress",
    "BenchReport",
    "BenchRow",
    "KernelTime",
    "LayerTime",
    "Timing",
    "benchmark",
    "environment",
    "kernel_times",
    "map_layers",
    "parse_batch_sizes",
    "physical_cores",
    "progress_bar",
    "render",
    "render_environment",
    "render_layers",
    "render_table",
    "session_providers",
]

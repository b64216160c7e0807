"""`benchmark`: every model at every batch size, timed interleaved against the first (the baseline)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from ..errors import OnnxCompressError
from ..host import physical_cores
from ..model import SOURCE_KEY, ModelLike, load
from .candidates import prepare
from .compare import batch_rows
from .environment import environment, session_providers
from .options import BenchOptions
from .profiling import profile
from .report import BenchReport, BenchRow, ProgressCallback
from .timing import Tracker, start, time_interleaved

SPINNING_NOTE = (
    "session.intra_op.allow_spinning=0: interleaved sessions with spinning intra-op threads "
    "starve each other on small machines"
)
GPU_COPY_NOTE = "GPU timings include copying inputs to and outputs from the device (session.run with numpy arrays)"
GPU_PROFILE_NOTE = "per-layer GPU times are ORT's host-side kernel times, not device execution times"


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
    tracker = Tracker(progress, len(options.batch_sizes) * len(labelled) * options.runs)
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
    from ..preflight import check_runnable, unsupported_nodes

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


def _bench_batch(
    labelled: Sequence[tuple[str, ir.Model]],
    batch: int,
    options: BenchOptions,
    requested: Sequence[str],
    threads: int,
    tracker: Tracker,
    clock: Callable[[], float],
    notes: list[str],
) -> list[BenchRow]:
    with contextlib.ExitStack() as stack:
        candidates = [prepare(label, model, batch, options, stack) for label, model in labelled]
        for cand in candidates:
            start(cand, requested, threads, options.warmup, batch)
        active = [c for c in candidates if c.failure is None]
        tracker.dropped(options.runs * (len(candidates) - len(active)))
        time_interleaved(active, options.runs, batch, clock, tracker)
        for cand in candidates:
            cand.session = None  # free each session before the next batch builds its own
        if options.profile:
            for cand in candidates:
                if cand.failure is None:
                    profile(cand, batch, options, requested, threads, notes)
    return batch_rows(candidates, batch)

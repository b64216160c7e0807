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

The modules, in the order a run uses them: `options` (BenchOptions), `environment` (providers, the
machine record), `candidates` (one model prepared for one batch), `timing` (sessions, interleaved
runs), `profiling` (per-layer times), `compare` (rows against the baseline), `report` (the data),
`run` (`benchmark` itself), `render` (tables and progress for people).
"""

from __future__ import annotations

from ..host import CPU_FLAGS_OF_INTEREST, cpu_description, logical_cores, physical_cores
from .candidates import INT_INPUT_HIGH
from .environment import environment, session_providers
from .options import MIN_RUNS, BenchOptions, parse_batch_sizes
from .profiling import KernelTime, kernel_times, map_layers
from .render import progress_bar, render, render_environment, render_layers, render_table
from .report import BenchEnvironment, BenchProgress, BenchReport, BenchRow, LayerTime, ProgressCallback, Timing
from .run import GPU_COPY_NOTE, GPU_PROFILE_NOTE, SPINNING_NOTE, benchmark

__all__ = [
    "CPU_FLAGS_OF_INTEREST",
    "GPU_COPY_NOTE",
    "GPU_PROFILE_NOTE",
    "INT_INPUT_HIGH",
    "MIN_RUNS",
    "SPINNING_NOTE",
    "BenchEnvironment",
    "BenchOptions",
    "BenchProgress",
    "BenchReport",
    "BenchRow",
    "KernelTime",
    "LayerTime",
    "ProgressCallback",
    "Timing",
    "benchmark",
    "cpu_description",
    "environment",
    "kernel_times",
    "logical_cores",
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

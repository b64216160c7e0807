"""A benchmark's results as data: per model and batch a `BenchRow` (timing, MACs, speedups, per-layer
times), the environment, and the options it ran with; `BenchProgress` is what the progress callback
gets. Rendering is in bench/render.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..report import to_jsonable
from .options import BenchOptions


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

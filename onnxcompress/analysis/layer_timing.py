"""Time two small models against each other on ONNX Runtime: a layer and its replacement.

The protocol is the benchmark's (ARCHITECTURE.md, "Measuring") scaled down to single layers: one session per
model with fixed intra-op threads (the physical cores by default, as in the benchmarks), one
inter-op thread, ORT_ENABLE_ALL, intra-op spinning off (interleaved sessions starve each other
otherwise), warm-up runs, then timed runs interleaved A B A B ... and the ratio of the medians.
Small layers run in microseconds, so the number of timed runs grows until both models have been
timed for at least `min_seconds` (bounded by `max_runs`).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .. import runtime
from ..host import physical_cores
from ..model import resolve_input_shapes

#: Fewer timed runs give medians too noisy to compare two layers by (bench.MIN_RUNS).
MIN_RUNS = 20
#: More runs than this add little once `min_seconds` is reached.
MAX_RUNS = 400
#: Timed seconds per model at least, so microsecond layers get enough runs.
MIN_SECONDS = 0.2
WARMUP = 3


@dataclass(frozen=True)
class PairTiming:
    """Median latency of a baseline and a candidate, timed interleaved in one process."""

    baseline_ms: float
    candidate_ms: float
    runs: int

    @property
    def speedup(self) -> float:
        """Baseline median / candidate median: above 1 means the candidate is faster."""
        return self.baseline_ms / self.candidate_ms if self.candidate_ms > 0 else float("inf")


def random_feeds(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic inputs at the model's static input shapes (feeds.py: integers read from the graph, so
    ids index their tables and a branch condition holds; timing does not depend on float values)."""
    from ..feeds import synthetic_feeds

    return synthetic_feeds(model, resolve_input_shapes(model), np.random.default_rng(seed))


def time_pair(
    baseline: ir.Model,
    candidate: ir.Model,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
    warmup: int = WARMUP,
    min_runs: int = MIN_RUNS,
    max_runs: int = MAX_RUNS,
    min_seconds: float = MIN_SECONDS,
) -> PairTiming:
    """Time `baseline` and `candidate` (same inputs) interleaved; medians in milliseconds."""
    options = runtime.session_options(threads=threads or physical_cores(), spinning=False)
    sessions = [runtime.session(m, provider=provider, options=options) for m in (baseline, candidate)]
    feeds = dict(feeds) if feeds is not None else random_feeds(baseline)
    for sess in sessions:
        for _ in range(max(warmup, 1)):
            sess.run(None, feeds)
    samples: list[list[float]] = [[], []]
    gc_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed run would be charged to whichever model ran then
    try:
        runs = 0
        while runs < max_runs and (runs < min_runs or min(sum(s) for s in samples) < min_seconds):
            for sess, times in zip(sessions, samples):
                start = time.perf_counter()
                sess.run(None, feeds)
                times.append(time.perf_counter() - start)
            runs += 1
    finally:
        if gc_enabled:
            gc.enable()
    return PairTiming(float(np.median(samples[0])) * 1e3, float(np.median(samples[1])) * 1e3, runs)


__all__ = ["PairTiming", "random_feeds", "time_pair"]

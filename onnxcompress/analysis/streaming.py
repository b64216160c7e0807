"""Run the calibration data through ONNX Runtime once, fetching intermediate values, in bounded memory.

Every statistics collector (ranges, histograms, channel means) reduces each batch as it arrives, so
what bounds memory is one run: every fetched value of every sample in it is alive at once (16
EfficientNet-Lite1 samples fetch 2.6 GB of activations). So the first sample is run a few values
at a time to learn each value's size, then runs are sized to stay under a budget: several samples
per run when a sample is small, one sample and a subset of the values per run when it is large.

Every part of a batch comes with the batch's attention mask (feeds.mask_inputs; None without one),
so token statistics leave padding out without each collector fetching and carrying the mask itself.

`reduce_values` feeds those batches to a mergeable reducer (histograms, channel sums), in this
process or, when the calibration data carries an engine (distributed.RayEngine), on shards of the
same batches whose results are merged in sample order: the same statistics, bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import onnx_ir as ir

from .. import runtime
from ..calibration import Calibration, batch_size_for
from ..feeds import feed_mask, mask_inputs
from ..model import load

#: Bytes of fetched values per run that runs are sized to stay under (a single value may exceed it).
FETCH_BUDGET_BYTES = 64 * 2**20
#: Values fetched per run while their sizes are not yet known (the first sample).
PROBE_GROUP = 16

Values = dict[str, np.ndarray]
#: (new samples, values, the batch's attention mask or None): one part of a batch.
Part = tuple[int, Values, "np.ndarray | None"]


@dataclass(frozen=True)
class RunPlan:
    """How the samples after the first run go through ORT: `batch` samples per run (the last may be
    short), the values fetched in `groups` (one run each)."""

    batch: int
    groups: tuple[tuple[str, ...], ...]


class Fetcher:
    """One ORT session of `model` with the wanted values added as outputs (CPU arena off); the
    model's attention mask inputs are read from the feeds of every batch."""

    def __init__(self, model: ir.Model | str | os.PathLike, names: Sequence[str], threads: int | None = None) -> None:
        # A path is a model written for a statistics run (distributed.RayEngine): the outputs it added may
        # have no type, which load's checks refuse and ORT accepts.
        probe = ir.load(os.path.abspath(model)) if isinstance(model, (str, os.PathLike)) else load(model)
        inputs = {v.name for v in probe.graph.inputs}
        produced = {v.name: v for n in probe.graph for v in n.outputs}
        outputs = {v.name for v in probe.graph.outputs}
        self.fixed = batch_size_for(probe, 0)  # an input that fixes its batch dimension leaves no choice
        self.fetched = list(dict.fromkeys(n for n in names if n in produced))
        self.fed = [n for n in dict.fromkeys(names) if n in inputs and n not in produced]
        self.masks = mask_inputs(probe)
        added = [name for name in self.fetched if name not in outputs]
        for name in added:
            probe.graph.outputs.append(produced[name])
        self.model = probe  # what the session runs: `model` with the fetched values as outputs
        options = runtime.session_options(spinning=False, threads=threads)
        options.enable_cpu_mem_arena = False  # an arena keeps the largest run's memory for the whole pass
        # A file that already outputs every fetched value is run as it is, not through a temporary copy.
        run = model if isinstance(model, (str, os.PathLike)) and not added else probe
        self.session = runtime.session(run, options=options) if self.fetched else None
        self.sizes: dict[str, int] = {}

    def parts(self, feeds: Values, groups: Sequence[Sequence[str]]) -> Iterator[Part]:
        """One batch: its sample count and inputs with the first group's values, then 0 and each other
        group's; every part with the batch's mask (later parts carry no inputs of their own)."""
        count = len(next(iter(feeds.values())))
        mask = feed_mask(feeds, self.masks)
        yield count, {**{n: feeds[n] for n in self.fed}, **self._run(feeds, groups[0] if groups else ())}, mask
        for group in groups[1:]:
            yield 0, self._run(feeds, group), mask

    def probe(self, first: Values) -> Iterator[Part]:
        """The first batch, PROBE_GROUP values per run, learning each value's size."""
        groups = [self.fetched[i:i + PROBE_GROUP] for i in range(0, len(self.fetched), PROBE_GROUP)]
        for count, values, mask in self.parts(first, groups):
            self.sizes.update((n, v.nbytes) for n, v in values.items() if n not in self.fed)
            yield count, values, mask

    def plan(self, first_count: int, batch_size: int, budget_bytes: int) -> RunPlan:
        """Runs for the rest of the data, from the sizes the probe measured."""
        per_sample = max(1, sum(self.sizes.values()) // first_count)
        batch = self.fixed or max(1, min(batch_size, budget_bytes // per_sample))
        sizes = {n: s * batch // first_count for n, s in self.sizes.items()}
        return RunPlan(batch, tuple(tuple(g) for g in _groups(self.fetched, sizes, budget_bytes)))

    def run_all(self, calibration: Calibration, first: Values, batch_size: int, budget_bytes: int,
                total: int) -> Iterator[Part]:
        """The opening batch, probed, then samples up to `total` in runs sized by what the probe measured
        (planned only once the probe has run: a plan without sizes would fetch everything at once)."""
        yield from self.probe(first)
        count = len(next(iter(first.values())))
        yield from self.stream(calibration, self.plan(count, batch_size, budget_bytes), count, total)

    def stream(self, calibration: Calibration, plan: RunPlan, start: int = 0,
               stop: int | None = None) -> Iterator[Part]:
        """Samples `start` .. `stop` in runs of the plan."""
        for feeds in calibration.batches(plan.batch, limit=stop, start=start):
            yield from self.parts(feeds, plan.groups)

    def _run(self, feeds: Values, group: Sequence[str]) -> Values:
        return dict(zip(group, self.session.run(list(group), feeds))) if group else {}


def opening(model: ir.Model, calibration: Calibration, total: int) -> Values | None:
    """The first run's feeds: one sample, or the model's fixed batch (None without samples)."""
    return next(calibration.batches(batch_size_for(model, 0) or 1, limit=total), None)


def stream_values(
    model: ir.Model,
    names: Sequence[str],
    calibration: Calibration,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    budget_bytes: int | None = None,
) -> Iterator[Part]:
    """(new samples, {name: value}, mask) over the first `limit` calibration samples. A batch whose
    values come in several runs yields its sample count with the first part and 0 with the others.
    `names` are graph inputs (taken from the feeds) or node outputs (fetched); unknown names are left
    out. `mask`: the batch's attention mask input (feeds.mask_inputs), None when the model has none."""
    budget_bytes = FETCH_BUDGET_BYTES if budget_bytes is None else budget_bytes
    total = calibration.num_samples if limit is None else min(limit, calibration.num_samples)
    first = opening(model, calibration, total)
    if first is None:
        return
    yield from Fetcher(model, names).run_all(calibration, first, batch_size, budget_bytes, total)


class Reducer(Protocol):
    """Statistics folded batch by batch. `merge(later)` must equal feeding `later`'s batches after
    this one's; `fresh()` is an empty reducer for a shard that starts after the first sample."""

    samples: int

    def add(self, count: int, values: Values, mask: np.ndarray | None) -> None: ...

    def merge(self, later: Reducer) -> Reducer: ...

    def fresh(self) -> Reducer: ...


R = TypeVar("R", bound=Reducer)


def reduce_values(model: ir.Model, names: Sequence[str], calibration: Calibration, reducer: R, *,
                  batch_size: int = 16, limit: int | None = None) -> R:
    """`reducer` fed every batch of `stream_values`: here, or on the calibration's engine (Ray)."""
    if calibration.engine is not None:
        return calibration.engine.reduce(model, names, calibration, reducer, batch_size=batch_size, limit=limit)
    for count, values, mask in stream_values(model, names, calibration, batch_size=batch_size, limit=limit):
        reducer.add(count, values, mask)
    return reducer


def _groups(names: Sequence[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    """`names` in order, cut into runs whose fetched bytes stay under `budget` (at least one each)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        if groups[-1] and used + sizes.get(name, 0) > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += sizes.get(name, 0)
    return groups if groups[0] else []


__all__ = ["FETCH_BUDGET_BYTES", "Fetcher", "Part", "Reducer", "RunPlan", "reduce_values", "stream_values"]

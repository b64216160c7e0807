"""Run the calibration data through ONNX Runtime once, fetching intermediate values, in bounded memory.

Every statistics collector (ranges, histograms, channel means) reduces each batch as it arrives, so
what bounds memory is one run: every fetched value of every sample in it is alive at once (16
EfficientNet-Lite1 samples fetch 2.6 GB of activations). So the first sample is run a few values
at a time to learn each value's size, then runs are sized to stay under a budget: several samples
per run when a sample is small, one sample and a subset of the values per run when it is large.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import onnx_ir as ir

from .. import runtime
from ..calibration import Calibration, batch_size_for
from ..model import load

#: Bytes of fetched values per run that runs are sized to stay under (a single value may exceed it).
FETCH_BUDGET_BYTES = 64 * 2**20
#: Values fetched per run while their sizes are not yet known (the first sample).
PROBE_GROUP = 16


def stream_values(
    model: ir.Model,
    names: Sequence[str],
    calibration: Calibration,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    budget_bytes: int | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(new samples, {name: value}) over the first `limit` calibration samples. A batch whose values
    come in several runs yields its sample count with the first part and 0 with the others. `names`
    are graph inputs (taken from the feeds) or node outputs (fetched); unknown names are left out."""
    budget_bytes = FETCH_BUDGET_BYTES if budget_bytes is None else budget_bytes
    probe = load(model)
    inputs = {v.name for v in probe.graph.inputs}
    produced = {v.name: v for n in probe.graph for v in n.outputs}
    outputs = {v.name for v in probe.graph.outputs}
    fetched = list(dict.fromkeys(n for n in names if n in produced))
    fed = [n for n in dict.fromkeys(names) if n in inputs and n not in produced]
    for name in fetched:
        if name not in outputs:
            probe.graph.outputs.append(produced[name])
    options = runtime.session_options(spinning=False)
    options.enable_cpu_mem_arena = False  # an arena keeps the largest run's memory for the whole pass
    sess = runtime.session(probe, options=options) if fetched else None
    del probe

    def run(feeds: dict[str, np.ndarray], group: Sequence[str]) -> dict[str, np.ndarray]:
        return dict(zip(group, sess.run(list(group), feeds))) if group else {}

    def parts(feeds: dict[str, np.ndarray], groups: list[list[str]]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        count = len(next(iter(feeds.values())))
        yield count, {**{n: feeds[n] for n in fed}, **run(feeds, groups[0] if groups else [])}
        for group in groups[1:]:
            yield 0, run(feeds, group)

    total = calibration.num_samples if limit is None else min(limit, calibration.num_samples)
    fixed = batch_size_for(model, 0)  # an input that fixes its batch dimension leaves no choice
    first = next(calibration.batches(fixed or 1, limit=total), None)
    if first is None:
        return
    sizes: dict[str, int] = {}
    probing = [fetched[i:i + PROBE_GROUP] for i in range(0, len(fetched), PROBE_GROUP)]
    for count, values in parts(first, probing):
        sizes.update((n, v.nbytes) for n, v in values.items() if n in produced)
        yield count, values
    per_sample = max(1, sum(sizes.values()) // len(next(iter(first.values()))))
    batch = fixed or max(1, min(batch_size, budget_bytes // per_sample))
    groups = _groups(fetched, {n: s * batch // len(next(iter(first.values()))) for n, s in sizes.items()}, budget_bytes)
    for feeds in calibration.batches(batch, limit=total, start=len(next(iter(first.values())))):
        yield from parts(feeds, groups)


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


__all__ = ["FETCH_BUDGET_BYTES", "stream_values"]

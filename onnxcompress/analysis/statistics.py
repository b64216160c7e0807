"""One statistics engine: what passes need of one model state over the calibration data, from one run.

Passes declare their needs as `Request`s (per-channel statistics, histograms; over the calibration
data or the first samples of it) and `Statistics.gather` serves all of them from one streaming run
of the model (analysis/streaming.py: one ORT session, bounded memory). Results are kept per model
state (a hash of the graph and its weights) and data, so a later pass, or a later search candidate
on the same model, gets them without running the model again.

A request over the first `limit` samples shares the run of a longer one: its reducer gets the batches
before its limit and the first rows of the batch that crosses it, which are the batches its own run
would have had (streaming runs start with one sample, then go on in runs of the same size). When a
fetched value does not have the samples on its first axis, that request gets a run of its own. On a
calibration engine (Ray) every request is reduced there on its own: the engine shards one reducer.
A request may bring a reducer of its own kind (int8's sampled MatMul input rows): fed the same parts.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx_ir as ir

from ..calibration import Calibration, batch_size_for
from .activations import ActivationStats
from .histograms import Histograms
from .streaming import FETCH_BUDGET_BYTES, Fetcher, Values, opening, reduce_values

#: Model states whose statistics are kept (a search measures a few candidates at a time).
KEPT_STATES = 8


@dataclass
class Request:
    """Statistics one consumer needs of a model over `calibration` (its first `limit` samples):
    per-channel statistics of `channels` (value -> channel axis), `bins`-bin histograms of `histograms`,
    and a statistic of its own kind: `reducer()` makes one (add(count, values, mask)) that reads
    `values`; `kind` names it for the cache (with the same `values`, the same statistic)."""

    calibration: Calibration
    channels: Mapping[str, int] = field(default_factory=dict)
    histograms: Sequence[str] = ()
    limit: int | None = None
    bins: int = 2048
    batch_size: int = 16
    reducer: Callable[[], Any] | None = None
    values: Sequence[str] = ()
    kind: Hashable = None

    @property
    def span(self) -> int:
        n = self.calibration.num_samples
        return n if self.limit is None else min(self.limit, n)


@dataclass
class Gathered:
    """The channel statistics and histograms of one request (a streaming.Reducer of both)."""

    channels: ActivationStats
    histograms: Histograms
    custom: Any = None  # the request's own reducer, when it has one

    def add(self, count: int, values: Values, mask: np.ndarray | None) -> None:
        self.channels.add(count, values, mask)
        self.histograms.add(count, values, mask)
        if self.custom is not None:
            self.custom.add(count, values, mask)


def model_state(model: ir.Model) -> str:
    """A hash of what the model computes: its nodes (subgraphs included), inputs, outputs, opsets
    and weights. Equal models give equal hashes, whichever object holds them."""
    h = hashlib.sha256()
    h.update(repr(sorted(model.opset_imports.items())).encode())
    h.update(repr([(v.name, str(v.dtype), str(v.shape)) for v in model.graph.inputs]).encode())
    h.update(repr([v.name for v in model.graph.outputs]).encode())
    for node in model.graph:
        h.update(ir.serde.serialize_node(node).SerializeToString(deterministic=True))
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        h.update(f"{name}:{None if tensor is None else (tensor.dtype, tuple(tensor.shape))}".encode())
        if tensor is not None:
            h.update(tensor.tobytes())
    return h.hexdigest()


def _data_key(calibration: Calibration) -> tuple:
    """Which samples a calibration holds, up to their count: two keys are equal when one holds the
    first samples of the other (Calibration.samples(0, n) and split() give views of the same arrays)."""
    arrays = tuple((k, v.__array_interface__["data"][0], v.strides, v.dtype.str, v.shape[1:])
                   for k, v in sorted(calibration.arrays.items()))
    return arrays, calibration.scalars, id(calibration.engine)


class Statistics:
    """Statistics per model state and calibration data, gathered in one run per state (see the module
    docstring); `runs` counts the streaming runs made, `served` the requests answered from the cache."""

    def __init__(self, kept_states: int = KEPT_STATES) -> None:
        self._kept = kept_states
        self._states: OrderedDict[str, list[tuple[tuple, Request, Gathered]]] = OrderedDict()
        self.runs = 0
        self.served = 0
        # What later consumers will ask of a state (model -> requests), gathered in the same run when a
        # state is run anyway: a search prunes the candidate whose int8 statistics it just gathered.
        self.ahead: list[Callable[[ir.Model], Sequence[Request]]] = []

    def gather(self, model: ir.Model, requests: Sequence[Request]) -> list[Gathered]:
        """Each request's statistics of `model`: from the cache, or from one run for all the others
        (and for what `ahead` says later consumers will ask of this state)."""
        state = model_state(model)
        entries = self._states.setdefault(state, [])
        self._states.move_to_end(state)
        while len(self._states) > self._kept:
            self._states.popitem(last=False)
        key = lambda r: (_data_key(r.calibration), batch_size_for(model, r.batch_size))  # noqa: E731
        found = [_lookup(entries, key(r), r) for r in requests]
        self.served += sum(f is not None for f in found)
        missing = [r for r, f in zip(requests, found) if f is None]
        if missing:
            later = [r for r in self._anticipated(model) if _lookup(entries, key(r), r) is None
                     and not any(key(m) == key(r) and _covers(m, r) for m in missing)]
            run = [*missing, *later]
            entries.extend((key(r), r, g) for r, g in zip(run, self._run(model, run, [key(r) for r in run])))
        return [f if f is not None else _lookup(entries, key(r), r) for r, f in zip(requests, found)]

    def _anticipated(self, model: ir.Model) -> list[Request]:
        requests = []
        for ahead in self.ahead:
            try:
                requests += ahead(model)
            except Exception:  # only a guess at later needs: where it fails, the later consumer asks itself
                continue
        return requests

    def channels(self, model: ir.Model, axes: Mapping[str, int], calibration: Calibration, *,
                 limit: int | None = None, batch_size: int = 16) -> ActivationStats:
        request = Request(calibration, channels=dict(axes), limit=limit, batch_size=batch_size)
        return self.gather(model, [request])[0].channels

    def histograms(self, model: ir.Model, names: Sequence[str], calibration: Calibration, *,
                   bins: int = 2048, limit: int | None = None, batch_size: int = 16) -> Histograms:
        request = Request(calibration, histograms=list(names), limit=limit, bins=bins, batch_size=batch_size)
        return self.gather(model, [request])[0].histograms

    def _run(self, model: ir.Model, requests: list[Request], keys: list[tuple]) -> list[Gathered]:
        """Fresh statistics for `requests`: one run per group that shares data and run size."""
        results: dict[int, Gathered] = {}
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        for indices in groups.values():
            if requests[indices[0]].calibration.engine is not None:
                for i in indices:  # the engine shards one reducer per job
                    results[i] = self._on_engine(model, requests[i])
                continue
            group = {i: requests[i] for i in indices}
            uncut = self._shared_run(model, group, results)
            for i in uncut:  # a value without the samples on its first axis: a run of its own
                self._shared_run(model, {i: requests[i]}, results)
        return [results[i] for i in range(len(requests))]

    def _on_engine(self, model: ir.Model, request: Request) -> Gathered:
        """`request` reduced on its calibration's engine: channel statistics and histograms each in a
        job; a statistic of its own kind, which need not merge, in this process."""
        gathered = _empty(request)
        if request.reducer is not None:
            self.runs += 1
            local = Request(replace(request.calibration, engine=None), values=request.values, limit=request.limit,
                            batch_size=request.batch_size, reducer=request.reducer, kind=request.kind)
            results: dict[int, Gathered] = {}
            self._shared_run(model, {0: local}, results)
            gathered.custom = results[0].custom
        kw = {"batch_size": request.batch_size, "limit": request.limit}
        if request.channels:
            self.runs += 1
            gathered.channels = reduce_values(model, list(request.channels), request.calibration, gathered.channels, **kw)
        if request.histograms:
            self.runs += 1
            gathered.histograms = reduce_values(model, list(request.histograms), request.calibration, gathered.histograms,
                                                **kw)
        return gathered

    def _shared_run(self, model: ir.Model, group: dict[int, Request], results: dict[int, Gathered]) -> list[int]:
        """One streaming run for `group`, into `results`; returns the requests whose limit could not be
        cut from it."""
        longest = max(group.values(), key=lambda r: r.span)
        reducers = {i: _empty(r) for i, r in group.items()}
        uncut: set[int] = set()
        first = opening(model, longest.calibration, longest.span)
        if first is not None:
            self.runs += 1
            fetcher = Fetcher(model, list(dict.fromkeys(n for r in group.values() for n in _names(r))))
            count = len(next(iter(first.values())))
            parts = fetcher.run_all(longest.calibration, first, longest.batch_size, FETCH_BUDGET_BYTES, longest.span)
            probe_dims: dict[str, int] = {}  # first-axis length of each value in the opening batch
            for start, size, n, values, mask in _numbered(parts):
                if start == 0:
                    probe_dims.update((name, np.shape(a)[0] if np.ndim(a) else -1) for name, a in values.items())
                for i, request in group.items():
                    if i in uncut or start >= request.span:
                        continue
                    if start + size <= request.span:
                        reducers[i].add(n, values, mask)
                        continue
                    rows = request.span - start  # the batch that crosses the limit: its first rows
                    cut = _first_rows(values, mask, rows, size, {k: probe_dims.get(k) == count for k in values})
                    if cut is None:
                        uncut.add(i)
                    else:
                        reducers[i].add(rows if n else 0, *cut)
        results.update((i, reducers[i]) for i in group if i not in uncut)
        return sorted(uncut)


def _lookup(entries: list, key: tuple, request: Request) -> Gathered | None:
    """A cached result that covers `request` (same data and run size), cut to its values."""
    return next((_cut(got, request) for known, asked, got in entries if known == key and _covers(asked, request)), None)


def _covers(asked: Request, request: Request) -> bool:
    """Whether what `asked` gathers holds all `request` needs, given the same data and run size."""
    # a statistic of its own kind may depend on the whole list of values (a generator per value, by position)
    custom = request.reducer is None or (asked.kind == request.kind and list(request.values) == list(asked.values))
    return (asked.span, asked.bins) == (request.span, request.bins) and set(request.histograms) <= set(asked.histograms) \
        and all(asked.channels.get(n) == a for n, a in request.channels.items()) and custom


def _numbered(parts: Iterator) -> Iterator[tuple[int, int, int, Values, np.ndarray | None]]:
    """(first sample of the part's batch, the batch's samples, new samples, values, mask) per part."""
    start, size = 0, 0
    for count, values, mask in parts:
        if count:
            start, size = start + size, count
        yield start, size, count, values, mask


def _first_rows(values: Values, mask: np.ndarray | None, rows: int, size: int, per_sample: Mapping[str, bool]):
    """(values, mask) cut to the batch's first `rows` samples, or None unless every value's first
    axis is the samples: `size` long here and, in `per_sample`, as long as the opening batch there
    (a value whose first axis is a fixed size is as long in both, unless the batches are equal)."""
    if any(np.ndim(a) == 0 or a.shape[0] != size or not per_sample[name] for name, a in values.items()):
        return None
    return {name: a[:rows] for name, a in values.items()}, (None if mask is None else mask[:rows])


def _names(request: Request) -> list[str]:
    return list(dict.fromkeys([*request.channels, *request.histograms, *request.values]))


def _empty(request: Request) -> Gathered:
    return Gathered(ActivationStats(source=request.calibration.source, axes=dict(request.channels)),
                    Histograms(request.bins, names=frozenset(request.histograms)),
                    None if request.reducer is None else request.reducer())


def _cut(got: Gathered, request: Request) -> Gathered:
    """`got` with only the values `request` asked for."""
    channels = ActivationStats({n: got.channels.values[n] for n in request.channels if n in got.channels.values},
                               got.channels.samples, got.channels.source, dict(request.channels))
    hists = Histograms(request.bins, {n: got.histograms.values[n] for n in request.histograms
                                      if n in got.histograms.values}, got.histograms.samples, frozenset(request.histograms))
    return Gathered(channels, hists, got.custom)


__all__ = ["KEPT_STATES", "Gathered", "Request", "Statistics", "model_state"]

"""One model made ready to time at one batch size: feed shapes (a static batch dim made symbolic when
it must change), seeded synthetic inputs, the bytes or file ORT loads, and MACs at those shapes.
A model that cannot be prepared gets its reason (`Unsupported`), never an exception to the caller."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ..errors import OnnxCompressError
from ..model import graph_inputs, needs_file, resolve_input_shapes, temporary_path, to_proto
from .options import BenchOptions
from .report import LayerTime

#: Integer inputs the graph says nothing about are drawn from {0, 1}: valid indices and flags for any
#: table size (feeds.py reads ids, masks and compared values from the graph first).
INT_INPUT_HIGH = 2
#: Name given to a static batch dimension rewritten as symbolic.
BATCH_DIM = "batch"
#: Longest reason or note kept (ORT error messages can run to kilobytes).
MAX_REASON = 300


class Unsupported(Exception):
    """A model cannot run at a batch size: recorded in its row, never raised to the caller."""


@dataclass
class Candidate:
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


def prepare(label: str, model: ir.Model, batch: int, options: BenchOptions, stack: contextlib.ExitStack) -> Candidate:
    shapes, to_rewrite = _batch_shapes(model, batch, options.input_shapes)  # InputShapeError: the user's to fix
    cand = Candidate(label, model, shapes, rewritten=bool(to_rewrite))
    try:
        if to_rewrite:
            cand.model, cand.batched_outputs = with_symbolic_batch(model, to_rewrite)
        cand.feeds = random_feeds(cand.model, shapes, options.seed, batch, options.input_values)
        cand.source = _ort_source(cand.model, stack)
    except Unsupported as exc:
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


def with_symbolic_batch(model: ir.Model, names: Sequence[str]) -> tuple[ir.Model, frozenset[str]]:
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


def random_feeds(
    model: ir.Model, shapes: Mapping[str, tuple[int, ...]], seed: int, batch: int,
    values: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded synthetic inputs (feeds.py): the same for every model with the same inputs at the same batch."""
    from ..feeds import NonNumericInputError, check_input_values, synthetic_feeds

    fixed = check_input_values(model, values)  # InputValueError: the user's to fix, not a row's failure
    try:
        return synthetic_feeds(model, shapes, np.random.default_rng([seed, batch]), fixed)
    except NonNumericInputError as exc:
        raise Unsupported(str(exc)) from None


def _ort_source(model: ir.Model, stack: contextlib.ExitStack) -> bytes | str:
    """Serialized bytes, or a temporary file when the model has external or over-2-GiB weights."""
    try:
        if needs_file(model):
            return str(stack.enter_context(temporary_path(model, external_data=True)))
        return to_proto(model).SerializeToString()
    except Exception as exc:  # serialization of a malformed graph
        raise Unsupported(f"cannot serialize for ORT: {one_line(exc)}") from None


def _add_costs(cand: Candidate) -> None:
    from ..analysis.cost import analyze_cost  # its own module; imported when first needed

    try:
        cost = analyze_cost(cand.model, cand.shapes)
    except OnnxCompressError as exc:
        cand.cost_note = f"no MACs: {one_line(exc)}"
        return
    cand.macs = int(cost.stats.macs)
    cand.node_macs = {node.name: int(node.macs) for node in cost.nodes}
    unknown = sorted({node.op_type for node in cost.nodes if not node.known})
    if unknown:
        cand.macs_complete = False
        cand.cost_note = f"MACs leave out ops of unknown cost ({', '.join(unknown)}): no theoretical speedup"


def one_line(exc: BaseException) -> str:
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

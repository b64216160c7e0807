"""Synthetic inputs: values a model can run on when no real data is given, and `--input NAME=VALUE`.

Floats are drawn from a standard normal. Integer inputs are rarely noise: they are token ids,
masks, sample rates, lengths, flags a graph branches on, so each is read from the graph first:

- a value the user fixed (`--input sr=16000`): that value, broadcast to the input's shape;
- named like a mask (`attention_mask`, `*mask*`): all ones (every position attends);
- named like token type / segment ids: zeros (one-segment text, what most sentences are);
- named like position ids: 0, 1, 2, ... along the last axis;
- compared against a constant (Equal, Greater, ... directly or through Cast/Squeeze/Reshape):
  a value that makes the comparison hold: `Equal(sr, 16000)` gives 16000;
- indices of a Gather on a table (token ids into an embedding): ids drawn uniformly from the
  table's rows, read from the table's shape;
- a scalar named like a sample rate (`sr`, `sample_rate`): 16000;
- named like a length (`length`, `*_lens`): the longest non-batch dimension of the other inputs,
  so a length never exceeds what is fed;
- any other integer: 0 or 1 (valid indices and flags for any table size), bools: coin flips.

Fidelity measured on these inputs is still measured on synthetic data, and says so (the source
string starts with "random").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from .errors import InputShapeError
from .model import graph_inputs, input_dtype

#: Sample rate given to a scalar sample-rate input that the graph compares with nothing.
DEFAULT_SAMPLE_RATE = 16000
#: Ops a value passes through unchanged in value (for finding what an input is compared to or indexes).
_PASS_THROUGH = frozenset({"Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Expand"})
#: Comparison op -> offset from the constant that makes `input OP constant` true.
_COMPARISONS = {"Equal": 0, "GreaterOrEqual": 0, "LessOrEqual": 0, "Greater": 1, "Less": -1}
_MASK = re.compile(r"mask", re.I)
_TOKEN_TYPE = re.compile(r"token_?type|segment", re.I)
_POSITION = re.compile(r"position|pos_?ids", re.I)
_SAMPLE_RATE = re.compile(r"^(sr|sample_?rate|sampling_?rate|rate)$", re.I)
_LENGTH = re.compile(r"(^|_)(len|lens|length|lengths)($|_)", re.I)
_SPEC = re.compile(r"^(?P<name>[^=]+)=(?P<value>[^=]+)$")


class InputValueError(InputShapeError):
    """A `--input NAME=VALUE` that names no model input or holds no valid value for it."""


class NonNumericInputError(InputShapeError):
    """An input of a type no synthetic value can be made for (strings, ...)."""


def parse_input_values(specs: Iterable[str] | None) -> dict[str, str]:
    """`["sr=16000", "mask=1"]` -> {"sr": "16000", "mask": "1"}; the values are checked against the
    model's inputs by `check_input_values`."""
    values: dict[str, str] = {}
    for spec in specs or ():
        match = _SPEC.match(spec.strip())
        if not match or not match["name"].strip() or not match["value"].strip():
            raise InputValueError(f"bad --input '{spec}': expected NAME=VALUE, e.g. sr=16000")
        values[match["name"].strip()] = match["value"].strip()
    return values


def check_input_values(model: ir.Model, values: Mapping[str, object] | None) -> dict[str, np.ndarray]:
    """Each fixed value as a 0-d array of its input's dtype; InputValueError for an unknown input
    or a value the dtype cannot hold (text that is no number, a fraction for an integer input, ...)."""
    inputs = {v.name: v for v in graph_inputs(model)}
    checked: dict[str, np.ndarray] = {}
    for name, raw in (values or {}).items():
        if name not in inputs:
            raise InputValueError(f"unknown input '{name}' in --input; model inputs are: {', '.join(inputs)}")
        checked[name] = _scalar(name, raw, input_dtype(inputs[name]))
    return checked


def _scalar(name: str, raw: object, dtype: np.dtype) -> np.ndarray:
    if isinstance(raw, np.ndarray) and raw.size == 1:
        raw = raw.reshape(()).item()
    text = str(raw).strip().lower()
    if dtype == np.bool_:
        if text in ("1", "true", "0", "false"):
            return np.array(text in ("1", "true"))
        raise InputValueError(f"--input {name}={raw}: input '{name}' is bool; give true, false, 1 or 0")
    try:
        number = float(text)
    except ValueError:
        raise InputValueError(f"--input {name}={raw}: not a number (input '{name}' is {dtype.name})") from None
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if not number.is_integer() or not info.min <= number <= info.max:
            raise InputValueError(f"--input {name}={raw}: input '{name}' is {dtype.name}; give an integer "
                                  f"from {info.min} to {info.max}")
        return np.array(int(number), dtype)
    if dtype.kind != "f":
        raise InputValueError(f"--input {name}={raw}: input '{name}' has element type {dtype.name}, which --input cannot set")
    return np.array(number, dtype)


def describe_source(seed: int, values: Mapping[str, np.ndarray] | None = None) -> str:
    """How synthetic feeds are labelled wherever a figure measured on them is shown."""
    fixed = ", ".join(f"{k}={v.item() if np.ndim(v) == 0 else '...'}" for k, v in (values or {}).items())
    return f"random (seed {seed})" + (f" with {fixed}" if fixed else "")


def synthetic_feeds(
    model: ir.Model,
    shapes: Mapping[str, Sequence[int]],
    rng: np.random.Generator,
    values: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """One feed dict at `shapes` (see the module docstring for how each input is filled)."""
    values = values or {}
    feeds = {}
    for value in graph_inputs(model):
        dtype = input_dtype(value)
        shape = tuple(int(d) for d in shapes[value.name])
        if value.name in values:
            feeds[value.name] = np.broadcast_to(np.asarray(values[value.name], dtype), shape).copy()
        else:
            feeds[value.name] = _synthetic(value, dtype, shape, shapes, rng)
    return feeds


def mask_inputs(model: ir.Model) -> list[str]:
    """Names of the graph inputs named like an attention mask (`*mask*`, integer, bool or float):
    0 marks padding positions."""
    from .model import graph_inputs

    return [v.name for v in graph_inputs(model) if _MASK.search(v.name)
            and v.dtype is not None and (v.dtype.is_integer() or v.dtype.is_floating_point() or v.dtype == ir.DataType.BOOL)]


def token_rows(x: np.ndarray, mask: np.ndarray | None, *, keep_shape: bool = False) -> np.ndarray:
    """The [..., features] rows of `x` at the positions where `mask` (an attention mask fed to the
    model, [batch, sequence]) is non-zero, as [rows, features]; all rows when there is no mask or
    `x` is not shaped [*mask.shape, features] (`keep_shape`: then `x` as it is). Padded positions
    compute on pad tokens the model never uses: statistics and fits over them describe padding."""
    if mask is not None and x.ndim == mask.ndim + 1 and x.shape[:-1] == mask.shape:
        return x[np.asarray(mask) != 0]
    return x if keep_shape else x.reshape(-1, x.shape[-1])


def feed_mask(feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray | None:
    """The first of the mask inputs `names` (see mask_inputs) present in `feeds`, else None."""
    return next((np.asarray(feeds[m]) for m in names if m in feeds), None)


def _synthetic(value: ir.Value, dtype: np.dtype, shape: tuple[int, ...], shapes: Mapping[str, Sequence[int]],
               rng: np.random.Generator) -> np.ndarray:
    name = value.name
    if _MASK.search(name) and (dtype.kind in "iuf" or dtype == np.bool_):
        return np.ones(shape, dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind not in "iu":
        if dtype.kind not in "fc" and not dtype.name.startswith(("float", "bfloat")):  # ml_dtypes' bfloat16/float8
            raise NonNumericInputError(f"input '{name}' has element type {dtype.name}: random inputs must be numeric")
        return rng.standard_normal(shape).astype(dtype)
    if _TOKEN_TYPE.search(name):
        return np.zeros(shape, dtype)
    rows = _table_rows(value)
    if _POSITION.search(name) and shape:
        positions = np.arange(shape[-1]) % (rows or shape[-1])
        return np.broadcast_to(positions, shape).astype(dtype)
    compared = _compared_constant(value)
    if compared is not None:
        return np.full(shape, compared, dtype)
    if rows:
        return rng.integers(0, rows, size=shape).astype(dtype)
    if not shape and _SAMPLE_RATE.match(name):
        return np.array(DEFAULT_SAMPLE_RATE, dtype)
    if _LENGTH.search(name):
        return np.full(shape, _longest_other_dim(name, shapes), dtype)
    return rng.integers(0, 2, size=shape).astype(dtype)


def _uses(value: ir.Value) -> list[tuple[ir.Node, int]]:
    """(node, input slot) of every use of `value`, followed through value-preserving ops."""
    found, todo, seen = [], [value], set()
    while todo:
        current = todo.pop()
        for node, slot in current.uses():
            if node.op_type in _PASS_THROUGH and slot == 0 and node.domain in ("", "ai.onnx"):
                if node.outputs[0] not in seen:
                    seen.add(node.outputs[0])
                    todo.append(node.outputs[0])
            else:
                found.append((node, slot))
    return found


def _table_rows(value: ir.Value) -> int | None:
    """Rows of the smallest table this input indexes with a Gather (its data's size on the gather axis)."""
    rows = []
    for node, slot in _uses(value):
        if node.op_type != "Gather" or slot != 1 or node.domain not in ("", "ai.onnx"):
            continue
        table = node.inputs[0]
        dims = table.shape.dims if table is not None and table.shape is not None else None
        if not dims:
            continue
        axis = node.attributes.get("axis")
        axis = int(axis.value) if axis is not None else 0
        if -len(dims) <= axis < len(dims) and isinstance(dims[axis], int) and dims[axis] > 0:
            rows.append(dims[axis])
    return min(rows) if rows else None


def _compared_constant(value: ir.Value) -> int | None:
    """A value that makes the input's first comparison with a constant scalar true, or None."""
    for node, slot in _uses(value):
        offset = _COMPARISONS.get(node.op_type)
        if offset is None or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        other = node.inputs[1 - slot]
        tensor = ir.convenience.get_const_tensor(other) if other is not None else None
        if tensor is None or tensor.size != 1:
            continue
        constant = tensor.numpy().reshape(()).item()
        if slot == 1:  # constant OP input: the inequality runs the other way
            offset = -offset
        return int(round(constant)) + offset
    return None


def _longest_other_dim(name: str, shapes: Mapping[str, Sequence[int]]) -> int:
    dims = [int(d) for other, shape in shapes.items() if other != name for d in tuple(shape)[1:]]
    return max(dims, default=1)


__all__ = ["DEFAULT_SAMPLE_RATE", "InputValueError", "NonNumericInputError", "check_input_values", "describe_source",
           "mask_inputs", "parse_input_values", "synthetic_feeds", "token_rows", "feed_mask"]

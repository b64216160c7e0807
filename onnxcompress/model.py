"""Model I/O: load from anything, save atomically, hand back as graphsurgeon; input shapes.

Every model handed to the rest of the package is an `onnx_ir.Model` owned by the caller: loading
from an in-memory model copies it, so passes never modify the user's object or file.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from .errors import InputShapeError, ModelLoadError, OnnxCompressError

#: Above this many bytes of initializers a model is saved with external data (protobuf's 2 GiB limit).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
SOURCE_KEY = "onnxcompress.source"  # ir.Model.meta key: the resolved path a model was loaded from

ModelLike = Any  # str | os.PathLike | onnx.ModelProto | ir.Model | onnx_graphsurgeon.Graph


def load(source: ModelLike) -> ir.Model:
    """Load a model from a path, `onnx.ModelProto`, `onnx_ir.Model` or onnx-graphsurgeon `Graph`.

    Raises ModelLoadError (one line) for a missing, unreadable, non-ONNX or truncated file, or
    missing external data.
    """
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source))
    if isinstance(source, onnx.ModelProto):
        return ir.serde.deserialize_model(_copy_proto(source))
    if isinstance(source, ir.Model):
        return ir.serde.deserialize_model(ir.serde.serialize_model(source))
    if type(source).__name__ == "Graph" and type(source).__module__.startswith("onnx_graphsurgeon"):
        import onnx_graphsurgeon as gs

        return ir.serde.deserialize_model(gs.export_onnx(source))
    raise ModelLoadError(f"cannot load a model from a {type(source).__name__}")


def _copy_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: file is empty")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ...
        raise ModelLoadError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelLoadError(f"{path}: not a valid ONNX model (no graph; truncated or not ONNX)")
    _check_structure(proto, path)
    _check_external_data(proto, path.parent, path)
    try:
        model = ir.load(str(path))  # memory-maps external data instead of reading it all
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read model ({_first_line(exc)})") from None
    model.meta[SOURCE_KEY] = str(path.resolve())
    return model


def _check_structure(proto: onnx.ModelProto, path: Path) -> None:
    """Catch files that decode as protobuf but are not a usable model (e.g. cut at a field boundary)."""
    try:
        onnx.checker.check_model(proto, full_check=False)
    except onnx.checker.ValidationError as exc:
        msg = _first_line(exc)
        # Missing external files are reported by _check_external_data with a clearer message.
        if "Data of TensorProto" in msg or "external" in msg.lower():
            return
        raise ModelLoadError(f"{path}: invalid ONNX model ({msg})") from None


def _check_external_data(proto: onnx.ModelProto, base: Path, path: Path) -> None:
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = base / info.get("location", "")
        if not location.is_file():
            raise ModelLoadError(
                f"{path}: external data file '{info.get('location')}' for tensor '{tensor.name}' is missing"
            )
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if end > location.stat().st_size:
            raise ModelLoadError(
                f"{path}: external data file '{info.get('location')}' is truncated "
                f"(tensor '{tensor.name}' needs {end} bytes, file has {location.stat().st_size})"
            )


def _all_tensors(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as an `onnx.ModelProto` (external tensors stay references until saved)."""
    return ir.serde.serialize_model(model)


def to_graphsurgeon(model: ir.Model):
    """The model as an onnx-graphsurgeon `Graph` (for users whose tooling is built on it)."""
    import onnx_graphsurgeon as gs

    return gs.import_onnx(to_proto(model))


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write `model` to `path` atomically (temp file in the same folder, then rename).

    External data (`<name>.data` beside the model) is used when asked, or automatically above
    protobuf's 2 GiB limit. Refuses to overwrite the file the model was loaded from.
    """
    path = Path(path)
    source = model.meta.get(SOURCE_KEY)
    if source and Path(source) == path.resolve():
        raise ModelLoadError(f"{path}: refusing to overwrite the input model; choose another output path")
    if path.exists() and path.is_dir():
        raise ModelLoadError(f"{path}: is a directory")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: output folder does not exist")
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{path.name}.tmp-") as tmp:
        tmp_model = Path(tmp) / path.name
        try:
            if external_data:
                ir.save(model, tmp_model, external_data=data_name)
            else:
                ir.save(model, tmp_model)
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot write model ({_first_line(exc)})") from None
        if external_data:
            os.replace(Path(tmp) / data_name, folder / data_name)
        os.replace(tmp_model, path)
    return path


def write_atomic(path: str | os.PathLike, chunks: Iterable[bytes], *, what: str = "output") -> Path:
    """Write `chunks` to `path` through a temporary file in the same folder and a rename, so a reader
    never sees a partial file and a failure leaves no debris; `what` names the file in errors."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxCompressError(f"{folder}: {what} folder does not exist")
    if path.is_dir():
        raise OnnxCompressError(f"{path}: is a directory")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@contextlib.contextmanager
def temporary_path(model: ir.Model, *, external_data: bool | None = None):
    """Save to a throwaway file. With external data, the checker and ORT read the model from a path
    without another in-memory protobuf copy of the weights (seconds saved on a 500 MB model)."""
    with tempfile.TemporaryDirectory(prefix="onnxcompress-") as tmp:
        yield save(model, Path(tmp) / "model.onnx", external_data=external_data)


# ---------------------------------------------------------------- inputs and their shapes

_SHAPE_SPEC = re.compile(r"^(?P<name>.+)=(?P<dims>\d+(?:[x,]\d+)*)$")


def parse_input_shapes(specs: Iterable[str] | None) -> dict[str, tuple[int, ...]]:
    """`["input=1x3x224x224", "mask=1,128"]` -> {"input": (1, 3, 224, 224), "mask": (1, 128)}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or ():
        match = _SHAPE_SPEC.match(spec.strip())
        if not match:
            raise InputShapeError(
                f"bad input shape '{spec}': expected NAME=DxDx... with positive integers, e.g. input=1x3x224x224"
            )
        dims = tuple(int(d) for d in re.split(r"[x,]", match["dims"]))
        if any(d <= 0 for d in dims):
            raise InputShapeError(f"bad input shape '{spec}': dimensions must be positive")
        shapes[match["name"]] = dims
    return shapes


def graph_inputs(model: ir.Model) -> list[ir.Value]:
    """The inputs a caller must feed: graph inputs that are not also initializers (old-IR models list both)."""
    return [v for v in model.graph.inputs if v.name not in model.graph.initializers]


def input_dtype(value: ir.Value) -> np.dtype:
    if value.dtype is None:
        raise InputShapeError(f"input '{value.name}' has no element type")
    return value.dtype.numpy()


def resolve_input_shapes(
    model: ir.Model, given: Mapping[str, Sequence[int]] | None = None, *, default_batch: int | None = 1
) -> dict[str, tuple[int, ...]]:
    """A static shape for every graph input: the model's own where static, `given` where not.

    A symbolic leading (batch) dimension defaults to `default_batch`; any other dynamic dimension
    must be given, or InputShapeError names the input and how to pass it.
    """
    given = dict(given or {})
    inputs = graph_inputs(model)
    names = [v.name for v in inputs]
    unknown = [n for n in given if n not in names]
    if unknown:
        raise InputShapeError(f"unknown input '{unknown[0]}' in --input-shape; model inputs are: {', '.join(names)}")
    resolved: dict[str, tuple[int, ...]] = {}
    for value in inputs:
        model_dims = list(value.shape.dims) if value.shape is not None else None
        if value.name in given:
            dims = tuple(int(d) for d in given[value.name])
            if model_dims is not None:
                if len(dims) != len(model_dims):
                    raise InputShapeError(
                        f"input '{value.name}' has rank {len(model_dims)} but --input-shape gives {len(dims)} dims"
                    )
                for i, (g, m) in enumerate(zip(dims, model_dims)):
                    if isinstance(m, int) and m != g and not (i == 0 and default_batch is not None):
                        raise InputShapeError(
                            f"input '{value.name}' dim {i} is fixed to {m} in the model, --input-shape gives {g}"
                        )
            resolved[value.name] = dims
            continue
        if model_dims is None:
            raise InputShapeError(
                f"input '{value.name}' has no shape in the model; pass --input-shape {value.name}=DxDx..."
            )
        dims_out = []
        for i, d in enumerate(model_dims):
            if isinstance(d, int) and d > 0:
                dims_out.append(d)
            elif i == 0 and default_batch is not None:
                dims_out.append(default_batch)
            else:
                shown = "x".join(_dim_text(x) for x in model_dims)
                raise InputShapeError(
                    f"input '{value.name}' has dynamic shape [{shown}]; pass --input-shape {value.name}=DxDx..."
                )
        resolved[value.name] = tuple(dims_out)
    return resolved


def _dim_text(dim) -> str:
    """A dim for messages: its size, its symbol, or '?' for an unnamed dynamic dim (not 'None')."""
    if isinstance(dim, int):
        return str(dim)
    symbol = getattr(dim, "value", dim)
    return str(symbol) if symbol else "?"

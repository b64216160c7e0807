"""Model I/O: load from anything, save atomically, hand back as graphsurgeon; input shapes.

Every model handed to the rest of the package is an `onnx_ir.Model` owned by the caller: loading
from an in-memory model copies it (`clone`), so passes never modify the user's object or file.
"""

from __future__ import annotations

import contextlib
import math
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
#: Initializers of at most this many bytes stay in the model file when it is saved with external data.
INLINE_BYTES = 256
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
        return clone(source)
    if type(source).__name__ == "Graph" and type(source).__module__.startswith("onnx_graphsurgeon"):
        import onnx_graphsurgeon as gs

        return ir.serde.deserialize_model(gs.export_onnx(source))
    raise ModelLoadError(f"cannot load a model from a {type(source).__name__}")


def clone(model: ir.Model) -> ir.Model:
    """A copy of `model` that may be changed freely: its own graphs, nodes, values and attribute
    maps, sharing the weight tensors (no serialized copy of them; external ones stay mapped once).

    Safe because no code writes into a tensor's array: passes replace `value.const_value` and
    attributes with new tensors (tests/test_input_untouched.py). `meta` (where the model was loaded
    from, which `save` never overwrites) carries over.
    """
    try:
        copy = model.clone()
    except (RuntimeError, ValueError):  # (onnx-ir wraps its errors in RuntimeError)
        # A node reads a value defined further down: clone needs sorted nodes, serialization does not.
        copy = _serialized_copy(model)
    copy.meta.update(model.meta)
    return copy


def _serialized_copy(model: ir.Model) -> ir.Model:
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    # A serialized tensor keeps its external file's location but not the folder it is relative to.
    for source, copied in zip(external_tensors(model), external_tensors(copy), strict=True):
        copied.base_dir = source.base_dir
    return copy


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
        # Memory-maps external data instead of reading it all; an absolute path makes its folder
        # (each external tensor's base_dir) independent of the working directory.
        model = ir.load(str(path.absolute()))
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


def _external_infos(proto: onnx.ModelProto) -> Iterable[tuple[onnx.TensorProto, dict[str, str]]]:
    """Each tensor stored in an external file, with its external_data entries (location, offset, length)."""
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor, {e.key: e.value for e in tensor.external_data}


def _check_external_data(proto: onnx.ModelProto, base: Path, path: Path) -> None:
    for tensor, info in _external_infos(proto):
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


def upgrade_opset(model: ir.Model, opset: int, needed_by: str) -> tuple[ir.Model, str | None]:
    """`model` if its default-domain opset is at least `opset`, else a copy converted by
    onnx.version_converter (meta kept) and a note "opset A -> B"; a one-line error naming
    `needed_by` when the conversion fails."""
    current = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    if current >= opset:
        return model, None
    from onnx import version_converter

    try:
        # With its data: the converted proto is loaded without the folder its locations are relative to.
        proto = version_converter.convert_version(to_proto(model, with_data=True), opset)
    except Exception as exc:
        raise OnnxCompressError(f"{needed_by} needs opset >= {opset} and converting from opset {current} failed "
                                f"({_first_line(exc)})") from None
    proto.ir_version = max(proto.ir_version, 7)
    converted = load(proto)
    converted.meta.update(model.meta)
    return converted, f"opset {current} -> {opset}"


def to_proto(model: ir.Model, *, with_data: bool = False) -> onnx.ModelProto:
    """The model as an `onnx.ModelProto`. External tensors stay references to their files unless
    `with_data`: then their data is read in, for code that reads weights from the proto alone
    (numpy_helper, ORT from bytes), which cannot know the folder a location is relative to."""
    if with_data and external_tensors(model):
        model = _in_memory(model)
    return ir.serde.serialize_model(model)


def external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    """The tensors whose data lives in files, in a fixed order (initializers of every graph, then
    tensor attributes), so that two copies of one model list theirs alike."""
    tensors = [v.const_value for graph in model.graphs() for v in graph.initializers.values()]
    for graph in (model.graph, *model.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for attr in node.attributes.values():
                if attr.is_ref():
                    continue
                if attr.type == ir.AttributeType.TENSOR:
                    tensors.append(attr.value)
                elif attr.type == ir.AttributeType.TENSORS:
                    tensors.extend(attr.value)
    return [t for t in tensors if isinstance(t, ir.ExternalTensor)]


def needs_file(model: ir.Model) -> bool:
    """Whether ONNX Runtime must read `model` from a file: serialized bytes can carry neither
    external data (its locations are relative to a folder) nor more than 2 GiB."""
    return weight_bytes(model) > EXTERNAL_DATA_THRESHOLD or bool(external_tensors(model))


def add_initializer(graph: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
    """A new initializer of `graph` holding `tensor`, under the tensor's name, typed by it: shape
    inference declares weights by their value's type and shape (analysis/shapes.py)."""
    value = ir.Value(name=tensor.name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def tensor_in_memory(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """`tensor` with its data in memory (an external tensor's mapped file contents), for serializing."""
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor
    return ir.Tensor(tensor.numpy(), name=tensor.name, dtype=tensor.dtype)


def release(tensor: ir.TensorProtocol | None) -> None:
    """Unmap an external tensor's file, so the pages it read leave this process's memory (it maps
    them again if read later); kept mapped while an array still points into it."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:
            pass


def _in_memory(model: ir.Model, *, limit: float = math.inf) -> ir.Model:
    """A clone whose external tensor attributes, and external initializers of at most `limit`
    bytes, are in memory.

    The clone has its own values and nodes but shares tensors and attributes with `model`:
    replacing a const_value or an attribute leaves `model` as it is.
    """
    clone = model.clone()
    for graph in clone.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes <= limit:
                value.const_value = tensor_in_memory(tensor)
    for graph in (clone.graph, *clone.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for key, attr in list(node.attributes.items()):
                if not attr.is_ref() and isinstance(attr.value, ir.ExternalTensor):
                    loaded = tensor_in_memory(attr.value)
                    node.attributes[key] = ir.Attr(key, attr.type, loaded, doc_string=attr.doc_string)
    return clone


def to_graphsurgeon(model: ir.Model):
    """The model as an onnx-graphsurgeon `Graph` (for users whose tooling is built on it)."""
    import onnx_graphsurgeon as gs

    return gs.import_onnx(to_proto(model, with_data=True))


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write `model` to `path` atomically (temp file in the same folder, then rename).

    External data (`<name>.data` beside the model) is used when asked, or automatically above
    protobuf's 2 GiB limit; otherwise external tensors are written into the file. Refuses to
    overwrite the file the model was loaded from, and never replaces a data file the model reads
    or one that is not the old output's own (then the data goes to `<name>.<n>.data`).
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
    reading = {os.path.realpath(t.path) for t in external_tensors(model)}
    if os.path.realpath(path) in reading:
        raise ModelLoadError(f"{path}: refusing to overwrite a data file the model reads; choose another output path")
    if reading:
        # Locations in the new file are relative to its own folder: write the data, do not refer to it.
        # ir.save would read small external tensors in itself, releasing their maps under any
        # array still in use (BufferError); copies in a clone leave the model's tensors alone.
        model = _in_memory(model, limit=INLINE_BYTES if external_data else math.inf)
    data_name = _data_name(path, reading) if external_data else None
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{path.name}.tmp-") as tmp:
        tmp_model = Path(tmp) / path.name
        try:
            ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=INLINE_BYTES)
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot write model ({_first_line(exc)})") from None
        if data_name is None:
            os.replace(tmp_model, path)
        else:
            _replace_pair(Path(tmp) / data_name, folder / data_name, tmp_model, path)
    return path


def _data_name(path: Path, reading: set[str]) -> str:
    """The name of the external data file for the model saved at `path`: `<name>.data` unless that
    is a file the model reads (`reading`, real paths) or another model's (it exists and the old
    file at `path` does not refer to it), as when the output goes next to an external-data input."""
    owned: set[str] | None = None
    name, n = f"{path.name}.data", 0
    while True:
        target = os.path.realpath(path.parent / name)
        if target not in reading:
            if not os.path.lexists(target):
                return name
            owned = _data_files(path) if owned is None else owned
            if target in owned:
                return name
        n += 1
        name = f"{path.name}.{n}.data"


def _data_files(path: Path) -> set[str]:
    """Real paths of the external data files the model file at `path` refers to (none if no model there)."""
    if not path.is_file():
        return set()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a model: it owns no data file
        return set()
    return {os.path.realpath(path.parent / info.get("location", "")) for _, info in _external_infos(proto)}


def file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of the model at `path`: its file and the external data files it refers to."""
    path = Path(path)
    return path.stat().st_size + sum(os.path.getsize(f) for f in _data_files(path) if os.path.isfile(f))


def _replace_pair(tmp_data: Path, data: Path, tmp_model: Path, model: Path) -> None:
    """Move the data file in first, so the model never names data that is not there yet; a data
    file that was new goes again if the model cannot be moved in."""
    new = not os.path.lexists(data)
    os.replace(tmp_data, data)
    try:
        os.replace(tmp_model, model)
    except BaseException:
        if new:
            data.unlink(missing_ok=True)
        raise


def writable_folder(path: Path, what: str = "output") -> Path:
    """The folder a file `path` goes to; a one-line error when it is missing or `path` is a folder."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxCompressError(f"{folder}: {what} folder does not exist")
    if path.is_dir():
        raise OnnxCompressError(f"{path}: is a directory")
    return folder


def write_atomic(path: str | os.PathLike, chunks: Iterable[bytes], *, what: str = "output") -> Path:
    """Write `chunks` to `path` through a temporary file in the same folder and a rename, so a reader
    never sees a partial file and a failure leaves no debris; `what` names the file in errors."""
    path = Path(path)
    folder = writable_folder(path, what)
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

"""The .occ container's fixed parts: header layout, format version, errors, and the order in which a
model's tensors are visited (the order tensor sections refer to). The package docstring has the spec."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import onnx

from ..errors import OnnxCompressError

MAGIC = b"\x89OCC\r\n\x1a\n"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHHI32s")  # magic, version, flags, index length, index SHA-256
#: Tensors with less raw data than this stay inside the skeleton (compressed with it): a section of
#: its own costs an index entry, and tiny tensors compress better together.
MIN_SECTION_BYTES = 1024


class PackError(OnnxCompressError):
    """An .occ file that cannot be read: not an .occ file, an unsupported version, corrupted or truncated."""


class PackFormatError(PackError):
    """Not an .occ file, or a format version / feature this onnxcompress does not read."""


class PackCorruptError(PackError):
    """A checksum, size or structure check failed: the file is damaged or truncated."""


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
        for s in [*sparse, *attr.sparse_tensors]:
            yield s.values
            yield s.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def model_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model, in a fixed order (the order sections refer to)."""
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        for node in function.node:
            yield from _node_tensors(node)
    for info in proto.training_info:
        if info.HasField("initialization"):
            yield from _graph_tensors(info.initialization)
        if info.HasField("algorithm"):
            yield from _graph_tensors(info.algorithm)


def movable(tensor: onnx.TensorProto) -> bool:
    return (tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.HasField("raw_data")
            and len(tensor.raw_data) >= MIN_SECTION_BYTES)

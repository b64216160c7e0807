"""Reading an .occ file: every check before trusting a byte (magic, version, index SHA-256, length,
section CRC-32, bounded sizes, content SHA-256); a damaged file is a one-line PackError, never a model."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from ..errors import OnnxCompressError
from ..model import EXTERNAL_DATA_THRESHOLD, writable_folder
from .compression import decode, decompress
from .format import FORMAT_VERSION, HEADER, MAGIC, MIN_SECTION_BYTES, model_tensors
from .format import PackCorruptError, PackError, PackFormatError


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """The index of an .occ file (mode, sections, lossy fidelity), checked but with no section decoded."""
    data = _read(Path(path))
    return _parse(Path(path), data)[0]


def unpack_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """The model stored in an .occ file, every checksum verified; PackError if anything is wrong."""
    return unpack_bytes(_read(Path(path)), name=str(path))


def unpack_bytes(data: bytes, *, name: str = "<bytes>") -> onnx.ModelProto:
    """The model stored in the .occ file contents `data` (e.g. a download held in memory)."""
    path = name
    index, body = _parse(path, data)
    sections = index["sections"]
    decoded: list[bytes] = []
    offset = 0
    for number, entry in enumerate(sections):
        where = f"{path}: section {number + 1} of {len(sections)}"
        stored = body[offset : offset + entry["size"]]
        offset += entry["size"]
        if zlib.crc32(stored) != entry["crc32"]:
            raise PackCorruptError(f"{where}: checksum mismatch (the file is corrupted)")
        try:
            stream = decompress(entry["codec"], stored, entry["raw_size"])
            raw = stream if entry["kind"] == "skeleton" else decode(entry["encoding"], stream, entry)
        except PackError:
            raise
        except Exception as exc:  # codecs and numpy raise assorted types on damaged streams
            raise PackCorruptError(f"{where}: cannot decode ({str(exc).splitlines()[0][:150]})") from None
        if entry["kind"] == "tensor" and len(raw) != entry["bytes"]:
            raise PackCorruptError(f"{where}: decoded {len(raw)} bytes, expected {entry['bytes']}")
        decoded.append(raw)
    digest = hashlib.sha256()
    for raw in decoded:
        digest.update(raw)
    if digest.hexdigest() != index["content_sha256"]:
        raise PackCorruptError(f"{path}: content checksum mismatch (the file is corrupted)")
    return _assemble(path, decoded[0], [(e["tensor"], raw) for e, raw in zip(sections[1:], decoded[1:])])


def _assemble(path: str, skeleton: bytes, tensors: Sequence[tuple[int, bytes]]) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(skeleton)
    except Exception:  # protobuf's DecodeError and friends
        raise PackCorruptError(f"{path}: the stored model does not parse") from None
    wanted = dict(tensors)
    for position, tensor in enumerate(model_tensors(proto)):
        raw = wanted.pop(position, None)
        if raw is not None:
            tensor.raw_data = raw
    if wanted:
        raise PackCorruptError(f"{path}: the index refers to tensors the stored model does not have")
    return proto


def unpack_model(path: str | os.PathLike) -> ir.Model:
    """The model stored in an .occ file as an `onnx_ir.Model`."""
    return ir.serde.deserialize_model(unpack_proto(path))


def unpack_file(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Unpack `source` (.occ) to the ONNX file `target`, written atomically; external data
    (`<target>.data`) only when the model is beyond protobuf's 2 GiB limit."""
    source, target = Path(source), Path(target)
    if source.resolve() == target.resolve():
        raise OnnxCompressError(f"{target}: output would overwrite the .occ file; choose another path")
    proto = unpack_proto(source)
    folder = writable_folder(target)
    external = proto.ByteSize() > EXTERNAL_DATA_THRESHOLD
    data_name = target.name + ".data"
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{target.name}.tmp-") as tmp:
        tmp_model = Path(tmp) / target.name
        if external:
            onnx.save_model(proto, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=MIN_SECTION_BYTES)
            os.replace(Path(tmp) / data_name, folder / data_name)
        else:
            tmp_model.write_bytes(proto.SerializeToString())
        os.replace(tmp_model, target)
    return target


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise PackError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    return path.read_bytes()


def _parse(path: str | Path, data: bytes) -> tuple[dict[str, Any], memoryview]:
    """Check the header and index; (index, the bytes after it)."""
    if not data:
        raise PackCorruptError(f"{path}: file is empty")
    if data[: len(MAGIC)] != MAGIC[: len(data)]:
        raise PackFormatError(f"{path}: not an .occ file (bad magic bytes)")
    if len(data) < HEADER.size:
        raise PackCorruptError(f"{path}: truncated ({len(data)} bytes, the header alone is {HEADER.size})")
    _, version, flags, index_size, index_sha = HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise PackFormatError(f"{path}: .occ format version {version} is not supported (this onnxcompress reads "
                              f"version {FORMAT_VERSION}; the file is newer or corrupted)")
    if flags != 0:
        raise PackFormatError(f"{path}: unsupported .occ flags {flags:#x} (the file is newer or corrupted)")
    end = HEADER.size + index_size
    if len(data) < end:
        raise PackCorruptError(f"{path}: truncated ({len(data)} bytes, the index alone ends at {end})")
    index_bytes = data[HEADER.size : end]
    if hashlib.sha256(index_bytes).digest() != index_sha:
        raise PackCorruptError(f"{path}: index checksum mismatch (the file is corrupted)")
    try:
        index = json.loads(zlib.decompress(index_bytes))
        _check_index(index)
    except (ValueError, KeyError, TypeError, zlib.error):
        raise PackCorruptError(f"{path}: malformed index") from None
    if index["format"] != FORMAT_VERSION:
        raise PackFormatError(f"{path}: index format {index['format']} is not supported")
    expected = end + sum(s["size"] for s in index["sections"])
    if len(data) < expected:
        raise PackCorruptError(f"{path}: truncated ({len(data)} bytes, expected {expected})")
    if len(data) > expected:
        raise PackCorruptError(f"{path}: {len(data) - expected} unexpected bytes after the last section")
    return index, memoryview(data)[end:]


def _check_index(index: Any) -> None:
    """The index has the fields and types the reader relies on (else ValueError)."""
    sections = index["sections"]
    if not isinstance(index["content_sha256"], str) or index["mode"] not in ("lossless", "lossy"):
        raise ValueError
    if not sections or sections[0]["kind"] != "skeleton" or any(s["kind"] != "tensor" for s in sections[1:]):
        raise ValueError
    for s in sections:
        if not all(isinstance(s[k], int) and s[k] >= 0 for k in ("size", "raw_size", "crc32")):
            raise ValueError
        if s["kind"] == "tensor" and not all(isinstance(s[k], int) and s[k] >= 0 for k in ("tensor", "bytes")):
            raise ValueError

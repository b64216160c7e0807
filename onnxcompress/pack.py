"""`.occ`: a compressed container for ONNX models, for distribution (download size), not for running.

Lossless packing gives back the exact model: `unpack(pack(m))` serializes to the same ModelProto
bytes as `m` with its external data read in (so every initializer is bitwise equal; a file written
by `onnx.save` comes back byte for byte). Lossy packing first runs the `weight-share` pass (Deep
Compression: magnitude pruning, then k-means to 2^bits values per tensor), verifies the result like
any pipeline pass, and packs that model losslessly; its fidelity is recorded in the file.

Format, version 1 (all integers little-endian)::

    offset  size  field
    0       8     magic b"\\x89OCC\\r\\n\\x1a\\n" (PNG-style: catches text-mode transfers and truncation at 0)
    8       2     format version (uint16) = 1
    10      2     flags (uint16) = 0, reserved
    12      4     index length L (uint32)
    16      32    SHA-256 of the index bytes
    48      L     index: zlib-compressed UTF-8 JSON (below)
    48+L    ...   sections, back to back, in index order; the file ends exactly after the last one

    index = {
      "format": 1, "mode": "lossless" | "lossy", "created_by": "onnxcompress X.Y.Z",
      "content_sha256": SHA-256 of every section's decoded bytes, in order (end-to-end check),
      "sections": [{"kind": "skeleton" | "tensor", "codec": "none"|"zlib"|"bz2"|"lzma"|"zstd",
                    "size": stored bytes, "raw_size": bytes after the codec, "crc32": of the stored bytes,
                    # tensor sections only:
                    "tensor": position in the skeleton's tensor order, "bytes": raw_data length,
                    "encoding": "raw" | "shuffle" | "codebook", "itemsize": 2|4|8 (shuffle, codebook),
                    "values": codebook size (codebook)}],
      "lossy": {"weight_share": pass options, "details": ..., "fidelity": ...}   # lossy mode only
    }

The skeleton is the serialized ModelProto with the `raw_data` of every tensor of at least
MIN_SECTION_BYTES removed; those tensors are visited in a fixed order (graph initializers, sparse
initializers, node attributes, subgraphs recursively, functions, training info) and each is stored
in its own section, with the smallest of these encodings of its raw bytes:

- raw: the bytes as they are;
- shuffle: byte planes (all first bytes of each element, then all second bytes, ...): the sign and
  exponent bytes of float weights are highly repetitive, the mantissa bytes are not;
- codebook: for tensors with at most 256 distinct bit patterns (weight-shared, or few-valued
  tensors): the distinct values (itemsize bytes each), then one uint8 index per element;

each then compressed by the smallest of zlib, bz2 and lzma (.lzma "alone" format) from the
standard library, so any Python can unpack it; zstd is tried too when asked for (`codecs`) and the
optional `zstandard` package is installed (a file that uses zstd says so when it cannot be read
without it).

Reading checks everything before trusting it: magic, version, flags, the index's SHA-256, the
exact file length, every section's CRC-32 before decompressing it, decompressed sizes (bounded, so
a corrupted length cannot exhaust memory), codebook indices in range, and finally the SHA-256 of
the decoded content. Any failure is a one-line PackError; a damaged file never yields a model.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import struct
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir

from . import __version__
from .errors import ModelLoadError, OnnxCompressError
from .model import EXTERNAL_DATA_THRESHOLD, ModelLike, load, to_proto, write_atomic
from .report import Fidelity, to_jsonable

MAGIC = b"\x89OCC\r\n\x1a\n"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHHI32s")  # magic, version, flags, index length, index SHA-256
#: Tensors with less raw data than this stay inside the skeleton (compressed with it): a section of
#: its own costs an index entry, and tiny tensors compress better together.
MIN_SECTION_BYTES = 1024
#: Streams larger than this choose their encoding and codec on a sample of SAMPLE_BYTES from their
#: middle, then compress in full once: trying every codec on a 100 MB tensor would take minutes.
SAMPLE_LIMIT = 4 << 20
SAMPLE_BYTES = 1 << 20
#: Lossy packing compares the packed model with its input on this many samples (calibration or random).
FIDELITY_SAMPLES = 64
#: At most this many distinct values for the codebook encoding (uint8 indices).
MAX_CODEBOOK = 256

Level = Literal["fast", "default", "best"]
#: Codecs every Python has; the default, so a packed file never needs an extra package to unpack.
STDLIB_CODECS = ("zlib", "bz2", "lzma")
#: Compression settings per level; codecs that are not installed are left out.
LEVELS: dict[str, dict[str, int]] = {
    "fast": {"zlib": 6, "zstd": 3},
    "default": {"zlib": 9, "bz2": 9, "lzma": 6, "zstd": 19},
    "best": {"zlib": 9, "bz2": 9, "lzma": 9 | lzma.PRESET_EXTREME, "zstd": 22},
}


class PackError(OnnxCompressError):
    """An .occ file that cannot be read: not an .occ file, an unsupported version, corrupted or truncated."""


class PackFormatError(PackError):
    """Not an .occ file, or a format version / feature this onnxcompress does not read."""


class PackCorruptError(PackError):
    """A checksum, size or structure check failed: the file is damaged or truncated."""


# ----------------------------------------------------------------------------------------- codecs


def _zstd():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def available_codecs() -> tuple[str, ...]:
    """Codecs this installation can write and read ("none" is always available)."""
    return ("none", "zlib", "bz2", "lzma") + (("zstd",) if _zstd() is not None else ())


def _compress(codec: str, data: bytes, level: int) -> bytes:
    if codec == "zlib":
        return zlib.compress(data, level)
    if codec == "bz2":
        return bz2.compress(data, level)
    if codec == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE, preset=level)
    if codec == "zstd":
        return _zstd().ZstdCompressor(level=level).compress(data)
    raise ValueError(f"unknown codec {codec}")


def _decompress(codec: str, data: bytes, size: int) -> bytes:
    """Decompress to exactly `size` bytes; never more (a damaged length cannot exhaust memory)."""
    if codec == "none":
        out, complete = bytes(data), True
    elif codec in ("zlib", "bz2", "lzma"):
        decoder = {"zlib": zlib.decompressobj, "bz2": bz2.BZ2Decompressor,
                   "lzma": lambda: lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)}[codec]()
        out = decoder.decompress(data, size + 1)
        complete = decoder.eof and not decoder.unused_data
    elif codec == "zstd":
        zstandard = _zstd()
        if zstandard is None:
            raise PackFormatError("this .occ file uses zstd compression: install it with `pip install zstandard`")
        out, complete = zstandard.ZstdDecompressor().decompress(data, max_output_size=size + 1), True
    else:
        raise PackFormatError(f"unknown codec '{codec}' (this onnxcompress reads {', '.join(available_codecs())})")
    if not complete or len(out) != size:
        raise ValueError(f"decompressed to {len(out)} bytes, expected {size}")
    return out


# -------------------------------------------------------------------------------------- encodings


def _shuffle(raw: bytes, itemsize: int) -> bytes:
    return np.frombuffer(raw, np.uint8).reshape(-1, itemsize).T.tobytes()


def _unshuffle(data: bytes, itemsize: int) -> bytes:
    return np.frombuffer(data, np.uint8).reshape(itemsize, -1).T.tobytes()


def _codebook(raw: bytes, itemsize: int) -> tuple[bytes, int] | None:
    """Distinct bit patterns then uint8 indices, or None with more than MAX_CODEBOOK distinct values."""
    patterns = np.frombuffer(raw, f"<u{itemsize}")
    if len(np.unique(patterns[:: max(1, len(patterns) // 4096)])) > MAX_CODEBOOK:
        return None  # a strided sample already has too many: skip sorting the whole tensor
    values, indices = np.unique(patterns, return_inverse=True)
    if len(values) > MAX_CODEBOOK:
        return None
    return values.tobytes() + indices.astype(np.uint8).tobytes(), len(values)


def _uncodebook(data: bytes, itemsize: int, count: int) -> bytes:
    values = np.frombuffer(data, f"<u{itemsize}", count=count)
    indices = np.frombuffer(data, np.uint8, offset=count * itemsize)
    if len(indices) and int(indices.max()) >= count:
        raise ValueError("codebook index out of range")
    return values[indices].tobytes()


def _itemsize(tensor: onnx.TensorProto) -> int:
    """Bytes per element when raw_data holds whole elements of 2, 4 or 8 bytes, else 1 (no plane tricks)."""
    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    size = len(tensor.raw_data)
    if count > 0 and size % count == 0 and size // count in (2, 4, 8):
        return size // count
    return 1


@dataclass(frozen=True)
class _Encoded:
    encoding: str
    stream: bytes
    params: Mapping[str, int]


def _encodings(raw: bytes, itemsize: int) -> Iterator[_Encoded]:
    yield _Encoded("raw", raw, {})
    if itemsize > 1:
        yield _Encoded("shuffle", _shuffle(raw, itemsize), {"itemsize": itemsize})
        book = _codebook(raw, itemsize)
        if book is not None:
            yield _Encoded("codebook", book[0], {"itemsize": itemsize, "values": book[1]})


def _decode(encoding: str, stream: bytes, params: Mapping[str, Any]) -> bytes:
    if encoding == "raw":
        return stream
    itemsize = int(params["itemsize"])
    if encoding == "shuffle":
        return _unshuffle(stream, itemsize)
    if encoding == "codebook":
        return _uncodebook(stream, itemsize, int(params["values"]))
    raise PackFormatError(f"unknown tensor encoding '{encoding}'")


# --------------------------------------------------------------------------------- choosing the best


@dataclass(frozen=True)
class _Section:
    kind: str
    codec: str
    payload: bytes
    raw_size: int
    meta: Mapping[str, Any]  # tensor sections: tensor position, bytes, encoding and its parameters

    def entry(self) -> dict[str, Any]:
        return {"kind": self.kind, "codec": self.codec, "size": len(self.payload), "raw_size": self.raw_size,
                "crc32": zlib.crc32(self.payload), **self.meta}


def _smallest(stream: bytes, codecs: Mapping[str, int]) -> tuple[str, bytes]:
    best = ("none", stream)
    for codec, level in codecs.items():
        packed = _compress(codec, stream, level)
        if len(packed) < len(best[1]):
            best = (codec, packed)
    return best


def _pack_stream(raw: bytes, itemsize: int, codecs: Mapping[str, int]) -> tuple[_Encoded, str, bytes]:
    """The (encoding, codec) pair that stores `raw` in the fewest bytes."""
    candidates = list(_encodings(raw, itemsize))
    if len(raw) <= SAMPLE_LIMIT:
        results = [(c, *_smallest(c.stream, codecs)) for c in candidates]
        return min(results, key=lambda r: len(r[2]))
    # Large: rank every pair on a sample, then compress the full stream once with the winner.
    start = (len(raw) // 2 // itemsize) * itemsize
    sample = raw[start : start + SAMPLE_BYTES]
    scores = []
    for candidate in candidates:
        for encoded in _encodings(sample, itemsize):
            if encoded.encoding != candidate.encoding:
                continue
            for codec, level in codecs.items():
                scores.append((len(_compress(codec, encoded.stream, level)), candidate, codec))
    if not scores:
        return candidates[0], "none", raw
    _, chosen, codec = min(scores, key=lambda s: s[0])
    packed = _compress(codec, chosen.stream, codecs[codec])
    return (chosen, codec, packed) if len(packed) < len(chosen.stream) else (chosen, "none", chosen.stream)


# ---------------------------------------------------------------------------------- the model proto


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


def _movable(tensor: onnx.TensorProto) -> bool:
    return (tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.HasField("raw_data")
            and len(tensor.raw_data) >= MIN_SECTION_BYTES)


def source_proto(model: ModelLike) -> onnx.ModelProto:
    """The model as a ModelProto with all tensor data inline: what lossless packing reproduces.

    A path is read with onnx.load (external data included), so a file comes back as written;
    other forms go through `model.load` and onnx-ir's serializer.
    """
    if isinstance(model, (str, os.PathLike)):
        load(model)  # one-line errors for missing, truncated, non-ONNX files and missing external data
        try:
            return onnx.load(str(model))
        except Exception as exc:  # protobuf and onnx raise assorted types for unreadable files
            raise ModelLoadError(f"{model}: cannot read model ({str(exc).splitlines()[0][:200]})") from None
    if isinstance(model, onnx.ModelProto):
        external = [t.name for t in model_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
        if external:
            raise ModelLoadError(f"tensor '{external[0]}' refers to external data: pass the model's path instead")
        return model
    return to_proto(ir.external_data.load_to_model(load(model)))


# ------------------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class PackStats:
    """What `pack_model` wrote. Sizes in bytes; `onnx_bytes` is the input model serialized with its tensors inline."""

    path: str
    mode: str  # "lossless" or "lossy"
    onnx_bytes: int
    packed_bytes: int
    sections: int
    encodings: Mapping[str, int]  # tensor sections per encoding
    codecs: Mapping[str, int]  # sections per codec
    seconds: float
    gzip_bytes: int | None = None  # gzip -9 of the input's ONNX bytes, when asked for
    fidelity: Fidelity | None = None  # lossy: the packed model against the input model
    weight_share: Mapping[str, Any] | None = None  # lossy: the pass options and what it did

    @property
    def ratio(self) -> float:
        return self.onnx_bytes / self.packed_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**to_jsonable(self), "ratio": self.ratio}


def pack_model(
    model: ModelLike,
    path: str | os.PathLike,
    *,
    bits: int | None = None,
    sparsity: float = 0.0,
    calibration: Any = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    level: Level = "default",
    codecs: Sequence[str] | None = None,
    compare_gzip: bool = False,
) -> PackStats:
    """Write `model` to `path` as an .occ file.

    Lossless unless `bits` or `sparsity` is given: then the `weight-share` pass runs first (k-means to
    2**bits values per tensor after pruning `sparsity` of the smallest weights), verified and compared
    with the input on `calibration` (real inputs; random ones otherwise, labelled so in `fidelity`).
    `codecs` limits the codecs tried (e.g. ("zlib", "lzma") for files any Python can read).
    """
    start = time.perf_counter()
    settings = _codec_settings(level, codecs)
    target = Path(path)
    if isinstance(model, (str, os.PathLike)) and Path(model).resolve() == target.resolve():
        raise ModelLoadError(f"{target}: output would overwrite the input model; choose another path")
    proto = source_proto(model)
    onnx_bytes = proto.ByteSize()
    gzip_bytes = None
    if compare_gzip and onnx_bytes <= EXTERNAL_DATA_THRESHOLD:  # beyond 2 GiB a model has no single ONNX file
        gzip_bytes = len(gzip.compress(proto.SerializeToString(), 9, mtime=0))
    lossy = None
    fidelity = None
    if bits is not None or sparsity:
        proto, lossy, fidelity = _weight_share(proto, bits, sparsity, calibration, input_shapes)
    skeleton = _skeleton_bytes(proto)
    codec, payload = _smallest(skeleton, settings)
    sections = [_Section("skeleton", codec, payload, len(skeleton), {})]
    digest = hashlib.sha256(skeleton)
    for position, tensor in enumerate(model_tensors(proto)):
        if not _movable(tensor):
            continue
        raw = tensor.raw_data
        digest.update(raw)
        encoded, codec, payload = _pack_stream(raw, _itemsize(tensor), settings)
        meta = {"tensor": position, "bytes": len(raw), "encoding": encoded.encoding, **encoded.params}
        sections.append(_Section("tensor", codec, payload, len(encoded.stream), meta))
    index = {"format": FORMAT_VERSION, "mode": "lossy" if lossy else "lossless",
             "created_by": f"onnxcompress {__version__}", "content_sha256": digest.hexdigest(),
             "sections": [s.entry() for s in sections]}
    if lossy:
        index["lossy"] = lossy
    packed_bytes = _write_container(target, index, sections)
    return PackStats(
        path=str(target), mode=index["mode"], onnx_bytes=onnx_bytes, packed_bytes=packed_bytes,
        sections=len(sections),
        encodings=dict(Counter(s.meta["encoding"] for s in sections if s.kind == "tensor")),
        codecs=dict(Counter(s.codec for s in sections)), seconds=time.perf_counter() - start,
        gzip_bytes=gzip_bytes, fidelity=fidelity, weight_share=lossy,
    )


def _codec_settings(level: str, codecs: Sequence[str] | None) -> dict[str, int]:
    if level not in LEVELS:
        raise OnnxCompressError(f"unknown level '{level}' (choose {', '.join(LEVELS)})")
    available = available_codecs()
    # By default only the standard library's codecs, so any Python can unpack the file; zstd on request.
    wanted = list(codecs) if codecs is not None else [c for c in LEVELS[level] if c in STDLIB_CODECS]
    unknown = [c for c in wanted if c not in LEVELS["default"] or c not in available]
    if unknown:
        raise OnnxCompressError(f"codec '{unknown[0]}' is not available (available: {', '.join(available[1:])})")
    if not wanted:
        raise OnnxCompressError("no codec to compress with")
    settings = LEVELS[level]
    return {c: settings.get(c, LEVELS["default"][c]) for c in wanted}


def _weight_share(proto, bits, sparsity, calibration, input_shapes):
    from .passes.weight_share import WeightShare
    from .pipeline import Pipeline
    from .verify import VerifyOptions

    try:
        step = WeightShare(bits=bits, sparsity=sparsity)
    except ValueError as exc:
        raise OnnxCompressError(f"weight sharing: {exc}") from None
    result = Pipeline([step], verify=VerifyOptions(samples=FIDELITY_SAMPLES)).run(proto, calibration=calibration, input_shapes=input_shapes)
    record = result.report.passes[0]
    lossy = {"weight_share": step.options(), "details": to_jsonable(record.details),
             "fidelity": to_jsonable(result.report.fidelity)}
    return to_proto(result.model), lossy, result.report.fidelity


def _skeleton_bytes(proto: onnx.ModelProto) -> bytes:
    """`proto` serialized with the raw data of movable tensors left out (restored from sections)."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(proto)
    for tensor in model_tensors(skeleton):
        if _movable(tensor):
            tensor.ClearField("raw_data")
    return skeleton.SerializeToString()


def _write_container(path: Path, index: Mapping[str, Any], sections: Sequence[_Section]) -> int:
    index_bytes = zlib.compress(json.dumps(index, separators=(",", ":"), allow_nan=True).encode(), 9)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(index_bytes), hashlib.sha256(index_bytes).digest())
    write_atomic(path, [header, index_bytes, *(section.payload for section in sections)])
    return path.stat().st_size


def size_change(before: int, after: int) -> str:
    """'2.50x smaller' or '1.18x larger': a ratio below 1 reads as the wrong claim."""
    if after <= before:
        return f"{before / max(after, 1):.2f}x smaller"
    return f"{after / max(before, 1):.2f}x larger"


def summary_lines(stats: PackStats) -> list[str]:
    """Human-readable lines: sizes and ratios, what was used, and fidelity for lossy packing."""
    lines = [(f"wrote {stats.path}: {stats.packed_bytes:,} bytes ({stats.mode}), "
              f"{size_change(stats.onnx_bytes, stats.packed_bytes)} than the ONNX model ({stats.onnx_bytes:,} bytes)")]
    if stats.gzip_bytes:
        lines.append(f"gzip -9 of the ONNX model: {stats.gzip_bytes:,} bytes ({stats.onnx_bytes / stats.gzip_bytes:.2f}x); "
                     f".occ is {size_change(stats.gzip_bytes, stats.packed_bytes)} than that")
    encodings = ", ".join(f"{n} {e}" for e, n in sorted(stats.encodings.items())) or "none"
    codecs = ", ".join(f"{n} {c}" for c, n in sorted(stats.codecs.items()))
    lines.append(f"{stats.sections} sections (tensor encodings: {encodings}; codecs: {codecs}) in {stats.seconds:.1f} s")
    if stats.weight_share:
        details = stats.weight_share["details"]
        options = stats.weight_share["weight_share"]
        lines.append(f"weight sharing: {details['tensors']} tensors, bits {options['bits']}, sparsity {options['sparsity']:g} "
                     f"({details['zero_fraction']:.0%} of their weights zero)")
    if stats.fidelity is not None:
        lines.append(f"fidelity against the input model: {fidelity_text(to_jsonable(stats.fidelity))}")
    return lines


def fidelity_text(fidelity: Mapping[str, Any]) -> str:
    """One line from a Fidelity as JSON data."""
    parts = [f"SQNR {fidelity['sqnr_db']:.1f} dB", f"cosine {fidelity['cosine']:.5f}",
             f"max rel error {fidelity['max_rel_error']:.3g}"]
    if fidelity.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {fidelity['top1_agreement']:.1%}")
    return ", ".join(parts) + f" on {fidelity['samples']} samples of {fidelity['inputs']} inputs"


# ------------------------------------------------------------------------------------------ reading


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
            stream = _decompress(entry["codec"], stored, entry["raw_size"])
            raw = stream if entry["kind"] == "skeleton" else _decode(entry["encoding"], stream, entry)
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
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxCompressError(f"{folder}: output folder does not exist")
    if target.is_dir():
        raise OnnxCompressError(f"{target}: is a directory")
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


__all__ = [
    "FORMAT_VERSION", "MAGIC", "PackCorruptError", "PackError", "PackFormatError", "PackStats", "available_codecs",
    "fidelity_text", "model_tensors", "pack_model", "read_index", "source_proto", "summary_lines", "unpack_bytes",
    "unpack_file", "unpack_model", "unpack_proto",
]

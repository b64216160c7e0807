"""Writing an .occ file: `pack_model` (lossless, or weight sharing first), the skeleton and tensor
sections, the index and header."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from .. import __version__
from ..errors import ModelLoadError, OnnxCompressError
from ..model import EXTERNAL_DATA_THRESHOLD, ModelLike, load, to_proto, write_atomic
from ..report import Fidelity, to_jsonable
from .compression import LEVELS, STDLIB_CODECS, Level, available_codecs, element_size, pack_stream, smallest
from .format import FORMAT_VERSION, HEADER, MAGIC, model_tensors, movable

#: Lossy packing compares the packed model with its input on this many samples (calibration or random).
FIDELITY_SAMPLES = 64


@dataclass(frozen=True)
class Section:
    kind: str
    codec: str
    payload: bytes
    raw_size: int
    meta: Mapping[str, Any]  # tensor sections: tensor position, bytes, encoding and its parameters

    def entry(self) -> dict[str, Any]:
        return {"kind": self.kind, "codec": self.codec, "size": len(self.payload), "raw_size": self.raw_size,
                "crc32": zlib.crc32(self.payload), **self.meta}


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
    codec, payload = smallest(skeleton, settings)
    sections = [Section("skeleton", codec, payload, len(skeleton), {})]
    digest = hashlib.sha256(skeleton)
    for position, tensor in enumerate(model_tensors(proto)):
        if not movable(tensor):
            continue
        raw = tensor.raw_data
        digest.update(raw)
        encoded, codec, payload = pack_stream(raw, element_size(tensor), settings)
        meta = {"tensor": position, "bytes": len(raw), "encoding": encoded.encoding, **encoded.params}
        sections.append(Section("tensor", codec, payload, len(encoded.stream), meta))
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
    from ..passes.weight_share import WeightShare
    from ..pipeline import Pipeline
    from ..verify import VerifyOptions

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
        if movable(tensor):
            tensor.ClearField("raw_data")
    return skeleton.SerializeToString()


def _write_container(path: Path, index: Mapping[str, Any], sections: Sequence[Section]) -> int:
    index_bytes = zlib.compress(json.dumps(index, separators=(",", ":"), allow_nan=True).encode(), 9)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(index_bytes), hashlib.sha256(index_bytes).digest())
    write_atomic(path, [header, index_bytes, *(section.payload for section in sections)])
    return path.stat().st_size

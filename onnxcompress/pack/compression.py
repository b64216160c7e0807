"""How one byte stream is stored: an encoding of its bytes (raw, byte-plane shuffle, codebook) and a
codec (zlib, bz2, lzma, optional zstd), the pair that gives the fewest bytes; and the way back."""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx

from .format import PackFormatError

#: Streams larger than this choose their encoding and codec on a sample of SAMPLE_BYTES from their
#: middle, then compress in full once: trying every codec on a 100 MB tensor would take minutes.
SAMPLE_LIMIT = 4 << 20
SAMPLE_BYTES = 1 << 20
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


def zstd_module():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def available_codecs() -> tuple[str, ...]:
    """Codecs this installation can write and read ("none" is always available)."""
    return ("none", "zlib", "bz2", "lzma") + (("zstd",) if zstd_module() is not None else ())


def compress(codec: str, data: bytes, level: int) -> bytes:
    if codec == "zlib":
        return zlib.compress(data, level)
    if codec == "bz2":
        return bz2.compress(data, level)
    if codec == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE, preset=level)
    if codec == "zstd":
        return zstd_module().ZstdCompressor(level=level).compress(data)
    raise ValueError(f"unknown codec {codec}")


def decompress(codec: str, data: bytes, size: int) -> bytes:
    """Decompress to exactly `size` bytes; never more (a damaged length cannot exhaust memory)."""
    if codec == "none":
        out, complete = bytes(data), True
    elif codec in ("zlib", "bz2", "lzma"):
        decoder = {"zlib": zlib.decompressobj, "bz2": bz2.BZ2Decompressor,
                   "lzma": lambda: lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)}[codec]()
        out = decoder.decompress(data, size + 1)
        complete = decoder.eof and not decoder.unused_data
    elif codec == "zstd":
        zstandard = zstd_module()
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


def element_size(tensor: onnx.TensorProto) -> int:
    """Bytes per element when raw_data holds whole elements of 2, 4 or 8 bytes, else 1 (no plane tricks)."""
    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    size = len(tensor.raw_data)
    if count > 0 and size % count == 0 and size // count in (2, 4, 8):
        return size // count
    return 1


@dataclass(frozen=True)
class Encoded:
    encoding: str
    stream: bytes
    params: Mapping[str, int]


def encodings(raw: bytes, itemsize: int) -> Iterator[Encoded]:
    yield Encoded("raw", raw, {})
    if itemsize > 1:
        yield Encoded("shuffle", _shuffle(raw, itemsize), {"itemsize": itemsize})
        book = _codebook(raw, itemsize)
        if book is not None:
            yield Encoded("codebook", book[0], {"itemsize": itemsize, "values": book[1]})


def decode(encoding: str, stream: bytes, params: Mapping[str, Any]) -> bytes:
    if encoding == "raw":
        return stream
    itemsize = int(params["itemsize"])
    if encoding == "shuffle":
        return _unshuffle(stream, itemsize)
    if encoding == "codebook":
        return _uncodebook(stream, itemsize, int(params["values"]))
    raise PackFormatError(f"unknown tensor encoding '{encoding}'")


def smallest(stream: bytes, codecs: Mapping[str, int]) -> tuple[str, bytes]:
    best = ("none", stream)
    for codec, level in codecs.items():
        packed = compress(codec, stream, level)
        if len(packed) < len(best[1]):
            best = (codec, packed)
    return best


def pack_stream(raw: bytes, itemsize: int, codecs: Mapping[str, int]) -> tuple[Encoded, str, bytes]:
    """The (encoding, codec) pair that stores `raw` in the fewest bytes."""
    candidates = list(encodings(raw, itemsize))
    if len(raw) <= SAMPLE_LIMIT:
        results = [(c, *smallest(c.stream, codecs)) for c in candidates]
        return min(results, key=lambda r: len(r[2]))
    # Large: rank every pair on a sample, then compress the full stream once with the winner.
    start = (len(raw) // 2 // itemsize) * itemsize
    sample = raw[start : start + SAMPLE_BYTES]
    scores = []
    for candidate in candidates:
        for encoded in encodings(sample, itemsize):
            if encoded.encoding != candidate.encoding:
                continue
            for codec, level in codecs.items():
                scores.append((len(compress(codec, encoded.stream, level)), candidate, codec))
    if not scores:
        return candidates[0], "none", raw
    _, chosen, codec = min(scores, key=lambda s: s[0])
    packed = compress(codec, chosen.stream, codecs[codec])
    return (chosen, codec, packed) if len(packed) < len(chosen.stream) else (chosen, "none", chosen.stream)

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

The modules: `format` (header constants, errors, the fixed tensor order), `compression` (codecs,
encodings, choosing the smallest pair), `write` (`pack_model`), `read` (`unpack_*`, `read_index`),
`summary` (lines for people).
"""

from __future__ import annotations

from . import compression
from .compression import available_codecs
from .format import (
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    MIN_SECTION_BYTES,
    PackCorruptError,
    PackError,
    PackFormatError,
    model_tensors,
)
from .read import read_index, unpack_bytes, unpack_file, unpack_model, unpack_proto
from .summary import fidelity_text, size_change, summary_lines
from .write import FIDELITY_SAMPLES, PackStats, pack_model, source_proto

__all__ = [
    "FIDELITY_SAMPLES", "FORMAT_VERSION", "HEADER", "MAGIC", "MIN_SECTION_BYTES", "PackCorruptError", "PackError",
    "PackFormatError", "PackStats", "available_codecs", "compression", "fidelity_text", "model_tensors", "pack_model",
    "read_index", "size_change", "source_proto", "summary_lines", "unpack_bytes", "unpack_file", "unpack_model",
    "unpack_proto",
]

"""The real-model corpus built by `python benchmarks/real/build.py`, for other scripts.

    from real import corpus          # a script in benchmarks/ (or: from benchmarks.real import corpus)
    corpus.ensure_built()            # one-line error naming build.py when the cache is missing
    for entry in corpus.models():
        feeds = corpus.calibration(entry.name, 64)     # list of feed dicts, batch 1 each
        batch = corpus.stack(feeds)                    # one feed dict, batch 64 (text padded with mask 0)

Feed dicts are always batch 1 (one sample per dict, as the models are called one image / one
sentence at a time), ready for `InferenceSession.run(None, feed)`. Images come as float32 NCHW
(opennsfw: NHWC, as its TensorFlow-converted graph takes them), already preprocessed the model's
way; sentences as int64 input_ids / attention_mask at their own token length. `stack()`
concatenates them along axis 0 (for image models every sample has the same shape; text is
right-padded to the longest with the tokenizer's pad id and attention_mask 0, which leaves the
mean-pooled embedding unchanged). The layout model's input has a fixed batch of 1:
feed it sample by sample. Order is fixed: the first n samples of a split are always the same, and
they take the sources in turn, so a small n still covers every source.

The cache is `~/.cache/onnxcompress/real` unless ONNXCOMPRESS_REAL_CACHE names another folder.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INDEX = "corpus.json"
KINDS = ("image-classifier", "binary-classifier", "ocr-det", "ocr-rec", "ocr-cls", "layout", "text-encoder")
SPLITS = ("calibration", "evaluation")


class CorpusMissing(RuntimeError):
    """The corpus has not been built (or not completely) in the cache folder."""


def cache_dir() -> Path:
    env = os.environ.get("ONNXCOMPRESS_REAL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxcompress" / "real"


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    path: Path  # the ONNX file
    inputs: dict[str, list]  # input name -> shape (ints, or strings for dynamic axes)
    outputs: dict[str, list]
    sample_shapes: dict[str, list]  # the shape of each input in one stored sample (text: sequence length varies, shown as "sequence")
    provenance: str
    preprocessing: dict[str, Any]
    params: int
    macs: int | None  # at sample_shapes (text: sequence 128), by onnxcompress's cost model
    bytes: int
    counts: dict[str, int]  # samples per split
    check: dict[str, Any]  # what build.py verified when it fetched the model


def _resolve(cache: str | os.PathLike | None) -> Path:
    return Path(cache).expanduser() if cache is not None else cache_dir()


def ensure_built(cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """The corpus index; CorpusMissing (one line) when the cache has no complete corpus."""
    root = _resolve(cache)
    index = root / INDEX
    if not index.exists():
        raise CorpusMissing(f"real-model corpus not built in {root}: run `python benchmarks/real/build.py` "
                            "(or set ONNXCOMPRESS_REAL_CACHE to where it was built)")
    data = _index(str(index), index.stat().st_mtime_ns)
    missing = [m["name"] for m in data["models"] if not (root / m["onnx"]).exists() or not (root / m["data"]).exists()]
    if missing:
        raise CorpusMissing(f"real-model corpus in {root} lacks files of {', '.join(missing)}: run `python benchmarks/real/build.py`")
    return data


@functools.lru_cache(maxsize=4)
def _index(path: str, mtime: int) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def models(cache: str | os.PathLike | None = None) -> list[Entry]:
    root = _resolve(cache)
    data = ensure_built(root)
    return [_entry(root, m) for m in data["models"]]


def model(name: str, cache: str | os.PathLike | None = None) -> Entry:
    for entry in models(cache):
        if entry.name == name:
            return entry
    raise KeyError(f"no model {name!r} in the real-model corpus; have {[e.name for e in models(cache)]}")


def _entry(root: Path, m: dict[str, Any]) -> Entry:
    return Entry(
        name=m["name"], kind=m["kind"], path=root / m["onnx"],
        inputs={i["name"]: i["shape"] for i in m["inputs"]}, outputs={o["name"]: o["shape"] for o in m["outputs"]},
        sample_shapes=m["sample_shapes"], provenance=m["provenance"], preprocessing=m["preprocessing"],
        params=m["params"], macs=m.get("macs"), bytes=m["bytes"], counts=m["counts"], check=m.get("check", {}),
    )


def _raw(name: str, cache: str | os.PathLike | None) -> tuple[dict[str, Any], Path]:
    root = _resolve(cache)
    data = ensure_built(root)
    for m in data["models"]:
        if m["name"] == name:
            return m, root
    raise KeyError(f"no model {name!r} in the real-model corpus; have {[m['name'] for m in data['models']]}")


@functools.lru_cache(maxsize=8)
def _arrays(path: str, mtime: int) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def _split_arrays(m: dict[str, Any], root: Path, split: str) -> dict[str, np.ndarray]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    path = root / m["data"]
    arrays = _arrays(str(path), path.stat().st_mtime_ns)
    prefix = f"{split}/"
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _count(m: dict[str, Any], split: str, n: int | None) -> int:
    have = m["counts"][split]
    if n is None:
        return have
    if not 0 < n <= have:
        raise ValueError(f"{m['name']} {split}: {n} samples asked for, 1..{have} available")
    return n


def _image_feeds(m: dict[str, Any], arrays: dict[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
    pre = m["preprocessing"]
    name = m["inputs"][0]["name"]
    mean = np.asarray(pre["mean"], np.float32)
    std = np.asarray(pre["std"], np.float32)
    feeds = []
    for i in range(n):
        x = arrays["images"][i].astype(np.float32) * np.float32(pre["scale"])
        if pre["channels"] == "BGR":
            x = x[:, :, ::-1]  # mean/std apply in BGR order, as the OpenCV-based originals do
        x = (x - mean) / std
        if pre["layout"] == "NCHW":
            x = x.transpose(2, 0, 1)
        if "widths" in arrays:
            x[:, :, int(arrays["widths"][i]):] = 0.0  # padding after normalisation, as rapidocr pads
        feeds.append({name: np.ascontiguousarray(x[None], dtype=np.float32)})
    return feeds


def _text_feeds(arrays: dict[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
    ids, offsets = arrays["ids"], arrays["offsets"]
    feeds = []
    for i in range(n):
        row = ids[offsets[i]:offsets[i + 1]].astype(np.int64)[None]
        feeds.append({"input_ids": row, "attention_mask": np.ones_like(row)})
    return feeds


def _feeds(name: str, split: str, n: int | None, cache) -> list[dict[str, np.ndarray]]:
    m, root = _raw(name, cache)
    count = _count(m, split, n)
    arrays = _split_arrays(m, root, split)
    if m["kind"] == "text-encoder":
        return _text_feeds(arrays, count)
    return _image_feeds(m, arrays, count)


def calibration(name: str, n: int | None = None, cache: str | os.PathLike | None = None) -> list[dict[str, np.ndarray]]:
    """The first n calibration samples of a model (all when n is None) as batch-1 feed dicts."""
    return _feeds(name, "calibration", n, cache)


def evaluation(name: str, n: int | None = None, cache: str | os.PathLike | None = None) -> list[dict[str, np.ndarray]]:
    """The first n evaluation samples (sources disjoint from calibration) as batch-1 feed dicts."""
    return _feeds(name, "evaluation", n, cache)


def provenance(name: str, split: str, n: int | None = None, cache: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Where each sample came from (photo and crop box, page and scale, sentence text, known text or angle)."""
    m, root = _raw(name, cache)
    count = _count(m, split, n)
    meta = json.loads((root / m["provenance_file"]).read_text())
    return meta[split][:count]


def pad_id(name: str, cache: str | os.PathLike | None = None) -> int:
    m, _ = _raw(name, cache)
    return int(m["preprocessing"].get("pad_id", 0))


def stack(feeds: list[dict[str, np.ndarray]], pad_token_id: int = 0) -> dict[str, np.ndarray]:
    """Batch-1 feed dicts concatenated on axis 0; int64 inputs of different lengths right-padded
    (input_ids with pad_token_id, attention_mask with 0)."""
    if not feeds:
        raise ValueError("no feeds to stack")
    out = {}
    for key in feeds[0]:
        arrays = [f[key] for f in feeds]
        longest = max(a.shape[-1] for a in arrays)
        if any(a.shape[1:] != arrays[0].shape[1:] for a in arrays):
            if arrays[0].dtype != np.int64 or arrays[0].ndim != 2:
                raise ValueError(f"{key}: samples have different shapes and are not token ids")
            fill = 0 if key == "attention_mask" else pad_token_id
            arrays = [np.pad(a, ((0, 0), (0, longest - a.shape[1])), constant_values=fill) for a in arrays]
        out[key] = np.concatenate(arrays, axis=0)
    return out

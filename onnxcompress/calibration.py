"""Calibration data: real inputs for verification, pruning importance, reconstruction and quantization.

Held as one array per model input with the samples on axis 0. Random data exists only when asked for
and is labelled as such wherever it is reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from .errors import InputShapeError, OnnxCompressError
from .model import graph_inputs, input_dtype


class CalibrationError(OnnxCompressError):
    """Calibration data that is missing, unreadable or does not fit the model."""


#: The .npz key (or from_arrays key) of an optional label per sample naming its source: the photo,
#: document or recording it was cut from. Held-out samples are then whole sources: crops of a photo
#: the fitting saw overstate fidelity on other photos.
SAMPLE_SOURCE_KEY = "__source__"


@dataclass(frozen=True)
class Calibration:
    arrays: Mapping[str, np.ndarray]  # input name -> samples stacked on axis 0
    source: str  # "digits_calib.npz", "random (seed 0)", ...
    is_random: bool = False
    # Rank-0 model inputs (a sample rate): one value for every sample, fed as a scalar, never split.
    scalars: frozenset[str] = frozenset()
    # The source of every sample (SAMPLE_SOURCE_KEY; an image folder: the file names), None when unknown.
    sources: tuple[str, ...] | None = field(default=None, compare=False)
    # Where streaming statistics are reduced (analysis/streaming.reduce_values): None in this process,
    # or an engine with the same results, such as distributed.RayEngine. Every part of this data keeps it.
    engine: Any = None

    def __post_init__(self) -> None:
        counts = {len(a) for a in self.arrays.values()}
        if len(counts) != 1:
            raise CalibrationError(f"calibration inputs have different sample counts: {sorted(counts)}")
        if self.sources is not None and len(self.sources) != self.num_samples:
            raise CalibrationError(f"{self.source}: {len(self.sources)} source labels for {self.num_samples} samples")

    @property
    def source_count(self) -> int | None:
        """How many distinct sources the samples come from (None when unknown)."""
        return None if self.sources is None else len(set(self.sources))

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batches(self, batch_size: int = 1, limit: int | None = None, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts of up to `batch_size` samples, over samples `start` .. `limit` (all by default)."""
        n = self.num_samples if limit is None else min(limit, self.num_samples)
        for start in range(start, n, batch_size):
            feeds = {k: v[start : min(start + batch_size, n)] for k, v in self.arrays.items() if k not in self.scalars}
            # scalars last: callers count a batch's samples by its first array
            yield {**feeds, **{k: self.arrays[k][start, ...] for k in self.arrays if k in self.scalars}}

    def sample_shapes(self, model: ir.Model) -> dict[str, tuple[int, ...]]:
        """The shape of one sample per model input it feeds (the model's own batch where fixed, else 1):
        the shapes to analyse and time at when the user gave none, so dynamic dims need no --input-shape."""
        shapes = {}
        for value in graph_inputs(model):
            if value.name in self.scalars:
                shapes[value.name] = ()
            elif value.name in self.arrays:
                dims = list(value.shape.dims) if value.shape is not None else []
                batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else 1
                shapes[value.name] = (batch, *self.arrays[value.name].shape[1:])
        return shapes

    def first(self, n: int) -> Calibration:
        """The first `n` samples (all when there are fewer)."""
        if n < 1:
            raise CalibrationError(f"calibration sample count must be at least 1, got {n}")
        if n >= self.num_samples:
            return self
        return self.samples(0, n, f"{self.source} (first {n})")

    def samples(self, start: int, stop: int | None = None, source: str | None = None) -> Calibration:
        """Samples `start` .. `stop` as a Calibration of their own (same source unless given)."""
        arrays = {k: v[start:stop] for k, v in self.arrays.items()}  # views, no copies
        sources = None if self.sources is None else self.sources[start:stop]
        return Calibration(arrays, self.source if source is None else source, self.is_random, self.scalars, sources,
                           self.engine)

    def take(self, indices: Sequence[int] | np.ndarray, source: str | None = None) -> Calibration:
        """The samples at `indices`, in that order, as a Calibration of their own."""
        indices = np.asarray(indices, dtype=np.int64)
        arrays = {k: v[indices] for k, v in self.arrays.items()}
        sources = None if self.sources is None else tuple(self.sources[i] for i in indices)
        return Calibration(arrays, self.source if source is None else source, self.is_random, self.scalars, sources,
                           self.engine)

    def split(self, holdout: float) -> tuple[Calibration, Calibration]:
        """(fit, held-out) parts: with two or more known sources, whole sources (the last ones,
        as close to `holdout` of the samples as they come, at least one); else samples from the
        end. Deterministic, so results stay reproducible."""
        n_hold = max(1, int(round(self.num_samples * holdout)))
        if n_hold >= self.num_samples:
            raise CalibrationError(f"cannot hold out {n_hold} of {self.num_samples} calibration samples")
        if (self.source_count or 0) >= 2:
            return self._split_by_source(n_hold)
        cut = self.num_samples - n_hold
        same = " of the fitting samples' one source" if self.source_count == 1 else ""
        return self.samples(0, cut), self.samples(cut, None, f"{self.source} (held out{same})")

    def _split_by_source(self, n_hold: int) -> tuple[Calibration, Calibration]:
        labels = np.asarray(self.sources, dtype=object)
        order = list(dict.fromkeys(self.sources))  # by first appearance
        held: list[str] = []
        count = 0
        for name in reversed(order[1:]):  # the first source always stays for fitting
            size = int(np.sum(labels == name))
            if held and abs(count + size - n_hold) >= abs(count - n_hold):
                break
            held.append(name)
            count += size
        mask = np.isin(labels, held)
        note = f"{self.source} (held out: {count} samples of {len(held)} source{'s' if len(held) > 1 else ''} never fitted)"
        return self.take(np.flatnonzero(~mask)), self.take(np.flatnonzero(mask), note)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_arrays(cls, model: ir.Model, arrays: Mapping[str, np.ndarray] | np.ndarray, source: str = "arrays",
                    sources: Sequence[str] | None = None) -> Calibration:
        """From arrays keyed by input name (or one bare array for a single-input model), checked against
        the model; each sample's source from `sources` or an array under SAMPLE_SOURCE_KEY."""
        inputs = graph_inputs(model)
        if not isinstance(arrays, np.ndarray) and SAMPLE_SOURCE_KEY in arrays:
            arrays = dict(arrays)
            sources = _source_labels(arrays.pop(SAMPLE_SOURCE_KEY), source)
        if isinstance(arrays, np.ndarray):
            if len(inputs) != 1:
                names = ", ".join(v.name for v in inputs)
                raise CalibrationError(f"{source}: one array given but the model has {len(inputs)} inputs ({names})")
            arrays = {inputs[0].name: arrays}
        if len(arrays) == 1 and len(inputs) == 1 and inputs[0].name not in arrays:
            arrays = {inputs[0].name: next(iter(arrays.values()))}  # npz saved with a default key
        checked = {}
        for value in inputs:
            if value.name not in arrays:
                raise CalibrationError(f"{source}: no data for model input '{value.name}' (found: {', '.join(arrays)})")
            checked[value.name] = _fit_to_input(value, np.asarray(arrays[value.name]), source)
        if not any(np.any(a) for a in checked.values()):
            raise CalibrationError(f"{source}: every calibration value is zero; ranges, channel importance and fidelity "
                                   "measured on it mean nothing: give real input samples")
        scalars = frozenset(v.name for v in inputs if _is_scalar(v))
        return cls(_broadcast_scalars(checked, scalars, source), source, scalars=scalars,
                   sources=None if sources is None else tuple(str(s) for s in sources))

    @classmethod
    def from_path(
        cls, model: ir.Model, path: str | Path, *, preprocessing: str | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None, limit: int | None = None,
    ) -> Calibration:
        """A `.npy` (single-input models) or `.npz` (arrays named after the inputs) file, or a folder of
        images read with `preprocessing` (see images.py: "imagenet", "raw" or key=value steps); the
        first `limit` samples only when given."""
        path = Path(path)
        if limit is not None and limit < 1:
            raise CalibrationError(f"calibration sample count must be at least 1, got {limit}")
        if path.is_dir():
            return cls.from_images(model, path, preprocessing, input_shapes, limit=limit)
        if preprocessing is not None:
            raise CalibrationError(f"{path}: image preprocessing applies to a folder of images, not to a {path.suffix} file")
        if not path.is_file():
            raise CalibrationError(f"{path}: no such calibration file")
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as data:
                    arrays = {k: data[k] for k in data.files}
            elif path.suffix == ".npy":
                arrays = np.load(path, allow_pickle=False)
            else:
                raise CalibrationError(f"{path}: calibration data must be .npy or .npz")
        except CalibrationError:
            raise
        except Exception as exc:
            raise CalibrationError(f"{path}: cannot read calibration data ({str(exc).splitlines()[0][:200]})") from None
        calibration = cls.from_arrays(model, arrays, source=path.name)
        return calibration if limit is None else calibration.first(limit)

    @classmethod
    def from_images(
        cls, model: ir.Model, folder: str | Path, preprocessing: str | None,
        input_shapes: Mapping[str, Sequence[int]] | None = None, limit: int | None = None,
    ) -> Calibration:
        """A folder of images (sorted by name) for a model with one image input. The preprocessing is
        required: it must be the model's own, and no default can know it."""
        from .images import image_files, load_images, parse_preprocessing

        folder = Path(folder)
        if not preprocessing:
            raise CalibrationError(f"{folder}: calibration images need their preprocessing, e.g. --calib-preprocess imagenet "
                                   "(or raw, or steps such as 'raw,mean=0.5,std=0.5,layout=nhwc'): the model's own")
        inputs = graph_inputs(model)
        if len(inputs) != 1:
            raise CalibrationError(f"{folder}: a folder of images fits a model with one input; this one has "
                                   f"{len(inputs)} ({', '.join(v.name for v in inputs)}): give an .npz")
        value = inputs[0]
        given = (input_shapes or {}).get(value.name)
        dims = list(given) if given is not None else [d if isinstance(d, int) else None for d in (value.shape.dims if value.shape else ())]
        prep = parse_preprocessing(preprocessing)
        images = load_images(folder, dims, prep, limit=limit)
        names = [str(path.relative_to(folder)) for path in image_files(folder)[: len(images)]]  # each file a source
        return cls.from_arrays(model, images, source=f"{folder.name}/ ({len(images)} images; {prep.describe()})", sources=names)

    @classmethod
    def from_samples(cls, model: ir.Model, samples: Iterable[Mapping[str, np.ndarray]], source: str = "iterator") -> Calibration:
        """From an iterator of feed dicts (each a batch with samples on axis 0)."""
        collected: dict[str, list[np.ndarray]] = {}
        for feeds in samples:
            for k, v in feeds.items():
                collected.setdefault(k, []).append(np.asarray(v))
        if not collected:
            raise CalibrationError(f"{source}: no calibration samples")
        return cls.from_arrays(model, {k: np.concatenate(v) for k, v in collected.items()}, source)

    @classmethod
    def random(cls, model: ir.Model, shapes: Mapping[str, Sequence[int]], count: int = 8, seed: int = 0) -> Calibration:
        """Random data, explicitly asked for: fine for exactness checks, meaningless for fidelity."""
        from .verify import random_feeds

        feeds = random_feeds(model, {k: (count, *tuple(s)[1:]) if len(s) else () for k, s in shapes.items()}, seed=seed)[0]
        scalars = frozenset(k for k, v in feeds.items() if np.ndim(v) == 0)
        return cls(_broadcast_scalars(feeds, scalars, "random"), f"random (seed {seed})", is_random=True, scalars=scalars)


def batch_size_for(model: ir.Model, requested: int) -> int:
    """`requested`, unless an input fixes its leading (batch) dimension: then that size."""
    for value in graph_inputs(model):
        dims = list(value.shape.dims) if value.shape is not None else []
        if dims and isinstance(dims[0], int) and dims[0] > 0:
            return dims[0]
    return requested


def fed_sources(data: Calibration, feeds: Sequence[Mapping[str, np.ndarray]]) -> tuple | None:
    """The source of each sample in `feeds` (batches of `data` in order; a partial fixed batch may
    have been left out), None when `data` names none."""
    rows = sum(len(next(iter(f.values()))) for f in feeds)
    return None if data.sources is None else tuple(data.sources[:rows])


def model_batches(model: ir.Model, data: Calibration, preferred: int = 8) -> list[dict[str, np.ndarray]]:
    """All of `data` in batches the model runs: its fixed batch size (a partial last batch left out,
    it would not fit) or else `preferred`."""
    size = batch_size_for(model, preferred)
    feeds = list(data.batches(size))
    if batch_size_for(model, 0):
        feeds = [f for f in feeds if len(next(iter(f.values()))) == size]
    if not feeds:
        raise CalibrationError(f"the model's fixed batch of {size} needs more samples than {data.num_samples} ({data.source})")
    return feeds


def _source_labels(array: np.ndarray, source: str) -> tuple[str, ...]:
    array = np.asarray(array)
    if array.ndim != 1 or not (array.dtype.kind in "iuUS"):
        raise CalibrationError(f"{source}: '{SAMPLE_SOURCE_KEY}' must be one label (int or string) per sample, "
                               f"got {array.dtype} shaped {array.shape}")
    return tuple(str(v) for v in array.tolist())


def _is_scalar(value: ir.Value) -> bool:
    return value.shape is not None and len(value.shape) == 0


def _broadcast_scalars(arrays: Mapping[str, np.ndarray], scalars: frozenset[str], source: str) -> dict[str, np.ndarray]:
    """Scalar inputs repeated once per sample (given as one value, or one equal value per sample)."""
    counts = {len(v) for k, v in arrays.items() if k not in scalars}
    count = counts.pop() if len(counts) == 1 else 1
    out = dict(arrays)
    for name in scalars:
        values = np.unique(arrays[name])
        if len(values) != 1:
            raise CalibrationError(f"{source}: input '{name}' is a scalar (one value for the whole model run) but "
                                   f"the samples hold {len(values)} different values; give one value")
        out[name] = np.full(count, values[0], arrays[name].dtype)
    return out


def _fit_to_input(value: ir.Value, array: np.ndarray, source: str) -> np.ndarray:
    dtype = input_dtype(value)
    if _is_scalar(value):  # one value, or one per sample: _broadcast_scalars makes it one per sample
        if array.ndim > 1 or array.size == 0:
            raise CalibrationError(f"{source}: input '{value.name}' is a scalar; give one value or one per sample, "
                                   f"got shape {array.shape}")
    elif value.shape is not None:
        dims = list(value.shape.dims)
        expected = _expected_shape(dims)
        if array.ndim != len(dims):
            raise CalibrationError(f"{source}: input '{value.name}' needs rank {len(dims)} (samples on axis 0): "
                                   f"expected {expected}, given {array.shape}")
        for i, (want, got) in enumerate(zip(dims[1:], array.shape[1:]), start=1):
            if isinstance(want, int) and want != got:
                raise CalibrationError(f"{source}: input '{value.name}' dim {i} must be {want}: expected {expected}, "
                                       f"given {array.shape}{_layout_hint(dims, array.shape)}")
    if not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise CalibrationError(f"{source}: input '{value.name}' needs {dtype}, got {array.dtype}")
    if array.ndim and len(array) == 0:
        raise CalibrationError(f"{source}: input '{value.name}' has no samples")
    _check_finite(value.name, array, source)
    return np.ascontiguousarray(array.astype(dtype, copy=False))


def _expected_shape(dims: Sequence) -> str:
    """'(N, 3, 224, 224)': samples first, '?' for the dims the model leaves open."""
    return "(" + ", ".join("N" if i == 0 else str(d) if isinstance(d, int) else "?" for i, d in enumerate(dims)) + ")"


def _layout_hint(dims: Sequence, shape: tuple[int, ...]) -> str:
    """A hint when channels-last data is given for a channels-first input (NHWC for NCHW)."""
    if len(dims) >= 3 and isinstance(dims[1], int) and shape[-1] == dims[1] and shape[1] != dims[1]:
        order = (0, len(shape) - 1, *range(1, len(shape) - 1))
        return f"; channels-last data for a channels-first input? transpose it with .transpose{order}"
    return ""


def _check_finite(name: str, array: np.ndarray, source: str) -> None:
    """NaN or infinite samples would make every range, importance and fidelity number NaN."""
    if not np.issubdtype(array.dtype, np.inexact):
        return
    if np.isfinite(np.sum(array, dtype=np.complex128 if np.iscomplexobj(array) else np.float64)):
        return  # the float64 sum of finite values cannot overflow (unless they are float64 near its limit)
    bad = ~np.isfinite(array.reshape(len(array), -1))
    if bad.any():
        first = int(np.argmax(bad.any(axis=1)))
        raise CalibrationError(f"{source}: input '{name}' has {int(bad.sum())} NaN or infinite values "
                               f"(first in sample {first}); calibration data must be finite")


__all__ = ["SAMPLE_SOURCE_KEY", "Calibration", "CalibrationError", "InputShapeError"]

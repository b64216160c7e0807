"""Calibration images from a folder, with a stated preprocessing: resize, crop, scale, mean/std, layout.

The preprocessing must be the one the model was trained with; `imagenet` is torchvision's usual
evaluation transform (shorter side to size / 0.875, centre crop, mean/std normalisation, RGB,
NCHW). The target height and width come from the model's image input, so a model with a dynamic
H or W needs `--input-shape`. Images are read with Pillow (`pip install pillow`, in the `images`
extra), sorted by file name so the same folder gives the same samples every time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import OnnxCompressError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
IMAGENET_CROP_FRACTION = 0.875  # 224 of 256: the crop torchvision's evaluation transform takes


@dataclass(frozen=True)
class ImagePreprocessing:
    """How files become model inputs. Each field is one step; `describe()` states them for the report."""

    resize: Literal["shorter", "exact"] = "exact"  # shorter: shorter side to crop/crop_fraction, then centre crop
    crop_fraction: float = 1.0  # with resize="shorter": the centre crop's share of the resized shorter side
    scale: float = 1.0 / 255.0  # pixel values (0..255) are multiplied by this
    mean: tuple[float, ...] = (0.0,)  # per channel (or one for all), subtracted after scaling
    std: tuple[float, ...] = (1.0,)  # per channel (or one for all), divided by after the mean
    layout: Literal["nchw", "nhwc"] = "nchw"
    channels: Literal["rgb", "bgr"] = "rgb"  # order for 3-channel inputs; 1-channel inputs get grayscale

    def __post_init__(self) -> None:
        if self.resize not in ("shorter", "exact") or self.layout not in ("nchw", "nhwc") or self.channels not in ("rgb", "bgr"):
            raise OnnxCompressError("image preprocessing: resize is shorter|exact, layout nchw|nhwc, channels rgb|bgr")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise OnnxCompressError(f"image preprocessing: crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if any(s == 0 for s in self.std):
            raise OnnxCompressError("image preprocessing: std must not be 0")

    def describe(self) -> str:
        steps = ["resize the shorter side to height/{:g}, centre crop".format(self.crop_fraction)
                 if self.resize == "shorter" else "resize to the model's height x width"]
        steps += [f"x{self.scale:g}", f"mean {'/'.join(f'{m:g}' for m in self.mean)}",
                  f"std {'/'.join(f'{s:g}' for s in self.std)}", self.channels.upper(), self.layout.upper()]
        return ", ".join(steps)


PRESETS = {
    "raw": ImagePreprocessing(),
    "imagenet": ImagePreprocessing(resize="shorter", crop_fraction=IMAGENET_CROP_FRACTION,
                                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}


def parse_preprocessing(text: str | None) -> ImagePreprocessing:
    """A preset name (raw, imagenet), optionally followed by overrides: "imagenet,layout=nhwc,channels=bgr";
    or overrides alone on top of raw: "mean=0.5,std=0.5,scale=0.00392"."""
    if not text:
        return PRESETS["raw"]
    parts = [p.strip() for p in text.split(",") if p.strip()]
    base = PRESETS["raw"]
    if parts and "=" not in parts[0]:
        if parts[0] not in PRESETS:
            raise OnnxCompressError(f"unknown image preprocessing preset '{parts[0]}' (choose: {', '.join(PRESETS)})")
        base, parts = PRESETS[parts[0]], parts[1:]
    names = {f.name: f for f in fields(ImagePreprocessing)}
    changes: dict[str, object] = {}
    for part in parts:
        key, _, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if key not in names or not value:
            raise OnnxCompressError(f"bad image preprocessing '{part}' (keys: {', '.join(names)}; e.g. mean=0.485/0.456/0.406)")
        try:
            if key in ("mean", "std"):
                changes[key] = tuple(float(v) for v in value.split("/"))
            elif key in ("scale", "crop_fraction"):
                changes[key] = float(value)
            else:
                changes[key] = value.strip().lower()
        except ValueError:
            raise OnnxCompressError(f"bad image preprocessing '{part}': expected numbers") from None
    return replace(base, **changes)


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise OnnxCompressError(f"{folder}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_images(folder: Path, shape: Sequence[int], prep: ImagePreprocessing, *, limit: int | None = None) -> np.ndarray:
    """The folder's images as one float32 array [N, *shape[1:]] for an input of `shape` (rank 4)."""
    try:
        from PIL import Image
    except ImportError:
        raise OnnxCompressError("reading calibration images needs Pillow: pip install onnxcompress[images]") from None
    if len(shape) != 4:
        raise OnnxCompressError(f"a folder of images fits a rank-4 image input, not one shaped {list(shape)}")
    channels, height, width = (shape[1], shape[2], shape[3]) if prep.layout == "nchw" else (shape[3], shape[1], shape[2])
    if not all(isinstance(d, int) and d > 0 for d in (channels, height, width)):
        raise OnnxCompressError(f"image input shape {list(shape)} has dynamic {prep.layout.upper()} dims: "
                                "fix them with --input-shape NAME=1x3x224x224")
    if channels not in (1, 3):
        raise OnnxCompressError(f"image input has {channels} channels ({prep.layout.upper()}); images give 1 or 3")
    mean, std = _per_channel(prep.mean, channels, "mean"), _per_channel(prep.std, channels, "std")
    samples = []
    for path in image_files(folder)[:limit]:
        try:
            with Image.open(path) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                pixels = _resized(image, height, width, prep)
        except (OSError, ValueError) as exc:
            raise OnnxCompressError(f"{path}: cannot read image ({str(exc).splitlines()[0][:120]})") from None
        array = np.asarray(pixels, dtype=np.float32).reshape(height, width, channels)
        if channels == 3 and prep.channels == "bgr":
            array = array[..., ::-1]
        array = (array * prep.scale - mean) / std
        samples.append(array.transpose(2, 0, 1) if prep.layout == "nchw" else array)
    return np.ascontiguousarray(np.stack(samples).astype(np.float32))


def _resized(image, height: int, width: int, prep: ImagePreprocessing):
    from PIL import Image

    if prep.resize == "exact":
        return image.resize((width, height), Image.Resampling.BILINEAR)
    # Shorter side to the crop's size / crop_fraction, then the centre crop (torchvision's eval transform).
    target = max(height, width) / prep.crop_fraction
    factor = target / min(image.size)
    resized = image.resize((max(width, round(image.size[0] * factor)), max(height, round(image.size[1] * factor))),
                           Image.Resampling.BILINEAR)
    left = int(math.floor((resized.size[0] - width) / 2))
    top = int(math.floor((resized.size[1] - height) / 2))
    return resized.crop((left, top, left + width, top + height))


def _per_channel(values: tuple[float, ...], channels: int, name: str) -> np.ndarray:
    if len(values) == 1:
        return np.full(channels, values[0], dtype=np.float32)
    if len(values) != channels:
        raise OnnxCompressError(f"image preprocessing: {name} has {len(values)} values for {channels} channels")
    return np.asarray(values, dtype=np.float32)

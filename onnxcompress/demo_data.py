"""The bundled demo: a residual CNN trained on scikit-learn's digits, its held-out test set and a
calibration set drawn from its training set (see `onnxcompress/data/README.md`).

Images are stored as float16 in [0, 1] (N x 1 x 32 x 32); the model's input is exactly those values
as float32, which is what the loaders return. Needs only numpy and onnxruntime.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputShapeError, ModelLoadError, OnnxCompressError

MODEL_FILE = "digits_cnn.onnx"
TEST_FILE = "digits_test.npz"
CALIBRATION_FILE = "digits_calib.npz"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
NUM_CLASSES = 10

_extracted = contextlib.ExitStack()  # resources unpacked from a zipped install live until exit
atexit.register(_extracted.close)


def _data_file(name: str) -> Path:
    resource = resources.files(__package__) / "data" / name
    if not resource.is_file():
        raise ModelLoadError(f"bundled demo file {name} is missing from the installation")
    if isinstance(resource, Path):
        return resource
    return _extracted.enter_context(resources.as_file(resource))


def demo_model_path() -> Path:
    """Path of the bundled ONNX model (input "image": batch x 1 x 32 x 32 float32, output "logits")."""
    return _data_file(MODEL_FILE)


def _images(npz: Any) -> np.ndarray:
    return npz["image"].astype(np.float32)


def load_test_set() -> tuple[np.ndarray, np.ndarray]:
    """Held-out test images (N x 1 x 32 x 32 float32 in [0, 1]) and their labels (N int64)."""
    with np.load(_data_file(TEST_FILE), allow_pickle=False) as npz:
        return _images(npz), npz["label"].astype(np.int64)


def load_calibration() -> np.ndarray:
    """Calibration images from the training split (N x 1 x 32 x 32 float32 in [0, 1])."""
    with np.load(_data_file(CALIBRATION_FILE), allow_pickle=False) as npz:
        return _images(npz)


def _session(model: Any) -> Any:
    import onnxruntime as ort

    from . import runtime
    from .model import load

    if isinstance(model, ort.InferenceSession):
        return model
    if isinstance(model, (str, os.PathLike)) and not Path(model).is_file():
        raise ModelLoadError(f"{model}: no such file")
    source = model if isinstance(model, (str, os.PathLike)) else load(model)
    try:
        return runtime.session(source)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"onnxruntime cannot load the model ({message})") from None


def predict(model: Any, images: np.ndarray, *, batch: int = 256) -> np.ndarray:
    """Class predictions (argmax of the first output) for `images`, run in batches through ORT.

    `model` is a path, an `onnxruntime.InferenceSession`, an `onnx.ModelProto` or an
    `onnx_ir.Model` with a single image input. A model with a fixed batch size is fed batches of
    exactly that size (the last one zero-padded).
    """
    if batch < 1:
        raise OnnxCompressError(f"batch must be at least 1, got {batch}")
    session = _session(model)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise InputShapeError(f"the model has {len(inputs)} inputs; the digits demo needs one image input")
    images = np.asarray(images, dtype=np.float32)
    want_rank = len(inputs[0].shape)
    if images.ndim != want_rank:
        raise InputShapeError(f"images have shape {images.shape}; the model input '{inputs[0].name}' has rank {want_rank}")
    fixed_batch = inputs[0].shape[0] if isinstance(inputs[0].shape[0], int) else None
    step = fixed_batch or batch
    predictions = []
    for start in range(0, len(images), step):
        chunk = images[start : start + step]
        count = len(chunk)
        if fixed_batch and count < fixed_batch:
            chunk = np.concatenate([chunk, np.zeros((fixed_batch - count, *chunk.shape[1:]), np.float32)])
        try:
            logits = session.run(None, {inputs[0].name: chunk})[0]
        except Exception as exc:
            message = str(exc).strip().splitlines()[0][:200]
            raise InputShapeError(f"onnxruntime cannot run the model on images of shape {chunk.shape} ({message})") from None
        predictions.append(np.asarray(logits)[:count].argmax(axis=1))
    return np.concatenate(predictions) if predictions else np.zeros(0, np.int64)


def accuracy(model: Any, images: np.ndarray, labels: np.ndarray, *, batch: int = 256) -> float:
    """Top-1 accuracy of `model` (see `predict`) on `images` against integer `labels`."""
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise InputShapeError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise InputShapeError("no images to score")
    return float(np.mean(predict(model, images, batch=batch) == labels))


__all__ = [
    "accuracy",
    "demo_model_path",
    "load_calibration",
    "load_test_set",
    "predict",
]

"""The bundled demo model and data: shapes, dtypes, splits, and the model's accuracy through ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxcompress import demo_data
from onnxcompress.errors import InputShapeError, ModelLoadError, OnnxCompressError

#: The bundled model must classify at least this fraction of the held-out digits correctly
#: (it scores 0.997 when trained by scripts/train_digits.py; see onnxcompress/data/README.md).
MIN_TEST_ACCURACY = 0.97
IMAGE_SHAPE = (1, 32, 32)
MAX_MODEL_BYTES = 2 * 2**20
MAX_NPZ_BYTES = 2**20


@pytest.fixture(scope="module")
def test_set() -> tuple[np.ndarray, np.ndarray]:
    return demo_data.load_test_set()


def test_model_file_is_valid_with_named_dynamic_batch_io() -> None:
    path = demo_data.demo_model_path()
    assert path.is_file() and path.stat().st_size < MAX_MODEL_BYTES
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    (image,) = model.graph.input
    (logits,) = model.graph.output
    assert (image.name, logits.name) == (demo_data.INPUT_NAME, demo_data.OUTPUT_NAME)
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == list(IMAGE_SHAPE)
    assert "BatchNormalization" in {n.op_type for n in model.graph.node}


def test_test_set_is_preprocessed_float32_with_every_class(test_set) -> None:
    images, labels = test_set
    assert images.dtype == np.float32 and images.shape[1:] == IMAGE_SHAPE
    assert labels.dtype == np.int64 and labels.shape == (len(images),)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(np.unique(labels)) == set(range(demo_data.NUM_CLASSES))


def test_calibration_comes_from_training_images(test_set) -> None:
    calib = demo_data.load_calibration()
    assert calib.dtype == np.float32 and calib.shape[1:] == IMAGE_SHAPE and len(calib) > 0
    test_rows = {img.tobytes() for img in test_set[0]}
    # load_digits holds a few exact duplicates across the split; nearly all must be unseen
    assert sum(img.tobytes() in test_rows for img in calib) <= 0.02 * len(calib)


def test_data_files_are_small() -> None:
    for name in (demo_data.TEST_FILE, demo_data.CALIBRATION_FILE):
        assert demo_data._data_file(name).stat().st_size < MAX_NPZ_BYTES


def test_bundled_model_is_accurate(test_set) -> None:
    images, labels = test_set
    assert demo_data.accuracy(demo_data.demo_model_path(), images, labels) >= MIN_TEST_ACCURACY


def test_accuracy_is_the_same_for_every_way_to_pass_the_model(test_set) -> None:
    images, labels = test_set
    path = demo_data.demo_model_path()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    predictions = session.run(None, {demo_data.INPUT_NAME: images})[0].argmax(1)
    want = float(np.mean(predictions == labels))
    assert demo_data.accuracy(session, images, labels, batch=7) == want
    assert demo_data.accuracy(onnx.load(str(path)), images, labels, batch=1000) == want
    assert demo_data.accuracy(str(path), images, labels) == want


def test_fixed_batch_model_is_fed_padded_batches(tmp_path, test_set) -> None:
    images, labels = test_set
    model = onnx.load(str(demo_data.demo_model_path()))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 16  # 360 images: 22 full batches + 8
    path = tmp_path / "fixed_batch.onnx"
    onnx.save(model, str(path))
    dynamic = demo_data.predict(demo_data.demo_model_path(), images)
    np.testing.assert_array_equal(demo_data.predict(path, images), dynamic)


@pytest.mark.parametrize(
    ("model", "images", "labels", "error"),
    [
        ("missing.onnx", np.zeros((2, 1, 32, 32)), np.zeros(2), ModelLoadError),
        (None, np.zeros((2, 32, 32)), np.zeros(2), InputShapeError),
        (None, np.zeros((2, 1, 28, 28)), np.zeros(2), InputShapeError),
        (None, np.zeros((2, 1, 32, 32)), np.zeros(3), InputShapeError),
        (None, np.zeros((0, 1, 32, 32)), np.zeros(0), InputShapeError),
    ],
    ids=["missing-file", "wrong-rank", "wrong-size", "label-count", "empty"],
)
def test_bad_input_is_a_one_line_error(tmp_path, model, images, labels, error) -> None:
    model = tmp_path / model if model else demo_data.demo_model_path()
    with pytest.raises(error) as info:
        demo_data.accuracy(model, images, labels)
    assert "\n" not in str(info.value)


def test_not_an_onnx_file_is_a_load_error(tmp_path) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError):
        demo_data.predict(path, np.zeros((1, 1, 32, 32), np.float32))


def test_batch_must_be_positive(test_set) -> None:
    with pytest.raises(OnnxCompressError):
        demo_data.predict(demo_data.demo_model_path(), test_set[0], batch=0)

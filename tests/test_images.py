"""Calibration from a folder of images: each preprocessing step does what it states, errors are one line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from PIL import Image

from onnxcompress.calibration import Calibration
from onnxcompress.errors import OnnxCompressError
from onnxcompress.images import IMAGENET_CROP_FRACTION, parse_preprocessing
from onnxcompress.model import load
from tests.graphs import conv_bn_relu_gemm
from tests.test_cli import run_cli

#: float32 arithmetic on values of order 1.
TOL = 1e-6
RED, BLUE = (200, 10, 30), (0, 40, 250)


def _save(folder, name, pixels):
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(folder / name)


@pytest.fixture
def model():
    return load(conv_bn_relu_gemm(batch="N"))  # input x: [N, 3, 8, 8]


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    _save(images, "b_red.png", np.broadcast_to(np.array(RED), (20, 30, 3)))
    _save(images / "sub", "c_blue.jpg", np.broadcast_to(np.array(BLUE), (16, 16, 3)))
    _save(images, "a_gray.png", np.full((8, 8), 128))  # grayscale file: converted to RGB
    return images


def test_solid_images_give_exact_normalised_values_in_name_order(model, folder):
    calibration = Calibration.from_path(model, folder, preprocessing="imagenet")
    x = calibration.arrays["x"]
    assert x.shape == (3, 3, 8, 8) and x.dtype == np.float32
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for i, rgb in enumerate([(128, 128, 128), RED]):  # a_gray, b_red; sub/c_blue is a JPEG (lossy), checked loosely
        expected = (np.array(rgb) / 255.0 - mean) / std
        np.testing.assert_allclose(x[i].reshape(3, -1), np.repeat(expected[:, None], 64, axis=1), atol=TOL)
    blue = (np.array(BLUE) / 255.0 - mean) / std
    np.testing.assert_allclose(x[2].mean(axis=(1, 2)), blue, atol=0.05)
    assert "3 images" in calibration.source and "mean 0.485/0.456/0.406" in calibration.source
    assert calibration.sources == ("a_gray.png", "b_red.png", "sub/c_blue.jpg")  # every file a source of its own


def test_layout_channel_order_and_scale(folder):
    from onnxcompress.images import load_images

    x = load_images(folder, ["N", 8, 8, 3], parse_preprocessing("raw,layout=nhwc,channels=bgr,scale=1"), limit=2)
    assert x.shape == (2, 8, 8, 3)  # channels last; the first two files by name: a_gray, b_red
    np.testing.assert_allclose(x[1, 0, 0], RED[::-1], atol=TOL)  # BGR order, unscaled 0..255
    gray = load_images(folder, ["N", 1, 8, 8], parse_preprocessing("raw"), limit=1)
    np.testing.assert_allclose(gray, 128 / 255, atol=TOL)  # one-channel input: grayscale, scaled by 1/255


def onnx_ir_shape(dims):
    import onnx_ir as ir

    return ir.Shape(dims)


def test_shorter_side_resize_then_centre_crop(tmp_path):
    from onnxcompress.images import load_images

    folder = tmp_path / "crop"
    folder.mkdir()
    # 10 columns wide, 8 rows tall: left half black, right half white. Shorter side 8 -> 8 / 0.5 = 16 rows,
    # 20 columns; the centre 8x8 crop spans columns 6..13 of 20: 4 black then 4 white.
    pixels = np.zeros((8, 10), dtype=np.uint8)
    pixels[:, 5:] = 255
    _save(folder, "half.png", pixels)
    x = load_images(folder, [1, 1, 8, 8], parse_preprocessing("raw,resize=shorter,crop_fraction=0.5"))
    row = x[0, 0, 4]
    assert np.all(row[:3] < 0.05) and np.all(row[-3:] > 0.95)
    assert parse_preprocessing("imagenet").crop_fraction == IMAGENET_CROP_FRACTION


@pytest.mark.parametrize(
    ("spec", "message"),
    [("vgg", "unknown image preprocessing preset"), ("raw,mean=a", "expected numbers"),
     ("raw,colour=rgb", "bad image preprocessing"), ("raw,std=0", "std must not be 0"),
     ("raw,mean=0.1/0.2", "2 values for 3 channels"), ("raw,layout=chw", "layout nchw|nhwc")],
)
def test_bad_preprocessing_is_one_line(model, folder, spec, message):
    with pytest.raises(OnnxCompressError, match=message):
        Calibration.from_path(model, folder, preprocessing=spec)


def test_folder_errors(model, tmp_path, folder):
    with pytest.raises(OnnxCompressError, match="need their preprocessing"):
        Calibration.from_path(model, folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OnnxCompressError, match="no images found"):
        Calibration.from_path(model, empty, preprocessing="raw")
    (folder / "z_broken.png").write_bytes(b"not an image")
    with pytest.raises(OnnxCompressError, match="z_broken.png: cannot read image"):
        Calibration.from_path(model, folder, preprocessing="raw")
    dynamic = load(conv_bn_relu_gemm(batch="N"))
    dynamic.graph.inputs[0].shape = onnx_ir_shape(["N", 3, "H", "W"])
    with pytest.raises(OnnxCompressError, match="--input-shape"):
        Calibration.from_path(dynamic, folder, preprocessing="raw")


def test_cli_optimize_calibrates_on_an_image_folder(capsys, tmp_path, folder):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_gemm(batch="N"), path)
    code, out, err = run_cli(capsys, "optimize", path, "-o", tmp_path / "q.onnx", "--calib", folder,
                             "--calib-preprocess", "imagenet", "--quantize", "int8", "--bench-runs", "0", "--json")
    assert code == 0, err
    assert "3 images" in json.loads(out)["fidelity"]["inputs"]
    code, _, err = run_cli(capsys, "optimize", path, "-o", tmp_path / "r.onnx", "--calib-preprocess", "imagenet")
    assert code == 2 and "give --calib FOLDER" in err

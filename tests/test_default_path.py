"""The default `optimize --calib` path: a tolerance by output kind that int8 can meet, timings at the
deployed threads and batch."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress import demo_data
from onnxcompress.errors import OnnxCompressError
from onnxcompress.model import load
from onnxcompress.optimize import OptimizeOptions, optimize, timing_shapes
from onnxcompress.tolerance import DEFAULT_MAP_DROP, DEFAULT_VECTOR_DROP, Tolerance, default_tolerance
from tests.graphs import conv_bn_relu_gemm


def test_default_tolerance_by_output_kind():
    vectors = [[np.zeros((4, 10), np.float32)]]
    maps = [[np.zeros((4, 2, 8, 8), np.float32), np.zeros((4, 25, 97), np.float32)]]
    mixed = [[np.zeros((4, 16, 384), np.float32), np.zeros((4, 384), np.float32)]]
    assert default_tolerance(vectors) == Tolerance("cosine", DEFAULT_VECTOR_DROP)
    assert default_tolerance(maps) == Tolerance("cosine", DEFAULT_MAP_DROP)
    assert default_tolerance(mixed) == Tolerance("cosine", DEFAULT_VECTOR_DROP)  # the stricter bound wins
    assert DEFAULT_VECTOR_DROP < DEFAULT_MAP_DROP


def test_optimize_uses_the_default_for_class_scores_and_times_at_the_given_threads():
    model = load(demo_data.demo_model_path())
    calibration = demo_data.load_calibration()[:64]
    result = optimize(model, calibration=calibration,
                      options=OptimizeOptions(bench_runs=20, threads=1))
    assert result.mode == "search"
    assert result.report.search["tolerance"]["bound"] == DEFAULT_VECTOR_DROP
    assert result.report.bench["threads"] == 1


def test_timing_shapes_put_the_batch_on_axis_0_and_refuse_a_fixed_batch():
    model = load(conv_bn_relu_gemm(batch="N"))
    assert timing_shapes(model, {"x": (1, 3, 8, 8)}, 4) == {"x": (4, 3, 8, 8)}
    assert timing_shapes(model, {"x": (1, 3, 8, 8)}, None) == {"x": (1, 3, 8, 8)}
    with pytest.raises(OnnxCompressError, match="fixed batch of 1"):
        timing_shapes(load(conv_bn_relu_gemm(batch=1)), {"x": (1, 3, 8, 8)}, 4)


@pytest.mark.parametrize("field", ["threads", "batch"])
def test_threads_and_batch_are_validated(field):
    with pytest.raises(OnnxCompressError, match=f"--{field}"):
        OptimizeOptions(**{field: 0})

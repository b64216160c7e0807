"""Streaming histograms: exact merging, bounded memory, and the clipping-range methods on known data."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.analysis.histograms import (
    METHODS,
    TensorHistogram,
    clip_range,
    entropy_range,
    minmax_range,
    mse_range,
    percentile_range,
)

BINS = 2048
#: A percentile read off a histogram is within one bin width of the exact sample percentile.
PERCENTILE_BIN_TOLERANCE = 1.0
#: MSE search grid: the chosen range's error may exceed the best grid point found by brute force by this factor.
MSE_SEARCH_SLACK = 1.05
#: Entropy thresholds against ORT's HistogramCollector on the same data: the KL minimum sits in the
#: sparse tail, where the two bin groupings differ; across seeds the gap stays under 10%.
ENTROPY_VS_ORT_REL_TOLERANCE = 0.10
#: At most this fraction of a Relu'd Gaussian lies above the entropy threshold (about 3.7 sigma).
ENTROPY_MAX_CLIPPED_FRACTION = 1e-4


def _gaussian_with_outlier(n: int = 1_000_000, outlier: float = 20.0, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(n)
    x[0] = outlier
    return x


def _hist(*arrays: np.ndarray, bins: int = BINS) -> TensorHistogram:
    h = TensorHistogram(bins)
    for a in arrays:
        h.update(a)
    return h


def test_streaming_equals_single_pass():
    rng = np.random.default_rng(1)
    # ranges that grow in both directions, shrink, and jump far from zero
    batches = [rng.normal(0, 0.01, 500), rng.normal(3, 1, 500), rng.normal(-40, 5, 500), rng.normal(0, 1e-4, 500)]
    streamed = _hist(*batches)
    single = _hist(np.concatenate(batches))
    assert streamed.width_exp == single.width_exp and streamed.start == single.start
    np.testing.assert_array_equal(streamed.counts, single.counts)
    assert streamed.count == single.count == 2000
    assert (streamed.minimum, streamed.maximum) == (single.minimum, single.maximum)


def test_merge_equals_single_pass():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, 1000), rng.exponential(50, 1000)
    merged = _hist(a).merge(_hist(b))
    single = _hist(np.concatenate([a, b]))
    np.testing.assert_array_equal(merged.counts, single.counts)
    assert merged.width_exp == single.width_exp and merged.count == single.count


def test_counts_match_numpy_histogram_on_the_same_edges():
    x = np.random.default_rng(3).normal(1, 2, 10_000)
    h = _hist(x)
    expected, _ = np.histogram(x, bins=h.edges)
    np.testing.assert_array_equal(h.counts, expected)


def test_memory_does_not_grow_with_samples():
    rng = np.random.default_rng(4)
    small = _hist(*[rng.normal(0, 1, (1, 64)) for _ in range(32)])
    large = _hist(*[rng.normal(0, 1, (1, 64)) for _ in range(256)])
    assert small.counts.nbytes == large.counts.nbytes == BINS * 8


def test_non_finite_values_are_counted_not_binned():
    h = _hist(np.array([1.0, np.inf, np.nan, -2.0]))
    assert h.count == 2 and h.nonfinite == 2 and h.counts.sum() == 2


def test_minmax_includes_the_outlier_percentile_and_mse_clip_it():
    x = _gaussian_with_outlier()
    h = _hist(x)
    assert minmax_range(h) == (x.min(), 20.0)
    lo, hi = percentile_range(h, 99.99)
    width = h.width
    assert abs(hi - np.percentile(x, 99.99)) <= PERCENTILE_BIN_TOLERANCE * width
    assert abs(lo - np.percentile(x, 0.01)) <= PERCENTILE_BIN_TOLERANCE * width
    assert mse_range(h)[1] < 10.0  # the lone outlier at 20 costs less clipped than kept
    assert entropy_range(h)[1] < 10.0


def _ort_entropy_threshold(x: np.ndarray) -> tuple[float, float]:
    """ORT's own entropy calibration (quantize_static's CalibrationMethod.Entropy defaults) on `x`."""
    import contextlib
    import io

    from onnxruntime.quantization.calibrate import HistogramCollector

    collector = HistogramCollector("entropy", symmetric=False, num_bins=BINS, num_quantized_bins=128,
                                   percentile=99.999, scenario="same")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress
        collector.collect({"x": x.astype(np.float32)})
        lo, hi, *_ = collector.compute_entropy()["x"]
    return float(lo), float(hi)


def test_entropy_threshold_matches_ort_on_a_gaussian():
    x = np.random.default_rng(7).standard_normal(1_000_000).astype(np.float32)
    lo, hi = clip_range(_hist(x), "entropy")
    ort_lo, ort_hi = _ort_entropy_threshold(x)
    assert hi == -lo  # symmetric clip of |x|
    assert abs(hi - ort_hi) <= ENTROPY_VS_ORT_REL_TOLERANCE * ort_hi
    assert abs(lo - ort_lo) <= ENTROPY_VS_ORT_REL_TOLERANCE * -ort_lo
    assert hi < x.max()  # the tail is clipped


def test_entropy_threshold_on_relu_output_ignores_the_zeros():
    g = np.random.default_rng(8).standard_normal(1_000_000).astype(np.float32)
    relu, positive = np.maximum(g, 0), g[g > 0]
    lo, hi = clip_range(_hist(relu), "entropy")
    assert lo == 0.0
    # Exact zeros are exact at any clip: with or without them the threshold is the same
    assert hi == clip_range(_hist(positive), "entropy")[1]
    # ORT on the same values sans zeros (with its zero spike ORT itself clips at ~2.7 here)
    assert abs(hi - _ort_entropy_threshold(positive)[1]) <= ENTROPY_VS_ORT_REL_TOLERANCE * hi
    assert np.mean(relu > hi) <= ENTROPY_MAX_CLIPPED_FRACTION


def _true_mse(x: np.ndarray, lo: float, hi: float, levels: int = 256) -> float:
    step = (hi - lo) / (levels - 1)
    q = np.clip(np.round((x - lo) / step), 0, levels - 1) * step + lo
    return float(np.mean((x - q) ** 2))


def test_mse_range_is_near_the_brute_force_optimum():
    x = np.random.default_rng(5).laplace(0, 1, 200_000)
    h = _hist(x)
    lo, hi = mse_range(h)
    # brute force over symmetric clips on the raw samples
    best = min(_true_mse(x, -t, t) for t in np.linspace(0.5, np.abs(x).max(), 200))
    assert _true_mse(x, lo, hi) <= best * MSE_SEARCH_SLACK
    assert _true_mse(x, lo, hi) < _true_mse(x, *minmax_range(h))


@pytest.mark.parametrize("method", METHODS)
def test_ranges_contain_zero_and_stay_inside_the_data(method):
    x = np.maximum(np.random.default_rng(6).normal(0.5, 1, 50_000), 0)  # one-sided, like a Relu output
    h = _hist(x)
    lo, hi = clip_range(h, method)
    assert lo == 0.0 and 0.0 < hi <= x.max()


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown calibration method"):
        clip_range(_hist(np.ones(3)), "kmeans")


def test_constant_large_values_keep_bin_indices_in_int64():
    """A near-constant activation far from zero (a model-zoo file with constant weights gives one)."""
    hist = TensorHistogram(bins=64)
    hist.update(np.full(100, 3.0e30, dtype=np.float32))
    hist.update(np.full(10, 3.0e30 * (1 + 1e-6), dtype=np.float32))
    assert hist.count == 110 and hist.counts.sum() == 110
    assert abs(hist.start) < 2**62
    lo, hi = hist.edges[0], hist.edges[-1]
    assert lo <= 3.0e30 <= hi

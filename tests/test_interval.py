"""Bootstrap intervals of the tolerance metrics: they bracket the point value, narrow with more
samples, and their pessimistic end catches a candidate that a few lucky samples flatter."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.interval import bootstrap_interval, pessimistic
from onnxcompress.tolerance import Tolerance
from onnxcompress.verify import compare


def _pair(n: int, noise: float, seed: int = 0, classes: int = 10):
    rng = np.random.default_rng(seed)
    reference = [[rng.standard_normal((1, classes))] for _ in range(n)]
    candidate = [[r[0] + noise * rng.standard_normal(r[0].shape)] for r in reference]
    return reference, candidate


@pytest.mark.parametrize("metric,bound", [("cosine", 0.5), ("mse", 0.5), ("sqnr", 10.0), ("top1", 0.5)])
def test_interval_brackets_the_point_value_and_narrows_with_more_samples(metric, bound):
    tolerance = Tolerance(metric, bound)
    widths = []
    for n in (16, 400):
        reference, candidate = _pair(n, 0.3)
        value = tolerance.value(compare(reference, candidate, "test"))
        low, high = bootstrap_interval(tolerance, reference, candidate)
        assert low <= value <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2.5  # ~sqrt(25) narrower in theory


def test_pessimistic_end_rejects_what_one_bad_sample_in_sixteen_hides():
    reference, candidate = _pair(16, 0.02)
    candidate[3] = [-reference[3][0]]  # one sample's output flipped: a mean that looks fine
    tolerance = Tolerance("cosine", 0.15)
    fidelity = compare(reference, candidate, "test")
    interval = bootstrap_interval(tolerance, reference, candidate)
    assert tolerance.accepts(fidelity)  # the point value passes (measured drop 0.065, interval 0.0002..0.152)
    assert not tolerance.within(pessimistic(tolerance, interval))  # a draw with that sample twice does not
    sqnr = Tolerance("sqnr", 1.0)
    assert pessimistic(sqnr, bootstrap_interval(sqnr, reference, candidate)) < sqnr.value(fidelity)


def test_2_class_probabilities_resampled_as_log_odds_like_compare():
    rng = np.random.default_rng(1)
    z = rng.normal(-6.0, 2.0, 40)
    rows = lambda v: np.stack([1 / (1 + np.exp(v)), 1 / (1 + np.exp(-v))], axis=1)  # noqa: E731
    reference = [[rows(z[i:i + 1])] for i in range(40)]
    candidate = [[rows(z[i:i + 1] + 0.5 * rng.standard_normal(1))] for i in range(40)]
    tolerance = Tolerance("cosine", 0.01)
    low, high = bootstrap_interval(tolerance, reference, candidate)
    assert low <= tolerance.value(compare(reference, candidate, "test")) <= high
    assert low > 1e-4  # on the probabilities themselves the drop would be ~1e-6


def test_one_sample_has_no_interval():
    reference, candidate = _pair(1, 0.1)
    assert bootstrap_interval(Tolerance("cosine", 0.1), reference, candidate) is None

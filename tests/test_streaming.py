"""Calibration streaming: runs sized to a memory budget give exactly the statistics of one big run."""

from __future__ import annotations

import numpy as np

from onnxcompress.analysis.histograms import collect_histograms
from onnxcompress.analysis.streaming import stream_values
from onnxcompress.calibration import Calibration
from onnxcompress.model import load
from tests.graphs import conv_bn_relu_gemm

SAMPLES = 10


def _setup():
    model = load(conv_bn_relu_gemm())
    shape = [d if isinstance(d, int) else 1 for d in model.graph.inputs[0].shape.dims]
    data = np.random.default_rng(0).normal(size=(SAMPLES, *shape[1:])).astype(np.float32)
    names = [v.name for node in model.graph for v in node.outputs]
    return model, Calibration.from_arrays(model, {model.graph.inputs[0].name: data}), names


def test_budgeted_runs_cover_every_sample_and_value_once():
    model, calibration, names = _setup()
    seen: dict[str, int] = {}
    samples = 0
    for count, values in stream_values(model, names, calibration, budget_bytes=1):  # one value per run
        samples += count
        assert len(values) <= 1 or count  # beyond the first sample, a 1-byte budget fetches one value per run
        for name, value in values.items():
            seen[name] = seen.get(name, 0) + len(value)
    assert samples == SAMPLES
    assert seen == {n: SAMPLES for n in names}


def test_histograms_do_not_depend_on_the_budget():
    model, calibration, names = _setup()
    import onnxcompress.analysis.streaming as streaming

    small, n_small = collect_histograms(model, names, calibration)
    budget, streaming.FETCH_BUDGET_BYTES = streaming.FETCH_BUDGET_BYTES, 1
    try:
        tiny, n_tiny = collect_histograms(model, names, calibration)
    finally:
        streaming.FETCH_BUDGET_BYTES = budget
    assert n_small == n_tiny == SAMPLES and small.keys() == tiny.keys()
    for name in names:
        assert small[name].minimum == tiny[name].minimum and small[name].maximum == tiny[name].maximum
        assert np.array_equal(small[name].counts, tiny[name].counts)


def test_channel_statistics_of_token_activations_leave_padding_out():
    """Padded positions compute on pad tokens: channel importance measured over them describes
    padding (62% of the rows of a batch of real sentences padded to the longest)."""
    from onnxcompress.analysis.activations import collect
    from tests.graphs import attention_block

    model = load(attention_block())
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 8, 32)).astype(np.float32)
    mask = np.ones((6, 8), np.int64)
    mask[:, 5:] = 0
    padded = x.copy()
    padded[:, 5:] = 1e3  # what padding positions hold must not matter
    stats = [collect(model, {"h": 2, "x": 2}, Calibration.from_arrays(model, {"x": a, "attention_mask": mask}), batch_size=4)
             for a in (x, padded)]
    for name in ("h", "x"):
        np.testing.assert_allclose(stats[0].values[name].mean_abs, stats[1].values[name].mean_abs, rtol=1e-6)
        assert stats[0].values[name].count == 6 * 5  # real positions only
    np.testing.assert_allclose(stats[0].values["x"].mean_abs, np.abs(x[:, :5].astype(np.float64)).mean(axis=(0, 1)), rtol=1e-9)

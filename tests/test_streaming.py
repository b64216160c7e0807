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
    for count, values, _ in stream_values(model, names, calibration, budget_bytes=1):  # one value per run
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
    from tests.graphs import attention_block, padded_tokens

    model = load(attention_block())
    x, padded, mask = padded_tokens(6, real=5, seed=4)
    stats = [collect(model, {"h": 2, "x": 2}, Calibration.from_arrays(model, {"x": a, "attention_mask": mask}), batch_size=4)
             for a in (x, padded)]
    for name in ("h", "x"):
        np.testing.assert_allclose(stats[0].values[name].mean_abs, stats[1].values[name].mean_abs, rtol=1e-6)
        assert stats[0].values[name].count == 6 * 5  # real positions only
    np.testing.assert_allclose(stats[0].values["x"].mean_abs, np.abs(x[:, :5].astype(np.float64)).mean(axis=(0, 1)), rtol=1e-9)


def _sharded(model, names, calibration, reducer, batch: int, shards: int):
    """What distributed.RayEngine does, in this process: the first run here, then shards cut on run
    boundaries, each reduced into `reducer.fresh()` on its own, merged in sample order."""
    from onnxcompress.analysis.streaming import FETCH_BUDGET_BYTES, Fetcher, opening
    from onnxcompress.distributed import shard_bounds

    fetcher = Fetcher(model, names)
    for count, values, mask in fetcher.probe(opening(model, calibration, calibration.num_samples)):
        reducer.add(count, values, mask)
    plan = fetcher.plan(1, batch, FETCH_BUDGET_BYTES)
    bounds = shard_bounds(1, calibration.num_samples, plan.batch, shards)
    assert len(bounds) == shards and all((b - a) > plan.batch for a, b in bounds)  # several runs per shard
    for start, stop in bounds:
        part = reducer.fresh()
        for count, values, mask in Fetcher(model, names).stream(calibration.samples(start, stop), plan):
            part.add(count, values, mask)
        reducer = reducer.merge(part)
    return reducer


def test_shards_merged_in_sample_order_give_the_statistics_of_one_pass():
    from onnxcompress.analysis.activations import ActivationStats, collect
    from onnxcompress.analysis.histograms import Histograms

    model, _, names = _setup()
    rng = np.random.default_rng(1)  # magnitudes over 12 decades: float64 sums of them round, so order shows
    data = (rng.normal(size=(41, 3, 8, 8)) * 10.0 ** rng.uniform(-8, 4, (41, 3, 8, 8))).astype(np.float32)
    calibration = Calibration.from_arrays(model, {model.graph.inputs[0].name: data})
    axes = {"x": 1, **{n: 1 for n in names if n != "y"}}  # channel axis 1 (y: the Gemm's [N, classes])
    whole = collect(model, axes, calibration, batch_size=4)
    merged = _sharded(model, list(axes), calibration, ActivationStats(axes=axes), batch=4, shards=3)
    assert merged.samples == whole.samples == 41 and merged.values.keys() == whole.values.keys()
    for name, stats in whole.values.items():
        for part in ("total", "total_abs", "total_sq", "zeros", "minimum", "maximum"):
            assert np.array_equal(getattr(stats, part), getattr(merged.values[name], part)), (name, part)
    hists, _ = collect_histograms(model, names, calibration, batch_size=4)
    merged = _sharded(model, names, calibration, Histograms(), batch=4, shards=3)
    for name, hist in hists.items():
        got = merged.values[name]
        assert (got.count, got.minimum, got.maximum, got.start) == (hist.count, hist.minimum, hist.maximum, hist.start)
        assert np.array_equal(got.counts, hist.counts), name


def test_shards_keep_each_batch_s_attention_mask():
    """Token statistics under a mask: a shard's batches carry their own mask into their later parts."""
    from onnxcompress.analysis.activations import ActivationStats, collect
    from tests.graphs import attention_block

    model = load(attention_block())
    rng = np.random.default_rng(4)
    x = rng.standard_normal((25, 8, 32)).astype(np.float32)
    mask = (rng.random((25, 8)) < 0.7).astype(np.int64)
    calibration = Calibration.from_arrays(model, {"x": x, "attention_mask": mask})
    axes = {"h": 2, "x": 2}
    whole = collect(model, axes, calibration, batch_size=4)
    merged = _sharded(model, ["h", "x"], calibration, ActivationStats(axes=axes), batch=4, shards=2)
    assert whole.values["x"].count == int(mask.sum())  # only kept positions
    for name in axes:
        for part in ("total", "total_abs", "total_sq", "zeros", "minimum", "maximum"):
            assert np.array_equal(getattr(whole.values[name], part), getattr(merged.values[name], part)), (name, part)
        assert whole.values[name].count == merged.values[name].count


def test_histograms_of_token_activations_leave_padding_out():
    """int8 ranges from padded positions widen the ranges of real tokens (all-MiniLM-L6-v2 int8 on
    other texts: 18.7 dB with padding in its histograms, 22.1 dB without)."""
    from onnxcompress.analysis.histograms import collect_histograms
    from tests.graphs import attention_block, padded_tokens

    model = load(attention_block())
    x, padded, mask = padded_tokens(6, real=5, seed=6)
    hists = [collect_histograms(model, ["x", "h"], Calibration.from_arrays(model, {"x": a, "attention_mask": mask}),
                                batch_size=4)[0] for a in (x, padded)]
    for name in ("x", "h"):
        assert hists[0][name].maximum == hists[1][name].maximum < 100
        np.testing.assert_array_equal(hists[0][name].counts, hists[1][name].counts)
    assert hists[0]["x"].maximum == float(x[:, :5].max())
    assert "attention_mask" not in hists[0]


def test_a_file_that_outputs_every_fetched_value_is_run_as_it_is(tmp_path, monkeypatch):
    """How Ray workers get a model with external data: the fetching model saved once, each worker's
    session on that file (no temporary copy of it) giving the values of the in-memory one."""
    from onnxcompress import model as M
    from onnxcompress.analysis.streaming import Fetcher

    model, calibration, names = _setup()
    here = Fetcher(model, names)
    path = M.save(here.model, tmp_path / "fetching.onnx", external_data=True)
    assert M.external_tensors(M.load(model)) == [] and (tmp_path / "fetching.onnx.data").stat().st_size > 1000

    def no_copy(*args, **kwargs):
        raise AssertionError("the file was copied")

    monkeypatch.setattr(M, "save", no_copy)
    there = Fetcher(path, names)
    feeds = next(calibration.batches(1))
    assert there.fetched == here.fetched and len(here.fetched) == len(names)
    for got, expected in zip(there.parts(feeds, [there.fetched]), here.parts(feeds, [here.fetched])):
        assert got[0] == expected[0] and got[1].keys() == expected[1].keys()
        assert all(np.array_equal(got[1][n], expected[1][n]) for n in expected[1])

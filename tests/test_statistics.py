"""One statistics engine (analysis/statistics.py): every statistic of one model state from one run of
the model over the calibration data, the same numbers as a run per consumer, and one run per model
state in a whole `optimize --calib` search."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxcompress.analysis import statistics as statistics_module
from onnxcompress.analysis import streaming
from onnxcompress.analysis.activations import collect
from onnxcompress.analysis.histograms import collect_histograms
from onnxcompress.analysis.statistics import Request, Statistics, model_state
from onnxcompress.calibration import Calibration
from onnxcompress.model import load
from tests.graphs import conv_bn_relu_gemm
from tests.test_cli import run_cli

PARTS = ("total", "total_abs", "total_sq", "zeros", "minimum", "maximum")


def _setup(samples: int = 41):
    model = load(conv_bn_relu_gemm(batch="N"))
    data = np.random.default_rng(3).normal(size=(samples, 3, 8, 8)).astype(np.float32)
    names = [v.name for node in model.graph if node.op_type not in ("Flatten", "Gemm") for v in node.outputs]  # [N, C, ...]
    assert len(names) == 9
    return model, Calibration.from_arrays(model, {model.graph.inputs[0].name: data}), names


def test_requests_on_one_state_share_one_run_and_equal_runs_of_their_own():
    """A shorter request (its limit inside a batch of the longer run) gets the batches its own run has."""
    model, calibration, names = _setup()
    axes = {n: 1 for n in names}
    fit = calibration.samples(0, 30)  # a prefix, as Calibration.split's fitting part is
    statistics = Statistics()
    whole, limited, prefix = statistics.gather(model, [
        Request(calibration, channels=axes, histograms=names), Request(calibration, channels=axes, limit=20),
        Request(fit, channels=axes)])
    assert statistics.runs == 1
    for got, expected in ((whole.channels, collect(model, axes, calibration)),
                          (limited.channels, collect(model, axes, calibration, limit=20)),
                          (prefix.channels, collect(model, axes, fit))):
        assert got.samples == expected.samples
        for name in axes:
            for part in PARTS:
                assert np.array_equal(getattr(got.values[name], part), getattr(expected.values[name], part)), (name, part)
    hists, samples = collect_histograms(model, names, calibration)
    assert whole.histograms.samples == samples == 41
    for name, hist in hists.items():
        assert np.array_equal(whole.histograms.values[name].counts, hist.counts), name


def test_a_later_request_on_the_same_state_is_served_without_a_run():
    model, calibration, names = _setup()
    statistics = Statistics()
    statistics.gather(model, [Request(calibration, channels={n: 1 for n in names}, histograms=names)])
    copy = load(model)  # another object, the same model state
    assert model_state(copy) == model_state(model)
    stats = collect(copy, {names[0]: 1}, calibration, statistics=statistics)
    assert statistics.runs == 1 and statistics.served == 1 and set(stats.values) == {names[0]}
    collect(copy, {names[0]: 1}, calibration, limit=7, statistics=statistics)  # other samples: a run
    assert statistics.runs == 2


@pytest.fixture
def statistics_sessions(monkeypatch) -> collections.Counter:
    """Model state -> ORT sessions created to stream calibration data for statistics (every one is a
    streaming.Fetcher's)."""
    sessions: collections.Counter = collections.Counter()
    fetcher_init = streaming.Fetcher.__init__

    def counting_fetcher(self, model, names, threads=None):
        sessions[model_state(model)] += 1
        fetcher_init(self, model, names, threads)

    monkeypatch.setattr(streaming.Fetcher, "__init__", counting_fetcher)
    return sessions


def test_int8_with_outlier_smoothing_runs_each_model_state_once(statistics_sessions):
    """The outlier check's rows, the smoothing's ranges, the histograms and the bias means: one run of
    the float model, one of the smoothed one (100 samples: the check's 64 are cut from the run)."""
    from onnxcompress.passes.quantize import QuantizeQDQ
    from onnxcompress.pipeline import Pipeline
    from tests.test_int8_patterns import _attention_block, _data

    model = load(_attention_block())
    result = Pipeline([QuantizeQDQ()]).run(model, calibration=Calibration.from_arrays(model, {"x": _data(100)}))
    assert result.report.passes[0].changes[0].startswith("outlier-aware smoothing (static int8)")
    assert len(statistics_sessions) == 2 and set(statistics_sessions.values()) == {1}, statistics_sessions


def _optimize_counting_sessions(capsys, monkeypatch, model, calib, out, statistics_sessions) -> None:
    """`optimize --calib` through the CLI; asserts one statistics session per model state. Verification
    (outputs on held-out samples), the kernel check and the refit's per-stage segment sessions are
    other concerns, counted apart (timing is off: --bench-runs 0)."""
    all_sessions = collections.Counter()

    class CountingInferenceSession(ort.InferenceSession):  # every session, whoever creates it
        def __init__(self, *args, **kwargs):
            all_sessions["created"] += 1
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", CountingInferenceSession)
    code, _, err = run_cli(capsys, "optimize", model, "-o", out, "--calib", calib, "--max-drop", "0.2",
                           "--metric", "cosine", "--bench-runs", "0")
    assert code == 0, err
    assert len(statistics_sessions) >= 4  # the unpruned model and several pruned candidates
    assert set(statistics_sessions.values()) == {1}, statistics_sessions
    assert all_sessions["created"] > sum(statistics_sessions.values())  # the other concerns' sessions


def test_optimize_calib_runs_the_model_once_per_model_state(capsys, tmp_path, monkeypatch, statistics_sessions):
    """The acceptance counter: in a whole `optimize --calib` search (cleanup, int8 on every candidate,
    activation-importance pruning with bias compensation and refit) each model state that statistics
    are gathered on is streamed through one ORT session."""
    model, calib = tmp_path / "m.onnx", tmp_path / "c.npy"
    onnx.save(conv_bn_relu_gemm(batch="N"), model)
    np.save(calib, np.random.default_rng(0).standard_normal((48, 3, 8, 8)).astype(np.float32))
    _optimize_counting_sessions(capsys, monkeypatch, model, calib, tmp_path / "o.onnx", statistics_sessions)


@pytest.mark.slow
def test_optimize_calib_on_a_zoo_resnet_runs_the_model_once_per_model_state(capsys, tmp_path, tmp_path_factory,
                                                                           monkeypatch, statistics_sessions):
    pytest.importorskip("torch")
    from tests import zoo

    model = zoo.exported(tmp_path_factory, "resnet_basic", dynamo=False, dynamic_batch=True)
    _, inputs = zoo.FAMILIES["resnet_basic"]()
    calib = tmp_path / "c.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((48, *inputs[0].shape[1:])).astype(np.float32))
    _optimize_counting_sessions(capsys, monkeypatch, model, calib, tmp_path / "o.onnx", statistics_sessions)


def test_a_shared_run_stays_within_the_fetch_budget(monkeypatch):
    """Runs are sized by the values the first batch measured: planned before that probe, a shared run
    fetched every value of 16 samples at once (2.6 GB peak on EfficientNet-Lite1, budget 64 MiB)."""
    model, calibration, names = _setup()
    runs: list[tuple[int, int]] = []  # (samples fed, bytes fetched) per ORT run
    run = streaming.Fetcher._run

    def counting(self, feeds, group):
        values = run(self, feeds, group)
        runs.append((len(next(iter(feeds.values()))), sum(v.nbytes for v in values.values())))
        return values

    monkeypatch.setattr(streaming.Fetcher, "_run", counting)
    request = Request(calibration, channels={n: 1 for n in names}, histograms=names)
    Statistics().gather(model, [request])
    per_sample = sum(size for samples, size in runs if samples == 1)  # the probe: one sample, every value once
    budget = 3 * per_sample
    monkeypatch.setattr(statistics_module, "FETCH_BUDGET_BYTES", budget)
    runs.clear()
    (gathered,) = Statistics().gather(model, [request])
    assert gathered.histograms.samples == 41
    assert max(size for _, size in runs) <= budget
    assert max(samples for samples, _ in runs) == 3  # the budget's batch, not the request's 16

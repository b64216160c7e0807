"""The fidelity estimate of a fixed recipe: measured on calibration samples no pass fitted to
(whole sources where the samples name them), with an interval, and saying what it rests on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxcompress import pipeline as pipeline_module
from onnxcompress.calibration import SAMPLE_SOURCE_KEY, Calibration
from onnxcompress.estimate import CAVEATS, MIN_SPLIT_SAMPLES, Estimate
from onnxcompress.interval import accepted, bootstrap_interval
from onnxcompress.model import load
from onnxcompress.optimize import OptimizeOptions, optimize
from onnxcompress.report import Fidelity
from onnxcompress.tolerance import Tolerance
from tests.graphs import conv_bn_relu_gemm
from tests.test_cli import run_cli

SOURCES, PER_SOURCE = 10, 4


def _labelled(model, samples: int = SOURCES * PER_SOURCE) -> Calibration:
    rng = np.random.default_rng(3)
    arrays = {"x": rng.standard_normal((samples, 3, 8, 8)).astype(np.float32),
              SAMPLE_SOURCE_KEY: np.array([f"photo{i // PER_SOURCE}" for i in range(samples)])}
    return Calibration.from_arrays(load(model), arrays)


def _seen_by_passes(monkeypatch) -> list[Calibration]:
    seen: list[Calibration] = []
    run = pipeline_module.Pipeline.run

    def spy(self, model, *, calibration=None, **kwargs):
        seen.append(calibration)
        return run(self, model, calibration=calibration, **kwargs)

    monkeypatch.setattr(pipeline_module.Pipeline, "run", spy)
    return seen


def test_a_recipe_is_estimated_on_sources_its_passes_never_saw(monkeypatch):
    model = conv_bn_relu_gemm(batch="N")
    seen = _seen_by_passes(monkeypatch)
    result = optimize(model, calibration=_labelled(model), options=OptimizeOptions(recipe="cpu-int8", bench_runs=0))
    estimate = result.report.estimate
    (fitted,) = seen
    held = 2 * PER_SOURCE  # a fifth of 40 samples: the last two sources
    assert estimate.basis == "held-out sources" and estimate.sources == 2 and estimate.samples == held
    assert fitted.num_samples == SOURCES * PER_SOURCE - held and not {"photo8", "photo9"} & set(fitted.sources)
    assert result.report.fidelity.samples == held  # the reported fidelity is the estimate's
    low, high = estimate.interval
    assert low <= estimate.value <= high and estimate.pessimistic == high
    assert "2 sources" in estimate.describe() and CAVEATS["held-out sources"] == ""


def test_one_held_out_source_says_its_interval_understates_other_sources():
    model = conv_bn_relu_gemm(batch="N")
    calibration = _labelled(model).take(range(5 * PER_SOURCE))  # five sources: a fifth is one of them
    result = optimize(model, calibration=calibration, options=OptimizeOptions(recipe="cpu-int8", bench_runs=0))
    assert result.report.estimate.basis == "one held-out source" and result.report.estimate.sources == 1
    assert "other sources can differ" in result.report.estimate.describe()


def test_with_sources_the_interval_resamples_whole_sources():
    # 2 sources of 10 samples: one kept exactly, one with a 20% error on every sample
    reference = [[np.ones((1, 4), np.float32)] for _ in range(20)]
    candidate = [[np.ones((1, 4), np.float32) * (1.0 if i < 10 else 1.2)] for i in range(20)]
    tolerance = Tolerance("mse", 0.5)
    by_row = bootstrap_interval(tolerance, reference, candidate)
    by_source = bootstrap_interval(tolerance, reference, candidate, sources=["a"] * 10 + ["b"] * 10)
    # drawing sources can give "a, a" (no error) or "b, b" (all error); rows almost never do
    assert by_source[0] < by_row[0] and by_source[1] > by_row[1]
    assert by_source == pytest.approx((0.0, 0.04), abs=1e-6)  # mse of "a, a" and of "b, b" (0.2 squared)


def test_unlabelled_samples_say_other_sources_may_fare_worse():
    model = conv_bn_relu_gemm(batch="N")
    calibration = Calibration.from_arrays(load(model), np.random.default_rng(4).standard_normal((40, 3, 8, 8)).astype(np.float32))
    result = optimize(model, calibration=calibration, options=OptimizeOptions(recipe="cpu-int8", bench_runs=0))
    estimate = result.report.estimate
    assert estimate.basis == "held-out samples" and estimate.sources is None and estimate.samples == 8
    assert "may fare worse" in estimate.describe()


def test_a_small_calibration_set_is_all_fitted_and_the_report_says_so(monkeypatch):
    model = conv_bn_relu_gemm(batch="N")
    small = MIN_SPLIT_SAMPLES - 1
    seen = _seen_by_passes(monkeypatch)
    calibration = Calibration.from_arrays(load(model), np.random.default_rng(5).standard_normal((small, 3, 8, 8)).astype(np.float32))
    result = optimize(model, calibration=calibration, options=OptimizeOptions(recipe="cpu-int8", bench_runs=0))
    assert seen[0].num_samples == small and result.report.estimate is None
    assert any("the passes fitted" in note and "not an estimate" in note for note in result.report.notes)


def test_the_verdict_rests_on_the_pessimistic_end():
    fidelity = Fidelity(inputs="held out", samples=8, max_abs_error=0.1, max_rel_error=0.1, sqnr_db=30.0, cosine=0.996)
    tolerance = Tolerance("cosine", 0.005)
    narrow = Estimate("cosine", 0.004, (0.003, 0.0045), 0.0045, 8, 1, "held out", "held-out sources")
    wide = Estimate("cosine", 0.004, (0.001, 0.009), 0.009, 8, 1, "held out", "held-out sources")
    assert accepted(tolerance, fidelity, narrow.interval) and not accepted(tolerance, fidelity, wide.interval)


def test_the_json_report_carries_the_estimate_and_the_verdict_its_interval(capsys, tmp_path):
    import onnx

    model_path, calib_path = tmp_path / "m.onnx", tmp_path / "calib.npz"
    model = conv_bn_relu_gemm(batch="N")
    onnx.save(model, model_path)
    labelled = _labelled(model)
    np.savez(calib_path, x=labelled.arrays["x"], **{SAMPLE_SOURCE_KEY: np.array(labelled.sources)})
    code, stdout, err = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "o.onnx", "--calib", calib_path,
                                "--recipe", "cpu-int8", "--max-drop", "0.5", "--metric", "cosine", "--bench-runs", "0", "--json")
    assert code == 0, err
    data = json.loads(stdout)
    estimate = data["estimate"]
    assert estimate["basis"] == "held-out sources" and estimate["samples"] == 2 * PER_SOURCE
    assert data["tolerance"]["pessimistic"] == pytest.approx(estimate["pessimistic"])
    assert data["tolerance"]["interval"] == estimate["interval"]

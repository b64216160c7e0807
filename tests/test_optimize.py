"""`optimize` as a deployment step: the plan it picks, its verdict, its exit codes and its outputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxcompress.calibration import Calibration
from onnxcompress.model import load
from onnxcompress.optimize import OptimizeOptions, optimize
from onnxcompress.tolerance import Tolerance
from tests.graphs import conv_bn_relu_gemm, dynamic_matmul
from tests.test_cli import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def conv_model(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_bn_relu_gemm(batch="N"), path)
    return path


@pytest.fixture
def conv_calib(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(0).standard_normal((48, 3, 8, 8)).astype(np.float32))
    return path


def _ops(model) -> set[str]:
    return {n.op_type for n in model.graph}


def test_without_calibration_matmul_models_get_dynamic_int8():
    result = optimize(dynamic_matmul(seq=4, hidden=64), options=OptimizeOptions(bench_runs=0))
    assert result.mode == "no-calibration"
    assert [p.name for p in result.report.passes][-1] == "quantize-dynamic"
    assert "MatMulInteger" in _ops(result.model) or "DynamicQuantizeMatMul" in _ops(result.model)
    assert any("--calib" in note for note in result.report.notes)


def test_without_calibration_conv_models_get_exact_cleanup_only():
    result = optimize(conv_bn_relu_gemm(batch="N"), options=OptimizeOptions(bench_runs=0))
    assert [p.name for p in result.report.passes] == ["fold-constants", "fold-batchnorm", "eliminate-noops"]
    assert result.report.fidelity.max_rel_error <= 1e-4
    assert any("cleanup only" in note for note in result.report.notes)


def test_recipe_with_a_tolerance_reports_the_verdict():
    model = conv_bn_relu_gemm(batch="N")
    calibration = Calibration.from_arrays(load(model), np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32))
    loose = optimize(model, calibration=calibration, options=OptimizeOptions(
        recipe="cpu-int8", tolerance=Tolerance("cosine", 0.5), bench_runs=0))
    assert loose.mode == "recipe" and loose.meets_tolerance is True
    # Under a tolerance, int8 keeps its most sensitive layers in float until it is met.
    fallback = optimize(model, calibration=calibration, options=OptimizeOptions(
        recipe="cpu-int8", tolerance=Tolerance("sqnr", 90.0), bench_runs=0))
    assert fallback.meets_tolerance is True
    assert fallback.report.passes[-1].details["tolerance"]["kept_float"]
    # Pruning without fine-tuning cannot keep 90 dB: the verdict says so, with the measured value.
    strict = optimize(model, calibration=calibration, options=OptimizeOptions(
        recipe="prune", tolerance=Tolerance("sqnr", 90.0), bench_runs=0))
    assert strict.meets_tolerance is False
    assert strict.report.tolerance["value"] == pytest.approx(strict.report.fidelity.sqnr_db)


def test_explicit_pass_flags_without_a_tolerance_run_as_written(conv_calib):
    model = conv_bn_relu_gemm(batch="N")
    calibration = Calibration.from_path(load(model), conv_calib)
    result = optimize(model, calibration=calibration,
                      options=OptimizeOptions(passes=[{"type": "quantize-int8"}], bench_runs=0))
    assert result.mode == "recipe" and result.report.search is None
    assert [p.name for p in result.report.passes][-1] == "quantize-int8"


def test_cli_search_writes_model_report_plot_and_exit_0(capsys, tmp_path, conv_model, conv_calib):
    out, report, plot = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "curve.png"
    code, stdout, err = run_cli(capsys, "optimize", conv_model, "-o", out, "--calib", conv_calib, "--max-drop", "0.2",
                                "--metric", "cosine", "--report", report, "--plot", plot, "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data == json.loads(report.read_text())
    assert data["mode"] == "search" and data["exit_code"] == 0 and data["tolerance"]["met"] is True
    chosen = data["search"]["points"][data["search"]["chosen"]]
    assert chosen["accepted"] and chosen["value"] <= 0.2
    # the estimate is the chosen point's, on the 12 samples (25% of 48) no pass fitted
    assert data["estimate"]["value"] == chosen["value"] and data["estimate"]["samples"] == 12
    assert data["estimate"]["metric"] == "cosine" and data["estimate"]["basis"] == "held-out samples"
    assert data["after"]["macs"] == pytest.approx(chosen["macs_ratio"] * data["before"]["macs"], rel=1e-9)
    assert data["bench"]["original_ms"] > 0 and data["bench"]["optimized_ms"] > 0
    onnx.checker.check_model(str(out), full_check=True)
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_cli_exit_4_when_outside_the_tolerance_and_model_still_written(capsys, tmp_path, conv_model, conv_calib):
    out = tmp_path / "o.onnx"
    code, stdout, err = run_cli(capsys, "optimize", conv_model, "-o", out, "--calib", conv_calib, "--recipe", "prune",
                                "--min-sqnr", "90", "--bench-runs", "0", "--json")
    assert code == 4, err
    data = json.loads(stdout)
    assert data["exit_code"] == 4 and data["tolerance"]["met"] is False
    assert out.is_file()
    onnx.checker.check_model(str(out), full_check=True)


def test_cli_exit_5_when_the_target_is_out_of_reach(capsys, tmp_path, conv_model, conv_calib):
    out, plot = tmp_path / "o.onnx", tmp_path / "p.png"
    code, stdout, err = run_cli(capsys, "optimize", conv_model, "-o", out, "--calib", conv_calib, "--target-macs", "0.05",
                                "--min-sqnr", "80", "--bench-runs", "0", "--plot", plot)
    assert code == 5, err
    assert "target was not reached" in stdout and out.is_file() and plot.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metric", "sqnr", "--max-drop", "30"], "--min-sqnr"),
        (["--metric", "cosine"], "--metric needs --max-drop"),
        (["--max-drop", "0.1", "--min-sqnr", "30"], "tolerance of its own"),
        (["--max-drop", "2", "--metric", "top1"], "fraction"),
        (["--metric", "f1", "--max-drop", "0.1"], "unknown metric"),
        (["--target", "fpga"], "unknown target"),
        (["--target-speedup", "2"], "needs calibration data"),
        (["--bench-runs", "5"], "--bench-runs"),
    ],
)
def test_cli_bad_tolerance_flags_are_one_line_errors(capsys, tmp_path, conv_model, args, message):
    code, _, err = run_cli(capsys, "optimize", conv_model, "-o", tmp_path / "o.onnx", *args)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o.onnx").exists()


def test_cli_distill_runs_after_pruning_and_before_int8(capsys, tmp_path, conv_model, conv_calib):
    code, stdout, err = run_cli(capsys, "optimize", conv_model, "-o", tmp_path / "o.onnx", "--calib", conv_calib,
                                "--prune", "0.5", "--round-to", "1", "--distill", "5", "--quantize", "int8",
                                "--bench-runs", "0", "--json")
    assert code == 0, err
    data = json.loads(stdout)
    names = [p["name"] for p in data["passes"]]
    assert names.index("prune-channels") < names.index("distill") < names.index("quantize-int8")
    assert all(p["fidelity"] is not None for p in data["passes"])  # fidelity after every step
    code, _, err = run_cli(capsys, "optimize", conv_model, "-o", tmp_path / "p.onnx", "--distill", "1.5")
    assert code == 2 and "--distill" in err


def test_cli_occ_output_is_packed_and_unpacks_to_the_optimized_model(capsys, tmp_path, conv_model):
    from onnxcompress.pack import unpack_model
    from onnxcompress.verify import outputs, random_feeds

    packed, plain = tmp_path / "o.occ", tmp_path / "o.onnx"
    for out in (packed, plain):
        code, stdout, err = run_cli(capsys, "optimize", conv_model, "-o", out, "--bench-runs", "0", "--json")
        assert code == 0, err
    assert json.loads(stdout)["after"]["file_bytes"] == plain.stat().st_size
    unpacked = unpack_model(packed)
    feeds = random_feeds(unpacked, {"x": (2, 3, 8, 8)}, count=2)
    for a, b in zip(outputs(unpacked, feeds, "unpacked"), outputs(str(plain), feeds, "plain"), strict=True):
        np.testing.assert_array_equal(a[0], b[0])  # the same model, bit for bit in its outputs


def test_cli_factorize_budget_and_latency_aware(capsys, tmp_path, conv_model, monkeypatch):
    import sys

    from onnxcompress.analysis.layer_timing import PairTiming

    factorize_module = sys.modules["onnxcompress.passes.factorize"]
    timed: list[str] = []

    def always_slower(original, factorized, *, provider, threads):  # stands in for ORT timing
        timed.append(provider)
        return PairTiming(baseline_ms=1.0, candidate_ms=2.0, runs=20)

    code, stdout, err = run_cli(capsys, "optimize", conv_model, "-o", tmp_path / "f.onnx", "--factorize-budget", "0.7",
                                "--bench-runs", "0", "--json")
    assert code == 0, err
    plain = json.loads(stdout)
    assert plain["after"]["macs"] < plain["before"]["macs"]  # some layers factorized (this tiny net cannot reach 0.7)
    monkeypatch.setattr(factorize_module, "measure_layer", always_slower)
    code, stdout, err = run_cli(capsys, "optimize", conv_model, "-o", tmp_path / "g.onnx", "--factorize-budget", "0.7",
                                "--latency-aware", "--bench-runs", "0", "--json")
    assert code == 0, err
    aware = json.loads(stdout)
    assert timed and set(timed) == {"cpu"}
    assert aware["after"]["macs"] == aware["before"]["macs"]  # every factorization was judged slower: none kept
    code, _, err = run_cli(capsys, "optimize", conv_model, "-o", tmp_path / "h.onnx", "--latency-aware")
    assert code == 2 and "--latency-aware applies to factorization" in err


def test_a_result_measured_slower_than_its_input_says_so():
    from onnxcompress.optimize import SLOWER_BELOW, _slower_note

    assert _slower_note({"measured_speedup": 1.0, "batch": 1}, ["quantize-int8"]) == []
    assert _slower_note({"measured_speedup": None, "batch": 1}, ["quantize-int8"]) == []
    (note,) = _slower_note({"measured_speedup": SLOWER_BELOW / 1.2, "batch": 1}, ["quantize-int8"])
    assert note.startswith("slower than the input: measured 1.24x slower") and "(quantize-int8)" in note

"""The command line: happy paths produce the documented output; bad input gives one line and exit != 0."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcompress import model as M
from onnxcompress.cli import main
from tests.graphs import conv_bn_relu_gemm, dynamic_matmul


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def model_path(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn_relu_gemm(batch="N"), path)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_analyze_json_has_stats_layers_and_io(capsys, model_path):
    code, out, err = run_cli(capsys, "analyze", model_path, "--json", "--top", "2")
    assert code == 0, err
    data = json.loads(out)
    assert data["inputs"][0]["name"] == "x" and data["inputs"][0]["analyzed_shape"] == [1, 3, 8, 8]
    assert data["stats"]["macs"] == 8 * 3 * 9 * 64 + 8 * 8 * 9 * 64 + 8 * 5  # conv1 + conv2 + fc, by hand
    assert [layer["name"] for layer in data["top_layers"]] == ["conv2", "conv1"]
    assert data["stats"]["file_bytes"] == model_path.stat().st_size


def test_analyze_table(capsys, model_path):
    code, out, err = run_cli(capsys, "analyze", model_path)
    assert code == 0 and "MACs" in out and "conv2" in out and not err  # results on stdout


def test_optimize_writes_model_report_and_table(capsys, model_path, tmp_path):
    out_path, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    digest = _digest(model_path)
    code, out, err = run_cli(capsys, "optimize", model_path, "-o", out_path, "--report", report_path)
    assert code == 0, err
    assert _digest(model_path) == digest
    onnx.checker.check_model(str(out_path), full_check=True)
    report = json.loads(report_path.read_text())
    assert report["output"] == str(out_path) and report["verified"] is True
    assert report["after"]["file_bytes"] == out_path.stat().st_size
    assert [p["name"] for p in report["passes"]] == ["fold-constants", "fold-batchnorm", "eliminate-noops"]
    assert "fold-batchnorm" in out


def test_optimize_json_on_stdout_only(capsys, model_path, tmp_path):
    code, out, _ = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "o.onnx", "--json")
    assert code == 0 and json.loads(out)["passes"]


def test_recipes_lists_builtins(capsys):
    code, out, _ = run_cli(capsys, "recipes")
    assert code == 0 and "cleanup" in out and "fold-batchnorm" in out


def test_python_dash_m_and_version():
    proc = subprocess.run([sys.executable, "-m", "onnxcompress", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("onnxcompress ")


# ------------------------------------------------------------------------ the bad-input corpus

def _bad_cases(tmp: Path, good: Path) -> dict[str, tuple[list, str]]:
    """name -> (argv, expected fragment of the one-line message). Files are created here."""
    (tmp / "text.onnx").write_text("this is not a model\n")
    (tmp / "empty.onnx").write_bytes(b"")
    data = good.read_bytes()
    (tmp / "truncated.onnx").write_bytes(data[: len(data) // 2])
    M.save(M.load(good), tmp / "ext.onnx", external_data=True)
    (tmp / "ext.onnx.data").unlink()
    onnx.save(dynamic_matmul(), tmp / "dyn.onnx")
    (tmp / "bad.yaml").write_text("passes: [fold-constants\n")
    (tmp / "unknown_pass.yaml").write_text("passes:\n  - type: make-it-faster\n")
    (tmp / "bad_option.yaml").write_text("passes:\n  - type: fold-constants\n    max_tensor_mb: lots\n")
    np.save(tmp / "calib_wrong.npy", np.zeros((2, 3, 9, 9), np.float32))
    np.save(tmp / "calib_ok.npy", np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    o = tmp / "out.onnx"
    return {
        "missing file": (["analyze", tmp / "nope.onnx"], "no such file"),
        "directory": (["analyze", tmp], "is a directory"),
        "empty file": (["analyze", tmp / "empty.onnx"], "file is empty"),
        "not onnx": (["analyze", tmp / "text.onnx"], "not a valid ONNX model"),
        "truncated": (["analyze", tmp / "truncated.onnx"], "ONNX model"),
        "missing external data": (["analyze", tmp / "ext.onnx"], "external data file"),
        "bad shape syntax": (["analyze", good, "--input-shape", "x=1by3"], "bad input shape"),
        "unknown input": (["analyze", good, "--input-shape", "y=1x3x8x8"], "unknown input 'y'"),
        "wrong rank": (["analyze", good, "--input-shape", "x=1x3x8"], "rank 4"),
        "missing dynamic dim": (["analyze", tmp / "dyn.onnx"], "pass --input-shape x="),
        "invalid yaml": (["optimize", good, "-o", o, "--recipe", tmp / "bad.yaml"], "invalid YAML"),
        "unknown pass": (["optimize", good, "-o", o, "--recipe", tmp / "unknown_pass.yaml"], "unknown pass type"),
        "bad option": (["optimize", good, "-o", o, "--recipe", tmp / "bad_option.yaml"], "must be a number"),
        "unknown recipe": (["optimize", good, "-o", o, "--recipe", "no-such-recipe"], "not found"),
        "output is input": (["optimize", good, "-o", good], "overwrite the input"),
        "output folder missing": (["optimize", good, "-o", tmp / "no" / "dir" / "o.onnx"], "does not exist"),
        "calibration wrong shape": (["optimize", good, "-o", o, "--calib", tmp / "calib_wrong.npy"], "must be 8"),
        "calibration missing": (["optimize", good, "-o", o, "--calib", tmp / "none.npz"], "no such calibration"),
        "calibration count without data": (["optimize", good, "-o", o, "--calib-samples", "8"], "give --calib"),
        "calibration count zero": (["optimize", good, "-o", o, "--calib", tmp / "calib_wrong.npy", "--calib-samples", "0"],
                                   "at least 1"),
        "unknown target": (["optimize", good, "-o", o, "--target", "avx9"], "unknown target"),
        "evaluation without calibration": (["optimize", good, "-o", o, "--eval", tmp / "calib_wrong.npy"], "give --calib"),
        "evaluation wrong shape": (["optimize", good, "-o", o, "--calib", tmp / "calib_ok.npy", "--eval", tmp / "calib_wrong.npy"],
                                   "must be 8"),
        "evaluation missing": (["optimize", good, "-o", o, "--calib", tmp / "calib_ok.npy", "--eval", tmp / "none.npz"],
                               "no such"),
        "bad batch list": (["bench", good, "--batch", "1,x"], "bad --batch"),
        "too few runs": (["bench", good, "--runs", "5"], "20"),
        "unknown provider": (["bench", good, "--ep", "tpu"], "unknown provider"),
        "unknown option": (["analyze", good, "--frobnicate"], "No such option"),
    }


def test_bad_input_corpus(capsys, tmp_path, model_path):
    cases = _bad_cases(tmp_path, model_path)
    assert len(cases) >= 12
    before = {p: _digest(p) for p in tmp_path.iterdir() if p.is_file()}
    failures = []
    for name, (argv, fragment) in cases.items():
        code, out, err = run_cli(capsys, *argv)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        if code == 0 or len(lines) != 1 or fragment not in lines[0] or "Traceback" in err or out:
            failures.append(f"{name}: exit {code}, stderr {err!r}, stdout {out[:200]!r}")
    assert not failures, "\n".join(failures)
    after = {p: _digest(p) for p in before if p.exists()}
    assert after == before  # no input was modified or removed
    assert not (tmp_path / "out.onnx").exists()  # failed runs leave no partial output


def test_unavailable_gpu_provider_is_a_clear_error(capsys, model_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider; the error path cannot be exercised")
    code, _, err = run_cli(capsys, "bench", model_path, "--ep", "cuda")
    assert code != 0 and "not available" in err and len(err.strip().splitlines()) == 1


def test_console_script_exit_code_for_missing_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "onnxcompress", "analyze", str(tmp_path / "nope.onnx")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_two_models_json_and_plot(capsys, tmp_path, model_path):
    pruned = tmp_path / "pruned.onnx"
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", pruned, "--prune", "0.5", "--round-to", "1")
    assert code == 0, err
    plot = tmp_path / "speedup.png"
    code, out, err = run_cli(capsys, "bench", model_path, pruned, "--runs", "20", "--batch", "1,4", "--json",
                             "--plot", plot)
    assert code == 0, err
    data = json.loads(out)
    assert sorted((r["model"] == data["baseline"], r["batch"]) for r in data["rows"]) == [
        (False, 1), (False, 4), (True, 1), (True, 4)]
    for row in data["rows"]:
        assert row["supported"] and row["timing"]["runs"] == 20 and row["timing"]["median_ms"] > 0
    pr = [r for r in data["rows"] if r["model"] != data["baseline"] and r["batch"] == 1][0]
    bs = [r for r in data["rows"] if r["model"] == data["baseline"] and r["batch"] == 1][0]
    assert pr["theoretical_speedup"] == pytest.approx(bs["macs"] / pr["macs"])
    assert pr["measured_speedup"] == pytest.approx(bs["timing"]["median_ms"] / pr["timing"]["median_ms"])
    assert pr["realization"] == pytest.approx(pr["measured_speedup"] / pr["theoretical_speedup"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quantize_flags_add_the_int8_pass_after_pruning(capsys, tmp_path, model_path):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32))
    report = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "q.onnx", "--quantize", "int8",
                           "--prune", "0.25", "--round-to", "1", "--calib-method", "minmax", "--calib", calib,
                           "--report", report)
    assert code == 0, err
    passes = json.loads(report.read_text())["passes"]
    assert [p["name"] for p in passes][-2:] == ["prune-channels", "quantize-int8"]
    assert passes[-1]["details"]["kernels"] == "any" and passes[-1]["details"]["samples"] == 16
    assert passes[-1]["details"]["kernel_check"]["ok"]
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "q4.onnx", "--quantize", "int8", "--calib", calib,
                           "--calib-samples", "12", "--target", "vnni", "--report", report)
    assert code == 0, err
    details = json.loads(report.read_text())["passes"][-1]["details"]
    # full-range codes stay on a VNNI CPU; elsewhere the kernel check sees them lose and redoes them
    from onnxcompress.analysis.int8_kernels import host_has_vnni

    assert details["kernels"] == ("vnni" if host_has_vnni() else "any") and details["samples"] == 12
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "q2.onnx", "--quantize", "int3")
    assert code == 2 and "choose int8" in err
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "q3.onnx", "--quantize", "int8")
    assert code == 2 and "needs calibration data" in err


def test_error_messages_keep_bracketed_text(capsys, tmp_path):
    """Messages are printed literally: '[batchxseq]' must not be eaten as console markup."""
    onnx.save(dynamic_matmul(), tmp_path / "dyn.onnx")
    code, _, err = run_cli(capsys, "analyze", tmp_path / "dyn.onnx")
    assert code == 2 and "dynamic shape [batchxseqx16]" in err


def test_factorize_flags(capsys, tmp_path, model_path):
    report = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "f.onnx", "--factorize", "0.25",
                           "--report", report)
    assert code == 0, err
    data = json.loads(report.read_text())
    factorize = data["passes"][-1]
    assert factorize["name"] == "factorize"
    onnx.checker.check_model(str(tmp_path / "f.onnx"), full_check=True)
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "g.onnx", "--factorize", "2")
    assert code == 2 and "rank_ratio" in err


def test_bare_command_shows_help_without_an_empty_error(capsys):
    code, out, err = run_cli(capsys)
    assert code == 2 and "Commands" in out + err and "error:" not in err


def test_calibration_data_fixes_dynamic_shapes(capsys, tmp_path):
    """--calib gives every sample's shape: a dynamic sequence length needs no --input-shape then."""
    onnx.save(dynamic_matmul(), tmp_path / "dyn.onnx")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).normal(size=(8, 5, 16)).astype(np.float32))
    code, out, err = run_cli(capsys, "optimize", tmp_path / "dyn.onnx", "-o", tmp_path / "q.onnx", "--quantize", "int8",
                             "--calib", tmp_path / "calib.npy", "--json", "--bench-runs", "0")
    assert code == 0, err
    assert json.loads(out)["before"]["macs"] == 5 * 16 * 16  # analysed at one calibration sample's shape


def test_eval_data_judges_the_search(capsys, tmp_path, model_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.standard_normal((24, 3, 8, 8)).astype(np.float32))
    np.save(tmp_path / "other.npy", rng.standard_normal((10, 3, 8, 8)).astype(np.float32))
    code, out, _ = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "o.onnx", "--calib", tmp_path / "calib.npy",
                           "--eval", tmp_path / "other.npy", "--json", "--bench-runs", "0")
    report = json.loads(out)
    assert code in (0, 4, 5) and report["mode"] == "search"
    assert report["tolerance"]["measured_on"].startswith("other.npy, 10 samples")
    assert "all 24 calibration samples were for fitting" in report["notes"][0]
    # a fixed recipe: its fidelity and tolerance verdict come from the evaluation data too
    code, out, _ = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "p.onnx", "--calib", tmp_path / "calib.npy",
                           "--eval", tmp_path / "other.npy", "--prune", "0.5", "--max-drop", "0.5", "--json", "--bench-runs", "0")
    report = json.loads(out)
    assert report["mode"] == "recipe" and report["fidelity"]["inputs"].startswith("other.npy, 10 samples")
    assert report["tolerance"]["measured_on"] == report["fidelity"]["inputs"]

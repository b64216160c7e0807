"""optimize-many run serially, and the Ray options without Ray: settings, checks before work, the
summary and exit codes, and the one-line error when the ray extra is missing (tests/test_ray.py runs
the same on a local Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcompress.errors import ExitCode
from onnxcompress.fleet import JobResult, exit_code, plan_jobs, settings_from
from tests.graphs import conv_bn_relu_gemm
from tests.test_cli_newcomer import assert_one_line_error, run_cli

BAD_INPUT = ExitCode.BAD_INPUT


@pytest.fixture
def fleet(tmp_path) -> tuple[Path, Path, Path]:
    """(good model, broken model, calibration data)."""
    good, broken, calib = tmp_path / "good.onnx", tmp_path / "broken.onnx", tmp_path / "calib.npy"
    onnx.save(conv_bn_relu_gemm(batch="N"), good)
    broken.write_bytes(b"not an onnx model")
    np.save(calib, np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32))
    return good, broken, calib


def test_a_broken_model_fails_its_jobs_and_the_others_are_written(capsys, tmp_path, fleet):
    good, broken, calib = fleet
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "optimize-many", good, broken, "-o", out, "--common",
                                f"--calib {calib} --bench-runs 0", "--setting", "--quantize int8", "--json")
    assert code == ExitCode.JOBS_FAILED, err
    data = json.loads(stdout)
    assert data["exit_code"] == ExitCode.JOBS_FAILED and data["engine"] == "serial"
    first, second = data["jobs"]
    assert (first["exit_code"], first["output"], first["error"]) == (0, str(out / "good.onnx"), "")
    assert first["summary"]["macs"][1] == first["summary"]["macs"][0]  # int8 alone: no MAC removed
    assert second["exit_code"] == BAD_INPUT and second["output"] is None and "not a valid ONNX model" in second["error"]
    assert sorted(p.name for p in out.iterdir()) == ["good.onnx", "good.report.json"]
    report = json.loads((out / "good.report.json").read_text())
    assert report["exit_code"] == 0 and report["output"] == str(out / "good.onnx")
    onnx.checker.check_model(str(out / "good.onnx"), full_check=True)
    assert err.count("1/2") == 1 and err.count("2/2") == 1  # a progress line per job, on stderr


def test_table_lists_every_job_and_the_errors_below_it(capsys, tmp_path, fleet):
    good, broken, _ = fleet
    code, stdout, _ = run_cli(capsys, "optimize-many", good, broken, "-o", tmp_path / "out", "--setting", "--bench-runs 0")
    assert code == ExitCode.JOBS_FAILED
    assert "good.onnx" in stdout and "written" in stdout and "failed" in stdout
    assert "2: error:" in stdout and "not a valid ONNX model" in stdout


def test_sweep_file_entries_become_optimize_flags(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("- {name: q8, quantize: int8, calib_method: mse}\n- {prune: 0.3, verify: false, input-shape: [x=1x3x8x8]}\n")
    settings = settings_from(["--quantize dynamic"], sweep)
    assert [(s.name, s.flags) for s in settings] == [
        ("s1", ("--quantize", "dynamic")),
        ("q8", ("--quantize", "int8", "--calib-method", "mse")),
        ("s3", ("--prune", "0.3", "--no-verify", "--input-shape", "x=1x3x8x8")),
    ]
    jobs = plan_jobs([Path("m.onnx")], settings, tmp_path, ["--bench-runs", "0"])
    assert [Path(j.output).name for j in jobs] == ["m.s1.onnx", "m.q8.onnx", "m.s3.onnx"]
    assert jobs[1].argv()[-4:] == ["--quantize", "int8", "--calib-method", "mse"] and "--bench-runs" in jobs[1].argv()


@pytest.mark.parametrize("args, fragments", [
    (["--setting", "--bogus 3"], ("setting 's1'", "--bogus")),
    (["--setting", "-o other.onnx"], ("-o is set by optimize-many",)),
    (["--setting", "--ray local"], ("--ray is set by optimize-many",)),
    # a pass option inside a setting is checked by optimize's parser too, before any job
    (["--setting", "--set quantize-int8.bins=many"], ("setting 's1'", "--set", "must be an integer")),
    (["--set", "--quantize int8"], ("No such option", "--set")),  # one setting is --setting, not optimize's --set
    (["--workers", "2"], ("--workers needs --ray",)),
    (["--sweep", "missing.yaml"], ("no such sweep file",)),
])
def test_bad_options_fail_before_any_job(capsys, tmp_path, fleet, args, fragments):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "optimize-many", fleet[0], "-o", out, *args)
    assert_one_line_error(code, stdout, err, BAD_INPUT, *fragments)
    assert not out.exists()


def test_bad_sweep_files_and_colliding_names(capsys, tmp_path, fleet):
    sweep = tmp_path / "sweep.yaml"
    for text, fragment in (("quantize: int8\n", "a sweep is a list"), ("- {name: 'a b'}\n", "setting name"),
                           ("- {name: x}\n- {name: x}\n", "two settings are named 'x'")):
        sweep.write_text(text)
        code, stdout, err = run_cli(capsys, "optimize-many", fleet[0], "-o", tmp_path / "out", "--sweep", sweep)
        assert_one_line_error(code, stdout, err, BAD_INPUT, fragment)
    other = tmp_path / "other"
    other.mkdir()
    onnx.save(conv_bn_relu_gemm(batch="N"), other / "good.onnx")
    code, stdout, err = run_cli(capsys, "optimize-many", fleet[0], other / "good.onnx", "-o", tmp_path / "out")
    assert_one_line_error(code, stdout, err, BAD_INPUT, "would both write")
    code, stdout, err = run_cli(capsys, "optimize-many", fleet[0], "-o", tmp_path)
    assert_one_line_error(code, stdout, err, BAD_INPUT, "would overwrite it")


def test_exit_code_is_the_worst_job_verdict():
    def results(*codes):
        return [JobResult(i, "m.onnx", "s", c, 0.0, error="error: x" if c in (1, 2, 3) else "") for i, c in enumerate(codes)]

    assert exit_code(results(0, 0)) == ExitCode.OK
    assert exit_code(results(0, 5)) == ExitCode.TARGET_NOT_REACHED
    assert exit_code(results(5, 4, 0)) == ExitCode.OUTSIDE_TOLERANCE
    for failed in (1, 2, 3):
        assert exit_code(results(4, failed, 0)) == ExitCode.JOBS_FAILED


def test_without_ray_the_flags_say_which_extra_to_install(capsys, tmp_path, fleet, monkeypatch):
    good, _, calib = fleet
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when not installed
    code, stdout, err = run_cli(capsys, "optimize", good, "-o", tmp_path / "o.onnx", "--calib", calib, "--ray", "local")
    assert_one_line_error(code, stdout, err, BAD_INPUT, "Ray is not installed", "pip install onnxcompress[ray]")
    code, stdout, err = run_cli(capsys, "optimize-many", good, "-o", tmp_path / "out", "--ray", "local")
    assert_one_line_error(code, stdout, err, BAD_INPUT, "pip install onnxcompress[ray]")
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "out").exists()
    code, stdout, err = run_cli(capsys, "optimize", good, "-o", tmp_path / "o.onnx", "--ray", "local")
    assert_one_line_error(code, stdout, err, BAD_INPUT, "--ray computes calibration statistics", "--calib")


def test_the_package_imports_without_ray():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import onnxcompress, onnxcompress.cli, onnxcompress.distributed, onnxcompress.fleet\n"
            "assert onnxcompress.distributed.RayEngine().workers is None")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_unreachable_ray_addresses_are_one_line_errors_before_work(capsys, tmp_path, fleet):
    pytest.importorskip("ray")
    good, _, calib = fleet
    for address, fragment in (("nonsense", "expected local, auto, HOST:PORT"), ("127.0.0.1:9", "cannot reach Ray at 127.0.0.1:9")):
        code, stdout, err = run_cli(capsys, "optimize", good, "-o", tmp_path / "o.onnx", "--calib", calib, "--ray", address)
        assert_one_line_error(code, stdout, err, BAD_INPUT, fragment)
        code, stdout, err = run_cli(capsys, "optimize-many", good, "-o", tmp_path / "out", "--ray", address)
        assert_one_line_error(code, stdout, err, BAD_INPUT, fragment)
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "out").exists()

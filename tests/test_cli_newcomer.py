"""What a new user hits (issue 14): every problem with the input is one line on stderr with its
documented exit code, found before work starts and with nothing written; help, README and code
list the same exit codes; progress shows up in logs that are not a terminal."""

from __future__ import annotations

import io
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from onnxcompress import paths, progress
from onnxcompress.cli import main
from onnxcompress.errors import EXIT_CODES, ExitCode, OnnxCompressError, VerificationError
from onnxcompress.pack import size_change

README = Path(__file__).resolve().parents[1] / "README.md"
BAD_INPUT = ExitCode.BAD_INPUT


# ------------------------------------------------------------------------------ models and helpers

def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def stem_model(dims=("N", 3, "H", "W")) -> onnx.ModelProto:
    """An image stem: 7x7 stride-2 Conv, 3x3 stride-2 MaxPool, 3x3 Conv, global pooling, Gemm."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], kernel_shape=[7, 7], strides=[2, 2], pads=[3, 3, 3, 3], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], name="pool"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1, name="fc"),
    ]
    weights = [_init("w1", rng.standard_normal((8, 3, 7, 7)) * 0.1), _init("b1", np.zeros(8)),
               _init("w2", rng.standard_normal((8, 8, 3, 3)) * 0.1), _init("b2", np.zeros(8)),
               _init("w3", rng.standard_normal((10, 8)) * 0.1), _init("b3", np.zeros(10))]
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [dims[0], 10])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def custom_op_model() -> onnx.ModelProto:
    """A MatMul followed by an op of a custom domain that ONNX Runtime does not implement."""
    w = _init("w", np.random.default_rng(0).standard_normal((8, 4)))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
             helper.make_node("FancyAct", ["a"], ["y"], domain="com.example", name="fancy")]
    graph = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, out: str, err: str, expected: int, *fragments: str) -> None:
    """The documented code, nothing on stdout, one line on stderr holding every fragment, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(f in lines[0] for f in fragments), lines[0]
    assert "Traceback" not in err and not out


@pytest.fixture
def stem(tmp_path) -> Path:
    path = tmp_path / "cli_stem.onnx"
    onnx.save(stem_model(), path)
    return path


@pytest.fixture
def calib(tmp_path) -> Path:
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(1).standard_normal((16, 3, 32, 32)).astype(np.float32))
    return path


# ------------------------------------------------------------------------------ the input is the problem

def test_custom_domain_op_is_named_and_blocks_only_what_runs_the_model(capsys, tmp_path):
    model, out = tmp_path / "cli_custom_op.onnx", tmp_path / "o.onnx"
    onnx.save(custom_op_model(), model)
    code, stdout, err = run_cli(capsys, "optimize", model, "-o", out)
    assert_one_line_error(code, stdout, err, BAD_INPUT, "'fancy'", "FancyAct", "'com.example'")
    assert not out.exists()
    code, stdout, err = run_cli(capsys, "bench", model, "--runs", "20")
    assert_one_line_error(code, stdout, err, BAD_INPUT, "cannot run", "FancyAct")
    # What needs no ONNX Runtime run still works: the analysis, and passes without verification.
    code, stdout, err = run_cli(capsys, "analyze", model)
    assert code == 0 and "FancyAct" in stdout and not err
    code, _, err = run_cli(capsys, "optimize", model, "-o", out, "--no-verify", "--bench-runs", "0", "--quantize", "dynamic")
    assert code == 0, err
    assert {n.op_type for n in onnx.load(str(out)).graph.node} >= {"FancyAct", "MatMulInteger"}


@pytest.mark.parametrize("command", ["analyze", "optimize"])
def test_input_smaller_than_the_model_needs(capsys, tmp_path, stem, command):
    out = tmp_path / "o.onnx"
    args = [command, stem, "-s", "input=1x3x4x4", *(["-o", out] if command == "optimize" else [])]
    code, stdout, err = run_cli(capsys, *args)
    assert_one_line_error(code, stdout, err, BAD_INPUT, "input=1x3x4x4", "too small", "'conv2'")
    assert not out.exists()


def test_huge_input_shape_is_refused_before_allocating(capsys, tmp_path, stem):
    out = tmp_path / "o.onnx"
    start = time.perf_counter()
    code, stdout, err = run_cli(capsys, "optimize", stem, "-o", out, "-s", "input=1x3x1000000x1000000")
    assert_one_line_error(code, stdout, err, BAD_INPUT, "input=1x3x1000000x1000000", "too large", "GiB")
    assert not out.exists() and time.perf_counter() - start < 60  # refused up front, not after swapping


def test_memory_error_anywhere_is_a_user_error_not_a_crash(capsys, tmp_path, stem, monkeypatch):
    import onnxcompress.optimize  # noqa: F401  (the package exports a function of the same name)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 224. GiB")

    monkeypatch.setattr(sys.modules["onnxcompress.optimize"], "optimize", out_of_memory)
    code, stdout, err = run_cli(capsys, "optimize", stem, "-o", tmp_path / "o.onnx", "-s", "input=1x3x32x32")
    assert_one_line_error(code, stdout, err, BAD_INPUT, "out of memory")


def test_unnamed_dynamic_dims_show_as_question_marks(capsys, tmp_path):
    model = tmp_path / "cli_unnamed_dims.onnx"
    proto = stem_model(dims=("N", 3, "H", "W"))
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.ClearField("dim_param")
    onnx.save(proto, model)
    code, stdout, err = run_cli(capsys, "analyze", model)
    assert_one_line_error(code, stdout, err, BAD_INPUT, "[Nx3x?x?]")
    assert "None" not in err


def test_analyze_success_prints_nothing_on_stderr(capsys, stem):
    code, stdout, err = run_cli(capsys, "analyze", stem, "-s", "input=1x3x32x32")
    assert code == 0 and "conv1" in stdout and err == ""


# ------------------------------------------------------------------------------ output paths

def _output_cases(tmp: Path, stem: Path, calib: Path) -> dict[str, tuple[list, str]]:
    """name -> (argv, fragment of the message). Every argv would write tmp/o.onnx if it ran."""
    (tmp / "afile").write_text("not a folder")
    o = tmp / "o.onnx"
    common = [stem, "-s", "input=1x3x32x32", "--bench-runs", "0"]
    return {
        "-o under a file": (["optimize", *common, "-o", tmp / "afile" / "o.onnx"], "is not a folder"),
        "-o folder missing": (["optimize", *common, "-o", tmp / "nodir" / "o.onnx"], "does not exist"),
        "-o is a folder": (["optimize", *common, "-o", tmp], "is a directory"),
        "-o is the calibration data": (["optimize", stem, "-o", calib, "--calib", calib], "would overwrite the input"),
        "--report folder missing": (["optimize", *common, "-o", o, "--report", tmp / "nodir" / "x.json"], "--report"),
        "--report is -o": (["optimize", *common, "-o", o, "--report", o], "the same file as --output"),
        "--plot folder missing": (["optimize", *common, "-o", o, "--plot", tmp / "nodir" / "p.png"], "--plot"),
        "bench --plot folder missing": (["bench", stem, "-s", "input=1x3x32x32", "--plot", tmp / "nodir" / "p.png"], "--plot"),
        "pack -o folder missing": (["pack", stem, "-o", tmp / "nodir" / "o.occ"], "does not exist"),
        "unpack -o under a file": (["unpack", tmp / "o.occ", "-o", tmp / "afile" / "o.onnx"], "is not a folder"),
        "demo --output-dir under a file": (["demo", "--output-dir", tmp / "afile" / "out"], "is not a folder"),
    }


def test_bad_output_paths_fail_before_work_and_write_nothing(capsys, tmp_path, stem, calib):
    before = {p: p.read_bytes() for p in (stem, calib)}
    failures = []
    for name, (argv, fragment) in _output_cases(tmp_path, stem, calib).items():
        code, out, err = run_cli(capsys, *argv)
        lines = [line for line in err.splitlines() if line.strip()]
        if code != BAD_INPUT or len(lines) != 1 or fragment not in lines[0] or out:
            failures.append(f"{name}: exit {code}, stderr {err!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "nodir").exists()
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no probe or temp file left behind


def test_unwritable_output_folder_simulated(capsys, tmp_path, stem, monkeypatch):
    """A folder that refuses new files (read-only mount, ACL, not root): simulated, so it runs as root too."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkstemp = paths.tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if Path(dir) == locked:
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(paths.tempfile, "mkstemp", refuse)
    out = tmp_path / "o.onnx"
    code, stdout, err = run_cli(capsys, "optimize", stem, "-o", out, "-s", "input=1x3x32x32",
                                "--report", locked / "r.json")
    assert_one_line_error(code, stdout, err, BAD_INPUT, "cannot write", "Permission denied")
    assert not out.exists()


def test_read_only_output_folder(capsys, tmp_path, stem):
    locked = tmp_path / "readonly"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:  # root ignores the mode bits: the simulated case above covers this machine
            probe.unlink()
            pytest.skip("running as root: a read-only mode does not stop writes here")
        code, stdout, err = run_cli(capsys, "optimize", stem, "-o", locked / "o.onnx", "-s", "input=1x3x32x32")
        assert_one_line_error(code, stdout, err, BAD_INPUT, "cannot write")
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"), reason="needs Linux procfs")
def test_output_in_a_folder_nobody_can_write(capsys, tmp_path, stem):
    """/proc takes no new files, not even from root: the real check, wherever the tests run."""
    code, stdout, err = run_cli(capsys, "optimize", stem, "-o", "/proc/cli_out.onnx", "-s", "input=1x3x32x32")
    assert_one_line_error(code, stdout, err, BAD_INPUT, "cannot write", "/proc")


# ------------------------------------------------------------------------------ calibration data and tolerances

def _calibration_cases(tmp: Path) -> dict[str, tuple[Path, np.ndarray, tuple[str, ...]]]:
    """name -> (model, data, message fragments). cli_stem_16 fixes its input but the batch, cli_stem_c fixes none."""
    rng = np.random.default_rng(2)
    good = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    with_nan, with_inf = good.copy(), good.copy()
    with_nan[3, 0, 0, 0] = np.nan
    with_inf[5, 1, 2, 3] = np.inf
    fixed, open_c = tmp / "cli_stem_16.onnx", tmp / "cli_stem_c.onnx"
    onnx.save(stem_model(dims=("N", 3, 16, 16)), fixed)
    onnx.save(stem_model(dims=("N", "C", "H", "W")), open_c)
    return {
        "nan": (fixed, with_nan, ("1 NaN or infinite", "sample 3")),
        "inf": (fixed, with_inf, ("1 NaN or infinite", "sample 5")),
        "all zeros": (fixed, np.zeros_like(good), ("every calibration value is zero",)),
        "nhwc": (fixed, good.transpose(0, 2, 3, 1).copy(), ("expected (N, 3, 16, 16)", "given (8, 16, 16, 3)", "transpose")),
        "wrong channels": (fixed, rng.standard_normal((8, 4, 16, 16)).astype(np.float32), ("expected (N, 3, 16, 16)", "given (8, 4, 16, 16)")),
        "wrong channels, open dim": (open_c, rng.standard_normal((8, 4, 16, 16)).astype(np.float32), ("takes 3 channels", "given 4")),
        "nhwc, open dim": (open_c, good.transpose(0, 2, 3, 1).copy(), ("takes 3 channels", "NHWC")),
    }


@pytest.mark.parametrize("case", ["nan", "inf", "all zeros", "nhwc", "wrong channels", "wrong channels, open dim", "nhwc, open dim"])
def test_bad_calibration_data_is_refused(capsys, tmp_path, case):
    model, data, fragments = _calibration_cases(tmp_path)[case]
    np.save(tmp_path / "calib.npy", data)
    out = tmp_path / "o.onnx"
    code, stdout, err = run_cli(capsys, "optimize", model, "-o", out, "--calib", tmp_path / "calib.npy")
    assert_one_line_error(code, stdout, err, BAD_INPUT, *fragments)
    assert not out.exists()


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--min-sqnr", "-10"], "above 0"),
    (["--min-sqnr", "0"], "above 0"),
    (["--min-sqnr", "nan"], "above 0"),
    (["--max-drop", "-0.1"], "[0, 1]"),
    (["--max-drop", "1.5", "--metric", "cosine"], "[0, 1]"),
    (["--max-drop", "5", "--metric", "mse"], "[0, 1]"),
    (["--target-macs", "0"], "(0, 1]"),
    (["--target-macs", "1.5"], "(0, 1]"),
    (["--target-speedup", "-2"], "> 0"),
    (["--target-speedup", "inf"], "> 0"),
])
def test_nonsense_tolerances_and_targets_are_refused(capsys, tmp_path, stem, calib, flags, fragment):
    out = tmp_path / "o.onnx"
    code, stdout, err = run_cli(capsys, "optimize", stem, "-o", out, "--calib", calib, *flags)
    assert_one_line_error(code, stdout, err, BAD_INPUT, fragment)
    assert not out.exists()


# ------------------------------------------------------------------------------ help, messages, exit codes

COMMANDS = ["analyze", "bench", "optimize", "optimize-many", "demo", "pack", "unpack", "recipes", "passes"]


def _help(capsys, *command: str) -> str:
    code, out, err = run_cli(capsys, *command, "--help")
    assert code == 0, err
    return out


def test_help_shows_no_bool_metavar_and_no_none(capsys):
    for command in ([], *([c] for c in COMMANDS)):
        text = _help(capsys, *command)
        assert "<bool>" not in text and "None" not in text, command
    assert "--json " in _help(capsys, "analyze")  # the flags are still listed, without a type


def _readme_exit_codes() -> dict[int, str]:
    text = README.read_text()
    table = text[text.index("| exit code | meaning |"):].split("\n\n", 1)[0]
    rows = [line.strip("|").split("|", 1) for line in table.splitlines()[2:]]
    return {int(number): meaning.strip() for number, meaning in rows}


def test_exit_codes_agree_in_code_help_and_readme(capsys):
    table = {code.value: code.meaning for code in EXIT_CODES}
    assert set(table) >= {0, 1, 2, 3, 4, 5}
    assert _readme_exit_codes() == table
    squeeze = " ".join  # help text is wrapped to the terminal width
    for command in ([], ["optimize"]):
        shown = squeeze(_help(capsys, *command).split())
        for number, meaning in table.items():
            assert squeeze(f"{number} {meaning}".split()) in shown, (command, number)
    # Every error the package raises exits with a code from the table.
    def subclasses(cls):
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]
    assert {int(e.exit_code) for e in subclasses(OnnxCompressError)} <= set(table)
    assert VerificationError.exit_code == ExitCode.VERIFICATION_FAILED


def test_pack_says_larger_when_the_file_grew(capsys, tmp_path):
    model = tmp_path / "cli_tiny.onnx"
    onnx.save(custom_op_model(), model)  # a few hundred bytes: the container's index outweighs them
    code, stdout, err = run_cli(capsys, "pack", model, "-o", tmp_path / "t.occ")
    assert code == 0, err
    assert "larger than the ONNX model" in stdout and "smaller than the ONNX model" not in stdout
    assert size_change(1000, 400) == "2.50x smaller" and size_change(100, 118) == "1.18x larger"


# ------------------------------------------------------------------------------ progress

LINE = re.compile(r"^\[(\d+:)?\d+:\d\d\] ")


def test_optimize_prints_plain_progress_lines_when_stderr_is_not_a_terminal(capsys, tmp_path, stem, calib):
    out = tmp_path / "o.onnx"
    code, stdout, err = run_cli(capsys, "optimize", stem, "-o", out, "--calib", calib, "--bench-runs", "0")
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) >= 4 and all(LINE.match(line) for line in lines), err  # each with the elapsed time
    assert "optimizing: cleanup" in lines[0] and lines[-1].endswith("optimizing: done")
    assert any("level 1.000: accepted" in line for line in lines) and any("quantize-int8" in line for line in lines)
    assert "before" in stdout.lower() or "params" in stdout.lower()  # the result table is on stdout


def _plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


def test_plain_progress_heartbeat_and_rate_limit(monkeypatch):
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.05)
    console, buffer = _plain_console()
    with progress.progress("working", console) as reporter:
        reporter.step("a long pass")
        time.sleep(0.6)  # nothing reported meanwhile: the heartbeat fills the silence
    lines = buffer.getvalue().splitlines()
    assert sum("a long pass: still working" in line for line in lines) >= 2, lines
    assert all(LINE.match(line) for line in lines) and lines[-1].endswith("working: done")

    monkeypatch.setattr(progress, "HEARTBEAT_S", 30.0)
    console, buffer = _plain_console()
    with progress.progress("timing", console) as reporter:
        for run in range(1000):  # frequent updates: at most one line per UPDATE_S
            reporter.update("model @ batch 1", completed=run + 1, total=1000)
    assert len(buffer.getvalue().splitlines()) <= 2


def test_terminal_progress_never_shows_none():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    with progress.progress("optimizing", console) as reporter:  # no total: a spinner, no count
        for name in ("cleanup", "fold-batchnorm", "quantize-int8"):
            reporter.step(name)
            reporter._live.refresh()
    shown = buffer.getvalue()
    assert "quantize-int8" in shown and "None" not in shown

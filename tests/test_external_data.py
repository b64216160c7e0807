"""Models with external data (weights in `<model>.onnx.data` beside the file) load, run, optimize,
benchmark, pack and save from any working directory, and their files are never modified (issue 14)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxcompress import model as M
from onnxcompress import runtime
from onnxcompress.analysis.layer_timing import time_pair
from onnxcompress.analysis.shapes import infer_shapes
from onnxcompress.analysis.streaming import stream_values
from onnxcompress.calibration import Calibration
from onnxcompress.cli import main
from onnxcompress.errors import ModelLoadError
from onnxcompress.optimize import OptimizeOptions, optimize

NEWCOMER = Path(__file__).parent / "newcomer"
INPUT_SHAPES = {"external_conv": (1, 3, 16, 16), "external_mlp": (1, 4, 16)}
#: Exact passes (cleanup) and unchanged weights: the same graph up to ORT's float reassociation.
EXACT_ATOL = 1e-5
#: int8 outputs: largest error as a fraction of the largest output magnitude (measured on these
#: models and feeds: 1.0% dynamic, 1.2-2.4% static).
INT8_MAX_REL_ERROR = 0.05


@pytest.fixture(params=sorted(INPUT_SHAPES))
def name(request) -> str:
    return request.param


@pytest.fixture
def models(tmp_path) -> Path:
    """A copy of the external-data models in a folder of their own (tests must not touch tests/newcomer)."""
    folder = tmp_path / "models"
    folder.mkdir()
    for path in NEWCOMER.glob("external_*"):
        shutil.copy2(path, folder / path.name)
    return folder


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """A working directory that is not the models' folder: locations must not resolve against it."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _feeds(name: str) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(7).standard_normal(INPUT_SHAPES[name]).astype(np.float32)}


def _ort_outputs(model: str | os.PathLike | ir.Model, feeds) -> list[np.ndarray]:
    session = runtime.session(model) if isinstance(model, ir.Model) else ort.InferenceSession(str(model))
    return session.run(None, feeds)


def _assert_close(got: list[np.ndarray], want: list[np.ndarray], *, exact: bool) -> None:
    for g, w in zip(got, want, strict=True):
        if exact:
            np.testing.assert_allclose(g, w, rtol=0, atol=EXACT_ATOL)
        else:
            assert np.abs(g - w).max() <= INT8_MAX_REL_ERROR * np.abs(w).max()


def _is_external(tensor) -> bool:
    return isinstance(tensor, ir.ExternalTensor)


# ------------------------------------------------------------------------------------ loading


def test_the_models_keep_their_weights_outside(name):
    proto = onnx.load(str(NEWCOMER / f"{name}.onnx"), load_external_data=False)
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(t.endswith((".w", ".b")) for t in external)
    assert (NEWCOMER / f"{name}.onnx.data").stat().st_size == sum(
        int(next(e.value for e in t.external_data if e.key == "length"))
        for t in proto.graph.initializer if t.name in external)


def test_load_and_copies_resolve_data_beside_the_model(models, elsewhere, name):
    path = models / f"{name}.onnx"
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    relative = os.path.relpath(path, elsewhere)
    loaded = M.load(relative)
    for model in (loaded, M.load(loaded), M.load(M.load(loaded))):
        tensors = {k: v.const_value for k, v in model.graph.initializers.items()}
        assert {k for k, t in tensors.items() if _is_external(t)} == set(expected) - {"flat_shape"}
        for key, array in expected.items():
            np.testing.assert_array_equal(tensors[key].numpy(), array)


def test_to_proto_with_data_reads_external_tensors_in(models, elsewhere, name):
    model = M.load(models / f"{name}.onnx")
    proto = M.to_proto(model, with_data=True)
    assert not [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert all(_is_external(t) for t in M.external_tensors(model))  # the model itself is unchanged
    want = _ort_outputs(models / f"{name}.onnx", _feeds(name))
    _assert_close(ort.InferenceSession(proto.SerializeToString()).run(None, _feeds(name)), want, exact=True)


def test_constant_node_values_in_external_data(tmp_path, elsewhere):
    """A Constant node's tensor can live in the data file too (onnx.save with convert_attribute)."""
    value = np.arange(8, dtype=np.float32).reshape(2, 4)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(value)),
         onnx.helper.make_node("Add", ["x", "c"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])])
    path = tmp_path / "constant.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path,
              save_as_external_data=True, location="constant.onnx.data", size_threshold=0, convert_attribute=True)
    model = M.load(M.load(path))
    assert len(M.external_tensors(model)) == 1
    feeds = {"x": np.ones((2, 4), np.float32)}
    _assert_close(_ort_outputs(model, feeds), [value + 1], exact=True)
    out = M.save(model, elsewhere / "out.onnx")
    assert sorted(os.listdir(elsewhere)) == ["out.onnx"]
    _assert_close(_ort_outputs(out, feeds), [value + 1], exact=True)


# ---------------------------------------------------------------- ONNX Runtime and analysis


def test_sessions_and_shapes_work_on_external_tensors(models, elsewhere, name):
    path = models / f"{name}.onnx"
    want = _ort_outputs(path, _feeds(name))
    model = M.load(path)
    assert M.needs_file(model)
    for candidate in (model, M.load(model)):
        _assert_close(_ort_outputs(candidate, _feeds(name)), want, exact=True)
    shapes = infer_shapes(model, {"x": INPUT_SHAPES[name]})
    if name == "external_mlp":
        assert shapes["flat"].shape == (4, 32) and shapes["y"].shape == (4, 8)
    else:
        assert shapes["r1"].shape == (1, 8, 16, 16)


def test_shapes_read_a_reshape_shape_from_external_data(tmp_path, elsewhere):
    """Exporters keep small tensors inline, but a shape in the data file must still steer inference."""
    path = tmp_path / "all_external.onnx"
    onnx.save(onnx.load(str(NEWCOMER / "external_mlp.onnx")), path, save_as_external_data=True,
              location="all_external.onnx.data", size_threshold=0)
    model = M.load(path)
    assert _is_external(model.graph.initializers["flat_shape"].const_value)
    shapes = infer_shapes(model, {"x": INPUT_SHAPES["external_mlp"]})
    assert shapes["flat"].shape == (4, 32) and shapes["y"].shape == (4, 8)


def test_streaming_and_layer_timing_run_external_models(models, elsewhere):
    path = models / "external_conv.onnx"
    model = M.load(path)
    x = np.random.default_rng(2).standard_normal((3, 3, 16, 16)).astype(np.float32)
    streamed = [values["r1"] for _, values, _ in stream_values(model, ["r1"], Calibration.from_arrays(model, x),
                                                             batch_size=1)]
    probe = onnx.load(str(path))
    probe.graph.output.append(onnx.ValueInfoProto(name="r1"))
    session = ort.InferenceSession(probe.SerializeToString())
    for i, got in enumerate(streamed):
        np.testing.assert_allclose(got, session.run(["r1"], {"x": x[i:i + 1]})[0], rtol=0, atol=EXACT_ATOL)
    assert len(streamed) == len(x)
    timing = time_pair(model, M.load(model), min_runs=3, max_runs=3, min_seconds=0)
    assert timing.runs == 3 and timing.baseline_ms > 0 and timing.candidate_ms > 0


def test_optimize_api_matches_the_input(models, elsewhere, name):
    path = models / f"{name}.onnx"
    before = _files(models)
    result = optimize(str(path), options=OptimizeOptions(bench_runs=0))
    _assert_close(_ort_outputs(result.model, _feeds(name)), _ort_outputs(path, _feeds(name)),
                  exact=name == "external_conv")  # the MLP gets dynamic int8 by default
    assert _files(models) == before


# ------------------------------------------------------------------------------------ saving


def test_small_models_are_saved_self_contained(models, elsewhere, name):
    out = elsewhere / "out.onnx"
    M.save(M.load(models / f"{name}.onnx"), out)
    assert sorted(os.listdir(elsewhere)) == ["out.onnx"]
    onnx.checker.check_model(str(out), full_check=True)
    proto = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    _assert_close(_ort_outputs(out, _feeds(name)), _ort_outputs(models / f"{name}.onnx", _feeds(name)), exact=True)


def test_large_models_get_their_own_data_file(models, elsewhere, monkeypatch, name):
    monkeypatch.setattr(M, "EXTERNAL_DATA_THRESHOLD", 1024)  # stands in for protobuf's 2 GiB
    before = _files(models)
    out = models / "out.onnx"  # next to the input, whose data file must stay as it is
    M.save(M.load(models / f"{name}.onnx"), out)
    assert sorted(set(_files(models)) - set(before)) == ["out.onnx", "out.onnx.data"]
    assert {k: v for k, v in _files(models).items() if k in before} == before
    onnx.checker.check_model(str(out), full_check=True)
    _assert_close(_ort_outputs(out, _feeds(name)), _ort_outputs(models / f"{name}.onnx", _feeds(name)), exact=True)


@pytest.mark.parametrize("weights", ["read from the input", "in memory"])
def test_the_input_data_file_is_never_replaced(models, elsewhere, weights):
    """The output `external_conv.onnx` would put its data in `external_conv.onnx.data`: the name
    of the data file of the input, here renamed `input.onnx`."""
    (models / "external_conv.onnx").rename(models / "input.onnx")
    model = M.load(models / "input.onnx")
    if weights == "in memory":  # as after a pass that rewrote every weight: the model no longer reads the file
        model = ir.serde.deserialize_model(M.to_proto(model, with_data=True))
        assert not M.external_tensors(model)
    before = _files(models)
    out = M.save(model, models / "external_conv.onnx", external_data=True)
    assert sorted(set(_files(models)) - set(before)) == ["external_conv.onnx", "external_conv.onnx.1.data"]
    assert {k: v for k, v in _files(models).items() if k in before} == before
    want = _ort_outputs(models / "input.onnx", _feeds("external_conv"))
    _assert_close(_ort_outputs(out, _feeds("external_conv")), want, exact=True)
    # Saved again: the old output's own data file is replaced, no third name.
    M.save(model, out, external_data=True)
    assert sorted(set(_files(models)) - set(before)) == ["external_conv.onnx", "external_conv.onnx.1.data"]
    assert {k: v for k, v in _files(models).items() if k in before} == before
    _assert_close(_ort_outputs(out, _feeds("external_conv")), want, exact=True)


def test_saving_while_small_weights_are_in_use(models, elsewhere):
    """onnx-ir's save reads small external tensors in and closes their maps: with an array of one
    still alive that raised BufferError."""
    model = M.load(models / "external_conv.onnx")
    held = model.graph.initializers["conv1.b"].const_value.numpy()
    M.save(model, elsewhere / "out.onnx", external_data=True)
    np.testing.assert_array_equal(held, model.graph.initializers["conv1.b"].const_value.numpy())
    assert (elsewhere / "out.onnx.data").is_file()


def test_a_failed_write_leaves_no_debris(models, elsewhere, monkeypatch):
    model = M.load(models / "external_conv.onnx")
    out = elsewhere / "out.onnx"
    save = ir.save

    def half_written(m, path, **kwargs):  # data and model written to the temporary folder, then the disk fills
        save(m, path, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(M.ir, "save", half_written)
    with pytest.raises(ModelLoadError, match="disk full"):
        M.save(model, out, external_data=True)
    assert os.listdir(elsewhere) == []


def test_data_goes_in_before_the_model_and_away_if_the_model_cannot(models, elsewhere, monkeypatch):
    model = M.load(models / "external_conv.onnx")
    out = elsewhere / "out.onnx"
    moved = []
    replace = os.replace

    def failing_model_move(src, dst):
        if Path(dst).parent == elsewhere:  # not onnx-ir's own moves inside the temporary folder
            moved.append(Path(dst).name)
        if Path(dst) == out:
            raise OSError("no space for the rename")
        replace(src, dst)

    monkeypatch.setattr(M.os, "replace", failing_model_move)
    with pytest.raises(OSError, match="rename"):
        M.save(model, out, external_data=True)
    assert moved == ["out.onnx.data", "out.onnx"]
    assert os.listdir(elsewhere) == []


def test_save_refuses_to_write_over_a_data_file_the_model_reads(models, elsewhere):
    before = _files(models)
    with pytest.raises(ModelLoadError, match="data file the model reads"):
        M.save(M.load(models / "external_conv.onnx"), models / "external_conv.onnx.data")
    assert _files(models) == before


def test_file_bytes_count_the_data(models, name):
    path = models / f"{name}.onnx"
    assert M.file_bytes(path) == path.stat().st_size + (models / f"{name}.onnx.data").stat().st_size


# ---------------------------------------------------------------------------- load errors


def test_missing_and_truncated_data_are_one_line_errors(models, elsewhere, capsys):
    path = models / "external_mlp.onnx"
    data = models / "external_mlp.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    assert main(["optimize", str(path), "-o", "out.onnx"]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and len(err.strip().splitlines()) == 1
    data.unlink()
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is missing" in err and len(err.strip().splitlines()) == 1
    assert not (elsewhere / "out.onnx").exists()


# ------------------------------------------------------------------------------ command line


@pytest.mark.parametrize("args", [
    (),  # the default: exact cleanup, plus dynamic int8 for the MatMul-heavy MLP
    ("--quantize", "dynamic"),
    ("--recipe", "dynamic-int8"),
])
def test_cli_optimize_from_another_directory(models, elsewhere, name, args):
    before = _files(models)
    source = os.path.relpath(models / f"{name}.onnx", elsewhere)
    assert main(["optimize", source, "-o", "out.onnx", "--bench-runs", "0", "--report", "report.json", *args]) == 0
    assert _files(models) == before
    # The input's size counts its data file: the ratio compares like with like.
    sizes = json.loads(Path("report.json").read_text())
    assert sizes["before"]["file_bytes"] == len(before[f"{name}.onnx"][0]) + len(before[f"{name}.onnx.data"][0])
    assert sizes["after"]["file_bytes"] == Path("out.onnx").stat().st_size  # self-contained
    dynamic = any(n.op_type == "DynamicQuantizeLinear" for n in onnx.load("out.onnx").graph.node)
    assert dynamic == (name == "external_mlp")  # ORT's dynamic int8 here covers MatMul and Gemm only
    _assert_close(_ort_outputs("out.onnx", _feeds(name)), _ort_outputs(models / f"{name}.onnx", _feeds(name)),
                  exact=not dynamic)


@pytest.mark.parametrize("args", [
    ("--recipe", "cpu-int8"),
    (),  # the default with calibration data: the tolerance search (pruning, then int8)
])
def test_cli_static_int8_with_calibration(models, elsewhere, name, args):
    np.save("calib.npy", np.random.default_rng(3).standard_normal((32, *INPUT_SHAPES[name][1:]), np.float32))
    before = _files(models)
    source = os.path.relpath(models / f"{name}.onnx", elsewhere)
    assert main(["optimize", source, "-o", "int8.onnx", "--calib", "calib.npy", "--bench-runs", "0", *args]) == 0
    assert _files(models) == before
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load("int8.onnx").graph.node)
    _assert_close(_ort_outputs("int8.onnx", _feeds(name)), _ort_outputs(models / f"{name}.onnx", _feeds(name)),
                  exact=False)


def test_cli_analyze_bench_pack_unpack(models, elsewhere, name, capsys):
    before = _files(models)
    source = os.path.relpath(models / f"{name}.onnx", elsewhere)
    assert main(["analyze", source, "--json"]) == 0
    analysis = json.loads(capsys.readouterr().out)
    on_disk = (models / f"{name}.onnx").stat().st_size + (models / f"{name}.onnx.data").stat().st_size
    assert analysis["stats"]["file_bytes"] == on_disk  # the data file counts as part of the model
    assert main(["bench", source, "--runs", "20", "--warmup", "1"]) == 0
    assert main(["pack", source, "-o", "packed.occ"]) == 0
    assert main(["unpack", "packed.occ", "-o", "unpacked.onnx"]) == 0
    assert _files(models) == before
    capsys.readouterr()
    _assert_close(_ort_outputs("unpacked.onnx", _feeds(name)), _ort_outputs(models / f"{name}.onnx", _feeds(name)),
                  exact=True)

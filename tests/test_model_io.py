"""Model I/O: every source form loads to an equal model; saving is atomic and never overwrites the input."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
import pytest

from onnxcompress import model as M
from onnxcompress.errors import InputShapeError, ModelLoadError
from tests.graphs import conv_bn_relu_gemm, dynamic_matmul, two_inputs


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}


def _same_model(a: ir.Model, b: ir.Model) -> None:
    assert [n.op_type for n in a.graph] == [n.op_type for n in b.graph]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])


@pytest.fixture
def proto() -> onnx.ModelProto:
    return conv_bn_relu_gemm()


def test_load_from_every_source_form(tmp_path, proto):
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    from_path = M.load(path)
    for source in (str(path), proto, ir.serde.deserialize_model(proto), gs.import_onnx(proto)):
        _same_model(from_path, M.load(source))


def test_load_copies_in_memory_models(proto):
    original = ir.serde.deserialize_model(proto)
    loaded = M.load(original)
    loaded.graph.initializers["w1"].const_value = ir.tensor(np.zeros(1, np.float32))
    assert _weights(original)["w1"].shape == (8, 3, 3, 3)  # the caller's model is untouched


def test_graphsurgeon_round_trip(proto):
    model = M.load(proto)
    graph = M.to_graphsurgeon(model)
    assert isinstance(graph, gs.Graph)
    _same_model(model, M.load(graph))


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, proto):
    out = tmp_path / "out.onnx"
    M.save(M.load(proto), out)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    onnx.checker.check_model(str(out), full_check=True)


def test_save_refuses_to_overwrite_the_input(tmp_path, proto):
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ModelLoadError, match="overwrite the input"):
        M.save(M.load(path), path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_external_data_round_trip(tmp_path, proto):
    out = tmp_path / "ext.onnx"
    M.save(M.load(proto), out, external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    _same_model(M.load(proto), M.load(out))


def test_failed_write_keeps_the_old_output(tmp_path, proto, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(M.ir, "save", boom)
    with pytest.raises(ModelLoadError, match="disk full"):
        M.save(M.load(proto), out)
    assert out.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"hello, this is not a model", "not a valid ONNX model"), (b"\x08\x07\x12\x03abc\x3a", "")],
)
def test_bad_files_raise_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        M.load(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_truncated_model_is_rejected(tmp_path, proto):
    data = proto.SerializeToString()
    for cut in (len(data) // 3, len(data) // 2, len(data) - 7):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError):
            M.load(path)


def test_missing_and_truncated_external_data(tmp_path, proto):
    out = tmp_path / "ext.onnx"
    M.save(M.load(proto), out, external_data=True)
    data = tmp_path / "ext.onnx.data"
    full = data.read_bytes()
    data.write_bytes(full[: len(full) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        M.load(out)
    data.unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        M.load(out)


def test_parse_input_shapes():
    assert M.parse_input_shapes(["x=1x3x224x224", "mask=2,128", "a:0=5"]) == {
        "x": (1, 3, 224, 224), "mask": (2, 128), "a:0": (5,)}
    for bad in ("x", "x=", "x=1xx3", "=1x2", "x=1x-3", "x=0x3"):
        with pytest.raises(InputShapeError):
            M.parse_input_shapes([bad])


def test_resolve_input_shapes_static_and_defaults():
    model = M.load(conv_bn_relu_gemm(batch="N"))
    assert M.resolve_input_shapes(model) == {"x": (1, 3, 8, 8)}  # symbolic batch defaults to 1
    assert M.resolve_input_shapes(model, {"x": (4, 3, 8, 8)}) == {"x": (4, 3, 8, 8)}
    assert M.resolve_input_shapes(M.load(two_inputs((2, 4)))) == {"a": (2, 4), "b": (2, 4)}


def test_resolve_input_shapes_errors():
    dyn = M.load(dynamic_matmul())
    with pytest.raises(InputShapeError, match="dynamic shape.*--input-shape x="):
        M.resolve_input_shapes(dyn)
    assert M.resolve_input_shapes(dyn, {"x": (2, 7, 16)}) == {"x": (2, 7, 16)}
    with pytest.raises(InputShapeError, match="unknown input 'y'"):
        M.resolve_input_shapes(dyn, {"y": (1, 2, 16)})
    with pytest.raises(InputShapeError, match="rank 3"):
        M.resolve_input_shapes(dyn, {"x": (1, 16)})
    with pytest.raises(InputShapeError, match="fixed to 16"):
        M.resolve_input_shapes(dyn, {"x": (1, 5, 15)})


def test_old_ir_initializer_inputs_are_not_user_inputs(light_model_paths):
    model = M.load(light_model_paths["resnet50"])
    assert [v.name for v in M.graph_inputs(model)] == ["gpu_0/data_0"]
    assert len(model.graph.inputs) > 1  # the file lists its weights as inputs too

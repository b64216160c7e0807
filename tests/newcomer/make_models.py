"""Writes the external-data test models next to this file (deterministic: same bytes every run).

    python tests/newcomer/make_models.py

Every weight, however small, is stored in `<model>.onnx.data` beside the model, as exporters do for
large models (issue 14: such models could not be optimized). The 16-byte Reshape shape stays in the
model file: ONNX Runtime's shape inference cannot read a shape from external data.

- external_conv.onnx: x float [1, 3, 16, 16] -> Conv 3->8 (3x3, pad 1) -> Relu -> Conv 8->8 (3x3,
  pad 1) -> Relu -> y [1, 8, 16, 16].
- external_mlp.onnx: x float [1, 4, 16] -> MatMul [16, 32] -> Add -> Relu -> Reshape to [4, 32] (the
  shape is an initializer in the model file) -> Gemm [32, 8] + bias -> y [4, 8].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

HERE = Path(__file__).parent
OPSET = 17
#: Initializers kept in the model file; every other one goes to the data file.
KEEP_INLINE = {"flat_shape"}


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...], fan_in: int) -> onnx.TensorProto:
    # He scaling keeps activations near unit size through the layers.
    return numpy_helper.from_array(rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32), name)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="make_models")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def external_conv(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weights = [
        _weight(rng, "conv1.w", (8, 3, 3, 3), 27), _weight(rng, "conv1.b", (8,), 27),
        _weight(rng, "conv2.w", (8, 8, 3, 3), 72), _weight(rng, "conv2.b", (8,), 72),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.w", "conv2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["y"], name="relu2"),
    ]
    graph = helper.make_graph(
        nodes, "external_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], weights,
    )
    return _model(graph)


def external_mlp(seed: int = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weights = [
        _weight(rng, "fc1.w", (16, 32), 16), _weight(rng, "fc1.b", (32,), 16),
        numpy_helper.from_array(np.array([4, 32], np.int64), "flat_shape"),
        _weight(rng, "fc2.w", (32, 8), 32), _weight(rng, "fc2.b", (8,), 32),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.w"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "fc1.b"], ["a1"], name="fc1_bias"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("Reshape", ["r1", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc2.w", "fc2.b"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "external_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], weights,
    )
    return _model(graph)


def write(name: str, model: onnx.ModelProto, folder: Path = HERE) -> Path:
    path, data = folder / f"{name}.onnx", folder / f"{name}.onnx.data"
    data.unlink(missing_ok=True)  # onnx.save appends to an existing data file
    external_data_helper.convert_model_to_external_data(model, location=data.name, size_threshold=0)
    for tensor in model.graph.initializer:
        if tensor.name in KEEP_INLINE:
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
    onnx.save(model, path)  # writes the tensors marked external to `data`
    return path


MODELS = {"external_conv": external_conv, "external_mlp": external_mlp}


if __name__ == "__main__":
    for name, build in MODELS.items():
        print(write(name, build()))

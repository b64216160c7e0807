"""Static shape inference: every value of the main graph, checked against shapes ORT produces."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxcompress.analysis import shapes as shapes_module
from onnxcompress.analysis.shapes import ShapeInfo, infer_shapes
from onnxcompress.errors import InputShapeError
from onnxcompress.model import graph_inputs, load, resolve_input_shapes, to_proto

HAS_TORCH = importlib.util.find_spec("torch") is not None  # an optional extra
if HAS_TORCH:
    from tests import zoo

    #: Families whose graphs are hardest to infer: head reshapes, token positions, split/shuffle,
    #: Resize, concatenated skips (the same exports as tests/test_cost.py, cached per session).
    ZOO_FAMILIES = ("shufflenet_v2", "unet_resize", "vit", "bert")
    ZOO_CASES = [(f, d) for f, d in zoo.export_cases() if f in ZOO_FAMILIES]
else:
    ZOO_CASES = [pytest.param(None, None, marks=pytest.mark.skip(reason="torch is not installed"))]

#: The light copy used for inference may keep small constants; a model whose weights were copied
#: would be hundreds of MB.
LIGHT_COPY_MAX_BYTES = 1_000_000


def runtime_shapes(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Shapes of every node output, read from an ORT run with all of them as graph outputs."""
    proto = to_proto(model)
    declared = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        for name in node.output:
            if name and name not in declared:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return {name: np.shape(result) for name, result in zip(names, session.run(names, feeds))}


def assert_matches_runtime(model: ir.Model, inferred: dict[str, ShapeInfo], feeds: dict[str, np.ndarray]) -> None:
    actual = runtime_shapes(model, feeds)
    assert actual, "the model has no node outputs"
    wrong = {name: (inferred[name].shape, shape) for name, shape in actual.items() if inferred[name].shape != shape}
    assert not wrong, f"inferred vs actual shapes differ: {wrong}"


def node_outputs(model: ir.Model) -> list[str]:
    return [v.name for node in model.graph for v in node.outputs if v.name]


def is_known(shapes: dict[str, ShapeInfo], name: str) -> bool:
    return name in shapes and shapes[name].known


def f32(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def make_model(nodes, inputs, outputs, initializers=(), opset=17) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(array, name)


# ---------------------------------------------------------------- simple graphs


def test_conv_pool_shapes_follow_the_output_size_formula():
    n, c, h, w = 2, 3, 17, 19
    k, stride, pad, dilation, cout = 3, 2, 1, 2, 5
    conv_h = (h + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    conv_w = (w + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["y"], strides=[stride] * 2, pads=[pad] * 4, dilations=[dilation] * 2),
            helper.make_node("MaxPool", ["y"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c, h, w])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, None)],
        [tensor("w", np.zeros((cout, c, k, k), np.float32))],
    )
    shapes = infer_shapes(model)
    assert shapes["x"] == ShapeInfo((n, c, h, w), np.dtype(np.float32))
    assert shapes["w"].shape == (cout, c, k, k)
    assert shapes["y"].shape == (n, cout, conv_h, conv_w)
    assert shapes["p"].shape == (n, cout, conv_h // 2, conv_w // 2)
    assert shapes["p"].nbytes == n * cout * (conv_h // 2) * (conv_w // 2) * 4


def test_does_not_modify_the_model():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [tensor("b", np.ones(8, np.float32))],
    )
    before = to_proto(model).SerializeToString()
    shapes = infer_shapes(model, {"x": (4, 8)})
    assert shapes["z"].shape == (4, 8)
    assert to_proto(model).SerializeToString() == before
    assert model.graph.inputs[0].shape.dims[0] == ir.SymbolicDim("batch")


def test_symbolic_batch_defaults_to_one_and_can_be_given():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    assert infer_shapes(model)["y"].shape == (1, 3)
    assert infer_shapes(model, {"x": (6, 3)})["y"].shape == (6, 3)


def test_dynamic_non_batch_dim_needs_a_shape():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    with pytest.raises(InputShapeError, match="x"):
        infer_shapes(model)


def test_reshape_constant_keeps_its_data_while_large_weights_are_declared_only():
    weight = np.arange(4096, dtype=np.float32).reshape(64, 64)  # above SMALL_TENSOR_ELEMENTS
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("Reshape", ["y", "shape"], ["r"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)],
        [tensor("w", weight), tensor("shape", np.array([8, 4, 4], np.int64))],
    )
    light = shapes_module._light_proto(model, resolve_input_shapes(model))
    assert [t.name for t in light.graph.initializer] == ["shape"]
    assert "w" in {i.name for i in light.graph.input}
    assert infer_shapes(model)["r"].shape == (8, 4, 4)


def test_large_constant_node_weight_is_declared_not_copied():
    weight = np.ones((64, 64), np.float32)
    model = make_model(
        [
            helper.make_node("Constant", [], ["w"], value=tensor("w", weight)),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    light = shapes_module._light_proto(model, resolve_input_shapes(model))
    assert [n.op_type for n in light.graph.node] == ["MatMul"]
    shapes = infer_shapes(model)
    assert shapes["w"].shape == (64, 64)
    assert shapes["y"].shape == (3, 64)


def test_values_onnx_and_symbolic_inference_miss_come_from_one_runtime_run():
    # Opset-9 Dropout's mask output is left unknown by both inference engines.
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Dropout", ["y"], ["z", "mask"], ratio=0.5)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        opset=9,
    )
    light = shapes_module._light_proto(model, resolve_input_shapes(model))
    assert not is_known(shapes_module._onnx_inference(light), "mask")
    assert not is_known(shapes_module._symbolic_inference(light), "mask")
    assert infer_shapes(model)["mask"].shape == (2, 5)


def test_shapes_that_depend_on_input_values_stay_unknown():
    # NonZero's output length depends on the data: a run on zeros would report a wrong shape.
    model = make_model(
        [helper.make_node("NonZero", ["x"], ["idx"]), helper.make_node("Transpose", ["idx"], ["y"])],
        [f32("x", [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
    )
    shapes = infer_shapes(model)
    assert shapes["idx"].shape is None and shapes["y"].shape is None
    assert shapes["idx"].dtype == np.dtype(np.int64)


def test_unknown_custom_op_leaves_its_outputs_unknown_without_failing():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Mystery", ["y"], ["z"], domain="com.example")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    shapes = infer_shapes(load(proto))
    assert shapes["y"].shape == (2, 5)
    assert shapes["z"].shape is None
    assert shapes["z"].nbytes is None


# ---------------------------------------------------------------- transformers with dynamic inputs


@pytest.fixture(scope="module")
def attention_model(tmp_path_factory) -> ir.Model:
    """A one-block attention model exported by TorchScript with dynamic [batch, seq] token ids.

    Its Reshapes take shapes built from Shape -> Gather -> Concat at run time.
    """
    torch = pytest.importorskip("torch")

    class Attention(torch.nn.Module):
        def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, dim)
            self.qkv = torch.nn.Linear(dim, 3 * dim)
            self.out = torch.nn.Linear(dim, dim)
            self.norm = torch.nn.LayerNorm(dim)
            self.heads = heads

        def forward(self, ids):
            x = self.embed(ids)
            b, t, d = x.shape
            q, k, v = (
                z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, dim=-1)
            )
            attention = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
            y = (attention @ v).transpose(1, 2).reshape(b, t, d)
            return self.norm(x + self.out(y))

    path = tmp_path_factory.mktemp("attention") / "attention.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer warnings
        torch.onnx.export(
            Attention().eval(),
            (torch.randint(0, 50, (2, 7)),),
            str(path),
            dynamo=False,
            input_names=["ids"],
            output_names=["out"],
            dynamic_axes={"ids": {0: "batch", 1: "seq"}, "out": {0: "batch", 1: "seq"}},
        )
    return load(path)


def test_attention_shapes_resolve_given_the_sequence_length(attention_model):
    batch, seq = 3, 11
    shapes = infer_shapes(attention_model, {"ids": (batch, seq)})
    unknown = [name for name in node_outputs(attention_model) if not shapes[name].known]
    assert not unknown
    assert shapes[attention_model.graph.outputs[0].name].shape == (batch, seq, 16)
    scores = [n for n in attention_model.graph if n.op_type == "Softmax"][0].outputs[0].name
    assert shapes[scores].shape == (batch, 2, seq, seq)
    assert_matches_runtime(attention_model, shapes, {"ids": np.ones((batch, seq), np.int64)})


def test_attention_reshapes_need_more_than_onnx_inference(attention_model):
    # Proves the fallback tiers are exercised: onnx's data propagation alone leaves values unknown.
    light = shapes_module._light_proto(attention_model, {"ids": (3, 11)})
    onnx_only = shapes_module._onnx_inference(light)
    assert [name for name in node_outputs(attention_model) if not is_known(onnx_only, name)]


def test_attention_without_sequence_length_raises(attention_model):
    with pytest.raises(InputShapeError, match="ids"):
        infer_shapes(attention_model)
    with pytest.raises(InputShapeError, match="ids"):
        infer_shapes(attention_model, {"ids": (3,)})


# ---------------------------------------------------------------- model zoo


@pytest.mark.parametrize("family, dynamo", ZOO_CASES)
def test_torch_zoo_shapes_equal_runtime_shapes(tmp_path_factory, family, dynamo):
    """Both exporters, dynamic batch analyzed at batch 3 (longer sequence for BERT)."""
    pytest.importorskip("torch")
    model = load(zoo.exported(tmp_path_factory, family, dynamo=dynamo, dynamic_batch=True))
    given = {"input_ids": (3, 9)} if family == "bert" else None
    static = {name: (3, *dims[1:]) for name, dims in resolve_input_shapes(model, given).items()}
    shapes = infer_shapes(model, static)
    feeds = {v.name: np.ones(static[v.name], shapes[v.name].dtype) for v in graph_inputs(model)}
    assert_matches_runtime(model, shapes, feeds)


@pytest.mark.parametrize("name", ["resnet50", "shufflenet", "inception_v2", "squeezenet"])
def test_light_zoo_shapes_equal_runtime_shapes(load_folded_light, name):
    model = load_folded_light(name)
    shapes = infer_shapes(model)
    feeds = {v.name: np.zeros(shapes[v.name].shape, np.float32) for v in graph_inputs(model)}
    assert_matches_runtime(model, shapes, feeds)


def test_every_light_zoo_value_is_known(light_model_paths, load_folded_light):
    for name, path in light_model_paths.items():
        for model in (load(path), load_folded_light(name)):  # weights as nodes, and folded
            shapes = infer_shapes(model)
            unknown = [value for value, info in shapes.items() if not info.known]
            assert not unknown, f"{name}: {unknown[:5]}"


def test_inference_copy_of_vgg19_holds_no_weights(load_folded_light):
    model = load_folded_light("vgg19")
    light = shapes_module._light_proto(model, resolve_input_shapes(model))
    assert light.ByteSize() < LIGHT_COPY_MAX_BYTES


def test_a_large_initializer_added_without_a_type_is_declared_by_its_tensor():
    """A pass may register a weight as a bare ir.Value (no type or shape): inference still sees it."""
    model = load(helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["h"], name="id")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 17)]))
    weight = ir.Value(name="w", const_value=ir.tensor(np.zeros((64, 32), np.float32), name="w"))  # > SMALL_TENSOR_ELEMENTS
    model.graph.register_initializer(weight)
    matmul = ir.node("MatMul", [model.graph.node(0).outputs[0], weight], name="mm")
    model.graph.append(matmul)
    matmul.outputs[0].name = "y"
    model.graph.outputs[0] = matmul.outputs[0]
    assert weight.type is None and infer_shapes(model)["y"].shape == (2, 32)

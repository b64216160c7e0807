"""The torch executor computes what ONNX Runtime computes, trains every weight, and writes weights back
without touching anything but initializer values."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxcompress import demo_data  # noqa: E402
from onnxcompress.errors import OnnxCompressError  # noqa: E402
from onnxcompress.model import load, to_proto  # noqa: E402
from onnxcompress.runtime import session  # noqa: E402
from onnxcompress.torch_graph import UnsupportedGraphError, to_torch, weight_initializers  # noqa: E402
from tests import zoo  # noqa: E402
from tests.conftest import LIGHT_MODELS, fold_light_model  # noqa: E402

#: Max |torch - ORT| / max |ORT|. Float32 kernels differ in summation order only; the largest error
#: seen on the zoo (both exporters), the light models and the digits CNN is ~2e-6 (YOLO, VGG-19).
REL_TOL = 1e-5
#: Light models cheap enough for CI (224x224 in torch and ORT, randomized weights: < 2 s each).
#: Dynamo exports cost seconds each; in CI only those whose op forms differ most from TorchScript's
#: (Split with num_outputs, Gelu, ReduceMean with axes input, Clip with initializer bounds).
FAST_DYNAMO = ("shufflenet_v2", "vit", "mobilenet_v2")
FAST_LIGHT = ("squeezenet", "inception_v1", "inception_v2", "shufflenet")


def _rel_error(got: torch.Tensor, want: np.ndarray) -> float:
    got = got.detach().numpy()
    assert got.shape == want.shape and got.dtype == want.dtype
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _same_as_ort(model: ir.Model, feeds: dict[str, np.ndarray]) -> float:
    want = session(model).run(None, feeds)
    with torch.no_grad():
        got = to_torch(model)({k: torch.from_numpy(v) for k, v in feeds.items()})
    return max(_rel_error(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize(("name", "dynamo"), [
    pytest.param(n, d, id=f"{n}-{zoo.EXPORTERS[d]}", marks=[pytest.mark.slow] if d and n not in FAST_DYNAMO else [])
    for n, d in zoo.export_cases()
])
def test_zoo_matches_ort(tmp_path_factory, name, dynamo):
    model = load(zoo.exported(tmp_path_factory, name, dynamo=dynamo))
    assert _same_as_ort(model, zoo.numpy_inputs(name)) <= REL_TOL


def _randomized(model: ir.Model, seed: int = 0) -> ir.Model:
    """Light models ship constant weights (every output equal): give them seeded He-scaled ones."""
    rng = np.random.default_rng(seed)
    variances = {n.inputs[4].name for n in model.graph if n.op_type == "BatchNormalization"}
    for name, value in model.graph.initializers.items():
        array = value.const_value.numpy()
        if array.dtype != np.float32 or array.ndim == 0:
            continue
        scale = np.sqrt(2.0 / np.prod(array.shape[1:])) if array.ndim > 1 else 0.1
        new = (rng.standard_normal(array.shape) * scale).astype(np.float32)
        value.const_value = ir.tensor(np.abs(new) + 1 if name in variances else new, name=name)
    return model


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in FAST_LIGHT else [pytest.mark.slow]) for n in LIGHT_MODELS]
)
def test_light_models_match_ort(name):
    model = _randomized(fold_light_model(LIGHT_MODELS[name]))
    value = model.graph.inputs[0]
    shape = [d if isinstance(d, int) else 1 for d in value.shape.dims]
    feeds = {value.name: np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    assert _same_as_ort(model, feeds) <= REL_TOL


def test_digits_cnn_matches_ort():
    model = load(demo_data.demo_model_path())
    assert _same_as_ort(model, {"image": demo_data.load_calibration()[:16]}) <= REL_TOL


# ---------------------------------------------------------------- single operators, edge cases


def _single(op: str, inputs: list[tuple[str, np.ndarray, bool]], n_out: int = 1, opset: int = 17, **attrs) -> tuple[ir.Model, dict]:
    """One node; inputs are (name, array, is_initializer)."""
    nodes = [helper.make_node(op, [n for n, _, _ in inputs], [f"y{i}" for i in range(n_out)], **attrs)]
    graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                    for n, a, init in inputs if not init]
    inits = [numpy_helper.from_array(a, n) for n, a, init in inputs if init]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(n_out)]
    proto = helper.make_model(helper.make_graph(nodes, "g", graph_inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    return load(proto), {n: a for n, a, init in inputs if not init}


_R = np.random.default_rng(0)
_X4 = _R.standard_normal((2, 3, 9, 10)).astype(np.float32)
_W = _R.standard_normal((4, 3, 3, 3)).astype(np.float32)
_WT = _R.standard_normal((3, 2, 3, 3)).astype(np.float32)
_I64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731

SINGLE_OPS = {
    "conv-asymmetric-pads": ("Conv", [("x", _X4, False), ("w", _W, True)], {"pads": [0, 1, 2, 1], "strides": [2, 1]}),
    "conv-same-lower": ("Conv", [("x", _X4, False), ("w", _W, True)], {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    "conv-transpose-pads": ("ConvTranspose", [("x", _X4, False), ("w", _WT, True), ("b", _WT[0, :, 0, 0].copy(), True)],
                            {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 1]}),
    "maxpool-asymmetric": ("MaxPool", [("x", _X4, False)], {"kernel_shape": [3, 3], "pads": [0, 0, 1, 1], "strides": [2, 2]}),
    "maxpool-ceil": ("MaxPool", [("x", _X4, False)], {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    "avgpool-asymmetric-exclude": ("AveragePool", [("x", _X4, False)], {"kernel_shape": [3, 3], "pads": [0, 1, 1, 0]}),
    "avgpool-include": ("AveragePool", [("x", _X4, False)], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    "gemm-trans-alpha-beta": ("Gemm", [("a", _R.standard_normal((5, 3)).astype(np.float32), False),
                                       ("b", _R.standard_normal((4, 5)).astype(np.float32), True),
                                       ("c", _R.standard_normal((4,)).astype(np.float32), True)],
                              {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}),
    "slice-negative-step": ("Slice", [("x", _X4, False), ("s", _I64(-1, 8), True), ("e", _I64(-10, 1), True),
                                      ("a", _I64(3, 2), True), ("t", _I64(-2, -3), True)], {}),
    "pad-reflect": ("Pad", [("x", _X4, False), ("p", _I64(0, 0, 1, 2, 0, 0, 2, 1), True)], {"mode": "reflect"}),
    "pad-constant-crop": ("Pad", [("x", _X4, False), ("p", _I64(0, 0, -1, 2, 0, 1, 2, -2), True),
                                  ("v", np.array(1.5, np.float32), True)], {}),
    "resize-linear": ("Resize", [("x", _X4, False), ("r", np.zeros(0, np.float32), True),
                                 ("s", np.array([1, 1, 2, 1.5], np.float32), True)], {"mode": "linear"}),
    "resize-nearest-sizes": ("Resize", [("x", _X4, False), ("r", np.zeros(0, np.float32), True), ("s", np.zeros(0, np.float32), True),
                                        ("z", _I64(2, 3, 18, 20), True)],
                             {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
    "gather-negative": ("Gather", [("x", _X4, False), ("i", _I64(-1, 0, 2), True)], {"axis": 2}),
    # a shape's element by a scalar index (Shape -> Gather -> Unsqueeze -> Concat -> Reshape in exported flattens)
    "gather-scalar-of-vector": ("Gather", [("x", _X4[0, 0, 0], False), ("i", np.array(-2, np.int64), True)], {}),
    "softmax-opset11-3d": ("Softmax", [("x", _X4[0], False)], {"axis": 1}, 11),
    "lrn": ("LRN", [("x", _X4, False)], {"size": 3, "alpha": 0.01, "beta": 0.75, "bias": 1.5}),
    "layernorm-axis": ("LayerNormalization", [("x", _X4, False), ("g", _R.standard_normal((9, 10)).astype(np.float32), True),
                                              ("b", _R.standard_normal((9, 10)).astype(np.float32), True)], {"axis": 2}),
    "reduce-axes-input": ("ReduceMean", [("x", _X4, False), ("a", _I64(-1, 1), True)], {"keepdims": 0}, 18),
    "split-uneven": ("Split", [("x", _X4, False)], {"axis": 3, "num_outputs": 3}, 18),
    "clip-inputs": ("Clip", [("x", _X4, False), ("lo", np.array(-0.5, np.float32), True), ("hi", np.array(0.7, np.float32), True)], {}),
    "hardsigmoid": ("HardSigmoid", [("x", _X4, False)], {"alpha": 0.3, "beta": 0.4}),
    "prelu": ("PRelu", [("x", _X4, False), ("s", _R.standard_normal((3, 1, 1)).astype(np.float32), True)], {}),
}


@pytest.mark.parametrize("case", list(SINGLE_OPS))
def test_single_op_matches_ort(case):
    op, inputs, attrs, *opset = SINGLE_OPS[case]
    n_out = attrs.get("num_outputs", 1)
    model, feeds = _single(op, inputs, n_out, *(opset or [17]), **attrs)
    assert _same_as_ort(model, feeds) <= REL_TOL


def test_unsupported_op_is_named_in_one_line():
    model, _ = _single("CumSum", [("x", _X4, False), ("a", _I64(1), True)])
    with pytest.raises(UnsupportedGraphError, match="CumSum") as info:
        to_torch(model)
    assert isinstance(info.value, OnnxCompressError) and "\n" not in str(info.value)


# ---------------------------------------------------------------- parameters and writing back


def test_weights_are_parameters_and_shape_constants_buffers(tmp_path_factory):
    model = load(zoo.exported(tmp_path_factory, "vit", dynamo=True))
    names = set(weight_initializers(model))
    graph = model.graph
    for node in graph:
        if node.op_type in ("Conv", "Gemm", "LayerNormalization"):
            assert all(v.name in names for v in node.inputs[1:] if v is not None and v.name in graph.initializers)
        if node.op_type in ("Reshape", "Slice", "Unsqueeze"):
            assert not any(v is not None and v.name in names for v in node.inputs[1:])
    # Linear on 3-D input exports as MatMul + Add: both the weight and the separate bias train.
    matmul_biases = [n.inputs[1].name for n in graph if n.op_type == "Add" and n.inputs[0].producer() is not None
                     and n.inputs[0].producer().op_type == "MatMul" and n.inputs[1].name in graph.initializers]
    assert matmul_biases and set(matmul_biases) <= names
    assert all(graph.initializers[n].const_value.dtype == ir.DataType.FLOAT for n in names)


def test_every_weight_gets_a_gradient(tmp_path_factory):
    model = load(zoo.exported(tmp_path_factory, "resnet_basic", dynamo=False))
    module = to_torch(model)
    (out,) = module({k: torch.from_numpy(v) for k, v in zoo.numpy_inputs("resnet_basic").items()})
    out.square().sum().backward()
    assert module.weight_names
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in module.weights)


def test_write_back_changes_only_initializer_values(tmp_path_factory):
    model = load(zoo.exported(tmp_path_factory, "mobilenet_v2", dynamo=True))
    before = to_proto(model)
    module = to_torch(model)
    with torch.no_grad():
        for p in module.weights:
            p.mul_(1.1).add_(0.01)
    feeds = zoo.numpy_inputs("mobilenet_v2")
    with torch.no_grad():
        (expected,) = module({k: torch.from_numpy(v) for k, v in feeds.items()})
    changed = module.write_back(model)
    after = to_proto(model)
    assert sorted(changed) == sorted(module.weight_names)
    assert after.graph.node == before.graph.node
    assert after.graph.input == before.graph.input and after.graph.output == before.graph.output
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    assert list(new) == list(old)
    for name in old:
        assert new[name].shape == old[name].shape and new[name].dtype == old[name].dtype
        assert (name in changed) == (not np.array_equal(new[name], old[name]))
    onnx.checker.check_model(after, full_check=True)
    (got,) = session(model).run(None, feeds)
    assert _rel_error(expected, got) <= REL_TOL


def test_batchnorm_statistics_frozen_unless_asked():
    model = load(demo_data.demo_model_path())
    x = {"image": torch.from_numpy(demo_data.load_calibration()[:8])}
    frozen, updating = to_torch(model), to_torch(model, norm_training=True)
    stats = updating.norm_stats
    assert stats and not set(stats) & set(updating.weight_names)
    for module in (frozen, updating):
        module.train()
        with torch.no_grad():
            module(x)
    original = {n: v.const_value.numpy() for n, v in model.graph.initializers.items()}
    assert all(np.array_equal(frozen.tensors()[n].numpy(), original[n]) for n in stats)
    assert all(not np.array_equal(updating.tensors()[n].numpy(), original[n]) for n in stats)

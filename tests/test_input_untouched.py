"""The caller's model is never modified: copies share weight tensors with it (`Model.clone()`), so no
pass may write into an array it did not make (issue 16)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcompress import model as M
from onnxcompress.optimize import OptimizeOptions, optimize
from onnxcompress.passes import Factorize, PruneChannels, QuantizeDynamic, QuantizeWeightOnly
from onnxcompress.pipeline import Pipeline, build_pass
from onnxcompress.verify import VerifyOptions
from tests.graphs import attention_block, conv_bn_relu_gemm

CLEANUP = ("fold-constants", "eliminate-noops", "fold-batchnorm", "fuse-pad")


def _writable(proto: onnx.ModelProto) -> ir.Model:
    """The model with every initializer a plain writable numpy array, as a caller building one in
    memory would have it: an in-place write into it would not fail, only show in its bytes."""
    model = ir.serde.deserialize_model(proto)
    for value in model.graph.initializers.values():
        value.const_value = ir.Tensor(np.array(value.const_value.numpy()), name=value.name)
    return model


def _fingerprint(model: ir.Model) -> tuple[bytes, dict[str, bytes]]:
    """The whole model serialized (graph, attributes, metadata) and each initializer's bytes."""
    arrays = {name: v.const_value.numpy().tobytes() for name, v in model.graph.initializers.items()}
    return ir.serde.serialize_model(model).SerializeToString(), arrays


def _calibration(proto: onnx.ModelProto, samples: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in proto.graph.input:
        dims = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            feeds[value.name] = np.ones((samples, *dims[1:]), np.int64)
        else:
            feeds[value.name] = rng.standard_normal((samples, *dims[1:])).astype(np.float32)
    return feeds


CASES = {
    "cleanup": (conv_bn_relu_gemm, lambda: [build_pass(n) for n in CLEANUP]),
    "prune-refit": (conv_bn_relu_gemm, lambda: [PruneChannels(ratio=0.5, recover="refit", round_to=1)]),
    "quantize-int8": (conv_bn_relu_gemm, lambda: [build_pass("quantize-int8")]),
    "factorize": (attention_block, lambda: [Factorize(rank_ratio=0.25)]),
    "quantize-dynamic": (attention_block, lambda: [QuantizeDynamic()]),
    "weight-only": (attention_block, lambda: [QuantizeWeightOnly(block_size=16)]),
    "smooth-quant": (attention_block, lambda: [build_pass("smooth-quant"), build_pass("quantize-int8")]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_passes_leave_the_input_model_as_it_was(case):
    make, passes = CASES[case]
    proto = make()
    model = _writable(proto)
    before = _fingerprint(model)
    result = Pipeline(passes(), verify=VerifyOptions(samples=2)).run(model, calibration=_calibration(proto))
    assert any(p.modified for p in result.report.passes)  # the copy was changed
    after = _fingerprint(model)
    assert after[1] == before[1]  # no weight array was written into
    assert after[0] == before[0]


def test_optimize_leaves_the_input_model_as_it_was():
    proto = conv_bn_relu_gemm()
    model = _writable(proto)
    before = _fingerprint(model)
    optimize(model, calibration=_calibration(proto), options=OptimizeOptions(bench_runs=0))
    assert _fingerprint(model) == before


def test_load_shares_the_weights_and_keeps_where_the_model_came_from(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_gemm(), path)
    source = M.load(path)
    copy = M.load(source)
    assert copy.graph is not source.graph and copy.meta[M.SOURCE_KEY] == source.meta[M.SOURCE_KEY]
    name = next(iter(source.graph.initializers))
    assert copy.graph.initializers[name].const_value is source.graph.initializers[name].const_value
    with pytest.raises(M.ModelLoadError, match="refusing to overwrite the input"):
        M.save(copy, path)  # a copy is still the model read from `path`


def test_a_graph_out_of_order_is_copied_by_serialization():
    proto = conv_bn_relu_gemm()
    nodes = list(proto.graph.node)[::-1]  # consumers before producers: Model.clone() refuses these
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    source = ir.serde.deserialize_model(proto)
    with pytest.raises((RuntimeError, ValueError)):
        source.clone()
    copy = M.load(source)
    assert ir.serde.serialize_model(copy) == ir.serde.serialize_model(source)
    assert copy.graph.node(0) is not source.graph.node(0)

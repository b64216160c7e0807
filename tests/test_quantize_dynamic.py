"""quantize-dynamic: int8 weights with run-time activation quantization, through ORT's own quantizer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxcompress import model as M
from onnxcompress.analysis.fusion import fusion_check
from onnxcompress.passes import QuantizeDynamic
from onnxcompress.pipeline import Pipeline
from onnxcompress.verify import VerifyOptions
from tests.graphs import dynamic_matmul

# Dynamic int8 of a random 16x16 projection: about 8 bits of weights and activations, ~35 dB here.
MIN_SQNR_DB = 25.0


def test_matmul_runs_as_integer_kernel_and_keeps_its_interface():
    proto = dynamic_matmul()
    pipeline = Pipeline([QuantizeDynamic()], verify=VerifyOptions(samples=4))
    result = pipeline.run(proto, input_shapes={"x": (2, 7, 16)})
    record = result.report.passes[0]
    assert record.changes[0] == "1 of 1 MatMul/Gemm nodes now use int8 weights"
    assert record.details["integer_ops"]  # MatMulInteger (+ DynamicQuantizeLinear) in the saved graph
    assert record.fidelity.sqnr_db >= MIN_SQNR_DB
    assert [v.name for v in result.model.graph.inputs] == ["x"] and [v.name for v in result.model.graph.outputs] == ["y"]
    onnx.checker.check_model(M.to_proto(result.model), full_check=True)
    report = fusion_check(result.model)
    assert report.int8_count >= 1 and report.float_compute_count == 0


def test_no_calibration_needed_and_skips_are_reported():
    proto = dynamic_matmul()
    result = Pipeline([QuantizeDynamic(skip_nodes=("proj",))], verify=VerifyOptions(samples=1)).run(
        proto, input_shapes={"x": (1, 3, 16)})
    record = result.report.passes[0]
    assert not record.modified and record.skipped == ("1 MatMul/Gemm nodes left in float (non-constant weight, or excluded)",)


@pytest.mark.parametrize("kernels", ["any", "vnni"])
def test_on_avx2_kernels_only_the_safe_weights_keep_their_fidelity(tmp_path, avx2, kernels):
    """A projection with full-range weights: ORT's s8 codes saturate on an emulated AVX2 CPU; the
    pass's default shifts them to uint8 (exact u8 x u8 kernels)."""
    from onnxcompress.verify import compare, outputs

    proto = dynamic_matmul()
    result = Pipeline([QuantizeDynamic(kernels=kernels)], verify=VerifyOptions(samples=1)).run(proto, input_shapes={"x": (2, 7, 16)})
    shifted = result.report.passes[0].details["shifted_to_uint8"]
    assert bool(shifted) == (kernels == "any")
    path = tmp_path / "dynamic.onnx"
    onnx.save(M.to_proto(result.model), path)
    rng = np.random.default_rng(5)
    # inputs near their batch maximum: codes near 255 everywhere, the worst case for pair sums
    feeds = [{"x": (1 + 0.05 * rng.random((2, 7, 16))).astype(np.float32)} for _ in range(4)]
    sqnr = compare(outputs(M.load(proto), feeds, "float"), avx2(path, feeds), "random").sqnr_db
    assert (sqnr >= MIN_SQNR_DB) == (kernels == "any"), sqnr


@pytest.mark.parametrize("dynamo", [False, True])
def test_bert_encoder(tmp_path_factory, dynamo):
    pytest.importorskip("torch")
    from tests import zoo

    path = zoo.exported(tmp_path_factory, "bert", dynamo=dynamo)
    result = Pipeline([QuantizeDynamic()], verify=VerifyOptions(samples=2)).run(path)
    record = result.report.passes[0]
    assert record.modified and record.fidelity.cosine > 0.99
    assert np.isfinite(record.fidelity.sqnr_db)

"""quantize-weight-only: int4/int8 block weights (RTN, GPTQ) as MatMulNBits or blocked DequantizeLinear."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import model as M
from onnxcompress.analysis.cost import analyze_cost
from onnxcompress.errors import OnnxCompressError, RecipeError
from onnxcompress.passes import QuantizeWeightOnly
from onnxcompress.passes.weight_blocks import CLIP_RATIOS, BlockCodes, pack_matmulnbits, rtn, unpack_matmulnbits
from onnxcompress.pipeline import Pipeline, build_pass
from onnxcompress.verify import VerifyOptions
from tests.graphs import attention_block, padded_tokens

K, N, SEQ = 64, 48, 6


def _matmul(w: np.ndarray, seq: int = SEQ) -> onnx.ModelProto:
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, n])],
        [numpy_helper.from_array(w.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weight(seed: int = 0, k: int = K, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


def _run(model, feeds: dict[str, np.ndarray], optimize: bool = True) -> np.ndarray:
    import onnxruntime as ort

    proto = model if isinstance(model, onnx.ModelProto) else M.to_proto(model, with_data=True)
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _quantize(proto, calibration=None, **options):
    result = Pipeline([QuantizeWeightOnly(**options)], verify=VerifyOptions(enabled=False)).run(proto, calibration=calibration)
    return result.model, result.report.passes[0]


def _reference_codes(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block codes written out block by block, column by column: of the scales
    r * max|w| / (qmax + 1/2), r in CLIP_RATIOS, the one with the least squared error."""
    qmax = 2 ** (bits - 1) - 1
    codes, scales = np.zeros(w.shape, np.int64), np.zeros((-(-w.shape[0] // block), w.shape[1]), np.float32)
    for b in range(scales.shape[0]):
        for n in range(w.shape[1]):
            col = w[b * block:(b + 1) * block, n]
            best = None
            for ratio in CLIP_RATIOS:
                s = np.float32(np.float32(np.abs(col).max() / np.float32(qmax + 0.5)) * np.float32(ratio))
                q = np.clip(np.round(col / s), -qmax - 1, qmax)
                err = float(np.sum((q * s - col) ** 2))
                if best is None or err < best[0]:
                    best = (err, s, q)
            scales[b, n] = best[1]
            codes[b * block:(b + 1) * block, n] = best[2]
    return codes, scales


@pytest.mark.parametrize(("bits", "block", "k"), [(4, 32, 64), (8, 16, 80), (4, 16, 40)])
def test_rtn_codes_match_a_reference_and_dequantize_to_scale_times_code(bits, block, k):
    w = _weight(k=k)
    got = rtn(w, bits, block)
    codes, scales = _reference_codes(w, bits, block)
    np.testing.assert_array_equal(got.codes, codes)
    np.testing.assert_array_equal(got.scales, scales)
    assert got.dequantized().dtype == np.float32
    np.testing.assert_array_equal(got.dequantized(), np.repeat(scales, block, axis=0)[:k] * codes.astype(np.float32))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmulnbits_layout_is_ort_own_packer_layout(bits, symmetric):
    """ORT's packer (its own scales) read back by us gives its codes; packed again, the same bytes."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    w, block = _weight(1), 32
    blocks = K // block
    packed = np.zeros((N, blocks, block * bits // 8), np.uint8)
    zp = np.zeros((N, (blocks + 1) // 2 if bits == 4 else blocks), np.uint8)
    scales = np.zeros((N, blocks), np.float32)
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(packed, w, scales, zp, block, N, K, symmetric)
    values = (np.stack([packed & 15, packed >> 4], -1).reshape(N, blocks, -1) if bits == 4 else packed)
    values = values.reshape(N, -1).T.astype(np.int16)
    zps = None
    if not symmetric:
        zps = (np.stack([zp & 15, zp >> 4], -1).reshape(N, -1)[:, :blocks] if bits == 4 else zp).T.astype(np.uint8)
    codes = BlockCodes(values - (2 ** (bits - 1) if symmetric else 0), scales.T.copy(), zps, bits, block)
    ours_packed, ours_scales, ours_zp = pack_matmulnbits(codes)
    np.testing.assert_array_equal(ours_packed, packed)
    np.testing.assert_array_equal(ours_scales, scales.reshape(-1))
    if not symmetric:
        np.testing.assert_array_equal(ours_zp, zp.reshape(-1))
    back = unpack_matmulnbits(packed, scales.reshape(-1), None if symmetric else zp.reshape(-1), K, bits)
    np.testing.assert_array_equal(back, codes.dequantized())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmulnbits_equals_the_float_model_with_dequantized_weights(bits, symmetric):
    w = _weight(2, k=80)  # K not a whole number of blocks: padded
    x = {"x": np.random.default_rng(3).standard_normal((2, SEQ, 80)).astype(np.float32)}
    quantized, record = _quantize(_matmul(w), bits=bits, block_size=32, symmetric=symmetric, method="rtn", accuracy_level=0)
    assert [n.op_type for n in quantized.graph] == ["MatMulNBits"]
    assert record.details["accuracy_level"] == 0 and "accuracy_level 0" in record.changes[0]
    substituted = _matmul(rtn(w, bits, 32, symmetric).dequantized())
    expected = _run(substituted, x)
    np.testing.assert_allclose(_run(quantized, x), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    proto = M.to_proto(quantized, with_data=True)
    onnx.checker.check_model(proto, full_check=True)


def test_dequantize_linear_form_equals_matmulnbits_form():
    """The same codes and scales. ORT fuses DequantizeLinear + MatMul into MatMulNBits with its
    session's accuracy level (4 by default): run as written, it is the float MatMul of level 0."""
    model = attention_block()
    feeds = {"x": np.random.default_rng(4).standard_normal((2, 8, 32)).astype(np.float32),
             "attention_mask": np.ones((2, 8), np.int64)}
    nbits, _ = _quantize(model, method="rtn", block_size=16, accuracy_level=0)
    fused, _ = _quantize(model, method="rtn", block_size=16, accuracy_level=4)
    dq, record = _quantize(model, method="rtn", block_size=16, form="dequantize-linear")
    ops = [n.op_type for n in dq.graph]
    assert ops.count("DequantizeLinear") == 6 and "MatMulNBits" not in ops and dq.opset_imports[""] == 21
    assert record.changes[0].startswith("opset 17 -> 21")
    onnx.checker.check_model(M.to_proto(dq, with_data=True), full_check=True)
    for ours, theirs in ((_run(nbits, feeds), _run(dq, feeds, optimize=False)), (_run(fused, feeds), _run(dq, feeds))):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def _correlated(seed: int = 5, rows: int = 64) -> np.ndarray:
    """Inputs whose features are strongly correlated (a few latent factors plus a little noise)."""
    factors = np.random.default_rng(0).standard_normal((4, K))
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((rows, SEQ, 4)) @ factors
    return (latent + 0.05 * rng.standard_normal((rows, SEQ, K))).astype(np.float32)


def _error(model, quantized, x) -> float:
    return float(np.sum((_run(model, {"x": x}) - _run(quantized, {"x": x})) ** 2))


def test_gptq_beats_rtn_on_correlated_calibration_inputs_and_int8_beats_int4():
    w, calib = _weight(6), _correlated()
    model = _matmul(w)
    errors = {}
    for bits in (4, 8):
        for method in ("rtn", "gptq"):
            quantized, record = _quantize(model, calibration={"x": calib}, bits=bits, method=method, accuracy_level=0)
            errors[bits, method] = _error(model, quantized, calib)
            assert record.details["method"] == method
    assert errors[4, "gptq"] < 0.5 * errors[4, "rtn"]  # several dB lower on the data it fitted
    assert errors[8, "gptq"] <= errors[8, "rtn"]
    assert errors[8, "rtn"] < errors[4, "rtn"] and errors[8, "gptq"] < errors[4, "gptq"]
    held = _correlated(seed=7, rows=16)  # the same distribution, other samples: still better
    gptq, _ = _quantize(model, calibration={"x": calib}, method="gptq", accuracy_level=0)
    rtn_model, _ = _quantize(model, method="rtn", accuracy_level=0)
    assert _error(model, gptq, held) < _error(model, rtn_model, held)


def test_attention_block_with_calibration_defaults_to_gptq_and_verifies():
    model = attention_block()
    rng = np.random.default_rng(8)
    calib = {"x": rng.standard_normal((16, 8, 32)).astype(np.float32), "attention_mask": np.ones((16, 8), np.int64)}
    calib["attention_mask"][:, 6:] = 0
    result = Pipeline([QuantizeWeightOnly(block_size=16, skip_nodes=("o",))], verify=VerifyOptions(samples=2)).run(
        model, calibration=calib)
    record = result.report.passes[0]
    assert record.details["method"] == "gptq" and record.details["layers"] == 5  # q k v fc1 fc2 (Gemm, transB)
    assert "o: kept float by skip_nodes" in record.skipped
    assert any(s.startswith("scores: the weight is not a constant") for s in record.skipped)
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("MatMulNBits") == 5 and ops.count("MatMul") == 3  # scores, context, o
    assert result.model.graph.initializers["wo"] is not None and "wq" not in result.model.graph.initializers
    assert record.fidelity.sqnr_db > 15
    before, after = result.report.before, result.report.after
    assert after.macs == before.macs and after.params == before.params  # MatMulNBits: K x N per row, still
    assert "com.microsoft::MatMulNBits" in analyze_cost(result.model, {"x": (1, 8, 32), "attention_mask": (1, 8)}).op_macs


def test_padding_rows_are_left_out_of_the_statistics():
    from onnxcompress.calibration import Calibration
    from onnxcompress.passes.weight_gptq import collect_hessians

    model = M.load(attention_block())
    x, padded, mask = padded_tokens(4, real=5, seed=9)
    h = [collect_hessians(model, {"x": 32}, Calibration.from_arrays(model, {"x": a, "attention_mask": mask})
                          )["x"] for a in (x, padded)]
    np.testing.assert_allclose(h[0], h[1])
    rows = x[:, :5].reshape(-1, 32).astype(np.float64)
    np.testing.assert_allclose(h[0], 2 * rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)  # float32 sums


def test_without_calibration_rtn_and_gptq_asks_for_data():
    _, record = _quantize(_matmul(_weight()))
    assert record.details["method"] == "rtn" and not record.details["gptq_gain_db"]
    with pytest.raises(OnnxCompressError, match="gptq needs calibration data"):
        _quantize(_matmul(_weight()), method="gptq")


def test_small_and_non_constant_weights_stay_float():
    small, record = _quantize(_matmul(_weight(k=8)))
    assert not record.modified and record.skipped == ("proj: weight 8x48 is smaller than 16 on a side",)


@pytest.mark.parametrize(("options", "message"), [
    ({"bits": 3}, "bits must be 4 or 8"),
    ({"block_size": 20}, "block_size must be a power of 2"),
    ({"block_size": 8}, "block_size must be a power of 2 and at least 16"),
    ({"accuracy_level": 5}, "accuracy_level"),
])
def test_bad_options_are_one_line_recipe_errors(options, message):
    with pytest.raises(RecipeError, match=message) as info:
        build_pass({"type": "quantize-weight-only", **options})
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=message):
        QuantizeWeightOnly(**options)


def test_cli_int4_writes_a_smaller_model(tmp_path, capsys):
    from onnxcompress.cli import main

    w1, w2 = _weight(10, 128, 128), _weight(11, 128, 64)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    source, out, report = tmp_path / "mlp.onnx", tmp_path / "mlp.int4.onnx", tmp_path / "report.json"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    code = main(["optimize", str(source), "-o", str(out), "--quantize", "int4", "--bench-runs", "0", "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    assert out.stat().st_size < source.stat().st_size / 4
    assert [n.op_type for n in onnx.load(out).graph.node] == ["MatMulNBits", "Relu", "MatMulNBits"]
    import json

    passes = json.loads(report.read_text())["passes"]
    assert passes[-1]["name"] == "quantize-weight-only" and passes[-1]["details"]["bits"] == 4
    code = main(["optimize", str(source), "-o", str(tmp_path / "x.onnx"), "--block-size", "64"])
    assert code == 2 and "--block-size applies to weight-only" in capsys.readouterr().err

"""int8 codes that x86 kernels without VNNI compute exactly: the overflow bound, the safe weight forms,
and what ORT really computes on an emulated AVX2 CPU (qemu-user, see onnxcompress/cpu_emulation.py)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.analysis.int8_kernels import (
    PAIR_CODE_LIMIT,
    host_has_vnni,
    overflowing_rows,
    reduction_rows,
    safe_scales,
    saturating_dot,
)
from onnxcompress.passes.int8_weights import BIAS_CODE_LIMIT, encode_weight, quantize_bias, quantize_weight

#: safe_scales grows a scale in steps of 1/(2*PAIR_CODE_LIMIT); it may end this far above the float bound.
SAFE_SCALE_SLACK = 1 + 4 / (2 * PAIR_CODE_LIMIT)


# ---------------------------------------------------------------------------- the bound, in numpy


def test_a_full_range_pair_saturates_and_the_bound_sees_it():
    x = np.full((1, 2), 255, dtype=np.uint8)
    w = np.full((1, 2), 127, dtype=np.int8)
    assert saturating_dot(x, w)[0, 0] == 32767  # exact: 64,770
    assert overflowing_rows(w).tolist() == [True]
    assert overflowing_rows(np.array([[127, 1], [64, 64], [-64, -64], [-128, 0]])).tolist() == [False, False, False, False]
    assert overflowing_rows(np.array([[64, 65], [-65, -64], [127, 2]])).tolist() == [True, True, True]
    # only the kernel's pairs (0, 1), (2, 3), ... count; an odd last code pairs with zero
    assert overflowing_rows(np.array([[0, 127, 127, 0], [127, 0, 0, 127]])).tolist() == [False, False]
    assert overflowing_rows(np.array([[0, 127, 127], [127, 127, 0]])).tolist() == [False, True]


@pytest.mark.parametrize("seed", range(4))
def test_the_bound_is_exact_for_the_pair_saturation_model(seed):
    """A row called safe gives the exact int32 sum for every input; a row called unsafe saturates
    for its worst input (255 where the weight is positive)."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (64, 9)).astype(np.int8)
    w[::2] //= 2  # half the rows safe-ish, half not
    x = np.concatenate([rng.integers(0, 256, (32, 9)), np.full((1, 9), 255), np.zeros((1, 9))]).astype(np.uint8)
    exact = x.astype(np.int64) @ w.astype(np.int64).T
    got = saturating_dot(x, w)
    safe = ~overflowing_rows(w)
    assert safe.any() and (~safe).any()
    np.testing.assert_array_equal(got[:, safe], exact[:, safe])
    for r in np.flatnonzero(~safe):
        lows, highs = np.where(w[r] > 0, 255, 0), np.where(w[r] < 0, 255, 0)
        worst = np.stack([lows, highs]).astype(np.uint8)
        assert np.any(saturating_dot(worst, w[r : r + 1])[:, 0] != worst.astype(np.int64) @ w[r].astype(np.int64))


def test_conv_reduction_order_is_channels_last():
    w = np.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2).astype(np.float64)  # [M, C, kh, kw]
    rows = reduction_rows("Conv", w)
    # row 0: (kh, kw) = (0, 0) over c, then (0, 1) over c, ...
    np.testing.assert_array_equal(rows[0, :3], w[0, :, 0, 0])
    np.testing.assert_array_equal(rows[0, 3:6], w[0, :, 0, 1])
    np.testing.assert_array_equal(reduction_rows("Gemm", w[0, 0], trans_b=True), w[0, 0])
    np.testing.assert_array_equal(reduction_rows("MatMul", w[0, 0]), w[0, 0].T)


@pytest.mark.parametrize("seed", range(3))
def test_safe_scales_are_safe_and_barely_wider_than_needed(seed):
    rng = np.random.default_rng(seed)
    rows = rng.standard_t(3, (48, 72))  # heavy tails: some channels with two large neighbours
    full = np.abs(rows).max(1) / 127
    safe = safe_scales(rows, full.astype(np.float32))
    codes = np.clip(np.round(rows / safe[:, None]), -127, 127)
    assert not overflowing_rows(codes).any()
    pos, neg = np.maximum(rows, 0), np.minimum(rows, 0)
    need = np.maximum((pos[:, 0::2] + pos[:, 1::2]).max(1), -(neg[:, 0::2] + neg[:, 1::2]).min(1)) / PAIR_CODE_LIMIT
    bound = np.maximum(full, need)
    assert np.all(safe >= full * (1 - 1e-6)) and np.all(safe <= bound * SAFE_SCALE_SLACK)
    assert np.any(safe > full * 1.01)  # the fixture does need widening somewhere


def test_weight_forms_per_kernels():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (16, 8, 3, 3)).astype(np.float32)
    vnni = encode_weight("Conv", w, 0, kernels="vnni")
    assert vnni.form == "s8" and overflowing_rows(reduction_rows("Conv", vnni.codes.astype(np.float64))).any()
    safe = encode_weight("Conv", w, 0)
    assert safe.form in ("s8-safe", "u8")
    if safe.form == "s8-safe":
        assert not overflowing_rows(reduction_rows("Conv", safe.codes.astype(np.float64))).any()
    else:  # the same values, shifted to uint8 for u8 x u8 kernels
        assert safe.codes.dtype == np.uint8 and safe.zero_point == 128
        np.testing.assert_array_equal(safe.codes.astype(np.int16) - 128, vnni.codes)
    # one large weight per pair never needs widening; depthwise kernels are exact
    tiny = encode_weight("Conv", np.concatenate([w[:, :1] * 10, w[:, 1:] * 0.01], axis=1), 0)
    assert tiny.form == "s8"
    assert encode_weight("Conv", w[:, :1], 0, depthwise=True).form == "s8"


def test_u8_when_widening_would_cost_too_much_noise():
    """Every neighbour pair at full range: safe s8 would halve the precision of every channel (+6 dB)."""
    w = np.tile(np.array([1.0, 0.99], dtype=np.float32), (8, 16))
    enc = encode_weight("MatMul", w.T, 1)
    assert enc.form == "u8" and enc.widened_db > 5.5
    np.testing.assert_allclose(enc.dequantized(), w.T, atol=enc.scales.max() / 2 + 1e-7)


def test_a_dead_channel_with_a_bias_gets_a_scale_its_bias_fits():
    w = np.random.default_rng(0).normal(0, 0.1, (4, 3, 1, 1)).astype(np.float32)
    w[2] = 0.0  # dead channel: its full-range scale is the 1e-12 floor
    bias = np.array([0.1, -0.2, 3.0, 0.05], dtype=np.float32)
    x_scale = 0.02
    _, plain = quantize_weight(w, 0)
    assert quantize_bias(bias, x_scale, plain)[2]  # saturates with the plain scales
    enc = encode_weight("Conv", w, 0, x_scale=x_scale, bias=bias)
    codes, steps, saturated = quantize_bias(bias, x_scale, enc.scales)
    assert not saturated and np.abs(codes).max() <= BIAS_CODE_LIMIT
    assert enc.bias_widened == 1 and np.all(enc.codes[2] == 0)
    assert np.all(np.abs(codes * steps.astype(np.float64) - bias) <= steps / 2 * (1 + 1e-6))  # rounding only


def test_host_vnni_detection_reads_cpu_flags():
    assert host_has_vnni("processor : 0\nflags : fpu avx2 avx512f avx512_vnni\n")
    assert host_has_vnni("flags\t\t: fpu avx2 avx_vnni\n")
    assert not host_has_vnni("flags : fpu sse4_2 avx2 fma\n")
    assert not host_has_vnni("model name : Neoverse\nFeatures : fp asimd asimddp\n")


# ---------------------------------------------------------------------------- real kernels under qemu


def _qlinear_conv(w: np.ndarray, x_shape: tuple[int, ...], y_scale: float):
    """A bare QLinearConv: u8 input (scale 1, zero point 0), s8 weights (scale 1), u8 output around 128."""
    m = w.shape[0]
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("xs", np.array(1.0, np.float32)), ("xz", np.array(0, np.uint8)), ("w", w.astype(np.int8)),
        ("ws", np.ones(m, np.float32)), ("wz", np.zeros(m, np.int8)), ("ys", np.array(y_scale, np.float32)),
        ("yz", np.array(128, np.uint8))]]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    graph = helper.make_graph([node], "qconv", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_avx2_conv_saturates_exactly_as_the_numpy_emulation_says(tmp_path, avx2):
    """The bound's model of the kernel, checked against the kernel: a 3x3 Conv on 4 channels with
    large weights, input all 255: ORT on an emulated Haswell gives the pair-saturated sums of the
    channels-last order; natively (VNNI here) or with safe codes, the exact sums."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (6, 4, 3, 3))
    w[0] = 127  # every pair saturates
    w[1] = np.where(np.arange(36).reshape(4, 3, 3) % 2, 90, -90)  # mixed signs never saturate
    x = np.full((1, 4, 3, 3), 255, dtype=np.uint8)
    rows = reduction_rows("Conv", w.astype(np.float64)).astype(np.int64)
    y_scale = 10000.0  # keeps every sum within int8 after requantization (exact row 0: 1,165,860)
    expected = np.clip(np.rint(saturating_dot(x.transpose(0, 2, 3, 1).reshape(1, -1), rows) / y_scale), -128, 127)
    exact = np.clip(np.rint(x.transpose(0, 2, 3, 1).reshape(1, -1).astype(np.int64) @ rows.T / y_scale), -128, 127)
    assert expected[0, 0] != exact[0, 0] and expected[0, 1] == exact[0, 1]
    path = tmp_path / "qconv.onnx"
    path.write_bytes(_qlinear_conv(w, x.shape, y_scale).SerializeToString())
    got = avx2(path, [{"x": x}])[0][0].reshape(-1).astype(np.int64) - 128
    np.testing.assert_array_equal(got, expected.reshape(-1))


@pytest.fixture(scope="module")
def digits_int8(tmp_path_factory):
    """The bundled digits CNN (real trained weights), int8 for any CPU and for VNNI CPUs only."""
    import dataclasses

    import onnx

    from onnxcompress.calibration import Calibration
    from onnxcompress.demo_data import demo_model_path, load_calibration, load_test_set
    from onnxcompress.model import load, to_proto
    from onnxcompress.pipeline import Pipeline

    source = load(str(demo_model_path()))
    calibration = Calibration.from_arrays(source, {"image": load_calibration()})
    paths = {}
    for kernels in ("any", "vnni"):
        pipeline = Pipeline.from_recipe("cpu-int8")
        pipeline.passes = [dataclasses.replace(p, kernels=kernels) if p.name == "quantize-int8" else p for p in pipeline.passes]
        paths[kernels] = tmp_path_factory.mktemp("digits") / f"digits_int8_{kernels}.onnx"
        onnx.save(to_proto(pipeline.run(source, calibration=calibration).model), paths[kernels])
    images, labels = load_test_set()
    return paths, [{"image": images[i : i + 120]} for i in range(0, len(images), 120)], labels


def test_kernel_safe_int8_keeps_its_simulation_on_avx2_and_vnni_codes_do_not(digits_int8, avx2):
    """On an emulated AVX2 CPU, the kernel-safe codes compute what their QDQ graph says (the kernel
    check passes, the emulated fused outputs equal this machine's), the VNNI-only codes do not."""
    from onnxcompress.analysis.kernel_check import check_kernels
    from onnxcompress.demo_data import demo_model_path
    from onnxcompress.verify import outputs

    paths, feeds, labels = digits_int8
    reference = outputs(str(demo_model_path()), feeds, "float")
    safe_avx2 = avx2(paths["any"], feeds)
    safe = check_kernels(str(paths["any"]), feeds, reference, "digits test set", fused=safe_avx2)
    assert safe.ok, safe.describe()
    for a, b in zip(outputs(paths["any"], feeds, "native"), safe_avx2):
        np.testing.assert_array_equal(a[0], b[0])
    vnni = check_kernels(str(paths["vnni"]), feeds, reference, "digits test set",
                         fused=avx2(paths["vnni"], feeds))
    assert not vnni.ok and vnni.gap_db > 10, vnni.describe()  # measured: 14.2 dB lost
    accuracy = np.mean(np.concatenate([o[0] for o in safe_avx2]).argmax(1) == labels)
    assert accuracy >= 0.99  # the float model: 0.9972 (onnxcompress/data/README.md)


def test_a_failed_kernel_check_redoes_vnni_codes_as_safe_codes(monkeypatch):
    """Codes made for VNNI on a CPU whose kernels lose them: the pass says so and redoes them safe."""
    import onnxcompress.passes.quantize as quantize
    from onnxcompress.analysis.kernel_check import KernelCheck
    from onnxcompress.calibration import Calibration
    from onnxcompress.demo_data import demo_model_path, load_calibration
    from onnxcompress.model import load
    from onnxcompress.pipeline import PassContext

    calls = []

    def lossy_then_fine(model, feeds, reference, source, **_):
        calls.append(source)
        return KernelCheck(5.0 if len(calls) == 1 else 40.0, 40.0, 4, source)

    monkeypatch.setattr(quantize, "check_kernels", lossy_then_fine)
    source = load(str(demo_model_path()))
    ctx = PassContext(calibration=Calibration.from_arrays(source, {"image": load_calibration()[:32]}), model=source)
    result = quantize.QuantizeQDQ(kernels="vnni").run(source, ctx)
    details = result.record.details
    assert len(calls) == 2 and details["kernels"] == "any" and details["kernel_check"]["ok"]
    assert any("redone with codes exact on any CPU" in c for c in result.record.changes)
    assert {e.split(":")[0] for e in details["weight_forms"].values()} <= {"s8", "s8-safe", "u8"}

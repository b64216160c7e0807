"""Exactness checks judged against the input model's own float noise, and --no-verify meaning it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress import verify
from onnxcompress.errors import VerificationError
from onnxcompress.optimize import OptimizeOptions, optimize
from onnxcompress.passes import FoldBatchNorm
from onnxcompress.pipeline import Pass, PassContext, Pipeline
from tests.graphs import cancelling_gemm_bn, conv_bn_relu_gemm


@dataclass
class _NudgeWeight(Pass):
    """Test pass claiming exactness while scaling one weight by `factor`."""

    name: ClassVar[str] = "test-nudge"
    weight: str = "w"
    factor: float = 1.001

    def run(self, model: ir.Model, ctx: PassContext):
        value = model.graph.initializers[self.weight]
        value.const_value = ir.tensor(value.const_value.numpy() * np.float32(self.factor), name=self.weight)
        return self.result(model, changes=[f"{self.weight} scaled by {self.factor}"])


def test_fold_on_outputs_near_1e_6_is_exact_within_the_models_float_noise(monkeypatch):
    result = Pipeline([FoldBatchNorm()]).run(cancelling_gemm_bn())
    fidelity = result.report.fidelity
    assert "BatchNormalization" not in [n.op_type for n in result.model.graph]
    assert fidelity.max_rel_error > 1e-4  # beyond rtol: only the noise floor makes this exact
    monkeypatch.setattr(verify, "NOISE_FACTOR", 0.0)
    with pytest.raises(VerificationError, match="pass 'fold-batchnorm': outputs changed beyond tolerance"):
        Pipeline([FoldBatchNorm()]).run(cancelling_gemm_bn())


def test_the_noise_floor_still_catches_real_changes():
    # the cancelling model's float32 outputs are only good to ~1% (its noise floor): a 50% change
    with pytest.raises(VerificationError, match="pass 'test-nudge'"):
        Pipeline([_NudgeWeight(factor=1.5)]).run(cancelling_gemm_bn())
    # an ordinary model's floor is far below rtol: 0.1% on one weight is caught
    with pytest.raises(VerificationError, match="pass 'test-nudge'"):
        Pipeline([_NudgeWeight(weight="fc_w", factor=1.001)]).run(conv_bn_relu_gemm())


def test_float_noise_is_small_against_the_outputs_and_zero_free():
    model = ir.serde.deserialize_model(conv_bn_relu_gemm())
    feeds = verify.random_feeds(model, {"x": (1, 3, 8, 8)}, count=2)
    reference = verify.outputs(model, feeds, "test")
    noise = verify.float_noise(model, feeds, reference, "test")
    scale = max(float(np.abs(s[0]).max()) for s in reference)
    assert len(noise) == 1 and 0.0 < noise[0] < 1e-5 * scale


def test_no_verify_skips_the_per_pass_checks_in_the_search_too(monkeypatch):
    monkeypatch.setattr(verify, "NOISE_FACTOR", 0.0)  # fold-batchnorm now fails its exactness check
    rng = np.random.default_rng(1)
    calibration = {"x": rng.standard_normal((16, 16)).astype(np.float32)}
    with pytest.raises(VerificationError, match="fold-batchnorm"):
        optimize(cancelling_gemm_bn(), calibration=calibration, options=OptimizeOptions(bench_runs=0))
    result = optimize(cancelling_gemm_bn(), calibration=calibration, options=OptimizeOptions(bench_runs=0, verify=False))
    assert result.mode == "search" and not result.report.verified
    assert "BatchNormalization" not in [n.op_type for n in result.model.graph]


def test_an_exact_pass_after_a_lossy_one_is_held_to_the_lossy_result():
    from onnxcompress.passes import PruneChannels

    # pruning keeps the BatchNorms, so fold-batchnorm then runs on a model that no longer matches
    # the input: it must be judged against the pruned model, not against the input
    rng = np.random.default_rng(0)
    calibration = {"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)}
    result = Pipeline([PruneChannels(ratio=0.5), FoldBatchNorm()]).run(conv_bn_relu_gemm(), calibration=calibration)
    pruned, folded = result.report.passes
    assert pruned.fidelity.max_rel_error > 1e-3  # the pruning really changed the outputs
    assert "BatchNormalization" not in [n.op_type for n in result.model.graph]
    assert folded.fidelity.max_abs_error == pytest.approx(pruned.fidelity.max_abs_error, rel=1e-3)
    # and a real change after a lossy pass is still caught
    with pytest.raises(VerificationError, match="pass 'test-nudge'"):
        Pipeline([PruneChannels(ratio=0.5), _NudgeWeight(weight="fc_w", factor=1.001)]).run(
            conv_bn_relu_gemm(), calibration=calibration)


def _upsample_skip_model() -> ir.Model:
    """x (1x1x20x20) upsampled by Resize scales 2 and added to y (1x1x40x40): a U-Net/FPN skip."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Resize", ["x", "", "scales"], ["up"], mode="nearest"),
         helper.make_node("Mul", ["up", "w"], ["scaled"]),
         helper.make_node("Add", ["scaled", "y"], ["out"])],
        "skip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 20, 20]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 40, 40])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 40, 40])],
        [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0]),
         helper.make_tensor("w", TensorProto.FLOAT, [1], [0.5])],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("seed", range(4))
def test_float_noise_leaves_shape_deciding_floats_alone(seed):
    """Resize scales nudged one step below 2.0 give 39 rows, not 40, and the skip Add fails to run.
    Only the value weight `w` may move; the scales decide shapes."""
    model = _upsample_skip_model()
    rng = np.random.default_rng(seed)
    feeds = [{"x": rng.standard_normal((1, 1, 20, 20), np.float32), "y": rng.standard_normal((1, 1, 40, 40), np.float32)}]
    reference = verify.runtime.run_batches(verify.runtime.session(model), feeds)
    noise = verify.float_noise(model, feeds, reference, "test", seed=seed)
    assert 0.0 < noise[0] < 1e-5  # w moved by one step: a noise floor, not zero and not a shape change
    assert verify._sets_a_shape(model.graph.initializers["scales"])
    assert not verify._sets_a_shape(model.graph.initializers["w"])


def test_a_2_class_output_is_judged_by_its_decisions_too():
    """Softmax rows of 2 classes keep a cosine near 1 whatever the model decides: a cosine or mse bound
    also bounds the share of changed decisions (flipping 1 of 20 near-tie samples breaks 0.005)."""
    from onnxcompress.tolerance import Tolerance

    p = np.linspace(0.05, 0.45, 20)  # positive-class probabilities, all decided negative
    reference = [[np.array([[1 - q, q]])] for q in p]
    candidate = [[np.array([[1 - q, q]])] for q in p]
    candidate[-1] = [np.array([[0.49, 0.51]])]  # one near-tie sample crosses the threshold
    fidelity = verify.compare(reference, candidate, "test")
    assert fidelity.decisions_changed == pytest.approx(1 / 20)
    assert 1.0 - fidelity.cosine < 1e-3  # cosine alone would accept it
    for metric in ("cosine", "mse"):
        assert not Tolerance(metric, 0.005).accepts(fidelity)
        assert Tolerance(metric, 0.06).accepts(fidelity)
    assert "2-class decisions changed on 5.0%" in Tolerance("cosine", 0.005).format_value(fidelity)
    assert not Tolerance("top1", 0.005).accepts(fidelity) and Tolerance("sqnr", 10.0).accepts(fidelity)
    many = verify.compare([[np.array([[0.2, 0.5, 0.3]])]], [[np.array([[0.2, 0.3, 0.5]])]], "test")
    assert many.decisions_changed is None and many.top1_agreement == 0.0  # more classes: top1's business


def test_2_class_probabilities_are_compared_as_log_odds():
    """A pruned 2-class classifier that answers every sample with about the same low positive
    probability keeps all decisions and a cosine near 1 on the raw rows; on the log-odds it does not."""
    rng = np.random.default_rng(0)
    logit = rng.normal(-8.0, 3.0, 64)  # mostly negative samples, a real spread of confidence
    flat = np.full(64, -8.0) + rng.normal(0.0, 0.3, 64)  # the broken model: one answer for everything
    rows = lambda z: np.stack([1 / (1 + np.exp(z)), 1 / (1 + np.exp(-z))], axis=1)  # noqa: E731
    reference = [[rows(logit[i:i + 8])] for i in range(0, 64, 8)]
    broken = [[rows(flat[i:i + 8])] for i in range(0, 64, 8)]
    close = [[rows(logit[i:i + 8] + rng.normal(0.0, 0.05, 8))] for i in range(0, 64, 8)]
    raw_cosine = np.dot(rows(logit).ravel(), rows(flat).ravel()) / (np.linalg.norm(rows(logit)) * np.linalg.norm(rows(flat)))
    assert 1.0 - raw_cosine < 1e-3  # what the raw rows would say (measured 3.5e-4)
    bad, good = verify.compare(reference, broken, "test"), verify.compare(reference, close, "test")
    assert 1.0 - bad.cosine > 0.05 and bad.sqnr_db < 12.0  # measured: 0.059, 9.4 dB
    assert 1.0 - good.cosine < 1e-4 and good.sqnr_db > 40.0
    logits = verify.compare([[np.array([[2.0, -1.0]])]], [[np.array([[2.0, -1.5]])]], "test")
    assert logits.sqnr_db == pytest.approx(10 * np.log10(5.0 / 0.25))  # 2-class logits stay as they are

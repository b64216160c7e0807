"""PruneChannels: allocation, rounding, MAC targets, protection, and a report an outsider can check."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcompress import model as M
from onnxcompress.analysis.cost import analyze_cost
from onnxcompress.cli import main
from onnxcompress.errors import RecipeError
from onnxcompress.passes import PruneChannels
from onnxcompress.pipeline import PassContext, Pipeline
from onnxcompress.verify import VerifyOptions, outputs, random_feeds
from tests.graphs import conv_bn_relu_gemm

# Pruned vs masked: the same sums with the removed terms absent instead of multiplied by zero.
EXACT_RTOL = 1e-4


def _wide_model(channels: int = 32) -> ir.Model:
    return M.load(conv_bn_relu_gemm(channels=channels, classes=4, size=6))


def _prune(model: ir.Model, **options):
    p = PruneChannels(**options)
    return p.run(model, PassContext(model=model, input_shapes=M.resolve_input_shapes(model)))


def _conv_out(model: ir.Model, name: str) -> int:
    node = next(n for n in model.graph if n.name == name)
    return node.inputs[1].const_value.shape[0]


def test_uniform_ratio_with_rounding():
    model = _wide_model(32)
    result = _prune(model, ratio=0.3, round_to=8)
    # 32 channels, 30% -> remove 9 -> keep 23 -> rounded up to 24 kept.
    assert _conv_out(result.model, "conv1") == 24 and _conv_out(result.model, "conv2") == 24
    result = _prune(_wide_model(32), ratio=0.3, round_to=1)
    assert _conv_out(result.model, "conv1") == 23


def test_report_lists_removed_indices_an_outsider_can_verify():
    """Zeroing, in the original, the consumer weights of the reported indices reproduces the pruned model."""
    original = _wide_model(16)
    pruned = _prune(M.load(original), ratio=0.5, round_to=1)
    groups = {g["sources"][0]: g for g in pruned.record.details["groups"]}
    removed1, removed2 = groups["conv1"]["removed"], groups["conv2"]["removed"]
    assert len(removed1) == 8 and len(removed2) == 8
    masked = M.load(original)
    w2 = masked.graph.initializers["w2"].const_value.numpy().copy()
    w2[:, removed1] = 0
    masked.graph.initializers["w2"].const_value = ir.tensor(w2, name="w2")
    fc = masked.graph.initializers["fc_w"].const_value.numpy().copy()
    fc[:, removed2] = 0
    masked.graph.initializers["fc_w"].const_value = ir.tensor(fc, name="fc_w")
    feeds = random_feeds(original, {"x": (1, 3, 6, 6)}, count=3, seed=4)
    for ref, got in zip(outputs(masked, feeds, "masked"), outputs(pruned.model, feeds, "pruned")):
        np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=EXACT_RTOL * np.abs(ref[0]).max())


def test_lowest_l2_channels_are_removed():
    model = _wide_model(16)
    w1 = model.graph.initializers["w1"].const_value.numpy().copy()
    w1[[3, 7, 11, 12]] *= 1e-3  # make four filters tiny; their consumers' columns stay as they are
    model.graph.initializers["w1"].const_value = ir.tensor(w1, name="w1")
    result = _prune(model, ratio=0.25, round_to=1, importance="l2")
    group = next(g for g in result.record.details["groups"] if g["sources"] == ["conv1"])
    assert group["removed"] == [3, 7, 11, 12]


def test_target_macs_is_met():
    model = _wide_model(32)
    before = analyze_cost(model).stats.macs
    result = _prune(model, target_macs=0.5, round_to=1)
    after = analyze_cost(result.model).stats.macs
    assert after <= 0.5 * before
    assert after > 0.35 * before  # bisection stops near the target, not at the maximum ratio


def test_protected_layers_keep_their_channels():
    result = _prune(_wide_model(16), ratio=0.5, round_to=1, protect=("conv1",))
    assert _conv_out(result.model, "conv1") == 16 and _conv_out(result.model, "conv2") == 8


def test_global_allocation_respects_group_limit():
    """Importance is scale-free per layer, so a group with a few dominant channels has many weak ones:
    global ranking takes those first, up to the group's cap."""
    model = _wide_model(16)
    w2 = model.graph.initializers["w2"].const_value.numpy().copy()
    w2[2:] *= 1e-3  # conv2: two strong filters, fourteen negligible ones
    model.graph.initializers["w2"].const_value = ir.tensor(w2, name="w2")
    fc = model.graph.initializers["fc_w"].const_value.numpy().copy()
    fc[:, 2:] *= 1e-3
    model.graph.initializers["fc_w"].const_value = ir.tensor(fc, name="fc_w")
    result = _prune(model, ratio=0.4, allocation="global", round_to=1, max_group_ratio=0.75)
    groups = {g["sources"][0]: g for g in result.record.details["groups"]}
    assert len(groups["conv2"]["removed"]) == 12 and 0 not in groups["conv2"]["removed"]  # capped at 75% of 16
    # The budget is 40% of all 36 units (the 4 classifier outputs are frozen but count).
    assert len(groups["conv1"]["removed"]) + len(groups["conv2"]["removed"]) == int(0.4 * (16 + 16 + 4))


@pytest.mark.parametrize("options, message", [({"ratio": 1.2}, "ratio"), ({"target_macs": 0}, "target_macs"),
                                              ({"round_to": 0}, "round_to"), ({"importance": "magic"}, "one of")])
def test_invalid_options_are_recipe_errors(options, message):
    with pytest.raises(RecipeError, match=message):
        Pipeline.from_recipe([{"type": "prune-channels", **options}])


def test_pipeline_prunes_and_reports_fidelity():
    pipeline = Pipeline.from_recipe("prune")
    result = pipeline.run(conv_bn_relu_gemm(channels=32))
    record = result.report.passes[-1]
    assert record.name == "prune-channels" and record.modified
    assert record.after.macs < record.before.macs
    assert record.fidelity is not None and record.fidelity.cosine < 1.0
    assert record.details["blocked_reasons"] == ["reaches graph output 'logits'"]  # the classifier head


def test_cli_prune_flags(tmp_path, capsys):
    src, out, report = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "r.json"
    onnx.save(conv_bn_relu_gemm(channels=32, batch="N"), src)
    code = main(["optimize", str(src), "-o", str(out), "--prune", "0.5", "--round-to", "8", "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    prune = data["passes"][-1]
    assert prune["name"] == "prune-channels" and prune["details"]["ratio"] == 0.5
    assert data["after"]["macs"] < data["before"]["macs"] / 2
    onnx.checker.check_model(str(out), full_check=True)
    code = main(["optimize", str(src), "-o", str(out), "--prune", "1.5"])
    assert code == 2 and "ratio must be in [0, 1)" in capsys.readouterr().err


def test_verification_of_pruned_model_on_random_inputs_is_labelled():
    pipeline = Pipeline.from_recipe("prune")
    pipeline.verify = VerifyOptions(samples=2)
    report = pipeline.run(conv_bn_relu_gemm(channels=16)).report
    assert report.fidelity.inputs.startswith("random")


@pytest.mark.parametrize("importance", ["apoz", "activation"])
def test_activation_importance_removes_dead_channels(importance):
    """Channels whose ReLU output is always zero on the calibration data are the first to go."""
    from onnxcompress.calibration import Calibration

    model = _wide_model(16)
    dead = [1, 5, 9, 14]
    bn_beta = model.graph.initializers["bn1_beta"].const_value.numpy().copy()
    bn_beta[dead] = -1e3  # after BN and ReLU these channels are always 0
    model.graph.initializers["bn1_beta"].const_value = ir.tensor(bn_beta, name="bn1_beta")
    calib = Calibration.random(model, {"x": (1, 3, 6, 6)}, count=16, seed=2)
    p = PruneChannels(ratio=0.25, round_to=1, importance=importance)
    result = p.run(model, PassContext(model=model, calibration=calib, input_shapes={"x": (1, 3, 6, 6)}))
    group = next(g for g in result.record.details["groups"] if g["sources"] == ["conv1"])
    assert group["removed"] == dead


def test_output_importance_weighs_activations_by_the_weights_that_read_them():
    """A strong channel that the next layer reads with near-zero weights adds nothing to its output:
    "output" importance removes it first, where mean |activation| keeps it."""
    from onnxcompress.calibration import Calibration

    quiet = [2, 7, 11, 13]
    removed = {}
    for importance in ("output", "activation"):
        model = _wide_model(16)
        w2 = model.graph.initializers["w2"].const_value.numpy().copy()
        w2[:, quiet] *= 1e-4  # conv2 barely reads these input channels
        model.graph.initializers["w2"].const_value = ir.tensor(w2, name="w2")
        calib = Calibration.random(model, {"x": (1, 3, 6, 6)}, count=16, seed=2)
        p = PruneChannels(ratio=0.25, round_to=1, importance=importance)
        result = p.run(model, PassContext(model=model, calibration=calib, input_shapes={"x": (1, 3, 6, 6)}))
        removed[importance] = next(g for g in result.record.details["groups"] if g["sources"] == ["conv1"])["removed"]
    assert removed["output"] == quiet
    assert removed["activation"] != quiet


def test_activation_importance_needs_calibration():
    from onnxcompress.errors import OnnxCompressError

    model = _wide_model(16)
    with pytest.raises(OnnxCompressError, match="needs calibration data"):
        PruneChannels(importance="apoz").run(model, PassContext(model=model, input_shapes={"x": (1, 3, 6, 6)}))


def test_bn_importance_uses_batchnorm_scale_and_says_when_there_is_none():
    model = _wide_model(16)  # BatchNorm nodes still in the graph
    gamma = model.graph.initializers["bn1_gamma"].const_value.numpy().copy()
    gamma[[0, 6]] = 1e-4  # two channels scaled to nothing by their BN
    model.graph.initializers["bn1_gamma"].const_value = ir.tensor(gamma, name="bn1_gamma")
    result = _prune(model, ratio=0.125, round_to=1, importance="bn")
    group = next(g for g in result.record.details["groups"] if "conv1" in g["sources"])
    assert group["removed"] == [0, 6] and result.record.details["notes"] == []
    folded = Pipeline.from_recipe(["fold-batchnorm"]).run(conv_bn_relu_gemm(channels=16)).model
    result = _prune(folded, ratio=0.125, round_to=1, importance="bn")
    assert result.record.details["notes"] == ["importance 'bn': no BatchNormalization left (fold-batchnorm folds them); used l2"]

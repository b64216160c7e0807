"""Distill: the trained student keeps the interface and runs in ORT, its loss falls, its fidelity on
inputs it never trained on improves over the undistilled student, and a seed makes it reproducible."""

from __future__ import annotations

import dataclasses

import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")

from onnxcompress import Calibration, Pipeline, demo_data, load  # noqa: E402
from onnxcompress.errors import OnnxCompressError, RecipeError  # noqa: E402
from onnxcompress.model import to_proto  # noqa: E402
from onnxcompress.passes.distill import Distill, distill, parse_budget  # noqa: E402
from onnxcompress.passes.quantize import CalibrationNeededError  # noqa: E402
from onnxcompress.pipeline import build_pass  # noqa: E402
from onnxcompress.verify import VerifyOptions  # noqa: E402

#: Pruning to half the MACs without recovery leaves the digits CNN near chance; 40 distillation steps
#: (about 4 s on one idle thread) must lift agreement with the original on the test digits, which
#: distillation never sees, by at least this much (measured: 0.14 -> 0.66).
MIN_TEST_AGREEMENT_GAIN = 0.2
STEPS = 40
FAST = {"threads": 1, "lr": 1e-3, "progress": False}


@pytest.fixture(scope="module")
def digits():
    model = load(demo_data.demo_model_path())
    calibration = Calibration.from_arrays(model, demo_data.load_calibration(), "digits_calib.npz")
    return model, calibration


@pytest.fixture(scope="module")
def pruned(digits):
    """The digits CNN at half its MACs, magnitude-pruned with no recovery (the undistilled student)."""
    model, calibration = digits
    spec = ["fold-constants", "fold-batchnorm", "eliminate-noops",
            {"type": "prune-channels", "target_macs": 0.5, "recover": "none"}]
    pipeline = Pipeline.from_recipe(spec)
    pipeline.verify = VerifyOptions(enabled=False)
    return pipeline.run(model, calibration=calibration).model


@pytest.fixture(scope="module")
def distilled(digits, pruned):
    model, calibration = digits
    return distill(pruned, model, calibration, steps=STEPS, **FAST)


def _agreement(student, images) -> float:
    return float((demo_data.predict(student, images) == demo_data.predict(demo_data.demo_model_path(), images)).mean())


def test_heldout_fidelity_improves_over_the_undistilled_student(pruned, distilled):
    images, _ = demo_data.load_test_set()  # never part of the calibration data
    before, after = _agreement(pruned, images), _agreement(distilled.model, images)
    assert after >= before + MIN_TEST_AGREEMENT_GAIN
    fidelity = distilled.record.details["heldout_fidelity"]  # the held-out calibration samples, in ORT
    assert fidelity["after"]["top1_agreement"] > fidelity["before"]["top1_agreement"]
    assert fidelity["after"]["sqnr_db"] > fidelity["before"]["sqnr_db"]


def test_loss_decreases(distilled):
    details = distilled.record.details
    curve = details["loss_curve"]
    assert curve[-1]["train_loss"] < curve[1]["train_loss"]
    assert details["heldout_loss"]["after"] < details["heldout_loss"]["before"]
    assert details["steps"] == STEPS and details["fit_samples"] + details["heldout_samples"] == 256


def test_heldout_samples_are_whole_sources_when_labelled(digits, pruned):
    """Early stopping on crops of the photos it trains on would keep overfitting steps."""
    model, calibration = digits
    labelled = dataclasses.replace(calibration, sources=tuple(f"writer {i % 5}" for i in range(calibration.num_samples)))
    result = distill(pruned, model, labelled, steps=2, **FAST)
    details = result.record.details
    assert details["heldout_samples"] == sum(1 for i in range(calibration.num_samples) if i % 5 == 4)  # writer 4, whole
    assert details["fit_samples"] + details["heldout_samples"] == calibration.num_samples
    assert "1 source never fitted" in details["heldout_fidelity"]["before"]["inputs"]


def test_interface_kept_only_weights_change(pruned, distilled):
    before, after = to_proto(pruned), to_proto(distilled.model)
    assert after.graph.input == before.graph.input and after.graph.output == before.graph.output
    assert after.graph.node == before.graph.node
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    assert list(old) == list(new)
    assert all(old[n].shape == new[n].shape and old[n].dtype == new[n].dtype for n in old)
    assert any(not np.array_equal(old[n], new[n]) for n in old)
    onnx.checker.check_model(after, full_check=True)
    out = demo_data.predict(distilled.model, demo_data.load_test_set()[0][:8])  # runs in ORT
    assert out.shape == (8,)


def test_seed_gives_the_same_weights(digits, pruned):
    import torch

    model, calibration = digits
    torch.manual_seed(1234)
    caller_state = torch.get_rng_state()
    runs = [distill(pruned, model, calibration, steps=4, seed=3, **FAST).model for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), caller_state)  # the pass seeds its own run, not the caller's RNG
    other = distill(pruned, model, calibration, steps=4, seed=4, **FAST).model
    weights = [{n: v.const_value.numpy() for n, v in m.graph.initializers.items()} for m in (*runs, other)]
    assert all(np.array_equal(weights[0][n], weights[1][n]) for n in weights[0])
    assert any(not np.array_equal(weights[0][n], weights[2][n]) for n in weights[0])


def test_pipeline_prune_distill_quantize(digits):
    """The pass runs between pruning and int8 quantization; every step's fidelity is reported."""
    model, calibration = digits
    spec = ["fold-constants", "fold-batchnorm",
            {"type": "prune-channels", "target_macs": 0.7, "recover": "none"},
            {"type": "distill", "steps": 10, **FAST}, {"type": "quantize-int8", "samples": 32}]
    result = Pipeline.from_recipe(spec).run(model, calibration=calibration)
    names = [r.name for r in result.report.passes]
    assert names[-2:] == ["distill", "quantize-int8"] and result.report.passes[-2].modified
    assert all(r.fidelity is not None for r in result.report.passes)


def test_custom_loss_and_labelled_dataset(digits, pruned):
    model, _ = digits
    images, labels = demo_data.load_test_set()
    seen: list[set] = []

    def cross_entropy(student, teacher, batch):
        seen.append(set(batch))
        return torch.nn.functional.cross_entropy(student[0], batch["label"])

    result = distill(pruned, model, loss_fn=cross_entropy, dataset={"image": images, "label": labels}, steps=5, **FAST)
    assert seen and all(keys == {"image", "label"} for keys in seen)
    assert result.record.details["custom_loss"] and result.record.details["fit_samples"] == round(0.8 * len(images))


def test_feature_matching_uses_the_changed_layers(digits, pruned):
    model, calibration = digits
    result = distill(pruned, model, calibration, steps=3, feature_matching=True, **FAST)
    features = result.record.details["features_matched"]
    producers = {v.name: n for n in pruned.graph for v in n.outputs}
    assert features and all(producers[f].op_type in ("Conv", "Gemm", "MatMul") for f in features)


def test_batchnorm_statistics_frozen_by_default(digits):
    """Student = the unfolded digits CNN with one conv perturbed; BN statistics change only when asked."""
    model, calibration = digits
    student = load(model)
    conv = next(n for n in student.graph if n.op_type == "Conv")
    weight = conv.inputs[1]
    weight.const_value = ir.tensor(weight.const_value.numpy() * 0.7, name=weight.name)
    stats = {n.inputs[3].name for n in student.graph if n.op_type == "BatchNormalization"}
    for freeze in (True, False):
        out = distill(student, model, calibration, steps=3, freeze_norm=freeze, **FAST).model
        moved = [n for n in stats if not np.array_equal(out.graph.initializers[n].const_value.numpy(),
                                                        student.graph.initializers[n].const_value.numpy())]
        assert bool(moved) == (not freeze)


def test_unsupported_op_skips_with_a_reason(digits):
    model, calibration = digits
    proto = to_proto(load(model))
    out = proto.graph.output[0].name
    proto.graph.node.append(onnx.helper.make_node("CumSum", [out + "_pre", "axis_cs"], [out]))
    for node in proto.graph.node[:-1]:
        node.output[:] = [o + "_pre" if o == out else o for o in node.output]
    proto.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "axis_cs"))
    student = load(proto)
    result = distill(student, student, calibration, steps=3, **FAST)
    assert not result.modified and any("CumSum" in s for s in result.record.skipped)


def test_needs_calibration_data(digits, pruned):
    model, _ = digits
    with pytest.raises(CalibrationNeededError, match="calibration") as info:
        distill(pruned, model, steps=3)
    assert "\n" not in str(info.value)


def test_budget_parsing():
    assert parse_budget("500") == {"steps": 500}
    assert parse_budget("2m") == {"minutes": 2.0}
    assert parse_budget("90s") == {"minutes": 1.5}
    assert parse_budget("1.5min") == {"minutes": 1.5}
    for bad in ("", "abc", "0", "2h", "1.5"):
        with pytest.raises(OnnxCompressError):
            parse_budget(bad)


def test_recipe_options_and_api_only_fields():
    p = build_pass({"type": "distill", "steps": 5, "minutes": 1, "augment": "none", "holdout": 0.25})
    assert isinstance(p, Distill) and p.steps == 5 and p.minutes == 1.0
    assert "loss_fn" not in p.options() and "dataset" not in p.options()
    assert build_pass({"type": "distill", **p.options()}) == p
    with pytest.raises(RecipeError, match="loss_fn"):
        build_pass({"type": "distill", "loss_fn": "mse"})
    with pytest.raises(RecipeError, match="holdout"):
        build_pass({"type": "distill", "holdout": 1.0})


def test_missing_torch_is_one_line(monkeypatch):
    monkeypatch.delitem(sys.modules, "onnxcompress.torch_graph", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(OnnxCompressError, match=r"pip install onnxcompress\[torch\]") as info:
        import onnxcompress.torch_graph  # noqa: F401
    assert "\n" not in str(info.value)

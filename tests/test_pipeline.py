"""Pipeline contract: recipes build passes from the same dataclasses, every pass is verified, reports are data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress import model as M
from onnxcompress.calibration import Calibration, CalibrationError
from onnxcompress.errors import RecipeError, VerificationError
from onnxcompress.passes import FoldBatchNorm
from onnxcompress.pipeline import Pass, PassContext, Pipeline, build_pass, cost_analysis, load_recipe
from onnxcompress.verify import VerifyOptions
from tests.graphs import conv_bn_relu_gemm, two_inputs


@dataclass
class _ScaleOutput(Pass):
    """Test pass: multiplies the classifier weight by `factor` (a lossy change when factor != 1)."""

    name: ClassVar[str] = "test-scale-output"
    factor: float = 1.0
    mode: Literal["weight", "break"] = "weight"

    def run(self, model: ir.Model, ctx: PassContext):
        fc = model.graph.initializers["fc_w"]
        if self.mode == "break":  # a shape the Gemm cannot consume: the checker must catch it
            fc.const_value = ir.tensor(np.ones((3, 3), np.float32), name="fc_w")
            fc.shape = ir.Shape([3, 3])
        else:
            fc.const_value = ir.tensor(fc.const_value.numpy() * self.factor, name="fc_w")
        return self.result(model, changes=[f"fc_w scaled by {self.factor}"])


@dataclass
class _LossyScale(_ScaleOutput):
    name: ClassVar[str] = "test-lossy-scale"
    exact: ClassVar[bool] = False


def test_recipe_builds_passes_with_typed_options():
    pipeline = Pipeline.from_recipe({"passes": [{"type": "fold-constants", "max_tensor_mb": 16},
                                                "fold-batchnorm", {"type": "test-scale-output", "factor": 2}],
                                     "verify": {"samples": 2, "rtol": 1e-3}})
    assert [p.name for p in pipeline.passes] == ["fold-constants", "fold-batchnorm", "test-scale-output"]
    assert pipeline.passes[0].max_tensor_mb == 16.0 and isinstance(pipeline.passes[2].factor, float)
    assert pipeline.verify == VerifyOptions(samples=2, rtol=1e-3)


@pytest.mark.parametrize("spec, message", [
    ({"passes": []}, "non-empty 'passes'"),
    ({"passes": [{"type": "nope"}]}, "unknown pass type 'nope'"),
    ({"passes": [{"factor": 2}]}, "needs a 'type'"),
    ({"passes": [{"type": "fold-constants", "bogus": 1}]}, "unknown option 'bogus'"),
    ({"passes": [{"type": "fold-constants", "max_tensor_mb": "big"}]}, "must be a number"),
    ({"passes": [{"type": "fold-constants", "keep_initializer_inputs": "yes"}]}, "true or false"),
    ({"passes": [{"type": "test-scale-output", "mode": "other"}]}, "must be one of weight, break"),
    ({"passes": ["fold-batchnorm"], "extra": 1}, "unknown top-level key 'extra'"),
    ({"passes": ["fold-batchnorm"], "verify": {"samples": "many"}}, "must be an integer"),
])
def test_invalid_recipes_raise_recipe_error(spec, message):
    with pytest.raises(RecipeError, match=message):
        Pipeline.from_recipe(spec)


def test_recipe_files_and_names(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("passes:\n  - type: fold-batchnorm\n")
    assert [p.name for p in Pipeline.from_recipe(path).passes] == ["fold-batchnorm"]
    assert [p.name for p in Pipeline.from_recipe("cleanup").passes] == ["fold-constants", "fold-batchnorm",
                                                                         "eliminate-noops"]
    path.write_text("passes: [a, b\n")
    with pytest.raises(RecipeError, match="invalid YAML at line"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_run_reports_each_pass_with_stats_and_fidelity():
    proto = conv_bn_relu_gemm()
    result = Pipeline.from_recipe("cleanup").run(proto)
    report = result.report
    assert [p.name for p in report.passes] == ["fold-constants", "fold-batchnorm", "eliminate-noops"]
    assert report.passes[1].before.op_counts["BatchNormalization"] == 2
    assert "BatchNormalization" not in report.passes[1].after.op_counts
    assert report.after.macs == report.before.macs  # folding removes no MACs of Conv/Gemm
    assert report.fidelity.max_rel_error < 1e-5 and report.fidelity.inputs == "random (seed 0)"
    assert any("--calib" in n for n in report.notes)
    data = json.loads(report.to_json())
    assert set(data["before"]) >= {"params", "macs", "flops", "weight_bytes", "activation_bytes", "op_counts"}
    assert data["passes"][1]["changes"] and data["passes"][1]["fidelity"]["samples"] == 4


def test_input_model_is_never_modified():
    proto = conv_bn_relu_gemm()
    before = proto.SerializeToString()
    ir_model = M.load(proto)
    Pipeline.from_recipe("cleanup").run(ir_model)
    Pipeline.from_recipe("cleanup").run(proto)
    assert proto.SerializeToString() == before
    assert "BatchNormalization" in [n.op_type for n in ir_model.graph]


def test_exact_pass_that_changes_outputs_fails_verification_with_its_name():
    with pytest.raises(VerificationError, match="pass 'test-scale-output': outputs changed beyond tolerance"):
        Pipeline([_ScaleOutput(factor=1.5)]).run(conv_bn_relu_gemm())


def test_lossy_pass_is_measured_not_rejected():
    unchanged = Pipeline([_LossyScale(factor=1.0)]).run(conv_bn_relu_gemm()).report.fidelity
    scaled = Pipeline([_LossyScale(factor=1.5)]).run(conv_bn_relu_gemm()).report.fidelity
    assert unchanged.max_abs_error == 0.0 and unchanged.sqnr_db == float("inf")
    assert scaled.max_rel_error > 0.05 and scaled.sqnr_db < 40


def test_fidelity_is_measured_on_sources_no_pass_fitted():
    from onnxcompress.calibration import SAMPLE_SOURCE_KEY

    model = M.load(conv_bn_relu_gemm())
    x = np.random.default_rng(1).normal(size=(20, 3, 8, 8)).astype(np.float32)
    labels = np.array(["a", "b", "c", "d", "e"] * 4)
    calib = Calibration.from_arrays(model, {"x": x, SAMPLE_SOURCE_KEY: labels})
    fidelity = Pipeline([_LossyScale(factor=1.5)]).run(model, calibration=calib).report.fidelity
    assert "1 source never fitted" in fidelity.inputs and fidelity.samples == 4  # source "e", held out whole


def test_broken_model_fails_the_checker_with_pass_name():
    with pytest.raises(VerificationError, match="pass 'test-scale-output'"):
        Pipeline([_ScaleOutput(mode="break")]).run(conv_bn_relu_gemm())


def test_verification_can_be_disabled():
    result = Pipeline([_ScaleOutput(factor=1.5)], verify=VerifyOptions(enabled=False)).run(conv_bn_relu_gemm())
    assert not result.report.verified and result.report.fidelity is None


def test_calibration_data_drives_verification(tmp_path):
    proto = conv_bn_relu_gemm()
    data = np.random.default_rng(5).normal(size=(6, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=data)
    model = M.load(proto)
    calib = Calibration.from_path(model, tmp_path / "calib.npz")
    assert calib.num_samples == 6
    result = Pipeline.from_recipe("cleanup").run(proto, calibration=calib)
    # The last samples are used: recovery holds out the end of the calibration set.
    assert result.report.fidelity.inputs == "calib.npz (last 4 samples)" and result.report.fidelity.samples == 4
    assert not any("--calib" in n for n in result.report.notes)


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((2, 3, 9, 8), np.float32)}, "dim 2 must be 8"),
    ({"x": np.zeros((3, 8, 8), np.float32)}, "needs rank 4"),
    ({"x": np.zeros((2, 3, 8, 8), np.complex64)}, "needs float32"),
    ({"x": np.zeros((0, 3, 8, 8), np.float32)}, "no samples"),
])
def test_calibration_shape_checks(arrays, message):
    with pytest.raises(CalibrationError, match=message):
        Calibration.from_arrays(M.load(conv_bn_relu_gemm()), arrays)


def test_calibration_needs_every_input_of_a_multi_input_model():
    model = M.load(two_inputs())
    with pytest.raises(CalibrationError, match="no data for model input 'b'"):
        Calibration.from_arrays(model, {"a": np.zeros((2, 4), np.float32), "c": np.zeros((2, 4), np.float32)})
    with pytest.raises(CalibrationError, match="one array given but the model has 2 inputs"):
        Calibration.from_arrays(model, np.zeros((2, 4), np.float32))


def test_calibration_split_and_batches():
    model = M.load(conv_bn_relu_gemm())
    calib = Calibration.from_arrays(model, np.arange(10 * 3 * 8 * 8, dtype=np.float32).reshape(10, 3, 8, 8))
    fit, held = calib.split(0.2)
    assert (fit.num_samples, held.num_samples) == (8, 2)
    np.testing.assert_array_equal(held.arrays["x"], calib.arrays["x"][8:])
    sizes = [len(b["x"]) for b in calib.batches(4)]
    assert sizes == [4, 4, 2]


def test_held_out_samples_are_whole_sources_when_sources_are_labelled(tmp_path):
    """Crops of a fitted photo overstate fidelity on other photos: labelled sources are held out whole."""
    from onnxcompress.calibration import SAMPLE_SOURCE_KEY

    model = M.load(conv_bn_relu_gemm())
    x = np.random.default_rng(0).normal(size=(20, 3, 8, 8)).astype(np.float32)
    labels = np.array(["a", "b", "c", "d", "e"] * 4)  # interleaved, as crops of 5 photos often are
    np.savez(tmp_path / "calib.npz", x=x, **{SAMPLE_SOURCE_KEY: labels})
    calib = Calibration.from_path(model, tmp_path / "calib.npz")
    assert calib.source_count == 5 and calib.num_samples == 20
    fit, held = calib.split(0.25)  # 5 samples asked: one source of 4 is closest
    assert (fit.num_samples, held.num_samples) == (16, 4)
    assert set(held.sources) == {"e"} and "e" not in set(fit.sources)
    np.testing.assert_array_equal(held.arrays["x"], x[labels == "e"])
    np.testing.assert_array_equal(fit.arrays["x"], x[labels != "e"])
    assert "1 source never fitted" in held.source
    fit, held = calib.split(0.45)  # 9 asked: two sources (8) are closer than one (4) or three (12)
    assert set(held.sources) == {"d", "e"} and held.num_samples == 8
    fit, held = Calibration.from_arrays(model, {"x": x, SAMPLE_SOURCE_KEY: np.zeros(20, int)}).split(0.2)
    assert held.num_samples == 4 and "one source" in held.source  # one source: samples from the end, said so
    with pytest.raises(CalibrationError, match="one label"):
        Calibration.from_arrays(model, {"x": x, SAMPLE_SOURCE_KEY: np.zeros((20, 2))})
    with pytest.raises(CalibrationError, match="19 source labels for 20 samples"):
        Calibration.from_arrays(model, {"x": x, SAMPLE_SOURCE_KEY: labels[:19]})


def test_context_caches_analyses_until_invalidated():
    calls = []

    def analysis(model, ctx):
        calls.append(1)
        return len(calls)

    ctx = PassContext(model=M.load(conv_bn_relu_gemm()))
    assert ctx.get(analysis) == ctx.get(analysis) == 1
    ctx.invalidate(frozenset({analysis}))
    assert ctx.get(analysis) == 1
    ctx.invalidate()
    assert ctx.get(analysis) == 2
    assert ctx.get(cost_analysis).stats.macs > 0


def test_build_pass_by_name():
    assert isinstance(build_pass("fold-batchnorm"), FoldBatchNorm)

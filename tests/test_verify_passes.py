"""Verification after each pass: a pass that reports no change is not verified again, and a model
read from a file is run from that file while it is unchanged (no temporary copy of it is written)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from rich.console import Console

import onnxcompress as oc
from onnxcompress import model as M
from onnxcompress import verify
from onnxcompress.passes import FoldBatchNorm
from onnxcompress.pipeline import Pass, PassContext, Pipeline
from onnxcompress.render import render_run
from tests.graphs import conv_bn_relu_gemm


@dataclass
class _Untouched(Pass):
    """Test pass that looks at the model and changes nothing."""

    name: ClassVar[str] = "test-untouched"

    def run(self, model: ir.Model, ctx: PassContext):
        return self.result(model, skipped=["nothing to do"])


@dataclass
class _Scale(Pass):
    """Test pass: scales the classifier weight (a lossy change)."""

    name: ClassVar[str] = "test-scale"
    exact: ClassVar[bool] = False

    def run(self, model: ir.Model, ctx: PassContext):
        fc = model.graph.initializers["fc_w"]
        fc.const_value = ir.tensor(fc.const_value.numpy() * np.float32(1.5), name="fc_w")
        return self.result(model, changes=["fc_w scaled by 1.5"])


@pytest.fixture
def verified(monkeypatch) -> list[str]:
    """The `where` of every verify_model call."""
    calls: list[str] = []
    real = verify.verify_model

    def counting(model, where, *args, **kwargs):
        calls.append(where)
        return real(model, where, *args, **kwargs)

    monkeypatch.setattr(verify, "verify_model", counting)
    return calls


def test_a_pass_that_reports_no_change_is_not_verified_again(verified):
    report = Pipeline([_Untouched(), _Scale(), _Untouched()]).run(conv_bn_relu_gemm()).report
    assert verified == ["pass 'test-scale'"]
    first, scaled, last = report.passes
    assert [p.verification_skipped for p in report.passes] == [verify.UNCHANGED, None, verify.UNCHANGED]
    # Before any change the model is the input: its fidelity against itself.
    assert first.fidelity.max_abs_error == 0.0 and first.fidelity.sqnr_db == float("inf") and first.fidelity.samples == 4
    assert scaled.fidelity.max_rel_error > 0.05  # the change was measured
    assert last.fidelity == scaled.fidelity == report.fidelity  # the same model as after the scaling
    data = json.loads(report.to_json())
    assert [p["verification_skipped"] for p in data["passes"]] == [verify.UNCHANGED, None, verify.UNCHANGED]
    console = Console(record=True, width=200)
    render_run(console, report)
    lines = console.export_text().splitlines()
    marks = [i for i, line in enumerate(lines) if "not verified again" in line]
    starts = [i for i, line in enumerate(lines) if line.startswith("  test-")]
    assert marks == [starts[0] + 1, starts[2] + 1]  # right under each unchanged pass, and only there


@pytest.fixture
def opened(monkeypatch) -> tuple[list, list]:
    """The targets of every model.save, and the source of every ORT session (a path or "bytes")."""
    saved, sessions = [], []
    real_save, real_session = M.save, ort.InferenceSession

    def counting_save(model, target, **kwargs):
        saved.append(target)
        return real_save(model, target, **kwargs)

    def counting_session(source, *args, **kwargs):
        sessions.append(source if isinstance(source, str) else "bytes")
        return real_session(source, *args, **kwargs)

    monkeypatch.setattr(M, "save", counting_save)
    monkeypatch.setattr(ort, "InferenceSession", counting_session)
    return saved, sessions


def test_a_model_on_disk_is_run_from_its_file_while_unchanged(tmp_path, opened):
    """Sessions on the unchanged input (the reference, the float noise without graph optimizations)
    read the input's own file; temporary models are written only for what differs from it: the
    model with nudged weights (float noise) and the model the exact pass changed."""
    path = oc.save(M.load(conv_bn_relu_gemm()), tmp_path / "model.onnx", external_data=True)
    assert M.external_tensors(M.load(path))  # the weights really are outside the model file
    saved, sessions = opened
    report = Pipeline([_Untouched(), FoldBatchNorm(), _Untouched()]).run(path).report
    assert [p.modified for p in report.passes] == [False, True, False]
    assert sessions.count(str(path)) == 2  # the reference and the unoptimized float-noise run
    assert "bytes" not in sessions  # a model with external data never goes to ORT serialized
    assert len(saved) == 2 and str(path) not in map(str, saved)  # nudged weights, folded model
    assert len(sessions) == 4  # and one session on each of those two files


def test_a_large_model_in_memory_reaches_ort_through_a_file(opened, monkeypatch):
    """Serialized, its weights would be in memory three more times: above FILE_SESSION_BYTES (here
    lowered to 0) every verification session reads a temporary file with external data."""
    saved, sessions = opened
    small = Pipeline([FoldBatchNorm()]).run(conv_bn_relu_gemm()).report
    assert "bytes" in sessions  # the small test model itself goes as bytes by default
    saved.clear()
    sessions.clear()
    monkeypatch.setattr(verify, "FILE_SESSION_BYTES", 0)
    large = Pipeline([FoldBatchNorm()]).run(conv_bn_relu_gemm()).report
    assert "bytes" not in sessions and len(sessions) == 4  # reference, 2 float-noise runs, the folded model
    assert len(saved) == 4  # each through its own temporary file
    assert large.fidelity == small.fidelity  # the same outputs, bit for bit

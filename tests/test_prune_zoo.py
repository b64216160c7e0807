"""Pruning every torch-built architecture family, from both exporters: exact against masking, and valid at 50%."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from onnxcompress.analysis.channels import ChannelGraph, prepare  # noqa: E402
from onnxcompress.passes.prune import keep_every_value_nonempty  # noqa: E402
from onnxcompress.pipeline import Pipeline  # noqa: E402
from onnxcompress.verify import VerifyOptions  # noqa: E402
from tests.exactness import assert_prune_is_exact  # noqa: E402
from tests import zoo  # noqa: E402

CASES = [pytest.param(name, dynamo, id=f"{name}-{'dynamo' if dynamo else 'torchscript'}")
         for name, dynamo in zoo.export_cases()]


def _cleaned(tmp_path_factory, name: str, dynamo: bool):
    pipeline = Pipeline.from_recipe("cleanup")
    pipeline.verify = VerifyOptions(enabled=False)
    return pipeline.run(zoo.exported(tmp_path_factory, name, dynamo=dynamo)).model


@pytest.mark.parametrize("name, dynamo", CASES)
def test_random_pruning_equals_masking(tmp_path_factory, name, dynamo):
    model = prepare(_cleaned(tmp_path_factory, name, dynamo))
    graph = ChannelGraph.build(model)
    rng = np.random.default_rng(0)
    halves = {c for g in graph.groups for c in rng.permutation(g.prunable)[: len(g.prunable) // 2]}
    removed = keep_every_value_nonempty(graph, halves, {})  # a split branch may not lose all its channels
    assert removed, "every family has prunable channels"
    assert_prune_is_exact(graph, removed, seed=1)


@pytest.mark.parametrize("name, dynamo", CASES)
def test_half_pruning_gives_a_valid_model(tmp_path_factory, name, dynamo):
    """The pipeline checks (full checker), loads in ORT and measures fidelity after pruning at 0.5."""
    pipeline = Pipeline.from_recipe([{"type": "prune-channels", "ratio": 0.5, "round_to": 1}])
    pipeline.verify = VerifyOptions(samples=1)
    result = pipeline.run(_cleaned(tmp_path_factory, name, dynamo))
    record = result.report.passes[-1]
    assert record.modified and record.after.macs < record.before.macs
    details = record.details
    assert 0.0 <= details["blocked_fraction"] < 1.0
    assert all(isinstance(r, str) and r for r in details["blocked_reasons"])


@pytest.mark.parametrize("name", ["vit", "resnet_basic", "yolo_c2f"])
def test_dynamic_batch_exports_prune_exactly(tmp_path_factory, name):
    """Dynamic-batch TorchScript exports build Reshape shapes at run time (batch from Shape, channel
    dims as constants in a Concat): the constant entries are traced and updated."""
    pipeline = Pipeline.from_recipe("cleanup")
    pipeline.verify = VerifyOptions(enabled=False)
    path = zoo.exported(tmp_path_factory, name, dynamo=False, dynamic_batch=True)
    graph = ChannelGraph.build(prepare(pipeline.run(path).model))
    halves = {c for g in graph.groups for c in g.prunable[: len(g.prunable) // 2]}
    removed = keep_every_value_nonempty(graph, halves, {})
    assert removed
    assert_prune_is_exact(graph, removed, seed=2)

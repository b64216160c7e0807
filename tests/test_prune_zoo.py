"""Pruning every torch-built architecture family, from both exporters: exact against masking, and valid at 50%."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from onnxcompress.analysis.channels import ChannelGraph, prepare  # noqa: E402
from onnxcompress.analysis.cost import analyze_cost  # noqa: E402
from onnxcompress.analysis.pruned_macs import PrunedMacs  # noqa: E402
from onnxcompress.analysis.shapes import infer_shapes  # noqa: E402
from onnxcompress.model import load, resolve_input_shapes  # noqa: E402
from onnxcompress.passes import prune as prune_module  # noqa: E402
from onnxcompress.passes.prune import PruneChannels, keep_every_value_nonempty  # noqa: E402
from onnxcompress.pipeline import PassContext, Pipeline  # noqa: E402
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


@pytest.mark.parametrize("name, dynamo, dynamic_batch", [
    *[(*case.values, False) for case in CASES],
    *[(name, False, True) for name in ("vit", "resnet_basic", "yolo_c2f")],  # Reshape shapes built at run time
])
def test_pruned_mac_estimates_equal_costing_the_pruned_model(tmp_path_factory, name, dynamo, dynamic_batch):
    """What the MAC-target search computes per decision (analysis/pruned_macs.py) is what
    `analyze_cost` says of the model pruned by that decision."""
    pipeline = Pipeline.from_recipe("cleanup")
    pipeline.verify = VerifyOptions(enabled=False)
    path = zoo.exported(tmp_path_factory, name, dynamo=dynamo, dynamic_batch=dynamic_batch)
    model = prepare(pipeline.run(path).model)
    graph = ChannelGraph.build(model)
    estimate = PrunedMacs.of(graph, infer_shapes(model))
    assert estimate is not None
    rng = np.random.default_rng(3)
    for share in (0.0, 0.3, 0.7):
        picked = {c for g in graph.groups for c in rng.permutation(g.prunable)[: int(share * len(g.prunable))]}
        removed = keep_every_value_nonempty(graph, picked, {})
        trial = load(model)
        ChannelGraph.build(trial).prune(removed)
        assert estimate.macs(removed) == analyze_cost(trial).stats.macs


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_mac_target_search_keeps_the_channels_pruned_copies_keep(tmp_path_factory, monkeypatch, allocation):
    """A small ResNet-50: the search with computed MACs ends where pruning and costing a copy at
    every bisection step ends (same ratio, same channels, same MACs)."""
    path = tmp_path_factory.mktemp("resnet50") / "resnet50.onnx"
    module, inputs = zoo.resnet50(width=8, image_size=32, num_classes=10)
    zoo.export_module(module, inputs, path, dynamo=False)
    pipeline = Pipeline.from_recipe("cleanup")
    pipeline.verify = VerifyOptions(enabled=False)
    cleaned = pipeline.run(path).model

    def search(by_copies: bool) -> dict:
        if by_copies:
            monkeypatch.setattr(prune_module, "_pruned_macs", lambda graph, input_shapes: None)
        model = load(cleaned)
        result = PruneChannels(target_macs=0.5, allocation=allocation, recover="none").run(
            model, PassContext(model=model, input_shapes=resolve_input_shapes(model)))
        monkeypatch.undo()
        details = result.record.details
        return {"ratio": details["ratio"], "removed": [g["removed"] for g in details["groups"]],
                "macs": analyze_cost(result.model).stats.macs}

    fast, slow = search(by_copies=False), search(by_copies=True)
    assert fast == slow
    assert fast["macs"] <= 0.5 * analyze_cost(cleaned).stats.macs

"""MACs of pruning decisions computed from the channel graph (analysis/pruned_macs.py) equal
`analyze_cost` of the really pruned model, and the MAC-target search finds the same channels with
them as by pruning and costing a copy at every bisection step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxcompress.analysis.channels import ChannelGraph, prepare
from onnxcompress.analysis.cost import analyze_cost
from onnxcompress.analysis.pruned_macs import PrunedMacs
from onnxcompress.analysis.shapes import infer_shapes
from onnxcompress.model import load, resolve_input_shapes
from onnxcompress.passes import prune as prune_module
from onnxcompress.passes.prune import PruneChannels, keep_every_value_nonempty
from onnxcompress.pipeline import PassContext
from tests.graphs import conv_bn_relu_gemm
from tests.randgraphs import RandomGraph, cnn_graphs, transformer_graphs

IF_VAD = Path(__file__).parent / "newcomer" / "if_vad.onnx"


def _really_pruned_macs(model, removed: set[int], input_shapes=None) -> int:
    trial = load(model)
    ChannelGraph.build(trial, input_shapes).prune(removed)
    return analyze_cost(trial, input_shapes).stats.macs


def _removals(graph: ChannelGraph, seed: int) -> list[set[int]]:
    """Nothing, about a quarter, about half and most of every group's prunable classes, at random."""
    rng = np.random.default_rng(seed)
    found = []
    for share in (0.0, 0.25, 0.5, 0.9):
        picked = {c for g in graph.groups for c in rng.permutation(g.prunable)[: int(share * len(g.prunable))]}
        found.append(keep_every_value_nonempty(graph, picked, {}))
    return found


def _assert_estimates_are_exact(model, input_shapes=None, seed: int = 0) -> None:
    model = prepare(load(model))
    graph = ChannelGraph.build(model, input_shapes)
    estimate = PrunedMacs.of(graph, infer_shapes(model, input_shapes))
    assert estimate is not None
    for removed in _removals(graph, seed):
        assert estimate.macs(removed) == _really_pruned_macs(model, removed, input_shapes)


def test_small_cnn_estimates_equal_costing_the_pruned_model():
    model = load(conv_bn_relu_gemm(channels=16, classes=4, size=6))
    _assert_estimates_are_exact(model)
    graph = ChannelGraph.build(prepare(load(model)))
    estimate = PrunedMacs.of(graph, graph.shapes)
    assert estimate.macs(()) == analyze_cost(model).stats.macs
    some = {c for g in graph.groups for c in g.prunable[:4]}
    assert estimate.macs(some) < estimate.macs(())


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(cnn_graphs(), st.integers(0, 2**16))
def test_random_cnn_estimates_equal_costing_the_pruned_model(graph: RandomGraph, seed: int):
    _assert_estimates_are_exact(graph.model, graph.input_shapes, seed)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(transformer_graphs(), st.integers(0, 2**16))
def test_random_transformer_estimates_equal_costing_the_pruned_model(graph: RandomGraph, seed: int):
    _assert_estimates_are_exact(graph.model, graph.input_shapes, seed)


def test_models_with_subgraphs_are_left_to_pruned_copies():
    model = prepare(load(IF_VAD))
    shapes = {"input": (1, 64), "state": (1, 32), "sr": ()}
    graph = ChannelGraph.build(model, shapes)
    assert PrunedMacs.of(graph, infer_shapes(model, shapes)) is None


def _search(model, monkeypatch, by_copies: bool, **options) -> dict:
    if by_copies:
        monkeypatch.setattr(prune_module, "_pruned_macs", lambda graph, input_shapes: None)
    model = load(model)
    result = PruneChannels(recover="none", **options).run(
        model, PassContext(model=model, input_shapes=resolve_input_shapes(model)))
    monkeypatch.undo()
    details = result.record.details
    return {"ratio": details["ratio"], "groups": [g["removed"] for g in details["groups"]],
            "macs": analyze_cost(result.model).stats.macs}


@pytest.mark.parametrize("options", [
    {"target_macs": 0.5, "round_to": 1},
    {"target_macs": 0.4, "round_to": 4, "allocation": "global"},
    {"target_macs": 0.05, "round_to": 1},  # out of reach: prunes as far as allowed
])
def test_target_search_keeps_the_channels_pruned_copies_keep(monkeypatch, options):
    model = conv_bn_relu_gemm(channels=24, classes=4, size=6)
    fast = _search(model, monkeypatch, by_copies=False, **options)
    slow = _search(model, monkeypatch, by_copies=True, **options)
    assert fast == slow
    assert any(fast["groups"])

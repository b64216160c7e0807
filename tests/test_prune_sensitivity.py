"""Allocation "sensitivity" of prune-channels: measured per-group error curves and the greedy split."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress import model as M
from onnxcompress.analysis.channels import ChannelGraph, prepare
from onnxcompress.calibration import Calibration
from onnxcompress.errors import OnnxCompressError
from onnxcompress.passes import PruneChannels
from onnxcompress.passes.prune_sensitivity import Curve, _relative_error, allocate, measure_curves
from onnxcompress.pipeline import PassContext
from onnxcompress.verify import outputs
from tests.graphs import conv_bn_relu_gemm

SHAPES = {"x": (1, 3, 6, 6)}


def _model(channels: int = 16) -> ir.Model:
    return prepare(M.load(conv_bn_relu_gemm(channels=channels, classes=4, size=6)))


def test_a_closed_gate_measures_exactly_what_masking_the_channels_does():
    model = _model()
    graph = ChannelGraph.build(model, SHAPES)
    calib = Calibration.random(model, SHAPES, count=6, seed=1)
    scores = graph.importance("l2")
    candidates = {g.id: sorted(g.prunable, key=lambda c: scores.get(c, 0.0)) for g in graph.groups}
    limits = {g.id: len(g.classes) - 1 for g in graph.groups}
    curves = measure_curves(model, graph, candidates, calib, limits=limits, macs={}, round_to=1)
    assert len(curves) == 2  # conv1's and conv2's channels
    feeds = [f for f in calib.batches(1)]
    reference = outputs(model, feeds, "original")
    for curve in curves.values():
        assert curve.counts == (0, 4, 8, 12) and curve.errors[0] == 0.0
        for k, error in zip(curve.counts[1:], curve.errors[1:]):
            masked = outputs(graph.mask(curve.order[:k]), feeds, "masked")
            assert error == pytest.approx(_relative_error(reference, masked), rel=1e-5)
        assert curve.errors[-1] > 0  # the gates really closed


def _curve(errors, macs_per_class=1.0, step=4):
    """A measured curve: `errors` after removing step, 2 step, ... classes."""
    counts = tuple(range(0, step * (len(errors) + 1), step))
    return Curve(order=tuple(range(counts[-1])), macs=(macs_per_class,) * counts[-1], counts=counts, errors=(0.0, *errors))


def test_the_greedy_split_takes_from_the_group_whose_error_per_mac_is_least():
    curves = {"quiet": _curve([0.01, 0.02]), "loud": _curve([1.0, 2.0])}
    assert allocate(curves, saving=6, step=2) == {"quiet": 6, "loud": 0}
    # once the quiet group has nothing left, the loud one pays the rest
    assert allocate(curves, saving=10, step=2) == {"quiet": 8, "loud": 2}
    # a costly layer whose MACs are many can still be the better buy per MAC
    curves = {"small": _curve([0.1, 0.2], macs_per_class=1.0), "big": _curve([0.3, 0.6], macs_per_class=10.0)}
    assert allocate(curves, saving=20, step=2) == {"small": 0, "big": 2}


def test_sensitivity_prunes_more_where_the_output_notices_less():
    model = _model()
    w2 = model.graph.initializers["w2"].const_value.numpy().copy()
    w2 *= 1e-3  # conv2 barely reads conv1's channels: they matter little to the output
    model.graph.initializers["w2"].const_value = ir.tensor(w2, name="w2")
    calib = Calibration.random(model, SHAPES, count=8, seed=2)
    removed = {}
    for allocation in ("uniform", "sensitivity"):
        copy = M.load(model)
        p = PruneChannels(ratio=0.25, round_to=1, allocation=allocation, importance="l2", recover="none")
        record = p.run(copy, PassContext(model=copy, calibration=calib, input_shapes=SHAPES)).record
        removed[allocation] = {g["sources"][0]: len(g["removed"]) for g in record.details["groups"]}
    assert removed["uniform"] == {"conv1": 4, "conv2": 4, "fc": 0}
    assert removed["sensitivity"]["conv1"] > 4 and removed["sensitivity"]["conv2"] < 4
    assert [s["counts"] for s in record.details["sensitivity"]] == [[0, 4, 8, 12]] * 2


def test_sensitivity_needs_calibration():
    model = _model()
    with pytest.raises(OnnxCompressError, match="needs calibration data"):
        PruneChannels(allocation="sensitivity").run(model, PassContext(model=model, input_shapes=SHAPES))

"""Helpers every channel rule uses: node attributes, constant operands, axes; `blocker` and
`no_channels`, the two rules that need no reading of the node."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from ..channel_tracking import ChannelTracker

#: A channel rule: reads `node`'s input layouts from `g`, writes its outputs' (analysis/channel_tracking.py).
Rule = Callable[[ChannelTracker, ir.Node], None]


def attr_int(node: ir.Node, name: str, default: int) -> int:
    return node.attributes.get_int(name, default)


def const_data(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant data, or None when it is computed or fed (a graph input with a default)."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def blocker(reason: str) -> Rule:
    """A rule that blocks every tracked channel reaching the node, saying `reason`."""

    def rule(g: ChannelTracker, node: ir.Node) -> None:
        g.block_inputs(node, f"{node.op_type} at node {node.name}: {reason}")

    return rule


def no_channels(g: ChannelTracker, node: ir.Node) -> None:
    """Ops whose output carries no channels of their input (Shape, Size, ...): nothing to track."""

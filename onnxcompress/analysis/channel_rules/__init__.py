"""One small rule per op type: how a node's inputs' and outputs' channels are coupled, and what
must be sliced with them. Used by ChannelGraph.build (analysis/channels.py), which calls
`RULES.get(node.op_type, unknown)(g, node)` for every node of the default ONNX domain.

A rule reads its inputs' layouts, sets its outputs' layouts, unifies atoms that must be removed
together, registers the tensors, shape entries and attributes to update, and blocks (with a reason)
whatever it cannot follow exactly; `g` is a `ChannelTracker` (analysis/channel_tracking.py says what
it offers). The built-in rules, by family: `elementwise.py` (channels stay where they are),
`layers.py` (Conv, ConvTranspose, Gemm, MatMul), `data_movement.py` (Concat, Split, Slice,
Transpose, Gather, Resize, Reshape and its kin). An op type with no rule is `unknown`: it blocks every
tracked channel reaching it, so nothing unknown is assumed elementwise. `register_rule` adds one.
"""

from __future__ import annotations

import onnx_ir as ir

from ..channel_tracking import ChannelTracker
from . import data_movement, elementwise, layers
from .common import Rule, blocker, no_channels

RULES: dict[str, Rule] = {
    **elementwise.RULES,
    **layers.RULES,
    **data_movement.RULES,
    "Shape": no_channels, "Size": no_channels,
    "LRN": blocker("LRN mixes neighbouring channels"),
    "GroupNormalization": blocker("GroupNormalization groups are not tracked yet"),
    "Einsum": blocker("Einsum is not tracked"),
}  # fmt: skip


def unknown(g: ChannelTracker, node: ir.Node) -> None:
    """The rule of every op type without one: block whatever channels reach the node."""
    g.block_inputs(node, f"{node.op_type} at node {node.name} is not handled")


def register_rule(op_type: str, rule: Rule, *, replace: bool = False) -> None:
    """Handle `op_type` nodes (default ONNX domain) with `rule` in every later `ChannelGraph.build`.

    `rule(g, node)` follows the contract in the module docstring (worked example: ARCHITECTURE.md,
    "How to add a channel rule"). An op type that already has a rule (a built-in one
    included) raises ValueError unless `replace=True`: replacing a rule changes what every prune
    may slice, so it must be asked for.
    """
    if not callable(rule):
        raise TypeError(f"a channel rule must be callable as rule(g, node), got {type(rule).__name__}")
    if op_type in RULES and not replace:
        raise ValueError(f"op type '{op_type}' already has a channel rule; pass replace=True to replace it")
    RULES[op_type] = rule


__all__ = ["RULES", "Rule", "blocker", "no_channels", "register_rule", "unknown"]

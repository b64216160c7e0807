"""Channel rules for the layers that create channels (sources) and read them (consumers): Conv,
ConvTranspose, Gemm, MatMul with a constant weight, and MatMul between two activations (attention)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..channel_tracking import ChannelTracker, Contraction, GroupAttr, Layout
from .common import Rule, attr_int, const_data


def _conv(g: ChannelTracker, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    layout = g.layout(x)
    weight = const_data(w)
    if weight is None or (bias is not None and const_data(bias) is None):
        if layout is not None:
            g.block(layout.atoms, f"Conv at node {node.name}: weight or bias is not constant")
        return
    if layout is not None and layout.axes != (1,):
        g.block(layout.atoms, f"Conv at node {node.name}: channels not on axis 1")
        layout = None
    group = attr_int(node, "group", 1)
    c_out, c_in_per_group = weight.shape[0], weight.shape[1]
    c_in = c_in_per_group * group
    if group == 1:
        if layout is not None:
            g.slice(w, 1, layout.atoms, "in", node)
        out = g.source(node, c_out)
    elif c_in_per_group == 1 and layout is not None:  # depthwise, channel multiplier c_out / c_in
        out = np.repeat(layout.atoms, c_out // c_in)
        g.group_attrs.append(GroupAttr(node, layout.atoms.reshape(-1, 1)))
    else:  # grouped: the unit is a whole group, or the same index in every group, whichever is finer
        out = g.source(node, c_out)
        blocks = out.reshape(group, c_out // group)
        if group >= c_in_per_group:
            if layout is None:
                g.block(out, f"Conv at node {node.name}: grouped conv on untracked input channels")
            else:
                in_blocks = layout.atoms.reshape(group, c_in_per_group)
                for k in range(group):
                    g.uf.union_all(np.concatenate([in_blocks[k], blocks[k]]))
            g.group_attrs.append(GroupAttr(node, blocks))
        else:
            for j in range(blocks.shape[1]):
                g.uf.union_all(blocks[:, j])
            if layout is not None:
                in_blocks = layout.atoms.reshape(group, c_in_per_group)
                for j in range(c_in_per_group):
                    g.uf.union_all(in_blocks[:, j])
                g.slice(w, 1, in_blocks[0], "in", node)
    _emit(g, node, w, 0, out, bias)


def _emit(g: ChannelTracker, node: ir.Node, weight: ir.Value, axis: int, out: np.ndarray, bias: ir.Value | None) -> None:
    """A layer's output channels: slice its weight along `axis` and its bias, lay them out on axis 1."""
    g.slice(weight, axis, out, "out", node)
    if bias is not None:
        g.slice(bias, 0, out, "param", node)
    g.set(node.outputs[0], Layout((1,), out))


def _conv_transpose(g: ChannelTracker, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    layout = g.layout(x)
    weight = const_data(w)
    group = attr_int(node, "group", 1)
    if weight is None or (bias is not None and const_data(bias) is None) or group != 1 or node.attributes.get("output_shape"):
        if layout is not None:
            g.block(layout.atoms, f"ConvTranspose at node {node.name}: grouped, output_shape or non-constant weight")
        return
    if layout is not None and layout.axes != (1,):
        g.block(layout.atoms, f"ConvTranspose at node {node.name}: channels not on axis 1")
    elif layout is not None:
        g.slice(w, 0, layout.atoms, "in", node)
    _emit(g, node, w, 1, g.source(node, weight.shape[1]), bias)


def _gemm(g: ChannelTracker, node: ir.Node) -> None:
    a, b = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    layout = g.layout(a)
    weight = const_data(b)
    trans_a, trans_b = attr_int(node, "transA", 0), attr_int(node, "transB", 0)
    if weight is None or trans_a or (c is not None and const_data(c) is None):
        if layout is not None:
            g.block(layout.atoms, f"Gemm at node {node.name}: transposed input or non-constant weight")
        if g.layout(b) is not None:
            g.block(g.layout(b).atoms, f"Gemm at node {node.name}: weight from an activation")
        return
    if layout is not None:
        if layout.axes != (1,):
            g.block(layout.atoms, f"Gemm at node {node.name}: channels not on the feature axis")
        else:
            g.slice(b, 1 if trans_b else 0, layout.atoms, "in", node)
    n_out = weight.shape[0 if trans_b else 1]
    out = g.source(node, n_out)
    g.slice(b, 0 if trans_b else 1, out, "out", node)
    if c is not None:
        bias = const_data(c)
        if bias.ndim >= 1 and bias.shape[-1] == n_out and bias.size == n_out:
            g.slice(c, bias.ndim - 1, out, "param", node)
        elif bias.size != 1:
            g.block(out, f"Gemm at node {node.name}: bias is not a per-output vector")
    g.set(node.outputs[0], Layout((1,), out))


def _matmul(g: ChannelTracker, node: ir.Node) -> None:
    a, b = node.inputs
    la, lb = g.layout(a), g.layout(b)
    sa, sb, so = g.shape(a), g.shape(b), g.shape(node.outputs[0])
    if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
        for lay in (la, lb):
            if lay is not None:
                g.block(lay.atoms, f"MatMul at node {node.name}: unknown or vector shapes")
        return
    ra, rb, ro = len(sa), len(sb), len(so)
    weight = const_data(b)
    if weight is not None and weight.ndim == 2:  # a linear layer: x @ W
        if la is not None:
            if la.axes != (ra - 1,):
                g.block(la.atoms, f"MatMul at node {node.name}: channels not on the contracted axis")
            else:
                g.slice(b, 0, la.atoms, "in", node)
        out = g.source(node, weight.shape[1])
        g.slice(b, 1, out, "out", node)
        g.set(node.outputs[0], Layout((ro - 1,), out))
        return
    if const_data(a) is not None or weight is not None:
        for lay in (la, lb):
            if lay is not None:
                g.block(lay.atoms, f"MatMul at node {node.name}: constant operand of rank > 2 or on the left")
        return
    _matmul_activations(g, node, la, lb, sa, sb, ro)


def _matmul_activations(g: ChannelTracker, node: ir.Node, la, lb, sa, sb, ro: int) -> None:
    """A @ B between activations (attention): batch axes are coupled, the contracted axis of both
    operands is one channel space, output rows come from A and columns from B."""
    ra, rb = len(sa), len(sb)
    a_k, b_k = ra - 1, rb - 2
    out_a = {ax: ax + ro - ra for ax in range(ra - 1)}  # A's batch axes and rows on the output
    out_b = {ax: ax + ro - rb for ax in list(range(rb - 2)) + [rb - 1]}

    def fail(reason: str) -> None:
        for lay in (la, lb):
            if lay is not None:
                g.block(lay.atoms, f"MatMul at node {node.name}: {reason}")

    # A batch axis with channels on one operand must shrink on the other too (attention weights per
    # head and V's heads): where the other operand does not carry it and does not broadcast it, the
    # channels cannot go.
    batch_a = {out_a[ax] for ax in (la.axes if la else ()) if ax < ra - 2}
    batch_b = {out_b[ax] for ax in (lb.axes if lb else ()) if ax < rb - 2}
    for carried, other, other_shape in ((batch_a, batch_b, sb), (batch_b, batch_a, sa)):
        for out_ax in carried - other:
            ax = out_ax - (ro - len(other_shape))
            if ax >= 0 and other_shape[ax] != 1:
                return fail("a batch axis with channels on one operand is not tracked on the other")

    ka = la is not None and a_k in la.axes
    kb = lb is not None and b_k in lb.axes
    if ka != kb:
        return fail("only one operand's contracted axis is tracked")
    if ka:
        if la.axes != tuple(sorted(la.axes)) or len(la.axes) != len(lb.axes):
            return fail("operands carry different channel axes")
        # Put B's axes in A's order (batch axes aligned from the right, contracted axes matched).
        b_for_a = []
        for ax in la.axes:
            b_for_a.append(b_k if ax == a_k else ax + rb - ra)
        if sorted(b_for_a) != list(lb.axes):
            return fail("operands carry different channel axes")
        order = [lb.axes.index(x) for x in b_for_a]
        b_atoms = np.transpose(lb.atoms, order)
        if b_atoms.shape != la.atoms.shape:
            return fail("operands' channel sizes differ")
        g.uf.union_arrays(la.atoms, b_atoms)
        g.contractions.append(Contraction(node, 0, la.axes, la.atoms))
        g.contractions.append(Contraction(node, 1, lb.axes, lb.atoms))
    # The output carries the operands' remaining channel axes.
    parts = []
    for lay, mapping, k in ((la, out_a, a_k), (lb, out_b, b_k)):
        if lay is None:
            continue
        rest = [ax for ax in lay.axes if ax != k]
        if not rest:
            continue
        if k in lay.axes:
            reduced = np.take(lay.atoms, 0, axis=lay.axes.index(k))
            # Only valid when the contracted positions of each remaining position are one class (heads).
            full = lay.atoms
            if not np.all(g.class_of(full) == np.expand_dims(g.class_of(reduced), lay.axes.index(k))):
                return fail("a channel axis beside the contracted one is not a whole unit")
        else:
            reduced = lay.atoms
        parts.append(Layout(tuple(mapping[ax] for ax in rest), reduced))
    if not parts:
        return
    if len(parts) == 2:
        small, large = sorted(parts, key=lambda p: len(p.axes))
        if not set(small.axes) <= set(large.axes):
            return fail("operands carry channels on different output axes")
        # Shared (batch) axes are one space: e.g. attention weights per head and V's head channels.
        extra = [large.axes.index(ax) for ax in large.axes if ax not in small.axes]
        reduced = large.atoms
        for pos in sorted(extra, reverse=True):
            reduced = np.take(reduced, 0, axis=pos)
        if reduced.shape != small.atoms.shape:
            return fail("operands' batch channel sizes differ")
        g.uf.union_arrays(small.atoms, reduced)
        parts = [large]
    g.set(node.outputs[0], parts[0].moved(parts[0].axes))


RULES: dict[str, Rule] = {"Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul}

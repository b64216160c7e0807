"""One small rule per op type: how a node's inputs' and outputs' channels are coupled, and what
must be sliced with them. Used by ChannelGraph.build (analysis/channels.py).

A rule reads its inputs' layouts, sets its outputs' layouts, unifies atoms that must be removed
together, registers the tensors, shape entries and attributes to update, and blocks (with a reason)
whatever it cannot follow exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from .channels import ChannelGraph, Contraction, Entry, GroupAttr, Layout, SliceBounds, SplitSizes



def _attr_int(node: ir.Node, name: str, default: int) -> int:
    return node.attributes.get_int(name, default)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def unknown(g: ChannelGraph, node: ir.Node) -> None:
    g._block_inputs(node, f"{node.op_type} at node {node.name} is not handled")


def _passthrough(g: ChannelGraph, node: ir.Node) -> None:
    """Elementwise on the first input (Relu, Sigmoid, Cast, pooling, ...): channels unchanged."""
    layout = g.layout(node.inputs[0]) if node.inputs else None
    if layout is None:
        return
    in_shape, out_shape = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    if in_shape is not None and out_shape is not None and any(in_shape[a] != out_shape[a] for a in layout.axes):
        g.block(layout.atoms, f"{node.op_type} at node {node.name} changes a channel axis")
        return
    g.set(node.outputs[0], layout)


def _spatial(g: ChannelGraph, node: ir.Node) -> None:
    """Pooling-like ops work per channel on axis 1 and keep it; anything else on a channel axis is blocked."""
    layout = g.layout(node.inputs[0])
    if layout is not None and layout.axes != (1,):
        g.block(layout.atoms, f"{node.op_type} at node {node.name} pools over a channel axis")
        return
    _passthrough(g, node)


def _blocker(reason: str) -> Callable[[ChannelGraph, ir.Node], None]:
    def rule(g: ChannelGraph, node: ir.Node) -> None:
        g._block_inputs(node, f"{node.op_type} at node {node.name}: {reason}")

    return rule


def _aligned(layout: Layout, rank: int, out_rank: int) -> Layout:
    """An operand's layout on the output's axes under numpy broadcasting (right-aligned)."""
    return layout.moved([a + out_rank - rank for a in layout.axes]) if rank != out_rank else layout


def _coupler(g: ChannelGraph, node: ir.Node) -> None:
    """Elementwise ops of several operands (Add, Mul, Where, Sum, ...): position i of every operand is
    one channel; per-channel constants are sliced, broadcast ones kept."""
    out_shape = g.shape(node.outputs[0])
    inputs = [v for v in node.inputs if v is not None]
    tracked = [(v, g.layout(v)) for v in inputs if g.layout(v) is not None]
    if not tracked:
        return
    if out_shape is None or any(g.shape(v) is None for v in inputs):
        for _, lay in tracked:
            g.block(lay.atoms, f"{node.op_type} at node {node.name}: unknown shapes")
        return
    rank = len(out_shape)
    aligned = [_aligned(lay, len(g.shape(v)), rank) for v, lay in tracked]
    base = aligned[0]
    for other in aligned[1:]:
        if other.axes != base.axes or other.atoms.shape != base.atoms.shape:
            for lay in aligned:
                g.block(lay.atoms, f"{node.op_type} at node {node.name} mixes different channel axes")
            return
        g.uf.union_arrays(base.atoms, other.atoms)
    for v in inputs:
        if g.layout(v) is not None:
            continue
        shape = g.shape(v)
        offset = rank - len(shape)
        sizes = [shape[a - offset] if a - offset >= 0 else 1 for a in base.axes]
        if all(s == 1 for s in sizes):
            continue  # broadcast along the channels: no slicing needed
        const = _const(v)
        if const is None:
            g.block(base.atoms, f"{node.op_type} at node {node.name}: operand '{v.name}' has untracked channels")
            return
        if len(base.axes) != 1:
            g.block(base.atoms, f"{node.op_type} at node {node.name}: constant over several channel axes")
            return
        g.slice(v, base.axes[0] - offset, base.atoms, "param", node)
    g.set(node.outputs[0], base)


def _normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _softmax(g: ChannelGraph, node: ir.Node) -> None:
    layout = g.layout(node.inputs[0])
    shape = g.shape(node.inputs[0])
    if layout is None:
        return
    if shape is None:
        g.block(layout.atoms, f"{node.op_type} at node {node.name}: unknown shape")
        return
    rank = len(shape)
    opset = g.model.opset_imports.get("", 13)
    axis = _normalize_axis(_attr_int(node, "axis", -1 if opset >= 13 else 1), rank)
    normalized = {axis} if opset >= 13 else set(range(axis, rank))
    if normalized & set(layout.axes):
        g.block(layout.atoms, f"{node.op_type} on channel axis at node {node.name}")
        return
    g.set(node.outputs[0], layout)


def _layernorm(g: ChannelGraph, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        return
    axis = _normalize_axis(_attr_int(node, "axis", -1), len(shape))
    if any(a >= axis for a in layout.axes):
        g.block(layout.atoms, f"{node.op_type} over the channel axis at node {node.name}")
        return
    g.set(node.outputs[0], layout)


def _batchnorm(g: ChannelGraph, node: ir.Node) -> None:
    layout = g.layout(node.inputs[0])
    if layout is None:
        return
    if layout.axes != (1,):
        g.block(layout.atoms, f"{node.op_type} at node {node.name}: channels not on axis 1")
        return
    for v in node.inputs[1:]:
        if v is None:
            continue
        if _const(v) is None:
            g.block(layout.atoms, f"{node.op_type} at node {node.name}: parameter '{v.name}' is not constant")
            return
    for v in node.inputs[1:]:
        if v is not None:
            g.slice(v, 0, layout.atoms, "param", node)
    if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
        g.block(layout.atoms, f"{node.op_type} at node {node.name} runs in training mode")
        return
    g.set(node.outputs[0], layout)


def _conv(g: ChannelGraph, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    layout = g.layout(x)
    weight = _const(w)
    if weight is None or (bias is not None and _const(bias) is None):
        if layout is not None:
            g.block(layout.atoms, f"Conv at node {node.name}: weight or bias is not constant")
        return
    if layout is not None and layout.axes != (1,):
        g.block(layout.atoms, f"Conv at node {node.name}: channels not on axis 1")
        layout = None
    group = _attr_int(node, "group", 1)
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


def _emit(g: ChannelGraph, node: ir.Node, weight: ir.Value, axis: int, out: np.ndarray, bias: ir.Value | None) -> None:
    """A layer's output channels: slice its weight along `axis` and its bias, lay them out on axis 1."""
    g.slice(weight, axis, out, "out", node)
    if bias is not None:
        g.slice(bias, 0, out, "param", node)
    g.set(node.outputs[0], Layout((1,), out))


def _conv_transpose(g: ChannelGraph, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    layout = g.layout(x)
    weight = _const(w)
    group = _attr_int(node, "group", 1)
    if weight is None or (bias is not None and _const(bias) is None) or group != 1 or node.attributes.get("output_shape"):
        if layout is not None:
            g.block(layout.atoms, f"ConvTranspose at node {node.name}: grouped, output_shape or non-constant weight")
        return
    if layout is not None and layout.axes != (1,):
        g.block(layout.atoms, f"ConvTranspose at node {node.name}: channels not on axis 1")
    elif layout is not None:
        g.slice(w, 0, layout.atoms, "in", node)
    _emit(g, node, w, 1, g.source(node, weight.shape[1]), bias)


def _gemm(g: ChannelGraph, node: ir.Node) -> None:
    a, b = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    layout = g.layout(a)
    weight = _const(b)
    trans_a, trans_b = _attr_int(node, "transA", 0), _attr_int(node, "transB", 0)
    if weight is None or trans_a or (c is not None and _const(c) is None):
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
        bias = _const(c)
        if bias.ndim >= 1 and bias.shape[-1] == n_out and bias.size == n_out:
            g.slice(c, bias.ndim - 1, out, "param", node)
        elif bias.size != 1:
            g.block(out, f"Gemm at node {node.name}: bias is not a per-output vector")
    g.set(node.outputs[0], Layout((1,), out))


def _matmul(g: ChannelGraph, node: ir.Node) -> None:
    a, b = node.inputs
    la, lb = g.layout(a), g.layout(b)
    sa, sb, so = g.shape(a), g.shape(b), g.shape(node.outputs[0])
    if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
        for lay in (la, lb):
            if lay is not None:
                g.block(lay.atoms, f"MatMul at node {node.name}: unknown or vector shapes")
        return
    ra, rb, ro = len(sa), len(sb), len(so)
    weight = _const(b)
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
    if _const(a) is not None or weight is not None:
        for lay in (la, lb):
            if lay is not None:
                g.block(lay.atoms, f"MatMul at node {node.name}: constant operand of rank > 2 or on the left")
        return
    _matmul_activations(g, node, la, lb, ra, rb, ro)


def _matmul_activations(g: ChannelGraph, node: ir.Node, la, lb, ra: int, rb: int, ro: int) -> None:
    """A @ B between activations (attention): batch axes are coupled, the contracted axis of both
    operands is one channel space, output rows come from A and columns from B."""
    a_k, b_k = ra - 1, rb - 2
    out_a = {ax: ax + ro - ra for ax in range(ra - 1)}  # A's batch axes and rows on the output
    out_b = {ax: ax + ro - rb for ax in list(range(rb - 2)) + [rb - 1]}

    def fail(reason: str) -> None:
        for lay in (la, lb):
            if lay is not None:
                g.block(lay.atoms, f"MatMul at node {node.name}: {reason}")

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


def _along(layout: Layout, axis: int) -> np.ndarray:
    """Atoms along one axis of a layout (index 0 on the others)."""
    pos = layout.axes.index(axis)
    index = [0] * len(layout.axes)
    index[pos] = slice(None)
    return layout.atoms[tuple(index)]


def _concat(g: ChannelGraph, node: ir.Node) -> None:
    out_shape = g.shape(node.outputs[0])
    layouts = [g.layout(v) for v in node.inputs]
    if all(lay is None for lay in layouts):
        return
    if out_shape is None:
        for lay in layouts:
            if lay is not None:
                g.block(lay.atoms, f"Concat at node {node.name}: unknown shape")
        return
    axis = _normalize_axis(_attr_int(node, "axis", 0), len(out_shape))
    if not any(lay is not None and axis in lay.axes for lay in layouts):
        return _coupler(g, node)
    parts = []
    for v, lay in zip(node.inputs, layouts):
        if lay is None or lay.axes != (axis,):
            size = g.shape(v)[axis]
            fresh = g.uf.new(size)
            g.block(fresh, f"Concat at node {node.name}: input '{v.name}' has untracked channels")
            if lay is not None:
                g.block(lay.atoms, f"Concat at node {node.name}: inputs carry channels on different axes")
            parts.append(fresh)
        else:
            parts.append(lay.atoms)
    g.set(node.outputs[0], Layout((axis,), np.concatenate(parts)))


def _split(g: ChannelGraph, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        return
    axis = _normalize_axis(_attr_int(node, "axis", 0), len(shape))
    if axis not in layout.axes:
        for out in node.outputs:
            g.set(out, layout)
        return
    if layout.axes != (axis,):
        g.block(layout.atoms, f"Split at node {node.name}: splits one of several channel axes")
        return
    sizes = [g.shape(o)[axis] if g.shape(o) else None for o in node.outputs]
    if any(s is None for s in sizes) or sum(sizes) != len(layout.atoms):
        g.block(layout.atoms, f"Split at node {node.name}: unknown split sizes")
        return
    offsets = np.cumsum([0, *sizes])
    parts = tuple(layout.atoms[offsets[i] : offsets[i + 1]] for i in range(len(sizes)))
    g.splits.append(SplitSizes(node, parts))
    for out, atoms in zip(node.outputs, parts):
        g.set(out, Layout((axis,), atoms))


def _slice(g: ChannelGraph, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        return
    def operand(i: int) -> np.ndarray | None:
        return _const(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None

    starts, ends = operand(1), operand(2)
    if starts is None or ends is None:
        g.block(layout.atoms, f"Slice at node {node.name}: bounds are not constant (or opset < 10)")
        return
    has_axes = len(node.inputs) > 3 and node.inputs[3] is not None
    has_steps = len(node.inputs) > 4 and node.inputs[4] is not None
    axes = operand(3) if has_axes else np.arange(len(starts))
    steps = operand(4) if has_steps else np.ones(len(starts), np.int64)
    if axes is None or steps is None:
        g.block(layout.atoms, f"Slice at node {node.name}: axes or steps are not constant")
        return
    out_layout = layout
    for pos, (ax, st, en, sp) in enumerate(zip(axes, starts, ends, steps)):
        ax = _normalize_axis(int(ax), len(shape))
        if ax not in layout.axes:
            continue
        start, stop, step = slice(int(st), int(en), int(sp)).indices(shape[ax])
        if step != 1 or layout.axes != (ax,):
            g.block(layout.atoms, f"Slice at node {node.name}: strided or multi-axis channel slice")
            return
        if start == 0 and stop == shape[ax]:
            continue
        if any(len(v.uses()) > 1 for v in node.inputs[1:3]):
            g.block(layout.atoms, f"Slice at node {node.name}: bounds are shared with other nodes")
            return
        g.slice_bounds.append(SliceBounds(node, pos, layout.atoms, start, stop))
        out_layout = Layout((ax,), layout.atoms[start:stop])
    g.set(node.outputs[0], out_layout)


def _transpose(g: ChannelGraph, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        return
    perm = node.attributes.get_ints("perm", None)
    perm = list(perm) if perm is not None else list(reversed(range(len(shape))))
    g.set(node.outputs[0], layout.moved([perm.index(a) for a in layout.axes]))


def _regroup(g: ChannelGraph, node: ir.Node) -> None:
    """Reshape, Flatten, Squeeze, Unsqueeze: dims regrouped in row-major order; a Reshape's shape
    constant gets its channel entries updated on pruning."""
    layout = g.layout(node.inputs[0])
    in_shape, out_shape = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    if layout is None:
        return
    if in_shape is None or out_shape is None:
        g.block(layout.atoms, f"{node.op_type} at node {node.name}: unknown shapes")
        return
    shape_value = node.inputs[1] if node.op_type == "Reshape" else None
    _reshape_layout(g, node, layout, in_shape, out_shape, entries=shape_value)


def _dim_blocks(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up runs of input and output dims with equal products (how a row-major reshape regroups)."""
    i = j = 0
    out = []
    while i < len(a) or j < len(b):
        if i < len(a) and j < len(b) and a[i] == b[j]:
            out.append(([i], [j]))
            i, j = i + 1, j + 1
        elif i < len(a) and a[i] == 1:
            out.append(([i], []))
            i += 1
        elif j < len(b) and b[j] == 1:
            out.append(([], [j]))
            j += 1
        elif i < len(a) and j < len(b):
            ii, jj, pa, pb = [i], [j], a[i], b[j]
            i, j = i + 1, j + 1
            while pa != pb:
                if pa < pb and i < len(a):
                    pa *= a[i]
                    ii.append(i)
                    i += 1
                elif pb < pa and j < len(b):
                    pb *= b[j]
                    jj.append(j)
                    j += 1
                else:
                    return None
            out.append((ii, jj))
        else:
            return None
    return out


def _reshape_layout(g, node, layout: Layout, in_shape, out_shape, entries: ir.Value | None) -> None:
    """Follow channels through a row-major regrouping of dims (Reshape, Flatten, Squeeze, Unsqueeze)."""
    blocks = _dim_blocks(list(in_shape), list(out_shape))
    if blocks is None:
        g.block(layout.atoms, f"{node.op_type} at node {node.name}: cannot map dims {in_shape} -> {out_shape}")
        return
    out_atoms: list[tuple] = []
    new_entries = []
    for ii, jj in blocks:
        channel_axes = [ax for ax in layout.axes if ax in ii]
        if not channel_axes:
            continue
        if not jj:
            g.block(layout.atoms, f"{node.op_type} at node {node.name} removes a channel axis")
            return
        # The atom of every element of the block, then regrouped as the output dims of the block.
        field_in = _field(layout, channel_axes, [in_shape[ax] for ax in ii], ii)
        field_out = field_in.reshape([out_shape[ax] for ax in jj])
        varying = [k for k in range(len(jj)) if not _constant_along(field_out, k)]
        if len(varying) > 1 and len(channel_axes) == 1 and np.unique(field_in).size == field_in.size:
            if len(varying) != 2:
                g.block(layout.atoms, f"{node.op_type} at node {node.name}: channels split into {len(varying)} dims")
                return
            # One channel axis split in two (heads x head_dim, groups x channels); the shape must stay
            # rectangular, so choose the unit: whole rows before attention (heads), else whole columns
            # (the same index in every group, as a channel shuffle needs).
            unit = varying[0] if _feeds_attention(g, node.outputs[0]) else varying[1]
            for idx in range(field_out.shape[unit]):
                g.uf.union_all(np.take(field_out, idx, axis=unit))
        elif len(varying) > 1 and len(channel_axes) == 1:
            g.block(layout.atoms, f"{node.op_type} at node {node.name}: irregular channel regrouping")
            return
        reduced = field_out
        for k in sorted(set(range(len(jj))) - set(varying), reverse=True):
            reduced = np.take(reduced, 0, axis=k)
        out_atoms.append((jj, varying, reduced))
        if entries is not None:
            for k in varying:
                along = np.moveaxis(field_out, k, 0).reshape(field_out.shape[k], -1)
                new_entries.append((jj[k], along))
    if not out_atoms:
        return
    if len(out_atoms) > 1:
        g.block(layout.atoms, f"{node.op_type} at node {node.name}: channels spread over separate dims")
        return
    jj, varying, reduced = out_atoms[0]
    if entries is not None and new_entries and not _add_entries(g, node, layout, entries, new_entries):
        return
    g.set(node.outputs[0], Layout(tuple(jj[k] for k in varying), reduced))


def _field(layout: Layout, channel_axes: list[int], sizes: list[int], axes: list[int]) -> np.ndarray:
    """Broadcast a layout's atoms over the dims `axes` (sizes given): the atom of every element."""
    if len(channel_axes) != len(layout.axes):
        raise ValueError("channel axes split across blocks")
    shape = [1] * len(axes)
    for ax in layout.axes:
        shape[axes.index(ax)] = sizes[axes.index(ax)]
    return np.broadcast_to(layout.atoms.reshape(shape), sizes).copy()


def _constant_along(array: np.ndarray, axis: int) -> bool:
    first = np.take(array, [0], axis=axis)
    return bool(np.all(array == first))


def _feeds_attention(g: ChannelGraph, value: ir.Value, depth: int = 3) -> bool:
    """Whether `value` reaches a MatMul of two activations through layout-only ops (attention heads)."""
    frontier = [value]
    for _ in range(depth + 1):
        nxt = []
        for v in frontier:
            for user, _ in v.uses():
                if user.op_type == "MatMul" and all(_const(i) is None for i in user.inputs):
                    return True
                if user.op_type in ("Transpose", "Reshape", "Mul", "Div", "Cast", "Identity"):
                    nxt.extend(user.outputs)
        frontier = nxt
    return False


def _entry_sources(g: ChannelGraph, value: ir.Value) -> list[tuple[ir.Value | None, int]] | None:
    """Where each entry of a 1-D shape tensor lives: (constant, index in it), or (None, -1) for an
    entry computed at run time. Follows Concat of pieces, as exporters build dynamic-batch shapes
    (batch from Shape -> Gather, channel dims as constants). None when the tensor cannot be traced."""
    if _const(value) is not None:
        return [(value, i) for i in range(value.const_value.size)] if len(value.uses()) == 1 else None
    producer = value.producer()
    if producer is None or producer.op_type != "Concat":
        return None
    found: list[tuple[ir.Value | None, int]] = []
    for piece in producer.inputs:
        shape = g.shape(piece)
        if shape is None or len(shape) != 1:
            return None
        if _const(piece) is not None:
            if len(piece.uses()) != 1:
                return None
            found += [(piece, i) for i in range(shape[0])]
        else:
            found += [(None, -1)] * shape[0]
    return found


def _add_entries(g: ChannelGraph, node: ir.Node, layout: Layout, shape_value: ir.Value,
                 axes_atoms: Sequence[tuple[int, np.ndarray]]) -> bool:
    """Register the shape entries of the channel axes; False (after blocking) when one cannot be updated."""
    sources = _entry_sources(g, shape_value)
    if sources is None:
        g.block(layout.atoms, f"{node.op_type} at node {node.name}: shape is computed, not a constant")
        return False
    for axis, along in axes_atoms:
        value, index = sources[axis]
        if value is None:
            g.block(layout.atoms, f"{node.op_type} at node {node.name}: a channel dim of the shape is computed")
            return False
        if value.const_value.numpy().reshape(-1)[index] == 0:
            g.block(layout.atoms, f"{node.op_type} at node {node.name}: shape copies (0) a channel dim")
            return False
        g.entries.append(Entry(value, index, along, node.name))
    return True


def _resize(g: ChannelGraph, node: ir.Node) -> None:
    layout = g.layout(node.inputs[0])
    if layout is None:
        return
    in_shape, out_shape = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    if in_shape is None or out_shape is None or any(in_shape[a] != out_shape[a] for a in layout.axes):
        g.block(layout.atoms, f"{node.op_type} at node {node.name} resizes a channel axis")
        return
    sizes = node.inputs[3] if node.op_type == "Resize" and len(node.inputs) > 3 else None
    if sizes is not None:
        axes_atoms = [(ax, _along(layout, ax).reshape(-1, 1)) for ax in layout.axes]
        if not _add_entries(g, node, layout, sizes, axes_atoms):
            return
    g.set(node.outputs[0], layout)


def _pad(g: ChannelGraph, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        return
    pads = _const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if pads is None:
        attr = node.attributes.get_ints("pads", None)
        pads = np.array(attr) if attr is not None else None
    if pads is None or len(node.inputs) > 3 and node.inputs[3] is not None:
        g.block(layout.atoms, f"Pad at node {node.name}: pads are not constant")
        return
    rank = len(shape)
    if any(pads[a] != 0 or pads[a + rank] != 0 for a in layout.axes):
        g.block(layout.atoms, f"Pad at node {node.name} pads a channel axis")
        return
    g.set(node.outputs[0], layout)


def _reduce(g: ChannelGraph, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        return
    rank = len(shape)
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        const = _const(node.inputs[1])
        if const is None:
            g.block(layout.atoms, f"{node.op_type} at node {node.name}: axes are not constant")
            return
        axes = const.tolist()
    if axes is None or len(axes) == 0:
        if node.attributes.get_int("noop_with_empty_axes", 0):
            g.set(node.outputs[0], layout)
            return
        axes = list(range(rank))
    axes = sorted(_normalize_axis(int(a), rank) for a in axes)
    if set(axes) & set(layout.axes):
        g.block(layout.atoms, f"{node.op_type} over the channel axis at node {node.name}")
        return
    if node.attributes.get_int("keepdims", 1):
        g.set(node.outputs[0], layout)
    else:
        g.set(node.outputs[0], layout.moved([a - sum(1 for r in axes if r < a) for a in layout.axes]))


def _gather(g: ChannelGraph, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        if g.layout(node.inputs[1]) is not None:
            g.block(g.layout(node.inputs[1]).atoms, f"Gather at node {node.name}: channels used as indices")
        return
    axis = _normalize_axis(_attr_int(node, "axis", 0), len(shape))
    idx_shape = g.shape(node.inputs[1])
    if axis in layout.axes or idx_shape is None:
        g.block(layout.atoms, f"Gather at node {node.name} indexes a channel axis")
        return
    g.set(node.outputs[0], layout.moved([a if a < axis else a - 1 + len(idx_shape) for a in layout.axes]))


def _qdq(g: ChannelGraph, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        return
    scale = _const(node.inputs[1])
    if scale is None:
        g.block(layout.atoms, f"{node.op_type} at node {node.name}: scale is not constant")
        return
    if scale.size > 1:
        axis = _normalize_axis(_attr_int(node, "axis", 1), len(shape))
        if layout.axes != (axis,):
            g.block(layout.atoms, f"{node.op_type} at node {node.name}: per-axis scale off the channel axis")
            return
        for v in node.inputs[1:]:
            if v is not None:
                g.slice(v, 0, layout.atoms, "param", node)
    g.set(node.outputs[0], layout)


def _no_channels(g: ChannelGraph, node: ir.Node) -> None:
    """Ops whose output carries no channels of their input (Shape, Size, ...): nothing to track."""


_UNARY = """Abs Acos Acosh Asin Asinh Atan Atanh Cast CastLike Ceil Celu Clip Cos Cosh Dropout Elu Erf Exp Floor Gelu
HardSigmoid HardSwish Identity IsInf IsNaN LeakyRelu Log Mish Neg Not Reciprocal Relu Round Selu Shrink Sigmoid Sign
Sin Sinh Softplus Softsign Sqrt Tan Tanh ThresholdedRelu""".split()
_COUPLERS = "Add And BitShift Div Equal Greater GreaterOrEqual Less LessOrEqual Max Mean Min Mod Mul Or Pow PRelu Sub Sum Where Xor".split()
_SPATIAL = "AveragePool GlobalAveragePool GlobalLpPool GlobalMaxPool LpPool MaxPool MaxRoiPool".split()
_REDUCE = "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare".split()

RULES: dict[str, Callable[[ChannelGraph, ir.Node], None]] = {
    **{op: _passthrough for op in _UNARY},
    **{op: _coupler for op in _COUPLERS},
    **{op: _spatial for op in _SPATIAL},
    **{op: _reduce for op in _REDUCE},
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul,
    "BatchNormalization": _batchnorm, "InstanceNormalization": _batchnorm,
    "LayerNormalization": _layernorm,
    "Softmax": _softmax, "LogSoftmax": _softmax, "Hardmax": _softmax,
    "Concat": _concat, "Split": _split, "Slice": _slice, "Transpose": _transpose,
    "Reshape": _regroup, "Flatten": _regroup, "Squeeze": _regroup, "Unsqueeze": _regroup,
    "Resize": _resize, "Upsample": _resize, "Pad": _pad, "Gather": _gather,
    "QuantizeLinear": _qdq, "DequantizeLinear": _qdq,
    "Shape": _no_channels, "Size": _no_channels,
    "LRN": _blocker("LRN mixes neighbouring channels"),
    "GroupNormalization": _blocker("GroupNormalization groups are not tracked yet"),
    "Einsum": _blocker("Einsum is not tracked"),
}

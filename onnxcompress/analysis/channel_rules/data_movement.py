"""Channel rules for shape and data movement: Concat, Split, Slice, Transpose, Gather, Resize, and
the row-major regroupings (Reshape, Flatten, Squeeze, Unsqueeze) whose shape constants are updated
on pruning."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from ..channel_tracking import ChannelTracker, Entry, Layout, SliceBounds, SplitSizes
from .common import Rule, attr_int, const_data, normalize_axis
from .elementwise import coupler


def _along(layout: Layout, axis: int) -> np.ndarray:
    """Atoms along one axis of a layout (index 0 on the others)."""
    pos = layout.axes.index(axis)
    index = [0] * len(layout.axes)
    index[pos] = slice(None)
    return layout.atoms[tuple(index)]


def _concat(g: ChannelTracker, node: ir.Node) -> None:
    out_shape = g.shape(node.outputs[0])
    layouts = [g.layout(v) for v in node.inputs]
    if all(lay is None for lay in layouts):
        return
    if out_shape is None:
        for lay in layouts:
            if lay is not None:
                g.block(lay.atoms, f"Concat at node {node.name}: unknown shape")
        return
    axis = normalize_axis(attr_int(node, "axis", 0), len(out_shape))
    if not any(lay is not None and axis in lay.axes for lay in layouts):
        return coupler(g, node)
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


def _split(g: ChannelTracker, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        return
    axis = normalize_axis(attr_int(node, "axis", 0), len(shape))
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


def _slice(g: ChannelTracker, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        return
    def operand(i: int) -> np.ndarray | None:
        return const_data(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None

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
        ax = normalize_axis(int(ax), len(shape))
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


def _transpose(g: ChannelTracker, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        return
    perm = node.attributes.get_ints("perm", None)
    perm = list(perm) if perm is not None else list(reversed(range(len(shape))))
    g.set(node.outputs[0], layout.moved([perm.index(a) for a in layout.axes]))


def _regroup(g: ChannelTracker, node: ir.Node) -> None:
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


def _feeds_attention(g: ChannelTracker, value: ir.Value, depth: int = 3) -> bool:
    """Whether `value` reaches a MatMul of two activations through layout-only ops (attention heads)."""
    frontier = [value]
    for _ in range(depth + 1):
        nxt = []
        for v in frontier:
            for user, _ in v.uses():
                if user.op_type == "MatMul" and all(const_data(i) is None for i in user.inputs):
                    return True
                if user.op_type in ("Transpose", "Reshape", "Mul", "Div", "Cast", "Identity"):
                    nxt.extend(user.outputs)
        frontier = nxt
    return False


def _entry_sources(g: ChannelTracker, value: ir.Value) -> list[tuple[ir.Value | None, int]] | None:
    """Where each entry of a 1-D shape tensor lives: (constant, index in it), or (None, -1) for an
    entry computed at run time. Follows Concat of pieces, as exporters build dynamic-batch shapes
    (batch from Shape -> Gather, channel dims as constants). None when the tensor cannot be traced."""
    if const_data(value) is not None:
        return [(value, i) for i in range(value.const_value.size)] if len(value.uses()) == 1 else None
    producer = value.producer()
    if producer is None or producer.op_type != "Concat":
        return None
    found: list[tuple[ir.Value | None, int]] = []
    for piece in producer.inputs:
        shape = g.shape(piece)
        if shape is None or len(shape) != 1:
            return None
        if const_data(piece) is not None:
            if len(piece.uses()) != 1:
                return None
            found += [(piece, i) for i in range(shape[0])]
        else:
            found += [(None, -1)] * shape[0]
    return found


def _add_entries(g: ChannelTracker, node: ir.Node, layout: Layout, shape_value: ir.Value,
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


def _resize(g: ChannelTracker, node: ir.Node) -> None:
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


def _gather(g: ChannelTracker, node: ir.Node) -> None:
    layout, shape = g.layout(node.inputs[0]), g.shape(node.inputs[0])
    if layout is None:
        if g.layout(node.inputs[1]) is not None:
            g.block(g.layout(node.inputs[1]).atoms, f"Gather at node {node.name}: channels used as indices")
        return
    axis = normalize_axis(attr_int(node, "axis", 0), len(shape))
    idx_shape = g.shape(node.inputs[1])
    if axis in layout.axes or idx_shape is None:
        g.block(layout.atoms, f"Gather at node {node.name} indexes a channel axis")
        return
    g.set(node.outputs[0], layout.moved([a if a < axis else a - 1 + len(idx_shape) for a in layout.axes]))


RULES: dict[str, Rule] = {
    "Concat": _concat, "Split": _split, "Slice": _slice, "Transpose": _transpose,
    "Reshape": _regroup, "Flatten": _regroup, "Squeeze": _regroup, "Unsqueeze": _regroup,
    "Resize": _resize, "Upsample": _resize, "Gather": _gather,
}

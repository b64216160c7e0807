"""What a channel rule reads and writes: atoms, layouts, and the records of what to slice.

`ChannelTracker` is the state `ChannelGraph.build` (analysis/channels.py) fills in while it walks the
graph, and the whole interface a rule (analysis/channel_rules/) sees as its `g` argument:

- read: `g.layout(value)` (the value's channel axes and their atoms, or None when it carries no
  tracked channels), `g.shape(value)` (inferred static shape, or None), `g.model`;
- write: `g.set(value, layout)` for an output, `g.source(node, n)` for a layer's n new output
  channels (fresh atoms), `g.uf.union_arrays(a, b)` / `g.uf.union_all(atoms)` for atoms that must be
  removed together, `g.slice(value, axis, atoms, role, node)` for a constant to slice, the lists
  `g.entries`, `g.group_attrs`, `g.splits`, `g.slice_bounds`, `g.contractions` for shape entries,
  attributes and masks to update;
- refuse: `g.block(atoms, reason)` and `g.block_inputs(node, reason)`: blocked atoms are never
  pruned, and the reason is shown to the user.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

# ------------------------------------------------------------------------------ union-find


class UnionFind:
    """Union-find over integer atoms (path compression; the smaller id is the root)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self._root_table: np.ndarray | None = None  # root of every atom; dropped by new() and union()

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self._root_table = None
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
            self._root_table = None

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(np.ravel(a), np.ravel(b)):
            self.union(x, y)

    def union_all(self, atoms: np.ndarray) -> None:
        flat = np.ravel(atoms)
        for x in flat[1:]:
            self.union(flat[0], x)

    def roots(self, atoms: np.ndarray) -> np.ndarray:
        if not np.size(atoms):
            return np.asarray(atoms, np.int64)
        return self.root_table()[np.asarray(atoms, np.int64)]

    def root_table(self) -> np.ndarray:
        """The root of every atom, as one array: built once after the last union, so that pruning
        decisions (thousands of root look-ups) index it instead of walking parents atom by atom."""
        if self._root_table is None:
            find = self.find
            self._root_table = np.fromiter((find(a) for a in range(len(self.parent))), np.int64, len(self.parent))
        return self._root_table


# ------------------------------------------------------------------------------ layouts and members


@dataclass(frozen=True)
class Layout:
    """The axes of a value that carry channels (ascending) and the atom at each position along them."""

    axes: tuple[int, ...]
    atoms: np.ndarray  # shape = the value's sizes along `axes`

    def moved(self, axes: Sequence[int]) -> Layout:
        """The same atoms on other axes (given in the order of self.axes), re-sorted ascending."""
        order = np.argsort(axes)
        return Layout(tuple(int(axes[i]) for i in order), np.transpose(self.atoms, order))


@dataclass(frozen=True)
class Slice:
    """Slice `value` (an initializer) along `axis`, keeping the positions whose atom is kept.

    role: "out" for a source's output channels, "in" for a consumer's input channels (masked by
    zeroing in `ChannelGraph.mask`), "param" for per-channel parameters (bias, BN, constants)."""

    value: ir.Value
    axis: int
    atoms: np.ndarray  # 1-D, one atom per position along `axis`
    role: str
    node: str


@dataclass(frozen=True)
class Entry:
    """Entry `index` of 1-D int constant `value` becomes the kept count of an axis (Reshape/Resize/Expand)."""

    value: ir.Value
    index: int
    atoms: np.ndarray  # positions along the axis x channel atoms there: kept if any is kept
    node: str


@dataclass(frozen=True)
class GroupAttr:
    """Conv `group` attribute: the number of kept groups (each group's atoms are one class)."""

    node: ir.Node
    atoms: np.ndarray  # [groups, channels per group]


@dataclass(frozen=True)
class SplitSizes:
    node: ir.Node
    atoms: tuple[np.ndarray, ...]  # per output


@dataclass(frozen=True)
class SliceBounds:
    node: ir.Node
    position: int  # which entry of starts/ends/axes
    atoms: np.ndarray  # the input's atoms along the sliced axis
    start: int
    stop: int


@dataclass(frozen=True)
class Contraction:
    """A MatMul between two activations summing over channels: masked by a Mul in `mask`."""

    node: ir.Node
    input_index: int
    axes: tuple[int, ...]  # the operand's channel axes (its whole layout, so per-head masks stay per head)
    atoms: np.ndarray


@dataclass
class ChannelTracker:
    """The layouts, unions, blocks and slicing records of one model (see the module docstring)."""

    model: ir.Model
    uf: UnionFind = field(default_factory=UnionFind)
    layouts: dict[str, Layout] = field(default_factory=dict)
    slices: list[Slice] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    group_attrs: list[GroupAttr] = field(default_factory=list)
    splits: list[SplitSizes] = field(default_factory=list)
    slice_bounds: list[SliceBounds] = field(default_factory=list)
    contractions: list[Contraction] = field(default_factory=list)
    sources: list[tuple[str, np.ndarray]] = field(default_factory=list)
    blocked: dict[int, str] = field(default_factory=dict)  # atom -> first reason
    shapes: dict = field(default_factory=dict)
    _slice_index: dict = field(default_factory=dict)

    def shape(self, value: ir.Value | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        info = self.shapes.get(value.name)
        return None if info is None else info.shape

    def layout(self, value: ir.Value | None) -> Layout | None:
        return None if value is None else self.layouts.get(value.name)

    def set(self, value: ir.Value, layout: Layout | None) -> None:
        if layout is not None and np.size(layout.atoms):
            self.layouts[value.name] = layout

    def block(self, atoms: np.ndarray, reason: str) -> None:
        for a in np.unique(np.ravel(atoms)):
            self.blocked.setdefault(int(a), reason)

    def source(self, node: ir.Node, n: int) -> np.ndarray:
        atoms = self.uf.new(n)
        self.sources.append((node.name, atoms))
        return atoms

    def slice(self, value: ir.Value, axis: int, atoms: np.ndarray, role: str, node: ir.Node) -> None:
        """Register a tensor axis to slice; a tensor shared by several nodes is one channel space."""
        atoms = np.ravel(atoms)
        key = (value.name, axis)
        if key in self._slice_index:
            existing = self.slices[self._slice_index[key]]
            if len(existing.atoms) != len(atoms):
                self.block(np.concatenate([existing.atoms, atoms]), f"tensor '{value.name}' is shared by mismatched layers")
                return
            self.uf.union_arrays(existing.atoms, atoms)
            if existing.role != "in" and role == "in":  # keep masking its consumer columns
                self.slices.append(Slice(value, axis, atoms, role, node.name))
            return
        self._slice_index[key] = len(self.slices)
        self.slices.append(Slice(value, axis, atoms, role, node.name))

    def block_inputs(self, node: ir.Node, reason: str) -> None:
        """Block every tracked channel reaching `node`."""
        for v in node.inputs:
            layout = self.layout(v)
            if layout is not None:
                self.block(layout.atoms, reason)

    def class_of(self, atoms: np.ndarray) -> np.ndarray:
        return self.uf.roots(np.asarray(atoms))

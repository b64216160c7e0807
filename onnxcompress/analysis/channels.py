"""Channel dependency analysis: which channels of which layers must be pruned together.

Every output channel of a source layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight)
is an *atom*. Each value that carries channels has a *layout*: the tensor axes holding channels and,
for every position along them, the atom it is made of. Op rules (one small function per op type)
propagate layouts through the graph and *unify* atoms that must be removed together (a residual Add
ties position i of both operands; a depthwise Conv ties its input and output channel; attention
ties a head's Q, K and V channels). Union-find classes of atoms are the prunable units; connected
sets of classes sharing a source are the *groups* that ratios and importance are computed over.

The rules live in analysis/channel_rules/ (one per op type; `register_rule` adds one); what they
read and write is `ChannelTracker` (analysis/channel_tracking.py), which ChannelGraph extends with
groups, importance, pruning and masking. Anything a rule does not understand *blocks* the atoms it
touches, with a reason; a blocked class is never pruned, and nothing unknown is assumed
elementwise. Values reaching a graph output are blocked.

`ChannelGraph.prune(removed)` physically slices every member (weights, biases, normalization and
per-channel constants, Reshape/Split/Slice/Resize constants, `group` attributes) so that the pruned
model equals the original with the removed channels' consumers masked (`ChannelGraph.mask`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .channel_rules import RULES, unknown
from .channel_tracking import (
    ChannelTracker,
    Contraction,
    Entry,
    GroupAttr,
    Layout,
    Slice,
    SliceBounds,
    SplitSizes,
    UnionFind,
)
from .control_flow import subgraphs
from .shapes import infer_shapes


@dataclass(frozen=True)
class Sink:
    """A consumer layer reading tracked channels: what recovery refits after pruning."""

    node: str  # node name (unchanged by pruning)
    op_type: str  # Conv, Gemm or MatMul
    weight: str  # initializer name
    axis: int  # weight axis indexing the input channels
    input: str  # name of the activation it reads
    input_axis: int  # channel axis of that activation
    keep: np.ndarray  # bool per original input position: kept after pruning


@dataclass
class Group:
    """Classes that share a source: pruned with one ratio, ranked against each other."""

    id: int
    classes: list[int]  # class roots, in the order of the first source's channels
    sources: list[str]  # node names that create these channels
    members: int  # number of sliced tensors
    frozen: dict[int, str]  # class root -> reason it cannot be pruned
    channels: int  # positions in the first source (a class can span several channels, e.g. a head)

    @property
    def prunable(self) -> list[int]:
        return [c for c in self.classes if c not in self.frozen]


@dataclass
class ChannelGraph(ChannelTracker):
    """A model's channel groups: built by `build`, then ranked (`importance`), pruned or masked."""

    groups: list[Group] = field(default_factory=list)
    shapes_at: dict[str, tuple] = field(default_factory=dict)  # the input shapes `shapes` were inferred at

    # ---------------------------------------------------------------- building

    @classmethod
    def build(cls, model: ir.Model, input_shapes=None) -> ChannelGraph:
        """Analyze `model` (not modified). Shapes are inferred at a batch of 2 for symbolic batch dims,
        so a batch axis is never mistaken for one that can merge with channels."""
        from ..model import graph_inputs

        given = dict(input_shapes or {})
        for value in graph_inputs(model):
            dims = list(value.shape.dims) if value.shape is not None else []
            if value.name not in given and dims and not isinstance(dims[0], int):
                rest = [d if isinstance(d, int) else None for d in dims[1:]]
                if all(d is not None for d in rest):
                    given[value.name] = (2, *rest)
        g = cls(model)
        g.shapes = infer_shapes(model, given)
        g.shapes_at = {name: tuple(shape) for name, shape in given.items()}
        for node in model.graph:
            if node.domain not in ("", "ai.onnx"):
                g.block_inputs(node, f"{node.domain}::{node.op_type} at node {node.name} is not handled")
            elif any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
                g._block_captured(node)
            else:
                try:
                    RULES.get(node.op_type, unknown)(g, node)
                except Exception as exc:  # a rule that trips on an odd node blocks that node, not the run
                    g.block_inputs(node, f"{node.op_type} at node {node.name}: not analyzable ({type(exc).__name__})")
        for value in model.graph.outputs:
            layout = g.layouts.get(value.name)
            if layout is not None:
                g.block(layout.atoms, f"reaches graph output '{value.name}'")
        g._finish()
        return g

    def _block_captured(self, node: ir.Node) -> None:
        reason = f"{node.op_type} at node {node.name} has subgraphs"
        self.block_inputs(node, reason)
        for _, sub in subgraphs(node):  # graph attributes only (a Scan's num_scan_inputs is an int)
            for inner in ir.traversal.RecursiveGraphIterator(sub):
                for v in inner.inputs:
                    layout = self.layout(v)
                    if layout is not None:
                        self.block(layout.atoms, reason)

    # ---------------------------------------------------------------- classes and groups

    def _finish(self) -> None:
        self.blocked_classes: dict[int, str] = {}
        for atom, reason in self.blocked.items():
            self.blocked_classes.setdefault(self.uf.find(atom), reason)
        # Classes that share a source are one group.
        group_uf = UnionFind()
        class_ids: dict[int, int] = {}

        def cid(root: int) -> int:
            if root not in class_ids:
                class_ids[root] = int(group_uf.new(1)[0])
            return class_ids[root]

        for _, atoms in self.sources:
            roots = [cid(self.uf.find(int(a))) for a in atoms]
            for r in roots[1:]:
                group_uf.union(roots[0], r)
        by_group: dict[int, list[tuple[str, np.ndarray]]] = defaultdict(list)
        for name, atoms in self.sources:
            by_group[group_uf.find(cid(self.uf.find(int(atoms[0]))))].append((name, atoms))
        member_count = defaultdict(int)
        for s in self.slices:
            member_count[self.uf.find(int(s.atoms[0]))] += 1
        self.groups = []
        for gid, srcs in enumerate(by_group.values()):
            classes: list[int] = []
            seen = set()
            for _, atoms in srcs:
                for a in atoms:
                    r = self.uf.find(int(a))
                    if r not in seen:
                        seen.add(r)
                        classes.append(r)
            frozen = {c: self.blocked_classes[c] for c in classes if c in self.blocked_classes}
            self.groups.append(Group(
                id=gid, classes=classes, sources=[n for n, _ in srcs],
                members=sum(member_count[c] for c in classes), frozen=frozen, channels=len(srcs[0][1]),
            ))

    def _roots(self, classes: Iterable[int]) -> set[int]:
        """Class ids as their union-find roots (callers may pass any atom of a class)."""
        return {int(self.uf.find(int(c))) for c in classes}

    def _cut_consumers(self, removed: set[int]) -> Iterator[tuple[Slice, np.ndarray]]:
        """Each consumer slice ("in") that loses positions, with its keep mask."""
        gone = self.removed_mask(removed)
        for s in self.slices:
            if s.role != "in":
                continue
            keep = self.kept(s.atoms, gone)
            if not keep.all():
                yield s, keep

    def removed_mask(self, removed: Iterable[int]) -> np.ndarray:
        """True for every atom whose class is in `removed` (class roots): what `kept` tests against,
        computed once per decision rather than once per tensor."""
        table = self.uf.root_table()
        roots = np.fromiter(removed, np.int64)
        if not roots.size:
            return np.zeros(len(table), bool)
        is_removed_root = np.zeros(len(table), bool)
        is_removed_root[roots] = True
        return is_removed_root[table]

    def kept(self, atoms: np.ndarray, removed: set[int] | np.ndarray) -> np.ndarray:
        """Per position of `atoms`: whether its class survives `removed` (class roots, or a
        `removed_mask`)."""
        gone = removed if isinstance(removed, np.ndarray) else self.removed_mask(removed)
        atoms = np.asarray(atoms)
        return ~gone[atoms.astype(np.int64)] if atoms.size else np.ones(atoms.shape, bool)

    # ---------------------------------------------------------------- importance

    def importance(self, norm: str = "l2") -> dict[int, float]:
        """Per class: the sum over its weight members (source rows and consumer columns) of each
        member's per-channel norm divided by that member's mean, so every layer weighs the same."""
        scores: dict[int, float] = defaultdict(float)
        for s in self.slices:
            per = _channel_norms(s, norm) if s.role != "param" else None
            if per is not None:
                self._add_relative(scores, s, per)
        return dict(scores)

    def _add_relative(self, scores: dict[int, float], s: Slice, per: np.ndarray) -> None:
        """Add `per` (one value per position of `s`), divided by its mean, to the classes of `s`."""
        mean = float(per.mean())
        if mean > 0:
            for root, value in zip(self.class_of(s.atoms), per / mean):
                scores[int(root)] += float(value)

    def sink_inputs(self) -> dict[str, int]:
        """Activations that consumers of tracked channels read (value name -> channel axis): where
        activation statistics say how much each channel matters."""
        nodes = {n.name: n for n in self.model.graph}
        found: dict[str, int] = {}
        for s in self.slices:
            if s.role != "in":
                continue
            node = nodes[s.node]
            if self.shape(node.inputs[0]) is not None:
                found[node.inputs[0].name] = self._input_channel_axis(node)
        return found

    def _input_channel_axis(self, node: ir.Node) -> int:
        """The channel axis of what a consumer reads: last for MatMul, 1 for Conv and Gemm."""
        return len(self.shape(node.inputs[0]) or ()) - 1 if node.op_type == "MatMul" else 1

    def sinks(self, removed: Iterable[int]) -> list[Sink]:
        """Consumers that lose input channels when `removed` is pruned, in graph order."""
        removed = self._roots(removed)
        nodes = {n.name: n for n in self.model.graph}
        order = {n.name: i for i, n in enumerate(self.model.graph)}
        found = []
        for s, keep in self._cut_consumers(removed):
            node = nodes[s.node]
            axis = self._input_channel_axis(node)
            found.append(Sink(node.name, node.op_type, s.value.name, s.axis, node.inputs[0].name, axis, keep))
        return sorted(found, key=lambda k: order[k.node])

    def activation_importance(self, stats, kind: str = "mean_abs") -> dict[int, float]:
        """Per class, from statistics of the sink inputs: mean |x| ("mean_abs"), 1 - APoZ ("apoz"), or
        what the channel adds to the sink's output, rms(x) times the norm of the sink's weights for
        it ("output": a large activation read by small weights matters little), each sink's vector
        divided by its mean, summed over the sinks that read the class."""
        nodes = {n.name: n for n in self.model.graph}
        scores: dict[int, float] = defaultdict(float)
        for s in self.slices:
            if s.role != "in":
                continue
            channel = stats.values.get(nodes[s.node].inputs[0].name)
            if channel is None or len(channel.total) != len(s.atoms):
                continue
            per = {"mean_abs": channel.mean_abs, "apoz": 1.0 - channel.apoz}.get(kind)
            if per is None:  # "output": the sink's weights for each input channel, as in importance()
                norms = _channel_norms(s, "l2")
                per = channel.rms if norms is None else channel.rms * norms
            self._add_relative(scores, s, per)
        return dict(scores)

    # ---------------------------------------------------------------- applying a decision

    def emptied(self, removed: Iterable[int]) -> list[str]:
        """Values that would be left with no channels at all (ORT rejects 0-wide tensors, and a grouped
        Conv with group=0 crashes it), even when their group keeps channels elsewhere."""
        removed = self._roots(removed)
        if not removed:
            return []
        gone = self.removed_mask(removed)
        return [name for name, layout in self.layouts.items() if not self.kept(layout.atoms, gone).any()]

    def prune(self, removed: Iterable[int]) -> ir.Model:
        """Physically remove the channels of `removed` classes from `self.model` (in place)."""
        removed = self._roots(removed)
        frozen = removed & set(self.blocked_classes)
        if frozen:
            raise ValueError(f"classes {sorted(frozen)[:5]} are frozen: {self.blocked_classes[min(frozen)]}")
        emptied = self.emptied(removed)
        if emptied:
            raise ValueError(f"pruning would leave '{emptied[0]}' with no channels ({len(emptied)} values in all)")
        new_tensors: dict[str, np.ndarray] = {}
        gone = self.removed_mask(removed)

        def current(value: ir.Value) -> np.ndarray:
            if value.name not in new_tensors:
                new_tensors[value.name] = value.const_value.numpy()
            return new_tensors[value.name]

        applied = set()
        for s in self.slices:
            if (s.value.name, s.axis) in applied:
                continue
            applied.add((s.value.name, s.axis))
            keep = self.kept(s.atoms, gone)
            if not keep.all():
                new_tensors[s.value.name] = np.compress(keep, current(s.value), axis=s.axis)
        for e in self.entries:
            arr = current(e.value).copy()
            if arr[e.index] > 0:  # -1 (inferred) and 0 (copied) entries need no update
                arr[e.index] = int(self.kept(e.atoms, gone).any(axis=tuple(range(1, e.atoms.ndim))).sum())
            new_tensors[e.value.name] = arr
        for ga in self.group_attrs:
            kept_groups = int(self.kept(ga.atoms[:, 0], gone).sum())
            ga.node.attributes["group"] = ir.AttrInt64("group", kept_groups)
        for sp in self.splits:
            sizes = np.array([int(self.kept(a, gone).sum()) for a in sp.atoms], np.int64)
            _set_split_sizes(self.model, sp.node, sizes)
        for sb in self.slice_bounds:
            keep = self.kept(sb.atoms, gone)
            start = int(keep[: sb.start].sum())
            stop = start + int(keep[sb.start : sb.stop].sum())
            for idx, value in ((1, start), (2, stop)):
                const = sb.node.inputs[idx]
                arr = current(const).copy()
                arr[sb.position] = value
                new_tensors[const.name] = arr
        for name, array in new_tensors.items():
            value = self.model.graph.initializers[name]
            value.const_value = ir.tensor(np.ascontiguousarray(array), name=name)
            value.shape = ir.Shape(array.shape)
        _clear_inferred_shapes(self.model)
        return self.model

    def mask(self, removed: Iterable[int]) -> ir.Model:
        """The reference for exactness: a copy of the original model in which every consumer of a
        removed channel sees zero weight for it (and contractions between activations a zero mask)."""
        from ..model import load

        removed = self._roots(removed)
        masked = load(self.model)
        for s, keep in self._cut_consumers(removed):
            value = masked.graph.initializers[s.value.name]
            arr = value.const_value.numpy().copy()
            index = [slice(None)] * arr.ndim
            index[s.axis] = ~keep
            arr[tuple(index)] = 0
            value.const_value = ir.tensor(arr, name=value.name)
        nodes = {n.name: n for n in masked.graph}
        gone = self.removed_mask(removed)
        for c in self.contractions:
            keep = self.kept(c.atoms, gone)
            if keep.all():
                continue
            node = nodes[c.node.name]
            operand = node.inputs[c.input_index]
            rank = len(self.shape(c.node.inputs[c.input_index]))
            shape = [1] * rank
            for ax, size in zip(c.axes, keep.shape):
                shape[ax] = size
            const = ir.Value(name=f"{node.name}_mask{c.input_index}",
                             const_value=ir.tensor(keep.astype(np.float32).reshape(shape)))
            masked.graph.register_initializer(const)
            mul = ir.node("Mul", [operand, const], name=f"{node.name}_mask{c.input_index}_mul")
            masked.graph.insert_before(node, mul)
            node.replace_input_with(c.input_index, mul.outputs[0])
        return masked


def _channel_norms(s: Slice, norm: str) -> np.ndarray | None:
    """The l1 or l2 norm of the weight `s` slices, per position along its channel axis (None when
    the weight is not a constant)."""
    if s.value.const_value is None:
        return None
    w = np.moveaxis(s.value.const_value.numpy().astype(np.float64), s.axis, 0).reshape(len(s.atoms), -1)
    return np.abs(w).sum(1) if norm == "l1" else np.sqrt((w**2).sum(1))


def _clear_inferred_shapes(model: ir.Model) -> None:
    """Intermediate shapes are stale after slicing; the checker and ORT re-infer them."""
    outputs = set(id(v) for v in model.graph.outputs)
    for node in model.graph:
        for v in node.outputs:
            if id(v) not in outputs:
                v.shape = None


def _set_split_sizes(model: ir.Model, node: ir.Node, sizes: np.ndarray) -> None:
    opset = model.opset_imports.get("", 13)
    if opset >= 13:
        if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].is_initializer():
            value = node.inputs[1]
            value.const_value = ir.tensor(sizes, name=value.name)
            value.shape = ir.Shape(sizes.shape)
            return
        value = ir.Value(name=f"{node.name}_split_sizes", const_value=ir.tensor(sizes))
        value.const_value.name = value.name
        model.graph.register_initializer(value)
        node.resize_inputs(2)
        node.replace_input_with(1, value)
        node.attributes.pop("num_outputs", None)
    else:
        node.attributes["split"] = ir.AttrInt64s("split", [int(s) for s in sizes])


# ------------------------------------------------------------------------------ preparing a model

#: Initializers up to this size are copied per consumer before analysis, so two layers that merely
#: hold equal constants (deduplicated by an exporter: BN gammas of 1, equal Reshape shapes) are not
#: forced to be pruned alike. Larger shared tensors are real weight tying and stay one channel space.
UNSHARE_MAX_BYTES = 1 << 20


def prepare(model: ir.Model) -> ir.Model:
    """Make `model` ready for analysis and slicing (in place): constants as initializers, unique
    node names, small constants private to each consumer."""
    import onnx_ir.passes.common as common

    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common.NameFixPass()(model)
    taken = set(model.graph.initializers)
    for name, value in list(model.graph.initializers.items()):
        uses = value.uses()
        if len(uses) < 2 or value.const_value is None or value.const_value.nbytes > UNSHARE_MAX_BYTES:
            continue
        if value.is_graph_input() or value.is_graph_output():
            continue
        array = value.const_value.numpy()
        for user, index in uses[1:]:
            k = 1
            while f"{name}_{k}" in taken:
                k += 1
            copy_name = f"{name}_{k}"
            taken.add(copy_name)
            copy = ir.Value(name=copy_name, shape=ir.Shape(array.shape), type=value.type,
                            const_value=ir.tensor(array.copy(), name=copy_name))
            model.graph.register_initializer(copy)
            user.replace_input_with(index, copy)
    return model


__all__ = [
    "ChannelGraph", "Contraction", "Entry", "Group", "GroupAttr", "Layout", "Sink", "Slice", "SliceBounds",
    "SplitSizes", "UNSHARE_MAX_BYTES", "prepare",
]

"""PruneBlocks: remove whole residual blocks (y = x + f(x) becomes y = x) chosen on calibration data.

A residual block is found from the graph's structure, not from names: an elementwise Add (or a
two-input Sum) one of whose operands x is an input of the region f that computes the other. The
branch f is every node that depends on x and feeds the Add; the block is removable when that region
is closed (no branch value is a graph output or read outside the branch, the branch reads nothing
from outside but x and constants) and the Add does not broadcast x. Blocks whose shortcut is itself
computed (a projection or downsample) are reported and left alone.

Removal is exact in a precise sense: the model with a block removed computes what the original
computes with the branch output multiplied by zero. Scoring uses that: one copy of the model gets a
scalar gate input multiplying every removable branch, so "the model with these blocks removed" is
one ONNX Runtime run with those gates at 0, without building a model per candidate.

Selection is greedy. Each step scores every remaining block by the output damage (in `metric`) of
removing it on top of those already chosen, on the scoring part of the calibration data, and takes
the least harmful (at equal damage, the one with more MACs). With `rescore=False` the blocks are
ranked once by their damage alone. Cost in forward passes over the scoring samples, for n removable
blocks and k removals: n + (n-1) + ... + (n-k+1), about k·n, with re-scoring; n without (measured on
ResNet-50 at 224x224, 2 CPU cores: about 0.3 s per sample and pass, so count=3 of 12 blocks on 12
scoring samples took 160 s with re-scoring and 80 s without). With `max_drop`, each step is also
checked on the held-out samples (one more pass over them) and selection stops at the first step that
would exceed the tolerance: the best remaining block is the least harmful on the scoring data, so
the others are not tried. `count` counts chosen blocks; blocks nested in a chosen block's branch go
with it and are not chosen again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from .. import runtime
from ..analysis.shapes import ShapeInfo, infer_shapes
from ..calibration import Calibration, batch_size_for
from ..errors import OnnxCompressError
from ..model import load
from ..pipeline import Pass, PassContext, PassResult, cost_analysis, option
from ..verify import compare, outputs

Metric = Literal["cosine", "sqnr", "top1", "mse"]
Outputs = list[list[np.ndarray]]

#: Samples per ORT run when the model's batch dimension is free.
EVAL_BATCH = 16
#: Below this many calibration samples nothing is held out: max_drop is checked on the scoring samples.
MIN_SAMPLES_TO_HOLD_OUT = 4
#: Gate inputs of the scoring copy of the model.
GATE_PREFIX = "onnxcompress.block_gate."
#: Ops whose output is not a function of their inputs: never treated as constant.
_RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


# ---------------------------------------------------------------------------------- finding blocks


@dataclass(frozen=True)
class ResidualBlock:
    """An Add/Sum y = x + f(x). `reason` says why it cannot be removed (None when it can)."""

    add: ir.Node
    shortcut: ir.Value  # x; for a projection shortcut, the value both operands are computed from
    branch_output: ir.Value | None  # f(x); None when neither operand is the shortcut itself
    branch: tuple[ir.Node, ...]  # f's nodes in graph order (empty for a projection shortcut)
    reason: str | None = None
    dtype: np.dtype | None = None  # element type of y, known for removable blocks

    @property
    def removable(self) -> bool:
        return self.reason is None

    @property
    def name(self) -> str:
        return label(self.add)


def label(node: ir.Node) -> str:
    """A node's name, or its first output's name for unnamed nodes."""
    return node.name or (node.outputs[0].name if node.outputs and node.outputs[0].name else node.op_type)


def find_blocks(model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[ResidualBlock]:
    """Every residual Add/Sum of the main graph, removable or not (with the reason), in graph order."""
    topology = _Topology(model.graph)
    shapes: dict[str, ShapeInfo] | None = None
    blocks = []
    for add in topology.nodes:
        if not _is_binary_add(add):
            continue
        p, q = add.inputs
        if p is None or q is None or p is q or p in topology.constant or q in topology.constant:
            continue
        block = topology.identity_block(add, p, q) or topology.identity_block(add, q, p)
        if block is None:
            block = topology.projection_block(add, p, q)
        if block is None:
            continue
        if block.removable:
            if shapes is None:
                shapes = infer_shapes(model, input_shapes)
            reason = _shape_reason(block, shapes)
            dtype = None if reason else shapes[block.add.outputs[0].name].dtype
            block = dataclasses.replace(block, reason=reason, dtype=dtype)
        blocks.append(block)
    return blocks


def _is_binary_add(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in ("Add", "Sum") and len(node.inputs) == 2


class _Topology:
    """Consumers, graph order and constant values of a graph's top-level nodes.

    Values a node's subgraphs (If/Loop bodies) read from the main graph count as that node's inputs.
    """

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.nodes = list(graph)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.consumed = {n: _consumed(n, graph) for n in self.nodes}
        self.users: dict[ir.Value, list[ir.Node]] = {}
        for n in self.nodes:
            for v in self.consumed[n]:
                self.users.setdefault(v, []).append(n)
        self.constant = _constant_values(graph, self.nodes, self.consumed)

    def identity_block(self, add: ir.Node, x: ir.Value, b: ir.Value) -> ResidualBlock | None:
        """The block with shortcut x and branch output b, or None when b does not depend on x."""
        start = self.order.get(x.producer(), -1)
        end = self.order[add]
        # Nodes that depend on x and come before the Add: only they can be in the branch.
        descendants: set[ir.Node] = set()
        stack = [x]
        while stack:
            for user in self.users.get(stack.pop(), ()):
                if start < self.order[user] < end and user not in descendants:
                    descendants.add(user)
                    stack.extend(user.outputs)
        if b.producer() not in descendants:
            return None
        # Every node on a path from x to b depends on x, so walking back inside `descendants` finds them all.
        branch: set[ir.Node] = set()
        nodes = [b.producer()]
        while nodes:
            node = nodes.pop()
            if node in branch:
                continue
            branch.add(node)
            nodes.extend(v.producer() for v in self.consumed[node] if v.producer() in descendants)
        ordered = tuple(sorted(branch, key=self.order.__getitem__))
        return ResidualBlock(add, x, b, ordered, self._closure_reason(add, x, b, ordered))

    def _closure_reason(self, add: ir.Node, x: ir.Value, b: ir.Value, branch: Sequence[ir.Node]) -> str | None:
        """Why the branch is not a single-entry single-exit region (None when it is)."""
        inside = set(branch)
        for node in branch:
            for v in self.consumed[node]:
                if v is not x and v.producer() not in inside and v not in self.constant:
                    return f"the branch reads '{v.name}', computed outside the block"
            for v in node.outputs:
                if v.is_graph_output():
                    return f"'{v.name}' inside the branch is a graph output"
                outside = [u for u in self.users.get(v, ()) if u not in inside and not (u is add and v is b)]
                if outside:
                    return f"'{v.name}' inside the branch is also used by '{label(outside[0])}' outside the block"
        return None

    def projection_block(self, add: ir.Node, p: ir.Value, q: ir.Value) -> ResidualBlock | None:
        """Neither operand depends on the other: a block with a computed shortcut when both come from one value."""
        common = self._ancestors(p) & self._ancestors(q)
        if not common:
            return None
        source = max(common, key=lambda v: self.order.get(v.producer(), -1))
        reason = (f"no identity shortcut: both operands are computed from '{source.name}' "
                  "(a projection or downsample shortcut)")
        return ResidualBlock(add, source, None, (), reason)

    def _ancestors(self, value: ir.Value) -> set[ir.Value]:
        """Non-constant values `value` is computed from, itself included."""
        seen: set[ir.Value] = set()
        stack = [value]
        while stack:
            v = stack.pop()
            if v in seen or v in self.constant:
                continue
            seen.add(v)
            producer = v.producer()
            if producer in self.order:
                stack.extend(self.consumed[producer])
        return seen


def _consumed(node: ir.Node, graph: ir.Graph) -> list[ir.Value]:
    """A node's inputs plus the main-graph values its subgraphs read."""
    values = [v for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            subgraphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            subgraphs = list(attr.value)
        else:
            continue
        for sub in subgraphs:
            for inner in ir.traversal.RecursiveGraphIterator(sub):
                values.extend(v for v in inner.inputs if v is not None and v.graph is graph)
    return list(dict.fromkeys(values))


def _constant_values(
    graph: ir.Graph, nodes: Sequence[ir.Node], consumed: Mapping[ir.Node, list[ir.Value]]
) -> set[ir.Value]:
    """Initializers and the outputs of deterministic standard-domain nodes that read only constants."""
    constant = set(graph.initializers.values())
    for node in nodes:
        deterministic = node.domain in ("", "ai.onnx") and node.op_type not in _RANDOM_OPS
        if deterministic and all(v in constant for v in consumed[node]):
            constant.update(node.outputs)
    return constant


def _shape_reason(block: ResidualBlock, shapes: Mapping[str, ShapeInfo]) -> str | None:
    """Removal rewires y to x: it needs x and y to have the same static shape and a floating type."""
    x, y = shapes.get(block.shortcut.name), shapes.get(block.add.outputs[0].name)
    if x is None or y is None or not x.known or not y.known:
        return f"the shapes of '{block.shortcut.name}' and '{block.add.outputs[0].name}' are unknown"
    if x.shape != y.shape:
        return f"the add broadcasts: shortcut {list(x.shape)} -> output {list(y.shape)}"
    if y.dtype is None or not np.issubdtype(y.dtype, np.floating):
        return f"not a floating-point add ({y.dtype})"
    return None


# ---------------------------------------------------------------------------------- removing blocks


def remove_block(model: ir.Model, block: ResidualBlock) -> None:
    """Make `block` the identity in place: uses of y read x, the branch and its dead constants go.

    Graph output names are kept. Blocks nested in this one's branch may have been removed already:
    only the branch nodes still in the graph are deleted.
    """
    if not block.removable:
        raise ValueError(f"{block.name}: {block.reason}")
    graph = model.graph
    branch = [n for n in block.branch if n.graph is graph]
    gone = set(branch) | {block.add}
    feeding = [v for n in gone for v in n.inputs if v is not None and v.producer() not in gone]
    _bypass(graph, block.add, block.shortcut)
    graph.remove(branch, safe=True)
    _remove_dead_constants(graph, feeding)


def _bypass(graph: ir.Graph, node: ir.Node, replacement: ir.Value) -> None:
    """Delete `node`; its output's users (and a graph output of that name) read `replacement`."""
    out = node.outputs[0]
    is_output, name = out.is_graph_output(), out.name
    if is_output and (replacement.is_graph_output() or replacement.is_graph_input()):
        # One value cannot be a graph input/output under two names: an Identity keeps both.
        identity = ir.node("Identity", [replacement], name=node.name)
        graph.insert_before(node, identity)
        replacement = identity.outputs[0]
    out.replace_all_uses_with(replacement, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if is_output:
        replacement.name = name
        # A graph output needs a declared type; x and y have the same type and shape.
        replacement.type = replacement.type or out.type
        replacement.shape = replacement.shape or out.shape


def _remove_dead_constants(graph: ir.Graph, values: Sequence[ir.Value]) -> None:
    """Initializers and constant-computing nodes that only the removed nodes read."""
    stack = list(values)
    while stack:
        v = stack.pop()
        if v.uses() or v.is_graph_output() or v.is_graph_input() or not _is_constant(v):
            continue
        producer = v.producer()
        if v.is_initializer():
            graph.initializers.pop(v.name, None)
        elif producer is not None and producer.graph is graph and not any(
            o.uses() or o.is_graph_output() for o in producer.outputs
        ):
            stack.extend(i for i in producer.inputs if i is not None)
            graph.remove(producer, safe=True)


def _is_constant(value: ir.Value) -> bool:
    """An initializer, or computed by deterministic standard ops from initializers only."""
    if value.is_initializer() or value.const_value is not None:
        return True
    producer = value.producer()
    if producer is None or producer.domain not in ("", "ai.onnx") or producer.op_type in _RANDOM_OPS:
        return False
    return all(_is_constant(v) for v in producer.inputs if v is not None)


# ---------------------------------------------------------------------------------- scoring


def damage(metric: Metric, reference: Outputs, got: Outputs) -> float:
    """How much `got` departs from `reference`: 0 when equal, larger is worse (worst model output).

    cosine: 1 - cosine similarity; sqnr: noise-to-signal power ratio 10^(-SQNR/10) (0.01 = 20 dB);
    top1: fraction of samples whose top-1 class changes; mse: mean squared error in output units.
    """
    if metric == "mse":
        worst = 0.0
        for k in range(len(reference[0])):
            ref = np.concatenate([np.asarray(s[k], np.float64).ravel() for s in reference])
            new = np.concatenate([np.asarray(s[k], np.float64).ravel() for s in got])
            worst = max(worst, float(np.mean((new - ref) ** 2)) if ref.size else 0.0)
        return worst
    fidelity = compare(reference, got, metric)
    if metric == "cosine":
        return max(0.0, 1.0 - fidelity.cosine)
    if metric == "sqnr":
        return 0.0 if math.isinf(fidelity.sqnr_db) and fidelity.sqnr_db > 0 else float(10 ** (-fidelity.sqnr_db / 10))
    if fidelity.top1_agreement is None:
        raise OnnxCompressError(
            "metric 'top1' needs a model output of class scores [N, classes]; use cosine, sqnr or mse"
        )
    return 1.0 - fidelity.top1_agreement


class _GatedModel:
    """A copy of the model whose removable branches are multiplied by scalar gate inputs (1 = kept)."""

    def __init__(self, model: ir.Model, blocks: Sequence[ResidualBlock]) -> None:
        gated = load(model)
        index = {node: i for i, node in enumerate(model.graph)}
        copies = list(gated.graph)
        self.gates: list[tuple[str, np.dtype]] = []
        for i, block in enumerate(blocks):
            add, dtype = copies[index[block.add]], block.dtype
            slot = 0 if block.add.inputs[0] is block.branch_output else 1
            gate_type = ir.TensorType(ir.DataType.from_numpy(dtype))
            gate = ir.Value(name=f"{GATE_PREFIX}{i}", type=gate_type, shape=ir.Shape([]))
            gated.graph.inputs.append(gate)
            mul = ir.node("Mul", [add.inputs[slot], gate], name=f"{GATE_PREFIX}mul{i}")
            gated.graph.insert_before(add, mul)
            add.replace_input_with(slot, mul.outputs[0])
            self.gates.append((gate.name, dtype))
        self.session = runtime.session(gated)
        self.runs = 0  # passes over a feed list, for the report

    def outputs(self, feeds: Sequence[Mapping[str, np.ndarray]], removed: frozenset[int] = frozenset()) -> Outputs:
        gates = {name: np.asarray(0 if i in removed else 1, dtype) for i, (name, dtype) in enumerate(self.gates)}
        self.runs += 1
        return [self.session.run(None, {**feeds_i, **gates}) for feeds_i in feeds]


# ---------------------------------------------------------------------------------- the pass


@dataclass
class PruneBlocks(Pass):
    """Remove the residual blocks whose removal changes the outputs least on calibration data."""

    name: ClassVar[str] = "prune-blocks"
    exact: ClassVar[bool] = False

    count: int | None = option(None, "Blocks to remove.")
    ratio: float | None = option(None, "Or this fraction of the removable blocks (rounded down).")
    # Stop before the held-out damage in `metric` exceeds this (also a cap when count/ratio are given).
    max_drop: float | None = None
    metric: Metric = option("cosine", "See damage(): cosine, sqnr (noise/signal power), top1, mse.")
    samples: int = option(64, "Calibration samples used (scoring plus held out).")
    holdout: float = option(0.25, "Fraction of them held out for max_drop and the reported fidelity.")
    rescore: bool = option(True, "Re-score the remaining blocks after each removal (about count x more runs).")

    def __post_init__(self) -> None:
        if self.count is None and self.ratio is None and self.max_drop is None:
            raise ValueError("prune-blocks needs count, ratio or max_drop")
        if self.count is not None and self.ratio is not None:
            raise ValueError("give count or ratio, not both")
        if self.count is not None and self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")
        if self.ratio is not None and not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {self.ratio}")
        if self.max_drop is not None and not self.max_drop >= 0.0:
            raise ValueError(f"max_drop must be >= 0, got {self.max_drop}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if ctx.calibration is None:
            raise OnnxCompressError(
                "prune-blocks scores blocks on calibration data: pass --calib "
                "(random data only if asked for explicitly)"
            )
        blocks = find_blocks(model, ctx.input_shapes)
        macs = _branch_macs(model, ctx, blocks)
        candidates = [b for b in blocks if b.removable]
        cap = self._cap(len(candidates))
        notes = [f"scored on random calibration data ({ctx.calibration.source}): block choice is meaningless "
                 "for real inputs"] if ctx.calibration.is_random else []
        records = {b.add: _record(b, macs[b.add]) for b in blocks}
        details = {
            "metric": self.metric, "found": len(blocks), "removable": len(candidates), "removed": 0,
            "macs_removed": 0, "notes": notes, "blocks": list(records.values()),
        }
        skipped = [f"{b.name}: {b.reason}" for b in blocks if not b.removable]
        if not candidates or cap == 0:
            for record in records.values():
                record["reason"] = record["reason"] or f"kept: {self._cap_option()} allows no removal"
            return self.result(model, skipped=skipped, details=details, modified=False)

        fit, held, split_notes = self._split(model, ctx.calibration)
        notes.extend(split_notes)
        gated = _GatedModel(model, candidates)
        reference_fit, reference_held = gated.outputs(fit), gated.outputs(held)
        if self.metric == "top1":
            damage("top1", reference_fit, reference_fit)  # fails clearly when no output is class scores

        def score(removed: frozenset[int], held_out: bool = False) -> tuple[float, float]:
            """(damage in `metric`, cosine damage as the tie-break) of removing these candidates."""
            feeds, reference = (held, reference_held) if held_out else (fit, reference_fit)
            got = gated.outputs(feeds, removed)
            return damage(self.metric, reference, got), damage("cosine", reference, got)

        branches = [set(b.branch) for b in candidates]
        nested = [{j for j, inner in enumerate(candidates) if inner.add in branches[i]} for i in range(len(candidates))]
        sizes = [macs[b.add] for b in candidates]
        chosen, solo, steps, stop = self._select(score, sizes, cap, nested)

        baseline = outputs(model, held, "input model")
        for i in chosen:
            remove_block(model, candidates[i])
        pruned = outputs(model, held, f"pass '{self.name}'")
        held_source = ctx.calibration.source + ("" if fit is held else " (held out)")

        for i, block in enumerate(candidates):
            record = records[block.add]
            record["score"] = solo[i][0]
            if i in chosen:
                k = chosen.index(i)
                record["removed"], record["step"] = True, k + 1
                record["reason"] = (f"removed at step {k + 1} ({self.metric} damage {steps[k]:.3g} "
                                    "on the scoring samples)")
            else:
                outer = next((candidates[j].name for j in chosen if i in nested[j]), None)
                record["reason"] = (f"removed with the enclosing block {outer}" if outer
                                    else stop.get(i, f"kept: more harmful than the {len(chosen)} removed"))
                record["removed"] = outer is not None
        outermost = [i for i in chosen if not any(i in nested[j] for j in chosen)]
        details.update({
            "removed": len(chosen), "removed_nested": sum(r["removed"] for r in records.values()) - len(chosen),
            "macs_removed": sum(macs[candidates[i].add] for i in outermost),
            "rescore": self.rescore, "scoring_samples": _count(fit), "held_out_samples": _count(held),
            "model_runs": gated.runs, "held_out_damage": damage(self.metric, baseline, pruned),
            "fidelity": dataclasses.asdict(compare(baseline, pruned, held_source)),
        })
        changes = [f"{candidates[i].name}: residual branch removed ({len(candidates[i].branch)} nodes, "
                   f"{macs[candidates[i].add]} MACs, {self.metric} damage alone {solo[i][0]:.3g})" for i in chosen]
        return self.result(model, changes=changes, skipped=skipped, details=details)

    def _cap_option(self) -> str:
        return f"count {self.count}" if self.count is not None else f"ratio {self.ratio}"

    def _cap(self, removable: int) -> int:
        if self.count is not None:
            return min(self.count, removable)
        if self.ratio is not None:
            return int(math.floor(self.ratio * removable + 1e-9))  # 0.3 * 10 is 2.9999999999999996
        return removable

    def _split(self, model: ir.Model, calibration: Calibration) -> tuple[list[dict], list[dict], list[str]]:
        """Feed lists for scoring and for held-out checks, batched as the model's inputs allow."""
        n = min(self.samples, calibration.num_samples)
        used = calibration.samples(0, n)
        notes = []
        size, fixed = batch_size_for(model, EVAL_BATCH), _batch_is_fixed(model)

        def feeds(part: Calibration) -> list[dict]:
            return [f for f in part.batches(size) if not fixed or len(next(iter(f.values()))) == size]

        if n >= MIN_SAMPLES_TO_HOLD_OUT:
            fit_part, held_part = used.split(self.holdout)
            fit, held = feeds(fit_part), feeds(held_part)
        else:
            fit = held = feeds(used)
            notes.append(f"only {n} calibration samples: none held out, "
                         "max_drop and fidelity are on the scoring samples")
        if not fit or not held:
            raise OnnxCompressError(
                f"prune-blocks needs at least {2 * size} calibration samples for a model with batch size {size}"
            )
        return fit, held, notes

    def _select(
        self, score: Callable[..., tuple[float, float]], sizes: Sequence[int], cap: int, nested: Sequence[set[int]]
    ) -> tuple[list[int], dict[int, tuple[float, float]], list[float], dict[int, str]]:
        """Greedy choice: (chosen indices in order, each block's damage alone, damage after each step,
        the reason selection stopped, keyed by the block it stopped at)."""
        n = len(sizes)
        solo = {i: score(frozenset({i})) for i in range(n)}
        chosen: list[int] = []
        steps: list[float] = []
        stop: dict[int, str] = {}
        active = list(range(n))
        while active and len(chosen) < cap:
            if self.rescore and chosen:
                scores = {i: score(frozenset(chosen) | {i}) for i in active}
            else:
                scores = {i: solo[i] for i in active}
            # Equal damage (top-1 ties, branches that contribute nothing): the larger branch saves more.
            best = min(active, key=lambda i: (scores[i], -sizes[i], i))
            removed = frozenset(chosen) | {best}
            if self.max_drop is not None:
                held = score(removed, held_out=True)[0]
                if held > self.max_drop:
                    stop[best] = (f"kept: removing it as well would take the held-out {self.metric} damage to "
                                  f"{held:.3g} > max_drop {self.max_drop:g}")
                    break
            chosen.append(best)
            # Without re-scoring only single removals were scored: measure the combination once.
            steps.append(scores[best][0] if len(removed) == 1 or self.rescore else score(removed)[0])
            active = [i for i in active if i != best and i not in nested[best]]
        return chosen, solo, steps, stop


def _record(block: ResidualBlock, macs: int) -> dict:
    return {
        "add": block.name, "op_type": block.add.op_type, "shortcut": block.shortcut.name,
        "output": block.add.outputs[0].name, "branch": [label(n) for n in block.branch], "macs": macs,
        "removable": block.removable, "score": None, "removed": False, "step": None, "reason": block.reason,
    }


def _branch_macs(model: ir.Model, ctx: PassContext, blocks: Sequence[ResidualBlock]) -> dict[ir.Node, int]:
    if ctx.model is model:
        report = ctx.get(cost_analysis)
    else:
        from ..analysis.cost import analyze_cost

        report = analyze_cost(model, ctx.input_shapes)
    per_node = {node: cost.macs for node, cost in zip(model.graph, report.nodes)}
    return {b.add: sum(per_node.get(n, 0) for n in b.branch) for b in blocks}


def _batch_is_fixed(model: ir.Model) -> bool:
    from ..model import graph_inputs

    for value in graph_inputs(model):
        dims = list(value.shape.dims) if value.shape is not None else []
        if dims and isinstance(dims[0], int):
            return True
    return False


def _count(feeds: Sequence[Mapping[str, np.ndarray]]) -> int:
    return sum(len(next(iter(f.values()))) for f in feeds)


__all__ = ["PruneBlocks", "ResidualBlock", "damage", "find_blocks", "remove_block"]

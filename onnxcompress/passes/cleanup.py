"""Cleanup passes: fold constants, fold BatchNorm and per-channel affine ops into weights, fold zero
padding into convolutions, drop no-ops.

Each is exact: outputs change only by float rounding, which the pipeline verifies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import onnxscript.optimizer as onnxscript_optimizer
from onnxscript import rewriter
from onnxscript.rewriter.rules.common import fuse_pad_into_conv_rule

from ..names import fresh_name
from ..pipeline import Pass, PassContext, PassResult, option

# Ops that are constant given constant inputs but that onnxscript keeps by default (they can create
# large tensors); model-zoo files store every weight as a ConstantOfShape, so we do want them folded.
_ALWAYS_FOLD = {"ConstantOfShape"}


@dataclass
class FoldConstants(Pass):
    """Evaluate every node whose inputs are all constant; weights stored as nodes become initializers."""

    name: ClassVar[str] = "fold-constants"
    max_tensor_mb: float = option(4096.0, "Do not materialize constants larger than this.")
    keep_initializer_inputs: bool = option(False, "Old-IR models list weights as graph inputs too.")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        changes = []
        nodes_before = _node_count(model)
        if not self.keep_initializer_inputs:
            lifted = [v.name for v in model.graph.inputs if v.name in model.graph.initializers]
            if lifted:
                ir_passes.RemoveInitializersFromInputsPass()(model)
                changes.append(f"{len(lifted)} initializers are no longer listed as graph inputs")
                if model.ir_version < 4:  # IR < 4 requires every initializer to be a graph input
                    changes.append(f"IR version {model.ir_version} -> 4 (initializers need not be inputs)")
                    model.ir_version = 4
        ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        limit = int(self.max_tensor_mb * 2**20)
        onnxscript_optimizer.fold_constants(
            model,
            onnx_shape_inference=True,  # lets Shape -> Gather chains on static dims fold to constants
            input_size_limit=limit,
            output_size_limit=limit,
            should_fold=lambda node: True if node.op_type in _ALWAYS_FOLD else None,
        )
        ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        ir_passes.RemoveUnusedNodesPass()(model)
        for value in model.graph.initializers.values():
            _type_from_tensor(value)
        folded = nodes_before - _node_count(model)
        if folded:
            changes.append(f"{folded} constant nodes folded into initializers")
        return self.result(model, changes=changes)


@dataclass
class EliminateNoOps(Pass):
    """Remove Identity, inference-mode Dropout, unused nodes, initializers and duplicate initializers."""

    name: ClassVar[str] = "eliminate-noops"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        changes, skipped = [], []
        for node in list(model.graph):
            if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
                continue
            if len(node.outputs) > 1 and node.outputs[1].uses():
                skipped.append(f"{node.name}: Dropout mask is used")
                continue
            training = node.inputs[2] if len(node.inputs) > 2 else None
            if training is not None and (training.const_value is None or bool(training.const_value.numpy())):
                skipped.append(f"{node.name}: Dropout may run in training mode")
                continue
            _bypass(model, node, node.inputs[0])
            changes.append(f"{node.name}: Dropout removed (inference)")
        n_before = _node_count(model)
        ir_passes.IdentityEliminationPass()(model)
        identities = n_before - _node_count(model)
        if identities:
            changes.append(f"{identities} Identity nodes removed")
        n_before, i_before = _node_count(model), len(model.graph.initializers)
        ir_passes.RemoveUnusedNodesPass()(model)
        ir_passes.DeduplicateInitializersPass()(model)
        ir_passes.RemoveUnusedNodesPass()(model)
        dead = n_before - _node_count(model)
        if dead:
            changes.append(f"{dead} unused nodes removed")
        dropped = i_before - len(model.graph.initializers)
        if dropped:
            changes.append(f"{dropped} unused or duplicate initializers removed")
        return self.result(model, changes=changes, skipped=skipped)


@dataclass
class FoldBatchNorm(Pass):
    """Fold BatchNormalization and per-channel Mul/Add/Sub/Div by constants into the preceding Conv,
    ConvTranspose or Gemm: W' = W * s along the output-channel axis, b' = b * s + t."""

    name: ClassVar[str] = "fold-batchnorm"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        changes, skipped = [], []
        progress = True
        while progress:  # a Conv followed by BN then Mul then Add folds all three, one per sweep
            progress = False
            for node in list(model.graph):
                affine = _as_channel_affine(node)
                if affine is None:
                    continue
                producer = node.inputs[0].producer()
                if producer is None or producer.op_type not in _WEIGHT_AXIS:
                    continue
                reason = _fold(model, producer, node, *affine)
                if reason is None:
                    changes.append(f"{node.name or node.op_type}: {node.op_type} folded into {producer.name or producer.outputs[0].name}")
                    progress = True
                elif node.op_type == "BatchNormalization":
                    skipped.append(f"{node.name}: {reason}")
        return self.result(model, changes=changes, skipped=sorted(set(skipped)))


@dataclass
class FusePadIntoConv(Pass):
    """Fold a zero-constant Pad of spatial axes into the following Conv's `pads` (onnxscript's rule).

    Exported TF-style "same" padding leaves a Pad before most convolutions; in an int8 graph it sits
    between a DequantizeLinear and a QuantizeLinear that no runtime fuses, so it runs in float and
    costs a dequantize/quantize round trip per layer. Pads whose amounts are computed become constant
    once constants are folded (FoldConstants)."""

    name: ClassVar[str] = "fuse-pad"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        before = _count(model, "Pad")
        if any(n.op_type == "Pad" and n.inputs[0].shape is None for n in model.graph):
            ir_passes.ShapeInferencePass()(model)  # the rule needs each Pad input's rank
        if before:
            model = rewriter.rewrite(model, pattern_rewrite_rules=[fuse_pad_into_conv_rule])
        fused = before - _count(model, "Pad")
        return self.result(model, changes=[f"{fused} Pad nodes folded into the following Conv"] if fused else [])


def _count(model: ir.Model, op_type: str) -> int:
    return sum(1 for node in model.graph if node.op_type == op_type)


def _type_from_tensor(value: ir.Value) -> None:
    """Keep an initializer's declared type and shape in step with its tensor."""
    if value.const_value is not None:
        value.type = ir.TensorType(value.const_value.dtype)
        value.shape = ir.Shape(value.const_value.shape)


def _node_count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph)


def _bypass(model: ir.Model, node: ir.Node, replacement: ir.Value) -> None:
    """Remove single-output `node`, its consumers reading `replacement` instead; graph output names kept."""
    out = node.outputs[0]
    is_output, name = out.is_graph_output(), out.name
    if is_output and (replacement.is_graph_output() or replacement.is_graph_input()):
        # One value cannot be two graph inputs/outputs under two names: keep an Identity between them.
        identity = ir.node("Identity", [replacement], name=node.name)
        model.graph.insert_before(node, identity)
        replacement = identity.outputs[0]
    out.replace_all_uses_with(replacement, replace_graph_outputs=True)
    model.graph.remove(node, safe=True)
    if is_output:  # the graph output keeps its name and declared type
        replacement.name = name
        replacement.type = replacement.type or out.type
        replacement.shape = replacement.shape or out.shape


# Axis of the weight that holds output channels, per op (Gemm depends on transB).
_WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1, "Gemm": None}


def _as_channel_affine(node: ir.Node) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """(scale, shift, is_channel_vector) if `node` is y = x * scale + shift with constant parameters; else None.

    BatchNorm's parameters are [C] vectors along axis 1; the others' are numpy-broadcast constants.
    """
    if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
        return None
    op = node.op_type
    if op == "BatchNormalization":
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return None
        params = [v.const_value for v in node.inputs[1:5]]
        if any(p is None for p in params):
            return None
        gamma, beta, mean, var = (p.numpy().astype(np.float64) for p in params)
        eps = node.attributes.get_float("epsilon", 1e-5)
        scale = gamma / np.sqrt(var + eps)
        return scale, beta - mean * scale, True
    if op not in ("Mul", "Add", "Sub", "Div") or len(node.inputs) != 2:
        return None
    const = node.inputs[1].const_value
    if const is None:
        return None
    c = const.numpy().astype(np.float64)
    if op == "Div" and not np.all(c):  # x / 0 is inf or nan, not a scale to fold
        return None
    ones, zeros = np.ones_like(c), np.zeros_like(c)
    if op in ("Mul", "Div"):
        return (c if op == "Mul" else 1.0 / c), zeros, False
    return ones, (c if op == "Add" else -c), False


def _per_channel(param: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """`param` as a [channels] vector if it broadcasts along axis 1 only of a rank-`rank` tensor."""
    if param.ndim > rank:
        return None
    shape = (1,) * (rank - param.ndim) + param.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(param.reshape(-1), (channels,)).astype(np.float64)


def _fold(
    model: ir.Model, producer: ir.Node, affine: ir.Node, scale: np.ndarray, shift: np.ndarray, channel_vector: bool
) -> str | None:
    """Fold the affine op into the producer's weight and bias; the reason it cannot, or None when done."""
    out = producer.outputs[0]
    if len(out.uses()) != 1 or out.is_graph_output():
        return f"{producer.name} output has other consumers"
    weight = producer.inputs[1] if len(producer.inputs) > 1 else None
    if weight is None or weight.const_value is None or weight.is_graph_input():
        return f"{producer.name} weight is not a constant"
    bias = producer.inputs[2] if len(producer.inputs) > 2 else None
    if bias is not None and (bias.const_value is None or bias.is_graph_input()):
        return f"{producer.name} bias is not a constant"
    if any(len(v.uses()) > 1 for v in (weight, bias) if v is not None):
        return f"{producer.name} weight or bias is shared with other nodes"
    w = weight.const_value.numpy()
    if not np.issubdtype(w.dtype, np.floating):
        return f"{producer.name} weight is not floating point"
    group = producer.attributes.get_int("group", 1)
    if producer.op_type == "Gemm":
        rank, axis = 2, (0 if producer.attributes.get_int("transB", 0) else 1)
        channels = w.shape[axis]
    elif producer.op_type == "ConvTranspose":
        rank, channels = w.ndim, w.shape[1] * group
    else:
        rank, axis, channels = w.ndim, 0, w.shape[0]
    if channel_vector:
        scale, shift = (p.reshape((1, -1) + (1,) * (rank - 2)) for p in (scale, shift))
    s, t = _per_channel(scale, rank, channels), _per_channel(shift, rank, channels)
    if s is None or t is None:
        return f"{affine.name} parameters are not per-channel"
    b = np.zeros(channels) if bias is None else bias.const_value.numpy().astype(np.float64)
    if producer.op_type == "Gemm":
        beta = producer.attributes.get_float("beta", 1.0)
        if b.size not in (1, channels) or (b.ndim == 2 and b.shape[0] != 1):
            return f"{producer.name} bias is not a per-output vector"
        b = beta * np.broadcast_to(b.reshape(-1), (channels,))
        producer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    if producer.op_type == "ConvTranspose":
        w_new = (w.reshape(group, w.shape[0] // group, w.shape[1], *w.shape[2:])
                 * s.reshape(group, 1, w.shape[1], *([1] * (w.ndim - 2)))).reshape(w.shape)
    else:
        w_new = w * s.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    b_new = b.reshape(-1) * s + t
    weight.const_value = ir.tensor(w_new.astype(w.dtype), name=weight.name)
    if bias is None:
        name = fresh_name(model, f"{weight.name}_bias")
        bias = ir.Value(name=name, const_value=ir.tensor(b_new.astype(w.dtype), name=name))
        model.graph.register_initializer(bias)
        producer.resize_inputs(3)
        producer.replace_input_with(2, bias)
    else:
        bias.const_value = ir.tensor(b_new.astype(w.dtype), name=bias.name)
    _type_from_tensor(weight)
    _type_from_tensor(bias)
    _bypass(model, affine, out)
    return None



"""The executor: `GraphModule` runs an ONNX graph node by node with the op translations (`OPS`), holds
the float32 weights as parameters, and writes trained values back (see the package docstring)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from ..errors import OnnxCompressError
from ..model import graph_inputs
from .common import Attrs, Handler, Tensor
from .data_movement import DATA_MOVEMENT_OPS
from .elementwise import ELEMENTWISE_OPS
from .errors import UnsupportedGraphError
from .layers import LAYER_OPS, batchnorm

#: Input slots of each op that hold learnable weights when fed by a float32 initializer.
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1), "PRelu": (1,),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
}
#: An Add with a constant operand right after one of these is the layer's bias kept outside it.
BIASED_LAYERS = frozenset({"MatMul", "Conv", "Gemm", "ConvTranspose"})
ONNX_DOMAINS = ("", "ai.onnx")

#: Op type -> its torch translation, handler(attrs, inputs, opset, n_outputs).
OPS: dict[str, Handler] = {**LAYER_OPS, **ELEMENTWISE_OPS, **DATA_MOVEMENT_OPS}


def _attr_value(attr: ir.Attr) -> Any:
    if attr.type == ir.AttributeType.TENSOR:
        return torch.from_numpy(np.array(attr.value.numpy()))
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        raise UnsupportedGraphError(f"attribute '{attr.name}' holds a subgraph, which the torch executor does not run")
    value = attr.value
    return tuple(value) if isinstance(value, (list, tuple)) else value


def opset_version(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def unsupported_ops(model: ir.Model) -> list[str]:
    """Op types (domain-qualified outside the default domain) the executor cannot run, sorted."""
    missing = set()
    for node in model.graph:
        if node.domain not in ONNX_DOMAINS:
            missing.add(f"{node.domain}::{node.op_type}")
        elif node.op_type not in OPS:
            missing.add(node.op_type)
    return sorted(missing)


def weight_initializers(model: ir.Model) -> list[str]:
    """Names of float32 initializers that feed a weight or bias slot (see the module docstring)."""
    graph = model.graph
    fed = {v.name for v in graph_inputs(model)}
    names: list[str] = []

    def take(value: ir.Value | None) -> None:
        if value is None or value.name in fed or value.name in names:
            return
        init = graph.initializers.get(value.name)
        if init is not None and init.const_value is not None and init.const_value.dtype == ir.DataType.FLOAT:
            names.append(value.name)

    for node in graph:
        if node.domain not in ONNX_DOMAINS:
            continue
        for slot in WEIGHT_SLOTS.get(node.op_type, ()):
            if slot < len(node.inputs):
                take(node.inputs[slot])
        if node.op_type == "Add" and len(node.inputs) == 2:
            for mine, other in ((0, 1), (1, 0)):
                producer = node.inputs[other].producer() if node.inputs[other] is not None else None
                if producer is not None and producer.op_type in BIASED_LAYERS:
                    take(node.inputs[mine])
    return names


@dataclass(frozen=True)
class _Step:
    label: str
    op: str
    handler: Handler
    attrs: Mapping[str, Any]
    inputs: tuple[str, ...]  # "" for an omitted optional input
    outputs: tuple[str, ...]


class GraphModule(nn.Module):
    """An ONNX graph evaluated with torch; `forward(feeds)` returns the graph outputs (and any `extra` values)."""

    def __init__(self, model: ir.Model, *, trainable: bool = True, norm_training: bool = False) -> None:
        super().__init__()
        missing = unsupported_ops(model)
        if missing:
            raise UnsupportedGraphError(f"the torch executor does not support op {', '.join(missing)}")
        graph = model.graph
        self.opset = opset_version(model)
        self.norm_training = norm_training
        self.input_names = [v.name for v in graph_inputs(model)]
        self.output_names = [v.name for v in graph.outputs]
        learnable = set(weight_initializers(model)) if trainable else set()
        self.weights = nn.ParameterList()
        self.weight_names: list[str] = []
        self._slots: list[tuple[str, str]] = []  # (value name, attribute holding its tensor)
        self.norm_stats: list[str] = []
        fed = set(self.input_names)
        for i, (name, value) in enumerate(graph.initializers.items()):
            if name in fed or value.const_value is None:
                continue
            tensor = torch.from_numpy(np.array(value.const_value.numpy()))
            if name in learnable:
                self._slots.append((name, f"weights.{len(self.weight_names)}"))
                self.weights.append(nn.Parameter(tensor))
                self.weight_names.append(name)
            else:
                self.register_buffer(f"const_{i}", tensor, persistent=False)
                self._slots.append((name, f"const_{i}"))
        self._steps: list[_Step] = []
        for k, node in enumerate(graph):
            label = node.name or f"{node.op_type}_{k}"
            attrs = {name: _attr_value(attr) for name, attr in node.attributes.items()}
            handler = OPS[node.op_type]
            if node.op_type == "BatchNormalization" and norm_training:
                handler = self._batchnorm_step
                self.norm_stats += [v.name for v in node.inputs[3:5] if v is not None and v.name in graph.initializers]
            self._steps.append(_Step(
                label, node.op_type, handler, attrs,
                tuple(v.name if v is not None else "" for v in node.inputs),
                tuple(v.name if v is not None else "" for v in node.outputs),
            ))

    def _batchnorm_step(self, a: Attrs, x: list, opset: int, n: int) -> Tensor:
        return batchnorm(a, x, opset, n, training=self.training)

    def tensors(self) -> dict[str, Tensor]:
        """Initializer name -> its current tensor (parameter or buffer)."""
        return {name: self._tensor(slot) for name, slot in self._slots}

    def _tensor(self, slot: str) -> Tensor:
        return self.weights[int(slot.split(".")[1])] if slot.startswith("weights.") else getattr(self, slot)

    def forward(self, feeds: Mapping[str, Tensor], extra: Sequence[str] = ()) -> list[Tensor]:
        env: dict[str, Tensor | None] = {"": None}
        for name, slot in self._slots:
            env[name] = self._tensor(slot)
        for name in self.input_names:
            env[name] = feeds[name]
        for step in self._steps:
            args = [env[name] for name in step.inputs]
            try:
                result = step.handler(step.attrs, args, self.opset, len(step.outputs))
            except OnnxCompressError:
                raise
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise UnsupportedGraphError(f"torch executor failed at node {step.label} ({step.op}): {first}") from None
            results = result if isinstance(result, (list, tuple)) else [result]
            for name, value in zip(step.outputs, results):
                if name:
                    env[name] = value
        return [env[name] for name in (*self.output_names, *extra)]

    def write_back(self, model: ir.Model) -> list[str]:
        """Copy trained values into `model`'s initializers of the same names; returns the names changed.

        Only values change (each keeps its dtype and shape): names, nodes, inputs and outputs do not.
        """
        tensors = self.tensors()
        changed = []
        for name in (*self.weight_names, *self.norm_stats):
            value = model.graph.initializers[name]
            old = value.const_value.numpy()
            new = tensors[name].detach().cpu().numpy().astype(old.dtype, copy=False)
            if new.shape != old.shape:
                raise OnnxCompressError(f"initializer '{name}' changed shape during training: {old.shape} -> {new.shape}")
            if not np.array_equal(new, old):
                value.const_value = ir.tensor(np.ascontiguousarray(new), name=name)
                changed.append(name)
        return changed


def to_torch(model: ir.Model, *, trainable: bool = True, norm_training: bool = False) -> GraphModule:
    """`model` as a torch module (weights copied: the model is not modified until `write_back`)."""
    return GraphModule(model, trainable=trainable, norm_training=norm_training)

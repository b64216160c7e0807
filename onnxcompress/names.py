"""Fresh names for the values, initializers and nodes a pass adds: one allocator for every pass.

ONNX graphs name values globally, so a new name must avoid every value, initializer, graph input
and node name already there. Candidates are `base`, `base_1`, `base_2`, ... and a name handed out
is taken from then on, so several new names from one allocator never collide with each other.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir


class NameAllocator:
    """Names not yet used in an onnx_ir model's main graph, or in a set of names."""

    def __init__(self, source: ir.Model | Iterable[str] = ()) -> None:
        if isinstance(source, ir.Model):
            graph = source.graph
            values = {v.name for n in graph for v in (*n.inputs, *n.outputs) if v is not None and v.name}
            self.taken = values | set(graph.initializers) | {v.name for v in graph.inputs} | {n.name for n in graph if n.name}
        else:
            self.taken = set(source)

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    __call__ = fresh


def fresh_name(model: ir.Model, base: str) -> str:
    """One new name in `model` (for several, keep a NameAllocator)."""
    return NameAllocator(model).fresh(base)


__all__ = ["NameAllocator", "fresh_name"]

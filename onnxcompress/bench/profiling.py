"""Per-layer times: ORT's profile of a separate session, its kernels mapped back to the model's nodes
(by name, then through the names ORT gives fused and transformed kernels) and their MACs."""

from __future__ import annotations

import bisect
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from .candidates import Candidate, one_line
from .options import BenchOptions
from .report import LayerTime
from .timing import ort_session

#: How far upstream a renamed ORT kernel is followed to find the model node it was built from.
FUSION_DEPTH = 8


@dataclass
class KernelTime:
    """One kernel (ORT node) of a profile: its durations in each profiled run, in microseconds."""

    name: str
    op_name: str
    provider: str | None
    per_run_us: list[float]


_KERNEL_SUFFIX = "_kernel_time"
#: Pieces ORT adds when it renames a node it fused or transformed: "fused fc/MatMulAddFusion",
#: "<output value>_nchwc", "<name>_token_3".
_ORT_NAME_PARTS = tuple(re.compile(p) for p in (r"^fused\s+", r"/\w*Fusion$", r"_nchwc$", r"_token_\d+$"))
#: Kernel op names that are a model op with a prefix or suffix (FusedConv, QLinearMatMul, MatMulInteger).
_KERNEL_OP_PREFIXES = ("NhwcFused", "Nhwc", "Fused", "QLinear", "DynamicQuantize")
_KERNEL_OP_SUFFIXES = ("Integer", "NBits")


def profile(
    cand: Candidate, batch: int, options: BenchOptions, providers: Sequence[str], threads: int, notes: list[str]
) -> None:
    """Per-layer times from a separate profiled session (profiling slows runs, so never the timed ones)."""
    try:
        with tempfile.TemporaryDirectory(prefix="onnxcompress-profile-") as tmp:
            session = ort_session(cand.source, providers, threads, profile_prefix=os.path.join(tmp, "profile"))
            for _ in range(max(1, options.warmup) + options.profile_runs):
                session.run(None, cand.feeds)
            trace = Path(session.end_profiling())
            events = json.loads(trace.read_text())
            del session
    except Exception as exc:
        notes.append(f"{cand.label} at batch {batch}: profiling failed: {one_line(exc)}")
        return
    kernels = kernel_times(events, options.profile_runs)
    cand.layers = map_layers(kernels, cand.model, cand.node_macs if cand.macs is not None else None)


def kernel_times(events: Sequence[Mapping[str, Any]], runs: int) -> list[KernelTime]:
    """Per-kernel durations (us) in each of the last `runs` model runs of an ORT profile, in execution order."""
    model_runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )[-runs:]
    starts = [e["ts"] for e in model_runs]
    kernels: dict[str, KernelTime] = {}
    for event in sorted((e for e in events if e.get("cat") == "Node"), key=lambda e: e["ts"]):
        name = str(event.get("name", ""))
        if not name.endswith(_KERNEL_SUFFIX):
            continue
        index = bisect.bisect_right(starts, event["ts"]) - 1
        if index < 0 or event["ts"] > starts[index] + model_runs[index]["dur"]:
            continue  # a warm-up run
        name = name[: -len(_KERNEL_SUFFIX)]
        args = event.get("args", {})
        if name not in kernels:
            op_name, provider = str(args.get("op_name", "?")), args.get("provider")
            kernels[name] = KernelTime(name, op_name, provider, [0.0] * len(model_runs))
        kernel = kernels[name]
        kernel.per_run_us[index] += float(event["dur"])  # a kernel can run several times per run (loops)
    return list(kernels.values())


def map_layers(
    kernels: Sequence[KernelTime], model: ir.Model, node_macs: Mapping[str, int] | None
) -> tuple[LayerTime, ...]:
    """Match profiled kernels to model nodes: by name, then through ORT's renamings; list what is left.

    Claims go from the surest to the least sure, and a node is claimed once: exact names; then
    renamed kernels whose name leads straight to a node of the kernel's op; then renamed kernels
    that must be traced upstream through fused nodes (Conv <- BatchNorm <- Add <- Relu).
    """
    nodes = {node.name: node for node in ir.traversal.RecursiveGraphIterator(model.graph)}
    producers = {out.name: node for node in nodes.values() for out in node.outputs}
    claimed: set[str] = set()
    groups: dict[str, tuple[tuple[str, ...], str]] = {}
    anchors: dict[str, ir.Node | None] = {}
    for kernel in kernels:
        if kernel.name in nodes:
            groups[kernel.name] = ((kernel.name,), "exact")
            claimed.add(kernel.name)
        else:
            anchors[kernel.name] = _renamed_anchor(kernel.name, nodes, producers)
    direct = [k for k in kernels if k.name in anchors and _is_op(anchors[k.name], k.op_name)]
    traced = [k for k in kernels if k.name in anchors and not _is_op(anchors[k.name], k.op_name)]
    for kernel in direct + traced:
        anchor = anchors[kernel.name]
        members = _fused_path(anchor, _base_op(kernel.op_name), claimed) if anchor is not None else ()
        groups[kernel.name] = (members, "renamed" if members else "unmatched")
        claimed.update(members)

    layers = []
    for kernel in kernels:
        members, match = groups[kernel.name]
        time_ms = float(np.median(kernel.per_run_us)) / 1e3
        macs = sum(node_macs.get(n, 0) for n in members) if node_macs is not None and members else None
        gmacs = macs / (time_ms * 1e-3) / 1e9 if macs and time_ms > 0 else None
        layers.append(LayerTime(kernel.name, kernel.op_name, members, match, time_ms, macs, gmacs, kernel.provider))
    for name, node in nodes.items():
        if name not in claimed and node_macs is not None and node_macs.get(name, 0) > 0:
            layers.append(LayerTime(None, node.op_type, (name,), "absorbed", None, node_macs[name], None, None))
    return tuple(layers)


def _renamed_anchor(kernel_name: str, nodes: Mapping[str, ir.Node], producers: Mapping[str, ir.Node]) -> ir.Node | None:
    """The node an ORT-made kernel name comes from: ORT names fused kernels after a node or after the
    output value of the last fused node ("r_nchwc" for Conv+Relu writing "r")."""
    name = kernel_name
    for pattern in _ORT_NAME_PARTS:
        name = pattern.sub("", name)
    return nodes.get(name) or producers.get(name)


def _fused_path(anchor: ir.Node, base_op: str, claimed: set[str]) -> tuple[str, ...]:
    """Nodes from the nearest unclaimed upstream node of `base_op` down to `anchor` (breadth first, so
    a residual Add reaches its own Conv before the skip branch's); just the anchor if there is none."""
    if anchor.name in claimed:
        return ()
    if anchor.op_type == base_op:
        return (anchor.name,)
    parent: dict[ir.Node, ir.Node] = {}
    frontier = [anchor]
    for _ in range(FUSION_DEPTH):
        next_frontier = []
        for node in frontier:
            for value in node.inputs:
                producer = value.producer() if value is not None else None
                if producer is None or producer in parent or producer is anchor:
                    continue
                if producer.op_type == "Constant" or producer.name in claimed:
                    continue
                parent[producer] = node
                if producer.op_type == base_op:
                    path = [producer]
                    while path[-1] is not anchor:
                        path.append(parent[path[-1]])
                    return tuple(n.name for n in path)
                next_frontier.append(producer)
        frontier = next_frontier
    return (anchor.name,)


def _is_op(node: ir.Node | None, kernel_op: str) -> bool:
    return node is not None and node.op_type == _base_op(kernel_op)


def _base_op(op_name: str) -> str:
    for prefix in _KERNEL_OP_PREFIXES:
        if op_name.startswith(prefix) and len(op_name) > len(prefix):
            op_name = op_name[len(prefix) :]
            break
    for suffix in _KERNEL_OP_SUFFIXES:
        if op_name.endswith(suffix) and len(op_name) > len(suffix):
            op_name = op_name[: -len(suffix)]
            break
    return op_name

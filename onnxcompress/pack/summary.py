"""What `pack_model` did, in lines for people (the CLI prints them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..report import output_metric_texts, to_jsonable
from .write import PackStats


def size_change(before: int, after: int) -> str:
    """'2.50x smaller' or '1.18x larger': a ratio below 1 reads as the wrong claim."""
    if after <= before:
        return f"{before / max(after, 1):.2f}x smaller"
    return f"{after / max(before, 1):.2f}x larger"


def summary_lines(stats: PackStats) -> list[str]:
    """Human-readable lines: sizes and ratios, what was used, and fidelity for lossy packing."""
    lines = [(f"wrote {stats.path}: {stats.packed_bytes:,} bytes ({stats.mode}), "
              f"{size_change(stats.onnx_bytes, stats.packed_bytes)} than the ONNX model ({stats.onnx_bytes:,} bytes)")]
    if stats.gzip_bytes:
        lines.append(f"gzip -9 of the ONNX model: {stats.gzip_bytes:,} bytes ({stats.onnx_bytes / stats.gzip_bytes:.2f}x); "
                     f".occ is {size_change(stats.gzip_bytes, stats.packed_bytes)} than that")
    encodings = ", ".join(f"{n} {e}" for e, n in sorted(stats.encodings.items())) or "none"
    codecs = ", ".join(f"{n} {c}" for c, n in sorted(stats.codecs.items()))
    lines.append(f"{stats.sections} sections (tensor encodings: {encodings}; codecs: {codecs}) in {stats.seconds:.1f} s")
    if stats.weight_share:
        details = stats.weight_share["details"]
        options = stats.weight_share["weight_share"]
        lines.append(f"weight sharing: {details['tensors']} tensors, bits {options['bits']}, sparsity {options['sparsity']:g} "
                     f"({details['zero_fraction']:.0%} of their weights zero)")
    if stats.fidelity is not None:
        lines.append(f"fidelity against the input model: {fidelity_text(to_jsonable(stats.fidelity))}")
    return lines


def fidelity_text(fidelity: Mapping[str, Any]) -> str:
    """One line from a Fidelity as JSON data."""
    parts = [f"SQNR {fidelity['sqnr_db']:.1f} dB", f"cosine {fidelity['cosine']:.5f}",
             f"max rel error {fidelity['max_rel_error']:.3g}"]
    if fidelity.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {fidelity['top1_agreement']:.1%}")
    parts += [f"{label} {text}" for label, text in output_metric_texts(fidelity)]
    return ", ".join(parts) + f" on {fidelity['samples']} samples of {fidelity['inputs']} inputs"

"""Mixed precision where it pays: the few layers whose int8 error dominates the output stay in float.

On real CNNs the int8 noise is not spread evenly. EfficientNet-Lite0/1/2 on photos: the stem conv
and the first depthwise conv, 2-3% of the MACs, each alone in int8 make 8-18% of the summed noise
of all layers alone in int8 (the next layer at most 5%); keeping both in float raised Lite1's output
SQNR from 21.9 to 25.2 dB, and the model ran no slower (a 3-channel int8 stem is a poor int8 kernel).

The sensitivity of a layer is the one the tolerance mode uses: output SQNR on held-out samples with
only that layer (and the ops joining it) in int8. Layers that alone make at least MIN_NOISE_SHARE of
the noise, and MIN_DOMINANCE times the mean share, are taken, most noise per MAC first, while their
MACs fit in `budget` (a share of the int8 layers' MACs); the result is kept only if it measures
MIN_GAIN_DB better than all-int8.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import onnx_ir as ir

from ..analysis.cost import analyze_cost
from ..model import clone
from ..report import Fidelity
from .int8_placement import ensure_node_names

#: A layer is worth a float island only if, alone in int8, it makes at least this share of the summed
#: noise of every layer alone in int8 (measured: 8-18% for the EfficientNet-Lite stems and first
#: depthwise convs, at most 5% for any other layer of those models or of a ResNet-50).
MIN_NOISE_SHARE = 0.08
#: ... and at least this many times the mean share, 1 / (int8 layers): in a network of five layers
#: every layer makes a large share, and none dominates (Lite1, 65 layers: 12x and 6.5x; the next 2x).
MIN_DOMINANCE = 4.0
#: The layers kept in float must raise the measured output SQNR at least this much (dB), or all-int8 stays.
MIN_GAIN_DB = 0.5
#: All-int8 at or above this output SQNR (dB) is left alone: no output kind in the real-model corpus
#: loses a decision there (97% top-1 agreement on the most ambiguous classifier), and the per-layer
#: measurement is not paid for (a ResNet-50 classifier: 58 dB).
GOOD_ENOUGH_DB = 30.0
#: Per-layer sensitivities are measured on at most this many held-out samples (a ranking, not a claim).
SENSITIVITY_SAMPLES = 8


def alone_sqnr(quantizer: Any, anchors: Sequence[str], measure: Callable[[Any], Fidelity]) -> dict[str, float]:
    """{anchor: output SQNR (dB) with only that anchor in int8}: one run per anchor."""
    return {a: float(measure(quantizer.build(keep_float=[b for b in anchors if b != a])).sqnr_db) for a in anchors}


def layer_macs(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """MACs of each node of `model` at `shapes` (analysis/cost.py), by the names plans give nodes."""
    named = clone(model)
    ensure_node_names(named.graph)
    return {c.name: c.macs for c in analyze_cost(named, shapes).nodes}


def choose(sqnr: Mapping[str, float], macs: Mapping[str, int], budget: float) -> list[str]:
    """The anchors to keep in float (see the module docstring); anchors of unknown cost never qualify."""
    noise = {a: 10 ** (-s / 10) if math.isfinite(s) else 0.0 for a, s in sqnr.items()}
    total, total_macs = sum(noise.values()), sum(macs.get(a, 0) for a in sqnr)
    if total <= 0 or total_macs <= 0:
        return []
    floor = max(MIN_NOISE_SHARE, MIN_DOMINANCE / len(sqnr)) * total
    candidates = [a for a in sqnr if noise[a] >= floor and macs.get(a, 0) > 0]
    candidates.sort(key=lambda a: noise[a] / macs[a], reverse=True)
    chosen, used = [], 0
    for a in candidates:
        if used + macs[a] <= budget * total_macs:
            chosen.append(a)
            used += macs[a]
    return chosen


def protect(
    quantizer: Any, first: Any, anchors: Sequence[str], measure: Callable[[Any, bool], Fidelity], budget: float,
    shapes: Mapping[str, Sequence[int]],
) -> tuple[Any, list[str], dict[str, float] | None, dict[str, Any]]:
    """(variant, anchors kept in float, alone-SQNR per anchor or None, record) starting from the
    all-int8 `first`. `measure(variant, few)` measures on all held-out samples, or on at most
    SENSITIVITY_SAMPLES of them when `few`."""
    before = float(measure(first, False).sqnr_db)
    record: dict[str, Any] = {"budget": budget, "candidates": [], "sqnr_before": before, "kept_float": [],
                              "macs_share": 0.0}
    if before >= GOOD_ENOUGH_DB:
        record["outcome"] = f"not needed: all-int8 measures {before:.1f} dB (>= {GOOD_ENOUGH_DB:g})"
        return first, [], None, record
    sqnr = alone_sqnr(quantizer, anchors, lambda v: measure(v, True))
    macs = layer_macs(quantizer.model, shapes)
    chosen = choose(sqnr, macs, budget)
    record["candidates"] = chosen
    total_macs = max(sum(macs.get(a, 0) for a in anchors), 1)
    if not chosen:
        record["outcome"] = "no layer dominates the int8 noise"
        return first, [], sqnr, record
    variant = quantizer.build(keep_float=chosen)
    after = float(measure(variant, False).sqnr_db)
    share = sum(macs[a] for a in chosen) / total_macs
    record.update(sqnr_after=after, macs_share=share)
    if not after >= before + MIN_GAIN_DB:
        record["outcome"] = f"not kept: {after - before:+.1f} dB is under the {MIN_GAIN_DB:g} dB that pays for it"
        return first, [], sqnr, record
    record.update(outcome="kept", kept_float=[{"node": a, "sqnr_db_alone": sqnr[a], "macs": macs[a]} for a in chosen])
    return variant, chosen, sqnr, record


def describe(record: Mapping[str, Any], samples: int) -> str:
    if record.get("outcome") != "kept":
        return f"mixed precision: {record.get('outcome')}"
    names = ", ".join(k["node"] for k in record["kept_float"])
    return (f"mixed precision: {len(record['kept_float'])} layers that dominate the int8 noise kept in float "
            f"({100 * record['macs_share']:.1f}% of the MACs: {names}); output SQNR {record['sqnr_before']:.1f} -> "
            f"{record['sqnr_after']:.1f} dB on {samples} held-out samples")


__all__ = ["GOOD_ENOUGH_DB", "MIN_DOMINANCE", "MIN_GAIN_DB", "MIN_NOISE_SHARE", "SENSITIVITY_SAMPLES", "alone_sqnr", "choose", "describe", "layer_macs", "protect"]

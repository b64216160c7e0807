"""The tolerance mode of static int8 (QuantizeQDQ with `max_drop`, passes/quantize.py): measure on
calibration samples held out from calibration, and keep the most sensitive layers in float until the
tolerance holds."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from ..calibration import Calibration
from ..report import Fidelity
from ..tolerance import Tolerance
from .int8_placement import op_types
from .int8_protect import alone_sqnr
from .int8_variants import Quantizer, Variant

#: Tolerance mode holds out this fraction of the calibration samples (the last ones, which the
#: pipeline's verification also uses), at most TOLERANCE_MAX_HELDOUT, to measure the metric on.
TOLERANCE_HOLDOUT = 0.25
TOLERANCE_MAX_HELDOUT = 64


def holdout_split(calibration: Calibration) -> tuple[Calibration, Calibration]:
    """(calibrate on, measure on): the last TOLERANCE_HOLDOUT of the samples (at most
    TOLERANCE_MAX_HELDOUT) are held out; a single sample is used for both (nothing to hold out)."""
    n = calibration.num_samples
    if n < 2:
        return calibration, calibration
    hold = min(TOLERANCE_MAX_HELDOUT, max(1, round(n * TOLERANCE_HOLDOUT)))
    return calibration.split(hold / n)


def first_samples(feeds: list[dict[str, np.ndarray]], count: int) -> list[dict[str, np.ndarray]]:
    """The leading feeds (batches) that hold at least `count` samples, or all of them."""
    taken, seen = [], 0
    for feed in feeds:
        if seen >= count:
            break
        taken.append(feed)
        seen += len(next(iter(feed.values())))
    return taken


def requested_float(
    skipped: Iterable[str], names: Iterable[str], reason: str, sensitivity: Mapping[str, float] | None = None,
) -> list[str]:
    """`skipped` with the layers in `names` kept in float for `reason` instead of "skipped by request"."""
    names = list(names)
    requested = {f"{a}: skipped by request" for a in names}
    alone = (lambda a: f"; alone in int8 the output SQNR is {sensitivity[a]:.1f} dB") if sensitivity else (lambda a: "")
    return [s for s in skipped if s not in requested] + [f"{a}: kept in float for {reason}{alone(a)}" for a in names]


def fall_back(
    quantizer: Quantizer, first: Variant, anchors: list[str], protected: list[str],
    sensitivity: dict[str, float] | None, tolerance: Tolerance, measure: Callable[..., Fidelity], skipped: list[str],
) -> tuple[Variant, dict[str, Any], list[str]]:
    """Keep the most sensitive int8 layers in float until `tolerance` holds on the held-out feeds.

    Sensitivity of an anchor = output SQNR with only that anchor (and the ops joining it) in int8:
    one ORT run per anchor. Output noise from independent layers roughly adds up, so falling back
    the noisiest first is the cheapest way down; the count is then found by bisection."""
    measured: dict[int, tuple[Variant, Fidelity]] = {0: (first, measure(first))}
    record: dict[str, Any] = {
        "metric": tolerance.metric, "bound": tolerance.bound, "target": tolerance.describe(),
        "reference": "the float model this pass received", "before": float(tolerance.value(measured[0][1])),
        "kept_float": [], "sensitivity_sqnr_db": {},
    }
    if tolerance.accepts(measured[0][1]):
        record.update(after=record["before"], met=True, evaluations=1, summary="none")
        return first, record, skipped
    op_of = op_types(quantizer.model.graph)
    if sensitivity is None:
        sensitivity = alone_sqnr(quantizer, anchors, lambda v: measure(v, True))
    order = sorted((a for a in anchors if a not in protected), key=lambda a: sensitivity[a])  # noisiest first

    def at(k: int) -> tuple[Variant, Fidelity]:
        if k not in measured:
            variant = quantizer.build(keep_float=[*protected, *order[:k]])
            measured[k] = (variant, measure(variant))
        return measured[k]

    lo, hi = 0, len(order)
    met = tolerance.accepts(at(hi)[1])
    if met:
        while hi - lo > 1:  # smallest k that passes (lo fails, hi passes)
            mid = (lo + hi) // 2
            if tolerance.accepts(at(mid)[1]):
                hi = mid
            else:
                lo = mid
        k = hi
    else:
        k = min(measured, key=lambda j: tolerance.loss(measured[j][1]))
    variant, fidelity = measured[k]
    kept = order[:k]
    record.update(
        after=float(tolerance.value(fidelity)), met=met, evaluations=len(measured) + len(anchors),
        sensitivity_sqnr_db=sensitivity,
        kept_float=[{"node": a, "op": op_of[a], "sqnr_db_alone": sensitivity[a]} for a in kept],
        summary=", ".join(f"{a} ({sensitivity[a]:.1f} dB alone)" for a in kept) or "none",
    )
    skipped = requested_float(skipped, kept, f"the tolerance ({tolerance.describe()})", sensitivity)
    if not met:
        skipped.append(f"tolerance not reached ({tolerance.describe()}): best found is "
                       f"{tolerance.format_value(fidelity)} with {k} of {len(order)} layers in float")
    return variant, record, skipped

"""Rows of one batch against the baseline (the first model): theoretical speedup from MACs, measured
from medians, realization = measured / theoretical; per-layer speedups against the baseline's
kernel of the same name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from .candidates import Candidate
from .report import BenchRow, LayerTime, Timing


def batch_rows(cands: Sequence[Candidate], batch: int) -> list[BenchRow]:
    base = cands[0]
    base_timing = Timing.from_seconds(base.samples) if base.failure is None else None
    base_layers = {layer.kernel: layer for layer in base.layers if layer.kernel is not None}
    rows = []
    for cand in cands:
        timing = Timing.from_seconds(cand.samples) if cand.failure is None else None
        costed = base_timing is not None and timing is not None and base.macs_complete and cand.macs_complete
        theoretical = _ratio(base.macs, cand.macs) if costed else None
        measured = _ratio(base_timing.median_ms if base_timing else None, timing.median_ms if timing else None)
        rows.append(
            BenchRow(
                model=cand.label,
                batch=batch,
                supported=cand.failure is None,
                reason=cand.failure,
                input_shapes=cand.shapes,
                batch_rewritten=cand.rewritten,
                providers=cand.providers,
                timing=timing,
                macs=cand.macs,
                theoretical_speedup=theoretical,
                measured_speedup=measured,
                realization=_ratio(measured, theoretical),
                cost_note=cand.cost_note,
                layers=cand.layers if cand is base else _against_baseline(cand.layers, base_layers),
            )
        )
    return rows


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return float(num) / float(den)


def _against_baseline(layers: Sequence[LayerTime], base: Mapping[str, LayerTime]) -> tuple[LayerTime, ...]:
    """Per-layer speedups against the baseline's kernel of the same name (pruning keeps node names).

    A layer that became several (factorization writes `<name>_lowrank` before `<name>`) is compared
    as a whole: the kernels named after one baseline kernel are summed, time and MACs."""

    def origin(kernel: str | None) -> str | None:
        if kernel is None:
            return None
        if kernel in base:
            return kernel
        stem = kernel.split("_lowrank")[0]
        return stem if stem != kernel and stem in base else None

    totals: dict[str, list[float | None]] = {}
    for layer in layers:
        key = origin(layer.kernel)
        if key is not None:
            total = totals.setdefault(key, [0.0, 0])
            for i, part in enumerate((layer.time_ms, layer.macs)):  # an unknown part makes the total unknown
                total[i] = None if part is None or total[i] is None else total[i] + part
    out = []
    for layer in layers:
        key = origin(layer.kernel)
        if key is None:
            out.append(layer)
            continue
        match, (time_ms, macs) = base[key], totals[key]
        theoretical = _ratio(match.macs, macs)
        measured = _ratio(match.time_ms, time_ms)
        realization = _ratio(measured, theoretical)
        out.append(replace(layer, theoretical_speedup=theoretical, measured_speedup=measured, realization=realization))
    return tuple(out)

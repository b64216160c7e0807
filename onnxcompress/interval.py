"""How sure a tolerance verdict is: a bootstrap interval of the metric over the judging samples.

A candidate's metric on a few held-out samples is one draw; on other data it moves. Resampling the
samples (rows of the outputs) with replacement gives the spread a different draw of the same size
would show, and the search accepts a candidate only when the interval's pessimistic end is within
the tolerance. Every metric is a ratio of per-sample sums (cosine: dot / norms; SQNR and mse:
signal / noise; top-1: agreements / samples), so each resample costs one weighted sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .report import Fidelity
from .tolerance import Tolerance
from .verify import _looks_like_scores, as_compared, output_rows

#: Central interval reported and decided on: its pessimistic end is the 90th percentile of the drop
#: (the 10th of the SQNR) over resamples.
INTERVAL = 0.8
RESAMPLES = 400


def bootstrap_interval(tolerance: Tolerance, reference: Sequence[Sequence[np.ndarray]],
                       candidate: Sequence[Sequence[np.ndarray]], *, seed: int = 0,
                       sources: Sequence[object] | None = None) -> tuple[float, float] | None:
    """(low, high) of `tolerance`'s metric over resampled rows, None where it cannot be resampled
    (fewer than 2 rows, or a metric the outputs do not have). With the rows' `sources` (two or
    more), whole sources are resampled: views of one photo move together, and the spread between
    photos is what other data will show."""
    per_output = [_sample_sums(tolerance.metric, reference, candidate, k) for k in range(len(reference[0]) if reference else 0)]
    per_output = [s for s in per_output if s is not None]
    if not per_output or per_output[0].shape[1] < 2:
        return None
    n = per_output[0].shape[1]
    rng = np.random.default_rng(seed)
    weights = _resample_weights(rng, n, None if sources is None else list(sources)[:n])
    values = np.stack([_metric(tolerance.metric, weights @ sums.T) for sums in per_output])  # [outputs, resamples]
    worst = values.min(axis=0) if tolerance.metric == "sqnr" else values.max(axis=0)  # worst output, as compare()
    tail = (1.0 - INTERVAL) / 2
    low, high = np.quantile(worst, [tail, 1.0 - tail])
    return float(low), float(high)


def accepted(tolerance: Tolerance, fidelity: Fidelity, interval: tuple[float, float] | None) -> bool:
    """Within `tolerance` on the value and on the interval's pessimistic end: a few samples can
    flatter a model."""
    return tolerance.accepts(fidelity) and (interval is None or tolerance.within(pessimistic(tolerance, interval)))


def _resample_weights(rng: np.random.Generator, n: int, sources: list | None) -> np.ndarray:
    """[RESAMPLES, n] weights: how often each row is drawn, rows one by one or by whole source."""
    if sources is None or len(sources) != n or len(set(sources)) < 2:
        return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(RESAMPLES)]).astype(np.float64)
    names = list(dict.fromkeys(sources))
    group = np.array([names.index(s) for s in sources])
    drawn = np.stack([np.bincount(rng.integers(0, len(names), len(names)), minlength=len(names)) for _ in range(RESAMPLES)])
    return drawn[:, group].astype(np.float64)


def pessimistic(tolerance: Tolerance, interval: tuple[float, float]) -> float:
    """The end of the interval that is worse for the candidate: the higher drop, the lower SQNR."""
    return interval[0] if tolerance.metric == "sqnr" else interval[1]


def _sample_sums(metric: str, reference, candidate, k: int) -> np.ndarray | None:
    """Per row of output k, the sums its metric is a ratio of: [terms, rows]."""
    ref, got = output_rows(reference, candidate, k)
    if metric == "top1":
        if not _looks_like_scores(reference[0][k]):
            return None
        agree = (np.argmax(ref, axis=1) == np.argmax(got, axis=1)).astype(np.float64)
        return np.stack([agree, np.ones_like(agree)])
    ref, got = as_compared(ref, got)  # as compare(): 2-class probabilities as log-odds
    if metric == "cosine":
        return np.stack([np.sum(ref * got, axis=1), np.sum(ref * ref, axis=1), np.sum(got * got, axis=1)])
    return np.stack([np.sum(ref * ref, axis=1), np.sum((got - ref) ** 2, axis=1)])  # sqnr, mse


def _metric(metric: str, sums: np.ndarray) -> np.ndarray:
    """The metric's value per resample from its weighted sums [resamples, terms]."""
    if metric == "top1":
        return 1.0 - sums[:, 0] / sums[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):  # zero sums are handled by the np.where
        if metric == "cosine":
            denom = np.sqrt(sums[:, 1] * sums[:, 2])
            return 1.0 - np.where(denom > 0, sums[:, 0] / denom, 1.0)
        signal, noise = sums[:, 0], sums[:, 1]
        if metric == "mse":
            return np.where(signal > 0, noise / signal, np.where(noise > 0, np.inf, 0.0))
        return np.where(noise > 0, 10 * np.log10(signal / noise), np.inf)

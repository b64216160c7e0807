"""Streaming, mergeable per-tensor statistics and the clipping-range methods that read them.

A `TensorHistogram` holds a running min/max and a fixed number of bins on a grid anchored at zero
whose bin width is a power of two. When new data falls outside the window, the width doubles and
each old bin maps exactly onto one new bin (floor(i / 2**k)), so re-binning loses nothing and
histograms of any two streams merge exactly: merging batch by batch gives the same counts as one
histogram of all the data. Memory is `bins` counts per tensor, whatever the number of samples.

The range methods (minmax, percentile, entropy, mse) are pure functions of a histogram.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..feeds import token_rows

#: Smallest bin width (a power of two): a constant tensor still gets a finite, canonical grid.
MIN_WIDTH_EXP = -32
#: Bin indices stay below 2**MAX_INDEX_BITS in magnitude (int64 arithmetic, with room to spare).
MAX_INDEX_BITS = 60


@dataclass
class TensorHistogram:
    """Running min/max and a power-of-two-width histogram of one tensor's finite values."""

    bins: int = 2048
    count: int = 0
    nonfinite: int = 0
    minimum: float = math.inf
    maximum: float = -math.inf
    width_exp: int = MIN_WIDTH_EXP  # bin width is 2**width_exp
    start: int = 0  # grid index of counts[0]: bin i covers [(start+i)*w, (start+i+1)*w)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.width_exp)

    @property
    def edges(self) -> np.ndarray:
        return (self.start + np.arange(self.bins + 1, dtype=np.float64)) * self.width

    def update(self, array: np.ndarray) -> None:
        x = np.asarray(array, dtype=np.float64).ravel()
        finite = np.isfinite(x)
        if not finite.all():
            self.nonfinite += int((~finite).sum())
            x = x[finite]
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        exp = max(self.width_exp if self.count else MIN_WIDTH_EXP, _smallest_fitting_exp(lo, hi, self.bins))
        if self.count:
            exp = max(exp, _smallest_fitting_exp(min(lo, self.minimum), max(hi, self.maximum), self.bins))
        self.minimum, self.maximum = min(lo, self.minimum), max(hi, self.maximum)
        self._regrid(exp)
        idx = np.floor(x / self.width).astype(np.int64) - self.start
        self.counts += np.bincount(idx, minlength=self.bins)
        self.count += x.size

    def merge(self, other: TensorHistogram) -> TensorHistogram:
        """A new histogram of both streams (exact: both are brought to the coarser common grid)."""
        if other.bins != self.bins:
            raise ValueError("cannot merge histograms with different bin counts")
        if not other.count or not self.count:  # nothing to regrid; non-finite counts still add up
            merged = (other if not self.count else self).copy()
            merged.nonfinite = self.nonfinite + other.nonfinite
            return merged
        lo, hi = min(self.minimum, other.minimum), max(self.maximum, other.maximum)
        exp = max(self.width_exp, other.width_exp, _smallest_fitting_exp(lo, hi, self.bins))
        a, b = self.copy(), other.copy()
        a.minimum = b.minimum = lo
        a.maximum = b.maximum = hi
        a._regrid(exp)
        b._regrid(exp)
        a.counts = a.counts + b.counts
        a.count += b.count
        a.nonfinite += b.nonfinite
        return a

    def mean_square(self) -> float:
        """E[x^2] from the bin centres (exact to half a bin width)."""
        if not self.count:
            return 0.0
        centres = self.edges[:-1] + self.width / 2
        return float(np.dot(self.counts, centres**2) / self.count)

    def copy(self) -> TensorHistogram:
        return TensorHistogram(self.bins, self.count, self.nonfinite, self.minimum, self.maximum,
                               self.width_exp, self.start, self.counts.copy())

    def _regrid(self, exp: int) -> None:
        """Coarsen to width 2**exp and move the window so it starts at the bin holding `minimum`."""
        new_start = math.floor(self.minimum / math.ldexp(1.0, exp))
        counts = np.zeros(self.bins, dtype=np.int64)
        if self.count:
            nz = np.nonzero(self.counts)[0]
            old = (self.start + nz) >> (exp - self.width_exp)  # exact: the grid is anchored at zero
            np.add.at(counts, old - new_start, self.counts[nz])
        self.width_exp, self.start, self.counts = exp, new_start, counts

    def folded(self) -> tuple[np.ndarray, float]:
        """Counts of |x| on bins [j*w, (j+1)*w) for j >= 0 (exact: negative bins mirror positive ones)."""
        if self.start > 0 or self.start + self.bins <= 0:  # bring zero into the window first
            h = self.copy()
            h.minimum, h.maximum = min(h.minimum, 0.0), max(h.maximum, 0.0)
            h._regrid(max(h.width_exp, _smallest_fitting_exp(h.minimum, h.maximum, h.bins)))
            return h.folded()
        idx = self.start + np.arange(self.bins)
        mags = np.where(idx >= 0, idx, -1 - idx)
        folded = np.bincount(mags, weights=self.counts, minlength=int(mags.max()) + 1)
        return folded, self.width


def _smallest_fitting_exp(lo: float, hi: float, bins: int) -> int:
    """Smallest exponent e (>= MIN_WIDTH_EXP) such that [lo, hi] spans at most `bins` bins of width 2**e.

    Bin indices are value / 2**e, so e also keeps them within int64 for values far from zero (a
    near-constant activation of large magnitude would otherwise get a tiny width and huge indices)."""
    floor = max(MIN_WIDTH_EXP, math.frexp(max(abs(lo), abs(hi)))[1] - MAX_INDEX_BITS)
    span = hi - lo
    exp = floor if span <= 0 else max(floor, math.ceil(math.log2(span / max(bins - 1, 1))))

    def fits(e: int) -> bool:
        w = math.ldexp(1.0, e)
        return math.floor(hi / w) - math.floor(lo / w) + 1 <= bins

    while not fits(exp):
        exp += 1
    while exp > floor and fits(exp - 1):
        exp -= 1
    return exp


# ---------------------------------------------------------------------------- clipping ranges
# Each returns (lo, hi) with lo <= 0 <= hi, the range a quantizer must represent (zero exactly).


def _with_zero(lo: float, hi: float) -> tuple[float, float]:
    return min(float(lo), 0.0), max(float(hi), 0.0)


def minmax_range(hist: TensorHistogram) -> tuple[float, float]:
    return _with_zero(hist.minimum, hist.maximum)


def percentile_range(hist: TensorHistogram, percentile: float = 99.99) -> tuple[float, float]:
    """Clip each tail at (100 - percentile)% of the values (linear interpolation inside a bin)."""
    if not hist.count:
        return 0.0, 0.0
    tail = (100.0 - percentile) / 100.0
    cdf = np.concatenate([[0.0], np.cumsum(hist.counts)]) / hist.count
    edges = hist.edges
    lo = float(np.interp(tail, cdf, edges)) if tail > 0 else hist.minimum
    hi = float(np.interp(1.0 - tail, cdf, edges)) if tail > 0 else hist.maximum
    return _with_zero(max(lo, hist.minimum), min(hi, hist.maximum))


def entropy_range(hist: TensorHistogram, levels: int = 128, max_candidates: int = 512) -> tuple[float, float]:
    """KL-divergence threshold on |x| (TensorRT's calibration): the clip whose `levels`-level
    quantization of the clipped distribution stays closest to the original. Exact zeros do not
    weigh in (see below), so a Relu output gets the threshold of its positive part."""
    if not hist.count:
        return 0.0, 0.0
    folded, width = hist.folded()
    last = int(np.nonzero(folded)[0].max()) + 1
    folded = folded[:last].astype(np.float64)
    if last <= levels:
        return minmax_range(hist)
    # Exact zeros (Relu outputs, padding) pile up in the first bin. Zero is exact at any threshold,
    # yet that spike, spread over the first quantized group of q, dominates the divergence and pulls
    # the clip far in (to ~2 sigma on a Relu'd Gaussian). TensorRT's calibrator levels it to its
    # neighbour for the same reason.
    folded[0] = folded[1]
    step = max(1, (last - levels) // max_candidates)
    candidates = list(range(levels, last, step)) + [last]
    best, best_kl = last, math.inf
    for i in candidates:
        p = folded[:i].copy()
        p[-1] += folded[i:].sum()  # outliers clipped into the last bin
        nonzero = folded[:i] > 0
        # q: the first i bins merged into `levels` groups, each group's mass spread over its non-empty bins
        group = (np.arange(i) * levels) // i
        mass = np.bincount(group, weights=folded[:i], minlength=levels)
        occupied = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero, mass[group] / np.maximum(occupied[group], 1), 0.0)
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-300)
        mask = ps > 0
        if np.any(mask & (qs == 0)):
            kl = math.inf
        else:
            kl = float(np.sum(ps[mask] * np.log(ps[mask] / qs[mask])))
        if kl < best_kl:
            best, best_kl = i, kl
    threshold = best * width
    return _with_zero(max(hist.minimum, -threshold), min(hist.maximum, threshold))


def mse_range(
    hist: TensorHistogram, levels: int = 256, symmetric: bool = False, candidates: int = 100, rounds: int = 3
) -> tuple[float, float]:
    """The (lo, hi) minimising the expected squared quantization error over the histogram:
    clipping error of values outside, uniform rounding noise (step**2 / 12) inside.

    `levels` is the number of quantization steps (256 for 8 bits). Symmetric ranges search one
    threshold; asymmetric ones alternate between the two ends (coordinate descent)."""
    if not hist.count:
        return 0.0, 0.0
    lo0, hi0 = minmax_range(hist)
    centers = (hist.edges[:-1] + hist.edges[1:]) / 2
    centers = np.clip(centers, hist.minimum, hist.maximum)
    counts = hist.counts.astype(np.float64)
    fractions = np.linspace(1.0 / candidates, 1.0, candidates)

    def cost(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        step = (hi - lo) / (levels - 1)
        x = centers[None, :]
        clipped = np.clip(x, lo[:, None], hi[:, None])
        inside = (x >= lo[:, None]) & (x <= hi[:, None])
        err = (x - clipped) ** 2 + inside * (step[:, None] ** 2) / 12
        return err @ counts

    if symmetric:
        t = max(-lo0, hi0) * fractions
        best = float(t[np.argmin(cost(-t, t))])
        return _with_zero(max(hist.minimum, -best), min(hist.maximum, best))
    lo, hi = lo0, hi0
    for _ in range(rounds):
        if hi0 > 0:
            his = hi0 * fractions
            hi = float(his[np.argmin(cost(np.full_like(his, lo), his))])
        if lo0 < 0:
            los = lo0 * fractions
            lo = float(los[np.argmin(cost(los, np.full_like(los, hi)))])
    return _with_zero(lo, hi)


METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclass
class Histograms:
    """A histogram per value over a stream of batches (a streaming.Reducer): merges are exact in any
    order, so shards of the calibration data give the counts of one pass over all of it. Token
    activations ([batch, sequence, features]) count only at the positions the batch's mask keeps:
    padding never reaches a real output, and its values would widen the ranges of real tokens.
    `names`: the values histogrammed (empty: every value streamed)."""

    bins: int = 2048
    values: dict[str, TensorHistogram] = field(default_factory=dict)
    samples: int = 0
    names: frozenset[str] = frozenset()

    def add(self, count: int, values: dict[str, np.ndarray], mask: np.ndarray | None = None) -> None:
        for name, array in values.items():
            if self.names and name not in self.names:
                continue
            self.values.setdefault(name, TensorHistogram(self.bins)).update(token_rows(array, mask, keep_shape=True))
        self.samples += count

    def merge(self, later: Histograms) -> Histograms:
        merged = dict(self.values)
        for name, hist in later.values.items():
            merged[name] = merged[name].merge(hist) if name in merged else hist.copy()
        return Histograms(self.bins, merged, self.samples + later.samples, self.names)

    def fresh(self) -> Histograms:
        return Histograms(self.bins, names=self.names)


def collect_histograms(model, names, calibration, *, bins: int = 2048, batch_size: int = 16,
                       limit: int | None = None, statistics=None) -> tuple[dict[str, TensorHistogram], int]:
    """Histograms of the named values (graph inputs or node outputs) over the calibration data,
    updated batch by batch through ORT in bounded memory; returns (histograms, samples seen).
    With `statistics` (analysis/statistics.Statistics): from its cache or its one run per model state."""
    from .streaming import reduce_values

    if statistics is not None:
        hists = statistics.histograms(model, names, calibration, bins=bins, limit=limit, batch_size=batch_size)
        return hists.values, hists.samples
    hists = reduce_values(model, list(names), calibration, Histograms(bins, names=frozenset(names)), batch_size=batch_size,
                          limit=limit)
    return hists.values, hists.samples


def clip_range(
    hist: TensorHistogram, method: str, *, percentile: float = 99.99, symmetric: bool = False, levels: int = 256
) -> tuple[float, float]:
    """The clipping range of `hist` by `method` (one of METHODS)."""
    if method == "minmax":
        return minmax_range(hist)
    if method == "percentile":
        return percentile_range(hist, percentile)
    if method == "entropy":
        one_sided = hist.minimum >= 0 or hist.maximum <= 0
        return entropy_range(hist, levels=levels if one_sided and not symmetric else levels // 2)
    if method == "mse":
        return mse_range(hist, levels=levels, symmetric=symmetric)
    raise ValueError(f"unknown calibration method {method!r} (choose one of: {', '.join(METHODS)})")


__all__ = [
    "METHODS", "Histograms", "TensorHistogram", "clip_range", "collect_histograms", "entropy_range", "minmax_range", "mse_range", "percentile_range",
]

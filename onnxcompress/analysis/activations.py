"""Streaming per-channel activation statistics through ONNX Runtime.

The model is run once over the calibration data with the requested intermediate values added as
outputs; each batch is reduced to per-channel sums as it arrives, so memory grows with the number of
tensors and channels, never with the number of samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ..calibration import Calibration
from ..feeds import token_rows
from .streaming import reduce_values, stream_values

if TYPE_CHECKING:
    from .statistics import Statistics


@dataclass
class ChannelStats:
    """Running per-channel sums of one value along its channel axis."""

    axis: int
    count: int = 0  # elements per channel seen so far
    total: np.ndarray | None = None
    total_abs: np.ndarray | None = None
    total_sq: np.ndarray | None = None
    zeros: np.ndarray | None = None
    minimum: np.ndarray | None = None
    maximum: np.ndarray | None = None
    # Float addition is not associative: a shard that starts after the first batch keeps each batch's
    # (sum, |sum|, sum of squares) in order, and `merge` adds them after the sums of the batches before
    # it, as one loop over all batches would. None: the batches are added as they come (the first
    # shard, or no shards).
    deferred: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def update(self, array: np.ndarray, *, rows: bool = False) -> None:
        """Add `array`'s values (`rows`: already [positions, channels])."""
        array = np.asarray(array, dtype=np.float64)
        x = array.T if rows else np.moveaxis(array, self.axis, 0).reshape(array.shape[self.axis], -1)
        self._extrema((x == 0).sum(1), x.min(1), x.max(1), x.shape[1])
        self._add((x.sum(1), np.abs(x).sum(1), np.einsum("ij,ij->i", x, x)))

    def merge(self, later: ChannelStats) -> ChannelStats:
        """These statistics followed by `later`'s batches (a deferred shard, or an empty one)."""
        if later.count and later.deferred is None:
            raise ValueError("merge needs the later part's batch sums (ChannelStats(deferred=[]))")
        merged = ChannelStats(self.axis, self.count, self.total, self.total_abs, self.total_sq, self.zeros,
                              self.minimum, self.maximum, None if self.deferred is None else list(self.deferred))
        if later.count:
            merged._extrema(later.zeros, later.minimum, later.maximum, later.count)
            for sums in later.deferred:
                merged._add(sums)
        return merged

    def _add(self, sums: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        if self.deferred is not None:
            self.deferred.append(sums)
        elif self.total is None:
            self.total, self.total_abs, self.total_sq = sums
        else:
            self.total = self.total + sums[0]
            self.total_abs = self.total_abs + sums[1]
            self.total_sq = self.total_sq + sums[2]

    def _extrema(self, zeros: np.ndarray, minimum: np.ndarray, maximum: np.ndarray, count: int) -> None:
        """Zero counts, minima and maxima: exact in any order."""
        if self.zeros is None:
            self.zeros, self.minimum, self.maximum = zeros, minimum, maximum
        else:
            self.zeros = self.zeros + zeros
            self.minimum = np.minimum(self.minimum, minimum)
            self.maximum = np.maximum(self.maximum, maximum)
        self.count += count

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.total_abs / max(self.count, 1)

    @property
    def rms(self) -> np.ndarray:
        return np.sqrt(self.total_sq / max(self.count, 1))

    @property
    def apoz(self) -> np.ndarray:
        """Average percentage of zeros (after a ReLU: how often the channel is off)."""
        return self.zeros / max(self.count, 1)


@dataclass
class ActivationStats:
    """Channel statistics per value over a stream of batches (a streaming.Reducer); token
    activations ([batch, sequence, channels]) only at the positions the batch's mask keeps."""

    values: dict[str, ChannelStats] = field(default_factory=dict)
    samples: int = 0
    source: str = ""
    axes: Mapping[str, int] = field(default_factory=dict)  # value name -> channel axis
    deferred: bool = False  # a shard after the first batch: see ChannelStats.deferred

    def add(self, count: int, values: Mapping[str, np.ndarray], mask: np.ndarray | None = None) -> None:
        for name, array in values.items():
            if name not in self.axes:
                continue
            if name not in self.values:
                self.values[name] = ChannelStats(self.axes[name], deferred=[] if self.deferred else None)
            if mask is not None and self.axes[name] % array.ndim == array.ndim - 1 and array.shape[:-1] == mask.shape:
                self.values[name].update(token_rows(array, mask), rows=True)
            else:
                self.values[name].update(array)
        self.samples += count

    def merge(self, later: ActivationStats) -> ActivationStats:
        merged = dict(self.values)
        for name, stats in later.values.items():
            merged[name] = merged[name].merge(stats) if name in merged else ChannelStats(stats.axis).merge(stats)
        return ActivationStats(merged, self.samples + later.samples, self.source, self.axes, self.deferred)

    def fresh(self) -> ActivationStats:
        return ActivationStats(source=self.source, axes=self.axes, deferred=True)


def collect(
    model: ir.Model,
    axes: Mapping[str, int],
    calibration: Calibration,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    statistics: Statistics | None = None,
) -> ActivationStats:
    """Per-channel statistics of the values named in `axes` (value name -> channel axis); token
    activations ([batch, sequence, channels]) only at the positions an attention mask input keeps.
    With `statistics`, from its cache of this model state, or its one run for all that was asked."""
    if statistics is not None:
        return statistics.channels(model, axes, calibration, limit=limit, batch_size=batch_size)
    stats = ActivationStats(source=calibration.source, axes=dict(axes))
    total = calibration.num_samples if limit is None else min(limit, calibration.num_samples)
    if calibration.engine is not None:  # shards elsewhere: progress when they are merged
        stats = reduce_values(model, list(axes), calibration, stats, batch_size=batch_size, limit=limit)
        if progress:
            progress(stats.samples, total)
        return stats
    for count, values, mask in stream_values(model, list(axes), calibration, batch_size=batch_size, limit=limit):
        stats.add(count, values, mask)
        if progress and count:
            progress(stats.samples, total)
    return stats


def sample_rows(array: np.ndarray, axis: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `limit` rows of an activation with the channel axis last (positions x channels)."""
    x = np.moveaxis(array, axis, -1).reshape(-1, array.shape[axis])
    if len(x) > limit:
        x = x[rng.choice(len(x), limit, replace=False)]
    return x


__all__ = ["ActivationStats", "ChannelStats", "collect", "sample_rows"]

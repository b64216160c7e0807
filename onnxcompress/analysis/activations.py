"""Streaming per-channel activation statistics through ONNX Runtime.

The model is run once over the calibration data with the requested intermediate values added as
outputs; each batch is reduced to per-channel sums as it arrives, so memory grows with the number of
tensors and channels, never with the number of samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..calibration import Calibration
from ..feeds import feed_mask, mask_inputs, token_rows
from .streaming import stream_values


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

    def update(self, array: np.ndarray, *, rows: bool = False) -> None:
        """Add `array`'s values (`rows`: already [positions, channels])."""
        array = np.asarray(array, dtype=np.float64)
        x = array.T if rows else np.moveaxis(array, self.axis, 0).reshape(array.shape[self.axis], -1)
        sums = (x.sum(1), np.abs(x).sum(1), (x == 0).sum(1), x.min(1), x.max(1), np.einsum("ij,ij->i", x, x))
        if self.total is None:
            self.total, self.total_abs, self.zeros, self.minimum, self.maximum, self.total_sq = sums
        else:
            self.total = self.total + sums[0]
            self.total_abs = self.total_abs + sums[1]
            self.total_sq = self.total_sq + sums[5]
            self.zeros = self.zeros + sums[2]
            self.minimum = np.minimum(self.minimum, sums[3])
            self.maximum = np.maximum(self.maximum, sums[4])
        self.count += x.shape[1]

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
    values: dict[str, ChannelStats] = field(default_factory=dict)
    samples: int = 0
    source: str = ""


def collect(
    model: ir.Model,
    axes: Mapping[str, int],
    calibration: Calibration,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ActivationStats:
    """Per-channel statistics of the values named in `axes` (value name -> channel axis); token
    activations ([batch, sequence, channels]) only at the positions an attention mask input keeps."""
    stats = ActivationStats({}, 0, calibration.source)
    total = calibration.num_samples if limit is None else min(limit, calibration.num_samples)
    masks = [m for m in mask_inputs(model) if m not in axes]
    mask = None
    for count, values in stream_values(model, [*axes, *masks], calibration, batch_size=batch_size, limit=limit):
        mask = feed_mask(values, masks) if count else mask  # a batch's later parts carry no inputs
        for name, array in values.items():
            if name not in axes:
                continue
            channel = stats.values.setdefault(name, ChannelStats(axes[name]))
            if mask is not None and axes[name] % array.ndim == array.ndim - 1 and array.shape[:-1] == mask.shape:
                channel.update(token_rows(array, mask), rows=True)
            else:
                channel.update(array)
        stats.samples += count
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

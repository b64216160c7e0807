"""Data-aware factorization's statistics: running moments of each layer's input rows (im2col rows
for Conv) over the calibration data, streamed by analysis.streaming."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ...analysis.streaming import stream_values
from ...calibration import Calibration, batch_size_for
from ...feeds import token_rows
from .layers import Layer


@dataclass
class Moments:
    """Running first and second moments of a layer's input rows (im2col rows for Conv)."""

    count: int = 0
    total: np.ndarray | None = None
    gram: np.ndarray | None = None

    def update(self, rows: np.ndarray) -> None:
        rows = rows.astype(np.float64, copy=False)
        if self.gram is None:
            self.total, self.gram = np.zeros(rows.shape[1]), np.zeros((rows.shape[1],) * 2)
        self.total += rows.sum(0)
        self.gram += rows.T @ rows
        self.count += len(rows)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    def covariance(self, centered: bool) -> np.ndarray:
        second = self.gram / max(self.count, 1)
        return second - np.outer(self.mean, self.mean) if centered else second


def collect_moments(model: ir.Model, layers: list[Layer], calibration: Calibration, *, samples: int,
                    max_features: int, positions: int, seed: int = 0) -> dict[str, Moments]:
    """Per layer (by node name): moments of its input rows over the calibration data, streamed
    batch by batch through ORT with the layers' inputs added as outputs."""
    wanted = [l for l in layers if l.input_features() <= max_features]
    if not wanted:
        return {}
    rng = np.random.default_rng(seed)
    moments = {l.node.name: Moments() for l in wanted}
    names = list(dict.fromkeys(l.node.inputs[0].name for l in wanted))
    # token rows under an attention mask's padding are left out (the mask comes with every part)
    for _, values, mask in stream_values(model, names, calibration, batch_size=batch_size_for(model, 8), limit=samples):
        for layer in wanted:
            x = values.get(layer.node.inputs[0].name)
            if x is not None:
                moments[layer.node.name].update(_input_rows(layer, np.asarray(x), positions, rng, mask))
    return moments


def _input_rows(layer: Layer, x: np.ndarray, positions: int, rng: np.random.Generator,
                mask: np.ndarray | None = None) -> np.ndarray:
    if layer.kind != "Conv":
        return token_rows(x, mask)
    return im2col(x, layer, positions, rng)


def im2col(x: np.ndarray, layer: Layer, positions: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """Conv input patches [rows, C·k] (channel-major, then kernel taps: the order of W.reshape(O, -1)),
    at every output position, or at `positions` random ones per sample."""
    kernel = layer.weight.shape[2:]
    dims = len(kernel)
    xp = np.pad(x, [(0, 0), (0, 0), *zip(layer.pads_begin, layer.pads_end)])
    window = [(k - 1) * d + 1 for k, d in zip(kernel, layer.dilations)]
    view = np.lib.stride_tricks.sliding_window_view(xp, window, axis=tuple(range(2, 2 + dims)))
    index = (slice(None), slice(None), *(slice(None, o * s, s) for o, s in zip(layer.out_size, layer.strides)),
             *(slice(None, None, d) for d in layer.dilations))
    view = view[index]  # [B, C, *out, *kernel]
    view = np.moveaxis(view, 1, 1 + dims)  # [B, *out, C, *kernel]
    flat = view.reshape(x.shape[0], -1, *view.shape[1 + dims:])
    total = flat.shape[1]
    if positions is not None and total > positions:
        pick = np.sort((rng or np.random.default_rng(0)).choice(total, positions, replace=False))
        flat = flat[:, pick]
    return flat.reshape(-1, int(np.prod(view.shape[1 + dims:])))

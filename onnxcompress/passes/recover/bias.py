"""Step 1 of recovery, bias compensation: the removed inputs' mean contribution, measured on the original
model, moves into the bias."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...analysis.activations import collect
from ...calibration import Calibration
from .layers import Layer, effective
from .write import write_params


def compensate(original: ir.Model, model: ir.Model, layers: list[Layer], fit: Calibration, batch: int,
               statistics=None) -> None:
    """b += mean(removed inputs) · W_removed, with the means measured on the original model."""
    if not layers:
        return
    stats = collect(original, {l.sink.input: l.sink.input_axis for l in layers}, fit, batch_size=batch,
                    statistics=statistics)
    for layer in layers:
        channel = stats.values.get(layer.sink.input)
        w_orig, _ = effective(layer.original)
        _, bias = effective(layer.node)
        if channel is None or len(channel.mean) * layer.taps != len(w_orig):
            layer.record.update(method="skipped", reason="no activation statistics for its input")
            continue
        removed = ~layer.keep_rows
        delta = np.repeat(channel.mean, layer.taps)[removed] @ w_orig[removed][:, layer.keep_out]
        write_params(model, layer, None, bias + delta)
        layer.record.update(method="bias", bias_shift=float(np.linalg.norm(delta)))

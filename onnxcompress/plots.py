"""Plots of benchmark reports (matplotlib, imported only when a plot is asked for).

Figures are drawn on matplotlib's object API with the Agg canvas, so plotting never switches the
caller's pyplot backend or opens a window.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import OnnxCompressError

if TYPE_CHECKING:
    from .bench import BenchReport

#: Axis room around the outermost points, as a fraction of their value.
AXIS_MARGIN = 0.1
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_speedups(report: BenchReport, path: str | os.PathLike) -> Path:
    """Theoretical (MAC ratio) against measured (median latency ratio) speedup per model and batch.

    Points on the dashed y = x line realize their full theoretical speedup; points below it lose
    some to memory traffic, kernel choice or overheads. Writes a PNG to `path` and returns it.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise OnnxCompressError("plotting needs matplotlib: pip install onnxcompress[plot]") from None
    points = [
        (row.model, row.batch, row.theoretical_speedup, row.measured_speedup)
        for row in report.rows
        if row.theoretical_speedup is not None and row.measured_speedup is not None
    ]
    if not points:
        raise OnnxCompressError(
            "nothing to plot: no row has both a theoretical and a measured speedup "
            "(the models must run and have complete MAC counts)"
        )
    path = Path(path)
    if not (path.parent if str(path.parent) else Path(".")).is_dir():
        raise OnnxCompressError(f"{path.parent}: output folder does not exist")

    figure = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    values = [v for _, _, t, m in points for v in (t, m)]
    low, high = min(values) * (1 - AXIS_MARGIN), max(values) * (1 + AXIS_MARGIN)
    axes.plot([low, high], [low, high], linestyle="--", color="grey", label="measured = theoretical")
    batches = sorted({batch for _, batch, _, _ in points})
    models = list(dict.fromkeys(model for model, _, _, _ in points))
    colors = [f"C{i % 10}" for i in range(len(models))]  # matplotlib's default colour cycle
    for model, color in zip(models, colors, strict=True):
        for batch in batches:
            mine = [(t, m) for name, b, t, m in points if name == model and b == batch]
            if not mine:
                continue
            axes.scatter(
                [t for t, _ in mine],
                [m for _, m in mine],
                color=color,
                marker=MARKERS[batches.index(batch) % len(MARKERS)],
                s=60,
                label=f"{model} (batch {batch})",
                zorder=3,
            )
    axes.set_xlim(low, high)
    axes.set_ylim(low, high)
    axes.set_xlabel("theoretical speedup (baseline MACs / model MACs)")
    axes.set_ylabel("measured speedup (baseline median / model median)")
    env = report.environment
    axes.set_title(f"{env.provider}, {env.threads} threads, ORT {env.onnxruntime}; baseline {report.baseline}")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", loc="best")
    figure.tight_layout()
    try:
        figure.savefig(path, format="png")
    except OSError as exc:
        raise OnnxCompressError(f"{path}: cannot write plot ({exc.strerror or exc})") from None
    return path

"""Plots of benchmark reports (matplotlib, imported only when a plot is asked for).

Figures are drawn on matplotlib's object API with the Agg canvas, so plotting never switches the
caller's pyplot backend or opens a window.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import OnnxCompressError

if TYPE_CHECKING:
    from .bench import BenchReport
    from .report import RunReport

#: Axis room around the outermost points, as a fraction of their value.
AXIS_MARGIN = 0.1
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_speedups(report: BenchReport, path: str | os.PathLike) -> Path:
    """Theoretical (MAC ratio) against measured (median latency ratio) speedup per model and batch.

    Points on the dashed y = x line realize their full theoretical speedup; points below it lose
    some to memory traffic, kernel choice or overheads. Writes a PNG to `path` and returns it.
    """
    _matplotlib()  # a missing matplotlib fails before any work
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
    path = _checked_path(path)
    figure, axes = _figure((7, 5))
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
    return _save(figure, path)


def plot_tradeoff(search: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """The tolerance search's curve: MAC reduction against the metric, with the bound and the chosen point.

    `search` is RunReport.search (plain data), so a report read back from JSON plots the same."""
    _matplotlib()  # a missing matplotlib fails before any work
    points = search["points"]
    if not points:
        raise OnnxCompressError("nothing to plot: the search measured no candidate")
    path = _checked_path(path)
    figure, axes = _figure((7, 5))
    order = sorted(range(len(points)), key=lambda i: points[i]["macs_ratio"], reverse=True)
    x = [1.0 / points[i]["macs_ratio"] for i in order]
    y = [points[i]["value"] for i in order]
    axes.plot(x, y, color="grey", linewidth=1, zorder=1)
    for flag, color, label in ((True, "C2", "within tolerance"), (False, "C3", "outside tolerance")):
        mine = [(xi, yi) for xi, yi, i in zip(x, y, order) if points[i]["accepted"] is flag]
        if mine:
            axes.scatter([a for a, _ in mine], [b for _, b in mine], color=color, s=40, label=label, zorder=2)
    chosen = points[search["chosen"]]
    axes.scatter([1.0 / chosen["macs_ratio"]], [chosen["value"]], marker="*", s=250, color="C1",
                 edgecolor="black", label="chosen", zorder=3)
    tolerance = search["tolerance"]
    axes.axhline(tolerance["bound"], linestyle="--", color="black", linewidth=1, label=tolerance["description"])
    axes.set_xlabel("theoretical speedup (original MACs / candidate MACs)")
    unit = " (dB)" if tolerance["metric"] == "sqnr" else " drop"
    axes.set_ylabel(f"{tolerance['metric']}{unit} on {search['heldout_samples']} held-out samples")
    axes.set_title("tolerance search: every measured candidate")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", loc="best")
    return _save(figure, path)


def plot_reductions(report: RunReport, path: str | os.PathLike) -> Path:
    """Bars: how many times smaller (params, MACs, weights, file) and faster (measured latency) the result is."""
    _matplotlib()  # a missing matplotlib fails before any work
    b, a = report.before, report.after
    bars = [(label, x / y) for label, x, y in (("parameters", b.params, a.params), ("MACs", b.macs, a.macs),
                                               ("weight bytes", b.weight_bytes, a.weight_bytes),
                                               ("file bytes", b.file_bytes, a.file_bytes)) if x and y]
    bench = report.bench or {}
    if bench.get("measured_speedup"):
        bars.append((f"latency (ORT {bench['provider']}, batch {bench['batch']})", bench["measured_speedup"]))
    if not bars:
        raise OnnxCompressError("nothing to plot: the report has no before/after numbers")
    path = _checked_path(path)
    figure, axes = _figure((7, 4))
    labels, values = [label for label, _ in bars], [v for _, v in bars]
    drawn = axes.barh(labels, values, color=[f"C{i}" for i in range(len(bars))])
    axes.bar_label(drawn, labels=[f"{v:.2f}x" for v in values], padding=3)
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_xlabel("original / optimized (higher is better)")
    axes.set_xlim(0, max(values) * (1 + 2 * AXIS_MARGIN))
    axes.invert_yaxis()
    axes.set_title("optimize: what changed")
    return _save(figure, path)


def check_available() -> None:
    """Fail now, not after a long run, when a plot is asked for and matplotlib is missing."""
    _matplotlib()


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise OnnxCompressError("plotting needs matplotlib: pip install onnxcompress[plot]") from None
    return Figure, FigureCanvasAgg


def _figure(size: tuple[float, float]):
    """A figure drawn off screen (Agg) with one axes."""
    Figure, FigureCanvasAgg = _matplotlib()
    figure = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _checked_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not (path.parent if str(path.parent) else Path(".")).is_dir():
        raise OnnxCompressError(f"{path.parent}: output folder does not exist")
    return path


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    try:
        figure.savefig(path, format="png")
    except OSError as exc:
        raise OnnxCompressError(f"{path}: cannot write plot ({exc.strerror or exc})") from None
    return path

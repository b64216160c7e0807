"""A BenchReport for people: rich tables (environment, latency, slowest layers) and the progress display."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from ..report import human
from .report import BenchProgress, BenchReport, BenchRow, ProgressCallback

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_table(report: BenchReport) -> Table:
    """Model, batch, median/p90 ms, MACs, theoretical/measured speedup and realization per row."""
    from rich.table import Table

    env = report.environment
    table = Table(
        title=f"Latency on {env.provider} ({env.threads} threads, ORT {env.onnxruntime}); baseline: {report.baseline}"
    )
    for column in ("model", "batch", "median ms", "p90 ms", "MACs", "theoretical x", "measured x", "realization"):
        table.add_column(column, justify="left" if column == "model" else "right")
    notes = [_row_note(row, env.requested_providers) for row in report.rows]
    if any(notes):
        table.add_column("note")
    for row, note in zip(report.rows, notes, strict=True):
        cells = [
            row.model,
            str(row.batch),
            _ms(row.timing.median_ms if row.timing else None),
            _ms(row.timing.p90_ms if row.timing else None),
            human(row.macs),
            _speedup(row.theoretical_speedup),
            _speedup(row.measured_speedup),
            "-" if row.realization is None else f"{row.realization:.0%}",
        ]
        table.add_row(*cells, *([note or ""] if any(notes) else []))
    return table


def _row_note(row: BenchRow, requested: Sequence[str]) -> str | None:
    parts = []
    if not row.supported:
        parts.append(f"unsupported: {row.reason}")
    if row.providers and requested and row.providers[0] != requested[0]:
        parts.append(f"runs on {', '.join(row.providers)}")  # the GPU provider fell back to CPU
    if row.batch_rewritten and row.supported:
        parts.append("batch dim made symbolic")
    if row.cost_note:
        parts.append(row.cost_note)
    return "; ".join(parts) or None


def render_layers(report: BenchReport, top: int = 15) -> list[Table]:
    """Per row with a profile: the `top` slowest kernels with their MACs and GMAC/s."""
    from rich.table import Table

    tables = []
    for row in report.rows:
        timed = sorted((layer for layer in row.layers if layer.time_ms is not None), key=lambda layer: -layer.time_ms)
        if not timed:
            continue
        total = sum(layer.time_ms for layer in timed)
        shown = min(top, len(timed))
        table = Table(title=f"Layers: {row.model} at batch {row.batch} (top {shown} of {len(timed)} kernels)")
        for column in ("kernel", "op", "model nodes", "match", "ms", "share", "MACs", "GMAC/s", "realization"):
            table.add_column(column, justify="left" if column in ("kernel", "op", "model nodes", "match") else "right")
        for layer in timed[:top]:
            table.add_row(
                layer.kernel or "",
                layer.op_name,
                ", ".join(layer.nodes) or "-",
                layer.match,
                _ms(layer.time_ms),
                f"{layer.time_ms / total:.0%}" if total else "-",
                human(layer.macs),
                "-" if layer.gmacs_per_s is None else f"{layer.gmacs_per_s:.1f}",
                "-" if layer.realization is None else f"{layer.realization:.0%}",
            )
        tables.append(table)
    return tables


def render_environment(report: BenchReport) -> Table:
    from rich.table import Table

    env = report.environment
    flags = ", ".join(f for f, present in env.cpu_flags.items() if present) or "none of interest"
    table = Table(title="Environment", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in (
        ("CPU", f"{env.cpu} ({env.physical_cores} physical / {env.logical_cores} logical cores)"),
        ("CPU flags", flags if env.cpu_flags else "not available on this platform"),
        ("onnxruntime", f"{env.onnxruntime}; providers {', '.join(env.requested_providers)}"),
        ("threads", f"intra-op {env.threads}, inter-op {env.inter_op_threads}, allow_spinning={env.allow_spinning}"),
        ("versions", f"python {env.python}, numpy {env.numpy}, onnx {env.onnx}"),
        ("runs", f"{report.options.runs} timed, {report.options.warmup} warm-up, interleaved"),
    ):
        table.add_row(key, value)
    for note in report.notes:
        table.add_row("note", note)
    return table


def render(report: BenchReport, layers: int = 15) -> list[Table]:
    """Everything the CLI prints: environment, the latency table, then per-layer tables when profiled."""
    return [render_environment(report), render_table(report), *render_layers(report, top=layers)]


@contextlib.contextmanager
def progress_bar(console: Console | None = None) -> Iterator[ProgressCallback]:
    """Progress over the timed runs (see progress.py); yields the callback to pass to `benchmark`."""
    from ..progress import progress

    with progress("timing", console) as reporter:

        def update(event: BenchProgress) -> None:
            reporter.update(f"{event.model} @ batch {event.batch}", completed=event.done, total=event.total)

        yield update

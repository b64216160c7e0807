"""Rendering of reports for people (rich tables). The data lives in report.py / analysis; this only shows it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import onnx_ir as ir
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .model import graph_inputs
from .report import Fidelity, RunReport, human, output_metric_texts, to_jsonable


def analysis_dict(model: ir.Model, cost, shapes: Mapping[str, tuple[int, ...]], *, file_bytes: int | None, top: int) -> dict[str, Any]:
    """What `onnxcompress analyze` reports, as plain data (the --json output)."""
    stats = to_jsonable(cost.stats)
    stats["file_bytes"] = file_bytes
    return {
        "opset": {d or "ai.onnx": v for d, v in model.opset_imports.items()},
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x),
        "inputs": [
            {"name": v.name, "dtype": str(v.dtype), "shape": _dims(v), "analyzed_shape": list(shapes[v.name])}
            for v in graph_inputs(model)
        ],
        "outputs": [{"name": v.name, "dtype": str(v.dtype), "shape": _dims(v)} for v in model.graph.outputs],
        "stats": stats,
        "top_layers": [to_jsonable(n) for n in cost.top(top)],
        "unknown_ops": dict(cost.unknown_ops),
        "notes": list(cost.notes),
    }


def _dims(value: ir.Value) -> list[int | str] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (str(getattr(d, "value", d) or "") or "?") for d in value.shape.dims]


def render_analysis(console: Console, title: str, data: Mapping[str, Any]) -> None:
    s = data["stats"]
    table = Table(title=escape(title), show_header=False, title_justify="left")
    table.add_row("parameters", human(s["params"]))
    table.add_row("MACs", human(s["macs"]))
    table.add_row("FLOPs", human(s["flops"]))
    table.add_row("weights", human(s["weight_bytes"], "B"))
    table.add_row("activations", human(s["activation_bytes"], "B"))
    if s.get("file_bytes") is not None:
        table.add_row("file", human(s["file_bytes"], "B"))
    table.add_row("opset", ", ".join(f"{d} {v}" for d, v in data["opset"].items()))
    for v in data["inputs"]:
        table.add_row("input", escape(f"{v['name']}  {v['dtype']}  {v['shape']}  (analyzed at {v['analyzed_shape']})"))
    for v in data["outputs"]:
        table.add_row("output", escape(f"{v['name']}  {v['dtype']}  {v['shape']}"))
    ops = sorted(s["op_counts"].items(), key=lambda kv: -kv[1])
    table.add_row("ops", ", ".join(f"{k} {n}" for k, n in ops))
    if data["unknown_ops"]:
        table.add_row("[yellow]not costed[/yellow]", ", ".join(f"{k} x{n}" for k, n in data["unknown_ops"].items()))
    for note in data.get("notes", ()):
        table.add_row("note", escape(note))
    console.print(table)
    layers = Table(title=f"top {len(data['top_layers'])} layers by MACs", title_justify="left")
    for col in ("node", "op", "MACs", "share", "params"):
        layers.add_column(col, justify="right" if col in ("MACs", "share", "params") else "left")
    total = max(s["macs"], 1)
    for n in data["top_layers"]:
        layers.add_row(escape(n["name"]), n["op_type"], human(n["macs"]), f"{100 * n['macs'] / total:.1f}%", human(n["params"]))
    console.print(layers)
    if "channel_groups" in data:
        render_channel_groups(console, data["channel_groups"])


def channel_groups_dict(graph) -> dict[str, Any]:
    """The channel groups of a ChannelGraph as data: sizes, sources, prunable units, blocking reasons."""
    groups = []
    for g in graph.groups:
        reasons = sorted(set(g.frozen.values()))
        groups.append({"id": g.id, "sources": g.sources, "channels": g.channels, "units": len(g.classes),
                       "prunable_units": len(g.prunable), "members": g.members, "blocked_by": reasons})
    total = sum(x["units"] for x in groups)
    prunable = sum(x["prunable_units"] for x in groups)
    return {"groups": groups, "units": total, "prunable_units": prunable,
            "blocked_fraction": (total - prunable) / total if total else 0.0}


def render_channel_groups(console: Console, data: Mapping[str, Any]) -> None:
    table = Table(title=f"channel groups: {data['prunable_units']} of {data['units']} units prunable "
                        f"({100 * data['blocked_fraction']:.1f}% blocked)", title_justify="left")
    for col in ("group", "sources", "channels", "units", "prunable", "blocked by"):
        table.add_column(col, justify="right" if col in ("group", "channels", "units", "prunable") else "left")
    for g in data["groups"]:
        sources = ", ".join(g["sources"][:3]) + (f" +{len(g['sources']) - 3}" if len(g["sources"]) > 3 else "")
        table.add_row(str(g["id"]), escape(sources), str(g["channels"]), str(g["units"]), str(g["prunable_units"]),
                      escape("; ".join(g["blocked_by"][:2])))
    console.print(table)


def render_run(console: Console, report: RunReport) -> None:
    """Before/after table and one line per pass."""
    b, a = report.before, report.after
    table = Table(title=escape(f"{report.input} -> {report.output}"), title_justify="left")
    for col in ("", "before", "after", "ratio"):
        table.add_column(col, justify="left" if not col else "right")
    rows = [("parameters", b.params, a.params, ""), ("MACs", b.macs, a.macs, ""),
            ("weights", b.weight_bytes, a.weight_bytes, "B"), ("file", b.file_bytes, a.file_bytes, "B")]
    for label, x, y, unit in rows:
        ratio = f"{x / y:.2f}x" if x and y else "-"
        table.add_row(label, human(x, unit), human(y, unit), ratio)
    bench = report.bench or {}
    if bench.get("original_ms") and bench.get("optimized_ms"):
        table.add_row(f"latency (ORT {bench['provider']}, batch {bench['batch']}, median)",
                      f"{bench['original_ms']:.3f} ms", f"{bench['optimized_ms']:.3f} ms",
                      _speed(bench["measured_speedup"]))
    if report.fidelity:
        f = report.fidelity
        on = " (random inputs)" if f.inputs.startswith("random") else ""  # synthetic data: say so beside the figure
        table.add_row(f"fidelity{on}: SQNR / cosine", "-", f"{f.sqnr_db:.1f} dB / {f.cosine:.5f}", "")
        if f.top1_agreement is not None:
            table.add_row(f"fidelity{on}: top-1 agreement", "-", f"{100 * f.top1_agreement:.2f}%", "")
        for label, text in output_metric_texts(to_jsonable(f)):
            table.add_row(f"fidelity{on}: {label}", "-", text, "")
    console.print(table)
    if report.search:
        _render_search(console, report.search)
    if report.tolerance:
        t = report.tolerance
        verdict = "[green]met[/green]" if t["met"] else "[red]NOT met[/red]"
        console.print(f"  tolerance {escape(t['description'])}: {verdict} (value {t['value']:.4g}, on {escape(t['measured_on'])})",
                      highlight=False)
    if bench.get("note"):
        console.print(f"  [dim]{escape(bench['note'])}[/dim]")
    for p in report.passes:
        mark = "[green]changed[/green]" if p.modified else "[dim]no change[/dim]"
        console.print(f"  {p.name}: {mark} in {p.seconds:.2f}s; {len(p.changes)} changes, {len(p.skipped)} skipped")
        if p.verification_skipped:
            console.print("    [dim]not verified again: the model is unchanged[/dim]")
        recovery = p.details.get("recovery") if isinstance(p.details, Mapping) else None
        if recovery and isinstance(recovery.get("fidelity"), Mapping):
            steps = [(label, recovery["fidelity"].get(key)) for key, label in
                     (("before", "pruned"), ("after_bias", "bias"), ("after", recovery.get("mode", "")))]
            shown = ", ".join(f"{label} {f['sqnr_db']:.1f} dB" for label, f in steps if f)
            console.print(f"    recovery ({recovery.get('heldout_samples')} held-out samples, SQNR): {shown}")
            for warning in recovery.get("warnings", []):
                console.print(f"    [yellow]warning[/yellow] {escape(warning)}", highlight=False)
        for line in p.skipped[:5]:
            console.print(f"    [yellow]skipped[/yellow] {escape(line)}", highlight=False)
        if len(p.skipped) > 5:
            console.print(f"    ... {len(p.skipped) - 5} more skipped (see --report)")
    if report.fidelity:
        console.print("  fidelity vs input: " + fidelity_line(report.fidelity))
    if report.estimate is not None:
        console.print("  estimate: " + escape(report.estimate.describe()), highlight=False)
    for note in report.notes:
        console.print(f"  [dim]{escape(note)}[/dim]")


def _speed(ratio: float | None) -> str:
    if not ratio:
        return "-"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"[yellow]{1 / ratio:.2f}x slower[/yellow]"


def _render_search(console: Console, search: Mapping) -> None:
    """The search's curve as a table: every measured candidate, the chosen one marked."""
    judged = search.get("judged_on") or f"{search['heldout_samples']} held-out samples"
    table = Table(title=escape(f"tolerance search ({search['tolerance']['description']}, {judged})"), title_justify="left")
    # metric: its value (the pessimistic end of its 80% bootstrap interval, which the verdict uses)
    for col in ("", "level", "MACs", "params", "metric (worst)", "theory", "measured", "verdict"):
        table.add_column(col, justify="right" if col else "left")
    for i, p in enumerate(search["points"]):
        speed = f"{p['speedup']:.2f}x" if p.get("speedup") else "-"
        theory = f"{1 / p['macs_ratio']:.2f}x" if p["macs_ratio"] > 0 else "-"
        verdict = "[green]within[/green]" if p["accepted"] else "[red]outside[/red]"
        table.add_row("*" if i == search["chosen"] else "", f"{p['level']:.3f}", f"{100 * p['macs_ratio']:.1f}%",
                      f"{100 * p['params_ratio']:.1f}%", _with_interval(p, search["tolerance"]["metric"] == "sqnr"), theory, speed,
                      verdict + (f" [dim]{escape(p['note'])}[/dim]" if p.get("note") else ""))
    console.print(table)
    closing = search.get("closing") or {}
    if closing.get("passes"):
        speed = closing.get("speedup_over_float")
        console.print(f"  {escape(', '.join(closing['passes']))} alone: {escape(closing['outcome'])} (metric value "
                      f"{closing['value']:.4g}" + (f", {_speed(speed)} than float" if speed else "") + ")", highlight=False)


def _with_interval(point: Mapping, sqnr: bool) -> str:
    """`0.0024 (0.0031)`: the metric and the pessimistic end of its bootstrap interval."""
    interval = point.get("interval")
    return f"{point['value']:.3g}" + (f" ({interval[0] if sqnr else interval[1]:.3g})" if interval else "")


def fidelity_line(f: Fidelity) -> str:
    parts = [f"max abs err {f.max_abs_error:.3g}", f"SQNR {f.sqnr_db:.1f} dB", f"cosine {f.cosine:.6f}"]
    if f.top1_agreement is not None:
        parts.append(f"top-1 agreement {100 * f.top1_agreement:.1f}%")
    parts += [f"{label} {text}" for label, text in output_metric_texts(to_jsonable(f))]
    counted = f.inputs.endswith(f"{f.samples} samples")  # judged data names its count already
    return ", ".join(parts) + (f" ({f.inputs})" if counted else f" ({f.samples} samples, {f.inputs})")


def render_demo(console: Console, demo) -> None:
    """Before/after: accuracy on the held-out digits, params, MACs, file size, latency."""
    r = demo.report
    table = Table(title="bundled digits CNN: original vs compressed", title_justify="left")
    for col in ("", "original", "compressed", "change"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row(f"accuracy ({demo.test_samples} held-out digits)", f"{100 * demo.accuracy_before:.2f}%",
                  f"{100 * demo.accuracy_after:.2f}%", f"{100 * (demo.accuracy_after - demo.accuracy_before):+.2f} pts")
    for label, x, y, unit in (("parameters", r.before.params, r.after.params, ""), ("MACs per image", r.before.macs, r.after.macs, ""),
                              ("file size", r.before.file_bytes, r.after.file_bytes, "B")):
        table.add_row(label, human(x, unit), human(y, unit), f"{x / y:.2f}x smaller" if x and y else "-")
    for batch in sorted({row.batch for row in demo.bench.rows}):
        base = demo.bench.row("original", batch)
        cand = demo.bench.row("compressed", batch)
        if base.timing is None or cand.timing is None:
            continue
        table.add_row(f"latency, batch {batch} (ORT CPU median)", f"{base.timing.median_ms:.3f} ms",
                      f"{cand.timing.median_ms:.3f} ms", f"{cand.measured_speedup:.2f}x faster")
    console.print(table)
    for p in r.passes:
        mark = "[green]changed[/green]" if p.modified else "[dim]no change[/dim]"
        console.print(f"  {p.name}: {mark}, {len(p.changes)} changes in {p.seconds:.2f}s")
        if p.name == "quantize-int8":
            for line in int8_lines(p):
                console.print(f"    {escape(line)}")
    console.print(f"  compressed model written to {escape(str(demo.output))}")


def int8_lines(record) -> list[str]:
    """What the int8 pass made its codes for, and whether this CPU's kernels compute them."""
    return [c for c in record.changes if c.startswith(("int8 weights", "kernel check"))]

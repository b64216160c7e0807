"""Structured pruning of a ResNet-50-shaped model to about half its MACs: onnxcompress against Torch-Pruning.

    python benchmarks/prune_resnet50.py [--runs 30] [--batches 1,16] [--out benchmarks/results]

Steps: build the torch model (tests/zoo.py, 224x224, standard widths, seeded random weights with
non-trivial BatchNorm statistics); export it with the TorchScript exporter (opset 17, dynamic batch)
and run the "cleanup" recipe; prune it with onnxcompress's prune-channels at target_macs 0.5 (L2,
round_to 8 and 16, no recovery); prune the same torch model with Torch-Pruning's MagnitudePruner
(L2 group importance, per-layer ratio, fc kept, round_to 8) at the ratio whose MACs match ours
within MAC_MATCH_TOLERANCE, export and clean it the same way; compare every pruned model's ORT
outputs with the original's on the same random inputs; time all four interleaved on ONNX Runtime
(onnxcompress.bench, with an ORT profile); and time a small conv stack at widths around the NCHWc
channel block, which shows whether ORT pads channels to blocks on this machine.

Writes prune_resnet50.json, prune_resnet50.md and prune_resnet50.png to --out. The weights are
random: fidelity numbers measure agreement with the unpruned model on random inputs, not accuracy.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: make `common` importable

from common import (  # noqa: E402
    DEFAULT_RESULTS,
    CpuMonitor,
    Stopwatch,
    fmt_ms,
    fmt_percent,
    fmt_ratio,
    kernel_shares,
    machine_line,
    markdown_table,
    repo_root_on_path,
    report_without_layers,
    script_main,
    write_json,
    write_text,
)

import onnxcompress  # noqa: E402
from onnxcompress.analysis.cost import analyze_cost  # noqa: E402
from onnxcompress.bench import (  # noqa: E402
    MIN_RUNS,
    BenchEnvironment,
    BenchOptions,
    BenchReport,
    BenchRow,
    benchmark,
    parse_batch_sizes,
)
from onnxcompress.passes.prune import PruneChannels  # noqa: E402
from onnxcompress.pipeline import Pipeline  # noqa: E402
from onnxcompress.plots import plot_speedups  # noqa: E402
from onnxcompress.report import Fidelity, human  # noqa: E402
from onnxcompress.verify import compare, outputs, random_feeds  # noqa: E402

NAME = "prune_resnet50"
IMAGE_SIZE = 224
INPUT_NAME = "input"
DYNAMIC_AXES = {INPUT_NAME: {0: "batch"}, "output": {0: "batch"}}
#: Keep this fraction of the original MACs (about 2x fewer).
TARGET_MACS = 0.5
ROUND_TOS = (8, 16)
TP_ROUND_TO = 8
#: Torch-Pruning's MACs must come within this relative distance of onnxcompress's (round_to 8) MACs.
MAC_MATCH_TOLERANCE = 0.02
#: Most Torch-Pruning ratios tried while matching MACs (each try prunes a fresh copy).
MAX_TP_TRIES = 8
#: Fidelity inputs: FIDELITY_FEEDS feeds of FIDELITY_BATCH random images, seeded apart from the timing inputs.
FIDELITY_BATCH = 8
FIDELITY_FEEDS = 2
FIDELITY_SEED = 1
PROFILE_RUNS = 10
#: ORT names the kernels its NCHWc layout transformer made "<value>_nchwc".
NCHWC_KERNEL_MARK = "_nchwc"
REORDER_PREFIX = "Reorder"  # ReorderInput/ReorderOutput: layout conversions NCHW <-> NCHWc
#: MLAS's NCHWc channel block: 16 floats with AVX-512, 8 otherwise (AVX2).
AVX512_BLOCK, AVX2_BLOCK = 16, 8
#: Block check: BLOCK_CHECK_LAYERS 3x3 convs of c -> c channels on BLOCK_CHECK_SIZE^2 maps, batch BLOCK_CHECK_BATCH.
BLOCK_CHECK_LAYERS = 4
BLOCK_CHECK_SIZE = 56
BLOCK_CHECK_BATCH = 8
#: Block check: a width between two block multiples that realizes less than this share of its MAC saving
#: is reported as padded to whole blocks.
PADDING_EVIDENCE = 0.5
#: Above this share of the CPU taken by other processes while timing, the report warns that times are inflated.
OTHERS_NOTICE = 0.05
#: A row whose p90 exceeds its median by more than this is called noisy in the commentary.
NOISY_SPREAD = 0.25

RANDOM_WEIGHTS_NOTE = (
    "Weights are seeded random (with non-trivial BatchNorm statistics), not trained: fidelity is measured on "
    "random inputs and only says how closely each pruned model agrees with the unpruned one (pruned without "
    "any calibration or recovery), not how accurate it would be on images."
)


@dataclass
class Candidate:
    """One model in the comparison and what it took to make it."""

    label: str
    path: Path
    tool: str
    settings: dict[str, Any]
    prune_seconds: float | None = None  # the pruning step alone (see `timing_note`)
    timing_note: str = ""
    macs: int = 0  # batch 1
    padded_macs: int = 0  # batch 1, every Conv's widths rounded up to the NCHWc block
    params: int = 0
    file_bytes: int = 0
    conv_widths: list[tuple[int, int]] = field(default_factory=list)  # (in, out) channels per Conv
    fidelity: Fidelity | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def nchwc_block(env: BenchEnvironment) -> int:
    return AVX512_BLOCK if env.cpu_flags.get("avx512f") else AVX2_BLOCK


def round_up(n: int, block: int) -> int:
    return int(math.ceil(n / block)) * block


def unaligned(widths: list[tuple[int, int]], block: int) -> int:
    """Convs whose input (when at least one block wide) or output width is not a multiple of `block`."""
    return sum(1 for cin, cout in widths if (cin >= block and cin % block) or cout % block)


# ------------------------------------------------------------------------------------------- build


def build_torch_model():
    repo_root_on_path()
    from tests import zoo

    model, inputs = zoo.resnet50(image_size=IMAGE_SIZE, batch=1)
    return zoo, model, inputs


def export_and_clean(zoo, module, inputs, folder: Path, stem: str) -> Path:
    """TorchScript export (opset 17, dynamic batch), then the cleanup recipe (BN folded); saved as `stem`.onnx."""
    raw = zoo.export_module(module, inputs, folder / f"{stem}.raw.onnx", dynamo=False, dynamic_axes=DYNAMIC_AXES)
    result = Pipeline.from_recipe("cleanup").run(str(raw))  # verified exact after every pass
    path = onnxcompress.save(result.model, folder / f"{stem}.onnx")
    raw.unlink()
    return path


def describe(candidate: Candidate, block: int) -> None:
    """MACs and params at batch 1 (analysis.cost), MACs with Conv widths padded to `block`, file size, widths.

    Padding follows MLAS's NCHWc layout: output channels are stored in whole blocks, and so are the
    input channels of a conv fed an NCHWc tensor (inputs narrower than one block are read as NCHW).
    """
    model = onnxcompress.load(candidate.path)
    cost = analyze_cost(model, {INPUT_NAME: (1, 3, IMAGE_SIZE, IMAGE_SIZE)})
    candidate.macs, candidate.params = int(cost.stats.macs), int(cost.stats.params)
    candidate.file_bytes = candidate.path.stat().st_size
    candidate.conv_widths, padded = [], 0
    for node, node_cost in zip(model.graph, cost.nodes, strict=True):
        macs = node_cost.macs
        if node.op_type == "Conv" and node.attributes.get_int("group", 1) == 1:
            cout, cin = int(node.inputs[1].shape[0]), int(node.inputs[1].shape[1])
            candidate.conv_widths.append((cin, cout))
            macs = macs * round_up(cout, block) / cout * (round_up(cin, block) / cin if cin >= block else 1.0)
        padded += macs
    candidate.padded_macs = int(round(padded))


# ------------------------------------------------------------------------------------- onnxcompress


def prune_onnxcompress(original: Path, folder: Path, round_to: int) -> Candidate:
    prune = PruneChannels(target_macs=TARGET_MACS, importance="l2", round_to=round_to, recover="none")
    start = time.perf_counter()
    result = Pipeline([prune]).run(str(original))  # verified after the pass: checker, ORT loads, outputs compared
    total = time.perf_counter() - start
    record = result.report.passes[0]
    path = onnxcompress.save(result.model, folder / f"onnxcompress_r{round_to}.onnx")
    return Candidate(
        label=f"onnxcompress r{round_to}",
        path=path,
        tool=f"onnxcompress {onnxcompress.__version__}",
        settings={"pass": "prune-channels", **prune.options()},
        prune_seconds=record.seconds,
        timing_note="the prune-channels pass, including its own bisection to the MAC target",
        extra={
            "pipeline_seconds_with_verification": total,
            "ratio": record.details["ratio"],
            "blocked_fraction": record.details["blocked_fraction"],
            "blocked_reasons": record.details["blocked_reasons"],
        },
    )


# ------------------------------------------------------------------------------------ Torch-Pruning


def tp_prune(model, inputs, ratio: float):
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(
        pruned,
        inputs,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        global_pruning=False,
        ignored_layers=[pruned.fc],
        round_to=TP_ROUND_TO,
    )
    pruner.step()
    return pruned.eval()


def tp_match_macs(model, inputs, target_fraction: float) -> tuple[Any, float, float, list[dict[str, float]]]:
    """Prune at the per-layer ratio whose MAC fraction (tp.utils.count_ops_and_params) is nearest
    `target_fraction`, stopping once within MAC_MATCH_TOLERANCE.

    The fraction falls roughly as (1 - ratio)^2 (a conv loses input and output channels), so the
    search starts there, then interpolates sqrt(fraction) linearly inside the bracket of tries
    either side of the target (bisecting when interpolation leaves the bracket or repeats a try). Returns
    the pruned model, its ratio, the seconds that one prune took, and every try.
    """
    import torch_pruning as tp

    base_macs, _ = tp.utils.count_ops_and_params(model, inputs)
    goal = target_fraction**0.5
    tries: list[dict[str, float]] = []
    best = None
    above, below = (0.0, 1.0), (1.0, 0.0)  # (ratio, sqrt(fraction)): nearest tries above and below the target
    ratio = 1.0 - goal
    for _ in range(MAX_TP_TRIES):
        start = time.perf_counter()
        pruned = tp_prune(model, inputs, ratio)
        seconds = time.perf_counter() - start
        macs, params = tp.utils.count_ops_and_params(pruned, inputs)
        fraction = macs / base_macs
        tries.append({"ratio": ratio, "mac_fraction": fraction, "params": params, "prune_seconds": seconds})
        tried = {t["ratio"] for t in tries}
        error = abs(fraction / target_fraction - 1.0)
        if best is None or error < best[3]:
            best = (pruned, ratio, seconds, error)
        if error <= MAC_MATCH_TOLERANCE:
            break
        if fraction > target_fraction:
            above = max(above, (ratio, fraction**0.5))
        else:
            below = min(below, (ratio, fraction**0.5))
        width = below[0] - above[0]
        step = above[0] + (above[1] - goal) * width / (above[1] - below[1])
        ratio = step if above[0] < step < below[0] and step not in tried else above[0] + width / 2
    assert best is not None
    return best[0], best[1], best[2], tries


def prune_torch_pruning(zoo, model, inputs, target_fraction: float, folder: Path) -> Candidate:
    import torch_pruning as tp

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Torch-Pruning's notes on unwrapped parameters
        pruned, ratio, seconds, tries = tp_match_macs(model, inputs, target_fraction)
    search = time.perf_counter() - start
    path = export_and_clean(zoo, pruned, inputs, folder, "torch_pruning_r8")
    return Candidate(
        label=f"Torch-Pruning r{TP_ROUND_TO}",
        path=path,
        tool=f"torch-pruning {tp.__version__}",
        settings={
            "pruner": "MagnitudePruner",
            "importance": "GroupMagnitudeImportance(p=2)",
            "global_pruning": False,
            "ignored_layers": ["fc"],
            "round_to": TP_ROUND_TO,
            "pruning_ratio": ratio,
        },
        prune_seconds=seconds,
        timing_note=(
            f"one MagnitudePruner build + step at the chosen ratio (matching MACs took {len(tries)} "
            f"tries, {search:.0f} s with MAC counting)"
        ),
        extra={"target_fraction": target_fraction, "mac_match_tries": tries, "mac_match_seconds": search},
    )


# ------------------------------------------------------------------------------------------ measure


def measure_fidelity(original: Candidate, candidates: list[Candidate]) -> str:
    """ORT outputs of every model on the same seeded random inputs, compared with the original's."""
    model = onnxcompress.load(original.path)
    shape = (FIDELITY_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    feeds = random_feeds(model, {INPUT_NAME: shape}, count=FIDELITY_FEEDS, seed=FIDELITY_SEED)
    source = f"standard normal images, seed {FIDELITY_SEED}, {FIDELITY_FEEDS * FIDELITY_BATCH} samples"
    reference = outputs(original.path, feeds, original.label)
    for candidate in candidates:
        candidate.fidelity = compare(reference, outputs(candidate.path, feeds, candidate.label), source)
    return source


def block_check(zoo, block: int, folder: Path, threads: int | None) -> BenchReport:
    """Time a stack of 3x3 convs at 4, 3.5 and 3 blocks of channels, interleaved, baseline 4 blocks.

    If ORT pads channels to whole blocks, 3.5 blocks cost as much as 4 despite 23% fewer MACs.
    """
    import torch
    from torch import nn

    models = []
    for width in (4 * block, 3 * block + block // 2, 3 * block):
        torch.manual_seed(0)
        stack = nn.Sequential(*[nn.Conv2d(width, width, 3, padding=1) for _ in range(BLOCK_CHECK_LAYERS)]).eval()
        example = (torch.randn(1, width, BLOCK_CHECK_SIZE, BLOCK_CHECK_SIZE),)
        path = zoo.export_module(stack, example, folder / f"conv{width}.onnx", dynamo=False, dynamic_axes=DYNAMIC_AXES)
        models.append((f"{width} channels", str(path)))
    return benchmark(models, BenchOptions(batch_sizes=(BLOCK_CHECK_BATCH,), runs=MIN_RUNS, threads=threads))


def kernel_summary(row: BenchRow) -> dict[str, float]:
    """Conv kernels (how many in NCHWc layout), their time and useful GMAC/s; layout reorder time."""
    convs = [layer for layer in row.layers if layer.op_name.endswith("Conv") and layer.time_ms is not None]
    conv_ms = sum(layer.time_ms for layer in convs)
    conv_macs = sum(layer.macs or 0 for layer in convs)
    shares = kernel_shares(row)
    return {
        "conv_kernels": len(convs),
        "nchwc_conv_kernels": sum(1 for layer in convs if NCHWC_KERNEL_MARK in (layer.kernel or "")),
        "conv_ms": conv_ms,
        "conv_gmacs_per_s": conv_macs / (conv_ms * 1e-3) / 1e9 if conv_ms else float("nan"),
        "reorder_ms": sum(s.time_ms for op, s in shares.items() if op.startswith(REORDER_PREFIX)),
        "kernel_ms": sum(s.time_ms for s in shares.values()),
    }


# ------------------------------------------------------------------------------------------ results


def models_table(models: list[Candidate], block: int) -> str:
    rows = []
    for m in models:
        fid = m.fidelity
        rows.append(
            [
                m.label,
                human(m.macs),
                human(m.padded_macs),
                human(m.params),
                human(m.file_bytes, "B"),
                f"{unaligned(m.conv_widths, block)} / {len(m.conv_widths)}",
                "-" if m.prune_seconds is None else f"{m.prune_seconds:.1f} s",
                "-" if fid is None else f"{fid.cosine:.3f}",
                "-" if fid is None else f"{fid.max_rel_error:.3f}",
                "-" if fid is None or fid.top1_agreement is None else f"{fid.top1_agreement:.0%}",
            ]
        )
    headers = [
        "model", "MACs (batch 1)", f"MACs padded to {block}", "params", "file", f"convs not x{block}",
        "pruning time", "cosine vs original", "max rel err", "top-1 agreement",
    ]
    return markdown_table(headers, rows)


def latency_table(report: BenchReport, models: list[Candidate]) -> str:
    padded = {m.label: m.padded_macs for m in models}
    base = padded[report.baseline]
    rows = []
    for row in report.rows:
        t = row.timing
        padded_x = base / padded[row.model]
        rows.append(
            [
                row.model,
                row.batch,
                fmt_ms(t.median_ms if t else None),
                fmt_ms(t.p90_ms if t else None),
                fmt_ratio(row.theoretical_speedup),
                fmt_ratio(padded_x),
                fmt_ratio(row.measured_speedup),
                fmt_percent(row.realization),
                fmt_percent(row.measured_speedup / padded_x if row.measured_speedup else None),
            ]
        )
    headers = [
        "model", "batch", "median ms", "p90 ms", "theoretical x", "padded theoretical x", "measured x",
        "realization", "realization of padded",
    ]
    return markdown_table(headers, rows)


def kernel_table(report: BenchReport) -> str:
    rows = []
    for row in report.rows:
        k = kernel_summary(row)
        rows.append(
            [
                row.model,
                row.batch,
                f"{k['nchwc_conv_kernels']} / {k['conv_kernels']}",
                fmt_ms(k["conv_ms"]),
                f"{k['conv_gmacs_per_s']:.0f}",
                fmt_ms(k["reorder_ms"]),
                fmt_ms(k["kernel_ms"] - k["conv_ms"] - k["reorder_ms"]),
            ]
        )
    headers = ["model", "batch", "NCHWc conv kernels", "conv ms", "useful conv GMAC/s", "reorder ms", "other ms"]
    return markdown_table(headers, rows)


def block_table(check: BenchReport) -> str:
    rows = [
        [
            row.model,
            fmt_ms(row.timing.median_ms if row.timing else None),
            fmt_ratio(row.theoretical_speedup),
            fmt_ratio(row.measured_speedup),
        ]
        for row in check.rows
    ]
    return markdown_table(["conv stack", "median ms", "theoretical x", "measured x"], rows)


def commentary(report: BenchReport, models: list[Candidate], check: BenchReport, block: int) -> list[str]:
    """Findings computed from this run's numbers; no sentence states a number it did not measure."""
    lines = []
    pruned = models[1:]
    rows = {(row.model, row.batch): row for row in report.rows}
    padded = {m.label: models[0].padded_macs / m.padded_macs for m in models}
    for batch in report.options.batch_sizes:
        measured = [rows[m.label, batch] for m in pruned if rows[m.label, batch].realization is not None]
        if not measured:
            continue
        parts = [
            f"{r.model} {fmt_ratio(r.measured_speedup)} of {fmt_ratio(r.theoretical_speedup)} ({r.realization:.0%})"
            for r in measured
        ]
        lines.append(f"Batch {batch}: measured speedups " + "; ".join(parts) + ".")

    wide, mid = check.rows[0], check.rows[1]
    if wide.timing and mid.timing:
        lines.append(
            f"Block check: {mid.model} has {fmt_ratio(mid.theoretical_speedup)} fewer MACs than {wide.model}; "
            f"its measured speedup was {fmt_ratio(mid.measured_speedup)}, so on this machine ORT's conv kernels "
            + (
                f"pay for whole blocks of {block} channels: a width that is not a multiple of {block} costs "
                "as much as the next multiple."
                if mid.measured_speedup - 1 < PADDING_EVIDENCE * (mid.theoretical_speedup - 1)
                else f"did not pad to blocks of {block} channels in this check."
            )
        )
    for m in pruned:
        off = unaligned(m.conv_widths, block)
        cells = ", ".join(
            f"batch {b} {fmt_percent(rows[m.label, b].measured_speedup / padded[m.label])}"
            for b in report.options.batch_sizes
            if rows[m.label, b].measured_speedup
        )
        if off:
            lines.append(
                f"{m.label}: {off} of {len(m.conv_widths)} convs have a width that is not a multiple of {block}; "
                f"padded to whole blocks its MACs fall {fmt_ratio(padded[m.label])} instead of "
                f"{fmt_ratio(models[0].macs / m.macs)}; measured speedup as a share of that padded figure: {cells}."
            )
        else:
            lines.append(
                f"{m.label}: every conv width is a multiple of {block}, so padding costs it nothing; "
                f"measured speedup as a share of its {fmt_ratio(padded[m.label])} MAC ratio: {cells}."
            )
    reorders = {
        (row.model, row.batch): kernel_summary(row)["reorder_ms"]
        for row in report.rows
        if kernel_summary(row)["reorder_ms"] > 0
    }
    if reorders:
        worst = max(reorders, key=lambda key: reorders[key] / kernel_summary(rows[key])["kernel_ms"])
        share = reorders[worst] / kernel_summary(rows[worst])["kernel_ms"]
        lines.append(
            f"Layout reorders (NCHW <-> NCHWc) cost at most {share:.1%} of profiled kernel time "
            f"({worst[0]}, batch {worst[1]}: {reorders[worst]:.1f} ms)."
        )
    for batch in report.options.batch_sizes:
        r8, r16 = rows.get(("onnxcompress r8", batch)), rows.get(("onnxcompress r16", batch))
        if r8 and r16 and r8.timing and r16.timing:
            lines.append(
                f"Batch {batch}: onnxcompress r16 takes {r16.timing.median_ms / r8.timing.median_ms:.0%} of "
                "onnxcompress r8's median time at the same MAC target."
            )
    for batch in report.options.batch_sizes:
        ours = {m.label: rows[m.label, batch] for m in pruned if m.label.startswith("onnxcompress")}
        theirs = [rows[m.label, batch] for m in pruned if not m.label.startswith("onnxcompress")]
        best = min(ours.values(), key=lambda r: r.timing.median_ms if r.timing else math.inf)
        for other in theirs:
            if best.timing and other.timing:
                lines.append(
                    f"Batch {batch}: the faster onnxcompress model ({best.model}) takes "
                    f"{best.timing.median_ms / other.timing.median_ms:.0%} of {other.model}'s median time."
                )
    noisy = [r for r in report.rows if r.timing and r.timing.p90_ms > (1 + NOISY_SPREAD) * r.timing.median_ms]
    if noisy:
        names = ", ".join(f"{r.model} at batch {r.batch}" for r in noisy)
        lines.append(
            f"Noisy rows (p90 more than {NOISY_SPREAD:.0%} above the median): {names}; read their ratios loosely."
        )
    return lines


def match_text(theirs: Candidate, ours: Candidate) -> str:
    """How close Torch-Pruning's MACs came to ours, by Torch-Pruning's counter (the search) and by ours."""
    tries = theirs.extra["mac_match_tries"]
    counted = min(abs(t["mac_fraction"] / theirs.extra["target_fraction"] - 1) for t in tries)
    verdict = (
        f"matched within {MAC_MATCH_TOLERANCE:.0%}"
        if counted <= MAC_MATCH_TOLERANCE
        else f"closest of {len(tries)} tries; the {MAC_MATCH_TOLERANCE:.0%} tolerance was not reached"
    )
    return (
        f"searched with tp.utils.count_ops_and_params for onnxcompress r8's MAC fraction, {verdict}; "
        f"by onnxcompress's count {human(theirs.macs)} vs {human(ours.macs)} MACs, {theirs.macs / ours.macs - 1:+.1%}"
    )


def contention_line(others: float | None, niceness: int) -> str:
    """How much of the CPU other processes took while timing, and the script's priority when not the default."""
    if others is None:
        text = "CPU use of other processes while timing: not measurable on this platform"
    else:
        text = f"Other processes used {others:.0%} of the CPU time while the models were timed"
        if others > OTHERS_NOTICE:
            text += (
                ": absolute times are inflated and noisier than on an idle machine; the interleaved ratios are "
                "the fairer figures"
            )
    if niceness:
        text += f"; the script ran at niceness {niceness}"
        if niceness < 0:
            text += " (scheduled ahead of the other processes)"
    return text + "."


def markdown(
    report: BenchReport, models: list[Candidate], check: BenchReport, fidelity_source: str, command: str,
    seconds: float, others: float | None,
) -> str:
    env = report.environment
    block = nchwc_block(env)
    theirs = next(m for m in models if m.tool.startswith("torch-pruning"))
    ours8 = next(m for m in models if m.label == "onnxcompress r8")
    lines = [
        "## Structured pruning: ResNet-50 shape, onnxcompress vs Torch-Pruning",
        "",
        f"ResNet-50 layout (bottlenecks [3, 4, 6, 3], widths 64..2048, {IMAGE_SIZE}x{IMAGE_SIZE}), exported with "
        "the TorchScript exporter (opset 17, dynamic batch) and cleaned with the `cleanup` recipe (BatchNorm "
        f"folded). onnxcompress: `prune-channels` with target_macs {TARGET_MACS}, L2 importance, uniform "
        "allocation, no calibration or recovery, round_to 8 and 16. Torch-Pruning "
        f"{theirs.tool.split()[-1]}: MagnitudePruner, L2 group importance, per-layer ratio "
        f"{theirs.settings['pruning_ratio']:.3f} ({match_text(theirs, ours8)}), fc kept, round_to {TP_ROUND_TO}; "
        "its pruned module is exported and cleaned the same way.",
        "",
        f"**{RANDOM_WEIGHTS_NOTE}** Fidelity inputs: {fidelity_source}; outputs from ONNX Runtime.",
        "",
        f"Machine: {machine_line(env)}. {contention_line(others, os.nice(0))}",
        "",
        f"{report.options.runs} timed runs per model and batch after {report.options.warmup} warm-up runs, "
        "models interleaved in one process; medians and p90. Theoretical speedup = MAC ratio "
        "(onnxcompress.analysis.cost); realization = measured / theoretical. \"Padded\" MACs round every "
        f"Conv's output width, and its input width when at least {block}, up to a multiple of {block} (MLAS's "
        "NCHWc channel block on this CPU), as ORT's NCHWc conv kernels compute them.",
        "",
        models_table(models, block),
        "",
        f"Pruning time: onnxcompress, {ours8.timing_note}; Torch-Pruning, {theirs.timing_note}.",
        "",
        latency_table(report, models),
        "",
        f"Where the time went (ORT profile, {report.options.profile_runs} runs per model and batch; conv kernels "
        "mapped back to model nodes and their MACs; useful GMAC/s counts the unpadded MACs). Profiles run one "
        "model after another, not interleaved, so compare rows across models only loosely; within a row the "
        "split between kernels holds:",
        "",
        kernel_table(report),
        "",
        f"Block check ({BLOCK_CHECK_LAYERS} 3x3 convs on {BLOCK_CHECK_SIZE}x{BLOCK_CHECK_SIZE} maps, batch "
        f"{BLOCK_CHECK_BATCH}, {check.options.runs} interleaved runs; baseline {check.baseline}):",
        "",
        block_table(check),
        "",
        "Findings from this run:",
        "",
        *[f"- {line}" for line in commentary(report, models, check, block)],
        "",
        f"Reproduce (about {math.ceil(seconds / 60)} min here):",
        "",
        "```bash",
        "pip install -e .[dev,torch,plot] torch-pruning",
        command,
        "```",
        "",
        f"![theoretical vs measured speedup]({NAME}.png)",
        "",
    ]
    return "\n".join(lines)


def to_json(
    report: BenchReport, models: list[Candidate], check: BenchReport, fidelity_source: str, command: str,
    clock: Stopwatch, others: float | None,
) -> dict:
    block = nchwc_block(report.environment)
    return {
        "benchmark": NAME,
        "command": command,
        "weights": RANDOM_WEIGHTS_NOTE,
        "fidelity_inputs": fidelity_source,
        "target_macs": TARGET_MACS,
        "mac_match_tolerance": MAC_MATCH_TOLERANCE,
        "nchwc_block": block,
        "other_processes_cpu_share_while_timing": others,
        "niceness": os.nice(0),
        "models": [
            {
                "label": m.label,
                "tool": m.tool,
                "settings": m.settings,
                "macs_batch1": m.macs,
                "padded_macs_batch1": m.padded_macs,
                "params": m.params,
                "file_bytes": m.file_bytes,
                "conv_widths": m.conv_widths,
                "convs_not_multiple_of_block": unaligned(m.conv_widths, block),
                "prune_seconds": m.prune_seconds,
                "prune_seconds_means": m.timing_note,
                "fidelity": m.fidelity,
                **m.extra,
            }
            for m in models
        ],
        "kernels": {f"{row.model} @ batch {row.batch}": kernel_summary(row) for row in report.rows},
        "kernels_by_op": {
            f"{row.model} @ batch {row.batch}": {op: {**vars(s), "gmacs_per_s": s.gmacs_per_s} for op, s in kernel_shares(row).items()}
            for row in report.rows
        },
        "phases_seconds": clock.phases,
        "total_seconds": clock.total(),
        "bench": report_without_layers(report),
        "block_check": check.to_dict(),
    }


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help=f"timed runs per model and batch (at least {MIN_RUNS})")
    parser.add_argument("--batches", default="1,16", help="batch sizes, e.g. 1,16")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="folder for the JSON, Markdown and PNG")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: physical cores)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from rich.console import Console

    from onnxcompress.bench import (
        environment,
        progress_bar,
        render_environment,
        render_table,
        session_providers,
    )

    console = Console()
    options = BenchOptions(
        batch_sizes=parse_batch_sizes(args.batches), runs=args.runs, threads=args.threads,
        profile=True, profile_runs=PROFILE_RUNS,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    block = nchwc_block(environment("cpu", session_providers("cpu"), 1))
    command = "python benchmarks/prune_resnet50.py " + shlex.join(
        ["--runs", str(args.runs), "--batches", args.batches] + (["--threads", str(args.threads)] if args.threads else [])
    )
    clock = Stopwatch()
    console.print(f"[bold]{NAME}[/]: {RANDOM_WEIGHTS_NOTE}")
    with tempfile.TemporaryDirectory(prefix=f"{NAME}-") as tmp:
        folder = Path(tmp)
        with clock.phase("build, export and clean the original"):
            zoo, torch_model, inputs = build_torch_model()
            original_path = export_and_clean(zoo, torch_model, inputs, folder, "original")
        original = Candidate("original", original_path, "torch.onnx.export (TorchScript) + cleanup", {})
        describe(original, block)
        console.print(f"original: {human(original.macs)} MACs, {human(original.params)} params")

        ours = []
        for round_to in ROUND_TOS:
            with clock.phase(f"onnxcompress round_to {round_to}"):
                candidate = prune_onnxcompress(original_path, folder, round_to)
            describe(candidate, block)
            ours.append(candidate)
            console.print(
                f"{candidate.label}: {human(candidate.macs)} MACs ({candidate.macs / original.macs:.3f}), "
                f"pass {candidate.prune_seconds:.1f} s"
            )

        target = ours[0].macs / original.macs
        with clock.phase("Torch-Pruning: match MACs, export, clean"):
            theirs = prune_torch_pruning(zoo, torch_model, inputs, target, folder)
        describe(theirs, block)
        console.print(
            f"{theirs.label}: ratio {theirs.settings['pruning_ratio']:.3f}, {human(theirs.macs)} MACs "
            f"({theirs.macs / original.macs:.3f}; onnxcompress r8 {target:.3f}), prune {theirs.prune_seconds:.1f} s"
        )

        models = [original, *ours, theirs]
        with clock.phase("fidelity"):
            fidelity_source = measure_fidelity(original, models[1:])

        monitor = CpuMonitor()
        with clock.phase("latency (interleaved) and profile"), progress_bar(console) as progress:
            report = benchmark([(m.label, str(m.path)) for m in models], options, progress)
        with clock.phase("block check"):
            check = block_check(zoo, block, folder, args.threads)
        others = monitor.share()

    console.print(render_environment(report))
    console.print(render_table(report))
    console.print(render_table(check))
    console.print(contention_line(others, os.nice(0)))
    console.print(f"total {clock.total():.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in clock.phases.items()))
    seconds = clock.total()
    write_json(args.out / f"{NAME}.json", to_json(report, models, check, fidelity_source, command, clock, others))
    write_text(args.out / f"{NAME}.md", markdown(report, models, check, fidelity_source, command, seconds, others))
    plot_speedups(report, args.out / f"{NAME}.png")
    console.print(f"wrote {args.out / NAME}.json, .md and .png")


def main(argv: list[str] | None = None) -> int:
    return script_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())

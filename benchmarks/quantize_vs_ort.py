"""Static int8 (QDQ) quantization: onnxcompress's quantize-int8 against ONNX Runtime's quantize_static.

    python benchmarks/quantize_vs_ort.py [--runs 30] [--batches 1,16] [--out benchmarks/results]

Models: the bundled digits CNN (trained weights; its calibration images and held-out test set) and
the zoo families resnet_basic, mobilenet_v2 (random weights, standard-normal images) and bert
(random weights, random token ids), each exported with the TorchScript exporter (dynamic batch) and
run through the "cleanup" recipe; plus bert_outliers, the same bert with OUTLIER_CHANNELS of every
LayerNorm scale multiplied by OUTLIER_FACTOR (the systematic outlier channels of trained BERT/LLM
activations). Every model is quantized three ways from the same cleaned float model and the same
calibration samples, fed in the same batches (the encoders a fourth way):

- ours: QuantizeQDQ(method="mse", preset="cpu") through onnxcompress.Pipeline (per-channel int8
  weights, uint8 activations, bias correction on: the default);
- ours_smooth (encoders only): the same with smooth_alpha=SMOOTH_ALPHA (SmoothQuant first);
- ORT MinMax and ORT Entropy: onnxruntime.quantization.quantize_static(QuantFormat.QDQ,
  activation_type=QUInt8, weight_type=QInt8, per_channel=True) fed by a CalibrationDataReader.

Each quantization runs alone in a fresh child process that imports both toolkits and loads the
data before it starts measuring, so its wall time and its peak RSS growth (ru_maxrss after minus
before) belong to calibration plus quantization only, native ORT allocations included. Then, in
this process: output SQNR and top-1 agreement against the float model on held-out inputs (and
real accuracy on the digits test set), the int8 kernels ORT builds (analysis.fusion.fusion_check),
and latency with all four models of a family interleaved (onnxcompress.bench, float baseline first).

Writes quantize_vs_ort.json, quantize_vs_ort.md and quantize_vs_ort.png to --out.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: make `common` importable

import numpy as np
from common import (
    DEFAULT_RESULTS,
    CpuMonitor,
    Stopwatch,
    fmt_percent,
    fmt_ratio,
    machine_line,
    markdown_table,
    repo_root_on_path,
    write_json,
    write_text,
)

NAME = "quantize_vs_ort"
DIGITS = "digits_cnn"
ZOO_FAMILIES = ("resnet_basic", "mobilenet_v2", "bert")
METHODS = ("ours", "ort_minmax", "ort_entropy")
SMOOTH = "ours_smooth"  # encoders only
METHOD_LABELS = {"ours": "onnxcompress mse", "ort_minmax": "ORT MinMax", "ort_entropy": "ORT Entropy",
                 SMOOTH: "onnxcompress mse + SmoothQuant"}
ENCODERS = ("bert", "bert_outliers")
SMOOTH_ALPHA = 0.5
#: bert_outliers: these LayerNorm scale channels multiplied by OUTLIER_FACTOR.
OUTLIER_CHANNELS = (3, 17, 29)
OUTLIER_FACTOR = 50.0
FLOAT = "float"
#: Calibration samples: all of the digits calibration set's first 256; 128 random ones for the zoo models.
DIGITS_CALIBRATION = 256
ZOO_CALIBRATION = 128
#: Calibration memory and time are also measured on this many samples for every model (the zoo's are
#: the same seeded stream, so their first ZOO_CALIBRATION samples are the calibration set above).
MEMORY_SAMPLES = 256
#: Held-out random inputs for the zoo models (the digits use their whole test set).
ZOO_HELDOUT = 256
#: Both toolkits see the calibration data in batches of this many samples (onnxcompress's own default).
CALIBRATION_BATCH = 16
#: Held-out inputs run through ORT in batches of this many samples.
EVAL_BATCH = 64
IMAGE_SHAPE = (3, 32, 32)  # zoo CNN input (tests/zoo.py builds them at 32 x 32)
BERT_SEQUENCE = 12  # zoo BERT's example sequence length
BERT_VOCAB = 100  # zoo BERT's vocabulary (token ids are drawn from [0, BERT_VOCAB))
CALIBRATION_SEED, HELDOUT_SEED = 0, 1
#: The issue's goals.
GOAL_LATENCY_RATIO = 1.0  # ours / ORT median latency, at every batch size
GOAL_SQNR_MARGIN_DB = 6.0  # ours >= best ORT + this
GOAL_MEMORY_RATIO = 0.5  # our calibration peak RSS growth / ORT Entropy's
#: Seconds one child quantization may take before it is reported as failed.
CHILD_TIMEOUT = 600
#: Above this share of the CPU taken by other processes while timing, the report warns that times are inflated.
OTHERS_NOTICE = 0.05
KIB = 1024
#: Child "method" that measures importing LAZY_IMPORT alone.
IMPORT_COST = "import_cost"
LAZY_IMPORT = "onnxruntime.tools.symbolic_shape_infer"
MEMORY_FIELDS = ("error", "seconds", "rss_before_mib", "rss_peak_mib", "rss_growth_mib", "details")


# ------------------------------------------------------------------------------------------ child


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0: clear_refs 5), so imports before it
    do not mask what comes after; False where the platform does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _max_rss_bytes() -> int:
    """Peak resident set size of this process's memory since the last reset (VmHWM on Linux).

    ru_maxrss is no good here on Linux: exec carries the parent's peak into it, and this script's
    parent holds torch. Elsewhere ru_maxrss (bytes on macOS) is the fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KIB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * KIB


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over the calibration arrays, CALIBRATION_BATCH at a time."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        count = len(next(iter(arrays.values())))
        self.batches = iter(
            [{k: v[s : s + CALIBRATION_BATCH] for k, v in arrays.items()} for s in range(0, count, CALIBRATION_BATCH)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def child(method: str, model: Path, calib: Path, output: Path, report: Path) -> None:
    """Quantize `model` with `method`; write {seconds, rss_before, rss_peak, details} to `report`."""
    import onnxruntime.quantization as ortq

    import onnxcompress
    from onnxcompress.passes.quantize import QuantizeQDQ
    from onnxcompress.pipeline import Pipeline
    from onnxcompress.verify import VerifyOptions

    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs a pre-processing hint per call
    if method == IMPORT_COST:
        peak_reset = _reset_peak_rss()
        rss_before, start = _max_rss_bytes(), time.perf_counter()
        importlib.import_module(LAZY_IMPORT)
        report.write_text(json.dumps({"seconds": time.perf_counter() - start, "rss_before": rss_before,
                                      "rss_peak": _max_rss_bytes(), "details": {"peak_rss_reset": peak_reset}}))
        return
    # Imported lazily by onnxcompress's shape analysis on models with symbolic dims; it pulls in torch
    # and sympy. An import is not calibration: every child pays it up front (its cost is measured apart).
    importlib.import_module(LAZY_IMPORT)
    with np.load(calib, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    samples = len(next(iter(arrays.values())))
    peak_reset = _reset_peak_rss()
    rss_before = _max_rss_bytes()
    start = time.perf_counter()
    details: dict[str, Any] = {"samples": samples, "peak_rss_reset": peak_reset}
    if method in ("ours", SMOOTH):
        alpha = SMOOTH_ALPHA if method == SMOOTH else None
        quantize = QuantizeQDQ(method="mse", preset="cpu", per_channel=True, samples=samples, smooth_alpha=alpha)
        # No verification: ORT's quantize_static does none, and this measures the quantization alone.
        result = Pipeline([quantize], verify=VerifyOptions(enabled=False)).run(
            str(model), calibration=arrays, input_shapes=sample_shapes(arrays))
        onnxcompress.save(result.model, output)
        record = result.report.passes[0]
        details.update(options=quantize.options(), int8_nodes=len(record.details["int8_nodes"]),
                       notes=list(record.details["notes"]))
    else:
        calibrate = {"ort_minmax": ortq.CalibrationMethod.MinMax, "ort_entropy": ortq.CalibrationMethod.Entropy}[method]
        ortq.quantize_static(
            str(model), str(output), _Reader(arrays), quant_format=ortq.QuantFormat.QDQ,
            activation_type=ortq.QuantType.QUInt8, weight_type=ortq.QuantType.QInt8, per_channel=True,
            calibrate_method=calibrate,
        )
        details.update(options={"quant_format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8",
                                "per_channel": True, "calibrate_method": calibrate.name})
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "rss_before": rss_before, "rss_peak": _max_rss_bytes(), "details": details}
    report.write_text(json.dumps(out))


# --------------------------------------------------------------------------------------- data


@dataclass
class Subject:
    """One model family: its cleaned float model, calibration and held-out data."""

    name: str
    path: Path
    calibration: dict[str, np.ndarray]
    heldout: dict[str, np.ndarray]
    heldout_source: str
    calibration_source: str
    memory_calibration: dict[str, np.ndarray] = field(default_factory=dict)  # MEMORY_SAMPLES samples
    labels: np.ndarray | None = None  # digits only: real labels of the held-out images
    bench_shapes: dict[str, tuple[int, ...]] | None = None
    weights: str = "random"
    methods: tuple[str, ...] = METHODS


@dataclass
class Quantized:
    """One quantization of one subject and what measuring it found."""

    method: str
    path: Path | None
    error: str | None = None
    seconds: float | None = None
    rss_before_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_growth_mib: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    sqnr_db: float | None = None
    cosine: float | None = None
    max_abs_error: float | None = None
    top1_agreement: float | None = None
    accuracy: float | None = None
    int8_kernels: int | None = None
    int8_by_op: dict[str, int] = field(default_factory=dict)
    float_compute_left: int | None = None
    qdq_left: int | None = None
    median_ms: dict[int, float | None] = field(default_factory=dict)


def sample_shapes(arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """One sample's input shapes (batch 1): pins dims the model leaves symbolic (BERT's sequence)."""
    return {k: (1, *v.shape[1:]) for k, v in arrays.items()}


def clean(raw: Path, folder: Path, stem: str, shapes: dict[str, tuple[int, ...]]) -> Path:
    import onnxcompress
    from onnxcompress.pipeline import Pipeline

    result = Pipeline.from_recipe("cleanup").run(str(raw), input_shapes=shapes)  # verified exact after every pass
    return onnxcompress.save(result.model, folder / f"{stem}.onnx")


def build_subjects(folder: Path) -> list[Subject]:
    from onnxcompress import demo_data

    repo_root_on_path()
    from tests import zoo

    subjects = []
    images, labels = demo_data.load_test_set()
    calib = demo_data.load_calibration()[:DIGITS_CALIBRATION]
    name = demo_data.INPUT_NAME
    subjects.append(Subject(
        DIGITS, clean(demo_data.demo_model_path(), folder, DIGITS, sample_shapes({name: calib})), {name: calib}, {name: images},
        f"digits test set ({len(images)} images)", f"digits calibration set (first {len(calib)} images)",
        memory_calibration={name: calib}, labels=labels, weights="trained",
    ))
    for family in ZOO_FAMILIES:
        raw = zoo.export(family, folder / f"{family}.raw.onnx", dynamo=False, dynamic_batch=True)
        (input_name,) = zoo.input_names(family)
        if family == "bert":
            calib_rng, held_rng = np.random.default_rng(CALIBRATION_SEED), np.random.default_rng(HELDOUT_SEED)
            memory_x = calib_rng.integers(0, BERT_VOCAB, (MEMORY_SAMPLES, BERT_SEQUENCE), dtype=np.int64)
            held_x = held_rng.integers(0, BERT_VOCAB, (ZOO_HELDOUT, BERT_SEQUENCE), dtype=np.int64)
            kind = f"random token ids in [0, {BERT_VOCAB}), length {BERT_SEQUENCE}"
            shapes = {input_name: (1, BERT_SEQUENCE)}
        else:
            memory_x = np.random.default_rng(CALIBRATION_SEED).standard_normal((MEMORY_SAMPLES, *IMAGE_SHAPE), np.float32)
            held_x = np.random.default_rng(HELDOUT_SEED).standard_normal((ZOO_HELDOUT, *IMAGE_SHAPE), np.float32)
            kind = "standard-normal images " + "x".join(map(str, IMAGE_SHAPE))
            shapes = None
        calib_x = memory_x[:ZOO_CALIBRATION]
        path = clean(raw, folder, family, sample_shapes({input_name: calib_x}))
        subjects.append(Subject(
            family, path, {input_name: calib_x}, {input_name: held_x},
            f"{ZOO_HELDOUT} {kind} (seed {HELDOUT_SEED})", f"{ZOO_CALIBRATION} {kind} (seed {CALIBRATION_SEED})",
            memory_calibration={input_name: memory_x}, bench_shapes=shapes,
            methods=METHODS + ((SMOOTH,) if family in ENCODERS else ()),
        ))
        if family == "bert":
            subjects.append(with_outliers(subjects[-1], folder))
    return subjects


def with_outliers(subject: Subject, folder: Path) -> Subject:
    """`subject` with OUTLIER_CHANNELS of every LayerNorm scale multiplied by OUTLIER_FACTOR."""
    import dataclasses

    import onnx
    from onnx import numpy_helper

    proto = onnx.load(subject.path)
    scales = {n.input[1] for n in proto.graph.node if n.op_type == "LayerNormalization"}
    for t in proto.graph.initializer:
        if t.name in scales:
            a = numpy_helper.to_array(t).copy()
            a[list(OUTLIER_CHANNELS)] *= OUTLIER_FACTOR
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    path = folder / "bert_outliers.onnx"
    onnx.save(proto, path)
    return dataclasses.replace(subject, name="bert_outliers", path=path, weights=(
        f"random, LayerNorm scale channels {list(OUTLIER_CHANNELS)} x{OUTLIER_FACTOR:g}"))


# -------------------------------------------------------------------------------------- quantize


def quantize_in_child(subject: Subject, method: str, folder: Path, *, memory_run: bool = False) -> Quantized:
    """Quantize in a fresh child process; `memory_run` uses the MEMORY_SAMPLES calibration set instead."""
    stem = f"{subject.name}.{'memory' if memory_run else 'main'}"
    calib = folder / f"{stem}.calib.npz"
    if not calib.exists():
        np.savez(calib, **(subject.memory_calibration if memory_run else subject.calibration))
    output = folder / f"{stem}.{method}.onnx"
    report = folder / f"{stem}.{method}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--child-model", str(subject.path),
               "--child-calib", str(calib), "--child-output", str(output), "--child-report", str(report)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return Quantized(method, None, error=f"did not finish within {CHILD_TIMEOUT} s")
    if done.returncode != 0 or not report.exists():
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return Quantized(method, None, error=(lines[-1] if lines else f"exit status {done.returncode}")[:300])
    data = json.loads(report.read_text())
    mib = 1024.0 * 1024.0
    return Quantized(
        method, output, seconds=data["seconds"], rss_before_mib=data["rss_before"] / mib,
        rss_peak_mib=data["rss_peak"] / mib, rss_growth_mib=(data["rss_peak"] - data["rss_before"]) / mib,
        details=data["details"],
    )


# -------------------------------------------------------------------------------------- measure


def count(arrays: dict[str, np.ndarray]) -> int:
    return len(next(iter(arrays.values())))


def batched(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    count = len(next(iter(arrays.values())))
    return [{k: v[s : s + EVAL_BATCH] for k, v in arrays.items()} for s in range(0, count, EVAL_BATCH)]


def measure_quality(subject: Subject, reference: list[list[np.ndarray]], quantized: Quantized) -> None:
    from onnxcompress import demo_data
    from onnxcompress.analysis.fusion import fusion_check
    from onnxcompress.verify import compare, outputs

    got = outputs(quantized.path, batched(subject.heldout), f"{subject.name} {quantized.method}")
    fidelity = compare(reference, got, subject.heldout_source)
    quantized.sqnr_db, quantized.cosine = fidelity.sqnr_db, fidelity.cosine
    quantized.max_abs_error, quantized.top1_agreement = fidelity.max_abs_error, fidelity.top1_agreement
    if subject.labels is not None:
        quantized.accuracy = demo_data.accuracy(quantized.path, subject.heldout[demo_data.INPUT_NAME], subject.labels)
    fusion = fusion_check(quantized.path)
    quantized.int8_kernels, quantized.int8_by_op = fusion.int8_count, dict(fusion.int8)
    quantized.float_compute_left, quantized.qdq_left = fusion.float_compute_count, sum(fusion.qdq.values())


def measure_latency(subject: Subject, done: list[Quantized], args: argparse.Namespace):
    from onnxcompress.bench import BenchOptions, benchmark

    models = [(FLOAT, str(subject.path))] + [(q.method, str(q.path)) for q in done]
    options = BenchOptions(batch_sizes=args.batches, runs=args.runs, threads=args.threads, input_shapes=subject.bench_shapes)
    report = benchmark(models, options)
    for q in done:
        q.median_ms = {b: (r.timing.median_ms if r.timing else None) for b in args.batches for r in [report.row(q.method, b)]}
    return report


# ------------------------------------------------------------------------------------------ write


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def goals(subject: str, results: dict[str, Quantized], memory: dict[str, Quantized],
          batches: tuple[int, ...], ours_method: str = "ours") -> dict[str, Any]:
    """Each goal's measured value and whether it is met (None where a number is missing)."""
    ours = results[ours_method]
    ort = [results[m] for m in ("ort_minmax", "ort_entropy") if results[m].error is None]
    latency = {}
    for b in batches:
        ratios = {q.method: ratio(ours.median_ms.get(b), q.median_ms.get(b)) for q in ort}
        latency[b] = {"ratios": ratios, "met": all(r is not None and r <= GOAL_LATENCY_RATIO for r in ratios.values())
                      if ratios else None}
    best_ort = max((q.sqnr_db for q in ort if q.sqnr_db is not None), default=None)
    margin = None if best_ort is None or ours.sqnr_db is None else ours.sqnr_db - best_ort
    entropy = memory["ort_entropy"]
    mine = memory.get(ours_method)
    memory = ratio(mine.rss_growth_mib, entropy.rss_growth_mib) if entropy.error is None and mine else None
    return {
        "model": subject if ours_method == "ours" else f"{subject} ({METHOD_LABELS[ours_method]})",
        "latency": latency,
        "sqnr_margin_db": margin,
        "sqnr_met": None if margin is None else margin >= GOAL_SQNR_MARGIN_DB,
        "memory_ratio_vs_entropy": memory,
        "memory_met": None if memory is None else memory <= GOAL_MEMORY_RATIO,
    }


def yes_no(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "**no**")


def fmt_db(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.1f}"


def fmt_pct(value: float | None) -> str:
    """One decimal: 99.7% and 100% differ by one test image in the digits set."""
    return "-" if value is None else f"{value:.1%}"


def fmt_latency(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def fmt_mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def memory_table(subjects: list[Subject], memory: dict[str, dict[str, Quantized]]) -> str:
    headers = ["model", *(f"{METHOD_LABELS[m]} MiB" for m in METHODS), "ours / ORT Entropy",
               *(f"{METHOD_LABELS[m]} s" for m in METHODS)]
    rows = []
    for s in subjects:
        r = memory[s.name]
        ours, entropy = r["ours"], r["ort_entropy"]
        rows.append([
            s.name, *(fmt_mib(r[m].rss_growth_mib) if r[m].error is None else "failed" for m in METHODS),
            fmt_ratio(ratio(ours.rss_growth_mib, entropy.rss_growth_mib)),
            *("-" if r[m].seconds is None else f"{r[m].seconds:.2f}" for m in METHODS),
        ])
    return markdown_table(headers, rows)


def results_table(subjects: list[Subject], results: dict[str, dict[str, Quantized]], floats: dict[str, dict],
                  batches: tuple[int, ...]) -> str:
    headers = ["model", "quantizer", "int8 kernels (float compute left)", "SQNR dB", "top-1 agree", "accuracy",
               *[f"b{b} ms" for b in batches], "calib s", "peak RSS growth MiB"]
    rows = []
    for s in subjects:
        f = floats[s.name]
        rows.append([s.name, "float", "-", "-", "-", fmt_pct(f.get("accuracy")),
                     *[fmt_latency(f["median_ms"].get(b)) for b in batches], "-", "-"])
        for m in s.methods:
            q = results[s.name][m]
            if q.error:
                rows.append([s.name, METHOD_LABELS[m], f"failed: {q.error}", *["-"] * (5 + len(batches))])
                continue
            rows.append([
                s.name, METHOD_LABELS[m], f"{q.int8_kernels} ({q.float_compute_left})", fmt_db(q.sqnr_db),
                fmt_pct(q.top1_agreement), fmt_pct(q.accuracy),
                *[fmt_latency(q.median_ms.get(b)) for b in batches], f"{q.seconds:.2f}", fmt_mib(q.rss_growth_mib),
            ])
    return markdown_table(headers, rows, right=[False, False] + [True] * (len(headers) - 2))


def goals_table(all_goals: list[dict[str, Any]], batches: tuple[int, ...]) -> str:
    headers = [*(f"ours/ORT b{b} (MinMax, Entropy)" for b in batches), "SQNR - best ORT dB", "memory / ORT Entropy"]
    headers = ["model", *headers]
    rows = []
    for g in all_goals:
        cells = [g["model"]]
        for b in batches:
            lat = g["latency"][b]
            pair = ", ".join(fmt_ratio(lat["ratios"].get(m)) for m in ("ort_minmax", "ort_entropy"))
            cells.append(f"{pair} ({'met' if lat['met'] else 'not met'})" if lat["met"] is not None else pair)
        margin = g["sqnr_margin_db"]
        cells.append("-" if margin is None else f"{margin:+.1f} ({'met' if g['sqnr_met'] else 'not met'})")
        mem = g["memory_ratio_vs_entropy"]
        cells.append("-" if mem is None else f"{mem:.2f}x ({'met' if g['memory_met'] else 'not met'})")
        rows.append(cells)
    return markdown_table(headers, rows)


def _slower(a: Quantized, b: Quantized) -> bool:
    return a.seconds is not None and b.seconds is not None and a.seconds > b.seconds


def _less(a: Quantized, b: Quantized) -> bool:
    return a.rss_growth_mib is not None and b.rss_growth_mib is not None and a.rss_growth_mib < b.rss_growth_mib


def commentary(subjects: list[Subject], results: dict[str, dict[str, Quantized]],
               memory: dict[str, dict[str, Quantized]], all_goals: list[dict[str, Any]],
               batches: tuple[int, ...]) -> list[str]:
    """Short statements computed from the numbers: which goals hold where, and what stands out."""
    lines = []
    lat_met = [g["model"] for g in all_goals if all(g["latency"][b]["met"] for b in batches)]
    lat_miss = [g["model"] for g in all_goals if g["model"] not in lat_met]
    lines.append(
        f"Latency goal (ours/ORT <= {GOAL_LATENCY_RATIO:.1f} at batch {' and '.join(map(str, batches))}): met on "
        f"{', '.join(lat_met) or 'no model'}; not met on {', '.join(lat_miss) or 'no model'}."
    )
    sq_met = [g["model"] for g in all_goals if g["sqnr_met"]]
    sq_miss = [f"{g['model']} ({fmt_db(g['sqnr_margin_db'])} dB)" for g in all_goals if not g["sqnr_met"]]
    lines.append(
        f"SQNR goal (>= best ORT + {GOAL_SQNR_MARGIN_DB:.0f} dB): met on {', '.join(sq_met) or 'no model'}; "
        f"not met on {', '.join(sq_miss) or 'no model'}."
    )
    mem_met = [g["model"] for g in all_goals if g["memory_met"]]
    mem_miss = [f"{g['model']} ({fmt_ratio(g['memory_ratio_vs_entropy'])})" for g in all_goals if g["memory_met"] is False]
    lines.append(
        f"Memory goal (calibration peak RSS growth <= {GOAL_MEMORY_RATIO}x ORT Entropy's): met on "
        f"{', '.join(mem_met) or 'no model'}; not met on {', '.join(mem_miss) or 'no model'}."
    )
    slower = [s.name for s in subjects if _slower(memory[s.name]["ours"], memory[s.name]["ort_minmax"])]
    if slower:
        lines.append(f"Calibration plus quantization at {MEMORY_SAMPLES} samples takes longer with onnxcompress than "
                     f"with ORT MinMax on {', '.join(slower)}.")
    lean = [s.name for s in subjects if _less(memory[s.name]["ort_minmax"], memory[s.name]["ours"])]
    if lean:
        lines.append(f"ORT MinMax needs less calibration memory than onnxcompress on {', '.join(lean)}: the memory "
                     "goal is stated against ORT Entropy, whose histograms are the expensive part.")
    for s in subjects:
        r = results[s.name]
        ours = r["ours"]
        fused = {m: r[m].int8_kernels for m in s.methods if r[m].error is None}
        if len(set(fused.values())) > 1:
            by_op = "; ".join(
                f"{METHOD_LABELS[m]} {fused[m]} ({', '.join(f'{op} {n}' for op, n in sorted(r[m].int8_by_op.items()))})"
                for m in fused
            )
            lines.append(f"{s.name}: the quantizers leave ORT different int8 kernels: {by_op}. SQNR and latency "
                         "compare different amounts of int8 work here, not calibration quality alone.")
        if s.labels is not None and ours.accuracy is not None:
            accs = ", ".join(f"{METHOD_LABELS[m]} {r[m].accuracy:.1%}" for m in METHODS if r[m].accuracy is not None)
            lines.append(f"{s.name} test accuracy: {accs}.")
        if SMOOTH in r and r[SMOOTH].sqnr_db is not None and ours.sqnr_db is not None:
            lines.append(f"{s.name}: SmoothQuant (alpha {SMOOTH_ALPHA}) changes int8 SQNR by "
                         f"{r[SMOOTH].sqnr_db - ours.sqnr_db:+.1f} dB ({fmt_db(ours.sqnr_db)} -> {fmt_db(r[SMOOTH].sqnr_db)}).")
        for m in s.methods:
            if r[m].error:
                lines.append(f"{s.name}: {METHOD_LABELS[m]} failed ({r[m].error}).")
    return lines


def plot(subjects: list[Subject], results: dict[str, dict[str, Quantized]], batches: tuple[int, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in subjects]
    x = np.arange(len(names))
    width = 0.8 / len(METHODS)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        ("output SQNR vs float (dB)", lambda q: q.sqnr_db),
        (f"median latency at batch {batches[-1]} (ms)", lambda q: q.median_ms.get(batches[-1])),
        ("calibration peak RSS growth (MiB)", lambda q: q.rss_growth_mib),
    ]
    for ax, (title, value) in zip(axes, panels, strict=True):
        for i, m in enumerate(METHODS):
            values = [value(results[n][m]) for n in names]
            ax.bar(x + (i - 1) * width, [v if v is not None and math.isfinite(v) else 0 for v in values], width,
                   label=METHOD_LABELS[m])
        ax.set_xticks(x, names, rotation=15)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from onnxcompress.bench import MIN_RUNS, parse_batch_sizes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help=f"timed runs per model and batch (at least {MIN_RUNS})")
    parser.add_argument("--batches", default="1,16", help="batch sizes, e.g. 1,16")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="folder for the JSON, Markdown and PNG")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: physical cores)")
    for flag in ("--child", "--child-model", "--child-calib", "--child-output", "--child-report"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batches = parse_batch_sizes(args.batches)
    return args


def run(args: argparse.Namespace, argv: list[str]) -> None:
    from onnxcompress import demo_data
    from onnxcompress.verify import outputs

    watch = Stopwatch()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quantize-vs-ort-") as tmp:
        folder = Path(tmp)
        with watch.phase("export and clean"):
            subjects = build_subjects(folder)
            lazy = quantize_in_child(subjects[0], IMPORT_COST, folder)
        results: dict[str, dict[str, Quantized]] = {}
        floats: dict[str, dict[str, Any]] = {}
        reports = {}
        memory: dict[str, dict[str, Quantized]] = {}
        others: dict[str, float | None] = {}
        for s in subjects:
            with watch.phase("quantize (children)"):
                results[s.name] = {m: quantize_in_child(s, m, folder) for m in s.methods}
                print(f"{s.name}: " + ", ".join(
                    f"{m} {'failed: ' + q.error if q.error else f'{q.seconds:.1f}s'}" for m, q in results[s.name].items()),
                    flush=True)
                # The digits calibrate on MEMORY_SAMPLES already: their main run is their memory run.
                same = count(s.memory_calibration) == count(s.calibration)
                memory[s.name] = results[s.name] if same else {
                    m: quantize_in_child(s, m, folder, memory_run=True) for m in s.methods}
            done = [q for q in results[s.name].values() if q.error is None]
            with watch.phase("fidelity and fusion"):
                reference = outputs(s.path, batched(s.heldout), f"{s.name} float")
                for q in done:
                    measure_quality(s, reference, q)
                floats[s.name] = {"accuracy": demo_data.accuracy(s.path, s.heldout[demo_data.INPUT_NAME], s.labels)
                                  if s.labels is not None else None}
            with watch.phase("latency"):
                monitor = CpuMonitor()
                report = measure_latency(s, done, args)
                others[s.name] = monitor.share()
            reports[s.name] = report
            floats[s.name]["median_ms"] = {
                b: (r.timing.median_ms if r.timing else None) for b in args.batches for r in [report.row(FLOAT, b)]
            }
        plot(subjects, results, args.batches, args.out / f"{NAME}.png")
    all_goals = [goals(s.name, results[s.name], memory[s.name], args.batches, m)
                 for s in subjects for m in ("ours", SMOOTH) if m in s.methods]
    busiest = max((v for v in others.values() if v is not None), default=None)
    env = next(iter(reports.values())).environment
    command = "python benchmarks/quantize_vs_ort.py " + " ".join(shlex.quote(a) for a in argv)
    notes = [
        ("ORT rows use quantize_static's defaults beyond the settings named (no quant_pre_process, no extra_options); "
         "both toolkits quantize the same cleaned model (BatchNorm already folded)."),
        ("Peak RSS growth = peak RSS (VmHWM, reset with /proc/self/clear_refs just before starting) minus RSS at the "
         "start, in a fresh child process per quantization that has already imported numpy, onnx, onnxruntime, "
         f"onnxruntime.quantization, {LAZY_IMPORT} and onnxcompress and loaded the calibration arrays; it "
         "includes ORT's native allocations."),
        ("Calibration seconds are the same child's wall time for calibration plus quantization (model load and save "
         "included, our pipeline's verification switched off since ORT's quantize_static verifies nothing)."),
        (f"The zoo models' weights are seeded random and their inputs random ({ZOO_CALIBRATION} calibration samples), "
         "so their SQNR and top-1 agreement measure agreement with the float model, not accuracy; only the digits "
         f"CNN has trained weights, real calibration images ({DIGITS_CALIBRATION}) and a labelled test set."),
    ]
    if lazy.error is None:
        notes.append(
            f"Every child imports `{LAZY_IMPORT}` before measuring: onnxcompress's shape analysis imports it "
            "lazily on models with symbolic dims (here: bert), and it pulls in torch and sympy. Alone in a fresh "
            f"process that import takes {lazy.seconds:.1f} s and {fmt_mib(lazy.rss_growth_mib)} MiB of peak RSS, "
            "which a cold onnxcompress run on such a model pays on top of the numbers above."
        )
    if busiest is not None and busiest > OTHERS_NOTICE:
        notes.append(f"Other processes took up to {busiest:.0%} of the CPU while timing (per model family: "
                     + ", ".join(f"{k} {fmt_percent(v)}" for k, v in others.items())
                     + "): latencies are noisy, and sub-millisecond ratios especially so.")
    data = {
        "command": command,
        "machine": env,
        "goals_issue": {"latency_ratio_max": GOAL_LATENCY_RATIO, "sqnr_margin_db_min": GOAL_SQNR_MARGIN_DB,
                        "memory_ratio_vs_entropy_max": GOAL_MEMORY_RATIO},
        "subjects": [{"name": s.name, "weights": s.weights, "calibration": s.calibration_source,
                      "heldout": s.heldout_source, "float": floats[s.name],
                      "quantized": {m: {k: v for k, v in asdict(q).items() if k != "path"}
                                    for m, q in results[s.name].items()},
                      "memory_run": {m: {k: v for k, v in asdict(q).items() if k in MEMORY_FIELDS}
                                     for m, q in memory[s.name].items()}} for s in subjects],
        "goals": all_goals,
        "latency": {name: {"rows": [{"model": r.model, "batch": r.batch, "supported": r.supported, "reason": r.reason,
                                     "timing": r.timing, "measured_speedup": r.measured_speedup} for r in rep.rows],
                           "options": rep.options, "notes": rep.notes} for name, rep in reports.items()},
        "others_cpu_share": others,
        "memory_samples": MEMORY_SAMPLES,
        "lazy_import_cost": {"module": LAZY_IMPORT, **{k: v for k, v in asdict(lazy).items() if k in MEMORY_FIELDS}},
        "phases_seconds": watch.phases,
        "total_seconds": watch.total(),
        "notes": notes,
    }
    write_json(args.out / f"{NAME}.json", data)
    md = [
        "## Static int8 (QDQ): onnxcompress vs ONNX Runtime quantize_static",
        "",
        (f"Machine: {machine_line(env)}. Latency: median of {args.runs} interleaved runs per model and batch "
         f"(onnxcompress.bench, float baseline first)."),
        "",
        ("Quantizers: **onnxcompress mse** = `QuantizeQDQ(method=\"mse\", preset=\"cpu\")` (per-channel int8 weights, "
         "uint8 activations); **ORT MinMax / Entropy** = `quantize_static(QuantFormat.QDQ, activation_type=QUInt8, "
         "weight_type=QInt8, per_channel=True, calibrate_method=...)`. Same cleaned model, same calibration samples "
         f"in batches of {CALIBRATION_BATCH}. Bias correction is on in ours (its default). On the encoders also "
         f"**{METHOD_LABELS[SMOOTH]}** = the same with `smooth_alpha={SMOOTH_ALPHA}` (SmoothQuant before quantizing; "
         "where the producer cannot absorb the scale, here every LayerNorm output also feeds a residual Add, it "
         "inserts a per-channel float Mul, whose cost the latency columns include)."),
        "",
        "| model | weights | calibration | held-out inputs |",
        "| :--- | :--- | :--- | :--- |",
        *[f"| {s.name} | {s.weights} | {s.calibration_source} | {s.heldout_source} |" for s in subjects],
        "",
        results_table(subjects, results, floats, args.batches),
        "",
        ("int8 kernels: ops ORT runs as int8 kernels after ENABLE_ALL optimization (analysis.fusion.fusion_check); "
         "in brackets the float Conv/MatMul/Gemm left. SQNR and top-1 agreement: quantized vs float outputs on the "
         "held-out inputs (worst output)."),
        "",
        f"### Calibration memory and time at {MEMORY_SAMPLES} samples",
        "",
        memory_table(subjects, memory),
        "",
        "### Goals from the issue",
        "",
        goals_table(all_goals, args.batches),
        "",
        *[f"- {line}" for line in commentary(subjects, results, memory, all_goals, args.batches)],
        "",
        "Notes:",
        "",
        *[f"- {n}" for n in notes],
        "",
        f"Whole script: {watch.total():.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in watch.phases.items()) + ").",
        "",
        "Reproduce:",
        "",
        "```",
        command.strip(),
        "```",
        "",
        f"![SQNR, latency and calibration memory]({NAME}.png)",
        "",
    ]
    write_text(args.out / f"{NAME}.md", "\n".join(md))
    print("\n".join(md))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from onnxcompress.errors import OnnxCompressError

    try:
        args = parse_args(argv)
        if args.child:
            child(args.child, Path(args.child_model), Path(args.child_calib), Path(args.child_output),
                  Path(args.child_report))
            return 0
        run(args, argv)
    except OnnxCompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

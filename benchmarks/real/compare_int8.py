"""int8 on the real-model corpus: onnxcompress against ONNX Runtime's quantizers and NNCF, on this CPU and an
emulated AVX2 CPU without VNNI.

    python benchmarks/real/compare_int8.py [--models a,b] [--calib N] [--eval N] [--avx2-eval N]
                                           [--runs N] [--threads N] [--out DIR]

For every corpus model (default: DEFAULT_MODELS) and every quantizer setting (settings_for):

- onnxcompress `cpu-int8` recipe (static QDQ, target kernels "any", then "vnni"); text encoders also
  `dynamic-int8`. Calibration: `Calibration.from_arrays(model, corpus.stack(calibration samples))`.
- ONNX Runtime `quantize_static` (QDQ, per-channel QInt8 weights, QUInt8 activations) with MinMax,
  Entropy and Percentile calibration, each with reduce_range off and on; text encoders also
  `quantize_dynamic` (its defaults); all on the model after ORT's `quant_pre_process` (see notes()).
- NNCF `nncf.quantize` (ONNX backend, default settings); text encoders also with
  `model_type=ModelType.TRANSFORMER`.

ORT and NNCF get models older than opset 13 converted to it (upgrade_opset); onnxcompress the file.

Each quantizer runs alone in a fresh child process (multiprocessing, spawn) that imports its toolkit
and loads the calibration arrays before measuring: its wall time and peak RSS growth (VmHWM reset
by /proc/self/clear_refs, minus the RSS just before) are the calibration step's alone. The parent
kills a child whose RSS passes --mem-limit-gib and records that as the quantizer's failure.

Measured on the evaluation split (never the calibration one), against the float model:
kernel SQNR (ORT's default session, graph optimizations on: the fused int8 kernels of this CPU),
simulated SQNR (the same file with graph optimizations off: QDQ run in float), fidelity (top-1
agreement for classifiers, mean/min cosine of the embeddings for text encoders, SQNR only for the
others), the same kernel SQNR and fidelity on an emulated Haswell-v4 CPU (qemu-user: AVX2 without
AVX-512/VNNI; int8 models only, float references computed natively, fewer samples), and latency at
batch 1 with --threads intra-op threads (onnxcompress.bench, interleaved with the float model).

Writes compare_int8.md and compare_int8.json to --out after every model (complete=false until the
last). Progress goes to stderr; the table to stdout at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent.parent
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # run by path: make `common` and `real.corpus` importable
os.environ.setdefault("NNCF_CI", "1")  # NNCF sends no telemetry (here and in the spawned children)

import numpy as np  # noqa: E402
from common import CpuMonitor, Stopwatch, markdown_table, write_results as write_files  # noqa: E402

from real import corpus  # noqa: E402

NAME = "compare_int8"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "ppocr_cls", "ppocr_rec",
                  "ppocr_det", "mpnet", "minilm")
TEXT = "text-encoder"
#: 2-class softmax outputs: top-1 agreement says little when one class dominates the data, so the
#: positive class's log-odds are compared too (correlation, largest probability change).
BINARY = "binary-classifier"
TOP1_KINDS = ("image-classifier", "binary-classifier", "ocr-cls")
#: Samples per kind when --calib / --eval / --avx2-eval are not given: (calibration, evaluation, emulated AVX2).
#: Fewer than 128 calibration samples where images are large or slow: ORT's calibrators keep every
#: intermediate output of every calibration feed in memory until the end (efficientnet_lite1: 2.6 GB
#: for 32 images, so about 10 GB for 128; ppocr_rec: 1.3 GB for 16; ppocr_det: 2.8 GB for 4).
DEFAULT_COUNTS = {
    "image-classifier": (64, 300, 40), "binary-classifier": (64, 300, 40), "ocr-cls": (128, 300, 40),
    "ocr-rec": (64, 300, 40), "ocr-det": (8, 20, 4), "layout": (8, 20, 4), TEXT: (64, 300, 40),
}
#: Evaluation feeds hold this many samples (text: one sentence each, at its own length, because
#: dynamic int8 quantizes activations per batch; layout has a fixed batch of 1).
EVAL_BATCH = {"ocr-det": 4, "layout": 1, TEXT: 1}
DEFAULT_EVAL_BATCH = 16
#: Emulated AVX2 runs: so many samples per feed dict (a few dicts per model).
AVX2_BATCH = {"ocr-det": 2, "layout": 1, TEXT: 1}
DEFAULT_AVX2_BATCH = 10
#: ORT and NNCF read the calibration arrays in batches of this many samples (onnxcompress's own default).
CALIBRATION_BATCH = 16
#: ORT and NNCF get models older than this opset upgraded to it (onnxcompress upgrades by itself).
THIRD_PARTY_OPSET = 13
AVX2_LABEL = "emulated Haswell-v4 (qemu)"
CHILD_TIMEOUT_S = 3600
POLL_S = 0.2
MIB = 1024.0 * 1024.0
#: Imported by every calibration child before measuring, whatever its toolkit (onnxcompress imports
#: the last one lazily on models with symbolic dims; it pulls in torch and sympy).
COMMON_IMPORTS = ("onnx", "onnxruntime", "onnxruntime.quantization", "onnxruntime.tools.symbolic_shape_infer")
TOOLKIT_IMPORTS = {"ours": ("onnxcompress", "onnxcompress.pipeline"), "ort": (), "nncf": ("nncf",)}
#: Above this share of the CPU taken by other processes while timing, the notes say so.
OTHERS_NOTICE = 0.05


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


# -------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One quantizer with its options (JSON-able: it is sent to the child process)."""

    key: str
    label: str
    toolkit: str  # ours | ort | nncf
    options: dict[str, Any]


#: Pairs of settings whose identical results the notes point out, with the reason where known.
SAME_OUTPUT_CHECKS = (
    ("ort_minmax", "ort_entropy", ": ORT's Entropy calibrator with its defaults (num_bins = num_quantized_bins = 128) "
     "has a single candidate threshold, the whole histogram"),
    ("ort_minmax", "ort_minmax_rr", ""),
)


def settings_for(kind: str) -> list[Setting]:
    text = kind == TEXT
    out = [
        Setting("ours", "onnxcompress cpu-int8 (kernels any)", "ours", {"recipe": "cpu-int8", "kernels": None}),
        Setting("ours_vnni", "onnxcompress cpu-int8 (kernels vnni)", "ours", {"recipe": "cpu-int8", "kernels": "vnni"}),
    ]
    if text:
        out.append(Setting("ours_dynamic", "onnxcompress dynamic-int8", "ours", {"recipe": "dynamic-int8", "kernels": None}))
    for method in ("MinMax", "Entropy", "Percentile"):
        for reduce_range in (False, True):
            key = f"ort_{method.lower()}{'_rr' if reduce_range else ''}"
            label = f"ORT static {method}{', reduce_range' if reduce_range else ''}"
            out.append(Setting(key, label, "ort", {"mode": "static", "method": method, "reduce_range": reduce_range}))
    if text:
        out.append(Setting("ort_dynamic", "ORT dynamic (defaults)", "ort", {"mode": "dynamic"}))
    out.append(Setting("nncf", "NNCF default", "nncf", {"model_type": None}))
    if text:
        out.append(Setting("nncf_transformer", "NNCF model_type=TRANSFORMER", "nncf", {"model_type": "TRANSFORMER"}))
    return out


LABELS = {s.key: s.label for s in settings_for(TEXT)}


# ------------------------------------------------------------------------------ child: quantize


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux: clear_refs 5); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_bytes(field_name: str, pid: int | str = "self") -> int | None:
    """VmRSS / VmHWM of a process from /proc (None when it is gone or the platform has no /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def unstacked(arrays: dict[str, np.ndarray], batch: int, *, same_shape: bool = False) -> list[dict[str, np.ndarray]]:
    """The stacked calibration arrays as feed dicts again: text one sentence at a time at its own length
    (corpus.stack right-pads; the attention mask gives each length back), images `batch` at a time;
    text too (padded) when the feeds must all have the same shape."""
    n = sample_count(arrays)
    if "attention_mask" in arrays and not same_shape:
        lengths = arrays["attention_mask"].sum(axis=1)
        return [{k: v[i:i + 1, :int(lengths[i])] for k, v in arrays.items()} for i in range(n)]
    return [{k: v[s:s + batch] for k, v in arrays.items()} for s in range(0, n, batch)]


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def _quantize_ours(options: dict[str, Any], job: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    import onnxcompress
    from onnxcompress.calibration import Calibration
    from onnxcompress.pipeline import Pipeline
    from onnxcompress.verify import VerifyOptions

    pipeline = Pipeline.from_recipe(options["recipe"])
    if options["kernels"]:
        pipeline.passes = [dataclasses.replace(p, kernels=options["kernels"]) if p.name == "quantize-int8" else p
                           for p in pipeline.passes]
    pipeline.verify = VerifyOptions(enabled=False)  # ORT and NNCF verify nothing either: time the quantization alone
    model = onnxcompress.load(job["model"])
    # dynamic int8 needs none, but with it picks a SmoothQuant alpha per MatMul input on attention models
    calibration = Calibration.from_arrays(model, arrays, source="corpus calibration split")
    shapes = {k: (1, *v.shape[1:]) for k, v in arrays.items()}  # pins symbolic dims (text: the padded length)
    result = pipeline.run(model, calibration=calibration, input_shapes=shapes)
    onnxcompress.save(result.model, job["output"])
    record = result.report.passes[-1]
    details = {"pass": record.name, "changes": list(record.changes), "skipped": list(record.skipped)}
    if "kernel_check" in record.details:
        details.update(kernels=record.details["kernels"], kernel_check=record.details["kernel_check"])
    return details


def _quantize_ort(options: dict[str, Any], job: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    import onnxruntime.quantization as ortq

    if options["mode"] == "dynamic":
        ortq.quantize_dynamic(job["prepared_model"], job["output"])
        return {"call": "quantize_dynamic(model_input, model_output): defaults (weight_type QInt8, per_channel False)"}
    # ORT's histogram calibrators (Entropy, Percentile) stack every feed's outputs: one shape for all.
    feeds = unstacked(arrays, CALIBRATION_BATCH, same_shape=options["method"] != "MinMax")
    ortq.quantize_static(
        job["prepared_model"], job["output"], _Reader(feeds), quant_format=ortq.QuantFormat.QDQ,
        activation_type=ortq.QuantType.QUInt8, weight_type=ortq.QuantType.QInt8, per_channel=True,
        reduce_range=options["reduce_range"], calibrate_method=getattr(ortq.CalibrationMethod, options["method"]),
    )
    return {"call": f"quantize_static(QDQ, QUInt8 activations, QInt8 weights, per_channel=True, "
                    f"reduce_range={options['reduce_range']}, calibrate_method={options['method']}), "
                    f"{len(feeds)} calibration feeds"}


def _quantize_nncf(options: dict[str, Any], job: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    import nncf
    import onnx

    model = onnx.load(job["prepared_model"])
    n = sample_count(arrays)
    dataset = nncf.Dataset(unstacked(arrays, 1))
    kwargs = {"model_type": getattr(nncf.ModelType, options["model_type"])} if options["model_type"] else {}
    quantized = nncf.quantize(model, dataset, subset_size=n, **kwargs)
    onnx.save(quantized, job["output"])
    return {"call": f"nncf.quantize(onnx model, Dataset of {n} batch-1 samples, subset_size={n}"
                    + (f", model_type=ModelType.{options['model_type']})" if options["model_type"] else ")")}


QUANTIZERS: dict[str, Callable[[dict[str, Any], dict[str, Any], dict[str, np.ndarray]], dict[str, Any]]] = {
    "ours": _quantize_ours, "ort": _quantize_ort, "nncf": _quantize_nncf,
}


def _child_measure(job: dict[str, Any]) -> dict[str, Any]:
    import importlib

    toolkit = job["setting"]["toolkit"]
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs a pre-processing hint per call
    for module in COMMON_IMPORTS + TOOLKIT_IMPORTS[toolkit]:
        importlib.import_module(module)
    if toolkit == "nncf":
        import nncf

        nncf.set_log_level(logging.ERROR)
    with np.load(job["calib"]) as data:
        arrays = {k: data[k] for k in data.files}
    peak_reset = _reset_peak_rss()
    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    details = QUANTIZERS[toolkit](job["setting"]["options"], job, arrays)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss_before": rss_before, "rss_peak": _status_bytes("VmHWM"),
            "peak_reset": peak_reset, "details": details}


def child_main(job: dict[str, Any]) -> None:
    """Entry point of a calibration child: measure one quantization, write the report file."""
    os.dup2(2, 1)  # toolkits' progress bars go to stderr, never into the table on stdout
    os.chdir(Path(job["output"]).parent)  # whatever a toolkit leaves in the cwd goes with the temporary folder
    try:
        result = _child_measure(job)
    except BaseException as exc:  # noqa: BLE001 - any failure becomes the quantizer's one-line error
        result = {"error": one_line(exc)}
    Path(job["report"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent: children


@dataclass
class Calibrated:
    """What one quantizer's child reported."""

    path: Path | None
    error: str | None = None
    seconds: float | None = None
    rss_before_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_growth_mib: float | None = None
    peak_reset: bool | None = None
    output_mb: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


def run_child(job: dict[str, Any], mem_limit: int, timeout: float = CHILD_TIMEOUT_S) -> dict[str, Any]:
    """Run child_main(job) in a fresh spawned process, killing it past `mem_limit` bytes of RSS or `timeout`."""
    process = multiprocessing.get_context("spawn").Process(target=child_main, args=(job,))
    process.start()
    deadline = time.monotonic() + timeout
    killed = None
    while process.is_alive():
        rss = _status_bytes("VmRSS", process.pid) or 0
        if rss > mem_limit:
            killed = f"killed by this script: RSS passed {mem_limit / 2**30:.0f} GiB (--mem-limit-gib)"
        elif time.monotonic() > deadline:
            killed = f"killed by this script: still running after {timeout:.0f} s"
        if killed:
            process.kill()
        process.join(POLL_S)
    report = Path(job["report"])
    if killed:
        return {"error": killed}
    if not report.exists():
        return {"error": f"child died with exit status {process.exitcode} (no report)"}
    return json.loads(report.read_text())


def calibrate(setting: Setting, entry: corpus.Entry, prepared: Path, calib: Path, folder: Path,
              mem_limit: int) -> Calibrated:
    output = folder / f"{setting.key}.onnx"
    job = {"setting": dataclasses.asdict(setting), "model": str(entry.path), "prepared_model": str(prepared),
           "calib": str(calib), "output": str(output), "report": str(folder / f"{setting.key}.json")}
    data = run_child(job, mem_limit)
    if data.get("error"):
        return Calibrated(None, error=data["error"])
    before, peak = data["rss_before"], data["rss_peak"]
    return Calibrated(
        output, seconds=data["seconds"], details=data["details"], peak_reset=data["peak_reset"],
        rss_before_mib=before / MIB if before else None, rss_peak_mib=peak / MIB if peak else None,
        rss_growth_mib=(peak - before) / MIB if before and peak else None, output_mb=output.stat().st_size / 1e6,
    )


def upgrade_opset(entry: corpus.Entry, folder: Path) -> tuple[Path, dict[str, Any]]:
    """The model at opset >= THIRD_PARTY_OPSET (onnx.version_converter; exact), or the file itself when it is already.

    ORT writes per-channel DequantizeLinear nodes with an `axis` attribute, which needs opset 13, without
    upgrading an older model (an invalid model results); NNCF falls back to per-tensor below 13."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(entry.path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset >= THIRD_PARTY_OPSET:
        return entry.path, {"opset": opset, "upgraded": False}
    output = folder / "opset_upgraded.onnx"
    try:
        onnx.save(version_converter.convert_version(model, THIRD_PARTY_OPSET), str(output))
    except Exception as exc:  # noqa: BLE001 - the quantizers get the original then, and the note says why
        return entry.path, {"opset": opset, "upgraded": False, "error": one_line(exc)}
    return output, {"opset": opset, "upgraded": True, "to": THIRD_PARTY_OPSET}


def ort_pre_process(source: Path, folder: Path) -> tuple[Path, dict[str, Any]]:
    """ORT's quant_pre_process (symbolic shape inference, ORT basic optimizations, ONNX shape inference);
    again without the symbolic shape inference when that fails; else `source` unchanged."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    output = folder / "ort_preprocessed.onnx"
    errors = []
    for skip_symbolic in (False, True):
        try:
            with contextlib.chdir(folder):  # a failed symbolic shape inference saves its model into the cwd
                quant_pre_process(str(source), str(output), skip_symbolic_shape=skip_symbolic)
        except Exception as exc:  # noqa: BLE001 - try the next variant, and say so
            errors.append(one_line(exc))
            continue
        return output, {"applied": True, "skip_symbolic_shape": skip_symbolic, "errors": errors}
    return source, {"applied": False, "errors": errors}


def prepare_third_party(entry: corpus.Entry, folder: Path, pre_process: bool) -> tuple[Path, Path, dict[str, Any]]:
    """(model for NNCF, model for ORT, what was done): opset upgraded where needed, ORT's pre-processing if asked."""
    upgraded, opset = upgrade_opset(entry, folder)
    if not pre_process:
        return upgraded, upgraded, {"opset": opset, "ort_pre_process": {"applied": False}}
    ort_model, pre = ort_pre_process(upgraded, folder)
    return upgraded, ort_model, {"opset": opset, "ort_pre_process": pre}


# ---------------------------------------------------------------------------------------- data


def sample_count(arrays: dict[str, np.ndarray]) -> int:
    return len(next(iter(arrays.values())))


@dataclass
class Subject:
    """One corpus model and the samples this run uses."""

    entry: corpus.Entry
    calib_count: int
    eval_feeds: list[dict[str, np.ndarray]]  # EVAL_BATCH samples each
    avx2_feeds: list[dict[str, np.ndarray]]  # the first avx2 samples of the evaluation split, AVX2_BATCH each
    latency_shapes: dict[str, tuple[int, ...]]  # batch 1

    @property
    def kind(self) -> str:
        return self.entry.kind

    @property
    def name(self) -> str:
        return self.entry.name


def count_for(entry: corpus.Entry, split: str, asked: int | None, default_index: int) -> int:
    """Asked for (capped at what the split has), else the kind's default."""
    have = entry.counts[split]
    wanted = asked if asked is not None else DEFAULT_COUNTS.get(entry.kind, (128, 300, 40))[default_index]
    return max(1, min(wanted, have))


def chunked(feeds: list[dict[str, np.ndarray]], size: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    return [corpus.stack(feeds[s:s + size], pad_id) for s in range(0, len(feeds), size)]


def latency_shapes(kind: str, feeds: list[dict[str, np.ndarray]]) -> dict[str, tuple[int, ...]]:
    """Batch-1 input shapes for timing: an image's shape, or a sentence of the median evaluation length."""
    if kind != TEXT:
        return {k: tuple(v.shape) for k, v in feeds[0].items()}
    median = int(np.median([f["input_ids"].shape[1] for f in feeds]))
    return {k: (1, median) for k in feeds[0]}


def build_subject(entry: corpus.Entry, args: argparse.Namespace) -> Subject:
    n_eval = count_for(entry, "evaluation", args.eval, 1)
    n_avx2 = min(count_for(entry, "evaluation", args.avx2_eval, 2), n_eval)
    pad = corpus.pad_id(entry.name)
    feeds = corpus.evaluation(entry.name, n_eval)
    return Subject(
        entry, count_for(entry, "calibration", args.calib, 0),
        chunked(feeds, EVAL_BATCH.get(entry.kind, DEFAULT_EVAL_BATCH), pad),
        chunked(feeds[:n_avx2], AVX2_BATCH.get(entry.kind, DEFAULT_AVX2_BATCH), pad),
        latency_shapes(entry.kind, feeds),
    )


def write_calibration(subject: Subject, folder: Path) -> Path:
    """The calibration samples stacked (text right-padded with mask 0), as every quantizer reads them."""
    feeds = corpus.calibration(subject.name, subject.calib_count)
    path = folder / "calibration.npz"
    np.savez(path, **corpus.stack(feeds, corpus.pad_id(subject.name)))
    return path


# ------------------------------------------------------------------------------------- measuring


@dataclass
class Meter:
    """Streaming comparison with the float model: SQNR per output (worst reported), top-1, cosine."""

    kind: str
    signal: list[float] = field(default_factory=list)
    noise: list[float] = field(default_factory=list)
    agree: int = 0
    count: int = 0
    cosines: list[float] = field(default_factory=list)
    positive: list[tuple[float, float]] = field(default_factory=list)  # (float, compressed) p of class 1

    def add(self, reference: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> None:
        if not self.signal:
            self.signal, self.noise = [0.0] * len(reference), [0.0] * len(reference)
        for k, (ref, out) in enumerate(zip(reference, got, strict=True)):
            ref64 = np.asarray(ref, np.float64)
            self.signal[k] += float(np.sum(ref64**2))
            self.noise[k] += float(np.sum((np.asarray(out, np.float64) - ref64) ** 2))
        ref0 = np.asarray(reference[0], np.float64).reshape(len(reference[0]), -1)
        got0 = np.asarray(got[0], np.float64).reshape(len(got[0]), -1)
        self.count += len(ref0)
        if self.kind in TOP1_KINDS:
            self.agree += int(np.sum(ref0.argmax(1) == got0.argmax(1)))
        if self.kind == TEXT:
            norms = np.linalg.norm(ref0, axis=1) * np.linalg.norm(got0, axis=1)
            self.cosines += list(np.sum(ref0 * got0, axis=1) / np.where(norms > 0, norms, 1.0))
        if self.kind == BINARY and ref0.shape[1] == 2:
            self.positive += list(zip(ref0[:, 1], got0[:, 1], strict=True))

    def result(self) -> dict[str, Any]:
        sqnrs = [float("inf") if n == 0 else 10 * np.log10(s / n) if s > 0 else float("-inf")
                 for s, n in zip(self.signal, self.noise, strict=True)]
        out: dict[str, Any] = {"sqnr_db": float(min(sqnrs)) if sqnrs else None, "samples": self.count}
        if self.kind in TOP1_KINDS:
            out["top1_agreement"] = self.agree / self.count if self.count else None
        if self.kind == TEXT and self.cosines:
            out.update(cosine_mean=float(np.mean(self.cosines)), cosine_min=float(np.min(self.cosines)))
        if self.positive:
            ref, got = (np.clip(np.array(col), 1e-7, 1 - 1e-7) for col in zip(*self.positive, strict=True))
            odds = [np.log(p / (1 - p)) for p in (ref, got)]
            out.update(positive_logodds_corr=float(np.corrcoef(*odds)[0, 1]) if len(ref) > 1 else None,
                       positive_max_abs_diff=float(np.max(np.abs(got - ref))))
        return out


def session(path: Path, threads: int, optimize: bool = True):
    import onnxruntime as ort

    from onnxcompress.runtime import session_options

    return ort.InferenceSession(str(path), session_options(threads=threads, optimize=optimize),
                                providers=["CPUExecutionProvider"])


def run_native(path: Path, feeds: list[dict[str, np.ndarray]], threads: int, optimize: bool = True) -> list[list[np.ndarray]]:
    sess = session(path, threads, optimize)
    return [sess.run(None, feed) for feed in feeds]


def measure(kind: str, reference: list[list[np.ndarray]], outputs: Callable[[], Any]) -> dict[str, Any]:
    """Fidelity of `outputs()` (an iterable of per-feed output lists) against `reference`; a failure is one line."""
    meter = Meter(kind)
    try:
        for ref, got in zip(reference, outputs(), strict=True):
            meter.add(ref, got)
    except Exception as exc:  # noqa: BLE001 - a model ORT cannot run is a result, not a crash
        return {"error": one_line(exc)}
    return meter.result()


def measure_native(subject: Subject, reference: list[list[np.ndarray]], path: Path, threads: int,
                   optimize: bool) -> dict[str, Any]:
    def outputs():
        sess = session(path, threads, optimize)
        return (sess.run(None, feed) for feed in subject.eval_feeds)

    return measure(subject.kind, reference, outputs)


def measure_emulated(subject: Subject, reference: list[list[np.ndarray]], path: Path) -> dict[str, Any]:
    from onnxcompress.cpu_emulation import run_emulated

    return measure(subject.kind, reference, lambda: run_emulated(path, subject.avx2_feeds, timeout=CHILD_TIMEOUT_S))


def measure_fusion(path: Path) -> dict[str, Any]:
    """The int8 kernels and float Conv/MatMul/Gemm left in ORT's optimized graph of this CPU."""
    from onnxcompress.analysis.fusion import fusion_check

    try:
        report = fusion_check(path)
    except Exception as exc:  # noqa: BLE001
        return {"error": one_line(exc)}
    return {"int8": report.int8_count, "float_compute": report.float_compute_count, "int8_by_op": report.int8,
            "float_compute_by_op": report.float_compute, "qdq_left": sum(report.qdq.values())}


def measure_latency(subject: Subject, done: dict[str, Calibrated], runs: int, threads: int) -> tuple[dict[str, Any], float | None]:
    """Median batch-1 latency of the float model and each int8 one, interleaved; the CPU share others took."""
    from onnxcompress.bench import BenchOptions, benchmark

    models = [("fp32", str(subject.entry.path))] + [(key, str(c.path)) for key, c in done.items()]
    monitor = CpuMonitor()
    try:
        report = benchmark(models, BenchOptions(batch_sizes=(1,), runs=runs, threads=threads,
                                                input_shapes=subject.latency_shapes))
    except Exception as exc:  # noqa: BLE001
        return {"error": one_line(exc)}, monitor.share()
    out = {}
    for row in report.rows:
        out[row.model] = ({"median_ms": row.timing.median_ms, "p90_ms": row.timing.p90_ms, "runs": row.timing.runs}
                          if row.timing else {"error": row.reason})
    return out, monitor.share()


# -------------------------------------------------------------------------------------- one model


def run_model(entry: corpus.Entry, args: argparse.Namespace, watch: Stopwatch) -> dict[str, Any]:
    subject = build_subject(entry, args)
    settings = [s for s in settings_for(entry.kind) if args.only is None or s.key in args.only]
    log(f"{entry.name} ({entry.kind}): {subject.calib_count} calibration, "
        f"{sum(sample_count(f) for f in subject.eval_feeds)} evaluation, "
        f"{sum(sample_count(f) for f in subject.avx2_feeds)} emulated-AVX2 samples; {len(settings)} quantizers")
    with tempfile.TemporaryDirectory(prefix=f"compare-int8-{entry.name}-") as tmp:
        folder = Path(tmp)
        calib = write_calibration(subject, folder)
        with watch.phase("third-party model preparation"):
            nncf_model, ort_model, prepared = prepare_third_party(entry, folder, args.ort_preprocess)
        results: dict[str, dict[str, Any]] = {}
        done: dict[str, Calibrated] = {}
        for s in settings:
            with watch.phase("calibration (children)"):
                third_party = {"ort": ort_model, "nncf": nncf_model}.get(s.toolkit, entry.path)
                cal = calibrate(s, entry, third_party, calib, folder, int(args.mem_limit_gib * 2**30))
            log(f"  {s.key}: " + (f"failed: {cal.error}" if cal.error else
                                   f"{cal.seconds:.1f} s, peak RSS +{cal.rss_growth_mib or 0:.0f} MiB"))
            results[s.key] = {"setting": dataclasses.asdict(s), "calibration": {
                k: v for k, v in dataclasses.asdict(cal).items() if k != "path"}}
            if cal.error is None:
                done[s.key] = cal
        with watch.phase("float references"):
            reference = run_native(entry.path, subject.eval_feeds, args.threads)
            avx2_reference = run_native(entry.path, subject.avx2_feeds, args.threads)
        for key, cal in done.items():
            with watch.phase("evaluation (native)"):
                results[key]["kernel"] = measure_native(subject, reference, cal.path, args.threads, optimize=True)
                results[key]["simulated"] = measure_native(subject, reference, cal.path, args.threads, optimize=False)
                results[key]["fusion"] = measure_fusion(cal.path)
            with watch.phase("evaluation (emulated AVX2)"):
                results[key]["avx2"] = (measure_emulated(subject, avx2_reference, cal.path) if args.avx2
                                        else {"skipped": "--no-avx2"})
            log(f"  {key}: kernel {fmt_fidelity(entry.kind, results[key]['kernel'])}; "
                f"AVX2 {fmt_fidelity(entry.kind, results[key]['avx2'])}")
        runnable = {key: cal for key, cal in done.items() if not results[key]["kernel"].get("error")}
        with watch.phase("latency"):
            latency, others = measure_latency(subject, runnable, args.runs, args.threads)
        del reference, avx2_reference
    for key in results:
        results[key]["latency"] = latency.get(key, {"error": latency.get("error", "not timed")})
    return {
        "name": entry.name, "kind": entry.kind, "onnx": str(entry.path), "provenance": entry.provenance,
        "samples": {"calibration": subject.calib_count,
                    "evaluation": sum(sample_count(f) for f in subject.eval_feeds),
                    "avx2": sum(sample_count(f) for f in subject.avx2_feeds)},
        "latency_shapes": subject.latency_shapes, "third_party_model": prepared,
        "fp32_latency": latency.get("fp32", {"error": latency.get("error")}), "others_cpu_share": others,
        "results": results,
    }


# ------------------------------------------------------------------------------------------ table


def fmt_db(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if np.isposinf(value) else ("nan" if np.isnan(value) else f"{value:.1f}")


def fmt_fidelity(kind: str, m: dict[str, Any]) -> str:
    """SQNR and the kind's fidelity in one short string (for progress lines)."""
    if m.get("error") or m.get("skipped"):
        return f"error: {m['error']}" if m.get("error") else "skipped"
    extra = fidelity_cell(kind, m)
    return f"{fmt_db(m.get('sqnr_db'))} dB" + ("" if extra == "-" else f", {extra}")


def binary_suffix(m: dict[str, Any]) -> str:
    """`, log-odds r 0.991, max dp 0.012` for 2-class outputs, else empty."""
    if m.get("positive_logodds_corr") is None:
        return ""
    return f", log-odds r {m['positive_logodds_corr']:.3f}, max dp {m['positive_max_abs_diff']:.3f}"


def fidelity_cell(kind: str, m: dict[str, Any]) -> str:
    if m.get("error") or m.get("skipped"):
        return "error" if m.get("error") else "skipped"
    if kind in TOP1_KINDS and m.get("top1_agreement") is not None:
        return f"{m['top1_agreement']:.1%}" + binary_suffix(m)
    if kind == TEXT and m.get("cosine_mean") is not None:
        return f"{m['cosine_mean']:.4f} / {m['cosine_min']:.4f}"
    return "-"


def sqnr_cell(m: dict[str, Any]) -> str:
    if m.get("error") or m.get("skipped"):
        return "error" if m.get("error") else "skipped"
    return fmt_db(m.get("sqnr_db"))


def kernels_cell(fusion: dict[str, Any]) -> str:
    return "error" if fusion.get("error") else f"{fusion['int8']} / {fusion['float_compute']} / {fusion['qdq_left']}"


def latency_cells(lat: dict[str, Any], fp32: dict[str, Any]) -> list[str]:
    ms, base = lat.get("median_ms"), fp32.get("median_ms")
    if ms is None:
        return ["error" if lat.get("error") else "-", "-"]
    return [f"{ms:.2f}", f"{base / ms:.2f}x" if base else "-"]


HEADERS = ["model", "quantizer", "calib s", "calib peak MiB", "kernel SQNR dB", "simulated SQNR dB", "fidelity",
           f"SQNR dB, {AVX2_LABEL}", f"fidelity, {AVX2_LABEL}", "b1 ms", "fp32 / int8", "int8 / float / Q-DQ"]


def table_rows(model: dict[str, Any]) -> list[list[str]]:
    kind, fp32 = model["kind"], model["fp32_latency"]
    base = fp32.get("median_ms")
    rows = [[model["name"], "fp32 (reference)", "-", "-", "-", "-", "-", "-", "-",
             f"{base:.2f}" if base else "error", "1.00x" if base else "-", "-"]]
    for r in model["results"].values():
        cal, label = r["calibration"], r["setting"]["label"]
        if cal.get("error"):
            rows.append([model["name"], label, f"failed: {cal['error']}", *["-"] * (len(HEADERS) - 3)])
            continue
        kernel, simulated, avx2 = r["kernel"], r["simulated"], r["avx2"]
        rows.append([
            model["name"], label, f"{cal['seconds']:.1f}",
            "-" if cal["rss_growth_mib"] is None else f"{cal['rss_growth_mib']:.0f}",
            sqnr_cell(kernel), sqnr_cell(simulated), fidelity_cell(kind, kernel),
            sqnr_cell(avx2), fidelity_cell(kind, avx2), *latency_cells(r["latency"], fp32), kernels_cell(r["fusion"]),
        ])
    return rows


def machine() -> dict[str, Any]:
    import onnx
    import onnxruntime

    from onnxcompress.bench import cpu_description, logical_cores, physical_cores

    cpu, flags = cpu_description()
    try:
        import nncf

        nncf_version = nncf.__version__
    except Exception as exc:  # noqa: BLE001
        nncf_version = f"not importable ({one_line(exc)})"
    commit = subprocess.run(["git", "-C", str(BENCHMARKS.parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or None
    return {"cpu": cpu, "cpu_flags": flags, "physical_cores": physical_cores(), "logical_cores": logical_cores(),
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "nncf": nncf_version,
            "numpy": np.__version__, "python": sys.version.split()[0], "onnxcompress_commit": commit}


def machine_line(m: dict[str, Any]) -> str:
    flags = m["cpu_flags"]
    shown = {"avx2": flags.get("avx2"), "avx512f": flags.get("avx512f"), "avx512_vnni": flags.get("avx512_vnni"),
             "avx_vnni": flags.get("avx_vnni"), "amx": flags.get("amx_tile") or flags.get("amx_int8")}
    flag_text = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in shown.items())
    return (f"CPU: {m['cpu']} ({m['physical_cores']} physical / {m['logical_cores']} logical cores; {flag_text}). "
            f"onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, NNCF {m['nncf']}, numpy {m['numpy']}, "
            f"python {m['python']}, onnxcompress {m['onnxcompress_commit']}.")


def notes(data: dict[str, Any]) -> list[str]:
    threads = data["args"]["threads"]
    lines = [
        ("kernel SQNR: ORT's default CPU session (graph optimizations on, so QDQ pairs become this CPU's int8 "
         "kernels) against the float model on the evaluation split; simulated SQNR: the same file with graph "
         "optimizations off (QDQ computed in float). SQNR is pooled over all samples, the worst output counted."),
        ("fidelity: top-1 agreement with the float model (classifiers), mean / min cosine of the embeddings "
         "(text encoders); SQNR only for det/rec."),
        (f"{AVX2_LABEL}: `onnxcompress.cpu_emulation.run_emulated` (AVX2 without AVX-512/VNNI: ORT's u8 x s8 "
         "kernels sum product pairs in saturating int16), one thread, on the first evaluation samples; float "
         "references computed natively."),
        ("int8 / float / Q-DQ: int8 kernels, float Conv/MatMul/Gemm and QuantizeLinear/DequantizeLinear nodes left "
         "in ORT's optimized graph on this CPU (onnxcompress.analysis.fusion)."),
        (f"b1 ms: median latency at batch 1, {threads} intra-op threads, spinning off, interleaved with the fp32 "
         f"model ({data['args']['runs']} runs each, onnxcompress.bench, random inputs of the shapes given per "
         "model: text at the median evaluation sentence length)."),
        ("calib s / calib peak MiB: wall time and peak RSS growth (VmHWM after reset minus RSS before) of the "
         "quantization call in a fresh child process that already imported its toolkit and loaded the calibration "
         "arrays (model load and save included; onnxcompress's pipeline verification off, its in-pass kernel check on)."),
        ("Every quantizer gets the same calibration samples, the first N of the corpus calibration split: "
         "onnxcompress as `Calibration.from_arrays` of them stacked (text right-padded to the longest with "
         f"attention mask 0); ORT in feeds of {CALIBRATION_BATCH} images, NNCF one image per item; text one "
         "sentence per feed at its own length for ORT MinMax and NNCF (padded rows put the attention mask's large "
         "negative values into their calibration ranges, which evaluation at batch 1 never sees); ORT Entropy and "
         f"Percentile fail on feeds of different shapes, so they read text in padded feeds of {CALIBRATION_BATCH} "
         "like onnxcompress."),
    ]
    return lines + third_party_notes(data) + finding_notes(data)


def third_party_notes(data: dict[str, Any]) -> list[str]:
    prepared = {m["name"]: m["third_party_model"] for m in data["models"]}
    upgraded = [f"{k} (opset {v['opset']['opset']})" for k, v in prepared.items() if v["opset"].get("upgraded")]
    failed = [f"{k} ({v['opset']['error']})" for k, v in prepared.items() if v["opset"].get("error")]
    lines = []
    if upgraded or failed:
        lines.append(
            f"ORT and NNCF got the model converted to opset {THIRD_PARTY_OPSET} by onnx.version_converter (outputs "
            f"unchanged) where it was older: {', '.join(upgraded) or 'none'}. ORT's per-channel QDQ needs "
            "DequantizeLinear's axis (opset 13) but leaves an older model's opset as it is, which gives an invalid "
            "model; NNCF falls back to per-tensor below opset 13. onnxcompress got the original file."
            + (f" Conversion failed on: {'; '.join(failed)}." if failed else ""))
    if not data["args"]["ort_preprocess"]:
        lines.append("ORT's quantizers got the model without `quant_pre_process` (--no-ort-preprocess).")
        return lines
    pre = {k: v["ort_pre_process"] for k, v in prepared.items()}
    failed = [f"{k} ({'; '.join(v['errors'])})" for k, v in pre.items() if not v.get("applied")]
    partial = [f"{k} ({v['errors'][0]})" for k, v in pre.items() if v.get("applied") and v.get("errors")]
    lines.append("ORT's quantizers ran on the model after `onnxruntime.quantization.shape_inference.quant_pre_process` "
                 "(symbolic shape inference, ORT basic graph optimizations, ONNX shape inference), as ORT recommends. "
                 "Tried both ways when this script was written: it left ORT's SQNR on efficientnet_lite1 and minilm "
                 "unchanged, and made ORT's PP-OCR models much faster (it folds BatchNorm and turns the Constant-node "
                 "weights of ppocr_cls into initializers, which ORT's quantizer otherwise quantizes as activations)."
                 + (f" Symbolic shape inference failed, so it ran with skip_symbolic_shape=True, on: "
                    f"{'; '.join(partial)}." if partial else "")
                 + (f" It failed, so ORT got the model without it, on: {'; '.join(failed)}." if failed else ""))
    return lines


def finding_notes(data: dict[str, Any]) -> list[str]:
    """Statements computed from the numbers: where two settings gave the very same model, CPU noise."""
    lines = []
    for a, b, why in SAME_OUTPUT_CHECKS:
        same = [m["name"] for m in data["models"] if _same_sqnr(m["results"], a, b)]
        if same:
            lines.append(f"{LABELS[a]} and {LABELS[b]} give the same outputs (SQNR equal to the last digit) on "
                         f"{', '.join(same)}{why}.")
    lines += error_notes(data)
    busy = {m["name"]: m["others_cpu_share"] for m in data["models"] if (m["others_cpu_share"] or 0) > OTHERS_NOTICE}
    if busy:
        lines.append("Other processes took CPU while timing (" + ", ".join(f"{k} {v:.0%}" for k, v in busy.items())
                     + "): latencies there are noisy.")
    return lines


def error_notes(data: dict[str, Any]) -> list[str]:
    """One line per model and quantizer whose int8 model failed to load or run (the table says only 'error')."""
    lines = []
    for m in data["models"]:
        for r in m["results"].values():
            failed = [(part, r[part]["error"]) for part in ("kernel", "simulated", "avx2") if r.get(part, {}).get("error")]
            if failed:
                where = ", ".join(part for part, _ in failed)
                lines.append(f"{m['name']}, {r['setting']['label']}: its int8 model fails ({where}): {failed[0][1]}")
    return lines


def _same_sqnr(results: dict[str, Any], a: str, b: str) -> bool:
    sa, sb = (results.get(k, {}).get("kernel", {}).get("sqnr_db") for k in (a, b))
    return sa is not None and sa == sb


def render(data: dict[str, Any]) -> str:
    counts = "; ".join(f"{m['name']} {m['samples']['calibration']} / {m['samples']['evaluation']} / "
                       f"{m['samples']['avx2']}" for m in data["models"])
    rows = [row for m in data["models"] for row in table_rows(m)]
    status = "" if data["complete"] else " (incomplete: still running or stopped early)"
    lines = [
        f"## int8 on the real-model corpus: onnxcompress vs ONNX Runtime vs NNCF{status}", "",
        machine_line(data["machine"]), "",
        f"Samples (calibration / evaluation / {AVX2_LABEL}): {counts}.", "",
        markdown_table(HEADERS, rows, right=[False, False] + [True] * (len(HEADERS) - 2)), "",
        *[f"- {line}" for line in notes(data)], "",
        f"Command: `{data['command']}`; wall time {data['total_seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in data['phases_seconds'].items())}).",
    ]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated corpus model names")
    parser.add_argument("--calib", type=int, default=None, help="calibration samples (default per kind: "
                        + ", ".join(f"{k} {v[0]}" for k, v in DEFAULT_COUNTS.items()) + ")")
    parser.add_argument("--eval", type=int, default=None, help="evaluation samples (default per kind: "
                        + ", ".join(f"{k} {v[1]}" for k, v in DEFAULT_COUNTS.items()) + ")")
    parser.add_argument("--avx2-eval", type=int, default=None, help="evaluation samples run on the emulated AVX2 CPU "
                        "(default per kind: " + ", ".join(f"{k} {v[2]}" for k, v in DEFAULT_COUNTS.items()) + ")")
    parser.add_argument("--no-avx2", dest="avx2", action="store_false", help="skip the emulated AVX2 runs")
    parser.add_argument("--only", default=None, help="comma-separated quantizer keys (e.g. ours,ort_minmax,nncf)")
    parser.add_argument("--no-ort-preprocess", dest="ort_preprocess", action="store_false",
                        help="skip ORT's quant_pre_process on the model its quantizers get")
    parser.add_argument("--runs", type=int, default=40, help="timed runs per model at batch 1 (at least 30)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads for evaluation and timing")
    parser.add_argument("--mem-limit-gib", type=float, default=10.0, help="kill a calibration child past this RSS")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for compare_int8.{md,json}")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.only = None if args.only is None else {k.strip() for k in args.only.split(",") if k.strip()}
    if args.runs < 30:
        parser.error("--runs must be at least 30")
    return args


def write_results(data: dict[str, Any], out: Path) -> str:
    return write_files(out, NAME, data, render(data))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        entries = [corpus.model(name) for name in args.models]
    except (corpus.CorpusMissing, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    watch = Stopwatch()
    info = machine()
    log(machine_line(info))
    data: dict[str, Any] = {
        "command": "python benchmarks/real/compare_int8.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": info, "avx2_label": AVX2_LABEL,
        "args": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": [], "complete": False, "phases_seconds": watch.phases, "total_seconds": 0.0,
    }
    for entry in entries:
        data["models"].append(run_model(entry, args, watch))
        data["total_seconds"] = watch.total()
        write_results(data, args.out)
        log(f"{entry.name} done; {watch.total():.0f} s so far")
    data["complete"] = True
    data["total_seconds"] = watch.total()
    print(write_results(data, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The whole product on a ResNet-50-shaped model: `onnxcompress optimize` from the command line, timed on ORT CPU.

    python benchmarks/pipeline_resnet50.py [--runs 20] [--batches 1,16] [--image-size 224] [--out benchmarks/results]

Steps: build the torch ResNet-50 layout (tests/zoo.py: bottlenecks [3, 4, 6, 3], standard widths,
seeded random weights with non-trivial BatchNorm statistics), export it with the TorchScript
exporter (opset 17, dynamic batch), write CALIB_SAMPLES random calibration images, then run the
CLI exactly as a user would, one plan per row:

    onnxcompress optimize resnet50.onnx -o OUT --calib calib.npy [plan flags] --report R.json --bench-runs 0

and time the original and every output interleaved on ONNX Runtime (onnxcompress.bench) at each
batch size. Fidelity is measured against the original on fresh random images no pass saw.
The weights and the calibration images are random: the fidelity columns say how closely each
compressed model follows the original on random inputs, not how accurate it would be.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: make `common` importable

from common import (  # noqa: E402
    DEFAULT_RESULTS,
    CpuMonitor,
    Stopwatch,
    fmt_ratio,
    machine_line,
    markdown_table,
    repo_root_on_path,
    report_without_layers,
    script_main,
    write_json,
    write_text,
)

from onnxcompress.bench import MIN_RUNS, BenchOptions, benchmark, parse_batch_sizes  # noqa: E402
from onnxcompress.plots import plot_speedups  # noqa: E402
from onnxcompress.report import human, to_jsonable  # noqa: E402
from onnxcompress.verify import compare, outputs  # noqa: E402

NAME = "pipeline_resnet50"
INPUT_NAME = "input"
DYNAMIC_AXES = {INPUT_NAME: {0: "batch"}, "output": {0: "batch"}}
CALIB_SAMPLES = 64
#: Batches of 8 fresh random images for the fidelity columns.
FIDELITY_BATCHES = 4
#: (label, flags) for `onnxcompress optimize`; every plan gets --calib.
PLANS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("int8", ("--recipe", "cpu-int8")),
    ("prune 0.5 MACs + int8", ("--recipe", "prune-int8", "--target-macs", "0.5", "--round-to", "16")),
    ("prune 0.33 MACs + int8", ("--recipe", "prune-int8", "--target-macs", "0.33", "--round-to", "16")),
    ("prune 0.25 MACs + int8", ("--recipe", "prune-int8", "--target-macs", "0.25", "--round-to", "16")),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--ep", default="cpu", choices=("cpu", "cuda", "tensorrt"),
                        help="Execution provider for the timing (the plans run with --target set to it).")
    args = parser.parse_args(argv)
    if args.runs < MIN_RUNS:
        parser.error(f"--runs must be at least {MIN_RUNS}")
    return args


def export_model(folder: Path, image_size: int) -> Path:
    repo_root_on_path()
    from tests import zoo

    module, inputs = zoo.resnet50(image_size=image_size, batch=1)
    return zoo.export_module(module, inputs, folder / "resnet50.onnx", dynamo=False, dynamic_axes=DYNAMIC_AXES)


def run_plan(model: Path, calib: Path, folder: Path, label: str, flags: tuple[str, ...]) -> dict:
    stem = label.replace(" ", "_").replace(".", "").replace("+", "")
    out, report = folder / f"{stem}.onnx", folder / f"{stem}.json"
    command = [sys.executable, "-m", "onnxcompress", "optimize", str(model), "-o", str(out), "--calib", str(calib),
               *flags, "--report", str(report), "--bench-runs", "0"]
    watch = Stopwatch()
    with watch.phase("optimize"):
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 4, 5):
        raise SystemExit(f"{label}: optimize failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    data = json.loads(report.read_text())
    shown = ["onnxcompress", "optimize", "resnet50.onnx", "-o", out.name, "--calib", "calib.npy", *flags]
    return {"label": label, "path": str(out), "command": shlex.join(shown), "exit_code": done.returncode,
            "seconds": watch.phases["optimize"], "report": data}


def run(args: argparse.Namespace) -> None:
    import numpy as np

    batches = parse_batch_sizes(args.batches)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = export_model(folder, args.image_size)
        calib = folder / "calib.npy"
        rng = np.random.default_rng(0)
        np.save(calib, rng.standard_normal((CALIB_SAMPLES, 3, args.image_size, args.image_size)).astype(np.float32))
        plans = []
        for label, flags in PLANS:
            print(f"optimize: {label}", file=sys.stderr)
            plans.append(run_plan(model, calib, folder, label, (*flags, "--target", args.ep)))
        # Fidelity on inputs no pass saw (the same distribution as the calibration images).
        feeds = [{INPUT_NAME: rng.standard_normal((8, 3, args.image_size, args.image_size)).astype(np.float32)}
                 for _ in range(FIDELITY_BATCHES)]
        reference = outputs(str(model), feeds, "original")
        for p in plans:
            p["fidelity"] = compare(reference, outputs(p["path"], feeds, p["label"]), "random inputs")
        monitor = CpuMonitor()
        print("timing on ORT CPU ...", file=sys.stderr)
        bench = benchmark([("original", str(model)), *[(p["label"], p["path"]) for p in plans]],
                          BenchOptions(provider=args.ep, batch_sizes=batches, runs=args.runs, warmup=3))
        load = monitor.share()
    results = {"plans": [to_jsonable({k: v for k, v in p.items() if k != "path"}) for p in plans],
               "bench": report_without_layers(bench), "other_cpu_load": load, "image_size": args.image_size,
               "calibration_samples": CALIB_SAMPLES}
    name = NAME if args.ep == "cpu" else f"{NAME}_{args.ep}"
    write_json(args.out / f"{name}.json", results)
    plot_speedups(bench, args.out / f"{name}.png")
    write_text(args.out / f"{name}.md", render(plans, bench, load, args))
    print(render(plans, bench, load, args))


def render(plans: list[dict], bench, load: float | None, args: argparse.Namespace) -> str:
    rows = []
    for p in plans:
        r, f = p["report"], p["fidelity"]
        b, a = r["before"], r["after"]
        top1 = "-" if f.top1_agreement is None else f"{100 * f.top1_agreement:.0f}%"
        rows.append([p["label"], f"{a['macs'] / b['macs']:.3f}", f"{a['params'] / b['params']:.3f}",
                     human(a["file_bytes"], "B"), f"{f.sqnr_db:.1f}", f"{f.cosine:.4f}", top1, f"{p['seconds']:.0f}"])
    plan_table = markdown_table(["plan", "MACs / original", "params / original", "file", "SQNR dB", "cosine",
                                 "top-1 agreement", "optimize s"], rows)
    time_rows = []
    for row in bench.rows:
        time_rows.append([row.model, row.batch, f"{row.timing.median_ms:.1f}" if row.timing else "-",
                          fmt_ratio(row.theoretical_speedup), fmt_ratio(row.measured_speedup)])
    time_table = markdown_table(["model", "batch", "median ms", "theoretical x (MACs)", "measured x"], time_rows)
    commands = "\n".join(f"    {p['command']}" for p in plans)
    load_note = (f" Other processes used {100 * load:.0f}% of the CPU while the models were timed."
                 if load is not None else "")
    return f"""## End to end: `onnxcompress optimize` on a ResNet-50-shaped model ({bench.environment.provider})

ResNet-50 layout (tests/zoo.py: bottlenecks [3, 4, 6, 3], standard widths) at {args.image_size}x{args.image_size},
exported with the TorchScript exporter (opset 17, dynamic batch); {CALIB_SAMPLES} calibration images. Each row is one
command line (the theoretical speedup counts MACs only; int8 keeps the MAC count and gains from int8 kernels):

{commands}

**Weights and calibration images are random (no trained ResNet-50 can be downloaded here): fidelity says how closely
each model follows the original on {8 * FIDELITY_BATCHES} fresh random inputs, not how accurate it would be.** Pruning ranks channels by L2 norm here (the recipes' default without
`--importance activation`) and recovers by least squares on the calibration images.

{machine_line(bench.environment)}{load_note} {args.runs} timed runs per model and batch after 3 warm-up runs,
all models interleaved in one process; medians.

{plan_table}

{time_table}

Reproduce: `python benchmarks/pipeline_resnet50.py --runs {args.runs} --batches {",".join(map(str, bench.options.batch_sizes))} --image-size {args.image_size} --ep {args.ep}`
"""


if __name__ == "__main__":
    sys.exit(script_main(parse_args, run))

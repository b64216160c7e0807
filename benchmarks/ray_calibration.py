"""Calibration statistics on a local Ray against the same run in one process: wall time, and whether
the int8 model is bit-identical (it must be: the script stops otherwise).

Models: the bundled digits CNN with its real calibration digits, and SqueezeNet 1.0 from the onnx
wheel's light model zoo (weights replaced by seeded He-normal values, random-normal 224x224 inputs:
timing only). For each: the activation histograms of every node output (`collect_histograms`) and
the whole `quantize-int8` pass, in this process and on Ray with 2 and 4 workers. Ray is started once
before timing and warmed up (its worker processes import onnxcompress and ORT on first use); its
start is reported on its own.

    python benchmarks/ray_calibration.py [--out benchmarks/results] [--samples 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import onnx

import os

from common import markdown_table, repo_root_on_path, script_main, write_results

repo_root_on_path()

from onnxcompress import Calibration, Pipeline, demo_data, load, to_proto  # noqa: E402
from onnxcompress.analysis.histograms import collect_histograms  # noqa: E402
from onnxcompress.distributed import RayEngine, connect  # noqa: E402
from onnxcompress.passes.quantize import QuantizeQDQ  # noqa: E402
from onnxcompress.verify import VerifyOptions  # noqa: E402
from tests.conftest import LIGHT_MODELS, fold_light_model  # noqa: E402

WORKERS = (2, 4)


def _squeezenet(samples: int):
    from pack import randomize_weights  # He-normal weights in place of the light model's constant fills

    model = load(randomize_weights(to_proto(fold_light_model(LIGHT_MODELS["squeezenet"]), with_data=True)))
    data = np.random.default_rng(0).normal(size=(samples, 3, 224, 224)).astype(np.float32)
    return model, Calibration.from_arrays(model, data, f"{samples} random-normal 224x224 inputs")


def _digits(samples: int):
    model = load(demo_data.demo_model_path())
    return model, Calibration.from_arrays(model, demo_data.load_calibration()[:samples], "digits calibration images")


def _timed(fn, repeats: int = 2) -> tuple[float, object]:
    """Best wall time of `repeats` runs, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _initializers(model) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in to_proto(model, with_data=True).graph.initializer}


def _measure(name: str, model, calibration: Calibration) -> list[dict]:
    names = [v.name for node in model.graph for v in node.outputs]
    quantize = Pipeline([QuantizeQDQ()], verify=VerifyOptions(enabled=False))
    rows = []
    reference = None
    for workers in (None, *WORKERS):
        cal = calibration if workers is None else dataclasses.replace(calibration, engine=RayEngine(workers=workers))
        if workers:
            collect_histograms(model, names, cal)  # warm-up: Ray starts this many worker processes
        load_before = os.getloadavg()[0]
        stats_s, _ = _timed(lambda: collect_histograms(model, names, cal))
        quantize_s, result = _timed(lambda: quantize.run(model, calibration=cal).model)
        initializers = _initializers(result)
        reference = reference or initializers
        identical = reference.keys() == initializers.keys() and all(
            np.array_equal(reference[k], initializers[k]) for k in reference)
        if not identical:
            raise SystemExit(f"{name}: the int8 model on Ray with {workers} workers differs from the in-process one")
        rows.append({"model": name, "engine": "in-process" if workers is None else f"Ray, {workers} workers",
                     "samples": calibration.num_samples, "histograms_s": stats_s, "quantize_s": quantize_s,
                     "identical": identical, "load_before": load_before})
        print(rows[-1], flush=True)
    return rows


def run(args: argparse.Namespace) -> str:
    start = time.perf_counter()
    connect(None, max(WORKERS))
    ray_start = time.perf_counter() - start
    rows = _measure("digits CNN", *_digits(args.samples)) + _measure("squeezenet", *_squeezenet(args.samples))
    table = markdown_table(
        ["model", "engine", "samples", "histograms s", "quantize-int8 s", "int8 initializers", "load average"],
        [[r["model"], r["engine"], r["samples"], f"{r['histograms_s']:.2f}", f"{r['quantize_s']:.2f}",
          "bit-identical" if r["identical"] else "differ", f"{r['load_before']:.1f}"] for r in rows],
        right=[False, False, True, True, True, False, True])
    cpus = os.cpu_count()
    text = (f"## Calibration statistics on Ray\n\n{cpus} logical CPUs; local Ray of {max(WORKERS)} CPUs (start "
            f"{ray_start:.1f} s, not in the times); best of 2 runs each: the histograms of every node output, and "
            "the whole quantize-int8 pass (verification off). Each Ray statistics call is one Ray Data job: the "
            "driver runs the first sample, the workers the rest in shards (ORT with 1 thread each; in-process ORT "
            f"uses every core). `load average` is the machine's 1-minute load before the row (other jobs share "
            "it).\n\n" + table + "\n")
    return write_results(args.out, "ray_calibration", {"ray_start_s": ray_start, "rows": rows}, text)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--samples", type=int, default=64, help="Calibration samples per model.")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(script_main(parse_args, run))

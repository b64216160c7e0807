"""`onnxcompress demo`: the whole job on the bundled digits CNN, with real accuracy before and after."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import demo_data
from .calibration import Calibration
from .model import load, save
from .pipeline import Pipeline
from .report import RunReport

DEFAULT_RECIPE = "demo"


@dataclass(frozen=True)
class DemoResult:
    report: RunReport
    accuracy_before: float
    accuracy_after: float
    test_samples: int
    bench: Any  # bench.BenchReport
    output: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "test_samples": self.test_samples,
            "report": self.report.to_dict(),
            "bench": self.bench.to_dict(),
        }


def run_demo(output_dir: Path, *, recipe: str = DEFAULT_RECIPE, runs: int = 30, on_pass=None, progress=None) -> DemoResult:
    """Compress the bundled model with `recipe`, calibrated on its bundled calibration split, then
    measure accuracy on the held-out test split and latency on ORT CPU (batch 1 and 16)."""
    from .bench import BenchOptions, benchmark

    source = demo_data.demo_model_path()
    model = load(source)
    calibration = Calibration.from_arrays(model, demo_data.load_calibration(), "digits_calib.npz")
    images, labels = demo_data.load_test_set()
    result = Pipeline.from_recipe(recipe).run(model, calibration=calibration, on_pass=on_pass)
    output_dir.mkdir(parents=True, exist_ok=True)
    output = save(result.model, output_dir / "digits_cnn.compressed.onnx")
    before = demo_data.accuracy(source, images, labels)
    after = demo_data.accuracy(output, images, labels)
    bench = benchmark([("original", str(source)), ("compressed", str(output))],
                      BenchOptions(batch_sizes=(1, 16), runs=runs), progress=progress)
    report = result.report.with_files(source, output)
    return DemoResult(report, before, after, len(labels), bench, output)

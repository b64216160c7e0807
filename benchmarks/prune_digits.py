"""Pruning fidelity on a model with real trained weights: the bundled digits CNN (scikit-learn digits).

Accuracy on the 360 held-out test digits (never used for calibration) before pruning, after pruning
alone, after bias compensation and after least-squares refit, for several ratios and importances;
with MACs, and the ORT CPU speedup of the refit model.

    python benchmarks/prune_digits.py [--out benchmarks/results] [--runs 30]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import markdown_table, repo_root_on_path, write_json, write_text

repo_root_on_path()

from onnxcompress import Calibration, Pipeline, demo_data, load  # noqa: E402
from onnxcompress.bench import BenchOptions, benchmark  # noqa: E402
from onnxcompress.verify import VerifyOptions  # noqa: E402

RATIOS = (0.25, 0.5, 0.7)
IMPORTANCES = ("l2", "activation")
RECOVERY = ("none", "bias", "refit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()

    source = demo_data.demo_model_path()
    model = load(source)
    calibration = Calibration.from_arrays(model, demo_data.load_calibration(), "digits_calib.npz")
    images, labels = demo_data.load_test_set()
    base_accuracy = demo_data.accuracy(source, images, labels)
    rows, records, timing_models = [], [], [("original", str(source))]
    tmp = args.out / "prune_digits_models"
    tmp.mkdir(parents=True, exist_ok=True)
    for ratio in RATIOS:
        for importance in IMPORTANCES:
            for recover in RECOVERY:
                spec = ["fold-constants", "fold-batchnorm", "eliminate-noops",
                        {"type": "prune-channels", "ratio": ratio, "importance": importance, "recover": recover}]
                pipeline = Pipeline.from_recipe(spec)
                pipeline.verify = VerifyOptions(enabled=False)
                start = time.perf_counter()
                result = pipeline.run(model, calibration=calibration)
                seconds = time.perf_counter() - start
                accuracy = demo_data.accuracy(result.model, images, labels)
                agreement = float((demo_data.predict(result.model, images) == demo_data.predict(source, images)).mean())
                macs = result.report.after.macs
                rows.append([ratio, importance, recover, f"{result.report.before.macs / macs:.2f}x",
                             f"{100 * accuracy:.2f}%", f"{100 * agreement:.1f}%", f"{seconds:.1f} s"])
                records.append({"ratio": ratio, "importance": importance, "recover": recover, "macs": macs,
                                "macs_before": result.report.before.macs, "accuracy": accuracy,
                                "top1_agreement": agreement, "seconds": seconds})
                if recover == "refit" and importance == "activation":
                    path = tmp / f"digits_r{ratio}.onnx"
                    from onnxcompress import save

                    save(result.model, path)
                    timing_models.append((f"ratio {ratio}", str(path)))
    bench = benchmark(timing_models, BenchOptions(batch_sizes=(1, 16), runs=args.runs))
    speed_rows = [[r.model, r.batch, f"{r.timing.median_ms:.3f}", f"{r.theoretical_speedup:.2f}x",
                   f"{r.measured_speedup:.2f}x", f"{100 * r.realization:.0f}%"] for r in bench.rows if r.timing]

    text = "\n".join([
        "## Pruning fidelity on real trained weights: the bundled digits CNN",
        "",
        f"Residual CNN trained on scikit-learn's digits (1,797 real labelled images, upsampled to 32x32), "
        f"{base_accuracy * 100:.2f}% accuracy on the 360 held-out test digits. Calibration: the bundled 256 "
        "training images (no overlap with the test set). Recovery fits on 80% of them and chooses its ridge "
        "strength on the other 20%; the accuracies below are on the test set, which recovery never sees.",
        "",
        markdown_table(["ratio", "importance", "recovery", "MACs", "test accuracy", "top-1 agreement", "time"], rows,
                       right=[True, False, False, True, True, True, True]),
        "",
        "ORT CPU latency of the refit models (activation importance), interleaved with the original:",
        "",
        markdown_table(["model", "batch", "median ms", "theoretical x", "measured x", "realization"], speed_rows,
                       right=[False, True, True, True, True, True]),
        "",
        "Reproduce: `python benchmarks/prune_digits.py`",
        "",
    ])
    write_text(args.out / "prune_digits.md", text)
    write_json(args.out / "prune_digits.json", {"accuracy_before": base_accuracy, "runs": records,
                                                 "bench": bench.to_dict()})
    print(text)


if __name__ == "__main__":
    main()

"""The tolerance search on a model with real trained weights: the bundled digits CNN.

    python benchmarks/search_digits.py [--out benchmarks/results] [--runs 30]

For several tolerances, runs the search exactly as `onnxcompress optimize digits_cnn.onnx --calib
digits_calib.npy --max-drop B --metric M` does (prune step by step with least-squares recovery, int8
on every candidate, measured on the held-out quarter of the 256 calibration images), and scores every
candidate it measured on the 360 labelled test digits that neither the model nor the search ever
saw. The question it answers: does a tolerance met on calibration data hold on new data? The chosen
models are then timed against the original on ORT CPU (interleaved, batch 1 and 16).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import markdown_table, repo_root_on_path, write_json, write_text

repo_root_on_path()

from onnxcompress import Calibration, demo_data, load  # noqa: E402
from onnxcompress.bench import BenchOptions, benchmark  # noqa: E402
from onnxcompress.plots import plot_tradeoff  # noqa: E402
from onnxcompress.search import SearchOptions, search  # noqa: E402
from onnxcompress.tolerance import Tolerance  # noqa: E402

NAME = "search_digits"
TOLERANCES = (Tolerance("top1", 0.01), Tolerance("top1", 0.03), Tolerance("cosine", 0.001), Tolerance("cosine", 0.002),
              Tolerance("cosine", 0.01))
FINISH = ({"type": "quantize-int8", "preset": "cpu"},)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    source = demo_data.demo_model_path()
    model = load(source)
    calibration = Calibration.from_arrays(model, demo_data.load_calibration(), "digits_calib.npz")
    images, labels = demo_data.load_test_set()
    base_accuracy = demo_data.accuracy(source, images, labels)
    runs, chosen_models = [], [("original", model)]
    for tolerance in TOLERANCES:
        scored: list[dict] = []

        def score(point, candidate, scored=scored):
            scored.append({"macs_ratio": point.macs_ratio, "value": point.value, "accepted": point.accepted,
                           "test_accuracy": demo_data.accuracy(candidate, images, labels)})

        start = time.perf_counter()
        result = search(model, calibration, SearchOptions(tolerance=tolerance, finish=FINISH), on_point=score)
        seconds = time.perf_counter() - start
        label = tolerance.describe()
        chosen_models.append((label, result.model))
        stem = f"{NAME}_{tolerance.metric}_{tolerance.bound:g}".replace(".", "p")
        plot_tradeoff(result.report.search, args.out / f"{stem}.png")
        runs.append({"tolerance": label, "seconds": seconds, "points": scored, "chosen": result.chosen,
                     "met": result.met, "plot": f"{stem}.png"})
    bench = benchmark(chosen_models, BenchOptions(batch_sizes=(1, 16), runs=args.runs, warmup=3))
    write_json(args.out / f"{NAME}.json", {"base_accuracy": base_accuracy, "runs": runs,
                                           "bench": [{"model": r.model, "batch": r.batch,
                                                      "median_ms": r.timing.median_ms if r.timing else None,
                                                      "measured_speedup": r.measured_speedup} for r in bench.rows]})
    write_text(args.out / f"{NAME}.md", render(base_accuracy, runs, bench, args))


def render(base_accuracy: float, runs: list[dict], bench, args) -> str:
    rows = []
    for run in runs:
        for i, p in enumerate(run["points"]):
            rows.append([run["tolerance"] if i == 0 else "", "*" if i == run["chosen"] else "",
                         f"{1 / p['macs_ratio']:.2f}x", f"{p['value']:.4g}", "within" if p["accepted"] else "outside",
                         f"{100 * p['test_accuracy']:.2f}%"])
    curve = markdown_table(["tolerance (held-out calibration)", "chosen", "MAC reduction", "metric", "verdict",
                            "test accuracy"], rows)
    summary = []
    for run in runs:
        chosen = run["points"][run["chosen"]]
        times = {r.batch: r.measured_speedup for r in bench.rows if r.model == run["tolerance"]}
        summary.append([run["tolerance"], f"{1 / chosen['macs_ratio']:.2f}x", f"{100 * chosen['test_accuracy']:.2f}%",
                        f"{100 * (chosen['test_accuracy'] - base_accuracy):+.2f} pts",
                        f"{times.get(1, 0):.2f}x", f"{times.get(16, 0):.2f}x", f"{run['seconds']:.0f}"])
    table = markdown_table(["tolerance", "MAC reduction", "test accuracy", "change", "ORT CPU x (batch 1)",
                            "x (batch 16)", "search s"], summary)
    plots = " ".join(f"[{run['tolerance']}]({run['plot']})" for run in runs)
    return f"""## Tolerance search on real trained weights (digits CNN)

`onnxcompress optimize digits_cnn.onnx --calib digits_calib.npy --max-drop B --metric M`, i.e. the search: prune
step by step (activation importance, least-squares recovery), int8 (uint8 activations, MSE ranges) on every
candidate, each measured on the 64 held-out calibration images no pass fitted to. Then every candidate is scored
on the 360 labelled test digits the search never saw. Original test accuracy: {100 * base_accuracy:.2f}%.

Chosen models, timed interleaved against the original on ORT CPU ({args.runs} runs, medians):

{table}

Every candidate the searches measured (the curve; * = returned):

{curve}

Trade-off plots: {plots}.

How to read it: the tolerance is checked on the held-out calibration images only; the test accuracy column
says how that check carried over to new data. Top-1 drop on 64 images moves in steps of 1/64 = 0.016, so a bound
of 0.01 admits only candidates that change no held-out prediction; cosine is continuous. The default tolerance of
`optimize` for this model's class scores is a cosine drop <= 0.005 (tolerance.DEFAULT_VECTOR_DROP).

Reproduce: `python benchmarks/search_digits.py --runs {args.runs}`
"""


if __name__ == "__main__":
    main()

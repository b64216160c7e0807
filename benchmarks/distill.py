"""Accuracy recovery by distillation on a model with real trained weights: the bundled digits CNN.

Structured pruning to 1.3x, 1.6x and 2x fewer MACs, then: nothing; least-squares reconstruction
(prune-channels recover='refit'); distillation alone; reconstruction + distillation, at several
step budgets. Accuracy is measured on the 360 labelled test digits, which neither reconstruction nor
distillation ever sees; top-1 agreement with the original on the same test digits and on the
calibration samples held out from distillation (the last 20%).

    python benchmarks/distill.py [--out benchmarks/results] [--budgets 100,300] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import CpuMonitor, markdown_table, repo_root_on_path, write_json, write_text

repo_root_on_path()

from onnxcompress import Calibration, Pipeline, demo_data, load  # noqa: E402
from onnxcompress.passes.distill import Distill  # noqa: E402,F401  (registers the pass)
from onnxcompress.verify import VerifyOptions  # noqa: E402

SPEEDUPS = (1.3, 1.6, 2.0)
#: (calibration images, speedups): the full calibration set, then a narrow one (the issue's failure
#: mode: recovery fitted to a few images does not carry over to new ones) at harsher pruning.
SCENARIOS = ((256, SPEEDUPS), (24, (2.0, 3.0)))


def run(model, calibration, speedup: float, recover: str, steps: int, threads: int, lr: float) -> tuple:
    spec = ["fold-constants", "fold-batchnorm", "eliminate-noops",
            {"type": "prune-channels", "target_macs": 1.0 / speedup, "recover": recover, "round_to": 1}]
    if steps:
        spec.append({"type": "distill", "steps": steps, "threads": threads, "lr": lr, "progress": False})
    pipeline = Pipeline.from_recipe(spec)
    pipeline.verify = VerifyOptions(enabled=False)
    start = time.perf_counter()
    result = pipeline.run(model, calibration=calibration)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--budgets", default="100,300", help="distillation step budgets, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for distillation")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the pass's default is 1e-4)")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]

    source = demo_data.demo_model_path()
    model = load(source)
    all_calibration = demo_data.load_calibration()
    images, labels = demo_data.load_test_set()
    reference = demo_data.predict(source, images)
    base_accuracy = demo_data.accuracy(source, images, labels)
    monitor = CpuMonitor()
    methods = [("none", "none", 0), ("reconstruction", "refit", 0)]
    methods += [(f"distillation ({b} steps)", "none", b) for b in budgets]
    methods += [(f"reconstruction + distillation ({b} steps)", "refit", b) for b in budgets]
    rows, records = [], []
    for count, speedups in SCENARIOS:
        calibration = Calibration.from_arrays(model, all_calibration[:count], f"digits_calib.npz[:{count}]")
        for speedup in speedups:
            for label, recover, steps in methods:
                result, seconds = run(model, calibration, speedup, recover, steps, args.threads, args.lr)
                accuracy = demo_data.accuracy(result.model, images, labels)
                agreement = float((demo_data.predict(result.model, images) == reference).mean())
                record = {"calibration_images": count, "target_speedup": speedup, "method": label, "recover": recover, "distill_steps": steps,
                          "macs_ratio": result.report.before.macs / result.report.after.macs,
                          "test_accuracy": accuracy, "test_top1_agreement": agreement, "pipeline_seconds": seconds}
                distill = next((p for p in result.report.passes if p.name == "distill"), None)
                held = ""
                if distill is not None:
                    d = distill.details
                    fid = d["heldout_fidelity"]
                    record.update({"distill_seconds": d["seconds"], "steps_run": d["steps"], "best_step": d["best_step"],
                                   "stopped": d["stopped"], "heldout_agreement_before": fid["before"]["top1_agreement"],
                                   "heldout_agreement_after": fid["after"]["top1_agreement"], "threads": d["threads"]})
                    held = f"{100 * fid['before']['top1_agreement']:.1f}% -> {100 * fid['after']['top1_agreement']:.1f}%"
                rows.append([count, f"{record['macs_ratio']:.2f}x", label, f"{100 * accuracy:.2f}%", f"{100 * agreement:.1f}%",
                             held or "-", f"{record.get('distill_seconds', 0) / 60:.2f}" if distill else "-",
                             f"{record['best_step']}/{record['steps_run']}" if distill else "-"])
                records.append(record)
                print(rows[-1], flush=True)
    share = monitor.share()
    findings = []
    for count, speedups in SCENARIOS:
        for speedup in speedups:
            mine = [r for r in records if r["calibration_images"] == count and r["target_speedup"] == speedup]
            best = max(r["test_accuracy"] for r in mine)
            winners = [r["method"] for r in mine if r["test_accuracy"] == best]
            findings.append(f"- {count} calibration images, {mine[0]['macs_ratio']:.2f}x fewer MACs: best test accuracy "
                            f"{100 * best:.2f}% by {'; '.join(winners)}.")
    text = "\n".join([
        "## Accuracy recovery by distillation: the bundled digits CNN",
        "",
        f"Residual CNN with real trained weights (scikit-learn digits), {100 * base_accuracy:.2f}% accuracy on the 360 "
        "labelled test digits. Pruned by `prune-channels` (l2 importance, `target_macs` = 1/speedup, `round_to: 1` "
        "because widths of 8-32 channels rounded to 8 cannot hit 1.3x; the MAC column is what it reached). Reconstruction = `recover: refit` (ridge least squares on 80% of the calibration "
        f"images). Distillation = the `distill` pass (KL at T=4 + MSE against the original, Adam lr {args.lr:g}, batch 32, "
        "random shifted crops + flips, early stopping on the last 20% of the calibration images, which it never "
        f"trains on), on {args.threads} CPU thread(s). Test accuracy and agreement are on the test digits, which no "
        "step ever sees; held-out agreement is on the calibration images held out from distillation (the last 20%: "
        "51 of 256, 5 of 24; before -> after distillation). The 24-image rows are the narrow-data case: "
        "reconstruction and distillation see only those images.",
        "",
        markdown_table(["calibration images", "MACs", "recovery", "test accuracy", "test agreement", "held-out agreement",
                        "distill CPU min", "best/run steps"], rows,
                       right=[True, True, False, True, True, True, True, True]),
        "",
        "Findings (computed from the table):",
        "",
        *findings,
        "",
        "Where reconstruction + distillation shows best step 0, distillation found no step with a lower held-out "
        "loss than the reconstructed weights and kept them, as designed: on this small, well-conditioned network "
        "the least-squares reconstruction already recovers the original's predictions, even from 24 images, and "
        "distillation earns its keep only without it.",
        "",
        (f"Other processes used {100 * share:.0f}% of the machine's CPU while this ran"
         + (": times are inflated and noisy." if share > 0.1 else ".")) if share is not None else "",
        "",
        "Reproduce: `python benchmarks/distill.py`",
        "",
    ])
    write_text(args.out / "distill.md", text)
    write_json(args.out / "distill.json", {"accuracy_before": base_accuracy, "runs": records, "other_cpu_share": share})
    print(text)


if __name__ == "__main__":
    main()

"""Accuracy recovery by distillation on models with real trained weights: the bundled digits CNN and a
compact MobileNetV2-style network (depthwise convolutions, inverted residuals) trained here.

Structured pruning to about 1.3x, 1.6x and 2x fewer MACs (and 3x with narrow data), then: nothing;
least-squares reconstruction (prune-channels recover='refit'); distillation alone; reconstruction +
distillation, at several step budgets. Accuracy is measured on the 360 labelled test digits, which
neither training, reconstruction nor distillation ever sees; top-1 agreement with the original on the
same test digits and on the calibration samples held out from distillation (the last 20%).

The compact network is trained at every run (seeded, deterministic for a fixed thread count, well under
a minute on 2 CPU cores) on the bundled digits model's own training split, exported with the
TorchScript exporter into a temporary folder and cleaned with the `cleanup` recipe; nothing is cached.

    python benchmarks/distill.py [--out benchmarks/results] [--budgets 100,300] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import CpuMonitor, markdown_table, repo_root_on_path, write_json, write_text

repo_root_on_path()

import torch
from torch import nn

from onnxcompress import Calibration, Pipeline, demo_data
from onnxcompress.model import load
from onnxcompress.passes.distill import Distill  # noqa: F401  (registers the pass)
from onnxcompress.verify import VerifyOptions
from scripts import train_digits

#: (calibration images, speedups): the full calibration set, then a narrow one (the issue's failure
#: mode: recovery fitted to a few images does not carry over to new ones), down to harsher pruning.
SCENARIOS = ((256, (1.3, 1.6, 2.0)), (24, (1.3, 1.6, 2.0, 3.0)))
#: Training of the compact network: train_digits' recipe (SGD + one-cycle, random shifts), longer.
MOBILE_EPOCHS = 15
MOBILE_LR = 0.1
MOBILE_BATCH = 64
#: Threads for that training; the weights are reproducible for a fixed count.
TRAIN_THREADS = 2


# ------------------------------------------------------------------------- the compact network


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU6())
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """1x1 expansion, depthwise 3x3, linear 1x1 projection; identity shortcut when the shape allows."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(ConvBN(cin, hidden, 1), ConvBN(hidden, hidden, 3, stride, groups=hidden),
                                  ConvBN(hidden, cout, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class DigitsMobileNet(nn.Module):
    """Stride-2 stem (32x32 -> 16x16), inverted-residual stages of (width, blocks, stride), 1x1 head, pool, linear."""

    STAGES = ((16, 1, 1), (24, 2, 2), (32, 2, 2))

    def __init__(self, stem: int = 16, expand: int = 4, head: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBN(1, stem, 3, 2)]
        cin = stem
        for width, count, stride in self.STAGES:
            for i in range(count):
                layers.append(InvertedResidual(cin, width, stride if i == 0 else 1, expand))
                cin = width
        layers.append(ConvBN(cin, head, 1))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(head, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(image), 1), 1))


def train_mobile(folder: Path, test_images: np.ndarray, test_labels: np.ndarray, calibration: np.ndarray) -> tuple:
    """Train DigitsMobileNet on the bundled model's training split; (cleaned onnx_ir model, facts for the report)."""
    data = train_digits.split_dataset()
    # The split must be the bundled one, so the test digits are never trained on.
    if not (np.array_equal(data["x_test"].astype(np.float32), test_images) and np.array_equal(data["y_test"], test_labels)
            and np.array_equal(data["x_calib"].astype(np.float32), calibration)):
        raise SystemExit("scikit-learn's digits split differs from the bundled test/calibration sets; cannot train fairly")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(train_digits.SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(TRAIN_THREADS)
    try:
        net = DigitsMobileNet()
        start = time.perf_counter()
        train_digits.train(net, torch.from_numpy(data["x_train"].astype(np.float32)), torch.from_numpy(data["y_train"]),
                           MOBILE_EPOCHS, MOBILE_BATCH, MOBILE_LR)
        seconds = time.perf_counter() - start
        logits = train_digits.torch_logits(net, test_images)
        path = folder / "digits_mobilenet.onnx"
        train_digits.export(net, path)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    rel_error = float(np.abs(train_digits.ort_logits(path, test_images) - logits).max() / np.abs(logits).max())
    if rel_error > train_digits.EXPORT_REL_TOL:
        raise SystemExit(f"export mismatch: logits rel error {rel_error:.2e}")
    cleaned = Pipeline.from_recipe("cleanup").run(path).model
    facts = {"parameters": sum(p.numel() for p in net.parameters()), "macs": train_digits.conv_linear_macs(net),
             "train_images": len(data["x_train"]), "epochs": MOBILE_EPOCHS, "lr": MOBILE_LR, "batch": MOBILE_BATCH,
             "train_threads": TRAIN_THREADS, "train_seconds": seconds,
             "torch_test_accuracy": float((logits.argmax(1) == test_labels).mean()), "export_rel_error": rel_error,
             "ops": sorted({node.op_type for node in cleaned.graph})}
    return cleaned, facts


# ------------------------------------------------------------------------------- measurement


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


def measure(name: str, model, all_calibration, images, labels, methods, args) -> tuple[list, list]:
    """Every scenario x method on one model: table rows and JSON records."""
    reference = demo_data.predict(model, images)
    rows, records = [], []
    for count, speedups in SCENARIOS:
        calibration = Calibration.from_arrays(model, all_calibration[:count], f"digits_calib.npz[:{count}]")
        for speedup in speedups:
            for label, recover, steps in methods:
                result, seconds = run(model, calibration, speedup, recover, steps, args.threads, args.lr)
                accuracy = demo_data.accuracy(result.model, images, labels)
                agreement = float((demo_data.predict(result.model, images) == reference).mean())
                record = {"model": name, "calibration_images": count, "target_speedup": speedup, "method": label,
                          "recover": recover, "distill_steps": steps,
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
                print(name, rows[-1], flush=True)
    return rows, records


def findings(records: list[dict], budgets: list[int], n_test: int) -> list[str]:
    """The best method per scenario, then how each recovery compares with reconstruction alone."""
    lines = []
    scenarios = [(count, speedup) for count, speedups in SCENARIOS for speedup in speedups]
    by = {(r["calibration_images"], r["target_speedup"], r["method"]): r for r in records}

    def where(s: tuple) -> str:
        return f"{s[0]} images, {by[(*s, 'none')]['macs_ratio']:.2f}x"

    def size(diff: float) -> str:
        return f"{100 * diff:.2f} points, {round(diff * n_test)} test digit(s)"

    for s in scenarios:
        mine = [r for r in records if (r["calibration_images"], r["target_speedup"]) == s]
        best = max(r["test_accuracy"] for r in mine)
        winners = [r["method"] for r in mine if r["test_accuracy"] == best]
        lines.append(f"- {where(s)} fewer MACs: best test accuracy {100 * best:.2f}% by {'; '.join(winners)}.")
    refit = {s: by[(*s, "reconstruction")]["test_accuracy"] for s in scenarios}
    gaps = [(max(r["test_accuracy"] for r in records if (r["calibration_images"], r["target_speedup"]) == s) - refit[s], s)
            for s in scenarios]
    gap, worst_gap = max(gaps)
    lowest = min(scenarios, key=refit.get)
    lines.append(f"- Reconstruction alone: lowest test accuracy {100 * refit[lowest]:.2f}% ({where(lowest)}); at most "
                 f"{size(gap)} below the best method in any scenario" + (f" ({where(worst_gap)})." if gap > 0 else "."))
    for method in [f"reconstruction + distillation ({b} steps)" for b in budgets] + [f"distillation ({b} steps)" for b in budgets]:
        diffs = [by[(*s, method)]["test_accuracy"] - refit[s] for s in scenarios]
        up, same, down = [d for d in diffs if d > 0], [d for d in diffs if d == 0], [d for d in diffs if d < 0]
        lines.append(f"- {method} vs reconstruction alone, test accuracy over the {len(scenarios)} scenarios: "
                     f"higher in {len(up)}" + (f" (by up to {size(max(up))})" if up else "")
                     + f", equal in {len(same)}, lower in {len(down)}" + (f" (by up to {size(-min(down))})" if down else "") + ".")
    combined = [r for r in records if r["recover"] == "refit" and r["distill_steps"]]
    kept = sum(r["best_step"] == 0 for r in combined)
    lines.append(f"- Reconstruction + distillation kept the reconstructed weights (best step 0) in {kept} of {len(combined)} runs.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--budgets", default="100,300", help="distillation step budgets, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for distillation")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the pass's default is 1e-4)")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]

    all_calibration = demo_data.load_calibration()
    images, labels = demo_data.load_test_set()
    points_per_digit = 100.0 / len(labels)
    monitor = CpuMonitor()
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as folder:
        mobile, mobile_facts = train_mobile(Path(folder), images, labels, all_calibration)
    models = {"digits CNN": load(demo_data.demo_model_path()), "digits MobileNetV2-style": mobile}
    methods = [("none", "none", 0), ("reconstruction", "refit", 0)]
    methods += [(f"distillation ({b} steps)", "none", b) for b in budgets]
    methods += [(f"reconstruction + distillation ({b} steps)", "refit", b) for b in budgets]
    base, tables, records = {}, {}, []
    for name, model in models.items():
        base[name] = demo_data.accuracy(model, images, labels)
        rows, mine = measure(name, model, all_calibration, images, labels, methods, args)
        tables[name] = (rows, mine)
        records += mine
    share = monitor.share()
    headers = ["calibration images", "MACs", "recovery", "test accuracy", "test agreement", "held-out agreement",
               "distill CPU min", "best/run steps"]
    right = [True, True, False, True, True, True, True, True]

    def section(name: str, intro: str) -> list[str]:
        rows, mine = tables[name]
        return [f"### {name}", "", intro, "", markdown_table(headers, rows, right=right), "",
                "Findings (computed from the table):", "", *findings(mine, budgets, len(labels)), ""]

    f = mobile_facts
    text = "\n".join([
        "## Accuracy recovery by distillation: a residual CNN and a compact depthwise network",
        "",
        ("Two networks with real trained weights on scikit-learn's digits, scored on the same 360 labelled test "
        "digits, which no step ever sees (nor training: both were trained on the same split, the test digits "
        f"left out; one test digit is {points_per_digit:.2f} points). Pruned by `prune-channels` (l2 importance, "
        "i.e. magnitude, uniform allocation, `target_macs` = 1/speedup, `round_to: 1` because widths this small "
        "rounded to 8 cannot hit 1.3x; the MAC column is what it reached). Reconstruction = `recover: refit` "
        "(ridge least squares on 80% of the calibration images; it refits the layers that consume pruned channels "
        "and have group 1: the depthwise convolutions are not refit). Distillation = the `distill` pass (KL at T=4 + "
        f"MSE against the original, Adam lr {args.lr:g}, batch 32, random shifted crops + flips, early stopping on "
        "the last 20% of the calibration images, which it never trains on), on "
        f"{args.threads} CPU thread(s). Test accuracy and agreement (top-1, with the unpruned model) are on the test "
        "digits; held-out agreement is on the calibration images held out from distillation (the last 20%: 51 of "
        "256, 5 of 24; before -> after distillation). The 24-image rows are the narrow-data case: reconstruction "
        "and distillation see only those images."),
        "",
        *section("digits CNN", f"The bundled residual CNN (`onnxcompress/data/digits_cnn.onnx`), "
                 f"{100 * base['digits CNN']:.2f}% test accuracy."),
        *section("digits MobileNetV2-style", (
            "Trained by this script at every run: a stride-2 3x3 stem of 16 channels, inverted residual blocks "
            "(1x1 expansion x4, depthwise 3x3, linear 1x1 projection, identity shortcut where stride 1 keeps the "
            "width) in stages of 16 (1 block), 24 (2) and 32 (2) channels, a 1x1 head to 128, global average pool, "
            f"linear; BatchNorm + ReLU6. {f['parameters']:,} parameters, {f['macs'] / 1e6:.2f} MMACs per image. "
            f"Trained on the {f['train_images']} training digits with `scripts/train_digits.py`'s loop (SGD + "
            f"one-cycle, lr {f['lr']:g}, batch {f['batch']}, {f['epochs']} epochs, random shifts; seed "
            f"{train_digits.SEED}, deterministic algorithms, {f['train_threads']} threads): "
            f"{f['train_seconds']:.0f} s; exported (TorchScript exporter, opset {train_digits.OPSET}, dynamic batch; "
            f"logits within {f['export_rel_error']:.0e} of torch) and cleaned by the `cleanup` recipe (ops: "
            f"{', '.join(f['ops'])}). {100 * base['digits MobileNetV2-style']:.2f}% test accuracy.")),
        ("How to read this, for both networks. Without recovery, pruning leaves either network far below its "
        "accuracy (the `none` rows). Least-squares reconstruction recovers most of it on both, from 24 images as "
        "well as from 256, and loses the most at the harshest pruning with 24 images (its lowest accuracy is in the "
        "findings). It is the best method, or tied, in every row of the residual CNN; on the compact depthwise "
        "network some 24-image rows do better with distillation after it (by how much: the findings). So the "
        "failure the issue measured on an ImageNet network (reconstruction fitted to ten photos: 7.5% top-1 "
        "agreement on photos it had not seen) does not reproduce at this scale (ten classes, 32x32 inputs, layers of at most 128 channels). "
        "Distillation alone never beats reconstruction here and falls far behind it with 24 images at the harshest "
        "pruning. Distillation after reconstruction starts from weights that already agree with the original on "
        "the held-out images, and keeps the step with the lowest held-out loss (step 0 = the reconstructed weights, "
        "kept as designed when no step was better): on the residual CNN it never moved them; on the compact network "
        "it trained on in some rows and gained a few test digits with 24 images, but also lost some in a 256-image "
        "row whose held-out agreement was 100% before and after. Early stopping on 51 (or 5) held-out images cannot "
        "see differences of a few digits out of 360, so on these networks distillation's contribution on top of "
        "reconstruction is small and of either sign."),
        "",
        (f"Other processes used {100 * share:.0f}% of the machine's CPU while this ran"
         + (": times are inflated and noisy." if share > 0.1 else ".")) if share is not None else "",
        "",
        "Reproduce: `python benchmarks/distill.py`",
        "",
    ])
    write_text(args.out / "distill.md", text)
    write_json(args.out / "distill.json", {"accuracy_before": base, "mobilenet": mobile_facts, "runs": records,
                                           "other_cpu_share": share})
    print(text)


if __name__ == "__main__":
    main()

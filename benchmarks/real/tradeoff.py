"""Compression ratio against fidelity on the real-model corpus: the tool's estimate beside the truth.

    python benchmarks/real/tradeoff.py [--models a,b] [--settings "NAME=FLAGS;..."] [--calib N] [--eval N]
                                       [--threads N] [--runs N] [--timeout-min M] [--out DIR]

For every model and setting (fixed flags such as `--prune 0.2`: a recipe, no search), runs
`optimize MODEL --calib CALIB.npz FLAGS` as default_path.py does (calibration samples labelled by
photo or page with `__source__`, so the tool holds out whole sources for its estimate), then
measures the output against the float model on the evaluation split (photos, pages and texts never
used for calibration). One row per run: MACs ratio, the tool's measured speedup and this script's,
the tool's estimate (its fidelity on held-out calibration samples, with the 80% interval of its
metric), the same figures on the evaluation split, and whether the estimate lies within
ESTIMATE_SLACK of the truth. Writes tradeoff.{md,json} to --out after every run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent.parent
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from common import markdown_table, write_results as write_files  # noqa: E402

from real import corpus, default_path  # noqa: E402
from real.compare_int8 import TEXT, TOP1_KINDS  # noqa: E402

NAME = "tradeoff"
#: Settings per model kind: fixed pruning ratios for CNNs; MLP pruning and factorization for text.
SETTINGS = {
    "image-classifier": {"prune 0.1": "--prune 0.1", "prune 0.2": "--prune 0.2",
                         "prune 0.1 output, sensitivity": "--prune 0.1 --importance output --set prune-channels.allocation=sensitivity",
                         "prune 0.2 output, sensitivity": "--prune 0.2 --importance output --set prune-channels.allocation=sensitivity"},
    "binary-classifier": {"prune 0.2": "--prune 0.2"},
    "ocr-cls": {"prune 0.2": "--prune 0.2"},
    "ocr-rec": {"prune 0.2": "--prune 0.2"},
    "ocr-det": {"prune 0.2": "--prune 0.2"},
    "layout": {"prune 0.2": "--prune 0.2"},
    TEXT: {"prune 0.25 output": "--prune 0.25 --importance output",
           "prune 0.25 output, sensitivity": "--prune 0.25 --importance output --set prune-channels.allocation=sensitivity",
           "factorize-budget 0.8": "--factorize-budget 0.8"},
}
#: The issue's bound on estimate vs truth: 3 points of top-1 agreement, 0.01 of cosine.
ESTIMATE_SLACK = {"top1": 0.03, "cosine": 0.01}


def truth_and_estimate(kind: str, row: dict[str, Any]) -> tuple[str, float | None, float | None]:
    """(metric, the tool's estimate, the evaluation split's value) in the metric the issue bounds."""
    fid = (row.get("report") or {}).get("report_fidelity") or {}
    truth = row.get("fidelity") or {}
    if kind in TOP1_KINDS:
        return "top1", fid.get("top1_agreement"), truth.get("top1_agreement")
    if kind == TEXT:
        return "cosine", fid.get("cosine"), truth.get("cosine_mean")
    return "sqnr", fid.get("sqnr_db"), truth.get("sqnr_db")


def run(entry: corpus.Entry, setting: str, flags: str, args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    row = default_path.run_model(entry, argparse.Namespace(**{**vars(args), "extra": shlex.split(flags)}))
    row.update(setting=setting, flags=flags, total_s=time.monotonic() - started)
    metric, estimate, truth = truth_and_estimate(entry.kind, row)
    row["comparison"] = {"metric": metric, "estimate": estimate, "truth": truth,
                         "gap": None if estimate is None or truth is None else estimate - truth}
    return row


def cell(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} dB" if metric == "sqnr" else (f"{value:.1%}" if metric == "top1" else f"{value:.4f}")


HEADERS = ["model", "setting", "exit", "wall s", "MACs (theoretical)", "measured (tool / own)",
           "estimate (held-out sources)", "interval of its drop", "on other sources", "gap", "within bound",
           "SQNR est. / other"]


def table_rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in data["runs"]:
        rep, comp = r.get("report") or {}, r["comparison"]
        d = default_path.derived(r)
        est = rep.get("estimate") or {}
        interval = est.get("interval")
        slack = ESTIMATE_SLACK.get(comp["metric"])
        within = "-" if comp["gap"] is None or slack is None else ("yes" if abs(comp["gap"]) <= slack else "no")
        gap = "-" if comp["gap"] is None else (f"{comp['gap']:+.1f} dB" if comp["metric"] == "sqnr" else
                                               f"{100 * comp['gap']:+.1f} pt" if comp["metric"] == "top1" else f"{comp['gap']:+.4f}")
        truth = r.get("fidelity") or {}
        rows.append([
            r["name"], r["setting"], str((r.get("run") or {}).get("exit_code")), f"{r['total_s']:.0f}",
            default_path.fx(d["theoretical"]), f"{default_path.fx(d['report_measured'])} / {default_path.fx(d['own_measured'])}",
            cell(comp["estimate"], comp["metric"]) + (f" ({est.get('samples')} samples, {est.get('sources') or '?'} src)" if est else ""),
            "-" if not interval else f"{est['metric']} {interval[0]:.4g} to {interval[1]:.4g}",
            cell(comp["truth"], comp["metric"]), gap, within,
            f"{cell((rep.get('report_fidelity') or {}).get('sqnr_db'), 'sqnr')} / {cell(truth.get('sqnr_db'), 'sqnr')}",
        ])
    return rows


def render(data: dict[str, Any]) -> str:
    mc = data["machine"]
    flags = ", ".join(f"{k} {'yes' if mc['cpu_flags'].get(k) else 'no'}" for k in ("avx2", "avx512f", "avx512_vnni"))
    busy = [f"{r['name']} {r['setting']} {r['run']['others_cpu_share']:.0%}" for r in data["runs"]
            if (r.get("run") or {}).get("others_cpu_share", 0) > 0.05]
    return "\n".join([
        f"## Compression against fidelity: the tool's estimate and the truth{'' if data['complete'] else ' (partial)'}", "",
        f"CPU: {mc['cpu']} ({mc['physical_cores']} cores; {flags}); onnxruntime {mc['onnxruntime']}; onnxcompress "
        f"{mc['onnxcompress_commit']}{' (uncommitted changes)' if mc['onnxcompress_dirty'] else ''}.", "",
        f"Benchmark: `{data['command']}`. Each row: `python -m onnxcompress optimize MODEL -o OUT.onnx --calib CALIB.npz "
        "--json --report REPORT.json FLAGS` with the corpus calibration samples labelled by source (`__source__`).", "",
        markdown_table(HEADERS, table_rows(data), right=[False, False] + [True] * 10), "",
        "estimate: the report's fidelity, measured by the tool on calibration samples its passes never fitted (whole "
        "photos, pages, and Python documentation topics for the sentences). "
        "on other sources: the output against the float model on the corpus evaluation split (other photos, pages, "
        "texts), 1 intra-op thread; top-1 agreement for classifiers, mean cosine for text, worst-output SQNR for the "
        "rest. within bound: |gap| <= 3 points (top-1) or 0.01 (cosine). measured: the tool's `bench` and this "
        "script's interleaved timing at batch 1.", "",
        *([f"Other processes were busy during: {', '.join(busy)} (timings noisy)."] if busy else []), "",
    ]) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_lite1,efficientnet_lite2,mpnet", help="corpus model names")
    parser.add_argument("--settings", default=None, help="'NAME=FLAGS;NAME=FLAGS' for every model (default: SETTINGS by kind)")
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=None, help="evaluation samples (default: all of the split)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--timeout-min", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=default_path.DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.settings:
        args.settings = dict(part.split("=", 1) for part in args.settings.split(";") if part.strip())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    entries = [corpus.model(name) for name in args.models]
    data = {"command": "python benchmarks/real/tradeoff.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "machine": default_path.machine(), "runs": [], "complete": False}
    for entry in entries:
        eval_count = args.eval or entry.counts["evaluation"]
        for setting, flags in (args.settings or SETTINGS[entry.kind]).items():
            default_path.log(f"{entry.name}: {setting}")
            row_args = argparse.Namespace(**{**vars(args), "eval": eval_count})
            data["runs"].append(run(entry, setting, flags, row_args))
            write_files(args.out, NAME, data, render(data))
    data["complete"] = True
    print(write_files(args.out, NAME, data, render(data)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

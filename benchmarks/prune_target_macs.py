"""How long `prune-channels --target-macs` takes on a ResNet-50-shaped model, and what it keeps.

    python benchmarks/prune_target_macs.py [--target 0.5] [--round-to 8] [--repeats 3] [--rounds 3]
        [--baseline-tree DIR [--baseline-label COMMIT]] [--reference] [--out benchmarks/results]

Builds tests/zoo.py's ResNet-50 (224x224, standard widths, seeded random weights), exports it with
the TorchScript exporter (opset 17, dynamic batch), runs the "cleanup" recipe (BatchNorm folded) and
caches the file (--model). Then times `PruneChannels(target_macs=...).run` alone (L2 importance, no
calibration, no recovery, no pipeline verification) on fresh copies, in a fresh process per round,
and prints the median, the MACs kept and a digest of the channels kept per group.

`--baseline-tree DIR` (a checkout of older code, e.g. `git worktree add /tmp/base <commit>`) runs the
same rounds with DIR's onnxcompress, interleaved with this tree's, and fails unless both keep the same
channels with the same MACs. `--reference` also runs, in this process, the bisection that prunes and
re-costs a full copy of the model at every step (what the pass did before it computed MACs from the
channel graph) and fails unless it ends at the same ratio, channels and MACs. Writes
prune_target_macs.json and .md to --out unless something failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: make `common` importable

from common import DEFAULT_RESULTS, markdown_table, repo_root_on_path, write_json, write_text  # noqa: E402

repo_root_on_path()

import onnxcompress  # noqa: E402
from onnxcompress.analysis.channels import ChannelGraph, prepare  # noqa: E402
from onnxcompress.analysis.cost import analyze_cost  # noqa: E402
from onnxcompress.model import load  # noqa: E402
from onnxcompress.passes import prune as prune_module  # noqa: E402
from onnxcompress.pipeline import PassContext, Pipeline  # noqa: E402

NAME = "prune_target_macs"
INPUT_NAME = "input"
DYNAMIC_AXES = {INPUT_NAME: {0: "batch"}, "output": {0: "batch"}}
DEFAULT_MODEL = Path(tempfile.gettempdir()) / "onnxcompress-bench" / "resnet50_224_clean.onnx"
#: Older code has no BISECTION_STEPS; it bisected 12 times as well.
BISECTION_STEPS = getattr(prune_module, "BISECTION_STEPS", 12)


def build_model(path: Path, image_size: int) -> Path:
    """ResNet-50 from tests/zoo.py, exported and cleaned; reused when `path` exists."""
    if path.exists():
        return path
    from tests import zoo

    module, inputs = zoo.resnet50(image_size=image_size, batch=1)
    raw = zoo.export_module(module, inputs, path.with_suffix(".raw.onnx"), dynamo=False, dynamic_axes=DYNAMIC_AXES)
    result = Pipeline.from_recipe("cleanup").run(str(raw))
    onnxcompress.save(result.model, path)
    raw.unlink()
    return path


def kept_channels(groups: list[dict]) -> list:
    """[first source, channels, removed indices] per group: what results are compared by."""
    return [[g["sources"][0], g["channels"], g["removed"]] for g in groups]


def digest(kept: list) -> str:
    return hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:16]


def make_pass(args: argparse.Namespace) -> prune_module.PruneChannels:
    return prune_module.PruneChannels(target_macs=args.target, importance="l2", round_to=args.round_to,
                                      allocation=args.allocation, recover="none")


def time_pass(args: argparse.Namespace, shapes: dict) -> dict:
    """`args.repeats` runs of the pass on fresh copies: their seconds and the (last) result."""
    seconds = []
    for _ in range(args.repeats):
        model = load(args.model)
        ctx = PassContext(input_shapes=shapes, model=model)
        start = time.perf_counter()
        result = make_pass(args).run(model, ctx)
        seconds.append(time.perf_counter() - start)
    details = result.record.details
    kept = kept_channels(details["groups"])
    return {"code": str(Path(onnxcompress.__file__).resolve().parent), "seconds": seconds, "ratio": details["ratio"],
            "removed_units": details["removed_units"], "macs_after": analyze_cost(model, shapes).stats.macs,
            "kept": kept, "kept_digest": digest(kept)}


def reference_search(args: argparse.Namespace, shapes: dict) -> dict:
    """The bisection measured the slow, obvious way: prune a full copy at every ratio and re-cost it."""
    prune = make_pass(args)
    model = load(args.model)
    start = time.perf_counter()
    prepare(model)
    graph = ChannelGraph.build(model, shapes)
    scores, protected = prune._scores(graph), prune._protected(graph)
    base = analyze_cost(model, shapes).stats.macs
    cache: dict[float, tuple[int, set[int]]] = {}

    def macs_at(ratio: float) -> tuple[int, set[int]]:
        if ratio not in cache:
            removed = prune._decide(graph, scores, protected, ratio)
            trial = load(model)
            ChannelGraph.build(trial, shapes).prune(removed)
            cache[ratio] = (analyze_cost(trial, shapes).stats.macs, removed)
        return cache[ratio]

    lo, hi = 0.0, prune.max_group_ratio - 1e-9
    if macs_at(hi)[0] / base <= prune.target_macs:
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            if macs_at(mid)[0] / base <= prune.target_macs:
                hi = mid
            else:
                lo = mid
    macs, removed = macs_at(hi)
    seconds = time.perf_counter() - start
    kept = kept_channels(prune_module._group_records(graph, removed))
    return {"seconds": seconds, "ratio": hi, "macs_after": macs, "kept_digest": digest(kept), "kept": kept}


def worker(args: argparse.Namespace, code_root: Path) -> dict:
    """One round in a fresh process, importing onnxcompress from `code_root`."""
    command = [sys.executable, __file__, "--worker", "--model", str(args.model), "--image-size", str(args.image_size),
               "--target", str(args.target), "--round-to", str(args.round_to), "--allocation", args.allocation,
               "--repeats", str(args.repeats)]
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    found = json.loads(done.stdout.splitlines()[-1])
    if Path(found["code"]) != (code_root / "onnxcompress").resolve():
        raise SystemExit(f"the worker imported onnxcompress from {found['code']}, not from {code_root}")
    return found


def summary(rounds: list[dict]) -> dict:
    seconds = [s for r in rounds for s in r["seconds"]]
    first = rounds[0]
    same = all(r["kept"] == first["kept"] and r["macs_after"] == first["macs_after"] for r in rounds)
    return {"code": first["code"], "seconds": [round(s, 3) for s in seconds], "median_seconds": statistics.median(seconds),
            "ratio": first["ratio"], "macs_after": first["macs_after"], "kept_digest": first["kept_digest"],
            "removed_units": first["removed_units"], "stable_across_rounds": same}


def machine() -> str:
    from onnxcompress.host import cpu_description, logical_cores, physical_cores

    model, flags = cpu_description()
    present = ", ".join(f for f, on in flags.items() if on) or "none of interest"
    return f"{model} ({physical_cores()} physical / {logical_cores()} logical cores; flags: {present})"


def markdown(data: dict) -> str:
    current, base, ref = data["current"], data.get("baseline"), data.get("reference")
    rows = []
    if base:
        rows.append(["before (" + data["baseline_label"] + ")", f"{base['median_seconds']:.2f} s",
                     " ".join(f"{s:.2f}" for s in base["seconds"]), base["kept_digest"], f"{base['macs_after']:,}"])
    rows.append(["this code", f"{current['median_seconds']:.2f} s", " ".join(f"{s:.2f}" for s in current["seconds"]),
                 current["kept_digest"], f"{current['macs_after']:,}"])
    if ref:
        rows.append(["check: bisection on pruned copies", f"{ref['seconds']:.2f} s", "1 run, after the rounds",
                     ref["kept_digest"], f"{ref['macs_after']:,}"])
    lines = [
        "## Pruning to a MAC target: time of the prune-channels pass",
        "",
        f"{data['model']}; `prune-channels` with target_macs {data['target_macs']}, L2 importance, "
        f"{data['allocation']} allocation, round_to {data['round_to']}, no calibration or recovery; the pass alone "
        "(`PruneChannels.run`, no pipeline verification), on a fresh copy per run, one process per round"
        + (", rounds of both codes interleaved" if base else "") + f". MACs {data['macs_before']:,} -> "
        f"{current['macs_after']:,} ({current['macs_after'] / data['macs_before']:.3f}), ratio {current['ratio']:.6f}, "
        f"{current['removed_units']} channel classes removed.",
        "",
        f"Machine: {data['machine']}. Load average {data['load_before'][0]:.1f} before and {data['load_after'][0]:.1f} "
        "after (other jobs shared the cores): absolute seconds are noisy, the interleaved ratio is the fairer figure.",
        "",
        markdown_table(["code", "median", "runs (s)", "kept channels (digest)", "MACs after"], rows),
        "",
    ]
    if base:
        lines += [f"Speedup of the pass: {base['median_seconds'] / current['median_seconds']:.1f}x (medians); "
                  f"same channels and MACs as before: {'yes' if data['same_as_baseline'] else 'NO'}.", ""]
    if ref:
        lines += ["The check row prunes and re-costs a full copy of the model at every bisection step, as the pass "
                  "did before; it runs once, not interleaved, to confirm the result, so its time is only indicative.", ""]
    lines += [f"Reproduce: `{data['command']}`" + (f" (the baseline tree: a checkout of {data['baseline_label']}, e.g. "
              f"`git worktree add DIR {data['baseline_label']}`)" if base else ""), ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="cleaned model (built when missing)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--target", type=float, default=0.5, help="fraction of the MACs to keep")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--allocation", choices=("uniform", "global"), default="uniform")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per round")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per code")
    parser.add_argument("--baseline-tree", type=Path, help="a checkout of the code to compare with")
    parser.add_argument("--baseline-label", default="the baseline tree", help="what to call it, e.g. a commit")
    parser.add_argument("--reference", action="store_true", help="also run the pruned-copies bisection and compare")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="folder for prune_target_macs.json and .md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.model = build_model(args.model.resolve(), args.image_size)
    shapes = {INPUT_NAME: (1, 3, args.image_size, args.image_size)}
    if args.worker:
        print(json.dumps(time_pass(args, shapes)))
        return 0
    here = Path(__file__).resolve().parents[1]
    load_before = os.getloadavg()
    current, baseline = [], []
    for index in range(args.rounds):
        if args.baseline_tree:
            baseline.append(worker(args, args.baseline_tree.resolve()))
            print(f"round {index + 1} before: " + " ".join(f"{s:.2f}" for s in baseline[-1]["seconds"]) + " s", flush=True)
        current.append(worker(args, here))
        print(f"round {index + 1} now:    " + " ".join(f"{s:.2f}" for s in current[-1]["seconds"]) + " s", flush=True)
    data = {
        "benchmark": NAME,
        "command": "python benchmarks/prune_target_macs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": f"ResNet-50 (tests/zoo.py resnet50, {args.image_size}x{args.image_size}, TorchScript export, cleanup)",
        "target_macs": args.target, "round_to": args.round_to, "allocation": args.allocation,
        "macs_before": analyze_cost(load(args.model), shapes).stats.macs,
        "machine": machine(), "load_before": load_before,
        "current": summary(current),
    }
    failures = [] if data["current"]["stable_across_rounds"] else ["this code kept different channels across rounds"]
    if args.baseline_tree:
        data["baseline"] = summary(baseline)
        data["baseline_label"] = args.baseline_label
        data["same_as_baseline"] = baseline[0]["kept"] == current[0]["kept"] and \
            baseline[0]["macs_after"] == current[0]["macs_after"]
        if not data["same_as_baseline"]:
            failures.append("the baseline kept other channels or reached other MACs")
    if args.reference:
        ref = reference_search(args, shapes)
        data["reference"] = {k: v for k, v in ref.items() if k != "kept"}
        if (ref["ratio"], ref["kept"], ref["macs_after"]) != (data["current"]["ratio"], current[0]["kept"],
                                                              data["current"]["macs_after"]):
            failures.append("the pruned-copies bisection ended elsewhere")
    data["load_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in data.items() if k != "command"}, indent=1))
    if not failures:
        write_json(args.out / f"{NAME}.json", data)
        write_text(args.out / f"{NAME}.md", markdown(data))
    for failure in failures:
        print("MISMATCH:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

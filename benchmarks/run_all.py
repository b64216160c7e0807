"""Regenerate BENCHMARKS.md: run every benchmark script, one after another, then assemble the page.

    python benchmarks/run_all.py [--only NAME ...] [--skip NAME ...] [--list]

Scripts run one at a time (timing two at once on the same cores would corrupt both) with their
default settings, which are the settings BENCHMARKS.md quotes; each writes its section to
benchmarks/results/. A script that fails is reported and the others still run; its old section is
kept and the exit code says something failed. Scripts whose optional peers are missing (Torch-
Pruning, zstandard, torch) say so in their own sections. Where ORT's CUDA provider is available,
the end-to-end benchmark also runs with `--ep cuda`, and BENCHMARKS.md gets its GPU section.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: In BENCHMARKS.md order; the names are the scripts' stems and their results' file names.
SCRIPTS = ("pipeline_resnet50", "search_digits", "prune_resnet50", "prune_target_macs", "prune_digits", "factorize",
           "quantize_vs_ort", "distill", "pack")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="Run only these benchmarks.")
    parser.add_argument("--skip", nargs="+", choices=SCRIPTS, default=[], help="Do not run these.")
    parser.add_argument("--list", action="store_true", help="List the benchmarks and exit.")
    return parser.parse_args(argv)


def cuda_available() -> bool:
    """ORT's CUDA provider is installed (onnxruntime-gpu; see the [gpu] extra) and reports a device."""
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    available = [name for name in SCRIPTS if (HERE / f"{name}.py").is_file()]
    if args.list:
        print("\n".join(available))
        return 0
    chosen = [name for name in (args.only or available) if name in available and name not in args.skip]
    failed = []
    for name in chosen:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / f"{name}.py")], cwd=HERE.parent)
        print(f"== {name}: {'ok' if done.returncode == 0 else f'FAILED ({done.returncode})'} "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
        if done.returncode:
            failed.append(name)
    if "pipeline_resnet50" in chosen and cuda_available():
        print("== pipeline_resnet50 --ep cuda (a CUDA provider is available)", flush=True)
        done = subprocess.run([sys.executable, str(HERE / "pipeline_resnet50.py"), "--ep", "cuda"], cwd=HERE.parent)
        if done.returncode:
            failed.append("pipeline_resnet50 --ep cuda")
    subprocess.run([sys.executable, str(HERE / "assemble.py")], check=True, cwd=HERE.parent)
    print("BENCHMARKS.md written" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

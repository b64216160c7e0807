"""Write BENCHMARKS.md from the sections the benchmark scripts left in benchmarks/results/.

    python benchmarks/assemble.py

Each script writes its own section (`results/<name>.md`, with the numbers in `<name>.json`); this
puts them in one page, in the order below, and says which are missing rather than inventing them.
"""

from __future__ import annotations

from pathlib import Path

from common import write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = [
    ("pipeline_resnet50", "python benchmarks/pipeline_resnet50.py"),
    ("pipeline_resnet50_cuda", "python benchmarks/pipeline_resnet50.py --ep cuda"),
    ("search_digits", "python benchmarks/search_digits.py"),
    ("prune_resnet50", "python benchmarks/prune_resnet50.py"),
    ("prune_target_macs", "python benchmarks/prune_target_macs.py"),
    ("prune_digits", "python benchmarks/prune_digits.py"),
    ("factorize", "python benchmarks/factorize.py"),
    ("quantize_vs_ort", "python benchmarks/quantize_vs_ort.py"),
    ("distill", "python benchmarks/distill.py"),
    ("pack", "python benchmarks/pack.py"),
]
GPU_NOTE = ("GPU rows (CUDA provider): not measured; no GPU machine was available to the sessions that produced "
            "these numbers. `python benchmarks/run_all.py` adds them where onnxruntime-gpu finds a device.")


def main() -> None:
    parts = ["# Benchmarks", "", "Regenerate everything with `python benchmarks/run_all.py` (one script after another, then this page).", "",
             "Every number here was measured by a script in `benchmarks/`, on the machine its section names; "
             "each section gives the command that reproduces it. Latencies are medians of interleaved runs in one "
             "process (ORT CPU, fixed intra-op threads, spinning off); theoretical speedup is the MAC ratio, "
             "realization is measured / theoretical.", ""]
    if not (RESULTS / "pipeline_resnet50_cuda.md").is_file():
        parts += [GPU_NOTE, ""]
    for name, command in SECTIONS:
        section = RESULTS / f"{name}.md"
        if section.is_file():
            text = section.read_text().replace(f"]({name}", f"](benchmarks/results/{name}")
            parts += [text.strip(), ""]
        elif not name.endswith("_cuda"):  # GPU sections are covered by GPU_NOTE when absent
            parts += [f"## {name}", "", f"Not measured yet: run `{command}`.", ""]
    write_text(ROOT / "BENCHMARKS.md", "\n".join(parts))


if __name__ == "__main__":
    main()

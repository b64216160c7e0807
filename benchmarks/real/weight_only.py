"""Weight-only int4/int8 (`quantize-weight-only`) on the corpus's sentence encoders.

    python benchmarks/real/weight_only.py [--models mpnet,minilm] [--calib 256] [--eval 200] [--runs 100]

Calibration: the first --calib sentences of the corpus calibration split, stacked and right-padded
(padding rows are left out of GPTQ's statistics by the attention mask). Evaluation: the first
--eval sentences of the evaluation split (other text sources), one sentence per run at its own
length. Fidelity: cosine of each sentence embedding to the float model's (mean and min) and SQNR
pooled over all sentences (compare_int8's Meter). Size: the model file. Latency: ORT CPU, 1 intra-op
thread, batch 1, the evaluation sentence of median length, float and quantized models interleaved
run by run (text_int8.latency), median of --runs; the share of the machine other processes took
while timing is recorded. Writes results/weight_only.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1]
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # run by path: make `common` and `real.*` importable

import numpy as np  # noqa: E402
from common import CpuMonitor, markdown_table, write_results  # noqa: E402

from real import corpus  # noqa: E402
from real.text_int8 import fidelity, latency, quantize, run  # noqa: E402

#: (key, label, pass options). int8 weights with blocks of 128; int4 with blocks of 32.
SETTINGS: list[tuple[str, str, dict[str, Any]]] = [
    ("int4_rtn", "int4 RTN", {"bits": 4, "method": "rtn"}),
    ("int4_gptq", "int4 GPTQ", {"bits": 4, "method": "gptq"}),
    ("int4_gptq_asym", "int4 GPTQ, asymmetric", {"bits": 4, "method": "gptq", "symmetric": False}),
    ("int8_rtn", "int8 RTN", {"bits": 8, "method": "rtn"}),
    ("int8_gptq", "int8 GPTQ", {"bits": 8, "method": "gptq"}),
    ("int8_rtn_level0", "int8 RTN, accuracy_level 0", {"bits": 8, "method": "rtn", "accuracy_level": 0}),
    ("int4_rtn_dq", "int4 RTN, DequantizeLinear form", {"bits": 4, "method": "rtn", "form": "dequantize-linear"}),
]
#: Settings timed and measured on every model; the rest (latency comparisons) on the first only.
EVERY_MODEL = ("int4_rtn", "int4_gptq", "int8_rtn", "int8_gptq")


def machine() -> dict[str, Any]:
    import subprocess

    import onnx
    import onnxruntime

    from onnxcompress.bench import cpu_description, logical_cores, physical_cores

    cpu, flags = cpu_description()
    commit = subprocess.run(["git", "-C", str(BENCHMARKS.parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or None
    return {"cpu": cpu, "cpu_flags": flags, "physical_cores": physical_cores(), "logical_cores": logical_cores(),
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "onnxcompress_commit": commit}


def measure_model(name: str, settings: list[tuple[str, str, dict]], calib_n: int, eval_n: int, runs: int,
                  folder: Path) -> dict[str, Any]:
    entry = corpus.model(name)
    calib = corpus.stack(corpus.calibration(name, calib_n), corpus.pad_id(name))
    evals = corpus.evaluation(name, eval_n)
    reference = run(entry.path, evals)
    lengths = sorted(f["input_ids"].shape[1] for f in evals)
    feed = next(f for f in evals if f["input_ids"].shape[1] == lengths[len(lengths) // 2])
    rows: dict[str, Any] = {"fp32": {"bytes": entry.path.stat().st_size}}
    paths = {"fp32": str(entry.path)}
    for key, label, options in settings:
        out = folder / f"{name}.{key}.onnx"
        print(f"[{name}] {label} ...", file=sys.stderr, flush=True)
        seconds, records = quantize(entry.path, [{"type": "quantize-weight-only", **options}], calib, out)
        record = records[0]
        rows[key] = {"label": label, "options": options, "quantize_s": round(seconds, 1),
                     "bytes": out.stat().st_size, "changes": list(record.changes),
                     "skipped": len(record.skipped), "details": record.details,
                     **fidelity(reference, run(out, evals))}
        paths[key] = str(out)
        print(f"[{name}] {label}: cosine {rows[key].get('cosine_mean'):.5f} (min {rows[key].get('cosine_min'):.5f}), "
              f"{seconds:.0f} s", file=sys.stderr, flush=True)
    monitor = CpuMonitor()
    ms = latency(paths, feed, threads=1, runs=runs)
    others = monitor.share()
    for key, value in ms.items():
        rows[key]["latency_ms"] = value
        rows[key]["speedup"] = ms["fp32"] / value
    return {"model": name, "provenance": entry.provenance, "calibration_sentences": calib_n,
            "evaluation_sentences": eval_n, "latency_tokens": int(feed["input_ids"].shape[1]), "latency_runs": runs,
            "others_cpu_share": others, "rows": rows}


def render(data: dict[str, Any]) -> str:
    m = data["machine"]
    flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if m["cpu_flags"].get(f))
    lines = ["# Weight-only int4 / int8 on sentence encoders", "",
             f"CPU: {m['cpu']} ({m['physical_cores']} physical / {m['logical_cores']} logical cores; flags: {flags}); "
             f"onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, python {m['python']}, onnxcompress {m['onnxcompress_commit']}.",
             "", "Produced by `python benchmarks/real/weight_only.py`. Calibration: the first sentences of the corpus "
             "calibration split (stacked, padding masked out of GPTQ's statistics); evaluation: sentences of the "
             "evaluation split, from other text sources, one per run at its own length. Cosine: each sentence "
             "embedding against the float model's. Latency: ORT CPU, 1 thread, batch 1, the evaluation sentence of "
             "median length, models interleaved run by run, median. `quantize-weight-only` defaults: symmetric, "
             "blocks of 32 (int4) / 128 (int8), MatMulNBits with accuracy_level 4 unless stated.", ""]
    for model in data["models"]:
        rows = model["rows"]
        lines += [f"## {model['model']}", "",
                  f"{model['calibration_sentences']} calibration sentences, {model['evaluation_sentences']} evaluation "
                  f"sentences; latency at {model['latency_tokens']} tokens, {model['latency_runs']} runs "
                  f"(other processes took {100 * (model['others_cpu_share'] or 0):.0f}% of the machine while timing).", ""]
        table = [["fp32", "1", "", "", f"{rows['fp32']['bytes'] / 2**20:.1f}", "1.00x",
                  f"{rows['fp32']['latency_ms']:.2f}", "1.00x", ""]]
        for key, row in rows.items():
            if key == "fp32":
                continue
            table.append([row["label"], f"{row['cosine_mean']:.5f}", f"{row['cosine_min']:.5f}", f"{row['sqnr_db']:.1f}",
                          f"{row['bytes'] / 2**20:.1f}", f"{rows['fp32']['bytes'] / row['bytes']:.2f}x",
                          f"{row['latency_ms']:.2f}", f"{row['speedup']:.2f}x", f"{row['quantize_s']:.0f}"])
        lines += [markdown_table(["model", "cosine mean", "cosine min", "SQNR dB", "file MiB", "smaller", "latency ms",
                                  "speedup", "quantize s"], table), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mpnet,minilm")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    data: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "models": []}
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="weight-only-") as tmp:
        for i, name in enumerate(names):
            chosen = [s for s in SETTINGS if i == 0 or s[0] in EVERY_MODEL]
            data["models"].append(measure_model(name, chosen, args.calib, args.eval, args.runs, Path(tmp)))
    print(write_results(Path(args.out), "weight_only", data, render(data)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

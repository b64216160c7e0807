"""Sentence-encoder int8 fidelity and speed: our static and dynamic int8 against the float model.

    python benchmarks/real/text_int8.py mpnet --recipe cpu-int8 --eval 200 --avx2 30 --latency

Calibration: the corpus calibration split (first --calib sentences, stacked and padded, as
compare_int8 feeds our quantizer); evaluation: the evaluation split (other text sources), one
sentence per feed at its own length. Fidelity: cosine of the (already mean-pooled, normalised)
sentence embedding and SQNR pooled over all sentences, as compare_int8's Meter; AVX2: the same
model run by ORT's AVX2 kernels under qemu (Haswell-v4), float reference native.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from real import corpus  # noqa: E402
from real.compare_int8 import TEXT, Meter  # noqa: E402


def fidelity(reference, got) -> dict:
    meter = Meter(TEXT)
    for ref, out in zip(reference, got, strict=True):
        meter.add(ref, out)
    return meter.result()


def run(path, feeds, threads=1):
    import onnxruntime as ort

    from onnxcompress.runtime import session_options

    sess = ort.InferenceSession(str(path), session_options(threads=threads), providers=["CPUExecutionProvider"])
    return [sess.run(None, f) for f in feeds]


def latency(paths: dict[str, str], feed, threads: int, runs: int) -> dict[str, float]:
    """Median batch-1 latency (ms), models interleaved run by run so load changes hit all alike."""
    import onnxruntime as ort

    from onnxcompress.runtime import session_options

    sessions = {k: ort.InferenceSession(p, session_options(threads=threads), providers=["CPUExecutionProvider"])
                for k, p in paths.items()}
    times = {k: [] for k in paths}
    for s in sessions.values():
        for _ in range(5):
            s.run(None, feed)
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def quantize(model_path: Path, recipe: str | list, calib_arrays, out: Path) -> tuple[float, list]:
    import onnxcompress
    from onnxcompress.calibration import Calibration
    from onnxcompress.pipeline import Pipeline
    from onnxcompress.verify import VerifyOptions

    pipeline = Pipeline.from_recipe(recipe)
    pipeline.verify = VerifyOptions(enabled=False)
    model = onnxcompress.load(str(model_path))
    calibration = Calibration.from_arrays(model, calib_arrays, source="corpus calibration split")
    shapes = {k: (1, *v.shape[1:]) for k, v in calib_arrays.items()}
    start = time.perf_counter()
    result = pipeline.run(model, calibration=calibration, input_shapes=shapes)
    seconds = time.perf_counter() - start
    onnxcompress.save(result.model, str(out))
    return seconds, [r for r in result.report.passes]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--recipe", default="cpu-int8", help="built-in recipe name or a YAML/JSON pass list")
    ap.add_argument("--passes", default=None, help="JSON list of passes (overrides --recipe)")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--avx2", type=int, default=0)
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--keep", default=None, help="save the int8 model here")
    ap.add_argument("--show", action="store_true", help="print the pass changes")
    args = ap.parse_args(argv)

    entry = next(e for e in corpus.models() if e.name == args.model)
    pad = corpus.pad_id(entry.name)
    calib = corpus.stack(corpus.calibration(entry.name, args.calib), pad)
    evals = corpus.evaluation(entry.name, args.eval)
    recipe = json.loads(args.passes) if args.passes else args.recipe
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="text-int8-")) / "int8.onnx"
    seconds, records = quantize(entry.path, recipe, calib, out)
    if args.show:
        for r in records:
            for c in r.changes:
                print(f"  [{r.name}] {c}")
            for s in r.skipped[:40]:
                print(f"  [{r.name}] skipped: {s}")
    reference = run(entry.path, evals)
    result = {"model": entry.name, "recipe": recipe, "calib_s": round(seconds, 1),
              "native": fidelity(reference, run(out, evals))}
    if args.avx2:
        from onnxcompress.cpu_emulation import run_emulated

        feeds = evals[: args.avx2]
        result["avx2"] = fidelity(reference[: args.avx2], run_emulated(out, feeds))
    if args.latency:
        lengths = sorted(f["input_ids"].shape[1] for f in evals)
        feed = next(f for f in evals if f["input_ids"].shape[1] == lengths[len(lengths) // 2])
        for threads in (1, 2):
            ms = latency({"fp32": str(entry.path), "int8": str(out)}, feed, threads, args.runs)
            result[f"latency_{threads}t_ms"] = {**ms, "speedup": ms["fp32"] / ms["int8"], "tokens": lengths[len(lengths) // 2]}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

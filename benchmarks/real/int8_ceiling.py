"""What int8 can reach on the corpus image classifiers, and where its noise comes from.

    python benchmarks/real/int8_ceiling.py [--models a,b] [--calib 64] [--eval 400] [--out DIR]

Per image classifier, on the evaluation split (other photos than the calibration ones):

1. How much noise the evaluation photos tolerate: top-1 agreement of the float logits with i.i.d.
   Gaussian noise added at a given SQNR (mean of DRAWS draws). The noise a network's layers make is
   not i.i.d. across classes, and on every model measured here it flipped more decisions than this at
   the same SQNR (part 2), so each column reads as the most a quantizer can expect at that SQNR.
2. Where onnxcompress's int8 noise comes from: the int8 model (QuantizeQDQ defaults, kernels "any"
   and "vnni") against the float model, then the float model computing with the int8 model's
   dequantized weights and biases and float activations (every other op as in the float model):
   the weights' own noise. Activation rounding makes the rest.

Writes int8_ceiling.{md,json} to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

BENCHMARKS = Path(__file__).resolve().parent.parent
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from common import markdown_table, write_results  # noqa: E402

from real import corpus  # noqa: E402
from real.compare_int8 import Meter, log, machine, machine_line, run_native  # noqa: E402

NAME = "int8_ceiling"
NOISE_DB = (22, 25, 28, 31, 34, 37, 40)
DRAWS = 20
WEIGHTED = ("Conv", "Gemm", "MatMul")


def measured(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(SQNR dB, top-1 agreement) of logits [N, C] against the float ones, as compare_int8 measures them."""
    meter = Meter("image-classifier")
    meter.add([ref], [got])
    result = meter.result()
    return result["sqnr_db"], result["top1_agreement"]


def noise_tolerance(logits: np.ndarray, seed: int = 0) -> dict[int, float]:
    """{SQNR dB: top-1 agreement with i.i.d. Gaussian noise of that power added to the logits}."""
    rng = np.random.default_rng(seed)
    power = float(np.mean(logits**2))
    result = {}
    for db in NOISE_DB:
        sigma = np.sqrt(power / 10 ** (db / 10))
        result[db] = float(np.mean([measured(logits, logits + rng.normal(0, sigma, logits.shape))[1] for _ in range(DRAWS)]))
    return result


def _dequantized(q: onnx.ModelProto) -> dict[str, dict[int, np.ndarray]]:
    """{weighted node name: {input index: the float value its DequantizeLinear computes}} of an int8 QDQ model."""
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    found: dict[str, dict[int, np.ndarray]] = {}
    for node in q.graph.node:
        if node.op_type not in WEIGHTED:
            continue
        for k in range(1, len(node.input)):
            dq = producer.get(node.input[k])
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            codes, scale = inits[dq.input[0]].astype(np.float64), inits[dq.input[1]]
            zero = inits[dq.input[2]].astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            shape = [1] * codes.ndim
            if np.ndim(scale) and codes.ndim:
                shape[axis] = -1
            found.setdefault(node.name, {})[k] = ((codes - np.reshape(zero, shape)) * np.reshape(scale, shape)).astype(np.float32)
    return found


def weights_only(float_model: onnx.ModelProto, int8_model: onnx.ModelProto) -> tuple[bytes, int]:
    """The float model with the int8 model's dequantized weights and biases, by node name; and how many
    nodes took them."""
    values = _dequantized(int8_model)
    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    inits = {i.name: i for i in model.graph.initializer}
    replaced = 0
    for node in model.graph.node:
        for k, value in values.get(node.name, {}).items():
            if k < len(node.input) and node.input[k] in inits:
                old = inits[node.input[k]]
                inits[node.input[k]].CopyFrom(numpy_helper.from_array(value.reshape(tuple(old.dims)), old.name))
                replaced += k == 1
    return model.SerializeToString(), replaced


def quantized(entry: corpus.Entry, calib: int, kernels: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(the cleaned float model the quantizer saw, the int8 model) with QuantizeQDQ's defaults."""
    import onnxcompress as oc
    from onnxcompress.passes.cleanup import EliminateNoOps, FoldBatchNorm, FoldConstants
    from onnxcompress.passes.quantize import QuantizeQDQ

    data = corpus.stack(corpus.calibration(entry.name, calib), corpus.pad_id(entry.name))
    cleaned = oc.Pipeline([FoldConstants(), FoldBatchNorm(), EliminateNoOps()], verify=None).run(str(entry.path)).model
    int8 = oc.Pipeline([QuantizeQDQ(kernels=kernels)], verify=None).run(cleaned, calibration=data).model
    return oc.model.to_proto(cleaned, with_data=True), oc.model.to_proto(int8, with_data=True)


def logits(path_or_bytes: Any, feeds: list[dict[str, np.ndarray]], folder: Path, name: str) -> np.ndarray:
    if isinstance(path_or_bytes, bytes):
        path = folder / f"{name}.onnx"
        path.write_bytes(path_or_bytes)
        path_or_bytes = path
    return np.concatenate([o[0] for o in run_native(Path(path_or_bytes), feeds, threads=2)])


def run_model(entry: corpus.Entry, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    feeds = corpus.evaluation(entry.name, args.eval)
    reference = logits(entry.path, feeds, folder, "float")
    probs = np.exp(reference - reference.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    row: dict[str, Any] = {"model": entry.name, "samples": len(feeds), "calibration": args.calib,
                           "mean_top1_probability": float(probs.max(1).mean()),
                           "noise_tolerance": noise_tolerance(reference), "int8": {}}
    for kernels in ("any", "vnni"):
        log(f"{entry.name}: int8 for kernels {kernels}")
        cleaned, int8 = quantized(entry, args.calib, kernels)
        full = logits(int8.SerializeToString(), feeds, folder, f"int8_{kernels}")
        wonly, replaced = weights_only(cleaned, int8)
        weights = logits(wonly, feeds, folder, f"weights_{kernels}")
        (sqnr, top1), (weights_sqnr, weights_top1) = measured(reference, full), measured(reference, weights)
        row["int8"][kernels] = {"sqnr_db": sqnr, "top1": top1, "weights_only_sqnr_db": weights_sqnr,
                                "weights_only_top1": weights_top1, "layers_with_int8_weights": replaced}
    return row


def render(data: dict[str, Any]) -> str:
    lines = ["## What int8 can reach on the corpus classifiers", "", machine_line(data["machine"]), ""]
    headers = ["model", "mean top-1 p"] + [f"{db} dB" for db in NOISE_DB]
    rows = [[r["model"], f"{r['mean_top1_probability']:.3f}"] + [f"{100 * r['noise_tolerance'][db]:.1f}%" for db in NOISE_DB]
            for r in data["rows"]]
    lines += ["Top-1 agreement of the float logits with i.i.d. Gaussian noise at each SQNR "
              f"(mean of {DRAWS} draws; int8 noise at the same SQNR flipped more decisions than this on every model measured):", "",
              markdown_table(headers, rows), ""]
    headers = ["model", "int8 kernels", "int8 SQNR dB", "int8 top-1", "weights only: SQNR dB", "weights only: top-1"]
    rows = [[r["model"], k, f"{m['sqnr_db']:.2f}", f"{100 * m['top1']:.1f}%", f"{m['weights_only_sqnr_db']:.2f}",
             f"{100 * m['weights_only_top1']:.1f}%"] for r in data["rows"] for k, m in r["int8"].items()]
    lines += ["onnxcompress int8 (QuantizeQDQ defaults: mixed precision, bias correction, MSE ranges) and its "
              "weights alone (the float model computing with the int8 model's dequantized weights and "
              "biases; activations in float), native ORT, graph optimizations on:", "",
              markdown_table(headers, rows, [False, False, True, True, True, True]), "",
              f"Samples: the first {data['rows'][0]['samples'] if data['rows'] else 0} evaluation views (photos never used "
              f"for calibration); calibration: the first {data['args']['calib']} calibration views."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=400)
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "real" / "results")
    args = parser.parse_args(argv)
    corpus.ensure_built()
    import tempfile

    data: dict[str, Any] = {"machine": machine(), "args": {"calib": args.calib, "eval": args.eval}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="int8-ceiling-") as tmp:
        for name in args.models.split(","):
            data["rows"].append(run_model(corpus.model(name), args, Path(tmp)))
            print(write_results(args.out, NAME, data, render(data)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

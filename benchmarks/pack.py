""".occ sizes against raw ONNX, gzip -9, xz/lzma and zstd, lossless and lossy (weight sharing), with fidelity.

Models: the bundled digits CNN (real trained weights, real labelled test digits: accuracy is
reported), SqueezeNet 1.0 and ResNet-50 from the onnx wheel's light model zoo after the `cleanup`
recipe. The light models ship their weights as constant fills, which any codec shrinks to nothing,
so their weights are replaced by seeded random He-normal values: their sizes are those of a
realistic weight distribution, their fidelity is on random inputs, and neither says anything about
accuracy. Variants: float, pruned (prune-channels ratio 0.5), int8 (static QDQ, quantize-int8) and
pruned + int8.

    python benchmarks/pack.py [--out benchmarks/results] [--skip-resnet]
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import lzma
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from common import CpuMonitor, markdown_table, repo_root_on_path, script_main, write_json, write_text

repo_root_on_path()

from onnxcompress import Calibration, Pipeline, demo_data, load, pack, to_proto  # noqa: E402
from onnxcompress.model import graph_inputs  # noqa: E402
from onnxcompress.passes import weight_share  # noqa: E402, F401  (registers the pass)
from onnxcompress.verify import VerifyOptions  # noqa: E402
from tests.conftest import LIGHT_MODELS  # noqa: E402

BITS = (4, 5, 6)
#: A model whose every output row has a probability above this is a saturated Softmax (see `saturated`).
SATURATED = 0.999
CLEANUP = ["fold-constants", "fold-batchnorm", "eliminate-noops"]
PRUNE = {"type": "prune-channels", "ratio": 0.5}
INT8 = {"type": "quantize-int8"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--skip-resnet", action="store_true", help="Leave ResNet-50 out (the slowest model).")
    return parser.parse_args(argv)


def run_pipeline(model, spec, calibration):
    pipeline = Pipeline.from_recipe(spec)
    pipeline.verify = VerifyOptions(enabled=False)
    return to_proto(pipeline.run(model, calibration=calibration).model)


def randomize_weights(proto: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """He-normal weights (std sqrt(2 / fan_in)) and N(0, 0.05) vectors in place of constant fills."""
    rng = np.random.default_rng(seed)
    for tensor in proto.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        array = onnx.numpy_helper.to_array(tensor)
        if array.ndim >= 2:
            fan_in = int(np.prod(array.shape[1:]))
            new = rng.normal(0.0, np.sqrt(2.0 / fan_in), array.shape)
        else:
            new = rng.normal(0.0, 0.05, array.shape)
        tensor.CopyFrom(onnx.numpy_helper.from_array(new.astype(np.float32), tensor.name))
    return proto


def saturated(proto: onnx.ModelProto, cal: Calibration) -> bool:
    """Outputs that are one-hot probabilities on every sample (a Softmax saturated by random weights): output
    fidelity of such a model only says whether the argmax moved, so its lossy rows would mislead."""
    from onnxcompress.calibration import batch_size_for
    from onnxcompress.verify import outputs

    model = load(proto)
    feeds = list(cal.batches(batch_size_for(model, 8)))
    first = [np.asarray(o[0]) for o in outputs(model, feeds, "saturation check")]
    probs = np.concatenate([o.reshape(len(o), -1) for o in first])
    return bool(np.all(probs.max(axis=1) > SATURATED) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-3))


def baselines(data: bytes) -> dict[str, int]:
    sizes = {"onnx": len(data), "gzip -9": len(gzip.compress(data, 9, mtime=0)),
             "xz -9": len(lzma.compress(data, preset=9))}
    zstandard = pack.compression.zstd_module()
    if zstandard is not None:
        sizes["zstd -19"] = len(zstandard.ZstdCompressor(level=19).compress(data))
    return sizes


def huffman_bytes(counts: np.ndarray) -> float:
    """Exact size of a Huffman code for these symbol counts, plus one byte per code length (the table)."""
    counts = [int(c) for c in counts if c > 0]
    if len(counts) == 1:
        return counts[0] / 8 + 1
    lengths = [0] * len(counts)
    heap = [(c, [i]) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        for i in a[1] + b[1]:
            lengths[i] += 1
        heapq.heappush(heap, (a[0] + b[0], a[1] + b[1]))
    return sum(c * n for c, n in zip(counts, lengths)) / 8 + len(counts)


def index_coding(path: Path) -> dict[str, float]:
    """For the codebook sections of a packed file: bytes stored (best codec), an ideal Huffman code, order-0 entropy."""
    index = pack.read_index(path)
    proto = pack.unpack_proto(path)
    tensors = list(pack.model_tensors(proto))
    stored = huffman = entropy = 0.0
    for section in index["sections"][1:]:
        if section["encoding"] != "codebook":
            continue
        raw = tensors[section["tensor"]].raw_data
        _, indices = np.unique(np.frombuffer(raw, f"<u{section['itemsize']}"), return_inverse=True)
        counts = np.bincount(indices)
        p = counts[counts > 0] / indices.size
        stored += section["size"] - section["values"] * section["itemsize"]  # roughly: the codebook is ~incompressible
        huffman += huffman_bytes(counts)
        entropy += float(-(p * np.log2(p)).sum() * indices.size / 8)
    return {"stored": stored, "huffman": huffman, "entropy": entropy}


def main(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnxcompress-pack-") as tmp:
        measure(args, Path(tmp))


def measure(args, work: Path) -> None:
    monitor = CpuMonitor()
    images, labels = demo_data.load_test_set()
    digits = load(demo_data.demo_model_path())
    digits_cal = Calibration.from_arrays(digits, demo_data.load_calibration(), "digits_calib.npz")

    models: list[tuple[str, str, onnx.ModelProto, Calibration | None, bool]] = []  # family, variant, proto, calib, real
    float_digits = run_pipeline(digits, CLEANUP, None)
    pruned_digits = run_pipeline(digits, [*CLEANUP, PRUNE], digits_cal)
    models += [("digits CNN", "float", float_digits, digits_cal, True),
               ("digits CNN", "pruned 0.5", pruned_digits, digits_cal, True),
               ("digits CNN", "int8", run_pipeline(float_digits, [INT8], digits_cal), digits_cal, True),
               ("digits CNN", "pruned 0.5 + int8", run_pipeline(pruned_digits, [INT8], digits_cal), digits_cal, True)]
    light = ["squeezenet"] + ([] if args.skip_resnet else ["resnet50"])
    for name in light:
        base = randomize_weights(run_pipeline(load(LIGHT_MODELS[name]), CLEANUP, None))
        model = load(base)
        cal = Calibration.random(model, {v.name: (1, *v.shape.dims[1:]) for v in graph_inputs(model)}, count=16)
        variants = [("float", base)]
        if name == "squeezenet":
            pruned = run_pipeline(base, [PRUNE], cal)
            variants += [("pruned 0.5", pruned), ("int8", run_pipeline(base, [INT8], cal)),
                         ("pruned 0.5 + int8", run_pipeline(pruned, [INT8], cal))]
        models += [(f"{name} (random weights)", variant, proto, cal, False) for variant, proto in variants]

    size_rows, lossy_rows, coding_rows, records, skipped_lossy = [], [], [], [], []
    for family, variant, proto, cal, real in models:
        data = proto.SerializeToString()
        sizes = baselines(data)
        target = work / f"{family.split()[0]}-{variant.replace(' ', '_').replace('+', 'plus')}.occ"
        start = time.perf_counter()
        stats = pack.pack_model(proto, target)
        pack_seconds = time.perf_counter() - start
        start = time.perf_counter()
        exact = pack.unpack_proto(target).SerializeToString() == data
        unpack_seconds = time.perf_counter() - start
        assert exact, f"{family} {variant}: lossless round trip is not exact"
        sizes["occ"] = stats.packed_bytes
        record = {"model": family, "variant": variant, "sizes": sizes, "encodings": stats.encodings,
                  "codecs": stats.codecs, "pack_seconds": pack_seconds, "unpack_seconds": unpack_seconds,
                  "lossless_exact": exact, "lossy": []}
        best_other = min(v for k, v in sizes.items() if k not in ("onnx", "occ"))
        size_rows.append([family, variant, f"{sizes['onnx']:,}", *(f"{sizes[k] / sizes['onnx']:.3f}" for k in
                          ("gzip -9", "xz -9", *(("zstd -19",) if "zstd -19" in sizes else ()))),
                          f"{sizes['occ'] / sizes['onnx']:.3f}", f"{sizes['onnx'] / sizes['occ']:.2f}x",
                          f"{best_other / sizes['occ']:.2f}x", f"{pack_seconds:.1f} / {unpack_seconds:.1f}"])
        if "int8" not in variant and saturated(proto, cal):
            skipped_lossy.append(f"{family} {variant}")
        elif "int8" not in variant:
            accuracy = demo_data.accuracy(onnx.load_from_string(data), images, labels) if real else None
            for bits in BITS:
                lossy_path = work / f"{target.stem}-b{bits}.occ"
                start = time.perf_counter()
                lossy = pack.pack_model(proto, lossy_path, bits=bits, calibration=cal)
                seconds = time.perf_counter() - start
                fid = lossy.fidelity
                acc = demo_data.accuracy(pack.unpack_model(lossy_path), images, labels) if real else None
                entry = {"bits": bits, "occ": lossy.packed_bytes, "fidelity": fid, "test_accuracy": acc,
                         "test_accuracy_before": accuracy, "seconds": seconds}
                if real and variant == "float":
                    coding = index_coding(lossy_path)
                    entry["index_coding"] = coding
                    coding_rows.append([bits, f"{coding['stored']:,.0f}", f"{coding['huffman']:,.0f}",
                                        f"{coding['entropy']:,.0f}", f"{coding['huffman'] / coding['stored'] - 1:+.1%}"])
                record["lossy"].append(entry)
                lossy_rows.append([family, variant, bits, f"{sizes['onnx'] / lossy.packed_bytes:.1f}x",
                                   f"{sizes['gzip -9'] / lossy.packed_bytes:.1f}x", f"{fid.sqnr_db:.1f}",
                                   f"{fid.cosine:.4f}", "-" if fid.top1_agreement is None else f"{fid.top1_agreement:.1%}",
                                   "-" if acc is None else f"{accuracy:.2%} -> {acc:.2%}", fid.inputs])
        records.append(record)
        print(family, variant, sizes, flush=True)

    share = monitor.share()
    zstd_note = (".occ used its default, the standard library codecs only (zstd is tried only when asked for with "
                 "`--codecs`), so any Python can unpack it")
    codec_headers = ["gzip -9", "xz -9", *(("zstd -19",) if pack.compression.zstd_module() is not None else ())]
    text = "\n".join([
        "## Deep Compression storage: `.occ` sizes",
        "",
        "Lossless `.occ` (`onnxcompress pack MODEL -o MODEL.occ`): every tensor stored with the smallest of raw, "
        "byte-plane shuffle or codebook+indices, each compressed with the smallest of zlib/bz2/lzma; unpacking gives back the identical ModelProto bytes "
        f"(checked for every row). {zstd_note}. Columns are compressed size / ONNX size; `vs best` is the best "
        "general-purpose codec on the whole ONNX file divided by the .occ size.",
        "",
        markdown_table(["model", "variant", "ONNX bytes", *codec_headers, ".occ", "ONNX / .occ", "vs best",
                        "pack / unpack s"], size_rows, right=[False, False] + [True] * (len(codec_headers) + 5)),
        "",
        "Lossy `.occ` (`--bits N`: k-means weight sharing per tensor, linear init, tensors of 1,024+ weights; "
        "no retraining, unlike Deep Compression, which fine-tuned the shared centroids). Fidelity is the unpacked "
        "model against the packed input: SQNR and cosine of the outputs, top-1 agreement; digits test accuracy "
        "is on the 360 held-out labelled test digits."
        + (f" No lossy rows for {', '.join(skipped_lossy)}: with random weights its final Softmax is saturated "
           "(one-hot outputs on every input), so output fidelity would only say whether the argmax moved."
           if skipped_lossy else ""),
        "",
        markdown_table(["model", "variant", "bits", "ONNX / .occ", "gzip / .occ", "SQNR dB", "cosine", "top-1 agree",
                        "test accuracy", "fidelity inputs"], lossy_rows,
                       right=[False, False, True, True, True, True, True, True, True, False]),
        "",
        "Entropy coding of the codebook indices (digits CNN, float): bytes the chosen codec stored, an ideal "
        "Huffman code over each tensor's indices (Deep Compression's third stage; its code-length table "
        "included), and the order-0 entropy bound. Huffman is not implemented: the table says by how much it "
        "would beat the codec the container chose.",
        "",
        markdown_table(["bits", "stored (best codec)", "Huffman", "entropy bound", "Huffman vs stored"], coding_rows),
        "",
        f"Pack/unpack seconds are wall time on a shared machine (other processes used {share:.0%} of the CPU "
        "while this ran): rough only." if share is not None else "Pack/unpack seconds are rough wall times.",
        "",
        "Reproduce: `python benchmarks/pack.py`",
        "",
    ])
    write_text(args.out / "pack.md", text)
    write_json(args.out / "pack.json", {"models": records, "other_cpu_share": share,
                                         "codecs": pack.available_codecs()})
    print(text)


if __name__ == "__main__":
    raise SystemExit(script_main(parse_args, main))

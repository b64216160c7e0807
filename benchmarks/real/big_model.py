"""A >= 1B-parameter model through analyze, weight-only int4 and verification, measured per step.

    python benchmarks/real/big_model.py [--width 4] [--folder /tmp/big] [--sentences 8]

No package on PyPI ships >= 1B float weights of a model (the package lists searched have quantized
GGUF parts of a 7B model only), so the model is synthetic: all-mpnet-base-v2 widened --width times
(synthetic_mpnet.py says exactly how: it computes the real model's embeddings, with weights that
have the statistics of a layer that much wider), float32, saved with external data.

Every step runs in a child process whose wall time and peak RSS (the kernel's ru_maxrss) are
recorded, with the peaks of its anonymous and file-backed resident memory sampled from /proc every
0.1 s (memory-mapped weights are file-backed: the kernel can drop them under pressure, anonymous
memory it cannot):

1. build: draw and write the model tensor by tensor (`onnxcompress.save`, external data);
2. `onnxcompress analyze`;
3. `onnxcompress optimize --quantize int4` (round-to-nearest, MatMulNBits, accuracy level 4; the
   pipeline verifies after every pass: onnx.checker, an ORT session, outputs against the input's);
4. embeddings of --sentences real corpus sentences (mpnet's tokenizer) by the real
   all-mpnet-base-v2, the float model and the int4 model, each in its own process: cosine per sentence.
Writes results/big_model.{md,json}; the model files stay in --folder (about 6 GB at the default size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1]
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # run by path: make `common` and `real.*` importable

import numpy as np  # noqa: E402
from common import markdown_table, write_results  # noqa: E402

from real import corpus  # noqa: E402
from real import synthetic_mpnet as synthetic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REAL = "src/all-mpnet-base-v2/model.safetensors"  # in the corpus cache
SEQUENCE = 128  # the analysed and verified sequence length


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process in bytes (empty once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile") if k in fields}


def measure(name: str, command: list[str], log: Path) -> dict[str, Any]:
    """Run `command`, its output to `log`; wall time, exit code, peak RSS and sampled peaks per kind."""
    print(f"[{name}] {' '.join(command)}", file=sys.stderr, flush=True)
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    start = time.perf_counter()
    with open(log, "w") as out:
        # The package of this checkout, whatever `pip install -e` points at.
        paths = [str(BENCHMARKS.parent), os.environ.get("PYTHONPATH")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for key, value in _status(proc.pid).items():
                    peaks[key] = max(peaks[key], value)
                done.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    row = {"step": name, "command": " ".join(command), "exit_code": proc.returncode, "wall_s": round(wall, 1),
           "peak_rss": usage.ru_maxrss * 1024, "peak_anon": peaks["RssAnon"], "peak_file": peaks["RssFile"]}
    print(f"[{name}] exit {proc.returncode}, {wall:.0f} s, peak RSS {row['peak_rss'] / 2**30:.2f} GiB "
          f"(anonymous {row['peak_anon'] / 2**30:.2f}, file-backed {row['peak_file'] / 2**30:.2f})",
          file=sys.stderr, flush=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}); see {log}")
    return row


# ---------------------------------------------------------------------------------- child steps


def build_step(args: argparse.Namespace) -> None:
    import onnxcompress as oc

    config = synthetic.Config(width=args.width, seed=args.seed)
    model = synthetic.build(corpus.cache_dir() / REAL, config)
    oc.save(model, args.path, external_data=True)


def embed_step(args: argparse.Namespace) -> None:
    """Embeddings of the first --sentences evaluation sentences, one sentence a run, to args.out (.npy)."""
    from onnxcompress.runtime import session, session_options

    sess = session(args.path, options=session_options(spinning=False))
    feeds = corpus.evaluation("mpnet", args.sentences)
    start = time.perf_counter()
    rows = [sess.run(None, feed)[0][0] for feed in feeds]
    np.save(args.out, np.stack(rows))
    print(json.dumps({"run_s": time.perf_counter() - start}))


# ---------------------------------------------------------------------------------- the driver


def cli_step(name: str, args: list[str], folder: Path) -> dict[str, Any]:
    exe = Path(sys.executable).parent / "onnxcompress"
    return measure(name, [str(exe), *args], folder / f"{name}.log")


def self_step(name: str, args: list[str], folder: Path) -> dict[str, Any]:
    return measure(name, [sys.executable, __file__, *args], folder / f"{name}.log")


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = synthetic.Config(width=args.width, seed=args.seed)
    model, int4 = folder / "big.onnx", folder / "big.int4.onnx"
    shapes = ["--input-shape", f"input_ids=1x{SEQUENCE}", "--input-shape", f"attention_mask=1x{SEQUENCE}"]
    steps = [self_step("build", ["_build", str(model), "--width", str(args.width), "--seed", str(args.seed)], folder)]
    steps.append(cli_step("analyze", ["analyze", str(model), *shapes, "--json"], folder))
    analysis = _json_tail(folder / "analyze.log")
    report = folder / "optimize.json"
    steps.append(cli_step("optimize int4", ["optimize", str(model), "-o", str(int4), "--quantize", "int4", *shapes,
                                            "--bench-runs", "0", "--report", str(report)], folder))
    embeddings = {}
    for name, path in (("real", corpus.model("mpnet").path), ("float", model), ("int4", int4)):
        out = folder / f"embeddings.{name}.npy"
        steps.append(self_step(f"embed {name}", ["_embed", str(path), str(out), "--sentences", str(args.sentences)],
                               folder))
        embeddings[name] = np.load(out)
    real = _cosine(embeddings["float"][:, :synthetic.REAL_HIDDEN], embeddings["real"])
    int4_cos = _cosine(embeddings["int4"], embeddings["float"])
    return {"config": {**config.__dict__, "hidden": config.hidden, "heads": config.heads, "layers": config.layers,
                       "intermediate": config.intermediate},
            "params": config.params(), "analysis": analysis, "optimize_report": json.loads(report.read_text()),
            "files": {"float": _files(model), "int4": _files(int4)}, "steps": steps,
            "fidelity": {"sentences": args.sentences, "int4_vs_float": _summary(int4_cos),
                         "float_vs_real_mpnet": _summary(real)}}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _summary(cosine: np.ndarray) -> dict[str, Any]:
    return {"cosine": [float(c) for c in cosine], "mean": float(np.mean(cosine)), "min": float(np.min(cosine))}


def _json_tail(log: Path) -> dict[str, Any]:
    text = log.read_text()
    return json.loads(text[text.index("{"):])


def _files(path: Path) -> dict[str, int]:
    from onnxcompress.model import file_bytes

    return {"model_file": path.stat().st_size, "total": file_bytes(path)}


def render(data: dict[str, Any]) -> str:
    gib, m = 2**30, data["machine"]
    c, files, f, rep = data["config"], data["files"], data["fidelity"], data["optimize_report"]
    quantize_s = next(p["seconds"] for p in rep["passes"] if p["name"] == "quantize-weight-only")
    rows = [[s["step"], f"{s['wall_s']:.0f} s", f"{s['peak_rss'] / gib:.2f} GiB", f"{s['peak_anon'] / gib:.2f} GiB",
             f"{s['peak_file'] / gib:.2f} GiB"] for s in data["steps"]]
    return "\n".join([
        "# A 1.45 B-parameter model through analyze, weight-only int4 and verification", "",
        f"Machine: {m['cpu']} ({', '.join(k for k, v in m['cpu_flags'].items() if v)}), {m['logical_cores']} cores, "
        f"{m['memory_gib']:.0f} GiB RAM shared with other jobs, no swap; onnxruntime {m['onnxruntime']}, "
        f"onnx {m['onnx']}, python {m['python']}; onnxcompress at {m['onnxcompress_commit']}.", "",
        f"Model: all-mpnet-base-v2 widened {c['width']}x (`benchmarks/real/synthetic_mpnet.py`): MPNet's graph "
        f"at hidden "
        f"{c['hidden']}, {c['heads']} heads, FFN {c['intermediate']}, {c['layers']} layers, opset 17; weights drawn "
        f"tensor by tensor from the real model's so that it computes the real embeddings (each MatMul weight is the "
        f"real one spread over {c['width']} copies of its input channels plus zero-sum noise resampled from the real "
        f"tensor's entries and outlier channels, variance of a {c['width']}x wider trained layer). "
        f"{data['params'] / 1e9:.3f} B parameters, float32: {files['float']['total'] / gib:.2f} GiB on disk "
        f"({files['float']['model_file'] / 2**20:.2f} MiB graph + external data). int4 output: "
        f"{files['int4']['total'] / gib:.2f} GiB.", "",
        "Each step is a child process: wall time, peak RSS (ru_maxrss) and the peaks of its anonymous and "
        "file-backed resident memory (sampled every 0.1 s; memory-mapped weights are file-backed, which the kernel "
        "can drop under pressure). `optimize` verifies after every pass (onnx.checker, an ORT session, outputs "
        "against the input model's on 4 random inputs at sequence 128) and writes the output.", "",
        markdown_table(["step", "wall", "peak RSS", "peak anonymous", "peak file-backed"], rows), "",
        f"Fidelity on {f['sentences']} real sentences (corpus evaluation split, mpnet's tokenizer, one sentence a run, "
        f"ORT CPU): int4 (RTN, blocks of 32, asymmetric, MatMulNBits accuracy level 4) against the float model: cosine "
        f"mean {f['int4_vs_float']['mean']:.4f}, min {f['int4_vs_float']['min']:.4f}; the float model against the "
        f"real all-mpnet-base-v2: cosine mean {f['float_vs_real_mpnet']['mean']:.7f}, min "
        f"{f['float_vs_real_mpnet']['min']:.7f}. The pipeline's own check (4 random-token inputs at sequence 128, "
        f"in the report) gives cosine {rep['fidelity']['cosine']:.2f}: random ids are not text. The quantize pass itself "
        f"took {quantize_s:.0f} s of optimize's wall time; the rest is verification (the reference, the float noise "
        f"before the exact cleanup passes and a check after each of the 4 passes: an ORT session on the float model "
        f"and 4 runs at sequence 128 each) and writing the output.", "",
        "Reproduce (about 6 GB in the folder): `" + data["command"] + "`", ""])


def machine() -> dict[str, Any]:
    from real.weight_only import machine as base

    info = base()
    info["memory_gib"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="step")
    build = sub.add_parser("_build")
    build.add_argument("path")
    embed = sub.add_parser("_embed")
    embed.add_argument("path")
    embed.add_argument("out")
    sub.add_parser("_render", help="write results/<--results>.md again from its .json")
    for p in (parser, build):
        p.add_argument("--width", type=int, default=4, help="hidden 768 x width (4: 1.45 B parameters)")
        p.add_argument("--seed", type=int, default=0)
    for p in (parser, embed):
        p.add_argument("--sentences", type=int, default=8)
    parser.add_argument("--folder", default="/tmp/big")
    parser.add_argument("--results", default="big_model", help="results/<name>.{md,json}; empty: none written")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step == "_build":
        build_step(args)
    elif args.step == "_embed":
        embed_step(args)
    elif args.step == "_render":
        data = json.loads((RESULTS / f"{args.results}.json").read_text())
        write_results(RESULTS, args.results, data, render(data))
    else:
        data = run(args)
        data["machine"] = machine()
        data["command"] = "python benchmarks/real/big_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
        text = render(data)
        if args.results:
            write_results(RESULTS, args.results, data, text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

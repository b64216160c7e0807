"""Models saved with external data go through analyze and weight-only int4 (verified after every pass)
without holding their weights in memory several times over.

A 96 MiB MLP with its weights in `model.onnx.data` runs through the CLI in a child process; the
child first runs the same command on a tiny model (imports, ORT's first session), then on the real
one, and reports how far its peak RSS rose above what it had after the warm-up. ONNX Runtime's own
session on the float model (its prepacked copy of the weights) is one weight-size; before weights
were read one at a time (weight-only quantization), nudged lazily and run from a file (the float
noise) and run from the input's own file (the reference), optimize rose by 4.2x the weight bytes
on this model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxcompress as oc

HIDDEN, LAYERS = 1024, 24  # 24 float32 weights of 1024 x 1024: 96 MiB
#: Peak RSS growth of `optimize --quantize int4` over the weight bytes (measured 1.17x, ORT's
#: prepacked float session the largest part; 4.2x before).
OPTIMIZE_GROWTH = 1.5
#: `analyze` reads no weight (measured 0.02x).
ANALYZE_GROWTH = 0.25
#: int4 (blocks of 32, round-to-nearest) against float on this random residual MLP: cosine of the
#: outputs (measured 0.9974).
MIN_COSINE = 0.99

CHILD = r"""
import json, resource, sys
from pathlib import Path
from onnxcompress.cli import app

def run(args):
    try:
        app(args, standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise

def rss(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

warm, real = json.loads(sys.argv[1]), json.loads(sys.argv[2])
run(warm)
base = rss("VmRSS")
run(real)
print(json.dumps({"base": base, "peak": rss("VmHWM")}))
"""


def _mlp(path: Path, hidden: int, layers: int) -> Path:
    """x + relu(x W_i + b_i), `layers` times, float32 weights saved as external data."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", shape=ir.Shape([1, 16, hidden]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], name="mlp", opset_imports={"": 17})
    current = x
    for i in range(layers):
        w = rng.standard_normal((hidden, hidden), dtype=np.float32) / np.float32(np.sqrt(hidden))
        values = []
        for name, array in ((f"w{i}", w), (f"b{i}", np.zeros(hidden, np.float32))):
            value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                             const_value=ir.tensor(array, name=name))
            graph.register_initializer(value)
            values.append(value)
        nodes = [ir.node("MatMul", [current, values[0]], name=f"mm{i}")]
        nodes.append(ir.node("Add", [nodes[-1].outputs[0], values[1]], name=f"add{i}"))
        nodes.append(ir.node("Relu", [nodes[-1].outputs[0]], name=f"relu{i}"))
        nodes.append(ir.node("Add", [current, nodes[-1].outputs[0]], name=f"res{i}"))
        for n in nodes:
            n.outputs[0].name = f"{n.name}_out"
            graph.append(n)
        current = nodes[-1].outputs[0]
    current.shape, current.type = ir.Shape([1, 16, hidden]), ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(current)
    return oc.save(ir.Model(graph, ir_version=8), path, external_data=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("large")
    return _mlp(folder / "tiny.onnx", 64, 2), _mlp(folder / "model.onnx", HIDDEN, LAYERS)


def _growth(command: list[str], warm: list[str], weights: int) -> float:
    paths = [str(Path(oc.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]  # this checkout's package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(warm), json.dumps(command)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    return (rss["peak"] - rss["base"]) / weights


def test_the_model_keeps_its_weights_outside(models):
    _, model = models
    assert model.stat().st_size < 2**20 and (model.parent / "model.onnx.data").stat().st_size >= 96 * 2**20


def test_analyze_reads_no_weights(models):
    tiny, model = models
    weights = (model.parent / "model.onnx.data").stat().st_size
    growth = _growth(["analyze", str(model), "--json"], ["analyze", str(tiny), "--json"], weights)
    assert growth < ANALYZE_GROWTH, f"analyze rose by {growth:.2f}x the weight bytes"


def test_weight_only_int4_streams_the_weights(models):
    tiny, model = models
    weights = (model.parent / "model.onnx.data").stat().st_size
    out = model.parent / "model.int4.onnx"

    def args(source: Path, target: Path) -> list[str]:
        return ["optimize", str(source), "-o", str(target), "--quantize", "int4", "--bench-runs", "0"]

    growth = _growth(args(model, out), args(tiny, model.parent / "tiny.int4.onnx"), weights)
    assert growth < OPTIMIZE_GROWTH, f"optimize --quantize int4 rose by {growth:.2f}x the weight bytes"

    feeds = {"x": np.random.default_rng(1).standard_normal((1, 16, HIDDEN), dtype=np.float32)}
    reference = ort.InferenceSession(str(model)).run(None, feeds)[0].ravel()
    got = ort.InferenceSession(str(out)).run(None, feeds)[0].ravel()
    cosine = float(np.dot(reference, got) / (np.linalg.norm(reference) * np.linalg.norm(got)))
    assert cosine >= MIN_COSINE
    assert out.stat().st_size < weights / 5  # int4 codes and scales, self-contained

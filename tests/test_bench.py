"""Benchmark: statistics, interleaving, MAC ratios, batch handling, providers, JSON, plots, profiling.

No test asserts wall-clock speed: timings are checked for consistency (p90 >= median >= min) and,
with an injected clock, for exact statistics and A B A B order.
"""

from __future__ import annotations

import json
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.analysis.cost import analyze_cost
from onnxcompress.bench import (
    CPU_FLAGS_OF_INTEREST,
    INT_INPUT_HIGH,
    MIN_RUNS,
    SPINNING_NOTE,
    BenchOptions,
    BenchProgress,
    KernelTime,
    benchmark,
    kernel_times,
    map_layers,
    parse_batch_sizes,
    physical_cores,
    render,
    render_table,
)
from onnxcompress.bench.candidates import random_feeds, with_symbolic_batch
from onnxcompress.errors import InputShapeError, OnnxCompressError, ProviderUnavailableError
from onnxcompress.model import load
from onnxcompress.plots import plot_speedups

RUNS = MIN_RUNS
#: Ratios computed by the report and recomputed here from the same numbers.
RATIO_RTOL = 1e-12
#: float32 rounding of a tiny conv net run at batch 4 against one sample at a time.
OUTPUT_ATOL = 1e-5
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPATIAL = 8
CLASSES = 10
OPSET = 18


def conv_net(channels: int, batch: int | str = "N", seed: int = 0) -> onnx.ModelProto:
    """x[batch,3,8,8] -> Conv 3x3 (channels) -> Relu -> global mean -> MatMul (classes)."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((channels, CLASSES)).astype(np.float32), "M"),
        numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu0"),
        helper.make_node("ReduceMean", ["r", "axes"], ["p"], name="pool", keepdims=0),
        helper.make_node("MatMul", ["p", "M"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        f"conv{channels}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, SPATIAL, SPATIAL])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, CLASSES])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def flatten_net(head: str) -> onnx.ModelProto:
    """Static batch 1 with a Reshape to [1, -1]: at another batch the head either fails or runs wrongly.

    head="matmul": MatMul needs 48 features and gets 48 x batch (ORT fails);
    head="relu": runs at any batch but returns [1, 48 x batch] (the batch is silently folded in).
    """
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape")]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["f"], name="flatten")]
    if head == "matmul":
        weights.append(numpy_helper.from_array(rng.standard_normal((48, CLASSES)).astype(np.float32), "M"))
        nodes.append(helper.make_node("MatMul", ["f", "M"], ["y"], name="fc"))
        out_shape = [1, CLASSES]
    else:
        nodes.append(helper.make_node("Relu", ["f"], ["y"], name="relu"))
        out_shape = [1, 48]
    graph = helper.make_graph(
        nodes,
        f"flatten_{head}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def embedding_net(rows: int) -> onnx.ModelProto:
    """ids[N, 5] (int64) -> Gather from a [rows, 4] table: ids outside [-rows, rows) make ORT fail."""
    table = numpy_helper.from_array(np.arange(rows * 4, dtype=np.float32).reshape(rows, 4), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="lookup")],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 4])],
        [table],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def independent_costs(model: onnx.ModelProto, batch: int):
    return analyze_cost(load(model), {"x": (batch, 3, SPATIAL, SPATIAL)})


@pytest.fixture(scope="module")
def pair_report():
    """A wide baseline and a narrow model, dynamic batch, at batches 1 and 3, profiled."""
    models = [("wide", conv_net(32)), ("narrow", conv_net(8, seed=1))]
    return benchmark(models, BenchOptions(runs=RUNS, batch_sizes=(1, 3), profile=True, profile_runs=3, threads=1))


# ------------------------------------------------------------------------------------ options


def test_runs_below_minimum_are_rejected():
    with pytest.raises(OnnxCompressError, match=f"at least {MIN_RUNS}"):
        BenchOptions(runs=MIN_RUNS - 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"provider": "tpu"}, "unknown provider"),
        ({"batch_sizes": ()}, "batch sizes"),
        ({"batch_sizes": (1, 0)}, "batch sizes"),
        ({"threads": 0}, "threads"),
        ({"warmup": -1}, "warmup"),
    ],
)
def test_bad_options_give_one_line_errors(kwargs, message):
    with pytest.raises(OnnxCompressError, match=message) as info:
        BenchOptions(**kwargs)
    assert "\n" not in str(info.value)


def test_parse_batch_sizes():
    assert parse_batch_sizes("1,8") == (1, 8)
    assert parse_batch_sizes("4") == (4,)
    with pytest.raises(OnnxCompressError, match="bad batch sizes"):
        parse_batch_sizes("1,-2")


def test_no_models_and_unknown_inputs_are_user_errors():
    with pytest.raises(OnnxCompressError, match="at least one model"):
        benchmark([], BenchOptions(runs=RUNS))
    with pytest.raises(InputShapeError, match="unknown input 'image'"):
        benchmark([conv_net(4)], BenchOptions(runs=RUNS, input_shapes={"image": (1, 3, 8, 8)}))


def test_unavailable_provider_raises(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ProviderUnavailableError) as info:
        benchmark([conv_net(4)], BenchOptions(runs=RUNS, provider="cuda"))
    message = str(info.value)
    assert "\n" not in message
    assert "CUDAExecutionProvider" in message and "available: CPUExecutionProvider" in message
    assert "pip install onnxcompress[gpu]" in message


def test_gpu_fallback_to_cpu_is_visible(monkeypatch):
    """A session that ORT puts on the CPU although CUDA was asked for: the row and table say so."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a real CUDA provider; the fallback cannot be provoked")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        report = benchmark([conv_net(4)], BenchOptions(runs=RUNS, provider="cuda"))
    assert report.environment.requested_providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert report.rows[0].providers == ("CPUExecutionProvider",)
    assert "runs on CPUExecutionProvider" in _text(render_table(report))


def _text(*renderables) -> str:
    from rich.console import Console

    console = Console(width=300, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    for item in renderables:
        console.print(item)
    return console.export_text()


# ----------------------------------------------------------------------------- timing protocol


class SteppingClock:
    """A fake `perf_counter`: every second call returns the previous one plus the next duration.

    Durations are multiples of 2**-10 s, so end - start is exact in floating point.
    """

    def __init__(self, durations):
        self.durations = list(durations)
        self.calls = 0
        self.now = 0.0

    def __call__(self) -> float:
        self.now += self.durations[self.calls // 2] if self.calls % 2 else 1.0
        self.calls += 1
        return self.now


def test_interleaved_runs_and_statistics_with_injected_clock():
    durations = np.random.default_rng(7).integers(1, 1000, size=2 * RUNS) / 1024
    clock = SteppingClock(durations)
    events: list[BenchProgress] = []
    report = benchmark(
        [("A", conv_net(8)), ("B", conv_net(4))], BenchOptions(runs=RUNS, warmup=2), events.append, clock=clock
    )
    # Exactly two clock reads per timed run, and the runs alternate A B A B ...
    assert clock.calls == 2 * 2 * RUNS
    assert [e.model for e in events] == ["A", "B"] * RUNS
    assert [e.done for e in events] == list(range(1, 2 * RUNS + 1))
    assert all(e.total == 2 * RUNS for e in events)
    # So A got durations 0, 2, 4, ... and B got 1, 3, 5, ...
    for label, mine in (("A", durations[0::2]), ("B", durations[1::2])):
        timing = report.row(label, 1).timing
        ms = mine * 1e3
        assert timing.runs == RUNS
        assert timing.median_ms == pytest.approx(np.median(ms), rel=RATIO_RTOL)
        assert timing.p90_ms == pytest.approx(np.percentile(ms, 90), rel=RATIO_RTOL)
        assert timing.mean_ms == pytest.approx(ms.mean(), rel=RATIO_RTOL)
        assert timing.min_ms == pytest.approx(ms.min(), rel=RATIO_RTOL)
        assert timing.max_ms == pytest.approx(ms.max(), rel=RATIO_RTOL)
        assert timing.stdev_ms == pytest.approx(ms.std(ddof=1), rel=RATIO_RTOL)
    measured = report.row("B", 1).measured_speedup
    assert measured == pytest.approx(np.median(durations[0::2]) / np.median(durations[1::2]), rel=RATIO_RTOL)


def test_real_timings_are_consistent(pair_report):
    for row in pair_report.rows:
        t = row.timing
        assert row.supported and t.runs == RUNS
        assert t.max_ms >= t.p90_ms >= t.median_ms >= t.min_ms > 0
        assert t.max_ms >= t.mean_ms >= t.min_ms


# ------------------------------------------------------------------------------- comparisons


def test_mac_ratio_and_realization_match_independent_costs(pair_report):
    for batch in (1, 3):
        wide, narrow = pair_report.row("wide", batch), pair_report.row("narrow", batch)
        wide_macs = independent_costs(conv_net(32), batch).stats.macs
        narrow_macs = independent_costs(conv_net(8, seed=1), batch).stats.macs
        assert (wide.macs, narrow.macs) == (wide_macs, narrow_macs)
        assert narrow.theoretical_speedup == pytest.approx(wide_macs / narrow_macs, rel=RATIO_RTOL)
        assert narrow.measured_speedup == pytest.approx(wide.timing.median_ms / narrow.timing.median_ms, rel=RATIO_RTOL)
        assert narrow.realization == pytest.approx(narrow.measured_speedup / narrow.theoretical_speedup, rel=RATIO_RTOL)
        # The baseline against itself.
        assert wide.theoretical_speedup == wide.measured_speedup == wide.realization == 1.0


def test_static_batch_is_rewritten_and_costed_at_the_new_batch():
    model = conv_net(8, batch=1)
    report = benchmark([model], BenchOptions(runs=RUNS, batch_sizes=(1, 4)))
    one, four = report.row("conv8", 1), report.row("conv8", 4)
    assert one.supported and four.supported
    assert not one.batch_rewritten and four.batch_rewritten
    assert one.input_shapes == {"x": (1, 3, SPATIAL, SPATIAL)} and four.input_shapes == {"x": (4, 3, SPATIAL, SPATIAL)}
    assert four.macs == 4 * one.macs


def test_batch_rewrite_computes_the_same_outputs_per_sample():
    model = load(conv_net(8, batch=1))
    rewritten, batched_outputs = with_symbolic_batch(model, ["x"])
    assert batched_outputs == {"y"}
    from onnxcompress.model import to_proto

    x = np.random.default_rng(3).standard_normal((4, 3, SPATIAL, SPATIAL)).astype(np.float32)
    original = ort.InferenceSession(to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    batched = ort.InferenceSession(to_proto(rewritten).SerializeToString(), providers=["CPUExecutionProvider"])
    (together,) = batched.run(None, {"x": x})
    one_by_one = np.concatenate([original.run(None, {"x": x[i : i + 1]})[0] for i in range(4)])
    np.testing.assert_allclose(together, one_by_one, atol=OUTPUT_ATOL)


@pytest.mark.parametrize("head", ["matmul", "relu"])
def test_hard_coded_batch_is_recorded_not_raised(head):
    events: list[BenchProgress] = []
    models = [("fixed", flatten_net(head)), ("dynamic", conv_net(4))]
    report = benchmark(models, BenchOptions(runs=RUNS, batch_sizes=(1, 2)), events.append)
    assert report.row("fixed", 1).supported
    fixed = report.row("fixed", 2)
    assert not fixed.supported and fixed.timing is None and fixed.batch_rewritten
    assert "\n" not in fixed.reason and "batch 2" in fixed.reason
    if head == "relu":  # it ran, but folded the batch into the features
        assert "hard-codes its batch size" in fixed.reason
    # The other model is still timed; with no baseline at batch 2 there is nothing to compare with.
    dynamic = report.row("dynamic", 2)
    assert dynamic.supported and dynamic.timing.runs == RUNS
    assert dynamic.measured_speedup is None and dynamic.theoretical_speedup is None
    assert events[-1].done == events[-1].total == 3 * RUNS
    assert "unsupported" in _text(render_table(report))


def square_net(with_det: bool) -> onnx.ModelProto:
    """x[N,4,4] -> MatMul, then optionally Det (an op analysis.cost has no rule for)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m" if with_det else "y"], name="mm")]
    if with_det:
        nodes.append(helper.make_node("Det", ["m"], ["y"], name="det"))
    graph = helper.make_graph(
        nodes,
        "square",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def test_incomplete_costs_give_no_theoretical_speedup():
    """A MAC count that leaves out nodes is a lower bound: a ratio of lower bounds is not reported."""
    costs = analyze_cost(load(square_net(with_det=True)), {"x": (1, 4, 4)})
    assert not all(node.known for node in costs.nodes), "Det has a cost rule now: pick an op without one"
    report = benchmark([("plain", square_net(False)), ("det", square_net(True))], BenchOptions(runs=RUNS))
    row = report.row("det", 1)
    assert row.supported and row.measured_speedup is not None
    assert row.macs == costs.stats.macs
    assert row.theoretical_speedup is None and row.realization is None
    assert "Det" in row.cost_note


def test_integer_inputs_are_small_non_negative_and_seeded():
    model = load(embedding_net(rows=INT_INPUT_HIGH))
    feeds = random_feeds(model, {"ids": (3, 5)}, seed=5, batch=3)
    ids = feeds["ids"]
    assert ids.dtype == np.int64 and ids.shape == (3, 5)
    assert ids.min() >= 0 and ids.max() < INT_INPUT_HIGH
    np.testing.assert_array_equal(ids, random_feeds(model, {"ids": (3, 5)}, seed=5, batch=3)["ids"])
    # Values fit the smallest table they could index, so such a model runs.
    report = benchmark([embedding_net(rows=INT_INPUT_HIGH)], BenchOptions(runs=RUNS, batch_sizes=(2,)))
    assert report.rows[0].supported


def test_labels_from_paths_and_duplicates(tmp_path):
    path = tmp_path / "resnet_pruned.onnx"
    onnx.save(conv_net(4), path)
    report = benchmark([path, conv_net(4), conv_net(4)], BenchOptions(runs=RUNS))
    assert report.models == ("resnet_pruned", "conv4", "conv4#2")
    assert report.baseline == "resnet_pruned"


# ----------------------------------------------------------------------------- report output


ROW_KEYS = {
    "model", "batch", "supported", "reason", "input_shapes", "batch_rewritten", "providers", "timing", "macs",
    "theoretical_speedup", "measured_speedup", "realization", "cost_note", "layers",
}  # fmt: skip
TIMING_KEYS = {"median_ms", "p90_ms", "mean_ms", "min_ms", "max_ms", "stdev_ms", "runs"}
LAYER_KEYS = {
    "kernel", "op_name", "nodes", "match", "time_ms", "macs", "gmacs_per_s", "provider",
    "theoretical_speedup", "measured_speedup", "realization",
}  # fmt: skip


def test_json_round_trips_with_documented_keys(pair_report):
    data = json.loads(pair_report.to_json())
    assert set(data) == {"baseline", "models", "options", "environment", "rows", "notes"}
    assert data["baseline"] == "wide" and data["models"] == ["wide", "narrow"]
    assert data["options"]["runs"] == RUNS and data["options"]["batch_sizes"] == [1, 3]
    env = data["environment"]
    assert env["allow_spinning"] == "0" and env["threads"] == 1 and env["inter_op_threads"] == 1
    assert env["onnxruntime"] == ort.__version__ and env["onnx"] == onnx.__version__
    assert set(env["cpu_flags"]) <= set(CPU_FLAGS_OF_INTEREST)
    assert 1 <= env["physical_cores"] <= env["logical_cores"]
    assert SPINNING_NOTE in data["notes"]
    assert len(data["rows"]) == 4
    for row, original in zip(data["rows"], pair_report.rows, strict=True):
        assert set(row) == ROW_KEYS and set(row["timing"]) == TIMING_KEYS
        assert row["timing"]["median_ms"] == original.timing.median_ms
        assert row["input_shapes"]["x"] == list(original.input_shapes["x"])
        assert row["layers"] and all(set(layer) == LAYER_KEYS for layer in row["layers"])


def test_default_threads_are_the_physical_cores():
    report = benchmark([conv_net(4)], BenchOptions(runs=RUNS))
    assert report.environment.threads == physical_cores() == report.environment.physical_cores


def test_rendered_tables_show_every_row(pair_report):
    text = _text(*render(pair_report))
    for column in ("median ms", "p90 ms", "MACs", "theoretical x", "measured x", "realization"):
        assert column in text
    assert "allow_spinning=0" in text
    assert text.count("narrow") >= 2 and "Layers: narrow at batch 3" in text


def test_plot_writes_a_png(pair_report, tmp_path):
    path = plot_speedups(pair_report, tmp_path / "speedups.png")
    data = path.read_bytes()
    assert len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC)


def test_plot_without_matplotlib_says_how_to_get_it(pair_report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(OnnxCompressError, match=r"onnxcompress\[plot\]"):
        plot_speedups(pair_report, tmp_path / "speedups.png")


# ---------------------------------------------------------------------------------- profiling


def test_profile_maps_conv_and_matmul_to_their_macs(pair_report):
    for batch in (1, 3):
        costs = {n.name: n.macs for n in independent_costs(conv_net(32), batch).nodes}
        row = pair_report.row("wide", batch)
        by_node = {name: layer for layer in row.layers for name in layer.nodes}
        for node in ("conv0", "fc"):
            layer = by_node[node]
            assert layer.match in ("exact", "renamed") and costs[node] > 0
            assert layer.macs == sum(costs[n] for n in layer.nodes)
            assert layer.gmacs_per_s == pytest.approx(layer.macs / (layer.time_ms * 1e-3) / 1e9, rel=RATIO_RTOL)
        # Every MAC is accounted for exactly once: no node in two layers, layer MACs sum to the model's.
        names = [name for layer in row.layers for name in layer.nodes]
        assert len(names) == len(set(names))
        assert sum(layer.macs or 0 for layer in row.layers) == row.macs


def residual_block(add_order: tuple[str, str]) -> onnx.ModelProto:
    """stem Conv+Relu, then main Conv and a 1x1 projection Conv joined by Add+Relu (ORT fuses these)."""
    rng = np.random.default_rng(0)
    shapes = {"W0": (16, 8, 3, 3), "W1": (32, 16, 3, 3), "Wd": (32, 8, 1, 1)}
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [
        helper.make_node("Conv", ["x", "W0"], ["a"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="stem_relu"),
        helper.make_node("Conv", ["ar", "W1"], ["m"], name="main", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "Wd"], ["d"], name="down"),
        helper.make_node("Add", list(add_order), ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["y"], name="out_relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, SPATIAL, SPATIAL])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, SPATIAL, SPATIAL])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


@pytest.mark.parametrize("add_order", [("m", "d"), ("d", "m")])
def test_profile_gives_each_conv_of_a_residual_block_its_own_kernel(add_order):
    """Whatever ORT fuses or renames, each Conv is timed by one kernel and every MAC is counted once."""
    model = residual_block(add_order)
    report = benchmark([model], BenchOptions(runs=RUNS, profile=True, profile_runs=2))
    row = report.rows[0]
    costs = {n.name: n.macs for n in analyze_cost(load(model), {"x": (1, 8, SPATIAL, SPATIAL)}).nodes}
    by_node = {name: layer for layer in row.layers for name in layer.nodes}
    kernels = [by_node[conv].kernel for conv in ("stem", "main", "down")]
    assert None not in kernels and len(set(kernels)) == 3
    for conv in ("stem", "main", "down"):
        assert by_node[conv].macs == sum(costs[n] for n in by_node[conv].nodes)
    assert sum(layer.macs or 0 for layer in row.layers) == row.macs == sum(costs.values())


def test_per_layer_realization_against_the_baseline(pair_report):
    base = {layer.kernel: layer for layer in pair_report.row("wide", 3).layers}
    compared = [layer for layer in pair_report.row("narrow", 3).layers if layer.realization is not None]
    assert compared  # conv0 and fc have MACs in both models
    for layer in compared:
        assert layer.measured_speedup == pytest.approx(base[layer.kernel].time_ms / layer.time_ms, rel=RATIO_RTOL)
        assert layer.theoretical_speedup == pytest.approx(base[layer.kernel].macs / layer.macs, rel=RATIO_RTOL)
        assert layer.realization == pytest.approx(layer.measured_speedup / layer.theoretical_speedup, rel=RATIO_RTOL)


def test_profile_files_are_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    benchmark([conv_net(4)], BenchOptions(runs=RUNS, profile=True, profile_runs=2))
    assert list(tmp_path.iterdir()) == []


def _event(cat: str, name: str, ts: float, dur: float, op: str | None = None) -> dict:
    args = {"op_name": op, "provider": "CPUExecutionProvider"} if op else {}
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "ph": "X", "args": args}


def test_kernel_names_ort_made_up_are_traced_back_to_model_nodes():
    """ORT's names for fused kernels: '<output value>_nchwc' and 'fused <node>/<Pattern>Fusion'."""
    weights = [
        numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "W"),
        numpy_helper.from_array(np.zeros((144, 2), np.float32), "M"),
        numpy_helper.from_array(np.zeros(2, np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv0"),
        helper.make_node("Relu", ["c"], ["r"], name="relu0"),
        helper.make_node("Conv", ["x", "W"], ["side"], name="conv_side"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "M"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "b"], ["y"], name="fc_bias"),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "side")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph(nodes, "g", [x], outputs, weights)
    model = load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))
    node_macs = {"conv0": 1000, "relu0": 0, "conv_side": 300, "flat": 0, "fc": 50, "fc_bias": 0}
    fused_fc = "fused fc/MatMulAddFusion"
    per_run = {"r_nchwc": [10, 30, 20], "ReorderOutput": [1, 1, 4], "flat": [2, 2, 2], fused_fc: [5, 7, 6]}
    ops = {"r_nchwc": "Conv", "ReorderOutput": "ReorderOutput", "flat": "Flatten", fused_fc: "FusedGemm"}
    events = []
    for run in range(-1, 3):  # run -1 is a warm-up run with huge times that must be left out
        start = 1000 * (run + 1)
        for offset, (kernel, times) in enumerate(per_run.items()):
            dur = 10_000 if run < 0 else times[run]
            events.append(_event("Node", f"{kernel}_kernel_time", start + 10 * offset + 1, dur, ops[kernel]))
        events.append(_event("Session", "model_run", start, 900))
    kernels = kernel_times(events, runs=3)
    assert [k.name for k in kernels] == list(per_run)
    assert all(isinstance(k, KernelTime) and len(k.per_run_us) == 3 for k in kernels)
    layers = {layer.kernel: layer for layer in map_layers(kernels, model, node_macs)}
    assert layers["r_nchwc"].nodes == ("conv0", "relu0") and layers["r_nchwc"].match == "renamed"
    assert layers["r_nchwc"].time_ms == pytest.approx(np.median(per_run["r_nchwc"]) / 1e3, rel=RATIO_RTOL)
    assert layers["r_nchwc"].macs == node_macs["conv0"] + node_macs["relu0"]
    assert layers[fused_fc].nodes == ("fc",) and layers[fused_fc].macs == node_macs["fc"]
    assert layers["flat"].match == "exact" and layers["flat"].macs == 0 and layers["flat"].gmacs_per_s is None
    assert layers["ReorderOutput"].match == "unmatched" and layers["ReorderOutput"].macs is None
    # conv_side ran in no kernel of its own: listed as absorbed with its MACs, no time.
    absorbed = layers[None]
    assert absorbed.nodes == ("conv_side",) and absorbed.match == "absorbed" and absorbed.time_ms is None
    assert absorbed.macs == node_macs["conv_side"]
    assert sum(layer.macs or 0 for layer in layers.values()) == sum(node_macs.values())


def test_a_factorized_layer_is_compared_as_a_whole():
    """Factorization turns `proj` into `proj_lowrank` then `proj`: per-layer speedup sums both halves."""
    from onnxcompress.passes import Factorize
    from onnxcompress.pipeline import PassContext

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(256, 256)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 256])], [w])
    original = load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    factored = load(original)
    Factorize(rank_ratio=0.25, round_to=8).run(factored, PassContext(model=factored))
    assert {n.name for n in factored.graph} == {"proj", "proj_lowrank"}
    report = benchmark([("base", original), ("lowrank", factored)], BenchOptions(runs=20, profile=True))
    layers = [layer for layer in report.row("lowrank", 1).layers if layer.kernel in ("proj", "proj_lowrank")]
    assert len(layers) == 2
    # Rank 64 of 256: 256x64 + 64x256 MACs per row instead of 256x256, exactly half, whatever the batch.
    assert [layer.theoretical_speedup for layer in layers] == [pytest.approx(2.0)] * 2
    assert layers[0].measured_speedup == layers[1].measured_speedup  # one comparison for the pair

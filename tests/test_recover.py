"""Recovery after channel pruning: bias compensation is exact for constant removed inputs, the ridge
refit is least squares, it helps on held-out data and never hurts a layer there, and the report's
held-out fidelity is what an outsider measures."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import model as M
from onnxcompress.analysis.channels import ChannelGraph, prepare
from onnxcompress.calibration import Calibration
from onnxcompress.passes import PruneChannels
from onnxcompress.passes.recover import HOLDOUT, SMALL_CALIBRATION, recover
from onnxcompress.pipeline import Pipeline
from onnxcompress.verify import compare, outputs
from tests.graphs import OPSET, conv_bn_relu_gemm

#: Compensated vs original when the removed inputs are constant: equal up to float32 rounding.
EXACT_RTOL = 1e-6
#: Refit weights (stored as float32) vs numpy.linalg.lstsq in float64.
LSTSQ_RTOL = 5e-6
#: Held-out SQNR that each recovery step (bias over none, refit over bias) gains on structured data, at least.
MARGIN_DB = 2.0
#: Reported and independently measured held-out fidelity: the same computation, batched differently.
FIDELITY_RTOL = 1e-5
#: The same refit computed through differently cut ORT graphs: equal up to float32 rounding.
SAME_RUN_RTOL = 1e-6
#: Channels of the first layer made constant over the data (zero weights, non-zero bias).
CONSTANT = [1, 5]


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _model(nodes, inits, x_shape, outputs_: dict[str, list]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["N", *v]) for k, v in outputs_.items()], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _first_weights(rng, shape, axis: int) -> np.ndarray:
    """Random weights whose output channels CONSTANT are zero: those channels equal their bias."""
    w = rng.normal(0, 0.5, shape)
    index = [slice(None)] * len(shape)
    index[axis] = CONSTANT
    w[tuple(index)] = 0.0
    return w


def conv_chain(conv2_bias: bool = True, seed: int = 0) -> onnx.ModelProto:
    """x[N,4,6,6] -> Conv 1x1 (8) -> Conv 3x3 unpadded (5) -> y: linear, no border effects."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", _first_weights(rng, (8, 4, 1, 1), 0)), _init("b1", rng.normal(0, 1.5, 8)),
             _init("w2", rng.normal(0, 0.5, (5, 8, 3, 3)))]
    conv2_inputs = ["h", "w2"]
    if conv2_bias:
        inits.append(_init("b2", rng.normal(0, 0.5, 5)))
        conv2_inputs.append("b2")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1"),
             helper.make_node("Conv", conv2_inputs, ["y"], name="conv2")]
    return _model(nodes, inits, (4, 6, 6), {"y": [5, 4, 4]})


def gemm_chain(trans_b: int, alpha: float, beta: float, bias: bool, seed: int = 0) -> onnx.ModelProto:
    """x[N,6] -> Gemm (8 features) -> Gemm(transB, alpha, beta, C or none) -> y[N,5]."""
    rng = np.random.default_rng(seed)
    w2 = rng.normal(0, 0.5, (5, 8) if trans_b else (8, 5))
    inits = [_init("w1", _first_weights(rng, (8, 6), 0)), _init("b1", rng.normal(0, 1.5, 8)), _init("w2", w2)]
    g2_inputs = ["h", "w2"]
    if bias:
        inits.append(_init("b2", rng.normal(0, 0.5, 5)))
        g2_inputs.append("b2")
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="g1", transB=1),
             helper.make_node("Gemm", g2_inputs, ["y"], name="g2", transB=trans_b, alpha=alpha, beta=beta)]
    return _model(nodes, inits, (6,), {"y": [5]})


def matmul_chain(bias_add: bool, consumers: int, seed: int = 0) -> onnx.ModelProto:
    """x[N,3,6] -> MatMul+Add (8) -> MatMul [-> Add] -> y, read by `consumers` nodes (0: y is the output)."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", _first_weights(rng, (6, 8), 1)), _init("b1", rng.normal(0, 1.5, 8)),
             _init("w2", rng.normal(0, 0.5, (8, 5)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["h"], name="add1"),
             helper.make_node("MatMul", ["h", "w2"], ["m2" if bias_add else "y"], name="mm2")]
    if bias_add:
        inits.append(_init("b2", rng.normal(0, 0.5, 5)))
        nodes.append(helper.make_node("Add", ["m2", "b2"], ["y"], name="add2"))
    outs = {"y": [3, 5]}
    if consumers:
        outs = {f"out{i}": [3, 5] for i in range(consumers)}
        ops = ["Relu", "Sigmoid", "Tanh"]
        nodes += [helper.make_node(ops[i], ["y"], [f"out{i}"], name=f"act{i}") for i in range(consumers)]
    return _model(nodes, inits, (3, 6), outs)


def three_convs(seed: int = 0) -> onnx.ModelProto:
    """x[N,4,8,8] -> Conv3x3 (16) -> Relu -> Conv3x3 (16) -> Relu -> Conv1x1 (6) -> y."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", rng.normal(0, 0.3, (16, 4, 3, 3))), _init("b1", rng.normal(0.5, 0.2, 16)),
             _init("w2", rng.normal(0, 0.15, (16, 16, 3, 3))), _init("b2", rng.normal(0.5, 0.2, 16)),
             _init("w3", rng.normal(0, 0.3, (6, 16, 1, 1))), _init("b3", rng.normal(0, 0.2, 6))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="conv3")]
    return _model(nodes, inits, (4, 8, 8), {"y": [6, 8, 8]})


def structured_images(n: int, seed: int = 0, channels: int = 4, size: int = 8) -> np.ndarray:
    """Channels mixed from two smooth latent fields plus a little noise: strongly correlated channels."""
    rng = np.random.default_rng(seed)
    latent = np.cumsum(np.cumsum(rng.normal(size=(n, 2, size, size)), axis=2), axis=3) / size
    mix = rng.normal(size=(channels, 2))
    x = np.einsum("cl,nlhw->nchw", mix, latent) + 0.05 * rng.normal(size=(n, channels, size, size))
    return x.astype(np.float32)


def _calibration(proto: onnx.ModelProto, data: np.ndarray) -> Calibration:
    return Calibration.from_arrays(M.load(proto), {"x": data})


def _prune(proto, calib, **options):
    """Run PruneChannels through the pipeline (which also runs the full checker and ORT)."""
    options = {"round_to": 1, "seed": 0, **options}
    result = Pipeline([PruneChannels(**options)]).run(proto, calibration=calib)
    return result.model, result.report.passes[-1].details


def _max_rel_error(proto, model, data: np.ndarray) -> float:
    feeds = [{"x": data}]
    ref, got = outputs(M.load(proto), feeds, "original")[0], outputs(model, feeds, "pruned")[0]
    return max(float(np.max(np.abs(g - r)) / np.max(np.abs(r))) for r, g in zip(ref, got))


def _removed(details, source: str) -> list[int]:
    return next(g["removed"] for g in details["groups"] if source in g["sources"])


# ------------------------------------------------------------------------------ (a), (c): exact bias compensation


def _assert_compensation_exact(proto, data, source):
    calib = _calibration(proto, data)
    plain, details = _prune(proto, calib, ratio=0.25, recover="none")
    assert _removed(details, source) == CONSTANT  # the constant channels are the weakest ones
    assert _max_rel_error(proto, plain, data) > 0.05  # so pruning alone really changes the outputs
    pruned, details = _prune(proto, calib, ratio=0.25, recover="bias")
    assert _removed(details, source) == CONSTANT
    assert [s["method"] for s in details["recovery"]["sinks"]] == ["bias"]
    assert _max_rel_error(proto, pruned, data) <= EXACT_RTOL
    return pruned


@pytest.mark.parametrize("conv2_bias", [True, False])
def test_bias_compensation_is_exact_for_constant_conv_channels(conv2_bias):
    data = np.random.default_rng(1).normal(size=(80, 4, 6, 6)).astype(np.float32)
    pruned = _assert_compensation_exact(conv_chain(conv2_bias), data, "conv1")
    conv2 = next(n for n in pruned.graph if n.name == "conv2")
    assert conv2.inputs[2].const_value.numpy().shape == (5,)  # created when missing
    assert conv2.inputs[1].const_value.numpy().dtype == np.float32


@pytest.mark.parametrize("trans_b, alpha, beta, bias", [(1, 1.0, 1.0, True), (0, 0.5, 2.0, True), (1, 2.0, 1.0, False)])
def test_bias_compensation_is_exact_for_gemm(trans_b, alpha, beta, bias):
    data = np.random.default_rng(2).normal(size=(80, 6)).astype(np.float32)
    _assert_compensation_exact(gemm_chain(trans_b, alpha, beta, bias), data, "g1")


def test_bias_compensation_is_exact_for_matmul_add():
    data = np.random.default_rng(3).normal(size=(80, 3, 6)).astype(np.float32)
    pruned = _assert_compensation_exact(matmul_chain(bias_add=True, consumers=0), data, "mm1")
    assert sorted(n.op_type for n in pruned.graph) == ["Add", "Add", "MatMul", "MatMul"]  # the bias went into add2


@pytest.mark.parametrize("consumers", [0, 2])
def test_matmul_without_add_gets_one_and_keeps_its_output_name(consumers):
    """The inserted Add takes over the MatMul's output name: graph outputs and consumers are unchanged."""
    proto = matmul_chain(bias_add=False, consumers=consumers)
    data = np.random.default_rng(4).normal(size=(80, 3, 6)).astype(np.float32)
    pruned = _assert_compensation_exact(proto, data, "mm1")
    producer = {v.name: n for n in pruned.graph for v in n.outputs}["y"]
    assert producer.op_type == "Add" and producer.inputs[0].producer().name == "mm2"
    assert [v.name for v in pruned.graph.outputs] == [v.name for v in proto.graph.output]
    assert sorted(user.name for user, _ in producer.outputs[0].uses()) == [f"act{i}" for i in range(consumers)]
    onnx.checker.check_model(M.to_proto(pruned), full_check=True)


# ------------------------------------------------------------------------------ (b): refit helps, never hurts a layer


def test_refit_beats_bias_beats_none_on_held_out_data():
    proto = three_convs()
    calib = _calibration(proto, structured_images(160))
    sqnr = {}
    for mode in ("none", "bias", "refit"):
        model, details = _prune(proto, calib, ratio=0.5, recover=mode)
        if mode == "none":
            held = calib.split(HOLDOUT)[1]
            feeds = list(held.batches(16))
            sqnr[mode] = compare(outputs(M.load(proto), feeds, "o"), outputs(model, feeds, "p"), "held").sqnr_db
            continue
        report = details["recovery"]
        sqnr[mode] = report["fidelity"]["after"]["sqnr_db"]
        assert report["fidelity"]["before"]["sqnr_db"] == pytest.approx(sqnr["none"], rel=FIDELITY_RTOL)
    assert sqnr["refit"] > sqnr["bias"] + MARGIN_DB and sqnr["bias"] > sqnr["none"] + MARGIN_DB, sqnr
    sinks = report["sinks"]
    assert [(s["node"], s["stage"]) for s in sinks] == [("conv2", 0), ("conv3", 1)]  # sequential
    assert all(s["method"] == "refit" and s["ridge"] is not None for s in sinks)
    for s in sinks:  # held-out error per layer: the chosen weights are never worse than not refitting
        assert s["error_after"] <= s["error_before"]
        assert s["rows"] > 0 and s["heldout_rows"] > 0


def test_refit_through_batchnorm_and_a_pooled_classifier_head():
    """conv_bn_relu_gemm: the sinks are a Conv behind BatchNorm+Relu and a Gemm behind GAP+Flatten."""
    proto = conv_bn_relu_gemm(channels=16, batch="N")
    data = np.repeat(np.repeat(np.random.default_rng(8).normal(size=(200, 3, 2, 2)), 4, 2), 4, 3)
    calib = _calibration(proto, (data + 0.1 * np.random.default_rng(9).normal(size=data.shape)).astype(np.float32))
    model, details = _prune(proto, calib, ratio=0.5, recover="refit", calibration_samples=120)
    report = details["recovery"]
    assert report["samples"] == 120 and report["heldout_samples"] == round(120 * HOLDOUT)
    assert [(s["node"], s["method"]) for s in report["sinks"]] == [("conv2", "refit"), ("fc", "refit")]
    assert report["fidelity"]["after"]["sqnr_db"] > report["fidelity"]["before"]["sqnr_db"] + MARGIN_DB
    for name in ("conv2", "fc"):
        node = next(n for n in model.graph if n.name == name)
        assert all(v.const_value.numpy().dtype == np.float32 for v in node.inputs[1:])


def residual_convs(seed: int = 0) -> onnx.ModelProto:
    """x -> Conv3x3 (16) -> Relu = r1 -> Conv3x3 (8) -> Relu -> Conv1x1 (16) -> + r1 -> Relu -> Conv1x1 (6) -> y:
    the skip connection must be carried from the first stage to the third."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", rng.normal(0, 0.3, (16, 4, 3, 3))), _init("b1", rng.normal(0.5, 0.2, 16)),
             _init("w2", rng.normal(0, 0.15, (8, 16, 3, 3))), _init("b2", rng.normal(0.5, 0.2, 8)),
             _init("w3", rng.normal(0, 0.3, (16, 8, 1, 1))), _init("b3", rng.normal(0, 0.2, 16)),
             _init("w4", rng.normal(0, 0.3, (6, 16, 1, 1))), _init("b4", rng.normal(0, 0.2, 6))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
             helper.make_node("Add", ["c3", "r1"], ["s"], name="skip"),
             helper.make_node("Relu", ["s"], ["r3"], name="relu3"),
             helper.make_node("Conv", ["r3", "w4", "b4"], ["y"], name="conv4")]
    return _model(nodes, inits, (4, 8, 8), {"y": [6, 8, 8]})


POSITIONS = 5  # of 64 output positions per sample


def test_activations_kept_between_stages_give_the_same_refit_as_recomputing():
    """Stages run only the nodes between the values kept from earlier stages and their own inputs;
    with no room to keep anything every stage starts from the graph inputs. Both must agree."""
    proto = residual_convs()
    data = structured_images(60, seed=5)
    removed = {"conv1": [0, 3, 9, 12], "conv2": [1, 6]}
    results = []
    for cache_bytes in (1 << 30, 0):
        _, model, report = _recover_directly(proto, removed, data, ridge=(1e-3,), cache_bytes=cache_bytes,
                                             positions_per_sample=POSITIONS)
        results.append((model, report))
    (cached, kept), (recomputed, fresh) = results
    assert [(s["node"], s["stage"], s["method"]) for s in kept["sinks"]] == [
        ("conv2", 0, "refit"), ("conv3", 1, "refit"), ("conv4", 2, "refit")]
    assert all(s["rows"] == POSITIONS * kept["fit_samples"] for s in kept["sinks"])  # sampled positions
    assert kept["stages_over_cache_budget"] == 0 and fresh["stages_over_cache_budget"] > 0
    # Kept values spare reruns: at most every node of both networks once, fewer than from the inputs.
    assert kept["nodes_run"] <= 2 * len(proto.graph.node) < fresh["nodes_run"]
    for name, value in cached.graph.initializers.items():
        a, b = value.const_value.numpy(), recomputed.graph.initializers[name].const_value.numpy()
        np.testing.assert_allclose(a, b, rtol=0, atol=SAME_RUN_RTOL * max(np.abs(b).max(), 1e-30), err_msg=name)


# ------------------------------------------------------------------------------ (d), (e): warnings


def test_small_calibration_is_warned_about():
    proto = conv_chain()
    small = SMALL_CALIBRATION // 2
    data = np.random.default_rng(5).normal(size=(small, 4, 6, 6)).astype(np.float32)
    _, details = _prune(proto, _calibration(proto, data), ratio=0.25, recover="bias")
    assert f"calibration set is small ({small} samples): recovery may overfit" in details["recovery"]["warnings"]
    data = np.random.default_rng(5).normal(size=(SMALL_CALIBRATION, 4, 6, 6)).astype(np.float32)
    _, details = _prune(proto, _calibration(proto, data), ratio=0.25, recover="bias")
    assert details["recovery"]["warnings"] == []


def test_random_calibration_is_warned_about():
    proto = conv_chain()
    calib = Calibration.random(M.load(proto), {"x": (1, 4, 6, 6)}, count=SMALL_CALIBRATION, seed=0)
    _, details = _prune(proto, calib, ratio=0.25, recover="refit")
    assert any("random" in w for w in details["recovery"]["warnings"])


# ------------------------------------------------------------------------------ (f): held-out fidelity


def test_reported_held_out_fidelity_matches_an_independent_measurement():
    proto = three_convs()
    data = structured_images(100, seed=3)
    calib = _calibration(proto, data)
    model, details = _prune(proto, calib, ratio=0.5, recover="refit")
    report = details["recovery"]
    assert json.loads(json.dumps(report)) == report  # stored as is in the JSON report
    n_held = round(len(data) * HOLDOUT)
    assert (report["fit_samples"], report["heldout_samples"]) == (len(data) - n_held, n_held)
    held = [{"x": data[-n_held:]}]  # the held-out samples are the last ones, all in one batch here
    reference = outputs(M.load(proto), held, "original")
    unrecovered, _ = _prune(proto, calib, ratio=0.5, recover="none")
    for key, candidate in (("before", unrecovered), ("after", model)):
        measured = compare(reference, outputs(candidate, held, key), "held")
        reported = report["fidelity"][key]
        assert reported["samples"] == n_held
        for metric in ("sqnr_db", "max_abs_error", "cosine"):
            assert reported[metric] == pytest.approx(getattr(measured, metric), rel=FIDELITY_RTOL), (key, metric)


def test_held_out_samples_are_never_fitted():
    """Bias compensation depends on the fit samples only: other held-out samples give the same weights."""
    proto = three_convs()
    data = structured_images(100, seed=4)
    other = data.copy()
    other[-20:] = structured_images(20, seed=9)
    weights = []
    for d in (data, other):
        model, _ = _prune(proto, _calibration(proto, d), ratio=0.5, recover="bias")
        weights.append({k: v.const_value.numpy() for k, v in model.graph.initializers.items()})
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)


# ------------------------------------------------------------------------------ (g): least squares, exactly


def _recover_directly(proto, removed_channels: dict[str, list[int]], data: np.ndarray, **options):
    """Prune the given channels of each source by hand, then recover (default: plain least squares at
    every output position)."""
    model = prepare(M.load(proto))
    graph = ChannelGraph.build(model, M.resolve_input_shapes(model))
    sources = dict(graph.sources)
    removed = {int(c) for name, channels in removed_channels.items() for c in graph.class_of(sources[name][channels])}
    original = M.load(model)
    sinks = graph.sinks(removed)
    graph.prune(removed)
    options = {"mode": "refit", "ridge": (0.0,), "positions_per_sample": 10**6, "max_rows": 10**9, **options}
    report = recover(original, model, sinks, _calibration(proto, data), **options)
    return original, model, report


def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    rows = np.hstack([x, np.ones((len(x), 1))]).astype(np.float64)
    return np.linalg.lstsq(rows, y.astype(np.float64), rcond=None)[0]


def test_refit_of_a_gemm_is_the_least_squares_solution():
    rng = np.random.default_rng(6)
    w1, b1 = rng.normal(size=(12, 6)).astype(np.float32), rng.normal(0, 0.5, 12).astype(np.float32)
    inits = [_init("w1", w1), _init("b1", b1), _init("w2", rng.normal(size=(4, 12))), _init("b2", rng.normal(size=4))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="g1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="g2", transB=1, alpha=0.5, beta=2.0)]
    proto = _model(nodes, inits, (6,), {"y": [4]})
    data = rng.normal(size=(120, 6)).astype(np.float32)
    drop = [0, 4, 7]
    original, model, report = _recover_directly(proto, {"g1": drop}, data)
    assert report["sinks"][0]["method"] == "refit" and report["sinks"][0]["ridge"] == 0.0
    fit = data[: report["fit_samples"]]
    keep = np.setdiff1d(np.arange(12), drop)
    hidden = np.maximum(fit.astype(np.float64) @ w1.T + b1, 0)
    target = outputs(original, [{"x": fit}], "original")[0][0]
    solution = _lstsq(hidden[:, keep], target)
    g2 = next(n for n in model.graph if n.name == "g2")
    weight = g2.inputs[1].const_value.numpy()
    assert weight.dtype == np.float32 and weight.shape == (4, len(keep))
    assert g2.attributes.get_float("beta", 1.0) == 1.0
    got = np.vstack([0.5 * weight.T, g2.inputs[2].const_value.numpy().reshape(1, -1)])
    np.testing.assert_allclose(got, solution, rtol=0, atol=LSTSQ_RTOL * np.abs(solution).max())


def test_refit_of_a_sequence_matmul_is_the_least_squares_solution():
    """x[N, 3, 6] @ W: every sequence position is a row; the intercept goes into a new Add."""
    rng = np.random.default_rng(10)
    w1, b1 = rng.normal(size=(6, 10)).astype(np.float32), rng.normal(0, 0.5, 10).astype(np.float32)
    inits = [_init("w1", w1), _init("b1", b1), _init("w2", rng.normal(size=(10, 4)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["h"], name="add1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    proto = _model(nodes, inits, (3, 6), {"y": [3, 4]})
    data = rng.normal(size=(60, 3, 6)).astype(np.float32)
    drop = [2, 5, 8]
    original, model, report = _recover_directly(proto, {"mm1": drop}, data)
    fit = data[: report["fit_samples"]]
    keep = np.setdiff1d(np.arange(10), drop)
    hidden = np.maximum(fit.astype(np.float64) @ w1 + b1, 0)[..., keep].reshape(-1, len(keep))
    target = outputs(original, [{"x": fit}], "original")[0][0].reshape(-1, 4)
    assert report["sinks"][0]["rows"] == len(hidden) and report["sinks"][0]["ridge"] == 0.0
    solution = _lstsq(hidden, target)
    mm2 = next(n for n in model.graph if n.name == "mm2")
    add = mm2.outputs[0].uses()[0][0]
    assert add.op_type == "Add" and add.outputs[0].name == "y"
    got = np.vstack([mm2.inputs[1].const_value.numpy(), add.inputs[1].const_value.numpy().reshape(1, -1)])
    np.testing.assert_allclose(got, solution, rtol=0, atol=LSTSQ_RTOL * np.abs(solution).max())
    _, _, sampled = _recover_directly(proto, {"mm1": drop}, data, positions_per_sample=2)
    assert sampled["sinks"][0]["rows"] == 2 * len(fit)  # 2 of the 3 positions of every sample


@pytest.mark.parametrize("attrs, size, pads", [
    ({"strides": [2, 2], "pads": [1, 1, 1, 1]}, 9, ((1, 1), (1, 1))),
    ({"dilations": [2, 2], "pads": [2, 1, 1, 2]}, 9, ((2, 1), (1, 2))),
    # auto_pad, 8 -> 4 with stride 2 and k 3: (4 - 1) * 2 + 3 - 8 = 1 padding per axis, which ONNX puts
    # at the end for SAME_UPPER and at the start for SAME_LOWER.
    ({"strides": [2, 2], "auto_pad": "SAME_UPPER"}, 8, ((0, 1), (0, 1))),
    ({"strides": [2, 2], "auto_pad": "SAME_LOWER"}, 8, ((1, 0), (1, 0))),
])
def test_refit_of_a_conv_is_the_least_squares_solution_on_im2col_rows(attrs, size, pads):
    """With every output position used, the normal equations are those of the full im2col matrix
    (built here by torch's unfold)."""
    import torch

    rng = np.random.default_rng(7)
    w1, b1 = rng.normal(size=(8, 3, 1, 1)).astype(np.float32), rng.normal(0, 0.5, 8).astype(np.float32)
    w2 = rng.normal(size=(4, 8, 3, 3)).astype(np.float32)
    inits = [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", rng.normal(size=4))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="c2", **attrs)]
    proto = _model(nodes, inits, (3, size, size), {"y": [4, None, None]})
    data = rng.normal(size=(30, 3, size, size)).astype(np.float32)
    drop = [2, 3, 6]
    original, model, report = _recover_directly(proto, {"c1": drop}, data)
    fit = data[: report["fit_samples"]]
    keep = np.setdiff1d(np.arange(8), drop)
    hidden = np.maximum(np.einsum("oc,nchw->nohw", w1[:, :, 0, 0].astype(np.float64), fit) + b1[:, None, None], 0)
    padded = np.pad(hidden[:, keep], [(0, 0), (0, 0), *pads])
    unfold = torch.nn.functional.unfold(torch.from_numpy(padded), (3, 3), dilation=attrs.get("dilations", [1, 1]),
                                        stride=attrs.get("strides", [1, 1]))
    x = unfold.numpy().transpose(0, 2, 1).reshape(-1, len(keep) * 9)  # rows: (sample, position)
    target = outputs(original, [{"x": fit}], "original")[0][0]
    y = target.transpose(0, 2, 3, 1).reshape(-1, 4)
    assert report["sinks"][0]["rows"] == len(x) and report["sinks"][0]["ridge"] == 0.0
    solution = _lstsq(x, y)
    c2 = next(n for n in model.graph if n.name == "c2")
    weight = c2.inputs[1].const_value.numpy()
    assert weight.dtype == np.float32 and weight.shape == (4, len(keep), 3, 3)
    got = np.vstack([weight.reshape(4, -1).T, c2.inputs[2].const_value.numpy().reshape(1, -1)])
    np.testing.assert_allclose(got, solution, rtol=0, atol=LSTSQ_RTOL * np.abs(solution).max())

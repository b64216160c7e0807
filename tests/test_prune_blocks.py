"""PruneBlocks: residual blocks found from graph structure, removed exactly, chosen by calibration damage.

The invariant behind every removal test: the model with a block removed computes exactly what the
original computes with that block's branch output multiplied by zero.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import model as M
from onnxcompress import runtime
from onnxcompress.analysis.cost import analyze_cost
from onnxcompress.calibration import Calibration
from onnxcompress.errors import OnnxCompressError, RecipeError
from onnxcompress.passes.prune_blocks import PruneBlocks, find_blocks, remove_block
from onnxcompress.pipeline import PassContext, Pipeline
from onnxcompress.verify import compare

OPSET = 17
CHANNELS = 8
SIZE = 8
CLASSES = 10
CALIB_SAMPLES = 48
#: Scale of the last conv of a branch made "nearly absent": its removal must be the least harmful.
TINY = 1e-3
#: Torch vs ORT on the same network: float32 kernels differ in summation order only.
TORCH_REL_TOL = 1e-5


# ------------------------------------------------------------------------------------ graph builder


class _Graph:
    """onnx.helper graph under construction, with seeded He-initialised convolutions."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.extra_outputs: list[str] = []

    def op(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def conv(self, x: str, cin: int, cout: int, name: str, *, k: int = 3, stride: int = 1, scale: float = 1.0,
             bias: bool = True) -> str:
        w = self.rng.normal(0, np.sqrt(2 / (cin * k * k)), (cout, cin, k, k)) * scale
        b = self.rng.normal(0, 0.1, cout) * scale * bias
        return self.op("Conv", [x, self.const(f"{name}_w", w), self.const(f"{name}_b", b)], name,
                       pads=[k // 2] * 4, strides=[stride, stride])

    def branch(self, x: str, c: int, prefix: str, scale: float = 1.0) -> str:
        """conv -> relu -> conv: a basic residual branch f(x)."""
        h = self.op("Relu", [self.conv(x, c, c, f"{prefix}_conv1")], f"{prefix}_relu")
        return self.conv(h, c, c, f"{prefix}_conv2", scale=scale)

    def head(self, x: str, c: int) -> str:
        p = self.op("Flatten", [self.op("GlobalAveragePool", [x], "gap")], "flat")
        w = self.rng.normal(0, 0.3, (CLASSES, c))
        return self.op("Gemm", [p, self.const("fc_w", w), self.const("fc_b", np.zeros(CLASSES))], "logits", transB=1)

    def model(self, output: str, out_shape: list, in_channels: int = 3, in_size: int = SIZE) -> onnx.ModelProto:
        outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in self.extra_outputs]
        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_channels, in_size, in_size])],
            outputs, self.inits,
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        return onnx.shape_inference.infer_shapes(proto) if self.extra_outputs else proto


#: Block name -> its branch output, in every graph built by resnet_like().
BRANCH_OUT = {"add_a": "a_conv2", "add_b": "b_conv2", "sum_c": "c_conv2"}


def resnet_like(scales: dict[str, float] | None = None, *, tap: str | None = None, output_in_branch: bool = False,
                external_gate: bool = False) -> onnx.ModelProto:
    """stem -> block a: Add(x, f) -> block b: Add(f, x) -> projection block (stride 2, 8 -> 16 channels,
    1x1 conv shortcut) -> block c: Sum(x, f) -> GAP -> Gemm.

    `scales` shrinks a block's last conv; `tap` adds an outside consumer of block b's inner ReLU;
    `output_in_branch` makes block a's inner ReLU a graph output; `external_gate` multiplies block
    a's branch by a value computed from the stem, outside the block.
    """
    scales = scales or {}
    g = _Graph()
    stem = g.conv("x", 3, CHANNELS, "stem_conv")
    h = g.op("Relu", [stem], "stem_relu")
    fa = g.branch(h, CHANNELS, "a", scales.get("add_a", 1.0))
    if external_gate:
        gate = g.op("Sigmoid", [g.op("GlobalAveragePool", [stem], "gate_gap")], "gate")
        fa = g.op("Mul", [fa, gate], "a_gated")
    h = g.op("Relu", [g.op("Add", [h, fa], "add_a")], "relu_a")
    fb = g.branch(h, CHANNELS, "b", scales.get("add_b", 1.0))
    h = g.op("Relu", [g.op("Add", [fb, h], "add_b")], "relu_b")
    p = g.conv(g.op("Relu", [g.conv(h, CHANNELS, 2 * CHANNELS, "p_conv1", stride=2)], "p_relu"),
               2 * CHANNELS, 2 * CHANNELS, "p_conv2")
    shortcut = g.conv(h, CHANNELS, 2 * CHANNELS, "p_down", k=1, stride=2)
    h = g.op("Relu", [g.op("Add", [p, shortcut], "add_p")], "relu_p")
    fc = g.branch(h, 2 * CHANNELS, "c", scales.get("sum_c", 1.0))
    h = g.op("Relu", [g.op("Sum", [h, fc], "sum_c")], "relu_c")
    if tap:
        g.extra_outputs.append(g.op("ReduceMean", ["b_relu"], tap))
    if output_in_branch:
        g.extra_outputs.append("a_relu")
    return g.model(g.head(h, 2 * CHANNELS), ["N", CLASSES])


def nested_model(*, cancelling: bool = False) -> onnx.ModelProto:
    """Outer block Add(h, inner blocks A and B -> conv) containing two identity blocks, then block C.

    `cancelling`: B's branch is Neg, so B's output is exactly 0, and the outer branch's conv has no
    bias: the outer branch contributes exactly nothing, and neither does A (B cancels whatever A does).
    """
    g = _Graph(seed=3)
    h = g.op("Relu", [g.conv("x", 3, CHANNELS, "stem_conv")], "stem_relu")
    inner = g.op("Relu", [g.op("Add", [h, g.branch(h, CHANNELS, "ia")], "add_ia")], "relu_ia")
    fb = g.op("Neg", [inner], "ib_neg") if cancelling else g.branch(inner, CHANNELS, "ib")
    inner = g.op("Relu", [g.op("Add", [inner, fb], "add_ib")], "relu_ib")
    fo = g.conv(inner, CHANNELS, CHANNELS, "o_conv", bias=not cancelling)
    h = g.op("Relu", [g.op("Add", [h, fo], "add_o")], "relu_o")
    h = g.op("Relu", [g.op("Add", [h, g.branch(h, CHANNELS, "c")], "add_c")], "relu_c")
    return g.model(g.head(h, CHANNELS), ["N", CLASSES])


def block_is_whole_model(x_is_input: bool) -> onnx.ModelProto:
    """y = x + f(x) is the graph output; x is the graph input itself or a ReLU of it."""
    g = _Graph(seed=5)
    x = "x" if x_is_input else g.op("Relu", ["x"], "pre")
    g.op("Add", [x, g.branch(x, CHANNELS, "f")], "y")
    return g.model("y", ["N", CHANNELS, 4, 4], in_channels=CHANNELS, in_size=4)


def broadcast_model() -> onnx.ModelProto:
    """y = s + s * W with s = GAP(x) of shape [N, C, 1, 1] and W [1, C, 4, 4]: y is larger than s."""
    g = _Graph(seed=6)
    s = g.op("GlobalAveragePool", ["x"], "s")
    f = g.op("Mul", [s, g.const("wide", g.rng.normal(size=(1, CHANNELS, 4, 4)))], "f")
    g.op("Add", [s, f], "y")
    return g.model("y", ["N", CHANNELS, 4, 4], in_channels=CHANNELS, in_size=4)


# ------------------------------------------------------------------------------------ helpers


def zero_branch(proto: onnx.ModelProto, add: str, branch_out: str) -> onnx.ModelProto:
    """The original model with the branch output multiplied by zero just before the add."""
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(proto)
    graph = zeroed.graph
    graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), f"{add}_zero"))
    index, node = next((i, n) for i, n in enumerate(graph.node) if n.name == add)
    mul = helper.make_node("Mul", [branch_out, f"{add}_zero"], [f"{add}_zeroed"], name=f"{add}_mul0")
    graph.node.insert(index, mul)
    node.input[list(node.input).index(branch_out)] = f"{add}_zeroed"
    return zeroed


def run_plain(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ORT with graph optimizations off: each model's own float ops, no fusions that differ between them."""
    if isinstance(model, onnx.ModelProto):
        model = M.load(model)
    return runtime.session(model, options=runtime.session_options(optimize=False)).run(None, feeds)


def images(count: int = CALIB_SAMPLES, channels: int = 3, size: int = SIZE, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, channels, size, size)).astype(np.float32)


def context(model: ir.Model, calibration: np.ndarray | Calibration | None = None) -> PassContext:
    if isinstance(calibration, np.ndarray):
        calibration = Calibration.from_arrays(model, calibration, source="test images")
    return PassContext(calibration=calibration, input_shapes=M.resolve_input_shapes(model), model=model)


def prune(proto: onnx.ModelProto, **options):
    model = M.load(proto)
    return PruneBlocks(**options).run(model, context(model, images()))


def by_name(model: ir.Model) -> dict:
    return {b.name: b for b in find_blocks(model)}


def full_check(model: ir.Model, tmp_path) -> None:
    path = M.save(model, tmp_path / "pruned.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    runtime.session(path).run(None, {"x": images(2)})


# ------------------------------------------------------------------------------------ finding blocks


def test_blocks_found_with_projection_skipped():
    blocks = by_name(M.load(resnet_like()))
    assert list(blocks) == ["add_a", "add_b", "add_p", "sum_c"]
    assert {n for n, b in blocks.items() if b.removable} == {"add_a", "add_b", "sum_c"}
    assert "no identity shortcut" in blocks["add_p"].reason and "'relu_b'" in blocks["add_p"].reason
    # Either operand order; the branch is exactly conv -> relu -> conv, the shortcut the block input.
    for name, shortcut in [("add_a", "stem_relu"), ("add_b", "relu_a"), ("sum_c", "relu_p")]:
        prefix = name[-1]
        assert blocks[name].shortcut.name == shortcut
        assert [n.name for n in blocks[name].branch] == [f"{prefix}_conv1", f"{prefix}_relu", f"{prefix}_conv2"]
        assert blocks[name].branch_output.name == BRANCH_OUT[name]


def test_graph_output_inside_branch_is_not_removable():
    blocks = by_name(M.load(resnet_like(output_in_branch=True)))
    assert "'a_relu' inside the branch is a graph output" == blocks["add_a"].reason
    assert blocks["add_b"].removable and blocks["sum_c"].removable


def test_branch_value_used_outside_is_not_removable():
    blocks = by_name(M.load(resnet_like(tap="tap")))
    assert blocks["add_b"].reason == "'b_relu' inside the branch is also used by 'tap' outside the block"
    assert blocks["add_a"].removable and blocks["sum_c"].removable


def test_branch_reading_another_activation_is_not_removable():
    blocks = by_name(M.load(resnet_like(external_gate=True)))
    assert blocks["add_a"].reason == "the branch reads 'gate', computed outside the block"
    assert blocks["add_b"].removable


def test_broadcasting_add_is_not_removable():
    (block,) = find_blocks(M.load(broadcast_model()))
    assert block.reason == "the add broadcasts: shortcut [1, 8, 1, 1] -> output [1, 8, 4, 4]"


def test_nested_blocks_are_all_found():
    blocks = by_name(M.load(nested_model()))
    assert {n for n, b in blocks.items() if b.removable} == {"add_ia", "add_ib", "add_o", "add_c"}
    outer = {n.name for n in blocks["add_o"].branch}
    assert {"add_ia", "add_ib", "ia_conv1", "ib_conv2", "o_conv"} <= outer and "add_o" not in outer


# ------------------------------------------------------------------------------------ exact removal


@pytest.mark.parametrize("name", sorted(BRANCH_OUT))
def test_removal_equals_zeroed_branch(name, tmp_path):
    proto = resnet_like()
    model = M.load(proto)
    block = by_name(model)[name]
    weights = {v.name for n in block.branch for v in n.inputs if v is not None and v.is_initializer()}
    remove_block(model, block)
    feeds = {"x": images(4, seed=7)}
    zeroed = zero_branch(proto, name, BRANCH_OUT[name])
    np.testing.assert_array_equal(run_plain(model, feeds)[0], run_plain(zeroed, feeds)[0])
    names = {n.name for n in model.graph}
    assert not names & ({n.name for n in block.branch} | {name})
    assert not weights & set(model.graph.initializers), "the branch's weights must go with it"
    full_check(model, tmp_path)


@pytest.mark.parametrize("x_is_input", [True, False], ids=["x-graph-input", "x-internal"])
def test_removing_a_block_that_ends_the_graph_keeps_the_output_name(x_is_input, tmp_path):
    proto = block_is_whole_model(x_is_input)
    model = M.load(proto)
    (block,) = find_blocks(model)
    remove_block(model, block)
    assert [v.name for v in model.graph.outputs] == ["y"]
    feeds = {"x": images(3, channels=CHANNELS, size=4)}
    np.testing.assert_array_equal(run_plain(model, feeds)[0], run_plain(zero_branch(proto, "y", "f_conv2"), feeds)[0])
    path = M.save(model, tmp_path / "m.onnx")
    onnx.checker.check_model(str(path), full_check=True)


def test_nested_removal_inner_then_outer_equals_zeroed_outer():
    """The pass removes chosen blocks in order with the blocks found on the original graph."""
    proto = nested_model()
    model = M.load(proto)
    blocks = by_name(model)
    remove_block(model, blocks["add_ia"])
    remove_block(model, blocks["add_o"])
    feeds = {"x": images(4, seed=8)}
    zeroed = zero_branch(proto, "add_o", "o_conv")
    np.testing.assert_array_equal(run_plain(model, feeds)[0], run_plain(zeroed, feeds)[0])
    assert not {"add_ib", "ia_conv1", "o_conv"} & {n.name for n in model.graph}


# ------------------------------------------------------------------------------------ choosing blocks


@pytest.mark.parametrize("metric", ["cosine", "sqnr", "top1", "mse"])
def test_near_zero_branch_is_removed_first(metric):
    result = prune(resnet_like({"add_b": TINY}), count=1, metric=metric)
    records = {r["add"]: r for r in result.record.details["blocks"]}
    assert [n for n, r in records.items() if r["removed"]] == ["add_b"]
    scores = {n: r["score"] for n, r in records.items() if r["removable"]}
    assert scores["add_b"] == min(scores.values())  # top-1 ties (no class changes) fall to cosine
    assert records["add_p"]["score"] is None and "no identity shortcut" in records["add_p"]["reason"]
    assert result.record.skipped == (f"add_p: {records['add_p']['reason']}",)


@pytest.mark.parametrize(
    "options, removed",
    [({"count": 2}, 2), ({"count": 10}, 3), ({"count": 0}, 0), ({"ratio": 0.5}, 1), ({"ratio": 0.67}, 2),
     ({"ratio": 1.0}, 3), ({"count": 2, "rescore": False}, 2)],
)
def test_count_and_ratio(options, removed):
    proto = resnet_like()
    before = analyze_cost(M.load(proto)).stats.macs
    result = prune(proto, **options)
    details = result.record.details
    assert details["removable"] == 3 and details["removed"] == removed == len(result.record.changes)
    gone = [r for r in details["blocks"] if r["removed"]]
    assert len(gone) == removed and result.modified == (removed > 0)
    # The MACs that disappear are exactly the removed branches' MACs.
    after = analyze_cost(result.model).stats.macs
    assert before - after == details["macs_removed"] == sum(r["macs"] for r in gone)
    assert sum(1 for n in result.model.graph if n.op_type in ("Add", "Sum")) == 4 - removed


def test_greedy_order_follows_damage():
    """Two near-zero branches of different sizes: the smaller goes first, then the other."""
    result = prune(resnet_like({"add_a": TINY / 10, "sum_c": TINY}), count=2)
    steps = {r["step"]: r["add"] for r in result.record.details["blocks"] if r["removed"]}
    assert steps == {1: "add_a", 2: "sum_c"}


@pytest.mark.parametrize("metric", ["cosine", "sqnr"])
def test_max_drop_is_respected_on_held_out_samples(metric):
    proto = resnet_like({"add_b": TINY})
    max_drop = 1e-3
    result = prune(proto, max_drop=max_drop, metric=metric)
    details = result.record.details
    _, held = Calibration.from_arrays(M.load(proto), images()).split(0.25)
    assert details["held_out_samples"] == held.num_samples

    def held_damage(model) -> float:
        feeds = [dict(held.arrays)]
        fidelity = compare([run_plain(proto, feeds[0])], [run_plain(model, feeds[0])], "held out")
        return 1 - fidelity.cosine if metric == "cosine" else 10 ** (-fidelity.sqnr_db / 10)

    assert 1 <= details["removed"] < details["removable"]
    assert held_damage(result.model) <= max_drop
    assert held_damage(result.model) == pytest.approx(details["held_out_damage"], rel=1e-3, abs=1e-9)
    # The block the selection stopped at would indeed break the tolerance.
    stopped = [r for r in details["blocks"] if r["reason"] and "max_drop" in r["reason"]]
    assert len(stopped) == 1
    more = M.load(result.model)
    remove_block(more, by_name(more)[stopped[0]["add"]])
    assert held_damage(more) > max_drop


def test_nested_outer_block_removes_its_inner_blocks():
    """The outer branch and inner block A change nothing; the outer one is larger, so it goes first
    and takes A and B with it; the second removal is then C, not a block already gone."""
    proto = nested_model(cancelling=True)
    before = analyze_cost(M.load(proto)).stats.macs
    result = prune(proto, count=2)
    records = {r["add"]: r for r in result.record.details["blocks"]}
    assert records["add_o"]["score"] == records["add_ia"]["score"] == 0.0 < records["add_ib"]["score"]
    assert {r["step"]: n for n, r in records.items() if r["step"]} == {1: "add_o", 2: "add_c"}
    assert records["add_ia"]["reason"] == records["add_ib"]["reason"] == "removed with the enclosing block add_o"
    assert result.record.details["removed"] == 2 and result.record.details["removed_nested"] == 2
    assert before - analyze_cost(result.model).stats.macs == result.record.details["macs_removed"]
    assert records["add_o"]["macs"] > records["add_ia"]["macs"]
    assert not {"add_ia", "add_ib", "add_o", "add_c"} & {n.name for n in result.model.graph}


# ------------------------------------------------------------------------------------ pipeline and errors


def test_pipeline_run_verifies_and_reports(tmp_path):
    proto = resnet_like({"sum_c": TINY})
    result = Pipeline([PruneBlocks(count=1)]).run(proto, calibration=images())
    record = result.report.passes[0]
    assert record.modified and record.after.macs < record.before.macs
    assert record.fidelity.cosine > 1 - 1e-4  # the near-zero branch went
    assert record.details["fidelity"]["inputs"] == "arrays (held out)"
    full_check(result.model, tmp_path)


def test_recipe_options():
    (p,) = Pipeline.from_recipe([{"type": "prune-blocks", "ratio": 0.5, "metric": "top1"}]).passes
    assert isinstance(p, PruneBlocks) and p.ratio == 0.5 and p.metric == "top1"
    with pytest.raises(RecipeError, match="needs count, ratio or max_drop"):
        Pipeline.from_recipe([{"type": "prune-blocks"}])
    with pytest.raises(RecipeError, match="count or ratio, not both"):
        Pipeline.from_recipe([{"type": "prune-blocks", "count": 1, "ratio": 0.5}])


def test_calibration_is_required():
    model = M.load(resnet_like())
    with pytest.raises(OnnxCompressError, match="calibration data") as err:
        PruneBlocks(count=1).run(model, context(model))
    assert "\n" not in str(err.value)


def test_random_calibration_is_noted():
    model = M.load(resnet_like())
    calibration = Calibration.random(model, {"x": (1, 3, SIZE, SIZE)}, count=16)
    result = PruneBlocks(count=1).run(model, context(model, calibration))
    assert any("random calibration data" in n for n in result.record.details["notes"])


def test_few_samples_are_not_split():
    model = M.load(resnet_like())
    result = PruneBlocks(count=1).run(model, context(model, images(3)))
    details = result.record.details
    assert details["scoring_samples"] == details["held_out_samples"] == 3
    assert details["fidelity"]["inputs"] == "test images"
    assert any("none held out" in n for n in details["notes"])


def test_top1_needs_class_scores():
    model = M.load(block_is_whole_model(False))
    with pytest.raises(OnnxCompressError, match="class scores"):
        PruneBlocks(count=1, metric="top1").run(model, context(model, images(16, channels=CHANNELS, size=4)))


# ------------------------------------------------------------------------------------ torch exports


ZOO_FAMILIES = ("resnet_basic", "mobilenet_v2")


def _identity_blocks(module) -> tuple[list, int]:
    """(blocks with an identity shortcut, blocks with a computed shortcut), in execution order."""
    import torch

    from tests import zoo

    identity, projection = [], 0
    for m in module.modules():
        if isinstance(m, (zoo.BasicBlock, zoo.Bottleneck)):
            if isinstance(m.downsample, torch.nn.Identity):
                identity.append(m)
            else:
                projection += 1
        elif isinstance(m, zoo.InvertedResidual) and m.residual:
            identity.append(m)
    return identity, projection


def _without_branch(block) -> None:
    """Make a torch block compute what it computes with its residual branch removed."""
    import torch

    from tests import zoo

    relu = isinstance(block, (zoo.BasicBlock, zoo.Bottleneck))
    block.forward = (lambda x: torch.relu(x)) if relu else (lambda x: x)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("family", ZOO_FAMILIES)
def test_torch_exports(family, dynamo, tmp_path_factory, tmp_path):
    torch = pytest.importorskip("torch")
    from tests import zoo

    path = zoo.exported(tmp_path_factory, family, dynamo=dynamo)
    blocks = find_blocks(M.load(path))
    identity, projection = _identity_blocks(zoo.FAMILIES[family]()[0])
    removable = [b for b in blocks if b.removable]
    assert len(removable) == len(identity) >= 2
    assert [b.reason.startswith("no identity shortcut") for b in blocks if not b.removable] == [True] * projection

    example = zoo.FAMILIES[family]()[1]
    feeds = zoo.numpy_inputs(family)
    for k, block in enumerate(removable):
        model = M.load(path)
        remove_block(model, by_name(model)[block.name])
        # Against torch with the k-th identity block's branch removed: the right block went.
        module = zoo.FAMILIES[family]()[0]
        _without_branch(_identity_blocks(module)[0][k])
        with torch.no_grad():
            want = module(*example).numpy()
        got = run_plain(model, feeds)[0]
        assert np.abs(got - want).max() <= TORCH_REL_TOL * np.abs(want).max()
        # And exactly the original ONNX model with that branch zeroed.
        zeroed = zero_branch(onnx.load(str(path)), block.name, block.branch_output.name)
        np.testing.assert_array_equal(got, run_plain(zeroed, feeds)[0])

    calibration = np.random.default_rng(2).standard_normal((16, *example[0].shape[1:])).astype(np.float32)
    result = Pipeline([PruneBlocks(count=1)]).run(path, calibration=calibration)
    assert result.report.passes[0].details["removed"] == 1
    full_check_path = M.save(result.model, tmp_path / "pruned.onnx")
    onnx.checker.check_model(str(full_check_path), full_check=True)

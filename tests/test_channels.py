"""Channel dependency analysis: coupling rules on hand-built graphs, and exactness on the light zoo."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import model as M
from onnxcompress.analysis.channels import ChannelGraph, prepare
from onnxcompress.pipeline import Pipeline
from onnxcompress.verify import VerifyOptions
from tests.exactness import assert_prune_is_exact
from tests.graphs import OPSET


def _conv(name, x, c_in, c_out, rng, group=1, k=3):
    w = numpy_helper.from_array(rng.normal(0, 0.3, (c_out, c_in // group, k, k)).astype(np.float32), f"{name}_w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, c_out).astype(np.float32), f"{name}_b")
    node = helper.make_node("Conv", [x, w.name, b.name], [name], name=name, pads=[k // 2] * 4, group=group)
    return node, [w, b]


def _model(nodes, inits, c_in=4, size=6, out="y", out_shape=(1, 3)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, size, size])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(out_shape))], inits)
    model = M.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))
    return prepare(model)


def _head(x, c, rng, classes=3):
    """GlobalAveragePool -> Flatten -> Gemm: the channels end in a consumer, not at the output."""
    w = numpy_helper.from_array(rng.normal(size=(classes, c)).astype(np.float32), "fc_w")
    return [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
            helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
            helper.make_node("Gemm", ["flat", "fc_w"], ["y"], name="fc", transB=1)], [w]


def _group_of(g: ChannelGraph, source: str):
    return next(gr for gr in g.groups if source in gr.sources)


def test_residual_add_couples_both_branches():
    rng = np.random.default_rng(0)
    c1, i1 = _conv("c1", "x", 4, 8, rng)
    c2, i2 = _conv("c2", "r1", 8, 8, rng)
    c3, i3 = _conv("c3", "c2", 8, 8, rng)
    head, ih = _head("sum", 8, rng)
    nodes = [c1, helper.make_node("Relu", ["c1"], ["r1"], name="relu1"), c2, c3,
             helper.make_node("Add", ["r1", "c3"], ["sum"], name="add"), *head]
    g = ChannelGraph.build(_model(nodes, i1 + i2 + i3 + ih))
    residual = _group_of(g, "c1")
    assert set(residual.sources) == {"c1", "c3"} and len(residual.classes) == 8
    inner = _group_of(g, "c2")
    assert inner.sources == ["c2"] and not inner.frozen
    pruned = assert_prune_is_exact(g, residual.classes[:3] + inner.classes[:5])
    assert pruned.graph.initializers["c1_w"].const_value.shape == (5, 4, 3, 3)
    assert pruned.graph.initializers["c3_w"].const_value.shape == (5, 3, 3, 3)
    assert pruned.graph.initializers["fc_w"].const_value.shape == (3, 5)


def test_concat_offsets_and_flatten_into_gemm():
    rng = np.random.default_rng(1)
    a, ia = _conv("a", "x", 4, 3, rng)
    b, ib = _conv("b", "x", 4, 5, rng)
    w = numpy_helper.from_array(rng.normal(size=(8 * 6 * 6, 2)).astype(np.float32), "fc_w")
    nodes = [a, b, helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
             helper.make_node("Flatten", ["cat"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "fc_w"], ["y"], name="fc")]
    g = ChannelGraph.build(_model(nodes, ia + ib + [w], out_shape=(1, 2)))
    ga, gb = _group_of(g, "a"), _group_of(g, "b")
    assert ga is not gb and len(ga.classes) == 3 and len(gb.classes) == 5
    pruned = assert_prune_is_exact(g, [ga.classes[1], gb.classes[0], gb.classes[4]])
    # Each channel owns 36 flattened features; 3 channels removed -> 5 * 36 rows of the Gemm weight.
    assert pruned.graph.initializers["fc_w"].const_value.shape == (5 * 36, 2)


def test_depthwise_ties_input_and_output_channels():
    rng = np.random.default_rng(2)
    c1, i1 = _conv("c1", "x", 4, 8, rng, k=1)
    dw, idw = _conv("dw", "c1", 8, 16, rng, group=8)  # channel multiplier 2
    head, ih = _head("dw", 16, rng)
    g = ChannelGraph.build(_model([c1, dw, *head], i1 + idw + ih))
    group = _group_of(g, "c1")
    assert len(group.classes) == 8
    pruned = assert_prune_is_exact(g, group.classes[:2])
    dw_node = next(n for n in pruned.graph if n.name == "dw")
    assert dw_node.attributes.get_int("group") == 6
    assert pruned.graph.initializers["dw_w"].const_value.shape == (12, 1, 3, 3)


@pytest.mark.parametrize("groups, c_mid", [(4, 8), (2, 8)])
def test_grouped_conv_units(groups, c_mid):
    rng = np.random.default_rng(3)
    c1, i1 = _conv("c1", "x", 4, c_mid, rng, k=1)
    gc, igc = _conv("gc", "c1", c_mid, c_mid, rng, group=groups)
    head, ih = _head("gc", c_mid, rng)
    g = ChannelGraph.build(_model([c1, gc, *head], i1 + igc + ih))
    group = _group_of(g, "c1")
    per_group = c_mid // groups
    if groups >= per_group:  # whole groups: the unit spans a group's inputs and outputs
        assert len(group.classes) == groups and "gc" in group.sources
    else:  # the same index in every group
        assert len(group.classes) == per_group
    assert_prune_is_exact(g, group.classes[:1])


def test_blockers_freeze_only_what_they_touch():
    rng = np.random.default_rng(4)
    c1, i1 = _conv("c1", "x", 4, 8, rng)
    c2, i2 = _conv("c2", "lrn", 8, 8, rng)
    head, ih = _head("c2", 8, rng)
    nodes = [c1, helper.make_node("LRN", ["c1"], ["lrn"], name="lrn", size=3), c2, *head]
    g = ChannelGraph.build(_model(nodes, i1 + i2 + ih))
    blocked = _group_of(g, "c1")
    assert len(blocked.frozen) == 8 and "LRN" in next(iter(blocked.frozen.values()))
    assert not _group_of(g, "c2").frozen
    with pytest.raises(ValueError, match="frozen"):
        g.prune(blocked.classes[:1])


def test_channels_reaching_a_graph_output_are_frozen():
    rng = np.random.default_rng(5)
    c1, i1 = _conv("c1", "x", 4, 8, rng)
    g = ChannelGraph.build(_model([c1], i1, out="c1", out_shape=(1, 8, 6, 6)))
    (group,) = g.groups
    assert len(group.frozen) == 8 and "graph output 'c1'" in group.frozen[group.classes[0]]


def test_unknown_op_blocks_with_reason():
    rng = np.random.default_rng(6)
    c1, i1 = _conv("c1", "x", 4, 8, rng)
    c2, i2 = _conv("c2", "odd", 8, 8, rng)
    head, ih = _head("c2", 8, rng)
    nodes = [c1, helper.make_node("CumSum", ["c1", "axis"], ["odd"], name="cumsum"), c2, *head]
    axis = numpy_helper.from_array(np.array(1, np.int64), "axis")
    g = ChannelGraph.build(_model(nodes, i1 + i2 + ih + [axis]))
    reason = next(iter(_group_of(g, "c1").frozen.values()))
    assert reason == "CumSum at node cumsum is not handled"


def _heads_attention(probs_from_input: bool, heads: int = 4, d: int = 8, seq: int = 5):
    """x[1, S, H*d] -> v = x @ Wv split into heads -> probs[1, H, S, S] @ v -> merged -> @ Wo -> y.
    probs come from q @ k^T (tracked, per head) or from a graph input (not tracked)."""
    rng = np.random.default_rng(11)
    width = heads * d
    arrays = {name: rng.normal(0, 0.3, (width, width)).astype(np.float32) for name in ("wq", "wk", "wv", "wo")}
    arrays.update(split=np.array([1, seq, heads, d], np.int64), merge=np.array([1, seq, width], np.int64))
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "wv"], ["v"], name="v"), n("Reshape", ["v", "split"], ["vh"], name="v_split"),
             n("Transpose", ["vh"], ["vt"], name="v_heads", perm=[0, 2, 1, 3])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, width])]
    if probs_from_input:
        inputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, heads, seq, seq]))
    else:
        for name in ("q", "k"):
            nodes += [n("MatMul", ["x", f"w{name}"], [name], name=name),
                      n("Reshape", [name, "split"], [f"{name}h"], name=f"{name}_split"),
                      n("Transpose", [f"{name}h"], [f"{name}t"], name=f"{name}_heads",
                        perm=[0, 2, 3, 1] if name == "k" else [0, 2, 1, 3])]
        nodes += [n("MatMul", ["qt", "kt"], ["scores"], name="scores"),
                  n("Softmax", ["scores"], ["probs"], name="softmax", axis=-1)]
    nodes += [n("MatMul", ["probs", "vt"], ["ctx"], name="context"),
              n("Transpose", ["ctx"], ["ctx_t"], name="ctx_t", perm=[0, 2, 1, 3]),
              n("Reshape", ["ctx_t", "merge"], ["merged"], name="merge"), n("MatMul", ["merged", "wo"], ["y"], name="o")]
    graph = helper.make_graph(nodes, "heads", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, width])],
                              inits)
    return prepare(M.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])))


def test_heads_of_v_follow_the_attention_weights_or_stay():
    # Tracked per-head attention weights: V's heads are a prunable unit with Q's and K's.
    tracked = _group_of(ChannelGraph.build(_heads_attention(probs_from_input=False)), "v")
    assert tracked.prunable and not tracked.frozen
    # Attention weights the tracker cannot follow keep all their heads: removing V's alone would
    # leave a head axis of 4 against 3 (ORT: "right operand cannot broadcast").
    untracked = _group_of(ChannelGraph.build(_heads_attention(probs_from_input=True)), "v")
    assert len(untracked.frozen) == len(untracked.classes)
    assert "batch axis with channels on one operand is not tracked on the other" in next(iter(untracked.frozen.values()))


def test_analysis_does_not_modify_the_model():
    rng = np.random.default_rng(7)
    c1, i1 = _conv("c1", "x", 4, 8, rng)
    head, ih = _head("c1", 8, rng)
    model = _model([c1, *head], i1 + ih)
    before = onnx.printer.to_text(M.to_proto(model))
    ChannelGraph.build(model)
    assert onnx.printer.to_text(M.to_proto(model)) == before


@pytest.mark.parametrize("name", ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
                                  "shufflenet", "squeezenet", "vgg19", "zfnet512"])
def test_light_zoo_pruning_is_exact(light_model_paths, name):
    """Half of every group's prunable units, chosen at random, on each light zoo model with random weights."""
    pipeline = Pipeline.from_recipe("cleanup")
    pipeline.verify = VerifyOptions(enabled=False)
    model = pipeline.run(light_model_paths[name]).model
    rng = np.random.default_rng(0)
    for value in model.graph.initializers.values():  # zoo weights are constants: randomize the real weights
        array = value.const_value.numpy()
        if array.dtype == np.float32 and array.ndim > 1:
            value.const_value = ir.tensor(rng.normal(0, 0.05, array.shape).astype(np.float32), name=value.name)
    g = ChannelGraph.build(prepare(model))
    removed = [c for gr in g.groups for c in rng.permutation(gr.prunable)[: len(gr.prunable) // 2]]
    assert removed
    params_before = sum(v.const_value.size for v in model.graph.initializers.values())
    pruned = assert_prune_is_exact(g, removed)
    assert sum(v.const_value.size for v in pruned.graph.initializers.values()) < params_before


def test_a_rule_that_fails_blocks_only_its_node(monkeypatch):
    """Unknown shapes or odd attributes must not stop the analysis: the node's channels are frozen."""
    from onnxcompress.analysis import channel_rules

    def broken(g, node):
        raise TypeError("object of type 'NoneType' has no len()")

    monkeypatch.setitem(channel_rules.RULES, "Relu", broken)
    rng = np.random.default_rng(8)
    c1, i1 = _conv("c1", "x", 4, 8, rng)
    c2, i2 = _conv("c2", "r1", 8, 8, rng)
    head, ih = _head("c2", 8, rng)
    nodes = [c1, helper.make_node("Relu", ["c1"], ["r1"], name="relu1"), c2, *head]
    g = ChannelGraph.build(_model(nodes, i1 + i2 + ih))
    assert next(iter(_group_of(g, "c1").frozen.values())) == "Relu at node relu1: not analyzable (TypeError)"
    assert not _group_of(g, "c2").frozen


def test_register_rule_adds_a_rule_and_guards_the_built_in_ones():
    from onnxcompress.analysis import channel_rules

    rng = np.random.default_rng(9)
    c1, i1 = _conv("c1", "x", 4, 8, rng)
    c2, i2 = _conv("c2", "n1", 8, 8, rng)
    head, ih = _head("c2", 8, rng)
    nodes = [c1, helper.make_node("LpNormalization", ["c1"], ["n1"], name="norm"), c2, *head]
    model = _model(nodes, i1 + i2 + ih)
    assert "is not handled" in next(iter(_group_of(ChannelGraph.build(model), "c1").frozen.values()))

    def same_channels(g, node):  # LpNormalization over the last (spatial) axis keeps channel i as i
        g.set(node.outputs[0], g.layout(node.inputs[0]))

    saved = dict(channel_rules.RULES)
    try:
        channel_rules.register_rule("LpNormalization", same_channels)
        assert not _group_of(ChannelGraph.build(model), "c1").frozen
        with pytest.raises(ValueError, match="already has a channel rule"):
            channel_rules.register_rule("Relu", same_channels)
        with pytest.raises(TypeError, match="callable"):
            channel_rules.register_rule("Softsign", "not a rule")
        channel_rules.register_rule("LpNormalization", channel_rules.blocker("kept whole"), replace=True)
        assert "kept whole" in next(iter(_group_of(ChannelGraph.build(model), "c1").frozen.values()))
    finally:  # the table is global: leave it as it was
        channel_rules.RULES.clear()
        channel_rules.RULES.update(saved)

"""Property tests of channel pruning on random ONNX graphs (tests/randgraphs.py).

The invariant: for any set of prunable classes, `ChannelGraph.prune` gives a model whose ONNX
Runtime outputs equal those of `ChannelGraph.mask` (the original with the removed channels'
consumers zeroed), that passes the full checker, and that holds fewer weights.

Example counts come from the hypothesis profile named by HYPOTHESIS_PROFILE: "ci" (the default,
derandomized so every CI run checks the same graphs) or "slow" (thousands of examples). A failing
example prints as `build_cnn({...})` / `build_transformer({...})`, which rebuilds that exact model.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import currently_in_test_context, event, given, note, settings
from hypothesis import strategies as st

from onnxcompress import runtime
from onnxcompress.analysis.channels import ChannelGraph, prepare
from onnxcompress.model import load, to_proto
from onnxcompress.verify import random_feeds
from tests.randgraphs import BLOCKER_OPS, RandomGraph, build_cnn, cnn_graphs, transformer_graphs

#: Exactness: max |pruned - masked| over an output, relative to max |masked| there. Pruning only
#: drops zero terms from sums, so the difference is float32 rounding of reordered accumulation.
REL_TOL = 1e-4

#: Examples per property in each profile (the profile's own max_examples is the CNN property's).
EXAMPLES = {
    "ci": {"cnn": 500, "transformer": 150, "unchanged": 60, "frozen": 60, "deep": 10},
    "slow": {"cnn": 5000, "transformer": 2000, "unchanged": 500, "frozen": 1000, "deep": 2000},
}
settings.register_profile("ci", max_examples=EXAMPLES["ci"]["cnn"], deadline=None, derandomize=True, database=None)
settings.register_profile("slow", max_examples=EXAMPLES["slow"]["cnn"], deadline=None)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in EXAMPLES:
    raise pytest.UsageError(f"HYPOTHESIS_PROFILE={PROFILE!r}: choose one of {', '.join(EXAMPLES)}")
# Applied per test rather than loaded globally, so other modules' hypothesis tests keep their own.
PROFILE_SETTINGS = settings.get_profile(PROFILE)
COUNTS = EXAMPLES[PROFILE]


def examples(prop: str) -> settings:
    return settings(PROFILE_SETTINGS, max_examples=COUNTS[prop])


# ------------------------------------------------------------------------------ helpers


def analyze(graph: RandomGraph) -> tuple[ir.Model, ChannelGraph]:
    model = load(graph.model)
    prepare(model)
    g = ChannelGraph.build(model)
    if currently_in_test_context():  # printed with a falsifying example
        note("groups: " + "; ".join(
            f"{grp.id} {grp.sources} classes={len(grp.classes)} frozen={len(grp.frozen)}" for grp in g.groups))
    return model, g


def draw_removal(data: st.DataObject, g: ChannelGraph) -> set[int]:
    """Per group: some, all or none of its prunable classes (shrinking towards removing nothing).
    Then every value that would lose all its channels gets one back: pruning a value away entirely
    is not slicing (test_emptying_a_value_is_refused_or_valid)."""
    removed: set[int] = set()
    for group in g.groups:
        prunable = group.prunable
        if not prunable:
            continue
        share = data.draw(st.sampled_from(["some", "all", "none"]), label=f"group {group.id} share")
        if share == "all":
            removed |= set(prunable)
        elif share == "some":
            flags = data.draw(st.lists(st.booleans(), min_size=len(prunable), max_size=len(prunable)),
                              label=f"group {group.id} removed flags")
            removed |= {c for c, f in zip(prunable, flags) if f}
    for name, layout in g.layouts.items():  # graph order: deterministic draws
        classes = sorted(set(g.class_of(layout.atoms).ravel().tolist()))
        if removed.issuperset(classes):
            removed.discard(data.draw(st.sampled_from(classes), label=f"class kept in '{name}'"))
            event("a class kept so that no value is emptied")
    event("removes channels" if removed else "removes nothing")
    return removed


def weight_elements(model: ir.Model) -> int:
    """Elements of floating-point initializers (weights, biases, normalization parameters)."""
    return sum(
        v.const_value.size for v in model.graph.initializers.values()
        if v.const_value is not None and v.const_value.dtype.is_floating_point()
    )


def run(model: ir.Model, graph: RandomGraph) -> list[np.ndarray]:
    """ORT outputs on seeded standard-normal inputs. One intra-op thread: these models are tiny, and
    thread hand-offs would cost more than they save (and starve a parallel test worker)."""
    feeds = random_feeds(model, graph.input_shapes, seed=0)
    return runtime.run(runtime.session(model, options=runtime.session_options(threads=1)), feeds[0])


def assert_close(reference: list[np.ndarray], candidate: list[np.ndarray]) -> None:
    assert len(reference) == len(candidate)
    for k, (ref, got) in enumerate(zip(reference, candidate)):
        assert ref.shape == got.shape, f"output {k}: shape {got.shape} != {ref.shape}"
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        error, scale = float(np.max(np.abs(got64 - ref64))), float(np.max(np.abs(ref64)))
        assert error <= REL_TOL * scale, f"output {k}: max |pruned - masked| = {error:.3g}, max |masked| = {scale:.3g}"


def assert_prune_equals_mask(graph: RandomGraph, data: st.DataObject) -> None:
    model, g = analyze(graph)
    removed = draw_removal(data, g)
    masked = g.mask(removed)  # before prune: prune slices `model` in place
    before = weight_elements(model)
    pruned = g.prune(removed)
    onnx.checker.check_model(to_proto(pruned), full_check=True)
    assert_close(run(masked, graph), run(pruned, graph))
    if removed:
        assert weight_elements(pruned) < before


# ------------------------------------------------------------------------------ properties


@examples("cnn")
@given(graph=cnn_graphs(), data=st.data())
def test_cnn_prune_equals_mask(graph: RandomGraph, data: st.DataObject) -> None:
    assert_prune_equals_mask(graph, data)


@examples("transformer")
@given(graph=transformer_graphs(), data=st.data())
def test_transformer_prune_equals_mask(graph: RandomGraph, data: st.DataObject) -> None:
    assert_prune_equals_mask(graph, data)


@pytest.mark.slow
@examples("deep")
@given(graph=cnn_graphs(max_blocks=10), data=st.data())
def test_deep_cnn_prune_equals_mask(graph: RandomGraph, data: st.DataObject) -> None:
    assert_prune_equals_mask(graph, data)


@examples("unchanged")
@given(graph=st.one_of(cnn_graphs(), transformer_graphs()))
def test_removing_nothing_is_bit_identical(graph: RandomGraph) -> None:
    original = load(graph.model)
    expected = run(original, graph)
    model, g = analyze(graph)
    masked = g.mask(set())
    before = weight_elements(model)
    pruned = g.prune(set())
    onnx.checker.check_model(to_proto(pruned), full_check=True)
    for got in (run(masked, graph), run(pruned, graph)):
        assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(expected, got))
    assert weight_elements(pruned) == before


def _source_keys(g: ChannelGraph) -> dict[int, tuple[str, int]]:
    """atom -> (source node, channel index): atom ids differ between two builds, source channels do not."""
    return {int(a): (name, i) for name, atoms in g.sources for i, a in enumerate(atoms)}


def _without_blockers(graph: RandomGraph) -> RandomGraph:
    """The same graph with every blocker node replaced by an Identity of its first input."""
    proto = onnx.ModelProto()
    proto.CopyFrom(graph.model)
    names = {b.node for b in graph.blockers}
    for node in proto.graph.node:
        if node.name in names:
            node.CopyFrom(onnx.helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
    return RandomGraph(graph.family, graph.choices, proto, graph.input_shapes, ())


@examples("frozen")
@given(graph=st.one_of(cnn_graphs(with_lrn=True), transformer_graphs().filter(lambda t: t.blockers)))
def test_blockers_freeze_the_classes_they_touch(graph: RandomGraph) -> None:
    """Frozen classes carry a reason; the classes an LRN or LayerNormalization reads are frozen, and
    where nothing else freezes them (the same graph with the blockers as Identity), the reason names
    the op."""
    assert graph.blockers and all(b.op_type in BLOCKER_OPS for b in graph.blockers)
    _, g = analyze(graph)
    frozen = {c: reason for grp in g.groups for c, reason in grp.frozen.items()}
    for grp in g.groups:
        assert set(grp.frozen) <= set(grp.classes)
        assert all(isinstance(r, str) and r for r in grp.frozen.values())
    with pytest.raises(ValueError, match="frozen"):  # the output head at least is frozen
        g.prune({next(iter(frozen))})
    keys = _source_keys(g)
    touched: dict[tuple[str, int], set[str]] = {}  # source channel -> blocker ops reading it
    for blocker in graph.blockers:
        layout = g.layouts.get(blocker.input)
        if layout is not None:  # None: no tracked channels reach it (e.g. right after another blocker)
            for atom in np.unique(layout.atoms):
                if int(atom) in keys:
                    touched.setdefault(keys[int(atom)], set()).add(blocker.op_type)
    _, variant = analyze(_without_blockers(graph))
    variant_atoms = {key: atom for atom, key in _source_keys(variant).items()}
    variant_frozen = {c for grp in variant.groups for c in grp.frozen}
    atoms = {key: atom for atom, key in keys.items()}
    for key, ops in touched.items():
        cls = int(g.class_of(np.array([atoms[key]]))[0])
        assert cls in frozen, f"channel {key} feeds {sorted(ops)} but is prunable"
        if key not in variant_atoms:  # a depthwise Conv is a source only behind a blocker
            continue
        if int(variant.class_of(np.array([variant_atoms[key]]))[0]) not in variant_frozen:
            event("a blocker is the only reason")
            reason = frozen[cls]
            assert any(op in reason for op in ops), f"channel {key}: reason '{reason}' names none of {sorted(ops)}"


@examples("frozen")
@given(graph=transformer_graphs(layernorm=False))
def test_attention_without_layernorm_freezes_only_the_output(graph: RandomGraph) -> None:
    """Heads, the residual stream and the MLP are all prunable: only channels reaching the graph
    output are frozen, so the transformer property really slices attention."""
    _, g = analyze(graph)
    reasons = {reason for grp in g.groups for reason in grp.frozen.values()}
    assert all(reason.startswith("reaches graph output") for reason in reasons), reasons
    heads = graph.choices["heads"]
    if heads > 1:  # a single head has no head axis to keep rectangular: its dims are pruned one by one
        assert any(len(grp.classes) == heads and len(grp.sources) >= 3 for grp in g.groups), "no Q/K/V group of heads"


# ------------------------------------------------------------------------------ values emptied by pruning

#: Stem Conv (4 channels) -> Split [1, 3] -> (channel 0, Conv of channels 1-3 to 2) -> Concat ->
#: residual block -> GAP -> Flatten -> Gemm. The residual couples the 3 stream channels with the
#: stem's group, so removing the stream's classes empties a value while the group keeps 3 classes.
STREAM_EMPTYING_CNN = {
    "seed": 0, "batch": 1, "in_channels": 1, "height": 4, "width": 4, "stem": 4, "blocks": 2,
    "b0.kind": "split", "b0.parts": 2, "b0.sizes": [1, 3], "b0.conv0": False, "b0.conv1": True, "b0.c1": 2,
    "b0.bottleneck": False, "b0.fuse": False,
    "b1.kind": "residual", "b1.bias": False, "b1.x_first": False, "b1.relu": False,
    "classes": 2, "head": "gap_gemm", "transB": False, "fc_bias": False,
}


def test_emptying_a_value_is_refused() -> None:
    graph = build_cnn(STREAM_EMPTYING_CNN)
    _, g = analyze(graph)
    pooled = next(node for node in g.model.graph if node.op_type == "GlobalAveragePool").inputs[0]
    removed = set(g.class_of(g.layouts[pooled.name].atoms).ravel().tolist())
    group = next(grp for grp in g.groups if removed <= set(grp.classes))
    if not set(group.prunable) > removed:  # not an expected failure: the example no longer shows the gap
        pytest.fail(f"the example should empty one value while its group keeps classes: {group}")
    assert pooled.name in g.emptied(removed)
    with pytest.raises(ValueError, match="no channels"):
        g.prune(removed)


@pytest.mark.parametrize("importance", ["l2", "random"])
def test_prune_pass_never_empties_a_value(importance) -> None:
    """The allocator gives a class back to any value it would empty, so even 75% pruning stays valid."""
    from onnxcompress.passes import PruneChannels
    from onnxcompress.pipeline import Pipeline
    from onnxcompress.verify import VerifyOptions

    graph = build_cnn(STREAM_EMPTYING_CNN)
    pipeline = Pipeline([PruneChannels(ratio=0.75, round_to=1, importance=importance, max_group_ratio=0.95)],
                        verify=VerifyOptions(samples=1))
    result = pipeline.run(graph.model, input_shapes=graph.input_shapes)  # checker + ORT after the pass
    assert result.report.passes[0].modified

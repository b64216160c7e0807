"""Per-kind fidelity metrics (output_metrics.py): hand-computed values, edge cases, and the fields
they fill in a Fidelity through verify.compare on a real ORT model."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import output_metrics as om
from onnxcompress import verify
from onnxcompress.report import Fidelity, ModelStats, RunReport, to_jsonable

#: Closed forms computed in float64: only rounding separates them from the metric.
EXACT = 1e-12
#: Values that go through a softmax / sigmoid and back (logits of given probabilities).
ROUND_TRIP = 1e-9


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# KL divergence (class scores)


def test_kl_of_identical_rows_is_zero():
    rows = np.random.default_rng(0).normal(size=(6, 10))
    assert om.kl_divergence(rows, rows) == pytest.approx(0.0, abs=EXACT)
    assert om.kl_divergence(_softmax(rows), _softmax(rows)) == pytest.approx(0.0, abs=EXACT)


def test_kl_of_a_known_pair_is_the_closed_form():
    """KL((1/2, 1/4, 1/4) || (1/4, 1/2, 1/4)) = 1/2 ln 2 - 1/4 ln 2 = ln 2 / 4; averaged with an
    identical row it halves."""
    p, q = np.array([[0.5, 0.25, 0.25]]), np.array([[0.25, 0.5, 0.25]])
    assert om.kl_divergence(p, q) == pytest.approx(math.log(2) / 4, abs=EXACT)
    both = om.kl_divergence(np.vstack([p, p]), np.vstack([q, p]))
    assert both == pytest.approx(math.log(2) / 8, abs=EXACT)


def test_kl_of_logits_equals_kl_of_their_probabilities():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 7)), rng.normal(size=(8, 7))
    from_logits = om.kl_divergence(a, b)
    assert from_logits > 0.01
    assert om.kl_divergence(_softmax(a), _softmax(b)) == pytest.approx(from_logits, abs=ROUND_TRIP)
    closed = np.mean(np.sum(_softmax(a) * (np.log(_softmax(a)) - np.log(_softmax(b))), axis=1))
    assert from_logits == pytest.approx(closed, abs=ROUND_TRIP)


def test_kl_with_a_zero_candidate_probability_is_finite():
    value = om.kl_divergence(np.array([[0.5, 0.5, 0.0]]), np.array([[1.0, 0.0, 0.0]]))
    assert math.isfinite(value) and value > 10  # ln(0.5 / 1e-12) / 2: the floor, not infinity


# ------------------------------------------------------------------------------------------------
# 2-class outputs: correlation of the positive-class probability


def test_positive_class_correlation_of_probabilities_and_of_logits():
    """p_ref (0.1, 0.2, 0.3, 0.4) against (0.1, 0.2, 0.4, 0.3): centred dot 0.04 over norms 0.05 = 0.8;
    the same probabilities given as logits (0, log-odds) give the same."""
    ref, got = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.1, 0.2, 0.4, 0.3])
    probs = lambda p: np.stack([1 - p, p], axis=1)
    logits = lambda p: np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=1)
    assert om.positive_class_correlation(probs(ref), probs(got)) == pytest.approx(0.8, abs=EXACT)
    assert om.positive_class_correlation(logits(ref), logits(got)) == pytest.approx(0.8, abs=ROUND_TRIP)
    assert om.positive_class_correlation(probs(ref), probs(ref)) == pytest.approx(1.0, abs=EXACT)


def test_positive_class_correlation_of_constant_outputs():
    flat = np.tile([[0.7, 0.3]], (5, 1))
    varied = np.stack([1 - np.linspace(0.1, 0.5, 5), np.linspace(0.1, 0.5, 5)], axis=1)
    assert om.positive_class_correlation(flat, flat) == 1.0
    assert om.positive_class_correlation(flat, varied) == 0.0
    assert om.positive_class_correlation(varied, flat) == 0.0


# ------------------------------------------------------------------------------------------------
# Embeddings: rank correlation of pairwise similarities


#: Rows whose similarities (0,1) 0, (0,2) 1/sqrt 5, (1,2) 2/sqrt 5 rank 1, 2, 3.
THREE = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 2.0, 0.0]])


def test_similarity_rank_correlation_of_kept_and_permuted_similarities():
    """Scaling rows keeps every cosine (1.0); swapping rows 0 and 2 reverses the three pairs'
    similarities (s12, s02, s01), a rank correlation of -1."""
    assert om.similarity_rank_correlation(THREE, THREE) == pytest.approx(1.0, abs=EXACT)
    assert om.similarity_rank_correlation(THREE, THREE * [[2.0], [0.5], [3.0]]) == pytest.approx(1.0, abs=EXACT)
    assert om.similarity_rank_correlation(THREE, THREE[[2, 1, 0]]) == pytest.approx(-1.0, abs=EXACT)
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(12, 16))
    shuffled = emb.copy()
    shuffled[[0, 5]] = emb[[5, 0]]  # two samples trade places: their neighbours change
    assert om.similarity_rank_correlation(emb, shuffled) < 0.99


def test_similarity_rank_correlation_edge_cases():
    assert om.similarity_rank_correlation(THREE[:2], THREE[:2]) is None  # one pair ranks nothing
    same = np.ones((4, 3))
    assert om.similarity_rank_correlation(same, same) == 1.0  # constant similarities, identical
    assert om.similarity_rank_correlation(same, THREE[[0, 1, 2, 2]]) == 0.0
    rng = np.random.default_rng(3)
    big = rng.normal(size=(om.MAX_EMBEDDING_ROWS + 10, 4))
    moved = big.copy()
    moved[-1] = -moved[-1]  # beyond the rows used
    assert om.similarity_rank_correlation(big, moved) == pytest.approx(1.0, abs=EXACT)


# ------------------------------------------------------------------------------------------------
# Sequences: token error rate of the greedy CTC decode


def _one_hot(steps: list[list[int]], classes: int = 8) -> np.ndarray:
    """[n, T, C] scores whose argmax per step is `steps`."""
    return np.eye(classes)[np.array(steps)]


#: Blank 0 at most steps: decodes to 3 5 7 (repeats collapse, blanks drop).
CTC = [0, 3, 3, 0, 5, 0, 0, 7, 0, 0]


def test_token_error_rate_of_one_substitution_is_one_over_length():
    swapped = [0, 3, 3, 0, 4, 0, 0, 7, 0, 0]
    assert om.token_error_rate([_one_hot([CTC])], [_one_hot([CTC])]) == 0.0
    assert om.token_error_rate([_one_hot([CTC])], [_one_hot([swapped])]) == pytest.approx(1 / 3, abs=EXACT)
    inserted = [0, 3, 3, 0, 5, 0, 6, 7, 0, 0]
    assert om.token_error_rate([_one_hot([CTC])], [_one_hot([inserted])]) == pytest.approx(1 / 3, abs=EXACT)


def test_token_error_rate_finds_the_blank_at_either_end():
    """Blank at C-1 instead of 0 (classes relabelled): the same rate."""
    relabel = lambda steps: [7 - s for s in steps]
    swapped = [0, 3, 3, 0, 4, 0, 0, 7, 0, 0]
    rate = om.token_error_rate([_one_hot([relabel(CTC)])], [_one_hot([relabel(swapped)])])
    assert rate == pytest.approx(1 / 3, abs=EXACT)


def test_token_error_rate_collapses_repeats_only_between_blanks():
    """3 3 0 3 decodes to 3 3: a candidate 3 3 3 3 decodes to 3, one deletion of two tokens."""
    ref = [0, 0, 0, 3, 3, 0, 3, 0, 0, 0]
    got = [0, 0, 0, 3, 3, 3, 3, 0, 0, 0]
    assert om.token_error_rate([_one_hot([ref])], [_one_hot([got])]) == pytest.approx(1 / 2, abs=EXACT)


def test_token_error_rate_pools_samples_and_handles_empty_decodes():
    """Sample one: 1 edit of 3 tokens; sample two (its own array, a batch of 2): 0 of 3 + 0 of 2;
    total 1 / 8. All blank on both sides: 0; tokens against none: 1."""
    other = [[0, 1, 0, 2, 0, 6, 0, 0, 0, 0], [0, 0, 0, 4, 4, 4, 0, 5, 0, 0]]
    ref = [_one_hot([CTC]), _one_hot(other)]
    got = [_one_hot([[0, 3, 3, 0, 4, 0, 0, 7, 0, 0]]), _one_hot(other)]
    assert om.token_error_rate(ref, got) == pytest.approx(1 / 8, abs=EXACT)
    blank = _one_hot([[0] * 10])
    assert om.token_error_rate([blank], [blank]) == 0.0
    assert om.token_error_rate([blank], [_one_hot([[0, 2, 0, 0, 0, 0, 0, 0, 0, 0]])]) == 1.0


def test_edit_distance():
    word = lambda s: [ord(c) for c in s]
    assert om.edit_distance(word("kitten"), word("sitting")) == 3
    assert om.edit_distance(word("flaw"), word("lawn")) == 2
    assert om.edit_distance([], [1, 2]) == 2 and om.edit_distance([1, 2], []) == 2
    assert om.edit_distance([], []) == 0 and om.edit_distance([1, 2, 3], [1, 2, 3]) == 0


# ------------------------------------------------------------------------------------------------
# Probability maps: mask IoU


def _halves(top: bool) -> np.ndarray:
    """A [1, 1, 4, 4] map of 0.9 on the top (or left) half, 0.1 elsewhere."""
    m = np.full((4, 4), 0.1)
    if top:
        m[:2] = 0.9
    else:
        m[:, :2] = 0.9
    return m[None, None]


def test_mask_iou_of_a_known_overlap_pooled_over_samples():
    """Top half against left half: 4 pixels in common of 12 = 1/3; with a second, identical sample
    of 8 pixels the pooled IoU is 12 / 20."""
    assert om.mask_iou([_halves(True)], [_halves(False)]) == pytest.approx(1 / 3, abs=EXACT)
    pooled = om.mask_iou([_halves(True), _halves(True)], [_halves(False), _halves(True)])
    assert pooled == pytest.approx(12 / 20, abs=EXACT)
    empty = np.full((1, 1, 4, 4), 0.2)
    assert om.mask_iou([empty], [empty]) == 1.0
    assert om.mask_iou([empty], [_halves(True)]) == 0.0


# ------------------------------------------------------------------------------------------------
# Which metric each output kind gets


def test_each_output_kind_gets_its_metrics():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, 5))
    unit = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    kinds = {
        "logits": (logits, {"kl_divergence", "similarity_rank_correlation"}),  # scores or embedding: both
        "probabilities": (_softmax(logits), {"kl_divergence"}),
        "unit embedding": (unit, {"similarity_rank_correlation"}),
        "2-class": (logits[:, :2], {"positive_class_correlation"}),
        "one value": (logits[:, :1], set()),
        "map [N, 1, H, W]": (rng.uniform(size=(2, 1, 4, 4)), {"mask_iou"}),
        "map [N, H, W]": (rng.uniform(size=(2, 4, 4)), {"mask_iou"}),
        "sequence of probabilities": (_softmax(rng.normal(size=(2, 6, 5))), {"token_error_rate"}),
        "sequence of logits": (rng.normal(size=(2, 6, 5)), {"token_error_rate"}),
        "feature map": (rng.normal(size=(2, 3, 4, 4)), set()),
        "integers": (np.ones((6, 5), np.int64), set()),
    }
    for name, (array, expected) in kinds.items():
        assert set(om.measure([array], [array])) == expected, name


def test_worst_over_outputs_and_none_where_no_output_fits():
    worst = om.worst([{"kl_divergence": 0.1, "mask_iou": 0.9}, {"kl_divergence": 0.3, "mask_iou": 0.7},
                      {"token_error_rate": 0.2}])
    assert worst == {"kl_divergence": 0.3, "positive_class_correlation": None, "similarity_rank_correlation": None,
                     "token_error_rate": 0.2, "mask_iou": 0.7}


# ------------------------------------------------------------------------------------------------
# Through compare() on a real ORT model, and where the fields show


def _four_heads(scale: float = 1.0) -> ir.Model:
    """x [N, 16] -> class logits [N, 5], 2-class logits [N, 2], a sigmoid map [N, 1, 4, 4] and
    per-step scores [N, 4, 6]; `scale` != 1 perturbs every weight (a lossy candidate)."""
    rng = np.random.default_rng(5)
    weights = {name: (rng.normal(size=(16, n)) * scale ** rng.uniform(-1, 1, (16, n))).astype(np.float32)
                for name, n in (("w_cls", 5), ("w_two", 2), ("w_map", 16), ("w_seq", 24))}
    inits = [numpy_helper.from_array(w, name) for name, w in weights.items()]
    inits += [numpy_helper.from_array(np.array(s, np.int64), n) for n, s in (("map_shape", [-1, 1, 4, 4]), ("seq_shape", [-1, 4, 6]))]
    nodes = [helper.make_node("MatMul", ["x", "w_cls"], ["cls"]), helper.make_node("MatMul", ["x", "w_two"], ["two"]),
             helper.make_node("MatMul", ["x", "w_map"], ["map_flat"]),
             helper.make_node("Reshape", ["map_flat", "map_shape"], ["map_logits"]),
             helper.make_node("Sigmoid", ["map_logits"], ["map"]), helper.make_node("MatMul", ["x", "w_seq"], ["seq_flat"]),
             helper.make_node("Reshape", ["seq_flat", "seq_shape"], ["seq"])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("cls", "two", "map", "seq")]
    graph = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])], outs, inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_compare_fills_the_fields_from_ort_outputs():
    rng = np.random.default_rng(6)
    feeds = [{"x": rng.normal(size=(4, 16)).astype(np.float32)} for _ in range(3)]
    reference = verify.outputs(_four_heads(), feeds, "reference")
    candidate = verify.outputs(_four_heads(1.3), feeds, "candidate")
    fidelity = verify.compare(reference, candidate, "test")
    heads = [om.measure([s[k] for s in reference], [s[k] for s in candidate]) for k in range(4)]
    assert fidelity.kl_divergence == pytest.approx(heads[0]["kl_divergence"], abs=EXACT) and fidelity.kl_divergence > 0
    assert fidelity.similarity_rank_correlation == pytest.approx(heads[0]["similarity_rank_correlation"], abs=EXACT)
    assert fidelity.positive_class_correlation == pytest.approx(heads[1]["positive_class_correlation"], abs=EXACT)
    assert fidelity.mask_iou == pytest.approx(heads[2]["mask_iou"], abs=EXACT) and fidelity.mask_iou < 1
    assert fidelity.token_error_rate == pytest.approx(heads[3]["token_error_rate"], abs=EXACT)
    same = verify.compare(reference, reference, "test")
    assert (same.kl_divergence, same.positive_class_correlation, same.similarity_rank_correlation,
            same.token_error_rate, same.mask_iou) == (0.0, 1.0, 1.0, 0.0, 1.0)
    data = to_jsonable(fidelity)
    for key in ("kl_divergence", "positive_class_correlation", "similarity_rank_correlation", "token_error_rate", "mask_iou"):
        assert data[key] == getattr(fidelity, key)


def _fidelity(**metrics) -> Fidelity:
    return Fidelity(inputs="held out", samples=8, max_abs_error=0.1, max_rel_error=0.1, sqnr_db=30.0, cosine=0.996,
                    **metrics)


def test_the_fields_show_only_when_set():
    from rich.console import Console

    from onnxcompress.pack.summary import fidelity_text
    from onnxcompress.render import fidelity_line, render_run

    plain = _fidelity()
    assert plain.kl_divergence is None and plain.token_error_rate is None  # old constructors keep working
    assert "KL" not in fidelity_line(plain) and "IoU" not in fidelity_text(to_jsonable(plain))
    rich = _fidelity(kl_divergence=0.0123, token_error_rate=0.05, mask_iou=0.875)
    line = fidelity_line(rich)
    assert "KL divergence 0.0123" in line and "token error rate 5.00%" in line and "mask IoU 0.8750" in line
    assert "positive-class correlation" not in line
    assert "token error rate 5.00%" in fidelity_text(to_jsonable(rich))
    stats = ModelStats(params=10, macs=10, flops=20, weight_bytes=40, activation_bytes=40)
    console = Console(record=True, width=200)
    render_run(console, RunReport(input="a.onnx", output="b.onnx", before=stats, after=stats, passes=(), fidelity=rich))
    text = console.export_text()
    assert "fidelity: KL divergence" in text and "fidelity: mask IoU" in text
    assert "similarity rank correlation" not in text

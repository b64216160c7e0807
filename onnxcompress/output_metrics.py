"""The comparison that fits each kind of output: per-kind metrics of a candidate's output rows
against a reference's (pure numpy/scipy; verify.compare folds them into a Fidelity).

An output's kind is read from the reference's arrays (shape and values), not from names:

- one vector per sample `[N, 2]`: a 2-class decision; Pearson correlation of the positive-class
  probability (`positive_class_correlation`).
- one vector per sample `[N, C]`, C > 2: class scores, an embedding, or either. Rows that are
  probabilities (non-negative, summing to 1) are class scores: `kl_divergence`. L2-normalized rows
  are an embedding: `similarity_rank_correlation`. Logits and unnormalized embeddings look the
  same by shape and values, so both metrics are given for them.
- `[N, 1, H, W]` or `[N, H, W]` with every value in [0, 1] (and, for `[N, H, W]`, rows along the
  last axis that are not probabilities): a probability map; `mask_iou`.
- other `[N, T, C]`, C > 2: per-step scores of a sequence (CTC recognizers); `token_error_rate`.
  Transformer token features `[N, T, D]` have the same shape and get one too, which then means little.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

#: Rows are probabilities when non-negative and summing to 1 within this (a float32 softmax does).
PROBABILITY_TOLERANCE = 1e-3
#: Rows are L2-normalized (an embedding) when every norm is 1 within this.
UNIT_NORM_TOLERANCE = 1e-3
#: The similarity rank correlation uses at most this many rows: its cost grows with their square.
MAX_EMBEDDING_ROWS = 256
#: A probability map's mask: the pixels above this value.
MASK_THRESHOLD = 0.5
#: Probabilities are floored here before their log in the KL divergence (a zero candidate
#: probability where the reference has mass would make it infinite).
PROBABILITY_FLOOR = 1e-12

#: Each metric's worst over outputs: the largest error, the smallest agreement.
WORST = {
    "kl_divergence": max,
    "positive_class_correlation": min,
    "similarity_rank_correlation": min,
    "token_error_rate": max,
    "mask_iou": min,
}


def measure(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
            rows: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """The per-kind metrics of one output: its arrays per sample, reference and candidate, and
    (for one vector per sample) those rows concatenated as float64 [N, C] if the caller has them."""
    first = np.asarray(reference[0]) if len(reference) else None
    if first is None or not np.issubdtype(first.dtype, np.floating) or first.ndim < 2:
        return {}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # non-finite outputs: NaN metrics
        if first.ndim == 2:
            if rows is None:
                rows = tuple(np.concatenate([np.asarray(a, np.float64) for a in side]) for side in (reference, candidate))
            return _vector_metrics(*rows)
        if _is_map(reference):
            return {"mask_iou": mask_iou(reference, candidate)}
        if first.ndim == 3 and first.shape[2] > 2:
            return {"token_error_rate": token_error_rate(reference, candidate)}
    return {}


def _vector_metrics(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Metrics of [N, C] rows by what they are (see the module docstring)."""
    if ref.shape[1] == 2:
        return {"positive_class_correlation": positive_class_correlation(ref, got)}
    if ref.shape[1] < 2:
        return {}
    result: dict[str, float] = {}
    probabilities = is_probability_rows(ref)
    if probabilities or not _unit_rows(ref):
        result["kl_divergence"] = kl_divergence(ref, got)
    if not probabilities and (rank := similarity_rank_correlation(ref, got)) is not None:
        result["similarity_rank_correlation"] = rank
    return result


def worst(per_output: Sequence[Mapping[str, float]]) -> dict[str, float | None]:
    """Each metric's worst over the outputs it applies to; None where none does."""
    return {name: (pick(values) if (values := [m[name] for m in per_output if name in m]) else None)
            for name, pick in WORST.items()}


def is_probability_rows(rows: np.ndarray) -> bool:
    """Rows along the last axis are probabilities: non-negative, each summing to 1."""
    return (rows.size > 0 and float(rows.min()) >= 0.0
            and bool(np.all(np.abs(rows.sum(axis=-1) - 1.0) < PROBABILITY_TOLERANCE)))


def _unit_rows(rows: np.ndarray) -> bool:
    return rows.size > 0 and bool(np.all(np.abs(np.linalg.norm(rows, axis=-1) - 1.0) < UNIT_NORM_TOLERANCE))


def _log_probabilities(rows: np.ndarray, probabilities: bool) -> np.ndarray:
    """log p per row: the log of probability rows (floored), else log-softmax of logits."""
    if probabilities:
        return np.log(np.maximum(rows, PROBABILITY_FLOOR))
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def kl_divergence(ref: np.ndarray, got: np.ndarray) -> float:
    """KL(p_ref || p_got) in nats, mean over rows: p is the softmax of each row, or the row itself
    when the reference's rows are already probabilities (then the candidate's are read so too)."""
    if ref.shape[0] == 0:
        return 0.0
    probabilities = is_probability_rows(ref)
    log_ref, log_got = _log_probabilities(ref, probabilities), _log_probabilities(got, probabilities)
    p = ref if probabilities else np.exp(log_ref)
    terms = p * (log_ref - log_got)  # both logs are finite (floored, or log-softmax): 0 log 0 gives 0
    return max(0.0, float(np.mean(np.sum(terms, axis=1))))  # rounding can dip below the true minimum 0


def positive_class_correlation(ref: np.ndarray, got: np.ndarray) -> float:
    """Pearson correlation of the class-1 probability of [N, 2] rows (softmax first when the
    reference's rows are logits). A constant side: 1.0 when both sides are identical, else 0.0."""
    if is_probability_rows(ref):
        return _correlation(ref[:, 1], got[:, 1])
    # softmax of two logits: the positive class's probability is the sigmoid of their difference
    return _correlation(_sigmoid(ref[:, 1] - ref[:, 0]), _sigmoid(got[:, 1] - got[:, 0]))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
    if denom == 0 or not np.isfinite(denom):
        return _constant(a, b)
    return float(np.dot(a, b) / denom)


def _constant(a: np.ndarray, b: np.ndarray) -> float:
    """A correlation where one side does not vary: the sides agree only when they are identical."""
    return 1.0 if np.array_equal(a, b) else 0.0


def similarity_rank_correlation(ref: np.ndarray, got: np.ndarray) -> float | None:
    """Spearman correlation between the pairwise cosine similarities of the reference's rows and
    those of the candidate's (upper triangle; the first MAX_EMBEDDING_ROWS rows): whether the
    candidate keeps which samples are near which. None below 3 rows (one pair ranks nothing)."""
    if ref.shape[0] < 3:
        return None
    upper = np.triu_indices(min(ref.shape[0], MAX_EMBEDDING_ROWS), k=1)
    sims = [_similarities(side[:MAX_EMBEDDING_ROWS])[upper] for side in (ref, got)]
    if np.ptp(sims[0]) == 0 or np.ptp(sims[1]) == 0:
        return _constant(*sims)
    from scipy.stats import spearmanr  # scipy.stats takes a while to import: only when needed

    return float(spearmanr(sims[0], sims[1]).statistic)


def _similarities(rows: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair of rows (a zero row is similar to nothing)."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit = rows / np.where(norms > 0, norms, 1.0)
    return unit @ unit.T


def _is_map(reference: Sequence[np.ndarray]) -> bool:
    """[N, 1, H, W] or [N, H, W] with values in [0, 1]; [N, T, C] rows of probabilities are a
    sequence's per-step scores instead."""
    first = np.asarray(reference[0])
    if not (first.ndim == 4 and first.shape[1] == 1 or first.ndim == 3):
        return False
    if not all(a.size and float(np.min(a)) >= 0.0 and float(np.max(a)) <= 1.0 for a in map(np.asarray, reference)):
        return False
    return first.ndim == 4 or not all(is_probability_rows(np.asarray(a)) for a in reference)


def mask_iou(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """IoU of the maps' masks (values above MASK_THRESHOLD), pooled over samples: every sample's
    intersection over every sample's union. 1.0 when both masks are empty."""
    inter = union = 0
    for ref, got in zip(reference, candidate):
        a, b = np.asarray(ref) > MASK_THRESHOLD, np.asarray(got) > MASK_THRESHOLD
        inter += int(np.count_nonzero(a & b))
        union += int(np.count_nonzero(a | b))
    return inter / union if union else 1.0


def token_error_rate(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Token error rate of the greedy decode of [N, T, C] per-step scores: per sample, the argmax
    per step, repeats collapsed, the blank dropped; total Levenshtein edits from the reference's
    decoded tokens to the candidate's over the total reference tokens.

    The blank is the class that is most often the argmax in the reference output: CTC outputs are
    mostly blank, and recognizers put it at index 0 or C-1, so neither is assumed. With no
    reference token at all the rate is 0.0 when the candidate decodes nothing either, else 1.0."""
    ref_steps = [np.argmax(a, axis=-1).reshape(-1, np.shape(a)[-2]) for a in reference]  # [n, T] per sample
    got_steps = [np.argmax(a, axis=-1).reshape(-1, np.shape(a)[-2]) for a in candidate]
    blank = int(np.argmax(np.bincount(np.concatenate([s.ravel() for s in ref_steps]))))
    edits = tokens = 0
    for ref, got in zip(ref_steps, got_steps):
        for r, g in zip(_decode(ref, blank), _decode(got, blank)):
            tokens += len(r)
            edits += 0 if np.array_equal(r, g) else edit_distance(r, g)
    if tokens == 0:
        return 0.0 if edits == 0 else 1.0
    return edits / tokens


def _decode(steps: np.ndarray, blank: int) -> list[np.ndarray]:
    """Greedy CTC decode of [n, T] argmax classes: repeats collapsed, then blanks dropped."""
    keep = steps != blank
    keep[:, 1:] &= steps[:, 1:] != steps[:, :-1]
    return [row[mask] for row, mask in zip(steps, keep)]


def edit_distance(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one token each), one numpy
    row per token of `a`: the insertion chain within a row is a running minimum."""
    b = np.asarray(b)
    offsets = np.arange(len(b) + 1)
    row = offsets.copy()  # distances from an empty prefix of a
    for i, token in enumerate(np.asarray(a), start=1):
        best = np.empty_like(row)
        best[0] = i
        best[1:] = np.minimum(row[1:] + 1, row[:-1] + (b != token))  # deletion, substitution
        # insertion: best[j] = min over k <= j of best[k] + (j - k)
        row = np.minimum.accumulate(best - offsets) + offsets
    return int(row[-1])

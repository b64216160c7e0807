"""Weight sharing (Deep Compression, Han et al. 2016): each weight tensor keeps only 2^bits distinct values.

Per tensor, optional unstructured magnitude pruning first (the smallest |w| set to exactly zero),
then 1-D k-means on the remaining weights; every weight is replaced by its centroid. The model
stays a plain float ONNX model (same ops, same dtypes), so it runs anywhere; the gain comes when
the `.occ` container (onnxcompress/pack/) stores such tensors as small indices plus a codebook
and entropy-codes the indices.

Exact zeros (pruned or already there) are a centroid of their own, so sparsity survives clustering.
K-means is Lloyd's algorithm on the sorted values: in one dimension each cluster is a contiguous
run of the sorted weights, so assignment is a binary search and the update is a difference of
prefix sums (O(n log n) once, O(k log n) per iteration); deterministic for a given seed.
Deep Compression found linear initialisation over [min, max] best (it keeps centroids for the
rare large weights that matter most); k-means++ is offered as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from ..pipeline import Pass, PassContext, PassResult, option

#: Element types the pass clusters (integer and quantized tensors are left as they are).
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
#: k-means++ seeds on at most this many weights (D^2 sampling is O(n k)); Lloyd then uses all of them.
KMEANS_PP_SAMPLE = 65536
#: Lloyd stops when no centroid moves by more than this fraction of the weights' range.
CONVERGED = 1e-9


@dataclass
class WeightShare(Pass):
    """Replace each float weight tensor by 2^bits shared values (k-means), after optional magnitude pruning."""

    name: ClassVar[str] = "weight-share"
    exact: ClassVar[bool] = False

    bits: int | None = option(5, "2**bits shared values per tensor (zero included when pruned); None: prune only.")
    sparsity: float = option(0.0, "Fraction of each tensor's smallest-magnitude weights set to zero first.")
    init: Literal["linear", "kmeans++"] = "linear"
    min_elements: int = option(1024, "Smaller tensors (biases, norms, scales) stay exact: they cost little and matter much.")
    skip: tuple[str, ...] = option((), "Initializer names, or names of nodes whose weights stay exact.")
    iterations: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bits is not None and not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8 (2 to 256 shared values), got {self.bits}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.bits is None and self.sparsity == 0.0:
            raise ValueError("weight-share needs bits, sparsity or both")
        if self.min_elements < 1:
            raise ValueError(f"min_elements must be >= 1, got {self.min_elements}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        skipped_by_node = {
            v.name for node in model.graph for v in node.inputs if v is not None and node.name in self.skip
        }
        changes, skipped = [], []
        small = 0
        total = zeros = 0
        worst_sqnr = float("inf")
        for value in list(model.graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or tensor.dtype not in FLOAT_TYPES:
                continue
            if value.name in self.skip or value.name in skipped_by_node:
                skipped.append(f"{value.name}: in the skip list")
                continue
            if tensor.size < self.min_elements:
                small += 1
                continue
            original = tensor.numpy()
            weights = original.astype(np.float64).ravel()
            if not np.all(np.isfinite(weights)):
                skipped.append(f"{value.name}: holds non-finite values")
                continue
            shared = share_weights(weights, bits=self.bits, sparsity=self.sparsity, init=self.init,
                                   iterations=self.iterations, seed=self.seed)
            new = shared.astype(original.dtype).reshape(original.shape)
            value.const_value = ir.tensor(np.ascontiguousarray(new), name=value.name)
            sqnr = _sqnr_db(weights, new.astype(np.float64).ravel())
            worst_sqnr = min(worst_sqnr, sqnr)
            total += new.size
            zeros += int(np.count_nonzero(new == 0))
            distinct = len(np.unique(new))
            changes.append(f"{value.name}: {new.size} weights -> {distinct} distinct values "
                           f"({np.mean(new == 0):.0%} zero, weight SQNR {sqnr:.1f} dB)")
        if small:
            skipped.append(f"{small} float initializers below min_elements {self.min_elements} left exact")
        details = {"bits": self.bits, "sparsity": self.sparsity, "tensors": len(changes), "weights": total,
                   "zero_fraction": zeros / total if total else 0.0,
                   "worst_weight_sqnr_db": worst_sqnr if changes else None}
        return self.result(model, changes=changes, skipped=skipped, details=details)


def share_weights(weights: np.ndarray, *, bits: int | None, sparsity: float = 0.0, init: str = "linear",
                  iterations: int = 50, seed: int = 0) -> np.ndarray:
    """`weights` (1-D float64) pruned to `sparsity` and clustered to 2^bits values (zero one of them)."""
    out = weights.copy()
    if sparsity > 0:
        count = round(sparsity * out.size)
        if count:
            out[np.argpartition(np.abs(out), count - 1)[:count]] = 0.0
    if bits is None:
        return out
    nonzero = out != 0
    k = 2**bits - (1 if not nonzero.all() else 0)  # exact zeros keep a centroid of their own
    if k >= 1 and nonzero.any():
        centroids = kmeans_1d(out[nonzero], k, init=init, iterations=iterations, seed=seed)
        out[nonzero] = centroids[assign(out[nonzero], centroids)]
    return out


def kmeans_1d(values: np.ndarray, k: int, *, init: str = "linear", iterations: int = 50, seed: int = 0) -> np.ndarray:
    """Sorted centroids of 1-D Lloyd k-means on `values` (fewer when there are fewer distinct values)."""
    x = np.sort(values.astype(np.float64))
    distinct = np.unique(x)
    if len(distinct) <= k:
        return distinct  # every value is its own centroid: no error at all
    if init == "linear":
        centroids = np.linspace(x[0], x[-1], k)
    elif init == "kmeans++":
        centroids = _kmeans_pp(x, k, np.random.default_rng(seed))
    else:
        raise ValueError(f"unknown init '{init}' (linear or kmeans++)")
    prefix = np.concatenate([[0.0], np.cumsum(x)])
    tolerance = CONVERGED * (x[-1] - x[0])
    for _ in range(iterations):
        # Cluster j is the run x[edges[j]:edges[j+1]]: values below the midpoint to the next centroid.
        edges = np.concatenate([[0], np.searchsorted(x, _midpoints(centroids), side="left"), [len(x)]])
        counts = np.diff(edges)
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        updated = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centroids))  # empty: stays put
        moved = float(np.max(np.abs(updated - centroids)))
        centroids = updated
        if moved <= tolerance:
            break
    return centroids


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted `centroids` for each value (ties go to the larger centroid)."""
    return np.searchsorted(_midpoints(centroids), values, side="right")


def _midpoints(centroids: np.ndarray) -> np.ndarray:
    return (centroids[1:] + centroids[:-1]) / 2


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    sample = x if len(x) <= KMEANS_PP_SAMPLE else x[np.sort(rng.choice(len(x), KMEANS_PP_SAMPLE, replace=False))]
    centroids = [sample[rng.integers(len(sample))]]
    distance = (sample - centroids[0]) ** 2
    for _ in range(k - 1):
        total = distance.sum()
        if total <= 0:
            break
        chosen = sample[rng.choice(len(sample), p=distance / total)]
        centroids.append(chosen)
        distance = np.minimum(distance, (sample - chosen) ** 2)
    return np.unique(np.asarray(centroids))


def _sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    noise = float(np.sum((reference - approx) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")

"""How much worse than the original a compressed model may be: one metric and one bound.

Shared by every tolerance-driven decision (the search in `search.py`, int8's float fallback), so
"within tolerance" means the same thing everywhere. All metrics compare a candidate's outputs with
the original's on the same inputs (see verify.compare); none needs labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import OnnxCompressError
from .report import Fidelity

Metric = Literal["top1", "cosine", "mse", "sqnr", "auto"]  # auto: top1 for class scores, else cosine
METRICS: tuple[str, ...] = ("top1", "cosine", "mse", "sqnr")

DESCRIPTIONS = {
    "top1": "fraction of samples whose top-1 class changes (needs class-score outputs [N, C])",
    "cosine": "1 - cosine similarity of the outputs (worst output)",
    "mse": "noise power / signal power of the outputs (relative MSE, worst output)",
    "sqnr": "output SQNR in dB (worst output); the bound is a minimum",
}


@dataclass(frozen=True)
class Tolerance:
    """`metric` and its `bound`: a maximum drop for top1, cosine and mse; a minimum dB for sqnr."""

    metric: Metric = "cosine"
    bound: float = 0.01

    def __post_init__(self) -> None:
        if self.metric not in (*METRICS, "auto"):
            raise OnnxCompressError(f"unknown metric '{self.metric}' (choose: {', '.join(METRICS)})")
        if self.metric == "sqnr":
            # At 0 dB the output error is as large as the output: no bound at or below it means anything.
            if not (math.isfinite(self.bound) and self.bound > 0):
                raise OnnxCompressError(f"the minimum SQNR must be a number of dB above 0, got {self.bound:g}")
            return
        # top1 and cosine drops are fractions; a relative MSE above 1 is more noise than signal.
        what = "the allowed drop" if self.metric == "auto" else f"the allowed {self.metric} drop"
        if not (math.isfinite(self.bound) and 0 <= self.bound <= 1):
            raise OnnxCompressError(f"{what} is a fraction in [0, 1], got {self.bound:g}")

    def resolved(self, reference_outputs) -> Tolerance:
        """This tolerance with metric "auto" replaced by the one that suits the model's outputs."""
        if self.metric != "auto":
            return self
        return Tolerance(default_metric(reference_outputs), self.bound)

    def value(self, fidelity: Fidelity) -> float:
        """The metric's value for `fidelity`: the drop (top1, cosine, mse) or the SQNR in dB."""
        if self.metric == "auto":
            raise ValueError("resolve an 'auto' tolerance against the model's outputs first (Tolerance.resolved)")
        if self.metric == "top1":
            if fidelity.top1_agreement is None:
                raise OnnxCompressError("metric top1 needs class-score outputs shaped [N, C]; use cosine, mse or sqnr")
            return 1.0 - fidelity.top1_agreement
        if self.metric == "cosine":
            return 1.0 - fidelity.cosine
        if self.metric == "mse":
            return 0.0 if fidelity.sqnr_db == math.inf else 10.0 ** (-fidelity.sqnr_db / 10.0)
        return fidelity.sqnr_db

    def loss(self, fidelity: Fidelity) -> float:
        """Lower is better for every metric (sqnr is negated), so searches can rank candidates."""
        v = self.value(fidelity)
        return -v if self.metric == "sqnr" else v

    def within(self, value: float) -> bool:
        """Whether a value of this metric meets the bound (a minimum for sqnr, a maximum otherwise)."""
        return value >= self.bound if self.metric == "sqnr" else value <= self.bound

    def accepts(self, fidelity: Fidelity) -> bool:
        flips = self._flips(fidelity)
        return self.within(self.value(fidelity)) and (flips is None or flips <= self.bound)

    def _flips(self, fidelity: Fidelity) -> float | None:
        """Changed 2-class decisions, which a drop bound also caps (top1 counts them itself)."""
        return fidelity.decisions_changed if self.metric in ("cosine", "mse") else None

    def describe(self) -> str:
        if self.metric == "sqnr":
            return f"output SQNR >= {self.bound:g} dB"
        return f"{self.metric} drop <= {self.bound:g}"

    def format_value(self, fidelity: Fidelity) -> str:
        v = self.value(fidelity)
        if self.metric == "sqnr":
            return f"SQNR {v:.1f} dB"
        flips = self._flips(fidelity)
        return f"{self.metric} drop {v:.4g}" + (f", 2-class decisions changed on {flips:.1%}" if flips else "")


#: The tolerance `optimize --calib` uses when none is given, by output kind: a bound int8 alone meets
#: on a good model, so the default result can be int8 (measured cosine drops of int8 alone, on
#: held-out calibration samples / on inputs from other sources, AVX-512 VNNI CPU, kernels "any":
#: EfficientNet-Lite0/1/2 0.0021/0.0023, 0.0024/0.0033, 0.0018/0.0028; PP-OCR angle classifier
#: 0.0014/0.0042; MiniLM sentence embeddings 0.0024/0.0035; PP-OCR text recognizer sequences
#: 0.0073/0.0139).
#: One vector per sample ([N, C]: class scores, embeddings): cosine drop <= 0.005 (about 20 dB SQNR).
DEFAULT_VECTOR_DROP = 0.005
#: Maps and sequences per sample (rank 3 and up: detection maps, per-step text-recognition scores,
#: token features): cosine drop <= 0.01 (about 17 dB).
DEFAULT_MAP_DROP = 0.01


def default_tolerance(reference_outputs) -> Tolerance:
    """The default tolerance for a model whose outputs on one batch are `reference_outputs`: the
    vector bound when any output is one vector per sample (the stricter), else the map bound."""
    first = reference_outputs[0] if reference_outputs else []
    vectors = any(np.ndim(o) <= 2 for o in first)
    return Tolerance("cosine", DEFAULT_VECTOR_DROP if vectors or not first else DEFAULT_MAP_DROP)


def describe_defaults() -> str:
    return (f"cosine drop <= {DEFAULT_VECTOR_DROP:g} when an output is one vector per sample ([N, C]: class "
            f"scores, embeddings), else <= {DEFAULT_MAP_DROP:g} (maps, sequences); on 2-class outputs the bound "
            "also caps the share of changed decisions")


def default_metric(reference_outputs) -> Metric:
    """top1 when every output looks like class scores [N, C], else cosine."""
    from .verify import _looks_like_scores

    first = reference_outputs[0] if reference_outputs else []
    return "top1" if first and all(_looks_like_scores(o) for o in first) else "cosine"

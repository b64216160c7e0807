"""Candidates: each form of a layer with its spectrum, and the factors of a chosen rank."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .forms import form_covariance, layer_forms, macs_per_rank, matrix, taps
from .layers import Layer
from .moments import Moments
from .truncation import balanced, output_sq_error, refit_second, spectrum, truncate


@dataclass
class Candidate:
    """One form of one layer with its spectrum (in the data's metric when data-aware)."""

    layer: Layer
    form: str
    sigma: np.ndarray
    per_rank: int  # MACs per unit of rank
    moments: Moments | None  # input statistics, when calibration data was collected
    whitened: bool

    @property
    def full_rank(self) -> int:
        return len(self.sigma)

    @property
    def break_even(self) -> float:
        """Ranks strictly below this save MACs."""
        return min(self.layer.macs / self.per_rank, self.full_rank)

    def loss(self, rank: int) -> float:
        """Discarded energy as a fraction of the total (relative squared weight or output error)."""
        total = float(np.sum(self.sigma**2))
        return float(np.sum(self.sigma[rank:] ** 2)) / total if total > 0 else 0.0


def candidates(layer: Layer, allowed: tuple[str, ...], moments: Moments | None) -> list[Candidate]:
    out = []
    cov = moments.covariance(layer.can_refit_bias) if moments is not None else None
    for form in layer_forms(layer, allowed):
        metric = form_covariance(layer, form, cov) if cov is not None else None
        sigma = spectrum(matrix(layer, form), metric)
        out.append(Candidate(layer, form, sigma, macs_per_rank(layer, form), moments, moments is not None))
    return out


def factors(cand: Candidate, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with A·B the rank-`rank` approximation of the form's matrix (output-aware when data-aware)."""
    a, b, _ = factors_with_source(cand, rank)
    return a, b


def factors_with_source(cand: Candidate, rank: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The factors and where the first came from: "svd" (plain), "output" (the output-optimal closed
    form), "whitened" or "svd+refit" (spatial/squeeze: whichever gave the smaller output error)."""
    layer, form = cand.layer, cand.form
    mat = matrix(layer, form)
    if not cand.whitened:
        return *truncate(mat, None, rank), "svd"
    cov = cand.moments.covariance(layer.can_refit_bias)
    a, b = truncate(mat, form_covariance(layer, form, cov), rank)
    if taps(layer, form) == 1:
        return a, b, "output"
    best: tuple[float, np.ndarray, np.ndarray, str] | None = None
    for first, source in ((a, "whitened"), (truncate(mat, None, rank)[0], "svd+refit")):
        second = refit_second(layer, form, first, cov)
        error = output_sq_error(layer, form, first @ second, cov)
        if best is None or error < best[0]:
            best = (error, first, second, source)
    return *balanced(best[1], best[2]), best[3]

"""Truncation: the best rank-r factors of a form's matrix, plainly (truncated SVD) or in the norm
of the layer's output error on calibration data (see the package docstring), from eigen-decompositions
of the smaller Gram matrix."""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .forms import io_matrix, taps, unmatrix
from .layers import Layer

#: Eigenvalues of the input covariance are floored at this fraction of the largest, so whitening
#: stays well conditioned when calibration inputs do not span every direction.
WHITEN_FLOOR = 1e-10


def _cholesky(cov: np.ndarray) -> np.ndarray:
    """Lower R with R·Rᵀ = cov + a ridge of WHITEN_FLOOR x the mean variance (more if needed), so that
    whitening stays well conditioned when the calibration inputs do not span every direction."""
    n = len(cov)
    ridge = WHITEN_FLOOR * max(float(np.trace(cov)) / n, 1e-30)
    while True:
        try:
            return np.linalg.cholesky(cov + ridge * np.eye(n))
        except np.linalg.LinAlgError:  # rounding made cov slightly indefinite
            ridge *= 100


def _gram(mat: np.ndarray, cov: np.ndarray | None) -> np.ndarray:
    """The smaller Gram matrix of Rᵀ·M (R·Rᵀ = cov; plain: of M): its eigenvalues are the squared
    singular values. Tall M needs no R at all (Mᵀ·cov·M)."""
    m, n = mat.shape
    if n <= m:
        return mat.T @ mat if cov is None else mat.T @ cov @ mat
    w = mat if cov is None else _cholesky(cov).T @ mat
    return w @ w.T


def spectrum(mat: np.ndarray, cov: np.ndarray | None = None) -> np.ndarray:
    """Singular values of M (plain) or of Rᵀ·M with R·Rᵀ = cov (data-aware), largest first."""
    values = scipy.linalg.eigvalsh(_gram(mat, cov))[::-1]
    return np.sqrt(np.clip(values, 0.0, None))


def _top_vectors(gram: np.ndarray, rank: int) -> np.ndarray:
    k = len(gram)
    return scipy.linalg.eigh(gram, subset_by_index=[k - rank, k - 1])[1][:, ::-1]


def truncate(mat: np.ndarray, cov: np.ndarray | None, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with A·B the best rank-`rank` approximation of M in the norm ||Rᵀ·(M - A·B)||_F (plain:
    the Frobenius norm, i.e. the truncated SVD). Tall M: the projection onto the top eigenvectors of
    Mᵀ·cov·M; wide M: truncated in the whitened space Rᵀ·M and mapped back through R⁻ᵀ."""
    m, n = mat.shape
    if n <= m:
        v = _top_vectors(_gram(mat, cov), rank)
        return balanced(mat @ v, v.T)
    root = _cholesky(cov) if cov is not None else None
    w = mat if root is None else root.T @ mat
    u = _top_vectors(w @ w.T, rank)
    a = u if root is None else scipy.linalg.solve_triangular(root.T, u, lower=False)
    return balanced(a, u.T @ w)


def balanced(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same product with each rank-one term's scale split evenly between the factors (U√σ, √σVᵀ)."""
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1)
    scale = np.ones_like(na)
    ok = (na > 0) & (nb > 0)
    scale[ok] = np.sqrt(nb[ok] / na[ok])
    return a * scale, b / scale[:, None]


def refit_second(layer: Layer, form: str, a: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """B minimising the layer's output error tr(ΔᵀΣΔ) on the full im2col covariance Σ for a fixed first
    factor A shared across the form's taps (the im2col weight is (A ⊗ I_taps)·B_io), by least squares."""
    t, (m, r), o = taps(layer, form), a.shape, layer.weight.shape[0]
    left = np.tensordot(a, cov.reshape(m, t, m, t), axes=([0], [0]))  # [r, t, m, t]
    rhs = left.reshape(r * t, m * t) @ io_matrix(layer.weight)
    gram = np.tensordot(left, a, axes=([2], [0])).transpose(0, 1, 3, 2).reshape(r * t, r * t)
    gram += WHITEN_FLOOR * max(float(np.trace(gram)) / len(gram), 1e-30) * np.eye(len(gram))
    try:
        b_io = scipy.linalg.solve(gram, rhs, assume_a="pos")
    except np.linalg.LinAlgError:
        b_io = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    return b_io.reshape(r, t, o).transpose(0, 2, 1).reshape(r, o * t)


def output_sq_error(layer: Layer, form: str, approx: np.ndarray, cov: np.ndarray) -> float:
    """tr(ΔᵀΣΔ): the layer's summed squared output error per input row for the form's matrix `approx`."""
    delta = io_matrix(layer.weight - unmatrix(layer, form, approx))
    return float(np.sum(delta * (cov @ delta)))

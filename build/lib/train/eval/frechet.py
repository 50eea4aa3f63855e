"""Fréchet distance between two Gaussians fitted to feature sets, in float64.

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

The trace term uses symmetric eigendecompositions and one SVD instead of scipy's general ``sqrtm``:
with ``A = S1^(1/2)`` and ``B = S2^(1/2)`` (symmetric PSD square roots by ``eigh``), S1 S2 is similar to
A S2 A = (A B)(A B)^T, so ``tr((S1 S2)^(1/2))`` is the sum of the singular values of ``A B`` (its
nuclear norm). Everything stays real: no complex parts to discard, no Newton iterations that diverge
on a rank-deficient covariance (fewer samples than feature dimensions is the normal case for FVD:
150 clips, 400 logits). Taking singular values of A B rather than square roots of the eigenvalues
of A S2 A (TF-GAN's and VideoGPT's route) matters: squaring first puts a small eigenvalue w at
w^2, below the round-off of the large ones, and the distance of a rank-deficient set to itself came
out at 3e-4 instead of ~1e-12 (tests/test_eval_frechet.py). Eigenvalues of S1, S2 within round-off of
zero (``D * eps * max|w|``, numpy's matrix_rank tolerance) count as 0, so that the square root does not
turn round-off into signal.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Gaussian:
    mean: np.ndarray   # (D,) float64
    cov: np.ndarray    # (D, D) float64, unbiased (N - 1)
    count: int


def fit(features: np.ndarray) -> Gaussian:
    """Mean and unbiased covariance of (N, D) features (np.cov's convention, as pytorch-fid and VideoGPT use)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {x.shape}")
    mean = x.mean(axis=0)
    xc = x - mean
    return Gaussian(mean, xc.T @ xc / (x.shape[0] - 1), int(x.shape[0]))


def _sqrt_eigenvalues(w: np.ndarray) -> np.ndarray:
    """sqrt of a PSD matrix's computed eigenvalues, those within round-off of zero (or negative) as 0."""
    tol = w.size * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    return np.where(w > tol, np.sqrt(np.clip(w, 0.0, None)), 0.0)


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (float64)."""
    a = np.asarray(a, dtype=np.float64)
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * _sqrt_eigenvalues(w)) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2: the nuclear norm of S1^(1/2) S2^(1/2)."""
    return float(np.linalg.svd(sqrtm_psd(s1) @ sqrtm_psd(s2), compute_uv=False).sum())


def frechet_distance(g1: Gaussian, g2: Gaussian) -> float:
    if g1.mean.shape != g2.mean.shape:
        raise ValueError(f"feature sizes differ: {g1.mean.shape} vs {g2.mean.shape}")
    diff = g1.mean - g2.mean
    fd = float(diff @ diff) + float(np.trace(g1.cov)) + float(np.trace(g2.cov)) - 2.0 * trace_sqrt_product(g1.cov, g2.cov)
    return fd  # not clipped: identical sets give ~1e-12 of either sign, anything more negative is a bug to see


def frechet_from_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(fit(a), fit(b))

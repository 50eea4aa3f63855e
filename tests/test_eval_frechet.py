"""The Fréchet distance (train/eval/frechet.py) against closed forms and an independent square root."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from train.eval.frechet import Gaussian, fit, frechet_distance, frechet_from_features, sqrtm_psd, trace_sqrt_product


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def _closed_form(mu1, a, mu2, b) -> float:
    """Commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def _features_with(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n samples whose sample mean and unbiased sample covariance are exactly ``mean`` and ``cov``."""
    z = np.random.default_rng(seed).standard_normal((n, mean.size))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(z.T @ z / (n - 1))).T      # sample cov = I exactly
    return mean + z @ np.linalg.cholesky(cov).T


@pytest.mark.parametrize("rotate", [False, True], ids=["diagonal", "commuting"])
def test_matches_the_closed_form_on_known_gaussians(rotate):
    d = 12
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 5.0, d), rng.uniform(0.1, 5.0, d)
    mu1, mu2 = rng.normal(0, 2, d), rng.normal(0, 2, d)
    q = _rotation(d, 2) if rotate else np.eye(d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    want = _closed_form(mu1, a, mu2, b)
    got = frechet_distance(Gaussian(mu1, s1, 0), Gaussian(mu2, s2, 0))
    assert got == pytest.approx(want, rel=1e-9)
    # and from features whose sample statistics are those Gaussians (fit: mean, unbiased covariance)
    f1, f2 = _features_with(mu1, s1, 50, 3), _features_with(mu2, s2, 70, 4)
    assert frechet_from_features(f1, f2) == pytest.approx(want, rel=1e-6)


def test_a_known_pair_by_hand():
    # N(0, diag(1, 4)) vs N((3, 4), diag(4, 1)): 25 + (1 - 2)^2 + (2 - 1)^2 = 27
    g1 = Gaussian(np.zeros(2), np.diag([1.0, 4.0]), 0)
    g2 = Gaussian(np.array([3.0, 4.0]), np.diag([4.0, 1.0]), 0)
    assert frechet_distance(g1, g2) == pytest.approx(27.0, rel=1e-12)


def test_general_covariances_match_scipy_sqrtm_and_the_naive_formula_does_not():
    d = 20
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((d, 3 * d)), rng.standard_normal((d, 3 * d)) * rng.uniform(0.2, 3, (d, 1))
    s1, s2 = x @ x.T / d, y @ y.T / d + 0.3 * np.ones((d, d))             # do not commute
    ref = np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert trace_sqrt_product(s1, s2) == pytest.approx(ref, rel=1e-8)
    # the shortcut tr(sqrt(S1) sqrt(S2)) is exact only for commuting matrices: the test above would catch it
    naive = np.trace(sqrtm_psd(s1) @ sqrtm_psd(s2))
    assert abs(naive - ref) / ref > 1e-3


def test_rank_deficient_sets_fewer_samples_than_dimensions():
    rng = np.random.default_rng(7)
    f = rng.standard_normal((10, 400))                                     # 10 clips, 400 logits
    g = fit(f)
    assert np.linalg.matrix_rank(g.cov) == 9
    assert abs(frechet_from_features(f, f.copy())) < 1e-9
    shifted = frechet_from_features(f, f + 0.5)
    assert shifted == pytest.approx(400 * 0.25, rel=1e-9)                  # only the means differ


def test_float64_throughout():
    f = (np.random.default_rng(0).standard_normal((30, 8)) * 1e3).astype(np.float32)
    g = fit(f)
    assert g.mean.dtype == np.float64 and g.cov.dtype == np.float64
    assert np.allclose(g.cov, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="at least 2"):
        fit(np.zeros((1, 4)))


def test_a_set_against_itself_is_zero_to_round_off_even_with_a_wide_spectrum():
    """Covariance eigenvalues from 100 down to 1e-10 (features scaled 10 .. 1e-5, as a random feature net
    gives): the nuclear-norm route stays at round-off; taking square roots of the eigenvalues of
    S1^(1/2) S2 S1^(1/2) (the TF-GAN / VideoGPT route) squares the small ones below round-off first."""
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((128, 128)))[0]
    f = rng.standard_normal((128, 128)) @ np.diag(np.logspace(1, -5, 128)) @ q
    g = fit(f)
    tr = np.trace(g.cov)
    assert abs(frechet_from_features(f, f.copy())) < 1e-12 * tr
    a = sqrtm_psd(g.cov)
    squared_route = 2 * tr - 2 * np.sqrt(np.clip(np.linalg.eigvalsh(a @ g.cov @ a), 0, None)).sum()
    assert abs(squared_route) > 1e-8 * tr

"""One implementation of ESS / split R-hat / MCSE (`degenjax.convergence`) against closed forms and NumPy."""

import numpy as np
import pytest

import degenjax as dj


def _split_rhat_numpy(x):
    """Split R-hat (Gelman et al., BDA3 eq. 11.4) in float64 NumPy."""
    half = x.shape[1] // 2
    s = np.concatenate([x[:, :half], x[:, x.shape[1] - half:]], axis=0)
    n = s.shape[1]
    w = np.mean(np.var(s, axis=1, ddof=1))
    b = n * np.var(np.mean(s, axis=1), ddof=1)
    return np.sqrt(((n - 1) / n * w + b / n) / w)


def _ar1(rng, phi, chains, draws):
    x = np.zeros((chains, draws))
    x[:, 0] = rng.normal(size=chains) / np.sqrt(1 - phi ** 2)
    for t in range(1, draws):
        x[:, t] = phi * x[:, t - 1] + rng.normal(size=chains)
    return x


def test_ess_of_ar1_matches_closed_form():
    # AR(1) with coefficient phi: integrated autocorrelation time (1 + phi) / (1 - phi)
    rng = np.random.default_rng(0)
    phi, chains, draws = 0.8, 8, 4000
    c = dj.convergence(_ar1(rng, phi, chains, draws))
    expected = chains * draws * (1 - phi) / (1 + phi)
    assert abs(c.ess / expected - 1) < 0.15
    assert abs(c.rhat - 1) < 0.01 and c.converged and c.message == ""
    # MCSE of the mean: sd / sqrt(ESS); the stationary sd of AR(1) is 1 / sqrt(1 - phi^2)
    assert abs(c.mcse / (1 / np.sqrt(1 - phi ** 2) / np.sqrt(expected)) - 1) < 0.1


def test_rhat_matches_numpy_split_rhat():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 200)) + np.array([0.0, 0.0, 0.6, -0.6])[:, None]
    c = dj.convergence(x)
    assert c.rhat == pytest.approx(_split_rhat_numpy(x), rel=1e-6)
    assert not c.converged and "R-hat" in c.message


def test_undefined_cases_are_nan_and_not_converged():
    rng = np.random.default_rng(2)
    short = dj.convergence(rng.normal(size=(4, 2)))  # too short for split R-hat: both NaN, never a number and a NaN
    assert np.isnan(short.ess) and np.isnan(short.rhat) and not short.converged and "too few" in short.message
    bad = rng.normal(size=(4, 50))
    bad[1, 7] = np.nan
    c = dj.convergence(bad)
    assert np.isnan(c.ess) and not c.converged and "non-finite" in c.message
    flat = dj.convergence(np.ones((2, 50)))
    assert np.isnan(flat.rhat) and not flat.converged
    with pytest.raises(ValueError, match="chains, draws"):
        dj.convergence(np.zeros((2, 3, 4)))


def test_low_ess_is_not_converged():
    rng = np.random.default_rng(3)
    c = dj.convergence(_ar1(rng, 0.99, 4, 300))  # ESS ~ 1200 * 0.01 / 1.99 = 6
    assert c.ess < 100 and not c.converged and "ESS" in c.message

"""benchmarks/llc_ground_truth.py: the exact sampler of the localized tempered posterior of a linear network, checked
against the closed form of the one-layer (regular, Gaussian) case, and the battery loss = its quadratic form."""

import math
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import llc_ground_truth as truth


def test_exact_sampler_matches_the_gaussian_closed_form():
    # one layer: L(W) = tr((W - T)^T S (W - T)) is Gaussian under exp(-nbeta L - gamma/2 |W - T|^2); per output column
    # and eigenvalue s_i of S, n beta E[L] = n beta s_i / (2 n beta s_i + gamma)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3))
    s = a @ a.T / 3 + 0.05 * np.eye(3)
    t = rng.normal(size=(3, 2))
    nbeta, gamma = 200.0, 3.0
    row = truth.sample_exact([t], s, t, nbeta, gamma, num_warmup=150, num_samples=400, num_chains=2)
    exact = 2 * sum(nbeta * e / (2 * nbeta * e + gamma) for e in np.linalg.eigvalsh(s))
    assert exact < 2.9  # the localization matters here (3.0 without it), so the check sees gamma
    assert abs(row["lambda_ideal"] - exact) <= max(4 * row["se"], 0.03 * exact), (row["lambda_ideal"], exact)
    assert row["rhat_loss"] < 1.05
    # the top curvature of U at w*: 2 nbeta max(s) + gamma
    assert row["curvature_at_w_star"] == pytest.approx(2 * nbeta * np.linalg.eigvalsh(s)[-1] + gamma, rel=1e-8)


def test_battery_case_loss_is_the_quadratic_form():
    # build() asserts the battery loss on a perturbed point equals tr((P - T)^T S (P - T)); w* is a zero of it
    ws, s, t, exact = truth.build("dln3333", 500)
    prod = ws[0] @ ws[1] @ ws[2]
    assert np.allclose(prod, t, atol=1e-10)
    assert exact == 4.0
    assert np.allclose(s, s.T) and np.all(np.linalg.eigvalsh(s) > 0)
    assert math.isclose(float(np.trace(s)) / 3, 1.0, rel_tol=0.2)  # X ~ N(0, I)


def test_gaussian_value_is_the_laplace_approximation_of_the_dense_hessian():
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    nbeta, gamma = 500.0, 10.0
    # one layer: Hessian 2 S (x) I, so 1/2 sum n beta h / (n beta h + gamma) = d_out sum_i n beta s_i / (2 n beta s_i
    # + gamma) (the closed form of the test above)
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 4))
    s = a @ a.T / 4 + 0.05 * np.eye(4)
    t = rng.normal(size=(4, 3))
    value, rank = truth.gaussian_value([t], s, nbeta, gamma)
    assert rank == 12
    assert value == pytest.approx(3 * sum(nbeta * e / (2 * nbeta * e + gamma) for e in np.linalg.eigvalsh(s)),
                                  rel=1e-10)
    # a generic three-layer point against the eigenvalues of the dense float64 Hessian of the quadratic form
    ws, s, t, exact = truth.build("gdln-5-10-10-10-5", 500)
    shapes = [w.shape for w in ws]
    w0 = np.concatenate([w.ravel() for w in ws])

    def loss(v):
        out, i = [], 0
        for shp in shapes:
            out.append(v[i:i + shp[0] * shp[1]].reshape(shp))
            i += shp[0] * shp[1]
        e = jnp.linalg.multi_dot(out) - t
        return jnp.sum(e * (jnp.asarray(s) @ e))

    h = np.linalg.eigvalsh(np.asarray(jax.hessian(loss)(jnp.asarray(w0))))
    h = h[h > 1e-9 * h.max()]
    value, rank = truth.gaussian_value(ws, s, nbeta, gamma)
    assert rank == h.size == 2 * exact  # a submersion: d_in d_out = 25 nonzero curvatures
    assert value == pytest.approx(0.5 * np.sum(nbeta * h / (nbeta * h + gamma)), rel=1e-9)
    assert truth.gaussian_value(ws, s, nbeta, 1e-9)[0] == pytest.approx(exact, rel=1e-9)

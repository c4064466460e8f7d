"""Stochastic Lanczos quadrature: Gauss-rule exactness, null-space counts vs the exact count, sharded == unsharded.

Count tolerances come from the exact variance of Hutchinson's estimator with Rademacher probes,
Var(z^T P z) = 2 (||P||_F^2 - sum_i P_ii^2), computed here in NumPy from the exact null-space projector P.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import degenjax as dj
from conftest import assert_trees_all_close


def _rotated(spectrum, seed=0):
    rng = np.random.default_rng(seed)
    d = len(spectrum)
    u, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = (u * np.asarray(spectrum)[None, :]) @ u.T
    return 0.5 * (a + a.T)


def _null_count_stderr(a, threshold, num_probes):
    """Exact standard error of the Rademacher Hutchinson estimate of #(eigenvalues < threshold)."""
    w, v = np.linalg.eigh(a)
    proj = v[:, w < threshold] @ v[:, w < threshold].T
    return int(np.sum(w < threshold)), np.sqrt(2.0 * (np.sum(proj**2) - np.sum(np.diag(proj) ** 2)) / num_probes)


def test_gauss_quadrature_moments_are_exact():
    # m Lanczos steps give a Gauss rule exact for polynomials of degree <= 2m - 1. For a diagonal matrix every
    # Rademacher probe v = z / sqrt(d) has v^T A^j v = mean(lambda^j).
    lam = np.linspace(0.5, 1.5, 30) ** 2
    m = 5
    sd = jax.jit(lambda a, key: dj.spectral_density(a, key=key, num_probes=3, num_lanczos=m))(np.diag(lam),
                                                                                              jax.random.key(0))
    assert isinstance(sd, dj.SpectralDensity) and sd.nodes.shape == (3, m) and sd.weights.shape == (3, m)
    for j in range(2 * m):
        moments = np.sum(np.asarray(sd.weights) * np.asarray(sd.nodes) ** j, axis=1)
        assert_trees_all_close(moments, np.full(3, np.mean(lam**j)), rtol=1e-10)
    assert_trees_all_close(sd.trace(lambda x: x**3)[0], np.sum(lam**3), rtol=1e-10)
    # Gauss nodes lie inside the spectrum's range [0.25, 2.25]: nothing below it, everything below its top.
    assert float(sd.count_below(0.25)) == 0.0
    assert_trees_all_close(sd.count_below(2.25 + 1e-9), 30.0, rtol=1e-12)


def test_count_null_space_dense_vmap_over_keys():
    rng = np.random.default_rng(1)
    d, n0, num_probes = 192, 40, 16
    a = _rotated(np.concatenate([np.zeros(n0), rng.uniform(1.0, 3.0, d - n0)]), seed=1)
    exact, stderr = _null_count_stderr(a, 0.5, num_probes)
    assert exact == n0

    def count(key):
        sd = dj.spectral_density(a, key=key, num_probes=num_probes, num_lanczos=30)
        return sd.count_below(0.5), sd.count_below_stderr(0.5)

    estimates, stderrs = jax.jit(jax.vmap(count))(jax.random.split(jax.random.key(2), 2))
    for est, se in zip(np.asarray(estimates), np.asarray(stderrs)):
        assert abs(est - n0) <= 4.0 * stderr, (est, n0, stderr)
        # The sample standard error over 16 probes estimates the exact one to ~18% (chi distribution, 15 dof).
        assert 0.4 * stderr <= se <= 2.0 * stderr, (se, stderr)


def test_count_null_space_implicit_gram():
    rng = np.random.default_rng(3)
    jac = rng.standard_normal((40, 96))  # J^T J: null space of dimension 56, spectrum otherwise >= ~12
    gram = jac.T @ jac
    exact, stderr = _null_count_stderr(gram, 1.0, 16)
    assert exact == 56
    matvec = lambda x: jac.T @ (jac @ x)  # noqa: E731
    sd = jax.jit(lambda key: dj.spectral_density(matvec, key=key, num_probes=16, num_lanczos=48, dim=96))(
        jax.random.key(4))
    assert abs(float(sd.count_below(1.0)) - exact) <= 4.0 * stderr
    # The smoothed density integrates to d (a sum of unit Gaussians per quadrature node, weights summing to 1).
    grid = np.linspace(-20.0, 320.0, 4001)
    dens = np.asarray(sd.density(grid, 2.0))
    assert_trees_all_close(np.sum(0.5 * (dens[1:] + dens[:-1]) * np.diff(grid)), 96.0, rtol=1e-6)
    # Trace: Hutchinson on tr(J^T J) = ||J||_F^2, exact variance 2 (||G||_F^2 - sum G_ii^2) / probes.
    tr_stderr = np.sqrt(2.0 * (np.sum(gram**2) - np.sum(np.diag(gram) ** 2)) / 16)
    assert abs(float(sd.trace(lambda x: x)[0]) - np.trace(gram)) <= 4.0 * tr_stderr


def _run(a, mesh):
    return dj.spectral_density(a, key=jax.random.key(6), num_probes=4, num_lanczos=12, mesh=mesh)


@functools.cache
def _unsharded_reference():
    a = _rotated(np.concatenate([np.zeros(8), np.linspace(1.0, 2.0, 56)]), seed=5)
    return a, jax.jit(lambda a: _run(a, None))(a)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_sharded_equals_unsharded(num_devices, axis_type):
    mesh = jax.make_mesh((num_devices,), ("x",), axis_types=(axis_type,))
    a, reference = _unsharded_reference()
    sharded = jax.jit(lambda a: _run(a, mesh))(jax.device_put(a, NamedSharding(mesh, P("x", None))))
    assert_trees_all_close(sharded.nodes, reference.nodes, atol=1e-10)
    assert_trees_all_close(sharded.weights, reference.weights, atol=1e-10)
    # Independent check of the reference itself: weights are a probability vector per probe, nodes in the range.
    assert_trees_all_close(np.sum(np.asarray(reference.weights), axis=1), np.ones(4), rtol=1e-12)
    assert float(jnp.min(reference.nodes)) >= -1e-10 and float(jnp.max(reference.nodes)) <= 2.0 + 1e-10


@pytest.mark.parametrize("call,match", [
    (lambda a: dj.spectral_density(a, key=jax.random.key(0), num_probes=2, num_lanczos=17), "num_lanczos"),
    (lambda a: dj.spectral_density(a, key=jax.random.key(0), num_probes=0, num_lanczos=4), "num_probes"),
    (lambda a: dj.spectral_density(lambda x: a @ x, key=jax.random.key(0), num_probes=2, num_lanczos=4), "dim"),
    (lambda a: dj.spectral_density(lambda x: (a @ x).T, key=jax.random.key(0), num_probes=2, num_lanczos=4,
                                   dim=16), "wrong shape"),
    (lambda a: dj.spectral_density(a + np.triu(a, 1), key=jax.random.key(0), num_probes=2, num_lanczos=4),
     "not symmetric"),
    (lambda a: dj.spectral_density(np.where(np.eye(16) > 0, np.inf, a), key=jax.random.key(0), num_probes=2,
                                   num_lanczos=4), "NaN"),
    (lambda a: dj.spectral_density(a[:4], key=jax.random.key(0), num_probes=2, num_lanczos=4), "square"),
])
def test_errors(call, match):
    a = _rotated(np.linspace(1.0, 2.0, 16), seed=7)
    with pytest.raises(ValueError, match=match):
        call(a)


@pytest.mark.parametrize("dtype,scales", [(np.float32, (1e-20, 1e20)), (np.float64, (1e-300, 1e200))])
def test_counts_are_scale_invariant(dtype, scales):
    # 8 exact zeros below a gap, at an extreme scale. The null-space component of each probe is one Krylov
    # direction with eigenvalue 0, so the quadrature weight below the gap is exactly v^T P v (v = z / sqrt(d), P the
    # null-space projector), and the Gauss rule reproduces v^T A v: both recomputed in float64 NumPy.
    d = 40
    a = _rotated(np.concatenate([np.zeros(8), np.linspace(1.0, 2.0, d - 8)]), seed=9)
    w, v = np.linalg.eigh(a)
    proj = v[:, w < 0.5] @ v[:, w < 0.5].T
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    with jax.enable_x64(dtype == np.float64):  # float32 with x64 off is JAX's default
        run = jax.jit(lambda a: dj.spectral_density(a, key=jax.random.key(0), num_probes=4, num_lanczos=20))
        z = np.asarray(jax.random.rademacher(jax.random.key(0), (d, 4), dtype=dtype), np.float64)  # the probes
        for scale in scales:
            sd = run(jnp.asarray((a * scale).astype(dtype)))
            nodes, weights = np.asarray(sd.nodes, np.float64) / scale, np.asarray(sd.weights, np.float64)
            assert np.all(np.isfinite(nodes))
            assert np.min(nodes) >= -1e-3 and np.max(nodes) <= 2.0 + 1e-3  # inside the spectrum's range
            np.testing.assert_allclose(np.sum(weights * (nodes < 0.5), axis=1),
                                       np.einsum("dp,de,ep->p", z, proj, z) / d, rtol=100 * rtol)
            np.testing.assert_allclose(d * np.sum(weights * nodes, axis=1), np.einsum("dp,de,ep->p", z, a, z),
                                       rtol=rtol)
        # A zero matrix: every eigenvalue is 0.
        sd = run(jnp.zeros((d, d), dtype))
        assert float(sd.count_below(1e-30)) == d and float(sd.count_below(0.0)) == 0.0

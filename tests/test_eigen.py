"""Dense and top-k eigensolvers against float64 numpy.linalg.eigh; sharded == unsharded; no d x d gather in HLO.

Tolerances for the iterative solver come from a-posteriori bounds on the returned Ritz pairs, recomputed here
in NumPy: for a unit Ritz vector v with residual r = A v - theta v some eigenvalue lies within ||r|| of theta, and
the sine of the largest principal angle between the Ritz subspace and the true one is at most
||R||_F / gap (Davis-Kahan), gap the distance from the Ritz values to the rest of the spectrum.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import degenjax as dj
from conftest import assert_trees_all_close


def _rotated(spectrum, seed=0):
    """Symmetric matrix U diag(spectrum) U^T with a Haar-random orthogonal U; returns (A, U)."""
    rng = np.random.default_rng(seed)
    d = len(spectrum)
    u, r = np.linalg.qr(rng.standard_normal((d, d)))
    u = u * np.sign(np.diag(r))[None, :]
    a = (u * np.asarray(spectrum)[None, :]) @ u.T
    return 0.5 * (a + a.T), u


def _max_angle(x, y):
    return float(np.max(scipy.linalg.subspace_angles(np.asarray(x, np.float64), np.asarray(y, np.float64))))


def _reference(a):
    w, v = np.linalg.eigh(np.asarray(a, np.float64))
    return w[::-1], v[:, ::-1]


# ----------------------------------------------------------------------------------------------------------------
# dense eigh


def _check_dense(a, values, vectors):
    a = np.asarray(a, np.float64)
    w_ref, _ = _reference(a)
    scale = np.max(np.abs(w_ref))
    values, vectors = np.asarray(values), np.asarray(vectors)
    # Backward-stable dense solvers: eigenvalue error <= c d eps ||A||.
    assert_trees_all_close(values, w_ref, atol=1e-12 * scale, rtol=0)
    assert_trees_all_close(vectors.T @ vectors, np.eye(a.shape[0]), atol=1e-12)
    assert_trees_all_close((vectors * values[None, :]) @ vectors.T, a, atol=1e-12 * scale)


@pytest.mark.parametrize("spectrum", [
    np.linspace(-3.0, 5.0, 24),                                     # distinct, indefinite
    np.concatenate([np.zeros(10), np.linspace(1.0, 2.0, 14)]),      # rank-deficient (10-dim null space)
    np.repeat([4.0, 1.0, -2.0], 8),                                 # three 8-fold repeated eigenvalues
])
def test_eigh_matches_numpy(spectrum):
    a, u = _rotated(spectrum)
    values, vectors = jax.jit(dj.eigh)(a)
    assert values.dtype == jnp.float64 and vectors.dtype == jnp.float64
    _check_dense(a, values, vectors)
    # Eigenspaces of repeated eigenvalues (and the null space) by principal angles to the construction's U.
    order = np.argsort(-np.asarray(spectrum), kind="stable")
    spec_sorted = np.asarray(spectrum)[order]
    for lam in np.unique(spectrum):
        cols = np.flatnonzero(np.isclose(spec_sorted, lam))
        assert _max_angle(np.asarray(vectors)[:, cols], u[:, order[cols]]) < 1e-10


def test_eigh_symmetrises_and_promotes():
    a, _ = _rotated(np.linspace(0.5, 2.0, 12), seed=1)
    noise = 1e-9 * np.random.default_rng(2).standard_normal(a.shape)
    values, vectors = dj.eigh(a + noise, symmetry_rtol=1e-6)
    _check_dense(0.5 * (a + noise + (a + noise).T), values, vectors)
    values32, vectors32 = dj.eigh(a.astype(np.float32))
    assert values32.dtype == jnp.float64  # float64 where x64 is enabled
    assert_trees_all_close(values32, _reference(a.astype(np.float32))[0], atol=1e-12)


def test_eigh_vmap():
    mats = np.stack([_rotated(np.linspace(-1.0, 1.0, 9) * (i + 1), seed=i)[0] for i in range(3)])
    values, vectors = jax.jit(jax.vmap(dj.eigh))(mats)
    for i in range(3):
        _check_dense(mats[i], values[i], vectors[i])


def test_eigh_gathers_a_row_sharded_matrix(num_devices):
    a, _ = _rotated(np.linspace(-1.0, 3.0, 16), seed=14)
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((num_devices,), ("x",), axis_types=(axis_type,))
        values, vectors = jax.jit(dj.eigh)(jax.device_put(a, NamedSharding(mesh, P("x", None))))
        _check_dense(a, values, vectors)


@pytest.mark.parametrize("bad,match", [
    (np.ones((3, 4)), "square"),
    (np.ones(3), "square"),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), "NaN"),
    (np.array([[1.0, 2.0], [0.0, 1.0]]), "not symmetric"),
    (np.eye(2) * (1 + 1j), "complex"),
])
def test_eigh_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        dj.eigh(bad)


# ----------------------------------------------------------------------------------------------------------------
# eigh_topk


def _check_topk(a, result, k, *, tol):
    """Checks a top-k result against numpy.linalg.eigh with residual-based bounds (module docstring)."""
    a = np.asarray(a, np.float64)
    w_ref, v_ref = _reference(a)
    values, vectors = np.asarray(result.values), np.asarray(result.vectors, np.float64)
    assert values.shape == (k,) and vectors.shape == (a.shape[0], k)
    assert np.all(np.diff(values) <= 0), "values must be descending"
    assert_trees_all_close(vectors.T @ vectors, np.eye(k), atol=1e-10)
    resid = np.linalg.norm(a @ vectors - vectors * values[None, :], axis=0)  # recomputed independently
    assert_trees_all_close(resid, result.residuals, atol=1e-12 * np.max(np.abs(w_ref)), rtol=1e-6)
    assert np.max(resid) <= tol * np.max(np.abs(w_ref)) * (1 + 1e-6), "stopping rule not met"
    # Weyl-type bound: an eigenvalue lies within ||r_i|| of theta_i (for these spectra, the i-th largest).
    assert np.all(np.abs(values - w_ref[:k]) <= resid + 1e-13 * np.max(np.abs(w_ref)))
    gap = w_ref[k - 1] - w_ref[k]
    if gap > 1e-6:  # Davis-Kahan sin(theta) bound for the whole top-k subspace
        assert np.sin(_max_angle(vectors, v_ref[:, :k])) <= np.linalg.norm(resid) / (values[-1] - w_ref[k]) + 1e-12


D, K, TOL = 128, 6, 1e-8
SPECTRA = {
    "decaying": 0.8 ** np.arange(D),
    "flat_top": np.concatenate([np.ones(K), 0.2 * np.ones(D - K)]),
    "flat": np.ones(D),
    "clustered": np.concatenate([np.repeat([3.0, 2.0], 3) + 1e-9 * np.arange(6), np.linspace(1.0, 0.0, D - 6)]),
    # rank 3 < b = k + oversample: A Q is rank-deficient every iteration (random completion of the block)
    "rank_deficient": np.concatenate([[3.0, 2.0, 1.0], np.zeros(D - 3)]),
    # the k of largest magnitude, returned in descending order
    "indefinite": np.concatenate([[5.0, -4.0, 3.0, -2.5, 2.0, -1.8], np.linspace(-1.0, 1.0, D - 6)]),
}
# One compiled solver shared by the tests below (jit caches on shapes and static arguments).
_solve = jax.jit(dj.eigh_topk, static_argnums=1, static_argnames=("tol", "mesh"))


@pytest.mark.parametrize("name", list(SPECTRA))
def test_topk_matches_numpy(name):
    a, _ = _rotated(SPECTRA[name], seed=3)
    result = _solve(a, K, key=jax.random.key(0), tol=TOL)
    assert int(result.iterations) < 200
    if name == "indefinite":
        assert_trees_all_close(result.values, np.array([5.0, 3.0, 2.0, -1.8, -2.5, -4.0]), atol=1e-8)
    else:
        _check_topk(a, result, K, tol=TOL)
    if name == "rank_deficient":
        assert_trees_all_close(result.values, np.array([3.0, 2.0, 1.0, 0.0, 0.0, 0.0]), atol=1e-12)


def test_topk_implicit_gram():
    rng = np.random.default_rng(6)
    jac = rng.standard_normal((50, 96)) * (0.7 ** np.arange(96))[None, :]
    matvec = lambda x: jac.T @ (jac @ x)  # noqa: E731  (J^T J applied without forming it)
    implicit = jax.jit(lambda key: dj.eigh_topk(matvec, 4, key=key, dim=96, tol=1e-9))(jax.random.key(3))
    _check_topk(jac.T @ jac, implicit, 4, tol=1e-9)  # against numpy.linalg.eigh of the dense Gram


def test_topk_vmap_float32_blocks():
    # A batch of float32 matrices under vmap: float32 blocks, float64 projected problem and values.
    mats = np.stack([_rotated(0.6 ** np.arange(32) * (i + 1), seed=8 + i)[0] for i in range(3)]).astype(np.float32)
    solve = jax.jit(jax.vmap(lambda a: dj.eigh_topk(a, 3, key=jax.random.key(0))))
    result = solve(mats)
    assert result.vectors.dtype == jnp.float32 and result.values.dtype == jnp.float64
    for i in range(3):
        # float32 blocks (default tol 1e-4): Ritz values accurate to ~ ||r||^2 / gap + eps32 ||A|| sqrt(d) < 1e-5.
        assert_trees_all_close(result.values[i], (i + 1) * 0.6 ** np.arange(3), atol=1e-5 * (i + 1))
        resid = np.linalg.norm(mats[i].astype(np.float64) @ np.asarray(result.vectors[i], np.float64)
                               - np.asarray(result.vectors[i], np.float64) * np.asarray(result.values[i])[None, :],
                               axis=0)
        assert np.max(resid) <= 1e-4 * (i + 1) + 1e-5 * (i + 1)  # stopping rule, up to float32 rounding of A V


_COLLECTIVE_OPS = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def _collectives(hlo):
    """(op name, [result shapes]) of every collective instruction in compiled HLO text."""
    found = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s+([a-z-]+)\(", line)
        if m and m.group(2).removesuffix("-start") in _COLLECTIVE_OPS:
            shapes = [tuple(int(s) for s in dims.split(",") if s)
                      for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1))]
            found.append((m.group(2).removesuffix("-start"), shapes))
    return found


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_topk_sharded_no_dxd_gather_and_equals_unsharded(num_devices, axis_type):
    mesh = jax.make_mesh((num_devices,), ("x",), axis_types=(axis_type,))
    a, _ = _rotated(SPECTRA["decaying"], seed=3)
    a_sharded = jax.device_put(a, NamedSharding(mesh, P("x", None)))
    # Explicit: the mesh is taken from the input's sharded type; Auto: passed in.
    solve = jax.jit(lambda a, key: dj.eigh_topk(a, K, key=key, tol=TOL,
                                                mesh=None if axis_type == AxisType.Explicit else mesh))
    compiled = solve.lower(a_sharded, jax.random.key(0)).compile()
    found = _collectives(compiled.as_text())
    b = K + 10  # default oversample
    assert any(op == "all-gather" for op, _ in found), "expected the (d, b) block all-gather"
    for op, shapes in found:
        for shape in shapes:
            assert int(np.prod(shape)) <= D * b, f"{op} of shape {shape} moves more than a (d, k + p) block"
        if op == "all-gather":
            assert (D, b) in shapes, f"unexpected all-gather {shapes}"
    sharded = compiled(a_sharded, jax.random.key(0))
    reference = _solve(a, K, key=jax.random.key(0), tol=TOL)
    assert sharded.vectors.sharding.spec == P("x", None)
    assert int(sharded.iterations) == int(reference.iterations)
    assert_trees_all_close(sharded.values, reference.values, rtol=1e-12)
    assert _max_angle(sharded.vectors, reference.vectors) < 1e-9
    _check_topk(a, sharded, K, tol=TOL)


def test_topk_sharded_matvec(num_devices):
    mesh = jax.make_mesh((num_devices,), ("x",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(13)
    jac = jnp.asarray(rng.standard_normal((40, 64)) * (0.8 ** np.arange(64))[None, :])
    solve = jax.jit(lambda key: dj.eigh_topk(lambda x: jac.T @ (jac @ x), 4, key=key, dim=64, tol=1e-9, mesh=mesh))
    result = solve(jax.random.key(5))
    assert result.vectors.sharding.spec == P("x", None)
    _check_topk(np.asarray(jac).T @ np.asarray(jac), result, 4, tol=1e-9)


@pytest.mark.parametrize("call,match", [
    (lambda a: dj.eigh_topk(a, 16, key=jax.random.key(0)), "1 <= k < d = 16"),
    (lambda a: dj.eigh_topk(a, 0, key=jax.random.key(0)), "1 <= k < d = 16"),
    (lambda a: dj.eigh_topk(a[:, :8], 2, key=jax.random.key(0)), "square"),
    (lambda a: dj.eigh_topk(lambda x: a @ x, 2, key=jax.random.key(0)), "dim"),
    (lambda a: dj.eigh_topk(lambda x: (a @ x)[:-1], 2, key=jax.random.key(0), dim=16), "shape"),
    (lambda a: dj.eigh_topk(np.where(np.eye(16) > 0, np.nan, a), 2, key=jax.random.key(0)), "NaN"),
    (lambda a: dj.eigh_topk(a + np.triu(a, 1), 2, key=jax.random.key(0)), "not symmetric"),
])
def test_topk_errors(call, match):
    a, _ = _rotated(np.linspace(1.0, 2.0, 16), seed=11)
    with pytest.raises(ValueError, match=match):
        call(a)


def test_topk_mesh_must_divide_rows(num_devices):
    mesh = jax.make_mesh((num_devices,), ("x",), axis_types=(AxisType.Explicit,))
    a, _ = _rotated(np.linspace(1.0, 2.0, 15), seed=12)
    with pytest.raises(ValueError, match="divisible"):
        dj.eigh_topk(a, 2, key=jax.random.key(0), mesh=mesh)


# ----------------------------------------------------------------------------------------------------------------
# scale invariance (issue: right eigenvalues and honest residuals for a Gram scaled by 1e-20 / 1e20)


def _gram(seed=21, n=200, d=30):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return x.T @ x / n


@pytest.mark.parametrize("dtype,scales", [(np.float32, (1e-20, 1e20)), (np.float64, (1e-300, 1e200))])
def test_topk_is_scale_invariant_and_takes_a_zero_matrix(dtype, scales):
    g = _gram()
    w_ref = np.linalg.eigvalsh(g)[::-1][:3]
    tol = 1e-4 if dtype == np.float32 else 1e-6
    # float32 with x64 off (JAX's default): the blocks and the projected problem are float32 too.
    with jax.enable_x64(dtype == np.float64):
        solve = jax.jit(lambda a: dj.eigh_topk(a, 3, key=jax.random.key(0)))
        results = [[np.asarray(x, np.float64) for x in solve(jnp.asarray((g * s).astype(dtype)))] for s in scales]
        zero = [np.asarray(x, np.float64) for x in solve(jnp.zeros(g.shape, dtype))]
    for scale, (values, vectors, resid, _) in zip(scales, results):
        assert np.all(np.isfinite(values)) and np.all(resid > 0)
        # Residuals recomputed in float64 NumPy (on the unscaled Gram, times the scale) are the ones reported ...
        true_resid = np.linalg.norm(g @ vectors - vectors * (values / scale)[None, :], axis=0) * scale
        np.testing.assert_allclose(resid, true_resid, rtol=0.05 if dtype == np.float32 else 1e-6)
        assert np.max(true_resid) <= 1.1 * tol * np.max(np.abs(values))
        # ... and bound the eigenvalue errors (an eigenvalue lies within ||r|| of each Ritz value).
        np.testing.assert_allclose(values / scale, w_ref, rtol=30 * tol)
    # A zero matrix is a valid input: zero eigenvalues and residuals, orthonormal vectors, after one product.
    values, vectors, resid, iterations = zero
    assert np.all(values == 0) and np.all(resid == 0) and iterations == 1
    assert_trees_all_close(vectors.T @ vectors, np.eye(3), atol=1e-6)

"""float32 (JAX's default, x64 off) against float64: the interaction basis and the degeneracy report.

The suite runs with x64 on; these tests switch it off with ``jax.enable_x64(False)`` around float32 inputs. The
Grams are accumulated in float32 with compensated summation and the eigendecompositions run in float64 on the host,
so the spectra agree with float64 to float32's resolution (about 1e-7 of the largest eigenvalue, measured here).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import degenjax as dj


def _mlp():
    def f0(p, h):
        return jax.nn.relu(h @ p["W0"] + p["b0"][None])

    def f1(p, h):
        return h @ p["W1"] + p["b1"][None]

    return dj.Sections((f0, f1))


def _params(seed=0, d=(4, 12, 3)):
    rng = np.random.default_rng(seed)
    return {"W0": rng.normal(size=d[:2]) / 2, "b0": 0.3 * rng.normal(size=d[1]), "W1": rng.normal(size=d[1:]) / 3,
            "b1": rng.normal(size=d[2])}


def _f32(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def test_float32_basis_matches_float64():
    p = _params()
    x = np.random.default_rng(1).normal(size=(600, 4)) + 1.0
    model = _mlp()
    b64 = dj.interaction_basis(model, p, x, rtol=1e-5)
    with jax.enable_x64(False):
        b32 = dj.interaction_basis(model, _f32(p), jnp.asarray(x, jnp.float32), rtol=1e-5)
        lam32 = [np.asarray(a, np.float64) for a in b32.Lambda]
        C32 = [np.asarray(a, np.float64) for a in b32.C]
        with pytest.warns(UserWarning, match="jax_enable_x64"):  # the default cutoff is float32's resolution
            dj.interaction_basis(model, _f32(p), jnp.asarray(x, jnp.float32))
    assert b32.dims == b64.dims
    for l in range(2):
        np.testing.assert_allclose(lam32[l], np.asarray(b64.Lambda[l]), rtol=2e-5)
        C = np.asarray(b64.C[l])
        s = np.sign(np.sum(C32[l] * C, axis=0))
        np.testing.assert_allclose(C32[l] * s, C, rtol=1e-3, atol=1e-4 * np.abs(C).max())


def test_float32_large_mean_layer_is_not_constant():
    # a unit whose mean is 400 times its spread: the Gram is accumulated about a shift, so its variance is exact;
    # the layer varies and keeps the same directions as in float64
    rng = np.random.default_rng(2)
    x = np.concatenate([400.0 + rng.normal(size=(500, 1)), rng.normal(size=(500, 2))], axis=1)
    W = rng.normal(size=(3, 2))
    model = [lambda p, h: h @ p]
    b64 = dj.interaction_basis(model, W, x)
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b32 = dj.interaction_basis(model, jnp.asarray(W, jnp.float32), jnp.asarray(x, jnp.float32))
        g32 = np.asarray(b32.gram_spectrum[0], np.float64)
    assert b32.dims == b64.dims == (3,)
    np.testing.assert_allclose(g32, np.asarray(b64.gram_spectrum[0]), rtol=1e-4)


def test_float32_degeneracy_report_matches_float64():
    # a duplicated hidden unit: one null direction of the hidden layer (d2 free output weights) and a synchronized
    # pair (2), as predicted in closed form (arXiv 2405.10927, section 6); float32 counts the same as float64
    d2 = 8
    p = _params(3, (4, 6, d2))
    p["W0"][:, 5], p["b0"][5] = p["W0"][:, 2], p["b0"][2]
    x = np.random.default_rng(4).normal(size=(300, 4))
    rep64 = jax.jit(lambda q, xx: dj.degeneracy_report(_mlp(), q, xx))(p, x)
    with jax.enable_x64(False):
        rep32 = dj.degeneracy_report(_mlp(), _f32(p), jnp.asarray(x, jnp.float32))
        t32 = rep32.totals()
        act32 = [int(a) for a in rep32.activation_free]
    assert t32 == rep64.totals()
    assert act32 == [0, d2] and t32["sync_free"] == 2 and t32["jacobian_free"] == 0


def _offset_regression(offset, n=2000, d=3):
    # linear regression whose training loss at w* is `offset` + ~0.25: lambda^ is nbeta times a difference ~1e-3
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    w_star = np.linalg.lstsq(x, y, rcond=None)[0]

    def loss(w, batch):
        bx, by = batch
        return jnp.mean(jnp.square(bx @ w - by)) + offset

    return loss, jnp.asarray(w_star, jnp.float32), (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))


def test_float32_llc_of_a_model_with_a_large_training_loss():
    """lambda^ = nbeta (mean L_t - L_n(w*)) in float32 when L_n(w*) is 400x that difference's scale: the per-chain
    means (eager: NumPy on the host; under jit: jax.numpy) and the running lambda^ of ``metrics_fn`` agree with a
    float64 NumPy mean of the same recorded trace (a float32 running sum of 40 000 losses near 100 would round the
    ~2e-3 excess away)."""
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, w, data = _offset_regression(100.0)
        res = dj.estimate_llc(jax.random.key(0), loss, w, data, num_chains=2, num_draws=40_000, step_size=2e-5,
                              batch_size=200, warn=False, metrics_fn=lambda p, st: {"running": st.running_llc},
                              metrics_every=40_000 - 1)
        assert res.loss_trace.dtype == jnp.float32
        trace = np.asarray(res.loss_trace, np.float64)
        ref = float(res.nbeta) * (trace.mean(axis=1) - float(res.init_loss))  # float64 NumPy, same draws
        np.testing.assert_allclose(np.asarray(res.llc_per_chain, np.float64), ref, rtol=1e-3)
        # the last draw's running lambda^ is over all draws
        np.testing.assert_allclose(np.asarray(res.metrics["running"][:, -1], np.float64), ref, rtol=1e-3)
        # and the estimate is a regression's d / 2 (the recorded loss is 100 + a ~2e-3 excess)
        assert 0.8 < float(res.llc_mean) / 1.5 < 1.2
        # the same under jit (jax.numpy reductions)
        jres = jax.jit(lambda k: dj.estimate_llc(k, loss, w, data, num_chains=2, num_draws=40_000, step_size=2e-5,
                                                 batch_size=200, warn=False))(jax.random.key(0))
        np.testing.assert_allclose(np.asarray(jres.llc_per_chain, np.float64), ref, rtol=1e-3)

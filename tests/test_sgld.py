"""SGMCMC kernels: one step equals the update written out by hand in float64 NumPy (arXiv 2405.10927 section 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import degenjax as dj
from conftest import assert_trees_all_close

EPS, NBETA, GAMMA = 1e-3, 37.0, 2.5


def _loss(w, batch):
    """0.5 mean (x.a - y)^2 + 0.5 mean(s) sum(b^2): gradients a: X^T(Xa - y)/m, b: mean(s) b."""
    r = batch["x"] @ w["a"] - batch["y"]
    return 0.5 * jnp.mean(r**2) + 0.5 * jnp.mean(batch["s"]) * jnp.sum(w["b"] ** 2)


def _np_loss_grad(w, batch):
    x, y, s = (np.asarray(batch[k], np.float64) for k in ("x", "y", "s"))
    a, b = np.asarray(w["a"], np.float64), np.asarray(w["b"], np.float64)
    r = x @ a - y
    loss = 0.5 * np.mean(r**2) + 0.5 * np.mean(s) * np.sum(b**2)
    return loss, {"a": x.T @ r / len(y), "b": np.mean(s) * b}


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    batch = {"x": jnp.asarray(rng.normal(size=(6, 3))), "y": jnp.asarray(rng.normal(size=6)),
             "s": jnp.asarray(rng.uniform(0.5, 2.0, size=6))}
    center = {"a": jnp.asarray(rng.normal(size=3)), "b": jnp.asarray(rng.normal(size=(2, 2)))}
    w = jax.tree.map(lambda c: c + 0.1 * jnp.asarray(rng.normal(size=c.shape)), center)
    return batch, center, w


def _noise(key, tree):
    """The documented convention: one normal vector for all (float64) leaves, cut in tree order ('a' then 'b')."""
    flat = np.asarray(jax.random.normal(key, (7,), jnp.float64))
    return {"a": flat[:3], "b": flat[3:].reshape(2, 2)}


def _two_chains(kernel, state, batch):
    """Runs ``kernel`` under jit(vmap) on two chains (the same state, keys 3 and 4); returns per-chain results."""
    keys = jnp.stack([jax.random.key(3), jax.random.key(4)])
    states = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    new, info = jax.jit(jax.vmap(kernel, (0, 0, None)))(keys, states, batch)
    return [(keys[c], jax.tree.map(lambda x: x[c], new), jax.tree.map(lambda x: x[c], info)) for c in range(2)]


def _np_potential(w, batch, center):
    loss, g = _np_loss_grad(w, batch)
    diff = {k: np.asarray(w[k]) - np.asarray(center[k]) for k in w}
    u = NBETA * loss + 0.5 * GAMMA * sum(np.sum(d**2) for d in diff.values())
    grad = {k: NBETA * g[k] + GAMMA * diff[k] for k in w}
    return u, grad, loss


def _np_mala(w, new, batch, center, precond):
    u0, g0, _ = _np_potential(w, batch, center)
    u1, g1, _ = _np_potential(new, batch, center)

    def log_q(to, frm, g):
        return -sum(np.sum((to[k] - frm[k] + 0.5 * EPS * precond[k] * g[k]) ** 2 / (2 * EPS * precond[k]))
                    for k in to)

    log_a = u0 - u1 + log_q(w, new, g1) - log_q(new, w, g0)
    return min(1.0, np.exp(log_a))


def test_sgld_step_matches_hand_update_under_jit_and_vmap():
    batch, center, w = _setup()
    kernel = dj.sgld.build_kernel(_loss, center, step_size=EPS, nbeta=NBETA, localization=GAMMA, mala=True)
    _, grad, loss = _np_potential(w, batch, center)
    w_np = {k: np.asarray(v) for k, v in w.items()}
    for key, state, info in _two_chains(kernel, dj.sgld.init(w), batch):
        z = _noise(key, w)
        expected = {k: w_np[k] - 0.5 * EPS * grad[k] + np.sqrt(EPS) * z[k] for k in w}
        assert_trees_all_close(state.position, expected, rtol=1e-12)
        np.testing.assert_allclose(float(info.loss), loss, rtol=1e-12)
        ones = {k: np.ones_like(v) for k, v in expected.items()}
        np.testing.assert_allclose(float(info.mala_acceptance), _np_mala(w_np, expected, batch, center, ones),
                                   rtol=1e-9)
    # the convenience `step` is the same transition; without mala the acceptance is NaN
    key = jax.random.key(3)
    state2, info2 = jax.jit(lambda k, s, b: dj.sgld.step(k, s, b, _loss, center, step_size=EPS, nbeta=NBETA,
                                                          localization=GAMMA))(key, dj.sgld.init(w), batch)
    z = _noise(key, w)
    assert_trees_all_close(state2.position, {k: w_np[k] - 0.5 * EPS * grad[k] + np.sqrt(EPS) * z[k] for k in w},
                           rtol=1e-12)
    assert np.isnan(float(info2.mala_acceptance))


def test_mala_acceptance_on_a_gaussian_matches_numpy_monte_carlo():
    """U(w) = w^2 / 2 at stationarity: the mean acceptance over 400 chains vs a 2e5-sample NumPy estimate of
    E[min(1, exp(U(w) - U(w') + log q(w|w') - log q(w'|w)))]; tolerance 4 binomial-ish SE (<= 0.1)."""
    center = jnp.zeros(1)
    data = jnp.zeros((4, 1))

    def quad(w, batch):
        return 0.5 * jnp.sum(w**2) + 0.0 * jnp.sum(batch)

    @jax.jit
    def acceptance(eps):  # the step size is traced: one compilation for all three
        kernel = dj.sgld.build_kernel(quad, center, step_size=eps, nbeta=1.0, localization=0.0, mala=True)
        keys = jax.random.split(jax.random.key(0), 400)
        pos = jax.random.normal(jax.random.key(1), (400, 1))
        return jax.vmap(kernel, (0, 0, None))(keys, dj.sgld.init(pos), data)[1].mala_acceptance

    rng = np.random.default_rng(0)
    for eps in (1e-3, 1.0, 3.9):
        acc = acceptance(jnp.asarray(eps))
        w = rng.normal(size=200_000)
        new = w - 0.5 * eps * w + np.sqrt(eps) * rng.normal(size=w.size)
        log_q_fwd = -((new - w + 0.5 * eps * w) ** 2) / (2 * eps)
        log_q_rev = -((w - new + 0.5 * eps * new) ** 2) / (2 * eps)
        ref = np.mean(np.minimum(1.0, np.exp(0.5 * w**2 - 0.5 * new**2 + log_q_rev - log_q_fwd)))
        np.testing.assert_allclose(float(jnp.mean(acc)), ref, atol=0.1)
        assert eps > 0.1 or ref > 0.999


def test_rmsprop_step_matches_hand_update():
    batch, center, w = _setup(1)
    alpha, damp = 0.9, 1e-6
    v0 = {"a": jnp.asarray([0.5, 2.0, 1.0]), "b": jnp.full((2, 2), 0.25)}
    state = dj.RMSPropSGLDState(position=w, square_avg=v0, count=jnp.asarray(2, jnp.int32))
    kernel = dj.rmsprop_sgld.build_kernel(_loss, center, step_size=EPS, nbeta=NBETA, localization=GAMMA,
                                          mala=True, alpha=alpha, eps=damp)
    _, grad, loss = _np_potential(w, batch, center)
    w_np = {k: np.asarray(x) for k, x in w.items()}
    v = {k: alpha * np.asarray(v0[k]) + (1 - alpha) * grad[k] ** 2 for k in w}
    p = {k: 1.0 / (damp + np.sqrt(v[k] / (1 - alpha**3))) for k in w}
    for key, new, info in _two_chains(kernel, state, batch):
        z = _noise(key, w)
        expected = {k: w_np[k] - 0.5 * EPS * p[k] * grad[k] + np.sqrt(EPS * p[k]) * z[k] for k in w}
        assert_trees_all_close(new.position, expected, rtol=1e-12)
        assert_trees_all_close(new.square_avg, v, rtol=1e-12)
        assert int(new.count) == 3
        np.testing.assert_allclose(float(info.loss), loss, rtol=1e-12)
        np.testing.assert_allclose(float(info.mala_acceptance), _np_mala(w_np, expected, batch, center, p),
                                   rtol=1e-9)
    init = dj.rmsprop_sgld.init(w)
    assert_trees_all_close(init.square_avg, {"a": np.zeros(3), "b": np.zeros((2, 2))})


def test_sgnht_step_matches_hand_update():
    batch, center, w = _setup(2)
    A = 0.05
    m0 = {"a": jnp.asarray([0.3, -0.2, 0.1]), "b": jnp.asarray([[0.0, 0.5], [-0.4, 0.2]])}
    state = dj.SGNHTState(position=w, momentum=m0, thermostat=jnp.asarray(0.7))
    kernel = dj.sgnht.build_kernel(_loss, center, step_size=EPS, nbeta=NBETA, localization=GAMMA,
                                   diffusion_factor=A)
    _, grad, loss = _np_potential(w, batch, center)
    for key, new, info in _two_chains(kernel, state, batch):
        z = _noise(key, w)
        mom = {k: np.asarray(m0[k]) - EPS * grad[k] - EPS * 0.7 * np.asarray(m0[k]) + np.sqrt(2 * A * EPS) * z[k]
               for k in w}
        expected = {k: np.asarray(w[k]) + EPS * mom[k] for k in w}
        xi = 0.7 + EPS * (sum(np.sum(m**2) for m in mom.values()) / 7 - 1.0)
        assert_trees_all_close(new.momentum, mom, rtol=1e-12)
        assert_trees_all_close(new.position, expected, rtol=1e-12)
        np.testing.assert_allclose(float(new.thermostat), xi, rtol=1e-12)
        np.testing.assert_allclose(float(info.loss), loss, rtol=1e-12)
        assert np.isnan(float(info.mala_acceptance))
    init = dj.sgnht.init(w, thermostat=A)
    assert float(init.thermostat) == A
    assert_trees_all_close(init.momentum, {"a": np.zeros(3), "b": np.zeros((2, 2))})


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown sampler"):
        dj.estimate_llc(jax.random.key(0), _loss, {"a": jnp.zeros(3)}, jnp.zeros((4, 3)), num_chains=1,
                        num_draws=2, step_size=1e-3, batch_size=2, sampler="hmc")


def test_noise_convention_mixed_dtypes():
    # one key per dtype (in order of first appearance), each dtype's leaves drawn as one vector in tree order
    from degenjax._src.sgld import normal_like

    tree = {"a": jnp.zeros(3, jnp.float32), "b": jnp.zeros((2, 2), jnp.float64), "c": jnp.zeros(2, jnp.float32)}
    key = jax.random.key(5)
    got = jax.jit(normal_like)(key, tree)
    k32, k64 = jax.random.split(key)
    f32 = np.asarray(jax.random.normal(k32, (5,), jnp.float32))
    f64 = np.asarray(jax.random.normal(k64, (4,), jnp.float64))
    expect = {"a": f32[:3], "b": f64.reshape(2, 2), "c": f32[3:]}
    for k in tree:
        assert got[k].dtype == tree[k].dtype
        np.testing.assert_array_equal(np.asarray(got[k]), expect[k])
    # a single dtype uses the key itself
    one = normal_like(key, {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))})
    flat = np.asarray(jax.random.normal(key, (7,), jnp.float64))
    np.testing.assert_array_equal(np.asarray(one["b"]), flat[3:].reshape(2, 2))


def test_noise_groups_for_large_models():
    # Above NOISE_GROUP_SIZE numbers per dtype, consecutive leaves are packed into groups of at most
    # max(2^20, largest leaf), one split key and one normal vector per group.
    from degenjax._src.sgld import NOISE_GROUP_SIZE, _noise_groups, normal_like

    assert NOISE_GROUP_SIZE == 2 ** 20
    assert _noise_groups([3, 4, 5]) == [[0, 1, 2]]
    assert _noise_groups([700_000, 3, 600_000]) == [[0, 1], [2]]
    assert _noise_groups([5, 3_000_000, 2, 2_999_999, 1]) == [[0], [1], [2], [3, 4]]
    tree = {"a": jnp.zeros(700_000, jnp.float32), "b": jnp.zeros(3, jnp.float32),
            "c": jnp.zeros((600, 1000), jnp.float32)}
    key = jax.random.key(9)
    got = jax.jit(normal_like)(key, tree)
    k0, k1 = jax.random.split(key)
    first = np.asarray(jax.random.normal(k0, (700_003,), jnp.float32))
    second = np.asarray(jax.random.normal(k1, (600_000,), jnp.float32))
    np.testing.assert_array_equal(np.asarray(got["a"]), first[:700_000])
    np.testing.assert_array_equal(np.asarray(got["b"]), first[700_000:])
    np.testing.assert_array_equal(np.asarray(got["c"]), second.reshape(600, 1000))


def test_estimator_memory_per_chain_stays_a_few_parameter_copies():
    # XLA's compiled temporary memory grows by at most 5.5 parameter copies per extra chain (position, its update,
    # gradient, noise and the generator's temporaries; one normal draw for all parameters and a MALA branch holding
    # the old gradient had made it 6.6).
    params = {"w1": jnp.zeros((256, 1024), jnp.float32), "w2": jnp.zeros((1024, 1024), jnp.float32),
              "w3": jnp.zeros((1024, 10), jnp.float32), "b": jnp.zeros(1024, jnp.float32)}
    num_params = sum(x.size for x in jax.tree.leaves(params))
    data = (jnp.zeros((512, 256), jnp.float32), jnp.zeros((512,), jnp.int32))

    def loss(p, b):
        h = jax.nn.relu(jax.nn.relu(b[0] @ p["w1"] + p["b"][None, :]) @ p["w2"]) @ p["w3"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), b[1][:, None], 1))

    def temp_copies(chains):
        run = jax.jit(lambda k, p, d: dj.estimate_llc(k, loss, p, d, num_chains=chains, num_draws=5, step_size=1e-6,
                                                      batch_size=64, nbeta=10.0).llc_mean)
        mem = run.lower(jax.random.key(0), params, data).compile().memory_analysis()
        return mem.temp_size_in_bytes / (4 * num_params)

    assert (temp_copies(3) - temp_copies(1)) / 2 <= 5.5


# ----------------------------------------------------------------------------------------------------------------
# devinterp's options: noise level, weight decay, bounding box, a parameter mask; SGNHT's keyed initial momentum


def test_sgld_options_match_hand_update():
    batch, center, w = _setup(1)
    noise_level, wd, box = 0.7, 0.3, 0.05
    mask = {"a": np.array([True, False, True]), "b": False}
    kernel = dj.sgld.build_kernel(_loss, center, step_size=EPS, nbeta=NBETA, localization=GAMMA, mala=True,
                                  noise_level=noise_level, weight_decay=wd, bounding_box_size=box, mask=mask)
    loss, g = _np_loss_grad(w, batch)
    w_np = {k: np.asarray(v) for k, v in w.items()}
    c_np = {k: np.asarray(v) for k, v in center.items()}
    m = {"a": mask["a"].astype(float), "b": np.zeros((2, 2))}
    for key, state, info in _two_chains(kernel, dj.sgld.init(w), batch):
        z = _noise(key, w)
        drift = {k: m[k] * (NBETA * g[k] + GAMMA * (w_np[k] - c_np[k]) + wd * w_np[k]) for k in w}
        moved = {k: w_np[k] - 0.5 * EPS * drift[k] + np.sqrt(EPS) * noise_level * m[k] * z[k] for k in w}
        expected = {k: np.clip(moved[k], c_np[k] - box, c_np[k] + box) for k in w}
        assert_trees_all_close(state.position, expected, rtol=1e-12)
        np.testing.assert_allclose(float(info.loss), loss, rtol=1e-12)
        assert 0.0 <= float(info.mala_acceptance) <= 1.0


def test_sgnht_keyed_random_initial_momentum():
    _, center, w = _setup(2)
    key = jax.random.key(9)
    state = jax.jit(lambda k: dj.sgnht.init(w, rng_key=k))(key)
    assert_trees_all_close(state.momentum, _noise(key, w), rtol=1e-12)  # standard normal, the noise convention
    zero = dj.sgnht.init(w)
    assert all(float(jnp.max(jnp.abs(v))) == 0.0 for v in jax.tree.leaves(zero.momentum))
    masked = dj.sgnht.init(w, rng_key=key, mask={"a": True, "b": False})
    np.testing.assert_array_equal(np.asarray(masked.momentum["b"]), 0.0)
    # estimate_llc gives every chain its own momentum: two chains of one SGNHT run differ from the first step
    data = (jnp.asarray(np.random.default_rng(0).normal(size=(40, 3))), jnp.zeros(40))
    res = dj.estimate_llc(jax.random.key(1), lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2), jnp.zeros(3), data,
                          num_chains=2, num_draws=3, step_size=1e-3, batch_size=40, sampler="sgnht", warn=False)
    trace = np.asarray(res.loss_trace)
    assert trace[0, 0] == trace[1, 0] and trace[0, 1] != trace[1, 1]  # same start w*, different momenta

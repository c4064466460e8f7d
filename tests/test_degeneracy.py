"""Degeneracy accounting: synchronized neurons, free-direction counts, N_eff (DESIGN.md sections 5 and 6).

References are independent: NumPy boolean patterns grouped with ``np.unique``, float64 ``np.linalg.matrix_rank`` of
the data covariance, closed-form ranks of planted matrices, and the regular-model learning coefficient d/2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import degenjax as dj
from degenjax._src.degeneracy import sync_accumulator
from conftest import assert_trees_all_close


# ---------------------------------------------------------------------------------------------------------------
# synchronized neurons


def _planted_preacts(seed=0, shape=(120, 3)):
    """(n, positions, 10) pre-activations with planted groups {1, 3, 7}, {2, 5}, dead {0, 8}, always-on {9}."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=shape + (10,))
    z[..., 3] = 2.0 * z[..., 1]
    z[..., 7] = 0.5 * z[..., 1] + 0.1 * np.abs(z[..., 1]) * np.sign(z[..., 1])
    z[..., 5] = 3.0 * z[..., 2]
    z[..., 0] = -1.0 - np.abs(z[..., 0])
    z[..., 8] = -np.abs(z[..., 8])  # off or exactly zero: never > 0
    z[..., 9] = 0.1 + np.abs(z[..., 9])
    return z


def _numpy_reference(z):
    """Groups/dead/always-on from the explicit boolean (points x units) matrix."""
    on = np.reshape(z, (-1, z.shape[-1])) > 0
    dead = [int(i) for i in np.flatnonzero(~on.any(0))]
    always = [int(i) for i in np.flatnonzero(on.all(0))]
    alive = [i for i in range(on.shape[1]) if i not in dead and i not in always]
    _, inv = np.unique(on[:, alive].T, axis=0, return_inverse=True)
    groups = {}
    for u, g in zip(alive, np.ravel(inv)):
        groups.setdefault(int(g), []).append(u)
    return sorted(g for g in groups.values() if len(g) >= 2), dead, always


def test_planted_groups_dead_always_on():
    z = _planted_preacts()
    groups, dead, always = _numpy_reference(z)
    assert groups == [[1, 3, 7], [2, 5]] and dead == [0, 8] and always == [9]  # the reference sees the plant
    res = dj.synchronized_neurons(z)
    assert res.groups == groups and res.dead == dead and res.always_on == always
    assert int(res.num_degenerate_directions) == 3 * 2 + 2 * 1
    assert int(res.num_points) == z.shape[0] * z.shape[1]
    assert_trees_all_close(res.on_count, (z.reshape(-1, 10) > 0).sum(0))


def test_streaming_positions_and_jit_agree():
    z = _planted_preacts(seed=1)
    whole = dj.synchronized_neurons(z)
    # uneven batches, positions axis kept, and a flattened 2-D version: same groups
    acc = sync_accumulator(10)

    @jax.jit
    def run(a):
        streamed = dj.synchronized_neurons([a[:17], a[17:64], a[64:]])  # uneven batches, positions axis kept
        flat = dj.synchronized_neurons(jnp.reshape(a, (-1, 10)))
        # the accumulator folds into a user's lax.scan
        state, _ = jax.lax.scan(lambda s, b: (acc.update(s, b), None), acc.init(), jnp.reshape(a, (4, 30, 3, 10)))
        return streamed, flat, acc.result(state)

    for r in run(z):
        assert r.groups == whole.groups and r.dead == whole.dead and r.always_on == whole.always_on


def test_vmap_over_layers():
    zs = np.stack([_planted_preacts(seed=s) for s in range(3)])
    zs[1, ..., 4] = zs[1, ..., 6]  # one more group in the second copy
    res = jax.vmap(dj.synchronized_neurons)(jnp.asarray(zs))
    for k in range(3):
        one = jax.tree.map(lambda a: a[k], res)
        assert one.groups == _numpy_reference(zs[k])[0]


def test_near_synchronization_tol():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(400, 6))
    z[:, 4] = z[:, 1]
    z[:3, 4] = -z[:3, 1]  # unit 4 differs from unit 1 on exactly 3 of 400 points
    z[:, 5] = -0.5 - np.abs(z[:, 5])
    z[:2, 5] = 1.0  # on at 2 of 400 points: dead within tol
    exact, near, tight, streamed = jax.jit(lambda a: (
        dj.synchronized_neurons(a), dj.synchronized_neurons(a, tol=3 / 400),
        dj.synchronized_neurons(a, tol=2.5 / 400), dj.synchronized_neurons([a[:100], a[100:]], tol=3 / 400)))(z)
    assert exact.groups == [] and exact.dead == []
    assert near.groups == [[1, 4]] and near.dead == [5]
    assert tight.groups == [] and tight.dead == [5]  # floor(2.5) = 2 < 3 disagreements
    assert streamed.groups == [[1, 4]]


@pytest.mark.parametrize("bad,match", [
    (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"),
    (np.zeros((5, 0)), "zero units"),
    ([], "no batches"),
    ([np.ones((2, 3)), np.ones((2, 4))], "units"),
])
def test_synchronized_neurons_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        dj.synchronized_neurons(bad)


def test_bad_tol():
    with pytest.raises(ValueError, match="tol"):
        dj.synchronized_neurons(np.ones((3, 2)), tol=1.5)


# ---------------------------------------------------------------------------------------------------------------
# degeneracy report


def _relu_mlp():
    def f0(p, h):
        return jax.nn.relu(h @ p["W0"] + p["b0"][None, :])

    def f1(p, h):
        return h @ p["W1"] + p["b1"][None, :]

    return dj.Sections((f0, f1), names=("x", "hidden"))


def _mlp_params(d0, d1, d2, seed, duplicate=None):
    rng = np.random.default_rng(seed)
    p = {"W0": rng.normal(size=(d0, d1)), "b0": 0.3 * rng.normal(size=(d1,)), "W1": rng.normal(size=(d1, d2)),
         "b1": rng.normal(size=(d2,))}
    if duplicate is not None:
        i, j = duplicate
        p["W0"][:, j] = p["W0"][:, i]
        p["b0"][j] = p["b0"][i]
    return jax.tree.map(jnp.asarray, p)


def _preact_jacobian_rank(h, W1):
    """Rank of E[D W1 W1^T D], D = diag(1[h > 0]): the output Jacobian Gram of the hidden pre-activations."""
    D = (h > 0).astype(np.float64)
    M = np.einsum("ni,ij,kj,nk->ik", D, W1, W1, D) / h.shape[0]
    return np.linalg.matrix_rank(M, tol=1e-9 * np.abs(M).max())


def test_duplicated_hidden_neuron_adds_predicted_directions():
    d0, d1, d2 = 4, 6, 8  # d1 <= d2: the output Jacobian Gram of the hidden layer is full rank
    x = np.random.default_rng(0).normal(size=(300, d0))
    model = _relu_mlp()
    base = _mlp_params(d0, d1, d2, seed=1)
    dup = _mlp_params(d0, d1, d2, seed=1, duplicate=(2, 5))
    rep_base = jax.jit(lambda p, xs: dj.degeneracy_report(model, p, xs))(base, [x[:150], x[150:]])
    rep_dup = jax.jit(lambda p, xs: dj.degeneracy_report(model, p, xs))(dup, [x[:150], x[150:]])

    def reference(p):
        h = np.maximum(x @ np.asarray(p["W0"]) + np.asarray(p["b0"])[None, :], 0.0)
        cov = np.cov(h.T, bias=True)
        act_free = [(d0 - np.linalg.matrix_rank(np.cov(x.T, bias=True))) * d1,
                    (d1 - np.linalg.matrix_rank(cov, tol=1e-9 * np.abs(cov).max())) * d2]
        _, inv = np.unique((h > 0).T, axis=0, return_inverse=True)
        sync = sum(k * (k - 1) for k in np.bincount(np.ravel(inv)) if k >= 2)
        return act_free, sync, _preact_jacobian_rank(h, np.asarray(p["W1"]))

    for rep, p in ((rep_base, base), (rep_dup, dup)):
        act_free, sync, jrank = reference(p)
        assert jrank == d1
        assert [int(a) for a in rep.activation_free] == act_free
        assert [int(a) for a in rep.jacobian_free] == [0, 0]
        assert int(rep.sync_free[0]) == sync
    # the prediction: one more null direction of the hidden layer (d2 free output weights) + a synchronized pair
    extra = rep_dup.totals()["free"] - rep_base.totals()["free"]
    assert extra == d2 + 2
    assert rep_dup.sync[0].groups == [[2, 5]]
    assert rep_dup.num_params == (d0 * d1 + d1, d1 * d2 + d2)
    # spectra are the eigenvalues of G^l = blockdiag(Cov, 1), descending
    h = np.maximum(x @ np.asarray(dup["W0"]) + np.asarray(dup["b0"])[None, :], 0.0)
    ref_spec = np.sort(np.r_[np.linalg.eigvalsh(np.cov(h.T, bias=True)), 1.0])[::-1]
    assert_trees_all_close(rep_dup.activation_spectrum[1], ref_spec, atol=1e-10)


def test_rank_r_data_and_rank_deficient_jacobian():
    rng = np.random.default_rng(4)
    n, d, r, d1, q, d2 = 200, 7, 3, 5, 2, 4
    x = rng.normal(size=(n, r)) @ rng.normal(size=(r, d))  # rank-r data
    W0 = rng.normal(size=(d, d1))
    W1 = rng.normal(size=(d1, q)) @ rng.normal(size=(q, d2))  # rank q: d1 - q directions of h_1 are ignored
    p = {"W0": jnp.asarray(W0), "b0": jnp.asarray(rng.normal(size=d1)), "W1": jnp.asarray(W1),
         "b1": jnp.asarray(rng.normal(size=d2))}
    model = [lambda p, h: h @ p["W0"] + p["b0"][None, :], lambda p, h: h @ p["W1"] + p["b1"][None, :]]
    rep = jax.jit(lambda p, x: dj.degeneracy_report(model, p, x, param_counts=(d * d1 + d1, d1 * d2 + d2),
                                                    relu_layers=()))(p, x)
    # closed form: h_1 = x W0 + b has rank min(r, d1) = r; M^1 = W1 W1^T has rank q
    assert [int(a) for a in rep.activation_free] == [(d - r) * d1, (d1 - r) * d2]
    assert [int(a) for a in rep.jacobian_free] == [(d1 - q) * d, 0]
    assert [int(a) for a in rep.activation_rank] == [r + 1, r + 1]
    assert [int(a) for a in rep.jacobian_rank] == [q, d2]
    assert np.all(np.asarray(rep.activation_rank_range)[0] == r + 1)  # a clean gap: robust to 10x the cutoff
    assert int(np.sum(np.asarray(rep.sync_free))) == 0  # relu_layers=() switches the ReLU counts off
    assert rep.totals()["free"] == (d - r) * d1 + (d1 - r) * d2 + (d1 - q) * d
    assert "| total |" in rep.table()
    # beyond max_dense_dim the ranks come from stochastic Lanczos quadrature: Hutchinson's estimate of the null
    # space's size, standard error <= sqrt(2 * count / probes) = sqrt(2 * 5 / 64) < 0.4, so within 1 after rounding
    slq = jax.jit(lambda p, x, k: dj.degeneracy_report(model[:1], p, x, max_dense_dim=2, key=k,
                                                       num_probes=64))(p, x, jax.random.key(0))
    assert not any(slq.dense)
    assert abs(int(slq.activation_rank[0]) - (r + 1)) <= 1


def test_dead_and_always_on_units_counted():
    rng = np.random.default_rng(5)
    d0, d1, d2 = 3, 6, 2
    p = _mlp_params(d0, d1, d2, seed=6)
    p["b0"] = p["b0"].at[0].set(-100.0).at[1].set(-100.0).at[3].set(100.0).at[4].set(100.0)
    x = rng.normal(size=(100, d0))
    rep = jax.jit(lambda p, x: dj.degeneracy_report(_relu_mlp(), p, x))(p, x)
    assert int(rep.num_dead[0]) == 2 and int(rep.num_always_on[0]) == 2
    assert int(rep.dead_free[0]) == 2 * (d0 + 1) and int(rep.always_on_free[0]) == 2 * 1
    assert rep.sync[0].dead == [0, 1] and rep.sync[0].always_on == [3, 4]
    assert bool(rep.relu[0])
    # dead units carry no pre-activation Jacobian: their incoming weights are Jacobian null directions
    h = np.maximum(x @ np.asarray(p["W0"]) + np.asarray(p["b0"])[None, :], 0.0)
    jrank = _preact_jacobian_rank(h, np.asarray(p["W1"]))
    assert jrank <= d1 - 2
    assert int(rep.jacobian_rank[0]) == jrank and int(rep.jacobian_free[0]) == (d1 - jrank) * d0
    assert rep.totals()["free"] == int(np.sum(np.asarray(rep.activation_free))) + (d1 - jrank) * d0 + 2


def test_report_bad_inputs():
    p = _mlp_params(3, 4, 2, seed=0)
    model = _relu_mlp()
    x = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ValueError, match="param_counts"):
        dj.degeneracy_report(model, p, x, param_counts=(1,))
    with pytest.raises(ValueError, match="relu_layers"):
        dj.degeneracy_report(model, p, x, relu_layers=(0,))
    with pytest.raises(ValueError, match="jacobian_target"):
        dj.degeneracy_report(model, p, x, jacobian_target="global")
    with pytest.raises(ValueError, match="empty"):
        dj.degeneracy_report(model, p, [])
    zero = [lambda p, h: h[:, :0], lambda p, h: jnp.sum(h, axis=1, keepdims=True)]
    with pytest.raises(ValueError, match="zero units"):
        dj.degeneracy_report(zero, p, x)
    bad = dict(p, b0=p["b0"].at[0].set(jnp.nan))
    with pytest.raises(ValueError, match="NaN"):
        dj.degeneracy_report(model, bad, x)


# ---------------------------------------------------------------------------------------------------------------
# effective parameter count


def test_effective_parameter_count_of_regular_model():
    """Linear regression is regular: lambda = d / 2, so N_eff = 2 lambda = d (DESIGN section 5)."""
    rng = np.random.default_rng(7)
    n, d = 1000, 4
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=(d,)) + rng.normal(size=(n,))
    w_star = jnp.asarray(np.linalg.lstsq(x, y, rcond=None)[0])  # the empirical minimiser

    def loss_fn(w, batch):
        xb, yb = batch
        return 0.5 * jnp.mean(jnp.square(yb - xb @ w))

    num_chains = 8
    data = (jnp.asarray(x), jnp.asarray(y))
    res = jax.jit(lambda k: dj.estimate_llc(k, loss_fn, w_star, data, num_chains=num_chains, num_draws=1000,
                                         num_burnin=100, step_size=4e-4, batch_size=n, mala_every=0,
                                         warn=False))(jax.random.key(0))
    n_eff, n_eff_std = dj.effective_parameter_count(res)
    se = float(n_eff_std) / np.sqrt(num_chains)
    # Euler-Maruyama inflates the stationary variance by ~ eps * n beta / 4 = 1.5% (0.06): well inside 3 SE
    assert abs(float(n_eff) - d) < 3 * se, (float(n_eff), se)
    assert 0.05 < se < 1.0  # the band is informative, not vacuous

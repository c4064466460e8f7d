"""LLC estimator against exact learning coefficients; numpyro kernel, sharding, determinism, failures.

Accuracy tests run fixed seeds; tolerances come from the standard error over chains (quoted per test from the
measured spread) plus the known O(eps) SGLD bias, or from the 10% goal of the issue for deep linear networks.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from jax.sharding import AxisType

import degenjax as dj
from conftest import assert_trees_all_close


def _linreg(d, n, noise, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + noise * rng.normal(size=n)
    w_star = np.linalg.lstsq(x, y, rcond=None)[0]  # exact empirical minimum of L_n
    return (jnp.asarray(x), jnp.asarray(y)), jnp.asarray(w_star)


def _lr_loss(w, batch):
    x, y = batch
    return jnp.mean((x @ w - y) ** 2)


def _dln(widths, rank, n, seed=0):
    """Noise-free deep linear network data: a teacher with ``rank`` unit singular values (random singular
    vectors, so the curvature at ``w*`` and hence the right step size do not depend on the seed); ``w*`` factors
    the teacher exactly, with zero padding in the other directions."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, widths[0]))
    u = np.linalg.qr(rng.normal(size=(widths[0], rank)))[0]
    v = np.linalg.qr(rng.normal(size=(widths[-1], rank)))[0]
    teacher = u @ v.T
    ws = []
    depth = len(widths) - 1
    for l in range(depth):
        w = np.zeros((widths[l], widths[l + 1]))
        if l == 0:
            w[:, :rank] = u
        elif l == depth - 1:
            w[:rank] = v.T
        else:
            w[:rank, :rank] = np.eye(rank)
        ws.append(jnp.asarray(w))
    return (jnp.asarray(x), jnp.asarray(x @ teacher)), tuple(ws)


def _dln_loss(ws, batch):
    x, y = batch
    h = x
    for w in ws:
        h = h @ w
    return jnp.mean(jnp.sum((h - y) ** 2, axis=1))


def _se(result):
    return float(np.std(np.asarray(result.llc_per_chain), ddof=1) / np.sqrt(result.llc_per_chain.shape[0]))


# ----------------------------------------------------------------------------------------------------------------
# Accuracy against exact learning coefficients


def test_linear_regression_gives_half_d():
    d, n = 4, 2000
    data, w_star = _linreg(d, n, noise=0.1)
    res = dj.estimate_llc(jax.random.key(0), _lr_loss, w_star, data, num_chains=4, num_draws=2000,
                          step_size=1e-4, batch_size=100, localization=1.0, num_burnin=300, warn=False,
                          eval_batch_size=300)  # L_n(w*) in 6 blocks of 300 plus a remainder of 200
    # the regular model: lambda = d/2. SE over chains ~0.05; SGLD bias ~ eps * nbeta * 2 / 4 ~ 1.3%.
    assert abs(float(res.llc_mean) - d / 2) < 4 * _se(res) + 0.02 * d / 2, (res.llc_mean, _se(res))
    x, y = (np.asarray(a) for a in data)
    init = np.mean((x @ np.asarray(w_star) - y) ** 2)
    np.testing.assert_allclose(float(res.init_loss), init, rtol=1e-12)
    nbeta = n / math.log(n)
    np.testing.assert_allclose(float(res.nbeta), nbeta, rtol=1e-14)
    assert res.loss_trace.shape == (4, 2000)
    trace = np.asarray(res.loss_trace, np.float64)
    assert_trees_all_close(res.llc_per_chain, nbeta * (trace.mean(axis=1) - init), rtol=1e-10)
    np.testing.assert_allclose(float(res.llc_std), np.std(nbeta * (trace.mean(axis=1) - init), ddof=1),
                               rtol=1e-10)
    assert 0.9 < float(res.mala_acceptance) <= 1.0
    assert np.isfinite(float(res.ess)) and float(res.ess) > 100
    assert abs(float(res.rhat) - 1.0) < 0.05
    mean, std = dj.effective_parameter_count(res)
    np.testing.assert_allclose([float(mean), float(std)], [2 * float(res.llc_mean), 2 * float(res.llc_std)],
                               rtol=1e-14)


@pytest.mark.parametrize(
    "sampler, step_size, kwargs, burnin, draws, rel_tol",
    [
        # SGNHT samples the same posterior: measured 1.99 +- 0.05 (SE); 4 SE + 2% bias allowance ~ 0.12 = 6%
        ("sgnht", 3e-3, {"diffusion_factor": 1.0}, 2000, 4000, 0.06),
        # pSGLD drops the derivative of its position-dependent preconditioner, a known O(1) bias (measured +16%
        # with SE 0.07 at these settings): the check is only that the estimator runs it and lands near d/2
        pytest.param("rmsprop_sgld", 1e-2, {}, 300, 1500, 0.30, marks=pytest.mark.slow),
    ],
)
def test_variants_through_the_estimator(sampler, step_size, kwargs, burnin, draws, rel_tol):
    d = 4
    data, w_star = _linreg(d, 2000, noise=0.1)
    res = dj.estimate_llc(jax.random.key(0), _lr_loss, w_star, data, num_chains=4, num_draws=draws,
                          step_size=step_size, batch_size=100, num_burnin=burnin, sampler=sampler,
                          sampler_kwargs=kwargs, warn=False)
    assert abs(float(res.llc_mean) / (d / 2) - 1.0) < rel_tol, (float(res.llc_mean), _se(res))


@pytest.mark.parametrize(
    "widths, rank, exact, gamma, step_size",
    [
        # two layers = reduced-rank regression, so both references apply and agree:
        # Aoyagi (DESIGN section 5): M = (2, 2, 2), S = all, l = 2, s = 6, a = 6 - (3 - 1) 2 = 2:
        #   (-4 + 2 * 8) / 2 + 2 * 0 / 8 - (2 / 4) * 9 + (1/2) * 12 = 6 + 0 - 4.5 + 6 = 7.5;
        # Aoyagi & Watanabe (2005) with M = N = H = 4, r = 2 (M + H + N + r = 14 even):
        #   (2 (H + r)(M + N) - (M - N)^2 - (H + r)^2) / 8 = (96 - 0 - 36) / 8 = 7.5.
        ((4, 4, 4), 2, 7.5, 10.0, 5e-5),
        # three layers, M = (2, 2, 2, 2), S = all, l = 3, s = 8, a = 8 - (3 - 1) 3 = 2:
        #   (-1 + 6) / 2 + 2 * 1 / 12 - (6 / 4) (8/3)^2 + (1/2) * 24 = 5/2 + 1/6 - 32/3 + 12 = 4
        ((3, 3, 3, 3), 1, 4.0, 3.0, 1e-4),
    ],
)
def test_deep_linear_network_matches_aoyagi(widths, rank, exact, gamma, step_size):
    data, params = _dln(widths, rank, n=10_000)
    res = dj.estimate_llc(jax.random.key(1), _dln_loss, params, data, num_chains=4, num_draws=4000,
                          step_size=step_size, batch_size=100, localization=gamma, num_burnin=500, warn=False)
    # Over data/chain seeds 0-3 these settings gave -2.2%..+1.5% ([4,4,4], MALA 0.97) and -4.2%..-2.9%
    # ([3,3,3,3], MALA 0.90) with SE over chains 0.06-0.17: the 10% goal is >= 2 SE beyond the worst seed.
    assert abs(float(res.llc_mean) / exact - 1.0) < 0.10, (float(res.llc_mean), _se(res))
    assert 0.85 < float(res.mala_acceptance) < 1.0


@pytest.mark.slow
def test_reduced_rank_regression_odd_case():
    # Aoyagi & Watanabe (2005), M=5 inputs, H=3 hidden, N=4 outputs, true rank r=1: N + r <= M + H,
    # M + r <= N + H, H + r <= M + N and M + H + N + r = 13 odd, so
    # lambda = (2 (H + r)(M + N) - (M - N)^2 - (H + r)^2 + 1) / 8 = (72 - 1 - 16 + 1) / 8 = 7.
    data, params = _dln((5, 3, 4), 1, n=10_000)
    res = dj.estimate_llc(jax.random.key(2), _dln_loss, params, data, num_chains=8, num_draws=8000,
                          step_size=1e-4, batch_size=100, localization=3.0, num_burnin=1000, warn=False)
    assert abs(float(res.llc_mean) / 7.0 - 1.0) < 0.10, (float(res.llc_mean), _se(res))


# ----------------------------------------------------------------------------------------------------------------
# Same numbers: determinism, jit/vmap, sharding, numpyro kernel

SMALL = dict(num_chains=8, num_draws=40, step_size=1e-3, batch_size=30, num_burnin=4, mala_every=3, warn=False)


@pytest.fixture(scope="module")
def small():
    data, w_star = _linreg(3, 200, noise=0.3, seed=5)
    res = dj.estimate_llc(jax.random.key(7), _lr_loss, w_star, data, progress=True, **SMALL)
    return data, w_star, res


def test_deterministic_and_jittable(small):
    """Same key, same numbers: eagerly in 10 chunks (the fixture) and under jax.jit in one scan; another key
    gives other numbers."""
    data, w_star, res = small

    @jax.jit
    def llc(key, w):
        return dj.estimate_llc(key, _lr_loss, w, data, **SMALL)

    out = llc(jax.random.key(7), w_star)
    assert_trees_all_close(out.loss_trace, res.loss_trace, rtol=1e-12)
    assert_trees_all_close(out.llc_per_chain, res.llc_per_chain, rtol=1e-10)
    np.testing.assert_allclose(float(out.mala_acceptance), float(res.mala_acceptance), rtol=1e-10)
    assert np.all(np.isfinite(np.asarray(res.mala_per_chain)))
    assert np.isnan(float(out.ess))  # numpyro's ESS is host-side; not computed under jit
    other = llc(jax.random.key(8), w_star)
    assert not np.allclose(np.asarray(other.loss_trace), np.asarray(res.loss_trace))


def test_sharded_chains_equal_unsharded(small, num_devices):
    data, w_star, res = small
    # jax.make_mesh's default (Explicit) axes; Auto axes take the same path (see estimate_llc)
    mesh = jax.make_mesh((num_devices,), ("chains",), axis_types=(AxisType.Explicit,))
    sharded = dj.estimate_llc(jax.random.key(7), _lr_loss, w_star, data, mesh=mesh, **SMALL)
    assert_trees_all_close(sharded.loss_trace, res.loss_trace, rtol=1e-12)
    assert_trees_all_close(sharded.llc_per_chain, res.llc_per_chain, rtol=1e-10)


def test_data_parallel_minibatches_equal_unsharded(small, num_devices):
    # each chain's minibatch split over a "data" axis (XLA sums the partial losses and gradients): the same numbers
    # up to the order of the sums, with chains over a second axis or replicated
    data, w_star, _ = small
    kw = {**SMALL, "batch_size": 32}
    ref = dj.estimate_llc(jax.random.key(7), _lr_loss, w_star, data, **kw)
    mesh2 = jax.make_mesh((2, num_devices // 2), ("chains", "data"), axis_types=(AxisType.Explicit,) * 2)
    mesh1 = jax.make_mesh((num_devices,), ("data",), axis_types=(AxisType.Auto,))
    for mesh in (mesh2, mesh1):
        got = dj.estimate_llc(jax.random.key(7), _lr_loss, w_star, data, mesh=mesh, data_axis="data", **kw)
        assert_trees_all_close(got.loss_trace, ref.loss_trace, rtol=1e-9)
        assert_trees_all_close(got.llc_per_chain, ref.llc_per_chain, rtol=1e-9)

    def run(key, w):
        return dj.estimate_llc(key, _lr_loss, w, data, mesh=mesh2, data_axis="data", **kw).loss_trace

    compiled = jax.jit(run).lower(jax.random.key(7), w_star).compile()
    assert "all-reduce" in compiled.as_text()  # the gradient of each chain is summed over its data shards
    assert_trees_all_close(compiled(jax.random.key(7), w_star), ref.loss_trace, rtol=1e-9)
    with pytest.raises(ValueError, match="batch_size=30 is not divisible by the mesh axis 'data'"):
        dj.estimate_llc(jax.random.key(7), _lr_loss, w_star, data, mesh=mesh2, data_axis="data", **SMALL)
    with pytest.raises(ValueError, match="chain_axis and data_axis are both 'data'"):
        dj.estimate_llc(jax.random.key(7), _lr_loss, w_star, data, mesh=mesh1, chain_axis="data",
                        data_axis="data", **kw)
    with pytest.raises(ValueError, match="pass mesh="):
        dj.estimate_llc(jax.random.key(7), _lr_loss, w_star, data, data_axis="data", **kw)


def _numpyro_losses(data, w_star, num_chains, chain_method):
    kernel = dj.SGLDKernel(_lr_loss, step_size=SMALL["step_size"], batch_size=SMALL["batch_size"])
    mcmc = numpyro.infer.MCMC(kernel, num_warmup=SMALL["num_burnin"], num_samples=SMALL["num_draws"],
                              num_chains=num_chains, chain_method=chain_method, progress_bar=False)
    init = jnp.broadcast_to(w_star, (num_chains,) + w_star.shape) if num_chains > 1 else w_star
    mcmc.run(jax.random.key(7), data, init_params=init)
    return mcmc.get_samples(group_by_chain=True)


def test_numpyro_kernel_vectorized_equals_estimator(small):
    data, w_star, res = small
    losses = _numpyro_losses(data, w_star, SMALL["num_chains"], "vectorized")
    assert losses.shape == (SMALL["num_chains"], SMALL["num_draws"])
    assert_trees_all_close(losses, res.loss_trace, rtol=1e-12)
    x, y = (np.asarray(a) for a in data)
    init = np.mean((x @ np.asarray(w_star) - y) ** 2)
    llc = 200 / math.log(200) * (np.asarray(losses).mean(axis=1) - init)
    assert_trees_all_close(llc, res.llc_per_chain, rtol=1e-9)


def test_numpyro_kernel_sequential_equals_estimator(small):
    data, w_star, _ = small
    losses = _numpyro_losses(data, w_star, 2, "sequential")
    res = dj.estimate_llc(jax.random.key(7), _lr_loss, w_star, data, **{**SMALL, "num_chains": 2, "mala_every": 0})
    assert_trees_all_close(losses, res.loss_trace, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Failures and warnings


def test_divergence_names_chain_step_and_step_size():
    data, w_star = _linreg(3, 200, noise=0.3, seed=5)
    with pytest.raises(dj.LLCDivergenceError, match=r"chain \d+ .* at step \d+ with step_size=5.*smaller"):
        dj.estimate_llc(jax.random.key(0), _lr_loss, w_star, data, num_chains=2, num_draws=400, step_size=5.0,
                        batch_size=20, warn=False)


def test_warnings_for_negative_llc_and_high_acceptance():
    data, w_star = _linreg(3, 200, noise=0.3, seed=5)
    not_a_minimum = w_star + 0.5
    with pytest.warns(RuntimeWarning) as record:
        res = dj.estimate_llc(jax.random.key(0), _lr_loss, not_a_minimum, data, num_chains=2, num_draws=200,
                              step_size=1e-3, batch_size=20, localization=0.0, mala_every=1)
    assert float(res.llc_mean) < 0
    messages = " ".join(str(r.message) for r in record)
    assert "Negative LLC" in messages
    assert ("far above" in messages) == (float(res.mala_acceptance) > 0.99)


def test_bad_inputs_raise_clear_errors(num_devices):
    data, w_star = _linreg(3, 50, noise=0.3)
    kw = dict(num_chains=2, num_draws=10, step_size=1e-3, batch_size=10)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="batch_size=51 is larger than the data set"):
        dj.estimate_llc(key, _lr_loss, w_star, data, **{**kw, "batch_size": 51})
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="step_size must be a positive"):
            dj.estimate_llc(key, _lr_loss, w_star, data, **{**kw, "step_size": bad})
    with pytest.raises(ValueError, match="different leading axes"):
        dj.estimate_llc(key, _lr_loss, w_star, (data[0], data[1][:40]), **kw)
    with pytest.raises(ValueError, match="NaN or inf"):
        dj.estimate_llc(key, _lr_loss, w_star.at[1].set(jnp.nan), data, **kw)
    with pytest.raises(ValueError, match="nbeta must be a finite scalar > 0"):
        dj.estimate_llc(key, _lr_loss, w_star, data, nbeta=0.0, **kw)
    with pytest.raises(ValueError, match="localization must be a finite scalar >= 0"):
        dj.estimate_llc(key, _lr_loss, w_star, data, localization=-1.0, **kw)
    with pytest.raises(ValueError, match="num_chains must be an integer"):
        dj.estimate_llc(key, _lr_loss, w_star, data, **{**kw, "num_chains": 0})
    with pytest.raises(ValueError, match="num_draws must be an integer"):
        dj.estimate_llc(key, _lr_loss, w_star, data, **{**kw, "num_draws": 2.5})
    mesh = jax.make_mesh((num_devices,), ("chains",), axis_types=(AxisType.Auto,))
    with pytest.raises(ValueError, match="not divisible by the mesh axis"):
        dj.estimate_llc(key, _lr_loss, w_star, data, mesh=mesh, **{**kw, "num_chains": 3})
    with pytest.raises(ValueError, match="batch_size=51"):
        dj.SGLDKernel(_lr_loss, step_size=1e-3, batch_size=51).init(key, 0, w_star, (data,), {})
    with pytest.raises(ValueError, match="needs data"):
        dj.SGLDKernel(_lr_loss, step_size=1e-3, batch_size=5).init(key, 0, w_star, (), {})
    with pytest.raises(ValueError, match="step_size must be a positive"):
        dj.SGLDKernel(_lr_loss, step_size=0.0, batch_size=5)


# ----------------------------------------------------------------------------------------------------------------
# N_eff and behavioral losses


def test_effective_parameter_count_numbers_and_arrays():
    np.testing.assert_allclose(float(dj.effective_parameter_count(3.25)), 6.5, rtol=0)
    np.testing.assert_allclose(np.asarray(jax.jit(dj.effective_parameter_count)(jnp.asarray([1.0, 2.5]))),
                               [2.0, 5.0], rtol=0)
    with pytest.raises(ValueError, match="expects a number"):
        dj.effective_parameter_count("3")


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_behavioral_loss_zero_at_star_and_matches_numpy(kind):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(7, 2, 3)))  # (batch, positions, features)
    w_star = jnp.asarray(rng.normal(size=(3, 4)))
    w = w_star + 0.3 * jnp.asarray(rng.normal(size=(3, 4)))

    def apply_fn(params, batch):
        return jnp.tanh(batch @ params)

    loss_fn = dj.behavioral_loss(apply_fn, w_star, kind=kind)
    jitted = jax.jit(loss_fn)
    assert float(jitted(w_star, x)) == 0.0
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(loss_fn))(w_star, x)), 0.0, atol=1e-15)
    out, ref = np.tanh(np.asarray(x) @ np.asarray(w)), np.tanh(np.asarray(x) @ np.asarray(w_star))
    if kind == "mse":
        expected = np.mean(np.sum((out - ref) ** 2, axis=(1, 2)))
    else:
        p = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
        q = np.exp(out) / np.exp(out).sum(-1, keepdims=True)
        expected = np.mean(np.sum(p * np.log(p / q), axis=(1, 2)))
    np.testing.assert_allclose(float(jitted(w, x)), expected, rtol=1e-12)
    per_example = jax.jit(jax.vmap(lambda b: loss_fn(w, b[None])))(x)
    np.testing.assert_allclose(float(jnp.mean(per_example)), expected, rtol=1e-12)


def test_behavioral_loss_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be 'mse' or 'kl'"):
        dj.behavioral_loss(lambda p, x: x, jnp.zeros(2), kind="l1")


def _fmix32(h):
    mask = np.uint64(0xFFFFFFFF)
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & mask
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & mask
    return h ^ (h >> np.uint64(16))


def _swap_or_not_reference(key_words, epoch, positions, n):
    """The minibatch order of DESIGN.md in NumPy uint64: round words from murmur3's fmix32 keyed by the key data and
    the epoch, then the swap-or-not rounds with a true modulo, swapping when the top bit of the round hash is set."""
    rounds = max(24, int(n - 1).bit_length() + 8)
    mask = np.uint64(0xFFFFFFFF)
    count = (np.uint64(epoch) * np.uint64(2 * rounds) + np.arange(2 * rounds, dtype=np.uint64)) & mask
    h = _fmix32(count ^ np.uint64(0x9E3779B9))
    for w in key_words:
        h = _fmix32(h ^ np.uint64(w))
    offsets, salts = h[:rounds] % np.uint64(n), h[rounds:]
    x = positions.astype(np.uint64)
    for k, salt in zip(offsets, salts):
        partner = (k + np.uint64(n) - x) % np.uint64(n)
        h = ((np.maximum(x, partner) ^ salt) * np.uint64(0x85EBCA6B)) & mask
        h = ((h ^ (h >> np.uint64(16))) * np.uint64(0xC2B2AE35)) & mask
        x = np.where(h >= np.uint64(2**31), partner, x)
    return x.astype(np.int64)


@pytest.mark.parametrize("n", [2, 37, 4099, 100_000, 2**31 - 1])
def test_epoch_positions_match_a_numpy_swap_or_not(n):
    # An independent reference of the whole order (round words and rounds) for the key's data.
    from degenjax._src.llc import epoch_positions

    key, epoch = jax.random.key(11), 5
    words = np.asarray(jax.random.key_data(key)).ravel()
    positions = np.unique(np.concatenate([np.arange(min(n, 64)), n - 1 - np.arange(min(n, 64))]))
    got = jax.jit(epoch_positions, static_argnums=3)(key, epoch, jnp.asarray(positions, jnp.int32), n)
    np.testing.assert_array_equal(np.asarray(got), _swap_or_not_reference(words, epoch, positions, n))


def test_epoch_order_is_uniform_over_keys():
    # Over 40k keys the first position's landing place, and the ordered pair of the first two, are uniform
    # (chi-square against the uniform law on the 20 places and on the 380 ordered pairs of distinct places).
    from scipy import stats

    from degenjax._src.llc import epoch_positions

    n = 20
    keys = jax.random.split(jax.random.key(123), 40_000)
    orders = np.asarray(jax.jit(jax.vmap(lambda k: epoch_positions(k, 0, jnp.arange(2, dtype=jnp.int32), n)))(keys))
    first = np.bincount(orders[:, 0], minlength=n)
    pairs = np.bincount(orders[:, 0] * n + orders[:, 1], minlength=n * n).reshape(n, n)[~np.eye(n, dtype=bool)]
    assert stats.chisquare(first).pvalue > 1e-3
    assert stats.chisquare(pairs).pvalue > 1e-3


@pytest.mark.parametrize("n,batch_size", [(1000, 100), (37, 5), (2, 1), pytest.param(4099, 64, marks=pytest.mark.slow)])
def test_minibatches_without_replacement_within_each_epoch(n, batch_size):
    # The stateless epoch order is a permutation of range(n): checked with NumPy on every position of an epoch.
    from degenjax._src.llc import batch_indices, epoch_positions, gather_batch

    key = jax.random.key(3)
    order = jax.jit(epoch_positions, static_argnums=3)
    orders = [np.asarray(order(key, e, jnp.arange(n, dtype=jnp.int32), n)) for e in range(3)]
    for o in orders:
        np.testing.assert_array_equal(np.sort(o), np.arange(n))
    if n > 10:  # different epochs (and keys) visit the data in different orders
        assert not np.array_equal(orders[0], orders[1])
        other = np.asarray(order(jax.random.key(4), 0, jnp.arange(n, dtype=jnp.int32), n))
        assert not np.array_equal(orders[0], other)
    # the minibatches of one epoch are consecutive blocks of that order (the last n mod batch_size are skipped)
    data = np.arange(n)
    steps = n // batch_size
    batches = [np.asarray(gather_batch(jnp.asarray(data), batch_indices(key, t, n, batch_size)))
               for t in range(steps + 1)]
    np.testing.assert_array_equal(np.concatenate(batches[:steps]), orders[0][: steps * batch_size])
    np.testing.assert_array_equal(batches[steps], orders[1][:batch_size])
    under_vmap = jax.vmap(lambda k: epoch_positions(k, 0, jnp.arange(n, dtype=jnp.int32), n))(
        jax.random.split(key, 2))
    for o in np.asarray(under_vmap):
        np.testing.assert_array_equal(np.sort(o), np.arange(n))

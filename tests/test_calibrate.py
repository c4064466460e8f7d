"""calibrate / calibration_sweep / recommend / plot_calibration.

Reference: full-batch SGLD on a linear regression (an exactly quadratic loss) is a Gaussian AR(1) process, so the
expected lambda^ of every grid cell has a closed form, transient from w* included:
  with H = X^T X / n (eigenvalues h_i), a_i = nbeta h_i + gamma, rho_i = 1 - eps a_i / 2,
  Var_t(w_i) = v_i (1 - rho_i^(2t)),  v_i = 1 / (a_i (1 - eps a_i / 4)),
  E[lambda^] = nbeta / 2 * mean_{t in draws} sum_i h_i Var_t(w_i).
(eps a_i > 4 diverges.)
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_all_close

import degenjax
from degenjax._src.calibrate import Calibration, CalibrationGrid, calibrate, calibration_sweep, recommend
from degenjax._src.plots import plot_calibration
from degenjax._src.llc import estimate_llc

N, D = 512, 3
NUM_CHAINS, NUM_DRAWS, NUM_BURNIN = 6, 160, 40
STEP_SIZES = (2e-5, 1e-2, 3.0)  # too small (acceptance ~1), good, divergent
NBETAS = (50.0, N / np.log(N))


def _problem():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((N, D)) * np.array([1.0, 0.7, 0.4])
    y = X @ np.array([1.0, -2.0, 0.5]) + rng.standard_normal(N)
    w_star = np.linalg.solve(X.T @ X, X.T @ y)  # exact minimum of the empirical loss
    return X, y, w_star


def _loss(w, batch):
    x, t = batch
    return 0.5 * jnp.mean(jnp.square(x @ w - t))


def _expected_llc(X, eps, nbeta, gamma):
    h = np.linalg.eigvalsh(X.T @ X / X.shape[0])
    a = nbeta * h + gamma
    rho = 1.0 - eps * a / 2.0
    v = 1.0 / (a * (1.0 - eps * a / 4.0))
    t = np.arange(NUM_BURNIN, NUM_BURNIN + NUM_DRAWS)[:, None].astype(np.float64)
    return nbeta / 2.0 * np.mean(np.sum(h * v * (1.0 - rho ** (2.0 * t)), axis=1))


@pytest.fixture(scope="module")
def calibration():
    """A grid calibration: calibration_sweep + recommend (the grid tools behind sweep heatmaps)."""
    X, y, w_star = _problem()
    grid = calibration_sweep(jax.random.key(0), _loss, jnp.asarray(w_star), (jnp.asarray(X), jnp.asarray(y)),
                             batch_size=N, step_sizes=STEP_SIZES, nbetas=NBETAS, localizations=(1.0,),
                             num_chains=NUM_CHAINS, num_draws=NUM_DRAWS, num_burnin=NUM_BURNIN)
    table, best, message = recommend(grid, default_nbeta=N / np.log(N))
    return Calibration(table=table, recommended=best, message=message, grid=grid)


def _exact_localized(X, nbeta, gamma):
    """E[nbeta (L_n(w) - L_n(w*))] under exp(-nbeta L_n - gamma/2 |w - w*|^2) for L_n = mean (x w - y)^2 / 2:
    a Gaussian with precision nbeta H + gamma, H = X^T X / n, so sum_i nbeta h_i / (2 (nbeta h_i + gamma))."""
    h = np.linalg.eigvalsh(X.T @ X / X.shape[0])
    return float(np.sum(nbeta * h / (2.0 * (nbeta * h + gamma))))


def test_calibrate_runs_the_recipe_and_recommends_its_setting(tmp_path):
    # Full-batch SGLD on a quadratic loss: a bias exact / (1 - eps a / 4) per direction, first order in eps (scale=1:
    # eps_0 h_max = 1, about +30% on the first rung); the recipe's extrapolation must land on the exact
    # localized-posterior value, for 2 values of gamma (2 recipes).
    X, y, w_star = _problem()
    data = (jnp.asarray(X), jnp.asarray(y))
    # loc_factor=1: the target here is the localized posterior at each gamma, which (rightly) depends on gamma, so
    # the recipe's localization-sensitivity check is off
    cal = calibrate(jax.random.key(0), _loss, jnp.asarray(w_star), data, batch_size=N, localizations=(1.0, 30.0),
                    num_chains=4, initial_steps=400, max_steps=12_000, scale=1.0, loc_factor=1.0)
    assert cal.grid is None and len(cal.recipes) == 2
    nb = N / np.log(N)
    for rec, gamma in zip(cal.recipes, (1.0, 30.0)):
        exact = _exact_localized(X, nb, gamma)
        assert rec.trustworthy, rec.message
        assert abs(rec.llc - exact) <= 3 * rec.uncertainty + 0.01 * exact, (rec.llc, exact, rec.uncertainty)
        assert [r["step_size"] for r in rec.rungs] == sorted((r["step_size"] for r in rec.rungs), reverse=True)
    best = cal.recommended
    assert best["localization"] == 1.0 and best["nbeta"] == pytest.approx(nb)  # the smaller gamma
    assert best["step_size"] == cal.recipes[0].step_size and "Recommended step_size=" in cal.message
    assert sum(r.chosen for r in cal.table) == 2
    fig = plot_calibration(cal, path=tmp_path / "recipe.png")
    assert (tmp_path / "recipe.png").stat().st_size > 0 and fig.axes[0].get_xscale() == "log"
    with pytest.raises(ValueError, match="takes no step_sizes"):
        calibrate(jax.random.key(0), _loss, jnp.asarray(w_star), data, batch_size=N, step_sizes=(1e-3,))


def test_cells_match_closed_form(calibration):
    X, _, _ = _problem()
    rows = {(r.step_size, r.nbeta): r for r in calibration.table}
    assert len(rows) == len(STEP_SIZES) * len(NBETAS)
    for eps in STEP_SIZES:
        for nb in NBETAS:
            r = rows[(eps, float(nb))]
            if eps * (nb * np.linalg.eigvalsh(X.T @ X / N).max() + 1.0) > 4.0:
                assert not r.finite and not r.stable and "diverged" in r.reason
                continue
            expected = _expected_llc(X, eps, nb, 1.0)
            se = r.llc_std / np.sqrt(NUM_CHAINS)
            # 4 standard errors over independent chains (fixed seed; a swapped eps/nbeta is off by >> 4 SE).
            assert abs(r.llc_mean - expected) <= 4.0 * se, (eps, nb, r.llc_mean, expected, se)


def test_stability_rule_and_recommendation(calibration):
    g = calibration.grid
    trace = np.asarray(g.loss_trace, np.float64)  # (S, B, G, C, D)
    assert trace.shape == (len(STEP_SIZES), len(NBETAS), 1, NUM_CHAINS, NUM_DRAWS)
    # drift and finiteness against a float64 NumPy evaluation of the documented formulas
    q = NUM_DRAWS // 4
    nb = np.asarray(NBETAS)[None, :, None, None]
    drift_c = nb * (trace[..., -q:].mean(-1) - trace[..., -2 * q:-q].mean(-1))
    ok = np.isfinite(drift_c).all(-1)
    assert_trees_all_close(np.asarray(g.drift)[ok], drift_c.mean(-1)[ok], rtol=1e-9)
    assert_trees_all_close(np.asarray(g.drift_se)[ok], (drift_c.std(-1, ddof=1) / np.sqrt(NUM_CHAINS))[ok],
                           rtol=1e-9)
    np.testing.assert_array_equal(np.asarray(g.finite), np.isfinite(trace).all((-1, -2)))
    llc_ref = nb[..., 0] * (trace.mean(-1) - float(g.init_loss)).mean(-1)
    assert_trees_all_close(np.asarray(g.llc_mean)[ok], llc_ref[ok], rtol=1e-9)
    X, y, w_star = _problem()
    np.testing.assert_allclose(float(g.init_loss), 0.5 * np.mean((X @ w_star - y) ** 2), rtol=1e-12)

    rows = {(r.step_size, r.nbeta): r for r in calibration.table}
    for nbeta in NBETAS:
        assert "MALA acceptance" in rows[(2e-5, float(nbeta))]["reason"]  # acceptance ~1: steps far too small
        assert rows[(1e-2, float(nbeta))]["stable"], rows[(1e-2, float(nbeta))]
    best = calibration.recommended
    # Both eps=1e-2 cells are stable; the rule prefers the nbeta closest to n / log n.
    assert (best["step_size"], best["nbeta"]) == (1e-2, float(N / np.log(N)))
    assert "Recommended step_size=0.01" in calibration.message


def _hand_grid(llc, acc, drift, finite, per_chain=None, drift_se=None):
    S, B, G = llc.shape
    C = 2
    return CalibrationGrid(
        step_sizes=np.array([1e-4, 1e-3, 1e-2][:S]), nbetas=np.array([10.0, 100.0][:B]),
        localizations=np.array([1.0, 10.0][:G]), llc_mean=llc, llc_std=np.full(llc.shape, 0.1),
        llc_per_chain=per_chain if per_chain is not None else np.repeat(llc[..., None], C, -1),
        mala_acceptance=acc, drift=drift, drift_se=drift_se if drift_se is not None else np.zeros(llc.shape),
        finite=finite, loss_trace=np.zeros((S, B, G, C, 4)), init_loss=np.float64(0.0))


def test_recommend_rule_by_hand():
    S, B, G = 3, 2, 2
    llc = np.full((S, B, G), 5.0)
    acc = np.full((S, B, G), 0.95)
    acc[0] = 0.999   # eps=1e-4: above 0.99
    acc[2] = 0.87    # eps=1e-2: in range, closer to 0.9 than 0.95 is
    drift = np.zeros((S, B, G))
    finite = np.ones((S, B, G), bool)
    per_chain = np.repeat(llc[..., None], 2, -1)
    per_chain[2, 1, 0, 1] = -1.0                # one chain negative: (eps=1e-2, nbeta=100, gamma=1) unstable
    drift[1, 1, 0] = 0.9                        # > 0.1 * 5 + 2 * 0: (1e-3, 100, 1) drifting
    finite[2, 0, :] = False                     # (1e-2, 10, *) diverged
    table, best, message = recommend(_hand_grid(llc, acc, drift, finite, per_chain), default_nbeta=80.0)
    by = {(r.step_size, r.nbeta, r.localization): r for r in table}
    assert len(table) == S * B * G
    assert "non-positive" in by[(1e-2, 100.0, 1.0)]["reason"]
    assert "drifting" in by[(1e-3, 100.0, 1.0)]["reason"]
    assert "diverged" in by[(1e-2, 10.0, 10.0)]["reason"]
    assert "acceptance" in by[(1e-4, 100.0, 10.0)]["reason"]
    # nbeta 100 is closest to 80; at nbeta=100 gamma=1 has no stable cell left, so gamma=10; there eps=1e-2 has
    # the acceptance closest to 0.9 (0.87 against 0.95 for eps=1e-3).
    assert (best["step_size"], best["nbeta"], best["localization"]) == (1e-2, 100.0, 10.0)

    # A drift within 2 standard errors is noise, not a trend.
    se = np.zeros((S, B, G))
    se[1, 1, 0] = 0.3
    table, _, _ = recommend(_hand_grid(llc, acc, drift, finite, per_chain, drift_se=se), default_nbeta=80.0)
    assert {(r.step_size, r.nbeta, r.localization): r for r in table}[(1e-3, 100.0, 1.0)]["flat"]

    # No MALA information (NaN): acceptance is not checked and the largest stable step wins.
    table, best, _ = recommend(_hand_grid(llc, np.full((S, B, G), np.nan), np.zeros((S, B, G)),
                                          np.ones((S, B, G), bool)), default_nbeta=10.0)
    assert all(r.stable for r in table)
    assert (best["step_size"], best["nbeta"], best["localization"]) == (1e-2, 10.0, 1.0)

    # Nothing stable: no recommendation and advice instead of an error.
    table, best, message = recommend(_hand_grid(llc, acc, drift, np.zeros((S, B, G), bool)))
    assert best is None and "smaller step sizes" in message


def test_sweep_under_jit_matches_estimate_llc():
    X, y, w_star = _problem()
    data = (jnp.asarray(X), jnp.asarray(y))
    params = jnp.asarray(w_star)
    kw = dict(num_chains=2, num_draws=8, num_burnin=2, batch_size=128, mala_every=0)
    sweep = jax.jit(partial(calibration_sweep, loss_fn=_loss, step_sizes=(1e-3, 1e-2), nbetas=(60.0,),
                            localizations=(2.0,), **kw))
    grid = sweep(jax.random.key(3), params=params, data=data)
    assert grid.llc_mean.shape == (2, 1, 1) and grid.loss_trace.shape == (2, 1, 1, 2, 8)
    # cell (eps=1e-2, nbeta=60, gamma=2) is exactly one estimate_llc run with the same key
    direct = jax.jit(lambda key, p, d: estimate_llc(key, _loss, p, d, step_size=1e-2, nbeta=60.0, localization=2.0,
                                                    **kw))(jax.random.key(3), params, data)
    assert_trees_all_close(grid.loss_trace[1, 0, 0], direct.loss_trace, rtol=1e-10)
    assert_trees_all_close(grid.llc_per_chain[1, 0, 0], direct.llc_per_chain, rtol=1e-10)
    # the smaller step moves less from w*, so its minibatch losses differ
    assert not np.allclose(np.asarray(grid.loss_trace[0, 0, 0]), np.asarray(direct.loss_trace))


def test_plot_calibration(calibration, tmp_path):
    from matplotlib.figure import Figure

    path = tmp_path / "cal.png"
    fig = plot_calibration(calibration, path=path)
    assert isinstance(fig, Figure) and path.stat().st_size > 0
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == len(STEP_SIZES) * len(NBETAS)
    assert sum("[D]" in t for t in texts) == len(NBETAS)  # the divergent column is marked
    fig = plot_calibration(calibration, metric="mala_acceptance")
    with pytest.raises(ValueError, match="metric must be one of"):
        plot_calibration(calibration, metric="nope")


def test_bad_inputs():
    X, y, w_star = _problem()
    data = (jnp.asarray(X), jnp.asarray(y))
    params = jnp.asarray(w_star)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="step_sizes must contain only positive"):
        calibration_sweep(key, _loss, params, data, batch_size=8, step_sizes=(1e-3, -1.0))
    with pytest.raises(ValueError, match="nbetas must be a non-empty"):
        calibration_sweep(key, _loss, params, data, batch_size=8, nbetas=())
    with pytest.raises(ValueError, match="num_draws must be >= 4"):
        calibration_sweep(key, _loss, params, data, batch_size=8, num_draws=3)
    with pytest.raises(ValueError, match="pass step_sizes"):
        calibration_sweep(key, _loss, params, data, batch_size=8, step_size=1e-3)
    with pytest.raises(ValueError, match="larger than the data set"):
        calibration_sweep(key, _loss, params, data, batch_size=N + 1)
    with pytest.raises(ValueError, match="acceptance_range"):
        recommend(_hand_grid(np.ones((1, 1, 1)), np.ones((1, 1, 1)), np.zeros((1, 1, 1)), np.ones((1, 1, 1), bool)),
                  acceptance_range=(0.9, 0.8))
    with pytest.raises(ValueError, match="cannot run under jax.jit"):
        jax.jit(lambda p: calibrate(key, _loss, p, data, batch_size=8).recommended)(params)


def test_public_names():
    assert degenjax.calibrate is calibrate
    assert degenjax.plot_calibration is plot_calibration
    assert degenjax.calibration_sweep is calibration_sweep

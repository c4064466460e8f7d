"""The step-size recipe's trust checks: unequilibrated chains are still flagged (the warm rerun of a cold first rung
and the history-aware equilibration test must not turn a short run into a trusted one)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

import degenjax as dj


def test_recipe_flags_chains_that_cannot_equilibrate_within_the_budget():
    # a regression with one stiff and one very soft direction under a weak localization: the soft direction relaxes
    # in ~1 / (0.03 + 0.01) = 25 units of diffusion time, while the budget (20 000 steps at eps ~ 1.7e-3) spans ~11
    rng = np.random.default_rng(0)
    n = 1000
    x = rng.normal(size=(n, 2)) * np.array([1.0, 1e-2])
    y = x @ np.array([1.0, -1.0]) + 0.5 * rng.normal(size=(n,))
    w = jnp.asarray(np.linalg.lstsq(x, y, rcond=None)[0])

    def loss(w, batch):
        return jnp.mean((batch[0] @ w - batch[1]) ** 2)

    res = dj.estimate_llc(jax.random.key(1), loss, w, (jnp.asarray(x), jnp.asarray(y)), num_chains=4, num_draws=1,
                          step_size="auto", batch_size=100, localization=0.01, warn=False,
                          recipe_kwargs={"initial_steps": 400, "max_steps": 20_000})
    rec = res.recipe
    assert not rec.trustworthy, rec.message
    assert "not equilibrated along the slowest direction" in rec.message, rec.message
    # the equilibration test counts the previous rungs' time (burn-in grows along the ladder, and the cold first
    # rung, rerun warm from the finest rung's chains, has the longest) and still fails
    used = [r for r in rec.rungs if "note" not in r]
    burn = [r["burn_in_time"] for r in used]
    assert burn[1] < burn[2] < burn[0], burn
    replaced = [r for r in rec.rungs if "rerun warm" in r.get("note", "")]
    assert len(replaced) == 1 and replaced[0]["burn_in_time"] < burn[1]
    assert not all(r["equilibrated"] for r in used)
    # and the estimate is indeed off: the soft direction has not spread. At equilibrium the localized Gaussian
    # posterior gives tr(H (H + gamma)^-1) / 2 with H = 2 nbeta X^T X / n (0.868 here, 1 as gamma -> 0); measured 0.53
    nbeta = n / np.log(n)
    h = 2 * nbeta * x.T @ x / n
    equilibrium = 0.5 * np.trace(h @ np.linalg.inv(h + 0.01 * np.eye(2)))
    assert float(res.llc_mean) < equilibrium - 0.2, (float(res.llc_mean), equilibrium)


def test_recipe_flags_a_drift_of_the_chains_along_the_ladder():
    # 20 coordinates the loss does not see, under a localization of 1e-3: free Brownian motion over the ladder, so
    # ||w - w*||^2 grows with time (rung by rung) instead of following the step-size bias (linear in the step)
    rng = np.random.default_rng(0)
    n = 1000
    x = rng.normal(size=(n, 1))
    y = x[:, 0] + 0.5 * rng.normal(size=(n,))
    params = {"a": jnp.asarray(np.linalg.lstsq(x, y, rcond=None)[0]), "flat": jnp.zeros(20)}

    def loss(p, batch):
        return jnp.mean((batch[0] @ p["a"] + 0.0 * jnp.sum(p["flat"]) - batch[1]) ** 2)

    res = dj.estimate_llc(jax.random.key(1), loss, params, (jnp.asarray(x), jnp.asarray(y)), num_chains=4,
                          num_draws=1, step_size="auto", batch_size=100, localization=1e-3, warn=False,
                          recipe_kwargs={"initial_steps": 400, "max_steps": 20_000})
    rec = res.recipe
    assert not rec.trustworthy and "still drifts along the ladder" in rec.message, rec.message
    # free diffusion: E ||w_flat||^2 = 20 t grows by > 50% between the two finest rungs' windows (T apart)
    used = [r for r in rec.rungs if "note" not in r]
    assert used[-1]["dist2"] > 1.5 * used[-2]["dist2"]


def test_localization_extrapolation_weight_recovers_lambda_from_closed_forms():
    from degenjax._src.recipe import localization_extrapolation_weight as weight

    # a curve lambda - c / log(t / gamma^2) (t = n beta): the line through gamma and 10 gamma meets x = 0 at lambda
    lam, c, t = 4.0, 2.3, 1e4 / math.log(1e4)
    f = lambda g: lam - c / math.log(t / g ** 2)
    w = weight(t, 1.0, 10.0)
    assert abs(f(1.0) + w * (f(1.0) - f(10.0)) - lam) < 1e-12
    # L = (ab)^2 under exp(-t L - gamma/2 (a^2 + b^2)), t E[L] by quadrature in the radial form
    # Z(t) = int exp(-t a^2 b^2 - gamma (a^2 + b^2) / 2) da db; t E[L] = -d log Z / d log t (numerically)
    import numpy as np

    def tEL(tt, g):
        a = np.linspace(-12, 12, 4001)
        da = a[1] - a[0]
        # inner integral over b is Gaussian: sqrt(2 pi / (2 t a^2 + gamma))
        inner = np.sqrt(2 * np.pi / (2 * tt * a ** 2 + g)) * np.exp(-g * a ** 2 / 2)
        z = inner.sum() * da
        # E[t a^2 b^2] = E_a[t a^2 / (2 t a^2 + gamma)]
        return float((inner * tt * a ** 2 / (2 * tt * a ** 2 + g)).sum() * da / z)

    v1, v10 = tEL(t, 1.0), tEL(t, 10.0)
    assert 0.25 < v10 < v1 < 0.5
    ext = v1 + w * (v1 - v10)
    # closer to the asymptotic 1/2 than the value at gamma = 1, but short of it (the documented under-correction)
    assert abs(ext - 0.5) < abs(v1 - 0.5) and ext < 0.5
    # ... by more than the half-correction bias bound, which then exceeds the recipe's loc_tol = 5%: flagged
    assert 0.5 - ext > 0.5 * (ext - v1) and 0.5 * (ext - v1) > 0.05 * ext
    assert weight(t, 1.0, 50.0) is None and weight(t, 10.0, 1.0) is None


def _stiffening_llc(nbeta, gamma, m2):
    """E[nbeta L] for L(a, b) = m2 a^2 (1 + b^2) under exp(-nbeta L - gamma/2 (a^2 + b^2)) by quadrature (SciPy):
    a | b is Gaussian with precision 2 nbeta m2 (1 + b^2) + gamma, so E[nbeta L | b] = nbeta m2 (1 + b^2) / (2 nbeta
    m2 (1 + b^2) + gamma), and b has density ~ exp(-gamma b^2 / 2) / sqrt(2 nbeta m2 (1 + b^2) + gamma)."""
    from scipy import integrate

    prec = lambda b: 2 * nbeta * m2 * (1 + b * b) + gamma
    dens = lambda b: np.exp(-gamma * b * b / 2) / np.sqrt(prec(b))
    top = 40 / np.sqrt(gamma)
    num = integrate.quad(lambda b: dens(b) * nbeta * m2 * (1 + b * b) / prec(b), 0, top, limit=400)[0]
    return num / integrate.quad(dens, 0, top, limit=400)[0]


def test_recipe_escalates_when_the_chains_cannot_be_sampled_within_the_budget():
    # L = m2 a^2 (1 + b^2): b is a flat direction along which the curvature grows (like a deep linear network's
    # symmetry orbits). A budget too small to equilibrate b at gamma = 1 makes the first attempt untrustworthy; the
    # recipe then measures at (loc_factor^2 n beta, loc_factor gamma) and is right there (quadrature reference)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1000,)))
    m2 = float(np.mean(np.asarray(x) ** 2))

    def loss(w, batch):
        return jnp.mean((batch * w[0]) ** 2) * (1 + w[1] ** 2)

    kw = dict(num_chains=4, num_draws=1, step_size="auto", batch_size=100, warn=False)
    budget = dict(initial_steps=400, max_steps=2000, loc_factor=3.0, target_rel=0.1)
    res = dj.estimate_llc(jax.random.key(0), loss, jnp.zeros(2), x, recipe_kwargs={
        **budget, "escalate": True, "escalate_max_steps": 200_000}, **kw)
    rec = res.recipe
    nbeta = 1000 / np.log(1000)
    assert rec.escalation is not None, rec.message
    esc = rec.escalation
    assert {"unsettled", "unequilibrated"} & set(esc["from_problems"]), esc
    assert esc["from_localization"] == 1.0 and esc["localization"] == 3.0
    assert math.isclose(esc["nbeta"], 9 * nbeta, rel_tol=1e-12) and math.isclose(float(res.nbeta), 9 * nbeta,
                                                                                  rel_tol=1e-6)
    assert rec.trustworthy and "Escalated: measured at localization 3" in rec.message, rec.message
    ref = _stiffening_llc(9 * nbeta, 3.0, m2)
    assert 0.49 < ref < 0.5
    assert abs(float(res.llc_mean) - ref) <= 2.5 * float(res.llc_uncertainty) <= 0.1, (float(res.llc_mean), ref)
    assert rec.total_steps > esc["from_total_steps"] > 0
    # an escalation that is not trustworthy either leaves the user's setting, and says what it found
    res2 = dj.estimate_llc(jax.random.key(0), loss, jnp.zeros(2), x, recipe_kwargs={
        **budget, "escalate": True, "escalate_max_steps": 1200}, **kw)
    rec2 = res2.recipe
    assert rec2.escalation is None and not rec2.trustworthy
    assert math.isclose(float(res2.nbeta), nbeta, rel_tol=1e-6)
    assert "Escalated to localization 3 and n beta 1303" in rec2.message, rec2.message
    # by default (no escalation) the first attempt is returned as it was, and its message says what escalation does
    res3 = dj.estimate_llc(jax.random.key(0), loss, jnp.zeros(2), x, recipe_kwargs=budget, **kw)
    assert not res3.recipe.trustworthy and "Escalated" not in res3.recipe.message
    assert float(res3.llc_mean) == esc["from_llc"]
    assert "Or escalate=True (recipe_kwargs; CLI --escalate): measure at localization 3 and n beta 1303" in (
        res3.recipe.message), res3.recipe.message

"""The step-size recipe of ``estimate_llc(..., step_size="auto")``, `calibrate` and ``degenjax llc --step-size auto``.

SGLD's estimate lambda^(eps) is biased at any finite step size ``eps``, and the bias is first order in ``eps``: the
Euler discretisation inflates the posterior variance in a direction of curvature ``h`` by ``1 / (1 - eps h / 4)``,
the minibatch gradient noise adds ``eps sigma_B^2 / 4`` (``sigma_B^2`` the variance of the minibatch gradient of the
potential, ``nbeta^2 / batch_size`` times the per-example one), and a minibatch loss read at a position fitted to
the previous minibatches of the same epoch is higher than the full-data loss by another ``O(eps)`` term. Measured on
the notebook's linear regression (d = 5, n = 10^4, exact 2.5, batch 256): lambda^ = 12.2, 4.12, 3.00, 2.68, 2.55 at
eps = 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, i.e. ``2.5 + a eps`` below ~1e-4. MALA acceptance computed on one minibatch sees
only the first of the three terms, which is why an acceptance band recommended a biased step.

The recipe therefore measures lambda^ on a ladder of step sizes and extrapolates to ``eps -> 0`` (Richardson):

1. *Scale*: ``h_max``, the largest eigenvalue of the Hessian of the potential ``nbeta L + gamma/2 ||w - w*||^2`` at
   ``w*`` (power iteration with Hessian-vector products on up to 4096 data points), and the first rung
   ``eps_0 = scale / h_max`` (default ``scale = 0.5``, well inside SGLD's stability limit ``eps h < 4``). After the
   first rung the curvature is measured again at the chains' positions: a singular model's chains move into
   regions far stiffer than ``w*``, and when ``eps_0`` times that curvature exceeds 2.5 the ladder restarts at
   ``scale`` over it (or, over the budget, the report says so).
2. *Minibatches*: drawn independently with replacement (``replacement=True`` of `estimate_llc`), so that the
   minibatch noise is white at every step size and the bias stays first order: without replacement, the
   correlations within an epoch change character when the chains' relaxation time (``~ 2 / (eps h)`` steps) crosses
   the epoch length ``n / batch_size``, and lambda^(eps) bends (measured on a 3-parameter regression, n = 2000,
   batch 100: successive differences in the ratio 2.1 instead of 3). The recorded loss is
   ``L_B(w_t) - L_B(w*) + L_n(w*)`` (``control_variate=True``): the same mean, without the minibatch's own noise.
3. *Ladder*: rungs ``eps_k = eps_0 / ratio^k`` (``ratio = 3``, three rungs). Every rung runs for the same
   *diffusion time* ``T = steps x eps`` (``steps_k = steps_0 ratio^k``) and discards the first half: the rungs then
   average the same stretch of the sampler's continuous-time path, so their differences are step-size bias, not
   different amounts of mixing. (On the devinterp deep linear network 10-20-20-10, rank 5, whose chains keep
   drifting along the flat directions for 10^5+ steps, a fixed number of steps per rung would compare different
   things.)
4. *Length*: ``steps_0`` starts at ``initial_steps`` and doubles (the chains continue) until the second half of the
   first rung has settled (split R-hat <= 1.05, ESS >= ``min_ess``, its mean no longer drifts between the windows of
   successive doublings, and it is *equilibrated*: the discarded first half spans at least ``equilibration`` = 2.5
   relaxation times of the slowest observable ``||w - w*||^2``, i.e. its ESS over the second half is at least 2.5
   per chain) and is precise (its relative standard error below ``target_rel / 2``), or the budget ``max_steps``
   (per chain, all rungs) would be exceeded. Imprecision only widens the reported uncertainty; a first rung that
   has not settled makes the result untrustworthy. The loss alone cannot show equilibration: in a singular model
   the chains drift along flat directions, confined only by the localization (relaxation time ~``2 / gamma`` of
   diffusion time, e.g. ~2.6 measured on the 3-3-3-3 deep linear network), while the loss fluctuates fast; a ladder
   run for a diffusion time of 1.2 there gave 4.86, 4.03, 3.54 and extrapolated to 3.26 (exact 4), versus 4.9, 4.2,
   3.8 at equilibrium. The finer rungs start where the previous rung's chains stopped (``warm_start``), and a rung
   counts as equilibrated when the whole run of its chains before its window (the previous rungs' diffusion time
   included) spans ``equilibration`` relaxation times, estimated from its window. The first rung, the only one
   started cold at ``w*``, is rerun once warm from the finest rung's chains when it has not equilibrated within the
   budget (cost: ``1 / 13`` of the ladder): on the 4-4-4 network (rank 2, exact 7.5) the cold first rung's ESS of
   ``||w - w*||^2`` was 8.3 < 10 after 128 000 steps, which made a -1.9% result untrustworthy; rerun warm it
   equilibrates and the result (7.365 +- 0.08) is trusted.
5. *Estimate*: per chain, the quadratic (3-point) Richardson extrapolation of lambda^(eps_k) to ``eps = 0``; its mean
   over chains is ``llc_mean``. The remaining-bias estimate is the change from the linear extrapolation of the two
   finest rungs (the size of the last correction), and the reported uncertainty is
   ``sqrt(se^2 + bias^2)`` with ``se`` the standard error over chains (at least the MCSE propagated from the rungs).
6. *Localization*: the two finest rungs are rerun (warm, for a tenth of the diffusion time) with ``loc_factor =
   10`` times the localization, and their extrapolation to step 0 is compared with the same one at gamma. lambda^ is
   the coefficient of the limit gamma -> 0, n beta -> infinity; where the chains are confined by the localization
   rather than the loss (flat directions of a singular model), lambda^ at finite n beta depends on gamma (the
   3-3-3-3 network: 4.2 at gamma = 1, 3.2 at gamma = 10 at step 2.6e-5; ``L = (ab)^2``, n = 1000: 0.36 and 0.20
   by quadrature, asymptotically 0.5). A significant change (above 2 se) over ``sqrt(10) - 1`` (the bias at gamma if
   lambda^ moves like ``sqrt(gamma)``) is the localization bias bound; it joins the reported bias, and the result is
   untrustworthy when it exceeds ``loc_tol = 5%`` of lambda^. The test is on the implied bias at gamma, not on the
   change to 10 gamma: a singular point of multiplicity ``m > 1`` gives lambda^ ``~ lambda - (m - 1) / log(n beta /
   gamma^k)`` (for ``L = (ab)^2``, ``k = 2``: ``Z ~ t^(-1/2) (log(t / gamma^2) / 2 + 1)`` with ``t = n beta``), so
   a stronger localization moves it further than a weaker one would: the 5-3-4 network (rank 1, m = 2, exact 7)
   gives 6.85 at gamma = 1 (the finite-n value ``7 - 1 / log 1086 = 6.857``) and 6.18 at 10 gamma, a change of 9.7%
   for a bias of 2%, which the former test on the change (5%) rejected. Measured ratios change / bias: 5.0 there,
   2.8 on the 3-3-3-3 network (both above ``sqrt(10) - 1 = 2.16``, so the bound held), but ~1.1 for ``L = (ab)^2``
   (quadrature), where the bound is low by 2x; that case is still rejected, its change (44%) being far above it.
   *Extrapolation in the localization*: that form is also what an exact sampler measures. NUTS in float64 on the
   exact full-batch potential of the battery's noise-free networks (``benchmarks/llc_ground_truth.py``) gives, for
   the 3-3-3-3 network (rank 1, exact 4), 3.73, 3.79, 3.73 at gamma = 1 and n = 10^4, 10^5, 10^6 (the finite-n value
   does not approach 4 within reach of n), and all its values for gamma = 0.1 to 10 lie on lines in ``x = 1 /
   log(n beta / gamma^2)`` that meet ``x = 0`` at 3.98 to 4.03; through gamma = 1 and 10 at n = 10^4 the 4-4-4,
   5-3-4 and 3-3-3-3 networks extrapolate to 7.48, 7.00 and 4.01 (exact 7.5, 7, 4). So when the change to
   ``loc_factor`` gamma is significant, lowers lambda^ and ``n beta / (loc_factor gamma)^2 > e^2``, and every other
   check of step 7 passed (the extrapolation would amplify an unequilibrated value), the estimate is moved to
   ``x = 0`` along that line (``loc_extrapolate``; this targets lambda itself, not its finite-n value) and
   half the correction is kept as the localization bias. It is a measured model, not a theorem: ``L = (ab)^2``
   (quadrature: 0.391 and 0.293 at gamma = 1 and 10, n beta = 1086, asymptotically 0.5) extrapolates to 0.442, short
   by 1.1x its correction, and half the correction (5.8%) then fails ``loc_tol``; the exact-sampler values of the
   5-10-10-10-5 network at n = 10^5 extrapolate within 3.3% from gamma = 1, 10 but to +8.6% from gamma = 3, 30.
7. *Trust*: the result is trustworthy when no rung diverged, every rung of the extrapolation is equilibrated and
   ``||w - w*||^2`` does not drift along the ladder (its window mean at the finest rung within ``drift_tol = 10%``
   or 3 se of the value that a step-size bias linear in the step predicts from the two coarser rungs), the
   finest rung converged, the localization bias bound is small (step 6), and the ladder is in the
   asymptotic (near-linear) regime: the last correction is at most ``max(3 se, nonlinear_tol x |lambda^|)``. If the
   first rung diverges or the ladder is not yet linear, the ladder moves down by one rung while the budget allows;
   otherwise the report says so, with every rung tried.
8. *Escalation* (``escalate``): when the result is untrustworthy because the chains could not be sampled within
   the budget (too stiff along the chains, the first rung not settled, its warm rerun diverged, ``||w - w*||^2``
   drifting or not equilibrated), the recipe runs again at ``loc_factor`` times the localization (default
   ``escalate="localization"``). Along the flat directions of a singular model (the symmetry orbits of a deep
   linear network) only the localization confines the chains, and the curvature, with it the number of SGLD steps,
   grows with their distance from ``w*``: the exact sampler's chains on the 5-10-10-10-5 network sit at squared
   distance 202, 74 and 24 from ``w*`` at gamma = 1, 3 and 10, where the top curvature is ~1000x, ~50x and ~5x
   that at ``w*``. The stronger localization's own step 6 (against ``loc_factor^2`` gamma) then decides whether the
   result stands for the limit gamma -> 0, with more power than at the user's setting: the change plus two of its
   standard errors, over ``sqrt(loc_factor) - 1``, must be within ``loc_tol`` (a stronger localization is where a
   soft direction's share of lambda^ is lost, and a noisy change would pass step 6), for which its reruns run
   ``1 / sqrt(loc_factor)`` of the rungs' steps instead of ``1 / loc_factor``; that bound joins the reported bias.
   On the generic-point 10-20-20-10 network (exact 50, n = 2 x 10^4, float32), untrustworthy at gamma = 1 (71.7,
   +43%), the escalation to gamma = 10 gives 49.69 +- 1.0 (-0.6%; exact sampler 49.84), its check against 100
   (48.51) bounding the localization bias at 0.81 (1.6%): trusted, in 430 s with the first attempt (2 CPU cores);
   likewise the generic-point 5-10-10-10-5 and 20-30-30-20 networks (12.33 +- 0.56 and 192.7 +- 6.0 at gamma = 10,
   exact sampler there 12.34 and 193.1; exact 12.5 and 199.5). When the sqrt model holds: near a point where ``L_n``
   is locally quadratic in its nonzero-curvature directions (a generic point of these networks), the Gaussian
   (Laplace) approximation gives ``n beta E[L_n] = 1/2 sum_i a_i / (a_i + gamma)`` with ``a_i = n beta h_i`` over the
   Hessian's nonzero eigenvalues, so a direction loses ``gamma / (a_i + gamma)`` of its 1/2, and its change from gamma
   to ``f gamma`` is ``f (a_i + gamma) / (a_i + f gamma) - 1`` times that loss: from ``f - 1`` (stiff directions) down
   to 0 (directions with ``a_i << gamma``, already lost at gamma). The bound holds (ratio ``>= sqrt(f) - 1``) for
   every direction with ``a_i >= sqrt(f) gamma``; softer ones are the case that no check at stronger localizations
   can see. On the generic-point networks this approximation reproduces the exact sampler's localization dependence
   (``benchmarks/llc_ground_truth.py``, ``gaussian_value``: 10-20-20-10 49.87 and 48.79 at gamma = 10 and 100 for
   49.84 and 48.53), and its ratio change / bias at 10 is 3.2 to 8.3 on all seven of them (300 to 40 000 parameters),
   so the bound held there. The 20-30-30-20 network's 3.2% gap at 10 is mostly not the localization's: the Laplace
   value is 198.6 (193.1 sampled) and 189.9 at 100 (184.1), a localization cost of 1.4 with a change of 8.7, while
   the other 5.5, present at both, is a finite-n gap that no localization check sees (like the 3-3-3-3 network's
   3.73 at localization 1 for any n up to 10^6). On the generic-point 8-16-16-16-16-8 network gamma = 10 gives 31.59
   and 100 gives 29.1 (exact sampler 31.21 and 29.04, exact 32), a bound of 1.67 (5.3%) for a true bias of 2.5%, so
   that result is refused. On the zero-padded 5-10-10-10-5 network gamma = 10 gives 11.88 (-5%; exact sampler
   11.72), and the check against 100 (8.21) says it depends on the localization: untrustworthy, rightly. On the
   generic-point 50-100-100-50 network (2 x 10^4 parameters, exact 1250; 17 500 flat directions) gamma = 10 gives
   1245 +- 37 but its chains have not equilibrated, and it is refused: the exact sampler (1246.3 there) puts them
   where the curvature is 41x that at ``w*``, which needs ~7e7 SGLD steps per chain (the default budget is 2M).
   ``escalate="same_x"`` then also runs at ``loc_factor`` gamma and ``loc_factor^2`` times ``n beta``, with
   ``loc_factor^2`` times the budget (the same budget of diffusion time: its steps are that much smaller). That
   setting has the user's ``x = 1 / log(n beta / gamma^2)``, the variable along which the exact sampler's finite-n
   values lie (step 6), and so, in that measured model, the same value, with the chains as confined as at
   ``loc_factor`` gamma. Measured on the 5-10-10-10-5 network (n beta = 2.0e5, gamma = 10): the first rung, at step
   3.1e-7, equilibrates (``||w - w*||^2`` 20.3, 22.7, 22.4 after 1M, 2M, 4M steps; the exact sampler's 24), which
   at gamma = 1 no budget up to 2M steps did; but the finer rungs need 3x and 9x its steps, and the ladder restarts
   lower when the curvature along the chains (~6x that at ``w*`` here) requires it: 5e7 to 3e8 steps per chain, 3 h
   or more on 2 CPU cores (~200 us per step of 4 chains). Hence opt-in.
   The first trustworthy escalation is returned (``recipe.escalation`` records the setting measured and the first
   attempt; the reported ``nbeta`` is the one sampled); otherwise the first attempt is, with what the escalations
   found in its message. A model whose only problem is the localization check (``L = (ab)^2``), the ladder's
   linearity or convergence is not escalated.

Where it fails: the deep linear network 5-10-10-10-5 (rank 2, exact 12.5, n = 20 000). At gamma = 1 the chains
never equilibrate within 2M steps: ``||w - w*||^2`` grows along the ladder (window means 121, 146, 180, diffusion
time ~12 in all) and with it the curvature along the chains (7.7x that at w* after the first rung; the first rung's
warm rerun at the end of the ladder diverges), so every rung carries a step-size bias the ladder does not remove:
34.9, 26.2, 22.4 extrapolate to 20.5 (+64%). It is reported untrustworthy (localization dependence, the first rung
not equilibrated and its warm rerun diverging; the drift test of step 7 sees a paired jump of 26 +- 11, below its
3 se with 4 chains). At
gamma = 10 the same budget equilibrates (24.0, 23.8, 24.3) and gives 11.91 (-4.7%), but lambda^ still depends on
gamma there (8.17 at 100), so that run is untrustworthy too (the recipe's escalation, step 8, measures it
and keeps the first attempt).
An exact sampler (NUTS on the exact potential, ``benchmarks/llc_ground_truth.py``) shows why no budget of this order
suffices at gamma = 1: the posterior there gives 12.31 (so the estimand is fine), but its chains sit at squared
distance ~200 from ``w*`` along the symmetry orbits, where the top curvature is 400-1600x that at ``w*``; full-batch
SGLD started from those equilibrium draws diverges at step 1e-6 and is still +12% at 1e-7 and +5% at 3e-8, i.e.
10^7-10^8 steps per unit of diffusion time. At gamma = 10 the exact values are 11.72 (n = 2 x 10^4), 12.23 (10^5), 12.46 (10^6) with curvature
~6x that at ``w*``: a stronger localization with more data is within reach, the default gamma = 1 is not.
The same happens at a generic point of a network's zero set (random factors, the 10-20-20-10 network, rank 5, exact
50, n = 20 000): the first rung's lambda^ is 51.8, 52.2 after 2000 and 4000 steps (a ladder stopped there gives 51.45,
+2.9%), but ``||w - w*||^2`` keeps growing along the symmetry (GL) orbits, 8, 15, 28, 53, 95, 157, 218 over 2000 to
128 000 steps, and lambda^ at that step with it, 53, 56, 71, 88, 103, as the curvature along the chains reaches 8x
that at w* (eps h = 4). The first rung therefore also waits for ``||w - w*||^2`` to stop drifting (paired per chain
between successive windows), not only lambda^.

Measured: the DLN above at devinterp's settings (eps = 1e-5, 10^4 draws) gives 57.4 (exact 50); at a fixed diffusion
time the rungs 3e-5, 1e-5, 3.3e-6 gave 81.2, 58.5, 52.2 and the extrapolation 49.3 (the exact value of the estimator
there, with ``w*`` the noisy teacher, is ~49.1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from degenjax._src import llc as llc_lib
from degenjax._src import sgld as sgld_lib
from degenjax._src.checks import (check_eval_batch_size, check_init_loss, check_inputs, check_positive_int,
                                  check_rng_key, default_nbeta)
from degenjax._src.diagnostics import LLCDivergenceError, convergence
from degenjax._src.validation import is_traced
from degenjax._src.types import ArrayTree



@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LLCRecipe:
    """What the step-size recipe did (``LLCResult.recipe``); a static pytree node (no array leaves).

    Attributes:
      llc: the extrapolated lambda^ (= ``LLCResult.llc_mean``).
      uncertainty: ``sqrt(se^2 + bias^2)``.
      se: statistical standard error of ``llc``.
      bias: estimated remaining step-size bias (the size of the last extrapolation correction).
      step_size: the finest rung's step size (the chosen setting; ``LLCResult.step_size``).
      trustworthy: whether the checks of the recipe passed (module docstring, step 7).
      message: one line: the estimate and why, or why no setting is trustworthy and what was tried.
      rungs: one dict per rung run (``step_size, num_steps, num_burnin, llc_mean, llc_se, rhat, ess, converged,
        diverged``), coarsest first.
      h_max: the curvature estimate that set the first rung.
      diffusion_time: ``T = steps x step_size`` of every rung.
      total_steps: SGLD steps per chain over all rungs.
      seconds: wall time of the recipe.
      localization_check: the two finest rungs rerun at ``loc_factor`` times the localization: a dict with
        ``localization``, ``llc_mean`` (their extrapolation to step 0), ``llc_mean_at_localization`` (the same
        extrapolation at the user's localization), ``change``, ``change_se`` and ``rungs``; None when skipped.
      problems: the checks that failed, one short name each (``"stiff"``, ``"unsettled"``, ``"rerun_diverged"``,
        ``"drift"``, ``"unequilibrated"``, ``"unconverged"``, ``"nonlinear"``, ``"localization"``, ``"diverged"``);
        empty when trustworthy.
      escalation: when the recipe escalated (module docstring, step 8): a dict with the ``stage``
        (``"localization"`` or ``"same_x"``), the setting measured (``nbeta``, ``localization``) and the first
        attempt's (``from_nbeta``, ``from_localization``, ``from_llc``, ``from_uncertainty``, ``from_problems``,
        ``from_message``, ``from_rungs``, ``from_total_steps``); else None.
    """

    llc: float
    uncertainty: float
    se: float
    bias: float
    step_size: float
    trustworthy: bool
    message: str
    rungs: tuple
    h_max: float
    diffusion_time: float
    total_steps: int
    seconds: float
    localization_check: dict | None = None
    problems: tuple = ()
    escalation: dict | None = None

    def table(self) -> list[dict]:
        """The rungs as a list of dicts (one row per step size)."""
        return [dict(r) for r in self.rungs]


def top_curvature(loss_fn: Callable, params, data, *, nbeta, localization, mask=None, num_iters: int = 30,
                  max_points: int = 4096, rng_key=None) -> float:
    """The largest eigenvalue of ``nbeta * Hessian(L) + gamma`` at ``params`` (power iteration with HVPs).

    Args:
      loss_fn, params, data, nbeta, localization: as for `estimate_llc`.
      mask: optional boolean tree (restricted LLC): the Hessian on the sampled entries only.
      num_iters: power iterations.
      max_points: at most this many data points (a random subset) for the Hessian.
      rng_key: key of the start vector and the subset.

    Returns:
      ``h_max`` (float, host).
    """
    rng_key = jax.random.key(0) if rng_key is None else rng_key
    n = llc_lib.num_data(data)
    k1, k2 = jax.random.split(rng_key)
    if n > max_points:
        idx = jax.random.choice(k1, n, (max_points,), replace=False)
        data = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)
    masks = None if mask is None else jax.tree.map(lambda m, x: jnp.asarray(m, jnp.result_type(x)), mask, params)
    iterate = llc_lib.cached_runner(_power_step, loss_fn)

    def project(v):
        return v if masks is None else jax.tree.map(jnp.multiply, v, masks)

    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(k2, len(leaves))
    v = project(jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
                                             for k, x in zip(keys, leaves)]))
    norm0 = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(v)))
    v = jax.tree.map(lambda x: x / norm0, v)
    lam = 0.0
    for _ in range(num_iters):
        v, lam = iterate(v, params, data, masks)
    return float(nbeta) * float(lam) + float(localization)


@functools.lru_cache(maxsize=32)
def _power_step(loss_fn):
    """A jitted power-iteration step ``(v, params, data, masks) -> (H v / |H v|, |H v|)`` (cached per loss, so the
    recipe's repeated curvature measurements compile once)."""

    def step(v, params, data, masks):
        hv = jax.jvp(jax.grad(lambda p: loss_fn(p, data)), (params,), (v,))[1]
        if masks is not None:
            hv = jax.tree.map(jnp.multiply, hv, masks)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(hv)))
        # a zero Hessian (e.g. a product of parameters at w* = 0) has curvature 0, not NaN: keep v
        flat = norm > 0
        return jax.tree.map(lambda x, y: jnp.where(flat, x / jnp.where(flat, norm, 1), y), hv, v), norm

    return jax.jit(step)


def localization_extrapolation_weight(nbeta: float, gamma: float, gamma2: float) -> float | None:
    """The weight ``w`` with ``lambda^(gamma) + w (lambda^(gamma) - lambda^(gamma2))`` the value at ``x = 0`` of the line
    through ``(x, lambda^)``, ``x = 1 / log(n beta / gamma^2)`` (module docstring, step 6); None where the stronger
    localization has ``n beta / gamma2^2 <= e^2`` (``x >= 1/2``: outside the regime where that form was measured)."""
    if not (0 < gamma < gamma2) or nbeta <= math.e ** 2 * gamma2 ** 2:
        return None
    x1 = 1.0 / math.log(nbeta / gamma ** 2)
    x2 = 1.0 / math.log(nbeta / gamma2 ** 2)
    return x1 / (x2 - x1)


def _sq_distance(params, state) -> dict:
    """``||w - w*||^2`` of one chain (a metrics function of `chunk_runner`): the recipe's equilibration observable.

    Along the flat directions of a singular model (e.g. the symmetries of a deep linear network) nothing but the
    localization ``gamma`` confines the chains, so ``||w - w*||^2`` relaxes only at rate ~``gamma`` per unit of
    diffusion time (an Ornstein-Uhlenbeck process), far slower than the loss's fast fluctuations; lambda^ depends on
    where the chains are along those directions, so it is biased until this observable has equilibrated.
    """
    return {"dist2": sum(jnp.sum(jnp.square(p - c)) for p, c in
                         zip(jax.tree.leaves(params), jax.tree.leaves(state.center)))}


def _paired_stationary(before, after, tol: float) -> bool:
    """Whether per-chain window means ``after`` agree with ``before`` (same chains, a later window): the mean paired
    change is within ``max(3 se, tol x mean)``."""
    diff = np.asarray(after) - np.asarray(before)
    se = float(np.std(diff, ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else 0.0
    return bool(abs(float(diff.mean())) <= max(3 * se, tol * abs(float(np.mean(after)))))


def _lagrange_at_zero(nodes: np.ndarray) -> np.ndarray:
    """Weights ``w_k`` with ``sum_k w_k f(x_k) = p(0)`` for the polynomial ``p`` through ``(x_k, f(x_k))``."""
    w = np.ones(len(nodes))
    for k, xk in enumerate(nodes):
        for j, xj in enumerate(nodes):
            if j != k:
                w[k] *= (0.0 - xj) / (xk - xj)
    return w


class _Rung:
    """One rung's chains, extendable (the chains continue) by more chunks of the compiled runner."""

    def __init__(self, ctx, run_chunk, carry, chunk_len: int, step_size: float, history: float = 0.0):
        self.ctx, self.run_chunk, self.carry = ctx, run_chunk, carry
        self.chunk_len, self.step_size = chunk_len, step_size
        self.history = history  # diffusion time the chains had run (at nearby settings) before this rung started
        self.losses = []  # (chunk_len, chains) per chunk
        self.dist2 = []  # (chunk_len, chains) per chunk: ||w - w*||^2
        self.steps = 0
        self.seconds = 0.0

    def extend(self, num_steps: int) -> bool:
        """Runs ``num_steps`` more steps; False when a chain's loss became non-finite."""
        t0 = time.perf_counter()
        try:
            return self._extend(num_steps)
        finally:
            self.seconds += time.perf_counter() - t0

    def _extend(self, num_steps: int) -> bool:
        for _ in range(num_steps // self.chunk_len):
            ts = np.arange(self.steps, self.steps + self.chunk_len, dtype=np.int32)
            self.carry, out = self.run_chunk(self.carry, ts, self.ctx)
            losses = np.asarray(out[0])
            self.losses.append(losses)
            self.dist2.append(np.asarray(out[2]["dist2"]))
            self.steps += self.chunk_len
            if not np.all(np.isfinite(losses)):
                return False
        return True

    def window(self) -> np.ndarray:
        """The second half of the run, ``(chains, steps / 2)``."""
        trace = np.concatenate(self.losses, axis=0)
        return trace[trace.shape[0] // 2:].T

    def dist_window(self) -> np.ndarray:
        """``||w - w*||^2`` over the second half of the run, ``(chains, steps / 2)``."""
        trace = np.concatenate(self.dist2, axis=0)
        return trace[trace.shape[0] // 2:].T


def llc_recipe(rng_key, loss_fn: Callable, params: ArrayTree, data: ArrayTree, *, batch_size: int,
               num_chains: int = 4, nbeta=None, localization=1.0, sampler="sgld", sampler_kwargs: dict | None = None,
               mask=None, eval_batch_size: int | None = None, mesh=None, chain_axis: str | None = None,
               data_axis: str | None = None, scale: float = 0.5, ratio: float = 3.0, num_rungs: int = 3,
               initial_steps: int = 2000, max_steps: int = 400_000, min_ess: float = 200.0,
               target_rel: float = 0.02, nonlinear_tol: float = 0.05, first_step_size: float | None = None,
               equilibration: float = 2.5, warm_start: bool = True, loc_factor: float = 10.0,
               loc_tol: float = 0.05, drift_tol: float = 0.1, loc_extrapolate: bool = True,
               loc_rerun: float | None = None,
               escalate: str = "localization", escalate_max_steps: int | None = None,
               progress: bool = False, on_divergence: str = "raise", warn: bool = True) -> llc_lib.LLCResult:
    """Runs the step-size recipe (module docstring) and returns its `LLCResult` (``recipe`` = `LLCRecipe`).

    Args:
      rng_key, loss_fn, params, data, batch_size, num_chains, nbeta, localization, sampler, sampler_kwargs, mask,
        eval_batch_size, mesh, chain_axis, data_axis: as for `estimate_llc`.
      scale: first rung ``eps_0 = scale / h_max``.
      ratio: step-size ratio between rungs (> 1).
      num_rungs: rungs used for the extrapolation (2: linear, 3: quadratic).
      initial_steps: first length of the first rung (doubled until converged); a multiple of 4.
      max_steps: budget of SGLD steps per chain over all rungs.
      min_ess: ESS the first rung's second half must reach.
      target_rel: target relative uncertainty of the estimate (sets how long the rungs run).
      nonlinear_tol: largest last extrapolation correction, relative to lambda^, for a trustworthy result.
      first_step_size: start the ladder here instead of at ``scale / h_max``.
      equilibration: the chains' run before every rung's window (its discarded first half plus, for a warm rung,
        the previous rungs) must span this many relaxation times of the slowest observable, ``||w - w*||^2``
        (estimated from its ESS over the window); the first rung doubles until it does (then is rerun warm once if
        the budget ran out first), and a rung that does not makes the result untrustworthy.
      loc_factor, loc_tol: the two finest rungs are rerun with ``loc_factor`` times the localization; a significant
        change (above two standard errors) of their extrapolation to step 0, over ``sqrt(loc_factor) - 1``, is the
        localization bias bound: part of the reported bias, and the result is untrustworthy when it exceeds
        ``loc_tol`` (relative).
        ``loc_factor <= 1`` skips this check.
      loc_extrapolate: when that change is significant and ``n beta > (e loc_factor gamma)^2``, extrapolate lambda^
        linearly in ``x = 1 / log(n beta / gamma^2)`` from the two localizations to ``x = 0`` (module docstring,
        step 6); the remaining localization bias is then half the correction.
      loc_rerun: the localization check reruns the two finest rungs for this fraction of their steps (default
        ``1 / loc_factor``: the slow directions relax ``loc_factor`` times faster there).
      drift_tol: the window mean of ``||w - w*||^2`` of the finest rung may differ from its linear prediction in the
        step from the two coarser rungs (consecutive earlier stretches of the same chains) by at most this fraction
        (or three standard errors); more is a drift that makes the result untrustworthy.
      warm_start: start every finer rung where the previous rung's chains stopped (already equilibrated along the
        slow directions up to the step-size bias) instead of at ``w*``.
      escalate: when the chains could not be sampled at the requested setting within the budget (too stiff, not
        equilibrated or drifting along the flat directions; module docstring, step 8): ``"localization"`` (default)
        runs the recipe again at ``loc_factor`` times the localization; ``"same_x"`` then also at ``loc_factor^2``
        times ``nbeta`` (up to ``loc_factor^2`` times the budget); ``"none"`` does not. The first trustworthy
        result is returned (``recipe.escalation`` says which), else the first attempt, with what they found in its
        message.
      escalate_max_steps: the ``"same_x"`` run's budget (default ``max_steps * loc_factor^2``: its steps are
        ``loc_factor^2`` times smaller, so this is the same budget of diffusion time).
      progress: print one line per rung.
      on_divergence: ``"raise"`` raises `LLCDivergenceError` when even a rung below the divergent one diverges.
      warn: warn when the result is not trustworthy.

    Returns:
      `LLCResult` of the finest rung, with ``llc_mean``/``llc_per_chain``/``llc_std`` the extrapolated values,
      ``llc_uncertainty`` the total uncertainty and ``recipe`` the `LLCRecipe` report.
    """
    call = dict(locals())  # the arguments, for the escalated rerun (step 8)
    t_start = time.perf_counter()
    if is_traced((rng_key, params, data)) or isinstance(jnp.zeros(()), jax.core.Tracer):
        raise ValueError("step_size='auto' chooses the step size on the host from measured runs and cannot run "
                         "under jax.jit; call it eagerly (it compiles its own programs).")
    check_rng_key(rng_key)
    if escalate not in ESCALATION_MODES:
        raise ValueError(f"escalate must be one of {ESCALATION_MODES}; got {escalate!r}.")
    algo = sgld_lib.resolve_sampler(sampler)
    num_chains = check_positive_int("num_chains", num_chains)
    num_rungs = check_positive_int("num_rungs", num_rungs, minimum=2)
    initial_steps = check_positive_int("initial_steps", initial_steps, minimum=8)
    max_steps = check_positive_int("max_steps", max_steps, minimum=initial_steps)
    eval_batch_size = check_eval_batch_size(eval_batch_size)
    if not ratio > 1 or not scale > 0:
        raise ValueError(f"ratio must be > 1 and scale > 0; got ratio={ratio}, scale={scale}.")
    n = check_inputs(params, data, step_size="auto", batch_size=batch_size, loss_fn=loss_fn)
    if mask is not None:
        mask = llc_lib.parameter_mask(params, mask)
    if nbeta is None:
        nbeta = default_nbeta(n)
    for name, value, ok in (("nbeta", nbeta, nbeta > 0 if np.ndim(nbeta) == 0 else False),
                            ("localization", localization, localization >= 0 if np.ndim(localization) == 0 else False)):
        if not (ok and np.isfinite(value)):
            raise ValueError(f"{name} must be a finite scalar {'> 0' if name == 'nbeta' else '>= 0'}; got {value!r}.")
    nbeta, localization = float(nbeta), float(localization)
    sampler_kwargs = dict(sampler_kwargs or {})

    h_max = top_curvature(loss_fn, params, data, nbeta=nbeta, localization=localization, mask=mask,
                          rng_key=jax.random.fold_in(rng_key, 7))
    wd = float(sampler_kwargs.get("weight_decay", 0.0))
    h_max += wd
    eps0 = float(first_step_size) if first_step_size is not None else scale / h_max
    chunk_len = max(2, initial_steps // 4)
    initial_steps = 4 * chunk_len

    chain_sharding, batch_sharding = llc_lib.chain_shardings(mesh, chain_axis, data_axis, num_chains, batch_size)
    prologue = llc_lib.cached_runner(llc_lib.prologue_runner, loss_fn, algo, num_chains, eval_batch_size,
                               mask is not None)
    init_loss, perm_keys, noise_keys, states0 = prologue(rng_key, params, data, mask)
    check_init_loss(init_loss)
    states0, perm_keys, noise_keys = llc_lib.constrain((states0, perm_keys, noise_keys), chain_sharding)
    run_chunk = llc_lib.cached_runner(llc_lib.chunk_runner, loss_fn, algo, tuple(sorted(sampler_kwargs.items())), n,
                                batch_size, 0, chain_sharding, batch_sharding, _sq_distance, 1, True, True)
    dtype = jnp.result_type(init_loss)
    init = float(init_loss)

    def new_rung(eps, start=None, gamma=None):
        """A rung at step ``eps``: its chains start at ``w*`` or, warm, where the chains of ``start`` stopped."""
        gamma = localization if gamma is None else gamma
        ctx = (data, params, perm_keys, noise_keys, jnp.asarray(eps, dtype), jnp.asarray(nbeta, dtype),
               jnp.asarray(gamma, dtype), mask, init_loss, jnp.asarray(0, jnp.int32))
        warm = start is not None and warm_start
        states = start.carry[0] if warm else states0
        carry = (states, jnp.zeros((num_chains,), dtype), jnp.zeros((num_chains,), jnp.int32))
        history = start.history + start.steps * start.step_size if warm and gamma == localization else 0.0
        return _Rung(ctx, run_chunk, carry, chunk_len, eps, history)

    def stats(rung):
        w = rung.window()
        per_chain = nbeta * llc_lib.mean_excess(np, w, init)
        conv = convergence(w)
        mcse = nbeta * conv.mcse
        se = float(np.std(per_chain, ddof=1) / math.sqrt(num_chains)) if num_chains > 1 else float("nan")
        # equilibration along the slowest direction: ESS of ||w - w*||^2 over the window (thinned to <= 2^14 draws
        # per chain, which keeps every slow correlation); the window (= the discarded burn-in) then spans
        # ``num_chains * draws / ESS`` relaxation times
        d = rung.dist_window()
        d = d[:, ::max(1, d.shape[1] // 16384)]
        dconv = convergence(d)
        d_chain = d.mean(axis=1)
        d_se = float(np.std(d_chain, ddof=1) / math.sqrt(num_chains)) if num_chains > 1 else float("nan")
        ess_d = dconv.ess if np.isfinite(dconv.ess) else 0.0
        relax = rung.steps // 2 * num_chains / max(ess_d, 1e-9) * rung.step_size  # diffusion time per relaxation
        # the chains' whole run before the window counts as burn-in: a warm rung continues chains that already ran
        # ``history`` at a nearby step size (the same gamma), whose stationary law differs by the O(eps) step-size
        # bias only. For a cold rung (history 0) this is ``ESS >= equilibration x chains``.
        burn = rung.history + rung.steps // 2 * rung.step_size
        return dict(step_size=rung.step_size, num_steps=rung.steps, num_burnin=rung.steps // 2,
                    llc_mean=float(per_chain.mean()), llc_se=float(np.nanmax([se, mcse])), rhat=conv.rhat,
                    ess=conv.ess, converged=conv.converged, diverged=False, seconds=rung.seconds,
                    dist2=float(d.mean()), dist2_se=d_se, dist2_chain=tuple(float(v) for v in d_chain),
                    ess_dist2=ess_d, relaxation_time=float(relax), burn_in_time=float(burn),
                    equilibrated=bool(ess_d > 0 and burn >= equilibration * relax)), per_chain

    tried = []  # every rung run, for the report
    used = 0

    def say(msg):
        if progress:
            print(f"[llc recipe] {msg}", flush=True)

    # first rung: find a stable eps_0 and the run length (doubling until converged and precise)
    shifts = 0
    while True:
        rung = new_rung(eps0)
        ok = rung.extend(initial_steps)
        used += rung.steps
        if ok:
            break
        tried.append(dict(step_size=eps0, num_steps=rung.steps, num_burnin=0, llc_mean=float("nan"),
                          llc_se=float("nan"), rhat=float("nan"), ess=float("nan"), converged=False, diverged=True))
        say(f"step {eps0:.3g} diverged; moving the ladder down")
        eps0 /= ratio
        shifts += 1
        if shifts > 4 or used + initial_steps > max_steps:
            return _fail(f"every first rung diverged (steps {_steps(tried)})", tried,
                         h_max, init_loss, nbeta, num_chains, dtype, t_start, used, on_divergence, warn, n)
    cost_factor = sum(ratio ** k for k in range(num_rungs))
    previous = None
    while True:
        row, _ = stats(rung)
        rel = row["llc_se"] / max(abs(row["llc_mean"]), 1e-12)
        # drift: this window [T/2, T] against the previous one [T/4, T/2] (disjoint, so independent errors)
        drift_ok = previous is not None and abs(row["llc_mean"] - previous["llc_mean"]) <= max(
            3.0 * math.hypot(row["llc_se"], previous["llc_se"]), target_rel * abs(row["llc_mean"]))
        # ||w - w*||^2 must not drift either (same windows, paired per chain): its relaxation-time estimate from a
        # window much shorter than the relaxation is fooled by a slow trend (a generic point of the 10-20-20-10
        # network's zero set: ESS 11.4 after 4000 steps, while the window means then grew 15, 55, 105 along the ladder)
        dist_ok = previous is not None and _paired_stationary(previous["dist2_chain"], row["dist2_chain"],
                                                              drift_tol)
        say(f"rung 0: step {eps0:.3g}, {rung.steps} steps: lambda^ {row['llc_mean']:.4g} +- {row['llc_se']:.2g}, "
            f"R-hat {row['rhat']:.3f}, ESS {row['ess']:.0f}, ESS of |w - w*|^2 {row['ess_dist2']:.1f}, "
            f"|w - w*|^2 {row['dist2']:.3g}" + ("" if previous is None else f" (was {previous['dist2']:.3g})"))
        settled = row["converged"] and row["ess"] >= min_ess and drift_ok and dist_ok and row["equilibrated"]
        next_total = used + rung.steps * (1 + 2 * (cost_factor - 1))
        first_rung_settled = settled
        if (settled and rel <= target_rel / 2) or next_total > max_steps:
            break
        previous = row
        ok = rung.extend(rung.steps)
        used += rung.steps // 2
        if not ok:
            first_rung_settled = False
            break
    # The curvature where the chains are, not only at w*: in a singular model they move into regions (the "arms"
    # of the degenerate set) that are far stiffer than w*, and a ladder scaled to w* is then not in its linear
    # regime. Measured at the end of the first rung; the ladder restarts lower when the first step times that
    # curvature exceeds 2.5 (past 5/8 of SGLD's stability limit eps h = 4 on a Gaussian, where the variance factor
    # 1 / (1 - eps h / 4) is above 2.6 and the ladder is far from linear).
    positions = jax.tree.map(lambda x: x, rung.carry[0].position)
    h_run = max(top_curvature(loss_fn, jax.tree.map(lambda x: x[c], positions), data, nbeta=nbeta,
                              localization=localization, mask=mask, num_iters=20,
                              rng_key=jax.random.fold_in(rng_key, 11 + c)) for c in range(min(num_chains, 4))) + wd
    stiff_note = None
    if first_step_size is None and eps0 * h_run > 2.5:
        steps_new = int(round(rung.steps * (eps0 * h_run / scale) / chunk_len)) * chunk_len
        if used + steps_new * cost_factor <= max_steps:
            say(f"curvature along the chains {h_run:.3g} ({h_run / h_max:.1f}x that at w*): restarting the ladder at "
                f"{scale / h_run:.3g} with the same diffusion time")
            tried.append(dict(stats(rung)[0], note="restarted: stiffer along the chains"))
            eps0, h_max = scale / h_run, h_run
            rung = new_rung(eps0, start=rung)
            ok = rung.extend(steps_new)
            used += rung.steps
            first_rung_settled = first_rung_settled and ok
        else:
            stiff_note = (f"the chains reach regions {h_run / h_max:.1f}x stiffer than w* (curvature {h_run:.3g}), so "
                          f"the ladder should start near {scale / h_run:.3g}, which needs ~{steps_new * cost_factor:.3g} "
                          "steps per chain" + ("" if first_rung_settled else
                                               " or more (the chains were still moving into stiffer regions)"))
            say(stiff_note + "; over the budget")
    steps0 = rung.steps
    rungs = [rung]
    eps = eps0
    while len(rungs) < num_rungs:
        eps = eps / ratio
        r = new_rung(eps, start=rungs[-1])
        ok = r.extend(int(round(steps0 * (eps0 / eps) / chunk_len)) * chunk_len)
        used += r.steps
        rungs.append(r)
        say(f"rung {len(rungs) - 1}: step {eps:.3g}, {r.steps} steps" + ("" if ok else " (diverged)"))
    results = []
    for r in rungs:
        if r.losses and not np.all(np.isfinite(np.concatenate(r.losses))):
            row = dict(step_size=r.step_size, num_steps=r.steps, num_burnin=r.steps // 2, llc_mean=float("nan"),
                       llc_se=float("nan"), rhat=float("nan"), ess=float("nan"), converged=False, diverged=True)
            results.append((row, None))
        else:
            results.append(stats(r))

    # The first rung is the only one started cold at w*; its burn-in (T/2) is the shortest of the ladder. When it has
    # not equilibrated within the budget, it is rerun once, warm from the finest rung's chains (which have run the
    # whole ladder, 2.5 T and more): a tenth-or-less of the ladder's cost. (The 4-4-4 network, rank 2: the cold first
    # rung's ESS of ||w - w*||^2 was 8.3 < 10 after 2 x 64000 steps, and the budget could not double the ladder.)
    first_rerun = False
    ok0 = True
    if (warm_start and not results[0][0].get("equilibrated", False) and results[0][1] is not None
            and used + steps0 <= max_steps):
        r0 = new_rung(eps0, start=rungs[-1])
        ok0 = r0.extend(steps0)
        used += r0.steps
        if not ok0:
            say("rung 0's warm rerun diverged: the chains at the end of the ladder are stiffer still")
        if ok0:
            say(f"rung 0 (cold, not equilibrated) rerun warm from the finest rung's chains: {r0.steps} steps")
            tried.append(dict(results[0][0], note="replaced: started cold at w* and not equilibrated; rerun warm"))
            rungs[0] = r0
            results[0] = stats(r0)
            row0 = results[0][0]
            first_rung_settled = (first_rung_settled or (row0["converged"] and row0["equilibrated"]
                                                         and row0["ess"] >= min_ess))
            first_rerun = True

    def extrapolate(results):
        rows = [row for row, _ in results]
        per = np.stack([pc for _, pc in results])  # (rungs, chains)
        x = np.array([row["step_size"] for row in rows])
        # a rung whose step times the curvature along the chains exceeds 2.5 is past the regime where lambda^(eps)
        # is a low-order polynomial (the variance factor 1 / (1 - eps h / 4) has its pole at eps h = 4): it is not a
        # node of the extrapolation, which is then linear in the two finest rungs (their quadratic with it, the
        # size of the dropped correction, is kept as the remaining-bias estimate)
        stiff_drop = stiff_note is not None and len(x) >= 3 and x[-3] * h_run > 2.5
        w_q = _lagrange_at_zero(x[-3:]) if len(x) >= 3 and not stiff_drop else _lagrange_at_zero(x[-2:])
        w_l = _lagrange_at_zero(x[-2:])
        q_c = w_q @ per[-len(w_q):]
        l_c = w_l @ per[-2:]
        se_rungs = np.array([row["llc_se"] for row in rows[-len(w_q):]])
        se_prop = float(np.sqrt(np.sum((w_q * se_rungs) ** 2)))
        se_chain = float(np.std(q_c, ddof=1) / math.sqrt(num_chains)) if num_chains > 1 else float("nan")
        se = float(np.nanmax([se_prop, se_chain]))
        if len(w_q) > 2:
            bias = abs(float(q_c.mean()) - float(l_c.mean()))
        elif stiff_drop:
            bias = abs(float((_lagrange_at_zero(x[-3:]) @ per[-3:]).mean()) - float(l_c.mean()))
        else:
            bias = abs(float(l_c.mean()) - rows[-1]["llc_mean"])
        # the correction's own noise: compare it with its standard error before calling the ladder non-linear
        d_c = q_c - l_c
        se_d = float(np.std(d_c, ddof=1) / math.sqrt(num_chains)) if num_chains > 1 else 0.0
        return q_c, se, bias, se_d

    while True:
        diverged = [row for row, pc in results if pc is None]
        if diverged:
            return _fail(f"rung(s) at step {_steps(diverged)} diverged", tried +
                         [row for row, _ in results], h_max, init_loss, nbeta, num_chains, dtype, t_start, used,
                         on_divergence, warn, n)
        q_c, se, bias, se_d = extrapolate(results)
        llc = float(q_c.mean())
        linear = bias <= max(3.0 * max(se_d, se), nonlinear_tol * abs(llc))
        next_cost = rungs[-1].steps * ratio
        if linear or used + next_cost > max_steps:
            break
        eps = eps / ratio
        say(f"the ladder is not linear yet (last correction {bias:.3g}); adding step {eps:.3g}")
        r = new_rung(eps, start=rungs[-1])
        r.extend(int(round(steps0 * (eps0 / eps) / chunk_len)) * chunk_len)
        used += r.steps
        rungs.append(r)
        results.append(stats(r) if np.all(np.isfinite(np.concatenate(r.losses))) else (
            dict(step_size=eps, num_steps=r.steps, num_burnin=r.steps // 2, llc_mean=float("nan"),
                 llc_se=float("nan"), rhat=float("nan"), ess=float("nan"), converged=False, diverged=True), None))

    # Sensitivity to the localization: lambda^ is defined for gamma -> 0 (with n beta -> infinity), but along
    # directions that only the localization confines (a singular model's flat directions) the chains explore a ball
    # of radius ~1 / sqrt(gamma), and at finite n beta lambda^ can depend on gamma (``L = (ab)^2``, n = 1000: 0.36
    # at gamma = 1 and 0.20 at gamma = 10 by quadrature, asymptotically 0.5). The two finest rungs are rerun (warm)
    # at ``loc_factor`` times the localization, for ``1 / loc_factor`` of the diffusion time (the slow directions
    # relax ``loc_factor`` times faster), and the two linear extrapolations to step 0 are compared. (Comparing at one
    # step would mix in the step-size bias, which itself depends on gamma: on the 4-4-4 network, rank 2, the first
    # rung gives 10.9, 9.6, 8.7, 7.9 at gamma = 0.3, 1, 3, 10 while the extrapolation at gamma = 1 is 7.36 for an
    # exact 7.5, because a weaker localization lets the chains reach stiffer regions.)
    loc_row = None
    loc_extrap = None  # (correction to gamma -> 0, its standard error) where it applies
    loc_bias = 0.0
    loc_ok = True
    if localization > 0 and loc_factor > 1 and rungs[-2].step_size * (loc_factor - 1) * localization <= 0.5:
        gamma2 = loc_factor * localization
        pair = []
        for r in rungs[-2:]:
            r_loc = new_rung(r.step_size, start=r, gamma=gamma2)
            rerun = r.steps / loc_factor if loc_rerun is None else r.steps * float(loc_rerun)
            ok = r_loc.extend(max(4 * chunk_len, int(round(rerun / chunk_len)) * chunk_len))
            used += r_loc.steps
            if not ok:
                loc_ok = False
                break
            pair.append(stats(r_loc))
        if loc_ok:
            w_l = _lagrange_at_zero(np.array([r.step_size for r in rungs[-2:]]))
            base = [results[-2], results[-1]]
            lim_1 = float(w_l @ np.array([row["llc_mean"] for row, _ in base]))
            lim_2 = float(w_l @ np.array([row["llc_mean"] for row, _ in pair]))
            se_delta = float(np.sqrt(np.sum(w_l ** 2 * (np.array([row["llc_se"] for row, _ in base]) ** 2 +
                                                        np.array([row["llc_se"] for row, _ in pair]) ** 2))))
            delta = lim_2 - lim_1
            # only a significant change counts as bias (the short reruns' noise would otherwise inflate every
            # regular model's uncertainty)
            loc_bias = abs(delta) / (math.sqrt(loc_factor) - 1) if abs(delta) > 2 * se_delta else 0.0
            # the test is on the bias this change implies at gamma, not on the change itself: the change from gamma to
            # 10 gamma is larger than the bias at gamma whenever lambda^ keeps moving as gamma -> 0 (which the
            # sqrt(gamma) model assumes; measured: the 5-3-4 network, m = 2, moves by 0.67 to 10 gamma for a bias of
            # ~0.14 at gamma = 1, a ratio 5 > sqrt(10) - 1; 3-3-3-3: 0.74 for ~0.26, ratio 2.8)
            # Extrapolation to gamma -> 0, n beta -> infinity along x = 1 / log(n beta / gamma^2) (step 6): measured
            # with an exact sampler (benchmarks/llc_ground_truth.py), lambda^(n, gamma) of the 4-4-4, 5-3-4 and
            # 3-3-3-3 networks is linear in x, and the line through gamma = 1 and 10 at n = 10^4 meets x = 0 at 7.48,
            # 7.00 and 4.01 (exact 7.5, 7, 4). Used where the change is significant and lowers lambda^, and the
            # stronger localization still has n beta / gamma^2 > e^2 (x < 1/2).
            # (applied below, once every other check has passed)
            weight = localization_extrapolation_weight(nbeta, localization, gamma2)
            if loc_extrapolate and loc_bias > 0 and delta < 0 and weight is not None:
                loc_extrap = (-delta * weight, se_delta * weight)
            loc_ok = loc_bias <= loc_tol * abs(lim_1)
            loc_row = dict(localization=gamma2, llc_mean=lim_2, llc_mean_at_localization=lim_1, change=delta,
                           change_se=se_delta, rungs=tuple(row for row, _ in pair), correction=0.0)
            say(f"localization x{loc_factor:g}: extrapolated lambda^ {lim_2:.4g} (vs {lim_1:.4g} at {localization:g})"
                f"; localization bias bound {loc_bias:.3g}")

    rows = [row for row, _ in results]
    finest = rows[-1]
    problems = {}  # short name (LLCRecipe.problems) -> its sentence in the message
    notes = []
    if stiff_note is not None:
        # the linearity check alone is fooled when the extrapolation's rungs are near SGLD's limit: on the
        # 5-10-10-10-5 network (rank 2, exact 12.5) equilibrated chains reach regions 7.7x stiffer than w*, the first
        # rung's eps h is 3.8 (near the limit 4), and the rungs 35.0, 26.2, 22.4 look linear enough but extrapolate
        # to 20.4. That first rung is no longer a node (extrapolate); the result is untrustworthy when even the
        # coarser of the two finest rungs is past eps h = 2.5. (The 5-3-4 network: eps h = 3.65, 1.22, 0.41 along
        # the chains; linear in the two finest: 6.85 for the finite-n value 6.857, exact 7.)
        if rungs[-2].step_size * h_run > 2.5:
            problems["stiff"] = stiff_note + f" (budget max_steps={max_steps})"
        elif len(rungs) >= 3 and rungs[-3].step_size * h_run > 2.5:
            notes.append(stiff_note + f" (budget max_steps={max_steps}); the coarsest rung (step x curvature "
                         f"{rungs[-3].step_size * h_run:.2g} > 2.5) was left out of the extrapolation, linear in the "
                         f"two finest (step x curvature {rungs[-2].step_size * h_run:.2g}, "
                         f"{rungs[-1].step_size * h_run:.2g})")
        else:
            notes.append(stiff_note + f" (budget max_steps={max_steps}); the extrapolation's rungs are below "
                         "step x curvature 2.5")
    if not first_rung_settled:
        problems["unsettled"] = (("the first rung did not settle within the budget, even rerun warm" if first_rerun
                                  else "the first rung did not settle within the budget")
                                 + f" (still drifting or not converged after {steps0} steps: the chains may not have "
                                 "reached equilibrium)")
    if not ok0:
        problems["rerun_diverged"] = (f"the first rung, rerun warm from the finest rung's chains at step {eps0:.3g}, "
                                      "diverged: the chains kept moving into stiffer regions along the ladder")
    # Drift along the slow directions. ||w - w*||^2 over a rung's window depends on the step only through the same
    # first-order bias as lambda^ (linreg50: 0.0202, 0.0148, 0.0131 at steps in ratio 3, successive differences in
    # ratio 3.3), so over the last three rungs it must be linear in the step: the finest rung's value is predicted from
    # the two coarser ones. The rungs are consecutive stretches of the same chains (the finest two last), so a drift
    # in time breaks that. On the 5-10-10-10-5 network at gamma = 1 the window means are 121, 146, 180 (predicted
    # 154), while the relaxation estimates (0.8, 1.4, 2.4) pass the history test for the finer rungs (a slow trend
    # looks like a long correlation time that the history already spans); at gamma = 10 they are 24.0, 23.8, 24.3.
    # With 4 chains the paired jumps there (51, 12, 4, 35: 26 +- 11) stay below 3 se, so this check does not fire on
    # that network (its result is untrustworthy for the other reasons); it fires on free diffusion along directions
    # the loss does not see (tests) and sharpens with more chains.
    last = rows[-3:]
    if len(last) == 3 and all(np.isfinite([r_.get("dist2", np.nan) for r_ in last])):
        wts = _lagrange_at_zero(np.array([r_["step_size"] for r_ in last[:2]]) - last[2]["step_size"])
        pred = float(wts @ np.array([r_["dist2"] for r_ in last[:2]]))
        # per chain (the same chains on every rung): the paired jumps cancel the chains' different levels
        jumps = np.array(last[2]["dist2_chain"]) - wts @ np.array([r_["dist2_chain"] for r_ in last[:2]])
        se_j = float(np.std(jumps, ddof=1) / math.sqrt(num_chains)) if num_chains > 1 else 0.0
        jump = float(jumps.mean())
        if abs(jump) > max(3 * se_j, drift_tol * max(abs(last[2]["dist2"]), 1e-300)):
            problems["drift"] = (
                "||w - w*||^2 still drifts along the ladder (window means " + ", ".join(
                    f"{r_['dist2']:.3g}" for r_ in last) + f" at steps {_steps(last)}: the finest is {jump:+.3g} "
                f"off the value {pred:.3g} that a step-size bias linear in the step predicts, above "
                f"{100 * drift_tol:g}% and 3 standard errors ({se_j:.2g})): the chains have not reached equilibrium "
                "along the flat directions")
    used_rows = rows[-min(len(rows), 3):]
    unsettled = [row for row in used_rows if not row["equilibrated"]]
    if unsettled:
        problems["unequilibrated"] = ("not equilibrated along the slowest direction at step " + ", ".join(
            f"{row['step_size']:.3g} (burn-in {row['burn_in_time']:.3g} of diffusion time, the previous rungs "
            f"included, < {equilibration:g} relaxation times of ||w - w*||^2, ~{row['relaxation_time']:.3g} each "
            f"(ESS {row['ess_dist2']:.1f} over {num_chains} chains))" for row in unsettled)
            + "; lambda^ is then biased (low when the chains start at w*)")
    if not finest["converged"]:
        problems["unconverged"] = (f"the finest rung is not converged (R-hat {finest['rhat']:.3f}, "
                                   f"ESS {finest['ess']:.0f})")
    if not linear:
        problems["nonlinear"] = (f"lambda^(eps) is not yet linear in eps (last correction {bias:.3g} > "
                                 f"{max(3 * max(se_d, se), nonlinear_tol * abs(llc)):.3g}) within the budget of "
                                 f"{max_steps} steps per chain")
    # The localization extrapolation assumes both lambda^(gamma) values are right, so it is applied only when every
    # other check passed (the 5-10-10-10-5 network's unequilibrated 20.6 at gamma = 1 would become 26.2). Half the
    # correction is kept as the remaining bias: the linear model's error on the exact-sampler values of the networks
    # of step 6 is 0.1-16% of its correction (L = (ab)^2: 110%, which loc_tol then flags).
    if loc_extrap is not None and not problems:
        loc_corr, se_corr = loc_extrap
        loc_bias = 0.5 * abs(loc_corr)
        se = math.hypot(se, se_corr)
        llc = llc + loc_corr
        q_c = q_c + loc_corr
        loc_ok = loc_bias <= loc_tol * abs(llc)
        loc_row["correction"] = loc_corr
        say(f"extrapolated to localization -> 0: correction {loc_corr:+.3g}, lambda^ {llc:.4g}")
    elif loc_extrap is not None:
        notes.append("no extrapolation to localization -> 0 (the other checks failed)")
    bias = math.hypot(bias, loc_bias)
    unc = math.sqrt(se ** 2 + bias ** 2)
    if loc_row is not None and loc_row["correction"] != 0:
        notes.append(f"extrapolated to localization -> 0 along 1 / log(n beta / gamma^2) from "
                     f"{loc_row['llc_mean_at_localization']:.4g} at gamma = {localization:g} and "
                     f"{loc_row['llc_mean']:.4g} at {loc_factor * localization:g} (both at step 0): correction "
                     f"{loc_row['correction']:+.3g}, half of it counted as bias")
    if not loc_ok:
        problems["localization"] = (
            "lambda^ depends on the localization (" + (
                f"extrapolated to step 0 from the two finest steps: {loc_row['llc_mean_at_localization']:.4g} at "
                f"gamma = {localization:g} vs {loc_row['llc_mean']:.4g} at {loc_factor * localization:g}, a change "
                f"above 2 standard errors ({loc_row['change_se']:.2g}); " + (
                    f"the remaining bias after extrapolating to gamma -> 0 (correction {loc_row['correction']:+.3g})"
                    f", {loc_bias:.3g} (half the correction), is above {100 * loc_tol:g}%"
                    if loc_row["correction"] != 0 else
                    f"the bias it implies at gamma = {localization:g}, {loc_bias:.3g} (the change over "
                    f"sqrt({loc_factor:g}) - 1), is above {100 * loc_tol:g}%")
                if loc_row is not None else f"the rerun at {loc_factor * localization:g} diverged")
            + "): along flat directions the localization, not the loss, sets where the chains go (a weaker one, "
              "with longer chains, or more data reduces this; when the chains also drift, see above, they are not yet "
              "where it confines them)")
    ladder = ", ".join(f"{row['step_size']:.3g}: {row['llc_mean']:.4g}" for row in rows)
    trust = not problems
    seconds = time.perf_counter() - t_start
    if trust:
        message = (f"lambda^ = {llc:.4g} +- {unc:.2g} (extrapolated to step 0 from lambda^(step) = {ladder}; "
                   f"remaining bias estimate {bias:.2g}, statistical se {se:.2g}; chosen step {finest['step_size']:.3g})"
                   + "".join(f". Note: {n_}" for n_ in notes))
    else:
        message = (f"No trustworthy setting: {'; '.join(problems.values())}. Tried lambda^(step) = {ladder}; the "
                   f"extrapolation gives {llc:.4g} +- {unc:.2g}. Raise max_steps, use more chains, or a larger "
                   "batch size (less gradient noise)." + "".join(f" Note: {n_}." for n_ in notes))
    report = LLCRecipe(llc=llc, uncertainty=unc, se=se, bias=bias, step_size=float(finest["step_size"]),
                       trustworthy=trust, message=message, rungs=tuple(tried + rows), h_max=h_max,
                       localization_check=loc_row, problems=tuple(problems),
                       diffusion_time=float(steps0 * eps0), total_steps=int(used), seconds=seconds)
    trace = rungs[-1].window()
    result = llc_lib.summarize(np, trace, np.full((trace.shape[1], num_chains), np.nan, trace.dtype),
                               np.asarray(init_loss), nbeta)
    result = llc_lib.finish(result, warn=False, step_size=finest["step_size"])
    std = float(np.std(q_c, ddof=1)) if num_chains > 1 else float("nan")
    result = result._replace(llc_mean=jnp.asarray(llc, dtype), llc_std=jnp.asarray(std, dtype),
                             llc_per_chain=jnp.asarray(q_c, dtype), llc_uncertainty=jnp.asarray(unc, dtype),
                             step_size=jnp.asarray(finest["step_size"], dtype), num_data=jnp.asarray(n, jnp.int32),
                             recipe=report)
    say(message)
    if not trust and _ESCALATE.intersection(problems) and localization > 0 and loc_factor > 1:
        result = _escalated(call, result, t_start, say)
        report = result.recipe
    if warn and not report.trustworthy:
        warnings.warn(report.message, RuntimeWarning, stacklevel=3)
    return result


# problems of sampling along the flat directions, which a stronger localization relieves
_ESCALATE = frozenset({"stiff", "unsettled", "rerun_diverged", "drift", "unequilibrated"})
ESCALATION_MODES = ("none", "localization", "same_x")


def _escalated(call: dict, first: llc_lib.LLCResult, t_start: float, say) -> llc_lib.LLCResult:
    """Step 8 of the module docstring: the recipe rerun at ``(nbeta, f gamma)`` and, with ``escalate="same_x"``,
    then at ``(f^2 nbeta, f gamma)``; the first trustworthy one is returned, else ``first`` with what they found."""
    mode = call["escalate"]
    f = float(call["loc_factor"])
    r0 = first.recipe
    nbeta, gamma = float(first.nbeta), float(call["localization"])
    why = (f"at localization {gamma:g} the chains could not be sampled within the budget "
           f"({', '.join(r0.problems)})")
    stages = {"none": [], "localization": [("localization", 1.0)],
              "same_x": [("localization", 1.0), ("same_x", f * f)]}[mode]
    notes, extra_steps = [], 0
    for stage, scale in stages:
        nbeta2, gamma2 = scale * nbeta, f * gamma
        budget = int(call["max_steps"] * scale)
        if stage == "same_x" and call["escalate_max_steps"] is not None:
            budget = check_positive_int("escalate_max_steps", call["escalate_max_steps"])
        say(f"escalating: {why}; measuring at localization {gamma2:g} and n beta {nbeta2:.4g}, budget {budget} steps "
            "per chain")
        kw = dict(call, rng_key=jax.random.fold_in(call["rng_key"], 0x5EC + int(scale)), nbeta=nbeta2,
                  localization=gamma2, max_steps=budget, escalate="none", first_step_size=None, warn=False,
                  on_divergence="raise", loc_rerun=max(1.0 / math.sqrt(f), call["loc_rerun"] or 0.0))
        try:
            second = llc_recipe(**kw)
        except LLCDivergenceError as e:
            notes.append(f"Escalated to localization {gamma2:g} and n beta {nbeta2:.4g}: diverged ({e}).")
            continue
        r1 = second.recipe
        extra_steps += r1.total_steps
        if not r1.trustworthy:
            notes.append(f"Escalated to localization {gamma2:g} and n beta {nbeta2:.4g} ({r1.total_steps} more steps "
                         f"per chain): {r1.llc:.4g} +- {r1.uncertainty:.2g}, not trustworthy either "
                         f"({', '.join(r1.problems)}).")
            continue
        loc_bound, weak = _localization_bound(r1, f, call["loc_tol"])
        if weak is not None:
            notes.append(f"Escalated to localization {gamma2:g} and n beta {nbeta2:.4g} ({r1.total_steps} more steps "
                         f"per chain): {r1.llc:.4g} +- {r1.uncertainty:.2g}, but {weak}.")
            continue
        escalation = dict(stage=stage, nbeta=nbeta2, localization=gamma2, from_nbeta=nbeta, from_localization=gamma,
                          from_llc=r0.llc, from_uncertainty=r0.uncertainty, from_problems=r0.problems,
                          from_message=r0.message, from_rungs=r0.rungs, from_total_steps=r0.total_steps)
        # the localization bias the check bounds (with confidence) joins the reported bias
        bias = math.hypot(r1.bias, loc_bound)
        unc = math.hypot(r1.se, bias)
        if stage == "localization":
            how = (f"measured at localization {gamma2:g} (n beta unchanged) because {why}. The stronger localization "
                   f"confines the chains along the flat directions, and its own check against {f * gamma2:g} bounds "
                   f"the localization bias at {loc_bound:.2g} (the change plus two standard errors, over "
                   f"sqrt({f:g}) - 1), included in the uncertainty: {r1.llc:.4g} +- {unc:.2g}")
        else:
            how = (f"measured at localization {gamma2:g} and n beta {nbeta2:.4g} because {why}, and at localization "
                   f"{gamma2:g} with n beta {nbeta:.4g} it was not trustworthy either; this setting has the same "
                   "x = 1 / log(n beta / gamma^2), which the finite-n value follows, with the chains confined along "
                   f"the flat directions {f:g}x more tightly (localization bias bound {loc_bound:.2g} included: "
                   f"{r1.llc:.4g} +- {unc:.2g})")
        message = (f"{r1.message}. Escalated: {how} (the first attempt gave {r0.llc:.4g} +- {r0.uncertainty:.2g}, "
                   "untrustworthy)" + "".join(f". {n_}" for n_ in notes))
        report = dataclasses.replace(r1, message=message, total_steps=r0.total_steps + extra_steps,
                                     seconds=time.perf_counter() - t_start, escalation=escalation, bias=bias,
                                     uncertainty=unc)
        say(message)
        return second._replace(recipe=report, llc_uncertainty=jnp.asarray(unc, second.llc_uncertainty.dtype))
    hint = "(recipe_kwargs; CLI --escalate): measure at localization"
    if mode == "none":
        notes.append(f"Or escalate='localization' {hint} {f * gamma:g}, where the chains are confined along the flat "
                     "directions.")
    elif mode == "localization":
        notes.append(f"Or escalate='same_x' {hint} {f * gamma:g} and n beta {f * f * nbeta:.4g}, the same "
                     f"1 / log(n beta / gamma^2) (up to {f * f:g}x the steps).")
    return first._replace(recipe=dataclasses.replace(
        r0, message=r0.message + "".join(f" {n_}" for n_ in notes), total_steps=r0.total_steps + extra_steps,
        seconds=time.perf_counter() - t_start))


def _localization_bound(rec: LLCRecipe, factor: float, loc_tol: float) -> tuple[float, str | None]:
    """The localization bias an escalated result's check bounds with confidence, and why that check cannot vouch for
    the result (None when it can).

    The escalation raised the localization, which is where a soft direction's share of lambda^ is lost (a regression
    whose soft direction has curvature 0.03 gives 0.5 + 0.11 at gamma = 0.1 and 0.5 + 0.01 at 1, for 1 as gamma ->
    0), so the check against ``factor`` times it must bound the bias with confidence: the change plus two of its
    standard errors, over ``sqrt(factor) - 1``, within ``loc_tol``. (Step 6 counts only a significant change, so a
    noisy change of 0.1 +- 0.08 would pass it.) Where step 6 extrapolated, its half-correction bound stands.
    """
    lc = rec.localization_check
    if lc is None:
        return float("nan"), "it has no localization check to vouch for it"
    if lc.get("correction", 0.0) != 0.0:
        return 0.0, None  # step 6's half-correction is already in rec.bias
    bound = (abs(lc["change"]) + 2.0 * lc["change_se"]) / (math.sqrt(factor) - 1.0)
    if bound <= loc_tol * abs(rec.llc):
        return bound, None
    return bound, (f"its localization check cannot rule out a bias of {bound:.3g} ({100 * bound / abs(rec.llc):.1f}%: "
                   f"the change to {lc['localization']:g}, {lc['change']:+.3g} +- {lc['change_se']:.2g}, plus two "
                   f"standard errors, over sqrt({factor:g}) - 1), above {100 * loc_tol:g}%")


def _steps(rows) -> str:
    return "[" + ", ".join(format(r["step_size"], ".3g") for r in rows) + "]"


def _fail(reason, tried, h_max, init_loss, nbeta, num_chains, dtype, t_start, used, on_divergence, warn, n):
    message = (f"No trustworthy setting: {reason}. Tried steps {_steps(tried)}; check "
               "that params is a trained minimum and the loss is finite near it, or raise the localization.")
    if on_divergence == "raise":
        raise LLCDivergenceError(message)
    report = LLCRecipe(llc=float("nan"), uncertainty=float("nan"), se=float("nan"), bias=float("nan"),
                       step_size=float("nan"), trustworthy=False, message=message, rungs=tuple(tried), h_max=h_max,
                       diffusion_time=float("nan"), total_steps=int(used), seconds=time.perf_counter() - t_start,
                       problems=("diverged",))
    if warn:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    nan = jnp.full((), jnp.nan, dtype)
    return llc_lib.LLCResult(llc_mean=nan, llc_std=nan, llc_per_chain=jnp.full((num_chains,), jnp.nan, dtype),
                             loss_trace=jnp.zeros((num_chains, 0), dtype), init_loss=jnp.asarray(init_loss, dtype),
                             mala_acceptance=nan, mala_per_chain=jnp.full((num_chains,), jnp.nan, dtype), ess=nan,
                             rhat=nan, nbeta=jnp.asarray(nbeta, dtype), llc_mcse=nan, step_size=nan,
                             diverged=jnp.ones((num_chains,), bool), num_data=jnp.asarray(n, jnp.int32),
                             llc_uncertainty=nan, recipe=report, converged=jnp.asarray(False))


def estimate_llc_auto(rng_key, loss_fn, params, data, *, num_chains, batch_size, nbeta=None, localization=1.0,
                      sampler="sgld", sampler_kwargs=None, mesh=None, chain_axis=None, data_axis=None,
                      eval_batch_size=None, warn=True, mask=None, progress=False, on_divergence="raise",
                      **recipe_kwargs):
    """``estimate_llc(..., step_size="auto")``: `llc_recipe` with the estimator's arguments."""
    return llc_recipe(rng_key, loss_fn, params, data, batch_size=batch_size, num_chains=num_chains, nbeta=nbeta,
                      localization=localization, sampler=sampler, sampler_kwargs=sampler_kwargs, mask=mask,
                      eval_batch_size=eval_batch_size, mesh=mesh, chain_axis=chain_axis, data_axis=data_axis,
                      progress=progress, on_divergence=on_divergence, warn=warn, **recipe_kwargs)

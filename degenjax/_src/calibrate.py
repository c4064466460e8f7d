"""Calibration of the LLC sampler (arXiv 2405.10927 section 2).

`calibrate` runs the step-size recipe of ``estimate_llc(..., step_size="auto")`` (`degenjax._src.recipe`: a ladder of
step sizes at a fixed diffusion time, extrapolated to step 0) for every (nbeta, localization) pair asked for, and
recommends the recipe's setting; `degenjax.plot_calibration` (in plots.py: this module draws nothing) draws lambda^
against the step size with the extrapolation and the convergence of every rung. The recommendation is the same
number ``step_size="auto"`` and ``degenjax llc --step-size auto`` report.

`calibration_sweep` and `recommend` are the grid tools (one short run per step size x nbeta x localization cell,
pure and jittable) behind sweep heatmaps. Their stability rule finds settings that are *stable*, not unbiased: a
step can pass every condition and still carry a large step-size bias (the MALA acceptance is computed on one
minibatch, which cannot see the minibatch-noise part of the bias), so use `calibrate` to choose a step.

The grid's stability rule (every cell, all conditions):

1. *finite*: every recorded loss of every chain is finite (no divergence);
2. *positive*: every chain's lambda^ is > 0 (a negative one means the chain found lower loss than ``L_n(w*)``:
   ``w*`` is not a minimum at this temperature, or the step is so large that the discretisation dominates);
3. *flat*: the loss trace has stopped drifting: ``|drift| <= flat_tol * lambda^ + 2 * se(drift)``, where
   ``drift = nbeta * (mean of the last quarter of draws - mean of the third quarter)`` averaged over chains (the
   change of lambda^ over the second half, in lambda units) and ``se`` its standard error over chains;
4. *acceptance*: the MALA acceptance probability lies in ``acceptance_range`` (default ``[0.8, 0.99]``, around
   the ~0.9 that keeps the SGLD discretisation bias small without wasting steps); skipped when none was computed
   (``mala_every=0`` or SGNHT).

The recommendation, among stable cells: the ``nbeta`` closest (in log scale) to the default ``n / log n`` (``nbeta``
defines the estimator, not just the sampler); then the smallest ``localization`` (a strong pull towards ``w*``
biases lambda^ down); then the step size whose acceptance is closest to ``acceptance_target`` (0.9), ties going to
the larger step (faster mixing); without acceptance information, the largest stable step size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from degenjax._src import llc as llc_lib
from degenjax._src.validation import is_traced
from degenjax._src.types import ArrayTree, getitem_by_field


DEFAULT_STEP_SIZES = (1e-6, 1e-5, 1e-4, 1e-3)


class CalibrationGrid(NamedTuple):
    """Per-cell diagnostics of a calibration sweep; cell axes are ``(S, B, G)`` = (step sizes, nbetas, localizations).

    Attributes:
      step_sizes: ``(S,)``.
      nbetas: ``(B,)``.
      localizations: ``(G,)``.
      llc_mean: ``(S, B, G)`` lambda^ averaged over chains.
      llc_std: ``(S, B, G)`` standard deviation over chains (NaN for one chain).
      llc_per_chain: ``(S, B, G, C)``.
      mala_acceptance: ``(S, B, G)`` mean MALA acceptance (NaN when not computed).
      drift: ``(S, B, G)`` ``nbeta * (mean(last quarter) - mean(third quarter))`` of the loss trace, chain mean.
      drift_se: ``(S, B, G)`` standard error of ``drift`` over chains (0 for one chain).
      finite: ``(S, B, G)`` bool, every recorded loss finite.
      loss_trace: ``(S, B, G, C, D)`` minibatch losses after burn-in.
      init_loss: scalar ``L_n(w*)``.
    """

    step_sizes: jax.Array
    nbetas: jax.Array
    localizations: jax.Array
    llc_mean: jax.Array
    llc_std: jax.Array
    llc_per_chain: jax.Array
    mala_acceptance: jax.Array
    drift: jax.Array
    drift_se: jax.Array
    finite: jax.Array
    loss_trace: jax.Array
    init_loss: jax.Array


class CalibrationRow(NamedTuple):
    """One rung of the step-size recipe in a `calibrate` table (docs/maths.md#llc).

    Attributes:
      step_size: the rung's SGLD step.
      num_steps, num_burnin: steps per chain and the discarded first part.
      llc_mean, llc_se: lambda^ at this step and its standard error (NaN for a diverged rung).
      rhat, ess: convergence of the rung's loss trace.
      converged, diverged: booleans.
      seconds: wall time of the rung (NaN when not recorded).
      nbeta, localization: the pair this rung belongs to.
      chosen: whether this is the recommended setting's rung.
    """

    step_size: float
    num_steps: int
    num_burnin: int
    llc_mean: float
    llc_se: float
    rhat: float
    ess: float
    converged: bool
    diverged: bool
    seconds: float
    nbeta: float
    localization: float
    chosen: bool

    __getitem__ = getitem_by_field


class CalibrationCell(NamedTuple):
    """One cell of a grid calibration (`recommend`): a step size x nbeta x localization and the stability rule.

    Attributes:
      step_size, nbeta, localization: the cell's setting.
      llc_mean, llc_std: lambda^ and its standard deviation over chains.
      mala_acceptance: mean MALA acceptance (NaN when not computed).
      drift, drift_se: end-of-trace drift in lambda units and its standard error.
      finite, positive, flat, acceptance_ok: the four conditions of the module docstring.
      stable: all four hold.
      reason: what failed, ``"; "``-separated (empty when stable).
    """

    step_size: float
    nbeta: float
    localization: float
    llc_mean: float
    llc_std: float
    mala_acceptance: float
    drift: float
    drift_se: float
    finite: bool
    positive: bool
    flat: bool
    acceptance_ok: bool
    stable: bool
    reason: str

    __getitem__ = getitem_by_field


class Calibration(NamedTuple):
    """Result of `calibrate`.

    Attributes:
      table: from `calibrate`: one `CalibrationRow` per rung of the recipe; from `recommend`'s grid: one
        `CalibrationCell` per cell (``row._asdict()`` for a dict).
      recommended: the recommended setting (`calibrate`: ``step_size, nbeta, localization, llc_mean,
        llc_uncertainty, llc_std, trustworthy, message``), or ``None`` when nothing is trustworthy / stable.
      message: a one-line summary (the recommendation or what was tried and what to change).
      grid: the `CalibrationGrid` arrays of a grid calibration (None from `calibrate`).
      recipes: from `calibrate`, one `LLCRecipe` per (nbeta, localization) pair.
    """

    table: list
    recommended: dict | None
    message: str
    grid: CalibrationGrid | None
    recipes: tuple | None = None


def _as_grid_axis(values, name: str, *, allow_none: bool = False):
    if values is None and allow_none:
        return None
    if isinstance(values, (jax.Array, np.ndarray)) and not isinstance(values, jax.core.Tracer):
        values = np.asarray(values).reshape(-1).tolist()
    elif isinstance(values, jax.core.Tracer):
        if values.ndim != 1 or values.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty 1-D sequence of positive values; got shape {values.shape}.")
        return values
    elif isinstance(values, (int, float, np.floating, np.integer)):
        values = [values]
    values = list(values)
    if not values:
        raise ValueError(f"{name} must be a non-empty sequence of positive values.")
    for v in values:
        if isinstance(v, jax.core.Tracer):
            raise ValueError(f"{name} must be a 1-D array or a sequence of Python numbers, not of traced scalars.")
        if not np.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must contain only positive finite values; got {v!r} in {values}.")
    return jnp.asarray(values, dtype=jnp.result_type(float))


def _cell_stats(result: llc_lib.LLCResult):
    """Per-cell scalars from one `LLCResult` (traced-safe)."""
    trace = result.loss_trace  # (C, D)
    num_chains, num_draws = trace.shape
    q = num_draws // 4
    third = jnp.mean(trace[:, num_draws - 2 * q:num_draws - q], axis=1)
    last = jnp.mean(trace[:, num_draws - q:], axis=1)
    drift_c = result.nbeta * (last - third)
    drift = jnp.mean(drift_c)
    if num_chains > 1:
        drift_se = jnp.std(drift_c, ddof=1) / math.sqrt(num_chains)
    else:
        drift_se = jnp.zeros((), drift.dtype)
    finite = jnp.all(jnp.isfinite(trace))
    return (result.llc_mean, result.llc_std, result.llc_per_chain, result.mala_acceptance, drift, drift_se, finite,
            trace)


def calibration_sweep(rng_key, loss_fn: Callable, params: ArrayTree, data: ArrayTree, *, batch_size: int,
                      step_sizes=DEFAULT_STEP_SIZES, nbetas=None, localizations=(1.0,), num_chains: int = 4,
                      num_draws: int = 200, num_burnin: int = 0, sampler="sgld", cells_per_batch: int | None = None,
                      **estimate_kwargs) -> CalibrationGrid:
    """Runs `estimate_llc` on every (step size, nbeta, localization) cell; pure and jittable.

    Every cell uses the same ``rng_key`` (common random numbers: the cells differ only by their hyperparameters,
    so their differences are not sampling noise). The cells run one after another inside ``lax.map`` (one compiled
    program); ``cells_per_batch`` vectorises that many cells at once (more memory, better accelerator use).

    Args:
      rng_key: PRNG key.
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss.
      params: ``w*``.
      data: pytree of arrays with leading axis ``n``.
      batch_size: SGLD minibatch size.
      step_sizes: ``(S,)`` positive step sizes.
      nbetas: ``(B,)`` positive values of ``n beta``; default ``(n / log n,)``.
      localizations: ``(G,)`` positive values of ``gamma``.
      num_chains: chains per cell.
      num_draws: recorded draws per chain, >= 4 (the flatness check compares the last two quarters).
      num_burnin: steps discarded before recording.
      sampler: as for `estimate_llc`.
      cells_per_batch: cells vectorised together (``lax.map``'s ``batch_size``); default one at a time.
      **estimate_kwargs: passed to `estimate_llc` (e.g. ``mala_every``, ``sampler_kwargs``, ``eval_batch_size``).

    Returns:
      `CalibrationGrid` with cell axes ``(S, B, G)``.

    Raises:
      ValueError: for empty or non-positive grids, ``num_draws < 4``, or any input `estimate_llc` rejects.
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, (int, np.integer)) or num_draws < 4:
        raise ValueError(f"num_draws must be >= 4 for calibration (the flatness check compares the last two "
                         f"quarters of the trace); got {num_draws}.")
    for bad in ("step_size", "nbeta", "localization"):
        if bad in estimate_kwargs:
            raise ValueError(f"pass {bad}s=[...] (the grid) to calibration_sweep, not {bad}=.")
    n = llc_lib.check_inputs(params, data, step_size=1.0, batch_size=batch_size)
    eps = _as_grid_axis(step_sizes, "step_sizes")
    nbs = _as_grid_axis(nbetas, "nbetas", allow_none=True)
    if nbs is None:
        nbs = jnp.asarray([llc_lib.default_nbeta(n)], dtype=jnp.result_type(float))
    gammas = _as_grid_axis(localizations, "localizations")
    S, B, G = eps.shape[0], nbs.shape[0], gammas.shape[0]
    cells = (jnp.broadcast_to(eps[:, None, None], (S, B, G)).reshape(-1),
             jnp.broadcast_to(nbs[None, :, None], (S, B, G)).reshape(-1),
             jnp.broadcast_to(gammas[None, None, :], (S, B, G)).reshape(-1))

    def one_cell(cell):
        e, nb, g = cell
        result = llc_lib.estimate_llc(rng_key, loss_fn, params, data, num_chains=num_chains, num_draws=num_draws,
                                      step_size=e, batch_size=batch_size, nbeta=nb, localization=g,
                                      num_burnin=num_burnin, sampler=sampler, warn=False, **estimate_kwargs)
        return _cell_stats(result) + (result.init_loss,)

    outs = lax.map(one_cell, cells, batch_size=cells_per_batch)
    shape = (S, B, G)
    llc_mean, llc_std, per_chain, acc, drift, drift_se, finite, trace, init = outs
    return CalibrationGrid(
        step_sizes=eps, nbetas=nbs, localizations=gammas, llc_mean=llc_mean.reshape(shape),
        llc_std=llc_std.reshape(shape), llc_per_chain=per_chain.reshape(shape + per_chain.shape[1:]),
        mala_acceptance=acc.reshape(shape), drift=drift.reshape(shape), drift_se=drift_se.reshape(shape),
        finite=finite.reshape(shape), loss_trace=trace.reshape(shape + trace.shape[1:]), init_loss=init[0])


def recommend(grid: CalibrationGrid, *, default_nbeta: float | None = None, flat_tol: float = 0.1,
              acceptance_range: tuple[float, float] = (0.8, 0.99),
              acceptance_target: float = 0.9) -> tuple[list, dict | None, str]:
    """Applies the stability rule (module docstring) to a `CalibrationGrid`; host-side (concrete arrays).

    Args:
      grid: output of `calibration_sweep` (concrete, not traced).
      default_nbeta: the nbeta to prefer (``n / log n``); default the geometric middle of the grid's nbetas.
      flat_tol: allowed end-of-trace drift as a fraction of lambda^.
      acceptance_range: ``(low, high)`` accepted MALA acceptance.
      acceptance_target: preferred acceptance.

    Returns:
      ``(table, recommended_row_or_None, message)`` as in `Calibration`.

    Raises:
      ValueError: for a traced grid or inconsistent tolerances.
    """
    if is_traced(grid):
        raise ValueError("recommend needs concrete arrays: call it outside jax.jit on the grid returned by "
                         "calibration_sweep.")
    low, high = acceptance_range
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"acceptance_range must satisfy 0 <= low < high <= 1; got {acceptance_range}.")
    if flat_tol < 0:
        raise ValueError(f"flat_tol must be >= 0; got {flat_tol}.")
    g = jax.tree.map(lambda x: np.asarray(x, np.float64) if np.asarray(x).dtype != bool else np.asarray(x), grid)
    eps, nbs, gammas = g.step_sizes, g.nbetas, g.localizations
    table = []
    for b, nb in enumerate(nbs):
        for k, gamma in enumerate(gammas):
            for s, e in enumerate(eps):
                llc = float(g.llc_mean[s, b, k])
                acc = float(g.mala_acceptance[s, b, k])
                drift, se = float(g.drift[s, b, k]), float(g.drift_se[s, b, k])
                finite = bool(g.finite[s, b, k]) and bool(np.all(np.isfinite(g.llc_per_chain[s, b, k])))
                positive = finite and bool(np.all(g.llc_per_chain[s, b, k] > 0))
                flat = finite and abs(drift) <= flat_tol * abs(llc) + 2.0 * (se if np.isfinite(se) else 0.0)
                acc_ok = (not np.isfinite(acc)) or (low <= acc <= high)
                reasons = []
                if not finite:
                    reasons.append("diverged (non-finite loss)")
                else:
                    if not positive:
                        reasons.append("non-positive lambda^ in some chain")
                    if not flat:
                        reasons.append(f"trace still drifting ({drift:+.3g} vs lambda^ {llc:.3g})")
                    if not acc_ok:
                        reasons.append(f"MALA acceptance {acc:.2f} outside [{low}, {high}]")
                table.append(CalibrationCell(step_size=float(e), nbeta=float(nb), localization=float(gamma),
                                             llc_mean=llc, llc_std=float(g.llc_std[s, b, k]), mala_acceptance=acc,
                                             drift=drift, drift_se=se, finite=finite, positive=positive, flat=flat,
                                             acceptance_ok=acc_ok, stable=not reasons, reason="; ".join(reasons)))
    stable = [r for r in table if r.stable]
    if not stable:
        diverged = sum(not r.finite for r in table)
        low_acc = sum(r.finite and np.isfinite(r.mala_acceptance) and r.mala_acceptance < low
                      for r in table)
        drifting = sum(r.finite and not r.flat for r in table)
        advice = []
        if diverged or low_acc:
            advice.append("smaller step sizes")
        if drifting:
            advice.append("longer chains or burn-in (num_burnin)")
        if any(r.finite and not r.positive for r in table):
            advice.append("a larger localization, or check that params is a trained minimum")
        if not advice:
            advice.append("a wider grid")
        message = (f"No stable setting among {len(table)} cells ({diverged} diverged, {drifting} drifting, "
                   f"{low_acc} with low acceptance); try {', '.join(advice)}.")
        return table, None, message
    target_nb = default_nbeta if default_nbeta is not None else float(np.exp(np.mean(np.log(nbs))))
    best_nb = min({r.nbeta for r in stable}, key=lambda v: (abs(math.log(v / target_nb)), -v))
    cands = [r for r in stable if r.nbeta == best_nb]
    best_gamma = min(r.localization for r in cands)
    cands = [r for r in cands if r.localization == best_gamma]
    if all(np.isfinite(r.mala_acceptance) for r in cands):
        best = min(cands, key=lambda r: (abs(r.mala_acceptance - acceptance_target), -r.step_size))
    else:
        best = max(cands, key=lambda r: r.step_size)
    message = (f"Recommended step_size={best['step_size']:.3g}, nbeta={best['nbeta']:.4g}, "
               f"localization={best['localization']:.3g} (lambda^ = {best['llc_mean']:.4g} +- {best['llc_std']:.2g}, "
               f"MALA acceptance {best['mala_acceptance']:.2f}; {len(stable)}/{len(table)} cells stable).")
    return table, best, message


def calibrate(rng_key, loss_fn: Callable, params: ArrayTree, data: ArrayTree, *, batch_size: int, nbetas=None,
              localizations=(1.0,), num_chains: int = 4, sampler="sgld", **recipe_kwargs) -> Calibration:
    """Chooses the SGLD step size by the recipe of ``estimate_llc(..., step_size="auto")`` and recommends it.

    For every (nbeta, localization) pair the recipe measures lambda^ on a ladder of step sizes at a fixed diffusion
    time and extrapolates to step 0 (`degenjax._src.recipe`); the table has one row per rung run. The recommended
    row is the trustworthy result whose nbeta is closest (in log scale) to ``n / log n`` (nbeta defines the
    estimator), then the smallest localization (a strong pull biases lambda^ down); its ``llc_mean`` is the
    extrapolated estimate and ``step_size`` the finest rung (the chosen setting).

    Args:
      rng_key, loss_fn, params, data, batch_size, num_chains, sampler: as for `estimate_llc`.
      nbetas: values of ``n beta`` (default ``(n / log n,)``).
      localizations: values of ``gamma``.
      **recipe_kwargs: options of `degenjax._src.recipe.llc_recipe` (``max_steps``, ``initial_steps``, ``ratio``,
        ``scale``, ``target_rel``, ...) and of `estimate_llc` (``sampler_kwargs``, ``mask``, ``eval_batch_size``);
        ``escalate`` is ``"none"`` unless given (each row reports the setting of its grid).

    Returns:
      `Calibration` with ``recipes`` (one `LLCRecipe` per pair) and ``grid`` None. Plot it with
      `degenjax.plot_calibration`.

    Raises:
      ValueError: for bad inputs, including the grid arguments of the old sweep (``step_sizes``, ``num_draws``,
        ``num_burnin``: use `calibration_sweep` for a fixed grid).
    """
    for bad in ("step_sizes", "num_draws", "num_burnin", "step_size"):
        if bad in recipe_kwargs:
            raise ValueError(f"calibrate measures its own ladder of step sizes (the recipe of step_size='auto') and "
                             f"takes no {bad}=; for a fixed grid of short runs use calibration_sweep + recommend.")
    if is_traced((rng_key, params, data)):
        raise ValueError("calibrate chooses settings on the host and cannot run under jax.jit; jit "
                         "calibration_sweep instead and pass its result to recommend.")
    from degenjax._src.recipe import llc_recipe

    n = llc_lib.check_inputs(params, data, step_size="auto", batch_size=batch_size)
    nbs = [llc_lib.default_nbeta(n)] if nbetas is None else [float(v) for v in np.atleast_1d(nbetas)]
    gammas = [float(v) for v in np.atleast_1d(localizations)]
    table, best, recipes = [], [], []
    for nb in nbs:
        for gamma in gammas:
            res = llc_recipe(rng_key, loss_fn, params, data, batch_size=batch_size, num_chains=num_chains, nbeta=nb,
                             localization=gamma, sampler=sampler, warn=False, on_divergence="flag",
                             **{"escalate": "none", **recipe_kwargs})  # calibrate reports each setting of its grid
            rec = res.recipe
            recipes.append(rec)
            for row in rec.rungs:
                table.append(CalibrationRow(**{f: row.get(f, float("nan")) for f in CalibrationRow._fields[:10]},
                                            nbeta=nb, localization=gamma,
                                            chosen=bool(rec.trustworthy and row["step_size"] == rec.step_size)))
            best.append(dict(step_size=rec.step_size, nbeta=nb, localization=gamma, llc_mean=rec.llc,
                             llc_uncertainty=rec.uncertainty, llc_std=float(res.llc_std), trustworthy=rec.trustworthy,
                             message=rec.message))
    good = [b for b in best if b["trustworthy"]]
    if not good:
        message = "No trustworthy setting. " + " | ".join(b["message"] for b in best)
        return Calibration(table=table, recommended=None, message=message, grid=None, recipes=tuple(recipes))
    target = llc_lib.default_nbeta(n)
    pick = min(good, key=lambda b: (abs(math.log(b["nbeta"] / target)), b["localization"]))
    message = (f"Recommended step_size={pick['step_size']:.3g} (nbeta={pick['nbeta']:.4g}, localization="
               f"{pick['localization']:.3g}): {pick['message']}")
    return Calibration(table=table, recommended=pick, message=message, grid=None, recipes=tuple(recipes))

"""Convergence diagnostics of sampler traces: ESS, split R-hat and Monte Carlo standard error, in one place.

Every part of degenjax that reports a diagnostic (`estimate_llc`, the CLI, sweeps, the quickstart) calls
`convergence`, so the same trace always gives the same numbers. ESS and split R-hat are numpyro's
(``numpyro.diagnostics.effective_sample_size`` and ``split_gelman_rubin``; Gelman et al., *Bayesian Data
Analysis*, 3rd ed., section 11.4-11.5); the MCSE of a trace's mean is ``sd / sqrt(ESS)`` with ``sd`` the standard
deviation of all draws pooled.

A trace counts as *converged* when ``R-hat <= rhat_max`` (1.05 by default, a common threshold; Vehtari et al. 2021
recommend 1.01 for final results) and ``ESS >= min_ess`` (100 by default: below that the MCSE itself is uncertain
by more than about 10%).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

RHAT_MAX = 1.05
MIN_ESS = 100.0


class Convergence(NamedTuple):
    """Host-side convergence diagnostics of a ``(chains, draws)`` trace.

    Attributes:
      ess: effective sample size of the whole trace (all chains), NaN when undefined.
      rhat: split R-hat, NaN when undefined.
      mcse: Monte Carlo standard error of the trace's mean (same units as the trace), NaN when undefined.
      converged: ``rhat <= rhat_max and ess >= min_ess`` (False when either is undefined).
      message: ``""`` when converged, else why not, in words, with what to change.
    """

    ess: float
    rhat: float
    mcse: float
    converged: bool
    message: str


def convergence(trace, *, rhat_max: float = RHAT_MAX, min_ess: float = MIN_ESS) -> Convergence:
    """ESS, split R-hat, MCSE and a converged flag of a ``(chains, draws)`` trace (NumPy, host-side).

    Args:
      trace: ``(chains, draws)`` array (e.g. `LLCResult.loss_trace`); a 1-D array is one chain.
      rhat_max: largest acceptable split R-hat.
      min_ess: smallest acceptable effective sample size (over all chains together).

    Returns:
      `Convergence`. ESS and R-hat are undefined (NaN, not converged) for a trace with a non-finite value, fewer
      than 4 draws per chain (split R-hat halves each chain), or no variation at all.

    Raises:
      ValueError: for a trace that is not 1-D or 2-D, or non-positive thresholds.
    """
    x = np.asarray(trace, np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"trace must be a non-empty (chains, draws) array; got shape {np.shape(trace)}.")
    if not rhat_max > 1.0 or not min_ess > 0:
        raise ValueError(f"rhat_max must be > 1 and min_ess > 0; got rhat_max={rhat_max}, min_ess={min_ess}.")
    nan = float("nan")
    chains, draws = x.shape
    if not np.all(np.isfinite(x)):
        return Convergence(nan, nan, nan, False, "the trace has non-finite values (a diverged chain)")
    if draws < 4:
        return Convergence(nan, nan, nan, False, f"{draws} draws per chain are too few for split R-hat (need >= 4)")
    sd = float(np.std(x))
    if not sd > 0:
        return Convergence(nan, nan, nan, False, "the trace does not vary at all (is the loss constant?)")
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ess = float(effective_sample_size(x))
        rhat = float(split_gelman_rubin(x))
    mcse = sd / np.sqrt(ess) if ess > 0 else nan
    problems = []
    if not np.isfinite(rhat) or rhat > rhat_max:
        problems.append(f"R-hat {rhat:.3f} > {rhat_max}")
    if not np.isfinite(ess) or ess < min_ess:
        problems.append(f"ESS {ess:.1f} < {min_ess:g} of {chains * draws} draws")
    message = ""
    if problems:
        message = (f"not converged: {', '.join(problems)}; run longer chains (num_draws), add burn-in (num_burnin), "
                   "or use more chains")
    return Convergence(ess=ess, rhat=rhat, mcse=float(mcse), converged=not problems, message=message)


# ----------------------------------------------------------------------------------------------------------------
# Divergence and warnings of an LLC run


class LLCDivergenceError(FloatingPointError):
    """Raised when a chain's loss becomes non-finite (the sampler diverged)."""


def first_divergence(losses: np.ndarray, t0: int, total: int):
    """``(step, chain, value)`` of the first non-finite loss in a chunk ``losses`` (steps x chains) that starts at
    step ``t0`` of ``total`` steps, or None."""
    valid = losses[: max(0, min(losses.shape[0], total - t0))]
    bad = ~np.isfinite(valid)
    if not bad.any():
        return None
    step, chain = np.argwhere(bad)[0]
    return t0 + int(step), int(chain), valid[step, chain]


def divergence_error(step: int, chain: int, value, step_size) -> LLCDivergenceError:
    """The error for a diverged chain, with what to change."""
    eps = float(np.asarray(step_size))
    return LLCDivergenceError(
        f"SGLD diverged: chain {chain} has a non-finite loss ({value}) at step {step} with step_size={eps:g}. Use a "
        f"smaller step size (e.g. {eps / 10:g}) or step_size='auto', a larger localization, or check that params is "
        "a trained minimum; on_divergence='drop' keeps the other chains.")


def warn_result(llc_mean: float, mala_acceptance: float, step_size, *, stacklevel: int = 3) -> None:
    """Warnings for a negative lambda^ and a MALA acceptance far from ~0.9."""
    if llc_mean < 0:
        warnings.warn(f"Negative LLC estimate ({llc_mean:.4g}): the chains found lower loss than at w*, so w* is "
                      "probably not a (local) minimum. Train longer, or increase the localization.", RuntimeWarning,
                      stacklevel=stacklevel)
    eps = float(np.asarray(step_size))
    if np.isfinite(mala_acceptance) and mala_acceptance < 0.6:
        warnings.warn(f"MALA acceptance {mala_acceptance:.3f} is far below ~0.9: step_size={eps:g} is probably too "
                      "large and biases lambda^; try a smaller one, or step_size='auto'.", RuntimeWarning,
                      stacklevel=stacklevel)
    elif np.isfinite(mala_acceptance) and mala_acceptance > 0.99:
        warnings.warn(f"MALA acceptance {mala_acceptance:.3f} is far above ~0.9: step_size={eps:g} may be smaller "
                      "than needed (slow mixing); a larger one may converge faster.", RuntimeWarning,
                      stacklevel=stacklevel)

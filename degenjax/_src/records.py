"""The tidy schema of LLC results: one set of names for Python, JSON and CSV, traces as npz, ArviZ and pandas.

`llc_record` turns an `LLCResult` plus the run's settings into one flat dict whose keys are the schema below; the
CLI's JSON, sweep rows and reports use it, so a column means the same everywhere:

* estimate: ``llc_mean, llc_std, llc_uncertainty, llc_mcse, llc_per_chain, n_eff`` (``= 2 llc_mean``);
* sampler summary: ``init_loss, nbeta, step_size, mala_acceptance, ess, rhat, converged, num_diverged``;
* recipe (``step_size="auto"``): ``recipe_trustworthy, recipe_bias, recipe_se, recipe_total_steps,
  recipe_message``;
* the run: ``num_data`` (n), ``num_chains, num_draws`` (from the trace) and every setting passed in (e.g.
  ``batch_size, localization, num_burnin, sampler, seed, num_params``), and ``degenjax_version``.

ArviZ and pandas are optional: `to_inference_data` and ``trace_table(as_dataframe=True)`` import them when called.
"""

from __future__ import annotations

import pathlib

import numpy as np

from degenjax._src.resultsio import json_ready

ESTIMATE_FIELDS = ("llc_mean", "llc_std", "llc_uncertainty", "llc_mcse", "llc_per_chain", "n_eff")
SAMPLER_FIELDS = ("init_loss", "nbeta", "step_size", "mala_acceptance", "ess", "rhat", "converged", "num_diverged")
RECIPE_FIELDS = ("recipe_trustworthy", "recipe_bias", "recipe_se", "recipe_total_steps", "recipe_message")
RUN_FIELDS = ("num_data", "num_chains", "num_draws", "degenjax_version")
RECORD_FIELDS = ESTIMATE_FIELDS + SAMPLER_FIELDS + RECIPE_FIELDS + RUN_FIELDS


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("degenjax")
    except Exception:  # noqa: BLE001 (not installed: the source tree's version)
        import degenjax

        return getattr(degenjax, "__version__", "unknown")


def _num(x):
    """A JSON-ready Python number (None for NaN/inf) or list (`resultsio.json_ready`)."""
    return json_ready(np.asarray(x))


def llc_record(result, **settings) -> dict:
    """One flat, JSON-ready dict of an `LLCResult` in the schema of the module docstring.

    Args:
      result: an `LLCResult` (concrete, not traced).
      **settings: the run's settings to record (``batch_size``, ``localization``, ``num_burnin``, ``sampler``,
        ``seed``, ``num_params``, ...); a setting named like a result field is an error.

    Returns:
      dict; NaN and inf become None (valid JSON).
    """
    clash = set(settings) & set(RECORD_FIELDS)
    if clash:
        raise ValueError(f"settings {sorted(clash)} clash with result fields of the record; rename them.")
    trace = np.asarray(result.loss_trace)
    diverged = result.diverged
    rec = {
        "llc_mean": _num(result.llc_mean), "llc_std": _num(result.llc_std),
        "llc_uncertainty": _num(result.llc_uncertainty), "llc_mcse": _num(result.llc_mcse),
        "llc_per_chain": _num(result.llc_per_chain), "n_eff": _num(2.0 * np.asarray(result.llc_mean, np.float64)),
        "init_loss": _num(result.init_loss), "nbeta": _num(result.nbeta), "step_size": _num(result.step_size),
        "mala_acceptance": _num(result.mala_acceptance), "ess": _num(result.ess), "rhat": _num(result.rhat),
        "converged": bool(np.asarray(result.converged)),
        "num_diverged": int(np.sum(np.asarray(diverged))) if diverged is not None else 0,
    }
    r = result.recipe
    rec.update({"recipe_trustworthy": None if r is None else bool(r.trustworthy),
                "recipe_bias": None if r is None else _num(r.bias), "recipe_se": None if r is None else _num(r.se),
                "recipe_total_steps": None if r is None else int(r.total_steps),
                "recipe_message": None if r is None else r.message})
    rec.update({"num_data": None if result.num_data is None else int(np.asarray(result.num_data)),
                "num_chains": int(trace.shape[0]), "num_draws": int(trace.shape[1]),
                "degenjax_version": _version()})
    for k, v in settings.items():
        rec[k] = _num(v) if isinstance(v, (np.ndarray, np.generic)) or hasattr(v, "dtype") else v
    return rec


def trace_table(result, *, as_dataframe: bool = False):
    """The traces in long form: one row per (chain, draw) with ``loss`` and ``llc_draw = nbeta (loss - L_n(w*))``.

    Args:
      result: an `LLCResult`.
      as_dataframe: return a pandas ``DataFrame`` (needs pandas) instead of a dict of NumPy columns.

    Returns:
      ``{"chain", "draw", "loss", "llc_draw"}`` columns of length ``chains x draws`` (chain-major).
    """
    trace = np.asarray(result.loss_trace, np.float64)
    chains, draws = trace.shape
    cols = {"chain": np.repeat(np.arange(chains), draws), "draw": np.tile(np.arange(draws), chains),
            "loss": trace.ravel(),
            "llc_draw": float(np.asarray(result.nbeta)) * (trace.ravel() - float(np.asarray(result.init_loss)))}
    if not as_dataframe:
        return cols
    try:
        import pandas as pd
    except ImportError as err:
        raise ImportError("trace_table(as_dataframe=True) needs pandas: pip install pandas (or degenjax[dev]).") \
            from err
    return pd.DataFrame(cols)


def to_inference_data(result):
    """An ArviZ ``InferenceData`` with ``posterior`` variables ``loss`` and ``llc_draw`` (dims ``chain, draw``), each
    ``metrics_fn`` trace as ``sample_stats`` variable ``metric_<name>`` (dims ``chain, draw``, its own draws: every
    ``metrics_every``-th), and the summary in the ``posterior`` attributes (`llc_record`).

    Raises:
      ImportError: when arviz is not installed.
    """
    try:
        import arviz as az
    except ImportError as err:
        raise ImportError("LLCResult.to_inference_data needs arviz: pip install arviz (or degenjax[dev]).") from err
    trace = np.asarray(result.loss_trace, np.float64)
    nbeta, init = float(np.asarray(result.nbeta)), float(np.asarray(result.init_loss))
    posterior = {"loss": trace, "llc_draw": nbeta * (trace - init)}
    # metrics have their own draw axis (every metrics_every-th draw): their own group
    stats = {f"metric_{k}": np.asarray(v, np.float64) for k, v in (result.metrics or {}).items()}
    attrs = {k: v for k, v in llc_record(result).items() if v is not None and not isinstance(v, list)}
    attrs = {k: (int(v) if isinstance(v, bool) else v) for k, v in attrs.items()}
    idata = az.from_dict(posterior=posterior, sample_stats=stats or None, attrs=attrs)
    idata.posterior.attrs.update(attrs)
    return idata


def save_traces(path, result, **settings) -> pathlib.Path:
    """Writes the traces and the record to ``path`` (``.npz``): ``loss_trace (chains, draws)``, ``llc_per_chain``,
    ``diverged``, ``metric_<name>`` and ``record`` (the `llc_record` as a JSON string). Atomic (a temporary file,
    then a rename)."""
    import json
    import os

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"loss_trace": np.asarray(result.loss_trace), "llc_per_chain": np.asarray(result.llc_per_chain),
              "init_loss": np.asarray(result.init_loss), "nbeta": np.asarray(result.nbeta),
              "record": np.asarray(json.dumps(llc_record(result, **settings)))}
    if result.diverged is not None:
        arrays["diverged"] = np.asarray(result.diverged)
    for k, v in (result.metrics or {}).items():
        arrays[f"metric_{k}"] = np.asarray(v)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path

"""Local learning coefficient: the SGLD estimator, its result, N_eff and behavioral losses (arXiv 2405.10927
section 2).

The estimator samples the localized tempered posterior ``p(w) ~ exp(-nbeta L_n(w) - gamma/2 ||w - w*||^2)`` with
stochastic-gradient MCMC (`degenjax.sgld` by default) and reports, per chain,

    lambda^ = nbeta * (mean_t L_{B_t}(w_t) - L_n(w*)),

where ``L_{B_t}(w_t)`` is the mean loss of the step's minibatch at the position *before* step ``t`` (the value the
step's gradient comes from, as in devinterp; it costs nothing extra) and ``L_n(w*)`` is the loss on the full data.

`estimate_llc` is a composition of four modules: the input checks (`degenjax._src.checks`), the minibatch scheme and
key streams (`degenjax._src.minibatch`, shared with `SGLDKernel` so both give identical numbers), the compiled
runners below, and the diagnostics (`degenjax._src.diagnostics`: ESS, R-hat, MCSE, divergence, warnings). With
``step_size="auto"`` it runs the step-size recipe of `degenjax._src.recipe` instead.

Defaults, and why:

* ``nbeta = n / log n`` (beta = 1 / log n): the temperature of Watanabe's WBIC at which lambda^ is consistent.
* ``localization = 1.0``: weak enough not to bias lambda^ (a strong pull shrinks the posterior in the degenerate
  directions that lower lambda: measured -17% at gamma = 100 on a 4-4-4 deep linear network with n = 10^4) and strong
  enough to keep chains near ``w*`` over the run; parameters of order one are assumed.
* ``num_burnin = 0``: every step is recorded (as devinterp does). The chains start at ``w*``, below the
  equilibrium loss, so a short run is biased low: set ``num_burnin`` or use ``step_size="auto"``, which discards the
  first half of every run.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from degenjax._src import sgld as sgld_lib
from degenjax._src.checks import (check_eval_batch_size, check_init_loss, check_inputs, check_positive_int, check_rng_key, default_nbeta, leaf_name,
                                  num_data)
from degenjax._src.diagnostics import (LLCDivergenceError, convergence, divergence_error, first_divergence,
                                       warn_result)
from degenjax._src.minibatch import (batch_indices, chain_keys, chain_streams, epoch_positions, full_loss,
                                     gather_batch, iid_batch_indices, init_key, round_keys)
from degenjax._src.validation import is_traced
from degenjax._src.types import ArrayTree


# names kept importable from here for existing callers
__all__ = ["LLCResult", "LLCDivergenceError", "MetricsState", "estimate_llc", "parameter_mask", "restrict_data",
           "effective_parameter_count", "behavioral_loss", "num_data", "check_inputs", "default_nbeta",
           "chain_keys", "chain_streams", "epoch_positions", "batch_indices", "gather_batch", "full_loss",
           "round_keys", "init_key"]


class LLCResult(NamedTuple):
    """Result of `estimate_llc`. The names are the tidy schema of `llc_record` (JSON, CSV) too.

    Attributes:
      llc_mean: scalar lambda^: the mean of ``llc_per_chain`` (over the chains kept), or with ``step_size="auto"``
        the recipe's extrapolated estimate.
      llc_std: scalar, standard deviation over chains (``ddof=1``; NaN for a single chain).
      llc_per_chain: ``(num_chains,)`` lambda^ of each chain (NaN for a dropped, diverged chain).
      loss_trace: ``(num_chains, num_draws)`` minibatch losses ``L_{B_t}(w_t)`` after burn-in.
      init_loss: scalar ``L_n(w*)`` on the full data set.
      mala_acceptance: scalar mean MALA acceptance probability over chains and the sampled draw steps (NaN when none
        was computed, e.g. ``mala_every=0`` or SGNHT). It is computed from the step's minibatch potential, so it
        measures the discretisation error of a step, not the bias from minibatch noise.
      mala_per_chain: ``(num_chains,)`` mean MALA acceptance per chain.
      ess: scalar effective sample size of ``loss_trace`` (``numpyro.diagnostics.effective_sample_size``; NaN under
        ``jax.jit``).
      rhat: scalar split R-hat of ``loss_trace`` (NaN under ``jax.jit``).
      nbeta: scalar ``n * beta`` used.
      llc_mcse: scalar Monte Carlo standard error of ``llc_mean`` (``nbeta * sd(loss_trace) / sqrt(ess)``; NaN
        under ``jax.jit``). `degenjax.convergence` computes all three from a trace after a jitted run.
      step_size: scalar step size of the recorded run (with ``"auto"``: the smallest rung of the recipe).
      diverged: ``(num_chains,)`` bool, chains with a non-finite loss.
      metrics: dict ``name -> (num_chains, k)`` of ``metrics_fn`` traces (every ``metrics_every`` draws), or None.
      num_data: int scalar ``n`` (the data, or the chosen ``data_subset``).
      llc_uncertainty: scalar uncertainty of ``llc_mean``: with ``step_size="auto"`` the recipe's, which includes
        the estimated remaining step-size bias; otherwise the standard error over chains (at least ``llc_mcse``),
        which does NOT include the step-size bias of a hand-set step.
      recipe: with ``step_size="auto"``, the `LLCRecipe` report (the ladder, the chosen step, why); else None.
      converged: bool scalar, ``R-hat <= 1.05`` and ``ESS >= 100`` (`degenjax.convergence`; False under ``jit``).
    """

    llc_mean: jax.Array
    llc_std: jax.Array
    llc_per_chain: jax.Array
    loss_trace: jax.Array
    init_loss: jax.Array
    mala_acceptance: jax.Array
    mala_per_chain: jax.Array
    ess: jax.Array
    rhat: jax.Array
    nbeta: jax.Array
    llc_mcse: jax.Array = float("nan")
    step_size: jax.Array = float("nan")
    diverged: jax.Array | None = None
    metrics: dict | None = None
    num_data: jax.Array | None = None
    llc_uncertainty: jax.Array = float("nan")
    recipe: Any = None
    converged: jax.Array | bool = False

    def to_record(self, **settings) -> dict:
        """One tidy row (`llc_record`): the summary numbers, ``settings`` and the package version."""
        from degenjax._src.records import llc_record

        return llc_record(self, **settings)

    def to_inference_data(self):
        """An ArviZ ``InferenceData`` (needs ``arviz``); see `degenjax._src.records.to_inference_data`."""
        from degenjax._src.records import to_inference_data

        return to_inference_data(self)

    def to_dataframe(self):
        """A long pandas ``DataFrame`` of the traces (needs ``pandas``); see `degenjax._src.records.trace_table`."""
        from degenjax._src.records import trace_table

        return trace_table(self, as_dataframe=True)


class MetricsState(NamedTuple):
    """What `estimate_llc`'s ``metrics_fn(params, state)`` sees at a recorded draw (one chain).

    Attributes:
      step: int scalar, the step index ``t`` (burn-in included).
      loss: scalar minibatch loss ``L_{B_t}(w_t)`` at ``params``.
      running_llc: scalar ``nbeta * (mean of the recorded losses so far - L_n(w*))`` (this draw included).
      batch: the step's minibatch.
      center: ``w*``.
      sampler_state: the sampler's state before the step (e.g. `SGLDState`, SGNHT's momentum).
    """

    step: jax.Array
    loss: jax.Array
    running_llc: jax.Array
    batch: Any
    center: Any
    sampler_state: Any


# ----------------------------------------------------------------------------------------------------------------
# Restricted LLC


def parameter_mask(params: ArrayTree, select) -> ArrayTree:
    """A boolean mask tree for a restricted ("weight-refined") LLC: which entries of ``params`` are sampled.

    Args:
      params: the parameters ``w*``.
      select: a tree like ``params`` of Python bools or boolean arrays broadcastable to each leaf, or a callable
        ``select(path, leaf) -> bool | bool array`` with ``path`` the leaf's ``jax.tree_util.keystr`` (e.g.
        ``lambda path, x: "layers_1" in path``), or a string: the leaves whose path contains it.

    Returns:
      A tree like ``params`` of boolean arrays of each leaf's shape.

    Raises:
      ValueError: for a mask that selects nothing, a tree of another structure, or a shape that does not broadcast.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if isinstance(select, str):
        text = select
        select = lambda path, x: text in path  # noqa: E731
    if callable(select):
        masks = [select(leaf_name(path), x) for path, x in leaves]
    else:
        try:
            masks = treedef.flatten_up_to(select)
        except (ValueError, TypeError) as err:
            raise ValueError(f"mask must have the structure of params ({treedef}); {err}") from None
    out = []
    for (path, x), m in zip(leaves, masks):
        m = np.asarray(m)
        if m.dtype != bool:
            raise ValueError(f"mask for params leaf {leaf_name(path)} must be boolean; got dtype {m.dtype}.")
        try:
            out.append(np.broadcast_to(m, np.shape(x)))
        except ValueError:
            raise ValueError(f"mask of shape {m.shape} does not broadcast to params leaf {leaf_name(path)} of shape "
                             f"{np.shape(x)}.") from None
    if not any(m.any() for m in out):
        raise ValueError("the mask selects no parameter; a restricted LLC needs at least one sampled entry.")
    return jax.tree.unflatten(treedef, out)


def restrict_data(data: ArrayTree, subset) -> ArrayTree:
    """The rows ``subset`` of every leaf of ``data`` (a data-restricted LLC: the loss on a chosen subset).

    Args:
      data: pytree of arrays with leading axis ``n``.
      subset: a boolean array ``(n,)`` or an integer index array.

    Raises:
      ValueError: for a mask of the wrong length, indices out of range, or an empty subset.
    """
    n = num_data(data)
    sub = np.asarray(subset)
    if sub.dtype == bool:
        if sub.shape != (n,):
            raise ValueError(f"data_subset as a boolean mask must have shape ({n},); got {sub.shape}.")
        idx = np.flatnonzero(sub)
    elif np.issubdtype(sub.dtype, np.integer) and sub.ndim == 1:
        idx = sub
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise ValueError(f"data_subset indices must lie in [0, {n}); got {idx.min()}..{idx.max()}.")
    else:
        raise ValueError(f"data_subset must be a boolean mask of shape ({n},) or a 1-D integer index array; got "
                         f"dtype {sub.dtype} and shape {sub.shape}.")
    if idx.size == 0:
        raise ValueError("data_subset selects no data point.")
    return jax.tree.map(lambda x: jnp.take(x, jnp.asarray(idx), axis=0), data)


# ----------------------------------------------------------------------------------------------------------------
# Compiled runners


def constrain(tree, sharding):
    if sharding is None:
        return tree
    return jax.tree.map(lambda x: lax.with_sharding_constraint(x, sharding), tree)


def cached_runner(factory, *args):
    """``factory(*args)`` from its cache, or built for this call only when an argument is unhashable (a loss
    function or sampler hyperparameter that cannot be a cache key)."""
    try:
        return factory(*args)
    except TypeError:
        return factory.__wrapped__(*args)


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=32)
def prologue_runner(loss_fn, algo, num_chains: int, eval_batch_size: int | None, masked: bool):
    """A jitted ``(rng_key, params, data, mask) -> (L_n(w*), perm_keys, noise_keys, chain states)``: one compiled
    program (cached like `chunk_runner`) instead of a dozen eager operations, each compiled on its first use."""
    keyed = _accepts(algo.init, "rng_key")
    init_mask = masked and _accepts(algo.init, "mask")

    def prologue(rng_key, params, data, mask):
        init_loss = full_loss(loss_fn, params, data, eval_batch_size)
        keys = chain_keys(rng_key, num_chains)
        perm_keys, noise_keys = jax.vmap(chain_streams)(keys)
        if keyed:
            extra = {"mask": mask} if init_mask else {}
            states = jax.vmap(lambda k: algo.init(params, rng_key=init_key(k), **extra))(keys)
        else:
            state0 = algo.init(params)
            states = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_chains,) + jnp.shape(x)), state0)
        return init_loss, perm_keys, noise_keys, states

    return jax.jit(prologue)


@functools.lru_cache(maxsize=32)
def chunk_runner(loss_fn, algo, sampler_items, n: int, batch_size: int, mala_every: int, chain_sharding,
                  batch_sharding=None, metrics_fn=None, metrics_every: int = 1, control_variate: bool = False,
                  replacement: bool = False):
    """A jitted ``run_chunk(carry, ts, ctx) -> (carry, (losses, accs, metrics))`` advancing all chains over the
    steps ``ts``; ``carry = (states, loss_sum, count)`` (the sums of recorded ``L - L_n(w*)``, for ``running_llc``).
    With ``control_variate`` the recorded loss is ``L_B(w_t) - L_B(w*) + L_n(w*)`` (one more forward pass per step);
    with ``replacement`` minibatches are drawn independently with replacement (`iid_batch_indices`).

    Cached on everything that fixes the program's structure, so repeated calls (sweeps over checkpoints, step
    sizes, nbeta, localization, the recipe's ladder) reuse one compilation: data, params, keys, the mask and the
    hyperparameters are arguments, never compile-time constants. Under the caller's ``jax.jit`` the inner jit is
    inlined. A chunk can continue where the previous one stopped (the recipe extends runs this way).
    """
    sampler_kwargs = dict(sampler_items)

    def run_chunk(carry, ts, ctx):
        data, params, perm_keys, noise_keys, step_size, nbeta, localization, mask, init_loss, num_burnin = ctx
        indices = jax.vmap(iid_batch_indices if replacement else batch_indices, (0, None, None, None))
        extra = dict(sampler_kwargs)
        if mask is not None:
            extra["mask"] = mask

        # Step t's minibatch indices are computed in step t - 1 and carried: a gather reading a loop-carried buffer
        # cannot have the shuffle fused into it (XLA otherwise recomputes the shuffle rounds for every gathered
        # element of every data leaf, most of the step of a small model).
        def body(carry, t):
            (states, loss_sum, count), idx = carry
            batch = constrain(jax.vmap(gather_batch, (None, 0))(data, idx), batch_sharding)
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(noise_keys, t)
            # the MALA flag depends only on t (not batched over chains): the extra gradient runs only on those steps
            mala = (t % mala_every == 0) if mala_every > 0 else False
            kernel = algo.build_kernel(loss_fn, params, step_size=step_size, nbeta=nbeta,
                                       localization=localization, mala=mala, **extra)
            new_states, info = jax.vmap(kernel)(step_keys, states, batch)
            new_states = constrain(new_states, chain_sharding)
            if control_variate:  # L_B(w_t) - L_B(w*) + L_n(w*): the same mean, without the minibatch's own noise
                at_star = jax.vmap(loss_fn, (None, 0))(params, batch).astype(info.loss.dtype)
                info = info._replace(loss=info.loss - at_star + init_loss.astype(info.loss.dtype))
            recorded = t >= num_burnin
            # centred on L_n(w*) (see `mean_excess`): a float32 running sum of O(1) losses loses lambda^'s signal
            excess = info.loss if init_loss is None else info.loss - init_loss.astype(info.loss.dtype)
            loss_sum = loss_sum + jnp.where(recorded, excess, jnp.zeros_like(excess))
            count = count + recorded.astype(count.dtype)
            mets = None
            if metrics_fn is not None:
                running = nbeta * (loss_sum / jnp.maximum(count, 1).astype(loss_sum.dtype))

                def one(pos, st, b, loss, run):
                    out = metrics_fn(pos, MetricsState(step=t, loss=loss, running_llc=run, batch=b, center=params,
                                                       sampler_state=st))
                    return {k: jnp.asarray(v).astype(info.loss.dtype) for k, v in out.items()}

                compute = lambda: jax.vmap(one)(states.position, states, batch, info.loss, running)  # noqa: E731
                shapes = jax.eval_shape(compute)
                do = recorded & ((t - num_burnin) % metrics_every == 0)
                mets = lax.cond(do, compute, lambda: jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype),
                                                                  shapes))
            next_idx = constrain(indices(perm_keys, t + 1, n, batch_size), batch_sharding or chain_sharding)
            return ((new_states, loss_sum, count), next_idx), (info.loss, info.mala_acceptance, mets)

        (carry, _), trace = lax.scan(body, (carry, indices(perm_keys, ts[0], n, batch_size)), ts)
        return carry, trace

    return jax.jit(run_chunk)


def _check_metrics_fn(metrics_fn, params, data, batch_size):
    if metrics_fn is None:
        return
    if not callable(metrics_fn):
        raise ValueError(f"metrics_fn must be callable as metrics_fn(params, state) -> dict of scalars; got "
                         f"{type(metrics_fn).__name__}.")
    probe = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch_size,) + jnp.shape(x)[1:], jnp.result_type(x)), data)
    zero = jax.ShapeDtypeStruct((), jnp.result_type(float))
    state = MetricsState(step=jax.ShapeDtypeStruct((), jnp.int32), loss=zero, running_llc=zero, batch=probe,
                         center=params, sampler_state=sgld_lib.SGLDState(position=params))
    try:
        out = jax.eval_shape(metrics_fn, params, state)
    except AttributeError:
        return  # it reads a field of another sampler's state: checked when it runs
    if not isinstance(out, dict) or not all(isinstance(k, str) for k in out):
        raise ValueError(f"metrics_fn must return a dict of named scalars; got {type(out).__name__}.")
    for k, v in out.items():
        if getattr(v, "shape", ()) != ():
            raise ValueError(f"metrics_fn's {k!r} has shape {v.shape}; every metric must be a scalar.")


# ----------------------------------------------------------------------------------------------------------------
# Estimator

_ON_DIVERGENCE = ("raise", "drop", "flag")


def estimate_llc(rng_key, loss_fn: Callable, params: ArrayTree, data: ArrayTree, *, num_chains: int, num_draws: int,
                 step_size, batch_size: int, nbeta=None, localization=1.0, num_burnin: int = 0,
                 sampler="sgld", sampler_kwargs: dict | None = None, mala_every: int = 10,
                 num_chunks: int | None = None, progress: bool = False, mesh=None, chain_axis: str | None = None,
                 data_axis: str | None = None, eval_batch_size: int | None = None, warn: bool = True,
                 mask=None, data_subset=None, metrics_fn: Callable | None = None, metrics_every: int = 1,
                 on_divergence: str = "raise", control_variate: bool = False, replacement: bool = False,
                 recipe_kwargs: dict | None = None) -> LLCResult:
    """Estimates the local learning coefficient lambda^ at ``params`` (arXiv 2405.10927 section 2).

    All chains advance together (``vmap`` over chains inside one ``lax.scan``); the scan is split into
    ``num_chunks`` pieces so that a progress bar can report and a divergence stops the run early. Only the scalar
    loss of each step is kept, never the parameters. Runs eagerly or under the caller's ``jax.jit`` (then the
    divergence check, warnings, ESS and R-hat are skipped and the scan is one chunk).

    Args:
      rng_key: PRNG key.
      loss_fn: ``loss_fn(params, batch) -> scalar`` MEAN loss over the batch.
      params: the point ``w*`` (a pytree of floating-point arrays), the localization centre and every chain's start.
      data: pytree of arrays with a common leading axis ``n``; minibatches are drawn without replacement within
        an epoch (one pseudo-random order per epoch per chain, see `epoch_positions`).
      num_chains: number of chains.
      num_draws: recorded steps per chain (after burn-in).
      step_size: SGLD ``eps > 0``, or ``"auto"``: the recipe of `degenjax._src.recipe` measures lambda^ on a ladder
        of step sizes and extrapolates to ``eps -> 0`` (``llc_mean`` is then its estimate, ``llc_uncertainty``
        includes the remaining bias, ``recipe`` says what was tried and why; ``num_draws`` and ``num_burnin`` are
        chosen by the recipe; when the chains cannot be sampled at the requested ``nbeta`` and ``localization``
        within the budget, it measures again at 10x the localization and says so: ``escalate`` of
        ``recipe_kwargs``). Not under ``jax.jit``.
      batch_size: minibatch size, ``<= n``.
      nbeta: ``n * beta``; default ``n / log n`` (module docstring).
      localization: ``gamma`` (default 1.0; module docstring).
      num_burnin: steps run before recording (default 0; module docstring).
      sampler: ``"sgld"``, ``"rmsprop_sgld"``, ``"sgnht"`` or an `SGMCMCAlgorithm`.
      sampler_kwargs: extra hyperparameters for the sampler's ``build_kernel`` (e.g. ``alpha``,
        ``diffusion_factor``, ``noise_level``, ``weight_decay``, ``bounding_box_size``).
      mala_every: compute the MALA acceptance every ``mala_every`` steps (one extra gradient on those steps);
        0 disables it.
      num_chunks: number of pieces of the scan (default: 10, capped at the number of steps; 1 under ``jit``).
      progress: show a tqdm progress bar (updated between chunks).
      mesh: optional `jax.sharding.Mesh`; the chain axis of every per-chain array (states, keys) is
        sharded over the mesh axis ``chain_axis`` (a `NamedSharding` constraint inside the scan; Explicit axes are
        used as Auto); data and ``w*`` stay replicated. Gives the same numbers as the unsharded run.
      chain_axis: mesh axis for chains (default: the mesh's first axis other than ``data_axis``, none if there is
        no other); ``num_chains`` must be divisible by its size.
      data_axis: optional mesh axis over which each chain's minibatch is split (data-parallel gradients); the same
        numbers as the unsharded run up to the order of the floating-point sums.
      eval_batch_size: block size for the full-data loss ``L_n(w*)`` (default: one call on all data).
      warn: emit warnings (not converged, negative lambda^, MALA acceptance outside [0.6, 0.99], dropped chains).
      mask: restricted LLC: only these entries of ``params`` are sampled, the rest stay at ``w*`` (a tree of
        booleans, a ``select(path, leaf)`` callable or a path substring; see `parameter_mask`). A regular model
        restricted to ``k`` of its parameters has lambda = k/2.
      data_subset: data-restricted LLC: a boolean mask ``(n,)`` or index array; the loss (for sampling and for
        ``L_n(w*)``) is over those rows only, and ``n`` (so the default ``nbeta``) is their number.
      metrics_fn: ``metrics_fn(params, state: MetricsState) -> dict of scalars``, evaluated inside the scan at every
        ``metrics_every``-th recorded draw of every chain (e.g. weight norm, gradient norm on ``state.batch``,
        ``state.running_llc``); returned as ``LLCResult.metrics``.
      metrics_every: the draw interval of ``metrics_fn``.
      on_divergence: ``"raise"`` (`LLCDivergenceError` at the first non-finite loss), ``"drop"`` (finish, and
        summarize only the finite chains; ``diverged`` marks the others) or ``"flag"`` (finish; the summary
        includes the diverged chains, so it is NaN, and ``diverged`` marks them).
      control_variate: record ``L_B(w_t) - L_B(w*) + L_n(w*)`` instead of ``L_B(w_t)``: the same expectation (the
        minibatches are uniform over each epoch), without the minibatch's own sampling noise, which at a large
        ``nbeta`` dominates the draw-to-draw variance of the trace (one more forward pass per step; default off, as
        devinterp). ``step_size="auto"`` uses it.
      replacement: draw every minibatch independently, with replacement (`iid_batch_indices`), instead of without
        replacement within epochs (the default, as devinterp's shuffled DataLoader). Then the step's minibatch is
        independent of the position, so ``E[L_B(w_t)] = L_n(w_t)``; without replacement a position fitted to the
        epoch's earlier minibatches reads the rest of the epoch higher (a bias of lambda^ that, like the gradient
        noise, changes character when the chains' relaxation time crosses the epoch length). ``step_size="auto"``
        uses it.
      recipe_kwargs: options of the recipe with ``step_size="auto"`` (see `degenjax._src.recipe.llc_recipe`).

    Returns:
      `LLCResult`.

    Raises:
      ValueError: for bad inputs, before anything runs: batch size larger than n, non-positive step size, data
        leaves with different leading axes, NaN/inf in the data (naming the leaf and row) or in params, integer
        params, a loss_fn that does not return a scalar, a non-finite ``L_n(w*)``, bad counts, unknown sampler,
        chains not divisible by the mesh.
      LLCDivergenceError: when a chain's loss becomes non-finite (``on_divergence="raise"``); names the chain, the
        step and the step size.
    """
    check_rng_key(rng_key)
    if data_subset is not None:
        data = restrict_data(data, data_subset)
    if isinstance(step_size, str) and step_size == "auto":
        from degenjax._src import recipe as recipe_lib

        if recipe_kwargs is not None and not isinstance(recipe_kwargs, dict):
            raise ValueError(f"recipe_kwargs must be a dict; got {type(recipe_kwargs).__name__}.")
        return recipe_lib.estimate_llc_auto(
            rng_key, loss_fn, params, data, num_chains=num_chains, batch_size=batch_size, nbeta=nbeta,
            localization=localization, sampler=sampler, sampler_kwargs=sampler_kwargs, mesh=mesh,
            chain_axis=chain_axis, data_axis=data_axis, eval_batch_size=eval_batch_size, warn=warn, mask=mask,
            progress=progress, on_divergence=on_divergence, **(recipe_kwargs or {}))
    algo = sgld_lib.resolve_sampler(sampler)
    num_chains = check_positive_int("num_chains", num_chains)
    num_draws = check_positive_int("num_draws", num_draws)
    num_burnin = check_positive_int("num_burnin", num_burnin, minimum=0)
    mala_every = check_positive_int("mala_every", mala_every, minimum=0)
    metrics_every = check_positive_int("metrics_every", metrics_every)
    eval_batch_size = check_eval_batch_size(eval_batch_size)
    if on_divergence not in _ON_DIVERGENCE:
        raise ValueError(f"on_divergence must be one of {_ON_DIVERGENCE}; got {on_divergence!r}.")
    n = check_inputs(params, data, step_size=step_size, batch_size=batch_size, loss_fn=loss_fn)
    _check_metrics_fn(metrics_fn, params, data, batch_size)
    if mask is not None:
        mask = parameter_mask(params, mask)
    if nbeta is None:
        nbeta = default_nbeta(n)
    sampler_kwargs = dict(sampler_kwargs or {})
    total = num_burnin + num_draws
    for name, value in (("nbeta", nbeta), ("localization", localization)):
        if not is_traced(value) and not (np.ndim(value) == 0 and np.isfinite(value) and
                                          (value > 0 if name == "nbeta" else value >= 0)):
            raise ValueError(f"{name} must be a finite scalar {'> 0' if name == 'nbeta' else '>= 0'}; got {value!r}.")
    # under an outer jit every new array is a tracer, also when all inputs are concrete (e.g. closed over)
    traced = (is_traced((rng_key, params, data, step_size, nbeta, localization))
              or isinstance(jnp.zeros(()), jax.core.Tracer))

    if traced:
        num_chunks = 1
    elif num_chunks is None:
        num_chunks = min(10, total)
    else:
        num_chunks = min(check_positive_int("num_chunks", num_chunks), total)
    chunk_len = -(-total // num_chunks)

    chain_sharding, batch_sharding = chain_shardings(mesh, chain_axis, data_axis, num_chains, batch_size)
    prologue = cached_runner(prologue_runner, loss_fn, algo, num_chains, eval_batch_size, mask is not None)
    init_loss, perm_keys, noise_keys, states = prologue(rng_key, params, data, mask)
    if not traced:
        check_init_loss(init_loss)
    states, perm_keys, noise_keys = constrain((states, perm_keys, noise_keys), chain_sharding)

    run_chunk = cached_runner(chunk_runner, loss_fn, algo, tuple(sorted(sampler_kwargs.items())), n, batch_size,
                        mala_every, chain_sharding, batch_sharding, metrics_fn, metrics_every, bool(control_variate),
                        bool(replacement))
    dtype = jnp.result_type(init_loss)
    ctx = (data, params, perm_keys, noise_keys, step_size, nbeta, localization, mask, init_loss,
           jnp.asarray(num_burnin, jnp.int32))
    carry = (states, jnp.zeros((num_chains,), dtype), jnp.zeros((num_chains,), jnp.int32))

    bar = None
    if progress and not traced:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="LLC", unit="step")
    chunks = []
    try:
        for k in range(num_chunks):
            ts = np.arange(k * chunk_len, (k + 1) * chunk_len, dtype=np.int32)
            carry, out = run_chunk(carry, ts, ctx)
            chunks.append(out)
            if not traced and on_divergence == "raise":
                bad = first_divergence(np.asarray(out[0]), k * chunk_len, total)
                if bad is not None:
                    raise divergence_error(*bad, step_size)
            if bar is not None:
                bar.update(min(chunk_len, total - k * chunk_len))
    finally:
        if bar is not None:
            bar.close()

    # host-side NumPy summaries when the run is concrete (no per-op device compilations), jnp under tracing
    xp = jnp if traced else np
    losses = xp.concatenate([xp.asarray(c[0]) for c in chunks], axis=0)[num_burnin:total]  # (draws, chains)
    accs = xp.concatenate([xp.asarray(c[1]) for c in chunks], axis=0)[num_burnin:total]
    metrics = None
    if metrics_fn is not None:
        metrics = {k: xp.concatenate([xp.asarray(c[2][k]) for c in chunks], axis=0)[num_burnin:total:metrics_every].T
                   for k in chunks[0][2]}
    result = summarize(xp, losses.T, accs, xp.asarray(init_loss), nbeta, drop=on_divergence == "drop")
    result = result._replace(step_size=xp.asarray(step_size, dtype=result.loss_trace.dtype), metrics=metrics,
                             num_data=xp.asarray(n, dtype=xp.int32))
    if traced:
        return result
    return finish(result, warn=warn, step_size=step_size, stacklevel=3)


def chain_shardings(mesh, chain_axis, data_axis, num_chains, batch_size):
    """``(chain_sharding, batch_sharding)`` for a mesh (both None without one), after checking the axes."""
    if mesh is None:
        if chain_axis is not None or data_axis is not None:
            raise ValueError("chain_axis and data_axis name axes of a mesh; pass mesh=jax.make_mesh(...) as well.")
        return None, None
    if data_axis is not None:
        if data_axis not in mesh.axis_names:
            raise ValueError(f"data_axis={data_axis!r} is not an axis of the mesh {mesh.axis_names}.")
        if batch_size % mesh.shape[data_axis] != 0:
            raise ValueError(f"batch_size={batch_size} is not divisible by the mesh axis {data_axis!r} of size "
                             f"{mesh.shape[data_axis]}; use a multiple of {mesh.shape[data_axis]}.")
    others = [a for a in mesh.axis_names if a != data_axis]
    axis = chain_axis if chain_axis is not None else (others[0] if others else None)
    if axis is not None:
        if axis not in mesh.axis_names:
            raise ValueError(f"chain_axis={axis!r} is not an axis of the mesh {mesh.axis_names}.")
        if axis == data_axis:
            raise ValueError(f"chain_axis and data_axis are both {axis!r}; use two different mesh axes.")
        if num_chains % mesh.shape[axis] != 0:
            raise ValueError(f"num_chains={num_chains} is not divisible by the mesh axis {axis!r} of size "
                             f"{mesh.shape[axis]}; use a multiple of {mesh.shape[axis]} chains.")
    # chains are independent: a sharding constraint on the chain axis lets XLA partition the whole step with no
    # communication. Explicit axes are viewed as Auto here (same devices), since per-chain gathers from the
    # replicated data have no unambiguous explicit output sharding.
    auto_mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    chain_sharding = jax.sharding.NamedSharding(auto_mesh, P(axis))
    batch_sharding = None
    if data_axis is not None:  # minibatches (chains, batch, ...): chains over `axis`, examples over data_axis
        batch_sharding = jax.sharding.NamedSharding(auto_mesh, P(axis, data_axis))
    return chain_sharding, batch_sharding


def mean_excess(xp, loss_trace, init_loss):
    """Per chain, the mean of ``L_t - L_n(w*)`` over the draws of ``loss_trace`` ``(chains, draws)``: centred, and
    with NumPy in float64.

    lambda^ is ``nbeta`` times this difference, which is ~``lambda / nbeta`` while the losses themselves can be O(1)
    (a model with a non-zero training loss). NumPy reduces a non-contiguous axis (the traces are stored ``(draws,
    chains)``) by adding one draw at a time, so a float32 sum of 10^6 losses near 1 rounds away most of that
    difference: on the devinterp DLN (``L_n(w*)`` ~1, n beta 8686) lambda^ came out ~8 low at 1.15 x 10^6 draws, and
    ~30 low when the minibatch noise of the recorded loss is small (``control_variate=True``).
    """
    if xp is np:
        return np.mean(np.asarray(loss_trace, np.float64) - np.float64(init_loss), axis=1)
    return xp.mean(loss_trace - init_loss, axis=1)


def summarize(xp, loss_trace, accs, init_loss, nbeta, *, drop: bool = False) -> LLCResult:
    """lambda^ per chain, mean, std and MALA means from the traces, with ``xp`` NumPy or jax.numpy.

    With ``drop``, chains with a non-finite loss are left out of the mean and std (their lambda^ is NaN).
    """
    dtype = loss_trace.dtype
    init_loss = init_loss.astype(dtype)
    nbeta = xp.asarray(nbeta, dtype=dtype)
    diverged = ~xp.all(xp.isfinite(loss_trace), axis=1)
    llc_per_chain = nbeta * mean_excess(xp, loss_trace, init_loss).astype(dtype)
    nan = xp.full((), xp.nan, dtype)
    if drop:
        keep = ~diverged
        llc_per_chain = xp.where(keep, llc_per_chain, nan)
        kept = xp.sum(keep)
        safe = xp.where(keep, llc_per_chain, xp.zeros_like(llc_per_chain))
        llc_mean = xp.where(kept > 0, xp.sum(safe) / xp.maximum(kept, 1).astype(dtype), nan)
        dev = xp.where(keep, llc_per_chain - llc_mean, xp.zeros_like(llc_per_chain))
        llc_std = xp.where(kept > 1, xp.sqrt(xp.sum(dev * dev) / xp.maximum(kept - 1, 1).astype(dtype)), nan)
    else:
        llc_mean = xp.mean(llc_per_chain)
        llc_std = xp.std(llc_per_chain, ddof=1) if loss_trace.shape[0] > 1 else nan
    sampled = ~xp.isnan(accs)
    acc_sum = xp.where(sampled, accs, xp.zeros_like(accs))
    count = xp.sum(sampled, axis=0).astype(accs.dtype)
    # NaN (not a division warning) where no step was MALA-checked
    total = xp.sum(count)
    mala = xp.where(total > 0, xp.sum(acc_sum) / xp.maximum(total, 1), nan)
    mala_per_chain = xp.where(count > 0, xp.sum(acc_sum, axis=0) / xp.maximum(count, 1), nan)
    num = loss_trace.shape[0]
    se = llc_std / xp.asarray(np.sqrt(num), dtype) if num > 1 else nan
    return LLCResult(llc_mean=llc_mean, llc_std=llc_std, llc_per_chain=llc_per_chain, loss_trace=loss_trace,
                     init_loss=init_loss, mala_acceptance=mala, mala_per_chain=mala_per_chain, ess=nan, rhat=nan,
                     nbeta=nbeta, llc_mcse=nan, diverged=diverged, llc_uncertainty=se,
                     converged=xp.asarray(False))


def finish(result: LLCResult, *, warn: bool, step_size, stacklevel: int = 3) -> LLCResult:
    """Host-side diagnostics of a concrete result: ESS, R-hat, MCSE and ``converged`` from `convergence` (on the
    kept chains), the uncertainty, device placement and the warnings."""
    trace = np.asarray(result.loss_trace)
    keep = ~np.asarray(result.diverged)
    conv = convergence(trace[keep] if keep.any() else trace)
    dtype = trace.dtype
    mcse = float(result.nbeta) * conv.mcse
    se = float(result.llc_uncertainty)
    unc = np.nanmax([se, mcse]) if np.isfinite(se) or np.isfinite(mcse) else float("nan")
    result = result._replace(ess=np.asarray(conv.ess, dtype), rhat=np.asarray(conv.rhat, dtype),
                             llc_mcse=np.asarray(mcse, dtype), llc_uncertainty=np.asarray(unc, dtype),
                             converged=np.asarray(conv.converged))
    result = jax.tree.map(jax.device_put, result)  # no per-shape compilation
    if warn:
        dropped = np.flatnonzero(~keep)
        if dropped.size:
            warnings.warn(f"{dropped.size} of {keep.size} chains diverged (chains {dropped.tolist()}); the summary "
                          f"{'leaves them out' if np.isfinite(float(result.llc_mean)) else 'is NaN'}.",
                          RuntimeWarning, stacklevel=stacklevel)
        if not conv.converged:
            warnings.warn(f"LLC estimate {float(result.llc_mean):.4g}: {conv.message}.", RuntimeWarning,
                          stacklevel=stacklevel)
        warn_result(float(result.llc_mean), float(result.mala_acceptance), step_size, stacklevel=stacklevel + 1)
    return result


# ----------------------------------------------------------------------------------------------------------------
# N_eff and behavioral losses


def effective_parameter_count(llc):
    """``N_eff = 2 lambda`` (arXiv 2405.10927 section 2).

    Args:
      llc: a float or array of lambda values, or an `LLCResult`.

    Returns:
      ``2 * llc`` for a number or array; for an `LLCResult`, ``(mean, std)`` of ``2 lambda^`` over chains.
    """
    if isinstance(llc, LLCResult):
        return 2.0 * llc.llc_mean, 2.0 * llc.llc_std
    if isinstance(llc, (str, bytes)) or llc is None:
        raise ValueError(f"effective_parameter_count expects a number, an array or an LLCResult; got {llc!r}.")
    return 2.0 * jnp.asarray(llc)


def behavioral_loss(apply_fn: Callable, params_star: ArrayTree, kind: str = "mse") -> Callable:
    """A loss measuring how far a network's outputs move from those of ``params_star``.

    ``L_B(w) = E_x D(f_w(x), f_w*(x))``, zero at ``w*``; with it, ``N_eff = 2 lambda_B`` counts the directions that
    change behaviour (arXiv 2405.10927 section 2). The reference outputs are recomputed on each batch (a forward pass at
    ``params_star``, no gradient).

    Args:
      apply_fn: ``apply_fn(params, batch) -> outputs`` of shape ``(batch, ..., d_out)``.
      params_star: the reference parameters.
      kind: ``"mse"``: ``D`` is the squared Euclidean distance, summed over all non-leading axes; ``"kl"``:
        ``D = KL(softmax(f_w*) || softmax(f_w))`` over the last axis (outputs are logits), summed over the other
        non-leading axes (e.g. positions).

    Returns:
      ``loss_fn(params, batch) -> scalar``, the mean of ``D`` over the leading (batch) axis.
    """
    if kind not in ("mse", "kl"):
        raise ValueError(f"kind must be 'mse' or 'kl'; got {kind!r}.")

    def loss_fn(params, batch):
        out = apply_fn(params, batch)
        ref = lax.stop_gradient(apply_fn(params_star, batch)).astype(out.dtype)
        if kind == "mse":
            d = jnp.square(out - ref)
        else:
            log_p_ref = jax.nn.log_softmax(ref, axis=-1)
            d = jnp.exp(log_p_ref) * (log_p_ref - jax.nn.log_softmax(out, axis=-1))
        per_example = jnp.sum(d.reshape((d.shape[0], -1)), axis=1)
        return jnp.mean(per_example)

    return loss_fn

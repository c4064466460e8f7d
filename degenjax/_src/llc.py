"""Local learning coefficient: the SGLD estimator, diagnostics, N_eff and behavioral losses (DESIGN.md section 5).

The estimator samples the localized tempered posterior ``p(w) ~ exp(-nbeta L_n(w) - gamma/2 ||w - w*||^2)`` with
stochastic-gradient MCMC (`degenjax.sgld` by default) and reports, per chain,

    lambda^ = nbeta * (mean_t L_{B_t}(w_t) - L_n(w*)),

where ``L_{B_t}(w_t)`` is the mean loss of the step's minibatch at the position *before* step ``t`` (the value the
step's gradient comes from, as in devinterp; it costs nothing extra) and ``L_n(w*)`` is the loss on the full data.

Randomness (shared with `SGLDKernel`, so both give identical numbers): chain ``c`` gets the key
``k_c = split(rng_key, num_chains)[c]`` (``rng_key`` itself when ``num_chains == 1``, as numpyro does); from
``perm_key, noise_key = split(k_c)``, epoch ``e`` visits the data in a keyed pseudo-random order (`epoch_positions`,
keyed by ``perm_key``'s key data and ``e``) in consecutive minibatches of ``batch_size`` (the last ``n mod batch_size``
positions of each epoch are skipped), and step ``t`` uses the key ``fold_in(noise_key, t)`` for its kernel.
"""

from __future__ import annotations

import functools
import math
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
from degenjax._src.diagnostics import convergence
from degenjax._src.hashing import fmix32
from degenjax._src.validation import check_finite_params, is_traced

ArrayTree = Any


class LLCDivergenceError(FloatingPointError):
    """Raised when a chain's loss becomes non-finite (the sampler diverged)."""


class LLCResult(NamedTuple):
    """Result of `estimate_llc`.

    Attributes:
      llc_mean: scalar, mean of ``llc_per_chain``.
      llc_std: scalar, standard deviation over chains (``ddof=1``; NaN for a single chain).
      llc_per_chain: ``(num_chains,)`` lambda^ of each chain.
      loss_trace: ``(num_chains, num_draws)`` minibatch losses ``L_{B_t}(w_t)`` after burn-in.
      init_loss: scalar ``L_n(w*)`` on the full data set.
      mala_acceptance: scalar mean MALA acceptance probability over chains and the sampled draw steps (NaN when none
        was computed, e.g. ``mala_every=0`` or SGNHT).
      mala_per_chain: ``(num_chains,)`` mean MALA acceptance per chain.
      ess: scalar effective sample size of ``loss_trace`` (``numpyro.diagnostics.effective_sample_size``; NaN under
        ``jax.jit``).
      rhat: scalar split R-hat of ``loss_trace`` (``numpyro.diagnostics.split_gelman_rubin``; NaN under ``jax.jit``).
      nbeta: scalar ``n * beta`` used.
      llc_mcse: scalar Monte Carlo standard error of ``llc_mean`` (``nbeta * sd(loss_trace) / sqrt(ess)``; NaN
        under ``jax.jit``). `degenjax.convergence` computes all three from a trace after a jitted run.
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


# ----------------------------------------------------------------------------------------------------------------
# Input checks and shared randomness


def num_data(data) -> int:
    """The common leading axis ``n`` of every array in ``data``.

    Raises:
      ValueError: if ``data`` has no arrays, a scalar leaf, or leaves whose leading axes differ.
    """
    leaves, _ = jax.tree.flatten_with_path(data)
    if not leaves:
        raise ValueError("data has no arrays; pass a pytree of arrays with a leading axis of n data points.")
    sizes = {}
    for path, x in leaves:
        if jnp.ndim(x) == 0:
            raise ValueError(f"data leaf {jax.tree_util.keystr(path) or '<root>'} is a scalar; every leaf needs a "
                             "leading axis of n data points.")
        sizes[jax.tree_util.keystr(path) or "<root>"] = jnp.shape(x)[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"data leaves have different leading axes {sizes}; every array in data must have the same "
                         "number n of data points along axis 0.")
    return int(next(iter(sizes.values())))


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def _check_step_size(step_size) -> None:
    if is_traced(step_size):
        return
    value = np.asarray(step_size)
    if value.ndim != 0 or not np.isfinite(value) or value <= 0:
        raise ValueError(f"step_size must be a positive finite scalar; got {step_size!r}. Typical SGLD step sizes "
                         "for the LLC are 1e-6 to 1e-3.")


def _check_params(params) -> None:
    if not jax.tree.leaves(params):
        raise ValueError("params has no arrays; pass the parameters w* as a pytree of arrays.")
    check_finite_params(params, "lambda^ is measured at a trained, finite w*")


def check_inputs(params, data, *, step_size, batch_size) -> int:
    """Validates the common inputs of `estimate_llc` and `SGLDKernel`; returns ``n``."""
    n = num_data(data)
    batch_size = _check_positive_int("batch_size", batch_size)
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the data set (n={n}); use batch_size <= n.")
    _check_step_size(step_size)
    _check_params(params)
    return n


def default_nbeta(n: int) -> float:
    """``n / log n`` (beta = 1 / log n, DESIGN.md section 5)."""
    if n < 2:
        raise ValueError(f"nbeta=None needs n >= 2 data points (n / log n); got n={n}. Pass nbeta explicitly.")
    return n / math.log(n)


def chain_keys(rng_key, num_chains: int):
    """Per-chain keys ``(num_chains, ...)``: ``rng_key`` itself for one chain, else ``split(rng_key, num_chains)``."""
    if num_chains == 1:
        return rng_key[None]
    return jax.random.split(rng_key, num_chains)


def chain_streams(chain_key):
    """``(perm_key, noise_key)`` of one chain."""
    keys = jax.random.split(chain_key)
    return keys[0], keys[1]


_SHUFFLE_ROUNDS = 24


def round_keys(perm_key, epoch, rounds: int) -> jax.Array:
    """The ``2 * rounds`` uint32 round words of one epoch's shuffle (offsets first, then salts).

    Word ``i`` is ``h_i = fmix32(... fmix32(fmix32(c_i ^ 0x9E3779B9) ^ k_0) ... ^ k_m)`` with the counter
    ``c_i = epoch * 2 * rounds + i`` (uint32, wrapping) and ``k_0..k_m`` the words of ``jax.random.key_data(perm_key)``:
    a keyed bijection of the counter, so words differ within and across epochs. It replaces two threefry calls per
    step (``fold_in`` and ``bits``), which on CPUs JAX runs as loops of many small operations.
    """
    words = jnp.ravel(jax.random.key_data(perm_key)).astype(jnp.uint32)
    count = jnp.asarray(epoch).astype(jnp.uint32) * jnp.uint32(2 * rounds) + jnp.arange(2 * rounds, dtype=jnp.uint32)
    h = fmix32(count ^ jnp.uint32(0x9E3779B9))
    for k in range(words.shape[0]):
        h = fmix32(h ^ words[k])
    return h


def epoch_positions(perm_key, epoch, positions: jax.Array, n: int) -> jax.Array:
    """Where positions ``0..n-1`` of epoch ``epoch`` land: a keyed pseudo-random permutation of ``range(n)``.

    A swap-or-not shuffle (Hoang, Morris and Rogaway, 2012): each round pairs ``x`` with ``K_r - x (mod n)`` and
    swaps the pair when the top bit of a keyed hash of ``max(x, K_r - x)`` is set. Every round is an involution of
    ``[0, n)``, so the composition is a permutation of exactly ``[0, n)`` for any ``n`` (no cycle-walking, no
    data-dependent loop).
    Evaluating it only at the positions a minibatch needs costs O(batch x rounds) per step, with no sort and no
    ``n``-sized state; different keys or epochs give independent-looking orders.

    Args:
      perm_key: the chain's permutation key.
      epoch: int scalar (may be traced).
      positions: int array of positions in ``[0, n)``.
      n: number of data points (below 2^31).

    Returns:
      int32 array like ``positions``: the data indices visited at those positions of the epoch.
    """
    if not 1 <= n < 2 ** 31:
        raise ValueError(f"the minibatch order supports 1 <= n < 2**31 data points; got n={n}.")
    rounds = max(_SHUFFLE_ROUNDS, int(n - 1).bit_length() + 8)  # every element can reach 2^rounds >> n places
    size = jnp.uint32(n)
    words = round_keys(perm_key, epoch, rounds)
    offsets, salts = words[:rounds] % size, words[rounds:]

    def one_round(r, x):
        # (K_r - x) mod n without an integer division (scalar on CPUs): K_r + n - x lies in (0, 2n) and n < 2^31,
        # so one conditional subtraction is exact in uint32
        partner = lax.dynamic_index_in_dim(offsets, r, keepdims=False) + size - x
        partner = jnp.where(partner >= size, partner - size, partner)
        salt = lax.dynamic_index_in_dim(salts, r, keepdims=False)
        # the swap bit: the top bit of a two-multiply hash of the pair's larger element and the salt (the top bit of
        # a product depends on every lower bit; 6 operations a round where fmix32's lowest bit took 11, which cut
        # the H200's compile of the DLN estimator by about 0.3 s, in XLA's fusion pass)
        h = (jnp.maximum(x, partner) ^ salt) * jnp.uint32(0x85EBCA6B)
        h = (h ^ (h >> jnp.uint32(16))) * jnp.uint32(0xC2B2AE35)
        swap = h >= jnp.uint32(0x80000000)
        return jnp.where(swap, partner, x)

    # traced once and unrolled (a loop of one trip that XLA removes: no device loop, a fraction of the tracing)
    x = lax.fori_loop(0, rounds, one_round, positions.astype(jnp.uint32), unroll=True)
    return x.astype(jnp.int32)


def batch_indices(perm_key, t, n: int, batch_size: int) -> jax.Array:
    """The data indices ``(batch_size,)`` int32 of step ``t``'s minibatch: epoch ``e = t // (n // batch_size)``
    visits the data in the order of `epoch_positions` and step ``t`` takes its ``j = t mod (n // batch_size)``-th
    block of ``batch_size`` positions (the last ``n mod batch_size`` positions of each epoch are skipped), so batches
    are drawn without replacement within an epoch."""
    steps_per_epoch = n // batch_size
    epoch, j = t // steps_per_epoch, t % steps_per_epoch
    positions = j * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
    return epoch_positions(perm_key, epoch, positions, n)


def gather_batch(data, idx: jax.Array):
    """``data`` at the indices ``idx`` along the leading axis of every leaf."""
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)


def full_loss(loss_fn, params, data, eval_batch_size: int | None = None) -> jax.Array:
    """``L_n(params)``: one call on all of ``data``, or the size-weighted mean over blocks of ``eval_batch_size``
    (exact for a per-example mean loss; bounds memory for large data)."""
    n = num_data(data)
    if eval_batch_size is None or eval_batch_size >= n:
        return loss_fn(params, data)
    m = n // eval_batch_size
    blocks = jax.tree.map(lambda x: x[: m * eval_batch_size].reshape((m, eval_batch_size) + x.shape[1:]), data)
    total = jnp.sum(lax.map(lambda b: loss_fn(params, b), blocks)) * eval_batch_size
    rest = n - m * eval_batch_size
    if rest:
        tail = loss_fn(params, jax.tree.map(lambda x: x[m * eval_batch_size:], data))
        total = total + tail * rest
    return total / n


# ----------------------------------------------------------------------------------------------------------------
# Estimator


def _constrain(tree, sharding):
    if sharding is None:
        return tree
    return jax.tree.map(lambda x: lax.with_sharding_constraint(x, sharding), tree)


def _runner(factory, *args):
    """``factory(*args)`` from its cache, or built for this call only when an argument is unhashable (a loss
    function or sampler hyperparameter that cannot be a cache key)."""
    try:
        return factory(*args)
    except TypeError:
        return factory.__wrapped__(*args)


@functools.lru_cache(maxsize=32)
def _prologue_runner(loss_fn, algo, num_chains: int, eval_batch_size: int | None):
    """A jitted ``(rng_key, params, data) -> (L_n(w*), perm_keys, noise_keys, chain states)``: one compiled
    program (cached like `_chunk_runner`) instead of a dozen eager operations, each compiled on its first use."""

    def prologue(rng_key, params, data):
        init_loss = full_loss(loss_fn, params, data, eval_batch_size)
        perm_keys, noise_keys = jax.vmap(chain_streams)(chain_keys(rng_key, num_chains))
        state0 = algo.init(params)
        states = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_chains,) + jnp.shape(x)), state0)
        return init_loss, perm_keys, noise_keys, states

    return jax.jit(prologue)


@functools.lru_cache(maxsize=32)
def _chunk_runner(loss_fn, algo, sampler_items, n: int, batch_size: int, mala_every: int, chain_sharding,
                  batch_sharding=None):
    """A jitted ``run_chunk(carry, ts, ctx)`` advancing all chains over the steps ``ts``.

    Cached on everything that fixes the program's structure, so repeated calls (sweeps over checkpoints, step
    sizes, nbeta, localization) reuse one compilation: data, params, keys and the hyperparameters are arguments,
    never compile-time constants. Under the caller's ``jax.jit`` the inner jit is inlined.
    """
    sampler_kwargs = dict(sampler_items)

    def run_chunk(carry, ts, ctx):
        data, params, perm_keys, noise_keys, step_size, nbeta, localization = ctx

        indices = jax.vmap(batch_indices, (0, None, None, None))

        # Step t's minibatch indices are computed in step t - 1 and carried: a gather reading a loop-carried buffer
        # cannot have the shuffle fused into it (XLA otherwise recomputes the shuffle rounds for every gathered
        # element of every data leaf, most of the step of a small model).
        def body(carry, t):
            states, idx = carry
            batch = _constrain(jax.vmap(gather_batch, (None, 0))(data, idx), batch_sharding)
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(noise_keys, t)
            # the MALA flag depends only on t (not batched over chains): the extra gradient runs only on those steps
            mala = (t % mala_every == 0) if mala_every > 0 else False
            kernel = algo.build_kernel(loss_fn, params, step_size=step_size, nbeta=nbeta,
                                       localization=localization, mala=mala, **sampler_kwargs)
            states, info = jax.vmap(kernel)(step_keys, states, batch)
            states = _constrain(states, chain_sharding)
            next_idx = _constrain(indices(perm_keys, t + 1, n, batch_size), batch_sharding or chain_sharding)
            return (states, next_idx), (info.loss, info.mala_acceptance)

        (states, _), trace = lax.scan(body, (carry, indices(perm_keys, ts[0], n, batch_size)), ts)
        return states, trace

    return jax.jit(run_chunk)


def estimate_llc(rng_key, loss_fn: Callable, params: ArrayTree, data: ArrayTree, *, num_chains: int, num_draws: int,
                 step_size, batch_size: int, nbeta=None, localization=1.0, num_burnin: int = 0,
                 sampler="sgld", sampler_kwargs: dict | None = None, mala_every: int = 10,
                 num_chunks: int | None = None, progress: bool = False, mesh=None, chain_axis: str | None = None,
                 data_axis: str | None = None,
                 eval_batch_size: int | None = None, warn: bool = True) -> LLCResult:
    """Estimates the local learning coefficient lambda^ at ``params`` (DESIGN.md section 5).

    All chains advance together (``vmap`` over chains inside one ``lax.scan``); the scan is split into
    ``num_chunks`` pieces so that a progress bar can report and a divergence stops the run early. Only the scalar
    loss of each step is kept, never the parameters. Runs eagerly or under the caller's ``jax.jit`` (then the
    divergence check, warnings, ESS and R-hat are skipped and the scan is one chunk).

    Args:
      rng_key: PRNG key.
      loss_fn: ``loss_fn(params, batch) -> scalar`` MEAN loss over the batch.
      params: the point ``w*`` (a pytree), also the localization centre and every chain's start.
      data: pytree of arrays with a common leading axis ``n``; minibatches are drawn without replacement within
        an epoch (one pseudo-random order per epoch per chain, see `epoch_positions`).
      num_chains: number of chains.
      num_draws: recorded steps per chain (after burn-in).
      step_size: SGLD ``eps > 0``.
      batch_size: minibatch size, ``<= n``.
      nbeta: ``n * beta``; default ``n / log n``.
      localization: ``gamma``.
      num_burnin: steps run before recording.
      sampler: ``"sgld"``, ``"rmsprop_sgld"``, ``"sgnht"`` or an `SGMCMCAlgorithm`.
      sampler_kwargs: extra hyperparameters for the sampler's ``build_kernel`` (e.g. ``alpha``,
        ``diffusion_factor``).
      mala_every: compute the MALA acceptance every ``mala_every`` steps (one extra gradient on those steps);
        0 disables it.
      num_chunks: number of pieces of the scan (default: 10, capped at the number of steps; 1 under ``jit``).
      progress: show a tqdm progress bar (updated between chunks).
      mesh: optional `jax.sharding.Mesh`; the chain axis of every per-chain array (states, keys) is
        sharded over the mesh axis ``chain_axis`` (a `NamedSharding` constraint inside the scan; Explicit axes are
        used as Auto); data and ``w*`` stay replicated. Gives the same numbers as the unsharded run.
      chain_axis: mesh axis for chains (default: the mesh's first axis other than ``data_axis``, none if there is
        no other); ``num_chains`` must be divisible by its size.
      data_axis: optional mesh axis over which each chain's minibatch is split (data-parallel gradients: every
        device on that axis evaluates ``batch_size / size`` examples and XLA sums the partial losses and
        gradients); ``batch_size`` must be divisible by its size. The same numbers as the unsharded run up to the
        order of the floating-point sums.
      eval_batch_size: block size for the full-data loss ``L_n(w*)`` (default: one call on all data).
      warn: emit warnings for negative lambda^ and MALA acceptance outside [0.6, 0.99].

    Returns:
      `LLCResult`.

    Raises:
      ValueError: for bad inputs (batch size larger than n, non-positive step size, data leaves with different
        leading axes, non-finite params, bad counts, unknown sampler, chains not divisible by the mesh).
      LLCDivergenceError: when a chain's loss becomes non-finite; names the chain, the step and the step size.
    """
    algo = sgld_lib.resolve_sampler(sampler)
    num_chains = _check_positive_int("num_chains", num_chains)
    num_draws = _check_positive_int("num_draws", num_draws)
    num_burnin = _check_positive_int("num_burnin", num_burnin, minimum=0)
    mala_every = _check_positive_int("mala_every", mala_every, minimum=0)
    n = check_inputs(params, data, step_size=step_size, batch_size=batch_size)
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
        num_chunks = min(_check_positive_int("num_chunks", num_chunks), total)
    chunk_len = -(-total // num_chunks)

    if mesh is None and (chain_axis is not None or data_axis is not None):
        raise ValueError("chain_axis and data_axis name axes of a mesh; pass mesh=jax.make_mesh(...) as well.")
    axis = None
    if mesh is not None:
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

    prologue = _runner(_prologue_runner, loss_fn, algo, num_chains, eval_batch_size)
    init_loss, perm_keys, noise_keys, states = prologue(rng_key, params, data)

    chain_sharding = batch_sharding = None
    if mesh is not None:
        # chains are independent: a sharding constraint on the chain axis lets XLA partition the whole step with
        # no communication. Explicit axes are viewed as Auto here (same devices), since per-chain gathers from the
        # replicated data have no unambiguous explicit output sharding.
        auto_mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                                      axis_types=(AxisType.Auto,) * len(mesh.axis_names))
        chain_sharding = jax.sharding.NamedSharding(auto_mesh, P(axis))
        if data_axis is not None:  # minibatches (chains, batch, ...): chains over `axis`, examples over data_axis
            batch_sharding = jax.sharding.NamedSharding(auto_mesh, P(axis, data_axis))
        states, perm_keys, noise_keys = _constrain((states, perm_keys, noise_keys), chain_sharding)

    run_chunk = _runner(_chunk_runner, loss_fn, algo, tuple(sorted(sampler_kwargs.items())), n, batch_size,
                        mala_every, chain_sharding, batch_sharding)
    ctx = (data, params, perm_keys, noise_keys, step_size, nbeta, localization)

    bar = None
    if progress and not traced:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="LLC", unit="step")
    loss_chunks, acc_chunks = [], []
    try:
        for k in range(num_chunks):
            ts = np.arange(k * chunk_len, (k + 1) * chunk_len, dtype=np.int32)
            states, (losses, accs) = run_chunk(states, ts, ctx)
            loss_chunks.append(losses)
            acc_chunks.append(accs)
            if not traced:
                _check_finite(np.asarray(losses), k * chunk_len, total, step_size)
            if bar is not None:
                bar.update(min(chunk_len, total - k * chunk_len))
    finally:
        if bar is not None:
            bar.close()

    # host-side NumPy summaries when the run is concrete (no per-op device compilations), jnp under tracing
    xp = jnp if traced else np
    losses = xp.concatenate([xp.asarray(c) for c in loss_chunks], axis=0)[num_burnin:total]  # (draws, chains)
    accs = xp.concatenate([xp.asarray(c) for c in acc_chunks], axis=0)[num_burnin:total]
    result = _summarize(xp, losses.T, accs, xp.asarray(init_loss), nbeta)
    if not traced:
        conv = convergence(result.loss_trace)
        dtype = result.loss_trace.dtype
        result = result._replace(ess=np.asarray(conv.ess, dtype), rhat=np.asarray(conv.rhat, dtype),
                                 llc_mcse=np.asarray(float(result.nbeta) * conv.mcse, dtype))
        result = jax.tree.map(jax.device_put, result)  # no per-shape compilation
        if warn and not conv.converged:
            warnings.warn(f"LLC estimate {float(result.llc_mean):.4g}: {conv.message}.", RuntimeWarning, stacklevel=2)
    else:
        result = result._replace(llc_mcse=jnp.full((), jnp.nan, result.loss_trace.dtype))
    if warn and not traced:
        _warn(result, step_size)
    return result


def _summarize(xp, loss_trace, accs, init_loss, nbeta) -> LLCResult:
    """lambda^ per chain, mean, std and MALA means from the traces, with ``xp`` NumPy or jax.numpy."""
    dtype = loss_trace.dtype
    init_loss = init_loss.astype(dtype)
    nbeta = xp.asarray(nbeta, dtype=dtype)
    llc_per_chain = nbeta * (xp.mean(loss_trace, axis=1) - init_loss)
    num_chains = loss_trace.shape[0]
    nan = xp.full((), xp.nan, dtype)
    llc_std = xp.std(llc_per_chain, ddof=1) if num_chains > 1 else nan
    sampled = ~xp.isnan(accs)
    acc_sum = xp.where(sampled, accs, xp.zeros_like(accs))
    count = xp.sum(sampled, axis=0).astype(accs.dtype)
    # NaN (not a division warning) where no step was MALA-checked
    total = xp.sum(count)
    mala = xp.where(total > 0, xp.sum(acc_sum) / xp.maximum(total, 1), nan)
    mala_per_chain = xp.where(count > 0, xp.sum(acc_sum, axis=0) / xp.maximum(count, 1), nan)
    return LLCResult(llc_mean=xp.mean(llc_per_chain), llc_std=llc_std, llc_per_chain=llc_per_chain,
                     loss_trace=loss_trace, init_loss=init_loss, mala_acceptance=mala, mala_per_chain=mala_per_chain,
                     ess=nan, rhat=nan, nbeta=nbeta, llc_mcse=nan)


def _check_finite(losses: np.ndarray, t0: int, total: int, step_size) -> None:
    """Raises `LLCDivergenceError` at the first non-finite loss of a chunk ``losses`` (steps x chains)."""
    valid = losses[: max(0, min(losses.shape[0], total - t0))]
    bad = ~np.isfinite(valid)
    if not bad.any():
        return
    step, chain = np.argwhere(bad)[0]
    eps = float(np.asarray(step_size))
    raise LLCDivergenceError(
        f"SGLD diverged: chain {int(chain)} has a non-finite loss ({valid[step, chain]}) at step {t0 + int(step)} "
        f"with step_size={eps:g}. Use a smaller step size (e.g. {eps / 10:g}), a larger localization, or check "
        "that params is a trained minimum.")


def _warn(result: LLCResult, step_size) -> None:
    llc = float(result.llc_mean)
    if llc < 0:
        warnings.warn(f"Negative LLC estimate ({llc:.4g}): the chains found lower loss than at w*, so w* is probably "
                      "not a (local) minimum. Train longer, or increase the localization.", RuntimeWarning,
                      stacklevel=3)
    acc = float(result.mala_acceptance)
    eps = float(np.asarray(step_size))
    if np.isfinite(acc) and acc < 0.6:
        warnings.warn(f"MALA acceptance {acc:.3f} is far below ~0.9: step_size={eps:g} is probably too large and "
                      "biases lambda^; try a smaller one.", RuntimeWarning, stacklevel=3)
    elif np.isfinite(acc) and acc > 0.99:
        warnings.warn(f"MALA acceptance {acc:.3f} is far above ~0.9: step_size={eps:g} may be smaller than needed "
                      "(slow mixing); a larger one may converge faster.", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------
# N_eff and behavioral losses


def effective_parameter_count(llc):
    """``N_eff = 2 lambda`` (DESIGN.md section 5).

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
    change behaviour (DESIGN.md section 5). The reference outputs are recomputed on each batch (a forward pass at
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

"""Many LLC estimates as one compiled program: a batch of *cells* (arXiv 2405.10927 section 2 for the estimator).

A cell is what one `estimate_llc` call computes: lambda^ at one parameter set ``w*`` (e.g. a training checkpoint)
with one step size, nbeta and localization, from one PRNG key. `estimate_llc_batched` runs ``C`` cells of ``K``
chains each as ONE chain axis of ``C * K`` chains inside one ``lax.scan``: every chain carries its own centre ``w*``,
step size, nbeta and localization (`CellChainState`), so cells that share shapes (checkpoints of one architecture,
any grid of hyperparameters) compile once and advance together. Cell ``c``'s chains get exactly the keys
``estimate_llc(rng_keys[c], ...)`` gives its chains (`degenjax._src.minibatch`), and ``L_n(w*)`` is computed per
cell, one cell after another (``lax.map``), as `estimate_llc` computes it.

**Bitwise the same numbers.** No arithmetic of one chain depends on the other chains, so a cell's loss traces,
``L_n(w*)`` and lambda^ do not depend on how many cells run beside it, on how cells are grouped, or on how chains
are sharded over devices and processes, provided the compiler emits each chain's operations the same way whatever
the size of the chain axis. On CPUs, XLA does so for matrix products but routes some reductions (e.g. a loss's mean)
through YNNPACK only above a size threshold of the kept axes, which changes their summation order (a difference of
about 1e-7 relative in float32); `bitwise_compiler_options` turns that routing off for reductions, and the compiled
programs here use it. Tested on CPU (tests/test_cells.py): in float32 and float64, each cell's loss trace,
``L_n(w*)`` and lambda^ are bitwise those of the eager `estimate_llc` with the same key, for groups of 2 or 3 cells,
one device or chains sharded over 4, eagerly or under ``jax.jit(..., compiler_options=bitwise_compiler_options())``;
the MALA acceptance (a sum over parameters in a program compiled without these options) agrees to rounding.
Exception: a chain axis of size 1 (`estimate_llc` with ``num_chains=1``, or one chain per device) compiles
differently, so groups here hold at least 2 chains per device. Over 2 processes (tests/test_multiprocess.py) the
traces agree with the single-process run to 1e-12 relative. On GPUs the batched and the one-cell programs agree to
rounding: on an H200 (jax 0.11.2, float32, `benchmarks/sweep.py`) the DLN's 24 cells were bitwise equal and the
digits MLP's differed by at most 1.6e-3 in lambda^ (the GPU's summation order depends on the batch shape).

**Groups.** Cells are run in groups of ``cells_per_group`` (default: as many as fit in memory, see
`cells_per_group_for_memory`); every group has the same shape (the last is padded with copies of its last cell,
whose results are dropped), so one compilation serves all groups. A group holds at least 2 chains per device (padded
if needed): XLA compiles a chain axis of size 1 differently, which changes the last bits of the numbers. Under the
caller's ``jax.jit`` the groups are a ``lax.map``; eagerly they are a Python loop over one compiled program, which
`degenjax.run_sweep` uses to write each group's results as soon as they are done.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from degenjax._src import distributed
from degenjax._src import sgld as sgld_lib
from degenjax._src.checks import (check_eval_batch_size, check_inputs, check_positive_int, default_nbeta)
from degenjax._src.compileopts import options_supported
from degenjax._src.diagnostics import convergence
from degenjax._src.llc import (LLCResult, cached_runner, chain_shardings, chunk_runner, constrain,
                               parameter_mask, summarize)
from degenjax._src.minibatch import chain_keys, chain_streams, full_loss, init_key
from degenjax._src.types import ArrayTree
from degenjax._src.validation import check_finite_params, is_traced


class CellChainState(NamedTuple):
    """The state of one chain of a batch of cells: the sampler's state and the chain's own cell settings.

    Attributes:
      state: the sampler's state (e.g. `SGLDState`).
      center: the chain's localization centre ``w*`` (its cell's parameters).
      step_size: scalar step size of the chain's cell.
      nbeta: scalar ``n * beta`` of the chain's cell.
      localization: scalar ``gamma`` of the chain's cell.
    """

    state: Any
    center: Any
    step_size: jax.Array
    nbeta: jax.Array
    localization: jax.Array


@functools.lru_cache(maxsize=None)
def per_chain(algo: sgld_lib.SGMCMCAlgorithm) -> sgld_lib.SGMCMCAlgorithm:
    """``algo`` with every chain's centre and hyperparameters in its state (`CellChainState`).

    The kernel ignores the shared ``center``, ``step_size``, ``nbeta`` and ``localization`` it is built with and
    builds ``algo``'s kernel from the chain's own (under ``vmap`` over chains, each chain sees its own values); the
    other hyperparameters (``mala``, the sampler's keywords, a mask) are shared.
    """

    def init(position, rng_key=None, *, step_size, nbeta, localization, **kwargs):
        state = algo.init(position) if rng_key is None else algo.init(position, rng_key=rng_key, **kwargs)
        return CellChainState(state, position, step_size, nbeta, localization)

    def build_kernel(loss_fn, center=None, *, step_size=None, nbeta=None, localization=None, mala=False, **hyper):
        del center, step_size, nbeta, localization

        def kernel(rng_key, state: CellChainState, batch):
            inner = algo.build_kernel(loss_fn, state.center, step_size=state.step_size, nbeta=state.nbeta,
                                      localization=state.localization, mala=mala, **hyper)
            new, info = inner(rng_key, state.state, batch)
            return state._replace(state=new), info

        return kernel

    def step(rng_key, state, batch, loss_fn, center=None, *, mala=False, **hyper):
        return build_kernel(loss_fn, center, mala=mala, **hyper)(rng_key, state, batch)

    return sgld_lib.SGMCMCAlgorithm(init=init, build_kernel=build_kernel, step=step)


# ----------------------------------------------------------------------------------------------------------------
# compiler options

_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_YNN_DOTS_ONLY = "LIBRARY_FUSION_TYPE_DOT"


def bitwise_compiler_options(devices=None) -> dict | None:
    """XLA options under which a chain's arithmetic does not depend on the size of the chain axis.

    On CPU: YNNPACK fusions for matrix products only (not for reductions, whose summation order it picks by the
    size of the kept axes); None on other platforms or when this XLA has no such option. Pass it to your own
    ``jax.jit(..., compiler_options=...)`` around `estimate_llc_batched` or `estimate_llc` to get the numbers of the
    eager `estimate_llc_batched` bitwise.

    Args:
      devices: the devices the program runs on (default: ``jax.devices()``).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices or any(d.platform != "cpu" for d in devices) or not options_supported(((_YNN_OPTION, _YNN_DOTS_ONLY),)):
        return None
    return {_YNN_OPTION: _YNN_DOTS_ONLY}


# ----------------------------------------------------------------------------------------------------------------
# the program of one group of cells


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _group(keys, params, data, step_size, nbeta, localization, mask, *, loss_fn, algo, sampler_items, n: int,
           num_chains: int, num_burnin: int, total: int, batch_size: int, mala_every: int,
           eval_batch_size: int | None, chain_sharding, batch_sharding, replacement: bool):
    """``C`` cells as one chain axis of ``C * K`` chains.

    Returns:
      ``(init_loss (C,), losses (draws, C * K), mala (draws, C * K))``, chains cell-major.
    """
    num_cells = keys.shape[0]
    init_loss = lax.map(lambda p: full_loss(loss_fn, p, data, eval_batch_size), params)
    keys = jax.vmap(lambda k: chain_keys(k, num_chains))(keys).reshape((num_cells * num_chains,))
    perm_keys, noise_keys = jax.vmap(chain_streams)(keys)

    def repeat(x):
        return jnp.repeat(x, num_chains, axis=0)

    centers = jax.tree.map(repeat, params)
    extra = {"mask": mask} if mask is not None and _accepts(algo.init, "mask") else {}
    if _accepts(algo.init, "rng_key"):
        states = jax.vmap(lambda p, k: algo.init(p, rng_key=init_key(k), **extra))(centers, keys)
    else:
        states = jax.vmap(algo.init)(centers)
    states = CellChainState(states, centers, repeat(step_size), repeat(nbeta), repeat(localization))
    states, perm_keys, noise_keys = constrain((states, perm_keys, noise_keys), chain_sharding)
    run = cached_runner(chunk_runner, loss_fn, per_chain(algo), sampler_items, n, batch_size, mala_every,
                        chain_sharding, batch_sharding, None, 1, False, bool(replacement))
    size = num_cells * num_chains
    carry = (states, jnp.zeros((size,), jnp.result_type(init_loss)), jnp.zeros((size,), jnp.int32))
    ctx = (data, None, perm_keys, noise_keys, None, None, None, mask, None, jnp.asarray(num_burnin, jnp.int32))
    _, (losses, accs, _) = run(carry, np.arange(total, dtype=np.int32), ctx)
    return init_loss, losses[num_burnin:], accs[num_burnin:]


@functools.lru_cache(maxsize=16)
def _compiled_group(static: tuple, options: tuple | None, out_sharding, key_impl: str):
    """The jitted group program for eager calls (keys passed as key data), cached on its static settings."""
    kw = dict(static)

    def program(key_data, params, data, step_size, nbeta, localization, mask):
        keys = jax.random.wrap_key_data(key_data, impl=key_impl)
        return _group(keys, params, data, step_size, nbeta, localization, mask, **kw)

    return jax.jit(program, compiler_options=None if options is None else dict(options),
                   out_shardings=out_sharding)


# ----------------------------------------------------------------------------------------------------------------
# memory


def _tree_bytes(tree) -> int:
    return sum(math.prod(jnp.shape(x)) * jnp.dtype(jnp.result_type(x)).itemsize for x in jax.tree.leaves(tree))


def _device_budget(device) -> float:
    """Bytes a group may use on ``device``: half its free memory, or on CPU a quarter of the machine's memory shared
    by the process's devices."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory statistics
        stats = {}
    if "bytes_limit" in stats:
        return 0.5 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 * 2 ** 30
    return 0.25 * ram / max(1, jax.local_device_count())


def chain_bytes(loss_fn: Callable, params: ArrayTree, data: ArrayTree, *, batch_size: int,
                num_steps: int) -> int:
    """An upper estimate of one chain's memory in a step: the sampler's state, centre, gradient, noise and update
    (8 parameter copies), its minibatch, every intermediate value of ``value_and_grad(loss_fn)`` on it (from its
    jaxpr, without buffer reuse) and its recorded trace.

    Args:
      params: one cell's parameters (arrays or ``jax.ShapeDtypeStruct``).
    """
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch_size,) + jnp.shape(x)[1:], jnp.result_type(x)), data)
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss_fn))(spec, batch)

    def eqn_bytes(eqns) -> int:
        total = 0
        for eqn in eqns:
            for v in eqn.outvars:
                aval = getattr(v, "aval", None)
                if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                    try:
                        total += math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
                    except TypeError:  # extended dtypes (keys)
                        pass
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr, or a Jaxpr
                    if hasattr(inner, "eqns"):
                        total += eqn_bytes(inner.eqns)
        return total

    acts = eqn_bytes(jaxpr.jaxpr.eqns)
    return 8 * _tree_bytes(spec) + _tree_bytes(batch) + acts + 2 * 8 * num_steps


def cells_per_group_for_memory(loss_fn: Callable, params: ArrayTree, data: ArrayTree, *, num_chains: int,
                               batch_size: int, num_steps: int, devices=None, budget: float | None = None) -> int:
    """How many cells of ``num_chains`` chains fit in a group on ``devices`` (at least 1).

    Uses `chain_bytes` per chain against each device's budget (half its free memory; on CPU a quarter of the
    machine's memory shared by the local devices) less the replicated data and one cell's parameters.

    Args:
      params: one cell's parameters.
      devices: the devices the chains are sharded over (default: one device).
      budget: bytes per device instead of the measured budget.
    """
    devices = list(devices) if devices is not None else [jax.devices()[0]]
    per_chain_bytes = chain_bytes(loss_fn, params, data, batch_size=batch_size, num_steps=num_steps)
    room = (budget if budget is not None else _device_budget(devices[0])) - _tree_bytes(data) - _tree_bytes(params)
    chains = int(room // max(per_chain_bytes, 1)) * len(devices)
    return max(1, chains // num_chains)


# ----------------------------------------------------------------------------------------------------------------
# the estimator


def _num_cells(rng_keys, params) -> int:
    shape = jnp.shape(rng_keys)
    typed = jax.dtypes.issubdtype(jnp.result_type(rng_keys), jax.dtypes.prng_key)
    if (typed and len(shape) != 1) or (not typed and (len(shape) != 2 or jnp.result_type(rng_keys) != jnp.uint32)):
        raise ValueError(f"rng_keys must be one key per cell, shape (num_cells,) (e.g. jax.random.split(key, "
                         f"num_cells)); got shape {shape}{'' if typed else ' of raw key data'}.")
    num_cells = shape[0]
    if num_cells < 1:
        raise ValueError("rng_keys is empty; give one key per cell.")
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if jnp.ndim(x) == 0 or jnp.shape(x)[0] != num_cells:
            raise ValueError(f"params leaf {jax.tree_util.keystr(path) or '<root>'} has shape {jnp.shape(x)}; every "
                             f"leaf needs a leading cell axis of {num_cells} (one parameter set per key), e.g. "
                             "jax.tree.map(lambda *xs: jnp.stack(xs), *param_sets).")
    return num_cells


def _per_cell(name: str, value, num_cells: int, dtype, minimum_open: bool) -> jax.Array:
    """A hyperparameter as a ``(num_cells,)`` array (a scalar is shared); checks concrete values."""
    if not is_traced(value):
        a = np.asarray(value, np.float64)
        if a.ndim > 1 or (a.ndim == 1 and a.shape[0] != num_cells):
            raise ValueError(f"{name} must be a scalar or one value per cell, shape ({num_cells},); got shape "
                             f"{a.shape}.")
        ok = np.isfinite(a) & ((a > 0) if minimum_open else (a >= 0))
        if not ok.all():
            bad = np.flatnonzero(~np.broadcast_to(ok, (num_cells,)))
            raise ValueError(f"{name} must be finite and {'> 0' if minimum_open else '>= 0'}; cell {int(bad[0])} has "
                             f"{np.broadcast_to(a, (num_cells,))[bad[0]]!r}.")
    x = jnp.asarray(value, dtype)
    if x.ndim == 0:
        x = jnp.broadcast_to(x, (num_cells,))
    elif x.shape != (num_cells,):
        raise ValueError(f"{name} must be a scalar or one value per cell, shape ({num_cells},); got {x.shape}.")
    return x


def _pad_cells(tree, size: int):
    """Pads the leading (cell) axis of every leaf to ``size`` with copies of the last cell."""
    def leaf(x):
        extra = size - x.shape[0]
        if extra == 0:
            return x
        return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)], axis=0)

    return jax.tree.map(leaf, tree)


def _host_result(init_loss, losses, accs, nbeta, step_size, n, *, num_cells: int, num_chains: int,
                 drop: bool) -> LLCResult:
    """Per-cell summaries on the host (NumPy), as eager `estimate_llc` computes them, stacked over cells."""
    draws = losses.shape[0]
    losses = losses.reshape(draws, num_cells, num_chains)
    accs = accs.reshape(draws, num_cells, num_chains)
    rows = []
    for c in range(num_cells):
        r = summarize(np, losses[:, c, :].T, accs[:, c, :], init_loss[c], nbeta[c], drop=drop)
        trace = np.asarray(r.loss_trace)
        keep = ~np.asarray(r.diverged)
        conv = convergence(trace[keep] if keep.any() else trace)
        mcse = float(r.nbeta) * conv.mcse
        se = float(r.llc_uncertainty)
        unc = np.nanmax([se, mcse]) if np.isfinite(se) or np.isfinite(mcse) else float("nan")
        dtype = trace.dtype
        rows.append(r._replace(ess=np.asarray(conv.ess, dtype), rhat=np.asarray(conv.rhat, dtype),
                               llc_mcse=np.asarray(mcse, dtype), llc_uncertainty=np.asarray(unc, dtype),
                               converged=np.asarray(conv.converged), step_size=np.asarray(step_size[c], dtype),
                               num_data=np.asarray(n, np.int32)))
    fields = {k: np.stack([np.asarray(getattr(r, k)) for r in rows]) for k in LLCResult._fields
              if k not in ("metrics", "recipe")}
    return LLCResult(**fields)


def estimate_llc_batched(rng_keys, loss_fn: Callable, params: ArrayTree, data: ArrayTree, *, num_chains: int,
                         num_draws: int, step_size, batch_size: int, nbeta=None, localization=1.0,
                         num_burnin: int = 0, sampler="sgld", sampler_kwargs: dict | None = None,
                         mala_every: int = 10, mesh=None, chain_axis: str | None = None,
                         data_axis: str | None = None, eval_batch_size: int | None = None, mask=None,
                         replacement: bool = False, cells_per_group: int | None = None,
                         on_divergence: str = "flag", warn: bool = True, progress: bool = False) -> LLCResult:
    """`estimate_llc` for a batch of cells (parameter sets x step size x nbeta x localization) in one program.

    Cell ``c`` is ``estimate_llc(rng_keys[c], loss_fn, params[c], data, step_size=step_size[c], nbeta=nbeta[c],
    localization=localization[c], ...)``: the same chains, keys and minibatches, and on CPU bitwise the same numbers
    (module docstring), computed as one chain axis of ``num_cells * num_chains`` chains (arXiv 2405.10927
    section 2 for the estimator). Runs eagerly (one compiled program per shape, reused by every group and every
    call) or under the caller's ``jax.jit``.

    Args:
      rng_keys: ``(num_cells,)`` PRNG keys, one per cell (or raw ``(num_cells, 2)`` uint32 key data).
      loss_fn: ``loss_fn(params, batch) -> scalar`` MEAN loss over the batch (one cell's params).
      params: the cells' points ``w*``: a pytree whose every leaf has a leading cell axis ``num_cells`` (e.g.
        checkpoints stacked with ``jax.tree.map(lambda *xs: jnp.stack(xs), *checkpoints)``).
      data: pytree of arrays with a common leading axis ``n``, shared by every cell.
      num_chains: chains per cell.
      num_draws: recorded steps per chain (after burn-in).
      step_size: SGLD step size: a scalar (every cell) or ``(num_cells,)``.
      batch_size: minibatch size, ``<= n``.
      nbeta: ``n * beta``: None (``n / log n`` for every cell), a scalar or ``(num_cells,)``.
      localization: ``gamma``: a scalar or ``(num_cells,)``.
      num_burnin: steps run before recording.
      sampler: ``"sgld"``, ``"rmsprop_sgld"``, ``"sgnht"`` or an `SGMCMCAlgorithm`.
      sampler_kwargs: the sampler's other hyperparameters, shared by every cell.
      mala_every: compute the MALA acceptance every ``mala_every`` steps; 0 disables it.
      mesh: optional `jax.sharding.Mesh`; the ``num_cells * num_chains`` chains are sharded over its axis
        ``chain_axis`` (default: its first axis other than ``data_axis``), also across processes (a mesh over the
        devices of every process under ``jax.distributed``: every process then makes the same call, with the same
        inputs, and every process receives the results). Groups are padded to a multiple of that axis.
      chain_axis: the mesh axis of the chains.
      data_axis: optional mesh axis over which each chain's minibatch is split.
      eval_batch_size: block size for ``L_n(w*)``.
      mask: restricted LLC (`parameter_mask` of one cell's params), shared by every cell.
      replacement: draw minibatches with replacement (see `estimate_llc`).
      cells_per_group: cells per compiled group (default: as many as fit in memory,
        `cells_per_group_for_memory`).
      on_divergence: ``"flag"`` (default: a cell with a non-finite loss has a NaN summary and ``diverged`` marks
        its chains) or ``"drop"`` (summaries over its finite chains only).
      warn: warn once about cells that did not converge or diverged (eager only).
      progress: a tqdm bar over the groups (eager only).

    Returns:
      `LLCResult` whose every field has a leading cell axis ``num_cells``: ``llc_mean (C,)``, ``llc_per_chain
      (C, K)``, ``loss_trace (C, K, num_draws)``, ``init_loss (C,)``, ``ess``/``rhat``/``converged`` ``(C,)``
      (NaN/False under ``jax.jit``), ...; ``metrics`` and ``recipe`` are None.

    Raises:
      ValueError: for bad inputs, before anything runs (the checks of `estimate_llc`, keys and params without a
        common cell axis, hyperparameters of the wrong shape or out of range).
    """
    algo = sgld_lib.resolve_sampler(sampler)
    num_chains = check_positive_int("num_chains", num_chains)
    num_draws = check_positive_int("num_draws", num_draws)
    num_burnin = check_positive_int("num_burnin", num_burnin, minimum=0)
    mala_every = check_positive_int("mala_every", mala_every, minimum=0)
    eval_batch_size = check_eval_batch_size(eval_batch_size)
    if on_divergence not in ("flag", "drop"):
        raise ValueError(f"on_divergence must be 'flag' or 'drop' for a batch of cells; got {on_divergence!r}.")
    if isinstance(step_size, str):
        raise ValueError("step_size='auto' is not supported for a batch of cells; give step sizes (or run "
                         "estimate_llc(step_size='auto') per cell).")
    num_cells = _num_cells(rng_keys, params)
    if not jax.dtypes.issubdtype(jnp.result_type(rng_keys), jax.dtypes.prng_key):
        rng_keys = jax.random.wrap_key_data(rng_keys)
    first = jax.tree.map(lambda x: x[0], params)
    first_step = step_size if is_traced(step_size) or np.ndim(step_size) == 0 else np.asarray(step_size)[0]
    n = check_inputs(first, data, step_size=first_step, batch_size=batch_size, loss_fn=loss_fn)
    check_finite_params(params, "lambda^ is measured at a trained, finite w*")
    dtype = jnp.result_type(float)
    steps = _per_cell("step_size", step_size, num_cells, dtype, True)
    nbetas = _per_cell("nbeta", default_nbeta(n) if nbeta is None else nbeta, num_cells, dtype, True)
    gammas = _per_cell("localization", localization, num_cells, dtype, False)
    if mask is not None:
        mask = parameter_mask(first, mask)
    total = num_burnin + num_draws
    traced = (is_traced((rng_keys, params, data, steps, nbetas, gammas))
              or isinstance(jnp.zeros(()), jax.core.Tracer))

    # group size: a multiple of what the chain axis of the mesh needs, at most what fits
    axis_size = 1
    if mesh is not None:
        others = [a for a in mesh.axis_names if a != data_axis]
        axis = chain_axis if chain_axis is not None else (others[0] if others else None)
        axis_size = mesh.shape[axis] if axis in mesh.axis_names else 1
    step = axis_size // math.gcd(axis_size, num_chains)  # cells per group must be a multiple of this
    if cells_per_group is None:
        devices = list(np.asarray(mesh.devices).flat) if mesh is not None else None
        cells_per_group = cells_per_group_for_memory(loss_fn, first, data, num_chains=num_chains,
                                                     batch_size=batch_size, num_steps=total,
                                                     devices=devices[:axis_size] if devices else None)
        cells_per_group = min(cells_per_group, num_cells)
    else:
        cells_per_group = check_positive_int("cells_per_group", cells_per_group)
    group = -(-cells_per_group // step) * step
    # at least 2 chains per device: XLA compiles a chain axis of size 1 differently (other numbers in the last bits)
    while group * num_chains < 2 * axis_size:
        group += step
    num_groups = -(-num_cells // group)
    chain_sharding, batch_sharding = chain_shardings(mesh, chain_axis, data_axis, group * num_chains, batch_size)
    static = dict(loss_fn=loss_fn, algo=algo, sampler_items=tuple(sorted((sampler_kwargs or {}).items())), n=n,
                  num_chains=num_chains, num_burnin=num_burnin, total=total, batch_size=batch_size,
                  mala_every=mala_every, eval_batch_size=eval_batch_size, chain_sharding=chain_sharding,
                  batch_sharding=batch_sharding, replacement=bool(replacement))
    padded = num_groups * group
    cells = _pad_cells((rng_keys, params, steps, nbetas, gammas), padded)

    if traced:
        def one(args):
            return _group(*args[:2], data, *args[2:], mask, **static)

        if num_groups == 1:
            init_loss, losses, accs = one(cells)
        else:
            split = jax.tree.map(lambda x: x.reshape((num_groups, group) + x.shape[1:]), cells)
            init_loss, losses, accs = lax.map(one, split)
            init_loss = init_loss.reshape(padded)
            losses = jnp.moveaxis(losses, 0, 1).reshape(num_draws, padded * num_chains)
            accs = jnp.moveaxis(accs, 0, 1).reshape(num_draws, padded * num_chains)
        losses = losses[:, : num_cells * num_chains].reshape(num_draws, num_cells, num_chains)
        accs = accs[:, : num_cells * num_chains].reshape(num_draws, num_cells, num_chains)

        def cell_summary(trace, acc, init, nb):
            return summarize(jnp, trace.T, acc, init, nb, drop=on_divergence == "drop")._replace(
                step_size=jnp.zeros((), trace.dtype), num_data=jnp.asarray(n, jnp.int32), metrics=None)

        out = jax.vmap(cell_summary, (1, 1, 0, 0))(losses, accs, init_loss[:num_cells], nbetas)
        return out._replace(step_size=steps.astype(out.loss_trace.dtype))

    devices = list(np.asarray(mesh.devices).flat) if mesh is not None else None
    options = bitwise_compiler_options(devices)
    multi = distributed.spans_processes(mesh)
    out_sharding = NamedSharding(mesh, P()) if mesh is not None else None
    program = _compiled_group(tuple(sorted(static.items(), key=lambda kv: kv[0])),
                              None if options is None else tuple(sorted(options.items())), out_sharding,
                              str(jax.random.key_impl(rng_keys)))
    key_data = jax.random.key_data(cells[0])
    rest = cells[1:]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_groups, desc="cells", unit="group")
    parts = []
    try:
        for g in range(num_groups):
            sl = slice(g * group, (g + 1) * group)
            args = jax.tree.map(lambda x: x[sl], (key_data, rest[0]))
            hyper = [x[sl] for x in rest[1:]]
            inputs = (args[0], args[1], data, *hyper, mask)
            if multi:
                inputs = distributed.replicate(inputs, mesh)
            parts.append(distributed.to_host(program(*inputs)))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    init_loss = np.concatenate([p[0] for p in parts])[:num_cells]
    losses = np.concatenate([p[1] for p in parts], axis=1)[:, : num_cells * num_chains]
    accs = np.concatenate([p[2] for p in parts], axis=1)[:, : num_cells * num_chains]
    result = _host_result(init_loss, losses, accs, np.asarray(nbetas), np.asarray(steps), n, num_cells=num_cells,
                          num_chains=num_chains, drop=on_divergence == "drop")
    if warn:
        _warn_cells(result)
    return jax.tree.map(jnp.asarray, result)


def _warn_cells(result: LLCResult) -> None:
    diverged = np.flatnonzero(np.asarray(result.diverged).any(axis=1))
    if diverged.size:
        warnings.warn(f"{diverged.size} of {len(result.llc_mean)} cells have diverged chains (cells "
                      f"{diverged[:20].tolist()}); their summaries are NaN or over the finite chains.", RuntimeWarning,
                      stacklevel=3)
    unconverged = np.flatnonzero(~np.asarray(result.converged) & ~np.asarray(result.diverged).any(axis=1))
    if unconverged.size:
        warnings.warn(f"{unconverged.size} of {len(result.llc_mean)} cells did not converge (R-hat > 1.05 or ESS < "
                      f"100; cells {unconverged[:20].tolist()}): run more draws or burn-in, or a larger step.",
                      RuntimeWarning, stacklevel=3)

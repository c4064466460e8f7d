"""`SGLDKernel`: the LLC samplers as a numpyro ``MCMCKernel`` (arXiv 2405.10927 section 2).

It runs the same transition, minibatch order and keys as `degenjax.estimate_llc`, so with ``num_warmup`` equal to
``num_burnin`` the collected ``"loss"`` samples equal ``LLCResult.loss_trace`` and give the same lambda^.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from numpyro.infer.mcmc import MCMCKernel
from numpyro.util import is_prng_key

from degenjax._src import sgld as sgld_lib
from degenjax._src.checks import check_inputs, check_positive_int, check_step_size, default_nbeta, num_data
from degenjax._src.minibatch import batch_indices, chain_streams, gather_batch, init_key
from degenjax._src.types import ArrayTree



class SGLDKernelState(NamedTuple):
    """State of one chain of `SGLDKernel`.

    Attributes:
      step: int32 scalar, number of transitions taken.
      sampler_state: the sampler's state (e.g. `SGLDState`), holding the position.
      loss: scalar minibatch loss ``L_B(w_t)`` at the position before the last transition (the sample field).
      mala_acceptance: scalar MALA acceptance probability of the last transition (NaN unless ``mala=True``).
      center: the localization centre ``w*`` (the chain's ``init_params``).
      rng_key: the chain's key; every transition derives its keys from it and ``step`` (see `degenjax.estimate_llc`).
      batch_idx: int32 ``(batch_size,)``, the data indices of the next transition's minibatch (computed one
        transition ahead, as `degenjax.estimate_llc` does, so the shuffle is not fused into the gather).
    """

    step: jax.Array
    sampler_state: Any
    loss: jax.Array
    mala_acceptance: jax.Array
    center: ArrayTree
    rng_key: jax.Array
    batch_idx: jax.Array


class SGLDKernel(MCMCKernel):
    """SGLD (or RMSprop-SGLD, SGNHT) on the localized tempered posterior as a numpyro ``MCMCKernel``.

    The data is the first model argument and ``init_params`` is ``w*`` (the start and the localization centre)::

        kernel = SGLDKernel(loss_fn, step_size=1e-4, batch_size=100)
        mcmc = numpyro.infer.MCMC(kernel, num_warmup=0, num_samples=1000, num_chains=4,
                                  chain_method="vectorized")
        mcmc.run(key, data, init_params=params_per_chain)   # leaves with a leading axis num_chains when > 1 chain
        losses = mcmc.get_samples(group_by_chain=True)      # (chains, draws) minibatch losses
        llc = nbeta * (losses.mean(1) - loss_fn(params, data))

    Only the scalar loss is collected (``sample_field = "loss"``); add ``extra_fields=("sampler_state",)`` to
    ``mcmc.run`` to also keep positions.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss.
      step_size: ``eps > 0``.
      batch_size: minibatch size, ``<= n``.
      nbeta: ``n * beta``; default ``n / log n``.
      localization: ``gamma``.
      sampler: ``"sgld"``, ``"rmsprop_sgld"``, ``"sgnht"`` or an `SGMCMCAlgorithm`.
      sampler_kwargs: extra hyperparameters for the sampler.
      mala: compute the MALA acceptance of every transition (one extra gradient evaluation each).
      data: the data, used when ``mcmc.run`` gets no positional model argument.
    """

    def __init__(self, loss_fn: Callable, *, step_size, batch_size: int, nbeta=None, localization=1.0,
                 sampler="sgld", sampler_kwargs: dict | None = None, mala: bool = False, data: ArrayTree = None):
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(params, batch); got {type(loss_fn).__name__}.")
        check_step_size(step_size)
        self._loss_fn = loss_fn
        self._step_size = step_size
        self._batch_size = check_positive_int("batch_size", batch_size)
        self._nbeta = nbeta
        self._localization = localization
        self._algo = sgld_lib.resolve_sampler(sampler)
        self._sampler_kwargs = dict(sampler_kwargs or {})
        self._mala = bool(mala)
        self._data = data
        self._sample_fn = None

    @property
    def sample_field(self):
        return "loss"

    def _get_data(self, model_args):
        data = model_args[0] if model_args else self._data
        if data is None:
            raise ValueError("SGLDKernel needs data: pass it to mcmc.run(key, data, init_params=...) or to "
                             "SGLDKernel(..., data=data).")
        return data

    def _hyper(self, data):
        n = num_data(data)
        nbeta = default_nbeta(n) if self._nbeta is None else self._nbeta
        return n, nbeta

    def _init_one(self, rng_key, init_params, data) -> SGLDKernelState:
        probe = jax.tree.map(lambda x: x[: self._batch_size], data)
        loss_aval = jax.eval_shape(self._loss_fn, init_params, probe)
        nan = jnp.full((), jnp.nan, loss_aval.dtype)
        perm_key, _ = chain_streams(rng_key)
        idx = batch_indices(perm_key, 0, num_data(data), self._batch_size)
        if "rng_key" in inspect.signature(self._algo.init).parameters:
            sampler_state = self._algo.init(init_params, rng_key=init_key(rng_key))
        else:
            sampler_state = self._algo.init(init_params)
        return SGLDKernelState(step=jnp.zeros((), jnp.int32), sampler_state=sampler_state,
                               loss=nan, mala_acceptance=nan, center=init_params, rng_key=rng_key, batch_idx=idx)

    def _sample_one(self, state: SGLDKernelState, data) -> SGLDKernelState:
        n, nbeta = self._hyper(data)
        perm_key, noise_key = chain_streams(state.rng_key)
        t = state.step
        batch = gather_batch(data, state.batch_idx)
        kernel = self._algo.build_kernel(self._loss_fn, state.center, step_size=self._step_size, nbeta=nbeta,
                                         localization=self._localization, mala=self._mala, **self._sampler_kwargs)
        sampler_state, info = kernel(jax.random.fold_in(noise_key, t), state.sampler_state, batch)
        return SGLDKernelState(step=t + 1, sampler_state=sampler_state, loss=info.loss,
                               mala_acceptance=info.mala_acceptance, center=state.center, rng_key=state.rng_key,
                               batch_idx=batch_indices(perm_key, t + 1, n, self._batch_size))

    def init(self, rng_key, num_warmup, init_params, model_args, model_kwargs):
        """Initial state (one chain, or a batch of chains when ``rng_key`` is a batch of keys, as numpyro's
        ``chain_method="vectorized"`` passes it; then ``init_params`` leaves have a leading chain axis)."""
        del num_warmup, model_kwargs
        if init_params is None:
            raise ValueError("SGLDKernel needs init_params (the trained parameters w*): "
                             "mcmc.run(key, data, init_params=params).")
        data = self._get_data(model_args)
        single = is_prng_key(rng_key)
        if single:
            check_inputs(init_params, data, step_size=self._step_size, batch_size=self._batch_size)
            self._sample_fn = self._sample_one
            return self._init_one(rng_key, init_params, data)
        check_inputs(jax.tree.map(lambda x: x[0], init_params), data, step_size=self._step_size,
                             batch_size=self._batch_size)
        self._sample_fn = jax.vmap(self._sample_one, in_axes=(0, None))
        return jax.vmap(self._init_one, in_axes=(0, 0, None))(rng_key, init_params, data)

    def sample(self, state, model_args, model_kwargs):
        """One transition of every chain in ``state``."""
        del model_kwargs
        if self._sample_fn is None:
            raise ValueError("SGLDKernel.sample called before init; run it through numpyro.infer.MCMC or call "
                             "init first.")
        return self._sample_fn(state, self._get_data(model_args))

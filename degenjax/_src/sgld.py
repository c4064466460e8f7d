"""Stochastic-gradient MCMC kernels for the localized tempered posterior (docs/maths.md#sgld-update).

Every sampler targets ``p(w) ~ exp(-U(w))`` with the minibatch potential

    U_B(w) = nbeta * L_B(w) + (gamma / 2) * ||w - w*||^2,

where ``L_B`` is the mean loss of the minibatch ``B``, ``nbeta = n * beta`` and ``gamma`` the localization strength
around the centre ``w*``. Each sampler is an `SGMCMCAlgorithm`: a NamedTuple of pure functions

    state = algo.init(position)
    kernel = algo.build_kernel(loss_fn, center, step_size=..., nbeta=..., localization=..., mala=False)
    new_state, info = kernel(rng_key, state, batch)
    new_state, info = algo.step(rng_key, state, batch, loss_fn, center, step_size=..., nbeta=...)

States are NamedTuples of arrays (positions are arbitrary pytrees), hyperparameters live in the kernel's closure,
and nothing is jitted here: kernels run under the caller's ``jax.jit``, ``jax.vmap`` (chains) and ``lax.scan``.

Noise convention (so that an update can be reproduced by hand): the leaves of the position, in ``jax.tree.leaves``
order, are drawn together as one ``jax.random.normal(key, (total_size,), dtype)`` vector, cut in that order and
reshaped. With leaves of several dtypes, the key is first split into one key per dtype (dtypes in order of first
appearance) and each dtype's leaves are drawn together in the same way. A large model's leaves are drawn in groups
instead, to bound the memory of the random-number generation: when a dtype's leaves hold more than
``NOISE_GROUP_SIZE`` (2^20) numbers, they are packed in order into groups of consecutive leaves of at most
``max(2^20, largest leaf)`` numbers each, that dtype's key is split into one key per group, and each group is one
``jax.random.normal`` vector cut in the same way.

``info.loss`` is the minibatch loss ``L_B(w_t)`` at the position *before* the step (the value that the gradient of the
step was computed from, as devinterp records it). With ``mala=True`` (or a true boolean array) the kernel also
returns the Metropolis-adjusted (MALA) acceptance probability of its proposal, computed from the minibatch
potential ``U_B`` of the step at both ends (one extra gradient evaluation; one minibatch, so the acceptance measures
the discretisation error of the step, not minibatch noise). For a proposal
``w' = w - (eps/2) P grad U_B(w) + sqrt(eps P) xi`` with diagonal preconditioner ``P`` (``P = 1`` for SGLD),

    log q(w' | w) = -sum (w' - w + (eps/2) P grad U_B(w))^2 / (2 eps P)
    a = min(1, exp(U_B(w) - U_B(w') + log q(w | w') - log q(w' | w))),

with ``P`` held fixed at its value for the step in both directions. SGNHT has no such proposal; it reports NaN.
"""

from __future__ import annotations

import math

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from degenjax._src.types import ArrayTree

LossFn = Callable[[ArrayTree, ArrayTree], jax.Array]


class SGMCMCAlgorithm(NamedTuple):
    """A stochastic-gradient sampler as pure functions (blackjax style).

    Attributes:
      init: ``init(position, rng_key=None) -> state`` (the key draws a random initial state, e.g. SGNHT's momentum;
        the built-in SGLD variants ignore it).
      build_kernel: ``build_kernel(loss_fn, center, *, step_size, nbeta, localization=1.0, mala=False, **hyper)``
        returning ``kernel(rng_key, state, batch) -> (state, info)``.
      step: ``step(rng_key, state, batch, loss_fn, center, *, step_size, nbeta, ...)``, one transition (builds the
        kernel and applies it).
    """

    init: Callable
    build_kernel: Callable
    step: Callable


class SGLDState(NamedTuple):
    """SGLD state: the current position (a pytree like the model parameters)."""

    position: ArrayTree


class RMSPropSGLDState(NamedTuple):
    """RMSprop-preconditioned SGLD state.

    Attributes:
      position: the current parameters.
      square_avg: exponential moving average of the squared drift gradient, same structure as ``position``.
      count: number of steps taken, int32 scalar (for the bias correction of ``square_avg``).
    """

    position: ArrayTree
    square_avg: ArrayTree
    count: jax.Array


class SGNHTState(NamedTuple):
    """SGNHT state.

    Attributes:
      position: the current parameters.
      momentum: the momentum, same structure as ``position``.
      thermostat: the Nose-Hoover thermostat variable xi, a scalar.
    """

    position: ArrayTree
    momentum: ArrayTree
    thermostat: jax.Array


class SGMCMCInfo(NamedTuple):
    """Per-step information.

    Attributes:
      loss: scalar minibatch mean loss ``L_B(w_t)`` at the position before the step.
      mala_acceptance: scalar MALA acceptance probability of the step's proposal (NaN unless ``mala=True``).
    """

    loss: jax.Array
    mala_acceptance: jax.Array


# ----------------------------------------------------------------------------------------------------------------
# Helpers


NOISE_GROUP_SIZE = 2 ** 20


def _noise_groups(sizes: list[int]) -> list[list[int]]:
    """Positions in ``sizes`` packed in order into groups of at most ``max(NOISE_GROUP_SIZE, max(sizes))`` numbers
    (one group when they all fit in ``NOISE_GROUP_SIZE``)."""
    cap = max(NOISE_GROUP_SIZE, max(sizes))
    groups, total = [[]], 0
    for i, size in enumerate(sizes):
        if groups[-1] and total + size > cap:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def normal_like(rng_key, tree: ArrayTree) -> ArrayTree:
    """Standard normal noise shaped like ``tree`` (see the noise convention above).

    One ``jax.random.normal`` call per dtype (per group of leaves for a large model) rather than per leaf: the same
    distribution, and few random-bits programs to compile per step (per-leaf calls made the sampler's compilation
    several times slower). Groups bound the generator's temporaries to about the largest leaf: one draw for all of a
    10M-parameter MLP held 2 more parameter copies per chain, on CPU.
    """
    leaves, treedef = jax.tree.flatten(tree)
    dtypes = list(dict.fromkeys(jnp.result_type(x) for x in leaves))  # first appearance in leaf order
    keys = [rng_key] if len(dtypes) == 1 else list(jax.random.split(rng_key, len(dtypes)))
    noise = [None] * len(leaves)
    for key, dt in zip(keys, dtypes):
        idx = [i for i, x in enumerate(leaves) if jnp.result_type(x) == dt]
        sizes = [math.prod(jnp.shape(leaves[i])) for i in idx]
        groups = _noise_groups(sizes)
        group_keys = [key] if len(groups) == 1 else list(jax.random.split(key, len(groups)))
        for group_key, group in zip(group_keys, groups):
            flat = jax.random.normal(group_key, (sum(sizes[j] for j in group),), dt)
            start = 0
            for j in group:
                noise[idx[j]] = jnp.reshape(flat[start:start + sizes[j]], jnp.shape(leaves[idx[j]]))
                start += sizes[j]
    return jax.tree.unflatten(treedef, noise)


def _scalar(value, like) -> jax.Array:
    """``value`` as a scalar of ``like``'s dtype (explicit cast: strict dtype promotion)."""
    return jnp.asarray(value, dtype=jnp.result_type(like))


def _tree_sum(tree: ArrayTree) -> jax.Array:
    leaves = [jnp.sum(x) for x in jax.tree.leaves(tree)]
    out = leaves[0]
    for x in leaves[1:]:
        out = out + x.astype(out.dtype)
    return out


def _tree_size(tree: ArrayTree) -> int:
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(tree))


def _potential_value_and_grad(loss_fn: LossFn, center: ArrayTree, nbeta, localization, weight_decay=0.0,
                              mask=None):
    """``(L_B(w), grad U_B(w))`` with ``grad U_B = nbeta grad L_B + gamma (w - w*) + weight_decay w``, times the
    ``mask`` (0 for frozen entries) when one is given.

    The localization term is added leaf by leaf rather than differentiated through ``||w - w*||^2``, and ``U_B``
    itself is not formed (only MALA needs it: `_potential`), so a step skips that reduction over all parameters.
    """
    loss_and_grad = jax.value_and_grad(loss_fn)
    masks = _leaf_masks(mask, center)

    def value_and_grad(position, batch):
        loss, grad_loss = loss_and_grad(position, batch)

        def leaf(g, w, c, m):
            out = _scalar(nbeta, g) * g + _scalar(localization, w) * (w - c.astype(w.dtype))
            if not _is_zero(weight_decay):
                out = out + _scalar(weight_decay, w) * w
            return out if m is None else out * m.astype(out.dtype)

        grad = jax.tree.map(leaf, grad_loss, position, center, masks, is_leaf=lambda x: x is None)
        return loss, grad

    return value_and_grad


def _is_zero(value) -> bool:
    """True only for a concrete Python/NumPy zero (a traced value is never treated as zero)."""
    return isinstance(value, (int, float, np.number)) and float(value) == 0.0


def _leaf_masks(mask, like: ArrayTree):
    """``mask`` as a tree like ``like`` with a float 0/1 array (or None = all free) per leaf."""
    treedef = jax.tree.structure(like)
    if mask is None:
        return jax.tree.unflatten(treedef, [None] * treedef.num_leaves)
    return jax.tree.map(lambda m, x: jnp.broadcast_to(jnp.asarray(m), jnp.shape(x)).astype(jnp.result_type(x)),
                        mask, like)


def _potential(loss, position: ArrayTree, center: ArrayTree, nbeta, localization, weight_decay=0.0) -> jax.Array:
    """``U_B(w) = nbeta L_B(w) + (gamma / 2) ||w - w*||^2 (+ (weight_decay / 2) ||w||^2)`` from ``L_B(w)``."""
    sq = _tree_sum(jax.tree.map(lambda w, c: jnp.square(w - c.astype(w.dtype)), position, center))
    u = _scalar(nbeta, loss) * loss + _scalar(0.5 * localization, loss) * sq.astype(jnp.result_type(loss))
    if not _is_zero(weight_decay):
        wsq = _tree_sum(jax.tree.map(jnp.square, position)).astype(jnp.result_type(loss))
        u = u + _scalar(0.5 * weight_decay, loss) * wsq
    return u


def _masked_noise(rng_key, w, masks, noise_level):
    """``noise_level * mask * N(0, I)`` shaped like ``w`` (the noise convention of the module docstring)."""
    noise = normal_like(rng_key, w)

    def leaf(z, m):
        if not (isinstance(noise_level, (int, float)) and noise_level == 1.0):
            z = _scalar(noise_level, z) * z
        return z if m is None else z * m.astype(z.dtype)

    return jax.tree.map(leaf, noise, masks, is_leaf=lambda x: x is None)


def _clip(new, center, bounding_box_size):
    """Positions clipped to ``[w* - b, w* + b]`` (devinterp's bounding box); unchanged for ``b = None``."""
    if bounding_box_size is None:
        return new
    return jax.tree.map(lambda x, c: jnp.clip(x, c.astype(x.dtype) - _scalar(bounding_box_size, x),
                                              c.astype(x.dtype) + _scalar(bounding_box_size, x)), new, center)


def _mala_acceptance(u_old, u_new, grad_new, old, new, step_size, noise_sq, precond=None) -> jax.Array:
    """MALA acceptance probability of the move ``old -> new`` (module docstring; ``precond`` diagonal or None).

    The forward term needs no gradient: the proposal makes ``new - old + (eps/2) P grad U_B(old) = sqrt(eps P) xi``,
    so ``log q(new | old) = -||xi||^2 / 2`` with ``noise_sq = ||xi||^2`` (the old gradient need not stay alive).
    """
    if precond is None:
        precond = jax.tree.map(jnp.ones_like, old)

    def leaf(t, f, g, p):
        eps = _scalar(step_size, t)
        return jnp.sum(jnp.square(t - f + 0.5 * eps * p * g) / (2.0 * eps * p))

    log_q_backward = -_tree_sum(jax.tree.map(leaf, old, new, grad_new, precond))
    log_q_forward = -0.5 * noise_sq
    log_ratio = (u_old - u_new) + (log_q_backward - log_q_forward).astype(u_old.dtype)
    return jnp.exp(jnp.minimum(log_ratio, jnp.zeros_like(log_ratio)))


def _noise_sq(mala, noise) -> jax.Array | None:
    """``||xi||^2`` for MALA's forward term, reduced right after the draw so the noise can be freed (None when MALA
    is off for good)."""
    if isinstance(mala, (bool, np.bool_)) and not mala:
        return None
    return _tree_sum(jax.tree.map(jnp.square, noise))


def _nan_like(x) -> jax.Array:
    return jnp.full((), jnp.nan, jnp.result_type(x))


def _maybe(flag, fn, like) -> jax.Array:
    """``fn()`` if ``flag`` else NaN. A Python bool decides at trace time; a boolean array becomes a ``lax.cond``
    (a real branch under ``vmap`` over chains as long as ``flag`` itself is not batched)."""
    if isinstance(flag, (bool, np.bool_)):
        return fn() if flag else _nan_like(like)
    return lax.cond(flag, fn, lambda: _nan_like(like))


# ----------------------------------------------------------------------------------------------------------------
# SGLD

_COMMON_ARGS = """      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss of a minibatch.
      center: the localization centre ``w*``, same structure as the position.
      step_size: ``eps > 0`` (may be a traced scalar).
      nbeta: ``n * beta``, the inverse temperature times the data set size.
      localization: ``gamma >= 0``.
      mala: also compute the MALA acceptance probability (one extra gradient evaluation): a Python bool, or a
        boolean scalar array (possibly traced, e.g. "every k-th step") that selects it with ``lax.cond``.
      noise_level: factor on the injected Gaussian noise (devinterp's ``noise_level``; 1 samples the posterior,
        anything else changes the temperature and is for experiments only).
      weight_decay: ``wd >= 0``: adds ``(wd / 2) ||w||^2`` to the potential (devinterp's ``weight_decay``).
      bounding_box_size: optional ``b > 0``: every position is clipped to ``[w* - b, w* + b]`` after the step
        (devinterp's bounding box; the MALA acceptance ignores the clip).
      mask: optional tree like the position of 0/1 (or boolean) arrays broadcastable to each leaf; entries with 0
        get no gradient and no noise, so they stay at their initial value (``w*``): the restricted LLC."""


def _sgld_init(position: ArrayTree, rng_key=None) -> SGLDState:
    del rng_key
    return SGLDState(position=position)


def _sgld_build_kernel(loss_fn: LossFn, center: ArrayTree, *, step_size, nbeta, localization=1.0, mala=False,
                       noise_level=1.0, weight_decay=0.0, bounding_box_size=None, mask=None):
    """SGLD: ``w <- w - (eps/2)(nbeta grad L_B(w) + gamma (w - w*)) + sqrt(eps) N(0, I)`` (arXiv 2405.10927
    section 2; the update devinterp's SGLD makes).

    Args:
{common}

    Returns:
      ``kernel(rng_key, state, batch) -> (SGLDState, SGMCMCInfo)``.
    """
    value_and_grad = _potential_value_and_grad(loss_fn, center, nbeta, localization, weight_decay, mask)
    masks = _leaf_masks(mask, center)

    def kernel(rng_key, state: SGLDState, batch) -> tuple[SGLDState, SGMCMCInfo]:
        w = state.position
        loss, grad = value_and_grad(w, batch)
        noise = _masked_noise(rng_key, w, masks, noise_level)

        def update(x, g, z):
            eps = _scalar(step_size, x)
            return x - 0.5 * eps * g + jnp.sqrt(eps) * z

        new = jax.tree.map(update, w, grad, noise)
        noise_sq = _noise_sq(mala, noise)

        def acceptance():
            loss_new, grad_new = value_and_grad(new, batch)
            u, u_new = (_potential(v, x, center, nbeta, localization, weight_decay)
                        for v, x in ((loss, w), (loss_new, new)))
            return _mala_acceptance(u, u_new, grad_new, w, new, step_size, noise_sq,
                                    precond=_noise_precond(w, noise_level))

        acc = _maybe(mala, acceptance, loss)
        return SGLDState(position=_clip(new, center, bounding_box_size)), SGMCMCInfo(loss=loss, mala_acceptance=acc)

    return kernel


_sgld_build_kernel.__doc__ = _sgld_build_kernel.__doc__.format(common=_COMMON_ARGS)


def _noise_precond(w, noise_level):
    """MALA's proposal variance factor for a scaled noise (``noise_level^2``; None for the standard 1)."""
    if isinstance(noise_level, (int, float)) and noise_level == 1.0:
        return None
    return jax.tree.map(lambda x: jnp.full(jnp.shape(x), jnp.square(_scalar(noise_level, x))), w)


def _sgld_step(rng_key, state, batch, loss_fn, center, *, step_size, nbeta, localization=1.0, mala=False,
               **hyper):
    kernel = _sgld_build_kernel(loss_fn, center, step_size=step_size, nbeta=nbeta, localization=localization,
                                mala=mala, **hyper)
    return kernel(rng_key, state, batch)


sgld = SGMCMCAlgorithm(init=_sgld_init, build_kernel=_sgld_build_kernel, step=_sgld_step)


# ----------------------------------------------------------------------------------------------------------------
# RMSprop-preconditioned SGLD (pSGLD, Li et al. 2016)


def _rmsprop_init(position: ArrayTree, rng_key=None) -> RMSPropSGLDState:
    del rng_key
    return RMSPropSGLDState(position=position, square_avg=jax.tree.map(jnp.zeros_like, position),
                            count=jnp.zeros((), jnp.int32))


def _rmsprop_build_kernel(loss_fn: LossFn, center: ArrayTree, *, step_size, nbeta, localization=1.0, mala=False,
                          alpha=0.99, eps=1e-8, noise_level=1.0, weight_decay=0.0, bounding_box_size=None,
                          mask=None):
    """RMSprop-preconditioned SGLD.

    With ``g = grad U_B(w)`` (the full drift gradient ``nbeta grad L_B + gamma (w - w*)``) and ``k`` the new count:

        V <- alpha V + (1 - alpha) g^2,   V^ = V / (1 - alpha^k),   P = 1 / (eps + sqrt(V^)),
        w <- w - (step_size/2) P g + sqrt(step_size P) N(0, I),

    elementwise (the usual pSGLD approximation that drops the derivative of ``P``).

    Args:
{common}
      alpha: decay of the squared-gradient average.
      eps: damping added to ``sqrt(V^)``.

    Returns:
      ``kernel(rng_key, state, batch) -> (RMSPropSGLDState, SGMCMCInfo)``.
    """
    value_and_grad = _potential_value_and_grad(loss_fn, center, nbeta, localization, weight_decay, mask)
    masks = _leaf_masks(mask, center)

    def kernel(rng_key, state: RMSPropSGLDState, batch):
        w = state.position
        loss, grad = value_and_grad(w, batch)
        count = state.count + 1
        square_avg = jax.tree.map(lambda v, g: _scalar(alpha, v) * v + _scalar(1.0 - alpha, v) * jnp.square(g),
                                  state.square_avg, grad)

        def precond(v):
            correction = 1.0 - jnp.power(_scalar(alpha, v), count.astype(jnp.result_type(v)))
            return 1.0 / (_scalar(eps, v) + jnp.sqrt(v / correction))

        p = jax.tree.map(precond, square_avg)
        noise = _masked_noise(rng_key, w, masks, noise_level)

        def update(x, g, pi, z):
            h = _scalar(step_size, x)
            return x - 0.5 * h * pi * g + jnp.sqrt(h * pi) * z

        new = jax.tree.map(update, w, grad, p, noise)
        noise_sq = _noise_sq(mala, noise)

        def acceptance():
            loss_new, grad_new = value_and_grad(new, batch)
            u, u_new = (_potential(v, x, center, nbeta, localization, weight_decay)
                        for v, x in ((loss, w), (loss_new, new)))
            scale = _noise_precond(w, noise_level)
            pre = p if scale is None else jax.tree.map(jnp.multiply, p, scale)
            return _mala_acceptance(u, u_new, grad_new, w, new, step_size, noise_sq, precond=pre)

        acc = _maybe(mala, acceptance, loss)
        new = _clip(new, center, bounding_box_size)
        return RMSPropSGLDState(new, square_avg, count), SGMCMCInfo(loss=loss, mala_acceptance=acc)

    return kernel


_rmsprop_build_kernel.__doc__ = _rmsprop_build_kernel.__doc__.format(common=_COMMON_ARGS)


def _rmsprop_step(rng_key, state, batch, loss_fn, center, *, step_size, nbeta, localization=1.0, mala=False,
                  **hyper):
    kernel = _rmsprop_build_kernel(loss_fn, center, step_size=step_size, nbeta=nbeta, localization=localization,
                                   mala=mala, **hyper)
    return kernel(rng_key, state, batch)


rmsprop_sgld = SGMCMCAlgorithm(init=_rmsprop_init, build_kernel=_rmsprop_build_kernel, step=_rmsprop_step)


# ----------------------------------------------------------------------------------------------------------------
# SGNHT (Ding et al. 2014)


def _sgnht_init(position: ArrayTree, rng_key=None, thermostat=0.01, mask=None) -> SGNHTState:
    """The thermostat at ``thermostat`` (conventionally the diffusion factor A) and the momentum: zero without a key,
    else standard normal (the thermostat's target ``||p||^2 / d = 1``), drawn with ``rng_key`` by the noise
    convention; entries with ``mask`` 0 get zero momentum. `degenjax.estimate_llc` passes each chain its
    ``init_key``, as devinterp starts every chain from a random momentum."""
    leaves = jax.tree.leaves(position)
    if rng_key is None:
        momentum = jax.tree.map(jnp.zeros_like, position)
    else:
        momentum = _masked_noise(rng_key, position, _leaf_masks(mask, position), 1.0)
    return SGNHTState(position=position, momentum=momentum,
                      thermostat=jnp.asarray(thermostat, jnp.result_type(leaves[0])))


def _sgnht_build_kernel(loss_fn: LossFn, center: ArrayTree, *, step_size, nbeta, localization=1.0, mala=False,
                        diffusion_factor=0.01, noise_level=1.0, weight_decay=0.0, bounding_box_size=None,
                        mask=None):
    """Stochastic-gradient Nose-Hoover thermostat.

    With ``h = step_size``, ``A = diffusion_factor``, ``d`` the number of (unmasked) parameters and
    ``g = grad U_B(w)``:

        p  <- p - h g - h xi p + sqrt(2 A h) N(0, I)
        w  <- w + h p
        xi <- xi + h (||p||^2 / d - 1)

    (momentum first, then position and thermostat with the new momentum). Note ``h`` plays the role of an HMC step,
    so comparable step sizes are about ``sqrt`` of SGLD's. ``mala`` is accepted for a uniform interface; the
    acceptance is NaN.

    Args:
{common}
      diffusion_factor: ``A``.

    Returns:
      ``kernel(rng_key, state, batch) -> (SGNHTState, SGMCMCInfo)``.
    """
    value_and_grad = _potential_value_and_grad(loss_fn, center, nbeta, localization, weight_decay, mask)
    masks = _leaf_masks(mask, center)
    del mala

    def kernel(rng_key, state: SGNHTState, batch):
        w = state.position
        loss, grad = value_and_grad(w, batch)
        noise = _masked_noise(rng_key, w, masks, noise_level)
        xi = state.thermostat

        def momentum(p, g, z):
            h = _scalar(step_size, p)
            a = _scalar(diffusion_factor, p)
            return p - h * g - h * xi.astype(p.dtype) * p + jnp.sqrt(2.0 * a * h) * z

        mom = jax.tree.map(momentum, state.momentum, grad, noise)
        new = jax.tree.map(lambda x, p: x + _scalar(step_size, x) * p, w, mom)
        kinetic = _tree_sum(jax.tree.map(jnp.square, mom)).astype(xi.dtype)
        if mask is None:
            size = _tree_size(w)
        else:
            size = _tree_sum(jax.tree.map(lambda m: jnp.sum(m != 0), masks)).astype(xi.dtype)
        xi_new = xi + _scalar(step_size, xi) * (kinetic / size - 1.0)
        new = _clip(new, center, bounding_box_size)
        return SGNHTState(new, mom, xi_new), SGMCMCInfo(loss=loss, mala_acceptance=_nan_like(loss))

    return kernel


_sgnht_build_kernel.__doc__ = _sgnht_build_kernel.__doc__.format(common=_COMMON_ARGS)


def _sgnht_step(rng_key, state, batch, loss_fn, center, *, step_size, nbeta, localization=1.0, mala=False,
                **hyper):
    kernel = _sgnht_build_kernel(loss_fn, center, step_size=step_size, nbeta=nbeta, localization=localization,
                                 mala=mala, **hyper)
    return kernel(rng_key, state, batch)


sgnht = SGMCMCAlgorithm(init=_sgnht_init, build_kernel=_sgnht_build_kernel, step=_sgnht_step)

SAMPLERS = {"sgld": sgld, "rmsprop_sgld": rmsprop_sgld, "sgnht": sgnht}


def resolve_sampler(sampler) -> SGMCMCAlgorithm:
    """Looks up a sampler by name (``"sgld"``, ``"rmsprop_sgld"``, ``"sgnht"``) or returns an `SGMCMCAlgorithm`."""
    if isinstance(sampler, SGMCMCAlgorithm):
        return sampler
    if isinstance(sampler, str) and sampler in SAMPLERS:
        return SAMPLERS[sampler]
    raise ValueError(f"Unknown sampler {sampler!r}; use one of {sorted(SAMPLERS)} or an SGMCMCAlgorithm "
                     "(e.g. degenjax.sgld).")

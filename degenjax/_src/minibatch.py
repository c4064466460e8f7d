"""The minibatch scheme of the LLC samplers: per-chain key streams and a keyed without-replacement order.

Chain ``c`` gets the key ``k_c = split(rng_key, num_chains)[c]`` (``rng_key`` itself when ``num_chains == 1``, as
numpyro does); from ``perm_key, noise_key = split(k_c)``, epoch ``e`` visits the data in a keyed pseudo-random order
(`epoch_positions`, keyed by ``perm_key``'s key data and ``e``) in consecutive minibatches of ``batch_size`` (the last
``n mod batch_size`` positions of each epoch are skipped), and step ``t`` uses the key ``fold_in(noise_key, t)`` for
its kernel. A sampler that draws its initial state (SGNHT's momentum) uses ``init_key(k_c)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from degenjax._src.checks import num_data
from degenjax._src.hashing import fmix32


def chain_keys(rng_key, num_chains: int):
    """Per-chain keys ``(num_chains, ...)``: ``rng_key`` itself for one chain, else ``split(rng_key, num_chains)``."""
    if num_chains == 1:
        return rng_key[None]
    return jax.random.split(rng_key, num_chains)


def chain_streams(chain_key):
    """``(perm_key, noise_key)`` of one chain."""
    keys = jax.random.split(chain_key)
    return keys[0], keys[1]


def init_key(chain_key):
    """The key of a chain's initial sampler state (e.g. SGNHT's random momentum): ``fold_in(chain_key, 1)``."""
    return jax.random.fold_in(chain_key, 1)


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


def iid_batch_indices(perm_key, t, n: int, batch_size: int) -> jax.Array:
    """The data indices ``(batch_size,)`` int32 of step ``t`` drawn uniformly *with* replacement, independently
    across steps: ``h_t = fmix32(... fmix32(t ^ 0x9E3779B9) ^ k_0 ... ^ k_m)`` over the words ``k`` of
    ``perm_key``'s key data, then index ``j`` is ``fmix32(h_t ^ (j + 1) * 0x9E3779B9) mod n`` (modulo bias below
    ``n / 2^32``).

    With independent minibatches the step's minibatch is independent of the position it is read at, so
    ``E[L_B(w_t)] = L_n(w_t)`` exactly, and the step-size bias of lambda^ is first order in the step with no
    epoch-length scale (the step-size recipe uses them; see `degenjax._src.recipe`).
    """
    if not 1 <= n < 2 ** 31:
        raise ValueError(f"the minibatch order supports 1 <= n < 2**31 data points; got n={n}.")
    words = jnp.ravel(jax.random.key_data(perm_key)).astype(jnp.uint32)
    h = fmix32(jnp.asarray(t).astype(jnp.uint32) ^ jnp.uint32(0x9E3779B9))
    for k in range(words.shape[0]):
        h = fmix32(h ^ words[k])
    j = (jnp.arange(batch_size, dtype=jnp.uint32) + jnp.uint32(1)) * jnp.uint32(0x9E3779B9)
    return (fmix32(h ^ j) % jnp.uint32(n)).astype(jnp.int32)


def gather_batch(data, idx: jax.Array):
    """``data`` at the indices ``idx`` along the leading axis of every leaf."""
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)


def full_loss(loss_fn, params, data, eval_batch_size: int | None = None) -> jax.Array:
    """``L_n(params)``: one call on all of ``data``, or the size-weighted mean over blocks of ``eval_batch_size``
    (exact for a per-example mean loss; bounds memory for large data)."""
    n = num_data(data)
    if eval_batch_size is not None and eval_batch_size < 1:
        raise ValueError(f"eval_batch_size must be an integer >= 1; got {eval_batch_size!r}.")
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

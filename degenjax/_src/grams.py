"""Streamed activation and Jacobian Gram matrices (docs/maths.md#grams).

Two layers of API:

- `gram_accumulator`: an optax-like NamedTuple of pure ``(init, update, finalize)`` functions over a `GramState`,
  for users who fold the activation Gram into their own ``lax.scan`` or sharded training step.
- Streaming drivers `activation_stats` / `activation_grams` and `jacobian_gram` / `jacobian_grams`: they run a
  model (`Sections`) over an iterable of batches, accumulate in O(d^2) memory, validate every batch (feature
  sizes, dtypes, finiteness) and optionally split each batch over the devices of a mesh (``jax.shard_map`` +
  ``psum``).

Precision: sums are kept in float64 when x64 is enabled, else float32 with Neumaier-compensated summation across
batches and pairwise summation within a batch; activation sums are taken about a shift (the first batch's mean)
so that centring does not cancel catastrophically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from degenjax._src.compileopts import lib_jit
from degenjax._src.numerics import HIGHEST
from degenjax._src.progress import track
from degenjax._src.sections import Sections, as_sections, forward, section_shapes
from degenjax._src.attention import attention_jtj
from degenjax._src.structure import affine_elementwise, attention_structure
from degenjax._src.validation import check_batches, check_positive_int, is_traced

# Elements of one chunk's Jacobian block (chunk x directions x input coordinates) when `chunk_size` is automatic.
_JACOBIAN_CHUNK_ELEMENTS = 1 << 25


# ----------------------------------------------------------------------------------------------------------------
# Summation helpers


def _neumaier_add(total, comp, x):
    """Neumaier (improved Kahan) step: ``total + comp`` tracks the exact running sum of the added ``x``."""
    t = total + x
    err = jnp.where(jnp.abs(total) >= jnp.abs(x), (total - t) + x, (x - t) + total)
    return t, comp + err


def _pairwise_sum(x):
    """Sums over the leading axis by a balanced binary tree (error O(log m) instead of O(m) roundings)."""
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = jnp.concatenate([x, jnp.zeros_like(x[:1])], axis=0)
        half = x.shape[0] // 2
        x = x[:half] + x[half:]
    return x[0]


def _resolve_accum_dtype(accum_dtype) -> np.dtype:
    x64 = bool(jax.config.jax_enable_x64)
    if accum_dtype is None:
        return np.dtype(np.float64 if x64 else np.float32)
    dt = np.dtype(accum_dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"accum_dtype must be float32 or float64, got {dt}.")
    if dt == np.dtype(np.float64) and not x64:
        raise ValueError("accum_dtype=float64 needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) first, "
                         "or leave accum_dtype=None (float32 with compensated summation).")
    return dt


# ----------------------------------------------------------------------------------------------------------------
# Accumulator (optax-like)


class GramSums(NamedTuple):
    """Running sums about ``shift``.

    Attributes:
      count: ``()``, number of samples (data points x positions).
      first: ``(d,)``, sum of ``h - shift``.
      second: ``(d, d)``, sum of ``(h - shift)(h - shift)^T``.
    """

    count: jax.Array
    first: jax.Array
    second: jax.Array


class GramState(NamedTuple):
    """State of `gram_accumulator`: arrays only, so it passes through ``jit``, ``scan`` and ``shard_map``.

    Attributes:
      shift: ``(d,)``, the mean of the first non-empty batch (set by the first ``update``); sums are taken about it.
        Under ``shard_map`` the state is replicated (``P()``) and every device sets the same (global) shift.
      sums: `GramSums`.
      compensation: `GramSums` of Neumaier running errors; ``sums + compensation`` is the accurate total.
    """

    shift: jax.Array
    sums: GramSums
    compensation: GramSums


class GramStats(NamedTuple):
    """Result of ``finalize``.

    Attributes:
      gram: ``(d + 1, d + 1)``, the Gram matrix with the constant coordinate last (docs/maths.md#grams).
      mean: ``(d,)``, the mean activation mu.
      count: ``()``, number of samples it was computed from.
    """

    gram: jax.Array
    mean: jax.Array
    count: jax.Array


class GramAccumulator(NamedTuple):
    """Pure functions ``init(example) -> GramState``, ``update(state, h, *, axis_name=None) -> GramState``,
    ``finalize(state) -> GramStats``."""

    init: Callable[..., GramState]
    update: Callable[..., GramState]
    finalize: Callable[[GramState], GramStats]


def gram_accumulator(*, center: bool = True, accum_dtype=None, chunk_size: int = 4096) -> GramAccumulator:
    """Streamed activation Gram ``G = E[(h~ - mu~)(h~ - mu~)^T]`` with ``h~ = (h, 1)`` (docs/maths.md#grams).

    ``update`` flattens all axes but the last (data points and positions count as samples), so it accepts a node
    layer of shape ``(batch, d)`` or ``(batch, positions, d)``. Under ``jax.shard_map`` pass ``axis_name`` (the
    mesh axes the batch is split over): the batch's sums are ``psum``-ed, so every device holds the same state.

    Example::

      acc = gram_accumulator()
      state = acc.init(d)
      state, _ = jax.lax.scan(lambda s, h: (acc.update(s, h), None), state, hs)   # hs: (steps, batch, d)
      G, mu, n = acc.finalize(state)

    Args:
      center: if True ``mu~ = (mu, 0)`` and ``G = blockdiag(Cov, 1)``; if False ``mu~ = 0`` (raw second moment).
      accum_dtype: float64 or float32; default float64 when x64 is enabled, else float32 (compensated).
      chunk_size: rows per block of the pairwise summation within a batch (float32 only).

    Returns:
      A `GramAccumulator`.
    """
    acc = _resolve_accum_dtype(accum_dtype)
    chunk_size = check_positive_int(chunk_size, "chunk_size", "gram_accumulator")

    def init(example) -> GramState:
        """``example``: the feature size ``d`` (int) or an array / ShapeDtypeStruct whose last axis is ``d``."""
        if isinstance(example, (int, np.integer)):
            d = int(example)
        else:
            shape = tuple(jnp.shape(example)) if not hasattr(example, "shape") else tuple(example.shape)
            if not shape:
                raise ValueError("gram_accumulator.init needs an int d or an array with a feature (last) axis; "
                                 "got a scalar.")
            d = shape[-1]
        if d < 1:
            raise ValueError(f"feature size must be positive, got {d}.")
        zeros = GramSums(jnp.zeros((), acc), jnp.zeros((d,), acc), jnp.zeros((d, d), acc))
        return GramState(jnp.zeros((d,), acc), zeros, zeros)

    def update(state: GramState, h, *, axis_name=None) -> GramState:
        """Adds a batch ``h`` of shape ``(..., d)``; ``axis_name``: mesh axes to ``psum`` over (shard_map only)."""
        h = jnp.asarray(h)
        d = state.shift.shape[0]
        if h.ndim < 1 or h.shape[-1] != d:
            raise ValueError(f"gram_accumulator.update: activation has shape {h.shape} but the state was "
                             f"initialised for feature size {d}; the feature axis must be last.")
        x = jnp.reshape(h, (-1, d)).astype(acc)
        n = x.shape[0]
        if n == 0:
            return state
        psum = (lambda v: jax.lax.psum(v, axis_name)) if axis_name is not None else (lambda v: v)
        count = psum(jnp.asarray(n, acc))
        seen = state.sums.count + state.compensation.count
        # Sums are taken about a shift (the first batch's mean): exact algebraically, and it keeps the centred
        # covariance free of the cancellation of E[hh^T] - mu mu^T.
        batch_mean = psum(jnp.sum(x, axis=0)) / count
        shift = jnp.where(seen == 0, batch_mean, state.shift)
        xc = x - shift[None, :]
        if acc == np.dtype(np.float32) and n > chunk_size:
            m = -(-n // chunk_size)
            xc = jnp.pad(xc, ((0, m * chunk_size - n), (0, 0)))  # zero rows add nothing
            blocks = jnp.reshape(xc, (m, chunk_size, d))
            first = _pairwise_sum(jnp.sum(blocks, axis=1))
            second = _pairwise_sum(jnp.einsum("mci,mcj->mij", blocks, blocks, precision=HIGHEST))
        else:
            first = jnp.sum(xc, axis=0)
            second = jnp.matmul(xc.T, xc, precision=HIGHEST)
        inc = GramSums(count, psum(first), psum(second))
        pairs = [_neumaier_add(s, c, v) for s, c, v in zip(state.sums, state.compensation, inc)]
        return GramState(shift, GramSums(*(p[0] for p in pairs)), GramSums(*(p[1] for p in pairs)))

    def finalize(state: GramState) -> GramStats:
        return _finalize_state(state, center, acc, jnp)

    return GramAccumulator(init, update, finalize)


def _finalize_state(state: GramState, center: bool, acc, xp) -> GramStats:
    """`gram_accumulator`'s ``finalize`` with ``xp`` = ``jax.numpy``, or ``numpy`` for concrete states on the host."""
    s = jax.tree.map(xp.add, state.sums, state.compensation)
    n = s.count
    m = s.first / n
    mean = state.shift + m
    cov = s.second / n - xp.outer(m, m)
    cov = 0.5 * (cov + cov.T)
    d = mean.shape[0]
    one = xp.ones((1, 1), acc)
    if center:
        zero = xp.zeros((d, 1), acc)
        gram = xp.block([[cov, zero], [zero.T, one]])
    else:
        col = mean[:, None]
        gram = xp.block([[cov + xp.outer(mean, mean), col], [col.T, one]])
    return GramStats(gram, mean, n)


# ----------------------------------------------------------------------------------------------------------------
# Batch handling shared by the drivers


def _batch_iterable(batches, fn: str):
    batches = check_batches(batches, fn)  # no empty batch; a spent generator named (validation.py)
    if isinstance(batches, (jax.Array, np.ndarray, Mapping)):
        return [batches]
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise ValueError(f"{fn}: `batches` must be an array (one batch), a dict pytree (one batch) or an iterable "
                         f"of batches; got {type(batches).__name__}.")
    return batches


def as_batch_list(batches, fn: str = "batches") -> list:
    """Materialises ``batches`` for functions that pass over the data more than once.

    A single array or dict is one batch; any other iterable is a sequence of batches.

    Raises:
      ValueError: for something that is not a batch or an iterable of batches, or for no batches at all.
    """
    out = list(_batch_iterable(batches, fn))
    if not out:
        raise ValueError(f"{fn}: `batches` is empty; pass at least one input batch.")
    return out


class BatchChecker:
    """Validates batches as they stream: dtypes, feature sizes, and (lagged by one batch) finiteness."""

    def __init__(self, model: Sections, params, fn: str, layers: Sequence[int]):
        self.model, self.params, self.fn, self.layers = model, params, fn, tuple(layers)
        self.dtypes = None
        self.trailing = None
        self.shapes = None
        self.pending = None

    def check(self, i: int, batch):
        leaves, treedef = jax.tree.flatten(batch)
        if not leaves:
            raise ValueError(f"{self.fn}: batch {i} has no arrays.")
        for a in leaves:
            if jnp.ndim(a) < 1:
                raise ValueError(f"{self.fn}: batch {i} has a scalar leaf; every input needs a leading batch axis.")
        dtypes = (treedef, tuple(jnp.result_type(a) for a in leaves))
        trailing = tuple(tuple(jnp.shape(a)[1:]) for a in leaves)
        if self.dtypes is None:
            self.dtypes = dtypes
        elif dtypes != self.dtypes:
            raise ValueError(f"{self.fn}: batch {i} has dtypes {list(dtypes[1])} but batch 0 had "
                             f"{list(self.dtypes[1])} (or a different structure); cast all batches to one dtype, "
                             "e.g. `x.astype(jnp.float32)`.")
        if trailing != self.trailing:
            shapes = section_shapes(self.model, self.params, batch)  # ValueError naming the section on a mismatch
            for l in self.layers:
                if not isinstance(shapes[l], jax.ShapeDtypeStruct) or len(shapes[l].shape) < 2:
                    got = jax.tree.map(lambda s: tuple(s.shape), shapes[l])
                    raise ValueError(f"{self.fn}: node layer {l} ({self.model.layer_name(l)}) has shape {got}; it "
                                     "must be one array of shape (batch, [positions...,] features).")
            if self.shapes is not None:
                for l in self.layers:
                    if shapes[l].shape[-1] != self.shapes[l].shape[-1]:
                        raise ValueError(
                            f"{self.fn}: batch {i} gives node layer {l} ({self.model.layer_name(l)}) "
                            f"{shapes[l].shape[-1]} features, but batch 0 gave {self.shapes[l].shape[-1]}; all "
                            "batches must have the same feature (trailing) shape.")
            self.shapes = shapes
            self.trailing = trailing
        return self.shapes

    def finite(self, i: int, flags, what: str):
        """Registers batch ``i``'s finiteness flags; raises for the previous batch (one host sync per batch)."""
        self.flush()
        if not is_traced(flags):
            self.pending = (i, flags, what)

    def flush(self):
        if self.pending is None:
            return
        i, flags, what = self.pending
        self.pending = None
        ok = np.asarray(flags)
        for row, l in enumerate(self.layers):
            if not ok[row, 0]:
                raise ValueError(
                    f"{self.fn}: node layer {l} ({self.model.layer_name(l)}) has non-finite values (NaN or Inf) in "
                    f"batch {i} (0-based); check that batch's inputs and the model parameters (diverged training, "
                    "overflow in low precision), or drop the batch.")
            if ok.shape[1] > 1 and not ok[row, 1] and what == "constant":
                raise ValueError(
                    f"{self.fn}: node layer {l} ({self.model.layer_name(l)}) is declared folded (constant='last') but "
                    f"its last feature is not 1 everywhere in batch {i} (0-based); sections written on folded node "
                    "layers must carry the constant 1 as their last feature (fold the input batches with a trailing "
                    "1, and return the constant last from every section but the last), or use constant='append'.")
            if ok.shape[1] > 1 and not ok[row, 1]:
                raise ValueError(
                    f"{self.fn}: the {what} for node layer {l} ({self.model.layer_name(l)}) is non-finite in batch "
                    f"{i} (0-based) although the activations are finite; the sections overflow downstream of that "
                    "layer: check the parameters or compute in float64.")


def _batch_axes(mesh, batch_axis):
    if mesh is None:
        if batch_axis is not None:
            raise ValueError("batch_axis is only used with mesh=; pass a mesh too.")
        return None
    names = tuple(mesh.axis_names)
    axes = names if batch_axis is None else ((batch_axis,) if isinstance(batch_axis, str) else tuple(batch_axis))
    for a in axes:
        if a not in names:
            raise ValueError(f"batch_axis {a!r} is not an axis of the mesh {names}.")
    return axes


def _batch_mesh(batch):
    """``(mesh, axes)`` when the batch is already laid out over mesh axes along its leading axis, else None."""
    leaf = jax.tree.leaves(batch)[0]
    try:
        sharding = jax.typeof(leaf).sharding if isinstance(leaf, jax.core.Tracer) else leaf.sharding
    except AttributeError:
        return None
    if not isinstance(sharding, NamedSharding) or not len(sharding.spec) or sharding.spec[0] is None:
        return None
    axes = sharding.spec[0]
    return sharding.mesh, ((axes,) if isinstance(axes, str) else tuple(axes))


def _check_divisible(fn, i, batch, mesh, axes):
    size = math.prod(mesh.shape[a] for a in axes)
    b = jnp.shape(jax.tree.leaves(batch)[0])[0]
    if b % size:
        raise ValueError(f"{fn}: batch {i} has {b} data points, not divisible by the {size} devices of mesh axes "
                         f"{axes}; use a batch size that is a multiple of {size} (pad, or drop the remainder).")


def _reshard_batch(tree, mesh, axes):
    """Lays the leading (batch) axis of every leaf out over ``axes`` on Explicit mesh axes (Auto axes need
    nothing: ``shard_map`` reshards its inputs)."""
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if any(types[a] != jax.sharding.AxisType.Explicit for a in axes):
        return tree
    return jax.tree.map(lambda a: jax.reshard(a, NamedSharding(mesh, P(axes))), tree)


def _replicate(tree, mesh):
    """Places running sums replicated on ``mesh`` (as the sharded step returns them, so it compiles once)."""
    if is_traced(tree):
        return tree
    return jax.device_put(tree, NamedSharding(mesh, P()))


def _finite_flag(a, axes):
    bad = jnp.logical_not(jnp.all(jnp.isfinite(a)))
    if axes is not None:
        return jax.lax.psum(bad.astype(jnp.int32), axes) == 0
    return jnp.logical_not(bad)


# ----------------------------------------------------------------------------------------------------------------
# Activation Grams


class ActivationStats(NamedTuple):
    """Per node layer: ``grams[l]`` ``(d_l + 1, d_l + 1)`` (constant coordinate last), ``means[l]`` ``(d_l,)``,
    ``counts[l]`` ``()`` (data points x positions)."""

    grams: tuple[jax.Array, ...]
    means: tuple[jax.Array, ...]
    counts: tuple[jax.Array, ...]


def _constant_flag(a, axes):
    """Whether the last feature of a folded node layer is exactly 1 everywhere (over all devices)."""
    bad = jnp.logical_not(jnp.all(a[..., -1] == 1))
    if axes is not None:
        return jax.lax.psum(bad.astype(jnp.int32), axes) == 0
    return jnp.logical_not(bad)


def _activation_step(states, params, x, *, model, accum_dtype, chunk_size, mesh, axes):
    acc = gram_accumulator(accum_dtype=accum_dtype, chunk_size=chunk_size)  # `center` only matters in finalize
    fold = model.constant == "last"

    def local(states, params, x):
        _, acts = forward(model, params, x)
        feats = [a[..., :-1] for a in acts] if fold else acts
        new = [acc.update(s, a, axis_name=axes) for s, a in zip(states, feats)]
        flags = [_finite_flag(a, axes) for a in acts]
        if fold:
            flags = jnp.stack([jnp.stack([f, _constant_flag(a, axes)]) for f, a in zip(flags, acts)])
        else:
            flags = jnp.stack(flags)[:, None]
        return new, flags

    if mesh is None:
        return local(states, params, x)
    x = _reshard_batch(x, mesh, axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(axes)), out_specs=(P(), P()))(states, params, x)


def _finalize_all(states, *, center, accum_dtype):
    acc = gram_accumulator(center=center, accum_dtype=accum_dtype)
    return [acc.finalize(s) for s in states]


# only reached with traced states (concrete ones are finalised on the host)
_finalize_all_jit = jax.jit(_finalize_all, static_argnames=("center", "accum_dtype"))


def _zero_state(d: int, dtype) -> GramState:
    # NumPy zeros: no device computation (and no compilation) just to initialise.
    zeros = GramSums(np.zeros((), dtype), np.zeros((d,), dtype), np.zeros((d, d), dtype))
    return GramState(np.zeros((d,), dtype), zeros, zeros)


_activation_step_jit = lib_jit(_activation_step, static_argnames=("model", "accum_dtype", "chunk_size", "mesh",
                                                                  "axes"))


def activation_stats(model, params, batches, *, center: bool = True, accum_dtype=None, chunk_size: int = 4096,
                     mesh=None, batch_axis=None, jit: bool = True, constant: str | None = None,
                     progress: bool = False) -> ActivationStats:
    """Streams the activation Grams and means of every node layer over ``batches`` (docs/maths.md#grams).

    Memory is O(sum_l d_l^2) whatever the number of batches. Each batch is checked: dtypes equal to the first
    batch's, feature sizes accepted by the model, activations finite (checked one batch late, so the host does
    not stall the device; skipped when called under an outer ``jax.jit``, where values are traced). Works under
    ``jax.jit`` with a single traced batch; to stream inside your own compiled loop use `gram_accumulator`.

    Args:
      model: `Sections` or a list of functions ``f_l(params, h)``.
      params: parameters passed to every section.
      batches: an iterable of input batches (arrays or pytrees with a leading batch axis); a single array or dict
        is one batch.
      center: see `gram_accumulator`.
      accum_dtype: see `gram_accumulator`.
      chunk_size: rows per pairwise-summation block (float32).
      mesh: optional ``jax.sharding.Mesh``; each batch is split over ``batch_axis`` with ``jax.shard_map`` and the
        per-device sums are ``psum``-ed. The batch size must be a multiple of the number of devices on those axes.
        Without ``mesh``, a batch already sharded along its leading axis (a ``NamedSharding``) is processed the same
        way on its own mesh.
      batch_axis: mesh axis name(s) the batch is split over; default all axes of ``mesh``.
      jit: compile the per-batch step (once per model and batch shape); False runs it op by op.
      constant: ``"append"`` or ``"last"`` (see `degenjax.Sections`); default the model's own. On folded node
        layers (``"last"``) the last feature must be the constant 1 (checked); the Gram and mean are those of the
        other ``d_h = d_l - 1`` features with the constant coordinate last, i.e. the same as for plain layers.
      progress: show a tqdm progress bar over the batches.

    Returns:
      `ActivationStats` with per node layer ``gram`` ``(d_h + 1, d_h + 1)``, ``mean`` ``(d_h,)`` and ``count``
      (``d_h`` the features without the constant: ``d_l`` for plain layers, ``d_l - 1`` for folded ones).

    Raises:
      ValueError: empty ``batches``, a batch the model rejects (feature size), mixed dtypes, non-finite
        activations (naming the layer and batch), a batch size not divisible by the mesh.
    """
    fn = "activation_grams"
    model = as_sections(model, constant)
    acc_dt = _resolve_accum_dtype(accum_dtype)
    check_positive_int(chunk_size, "chunk_size", fn)
    axes = _batch_axes(mesh, batch_axis)
    layers = tuple(range(len(model)))
    checker = BatchChecker(model, params, fn, layers)
    step = _activation_step_jit if jit else _activation_step
    states = None
    for i, batch in enumerate(track(_batch_iterable(batches, fn), "activation Grams", progress)):
        shapes = checker.check(i, batch)
        if states is None:
            fold = int(model.constant == "last")
            for l in layers:
                if fold and shapes[l].shape[-1] < 2:
                    raise ValueError(f"{fn}: node layer {l} ({model.layer_name(l)}) has {shapes[l].shape[-1]} "
                                     "feature(s); a folded layer (constant='last') needs at least one feature before "
                                     "the constant.")
            states = [_zero_state(shapes[l].shape[-1] - fold, acc_dt) for l in layers]
        mesh_i, axes_i = (mesh, axes) if mesh is not None else (_batch_mesh(batch) or (None, None))
        if mesh_i is not None:
            _check_divisible(fn, i, batch, mesh_i, axes_i)
            states = _replicate(states, mesh_i)
        states, flags = step(states, params, batch, model=model, accum_dtype=acc_dt,
                             chunk_size=int(chunk_size), mesh=mesh_i, axes=axes_i)
        checker.finite(i, flags, "constant" if model.constant == "last" else "activation")
    checker.flush()
    if states is None:
        raise ValueError(f"{fn}: `batches` is empty; pass at least one batch (an array, or a non-empty list / "
                         "generator of arrays). A generator can only be consumed once.")
    if is_traced(states):
        out = (_finalize_all_jit if jit else _finalize_all)(states, center=center, accum_dtype=acc_dt)
    else:  # a few (d, d) operations on the host, in the accumulation dtype: nothing to compile
        host = jax.tree.map(np.asarray, states)
        out = [GramStats(*(jax.device_put(a) for a in _finalize_state(st, center, acc_dt, np))) for st in host]
    return ActivationStats(tuple(o.gram for o in out), tuple(o.mean for o in out), tuple(o.count for o in out))


def activation_grams(model, params, batches, *, center: bool = True, **kwargs) -> list[jax.Array]:
    """Activation Gram ``G^l`` of every node layer, shape ``(d_l + 1, d_l + 1)``, constant coordinate last.

    ``G^l = E[(h~ - mu~)(h~ - mu~)^T]`` over data points and positions (docs/maths.md#grams). Keyword arguments
    are those of `activation_stats`, which also returns the means.
    """
    return list(activation_stats(model, params, batches, center=center, **kwargs).grams)


# ----------------------------------------------------------------------------------------------------------------
# Jacobian Grams


def _basis_rows(B, d: int, what: str):
    """The derivative part (first ``d`` rows) of a basis matrix of shape ``(d, k)`` or ``(d + 1, k)``."""
    if B is None:
        return None
    B = jnp.asarray(B)
    if B.ndim != 2 or B.shape[0] not in (d, d + 1):
        raise ValueError(f"{what} has shape {B.shape}; expected (d, k) or (d + 1, k) with d = {d} (the feature "
                         "size of the layer it maps; a d + 1st row is the constant coordinate and is ignored).")
    return B[:d]


def _per_example_rows(g, h, key, num_sources: int | None, axes=None):
    """Rows of the Jacobian of ``g`` at one example ``h`` as ``(directions, P_in, d)``.

    Exact: all output coordinates (``vjp``) or all input coordinates (``jvp``, whichever side is smaller), so that
    ``sum_{o,s} rows[o, s]^T rows[o, s] = sum_s J_{., s}^T J_{., s}``. With ``num_sources = R``: ``r^T J`` for R
    random +-1 vectors r, scaled by ``R^{-1/2}``, an unbiased estimate of the same sum (docs/maths.md#grams).
    Inside ``shard_map`` (``axes`` set) the unit directions are marked device-varying like the data.
    """
    vary = (lambda a: a) if axes is None else (lambda a: jax.lax.pcast(a, axes, to="varying"))
    d = h.shape[-1]
    n_in = h.size
    out = jax.eval_shape(g, h)
    n_out = math.prod(out.shape)
    if num_sources is not None:
        y, pullback = jax.vjp(g, h)
        r = jax.random.rademacher(key, (num_sources,) + y.shape, dtype=y.dtype)
        rows = jax.vmap(pullback)(r)[0] / jnp.sqrt(jnp.asarray(num_sources, h.dtype))
        return jnp.reshape(rows, (num_sources, -1, d))
    if n_out <= n_in:
        y, pullback = jax.vjp(g, h)
        eye = vary(jnp.reshape(jnp.eye(n_out, dtype=y.dtype), (n_out,) + y.shape))
        return jnp.reshape(jax.vmap(pullback)(eye)[0], (n_out, -1, d))
    _, push = jax.linearize(g, h)
    eye = vary(jnp.reshape(jnp.eye(n_in, dtype=h.dtype), (n_in,) + h.shape))
    cols = jnp.reshape(jax.vmap(push)(eye), (n_in, n_out))
    return jnp.reshape(cols.T, (n_out, -1, d))


def _structured_jtj(split, out_basis, accum_dtype):
    """``sum_rows J^T J`` for an affine-elementwise section ``post(h W) [V] [+ h A0]`` (see structure.py).

    Per row ``J = [P +] W diag(s) Q`` with ``Q = V B`` (``B`` the target basis) and ``P = A0 B``, so the sum is
    ``W [(Q Q^T) o sum s s^T] W^T [+ W diag(sum s) Q P^T + transpose + rows P P^T]``.
    """
    dt = accum_dtype
    s = jnp.reshape(split.slope, (-1, split.slope.shape[-1])).astype(dt)
    W = split.W.astype(dt)
    Bo = None if out_basis is None else out_basis.astype(dt)
    V = None if split.V is None else split.V.astype(dt)
    Q = Bo if V is None else (V if Bo is None else jnp.matmul(V, Bo, precision=HIGHEST))
    if split.linear:  # s = 1: rows (W Q)(W Q)^T, no (d_k, d_k) Gram of the slopes (d_k may be a vocabulary)
        WQ = W if Q is None else jnp.matmul(W, Q, precision=HIGHEST)
        M = jnp.asarray(s.shape[0], dt) * jnp.matmul(WQ, WQ.T, precision=HIGHEST)
    elif Q is None:  # K = diag(sum s^2)
        M = jnp.matmul(W * jnp.sum(s * s, axis=0)[None, :], W.T, precision=HIGHEST)
    else:
        S = jnp.matmul(s.T, s, precision=HIGHEST)
        K = jnp.matmul(Q, Q.T, precision=HIGHEST) * S
        M = jnp.matmul(jnp.matmul(W, K, precision=HIGHEST), W.T, precision=HIGHEST)
    if split.A0 is not None:  # a linear pass-through (residual, carried constant): P = A0 B
        A0 = split.A0.astype(dt)
        P = A0 if Bo is None else jnp.matmul(A0, Bo, precision=HIGHEST)
        QPt = P.T if Q is None else jnp.matmul(Q, P.T, precision=HIGHEST)
        # W diag(sum s) Q P^T, with the diagonal applied to (Q P^T): the form (W * sum_s[None]) @ (Q P^T) is
        # miscompiled by XLA:CPU under jit in jax 0.10.2 (a fused reduce + broadcast multiply + two dots gave
        # entries off by O(1); tests/test_structure.py::test_residual_block_at_transformer_sizes guards this)
        cross = jnp.matmul(W, jnp.sum(s, axis=0)[:, None] * QPt, precision=HIGHEST)
        M = M + cross + cross.T + jnp.asarray(s.shape[0], dt) * jnp.matmul(P, P.T, precision=HIGHEST)
    return M


def _layer_jtj(model, params, l, h, out_basis, keys, *, target, num_sources, chunk_size, accum_dtype, axes,
               structured=False):
    """``sum_x sum_s J_{., s}^T J_{., s}`` for node layer ``l`` over the batch ``h``, in chunks of examples."""
    fns = model.fns[l:l + 1] if target == "next" else model.fns[l:]
    if structured and num_sources is None and len(fns) == 1:
        split = affine_elementwise(fns[0], params, h)
        if split is not None:
            return _structured_jtj(split, out_basis, accum_dtype)
        att = attention_structure(fns[0], params, h)
        if att is not None:
            return attention_jtj(att, out_basis, accum_dtype)

    def g(h_ex):
        y = h_ex[None]
        for f in fns:
            y = f(params, y)
        y = y[0]
        if out_basis is not None:
            y = jnp.matmul(y, out_basis.astype(y.dtype), precision=HIGHEST)
        return y

    b, d = h.shape[0], h.shape[-1]
    ex_shape = h.shape[1:]
    n_in = math.prod(ex_shape)
    if chunk_size is None:
        n_out = math.prod(jax.eval_shape(g, jax.ShapeDtypeStruct(ex_shape, h.dtype)).shape)
        dirs = num_sources if num_sources is not None else min(n_out, n_in)
        chunk_size = max(1, _JACOBIAN_CHUNK_ELEMENTS // max(1, dirs * n_in))
    c = max(1, min(int(chunk_size), b))
    m, rem = divmod(b, c)

    def chunk_jtj(hc, kc):
        if kc is None:
            rows = jax.vmap(lambda e: _per_example_rows(g, e, None, None, axes))(hc)
        else:
            rows = jax.vmap(lambda e, k: _per_example_rows(g, e, k, num_sources, axes))(hc, kc)
        rows = jnp.reshape(rows.astype(accum_dtype), (-1, d))  # (examples x directions x positions, d)
        return jnp.matmul(rows.T, rows, precision=HIGHEST)

    def body(carry, chunk):
        return _neumaier_add(carry[0], carry[1], chunk_jtj(*chunk)), None

    # m full chunks in a scan (one compiled body), then the remainder as one smaller chunk.
    xs = (jnp.reshape(h[:m * c], (m, c) + ex_shape),
          None if keys is None else jnp.reshape(keys[:m * c], (m, c) + keys.shape[1:]))
    zero = jnp.zeros((d, d), accum_dtype)
    if axes is not None:  # the carry varies over devices like the data (summed by the caller's psum)
        zero = jax.lax.pcast(zero, axes, to="varying")
    (total, comp), _ = jax.lax.scan(body, (zero, zero), xs)
    if rem:
        total, comp = _neumaier_add(total, comp, chunk_jtj(h[m * c:], None if keys is None else keys[m * c:]))
    return total + comp


def _jacobian_step(totals, params, x, bases, keys, *, model, layers, target, num_sources, chunk_size, accum_dtype,
                   mesh, axes, structured=False):
    def local(totals, params, x, bases, keys):
        _, acts = forward(model, params, x)
        new, flags = [], []
        for (t, c), l, B in zip(totals, layers, bases):
            inc = _layer_jtj(model, params, l, acts[l], B, keys, target=target, num_sources=num_sources,
                             chunk_size=chunk_size, accum_dtype=accum_dtype, axes=axes, structured=structured)
            if axes is not None:
                inc = jax.lax.psum(inc, axes)
            new.append(_neumaier_add(t, c, inc))
            flags.append(jnp.stack([_finite_flag(acts[l], axes), jnp.all(jnp.isfinite(inc))]))
        return new, jnp.stack(flags)

    if mesh is None:
        return local(totals, params, x, bases, keys)
    key_spec = P() if keys is None else P(axes)
    x, keys = _reshard_batch((x, keys), mesh, axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(axes), P(), key_spec),
                         out_specs=(P(), P()))(totals, params, x, bases, keys)


_jacobian_step_jit = lib_jit(_jacobian_step, static_argnames=("model", "layers", "target", "num_sources",
                                                              "chunk_size", "accum_dtype", "mesh", "axes",
                                                              "structured"))


def _jacobian_driver(model, params, batches, layers, out_bases, *, target, num_sources, key, chunk_size,
                     accum_dtype, mesh, batch_axis, jit, fn, structured=True, progress=False,
                     desc="Jacobian Grams"):
    if target not in ("next", "output"):
        raise ValueError(f"{fn}: target must be 'next' or 'output', got {target!r}.")
    if num_sources is not None:
        if isinstance(num_sources, bool) or not isinstance(num_sources, (int, np.integer)) or num_sources < 1:
            raise ValueError(f"{fn}: num_sources must be a positive int (random +-1 vectors per data point) or "
                             f"None for the exact Gram; got {num_sources!r}.")
        if key is None:
            raise ValueError(f"{fn}: num_sources={num_sources} draws random sources; pass key=jax.random.key(...).")
        num_sources = int(num_sources)
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size", fn)
    acc_dt = _resolve_accum_dtype(accum_dtype)
    axes = _batch_axes(mesh, batch_axis)
    L = len(model)
    for l in layers:
        if not 0 <= l < L:
            raise ValueError(f"{fn}: layer {l} is out of range; the model has node layers 0..{L - 1}.")
    checker = BatchChecker(model, params, fn, layers)
    step = _jacobian_step_jit if jit else _jacobian_step
    totals, counts, bases = None, None, None
    what = "Jacobian Gram"
    for i, batch in enumerate(track(_batch_iterable(batches, fn), desc, progress)):
        shapes = checker.check(i, batch)
        if totals is None:
            bases = []
            for l in layers:
                if not jnp.issubdtype(shapes[l].dtype, jnp.floating):
                    raise ValueError(f"{fn}: node layer {l} ({model.layer_name(l)}) has dtype {shapes[l].dtype}; "
                                     "Jacobians need floating-point node layers (e.g. one-hot inputs instead of "
                                     "token ids), or skip that layer.")
            for l, B in zip(layers, out_bases):
                nxt = shapes[l + 1] if target == "next" else shapes[L]
                if not isinstance(nxt, jax.ShapeDtypeStruct) or len(nxt.shape) < 2:
                    raise ValueError(f"{fn}: the output of section {l if target == 'next' else L - 1} must be one "
                                     "array of shape (batch, [positions...,] features).")
                bases.append(_basis_rows(B, nxt.shape[-1], f"{fn}: the output basis for node layer {l}"))
            bases = tuple(bases)
            totals = [(np.zeros((shapes[l].shape[-1],) * 2, acc_dt),) * 2 for l in layers]
            counts = [0] * len(layers)
        mesh_i, axes_i = (mesh, axes) if mesh is not None else (_batch_mesh(batch) or (None, None))
        if mesh_i is not None:
            _check_divisible(fn, i, batch, mesh_i, axes_i)
            totals = _replicate(totals, mesh_i)
        keys = None
        b = jnp.shape(jax.tree.leaves(batch)[0])[0]
        if num_sources is not None:
            keys = jax.random.split(jax.random.fold_in(key, i), b)
        totals, flags = step(totals, params, batch, bases, keys, model=model, layers=tuple(layers), target=target,
                             num_sources=num_sources, chunk_size=None if chunk_size is None else int(chunk_size),
                             accum_dtype=acc_dt, mesh=mesh_i, axes=axes_i, structured=bool(structured))
        for j, l in enumerate(layers):
            counts[j] += b * math.prod(shapes[l].shape[1:-1])
        checker.finite(i, flags, what)
    checker.flush()
    if totals is None:
        raise ValueError(f"{fn}: `batches` is empty; pass at least one batch (an array, or a non-empty list / "
                         "generator of arrays). A generator can only be consumed once.")
    if not is_traced(totals):  # on the host: no small device programs to compile for the last steps
        return [jax.device_put((np.asarray(t) + np.asarray(c)) / n) for (t, c), n in zip(totals, counts)]
    return [(t + c) / jnp.asarray(n, acc_dt) for (t, c), n in zip(totals, counts)]


def jacobian_gram(model, params, batches, layer: int, *, out_basis=None, target: str = "next",
                  num_sources: int | None = None, key=None, chunk_size: int | None = None, accum_dtype=None,
                  mesh=None, batch_axis=None, jit: bool = True, structured: bool = True,
                  constant: str | None = None, progress: bool = False) -> jax.Array:
    """Jacobian Gram ``M^l`` of one node layer, shape ``(d_l, d_l)`` over the features the section takes.

    On plain node layers (``constant="append"``) these are the features without the constant (whose derivative is
    zero); on folded ones (``"last"``) the constant is the last feature and its row and column carry the bias
    paths (arXiv 2405.10928, section 2).

    ``M^l_{jk} = (1 / (N P_l)) sum_x sum_{t,i} sum_s J_{(t,i),(s,j)} J_{(t,i),(s,k)}`` with ``J`` the Jacobian of
    the target coordinates with respect to ``h_l`` for one data point (all its positions ``s``), ``P_l`` the
    positions of node layer ``l`` (docs/maths.md#grams). Computed per example with ``vmap`` of ``vjp`` over output
    coordinates, or of ``jvp`` over input coordinates when fewer, in chunks of ``chunk_size`` examples.

    Args:
      model: `Sections` or a list of functions ``f_l(params, h)``.
      params: parameters passed to every section.
      batches: an iterable of input batches (a single array or dict is one batch); must be re-iterable if you
        call this once per layer (e.g. a list).
      layer: the node layer ``l``.
      out_basis: ``(d_t, k)`` or ``(d_t + 1, k)`` matrix: target coordinates are ``h_t @ out_basis[:d_t]``;
        ``h_t`` is ``h_{l+1}`` for ``target="next"`` (on folded layers its constant included, so a folded basis
        ``C^{l+1}`` of ``d_t`` rows is used whole), the network output for ``"output"``. A ``d_t + 1``-st row
        belongs to an appended constant, which has no derivative, and is ignored. None is the identity.
      target: ``"next"`` (local, LIB) or ``"output"`` (global).
      num_sources: R for the unbiased estimate with R random +-1 vectors over the target coordinates per data
        point; None for the exact Gram.
      key: PRNG key, required with ``num_sources``.
      chunk_size: examples per chunk; None picks it so one chunk's Jacobian block stays below 2^25 elements.
      accum_dtype: float64 (default with x64) or float32 (compensated).
      mesh, batch_axis: split each batch over mesh devices (``jax.shard_map`` + ``psum``), as in `activation_stats`.
      jit: compile the per-batch step; False runs it op by op.
      constant: ``"append"`` or ``"last"`` (see `degenjax.Sections`); default the model's own.
      structured: for an exact Gram of one section of the form ``[h +] phi(h @ W) [@ V + c]`` (``phi``
        elementwise: a dense layer plus activation, or a residual MLP block; see `degenjax.structured_sections`),
        use ``W [(Q Q^T) o sum_x s s^T] W^T`` (``Q = V B``, ``s = phi'(h W)``, plus residual cross terms) instead of
        per-example Jacobians (same value, one ``(d_k, d_k)`` Gram per batch). False always takes the per-example
        path.
      progress: show a tqdm progress bar over the batches.

    Returns:
      ``M^l``, shape ``(d_l, d_l)``.

    Raises:
      ValueError: bad target, layer, basis shape or ``num_sources``; empty or inconsistent batches; non-finite
        activations or Jacobians (naming the layer and batch).
    """
    model = as_sections(model, constant)
    return _jacobian_driver(model, params, batches, (int(layer),), (out_basis,), target=target,
                            num_sources=num_sources, key=key, chunk_size=chunk_size, accum_dtype=accum_dtype,
                            mesh=mesh, batch_axis=batch_axis, jit=jit, fn="jacobian_gram",
                            structured=structured, progress=progress,
                            desc=f"Jacobian Gram of node layer {int(layer)}")[0]


def jacobian_grams(model, params, batches, *, basis=None, target: str = "next", output_basis=None,
                   num_sources: int | None = None, key=None, chunk_size: int | None = None, accum_dtype=None,
                   mesh=None, batch_axis=None, jit: bool = True, structured: bool = True,
                   constant: str | None = None, layers: Sequence[int] | None = None,
                   progress: bool = False) -> list[jax.Array]:
    """Jacobian Grams ``M^l`` of all node layers ``l = 0..L-1`` (or of ``layers``) in one pass over ``batches``.

    See `jacobian_gram` for the definition and the remaining arguments.

    Args:
      basis: for ``target="next"``: None (identity: raw ``h_{l+1}``), a sequence of L matrices (``basis[l]`` for
        node layer l, shape ``(d_l [+ 1], k_l)``; entries may be None), or an object with a ``.C`` attribute such
        as an ``InteractionBasis``. Node layer ``l < L - 1`` uses ``basis[l + 1]``; the last uses
        ``output_basis``. Must be None for ``target="output"``.
      output_basis: ``(d_out [+ 1], k)`` basis of the network output; None is the identity.
      layers: the node layers to compute (default all ``0..L-1``).

    Returns:
      ``[M^0, ..., M^{L-1}]`` (or one per entry of ``layers``), ``M^l`` of shape ``(d_l, d_l)``.
    """
    fn = "jacobian_grams"
    model = as_sections(model, constant)
    L = len(model)
    if target == "next":
        if basis is not None:
            if hasattr(basis, "C"):
                basis = basis.C
            if isinstance(basis, (jax.Array, np.ndarray)) or not isinstance(basis, Sequence):
                raise ValueError(f"{fn}: basis must be a sequence of {L} matrices (one per node layer) or an object "
                                 f"with a .C attribute; got {type(basis).__name__}.")
            if len(basis) != L:
                raise ValueError(f"{fn}: basis has {len(basis)} matrices but the model has {L} node layers; pass one "
                                 "per node layer (basis[l] for node layer l).")
            out_bases = tuple(basis[1:]) + (output_basis,)
        else:
            out_bases = (None,) * (L - 1) + (output_basis,)
    elif target == "output":
        if basis is not None:
            raise ValueError(f"{fn}: target='output' differentiates the network output; `basis` (of the node "
                             "layers) is not used there. Pass output_basis= for the output's basis, or basis=None.")
        out_bases = (output_basis,) * L
    else:
        raise ValueError(f"{fn}: target must be 'next' or 'output', got {target!r}.")
    layers = tuple(range(L)) if layers is None else tuple(int(l) for l in layers)
    if any(not 0 <= l < L for l in layers):
        raise ValueError(f"{fn}: layers={list(layers)} must be node layers in 0..{L - 1}.")
    out_bases = tuple(out_bases[l] for l in layers)
    return _jacobian_driver(model, params, batches, layers, out_bases, target=target,
                            num_sources=num_sources, key=key, chunk_size=chunk_size, accum_dtype=accum_dtype,
                            mesh=mesh, batch_axis=batch_axis, jit=jit, fn=fn, structured=structured,
                            progress=progress)
